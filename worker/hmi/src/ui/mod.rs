//! The HMI's `ui` worker: serves operators' browsers over HTTP/1.1 on the listening TCP
//! socket the supervisor passes as descriptor 5, and reaches `auth`, `logic` and `historian`
//! only through its channel. It provides no service.
//!
//! One thread, no async runtime: a `poll(2)` loop over the listener, every connection and
//! the channel. Connections are non-blocking with their own buffers and deadlines, so slow
//! or idle clients cost a descriptor and a few KiB each and never hold up the others; calls
//! to other workers are made in turn, each bounded by a deadline. The page and its script are
//! compiled in: the worker opens no file. It never logs bodies, cookies or passwords.

pub mod api;
pub mod conn;
pub mod http;

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use airlock_protocol::stream::StreamError;
use airlock_protocol::wire::CallFailure;
use airlock_protocol::Bulk;
use airlock_worker::{sys, Pump, Worker, WorkerError};

use api::{Backend, CallError};
use conn::{Conn, Next};

/// The brokered resource the ui serves on: the first one, a `tcp-listen` socket.
const LISTENER_FD: RawFd = 5;
/// Connections served at once (the configured `nofile` limit leaves room for more).
const MAX_CONNS: usize = 1100;
/// Connections over the limit still being answered 503 at once; beyond, they are closed.
const MAX_REFUSED: usize = 128;
/// Accepts per turn of the loop, so a flood of connections cannot starve the others.
const ACCEPTS_PER_TURN: usize = 256;
/// Pipelined requests answered per connection per turn.
const REQUESTS_PER_TURN: usize = 4;
/// How long accepting pauses when the process is out of descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Longest single wait in poll.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum UiError {
    #[error("listening socket (descriptor {LISTENER_FD}): {0}")]
    ClaimListener(std::io::Error),
    #[error("descriptor {LISTENER_FD} is not a listening TCP socket")]
    NotAStreamSocket,
    #[error("poll: {0}")]
    Poll(std::io::Error),
    #[error("accept: {0}")]
    Accept(std::io::Error),
    #[error("{0}")]
    Worker(#[from] WorkerError),
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> std::process::ExitCode {
    airlock_worker::init_logging();
    // Claimed and made non-blocking before confinement: the ui policy does not allow
    // fcntl(F_SETFL), and needs no more than accept4 on a ready, non-blocking listener.
    let listener = match claim_listener() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("airlock-worker-ui: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut w = match Worker::start("ui", &[]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-ui: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = serve(&mut w, &listener) {
        tracing::error!("ui stops: {e}");
        eprintln!("airlock-worker-ui: {e}");
        return std::process::ExitCode::from(2);
    }
    std::process::ExitCode::SUCCESS
}

fn claim_listener() -> Result<OwnedFd, UiError> {
    let fd = airlock_protocol::sys::claim_inherited_fd(LISTENER_FD).map_err(UiError::ClaimListener)?;
    let kind = airlock_protocol::sys::socket_type(fd.as_fd()).map_err(UiError::ClaimListener)?;
    if kind != libc::SOCK_STREAM {
        return Err(UiError::NotAStreamSocket);
    }
    sys::set_nonblocking(fd.as_fd()).map_err(UiError::ClaimListener)?;
    Ok(fd)
}

/// `[settings.ui]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct UiSettings {
    /// Trend queries go through a call region shared with the historian (a `shm-call` permit
    /// for `historian.trend`), answered in place without the supervisor's hop.
    #[serde(default)]
    trend_in_place: bool,
}

#[derive(Debug, serde::Deserialize)]
struct Settings {
    #[serde(default)]
    ui: Option<UiSettings>,
}

/// How long the ui goes through the supervisor after a call region failed, before it opens
/// a new one.
const REGION_RETRY: Duration = Duration::from_secs(5);

/// The longest wait for an answer in a region: under airlockd's 2 s for an end to let go of a
/// revoked area (the ui's one thread cannot read the revocation while it waits). A slower
/// answer goes through airlockd instead.
const REGION_WAIT: Duration = Duration::from_millis(900);

