//! Escape tests: a probe worker enters the real sandbox (policy `probe`) and tries one thing.
//! Each test asserts the exact outcome for this lane, derived from the confinement report the
//! supervisor printed, and that neither the supervisor nor the other worker was affected.

mod common;

use airlock_protocol::confinement::Layer;
use airlock_protocol::control::{LayerWord, WorkerState, WorkerStatus};
use common::*;

struct Outcome {
    /// The probe's own report (`outcome ATTEMPT RESULT`), when it survived.
    event: Option<String>,
    /// How the probe ended, when seccomp killed it.
    exit: Option<String>,
    probe: WorkerStatus,
}

fn probe(attempt: &str, arg: Option<&str>) -> Outcome {
    let args = match arg {
        Some(a) => format!("args = [\"{attempt}\", \"{a}\"]"),
        None => format!("args = [\"{attempt}\"]"),
    };
    let probe = format!(
        "\n[[worker]]\nname = \"probe\"\nexecutable = \"airlock-worker-probe\"\npolicy = \"probe\"\n{args}\n[worker.restart]\npolicy = \"never\"\n[worker.landlock]\nread = [\"/usr\"]\n"
    );
    let d = Daemon::start(&format!("{}{probe}", echo_worker("echo", "echo", "")));
    let echo = d.wait_running("echo");
    let echo_pid = echo.pid.expect("echo pid");
    let p = d.wait_for("probe", "outcome", |w| {
        w.state == WorkerState::Running || w.state == WorkerState::Stopped || w.last_exit.is_some()
    });
    // Either an event arrives or the probe dies.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (event, exit) = loop {
        let log = d.log_text();
        if let Some(l) = log.lines().find(|l| l.contains(&format!("event: outcome {attempt} "))) {
            // tracing prints the worker's fields after the message.
            let ev = l.split(&format!("event: outcome {attempt} ")).nth(1).unwrap_or("");
            let ev = ev.split(" worker=").next().unwrap_or("").trim().to_string();
            break (Some(ev), None);
        }
        let w = d.worker("probe");
        if let Some(e) = w.last_exit.clone() {
            break (None, Some(e));
        }
        assert!(std::time::Instant::now() < deadline, "probe {attempt} produced no outcome; log:\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(25));
    };
    println!("probe {attempt}: event={event:?} exit={exit:?} report={:?}", p.confinement);
    // Nothing else was affected: the echo worker is the same process and answers.
    let echo_after = d.worker("echo");
    assert_eq!(echo_after.pid, Some(echo_pid), "the other worker was disturbed: {echo_after:?}");
    assert_eq!(echo_after.restarts, 0);
    assert_eq!(d.call("echo", "echo", "still here"), (true, "still here".to_string()));
    let (st, log) = d.stop();
    assert!(st.success(), "the supervisor did not survive the probe: {st:?}\n{log}");
    Outcome { event, exit, probe: p }
}

fn assert_killed_for(o: &Outcome, syscall: &str) {
    let exit =
        o.exit.as_deref().unwrap_or_else(|| panic!("expected SIGSYS for {syscall}, probe reported {:?}", o.event));
    assert_sigsys_exit(exit, syscall);
}

/// The exit airlockd records for a probe its policy killed: the cause (SIGSYS, policy probe)
/// is airlockd's own; the syscall is the probe's report, labelled as such, with its number.
fn assert_sigsys_exit(exit: &str, syscall: &str) {
    let prefix = format!("killed by SIGSYS under policy probe (the worker reported: syscall {syscall} (");
    let nr = exit.strip_prefix(&prefix).and_then(|r| r.strip_suffix("))"));
    assert!(nr.is_some_and(|n| n.parse::<u32>().is_ok()), "{exit}");
}

fn layer(o: &Outcome, layer: Layer) -> bool {
    o.probe.state(layer) == Some(LayerWord::Applied)
}

#[test]
fn reading_etc_shadow_is_denied() {
    let o = probe("read-shadow", None);
    let want = if layer(&o, Layer::MountNamespace) {
        "errno ENOENT" // the minimal root holds only /usr
    } else if layer(&o, Layer::Landlock) {
        "errno EACCES"
    } else {
        panic!("neither a private root nor Landlock: nothing confines the file system here");
    };
    assert_eq!(o.event.as_deref(), Some(want));
}

