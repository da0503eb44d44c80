//! Streams between confined workers: a shared ring airlockd sets up under a `stream` permit,
//! revokes when an end dies or the operator asks, and enforces from outside. `front` produces,
//! `peer` (service `peer`) consumes on a thread of its own and checks every record
//! (`airlock-worker-echo`'s `stream_to` and `stream_stats`).

mod common;

use std::time::{Duration, Instant};

use common::*;

const PERMIT: &str =
    "\n[[permit]]\nfrom = \"front\"\nto = \"peer.samples\"\nkind = \"stream\"\nring-kib = 64\nmax-record = 4096\n";

fn start(permits: &str) -> Daemon {
    let d =
        Daemon::start(&format!("{}{}{permits}", echo_worker("front", "front", ""), echo_worker("peer", "peer", "")));
    d.wait_running("front");
    d.wait_running("peer");
    d
}

/// Waits until `peer`'s stream statistics satisfy `pred`; returns them.
fn wait_stats(d: &Daemon, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, s) = d.call("peer", "stream_stats", "");
        assert!(ok, "{s}");
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "peer's streams: {s}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_permitted_encrypted_stream_carries_every_record_in_order() {
    let d = start(PERMIT);
    let (ok, out) = d.call("front", "stream_to", "peer samples 5000 1000");
    assert_eq!((ok, out.as_str()), (true, "sent 5000"));
    let s = wait_stats(&d, |s| s.starts_with("records 5000 "));
    // Closed by its producer: the consumer read everything, then saw the end.
    let s = if s.ends_with("ended -") { wait_stats(&d, |s| !s.ends_with("ended -")) } else { s };
    assert_eq!(s, "records 5000 bad 0 ended the stream is closed");
    let permits = d.airlock(&["permits", "--config", &d.dir.join("airlock.toml").display().to_string()]);
    let table = String::from_utf8_lossy(&permits.stdout);
    assert!(table.contains("stream") && table.contains("ring 64 KiB, records <= 4096 B, encrypted"), "{table}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("stream opened"), "{log}");
}

#[test]
fn a_plaintext_stream_is_said_so_and_works() {
    let d = start(&format!("{PERMIT}plaintext = true\n"));
    let (ok, out) = d.call("front", "stream_to", "peer samples 5000 4096 keep");
    assert_eq!((ok, out.as_str()), (true, "sent 5000"));
    wait_stats(&d, |s| s.starts_with("records 5000 bad 0"));
    let st = d.status();
    assert_eq!(st.streams.len(), 1, "{:?}", st.streams);
    let s = &st.streams[0];
    assert_eq!(
        (s.producer.as_str(), s.consumer.as_str(), s.to.as_str(), s.encrypted),
        ("front", "peer", "peer.samples", false)
    );
    let text = String::from_utf8_lossy(&d.airlock(&["status"]).stdout).into_owned();
    assert!(text.contains("front -> peer (peer.samples): ring 64 KiB, records <= 4096 B, PLAINTEXT"), "{text}");
    d.stop();
}

#[test]
fn a_stream_the_permit_table_does_not_list_is_refused_as_a_violation() {
    let d = start(PERMIT);
    let (ok, out) = d.call("front", "stream_to", "peer other 1 64");
    assert!(!ok && out.contains("not permitted: front may not stream peer.other"), "{out}");
    let (ok, out) = d.call("front", "stream_to", "nobody samples 1 64");
    assert!(!ok && out.contains("not permitted"), "{out}");
    assert_eq!(d.worker("front").violations, 2);
    assert!(d.status().streams.is_empty());
    // Records larger than the permit's maximum are refused at the producer.
    let (ok, out) = d.call("front", "stream_to", "peer samples 1 5000");
    assert_eq!((ok, out.as_str()), (true, "failed after 0: record of 5000 bytes exceeds the stream's 4096-byte limit"));
    d.stop();
}

#[test]
fn the_death_of_either_end_revokes_the_stream_for_the_other() {
    // The consumer dies: the producer's held end answers `revoked`, nobody else is harmed.
    let d = start(PERMIT);
    assert_eq!(d.call("front", "stream_to", "peer samples 10 64 keep"), (true, "sent 10".into()));
    let front = d.pid_of("front");
    kill9_pid(d.pid_of("peer"));
    d.wait_for("peer", "a restart", |w| w.restarts == 1 && w.pid.is_some());
    assert_eq!(d.call("front", "stream_send_held", ""), (true, "the stream was revoked by the supervisor".into()));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.pid_of("front"), front, "the producer let go of it in time and was not killed");
    assert!(d.status().streams.is_empty(), "{:?}", d.status().streams);
    d.stop();

    // The producer dies: the consumer's reader ends with `revoked`.
    let d = start(PERMIT);
    assert_eq!(d.call("front", "stream_to", "peer samples 10 64 keep"), (true, "sent 10".into()));
    wait_stats(&d, |s| s.starts_with("records 10 "));
    let peer = d.pid_of("peer");
    kill9_pid(d.pid_of("front"));
    let s = wait_stats(&d, |s| !s.ends_with("ended -"));
    assert_eq!(s, "records 10 bad 0 ended the stream was revoked by the supervisor");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.pid_of("peer"), peer, "the consumer let go of it in time");
    d.stop();
}