/// The call regions the ui uses, by `service.method`: opened on first use, dropped (and the
/// call made through the supervisor) when one fails.
#[derive(Debug, Default)]
struct Regions {
    /// `service.method`s configured to be called in place.
    wanted: Vec<String>,
    open: std::collections::BTreeMap<String, airlock_worker::streams::RegionClient>,
    retry_at: std::collections::BTreeMap<String, Instant>,
}

/// The worker's channel as the handlers' [`Backend`]. A failure of the channel itself (not
/// of a call) is kept: the loop stops after the turn.
struct Calls<'a> {
    w: &'a mut Worker,
    regions: &'a mut Regions,
    fatal: Option<WorkerError>,
    /// A call was made: replies may have brought other messages along, to pump.
    called: bool,
}

impl Calls<'_> {
    /// The region for `service.method`, opened if configured and not failing lately.
    fn region(&mut self, to: &str, service: &str, method: &str) -> Option<airlock_worker::streams::RegionClient> {
        if !self.regions.wanted.iter().any(|w| w == to) {
            return None;
        }
        if let Some(c) = self.regions.open.get(to) {
            if !c.is_released() {
                return Some(c.clone());
            }
            // Revoked (the historian restarted): a new one is opened now.
            tracing::info!(region = c.region, to, "call region revoked: opening a new one");
            self.regions.open.remove(to);
        }
        if self.regions.retry_at.get(to).is_some_and(|t| Instant::now() < *t) {
            return None;
        }
        self.called = true;
        match self.w.open_region(service, method) {
            Ok(c) => {
                tracing::info!(region = c.region, to, "calling in place");
                self.regions.open.insert(to.to_string(), c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(to, error = %e, "no call region: calling through airlockd");
                self.regions.retry_at.insert(to.to_string(), Instant::now() + REGION_RETRY);
                None
            }
        }
    }
}

impl Backend for Calls<'_> {
    fn call(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        deadline_ms: u32,
    ) -> Result<(Vec<u8>, Option<Bulk>), CallError> {
        if self.fatal.is_some() {
            return Err(CallError::Broken("the ui lost its channel".into()));
        }
        self.called = true;
        match self.w.call_with_deadline(service, method, body, deadline_ms) {
            Ok(r) => Ok(r),
            Err(WorkerError::Call { failure, .. }) => Err(CallError::Failed(failure)),
            Err(e) => {
                self.fatal = Some(e);
                Err(CallError::Broken("the ui lost its channel".into()))
            }
        }
    }

    fn call_in_place(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        deadline_ms: u32,
    ) -> Result<Vec<u8>, CallError> {
        let to = format!("{service}.{method}");
        let started = Instant::now();
        if self.fatal.is_none() {
            if let Some(c) = self.region(&to, service, method) {
                // This one thread also answers airlockd's revocations: it never waits in a
                // region as long as airlockd gives an end to let go of a revoked area.
                let wait = match deadline_ms {
                    0 => REGION_WAIT,
                    ms => Duration::from_millis(u64::from(ms)).min(REGION_WAIT),
                };
                let mut answer = Vec::new();
                let out = match c.call(&body, &mut answer, wait) {
                    Ok(()) => Some(Ok(answer)),
                    // Too large to answer in the region: through airlockd, the region kept.
                    Err(StreamError::Refused(why)) if why == crate::types::TOO_LARGE_FOR_REGION => None,
                    // The callee's own refusal, as through the supervisor (its words, cut).
                    Err(StreamError::Refused(why)) => {
                        Some(Err(CallError::Failed(CallFailure::Callee(why.chars().take(300).collect()))))
                    }
                    Err(StreamError::Revoked) => {
                        // The historian restarted, or the operator revoked it: this call goes
                        // through the supervisor, the next opens a new region.
                        tracing::info!(region = c.region, "call region revoked: calling through airlockd");
                        c.close();
                        self.regions.open.remove(&to);
                        None
                    }
                    Err(e) => {
                        // Poisoned, closed or too slow: this call goes through the supervisor,
                        // and a new region is tried after a while.
                        tracing::warn!(region = c.region, error = %e, "call region failed: calling through airlockd");
                        c.close();
                        self.regions.open.remove(&to);
                        self.regions.retry_at.insert(to.clone(), Instant::now() + REGION_RETRY);
                        None
                    }
                };
                if let Some(out) = out {
                    return out;
                }
            }
        }
        // What is left of the deadline: a failed region never doubles the wait.
        let spent = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let left = deadline_ms.saturating_sub(spent);
        if deadline_ms > 0 && left == 0 {
            return Err(CallError::Failed(CallFailure::TimedOut {
                worker: service.to_string(),
                after_ms: u64::from(spent),
            }));
        }
        self.call(service, method, body, left).map(|(reply, _)| reply)
    }
}

