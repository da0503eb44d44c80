//! `airlock-worker`: what a worker links to take its inherited channel and keys, confine
//! itself as its supervisor planned, and then serve and call services with bulk payloads.
//!
//! A worker is short:
//! ```no_run
//! let mut w = airlock_worker::Worker::start("echo", &["echo"])?;
//! w.serve(|_w, req, _bulk| Ok(airlock_worker::Response::bytes(req.body.clone())))?;
//! # Ok::<(), airlock_worker::WorkerError>(())
//! ```
//! This crate never decides policy: the plan comes from the supervisor over the authenticated
//! channel, and a required layer that fails ends the worker before it serves anything.
#![deny(unsafe_code)]

pub mod sandbox;
pub mod streams;
pub mod sys;

use airlock_protocol::{handoff, Bulk, BulkMode, BulkReaper, BulkWriter, Channel, ChannelError, Hello, Limits, Role};

pub use airlock_protocol::confinement::{ConfinementPlan, ConfinementReport, Layer, LayerState, Requirement};
/// The messages a worker exchanges with its supervisor (re-exported from `airlock-protocol`).
pub use airlock_protocol::wire;
pub use airlock_protocol::wire::CallFailure;
use std::collections::VecDeque;

use wire::{ByteBody, Delivery, FromWorker, Message, Refusal, Reply, Request, ToWorker};

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("{0}")]
    Confine(#[from] sandbox::LayerFailed),
    #[error("supervisor sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("call {service}.{method} failed: {failure}")]
    Call { service: String, method: String, failure: CallFailure },
    #[error("send to {service}.{method} refused: {refusal}")]
    Refused { service: String, method: String, refusal: Refusal },
    #[error("bulk: {0}")]
    Bulk(#[from] airlock_protocol::BulkError),
    #[error("settings: {0}")]
    Settings(String),
    #[error("reopening brokered resource {index}: {reason}")]
    Reopen { index: u32, reason: String },
    #[error("stream to {service}.{name}: {failure}")]
    StreamRefused { service: String, name: String, failure: CallFailure },
    #[error("stream to {service}.{name}: {reason}")]
    Stream { service: String, name: String, reason: String },
    #[error("call region for {service}.{method}: {failure}")]
    RegionRefused { service: String, method: String, failure: CallFailure },
    #[error("call region for {service}.{method}: {reason}")]
    Region { service: String, method: String, reason: String },
}

/// What a handler returns: a body and, optionally, a bulk payload.
#[derive(Debug, Default)]
pub struct Response {
    pub body: Vec<u8>,
    pub bulk: Option<(BulkWriter, BulkMode)>,
}

impl Response {
    pub fn bytes(body: Vec<u8>) -> Response {
        Response { body, bulk: None }
    }
}

/// A confined, running worker.
pub struct Worker {
    ch: Channel,
    name: String,
    report: ConfinementReport,
    next_id: u64,
    next_seq: u64,
    /// Messages that arrived while waiting for a reply or an acceptance.
    backlog: VecDeque<airlock_protocol::Received<ToWorker>>,
    /// Highest delivery id handled: redeliveries at or below it are acknowledged without
    /// running the handler again (ids increase per receiver, deliveries come in order).
    handled_up_to: u64,
    /// The `[settings.*]` tables the supervisor gave this worker, as TOML text.
    settings: String,
    state_directory: Option<std::path::PathBuf>,
    /// Deliveries are acknowledged by the application ([`Worker::hold_acks`]).
    hold_acks: bool,
    /// Acknowledgements not yet sent (see [`Worker::serve_all`]).
    acks: Vec<FromWorker>,
    shutdown: bool,
    /// This worker's stream ends, released by the library when airlockd revokes them.
    stream_ends: Vec<streams::EndRef>,
    /// Streams other workers opened to this one, not yet taken by the application.
    incoming: Vec<streams::StreamIn>,
    /// Where incoming streams go instead of `incoming`, if the application said so.
    on_stream: Option<Box<dyn FnMut(streams::StreamIn) + Send>>,
    /// Call regions other workers opened to this one, not yet taken by the application.
    incoming_regions: Vec<streams::RegionServer>,
    /// Where incoming call regions go instead, if the application said so.
    on_region: Option<Box<dyn FnMut(streams::RegionServer) + Send>>,
    /// Releases received memfd payloads after their request is answered (see
    /// [`Worker::release_bulk`]); started on first use. `Err` once starting it failed.
    reaper: Option<Result<BulkReaper, ()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("streams", &self.stream_ends.len())
            .finish_non_exhaustive()
    }
}

