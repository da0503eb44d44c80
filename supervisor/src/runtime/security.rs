//! Security events: one constructor for every one of them (target `airlock::security`, level
//! ERROR, the worker and its pid as fields, the text escaped), the violations that count
//! towards killing a worker, and the rate limits ([`super::noise`]) on what a worker makes us
//! log: refusals, events, unknown replies and acknowledgements beyond them are counted, not
//! logged, and summarised once a second.

use std::time::Instant;

use super::noise::Noise;
use super::Supervisor;

/// Logs a security event about `worker` (`-` when it is not one of ours). `what` is the
/// supervisor's own text; a peer's words in it must already be escaped
/// ([`super::io::printable`]).
pub(super) fn event(worker: &str, pid: Option<i32>, what: std::fmt::Arguments<'_>) {
    let pid = pid.unwrap_or(0);
    tracing::error!(target: "airlock::security", worker = %worker, pid, "security event: {what}");
}

impl Supervisor {
    /// A request the permit table refuses: logged as a security event and counted.
    pub(super) fn violation(&mut self, i: usize, why: &str) {
        self.refused(i, "refused by the permit table", why);
    }

    /// A refused request (`what` says by which rule), counted towards the worker's
    /// violations: enough of them kill it. Logged within the worker's refusal rate, and not
    /// once the worker has been killed (its last frames are still read).
    pub(super) fn refused(&mut self, i: usize, what: &str, why: &str) {
        let killed = self.slots[i].run.as_ref().is_some_and(|r| r.killed);
        if !killed && self.slots[i].noise.admit(Noise::Refusal, Instant::now()) {
            let slot = &self.slots[i];
            let pid = slot.run.as_ref().map(|r| r.pid);
            event(&slot.name, pid, format_args!("{what}: {}", super::io::printable(why, 500)));
        }
        self.count_violation(i);
    }

    /// One more violation; the one that reaches `max-violations` kills the worker (logged once).
    fn count_violation(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.violations = slot.violations.saturating_add(1);
        let max = self.cfg.broker.max_violations;
        if max > 0 && slot.violations == max {
            let pid = slot.run.as_ref().map(|r| r.pid);
            event(&slot.name, pid, format_args!("{} violations; killing the worker", slot.violations));
            self.kill(i);
        }
    }

    /// Whether worker `i` may make the supervisor log one more item of `kind` now. Beyond its
    /// rate the item is counted for the next summary and, for every kind but stderr lines, as
    /// a violation: a worker that floods the log is killed like one that keeps being refused.
    pub(super) fn admit(&mut self, i: usize, kind: Noise) -> bool {
        if self.slots[i].noise.admit(kind, Instant::now()) {
            return true;
        }
        if kind.is_violation() {
            self.count_violation(i);
        }
        false
    }

    /// Logs what worker `i`'s rate limits suppressed, once per period (or now, with `flush`).
    pub(super) fn summarise_noise(&mut self, i: usize, now: Instant, flush: bool) {
        let slot = &mut self.slots[i];
        let pid = slot.run.as_ref().map(|r| r.pid);
        for (kind, n) in slot.noise.summary(now, flush) {
            let (name, what) = (&slot.name, kind.what());
            if kind == Noise::Stderr {
                tracing::warn!(worker = %name, pid = pid.unwrap_or(0), "suppressed {n} {what} from worker {name}");
            } else {
                event(name, pid, format_args!("suppressed {n} {what} from worker {name}"));
            }
        }
    }
}
