//! The supervisor's event loop: watches every worker through its pidfd, channel and stderr,
//! routes requests by service name, answers the control socket, restarts crashed workers
//! with exponential backoff up to a crash-loop limit, and shuts down gracefully.
//!
//! Single-threaded by design: all state lives here and is touched from one place.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use airlock_protocol::confinement::{ConfinementReport, LayerState};
pub use airlock_protocol::control::{CallResult, ControlRequest, LayerStatus, Status, WorkerState, WorkerStatus};
use airlock_protocol::wire::{ByteBody, CallFailure, Delivery, FromWorker, Message, Refusal, Reply, Request, ToWorker};
use airlock_protocol::{Channel, ChannelError};

use crate::config::{Config, RestartPolicy};
use crate::journal::{Entry, Journal};
use crate::notify::Notifier;
use crate::permits::{self, Decision, Kind, Permit};
use crate::spawn::{self, HostAbilities, SpawnError};
use crate::sys::{self, ExitStatus};

#[derive(Debug)]
struct Running {
    pid: i32,
    pidfd: OwnedFd,
    channel: Channel,
    stderr: std::fs::File,
    stderr_buf: Vec<u8>,
    sigsys: Option<String>,
    started: Instant,
    /// The channel failed or closed: stop reading it; the pidfd tells when the worker is gone.
    channel_down: bool,
    /// What the event loop watches: `None` before the descriptors are registered, then the
    /// events registered for the channel (0: not registered).
    watching: Option<u32>,
}

#[derive(Debug)]
struct Slot {
    name: String,
    state: WorkerState,
    backoff_until: Option<Instant>,
    run: Option<Running>,
    restarts: VecDeque<Instant>,
    total_restarts: u32,
    last_exit: Option<String>,
    report: Option<ConfinementReport>,
    notes: Vec<String>,
    services: Vec<String>,
    /// Broker state for the permit table; `initial` after every start.
    broker_state: String,
    violations: u32,
    /// Calls this worker made that wait for a reply.
    calls_in_flight: usize,
    /// Bytes of this worker's journaled messages not yet handled.
    journal_bytes: usize,
    /// Messages for this worker, not yet delivered (journal order).
    outbox: VecDeque<Entry>,
    /// Delivered, not yet acknowledged.
    delivered: BTreeMap<u64, Entry>,
    /// Counts this incarnation, so a reply to a dead incarnation is not misrouted.
    incarnation: u64,
    /// Per reopenable resource: when it was last reopened and the backoff before the next.
    reopens: BTreeMap<u32, (Instant, Duration)>,
    calls_served: u64,
    calls_made: u64,
}

#[derive(Debug)]
enum Caller {
    Worker { slot: usize, id: u64 },
    Control(UnixStream),
}

#[derive(Debug)]
struct PendingCall {
    caller: Caller,
    target: usize,
    deadline: Instant,
    /// The deadline as the caller was told it.
    after_ms: u64,
    /// The state the caller moves to when this call succeeds (permit `grant`).
    grant: Option<String>,
}

/// Why the supervisor could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// Displays the step; the cause is its `source()` (so that an error chain prints it once).
    #[error("{step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running supervisor.
#[derive(Debug)]
pub struct Supervisor {
    cfg: Config,
    host: HostAbilities,
    slots: Vec<Slot>,
    control: UnixListener,
    control_path: PathBuf,
    sigfd: OwnedFd,
    notifier: Notifier,
    pending: BTreeMap<u64, PendingCall>,
    next_id: u64,
    last_watchdog: Instant,
    permits: Vec<Permit>,
    journal: Journal,
    /// Durable messages journaled this turn: `Accepted` goes out after the group fsync.
    accept_after_sync: Vec<(usize, u64, u64)>,
    /// Durable messages waiting for the sync thread: `(generation, slot, incarnation, seq)`.
    awaiting_sync: VecDeque<(u64, usize, u64, u64)>,
    /// Which slot provides each service (from the configuration).
    providers: BTreeMap<String, usize>,
    /// Recovered messages for services no worker provides now: kept in the journal.
    orphans: Vec<Entry>,
    /// The event loop's descriptors, registered once (see [`Supervisor::watch`]).
    epoll: sys::Epoll,
    /// Ready `(token, events)` of the last wait, kept to reuse its allocation.
    events: Vec<(u64, u32)>,
}

/// Event tokens: the signalfd, the control socket, and per worker `slot << 2 | what`.
const TOKEN_SIGNAL: u64 = u64::MAX;
const TOKEN_CONTROL: u64 = u64::MAX - 1;
const TOKEN_JOURNAL: u64 = u64::MAX - 2;
const WHAT_EXIT: u8 = 0;
const WHAT_CHANNEL: u8 = 1;
const WHAT_STDERR: u8 = 2;

fn token(slot: usize, what: u8) -> u64 {
    (slot as u64) << 2 | u64::from(what)
}

fn io_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let step = step.into();
    move |source| RuntimeError::Io { step, source }
}

