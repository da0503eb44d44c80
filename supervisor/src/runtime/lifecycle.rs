//! Worker lifecycle: start (spawn, confine, verify) with one log line per worker, exit and
//! its description, restart with exponential backoff up to a crash-loop limit, and stopping
//! every worker at shutdown. The restart decision is a plain function ([`restart_decision`]).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::confinement::LayerState;
use airlock_protocol::control::WorkerState;
use airlock_protocol::wire::{CallFailure, ToWorker};

use super::io::printable;
use super::slot::{layer_summary, Running};
use super::starter::Outcome;
use super::{security, Supervisor};
use crate::config::{RestartConfig, RestartPolicy};
use crate::journal::Entry;
use crate::permits;
use crate::spawn::SpawnError;
use crate::sys::{self, ExitStatus};

/// Whether the installed seccomp filter was read back and compared with the policy, from
/// verification's notes (the notes themselves are at DEBUG and in `airlock status`).
fn filter_summary(notes: &[String]) -> &'static str {
    if notes.iter().any(|n| n.starts_with("installed seccomp filter is exactly")) {
        "read back and compared"
    } else if notes.iter().any(|n| n.starts_with("installed filter not compared")) {
        "not compared (see airlock status)"
    } else {
        "-"
    }
}

/// Kills a worker that never served and waits (briefly) for it.
fn kill_and_reap(pidfd: &std::os::fd::OwnedFd) {
    let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    for _ in 0..200 {
        if !matches!(sys::reap(pidfd.as_fd()), Ok(None)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What happens after a worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Restart {
    /// The policy does not restart it (`never`, or `on-failure` after a clean exit).
    Stay,
    /// Too many restarts within the window: a crash loop; the reason says so.
    GiveUp(String),
    /// Start it again after this backoff.
    After(Duration),
}

/// The restart decision for a worker whose recent restarts are `history` (oldest first; the
/// ones outside the window are dropped, and a restart is recorded when one is decided).
/// The backoff doubles with each restart in the window, from `initial-backoff-ms` up to
/// `max-backoff-ms`.
pub(super) fn restart_decision(
    policy: &RestartConfig,
    history: &mut VecDeque<Instant>,
    now: Instant,
    clean_exit: bool,
) -> Restart {
    if policy.policy == RestartPolicy::Never || (policy.policy == RestartPolicy::OnFailure && clean_exit) {
        return Restart::Stay;
    }
    let window = Duration::from_secs(policy.window_s);
    while history.front().is_some_and(|t| now.duration_since(*t) > window) {
        history.pop_front();
    }
    if history.len() as u32 >= policy.max_restarts {
        return Restart::GiveUp(format!(
            "crash loop: {} restarts within {} s; not restarting",
            history.len(),
            policy.window_s
        ));
    }
    let exp = history.len().min(20) as u32;
    let delay = policy.initial_backoff_ms.saturating_mul(1u64 << exp).min(policy.max_backoff_ms);
    history.push_back(now);
    Restart::After(Duration::from_millis(delay))
}

impl Supervisor {
    /// Starts worker `i` on its starter thread; [`Supervisor::started`] takes the result. The
    /// event loop goes on meanwhile (see `starter`).
    pub(super) fn launch(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.attempt += 1;
        slot.state = WorkerState::Starting;
        slot.backoff_until = None;
        if !self.starter.start(i, slot.attempt) {
            tracing::error!(worker = %slot.name, "the starter thread is gone; not starting");
            slot.state = WorkerState::Failed("the starter thread is gone".into());
            self.initial_started();
        }
    }

    /// A start finished: the worker serves, or the failure is recorded and a restart planned.
    pub(super) fn started(&mut self, out: Outcome) {
        let i = out.slot;
        let name = self.slots[i].name.clone();
        let _span = tracing::info_span!("worker", name = %name).entered();
        if out.attempt != self.slots[i].attempt || self.slots[i].state != WorkerState::Starting {
            // Not the start this slot waits for (cannot happen: one start at a time per slot).
            if let Ok(st) = out.result {
                kill_and_reap(&st.pidfd);
                if let Some(c) = &st.cgroup {
                    c.remove();
                }
            }
            return;
        }
        self.initial_started();
        match out.result {
            Ok(st) => {
                let stderr = std::fs::File::from(st.stderr);
                let _ = sys::set_nonblocking(stderr.as_fd());
                let mut ch = st.channel;
                // The event loop never waits on one worker: frames it has no room for are
                // queued, and a worker that stops reading is killed once its queue is full.
                ch.set_nonblocking_sends(true);
                // One line per worker at INFO (below); each layer at DEBUG, and a WARN for
                // every layer that is not applied, with why (`airlock status` shows them all).
                for (layer, state) in &st.report.layers {
                    match state {
                        LayerState::Degraded(_) | LayerState::Unavailable(_) => {
                            // The reason is the worker's text.
                            let state = printable(&state.to_string(), 500);
                            tracing::warn!(pid = st.pid, layer = %layer, "confinement layer not applied: {state}")
                        }
                        _ => tracing::debug!(pid = st.pid, layer = %layer, state = %state, "confinement"),
                    }
                }
                for n in &st.notes {
                    tracing::debug!(pid = st.pid, "{n}");
                }
                let layers = layer_summary(&st.report);
                let filter = filter_summary(&st.notes);
                self.calls.forget_caller(i);
                let slot = &mut self.slots[i];
                slot.report = Some(st.report);
                slot.notes = st.notes;
                slot.bounds = st.bounds;
                slot.services = st.services;
                slot.state = WorkerState::Running;
                slot.backoff_until = None;
                slot.broker_state = permits::INITIAL_STATE.into();
                slot.violations = 0;
                slot.incarnation += 1;
                slot.run = Some(Running {
                    pid: st.pid,
                    pidfd: st.pidfd,
                    channel: ch,
                    stderr,
                    stderr_buf: Vec::new(),
                    sigsys: None,
                    started: Instant::now(),
                    channel_down: false,
                    killed: false,
                    watching: None,
                    cgroup: st.cgroup,
                });
                let pid = slot.run.as_ref().map_or(0, |r| r.pid);
                // The service names are the worker's words (checked against nothing yet).
                let services = printable(&slot.services.join(","), 500);
                tracing::info!(pid, %services, %layers, filter, "worker ready");
            }
            Err(e) => {
                let fatal = matches!(
                    e,
                    SpawnError::LayerUnavailable { .. }
                        | SpawnError::WorkerLayerFailed { .. }
                        | SpawnError::Verification(_)
                );
                if let SpawnError::WorkerLayerFailed { report, .. } = &e {
                    self.slots[i].report = Some(report.clone());
                }
                // A start that failed may quote the worker (a layer's reason, its report).
                let error = printable(&e.to_string(), 1000);
                if matches!(e, SpawnError::Verification(_)) {
                    security::event(&name, None, format_args!("worker killed: {error}"));
                } else {
                    tracing::error!(worker = %name, %error, "worker did not start");
                }
                if fatal {
                    self.slots[i].state = WorkerState::Failed(e.to_string());
                } else {
                    self.slots[i].last_exit = Some(format!("start failed: {e}"));
                    self.schedule_restart(i, false);
                }
            }
        }
    }

    /// After an exit (or a failed start): restart after the backoff, or stay down as the
    /// restart policy says (see [`restart_decision`]).
    pub(super) fn schedule_restart(&mut self, i: usize, clean_exit: bool) {
        let slot = &mut self.slots[i];
        match restart_decision(&slot.cfg.restart, &mut slot.restarts, Instant::now(), clean_exit) {
            Restart::Stay => slot.state = WorkerState::Stopped,
            Restart::GiveUp(why) => {
                tracing::error!(worker = %slot.name, "{why}");
                slot.state = WorkerState::Failed(why);
            }
            Restart::After(delay) => {
                let delay_ms = delay.as_millis() as u64;
                slot.total_restarts += 1;
                slot.backoff_until = Some(Instant::now() + delay);
                slot.state = WorkerState::Restarting { in_ms: delay_ms };
                tracing::warn!(worker = %slot.name, delay_ms, "restarting after backoff");
            }
        }
    }

    pub(super) fn handle_exit(&mut self, i: usize) {
        self.drain_stderr(i);
        // What the worker sent before it exited still counts (acknowledgements above all):
        // read the channel to its end first, a bounded number of turns.
        for _ in 0..256 {
            let more = self.slots[i].run.as_ref().is_some_and(|r| !r.channel_down)
                && self.slots[i].run.as_ref().is_some_and(|r| {
                    r.channel.has_buffered()
                        || airlock_protocol::sys::poll_readable(r.channel.as_fd(), 0).unwrap_or(false)
                });
            if !more {
                break;
            }
            self.drain_channel(i);
        }
        // What its rate limits suppressed is told before its exit.
        self.summarise_noise(i, Instant::now(), true);
        let Some(r) = self.slots[i].run.take() else { return };
        let status = match sys::reap(r.pidfd.as_fd()) {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Not exited yet (spurious wake-up): keep watching.
                self.slots[i].run = Some(r);
                return;
            }
            Err(e) => {
                tracing::error!(worker = %self.slots[i].name, error = %e, "waitid failed");
                ExitStatus::Code(-1)
            }
        };
        let policy = self.slots[i].cfg.policy.get_ref().clone();
        let mut reason = describe_exit(status, r.sigsys.as_deref(), &policy);
        if let Some(cg) = &r.cgroup {
            // (A worker whose channel closed is marked killed by airlockd too, so `killed` cannot
            // tell the two apart.) The kernel counts its OOM kills in the worker's own cgroup: only a SIGKILL with a
            // count is a death by the memory limit (a hostile worker cannot forge the count).
            let kills = cg.oom_kills();
            if status == ExitStatus::Signal(libc::SIGKILL) && kills > 0 {
                reason = format!(
                    "killed by its memory limit ({} MiB): the kernel's OOM killer in its own cgroup",
                    cg.limits.memory_bytes >> 20
                );
            }
            cg.remove();
        }
        let ran = r.started.elapsed();
        tracing::warn!(worker = %self.slots[i].name, pid = r.pid, ran_ms = ran.as_millis() as u64, "worker exited: {reason}");
        self.slots[i].last_exit = Some(reason);
        self.revoke_streams_of(i);
        for p in self.calls.drain_target(i) {
            let worker = self.slots[i].name.clone();
            self.answer(p.caller, Err(CallFailure::CalleeDied { worker }), None);
        }
        // Calls this worker was waiting for are answered into the void: drop them.
        self.calls.forget_caller(i);
        // Delivered but unacknowledged messages go back to the front, in order.
        let slot = &mut self.slots[i];
        let mut back: Vec<Entry> = std::mem::take(&mut slot.delivered).into_values().collect();
        back.extend(slot.outbox.drain(..));
        slot.outbox = back.into();
        self.schedule_restart(i, status == ExitStatus::Code(0));
    }

    pub(super) fn kill(&mut self, i: usize) {
        if let Some(r) = self.slots[i].run.as_mut() {
            r.killed = true;
            let _ = sys::pidfd_send_signal(r.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    pub(super) fn shutdown(&mut self, flush_journal: bool) {
        self.notifier.send("STOPPING=1");
        self.shutdown_journal(flush_journal);
        self.stop_workers();
    }

    /// `Shutdown` to every worker, SIGKILL for those still running after the timeout.
    pub(super) fn stop_workers(&mut self) {
        // Workers still starting never served: kill them, and take what their starts return.
        let starting: Vec<usize> =
            (0..self.slots.len()).filter(|&i| self.slots[i].state == WorkerState::Starting).collect();
        for &i in &starting {
            self.starter.kill_starting(i);
        }
        let within = Duration::from_millis(self.cfg.supervisor.shutdown_timeout_ms);
        for out in self.starter.drain(starting.len(), within) {
            if let Ok(st) = out.result {
                kill_and_reap(&st.pidfd);
                if let Some(c) = &st.cgroup {
                    c.remove();
                }
            }
            self.slots[out.slot].state = WorkerState::Stopped;
        }
        for s in &mut self.slots {
            if let Some(r) = s.run.as_mut() {
                let _ = r.channel.send(&ToWorker::Shutdown);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(self.cfg.supervisor.shutdown_timeout_ms);
        loop {
            let mut left = 0;
            for i in 0..self.slots.len() {
                let Some(r) = self.slots[i].run.as_ref() else { continue };
                match sys::reap(r.pidfd.as_fd()) {
                    Ok(Some(st)) => {
                        tracing::info!(worker = %self.slots[i].name, "stopped: {}", describe_exit(st, None, ""));
                        if let Some(cg) = r.cgroup.as_ref() {
                            cg.remove();
                        }
                        self.slots[i].run = None;
                        self.slots[i].state = WorkerState::Stopped;
                    }
                    _ => left += 1,
                }
            }
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                for s in &mut self.slots {
                    if let Some(r) = s.run.take() {
                        tracing::warn!(worker = %s.name, "did not stop in time; SIGKILL");
                        let _ = sys::pidfd_send_signal(r.pidfd.as_fd(), libc::SIGKILL);
                        for _ in 0..200 {
                            if !matches!(sys::reap(r.pidfd.as_fd()), Ok(None)) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if let Some(cg) = r.cgroup.as_ref() {
                            cg.remove();
                        }
                        s.state = WorkerState::Stopped;
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.cgroups.remove_all();
        let _ = std::fs::remove_file(&self.control_path);
        tracing::info!("airlockd stopped");
    }
}

/// Describes an exit: code, signal, and for SIGSYS the policy. The cause is what the
/// supervisor knows itself (the signal from `waitid`, the policy it compiled); which syscall it
/// was comes only from the worker, so it is labelled as the worker's report (`sigsys`: the
/// first `airlock-sigsys` line of its stderr, which a compromised worker can write itself).
pub fn describe_exit(status: ExitStatus, sigsys: Option<&str>, policy: &str) -> String {
    match status {
        ExitStatus::Code(c) => format!("exit code {c}"),
        ExitStatus::Signal(libc::SIGSYS) => {
            let report = match sigsys.and_then(parse_sigsys) {
                Some((nr, name)) => format!("the worker reported: syscall {name} ({nr})"),
                None => "the worker did not report which syscall".to_string(),
            };
            format!("killed by SIGSYS under policy {policy} ({report})")
        }
        ExitStatus::Signal(s) => format!("killed by signal {s} ({})", signal_name(s)),
    }
}

fn parse_sigsys(line: &str) -> Option<(i64, String)> {
    let mut nr = None;
    let mut arch = None;
    for part in line.split_whitespace() {
        if let Some(v) = part.strip_prefix("nr=") {
            nr = v.parse::<i64>().ok();
        }
        if let Some(v) = part.strip_prefix("arch=") {
            arch = v.parse::<u32>().ok();
        }
    }
    let nr = nr?;
    let a = match arch {
        Some(0xC000_00B7) => airlock_policies::Arch::Aarch64,
        _ => airlock_policies::Arch::X86_64,
    };
    let name = u32::try_from(nr).ok().and_then(|n| airlock_policies::syscall_name(a, n)).unwrap_or("unknown");
    Some((nr, name.to_string()))
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(p: RestartPolicy) -> RestartConfig {
        RestartConfig { policy: p, initial_backoff_ms: 100, max_backoff_ms: 1000, max_restarts: 3, window_s: 60 }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_then_a_crash_loop_gives_up() {
        let now = Instant::now();
        let p = RestartConfig { max_restarts: 5, ..policy(RestartPolicy::Always) };
        let mut h = VecDeque::new();
        let delays: Vec<Restart> = (0..5).map(|_| restart_decision(&p, &mut h, now, false)).collect();
        let ms = |m| Restart::After(Duration::from_millis(m));
        assert_eq!(delays, vec![ms(100), ms(200), ms(400), ms(800), ms(1000)]);
        assert_eq!(
            restart_decision(&p, &mut h, now, false),
            Restart::GiveUp("crash loop: 5 restarts within 60 s; not restarting".into())
        );
    }

    #[test]
    fn restarts_outside_the_window_are_forgotten() {
        let start = Instant::now();
        let p = policy(RestartPolicy::Always);
        let mut h = VecDeque::new();
        for _ in 0..3 {
            restart_decision(&p, &mut h, start, false);
        }
        let later = start + Duration::from_secs(61);
        assert_eq!(restart_decision(&p, &mut h, later, false), Restart::After(Duration::from_millis(100)));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn policy_decides_whether_to_restart_at_all() {
        let now = Instant::now();
        let mut h = VecDeque::new();
        assert_eq!(restart_decision(&policy(RestartPolicy::Never), &mut h, now, false), Restart::Stay);
        assert_eq!(restart_decision(&policy(RestartPolicy::OnFailure), &mut h, now, true), Restart::Stay);
        assert!(matches!(restart_decision(&policy(RestartPolicy::OnFailure), &mut h, now, false), Restart::After(_)));
        assert!(matches!(restart_decision(&policy(RestartPolicy::Always), &mut h, now, true), Restart::After(_)));
    }

    #[test]
    fn sigsys_exit_names_the_policy_and_labels_the_workers_report() {
        let d = describe_exit(ExitStatus::Signal(libc::SIGSYS), Some("nr=101 arch=3221225534 policy=echo"), "echo");
        assert_eq!(d, "killed by SIGSYS under policy echo (the worker reported: syscall ptrace (101))");
    }

    #[test]
    fn sigsys_without_report_says_so() {
        let d = describe_exit(ExitStatus::Signal(libc::SIGSYS), None, "ui");
        assert_eq!(d, "killed by SIGSYS under policy ui (the worker did not report which syscall)");
        let garbled = describe_exit(ExitStatus::Signal(libc::SIGSYS), Some("nr=ptrace"), "ui");
        assert_eq!(garbled, d, "a report without a number is no report");
    }

    #[test]
    fn a_report_is_believed_only_for_a_sigsys_death() {
        let d = describe_exit(ExitStatus::Signal(libc::SIGKILL), Some("nr=101"), "ui");
        assert_eq!(d, "killed by signal 9 (SIGKILL)");
        assert_eq!(describe_exit(ExitStatus::Code(0), Some("nr=101"), "ui"), "exit code 0");
    }

    #[test]
    fn plain_exits_are_described() {
        assert_eq!(describe_exit(ExitStatus::Code(3), None, "x"), "exit code 3");
        assert!(describe_exit(ExitStatus::Signal(9), None, "x").contains("SIGKILL"));
    }
}
