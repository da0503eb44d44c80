//! `cargo bench -p airlock-supervisor --bench spawn`: how long the supervisor takes from the
//! decision to start a worker to a verified, ready worker, against `bwrap --unshare-all
//! --die-with-parent --ro-bind / / true` measured in the same run; and the supervisor's RSS
//! with 16 idle workers. One JSON object per line, as the protocol benchmark prints.

use std::process::Command;
use std::time::Instant;

use airlock_supervisor::config;
use airlock_supervisor::spawn::{self, HostAbilities};
use airlock_worker::wire::ToWorker;

mod common;
use common::{build_binaries, emit, median, target_dir};

fn rss_kib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn stop(mut st: spawn::Started) {
    let _ = st.channel.send(&ToWorker::Shutdown);
    for _ in 0..2000 {
        if !matches!(airlock_supervisor::sys::reap(std::os::fd::AsFd::as_fd(&st.pidfd)), Ok(None)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = airlock_supervisor::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&st.pidfd), libc::SIGKILL);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var("AIRLOCK_BENCH_QUICK").is_ok();
    let iters = if quick { 10 } else { 40 };
    let dir = target_dir();
    build_binaries(&["airlock-worker"]);
    let mut workers = String::new();
    for i in 0..16 {
        workers.push_str(&format!(
            "[[worker]]\nname = \"echo{i}\"\nexecutable = \"airlock-worker-echo\"\npolicy = \"echo\"\nuid = \"dynamic\"\nservices = [\"echo{i}\"]\n"
        ));
    }
    // The embedded default's confinement (privileged layers best-effort), 16 echo workers.
    let defaults = config::EMBEDDED_DEFAULT.split("[[worker]]").next().unwrap_or_default();
    let text = format!("{defaults}\n{workers}")
        .replace("[supervisor]\n", &format!("[supervisor]\nworker-directory = \"{}\"\n", dir.display()));
    let cfg = config::parse(&text, "bench", &airlock_supervisor::known_policies()).expect("bench config");
    let host = HostAbilities::probe();

    let mut times = Vec::new();
    let mut report = String::new();
    for _ in 0..iters + 2 {
        let t = Instant::now();
        let st = spawn::spawn(&cfg, 0, &host).expect("spawn");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if report.is_empty() {
            report = st
                .report
                .layers
                .iter()
                .filter(|(_, s)| *s != airlock_worker::LayerState::Applied)
                .map(|(l, s)| format!("{l}: {s}"))
                .collect::<Vec<_>>()
                .join("; ");
        }
        stop(st);
    }
    let airlock = median(times[2..].to_vec());

    let mut times = Vec::new();
    let mut bwrap_ok = true;
    for _ in 0..iters + 2 {
        let t = Instant::now();
        match Command::new("bwrap").args(["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"]).status()
        {
            Ok(s) if s.success() => times.push(t.elapsed().as_secs_f64() * 1e3),
            _ => {
                bwrap_ok = false;
                break;
            }
        }
    }
    if bwrap_ok {
        let note =
            if report.is_empty() { "all layers applied".to_string() } else { format!("not applied here: {report}") };
        emit("spawn_verified", airlock, median(times[2..].to_vec()), "ms", true, &note);
    } else {
        println!(
            "{}",
            serde_json::json!({"scenario": "spawn_verified", "airlock": airlock, "unit": "ms", "error": "bwrap is missing or cannot create namespaces here: no baseline"})
        );
    }

    // Warm up once (policy compilation, first allocations), then measure 16 more.
    stop(spawn::spawn(&cfg, 0, &host).expect("spawn"));
    let before = rss_kib();
    let mut live = Vec::new();
    for i in 0..16 {
        live.push(spawn::spawn(&cfg, i, &host).expect("spawn"));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = rss_kib();
    emit(
        "rss_16_idle_workers",
        after,
        before,
        "KiB",
        true,
        &format!(
            "supervisor (this process) RSS with 16 verified idle workers vs after one warm-up spawn: {:.0} KiB per worker",
            (after - before) / 16.0
        ),
    );
    for st in live {
        stop(st);
    }
}
