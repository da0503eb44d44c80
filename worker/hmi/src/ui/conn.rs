//! One client connection of the ui: its input buffer, where it is in the request/response
//! cycle, its deadline, and the output it still owes (the head, then the body, a bulk export
//! streamed from its mapping as the socket accepts it).
//!
//! Non-blocking throughout: every method does what the socket allows now and returns. It
//! never calls other workers (the event loop does, with the request this hands out) and
//! never logs request bytes. Consumed request bytes (passwords, cookies) are zeroed.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::http::{self, Body, Head, Parsed, Response};

/// A complete request head must arrive within this time of the request's first byte (of
/// the accept, for a connection's first request); its body within this time of the head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection without a new request is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that accepts none of its response for this long is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// After an answer that closes the connection, input is read and discarded for this long
/// (so the client reads the answer rather than a reset), at most [`LINGER_BYTES`].
pub const LINGER: Duration = Duration::from_secs(2);
pub const LINGER_BYTES: usize = 256 * 1024;
/// Most bytes written to one connection per turn of the event loop.
const WRITE_BUDGET: usize = 1 << 20;
/// Input held at most: one largest head and body (pipelined requests wait beyond it).
const INPUT_CAP: usize = http::MAX_HEAD + http::MAX_BODY;

/// What the connection needs of its socket.
pub trait Stream: Read + Write {
    /// Sends FIN after the queued output: the client sees the answer, then the end.
    fn shutdown_write(&self);
}

impl Stream for std::net::TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for a request head. `idle`: nothing of it has arrived yet after a previous
    /// response (the idle timeout applies, not the request timeout).
    Head {
        since: Instant,
        idle: bool,
    },
    /// The head is in; waiting for `head.content_length` bytes of body.
    Body {
        head: Head,
        since: Instant,
    },
    /// A request was handed out; its answer is awaited.
    Handling {
        keep_alive: bool,
    },
    /// Sending an answer; then back to `Head`, or closing.
    Send {
        close: bool,
    },
    /// Answered and half-closed: discarding input until the client closes.
    Linger {
        until: Instant,
        discarded: usize,
    },
    Closed,
}

/// A complete request, ready for routing.
#[derive(Debug)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

/// A request rejected by the parser, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub status: u16,
}

/// What [`Conn::next_request`] found.
#[derive(Debug)]
pub enum Next {
    /// Nothing to do until more bytes arrive (or the output drains).
    Wait,
    Request(Request),
    /// Refused before routing; the error answer is queued and the connection will close.
    Rejected(Rejected),
}

#[derive(Debug)]
pub struct Conn<S: Stream> {
    stream: S,
    input: Vec<u8>,
    /// Bytes of `input` already searched for the end of a head.
    scanned: usize,
    state: State,
    output: VecDeque<(Body, usize)>,
    last_progress: Instant,
    peer_closed: bool,
    continue_sent: bool,
}

impl<S: Stream> Conn<S> {
    pub fn new(stream: S, now: Instant) -> Conn<S> {
        Conn {
            stream,
            input: Vec::new(),
            scanned: 0,
            state: State::Head { since: now, idle: false },
            output: VecDeque::new(),
            last_progress: now,
            peer_closed: false,
            continue_sent: false,
        }
    }

