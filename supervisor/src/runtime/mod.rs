//! The supervisor's event loop: watches every worker through its pidfd, channel and stderr,
//! routes requests by service name, answers the control socket, restarts crashed workers
//! with exponential backoff up to a crash-loop limit, and shuts down gracefully.
//!
//! Single-threaded by design: all state lives in [`Supervisor`] and is touched from one
//! place. The rooms: [`slot`] (one worker's state), [`lifecycle`] (start, exit, restart,
//! stop), [`io`] (what is watched, reading channels and stderr), [`calls`] (routing calls and
//! their bookkeeping), [`messages`] (journaled messages and delivery), [`resources`]
//! (reopening brokered connections), [`control`] (the control socket), [`security`]
//! (security events and violations), [`noise`] (rate limits on what a worker makes us log). Decisions are plain functions with their own tests.

mod calls;
mod control;
mod io;
mod lifecycle;
mod messages;
mod noise;
mod resources;
mod security;
mod slot;
mod starter;
mod streams;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use airlock_protocol::control::{CallResult, ControlRequest, LayerStatus, Status, WorkerState, WorkerStatus};

pub use lifecycle::describe_exit;

use crate::config::Config;
use crate::journal::{Entry, Journal};
use crate::notify::Notifier;
use crate::permits::Permit;
use crate::spawn::HostAbilities;
use crate::sys;
use calls::Calls;
use messages::entry_charge;
use slot::Slot;
use starter::Starter;

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
    slots: Vec<Slot>,
    control: UnixListener,
    control_path: PathBuf,
    sigfd: OwnedFd,
    notifier: Notifier,
    /// Calls waiting for replies, and each worker's count of them.
    calls: Calls,
    last_watchdog: Instant,
    permits: Vec<Permit>,
    journal: Journal,
    /// Durable messages journaled this turn: `Accepted` goes out after the group fsync.
    accept_after_sync: Vec<(usize, u64, u64)>,
    /// Durable messages waiting for the sync thread: `(generation, slot, incarnation, seq)`.
    awaiting_sync: VecDeque<(u64, usize, u64, u64)>,
    /// Which slot provides each service (from the configuration).
    providers: BTreeMap<String, usize>,
    /// Each worker's slot, by name (for journal entries, which name their sender).
    by_name: BTreeMap<String, usize>,
    /// Recovered messages for services no worker provides now: kept in the journal.
    orphans: Vec<Entry>,
    /// The event loop's descriptors, registered once (see [`Supervisor::watch`]).
    epoll: sys::Epoll,
    /// Ready `(token, events)` of the last wait, kept to reuse its allocation.
    events: Vec<(u64, u32)>,
    /// Starts workers off the event loop (one thread per slot).
    starter: Starter,
    /// First starts not finished yet: `READY=1` goes out when none is left.
    initial_pending: usize,
    /// The workers' cgroups (removed at shutdown), or why there are none.
    cgroups: crate::cgroup::Cgroups,
    /// Streams set up between workers.
    streams: streams::Streams,
}

/// Event tokens: the signalfd, the control socket, and per worker `slot << 2 | what`.
const TOKEN_SIGNAL: u64 = u64::MAX;
const TOKEN_CONTROL: u64 = u64::MAX - 1;
const TOKEN_JOURNAL: u64 = u64::MAX - 2;
const TOKEN_START: u64 = u64::MAX - 3;
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
        match (host.cgroups.version(), host.cgroups.unavailable_reason()) {
            (Some(v), _) => tracing::info!(version = v, "workers get cgroups of their own"),
            (None, why) => tracing::info!(why = why.unwrap_or(""), "no cgroups for workers"),
        }
        let run_dir = cfg.runtime_directory();
        crate::dirs::secure_dir(&run_dir).map_err(io_err(format!("runtime directory {}", run_dir.display())))?;
        let state_dir = cfg.state_directory();
        crate::dirs::secure_dir(&state_dir).map_err(io_err(format!("state directory {}", state_dir.display())))?;
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
        let mut slots: Vec<Slot> = cfg.workers.iter().map(Slot::new).collect();
        let by_name: BTreeMap<String, usize> = slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let recovered = pending.len();
        let mut orphans = Vec::new();
        for e in pending {
            let from = by_name.get(&e.from).copied();
            match providers.get(&e.service) {
                Some(&t) => {
                    let charge = entry_charge(&e.service, &e.method, e.body.len());
                    if let Some(f) = from {
                        slots[f].journal_bytes += charge;
                    }
                    slots[t].inbox_bytes += charge;
                    slots[t].outbox.push_back(e);
                }
                None => {
                    tracing::error!(id = e.id, service = %io::printable(&e.service, 100), "journaled message for a service no worker provides now; kept in the journal");
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
        let starter = Starter::new(std::sync::Arc::new(cfg.clone()), std::sync::Arc::new(host.clone()))
            .map_err(io_err("starter threads"))?;
        epoll.add(starter.events(), TOKEN_START, libc::EPOLLIN as u32).map_err(io_err("epoll: starter events"))?;
        let n = slots.len();
        let mut s = Supervisor {
            cfg,
            slots,
            control,
            control_path,
            sigfd,
            notifier: Notifier::from_env(),
            calls: Calls::new(n),
            last_watchdog: Instant::now(),
            permits,
            journal,
            accept_after_sync: Vec::new(),
            awaiting_sync: VecDeque::new(),
            providers,
            by_name,
            orphans,
            epoll,
            events: Vec::with_capacity(64),
            starter,
            initial_pending: n,
            cgroups: host.cgroups.clone(),
            streams: streams::Streams::default(),
        };
        for i in 0..s.slots.len() {
            s.launch(i);
        }
        if n == 0 {
            s.initial_started();
        }
        Ok(s)
    }

    /// One of the first starts finished (served or failed): after the last, airlockd is ready
    /// (systemd's `READY=1`). The control socket answers from the start.
    fn initial_started(&mut self) {
        if self.initial_pending == 0 {
            return;
        }
        self.initial_pending -= 1;
        if self.initial_pending == 0 {
            tracing::info!(control = %self.control_path.display(), "airlockd ready");
            self.notifier.send("READY=1\nSTATUS=workers started");
        }
    }

    pub fn control_path(&self) -> &std::path::Path {
        &self.control_path
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
        if let Some(d) = self.calls.next_deadline() {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        if let Some(d) = self.next_stream_deadline() {
            timeout = timeout.min(d.saturating_duration_since(now));
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
        let (mut signalled, mut control, mut synced, mut starts) = (false, false, false, false);
        // Per worker, in slot order: exit, channel, stderr (as a poll set would report them).
        let mut ready: Vec<(usize, u8, u32)> = Vec::with_capacity(events.len());
        for &(tok, ev) in &events {
            match tok {
                TOKEN_SIGNAL => signalled = true,
                TOKEN_CONTROL => control = true,
                TOKEN_JOURNAL => synced = true,
                TOKEN_START => starts = true,
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
        if starts {
            for out in self.starter.finished() {
                self.started(out);
            }
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
        self.expire_calls(now);
        self.enforce_stream_releases(now);
        for i in 0..self.slots.len() {
            // The turn's clock: one reading for every slot (this runs on every turn).
            self.summarise_noise(i, now, false);
        }
        if let Some(w) = self.notifier.watchdog {
            if now.duration_since(self.last_watchdog) >= w {
                self.notifier.send("WATCHDOG=1");
                self.last_watchdog = now;
            }
        }
        Ok(false)
    }
}