impl Supervisor {
    /// Probes the host, opens the control socket and starts every worker.
    pub fn start(cfg: Config) -> Result<Supervisor, RuntimeError> {
        let sigfd = sys::signalfd(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).map_err(io_err("signalfd"))?;
        let host = HostAbilities::probe();
        tracing::info!(root = host.root, namespaces = ?host.namespaces, "host abilities");
        let run_dir = cfg.runtime_directory();
        crate::config::secure_dir(&run_dir).map_err(io_err(format!("runtime directory {}", run_dir.display())))?;
        let state_dir = cfg.state_directory();
        crate::config::secure_dir(&state_dir).map_err(io_err(format!("state directory {}", state_dir.display())))?;
        let control_path = run_dir.join("control.sock");
        // Bind and listen under a temporary name, then rename: a client never finds a socket
        // file that is not listening yet (which would refuse it).
        let staging = run_dir.join(format!("control.sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let control = UnixListener::bind(&staging).map_err(io_err(format!("binding {}", staging.display())))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
            .map_err(io_err("chmod control socket"))?;
        std::fs::rename(&staging, &control_path).map_err(io_err(format!("renaming to {}", control_path.display())))?;
        control.set_nonblocking(true).map_err(io_err("control socket"))?;
        let (journal, pending) = Journal::open(&state_dir.join("broker")).map_err(|e| RuntimeError::Io {
            step: "opening the message journal".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut providers = BTreeMap::new();
        for (i, w) in cfg.workers.iter().enumerate() {
            for svc in &w.services {
                providers.insert(svc.clone(), i);
            }
        }
        let mut slots: Vec<Slot> = cfg
            .workers
            .iter()
            .map(|w| Slot {
                name: w.name.get_ref().clone(),
                state: WorkerState::Stopped,
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
                calls_in_flight: 0,
                journal_bytes: 0,
                outbox: VecDeque::new(),
                delivered: BTreeMap::new(),
                incarnation: 0,
                reopens: BTreeMap::new(),
                calls_served: 0,
                calls_made: 0,
            })
            .collect();
        let recovered = pending.len();
        let mut orphans = Vec::new();
        for e in pending {
            let from = cfg.workers.iter().position(|w| *w.name.get_ref() == e.from);
            match providers.get(&e.service) {
                Some(&t) => {
                    if let Some(f) = from {
                        slots[f].journal_bytes += entry_charge(&e.service, &e.method, e.body.len());
                    }
                    slots[t].outbox.push_back(e);
                }
                None => {
                    tracing::error!(id = e.id, service = %e.service, "journaled message for a service no worker provides now; kept in the journal");
                    orphans.push(e);
                }
            }
        }
        if recovered > 0 {
            tracing::info!(messages = recovered, "recovered journaled messages; redelivering in order");
        }
        let permits = cfg.permit_table();
        let epoll = sys::Epoll::new().map_err(io_err("epoll"))?;
        epoll.add(sigfd.as_fd(), TOKEN_SIGNAL, libc::EPOLLIN as u32).map_err(io_err("epoll: signalfd"))?;
        epoll.add(control.as_fd(), TOKEN_CONTROL, libc::EPOLLIN as u32).map_err(io_err("epoll: control socket"))?;
        epoll
            .add(journal.sync_events(), TOKEN_JOURNAL, libc::EPOLLIN as u32)
            .map_err(io_err("epoll: journal sync events"))?;
        let mut s = Supervisor {
            cfg,
            host,
            slots,
            control,
            control_path,
            sigfd,
            notifier: Notifier::from_env(),
            pending: BTreeMap::new(),
            next_id: 1,
            last_watchdog: Instant::now(),
            permits,
            journal,
            accept_after_sync: Vec::new(),
            awaiting_sync: VecDeque::new(),
            providers,
            orphans,
            epoll,
            events: Vec::with_capacity(64),
        };
        for i in 0..s.slots.len() {
            s.launch(i);
        }
        tracing::info!(control = %s.control_path.display(), "airlockd ready");
        s.notifier.send("READY=1\nSTATUS=workers started");
        Ok(s)
    }

    pub fn control_path(&self) -> &std::path::Path {
        &self.control_path
    }

    fn launch(&mut self, i: usize) {
        let name = self.slots[i].name.clone();
        let _span = tracing::info_span!("worker", name = %name).entered();
        match spawn::spawn(&self.cfg, i, &self.host) {
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
                            tracing::warn!(pid = st.pid, layer = %layer, "confinement layer not applied: {state}")
                        }
                        _ => tracing::debug!(pid = st.pid, layer = %layer, state = %state, "confinement"),
                    }
                }
                for n in &st.notes {
                    tracing::info!(pid = st.pid, "{n}");
                }
                let layers = layer_summary(&st.report);
                let slot = &mut self.slots[i];
                slot.report = Some(st.report);
                slot.notes = st.notes;
                slot.services = st.services;
                slot.state = WorkerState::Running;
                slot.backoff_until = None;
                slot.broker_state = permits::INITIAL_STATE.into();
                slot.violations = 0;
                slot.calls_in_flight = 0;
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
                    watching: None,
                });
                let pid = slot.run.as_ref().map_or(0, |r| r.pid);
                tracing::info!(pid, services = %slot.services.join(","), %layers, "worker ready");
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
                if matches!(e, SpawnError::Verification(_)) {
                    tracing::error!(target: "airlock::security", worker = %name, error = %e, "security event: worker killed");
                } else {
                    tracing::error!(worker = %name, error = %e, "worker did not start");
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

    fn schedule_restart(&mut self, i: usize, clean_exit: bool) {
        let policy = self.cfg.workers[i].restart.clone();
        let slot = &mut self.slots[i];
        if policy.policy == RestartPolicy::Never || (policy.policy == RestartPolicy::OnFailure && clean_exit) {
            slot.state = WorkerState::Stopped;
            return;
        }
        let now = Instant::now();
        let window = Duration::from_secs(policy.window_s);
        while slot.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            slot.restarts.pop_front();
        }
        if slot.restarts.len() as u32 >= policy.max_restarts {
            let why =
                format!("crash loop: {} restarts within {} s; not restarting", slot.restarts.len(), policy.window_s);
            tracing::error!(worker = %slot.name, "{why}");
            slot.state = WorkerState::Failed(why);
            return;
        }
        let exp = slot.restarts.len().min(20) as u32;
        let delay = policy.initial_backoff_ms.saturating_mul(1u64 << exp).min(policy.max_backoff_ms);
        slot.restarts.push_back(now);
        slot.total_restarts += 1;
        slot.backoff_until = Some(now + Duration::from_millis(delay));
        slot.state = WorkerState::Restarting { in_ms: delay };
        tracing::warn!(worker = %slot.name, delay_ms = delay, "restarting after backoff");
    }

    /// Runs until SIGTERM or SIGINT, then stops every worker and returns. A fatal error (a
    /// journal that can no longer promise durability) stops every worker the same way before
    /// it is returned: no worker outlives airlockd, and nothing more is accepted (the journal's
    /// failure is sticky).
    pub fn run(mut self) -> Result<(), RuntimeError> {
        let result = loop {
            match self.turn() {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        // After a fatal (journal) error, skip the journal's last flush: on a hung disk it
        // would hold up the workers' shutdown, and its failure is sticky anyway.
        self.shutdown(result.is_ok());
        result
    }

    /// One turn of the loop; returns true when asked to stop.
    fn turn(&mut self) -> Result<bool, RuntimeError> {
        let now = Instant::now();
        let mut timeout = Duration::from_millis(500);
        for s in &self.slots {
            if let Some(t) = s.backoff_until {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
        }
        for p in self.pending.values() {
            timeout = timeout.min(p.deadline.saturating_duration_since(now));
        }
        if let Some(w) = self.notifier.watchdog {
            timeout = timeout.min(w.saturating_sub(now.duration_since(self.last_watchdog)));
        }
        let buffered = self.slots.iter().any(|s| s.run.as_ref().is_some_and(|r| r.channel.has_buffered()));
        if buffered {
            timeout = Duration::ZERO;
        }
        self.watch()?;
        let mut events = std::mem::take(&mut self.events);
        self.epoll
            .wait(&mut events, i32::try_from(timeout.as_millis()).unwrap_or(500))
            .map_err(io_err("epoll_wait"))?;
        let (mut signalled, mut control, mut synced) = (false, false, false);
        // Per worker, in slot order: exit, channel, stderr (as a poll set would report them).
        let mut ready: Vec<(usize, u8, u32)> = Vec::with_capacity(events.len());
        for &(tok, ev) in &events {
            match tok {
                TOKEN_SIGNAL => signalled = true,
                TOKEN_CONTROL => control = true,
                TOKEN_JOURNAL => synced = true,
                t => ready.push(((t >> 2) as usize, (t & 3) as u8, ev)),
            }
        }
        self.events = events;
        // Frames already read from a socket wait in its channel: as good as readable.
        for (i, s) in self.slots.iter().enumerate() {
            if s.run.as_ref().is_some_and(|r| r.channel.has_buffered())
                && !ready.iter().any(|&(j, what, _)| j == i && what == WHAT_CHANNEL)
            {
                ready.push((i, WHAT_CHANNEL, 0));
            }
        }
        ready.sort_unstable_by_key(|&(i, what, _)| (i, what));
        if signalled {
            while let Some(sig) = sys::read_signal(self.sigfd.as_fd()).map_err(io_err("signalfd"))? {
                match sig {
                    libc::SIGTERM | libc::SIGINT => {
                        tracing::info!(signal = sig, "stopping");
                        return Ok(true);
                    }
                    _ => {
                        tracing::info!(signal = sig, "SIGHUP: configuration reload is not supported; restart airlockd")
                    }
                }
            }
        }
        let mut exited = Vec::new();
        for (i, what, ev) in ready {
            match what {
                WHAT_EXIT => exited.push(i),
                WHAT_CHANNEL => {
                    let has_buf = self.slots[i].run.as_ref().is_some_and(|r| r.channel.has_buffered());
                    if ev & libc::EPOLLOUT as u32 != 0 {
                        self.flush_queued(i);
                    }
                    if ev & !(libc::EPOLLOUT as u32) != 0 || has_buf {
                        self.drain_channel(i);
                    }
                }
                _ => self.drain_stderr(i),
            }
        }
        for i in exited {
            self.handle_exit(i);
        }
        if synced {
            self.accept_synced()?;
        }
        if control {
            self.accept_control();
        }
        self.enforce_send_queues();
        // Write this turn's records and hand their fsync to the sync thread, then deliver while
        // the disk works. (A message may reach its receiver before it is durable; its sender is
        // told `Accepted` only after the fsync, so a sender never loses one it was promised.)
        self.commit_journal()?;
        for i in 0..self.slots.len() {
            self.deliver(i);
        }
        if self.journal.wants_compaction() {
            let live: Vec<&Entry> = self
                .slots
                .iter()
                .flat_map(|s| s.delivered.values().chain(s.outbox.iter()))
                .chain(self.orphans.iter())
                .collect();
            match self.journal.compact(live) {
                Ok(()) => tracing::debug!(live = self.journal.live(), "journal compacted"),
                // A failed fsync is sticky in the journal: the next acceptance stops airlockd.
                Err(e) => tracing::error!(error = %e, "journal compaction failed; keeping the long file"),
            }
        }
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].backoff_until.is_some_and(|t| t <= now) {
                self.slots[i].backoff_until = None;
                self.launch(i);
            }
        }
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let target = self.slots[p.target].name.clone();
                if let Caller::Worker { slot, .. } = &p.caller {
                    self.slots[*slot].calls_in_flight = self.slots[*slot].calls_in_flight.saturating_sub(1);
                }
                tracing::warn!(id, worker = %target, "call timed out");
                self.answer(p.caller, Err(CallFailure::TimedOut { worker: target, after_ms: p.after_ms }), None);
            }
        }
        if let Some(w) = self.notifier.watchdog {
            if now.duration_since(self.last_watchdog) >= w {
                self.notifier.send("WATCHDOG=1");
                self.last_watchdog = now;
            }
        }
        Ok(false)
    }

