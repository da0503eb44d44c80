//! `cargo bench -p airlock-supervisor --bench spawn`: one JSON object per line, as the protocol
//! benchmark prints, each beside a baseline measured in the same run; every scenario runs in
//! `rounds` rounds (`AIRLOCK_BENCH_ROUNDS`, 5; 1 with `AIRLOCK_BENCH_QUICK`), and its line gives
//! the median of the rounds' ratios and their range.
//!
//! - `spawn_verified`: median time from the decision to start a worker to a verified, ready
//!   worker (`spawn::spawn`, what airlockd runs), versus `bwrap --unshare-all
//!   --die-with-parent --ro-bind / / true`.
//! - `airlockd_rss_16_idle_workers`, `airlockd_peak_rss_16_idle_workers`: `VmRSS` and `VmHWM`
//!   of a real `airlockd` (the release binary next to this bench) once its 16 idle echo workers
//!   are all running, versus the same airlockd running one echo worker (a configuration
//!   needs at least one); `per_worker_kib` is the increment per added worker.
//! - `workers_rss_16_idle`: the 16 workers' summed `VmRSS`, versus 16 idle bwrap sandboxes
//!   (the `spawn_verified` peer running `sleep` instead of `true`), every process of each.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_protocol::wire::ToWorker;
use airlock_supervisor::config;
use airlock_supervisor::runtime::{Status, WorkerState};
use airlock_supervisor::spawn::{self, HostAbilities};

mod common;
use common::{build_binaries, emit, emit_with, locate_binaries, median};

/// Idle workers in the RSS scenarios, and in their baseline (a configuration needs one).
const IDLE_WORKERS: usize = 16;
const BASELINE_WORKERS: usize = 1;

/// The embedded default's `[supervisor]` and `[defaults]` (privileged layers best-effort) with
/// `workers` echo workers under their own uids; with `dir`, airlockd's state and runtime
/// directories under it.
fn bench_config(bins: &Path, workers: usize, dir: Option<&Path>) -> String {
    let defaults = config::EMBEDDED_DEFAULT.split("[[worker]]").next().unwrap_or_default();
    let mut supervisor = format!("[supervisor]\nworker-directory = \"{}\"\n", bins.display());
    if let Some(d) = dir {
        supervisor
            .push_str(&format!("state-directory = \"{d}/state\"\nruntime-directory = \"{d}/run\"\n", d = d.display()));
    }
    let mut text = format!("{}\n", defaults.replace("[supervisor]\n", &supervisor));
    for i in 0..workers {
        text.push_str(&format!(
            "[[worker]]\nname = \"echo{i}\"\nexecutable = \"airlock-worker-echo\"\npolicy = \"echo\"\nuid = \"dynamic\"\nservices = [\"echo{i}\"]\n"
        ));
    }
    text
}

fn stop(mut st: spawn::Started) {
    let _ = st.channel.send(&ToWorker::Shutdown);
    for _ in 0..2000 {
        if !matches!(airlock_supervisor::sys::reap(st.pidfd.as_fd()), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = airlock_supervisor::sys::pidfd_send_signal(st.pidfd.as_fd(), libc::SIGKILL);
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB; `None` once `pid` is gone.
fn status_kib(pid: i32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?.split_whitespace().next()?.parse().ok()
}

/// `roots` and all their descendants (found through every process's `PPid`).
fn with_descendants(roots: &[i32]) -> Vec<i32> {
    let mut parents: HashMap<i32, i32> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(st) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        if let Some(ppid) = st.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok()) {
            parents.insert(pid, ppid);
        }
    }
    let mut all = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        let children: Vec<i32> =
            parents.iter().filter(|(c, p)| **p == parent && !all.contains(c)).map(|(c, _)| *c).collect();
        all.extend(children);
        i += 1;
    }
    all
}

/// The summed `VmRSS` of `roots` and their descendants in KiB (shared pages count in each
/// process), and how many processes that is.
fn tree_rss_kib(roots: &[i32]) -> (f64, usize) {
    let pids = with_descendants(roots);
    (pids.iter().filter_map(|p| status_kib(*p, "VmRSS")).sum(), pids.len())
}