#[test]
fn reading_outside_landlock_paths_is_denied() {
    let o = probe("read-outside", None);
    let want = if layer(&o, Layer::MountNamespace) { "errno ENOENT" } else { "errno EACCES" };
    assert_eq!(o.event.as_deref(), Some(want), "report {:?}", o.probe.confinement);
}

#[test]
fn execve_kills_with_sigsys() {
    assert_killed_for(&probe("execve", None), "execve");
}

/// An attempt aimed at a live target: the probe serves calls, and the call names airlockd's or
/// the echo worker's real pid. The probe must die by SIGSYS in the attempt, and airlockd and
/// echo must be the same processes afterwards.
fn attempt_on(attempt: &str, target: impl Fn(&Daemon) -> i32, syscall: &str) {
    let probe = "\n[[worker]]\nname = \"probe\"\nexecutable = \"airlock-worker-probe\"\npolicy = \"probe\"\nargs = [\"on-call\"]\nservices = [\"probe\"]\n[worker.restart]\npolicy = \"never\"\n[worker.landlock]\nread = [\"/usr\"]\n";
    let d = Daemon::start(&format!("{}{probe}", echo_worker("echo", "echo", "")));
    let echo_pid = d.wait_running("echo").pid.expect("echo pid");
    d.wait_running("probe");
    let airlockd = d.pid();
    let pid = target(&d);
    let (ok, msg) = d.call("probe", "attempt", &format!("{attempt} {pid}"));
    assert!(!ok, "the probe answered: {msg}");
    let p = d.wait_for("probe", "its end", |w| w.last_exit.is_some());
    let exit = p.last_exit.unwrap_or_default();
    assert_sigsys_exit(&exit, syscall);
    assert!(process_exists(airlockd) && process_exists(echo_pid), "a target died");
    assert_eq!(d.worker("echo").pid, Some(echo_pid));
    assert_eq!(d.worker("echo").restarts, 0);
    assert_eq!(d.call("echo", "echo", "still here"), (true, "still here".to_string()));
    let (st, log) = d.stop();
    assert!(st.success(), "the supervisor did not survive the probe: {st:?}\n{log}");
}

#[test]
fn ptrace_of_the_supervisor_kills_with_sigsys() {
    attempt_on("ptrace-supervisor", Daemon::pid, "ptrace");
}

#[test]
fn killing_another_worker_kills_with_sigsys() {
    attempt_on("kill-other", |d| d.pid_of("echo"), "kill");
}

#[test]
fn other_processes_are_invisible() {
    let o = probe("list-proc", None);
    let want = if layer(&o, Layer::MountNamespace) { "errno ENOENT" } else { "errno EACCES" };
    assert_eq!(o.event.as_deref(), Some(want), "report {:?}", o.probe.confinement);
}

#[test]
fn tcp_connection_kills_with_sigsys() {
    assert_killed_for(&probe("tcp-connect", Some("22")), "socket");
}

#[test]
fn creating_a_namespace_kills_with_sigsys() {
    assert_killed_for(&probe("unshare", None), "unshare");
}

#[test]
fn raising_a_capability_kills_with_sigsys() {
    assert_killed_for(&probe("raise-cap", None), "capset");
}

#[test]
fn a_priority_inheritance_futex_kills_with_sigsys() {
    assert_killed_for(&probe("futex-pi", None), "futex");
}

#[test]
fn fork_bomb_kills_with_sigsys_at_the_first_fork() {
    assert_killed_for(&probe("fork-bomb", None), "clone");
}

#[test]
fn exhausting_descriptors_stops_at_the_rlimit() {
    let o = probe("exhaust-fds", None);
    let ev = o.event.expect("the probe survives and reports");
    // nofile = 64 in the test defaults; stdio, channel and others use a few.
    let n: usize = ev
        .strip_prefix("errno EMFILE after ")
        .and_then(|r| r.strip_suffix(" descriptors"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected outcome {ev}"));
    assert!(n > 40 && n < 64, "{n} descriptors before EMFILE");
}

#[test]
fn exhausting_memory_stops_at_the_rlimit() {
    let o = probe("exhaust-memory", None);
    let ev = o.event.expect("the probe survives and reports");
    let mib: usize = ev
        .strip_prefix("errno ENOMEM after ")
        .and_then(|r| r.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected outcome {ev}"));
    // address-space-mib = 1024 in the test defaults.
    assert!(mib < 1024, "{mib} MiB allocated");
}
