//! The broker end to end: the permit table, calls between workers, and asynchronous messages
//! that survive worker and supervisor crashes, with exact assertions on what arrived.

mod common;

use std::time::{Duration, Instant};

use airlock_supervisor::runtime::WorkerState;
use common::*;

fn sink_worker() -> String {
    "\n[[worker]]\nname = \"sink\"\nexecutable = \"airlock-worker-sink\"\npolicy = \"sink\"\nargs = [\"@DIR@/sink.log\"]\nservices = [\"sink\"]\n[worker.landlock]\nwrite = [\"@DIR@\"]\n[worker.restart]\npolicy = \"always\"\ninitial-backoff-ms = 20\nmax-backoff-ms = 200\nmax-restarts = 50\nwindow-s = 60\n".to_string()
}

/// The sink's log as (journal id, body) pairs.
fn sink_log(d: &Daemon) -> Vec<(u64, String)> {
    std::fs::read_to_string(d.dir.join("sink.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ' ');
            let id = p.next()?.parse().ok()?;
            let _from = p.next()?;
            Some((id, p.next()?.to_string()))
        })
        .collect()
}

fn kill9_pid(pid: i32) {
    let fd = airlock_supervisor::sys::pidfd_open(pid).expect("pidfd_open");
    airlock_supervisor::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&fd), libc::SIGKILL).expect("SIGKILL");
}

/// Every body 0..n exactly once, in order, with strictly increasing journal ids.
fn assert_exactly_once_in_order(log: &[(u64, String)], n: usize) {
    assert_eq!(log.len(), n, "recorded {} messages, expected {n}", log.len());
    for (k, (id, body)) in log.iter().enumerate() {
        assert_eq!(body, &k.to_string(), "message {k} out of order or duplicated");
        if k > 0 {
            assert!(*id > log[k - 1].0, "journal ids not increasing at {k}");
        }
    }
}

