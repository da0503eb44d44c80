//! Security events: one constructor for every one of them (target `airlock::security`, level
//! ERROR, the worker and its pid as fields, the text escaped), and the violations that count
//! towards killing a worker.

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
    /// violations: enough of them kill it.
    pub(super) fn refused(&mut self, i: usize, what: &str, why: &str) {
        let slot = &mut self.slots[i];
        slot.violations += 1;
        let pid = slot.run.as_ref().map_or(0, |r| r.pid);
        event(&slot.name, Some(pid), format_args!("{what}: {}", super::io::printable(why, 500)));
        let max = self.cfg.broker.max_violations;
        if max > 0 && slot.violations >= max {
            event(&slot.name, Some(pid), format_args!("{} permit violations; killing the worker", slot.violations));
            self.kill(i);
        }
    }
}
