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

use airlock_protocol::confinement::{ConfinementReport, Layer, LayerState, Requirement};
use airlock_protocol::wire::{FromWorker, ToWorker};
use airlock_protocol::{handoff, Channel, ChannelError, Hello, Limits, Role, DEFAULT_REKEY_INTERVAL};

use crate::cgroup::WorkerCgroup;
use crate::config::{Config, WorkerLimits};
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
    /// Its own cgroup, removed when it is gone.
    pub cgroup: Option<WorkerCgroup>,
    /// Which bounds hold its memory, CPU and processes (for `airlock status`).
    pub bounds: Vec<String>,
}

/// Removes a worker's cgroup unless the spawn succeeds and takes it.
struct CgroupGuard(Option<WorkerCgroup>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            cg.remove();
        }
    }
}

/// Sets the priority and OOM score of `pid` (cloned, not yet exec'd).
fn apply_priority(pid: i32, l: &WorkerLimits) -> Result<(), String> {
    let errno = |e: std::io::Error| {
        e.raw_os_error().map_or(e.to_string(), |n| format!("{} ({e})", airlock_protocol::confinement::errno_name(n)))
    };
    // Set even when it is 0: the child inherits airlockd's own nice value (a unit's `Nice=`, or
    // `nice airlockd`), which the plan does not (an unprivileged airlockd cannot lower it).
    sys::set_nice(pid, l.nice).map_err(|e| {
        format!(
            "setpriority(nice {}): {} (a worker starts at airlockd's own nice value; lowering it takes privilege)",
            l.nice,
            errno(e)
        )
    })?;
    if l.sched_idle {
        sys::set_sched_idle(pid).map_err(|e| format!("sched_setscheduler(SCHED_IDLE): {}", errno(e)))?;
    }
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), l.oom_score_adj.to_string())
        .map_err(|e| format!("writing /proc/{pid}/oom_score_adj: {}", errno(e)))?;
    Ok(())
}

/// Checks from `/proc` that `pid` runs with the priority and OOM score it was given.
pub fn verify_priority(pid: i32, l: &WorkerLimits) -> Result<(), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command (which may hold spaces and parentheses): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("/proc/PID/stat malformed")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<i64>().ok());
    let (nice, policy) = (field(19), field(41));
    if nice != Some(i64::from(l.nice)) {
        return Err(format!("nice is {nice:?}, not {}", l.nice));
    }
    let want_policy = if l.sched_idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    if policy != Some(i64::from(want_policy)) {
        return Err(format!("scheduling policy is {policy:?}, not {want_policy}"));
    }
    let adj =
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).map_err(|e| format!("oom_score_adj: {e}"))?;
    if adj.trim() != l.oom_score_adj.to_string() {
        return Err(format!("oom_score_adj is {}, not {}", adj.trim(), l.oom_score_adj));
    }
    Ok(())
}

/// What bounds a worker without its own cgroup: its rlimits (heap and mappings by the address
/// space; unmapped memfds by descriptors times file size) and its priority.
fn bounds_without_cgroup(why: &str, rl: &airlock_protocol::confinement::Rlimits) -> Vec<String> {
    let mib = |v: Option<u64>| v.map_or("unlimited".to_string(), |b| format!("{} MiB", b >> 20));
    let memfds = match (rl.nofile, rl.fsize) {
        (Some(n), Some(f)) => format!("{n} descriptors × {} = {} MiB", mib(Some(f)), (n * f) >> 20),
        _ => "unbounded".to_string(),
    };
    vec![
        format!(
            "memory: no cgroup ({why}): mappings ≤ address space {}, unmapped memfds ≤ {memfds}",
            mib(rl.address_space)
        ),
        format!("pids: no cgroup: RLIMIT_NPROC {} for its uid", rl.nproc.map_or("unlimited".into(), |n| n.to_string())),
        "cpu: no cgroup: bounded only by its priority".to_string(),
    ]
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
    // Nothing a starting worker says carries a payload: one is closed unread (never
    // decrypted or mapped), and the start fails.
    match ch.recv_timeout_admitting::<FromWorker>(left, |_, _| false) {
        Ok(Some(r)) if r.bulk.is_some() || r.declined.is_some() => Err(SpawnError::Channel {
            step,
            source: airlock_protocol::ChannelError::UnexpectedBulk { kind: r.msg.kind() },
        }),
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
    let mut cgroup = CgroupGuard(None);
    if d.cgroup {
        match host.cgroups.create(w.name.get_ref(), &d.limits) {
            Ok(cg) => cgroup.0 = Some(cg),
            Err(why) if d.plan.requirement(Layer::Cgroup) == Requirement::Required => {
                return Err(SpawnError::LayerUnavailable { layer: Layer::Cgroup, reason: why.to_string() })
            }
            Err(why) => d.plan.from_supervisor.push((Layer::Cgroup, LayerState::Unavailable(why.to_string()))),
        }
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
    // Its cgroup and priority before it runs a single instruction of its own.
    let placed = [
        (Layer::Cgroup, cgroup.0.as_ref().map(|cg| cg.attach(pid).map_err(|e| e.to_string()))),
        (Layer::Priority, d.priority.then(|| apply_priority(pid, &d.limits))),
    ];
    for (layer, result) in placed {
        match result {
            None => {}
            Some(Ok(())) => d.plan.from_supervisor.push((layer, LayerState::Applied)),
            Some(Err(why)) if d.plan.requirement(layer) == Requirement::Required => {
                kill(&pidfd);
                return Err(SpawnError::LayerUnavailable { layer, reason: why });
            }
            Some(Err(why)) => {
                if layer == Layer::Cgroup {
                    if let Some(cg) = cgroup.0.take() {
                        // Partly attached: back home first, or removing it would kill the child.
                        cg.detach(pid);
                        cg.remove();
                    }
                }
                d.plan.from_supervisor.push((layer, LayerState::Unavailable(why)));
            }
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
        if let Some(cg) = &cgroup.0 {
            cg.verify(pid).map_err(|e| SpawnError::Verification(format!("cgroup: {e}")))?;
        }
        if matches!(report.get(Layer::Priority), Some(LayerState::Applied)) {
            verify_priority(pid, &d.limits).map_err(|e| SpawnError::Verification(format!("priority: {e}")))?;
        }
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
            let mut bounds = match (&cgroup.0, report.get(Layer::Cgroup)) {
                (Some(cg), _) => cg.describe(),
                (None, state) => {
                    let why = state.and_then(|s| s.why()).unwrap_or("turned off by the configuration");
                    bounds_without_cgroup(why, &d.plan.rlimits)
                }
            };
            let l = &d.limits;
            bounds.push(match report.get(Layer::Priority) {
                Some(LayerState::Applied) => format!(
                    "priority: nice {}{}, oom_score_adj {} (chosen by the OOM killer before airlockd)",
                    l.nice,
                    if l.sched_idle { ", SCHED_IDLE" } else { "" },
                    l.oom_score_adj
                ),
                Some(s) => format!("priority: {s}"),
                None => "priority: not reported".into(),
            });
            let cgroup = cgroup.0.take();
            Ok(Started { pid, pidfd, channel: ch, stderr: err_r.into(), report, services, notes, cgroup, bounds })
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