/// What [`Worker::pump`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Everything available was handled; call again when the channel is readable.
    Idle,
    /// The supervisor said `Shutdown` or closed the channel: finish and exit.
    Stop,
}

impl Worker {
    /// Takes the inherited channel (fd 3) and keys (fd 4), handshakes, applies the
    /// supervisor's confinement plan (seccomp last), reports it, waits for `Start`, and
    /// announces `services`. Returns only when the worker is fully confined.
    pub fn start(name: &str, services: &[&str]) -> Result<Worker, WorkerError> {
        let mut ch = handoff::take_inherited(Limits::default())?;
        ch.handshake(&Hello::new(Role::Worker, name))?;
        let plan = match ch.recv::<ToWorker>()?.msg {
            ToWorker::Confine(p) => p,
            other => return Err(WorkerError::Unexpected { expected: "Confine", got: format!("{other:?}") }),
        };
        let _span = tracing::info_span!("worker", name = %plan.worker, pid = sys::getpid()).entered();
        let applied = sandbox::apply_before_seccomp(&plan).and_then(|mut report| {
            sandbox::apply_seccomp(&plan, &mut report)?;
            Ok(report)
        });
        let report = match applied {
            Ok(r) => r,
            Err(f) => {
                let _ = ch.send(&FromWorker::ConfineFailed {
                    layer: f.layer,
                    reason: f.reason.clone(),
                    report: f.report.clone(),
                });
                return Err(f.into());
            }
        };
        ch.send(&FromWorker::Confined(report.clone()))?;
        let settings = match ch.recv::<ToWorker>()?.msg {
            ToWorker::Start { settings } => settings,
            ToWorker::Shutdown => sys::exit_now(0),
            other => return Err(WorkerError::Unexpected { expected: "Start", got: format!("{other:?}") }),
        };
        ch.send(&FromWorker::Ready { services: services.iter().map(|s| s.to_string()).collect() })?;
        Ok(Worker {
            ch,
            name: name.to_string(),
            report,
            next_id: 1,
            next_seq: 1,
            backlog: VecDeque::new(),
            handled_up_to: 0,
            settings,
            state_directory: plan.state_directory.clone(),
            acks: Vec::new(),
            hold_acks: false,
            shutdown: false,
            stream_ends: Vec::new(),
            incoming: Vec::new(),
            on_stream: None,
            incoming_regions: Vec::new(),
            on_region: None,
            reaper: None,
        })
    }

    /// Releases a payload the handlers are done with. One that came in a memfd (or as a large
    /// decrypted copy) goes to a reaper thread at idle priority, started on first use: its
    /// unmap and the last close that frees its pages (~2 ms for 16 MiB) then no longer delay
    /// the next request. Inline payloads, and every payload where the thread cannot be
    /// started (logged once), are dropped here.
    fn release_bulk(&mut self, bulk: Option<Bulk>) {
        let Some(b) = bulk else { return };
        if b.inline_bytes().is_some() || b.len() < airlock_protocol::bulk::DEFAULT_INLINE_THRESHOLD {
            return;
        }
        let reaper = self.reaper.get_or_insert_with(|| {
            BulkReaper::new(2).map_err(|e| {
                tracing::warn!(error = %e, "no bulk reaper thread: received payloads are released inline");
            })
        });
        if let Ok(r) = reaper {
            r.release(b);
        }
    }

