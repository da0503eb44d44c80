//! Spawning a worker: a fresh exec of its binary in the namespaces this host allows, with only
//! its channel, key memfd, stderr and brokered descriptors open; then the handshake, the
//! confinement plan, the worker's own report, and verification from outside.
//!
//! Order (also in `ARCHITECTURE.md`):
//! 1. decide namespaces from the configuration and what the host allows (probed once);
//!    a `required` layer the host refuses stops the spawn with the layer and errno;
//! 2. open brokered resources; create the channel and keys (hand-off memfd);
//! 3. clone into the namespaces; write uid/gid maps; release the child to exec;
//! 4. handshake; send the plan; the worker applies its layers, seccomp last, and reports;
//! 5. verify from `/proc/PID/status` (and the installed filter where privileged);
//!    any disagreement kills the worker and is logged as a security event;
//! 6. `Start`; the worker answers `Ready` with its services.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_protocol::confinement::{ConfinementPlan, ConfinementReport, Layer, LayerState, Requirement, Rlimits};
use airlock_protocol::wire::{FromWorker, ToWorker};
use airlock_protocol::{handoff, Channel, ChannelError, Hello, Limits, Role, DEFAULT_REKEY_INTERVAL};

use crate::config::{Config, Resource, UidSpec, WorkerConfig};
use crate::sys;
use crate::verify;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    #[error("required confinement layer {layer} is unavailable on this host: {reason}")]
    LayerUnavailable { layer: Layer, reason: String },
    #[error("worker reported that required layer {layer} failed: {reason}")]
    WorkerLayerFailed { layer: Layer, reason: String, report: ConfinementReport },
    #[error("opening brokered resource {what}: {source}")]
    Resource {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("executing {path}: {source}")]
    Exec {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("channel during {step}: {source}")]
    Channel {
        step: &'static str,
        #[source]
        source: ChannelError,
    },
    #[error("worker did not {step} within {timeout_ms} ms")]
    Timeout { step: &'static str, timeout_ms: u64 },
    #[error("worker sent {got} during {step}")]
    Protocol { step: &'static str, got: String },
    #[error("SECURITY: confinement verification failed: {0}")]
    Verification(String),
}

/// What this host lets the supervisor do, probed once at start.
#[derive(Debug, Clone)]
pub struct HostAbilities {
    pub root: bool,
    /// For each namespace layer: usable (Ok) or the errno that refused it.
    pub namespaces: BTreeMap<Layer, Result<(), i32>>,
}

pub const NAMESPACE_FLAGS: [(Layer, libc::c_int); 7] = [
    (Layer::UserNamespace, libc::CLONE_NEWUSER),
    (Layer::PidNamespace, libc::CLONE_NEWPID),
    (Layer::NetNamespace, libc::CLONE_NEWNET),
    (Layer::MountNamespace, libc::CLONE_NEWNS),
    (Layer::IpcNamespace, libc::CLONE_NEWIPC),
    (Layer::UtsNamespace, libc::CLONE_NEWUTS),
    (Layer::CgroupNamespace, libc::CLONE_NEWCGROUP),
];

impl HostAbilities {
    pub fn probe() -> HostAbilities {
        let root = sys::euid() == 0;
        let user = sys::can_clone(libc::CLONE_NEWUSER);
        let mut namespaces = BTreeMap::new();
        namespaces.insert(Layer::UserNamespace, user);
        for (layer, flag) in NAMESPACE_FLAGS.iter().skip(1) {
            // With a user namespace, the others come with it; without, only root has them.
            let with_user = user.is_ok() && sys::can_clone(libc::CLONE_NEWUSER | flag).is_ok();
            let alone = sys::can_clone(*flag);
            let r = if with_user || alone.is_ok() { Ok(()) } else { alone };
            namespaces.insert(*layer, r);
        }
        HostAbilities { root, namespaces }
    }
}

fn errno_str(n: i32) -> String {
    format!("{} ({})", airlock_protocol::confinement::errno_name(n), std::io::Error::from_raw_os_error(n))
}

/// The decisions for one worker before it is cloned.
#[derive(Debug, Clone)]
pub struct Decision {
    pub clone_flags: libc::c_int,
    pub use_userns: bool,
    pub host_uid: u32,
    pub host_gid: u32,
    pub plan: ConfinementPlan,
}

/// Decides namespaces, ids and the plan for `w`. Pure: testable without spawning.
pub fn decide(cfg: &Config, index: usize, host: &HostAbilities, self_ids: (u32, u32)) -> Result<Decision, SpawnError> {
    let w = &cfg.workers[index];
    let req = |l| cfg.requirement(w, l);
    let mut from_sup: Vec<(Layer, LayerState)> = Vec::new();
    let mut flags = 0;
    let userns_ok = host.namespaces.get(&Layer::UserNamespace).copied().unwrap_or(Err(libc::ENOSYS));
    let use_userns = req(Layer::UserNamespace) != Requirement::Off && userns_ok.is_ok();
    for (layer, flag) in NAMESPACE_FLAGS {
        let r = req(layer);
        if r == Requirement::Off {
            from_sup.push((layer, LayerState::Off));
            continue;
        }
        let avail = host.namespaces.get(&layer).copied().unwrap_or(Err(libc::ENOSYS));
        // Other namespaces need either root or our user namespace.
        let usable = match avail {
            Ok(()) if layer == Layer::UserNamespace || host.root || use_userns => Ok(()),
            Ok(()) => Err("needs a user namespace or root".to_string()),
            Err(n) => Err(errno_str(n)),
        };
        match usable {
            Ok(()) => {
                flags |= flag;
                from_sup.push((layer, LayerState::Applied));
            }
            Err(why) if r == Requirement::Required => return Err(SpawnError::LayerUnavailable { layer, reason: why }),
            Err(why) => from_sup.push((layer, LayerState::Unavailable(why))),
        }
    }
    // Host ids.
    let [lo, _] = cfg.supervisor.dynamic_uid_range;
    let (host_uid, host_gid, switch_to, uid_state) = if host.root {
        let uid = match &w.uid {
            Some(UidSpec::Fixed(u)) => *u,
            _ => lo + index as u32,
        };
        let gid = w.gid.unwrap_or(uid);
        if use_userns {
            (uid, gid, None, Ok(LayerState::Applied))
        } else {
            (uid, gid, Some((uid, gid)), Ok(LayerState::Applied))
        }
    } else {
        let why = format!("supervisor runs unprivileged: workers share uid {}", self_ids.0);
        (self_ids.0, self_ids.1, None, Err(why))
    };
    match (req(Layer::Uid), uid_state) {
        (Requirement::Off, _) => from_sup.push((Layer::Uid, LayerState::Off)),
        (_, Ok(s)) if switch_to.is_none() => from_sup.push((Layer::Uid, s)),
        (_, Ok(_)) => {} // applied by the worker itself (setresuid), reported by it
        (Requirement::Required, Err(why)) => {
            return Err(SpawnError::LayerUnavailable { layer: Layer::Uid, reason: why })
        }
        (Requirement::BestEffort, Err(why)) => from_sup.push((Layer::Uid, LayerState::Unavailable(why))),
    }
    let rl = cfg.rlimits(w);
    let plan = ConfinementPlan {
        worker: w.name.get_ref().clone(),
        policy: w.policy.get_ref().clone(),
        requirements: Layer::ALL.iter().map(|l| (*l, req(*l))).collect(),
        minimal_root: flags & libc::CLONE_NEWNS != 0,
        switch_to: if req(Layer::Uid) == Requirement::Off { None } else { switch_to },
        landlock_read: w.landlock.read.clone(),
        landlock_write: w.landlock.write.clone(),
        rlimits: Rlimits {
            nofile: Some(rl.nofile),
            nproc: Some(rl.nproc),
            address_space: Some(rl.address_space_mib << 20),
            fsize: Some(rl.file_size_mib << 20),
            core: 0,
        },
        from_supervisor: from_sup,
        seccomp_program: Vec::new(),
        state_directory: cfg.worker_state_directory(w),
    };
    let mut plan = plan;
    if let Some(dir) = &plan.state_directory {
        plan.landlock_write.push(dir.clone());
    }
    Ok(Decision { clone_flags: flags, use_userns, host_uid, host_gid, plan })
}

/// A started, verified, ready worker.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub channel: Channel,
    pub stderr: OwnedFd,
    pub report: ConfinementReport,
    pub services: Vec<String>,
    pub notes: Vec<String>,
}

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
fn prepare_state_directory(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
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

fn write_maps(pid: i32, d: &Decision, self_ids: (u32, u32)) -> std::io::Result<()> {
    let (uid, gid) = if sys::euid() == 0 { (d.host_uid, d.host_gid) } else { self_ids };
    if sys::euid() != 0 {
        // An unprivileged writer of gid_map must deny setgroups first.
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
    }
    std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {uid} 1\n"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {gid} 1\n"))?;
    Ok(())
}

