//! The descriptors a worker is given (listening sockets, files, devices, connections, and
//! sockets systemd passed), and the worker's own state directory.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use crate::config::{Resource, WorkerConfig};
use crate::sys;

use super::SpawnError;

static ACTIVATED: std::sync::OnceLock<BTreeMap<String, OwnedFd>> = std::sync::OnceLock::new();

/// Takes the sockets systemd passed by socket activation (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`), once, at start. Returns their names. The variables are removed so that
/// nothing downstream mistakes them for its own.
pub fn take_activated_sockets() -> Vec<String> {
    let mine = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let names: Vec<String> =
        std::env::var("LISTEN_FDNAMES").unwrap_or_default().split(':').map(str::to_string).collect();
    let mut map = BTreeMap::new();
    if mine {
        for k in 0..n.max(0) {
            let fd = 3 + k;
            let name = names.get(k as usize).cloned().unwrap_or_else(|| format!("fd{fd}"));
            match airlock_protocol::sys::claim_inherited_fd(fd) {
                Ok(owned) => {
                    map.insert(name, owned);
                }
                Err(e) => tracing::error!(fd, error = %e, "socket activation: cannot take descriptor"),
            }
        }
    }
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Changing the environment races only with other threads; airlockd calls this first
        // thing in main, while it has none.
        std::env::remove_var(v);
    }
    let names = map.keys().cloned().collect();
    let _ = ACTIVATED.set(map);
    names
}

/// Opens the brokered resources of `w`, in order.
pub fn open_resources(w: &WorkerConfig) -> Result<Vec<OwnedFd>, SpawnError> {
    let mut out = Vec::new();
    for r in &w.resources {
        let fd: OwnedFd = match r.get_ref() {
            Resource::TcpListen { address } => {
                let l = std::net::TcpListener::bind(address.as_str())
                    .map_err(|e| SpawnError::Resource { what: format!("tcp-listen {address}"), source: e })?;
                tracing::info!(worker = %w.name.get_ref(), "listening on {address} for worker {}", w.name.get_ref());
                l.into()
            }
            Resource::UnixListen { path } => {
                let _ = std::fs::remove_file(path);
                let l = std::os::unix::net::UnixListener::bind(path)
                    .map_err(|e| SpawnError::Resource { what: format!("unix-listen {}", path.display()), source: e })?;
                l.into()
            }
            Resource::File { path, write } => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(*write)
                    .create(*write)
                    .truncate(false)
                    .open(path)
                    .map_err(|e| SpawnError::Resource { what: format!("file {}", path.display()), source: e })?;
                f.into()
            }
            Resource::SystemdSocket { name } => {
                let fd = ACTIVATED.get().and_then(|m| m.get(name)).ok_or_else(|| SpawnError::Resource {
                    what: format!("systemd-socket {name}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "systemd passed no socket by that name (LISTEN_FDNAMES)",
                    ),
                })?;
                // A duplicate for each spawn: the worker may restart and needs it again.
                fd.try_clone()
                    .map_err(|e| SpawnError::Resource { what: format!("systemd-socket {name}"), source: e })?
            }
            Resource::TcpConnect { address } => {
                let (fd, failed) = open_tcp_connect(address)
                    .map_err(|e| SpawnError::Resource { what: format!("tcp-connect {address}"), source: e })?;
                if let Some(e) = failed {
                    // A device that is down must not keep its worker from starting: the worker
                    // gets the unconnected socket, fails its first I/O, and asks to reopen.
                    tracing::warn!(worker = %w.name.get_ref(), %address, error = %e, "tcp-connect: connection failed");
                }
                fd
            }
            Resource::Device { path } => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| SpawnError::Resource { what: format!("device {}", path.display()), source: e })?;
                f.into()
            }
        };
        out.push(fd);
    }
    Ok(out)
}

/// Starts the connection of a `tcp-connect` resource (see [`crate::sys::tcp_connect_started`]).
pub fn open_tcp_connect(address: &str) -> std::io::Result<(OwnedFd, Option<std::io::Error>)> {
    let addr: std::net::SocketAddr =
        address.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not IP:PORT"))?;
    sys::tcp_connect_started(addr)
}

/// Creates worker `w`'s state directory, owned by its host uid, mode 0700. Its parents stay
/// the supervisor's, but searchable (0711), so that the worker can reach its own directory.
pub(super) fn prepare_state_directory(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = dir.parent().ok_or_else(|| std::io::Error::other("state directory has no parent"))?;
    if std::fs::symlink_metadata(parent).is_err() {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(parent)?;
    }
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.file_type().is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory (a symlink?)", dir.display())));
    }
    if sys::euid() == 0 {
        if let Some(top) = parent.parent() {
            std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o711))?;
            // The worker runs under its own uid: every directory above must let it pass.
            use std::os::unix::fs::MetadataExt;
            for up in top.ancestors().skip(1) {
                let m = std::fs::metadata(up)?;
                if m.mode() & 0o001 == 0 && m.uid() != uid {
                    return Err(std::io::Error::other(format!(
                        "uid {uid} cannot reach {}: {} is not searchable by others (mode {:o}); make it 0711 or use another state directory",
                        dir.display(),
                        up.display(),
                        m.mode() & 0o7777
                    )));
                }
            }
        }
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))?;
        // Only what is not the worker's already is touched, so that a restart needs no
        // privilege and a first start only CAP_CHOWN (airlockd-privileged.service keeps no
        // CAP_FOWNER or CAP_DAC_READ_SEARCH).
        use std::os::unix::fs::MetadataExt;
        if (m.uid(), m.gid()) != (uid, gid) {
            // What is in it (an earlier uid's files, or root's after systemd chowned the state
            // directory for a service switched to this mode) becomes the worker's: read while
            // the directory is still ours.
            let entries = std::fs::read_dir(dir).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} belongs to uid {}; reading it to give it to uid {uid}: {e} (chown -R it to {uid}:{gid}, or to root)",
                        dir.display(),
                        m.uid()
                    ),
                )
            })?;
            for entry in entries.flatten() {
                std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
            }
            if m.mode() & 0o7777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
            return Ok(());
        }
    }
    if std::fs::symlink_metadata(dir)?.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
