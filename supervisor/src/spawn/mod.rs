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
//!
//! Files: this one (the spawn itself), `decide` (what the host allows and the plan for one
//! worker: a pure function), `resources` (brokered descriptors and the worker's state
//! directory).

mod decide;
mod resources;
#[cfg(test)]
mod tests;

pub use decide::{decide, Decision, HostAbilities, NAMESPACE_FLAGS};
use resources::prepare_state_directory;
pub use resources::{open_resources, open_tcp_connect, take_activated_sockets};

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use airlock_protocol::confinement::{ConfinementReport, Layer, Requirement};
use airlock_protocol::wire::{FromWorker, ToWorker};
use airlock_protocol::{handoff, Channel, ChannelError, Hello, Limits, Role, DEFAULT_REKEY_INTERVAL};

use crate::config::Config;
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
    spawn_watched(cfg, index, host, &AtomicI32::new(0))
}

/// As [`spawn`], publishing the child's pid in `child` from the clone until it is returned
/// (ready) or killed, so that another thread can kill a worker that hangs while it starts.
pub fn spawn_watched(
    cfg: &Config,
    index: usize,
    host: &HostAbilities,
    child: &AtomicI32,
) -> Result<Started, SpawnError> {
    let result = spawn_inner(cfg, index, host, child);
    child.store(0, Ordering::SeqCst);
    result
}

fn spawn_inner(cfg: &Config, index: usize, host: &HostAbilities, child: &AtomicI32) -> Result<Started, SpawnError> {
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
    child.store(pid, Ordering::SeqCst);
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
            other => return Err(SpawnError::Protocol { step: "confine", got: other.kind().into() }),
        };
        let expect =
            verify::Expectations::from_report(&report, &d.plan, (d.host_uid, d.host_gid), host.root || d.use_userns);
        let notes = verify::verify(pid, &expect).map_err(SpawnError::Verification)?;
        ch.send(&ToWorker::Start { settings: cfg.settings_for(w) })
            .map_err(|e| SpawnError::Channel { step: "start", source: e })?;
        let services = match recv_within(&mut ch, "start", deadline, timeout_ms)?.msg {
            FromWorker::Ready { services } => services,
            other => return Err(SpawnError::Protocol { step: "start", got: other.kind().into() }),
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

fn set_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    crate::sys::set_nonblocking(f.as_fd())
}