fn recv_within(
    ch: &mut Channel,
    step: &'static str,
    deadline: Instant,
    timeout_ms: u64,
) -> Result<airlock_protocol::Received<FromWorker>, SpawnError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match ch.recv_timeout::<FromWorker>(left) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(SpawnError::Timeout { step, timeout_ms }),
        Err(e) => Err(SpawnError::Channel { step, source: e }),
    }
}

/// Spawns worker `index` of `cfg` and returns it verified and ready. On any failure after the
/// clone, the child is killed before returning.
pub fn spawn(cfg: &Config, index: usize, host: &HostAbilities) -> Result<Started, SpawnError> {
    let w = &cfg.workers[index];
    let self_ids = (sys::euid(), sys::egid());
    let mut d = decide(cfg, index, host, self_ids)?;
    if d.plan.requirement(Layer::Seccomp) != Requirement::Off {
        let prog = verify::compiled(w.policy.get_ref()).map_err(|e| SpawnError::LayerUnavailable {
            layer: Layer::Seccomp,
            reason: format!("policy {}: {e}", w.policy.get_ref()),
        })?;
        d.plan.seccomp_program = airlock_policies::pack_program(&prog);
    }
    if let Some(dir) = &d.plan.state_directory {
        prepare_state_directory(dir, d.host_uid, d.host_gid)
            .map_err(|e| SpawnError::Io { step: "preparing the state directory", source: e })?;
    }
    let brokered = open_resources(w)?;
    let exe_path = cfg.resolve_executable(w);
    let exe = CString::new(exe_path.as_os_str().as_bytes()).map_err(|_| SpawnError::Exec {
        path: exe_path.display().to_string(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    let mut argv = vec![exe.clone()];
    for a in &w.args {
        argv.push(CString::new(a.as_str()).map_err(|_| SpawnError::Exec {
            path: exe_path.display().to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?);
    }
    // A minimal environment: no secrets, nothing inherited but the log filter.
    let mut envp = vec![CString::new(format!("AIRLOCK_WORKER={}", w.name.get_ref())).unwrap_or_default()];
    if let Ok(v) = std::env::var("AIRLOCK_LOG") {
        if let Ok(c) = CString::new(format!("AIRLOCK_LOG={v}")) {
            envp.push(c);
        }
    }
    // The supervisor passes bulk payloads on without reading them: never map them.
    // Unmapped sealed payloads cost nothing and meet the broker's quota check (Busy); an
    // encrypted one must be decrypted here, so its size is bounded by the quota in the channel.
    let limits = Limits { map_bulk: false, max_mapped_bulk: w.quota.bulk_bytes, ..Limits::default() };
    let (mut ch, child_end) = handoff::prepare(limits, DEFAULT_REKEY_INTERVAL)
        .map_err(|e| SpawnError::Channel { step: "prepare", source: e })?;
    let (child_sock, child_keys) = child_end.into_parts();
    let (err_r, err_w) = std::io::pipe().map_err(|e| SpawnError::Io { step: "stderr pipe", source: e })?;
    let devnull = std::fs::File::open("/dev/null").map_err(|e| SpawnError::Io { step: "open /dev/null", source: e })?;
    let devnull_w = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| SpawnError::Io { step: "open /dev/null", source: e })?;
    let mut fds: Vec<(OwnedFd, i32)> = vec![
        (devnull.into(), 0),
        (devnull_w.into(), 1),
        (err_w.into(), 2),
        (child_sock, handoff::CHANNEL_FD),
        (child_keys, handoff::KEYS_FD),
    ];
    for (i, fd) in brokered.into_iter().enumerate() {
        fds.push((fd, handoff::FIRST_BROKERED_FD + i as i32));
    }
    let pending =
        sys::spawn(sys::SpawnPlan { exe, argv, envp, fds, clone_flags: d.clone_flags, become_ns_root: d.use_userns })
            .map_err(|e| SpawnError::Io { step: "clone", source: e })?;
    let pid = pending.pid;
    let pidfd = match sys::pidfd_open(pid) {
        Ok(p) => p,
        Err(e) => {
            sys::kill_and_reap(pid);
            return Err(SpawnError::Io { step: "pidfd_open", source: e });
        }
    };
    let kill = |pidfd: &OwnedFd| {
        let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
        for _ in 0..100 {
            if matches!(sys::reap(pidfd.as_fd()), Ok(Some(_)) | Err(_)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    if d.use_userns {
        if let Err(e) = write_maps(pid, &d, self_ids) {
            kill(&pidfd);
            return Err(SpawnError::Io { step: "writing uid/gid maps", source: e });
        }
    }
    if let Err(e) = pending.release() {
        kill(&pidfd);
        return Err(SpawnError::Exec { path: exe_path.display().to_string(), source: e });
    }
    let timeout_ms = cfg.supervisor.ready_timeout_ms;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let result = (|| -> Result<(ConfinementReport, Vec<String>, Vec<String>), SpawnError> {
        ch.set_recv_timeout(Some(Duration::from_millis(timeout_ms)))
            .map_err(|e| SpawnError::Channel { step: "handshake", source: e })?;
        let peer = ch
            .handshake(&Hello::new(Role::Supervisor, "airlockd"))
            .map_err(|e| SpawnError::Channel { step: "handshake", source: e })?;
        ch.set_recv_timeout(None).map_err(|e| SpawnError::Channel { step: "handshake", source: e })?;
        if peer.role != Role::Worker {
            return Err(SpawnError::Protocol { step: "handshake", got: format!("role {:?}", peer.role) });
        }
        ch.send(&ToWorker::Confine(Box::new(d.plan.clone())))
            .map_err(|e| SpawnError::Channel { step: "confine", source: e })?;
        let report = match recv_within(&mut ch, "confine", deadline, timeout_ms)?.msg {
            FromWorker::Confined(r) => r,
            FromWorker::ConfineFailed { layer, reason, report } => {
                return Err(SpawnError::WorkerLayerFailed { layer, reason, report })
            }
            other => return Err(SpawnError::Protocol { step: "confine", got: kind_of(&other).into() }),
        };
        let expect =
            verify::Expectations::from_report(&report, &d.plan, (d.host_uid, d.host_gid), host.root || d.use_userns);
        let notes = verify::verify(pid, &expect).map_err(SpawnError::Verification)?;
        ch.send(&ToWorker::Start { settings: cfg.settings_for(w) })
            .map_err(|e| SpawnError::Channel { step: "start", source: e })?;
        let services = match recv_within(&mut ch, "start", deadline, timeout_ms)?.msg {
            FromWorker::Ready { services } => services,
            other => return Err(SpawnError::Protocol { step: "start", got: kind_of(&other).into() }),
        };
        Ok((report, services, notes))
    })();
    match result {
        Ok((report, services, notes)) => {
            Ok(Started { pid, pidfd, channel: ch, stderr: err_r.into(), report, services, notes })
        }
        Err(e) => {
            kill(&pidfd);
            // Keep what the worker wrote on stderr: it explains most failures.
            let mut tail = String::new();
            let _ = airlock_protocol::sys::poll_readable(err_r.as_fd(), 0);
            let mut f = std::fs::File::from(OwnedFd::from(err_r));
            let _ = set_nonblocking(&f);
            let _ = std::io::Read::read_to_string(&mut f, &mut tail);
            if !tail.trim().is_empty() {
                tracing::warn!(worker = %w.name.get_ref(), stderr = %tail.trim(), "worker stderr before failure");
            }
            Err(e)
        }
    }
}

/// The kind of a worker message, for errors and logs (never its contents).
fn kind_of(m: &FromWorker) -> &'static str {
    match m {
        FromWorker::Confined(_) => "Confined",
        FromWorker::ConfineFailed { .. } => "ConfineFailed",
        FromWorker::Ready { .. } => "Ready",
        FromWorker::Request(_) => "Request",
        FromWorker::Reply(_) => "Reply",
        FromWorker::Send(_) => "Send",
        FromWorker::Ack { .. } => "Ack",
        FromWorker::Event(_) => "Event",
        FromWorker::Reopen { .. } => "Reopen",
    }
}

fn set_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    crate::sys::set_nonblocking(f.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(confinement: &str) -> Config {
        let text = format!(
            "[defaults.confinement]\n{confinement}\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[[worker]]\nname = \"b\"\nexecutable = \"x\"\npolicy = \"echo\"\n"
        );
        crate::config::parse(&text, "t", &["echo".to_string()]).expect("valid")
    }

    fn host(root: bool, userns: Result<(), i32>) -> HostAbilities {
        let mut namespaces: BTreeMap<Layer, Result<(), i32>> =
            NAMESPACE_FLAGS.iter().map(|(l, _)| (*l, Ok(()))).collect();
        namespaces.insert(Layer::UserNamespace, userns);
        HostAbilities { root, namespaces }
    }

    fn state(d: &Decision, l: Layer) -> Option<&LayerState> {
        d.plan.from_supervisor.iter().find(|(x, _)| *x == l).map(|(_, s)| s)
    }

    #[test]
    fn a_required_namespace_the_host_refuses_names_the_layer_and_errno() {
        let cfg = config("user-namespace = \"required\"\nuid = \"off\"");
        match decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)) {
            Err(SpawnError::LayerUnavailable { layer: Layer::UserNamespace, reason }) => {
                assert!(reason.starts_with("EPERM ("), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let e = decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)).expect_err("refused").to_string();
        assert!(e.starts_with("required confinement layer user-namespace is unavailable on this host: EPERM"), "{e}");
    }

    #[test]
    fn best_effort_namespaces_without_a_user_namespace_are_reported_unavailable_and_not_cloned() {
        let cfg = config(
            "user-namespace = \"best-effort\"\npid-namespace = \"best-effort\"\nnet-namespace = \"best-effort\"\nmount-namespace = \"best-effort\"\nipc-namespace = \"best-effort\"\nuts-namespace = \"best-effort\"\ncgroup-namespace = \"best-effort\"\nuid = \"best-effort\"",
        );
        let d = decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)).expect("best-effort");
        assert_eq!(d.clone_flags, 0);
        assert!(!d.use_userns);
        assert!(matches!(state(&d, Layer::UserNamespace), Some(LayerState::Unavailable(w)) if w.starts_with("EPERM")));
        assert_eq!(
            state(&d, Layer::PidNamespace),
            Some(&LayerState::Unavailable("needs a user namespace or root".into()))
        );
        assert_eq!(
            state(&d, Layer::Uid),
            Some(&LayerState::Unavailable("supervisor runs unprivileged: workers share uid 1000".into()))
        );
        assert!(!d.plan.minimal_root);
    }

    #[test]
    fn a_required_uid_for_an_unprivileged_supervisor_is_refused() {
        let cfg = config("uid = \"required\"");
        match decide(&cfg, 1, &host(false, Ok(())), (1000, 1000)) {
            Err(SpawnError::LayerUnavailable { layer: Layer::Uid, reason }) => {
                assert_eq!(reason, "supervisor runs unprivileged: workers share uid 1000")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unprivileged_supervisor_with_user_namespaces_clones_every_namespace() {
        let cfg = config("uid = \"best-effort\"");
        let d = decide(&cfg, 0, &host(false, Ok(())), (1000, 1000)).expect("decide");
        let all = NAMESPACE_FLAGS.iter().fold(0, |f, (_, x)| f | x);
        assert_eq!(d.clone_flags, all);
        assert!(d.use_userns && d.plan.minimal_root);
        assert_eq!((d.host_uid, d.host_gid), (1000, 1000));
        assert_eq!(d.plan.switch_to, None);
    }

    #[test]
    fn a_root_supervisor_gives_each_worker_its_dynamic_uid() {
        let cfg = config("user-namespace = \"off\"");
        let d = decide(&cfg, 1, &host(true, Ok(())), (0, 0)).expect("decide");
        let [lo, _] = cfg.supervisor.dynamic_uid_range;
        assert_eq!((d.host_uid, d.host_gid), (lo + 1, lo + 1));
        assert_eq!(d.plan.switch_to, Some((lo + 1, lo + 1)), "without a user namespace the worker switches itself");
        assert_eq!(state(&d, Layer::UserNamespace), Some(&LayerState::Off));
        assert_eq!(d.clone_flags & libc::CLONE_NEWUSER, 0);
        assert_ne!(d.clone_flags & libc::CLONE_NEWPID, 0, "root needs no user namespace for the others");
    }
}
