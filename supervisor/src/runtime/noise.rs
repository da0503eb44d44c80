//! Rate limits on what a worker can make the supervisor log: its events, replies to calls it
//! was not asked (or that timed out), acknowledgements of messages it was not given, and its
//! stderr lines. One token bucket per worker per kind; what a bucket refuses is not logged but
//! counted, and summarised once per [`SUMMARY_EVERY`] ("suppressed N events from worker X").
//! Everything here is a plain function of the time it is given: no clock, no logging.

use std::time::{Duration, Instant};

/// What a worker makes the supervisor log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Noise {
    /// `FromWorker::Event` lines.
    Event,
    /// Replies to no call waiting for this worker (late, or never asked).
    UnknownReply,
    /// Acknowledgements of messages not delivered to this worker.
    UnknownAck,
    /// Requests the permit table (or another rule) refused: each is a violation already, so
    /// what this bucket suppresses is only not logged.
    Refusal,
    /// Lines on its stderr (a panic, its own log): limited, but not a violation.
    Stderr,
}

impl Noise {
    const ALL: [Noise; 5] = [Noise::Event, Noise::UnknownReply, Noise::UnknownAck, Noise::Refusal, Noise::Stderr];

    fn index(self) -> usize {
        self as usize
    }

    /// Tokens per second and burst: what a well-behaved worker never exceeds.
    pub fn limit(self) -> (u32, u32) {
        match self {
            Noise::Event | Noise::UnknownReply | Noise::UnknownAck | Noise::Refusal => (20, 50),
            Noise::Stderr => (50, 200),
        }
    }

    /// Whether what the bucket suppresses counts as a violation (once more). Stderr does not:
    /// a worker that panics writes many lines without being hostile; a refusal counted itself.
    pub fn is_violation(self) -> bool {
        !matches!(self, Noise::Stderr | Noise::Refusal)
    }

    /// The plural noun of a summary line.
    pub fn what(self) -> &'static str {
        match self {
            Noise::Event => "events",
            Noise::UnknownReply => "late or unknown replies",
            Noise::UnknownAck => "acknowledgements of messages not delivered to it",
            Noise::Refusal => "refusals",
            Noise::Stderr => "stderr lines",
        }
    }
}

/// How often suppressed counts are summarised (at most one line per kind per worker).
pub(super) const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// A token bucket: `burst` tokens, refilled at `per_s` a second. Tokens are counted in
/// millitokens so that refilling is exact integer arithmetic.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    milli: u64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Bucket {
        Bucket { milli: u64::from(burst) * 1000, last: now }
    }

    /// Takes one token if there is one: whether the item may pass.
    pub fn take(&mut self, now: Instant, per_s: u32, burst: u32) -> bool {
        let elapsed_ms = now.saturating_duration_since(self.last).as_millis().min(u128::from(u32::MAX)) as u64;
        // Refill whole milliseconds only, keeping the remainder for the next call.
        self.last += Duration::from_millis(elapsed_ms);
        self.milli = (self.milli + elapsed_ms * u64::from(per_s)).min(u64::from(burst) * 1000);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// One worker's buckets and what they refused since the last summary.
#[derive(Debug, Clone)]
pub(super) struct Limiter {
    buckets: [Bucket; 5],
    suppressed: [u64; 5],
    last_summary: Instant,
}

impl Limiter {
    pub fn new(now: Instant) -> Limiter {
        Limiter { buckets: Noise::ALL.map(|k| Bucket::full(k.limit().1, now)), suppressed: [0; 5], last_summary: now }
    }

    /// Whether one item of `kind` may be logged now; if not, it is counted as suppressed.
    pub fn admit(&mut self, kind: Noise, now: Instant) -> bool {
        let (per_s, burst) = kind.limit();
        let ok = self.buckets[kind.index()].take(now, per_s, burst);
        if !ok {
            self.suppressed[kind.index()] += 1;
        }
        ok
    }

    /// The counts to summarise, when [`SUMMARY_EVERY`] has passed since the last summary (or
    /// always with `flush`, as when the worker exits); each is then reset. Empty when nothing
    /// was suppressed.
    pub fn summary(&mut self, now: Instant, flush: bool) -> Vec<(Noise, u64)> {
        if !flush && now.saturating_duration_since(self.last_summary) < SUMMARY_EVERY {
            return Vec::new();
        }
        self.last_summary = now;
        let out =
            Noise::ALL.iter().filter(|k| self.suppressed[k.index()] > 0).map(|&k| (k, self.suppressed[k.index()]));
        let out: Vec<(Noise, u64)> = out.collect();
        self.suppressed = [0; 5];
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_passes_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(50, t0);
        let passed = (0..100).filter(|_| b.take(t0, 20, 50)).count();
        assert_eq!(passed, 50, "the burst, then nothing at the same instant");
        // 20 a second: one token every 50 ms.
        assert!(!b.take(t0 + Duration::from_millis(49), 20, 50));
        assert!(b.take(t0 + Duration::from_millis(50), 20, 50));
        let later = t0 + Duration::from_secs(1) + Duration::from_millis(50);
        let passed = (0..100).filter(|_| b.take(later, 20, 50)).count();
        assert_eq!(passed, 20, "a second's worth of tokens");
    }

    #[test]
    fn bucket_refills_no_further_than_its_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::full(50, t0);
        for _ in 0..50 {
            assert!(b.take(t0, 20, 50));
        }
        let much_later = t0 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.take(much_later, 20, 50)).count(), 50);
    }

    #[test]
    fn bucket_keeps_fractions_of_a_token_between_calls() {
        let t0 = Instant::now();
        let mut b = Bucket::full(1, t0);
        assert!(b.take(t0, 20, 1));
        // Ten calls 5 ms apart: 50 ms in all, exactly one token.
        let passed = (1..=10).filter(|n| b.take(t0 + Duration::from_millis(5 * n), 20, 1)).count();
        assert_eq!(passed, 1);
    }

    #[test]
    fn limiter_counts_each_kind_apart_and_summarises_once_a_period() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let events = (0..3000).filter(|_| l.admit(Noise::Event, t0)).count();
        assert_eq!(events, 50);
        assert!(l.admit(Noise::UnknownAck, t0), "another kind has its own bucket");
        assert_eq!(l.summary(t0 + Duration::from_millis(999), false), vec![], "not yet a period");
        assert_eq!(l.summary(t0 + SUMMARY_EVERY, false), vec![(Noise::Event, 2950)]);
        assert_eq!(l.summary(t0 + SUMMARY_EVERY * 3, false), vec![], "counts reset after a summary");
    }

    #[test]
    fn limiter_flush_summarises_at_once() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        for _ in 0..60 {
            l.admit(Noise::UnknownReply, t0);
        }
        assert_eq!(l.summary(t0, true), vec![(Noise::UnknownReply, 10)]);
    }

    #[test]
    fn only_stderr_floods_are_not_violations() {
        assert!(Noise::Event.is_violation() && Noise::UnknownReply.is_violation() && Noise::UnknownAck.is_violation());
        assert!(!Noise::Stderr.is_violation() && !Noise::Refusal.is_violation());
    }
}
