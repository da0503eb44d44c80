//! A worker's ends of streams (`airlock_protocol::stream`): what [`crate::Worker::open_stream`]
//! returns to a producer and [`crate::Worker::take_incoming_streams`] to a consumer.
//!
//! The library keeps a weak reference to each end: when airlockd revokes a stream (the other
//! end died, or the operator asked), the library unmaps and closes it at once, whatever the
//! application is doing with its handle, so a worker never holds a revoked area past the
//! supervisor's deadline (an end that does is killed). The handle then answers
//! [`StreamError::Revoked`].

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use airlock_protocol::stream::{StreamError, StreamReader, StreamWriter};

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
        let end = Arc::new(Mutex::new(Some(w)));
        let r = EndRef::Out(stream, Arc::downgrade(&end));
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
        let end = Arc::new(Mutex::new(Some(r)));
        let er = EndRef::In(stream, Arc::downgrade(&end));
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

/// The library's reference to an end.
#[derive(Debug)]
pub(crate) enum EndRef {
    Out(u64, Weak<Mutex<Option<StreamWriter>>>),
    In(u64, Weak<Mutex<Option<StreamReader>>>),
}

impl EndRef {
    pub(crate) fn stream(&self) -> u64 {
        match self {
            EndRef::Out(s, _) | EndRef::In(s, _) => *s,
        }
    }

    /// Unmaps and closes the end now (the application's handle answers `Revoked` from then on).
    pub(crate) fn release(&self) {
        match self {
            EndRef::Out(_, w) => {
                if let Some(e) = w.upgrade() {
                    drop(lock(&e).take());
                }
            }
            EndRef::In(_, r) => {
                if let Some(e) = r.upgrade() {
                    drop(lock(&e).take());
                }
            }
        }
    }

    pub(crate) fn alive(&self) -> bool {
        match self {
            EndRef::Out(_, w) => w.strong_count() > 0,
            EndRef::In(_, r) => r.strong_count() > 0,
        }
    }
}
