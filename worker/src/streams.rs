//! A worker's ends of streams (`airlock_protocol::stream`): what [`crate::Worker::open_stream`]
//! returns to a producer and [`crate::Worker::take_incoming_streams`] to a consumer; and of
//! call regions (`airlock_protocol::region`): [`crate::Worker::open_region`] for a caller,
//! [`crate::Worker::take_incoming_regions`] for a callee.
//!
//! The library keeps a weak reference to each end: when airlockd revokes a stream (the other
//! end died, or the operator asked), the library unmaps and closes it at once, whatever the
//! application is doing with its handle, so a worker never holds a revoked area past the
//! supervisor's deadline (an end that does is killed). The handle then answers
//! [`StreamError::Revoked`]. An application thread waiting in the end (a send waiting for space,
//! a call for its answer) is ended first by the end's in-process revocation, within a sleep
//! (`MAX_SLEEP`), whatever the peer does to the shared words.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use airlock_protocol::region::{RegionCallee, RegionCaller};
use airlock_protocol::stream::{LocalRevoke, StreamError, StreamReader, StreamWriter};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The producer's end of a stream.
#[derive(Debug, Clone)]
pub struct StreamOut {
    /// airlockd's id for the stream.
    pub stream: u64,
    end: Arc<Mutex<Option<StreamWriter>>>,
}

impl StreamOut {
    pub(crate) fn new(stream: u64, w: StreamWriter) -> (StreamOut, EndRef) {
        let local = w.local_revoke();
        let end = Arc::new(Mutex::new(Some(w)));
        let r = EndRef::Out(stream, local, Arc::downgrade(&end));
        (StreamOut { stream, end }, r)
    }

    /// Appends one record: `wait` None answers [`StreamError::Busy`] when the ring is full,
    /// Some(d) waits for space up to `d`.
    pub fn send(&self, record: &[u8], wait: Option<Duration>) -> Result<(), StreamError> {
        match lock(&self.end).as_mut() {
            Some(w) => w.send(record, wait),
            None => Err(StreamError::Revoked),
        }
    }

    /// Closes this end: the consumer reads what was sent, then sees the stream closed.
    pub fn close(&self) {
        if let Some(mut w) = lock(&self.end).take() {
            w.close();
        }
    }
}

/// The consumer's end of a stream.
#[derive(Debug, Clone)]
pub struct StreamIn {
    pub stream: u64,
    /// The producing worker, and the service and stream name it opened.
    pub from: String,
    pub service: String,
    pub name: String,
    end: Arc<Mutex<Option<StreamReader>>>,
}

impl StreamIn {
    pub(crate) fn new(stream: u64, from: String, service: String, name: String, r: StreamReader) -> (StreamIn, EndRef) {
        let local = r.local_revoke();
        let end = Arc::new(Mutex::new(Some(r)));
        let er = EndRef::In(stream, local, Arc::downgrade(&end));
        (StreamIn { stream, from, service, name, end }, er)
    }

    /// The next record, waiting up to `timeout` (Ok(None) when none came).
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>, StreamError> {
        match lock(&self.end).as_mut() {
            Some(r) => r.recv(timeout),
            None => Err(StreamError::Revoked),
        }
    }

    /// The next record if one is there.
    pub fn try_recv(&self) -> Result<Option<Vec<u8>>, StreamError> {
        match lock(&self.end).as_mut() {
            Some(r) => r.try_recv(),
            None => Err(StreamError::Revoked),
        }
    }

    pub fn close(&self) {
        if let Some(mut r) = lock(&self.end).take() {
            r.close();
        }
    }
}

/// The caller's end of a call region: each call writes the request into the shared region,
/// and the callee answers in place.
#[derive(Debug, Clone)]
pub struct RegionClient {
    /// airlockd's id for the region.
    pub region: u64,
    end: Arc<Mutex<Option<RegionCaller>>>,
}

impl RegionClient {
    pub(crate) fn new(region: u64, c: RegionCaller) -> (RegionClient, EndRef) {
        let local = c.local_revoke();
        let end = Arc::new(Mutex::new(Some(c)));
        let r = EndRef::Caller(region, local, Arc::downgrade(&end));
        (RegionClient { region, end }, r)
    }

    /// Whether the library let go of this region (airlockd revoked it: the callee died or
    /// restarted, or the operator asked): open a new one.
    pub fn is_released(&self) -> bool {
        lock(&self.end).is_none()
    }