/// Serves until the supervisor says `Shutdown` or closes the channel.
fn serve(w: &mut Worker, listener: &OwnedFd) -> Result<(), UiError> {
    let mut regions = Regions::default();
    if w.settings::<Settings>()?.ui.is_some_and(|u| u.trend_in_place) {
        regions.wanted.push("historian.trend".into());
    }
    tracing::info!("ui serving HTTP on its listening socket");
    serve_loop(&mut Calls { w, regions: &mut regions, fatal: None, called: false }, listener)
}

/// What the HTTP loop serves for: the ui worker ([`Calls`]: its channel, the other layers
/// through airlockd), or the one-process HMI of the benchmark (`crate::single`: the layers'
/// code called directly).
pub(crate) trait Host: Backend {
    /// A descriptor to wait on beside the connections (the worker's channel), if any.
    fn wake_fd(&self) -> Option<RawFd>;
    /// Handles what arrived on it, or what calls brought along. True: stop serving.
    fn pump(&mut self) -> Result<bool, UiError>;
    /// After each turn: a failure of the host itself ends the loop; true: a pump is due.
    fn end_turn(&mut self) -> Result<bool, UiError>;
}

impl Host for Calls<'_> {
    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.w.channel_fd().as_raw_fd())
    }

    fn pump(&mut self) -> Result<bool, UiError> {
        Ok(self.w.pump(|_, _, _| Err("ui serves no requests".into()), |_, _, _| {})? == Pump::Stop)
    }

    fn end_turn(&mut self) -> Result<bool, UiError> {
        if let Some(e) = self.fatal.take() {
            return Err(e.into());
        }
        Ok(std::mem::take(&mut self.called))
    }
}