fn wait_drained(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = d.status();
        let sink = st.workers.iter().find(|w| w.name == "sink").expect("sink");
        if st.journal_pending == 0 && sink.queued == 0 && sink.unacknowledged == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "journal never drained: {st:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn permit_table_allows_listed_requests_refuses_the_rest_and_kills_repeat_offenders() {
    let workers = format!(
        "{}{}\n{}",
        echo_worker("front", "front", "[worker.restart]\npolicy = \"always\"\ninitial-backoff-ms = 20"),
        echo_worker("back", "back", ""),
        "[broker]\nmax-violations = 4\n\n[[permit]]\nfrom = \"front\"\nto = \"back.sum\"\nkind = \"call\"\ngrant = \"operator\"\n\n[[permit]]\nfrom = \"front\"\nto = \"back.echo\"\nkind = \"call\"\nstate = \"operator\"\n"
    );
    let d = Daemon::start(&workers);
    d.wait_running("front");
    d.wait_running("back");
    // back.echo needs the operator state.
    let (ok, msg) = d.call("front", "relay", "back echo hi");
    assert!(!ok);
    assert!(msg.contains("not permitted: front may not call back.echo in state initial"), "{msg}");
    assert_eq!(d.worker("front").violations, 1);
    // back.sum is allowed in any state and grants operator.
    let (ok, msg) = d.call("front", "relay", "back sum x");
    assert!(ok, "{msg}");
    assert_eq!(d.worker("front").broker_state, "operator");
    assert_eq!(d.call("front", "relay", "back echo hi"), (true, "hi".to_string()));
    // Unlisted: refused, whatever the state; sends need their own permit.
    let (ok, msg) = d.call("front", "relay", "back exit 3");
    assert!(!ok && msg.contains("not permitted: front may not call back.exit"), "{msg}");
    let (ok, msg) = d.call("front", "send_many", "back echo 1 volatile");
    assert!(!ok && msg.contains("not permitted: front may not send back.echo"), "{msg}");
    // Fourth violation: the worker is killed (its call gets an error, whichever comes first),
    // restarted, and back in the initial state.
    let (ok, _) = d.call("front", "relay", "back exit 4");
    assert!(!ok);
    let w = d.wait_for("front", "restart after violations", |w| w.restarts == 1 && w.state == WorkerState::Running);
    assert_eq!(w.broker_state, "initial");
    assert_eq!(w.violations, 0);
    let log = d.log_text();
    assert_eq!(log.matches("security event: refused by the permit table").count(), 4, "{log}");
    assert!(log.contains("security event: 4 permit violations; killing the worker"), "{log}");
    // The callee was never disturbed.
    assert_eq!(d.worker("back").restarts, 0);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn permits_command_prints_the_table() {
    let dir = std::env::temp_dir().join(format!("airlock-permits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}\n[[permit]]\nfrom = \"a\"\nto = \"b.*\"\nkind = \"send\"\n[[permit]]\nfrom = \"a\"\nto = \"b.login\"\nkind = \"call\"\ngrant = \"operator\"\n",
            echo_worker("a", "a", ""),
            echo_worker("b", "b", "")
        ),
    )
    .expect("write");
    let out = std::process::Command::new(bin("airlock")).args(["permits", "--config"]).arg(&cfg).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("a ")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].contains("b.*") && rows[0].contains("send"), "{text}");
    assert!(rows[1].contains("b.login") && rows[1].contains("operator"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ten_thousand_messages_reach_a_receiver_killed_repeatedly_exactly_once_in_order() {
    let workers = format!(
        "{}{}\n[[permit]]\nfrom = \"front\"\nto = \"sink.*\"\nkind = \"send\"\n",
        echo_worker("front", "front", ""),
        sink_worker()
    );
    let d = Daemon::start(&workers);
    d.wait_running("front");
    d.wait_running("sink");
    let sock = d.socket.clone();
    let sender = std::thread::spawn(move || {
        std::process::Command::new(bin("airlock"))
            .arg("--socket")
            .arg(&sock)
            .args(["call", "--deadline-ms", "600000", "front", "send_many", "sink record 10000 volatile"])
            .output()
            .expect("airlock call")
    });
    for (k, mark) in [1000, 3000, 5000, 7000].into_iter().enumerate() {
        let kills = k as u32 + 1;
        let deadline = Instant::now() + Duration::from_secs(120);
        while sink_log(&d).len() < mark {
            assert!(Instant::now() < deadline, "stalled below {mark}: {:?}\n{}", d.status(), d.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = d.pid_of("sink");
        kill9_pid(pid);
        d.wait_for("sink", "restart", |w| w.restarts == kills && w.state == WorkerState::Running);
    }
    let out = sender.join().expect("sender");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent 10000");
    wait_drained(&d);
    assert_exactly_once_in_order(&sink_log(&d), 10_000);
    assert_eq!(d.worker("sink").restarts, 4);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn durable_messages_survive_a_supervisor_kill_and_none_arrive_twice() {
    let workers = format!(
        "{}{}\n[[permit]]\nfrom = \"front\"\nto = \"sink.*\"\nkind = \"send\"\n",
        echo_worker("front", "front", ""),
        sink_worker()
    );
    let d = Daemon::start(&workers);
    d.wait_running("front");
    d.wait_running("sink");
    let sock = d.socket.clone();
    let sender = std::thread::spawn(move || {
        std::process::Command::new(bin("airlock"))
            .arg("--socket")
            .arg(&sock)
            .args(["call", "--deadline-ms", "600000", "front", "send_many", "sink record 5000 durable"])
            .output()
            .expect("airlock call")
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink_log(&d).len() < 500 {
        assert!(Instant::now() < deadline, "stalled: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let (dir, first_log) = d.kill9();
    let out = sender.join().expect("sender");
    assert!(!out.status.success(), "the call cannot have completed: its supervisor was killed");
    // What the sender had been told was accepted (journaled and fsynced) before the kill.
    let accepted: usize = first_log
        .lines()
        .filter_map(|l| l.split("event: accepted ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(accepted >= 500, "accepted {accepted}");
    let d = Daemon::restart(dir, "airlockd-2.log");
    d.wait_running("sink");
    wait_drained(&d);
    let log = sink_log(&d);
    let n = log.len();
    assert!(n >= accepted, "only {n} of {accepted} accepted messages arrived");
    assert_exactly_once_in_order(&log, n);
    assert!(d.log_text().contains("recovered journaled messages"), "{}", d.log_text());
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}