    /// The `[settings.NAME]` tables of the configuration this worker was given, parsed.
    pub fn settings<T: serde::de::DeserializeOwned>(&self) -> Result<T, WorkerError> {
        toml::from_str(&self.settings).map_err(|e| WorkerError::Settings(e.message().to_string()))
    }

    /// The worker's own state directory (`state-directory = true` in its configuration):
    /// the one place it may write, if any.
    pub fn state_directory(&self) -> Option<&std::path::Path> {
        self.state_directory.as_deref()
    }

    /// The channel's descriptor, for a worker that runs its own `poll` loop: when it is
    /// readable, or [`Worker::has_pending`] says so, call [`Worker::pump`].
    pub fn channel_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ch.as_fd()
    }

    /// True when messages are already waiting in the worker (kept while it waited for a reply
    /// or an acceptance, or read in the same batch): [`Worker::pump`] them before polling
    /// [`Worker::channel_fd`], which would not wake for them.
    pub fn has_pending(&self) -> bool {
        !self.backlog.is_empty() || self.ch.has_buffered()
    }

    /// Asks the supervisor for a fresh descriptor for brokered resource `index` (0 is the
    /// first, fd 5), after the one it had failed. The supervisor applies a backoff and may
    /// refuse; the reason is in the error.
    pub fn reopen(&mut self, index: u32) -> Result<std::os::fd::OwnedFd, WorkerError> {
        self.ch.send(&FromWorker::Reopen { index })?;
        let (result, mut fds) = self.wait_for(
            |m| matches!(m, ToWorker::Reopened { index: i, .. } if *i == index),
            |g| match g.msg {
                ToWorker::Reopened { result, .. } => (result, g.fds),
                _ => (Err("unexpected answer".into()), Vec::new()),
            },
        )?;
        match result {
            Ok(()) if fds.len() == 1 => Ok(fds.remove(0)),
            Ok(()) => Err(WorkerError::Reopen { index, reason: format!("{} descriptors attached", fds.len()) }),
            Err(reason) => Err(WorkerError::Reopen { index, reason }),
        }
    }

    /// Opens stream `name` to `service` under a `stream` permit: this worker becomes its
    /// producer. The consumer (the worker providing `service`) finds it in
    /// [`Worker::take_incoming_streams`]. The stream lives while both ends do: when either
    /// dies, airlockd revokes it and the other end's handle answers `Revoked`; what must
    /// survive a consumer's absence goes through [`Worker::send`] (journaled) instead.
    pub fn open_stream(&mut self, service: &str, name: &str) -> Result<streams::StreamOut, WorkerError> {
        let id = self.next_id;
        self.next_id += 1;
        self.ch.send(&FromWorker::OpenStream { id, service: service.into(), name: name.into() })?;
        let (result, mut fds) = self.wait_for(
            |m| matches!(m, ToWorker::StreamOpened { id: i, .. } if *i == id),
            |g| match g.msg {
                ToWorker::StreamOpened { result, .. } => (Some(result), g.fds),
                _ => (None, Vec::new()),
            },
        )?;
        let err = |reason: String| WorkerError::Stream { service: service.into(), name: name.into(), reason };
        let grant = match result {
            Some(Ok(g)) => g,
            Some(Err(failure)) => {
                return Err(WorkerError::StreamRefused { service: service.into(), name: name.into(), failure })
            }
            None => return Err(err("no answer".into())),
        };
        if fds.len() != 1 {
            return Err(err(format!("{} descriptors attached", fds.len())));
        }
        let w = airlock_protocol::stream::StreamWriter::attach(fds.remove(0), grant.params, grant.key)
            .map_err(|e| err(e.to_string()))?;
        let (out, end) = streams::StreamOut::new(grant.stream, w);
        self.stream_ends.retain(streams::EndRef::alive);
        self.stream_ends.push(end);
        Ok(out)
    }

    /// Opens a region for calls of `service.method` answered in place, under a `shm-call`
    /// permit: this worker becomes its caller. The callee (the worker providing `service`)
    /// finds it in [`Worker::take_incoming_regions`] and serves it. The region lives while both
    /// ends do; when either dies airlockd revokes it and the other end answers `Revoked`.
    pub fn open_region(&mut self, service: &str, method: &str) -> Result<streams::RegionClient, WorkerError> {
        let id = self.next_id;
        self.next_id += 1;
        self.ch.send(&FromWorker::OpenRegion { id, service: service.into(), method: method.into() })?;
        let (result, mut fds) = self.wait_for(
            |m| matches!(m, ToWorker::RegionOpened { id: i, .. } if *i == id),
            |g| match g.msg {
                ToWorker::RegionOpened { result, .. } => (Some(result), g.fds),
                _ => (None, Vec::new()),
            },
        )?;
        let err = |reason: String| WorkerError::Region { service: service.into(), method: method.into(), reason };
        let grant = match result {
            Some(Ok(g)) => g,
            Some(Err(failure)) => {
                return Err(WorkerError::RegionRefused { service: service.into(), method: method.into(), failure })
            }
            None => return Err(err("no answer".into())),
        };
        if fds.len() != 1 {
            return Err(err(format!("{} descriptors attached", fds.len())));
        }
        let c = airlock_protocol::region::RegionCaller::attach(fds.remove(0), grant.params, grant.key)
            .map_err(|e| err(e.to_string()))?;
        let (client, end) = streams::RegionClient::new(grant.region, c);
        self.stream_ends.retain(streams::EndRef::alive);
        self.stream_ends.push(end);
        Ok(client)
    }

    /// Call regions other workers opened to this worker's services since the last call.
    pub fn take_incoming_regions(&mut self) -> Vec<streams::RegionServer> {
        std::mem::take(&mut self.incoming_regions)
    }

    /// Hands every incoming call region to `f` as it arrives (for example to serve it on a
    /// thread of its own) instead of keeping it for [`Worker::take_incoming_regions`].
    pub fn on_incoming_region(&mut self, mut f: impl FnMut(streams::RegionServer) + Send + 'static) {
        for h in std::mem::take(&mut self.incoming_regions) {
            f(h);
        }
        self.on_region = Some(Box::new(f));
    }

    /// Unmaps and closes every end of `stream` and tells airlockd so.
    fn release_stream(&mut self, stream: u64) -> Result<(), WorkerError> {
        for e in self.stream_ends.iter().filter(|e| e.stream() == stream) {
            e.release();
        }
        self.stream_ends.retain(|e| e.stream() != stream && e.alive());
        self.incoming.retain(|h| h.stream != stream);
        self.incoming_regions.retain(|h| h.region != stream);
        // Always answered, even for an end closed earlier: it says "I hold nothing of it".
        self.ch.send(&FromWorker::StreamReleased { stream })?;
        Ok(())
    }

    /// Streams other workers opened to this worker's services since the last call (handled as
    /// the channel is read: [`Worker::pump`], [`Worker::serve`]).
    pub fn take_incoming_streams(&mut self) -> Vec<streams::StreamIn> {
        std::mem::take(&mut self.incoming)
    }

    /// Hands every incoming stream to `f` as it arrives (for example to read it on a thread of
    /// its own) instead of keeping it for [`Worker::take_incoming_streams`].
    pub fn on_incoming_stream(&mut self, mut f: impl FnMut(streams::StreamIn) + Send + 'static) {
        for h in std::mem::take(&mut self.incoming) {
            f(h);
        }
        self.on_stream = Some(Box::new(f));
    }

    /// Handles every message already available on the channel without blocking: requests
    /// with `on_request`, deliveries with `on_message` (acknowledged after it returns, as in
    /// [`Worker::serve_all`]). For workers with their own event loop.
    pub fn pump<F, G>(&mut self, mut on_request: F, mut on_message: G) -> Result<Pump, WorkerError>
    where
        F: FnMut(&mut Worker, &Request, Option<&Bulk>) -> Result<Response, String>,
        G: FnMut(&mut Worker, &Delivery, Option<&Bulk>),
    {
        loop {
            if self.shutdown {
                return Ok(Pump::Stop);
            }
            let got = match self.backlog.pop_front() {
                Some(g) => g,
                None => match self.ch.try_recv::<ToWorker>() {
                    Ok(Some(g)) => g,
                    Ok(None) => {
                        self.flush_acks()?;
                        return Ok(Pump::Idle);
                    }
                    Err(ChannelError::Closed) => return Ok(Pump::Stop),
                    Err(e) => return Err(e.into()),
                },
            };
            self.handle(got, &mut on_request, &mut on_message)?;
        }
    }

    fn flush_acks(&mut self) -> Result<(), WorkerError> {
        if !self.acks.is_empty() {
            let acks = std::mem::take(&mut self.acks);
            self.ch.send_batch(&acks)?;
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Test hook: the channel itself, for a test worker that plays a compromised worker
    /// speaking raw frames (`airlock-worker-hostile`). A real worker never needs it.
    #[doc(hidden)]
    pub fn raw_channel(&mut self) -> &mut Channel {
        &mut self.ch
    }

    /// What the confinement looked like from inside.
    pub fn report(&self) -> &ConfinementReport {
        &self.report
    }

    /// A writer for a bulk payload of `len` bytes (inline or sealed memfd, chosen by size).
    pub fn bulk_writer(&self, len: usize) -> Result<BulkWriter, WorkerError> {
        Ok(BulkWriter::allocate(len, self.ch.limits().inline_threshold)?)
    }

    /// Sends a status line to the supervisor.
    pub fn event(&mut self, line: &str) -> Result<(), WorkerError> {
        Ok(self.ch.send(&FromWorker::Event(line.to_string()))?)
    }

    /// Tells the library which deliveries the application has already handled durably (its
    /// own record survives a restart): redeliveries up to `id` are acknowledged, not handled.
    pub fn resume_after(&mut self, id: u64) {
        self.handled_up_to = self.handled_up_to.max(id);
    }

    /// From now on a delivery is not acknowledged when its handler returns: the application
    /// acknowledges it with [`Worker::ack`] once it is done with it (the bridge: once the
    /// broker has confirmed what it published). Until then airlockd keeps the message in its
    /// journal, counts it against the sender's and this worker's quotas, and delivers it
    /// again after a restart of this worker or of airlockd. At most `delivery-window`
    /// messages are delivered unacknowledged, so holding them also holds back the rest.
    pub fn hold_acks(&mut self) {
        self.hold_acks = true;
    }

    /// Acknowledges deliveries held under [`Worker::hold_acks`], in one batch: airlockd then
    /// removes them from its journal and delivers the next.
    pub fn ack(&mut self, ids: impl IntoIterator<Item = u64>) -> Result<(), WorkerError> {
        self.acks.extend(ids.into_iter().map(|id| FromWorker::Ack { id }));
        self.flush_acks()
    }

    /// Serves requests until the supervisor says `Shutdown` or closes the channel.
    /// Asynchronous deliveries are acknowledged unhandled: use [`Worker::serve_all`].
    pub fn serve<F>(&mut self, handler: F) -> Result<(), WorkerError>
    where
        F: FnMut(&mut Worker, &Request, Option<&Bulk>) -> Result<Response, String>,
    {
        self.serve_all(
            handler,
            |_, d, _| tracing::warn!(id = d.id, service = %d.service, "message for a worker without a message handler"),
        )
    }

    /// Serves requests with `on_request` and asynchronous messages with `on_message`, until
    /// `Shutdown` or the channel closes. Each message is acknowledged after `on_message`
    /// returns, and never handed to it twice (see [`Worker::resume_after`]). Handlers get the
    /// worker back, so they can call and send themselves.
    pub fn serve_all<F, G>(&mut self, mut on_request: F, mut on_message: G) -> Result<(), WorkerError>
    where
        F: FnMut(&mut Worker, &Request, Option<&Bulk>) -> Result<Response, String>,
        G: FnMut(&mut Worker, &Delivery, Option<&Bulk>),
    {
        // Acknowledgements of a burst of deliveries go out together, once nothing more is
        // already waiting (each is still sent only after its handler returned).
        loop {
            if self.backlog.is_empty() && !self.ch.has_buffered() {
                self.flush_acks()?;
            }
            if self.shutdown {
                return Ok(());
            }
            let got = match self.backlog.pop_front() {
                Some(g) => g,
                None => match self.ch.recv::<ToWorker>() {
                    Ok(g) => g,
                    Err(ChannelError::Closed) => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
            };
            self.handle(got, &mut on_request, &mut on_message)?;
        }
    }

    /// As [`Worker::serve_all`], calling `on_tick` at least every `tick` (sooner when the
    /// channel is idle): for a worker that also reads streams on its serving thread.
    pub fn serve_all_ticking<F, G, T>(
        &mut self,
        tick: std::time::Duration,
        mut on_request: F,
        mut on_message: G,
        mut on_tick: T,
    ) -> Result<(), WorkerError>
    where
        F: FnMut(&mut Worker, &Request, Option<&Bulk>) -> Result<Response, String>,
        G: FnMut(&mut Worker, &Delivery, Option<&Bulk>),
        T: FnMut(&mut Worker),
    {
        let tick_ms = i32::try_from(tick.as_millis()).unwrap_or(i32::MAX);
        let mut last_tick = std::time::Instant::now();
        loop {
            if self.backlog.is_empty() && !self.ch.has_buffered() {
                self.flush_acks()?;
            }
            if self.shutdown {
                return Ok(());
            }
            if last_tick.elapsed() >= tick {
                on_tick(self);
                last_tick = std::time::Instant::now();
            }
            let got = match self.backlog.pop_front() {
                Some(g) => g,
                None => {
                    if !self.ch.has_buffered() {
                        let wait = tick_ms.saturating_sub(i32::try_from(last_tick.elapsed().as_millis()).unwrap_or(0));
                        let readable = airlock_protocol::sys::poll_readable(self.ch.as_fd(), wait.max(0))
                            .map_err(|source| WorkerError::Channel(ChannelError::Io { op: "poll", source }))?;
                        if !readable {
                            continue;
                        }
                    }
                    match self.ch.try_recv::<ToWorker>() {
                        Ok(Some(g)) => g,
                        Ok(None) => continue,
                        Err(ChannelError::Closed) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            self.handle(got, &mut on_request, &mut on_message)?;
        }
    }

    fn handle<F, G>(
        &mut self,
        got: airlock_protocol::Received<ToWorker>,
        on_request: &mut F,
        on_message: &mut G,
    ) -> Result<(), WorkerError>
    where
        F: FnMut(&mut Worker, &Request, Option<&Bulk>) -> Result<Response, String>,
        G: FnMut(&mut Worker, &Delivery, Option<&Bulk>),
    {
        match got.msg {
            ToWorker::Request(req) => {
                let _span = tracing::debug_span!("request", service = %req.service, method = %req.method, id = req.id)
                    .entered();
                match on_request(self, &req, got.bulk.as_ref()) {
                    Ok(resp) => {
                        let reply = FromWorker::Reply(Reply { id: req.id, result: Ok(ByteBody(resp.body)) });
                        match resp.bulk {
                            Some((w, mode)) => self.ch.send_bulk(&reply, &[], w, mode)?,
                            None => self.ch.send(&reply)?,
                        }
                    }
                    Err(e) => {
                        let reply = Reply { id: req.id, result: Err(CallFailure::Callee(e)) };
                        self.ch.send(&FromWorker::Reply(reply))?
                    }
                }
                self.release_bulk(got.bulk);
            }
            ToWorker::Deliver(d) => {
                let _span =
                    tracing::debug_span!("message", service = %d.service, method = %d.method, id = d.id).entered();
                if d.id > self.handled_up_to {
                    on_message(self, &d, got.bulk.as_ref());
                    self.release_bulk(got.bulk);
                    self.handled_up_to = d.id;
                } else {
                    tracing::debug!(id = d.id, "redelivery of a handled message: acknowledged, not handled again");
                    self.acks.push(FromWorker::Ack { id: d.id });
                    return Ok(());
                }
                if !self.hold_acks {
                    self.acks.push(FromWorker::Ack { id: d.id });
                }
            }
            ToWorker::Shutdown => {
                self.flush_acks()?;
                self.shutdown = true;
            }
            ToWorker::Reply(r) => tracing::warn!(id = r.id, "dropping a reply nobody waits for"),
            ToWorker::Reopened { index, .. } => tracing::warn!(index, "dropping a reopened resource nobody waits for"),
            ToWorker::StreamIncoming { from, service, name, grant } => {
                let stream = grant.stream;
                let mut fds = got.fds;
                match fds.pop() {
                    Some(fd) if fds.is_empty() => {
                        match airlock_protocol::stream::StreamReader::attach(fd, grant.params, grant.key) {
                            Ok(r) => {
                                tracing::debug!(stream, from = %from, name = %name, "incoming stream");
                                let (h, end) = streams::StreamIn::new(stream, from, service, name, r);
                                self.stream_ends.retain(streams::EndRef::alive);
                                self.stream_ends.push(end);
                                match self.on_stream.as_mut() {
                                    Some(f) => f(h),
                                    None => self.incoming.push(h),
                                }
                            }
                            Err(e) => tracing::warn!(stream, error = %e, "refusing an incoming stream's area"),
                        }
                    }
                    _ => tracing::warn!(stream, "an incoming stream without exactly one area attached"),
                }
            }
            ToWorker::RegionIncoming { from, service, method, grant } => {
                let region = grant.region;
                let mut fds = got.fds;
                match fds.pop() {
                    Some(fd) if fds.is_empty() => {
                        match airlock_protocol::region::RegionCallee::attach(fd, grant.params, grant.key) {
                            Ok(c) => {
                                tracing::debug!(region, from = %from, method = %method, "incoming call region");
                                let (h, end) = streams::RegionServer::new(region, from, service, method, c);
                                self.stream_ends.retain(streams::EndRef::alive);
                                self.stream_ends.push(end);
                                match self.on_region.as_mut() {
                                    Some(f) => f(h),
                                    None => self.incoming_regions.push(h),
                                }
                            }
                            Err(e) => tracing::warn!(region, error = %e, "refusing an incoming call region's area"),
                        }
                    }
                    _ => tracing::warn!(region, "an incoming call region without exactly one area attached"),
                }
            }
            ToWorker::StreamRevoked { stream, reason } => {
                tracing::info!(stream, reason = %reason, "stream or call region revoked: released");
                self.release_stream(stream)?;
            }
            other => {
                return Err(WorkerError::Unexpected {
                    expected: "Request, Deliver or Shutdown",
                    got: format!("{other:?}"),
                })
            }
        }
        Ok(())
    }

    /// Waits for a message matching `pick`, keeping everything else for `serve_all`. A stream
    /// revocation is acted on at once (the deadline to release it runs while we wait).
    fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(&ToWorker) -> bool,
        take: impl FnOnce(airlock_protocol::Received<ToWorker>) -> T,
    ) -> Result<T, WorkerError> {
        loop {
            let got = self.ch.recv::<ToWorker>()?;
            if matches!(got.msg, ToWorker::Shutdown) {
                sys::exit_now(0);
            }
            if pick(&got.msg) {
                return Ok(take(got));
            }
            if let ToWorker::StreamRevoked { stream, .. } = &got.msg {
                // Released now: the deadline runs while we wait (handled again later: idempotent).
                self.release_stream(*stream)?;
            }
            self.backlog.push_back(got);
        }
    }

    /// Calls `service.method` through the supervisor and waits for the reply (the
    /// supervisor's default deadline applies).
    pub fn call(&mut self, service: &str, method: &str, body: Vec<u8>) -> Result<(Vec<u8>, Option<Bulk>), WorkerError> {
        self.call_with_deadline(service, method, body, 0)
    }

    /// As [`Worker::call`], waiting at most `deadline_ms` for the reply.
    pub fn call_with_deadline(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        deadline_ms: u32,
    ) -> Result<(Vec<u8>, Option<Bulk>), WorkerError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request { id, service: service.into(), method: method.into(), body, deadline_ms };
        self.ch.send(&FromWorker::Request(req))?;
        let (reply, bulk) = self.wait_for(
            |m| matches!(m, ToWorker::Reply(r) if r.id == id),
            |g| match g.msg {
                ToWorker::Reply(r) => (Some(r), g.bulk),
                _ => (None, None),
            },
        )?;
        match reply.map(|r| r.result) {
            Some(Ok(b)) => Ok((b.0, bulk)),
            Some(Err(failure)) => Err(WorkerError::Call { service: service.into(), method: method.into(), failure }),
            None => Err(WorkerError::Unexpected { expected: "Reply", got: "nothing".into() }),
        }
    }

    /// Sends an asynchronous message; returns once the supervisor has taken responsibility
    /// for it (journaled, and fsynced first when `durable`). A sender over its quota gets
    /// [`Refusal::Busy`]; see [`Worker::send_waiting`] to wait instead.
    pub fn send(&mut self, service: &str, method: &str, body: Vec<u8>, durable: bool) -> Result<(), WorkerError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ch.send(&FromWorker::Send(Message {
            seq,
            service: service.into(),
            method: method.into(),
            body,
            durable,
        }))?;
        let answer = self.wait_for(
            |m| matches!(m, ToWorker::Accepted { seq: s } | ToWorker::Refused { seq: s, .. } if *s == seq),
            |g| g.msg,
        )?;
        match answer {
            ToWorker::Refused { refusal, .. } => {
                Err(WorkerError::Refused { service: service.into(), method: method.into(), refusal })
            }
            _ => Ok(()),
        }
    }

    /// Sends several messages at once (one `sendmmsg`, so the supervisor journals them with one
    /// fsync when durable) and waits until each is accepted or refused. Returns how many
    /// were accepted; the first refusal, if any, is returned after all answers are in.
    pub fn send_many(
        &mut self,
        service: &str,
        method: &str,
        bodies: Vec<Vec<u8>>,
        durable: bool,
    ) -> Result<usize, WorkerError> {
        let first = self.next_seq;
        let msgs: Vec<FromWorker> = bodies
            .into_iter()
            .map(|body| {
                let seq = self.next_seq;
                self.next_seq += 1;
                FromWorker::Send(Message { seq, service: service.into(), method: method.into(), body, durable })
            })
            .collect();
        let n = msgs.len() as u64;
        self.ch.send_batch(&msgs)?;
        let mut accepted = 0;
        let mut refused = None;
        for _ in 0..n {
            let answer = self.wait_for(
                |m| matches!(m, ToWorker::Accepted { seq } | ToWorker::Refused { seq, .. } if *seq >= first && *seq < first + n),
                |g| g.msg,
            )?;
            match answer {
                ToWorker::Refused { refusal, .. } => {
                    refused.get_or_insert(refusal);
                }
                _ => accepted += 1,
            }
        }
        match refused {
            Some(refusal) => Err(WorkerError::Refused { service: service.into(), method: method.into(), refusal }),
            None => Ok(accepted),
        }
    }

    /// As [`Worker::send`], but waits (with backoff up to 100 ms) while the supervisor
    /// answers `Busy`, instead of failing.
    pub fn send_waiting(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        durable: bool,
    ) -> Result<(), WorkerError> {
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match self.send(service, method, body.clone(), durable) {
                Err(WorkerError::Refused { refusal: Refusal::Busy(_), .. }) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }
}

/// Logs to stderr (which the supervisor collects), filtered by `AIRLOCK_LOG` (default
/// `info`). Never logs keys or payload bytes: nothing in airlock passes them to `tracing`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}
