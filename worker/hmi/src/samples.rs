//! Samples as streams: field publishes each poll to logic and the historian through a
//! shared-memory stream (`[settings.field] stream-samples = true` and a `stream` permit for
//! `logic.samples` and `historian.samples`), so that airlockd does no work per sample; while a
//! stream is down (its consumer restarting, a permit missing) field falls back to journaled
//! messages, which the consumers handle exactly as before. Samples are periodic: one the ring
//! has no room for is dropped (said in the log), as one the broker refuses is today.

use std::time::{Duration, Instant};

use airlock_worker::streams::{StreamIn, StreamOut};
use airlock_worker::{Worker, WorkerError};

use crate::types::Sample;

/// Field's side: one stream per consumer, re-opened after it goes down.
#[derive(Debug)]
pub struct SampleOut {
    to: &'static str,
    out: Option<StreamOut>,
    retry_at: Instant,
    /// The permit table refuses this stream: never asked again (each refusal is a violation).
    refused: bool,
}

/// What [`SampleOut::publish`] did with a sample.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// Written into the stream.
    Streamed,
    /// The ring is full: dropped.
    Dropped,
    /// No stream: the caller sends it journaled.
    NotStreamed,
}

impl SampleOut {
    pub fn new(to: &'static str) -> SampleOut {
        SampleOut { to, out: None, retry_at: Instant::now(), refused: false }
    }

    /// Writes `body` into the stream to `to`, opening it first when it is down (at most once
    /// a second).
    pub fn publish(&mut self, w: &mut Worker, body: &[u8]) -> Published {
        if self.out.is_none() && !self.refused && Instant::now() >= self.retry_at {
            match w.open_stream(self.to, "samples") {
                Ok(out) => {
                    tracing::debug!(to = self.to, stream = out.stream, "samples flow through a stream");
                    self.out = Some(out);
                }
                Err(WorkerError::StreamRefused {
                    failure: airlock_worker::CallFailure::NotPermitted { rule }, ..
                }) => {
                    tracing::error!(to = self.to, "no stream permit ({rule}): samples stay journaled");
                    self.refused = true;
                }
                Err(e) => {
                    tracing::debug!(to = self.to, "stream not open yet: {e}");
                    self.retry_at = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        let Some(out) = &self.out else { return Published::NotStreamed };
        match out.send(body, None) {
            Ok(()) => Published::Streamed,
            Err(airlock_protocol::stream::StreamError::Busy) => Published::Dropped,
            Err(e) => {
                tracing::warn!(to = self.to, "sample stream down ({e}): journaled until it is back");
                self.out = None;
                self.retry_at = Instant::now() + Duration::from_secs(1);
                Published::NotStreamed
            }
        }
    }
}

/// A consumer's side: every incoming sample stream, read on the serving thread.
#[derive(Debug, Default)]
pub struct SampleIn {
    streams: Vec<StreamIn>,
}

impl SampleIn {
    /// Takes the streams opened to this worker since the last call, then hands every sample
    /// waiting in them to `f`. A stream that ends or is poisoned is dropped (said in the log).
    pub fn drain(&mut self, w: &mut Worker, mut f: impl FnMut(&mut Worker, Sample)) {
        for s in w.take_incoming_streams() {
            if s.name == "samples" && s.from == "field" {
                tracing::debug!(stream = s.stream, "samples arrive through a stream");
                self.streams.push(s);
            } else {
                tracing::warn!(from = %s.from, name = %s.name, "refusing an unexpected stream");
                s.close();
            }
        }
        let mut i = 0;
        // Bounded per turn over all streams, so requests are never starved by a fast producer.
        let mut budget = 256usize;
        while i < self.streams.len() {
            let mut ended = None;
            while budget > 0 {
                budget -= 1;
                match self.streams[i].try_recv() {
                    Ok(Some(rec)) => match crate::types::decode::<Sample>(&rec) {
                        Ok(s) => f(w, s),
                        Err(e) => tracing::warn!("dropping a streamed sample: {e}"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        ended = Some(e);
                        break;
                    }
                }
            }
            match ended {
                Some(e) => {
                    tracing::warn!(stream = self.streams[i].stream, "sample stream ended: {e}");
                    self.streams.swap_remove(i).close();
                }
                None => i += 1,
            }
        }
    }
}