    fn flush_queued(&mut self, i: usize) {
        let Some(r) = self.slots[i].run.as_mut() else { return };
        if let Err(e) = r.channel.flush_queued() {
            self.channel_failed(i, e);
        }
    }

    /// A worker whose unread frames exceed the bound has stopped reading its channel: kill it
    /// (its queued frames go with it; journaled messages are redelivered after its restart).
    fn enforce_send_queues(&mut self) {
        const MAX_QUEUED: usize = 16 << 20;
        for i in 0..self.slots.len() {
            let queued = self.slots[i].run.as_ref().map_or(0, |r| r.channel.queued_bytes());
            if queued > MAX_QUEUED {
                tracing::error!(target: "airlock::security", worker = %self.slots[i].name, queued, "security event: worker does not read its channel; killing it");
                if let Some(r) = self.slots[i].run.as_mut() {
                    r.channel_down = true;
                }
                self.kill(i);
            }
        }
    }

    /// Brings the event loop's registrations up to date: a new worker's pidfd, channel and
    /// stderr; a channel that now has frames queued for sending (`EPOLLOUT`) or none, or that
    /// went down. Closing a descriptor unregisters it, so a worker that is gone needs nothing.
    fn watch(&mut self) -> Result<(), RuntimeError> {
        let epoll = &self.epoll;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(r) = s.run.as_mut() else { continue };
            let want = match (r.channel_down, r.channel.wants_write()) {
                (true, _) => 0,
                (false, false) => libc::EPOLLIN as u32,
                (false, true) => (libc::EPOLLIN | libc::EPOLLOUT) as u32,
            };
            let have = match r.watching {
                Some(have) => have,
                None => {
                    epoll
                        .add(r.pidfd.as_fd(), token(i, WHAT_EXIT), libc::EPOLLIN as u32)
                        .map_err(io_err("epoll: pidfd"))?;
                    epoll
                        .add(r.stderr.as_fd(), token(i, WHAT_STDERR), libc::EPOLLIN as u32)
                        .map_err(io_err("epoll: stderr"))?;
                    r.watching = Some(0);
                    0
                }
            };
            if want == have {
                continue;
            }
            let fd = r.channel.as_fd();
            match (have, want) {
                (0, w) => epoll.add(fd, token(i, WHAT_CHANNEL), w),
                (_, 0) => epoll.delete(fd),
                (_, w) => epoll.modify(fd, token(i, WHAT_CHANNEL), w),
            }
            .map_err(io_err("epoll: channel"))?;
            r.watching = Some(want);
        }
        Ok(())
    }

    fn drain_stderr(&mut self, i: usize) {
        let name = self.slots[i].name.clone();
        let epoll = &self.epoll;
        let Some(r) = self.slots[i].run.as_mut() else { return };
        let mut buf = [0u8; 4096];
        loop {
            match r.stderr.read(&mut buf) {
                Ok(0) => {
                    // The worker closed its stderr: a pipe at its end stays readable (EPOLLHUP)
                    // and would wake every wait. The pidfd still tells when it exits.
                    let _ = epoll.delete(r.stderr.as_fd());
                    break;
                }
                Ok(n) => r.stderr_buf.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
            if r.stderr_buf.len() > 64 * 1024 {
                break;
            }
        }
        while let Some(pos) = r.stderr_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = r.stderr_buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).chars().take(2000).collect::<String>();
            if let Some(rest) = line.strip_prefix("airlock-sigsys ") {
                r.sigsys = Some(rest.to_string());
            }
            tracing::info!(worker = %name, pid = r.pid, "stderr: {line}");
        }
        if r.stderr_buf.len() > 8192 {
            r.stderr_buf.clear();
        }
    }

    /// Handles what worker `i` sent, at most `PER_TURN` messages, so that a flooding worker
    /// cannot starve the others: the rest waits in its socket (and the socket's bounded buffer
    /// pushes back on the sender).
    fn drain_channel(&mut self, i: usize) {
        const PER_TURN: usize = 64;
        for _ in 0..PER_TURN {
            let Some(r) = self.slots[i].run.as_mut() else { return };
            if r.channel_down {
                return;
            }
            let got = match r.channel.try_recv::<FromWorker>() {
                Ok(Some(g)) => g,
                Ok(None) => return,
                Err(e) => {
                    self.channel_failed(i, e);
                    return;
                }
            };
            // Calls go back and forth one frame at a time; sends and acknowledgements stream.
            let exchange = matches!(got.msg, FromWorker::Request(_) | FromWorker::Reply(_));
            match got.msg {
                FromWorker::Event(line) => tracing::info!(worker = %self.slots[i].name, "event: {line}"),
                FromWorker::Request(req) if !got.fds.is_empty() => {
                    let why = format!(
                        "{} passed {} descriptors with a call: only bulk payloads cross the broker",
                        self.slots[i].name,
                        got.fds.len()
                    );
                    self.refused(i, "refused descriptors", &why);
                    self.answer(
                        Caller::Worker { slot: i, id: req.id },
                        Err(CallFailure::NotPermitted { rule: why }),
                        None,
                    );
                }
                FromWorker::Request(req) => self.call_from_worker(i, req, got.bulk),
                FromWorker::Reply(rep) => self.route_reply(i, rep, got.bulk),
                FromWorker::Send(msg) if !got.fds.is_empty() || got.bulk.is_some() => {
                    let why = "asynchronous messages carry no descriptors or bulk payloads: use a call".to_string();
                    if let Some(run) = self.slots[i].run.as_mut() {
                        let _ =
                            run.channel.send(&ToWorker::Refused { seq: msg.seq, refusal: Refusal::NotPermitted(why) });
                    }
                }
                FromWorker::Send(msg) => self.send_from_worker(i, msg),
                FromWorker::Ack { id } => self.acknowledged(i, id),
                FromWorker::Reopen { index } => self.reopen(i, index),
                other => {
                    tracing::error!(target: "airlock::security", worker = %self.slots[i].name, msg = ?std::mem::discriminant(&other), "security event: unexpected message from a running worker; killing it");
                    self.kill(i);
                    return;
                }
            }
            // After a call or reply the worker usually waits for its answer: rather than a read
            // that would find the socket empty, let the next (level-triggered) wait report it
            // when the worker has sent more. Streams of sends and acknowledgements, and durable
            // messages waiting for this turn's fsync (one more read may grow its group), read on.
            if exchange
                && self.accept_after_sync.is_empty()
                && self.slots[i].run.as_ref().is_some_and(|r| r.channel.drained())
            {
                return;
            }
        }
    }

    fn channel_failed(&mut self, i: usize, e: ChannelError) {
        let name = self.slots[i].name.clone();
        if let Some(r) = self.slots[i].run.as_mut() {
            r.channel_down = true;
        }
        match e {
            ChannelError::Closed => tracing::info!(worker = %name, "channel closed"),
            other => {
                tracing::error!(target: "airlock::security", worker = %name, error = %other, "security event: channel failure; killing worker")
            }
        }
        self.kill(i);
    }

    fn kill(&mut self, i: usize) {
        if let Some(r) = &self.slots[i].run {
            let _ = sys::pidfd_send_signal(r.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    /// A worker's call: permit table, quota, then routing.
    fn call_from_worker(&mut self, i: usize, req: Request, bulk: Option<airlock_protocol::Bulk>) {
        let caller = Caller::Worker { slot: i, id: req.id };
        let name = self.slots[i].name.clone();
        let _span =
            tracing::debug_span!("call", from = %name, service = %req.service, method = %req.method, id = req.id)
                .entered();
        let grant = match permits::decide(
            &self.permits,
            &name,
            &self.slots[i].broker_state,
            &req.service,
            &req.method,
            Kind::Call,
        ) {
            Decision::Allow { grant } => grant,
            Decision::Refuse(why) => {
                self.violation(i, &why);
                self.answer(caller, Err(CallFailure::NotPermitted { rule: why }), None);
                return;
            }
        };
        let q = self.cfg.workers[i].quota.clone();
        if self.slots[i].calls_in_flight >= q.in_flight_calls {
            let why =
                format!("{name} has {} calls in flight (quota {})", self.slots[i].calls_in_flight, q.in_flight_calls);
            self.answer(caller, Err(CallFailure::Busy { why }), None);
            return;
        }
        if req.body.len() > q.max_body_bytes {
            let why = format!("call body of {} bytes exceeds {name}'s quota of {}", req.body.len(), q.max_body_bytes);
            self.answer(caller, Err(CallFailure::Busy { why }), None);
            return;
        }
        if let Some(b) = &bulk {
            if b.len() as u64 > q.bulk_bytes {
                let why = format!("bulk payload of {} bytes exceeds {name}'s quota of {}", b.len(), q.bulk_bytes);
                self.answer(caller, Err(CallFailure::Busy { why }), None);
                return;
            }
        }
        self.route(caller, req, bulk, grant);
    }

    /// A worker asks for a fresh descriptor for its brokered resource `index`. Only
    /// `tcp-connect` resources can be reopened; reopens are spaced by the worker's restart
    /// backoff (doubling, reset after a quiet restart window).
    fn reopen(&mut self, i: usize, index: u32) {
        use crate::config::Resource;
        let w = &self.cfg.workers[i];
        let resource = w.resources.get(index as usize).map(|r| r.get_ref().clone());
        let (initial, max, window) = (
            Duration::from_millis(w.restart.initial_backoff_ms),
            Duration::from_millis(w.restart.max_backoff_ms),
            Duration::from_secs(w.restart.window_s),
        );
        let address = match resource {
            Some(Resource::TcpConnect { address }) => address,
            other => {
                let why = match other {
                    None => format!("asked to reopen resource {index}, which it does not have"),
                    Some(_) => format!("asked to reopen resource {index}, which cannot be reopened"),
                };
                self.refused(i, "refused a resource", &why);
                self.answer_reopen(i, index, Err(why));
                return;
            }
        };
        let now = Instant::now();
        let slot = &mut self.slots[i];
        let next = match slot.reopens.get(&index) {
            Some(&(last, backoff)) if now < last + backoff => {
                let left = (last + backoff - now).as_millis();
                self.answer_reopen(i, index, Err(format!("backoff: retry in {left} ms")));
                return;
            }
            Some(&(last, backoff)) if now < last + backoff + window => (backoff * 2).min(max),
            _ => initial,
        };
        slot.reopens.insert(index, (now, next));
        let result = match spawn::open_tcp_connect(&address) {
            Ok((fd, None)) => Ok(fd),
            Ok((_, Some(e))) | Err(e) => Err(format!("connecting to {address}: {e}")),
        };
        match &result {
            Ok(_) => tracing::info!(worker = %slot.name, index, %address, "tcp-connect: reopened"),
            Err(e) => tracing::warn!(worker = %slot.name, index, "tcp-connect: reopen failed: {e}"),
        }
        self.answer_reopen(i, index, result);
    }

    fn answer_reopen(&mut self, i: usize, index: u32, result: Result<OwnedFd, String>) {
        let Some(run) = self.slots[i].run.as_mut() else { return };
        let sent = match result {
            Ok(fd) => run.channel.send_with(&ToWorker::Reopened { index, result: Ok(()) }, &[fd.as_fd()]),
            Err(why) => run.channel.send(&ToWorker::Reopened { index, result: Err(why) }),
        };
        if let Err(e) = sent {
            self.channel_failed(i, e);
        }
    }

    /// A request the permit table refuses: logged as a security event and counted.
    fn violation(&mut self, i: usize, why: &str) {
        self.refused(i, "refused by the permit table", why);
    }

    /// A refused request (`what` says by which rule), counted towards the worker's
    /// violations: enough of them kill it.
    fn refused(&mut self, i: usize, what: &str, why: &str) {
        let slot = &mut self.slots[i];
        slot.violations += 1;
        let pid = slot.run.as_ref().map_or(0, |r| r.pid);
        tracing::error!(target: "airlock::security", worker = %slot.name, pid, violations = slot.violations, "security event: {what}: {why}");
        let max = self.cfg.broker.max_violations;
        if max > 0 && slot.violations >= max {
            tracing::error!(target: "airlock::security", worker = %slot.name, pid, "security event: {} permit violations; killing the worker", slot.violations);
            self.kill(i);
        }
    }

    fn route(&mut self, caller: Caller, req: Request, bulk: Option<airlock_protocol::Bulk>, grant: Option<String>) {
        let target = self.providers.get(&req.service).copied();
        let Some(t) = target.filter(|&t| self.slots[t].run.is_some()) else {
            let why = if target.is_some() {
                CallFailure::NotRunning { service: req.service.clone() }
            } else {
                CallFailure::NoSuchService { service: req.service.clone() }
            };
            self.answer(caller, Err(why), None);
            return;
        };
        let id = self.next_id;
        self.next_id += 1;
        let deadline_ms =
            if req.deadline_ms == 0 { self.cfg.broker.call_deadline_ms } else { u64::from(req.deadline_ms) };
        let fwd = ToWorker::Request(Request {
            id,
            service: req.service.clone(),
            method: req.method.clone(),
            body: req.body,
            deadline_ms: deadline_ms.min(u64::from(u32::MAX)) as u32,
        });
        let sent = match self.slots[t].run.as_mut() {
            Some(r) => forward(&mut r.channel, &fwd, bulk.as_ref()),
            None => return,
        };
        if let Err(e) = sent {
            let why = CallFailure::Unreachable { worker: self.slots[t].name.clone(), why: e.to_string() };
            self.answer(caller, Err(why), None);
            return;
        }
        self.slots[t].calls_served += 1;
        if let Caller::Worker { slot, .. } = &caller {
            self.slots[*slot].calls_in_flight += 1;
            self.slots[*slot].calls_made += 1;
        }
        self.pending.insert(
            id,
            PendingCall {
                caller,
                target: t,
                deadline: Instant::now() + Duration::from_millis(deadline_ms),
                after_ms: deadline_ms,
                grant,
            },
        );
    }

    /// A worker's asynchronous message: permit table, quota, journal, then `Accepted`
    /// (after the turn's group fsync when durable).
    fn send_from_worker(&mut self, i: usize, msg: Message) {
        let name = self.slots[i].name.clone();
        let _span =
            tracing::debug_span!("send", from = %name, service = %msg.service, method = %msg.method, seq = msg.seq)
                .entered();
        let refuse = |s: &mut Self, r: Refusal| {
            if let Some(run) = s.slots[i].run.as_mut() {
                let _ = run.channel.send(&ToWorker::Refused { seq: msg.seq, refusal: r });
            }
        };
        if let Decision::Refuse(why) =
            permits::decide(&self.permits, &name, &self.slots[i].broker_state, &msg.service, &msg.method, Kind::Send)
        {
            self.violation(i, &why);
            refuse(self, Refusal::NotPermitted(why));
            return;
        }
        let Some(&t) = self.providers.get(&msg.service) else {
            refuse(self, Refusal::NoSuchService(msg.service.clone()));
            return;
        };
        let q = self.cfg.workers[i].quota.clone();
        if msg.body.len() > q.max_body_bytes {
            refuse(
                self,
                Refusal::Busy(format!(
                    "message of {} bytes exceeds {name}'s quota of {}",
                    msg.body.len(),
                    q.max_body_bytes
                )),
            );
            return;
        }
        // Charged by the whole entry (body, names and a fixed overhead), so that empty bodies
        // cannot grow the journal without bound.
        let charge = entry_charge(&msg.service, &msg.method, msg.body.len());
        if self.slots[i].journal_bytes + charge > q.journal_bytes {
            refuse(
                self,
                Refusal::Busy(format!(
                    "{name} has {} bytes of messages waiting (quota {})",
                    self.slots[i].journal_bytes, q.journal_bytes
                )),
            );
            return;
        }
        let len = charge;
        let entry = match self.journal.enqueue(&name, &msg.service, &msg.method, msg.body) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "journal write failed; refusing the message");
                refuse(self, Refusal::Busy(format!("journal: {e}")));
                return;
            }
        };
        self.slots[i].journal_bytes += len;
        let id = entry.id;
        self.slots[t].outbox.push_back(entry);
        if msg.durable {
            self.accept_after_sync.push((i, self.slots[i].incarnation, msg.seq));
        } else if let Some(run) = self.slots[i].run.as_mut() {
            let _ = run.channel.send(&ToWorker::Accepted { seq: msg.seq });
        }
        tracing::trace!(id, "journaled");
    }

    /// Writes this turn's journal records; when durable messages are among them, asks the sync
    /// thread for one fsync covering them all (and whatever else was written before it).
    ///
    /// A failed write or fsync is fatal: the messages are in the journal file but perhaps not
    /// on disk, and Linux may report a later fsync as successful without having written them.
    /// Refusing them would make their senders send again while the journal may still deliver
    /// the first copies; instead airlockd stops (systemd restarts it). Their senders were never
    /// told `Accepted`, die with it, and do not send again; after the restart, whatever the
    /// journal holds is delivered once.
    fn commit_journal(&mut self) -> Result<(), RuntimeError> {
        let fatal = |step: &str, e: crate::journal::JournalError| {
            tracing::error!(error = %e, "{step} failed: durability can no longer be promised; stopping");
            RuntimeError::Io { step: step.into(), source: std::io::Error::other(e.to_string()) }
        };
        if self.accept_after_sync.is_empty() {
            return self.journal.flush().map_err(|e| fatal("journal write", e));
        }
        let generation = self.journal.request_sync().map_err(|e| fatal("journal write", e))?;
        for (i, inc, seq) in self.accept_after_sync.drain(..) {
            self.awaiting_sync.push_back((generation, i, inc, seq));
        }
        Ok(())
    }

    /// The sync thread finished a sync: `Accepted` for every message it covered, one batch
    /// per sender. A failed fsync stops airlockd (see [`Supervisor::commit_journal`]).
    fn accept_synced(&mut self) -> Result<(), RuntimeError> {
        let done = self.journal.synced().map_err(|e| {
            tracing::error!(error = %e, pending = self.awaiting_sync.len(), "journal fsync failed: durability can no longer be promised; stopping");
            RuntimeError::Io { step: "journal fsync".into(), source: std::io::Error::other(e.to_string()) }
        })?;
        self.accept_up_to(done);
        Ok(())
    }

    fn accept_up_to(&mut self, done: u64) {
        let mut per_slot: BTreeMap<usize, Vec<ToWorker>> = BTreeMap::new();
        while let Some(&(generation, i, inc, seq)) = self.awaiting_sync.front() {
            if generation > done {
                break;
            }
            self.awaiting_sync.pop_front();
            if self.slots[i].incarnation == inc {
                per_slot.entry(i).or_default().push(ToWorker::Accepted { seq });
            }
        }
        for (i, msgs) in per_slot {
            if let Some(run) = self.slots[i].run.as_mut() {
                let _ = run.channel.send_batch(&msgs);
            }
        }
    }

    /// Delivers queued messages to worker `i` up to the delivery window.
    fn deliver(&mut self, i: usize) {
        let window = self.cfg.broker.delivery_window.max(1);
        let slot = &mut self.slots[i];
        if slot.state != WorkerState::Running {
            return;
        }
        let Some(run) = slot.run.as_mut() else { return };
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        while slot.delivered.len() + batch.len() < window {
            let Some(e) = slot.outbox.pop_front() else { break };
            batch.push(ToWorker::Deliver(Delivery {
                id: e.id,
                from: e.from.clone(),
                service: e.service.clone(),
                method: e.method.clone(),
                body: e.body.clone(),
            }));
            ids.push(e);
        }
        if batch.is_empty() {
            return;
        }
        match run.channel.send_batch(&batch) {
            Ok(()) => {
                for e in ids {
                    slot.delivered.insert(e.id, e);
                }
            }
            Err(err) => {
                tracing::warn!(worker = %slot.name, error = %err, "delivery failed; will redeliver after restart");
                for e in ids.into_iter().rev() {
                    slot.outbox.push_front(e);
                }
            }
        }
    }

    fn acknowledged(&mut self, i: usize, id: u64) {
        let Some(e) = self.slots[i].delivered.remove(&id) else {
            tracing::warn!(worker = %self.slots[i].name, id, "acknowledgement for a message not delivered to it; ignored");
            return;
        };
        if let Err(err) = self.journal.done(id) {
            tracing::error!(error = %err, id, "journal: recording a handled message failed; it may be redelivered");
        }
        if let Some(f) = self.cfg.workers.iter().position(|w| *w.name.get_ref() == e.from) {
            let charge = entry_charge(&e.service, &e.method, e.body.len());
            self.slots[f].journal_bytes = self.slots[f].journal_bytes.saturating_sub(charge);
        }
    }

    fn route_reply(&mut self, from: usize, rep: Reply, bulk: Option<airlock_protocol::Bulk>) {
        match self.pending.get(&rep.id) {
            Some(p) if p.target == from => {}
            _ => {
                tracing::warn!(worker = %self.slots[from].name, id = rep.id, "dropping a late or unknown reply");
                return;
            }
        }
        if let Some(p) = self.pending.remove(&rep.id) {
            let quota = self.cfg.workers[from].quota.bulk_bytes;
            if let Some(b) = bulk.as_ref().filter(|b| b.len() as u64 > quota) {
                let why =
                    format!("bulk reply of {} bytes exceeds {}'s quota of {quota}", b.len(), self.slots[from].name);
                if let Caller::Worker { slot, .. } = &p.caller {
                    self.slots[*slot].calls_in_flight = self.slots[*slot].calls_in_flight.saturating_sub(1);
                }
                self.answer(p.caller, Err(CallFailure::Busy { why }), None);
                return;
            }
            if let Caller::Worker { slot, .. } = &p.caller {
                let slot = *slot;
                self.slots[slot].calls_in_flight = self.slots[slot].calls_in_flight.saturating_sub(1);
                if let (Some(g), Ok(_)) = (&p.grant, &rep.result) {
                    if self.slots[slot].broker_state != *g {
                        tracing::info!(worker = %self.slots[slot].name, from = %self.slots[slot].broker_state, to = %g, "permit grant: state change");
                    }
                    self.slots[slot].broker_state = g.clone();
                }
            }
            self.answer(p.caller, rep.result.map(|b| b.0).map_err(CallFailure::from_callee), bulk);
        }
    }

    fn answer(&mut self, caller: Caller, result: Result<Vec<u8>, CallFailure>, bulk: Option<airlock_protocol::Bulk>) {
        match caller {
            Caller::Worker { slot, id } => {
                let Some(r) = self.slots[slot].run.as_mut() else { return };
                let msg = ToWorker::Reply(Reply { id, result: result.map(ByteBody) });
                let sent = forward(&mut r.channel, &msg, bulk.as_ref());
                if let Err(e) = sent {
                    tracing::warn!(worker = %self.slots[slot].name, error = %e, "could not deliver a reply");
                }
            }
            Caller::Control(mut stream) => {
                let (ok, body, failure) = match result {
                    Ok(b) => {
                        let mut text = String::from_utf8_lossy(&b).into_owned();
                        if let Some(bk) = &bulk {
                            text = format!("{text}[bulk payload of {} bytes]", bk.len());
                        }
                        (true, text, None)
                    }
                    Err(e) => (false, e.to_string(), Some(e)),
                };
                let reply = CallResult { ok, body, failure };
                let _ = writeln!(stream, "{}", serde_json::to_string(&reply).unwrap_or_default());
            }
        }
    }

    fn handle_exit(&mut self, i: usize) {
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
        let policy = self.cfg.workers[i].policy.get_ref().clone();
        let reason = describe_exit(status, r.sigsys.as_deref(), &policy);
        let ran = r.started.elapsed();
        tracing::warn!(worker = %self.slots[i].name, pid = r.pid, ran_ms = ran.as_millis() as u64, "worker exited: {reason}");
        self.slots[i].last_exit = Some(reason);
        let failed: Vec<u64> = self.pending.iter().filter(|(_, p)| p.target == i).map(|(id, _)| *id).collect();
        for id in failed {
            if let Some(p) = self.pending.remove(&id) {
                let name = self.slots[i].name.clone();
                if let Caller::Worker { slot, .. } = &p.caller {
                    self.slots[*slot].calls_in_flight = self.slots[*slot].calls_in_flight.saturating_sub(1);
                }
                self.answer(p.caller, Err(CallFailure::CalleeDied { worker: name.clone() }), None);
            }
        }
        // Calls this worker was waiting for are answered into the void: drop them.
        self.pending.retain(|_, p| !matches!(p.caller, Caller::Worker { slot, .. } if slot == i));
        self.slots[i].calls_in_flight = 0;
        // Delivered but unacknowledged messages go back to the front, in order.
        let slot = &mut self.slots[i];
        let mut back: Vec<Entry> = std::mem::take(&mut slot.delivered).into_values().collect();
        back.extend(slot.outbox.drain(..));
        slot.outbox = back.into();
        self.schedule_restart(i, status == ExitStatus::Code(0));
    }

    fn accept_control(&mut self) {
        loop {
            let (stream, _) = match self.control.accept() {
                Ok(s) => s,
                Err(_) => return,
            };
            let creds = sys::peer_credentials(stream.as_fd());
            let me = sys::euid();
            match creds {
                Ok((pid, uid, _)) if self.slots.iter().any(|s| s.run.as_ref().is_some_and(|r| r.pid == pid)) => {
                    tracing::error!(target: "airlock::security", peer_pid = pid, peer_uid = uid, "security event: a worker connected to the control socket; refused");
                    let mut s = stream;
                    let _ = writeln!(s, "{{\"error\":\"permission denied: workers may not use the control socket\"}}");
                    continue;
                }
                Ok((pid, uid, _)) if uid == 0 || uid == me => {
                    tracing::debug!(peer_pid = pid, peer_uid = uid, "control connection");
                }
                Ok((pid, uid, _)) => {
                    tracing::error!(target: "airlock::security", peer_pid = pid, peer_uid = uid, "security event: control connection refused");
                    let mut s = stream;
                    let _ = writeln!(
                        s,
                        "{{\"error\":\"permission denied: uid {uid} is neither root nor the service uid {me}\"}}"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SO_PEERCRED failed; refusing control connection");
                    continue;
                }
            }
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut rd = BufReader::new((&stream).take(64 * 1024));
            if rd.read_line(&mut line).is_err() {
                continue;
            }
            drop(rd);
            let mut stream = stream;
            match serde_json::from_str::<ControlRequest>(line.trim()) {
                Ok(ControlRequest::Status) => {
                    let st = self.status();
                    let _ = writeln!(stream, "{}", serde_json::to_string(&st).unwrap_or_default());
                }
                Ok(ControlRequest::Call { service, method, body, deadline_ms }) => {
                    // The administrator (root or the service uid) is not bound by the permit
                    // table, which governs workers.
                    let req = Request { id: 0, service, method, body: body.into_bytes(), deadline_ms };
                    self.route(Caller::Control(stream), req, None, None);
                }
                Err(e) => {
                    let _ = writeln!(
                        stream,
                        "{{\"error\":{}}}",
                        serde_json::to_string(&format!("bad request: {e}")).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// What `airlock status` shows.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        Status {
            pid: std::process::id(),
            uid: sys::euid(),
            workers: self
                .slots
                .iter()
                .map(|s| WorkerStatus {
                    name: s.name.clone(),
                    state: match (&s.state, s.backoff_until) {
                        (WorkerState::Restarting { .. }, Some(t)) => {
                            WorkerState::Restarting { in_ms: t.saturating_duration_since(now).as_millis() as u64 }
                        }
                        (st, _) => st.clone(),
                    },
                    pid: s.run.as_ref().map(|r| r.pid),
                    restarts: s.total_restarts,
                    services: s.services.clone(),
                    last_exit: s.last_exit.clone(),
                    confinement: s
                        .report
                        .as_ref()
                        .map(|r| r.layers.iter().map(|(l, st)| LayerStatus::from((*l, st))).collect())
                        .unwrap_or_default(),
                    notes: s.notes.clone(),
                    broker_state: s.broker_state.clone(),
                    violations: s.violations,
                    queued: s.outbox.len(),
                    unacknowledged: s.delivered.len(),
                    calls_served: s.calls_served,
                    calls_made: s.calls_made,
                })
                .collect(),
            journal_pending: self.journal.live(),
        }
    }

    fn shutdown(&mut self, flush_journal: bool) {
        self.notifier.send("STOPPING=1");
        self.shutdown_journal(flush_journal);
        self.stop_workers();
    }

    /// The journal's last commit and sync, and the acceptances they make good.
    fn shutdown_journal(&mut self, flush: bool) {
        if !flush {
            tracing::warn!("at shutdown: the journal failed; not flushing it again");
            return;
        }
        let committed = self.commit_journal();
        if let Err(e) = &committed {
            tracing::error!(
                "at shutdown: {e}: {}",
                std::error::Error::source(e).map(ToString::to_string).unwrap_or_default()
            );
        }
        if let Err(e) = self.journal.sync() {
            tracing::error!(error = %e, "journal fsync at shutdown failed");
        } else if committed.is_ok() {
            // Synced here and now: every message waiting for the sync thread is durable.
            self.accept_up_to(u64::MAX);
        }
    }

    /// `Shutdown` to every worker, SIGKILL for those still running after the timeout.
    fn stop_workers(&mut self) {
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
                        s.state = WorkerState::Stopped;
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.control_path);
        tracing::info!("airlockd stopped");
    }
}

/// What one journaled message costs its sender's `journal-bytes` quota.
fn entry_charge(service: &str, method: &str, body: usize) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD + service.len() + method.len() + body
}

/// Sends `msg` with `bulk` passed on as it came: a sealed memfd as the same descriptor (the
/// channel re-verifies its seals and size), inline bytes inline.
fn forward(ch: &mut Channel, msg: &ToWorker, bulk: Option<&airlock_protocol::Bulk>) -> Result<(), ChannelError> {
    let Some(b) = bulk else { return ch.send(msg) };
    if let Some(fd) = b.sealed_fd() {
        let fd = fd.try_clone_to_owned().map_err(|e| ChannelError::Io { op: "dup bulk fd", source: e })?;
        return ch.forward_sealed(msg, fd);
    }
    if let Some(bytes) = b.inline_bytes() {
        let w = airlock_protocol::BulkWriter::copy_from(bytes, usize::MAX)?;
        return ch.send_bulk(msg, &[], w, airlock_protocol::BulkMode::Sealed);
    }
    // Encrypted on the way in: re-encrypted under the receiver's channel key (the one copy
    // encryption needs).
    let threshold = ch.limits().inline_threshold;
    let w = airlock_protocol::BulkWriter::copy_from(b.bytes(), threshold)?;
    ch.send_bulk(msg, &[], w, airlock_protocol::BulkMode::SealedEncrypted)
}

/// Describes an exit: code, signal, and for SIGSYS the syscall and policy.
pub fn describe_exit(status: ExitStatus, sigsys: Option<&str>, policy: &str) -> String {
    match status {
        ExitStatus::Code(c) => format!("exit code {c}"),
        ExitStatus::Signal(libc::SIGSYS) => {
            let detail = sigsys.and_then(parse_sigsys).map_or_else(
                || {
                    format!(
                        "a syscall forbidden by policy {policy} (the kernel killed it before it could report which)"
                    )
                },
                |(nr, name)| format!("syscall {name} ({nr}) forbidden by policy {policy}"),
            );
            format!("killed by SIGSYS: {detail}")
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

/// `"15/15 layers applied"`, with the layers turned off by the configuration said apart.
fn layer_summary(report: &ConfinementReport) -> String {
    let applied = report.layers.iter().filter(|(_, s)| *s == LayerState::Applied).count();
    let off = report.layers.iter().filter(|(_, s)| *s == LayerState::Off).count();
    let total = report.layers.len();
    match off {
        0 => format!("{applied}/{total} layers applied"),
        n => format!("{applied}/{total} layers applied, {n} off by configuration"),
    }
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

    #[test]
    fn sigsys_exit_names_the_syscall_and_policy() {
        let d = describe_exit(ExitStatus::Signal(libc::SIGSYS), Some("nr=101 arch=3221225534 policy=echo"), "echo");
        assert!(d.contains("ptrace") && d.contains("101") && d.contains("echo"), "{d}");
    }

    #[test]
    fn sigsys_without_report_says_so() {
        let d = describe_exit(ExitStatus::Signal(libc::SIGSYS), None, "ui");
        assert!(d.contains("policy ui") && d.contains("before it could report"), "{d}");
    }

    #[test]
    fn plain_exits_are_described() {
        assert_eq!(describe_exit(ExitStatus::Code(3), None, "x"), "exit code 3");
        assert!(describe_exit(ExitStatus::Signal(9), None, "x").contains("SIGKILL"));
    }
}
