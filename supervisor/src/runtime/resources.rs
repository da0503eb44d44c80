//! Brokered resources a worker asks to have reopened (`tcp-connect`: the supervisor connects
//! and passes the new descriptor), spaced by a backoff that is a plain function.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use airlock_protocol::wire::ToWorker;

use super::Supervisor;
use crate::spawn;

/// Whether a resource last reopened at `last` (with the backoff then decided) may be reopened
/// `now`: `Ok(backoff after this one)`, doubling while reopens follow each other within
/// `window`, or `Err(time left)` inside the backoff.
pub(super) fn reopen_decision(
    last: Option<(Instant, Duration)>,
    now: Instant,
    initial: Duration,
    max: Duration,
    window: Duration,
) -> Result<Duration, Duration> {
    match last {
        Some((at, backoff)) if now < at + backoff => Err(at + backoff - now),
        Some((at, backoff)) if now < at + backoff + window => Ok((backoff * 2).min(max)),
        _ => Ok(initial),
    }
}

impl Supervisor {
    /// A worker asks for a fresh descriptor for its brokered resource `index`. Only
    /// `tcp-connect` resources can be reopened; reopens are spaced by the worker's restart
    /// backoff (doubling, reset after a quiet restart window).
    pub(super) fn reopen(&mut self, i: usize, index: u32) {
        use crate::config::Resource;
        let w = &self.slots[i].cfg;
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
        let next = match reopen_decision(slot.reopens.get(&index).copied(), now, initial, max, window) {
            Ok(next) => next,
            Err(left) => {
                let left = left.as_millis();
                self.answer_reopen(i, index, Err(format!("backoff: retry in {left} ms")));
                return;
            }
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

    pub(super) fn answer_reopen(&mut self, i: usize, index: u32, result: Result<OwnedFd, String>) {
        let Some(run) = self.slots[i].run.as_mut() else { return };
        let sent = match result {
            Ok(fd) => run.channel.send_with(&ToWorker::Reopened { index, result: Ok(()) }, &[fd.as_fd()]),
            Err(why) => run.channel.send(&ToWorker::Reopened { index, result: Err(why) }),
        };
        if let Err(e) = sent {
            self.channel_failed(i, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_double_their_backoff_within_the_window_and_wait_inside_it() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let (initial, max, window) = (ms(100), ms(1000), ms(60_000));
        assert_eq!(reopen_decision(None, t0, initial, max, window), Ok(ms(100)));
        assert_eq!(reopen_decision(Some((t0, ms(100))), t0 + ms(40), initial, max, window), Err(ms(60)));
        assert_eq!(reopen_decision(Some((t0, ms(100))), t0 + ms(150), initial, max, window), Ok(ms(200)));
        assert_eq!(reopen_decision(Some((t0, ms(800))), t0 + ms(900), initial, max, window), Ok(ms(1000)));
        // A quiet window resets it.
        assert_eq!(reopen_decision(Some((t0, ms(800))), t0 + ms(800) + window, initial, max, window), Ok(ms(100)));
    }
}