    /// A connection over the limit: answered with `response` at once, then closed.
    pub fn refuse(stream: S, response: Response, now: Instant) -> Conn<S> {
        let mut c = Conn::new(stream, now);
        c.drain_input();
        c.queue(response, false);
        c.state = State::Send { close: true };
        c.flush(now);
        c
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// `(readable, writable)` interest for poll.
    pub fn interest(&self) -> (bool, bool) {
        let reading = match self.state {
            State::Head { .. } | State::Body { .. } => self.input.len() < INPUT_CAP && !self.peer_closed,
            State::Linger { .. } => true,
            State::Handling { .. } | State::Send { .. } | State::Closed => false,
        };
        (reading, !self.output.is_empty())
    }

    /// When this connection next needs attention, whatever the socket does.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Head { since, idle: true } if self.input.is_empty() => Some(*since + IDLE_TIMEOUT),
            State::Head { since, .. } | State::Body { since, .. } => Some(*since + REQUEST_TIMEOUT),
            State::Send { .. } => Some(self.last_progress + SEND_TIMEOUT),
            State::Linger { until, .. } => Some(*until),
            State::Handling { .. } | State::Closed => None,
        }
    }

    /// Whether a complete request may already be waiting in the input (pipelined).
    pub fn has_input(&self) -> bool {
        matches!(self.state, State::Head { .. } | State::Body { .. }) && !self.input.is_empty()
    }

    /// Applies the deadline: a late request head or body gets one attempt at a 408 and the
    /// connection closes; an idle, stalled or lingering one just closes.
    pub fn check_timeout(&mut self, now: Instant) -> Option<Rejected> {
        if self.deadline().is_none_or(|d| now < d) {
            return None;
        }
        let late_request = match &self.state {
            State::Head { idle: true, .. } if self.input.is_empty() => false,
            State::Head { .. } | State::Body { .. } => true,
            _ => false,
        };
        if late_request {
            self.output.clear();
            self.queue(Response::error(408, "the request did not arrive in time"), false);
            self.state = State::Send { close: true };
            self.flush(now);
            self.close();
            return Some(Rejected { status: 408 });
        }
        self.close();
        None
    }

    /// Reads what the socket has, up to the input cap (while lingering: discards it).
    pub fn read(&mut self, now: Instant, scratch: &mut [u8]) {
        if let State::Linger { discarded, .. } = &mut self.state {
            loop {
                match self.stream.read(scratch) {
                    Ok(0) => return self.close(),
                    Ok(n) => {
                        *discarded += n;
                        if *discarded > LINGER_BYTES {
                            return self.close();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => return self.close(),
                }
            }
        }
        if !matches!(self.state, State::Head { .. } | State::Body { .. }) {
            return;
        }
        while self.input.len() < INPUT_CAP && !self.peer_closed {
            let room = (INPUT_CAP - self.input.len()).min(scratch.len());
            match self.stream.read(&mut scratch[..room]) {
                Ok(0) => self.peer_closed = true,
                Ok(n) => {
                    if let State::Head { since, idle } = &mut self.state {
                        if *idle && self.input.is_empty() {
                            *since = now;
                            *idle = false;
                        }
                    }
                    self.input.extend_from_slice(&scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.close(),
            }
        }
        if self.peer_closed && !self.has_complete_request() {
            // A request cut short cannot be answered; a clean close between requests is normal.
            self.close();
        }
    }

    fn has_complete_request(&self) -> bool {
        match &self.state {
            State::Head { .. } => http::find_head_end(&self.input, 0).is_some(),
            State::Body { head, .. } => self.input.len() >= head.head_len + head.content_length,
            _ => false,
        }
    }

    /// Hands out the next complete request, if the connection is ready for one. Malformed
    /// or over-limit requests are answered here (and the connection closes after).
    pub fn next_request(&mut self, now: Instant) -> Next {
        if !self.output.is_empty() {
            return Next::Wait;
        }
        if let State::Head { .. } = self.state {
            let end = match http::find_head_end(&self.input, self.scanned) {
                Some(e) => e,
                None if self.input.len() > http::MAX_HEAD => return self.reject(431, "request head larger than 8 KiB"),
                None => {
                    self.scanned = self.input.len();
                    return Next::Wait;
                }
            };
            let head = match http::parse_head(&self.input[..end]) {
                Parsed::Complete(h) => h,
                Parsed::Reject(r) => return self.reject(r.status, r.reason),
                Parsed::Partial => return self.reject(400, "malformed request head"),
            };
            self.continue_sent = false;
            self.state = State::Body { head, since: now };
        }
        let State::Body { head, .. } = &self.state else { return Next::Wait };
        let total = head.head_len + head.content_length;
        if self.input.len() < total {
            if head.expect_continue && !head.http10 && !self.continue_sent {
                self.continue_sent = true;
                self.output.push_back((Body::Static(http::CONTINUE), 0));
            }
            return Next::Wait;
        }
        let keep_alive = head.keep_alive;
        let State::Body { head, .. } = std::mem::replace(&mut self.state, State::Handling { keep_alive }) else {
            return Next::Wait;
        };
        let body = self.input[head.head_len..total].to_vec();
        self.consume(total);
        Next::Request(Request { head, body })
    }

    fn reject(&mut self, status: u16, reason: &'static str) -> Next {
        self.input.fill(0);
        self.input.clear();
        self.scanned = 0;
        self.queue(Response::error(status, reason), false);
        self.state = State::Send { close: true };
        Next::Rejected(Rejected { status })
    }

    /// Zeroes and drops the first `n` input bytes (a request's head and body).
    fn consume(&mut self, n: usize) {
        self.input[..n].fill(0);
        self.input.drain(..n);
        self.scanned = 0;
    }

    /// Queues the answer to the request handed out last.
    pub fn respond(&mut self, response: Response) {
        let keep_alive = match self.state {
            State::Handling { keep_alive } => keep_alive && !self.peer_closed,
            _ => false,
        };
        self.queue(response, keep_alive);
        self.state = State::Send { close: !keep_alive };
    }

    fn queue(&mut self, r: Response, keep_alive: bool) {
        let mut head = http::serialize_head(&r, keep_alive);
        match r.body {
            // Small bodies go out with their head, in one segment.
            Body::Static(_) | Body::Bytes(_) => {
                head.extend_from_slice(r.body.bytes());
                self.output.push_back((Body::Bytes(head), 0));
            }
            Body::Bulk(_) => {
                self.output.push_back((Body::Bytes(head), 0));
                self.output.push_back((r.body, 0));
            }
        }
    }

    /// Writes what the socket accepts; once an answer is out, moves on (next request,
    /// lingering close).
    pub fn flush(&mut self, now: Instant) {
        let mut budget = WRITE_BUDGET;
        while let Some((body, pos)) = self.output.front_mut() {
            let bytes = body.bytes();
            if *pos >= bytes.len() {
                self.output.pop_front();
                continue;
            }
            if budget == 0 {
                return;
            }
            let end = bytes.len().min(*pos + budget);
            match self.stream.write(&bytes[*pos..end]) {
                Ok(0) => return self.close(),
                Ok(n) => {
                    *pos += n;
                    budget -= n;
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.close(),
            }
        }
        if let State::Send { close } = self.state {
            if close {
                self.stream.shutdown_write();
                if self.peer_closed {
                    self.close();
                } else {
                    self.state = State::Linger { until: now + LINGER, discarded: 0 };
                }
            } else {
                self.state = State::Head { since: now, idle: true };
            }
        }
    }

    /// Best effort before an immediate answer: reads (and drops) what already arrived, so
    /// closing does not reset the connection under the answer.
    fn drain_input(&mut self) {
        let mut buf = [0u8; 4096];
        for _ in 0..4 {
            match self.stream.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    pub fn close(&mut self) {
        self.input.fill(0);
        self.input.clear();
        self.output.clear();
        self.state = State::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A socket stand-in: input arrives in the given chunks, then WouldBlock (or EOF);
    /// writes are accepted up to `window` bytes at a time.
    #[derive(Debug, Default)]
    struct Mock {
        chunks: VecDeque<Vec<u8>>,
        eof: bool,
        written: Vec<u8>,
        window: usize,
        shut: Cell<bool>,
    }

    impl Mock {
        fn new(window: usize) -> Mock {
            Mock { window, ..Mock::default() }
        }
        fn feed(&mut self, b: &[u8]) {
            self.chunks.push_back(b.to_vec());
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.written).into_owned()
        }
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.chunks.front_mut() {
                Some(c) => {
                    let n = c.len().min(buf.len());
                    buf[..n].copy_from_slice(&c[..n]);
                    c.drain(..n);
                    if c.is_empty() {
                        self.chunks.pop_front();
                    }
                    Ok(n)
                }
                None if self.eof => Ok(0),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.window == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.window);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Stream for Mock {
        fn shutdown_write(&self) {
            self.shut.set(true);
        }
    }

    fn conn(now: Instant) -> Conn<Mock> {
        Conn::new(Mock::new(1 << 20), now)
    }

    fn feed_and_read(c: &mut Conn<Mock>, b: &[u8], now: Instant) {
        c.stream.feed(b);
        c.read(now, &mut [0u8; 16 * 1024]);
    }

    fn expect_request(c: &mut Conn<Mock>, now: Instant) -> Request {
        match c.next_request(now) {
            Next::Request(r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn expect_rejected(c: &mut Conn<Mock>, now: Instant) -> u16 {
        match c.next_request(now) {
            Next::Rejected(r) => r.status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn request_split_in_bytes_is_assembled() {
        let t = Instant::now();
        let mut c = conn(t);
        let raw = b"POST /api/ack HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        for b in raw.iter() {
            assert!(matches!(c.next_request(t), Next::Wait));
            feed_and_read(&mut c, &[*b], t);
        }
        let r = expect_request(&mut c, t);
        assert_eq!(r.head.path, "/api/ack");
        assert_eq!(r.body, b"abcd");
    }

    #[test]
    fn keep_alive_serves_pipelined_requests_in_order() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", t);
        assert_eq!(expect_request(&mut c, t).head.path, "/a");
        assert!(matches!(c.next_request(t), Next::Wait), "no second request before the first answer");
        c.respond(Response::error(404, "x"));
        c.flush(t);
        assert!(c.stream.text().starts_with("HTTP/1.1 404"));
        assert!(!c.stream.text().contains("Connection: close"));
        assert_eq!(expect_request(&mut c, t).head.path, "/b");
    }

    #[test]
    fn connection_close_answers_then_lingers_then_closes() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", t);
        expect_request(&mut c, t);
        c.respond(Response::error(404, "x"));
        c.flush(t);
        assert!(c.stream.text().contains("Connection: close\r\n"));
        assert!(c.stream.shut.get());
        assert!(!c.is_closed());
        c.stream.eof = true;
        c.read(t, &mut [0u8; 64]);
        assert!(c.is_closed());
    }

    #[test]
    fn oversized_head_without_end_is_431() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\nX: ", t);
        feed_and_read(&mut c, &vec![b'a'; http::MAX_HEAD], t);
        assert_eq!(expect_rejected(&mut c, t), 431);
        c.flush(t);
        assert!(c.stream.text().starts_with("HTTP/1.1 431 "));
        assert!(c.stream.text().contains("Connection: close"));
    }

    #[test]
    fn oversized_body_is_413_before_reading_it() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"POST /api/ack HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n", t);
        assert_eq!(expect_rejected(&mut c, t), 413);
    }

    #[test]
    fn garbage_is_400() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"\x00\x01\x02 hello\r\n\r\n", t);
        assert_eq!(expect_rejected(&mut c, t), 400);
    }

    #[test]
    fn expect_continue_gets_100_before_the_body() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"POST /api/ack HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", t);
        assert!(matches!(c.next_request(t), Next::Wait));
        c.flush(t);
        assert_eq!(c.stream.text(), "HTTP/1.1 100 Continue\r\n\r\n");
        feed_and_read(&mut c, b"{}", t);
        assert_eq!(expect_request(&mut c, t).body, b"{}");
    }

    #[test]
    fn silent_connection_gets_408_after_10_s() {
        let t = Instant::now();
        let mut c = conn(t);
        assert_eq!(c.check_timeout(t + Duration::from_secs(9)), None);
        assert!(!c.is_closed());
        assert_eq!(c.check_timeout(t + REQUEST_TIMEOUT), Some(Rejected { status: 408 }));
        assert!(c.is_closed());
        assert!(c.stream.text().starts_with("HTTP/1.1 408 "));
    }

    #[test]
    fn trickling_head_is_cut_off_at_10_s_from_its_start() {
        let t = Instant::now();
        let mut c = conn(t);
        for s in 0..10 {
            feed_and_read(&mut c, b"X", t + Duration::from_secs(s));
            assert!(matches!(c.next_request(t), Next::Wait));
        }
        assert_eq!(c.check_timeout(t + Duration::from_secs(10)), Some(Rejected { status: 408 }));
    }

    #[test]
    fn slow_body_is_cut_off_at_10_s_from_the_head() {
        let t = Instant::now();
        let mut c = conn(t);
        let t1 = t + Duration::from_secs(5);
        feed_and_read(&mut c, b"POST /api/ack HTTP/1.1\r\nContent-Length: 10\r\n\r\nab", t1);
        assert!(matches!(c.next_request(t1), Next::Wait));
        assert_eq!(c.check_timeout(t + Duration::from_secs(14)), None);
        assert_eq!(c.check_timeout(t1 + REQUEST_TIMEOUT), Some(Rejected { status: 408 }));
    }

    #[test]
    fn idle_keep_alive_closes_after_30_s_without_408() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\n\r\n", t);
        expect_request(&mut c, t);
        c.respond(Response::error(404, "x"));
        c.flush(t);
        let sent = c.stream.written.len();
        assert_eq!(c.check_timeout(t + Duration::from_secs(29)), None);
        assert!(!c.is_closed());
        assert_eq!(c.check_timeout(t + IDLE_TIMEOUT), None);
        assert!(c.is_closed());
        assert_eq!(c.stream.written.len(), sent, "no 408 on an idle connection");
    }

    #[test]
    fn next_request_on_kept_alive_connection_gets_10_s_from_its_first_byte() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\n\r\n", t);
        expect_request(&mut c, t);
        c.respond(Response::error(404, "x"));
        c.flush(t);
        let t2 = t + Duration::from_secs(25);
        feed_and_read(&mut c, b"GET", t2);
        assert_eq!(c.check_timeout(t + IDLE_TIMEOUT), None);
        assert_eq!(c.check_timeout(t2 + REQUEST_TIMEOUT), Some(Rejected { status: 408 }));
    }

    #[test]
    fn slow_reader_is_written_as_it_accepts_and_dropped_when_stalled() {
        let t = Instant::now();
        let mut c = Conn::new(Mock::new(100), t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\n\r\n", t);
        expect_request(&mut c, t);
        c.respond(Response::new(200, "text/plain", Body::Bytes(vec![b'x'; 5000])));
        c.flush(t);
        assert!(c.stream.written.len() > 5000, "the mock accepts 100 bytes per write, all in one turn");
        let mut c = Conn::new(Mock::new(0), t);
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\n\r\n", t);
        expect_request(&mut c, t);
        c.respond(Response::new(200, "text/plain", Body::Bytes(vec![b'x'; 5000])));
        c.flush(t);
        assert_eq!(c.interest(), (false, true));
        c.check_timeout(t + SEND_TIMEOUT);
        assert!(c.is_closed());
    }

    #[test]
    fn peer_close_mid_request_closes_and_after_complete_request_still_answers() {
        let t = Instant::now();
        let mut c = conn(t);
        c.stream.eof = true;
        feed_and_read(&mut c, b"GET / HT", t);
        assert!(c.is_closed());
        let mut c = conn(t);
        c.stream.eof = true;
        feed_and_read(&mut c, b"GET / HTTP/1.1\r\n\r\n", t);
        assert!(!c.is_closed());
        expect_request(&mut c, t);
        c.respond(Response::error(404, "x"));
        c.flush(t);
        assert!(c.stream.text().contains("Connection: close"));
        assert!(c.is_closed());
    }

    #[test]
    fn consumed_request_bytes_are_zeroed() {
        let t = Instant::now();
        let mut c = conn(t);
        feed_and_read(&mut c, b"POST /api/login HTTP/1.1\r\nContent-Length: 6\r\n\r\nsecretGET", t);
        expect_request(&mut c, t);
        assert_eq!(c.input, b"GET");
    }

    #[test]
    fn refused_connection_gets_503_and_closes() {
        let t = Instant::now();
        let mut m = Mock::new(1 << 20);
        m.feed(b"GET / HTTP/1.1\r\n\r\n");
        let c = Conn::refuse(m, Response::error(503, "busy"), t);
        assert!(c.stream.text().starts_with("HTTP/1.1 503 "));
        assert!(c.stream.shut.get());
    }
}
