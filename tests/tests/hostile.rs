//! A compromised worker attacks the supervisor over its own channel (`airlock-worker-hostile`,
//! policy `hostile`): forged log lines, floods of events, unknown replies and acknowledgements,
//! a forged SIGSYS report, encrypted bulk calls the broker refuses. Each test asserts the exact
//! outcome, and that the log, read line by line, holds only lines airlockd wrote.

mod common;

use airlock_protocol::control::{WorkerState, WorkerStatus};
use common::*;

/// The hostile worker's `[[worker]]` table: `args` name the attack; never restarted.
fn hostile(args: &[&str], extra: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nargs = {args:?}\nservices = [\"hostile\"]\n{extra}\n[worker.restart]\npolicy = \"never\"\n"
    )
}

fn start(args: &[&str], extra: &str, permits: &str) -> Daemon {
    let d = Daemon::start(&format!("{}{}{permits}", echo_worker("peer", "peer", ""), hostile(args, extra)));
    d.wait_running("peer");
    d
}

/// Every line of the log is one airlockd wrote: a real timestamp, a level, no control
/// character; whatever the hostile worker forged (marked `FORGED`) is inside a line about it.
/// Exactly one `worker ready` line per worker.
fn assert_log_reads_true(log: &str, workers: usize) {
    for line in log.lines() {
        let mut words = line.split_whitespace();
        let ts = words.next().unwrap_or("");
        let level = words.next().unwrap_or("");
        let real_ts = ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.ends_with('Z') && !ts.starts_with("1999");
        assert!(real_ts, "a line airlockd did not write: {line:?}");
        assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level), "no level: {line:?}");
        assert!(!line.chars().any(char::is_control), "a control character in {line:?}");
        if line.contains("FORGED") {
            assert!(line.contains("hostile"), "forged text outside a line about the hostile worker: {line:?}");
        }
    }
    // A real `worker ready` line says so before anything escaped (a forged one, after).
    let ready =
        log.lines().filter(|l| l.find("lifecycle: worker ready ").is_some_and(|at| !l[..at].contains('\\'))).count();
    assert_eq!(ready, workers, "one `worker ready` line per worker:\n{log}");
}

/// Waits for the hostile worker's end and checks it was killed for its violations.
fn assert_killed_for_violations(d: &Daemon) -> WorkerStatus {
    let w = d.wait_for("hostile", "its end", |w| w.last_exit.is_some());
    assert_eq!(w.last_exit.as_deref(), Some("killed by signal 9 (SIGKILL)"), "{w:?}");
    let log = d.log_text();
    let kills: Vec<&str> = log.lines().filter(|l| l.contains("violations; killing the worker")).collect();
    assert_eq!(kills.len(), 1, "{log}");
    assert!(kills[0].contains("security event: 3 violations; killing the worker"), "{}", kills[0]);
    w
}