/// A real `airlockd` on a bench configuration; SIGTERMed (then killed) and its directory
/// removed when dropped.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    /// Starts `bins/airlockd` with `workers` idle echo workers.
    fn start(bins: &Path, workers: usize) -> Daemon {
        // On the target's file system, as the broker bench; 0755: root's airlockd reads its configuration here.
        let dir = bins.join(format!("airlock-bench-spawn-{}-{workers}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.join("airlock.toml"), bench_config(bins, workers, Some(&dir))).expect("config");
        let child = Command::new(bins.join("airlockd"))
            .arg("--config")
            .arg(dir.join("airlock.toml"))
            .env("AIRLOCK_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("airlockd.log")).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bins.join("airlockd").display()));
        Daemon { child, dir }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("airlockd.log")).unwrap_or_default()
    }

    /// `status` through the control socket; `None` while airlockd does not answer yet.
    fn status(&self) -> Option<Status> {
        common::hmi::status(&self.dir.join("run/control.sock"))
    }

    /// Waits until all `workers` are running (verified and ready); returns their pids.
    fn wait_running(&mut self, workers: usize) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("airlockd exited ({exit}) before its workers ran; log:\n{}", self.log());
            }
            if let Some(st) = self.status() {
                assert_eq!(st.pid, self.child.id(), "the control socket answers for another airlockd");
                if let Some(w) = st.workers.iter().find(|w| matches!(w.state, WorkerState::Failed(_))) {
                    panic!("worker {} failed: {:?} ({:?}); log:\n{}", w.name, w.state, w.last_exit, self.log());
                }
                let pids: Vec<i32> =
                    st.workers.iter().filter(|w| w.state == WorkerState::Running).filter_map(|w| w.pid).collect();
                if st.workers.len() == workers && pids.len() == workers {
                    return pids;
                }
                last = Some(st);
            }
            assert!(
                Instant::now() < deadline,
                "airlockd: {workers} workers not running within 60 s; last status {last:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pidfd) = airlock_supervisor::sys::pidfd_open(self.pid()) {
            let _ = airlock_supervisor::sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Memory of one airlockd run, in KiB, once its workers are all running and idle.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// airlockd's own `VmRSS` and `VmHWM`.
    rss: f64,
    hwm: f64,
    /// The workers' summed `VmRSS` (with any descendants).
    workers_rss: f64,
}

fn measure_airlockd(bins: &Path, workers: usize) -> Memory {
    let mut d = Daemon::start(bins, workers);
    let pids = d.wait_running(workers);
    // Let the last worker's start settle (channel buffers, log lines) before reading.
    std::thread::sleep(Duration::from_millis(500));
    let read = |key| status_kib(d.pid(), key).unwrap_or_else(|| panic!("airlockd's {key}; log:\n{}", d.log()));
    let m = Memory { rss: read("VmRSS"), hwm: read("VmHWM"), workers_rss: tree_rss_kib(&pids).0 };
    assert_eq!(d.wait_running(workers).len(), workers, "a worker stopped while measured");
    m
}

/// Idle bwrap sandboxes, killed when dropped.
struct Sandboxes(Vec<Child>);

impl Drop for Sandboxes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The summed `VmRSS` (KiB) of `n` idle `bwrap --unshare-all --die-with-parent --ro-bind / /
/// sleep infinity` sandboxes, every process of each, and how many processes that is; `None`
/// when bwrap cannot run here.
fn bwrap_idle_rss_kib(n: usize) -> Option<(f64, usize)> {
    let mut boxes = Sandboxes(Vec::new());
    for _ in 0..n {
        let c = Command::new("bwrap")
            .args(["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        boxes.0.push(c);
    }
    let roots: Vec<i32> = boxes.0.iter().map(|c| c.id() as i32).collect();
    // Ready once every sandbox runs its `sleep`.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if boxes.0.iter_mut().any(|c| !matches!(c.try_wait(), Ok(None))) {
            return None;
        }
        let sleeping = with_descendants(&roots)
            .iter()
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep"))
            .count();
        if sleeping == n {
            break;
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    Some(tree_rss_kib(&roots))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var("AIRLOCK_BENCH_QUICK").is_ok();
    let iters = if quick { 10 } else { 40 };
    // airlockd and the workers it starts must come from the same build, next to each other.
    build_binaries(&["airlock-test-workers", "airlock-supervisor"]);
    let bins = locate_binaries(&["airlockd", "airlock-worker-echo"]);
    let text = bench_config(&bins, 1, None);
    let cfg = config::parse(&text, "bench", &airlock_supervisor::known_policies()).expect("bench config");
    let host = HostAbilities::probe();

    for _ in 0..common::rounds() {
        run_round(&bins, &cfg, &host, iters, quick);
    }
    common::print_rows();
}

/// One round of every scenario.
fn run_round(bins: &Path, cfg: &config::Config, host: &HostAbilities, iters: usize, quick: bool) {
    let mut times = Vec::new();
    let mut report = String::new();
    for _ in 0..iters + 2 {
        let t = Instant::now();
        let st = spawn::spawn(cfg, 0, host).expect("spawn");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if report.is_empty() {
            report = st
                .report
                .layers
                .iter()
                .filter(|(_, s)| *s != airlock_protocol::confinement::LayerState::Applied)
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

    // airlockd's memory with 16 idle workers against the same airlockd with one, alternating so
    // that both see the same machine; the median of `reps` starts each.
    let reps = if quick { 1 } else { 3 };
    let (mut idle, mut base) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        base.push(measure_airlockd(bins, BASELINE_WORKERS));
        idle.push(measure_airlockd(bins, IDLE_WORKERS));
    }
    let med = |v: &[Memory], f: fn(&Memory) -> f64| median(v.iter().map(f).collect());
    let added = (IDLE_WORKERS - BASELINE_WORKERS) as f64;
    let runs = if reps == 1 { "one start each".to_string() } else { format!("median of {reps} starts each") };
    let figures = [
        ("airlockd_rss_16_idle_workers", "VmRSS", med(&idle, |m| m.rss), med(&base, |m| m.rss)),
        ("airlockd_peak_rss_16_idle_workers", "VmHWM", med(&idle, |m| m.hwm), med(&base, |m| m.hwm)),
    ];
    for (scenario, field, airlock, baseline) in figures {
        let per_worker = (airlock - baseline) / added;
        let mut extra = serde_json::Map::new();
        extra.insert("per_worker_kib".into(), ((per_worker * 10.0).round() / 10.0).into());
        emit_with(
            scenario,
            airlock,
            baseline,
            "KiB",
            true,
            &format!(
                "{field} of airlockd ({}) once its {IDLE_WORKERS} idle echo workers run, versus the same airlockd \
                 with {BASELINE_WORKERS}; {per_worker:.0} KiB per added worker; {runs}",
                bins.join("airlockd").display()
            ),
            extra,
        );
    }

    let workers = med(&idle, |m| m.workers_rss);
    match bwrap_idle_rss_kib(IDLE_WORKERS) {
        Some((peer, processes)) => {
            let mut extra = serde_json::Map::new();
            extra.insert("per_worker_kib".into(), ((workers / IDLE_WORKERS as f64 * 10.0).round() / 10.0).into());
            extra
                .insert("baseline_per_sandbox_kib".into(), ((peer / IDLE_WORKERS as f64 * 10.0).round() / 10.0).into());
            emit_with(
                "workers_rss_16_idle",
                workers,
                peer,
                "KiB",
                true,
                &format!(
                    "summed VmRSS of airlockd's {IDLE_WORKERS} idle echo workers versus {IDLE_WORKERS} idle \
                     `bwrap --unshare-all --die-with-parent --ro-bind / / sleep infinity` ({processes} processes); \
                     shared pages count in each process"
                ),
                extra,
            );
        }
        None => println!(
            "{}",
            serde_json::json!({"scenario": "workers_rss_16_idle", "airlock": workers, "unit": "KiB", "error": "bwrap is missing or cannot create namespaces here: no baseline"})
        ),
    }
}