/// Serves HTTP on `listener` (non-blocking) until the host says stop or fails.
pub(crate) fn serve_loop<H: Host>(host: &mut H, listener: &OwnedFd) -> Result<(), UiError> {
    let mut conns: Vec<Conn<TcpStream>> = Vec::new();
    let mut refused: Vec<Conn<TcpStream>> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut accept_paused_until: Option<Instant> = None;
    let mut last_accept_warning: Option<Instant> = None;
    let mut pump_due = true;
    let mut more = false;
    loop {
        if pump_due {
            pump_due = false;
            if host.pump()? {
                tracing::info!(connections = conns.len(), "ui stopping");
                return Ok(());
            }
        }
        let now = Instant::now();
        if accept_paused_until.is_some_and(|t| now >= t) {
            accept_paused_until = None;
        }
        let timeout = if more {
            0
        } else {
            let next = conns
                .iter()
                .chain(refused.iter())
                .filter_map(Conn::deadline)
                .chain(accept_paused_until)
                .min()
                .unwrap_or(now + MAX_WAIT);
            let wait = next.saturating_duration_since(now).min(MAX_WAIT);
            // Round up, so the loop does not wake just before a deadline.
            i32::try_from(wait.as_millis() + u128::from(wait.subsec_nanos() % 1_000_000 != 0)).unwrap_or(i32::MAX)
        };
        fds.clear();
        fds.push(pollfd(host.wake_fd().unwrap_or(-1), libc::POLLIN));
        let listen_fd = if accept_paused_until.is_some() { -1 } else { listener.as_raw_fd() };
        fds.push(pollfd(listen_fd, libc::POLLIN));
        for c in conns.iter().chain(refused.iter()) {
            let (r, wr) = c.interest();
            let mut events = 0;
            if r {
                events |= libc::POLLIN;
            }
            if wr {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(c.stream().as_raw_fd(), events));
        }
        sys::poll(&mut fds, timeout).map_err(UiError::Poll)?;
        let now = Instant::now();
        if fds[0].revents != 0 {
            pump_due = true;
        }
        more = false;
        for (c, p) in conns.iter_mut().zip(&fds[2..]) {
            more |= turn(c, p.revents, host, now, &mut scratch);
        }
        for (c, p) in refused.iter_mut().zip(&fds[2 + conns.len()..]) {
            io_events(c, p.revents, now, &mut scratch);
            c.check_timeout(now);
        }
        pump_due |= host.end_turn()?;
        conns.retain(|c| !c.is_closed());
        refused.retain(|c| !c.is_closed());
        if fds[1].revents != 0 {
            let now = Instant::now();
            match accept_all(listener, &mut conns, &mut refused, now) {
                Ok(()) => {}
                Err(e) if is_resource_shortage(&e) => {
                    accept_paused_until = Some(now + ACCEPT_PAUSE);
                    if last_accept_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                        last_accept_warning = Some(now);
                        tracing::warn!(connections = conns.len(), "accept paused: {e}");
                    }
                }
                Err(e) => return Err(UiError::Accept(e)),
            }
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

fn io_events(c: &mut Conn<TcpStream>, revents: libc::c_short, now: Instant, scratch: &mut [u8]) {
    if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
        c.read(now, scratch);
    }
    // A hang-up or error with output pending: the write fails and closes the connection,
    // rather than poll reporting the same event again and again until the send timeout.
    if revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 && !c.is_closed() {
        c.flush(now);
    }
    if revents & libc::POLLNVAL != 0 {
        c.close();
    }
}

/// One connection's turn: its socket events, its requests, its deadline. Returns whether
/// it may have more requests waiting already.
fn turn<H: Host>(
    c: &mut Conn<TcpStream>,
    revents: libc::c_short,
    host: &mut H,
    now: Instant,
    scratch: &mut [u8],
) -> bool {
    io_events(c, revents, now, scratch);
    let mut more = false;
    if revents != 0 || c.has_input() {
        more = drive(c, host);
    }
    if let Some(r) = c.check_timeout(Instant::now()) {
        tracing::debug!(route = "-", status = r.status, "request timed out");
    }
    more
}

/// Answers the complete requests waiting on `c`, up to [`REQUESTS_PER_TURN`].
fn drive<H: Host>(c: &mut Conn<TcpStream>, host: &mut H) -> bool {
    for _ in 0..REQUESTS_PER_TURN {
        if c.is_closed() {
            return false;
        }
        let now = Instant::now();
        match c.next_request(now) {
            Next::Wait => {
                c.flush(now);
                return false;
            }
            Next::Rejected(r) => {
                tracing::debug!(route = "-", status = r.status, "request refused");
                c.flush(now);
                return false;
            }
            Next::Request(req) => {
                let out = api::handle(&req.head, &req.body, host);
                tracing::debug!(
                    method = req.head.method.as_str(),
                    route = out.route,
                    status = out.response.status,
                    "request"
                );
                c.respond(out.response);
                c.flush(Instant::now());
            }
        }
    }
    c.has_input()
}

/// Accepts what is pending, up to [`ACCEPTS_PER_TURN`]: served while under [`MAX_CONNS`],
/// answered 503 and closed beyond it.
fn accept_all(
    listener: &OwnedFd,
    conns: &mut Vec<Conn<TcpStream>>,
    refused: &mut Vec<Conn<TcpStream>>,
    now: Instant,
) -> std::io::Result<()> {
    for _ in 0..ACCEPTS_PER_TURN {
        let fd = match sys::accept_nonblocking(listener.as_fd()) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if is_transient_accept_error(&e) => continue,
            Err(e) => return Err(e),
        };
        let stream = TcpStream::from(fd);
        if conns.len() < MAX_CONNS {
            conns.push(Conn::new(stream, now));
            continue;
        }
        let c = Conn::refuse(stream, http::Response::error(503, "too many connections; try again later"), now);
        tracing::debug!(route = "-", status = 503, connections = conns.len(), "connection refused");
        if !c.is_closed() && refused.len() < MAX_REFUSED {
            refused.push(c);
        }
    }
    Ok(())
}

/// Errors of one pending connection (it was reset, or the network failed under it): the
/// next one may be fine.
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EINTR
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// Out of descriptors or memory: accepting pauses, serving goes on.
fn is_resource_shortage(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
