//! One worker's place in the supervisor: its own configuration, the running process (if any),
//! its restart history, broker state and queues, and how `airlock status` shows it.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use airlock_protocol::confinement::{ConfinementReport, LayerState};
use airlock_protocol::control::{LayerStatus, WorkerState, WorkerStatus};
use airlock_protocol::Channel;

use super::noise::Limiter;
use crate::config::WorkerConfig;
use crate::journal::Entry;
use crate::permits;

/// A started worker process.
#[derive(Debug)]
pub(super) struct Running {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub channel: Channel,
    pub stderr: std::fs::File,
    pub stderr_buf: Vec<u8>,
    /// The first `airlock-sigsys` line the worker wrote on stderr: its own word, not evidence.
    pub sigsys: Option<String>,
    pub started: Instant,
    /// The channel failed or closed: stop reading it; the pidfd tells when the worker is gone.
    pub channel_down: bool,
    /// SIGKILL was sent: what it still sends is handled, but its refusals are no longer logged.
    pub killed: bool,
    /// What the event loop watches: `None` before the descriptors are registered, then the
    /// events registered for the channel (0: not registered).
    pub watching: Option<u32>,
    /// Its own cgroup: tells a death by its memory limit, and is removed after the exit.
    pub cgroup: Option<crate::cgroup::WorkerCgroup>,
}

/// One configured worker, running or not.
#[derive(Debug)]
pub(super) struct Slot {
    /// This worker's configuration (the slot owns it: nothing looks a worker up by name).
    pub cfg: WorkerConfig,
    pub name: String,
    pub state: WorkerState,
    /// Counts start attempts, so that a start's result is matched with the attempt it is for.
    pub attempt: u64,
    pub backoff_until: Option<Instant>,
    pub run: Option<Running>,
    /// Restarts within the restart window, oldest first.
    pub restarts: VecDeque<Instant>,
    pub total_restarts: u32,
    pub last_exit: Option<String>,
    pub report: Option<ConfinementReport>,
    pub notes: Vec<String>,
    pub services: Vec<String>,
    /// Broker state for the permit table; `initial` after every start.
    pub broker_state: String,
    pub violations: u32,
    /// Rate limits on what this worker makes the supervisor log, and what they suppressed.
    pub noise: Limiter,
    /// Bytes of this worker's journaled messages not yet handled.
    pub journal_bytes: usize,
    /// Bytes of messages for this worker, from every sender, not yet handled (its
    /// `inbox-bytes` quota).
    pub inbox_bytes: usize,
    /// Messages for this worker, not yet delivered (journal order).
    pub outbox: VecDeque<Entry>,
    /// Delivered, not yet acknowledged.
    pub delivered: BTreeMap<u64, Entry>,
    /// Counts this incarnation, so a reply to a dead incarnation is not misrouted.
    pub incarnation: u64,
    /// Per reopenable resource: when it was last reopened and the backoff before the next.
    pub reopens: BTreeMap<u32, (Instant, Duration)>,
    pub calls_served: u64,
    pub calls_made: u64,
    /// Encrypted bulk payloads decrypted, and memfd payloads refused unread (see `WorkerStatus`).
    pub bulk_decrypted: u64,
    pub bulk_refused_unread: u64,
    /// Which bounds hold its memory, CPU and processes (from its last start).
    pub bounds: Vec<String>,
}

impl Slot {
    pub fn new(cfg: &WorkerConfig) -> Slot {
        Slot {
            cfg: cfg.clone(),
            name: cfg.name.get_ref().clone(),
            state: WorkerState::Stopped,
            attempt: 0,
            backoff_until: None,
            run: None,
            restarts: VecDeque::new(),
            total_restarts: 0,
            last_exit: None,
            report: None,
            notes: Vec::new(),
            services: Vec::new(),
            broker_state: permits::INITIAL_STATE.into(),
            violations: 0,
            noise: Limiter::new(Instant::now()),
            journal_bytes: 0,
            inbox_bytes: 0,
            outbox: VecDeque::new(),
            delivered: BTreeMap::new(),
            incarnation: 0,
            reopens: BTreeMap::new(),
            calls_served: 0,
            calls_made: 0,
            bulk_decrypted: 0,
            bulk_refused_unread: 0,
            bounds: Vec::new(),
        }
    }

    /// This worker in `airlock status`.
    pub fn status(&self, now: Instant) -> WorkerStatus {
        WorkerStatus {
            name: self.name.clone(),
            state: match (&self.state, self.backoff_until) {
                (WorkerState::Restarting { .. }, Some(t)) => {
                    WorkerState::Restarting { in_ms: t.saturating_duration_since(now).as_millis() as u64 }
                }
                (st, _) => st.clone(),
            },
            pid: self.run.as_ref().map(|r| r.pid),
            restarts: self.total_restarts,
            services: self.services.clone(),
            last_exit: self.last_exit.clone(),
            confinement: self
                .report
                .as_ref()
                .map(|r| r.layers.iter().map(|(l, st)| LayerStatus::from((*l, st))).collect())
                .unwrap_or_default(),
            notes: self.notes.clone(),
            broker_state: self.broker_state.clone(),
            violations: self.violations,
            queued: self.outbox.len(),
            unacknowledged: self.delivered.len(),
            calls_served: self.calls_served,
            calls_made: self.calls_made,
            bulk_decrypted: self.bulk_decrypted,
            bulk_refused_unread: self.bulk_refused_unread,
            bounds: {
                let mut b = self.bounds.clone();
                if let Some(limit) = self.cfg.quota.inbox_bytes {
                    b.push(format!("inbox: {} of {limit} bytes of messages waiting (inbox-bytes)", self.inbox_bytes));
                }
                b
            },
        }
    }
}

/// `"15/15 layers applied"`, with the layers turned off by the configuration said apart.
pub(super) fn layer_summary(report: &ConfinementReport) -> String {
    let applied = report.layers.iter().filter(|(_, s)| *s == LayerState::Applied).count();
    let off = report.layers.iter().filter(|(_, s)| *s == LayerState::Off).count();
    let total = report.layers.len();
    match off {
        0 => format!("{applied}/{total} layers applied"),
        n => format!("{applied}/{total} layers applied, {n} off by configuration"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_summary_counts_applied_and_off_layers() {
        use airlock_protocol::confinement::Layer;
        let mut r = ConfinementReport::default();
        r.set(Layer::Seccomp, LayerState::Applied);
        r.set(Layer::Uid, LayerState::Unavailable("unprivileged".into()));
        assert_eq!(layer_summary(&r), "1/2 layers applied");
        r.set(Layer::Landlock, LayerState::Off);
        assert_eq!(layer_summary(&r), "1/3 layers applied, 1 off by configuration");
    }
}