    /// One call: `request` in, the callee's answer into `answer`, within `timeout` (a call
    /// that times out poisons the region: open a new one).
    pub fn call(&self, request: &[u8], answer: &mut Vec<u8>, timeout: Duration) -> Result<(), StreamError> {
        match lock(&self.end).as_mut() {
            Some(c) => c.call(request, answer, timeout),
            None => Err(StreamError::Revoked),
        }
    }

    pub fn close(&self) {
        if let Some(mut c) = lock(&self.end).take() {
            c.close();
        }
    }
}

/// The callee's end of a call region.
#[derive(Debug, Clone)]
pub struct RegionServer {
    pub region: u64,
    /// The calling worker, and the service and method it opened the region for.
    pub from: String,
    pub service: String,
    pub method: String,
    end: Arc<Mutex<Option<RegionCallee>>>,
}

impl RegionServer {
    pub(crate) fn new(
        region: u64,
        from: String,
        service: String,
        method: String,
        c: RegionCallee,
    ) -> (RegionServer, EndRef) {
        let local = c.local_revoke();
        let end = Arc::new(Mutex::new(Some(c)));
        let r = EndRef::Callee(region, local, Arc::downgrade(&end));
        (RegionServer { region, from, service, method, end }, r)
    }

    /// Waits up to `timeout` for the next call and answers it with `f`, which turns the
    /// request (a private copy, checked) into the answer in place, or refuses it. Ok(false)
    /// when no call came. The end is not held while `f` runs: a revocation meanwhile unmaps
    /// the region at once (however long `f` takes, so this worker is never killed for a slow
    /// answer), and the answer is then dropped ([`StreamError::Revoked`]).
    pub fn serve(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) -> Result<bool, StreamError> {
        let mut buf = Vec::new();
        let taken = match lock(&self.end).as_mut() {
            Some(c) => c.take_request(timeout, &mut buf)?,
            None => return Err(StreamError::Revoked),
        };
        if !taken {
            return Ok(false);
        }
        let result = f(&mut buf);
        match lock(&self.end).as_mut() {
            Some(c) => c.answer(&mut buf, result).map(|()| true),
            None => Err(StreamError::Revoked),
        }
    }

    pub fn close(&self) {
        if let Some(mut c) = lock(&self.end).take() {
            c.close();
        }
    }
}

/// The library's reference to an end: its id, its in-process revocation (which ends any wait
/// the application's thread is in, so the end's lock is free within a sleep; the shared word
/// alone could be cleared by the peer), and the end itself.
#[derive(Debug)]
pub(crate) enum EndRef {
    Out(u64, LocalRevoke, Weak<Mutex<Option<StreamWriter>>>),
    In(u64, LocalRevoke, Weak<Mutex<Option<StreamReader>>>),
    Caller(u64, LocalRevoke, Weak<Mutex<Option<RegionCaller>>>),
    Callee(u64, LocalRevoke, Weak<Mutex<Option<RegionCallee>>>),
}

/// Drops what `w` still points to, if anything.
fn release_weak<T>(w: &Weak<Mutex<Option<T>>>) {
    if let Some(e) = w.upgrade() {
        drop(lock(&e).take());
    }
}

impl EndRef {
    pub(crate) fn stream(&self) -> u64 {
        match self {
            EndRef::Out(s, ..) | EndRef::In(s, ..) | EndRef::Caller(s, ..) | EndRef::Callee(s, ..) => *s,
        }
    }

    /// Unmaps and closes the end now (the application's handle answers `Revoked` from then on).
    pub(crate) fn release(&self) {
        match self {
            EndRef::Out(_, l, w) => {
                l.revoke();
                release_weak(w)
            }
            EndRef::In(_, l, r) => {
                l.revoke();
                release_weak(r)
            }
            EndRef::Caller(_, l, c) => {
                l.revoke();
                release_weak(c)
            }
            EndRef::Callee(_, l, c) => {
                l.revoke();
                release_weak(c)
            }
        }
    }

    pub(crate) fn alive(&self) -> bool {
        match self {
            EndRef::Out(_, _, w) => w.strong_count() > 0,
            EndRef::In(_, _, r) => r.strong_count() > 0,
            EndRef::Caller(_, _, c) => c.strong_count() > 0,
            EndRef::Callee(_, _, c) => c.strong_count() > 0,
        }
    }
}
