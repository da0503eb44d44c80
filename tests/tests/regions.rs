//! Calls answered in place in a shared region: airlockd sets the region up under a `shm-call`
//! permit, revokes it when an end dies or the operator asks, and enforces the release from
//! outside. `front` calls, `peer` (service `peer`) answers each request with its bytes plus one
//! on a thread of its own (`airlock-worker-echo`'s `region_call` and `region_stats`); the
//! hostile worker plays a caller or a callee that breaks the rules.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PERMIT: &str = "\n[[permit]]\nfrom = \"front\"\nto = \"peer.calc\"\nkind = \"shm-call\"\nregion-kib = 64\n";

fn start(permits: &str) -> Daemon {
    let d =
        Daemon::start(&format!("{}{}{permits}", echo_worker("front", "front", ""), echo_worker("peer", "peer", "")));
    d.wait_running("front");
    d.wait_running("peer");
    d
}

/// Waits until `worker`'s region statistics satisfy `pred`; returns them.
fn wait_stats(d: &Daemon, worker: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, s) = d.call(worker, "region_stats", "");
        assert!(ok, "{s}");
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{worker}'s regions: {s}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_permitted_encrypted_region_answers_every_call_in_place() {
    let d = start(PERMIT);
    assert_eq!(d.call("front", "region_call", "peer calc 500 4096"), (true, "called 500".into()));
    // The caller closed it: the callee answered every call, then saw the end.
    let s = wait_stats(&d, "peer", |s| !s.ends_with("ended -"));
    assert_eq!(s, "calls 500 ended the stream is closed");
    // The largest message the region holds, and one byte more.
    assert_eq!(d.call("front", "region_call", "peer calc 3 65520"), (true, "called 3".into()));
    let (ok, out) = d.call("front", "region_call", "peer calc 1 65521");
    assert!(ok && out.starts_with("failed after 0: ") && out.contains("65521"), "{out}");
    let permits = d.airlock(&["permits", "--config", &d.dir.join("airlock.toml").display().to_string()]);
    let table = String::from_utf8_lossy(&permits.stdout);
    assert!(table.contains("shm-call") && table.contains("region 64 KiB, messages <= 65520 B, encrypted"), "{table}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("call region opened"), "{log}");
}

#[test]
fn a_plaintext_region_is_said_so_and_a_refusal_leaves_it_usable() {
    let d = start(&format!("{PERMIT}plaintext = true\n"));
    assert_eq!(d.call("front", "region_call", "peer calc 10 100 keep"), (true, "called 10".into()));
    let st = d.status();
    assert_eq!(st.streams.len(), 1, "{:?}", st.streams);
    let s = &st.streams[0];
    assert_eq!(
        (s.call_region, s.producer.as_str(), s.consumer.as_str(), s.to.as_str(), s.encrypted),
        (true, "front", "peer", "peer.calc", false)
    );
    let text = String::from_utf8_lossy(&d.airlock(&["status"]).stdout).into_owned();
    assert!(text.contains("front -> peer (peer.calc): 64 KiB, messages <= 65536 B, PLAINTEXT"), "{text}");
    assert_eq!(
        d.call("front", "region_call_held", "refuse this"),
        (true, "the callee refused the call: refused by echo".into())
    );
    assert_eq!(d.call("front", "region_call_held", "abc"), (true, "bcd".into()));
    d.stop();
}

#[test]
fn a_region_the_permit_table_does_not_list_is_refused_as_a_violation() {
    let d = start(PERMIT);
    let (ok, out) = d.call("front", "region_call", "peer other 1 64");
    assert!(!ok && out.contains("not permitted: front may not shm-call peer.other"), "{out}");
    // A stream permit does not open a region, nor the other way round.
    let (ok, out) = d.call("front", "stream_to", "peer calc 1 64");
    assert!(!ok && out.contains("not permitted: front may not stream peer.calc"), "{out}");
    let (ok, out) = d.call("peer", "region_call", "front calc 1 64");
    assert!(!ok && out.contains("not permitted"), "{out}");
    assert_eq!(d.worker("front").violations, 2);
    assert_eq!(d.worker("peer").violations, 1);
    assert!(d.status().streams.is_empty());
    d.stop();
}

#[test]
fn the_death_of_either_end_revokes_the_region_for_the_other() {
    // The callee dies: the caller's held region answers `revoked`, and the caller lives on.
    let d = start(PERMIT);
    assert_eq!(d.call("front", "region_call", "peer calc 10 64 keep"), (true, "called 10".into()));
    let front = d.pid_of("front");
    kill9_pid(d.pid_of("peer"));
    d.wait_for("peer", "a restart", |w| w.restarts == 1 && w.pid.is_some());
    assert_eq!(d.call("front", "region_call_held", "x"), (true, "the stream was revoked by the supervisor".into()));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.pid_of("front"), front, "the caller let go of it in time and was not killed");
    assert!(d.status().streams.is_empty(), "{:?}", d.status().streams);
    d.stop();

    // The caller dies: the callee's server ends with `revoked`.
    let d = start(PERMIT);
    assert_eq!(d.call("front", "region_call", "peer calc 10 64 keep"), (true, "called 10".into()));
    let peer = d.pid_of("peer");
    kill9_pid(d.pid_of("front"));
    let s = wait_stats(&d, "peer", |s| !s.ends_with("ended -"));
    assert_eq!(s, "calls 10 ended the stream was revoked by the supervisor");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.pid_of("peer"), peer, "the callee let go of it in time");
    d.stop();
}