/// The sum of the summaries of what was suppressed: `suppressed N WHAT from worker hostile`.
fn suppressed(log: &str, what: &str) -> u64 {
    let needle = format!(" {what} from worker hostile");
    log.lines()
        .filter_map(|l| l.split("suppressed ").nth(1))
        .filter_map(|r| r.find(&needle).map(|at| &r[..at]))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn forged_log_lines_stay_inside_one_escaped_field() {
    let d = start(&["forge-log"], "", "");
    // Its two calls and its message to forged names are refused: the third violation kills it.
    assert_killed_for_violations(&d);
    assert_eq!(d.call("peer", "echo", "still here"), (true, "still here".to_string()));
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert!(log.lines().any(|l| l.contains("event: hello\\n\\r\\u{1b}[2K1999-01-01T")), "{log}");
    assert_log_reads_true(&log, 2);
}

#[test]
fn event_flood_is_suppressed_summarised_and_kills_the_flooder() {
    let d = start(&["flood-events", "3000", "60000"], "", "");
    assert_killed_for_violations(&d);
    assert_eq!(d.call("peer", "echo", "still here"), (true, "still here".to_string()));
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    // The burst of 50, then 20 a second while the flood lasts (about a second): far from 3000.
    let logged = log.lines().filter(|l| l.contains("event: xxx")).count();
    assert!((50..=100).contains(&logged), "{logged} events logged");
    let longest = log.lines().filter(|l| l.contains("event: xxx")).map(str::len).max().unwrap_or(0);
    assert!(longest < 700, "an event line of {longest} bytes: capped at 500 characters and its fields");
    assert!(suppressed(&log, "events") >= 3, "{log}");
    // 50 events of at most 500 characters, not 3000 of 60 KB.
    assert!(log.len() < 256 * 1024, "log of {} bytes", log.len());
    assert_log_reads_true(&log, 2);
}

#[test]
fn unknown_reply_flood_is_suppressed_summarised_and_kills_the_flooder() {
    let d = start(&["unknown-replies", "10000"], "", "");
    assert_killed_for_violations(&d);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    let logged = log.lines().filter(|l| l.contains("dropping a late or unknown reply")).count();
    assert!((50..=100).contains(&logged), "{logged} of 10000 logged");
    assert!(suppressed(&log, "late or unknown replies") >= 3, "{log}");
    assert_log_reads_true(&log, 2);
}

#[test]
fn unknown_acknowledgement_flood_is_suppressed_summarised_and_kills_the_flooder() {
    let d = start(&["unknown-acks", "10000"], "", "");
    assert_killed_for_violations(&d);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    let logged = log.lines().filter(|l| l.contains("acknowledgement for a message not delivered")).count();
    assert!((50..=100).contains(&logged), "{logged} of 10000 logged");
    assert!(suppressed(&log, "acknowledgements of messages not delivered to it") >= 3, "{log}");
    assert_log_reads_true(&log, 2);
}

#[test]
fn forged_sigsys_report_is_labelled_as_the_workers_and_the_cause_is_airlockds() {
    let d = start(&["forge-sigsys"], "", "");
    let w = d.wait_for("hostile", "its end", |w| w.last_exit.is_some());
    let exit = w.last_exit.unwrap_or_default();
    // It called ptrace and claimed execve: only the claim's label tells which is whose.
    let prefix = "killed by SIGSYS under policy hostile (the worker reported: syscall ";
    assert!(exit.starts_with(prefix) && exit.ends_with(" (59))"), "{exit}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert_log_reads_true(&log, 2);
}

const BULK_PERMIT: &str = "\n[[permit]]\nfrom = \"hostile\"\nto = \"peer.bulk\"\nkind = \"call\"\n";

#[test]
fn encrypted_bulk_over_quota_is_refused_busy_and_never_decrypted() {
    let d = start(&["bulk-calls", "peer", "20", "1048576"], "[worker.quota]\nbulk-bytes = 65536", BULK_PERMIT);
    // Every refusal brings the payload's memfd back, for the sender to close.
    d.wait_log("event: bulk done 0 20 0 20");
    let w = d.worker("hostile");
    assert_eq!((w.bulk_refused_unread, w.bulk_decrypted), (20, 0), "{w:?}");
    assert_eq!(w.violations, 0, "busy is backpressure, not a violation");
    assert_eq!(d.worker("peer").calls_served, 0);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert_log_reads_true(&log, 2);
}

#[test]
fn encrypted_bulk_the_permit_table_refuses_is_a_violation_and_never_decrypted() {
    let d = start(&["bulk-calls", "peer", "2", "1048576"], "", "");
    d.wait_log("event: bulk done 0 0 2 2");
    let w = d.worker("hostile");
    assert_eq!((w.bulk_refused_unread, w.bulk_decrypted, w.violations), (2, 0, 2), "{w:?}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert_log_reads_true(&log, 2);
}

#[test]
fn a_payload_attached_to_a_message_that_carries_none_kills_the_sender() {
    let d = start(&["bulk-event"], "", "");
    d.wait_log("descriptors or a bulk payload on a message of kind Event; killing it");
    let w = d.worker("hostile");
    assert_eq!((w.bulk_refused_unread, w.bulk_decrypted), (1, 0), "never taken in: {w:?}");
    assert!(!d.log_text().contains("with a payload"), "the event was not logged");
    drop(d);
}

#[test]
fn permitted_encrypted_bulk_is_decrypted_and_counted() {
    // The counter's positive control: a call the broker takes is decrypted (to be re-encrypted).
    let d = start(&["bulk-calls", "peer", "3", "1048576"], "", BULK_PERMIT);
    let pid = d.worker("peer").pid;
    d.wait_log("event: bulk done ");
    let w = d.worker("hostile");
    assert_eq!((w.bulk_refused_unread, w.bulk_decrypted), (0, 3), "{w:?}");
    // The peer released each payload after answering, on the worker library's reaper thread
    // (started under the peer's seccomp filter): it is still the same process, and serves on.
    let (ok, msg) = d.call("peer", "echo", "still serving");
    assert!(ok && msg == "still serving", "{msg}");
    let peer = d.worker("peer");
    assert_eq!((peer.calls_served, peer.restarts, peer.pid), (4, 0, pid), "{peer:?}");
    assert_eq!(peer.last_exit, None, "{peer:?}");
    drop(d);
}

/// A worker that hangs while starting (it never says hello) delays nothing else: the others
/// start, call each other through the broker, and `airlock status` answers, all while it is
/// still starting; then its start times out and it is reported.
#[test]
fn a_worker_that_hangs_while_starting_delays_nothing_else() {
    let permit = "\n[[permit]]\nfrom = \"front\"\nto = \"peer.echo\"\nkind = \"call\"\n";
    let workers = format!(
        "{}{}{}{permit}",
        hostile(&["hang-at-start"], ""),
        echo_worker("front", "front", ""),
        echo_worker("peer", "peer", "")
    );
    let d = Daemon::start_without_waiting(&workers);
    d.wait_running("front");
    d.wait_running("peer");
    assert_eq!(d.worker("hostile").state, WorkerState::Starting, "the hang is still going on");
    assert_eq!(d.call("front", "relay", "peer echo hi"), (true, "hi".to_string()));
    // Answered while the hang went on (not after it): the worker is still starting now.
    assert_eq!(d.worker("hostile").state, WorkerState::Starting, "the call waited for the hang");
    let w = d.wait_for("hostile", "its start to time out", |w| w.state != WorkerState::Starting);
    assert_eq!(w.state, WorkerState::Stopped, "{w:?}");
    let why = w.last_exit.unwrap_or_default();
    assert!(why.starts_with("start failed: ") && why.contains("handshake"), "{why}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}