#[test]
fn the_operator_revokes_a_stream_and_well_behaved_ends_let_go() {
    let d = start(PERMIT);
    assert_eq!(d.call("front", "stream_to", "peer samples 10 64 keep"), (true, "sent 10".into()));
    let id = d.status().streams[0].stream;
    let out = d.airlock(&["revoke-stream", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.status().streams[0].revoked.as_deref() == Some("revoked by the operator"));
    assert_eq!(d.call("front", "stream_send_held", ""), (true, "the stream was revoked by the supervisor".into()));
    wait_stats(&d, |s| s.ends_with("ended the stream was revoked by the supervisor"));
    let (front, peer) = (d.pid_of("front"), d.pid_of("peer"));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!((d.pid_of("front"), d.pid_of("peer")), (front, peer));
    assert!(d.status().streams.is_empty());
    let out = d.airlock(&["revoke-stream", "999"]);
    assert!(!out.status.success());
    d.stop();
}

fn hostile(attack: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nargs = [\"{attack}\", \"peer\", \"samples\"]\nservices = [\"hostile\"]\n[worker.restart]\npolicy = \"never\"\n\n[[permit]]\nfrom = \"hostile\"\nto = \"peer.samples\"\nkind = \"stream\"\n"
    )
}

#[test]
fn an_end_that_keeps_a_revoked_stream_is_killed() {
    let d = Daemon::start(&format!("{}{}", echo_worker("peer", "peer", ""), hostile("stream-hold")));
    d.wait_running("peer");
    d.wait_log("stream 1 held");
    let pid = d.pid_of("hostile");
    let out = d.airlock(&["revoke-stream", "1"]);
    assert!(out.status.success());
    // Where airlockd may not read the worker's maps (Docker's profile: no CAP_SYS_PTRACE, no
    // user namespace) it takes the worker's StreamReleased, which this one's library sends:
    // the limit of that mode, documented. Elsewhere /proc shows the area held, and it dies.
    if std::fs::read_to_string(format!("/proc/{pid}/maps")).is_err() {
        std::thread::sleep(Duration::from_millis(3000));
        assert_eq!(d.pid_of("hostile"), pid, "its word was taken");
        println!("the worker's maps are unreadable here: its StreamReleased was believed");
        d.stop();
        return;
    }
    let w = d.wait_for("hostile", "its death", |w| w.last_exit.is_some());
    assert_eq!(w.last_exit.as_deref(), Some("killed by signal 9 (SIGKILL)"));
    let log = d.log_text();
    assert!(
        log.contains("still holds revoked stream 1 (peer.samples) 2000 ms after revocation; killing the worker"),
        "{log}"
    );
    // The consumer let go in time and lives on.
    assert_eq!(d.call("peer", "echo", "alive"), (true, "alive".into()));
    assert_eq!(d.worker("peer").restarts, 0);
    d.stop();
}

#[test]
fn a_producer_writing_garbage_poisons_only_the_consumers_end() {
    let d = Daemon::start(&format!("{}{}", echo_worker("peer", "peer", ""), hostile("stream-garbage")));
    d.wait_running("peer");
    let s = wait_stats(&d, |s| !s.ends_with("ended -"));
    assert!(s.starts_with("records 0 bad 0 ended stream is poisoned: "), "{s}");
    // airlockd never read the ring; the consumer and the hostile worker run on.
    assert_eq!(d.call("peer", "echo", "alive"), (true, "alive".into()));
    assert_eq!(d.worker("peer").restarts, 0);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn a_producer_has_one_stream_per_name_and_at_most_sixteen() {
    let d =
        start("\n[[permit]]\nfrom = \"front\"\nto = \"peer.*\"\nkind = \"stream\"\nring-kib = 4\nmax-record = 1024\n");
    // The same name again replaces the stream: the first is revoked.
    assert_eq!(d.call("front", "stream_to", "peer a 1 64 keep"), (true, "sent 1".into()));
    assert_eq!(d.call("front", "stream_to", "peer a 1 64 keep"), (true, "sent 1".into()));
    let st = d.status().streams;
    assert_eq!(st.len(), 2, "{st:?}");
    assert_eq!(st[0].revoked.as_deref(), Some("replaced by a new stream of the same name"));
    assert_eq!(st[1].revoked, None);
    for k in 0..14 {
        assert_eq!(d.call("front", "stream_to", &format!("peer n{k} 1 64")), (true, "sent 1".into()));
    }
    let (ok, out) = d.call("front", "stream_to", "peer one-too-many 1 64");
    assert!(!ok && out.contains("busy: front has 16 streams or call regions (at most 16"), "{out}");
    // A name airlockd would have to log or print is refused.
    let (ok, out) = d.call("front", "stream_to", "peer bad\u{1b}name 1 64");
    assert!(!ok && out.contains("1 to 64 ASCII letters"), "{out}");
    assert_eq!(d.worker("front").violations, 1, "the bad name counts; the busy one does not");
    d.stop();
}