#[test]
fn the_operator_revokes_a_region_and_well_behaved_ends_let_go() {
    let d = start(PERMIT);
    assert_eq!(d.call("front", "region_call", "peer calc 10 64 keep"), (true, "called 10".into()));
    let id = d.status().streams[0].stream;
    let out = d.airlock(&["revoke-stream", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.call("front", "region_call_held", "x"), (true, "the stream was revoked by the supervisor".into()));
    wait_stats(&d, "peer", |s| s.ends_with("ended the stream was revoked by the supervisor"));
    let (front, peer) = (d.pid_of("front"), d.pid_of("peer"));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!((d.pid_of("front"), d.pid_of("peer")), (front, peer));
    assert!(d.status().streams.is_empty());
    d.stop();
}

#[test]
fn a_callee_working_out_a_slow_answer_lets_go_of_a_revoked_region_in_time() {
    // The callee's library does not hold the region while the application computes: a
    // revocation meanwhile unmaps it at once, and the late answer is dropped.
    let d = start(PERMIT);
    assert_eq!(d.call("front", "region_call", "peer calc 1 64 keep"), (true, "called 1".into()));
    let id = d.status().streams[0].stream;
    let (front, peer) = (d.pid_of("front"), d.pid_of("peer"));
    let slow = d.call_in_background(10_000, "front", "region_call_held", "slow answer");
    std::thread::sleep(Duration::from_millis(300));
    let out = d.airlock(&["revoke-stream", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = slow.join().expect("the slow call");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "the stream was revoked by the supervisor");
    // Past the release deadline and the slow answer: both ends let go and live on.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!((d.pid_of("front"), d.pid_of("peer")), (front, peer), "{}", d.log_text());
    assert_eq!(
        wait_stats(&d, "peer", |s| !s.ends_with("ended -")),
        "calls 1 ended the stream was revoked by the supervisor"
    );
    assert!(d.status().streams.is_empty());
    d.stop();
}

fn hostile(attack: &str, permit_to: &str, from: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nargs = [\"{attack}\", \"peer\", \"calc\"]\nservices = [\"hostile\"]\n[worker.restart]\npolicy = \"never\"\n\n[[permit]]\nfrom = \"{from}\"\nto = \"{permit_to}\"\nkind = \"shm-call\"\nregion-kib = 128\n"
    )
}

#[test]
fn an_end_that_keeps_a_revoked_region_is_killed() {
    let d = Daemon::start(&format!(
        "{}{}",
        echo_worker("peer", "peer", ""),
        hostile("region-hold", "peer.calc", "hostile")
    ));
    d.wait_running("peer");
    d.wait_log("region 1 held");
    let pid = d.pid_of("hostile");
    let out = d.airlock(&["revoke-stream", "1"]);
    assert!(out.status.success());
    if std::fs::read_to_string(format!("/proc/{pid}/maps")).is_err() {
        // As for streams: where airlockd may not read the worker's maps it takes the worker's
        // StreamReleased (documented in docs/streams.md).
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
        log.contains("still holds revoked call region 1 (peer.calc) 2000 ms after revocation; killing the worker"),
        "{log}"
    );
    assert_eq!(d.call("peer", "echo", "alive"), (true, "alive".into()));
    assert_eq!(d.worker("peer").restarts, 0);
    d.stop();
}

#[test]
fn a_caller_rewriting_the_region_during_validation_harms_only_its_own_calls() {
    let d = Daemon::start(&format!(
        "{}{}",
        echo_worker("peer", "peer", ""),
        hostile("region-rewrite", "peer.calc", "hostile")
    ));
    d.wait_running("peer");
    let log = d.wait_log("region-rewrite answered");
    // Each end validated a private copy: every call was answered (the rewrites missed the
    // copies), or a rewritten request failed authentication and poisoned the callee's end, or
    // a rewritten answer failed it at the caller - never a crash, never a wrong message taken.
    let s = wait_stats(&d, "peer", |s| !s.ends_with("ended -") || s.starts_with("calls 200 "));
    let all = s.starts_with("calls 200 ") && log.contains("region-rewrite answered 200, then: -");
    let refused = s.contains("ended stream is poisoned: request ") && s.contains("failed authentication");
    // Or the scribbler hit an answer: the caller's own end refused it and closed.
    let own = s.ends_with("ended the stream is closed")
        && log.contains("then: stream is poisoned: answer ")
        && log.contains("failed authentication");
    assert!(all || refused || own, "{s}\n{log}");
    assert_eq!(d.call("peer", "echo", "alive"), (true, "alive".into()));
    assert_eq!(d.worker("peer").restarts, 0);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn a_callee_that_never_answers_or_answers_garbage_poisons_only_the_callers_region() {
    for (attack, want) in [
        ("region-callee-mute", "failed after 0: timed out"),
        ("region-callee-garbage", "failed after 0: stream is poisoned"),
    ] {
        let d = Daemon::start(&format!(
            "{}{}",
            echo_worker("front", "front", ""),
            hostile(attack, "hostile.calc", "front")
        ));
        d.wait_running("front");
        d.wait_running("hostile");
        let (ok, out) = d.call("front", "region_call", "hostile calc 1 64 keep");
        assert!(ok && out.starts_with(want), "{attack}: {out}");
        // The caller's end stays poisoned; the caller itself is unharmed.
        let (_, again) = d.call("front", "region_call_held", "x");
        assert!(again.starts_with("stream is poisoned"), "{attack}: {again}");
        assert_eq!(d.call("front", "echo", "alive"), (true, "alive".into()));
        assert_eq!(d.worker("front").restarts, 0);
        d.stop();
    }
}
