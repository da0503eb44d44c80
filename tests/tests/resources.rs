//! Resource isolation per worker: a cgroup of its own (memory with swap, pids, CPU weight and
//! ceiling) where the host gives airlockd cgroups, and everywhere a priority and an OOM score
//! set before exec; `airlock status` states which bounds hold each worker.
//!
//! Whether this lane has cgroups is decided here from the host (root and writable v1
//! controllers, or a delegated v2 subtree), not from what airlockd reports, so a supervisor
//! that stopped applying them fails on the lanes that have them.

mod common;

use std::path::{Path, PathBuf};

use airlock_protocol::confinement::Layer;
use airlock_protocol::control::{LayerWord, WorkerState, WorkerStatus};
use airlock_supervisor::cgroup::{choose_layout, parse_mountinfo, parse_proc_cgroup, Layout};
use common::*;

/// The cgroup layout this host gives airlockd, if any (see the module comment).
fn expected_layout() -> Option<Layout> {
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
    let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").ok()?);
    let v2 = mounts.iter().find(|m| m.fstype == "cgroup2").and_then(|m| {
        let o = own.iter().find(|o| o.hierarchy == 0)?;
        std::fs::read_to_string(airlock_supervisor::cgroup::cgroup_dir(m, &o.path)?.join("cgroup.controllers")).ok()
    });
    match choose_layout(&mounts, &own, v2.as_deref()).ok()? {
        l @ Layout::V1 { .. } if is_root() => Some(l),
        Layout::V2 { base } if std::fs::OpenOptions::new().write(true).open(base.join("cgroup.procs")).is_ok() => {
            Some(Layout::V2 { base })
        }
        _ => None,
    }
}

/// The directory of `pid`'s cgroup holding `file` (v1: in the hierarchy of that controller).
fn cgroup_dir(pid: i32, controller: &str) -> PathBuf {
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"));
    let own = parse_proc_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup"));
    let v1 = mounts.iter().find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller));
    let (mount, path) = match v1 {
        Some(m) => {
            (m, own.iter().find(|o| o.controllers.iter().any(|c| c == controller)).expect("member").path.clone())
        }
        None => (
            mounts.iter().find(|m| m.fstype == "cgroup2").expect("cgroup2"),
            own.iter().find(|o| o.hierarchy == 0).expect("v2 member").path.clone(),
        ),
    };
    airlock_supervisor::cgroup::cgroup_dir(mount, &path).expect("visible")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
}

/// Field `n` (1-based, as proc(5) counts) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    rest.split_whitespace().nth(n - 3).and_then(|v| v.parse().ok()).expect("field")
}

fn layer(w: &WorkerStatus, l: Layer) -> LayerWord {
    w.state(l).unwrap_or_else(|| panic!("{} reports no {l} layer: {w:?}", w.name))
}

#[test]
fn a_worker_gets_its_cgroup_limits_and_priority_and_the_cgroup_is_removed_after() {
    let limits = "[worker.limits]\nmemory-mib = 96\npids = 40\ncpu-weight = 50\ncpu-max-percent = 150\nnice = 7\nsched-idle = true\noom-score-adj = 800\n";
    let d = Daemon::start(&echo_worker("peer", "peer", limits));
    let w = d.wait_running("peer");
    let pid = w.pid.expect("pid");
    // The priority layer on every lane, read from outside.
    assert_eq!(layer(&w, Layer::Priority), LayerWord::Applied, "{w:?}");
    assert_eq!(stat_field(pid, 19), 7, "nice");
    assert_eq!(stat_field(pid, 41), i64::from(libc::SCHED_IDLE), "policy");
    assert_eq!(read(Path::new(&format!("/proc/{pid}/oom_score_adj"))), "800");
    assert!(
        w.bounds
            .iter()
            .any(|b| b == "priority: nice 7, SCHED_IDLE, oom_score_adj 800 (chosen by the OOM killer before airlockd)"),
        "{:?}",
        w.bounds
    );
    let Some(layout) = expected_layout() else {
        assert_eq!(layer(&w, Layer::Cgroup), LayerWord::Unavailable, "{w:?}");
        let why =
            w.confinement.iter().find(|l| l.layer == Layer::Cgroup).and_then(|l| l.why.clone()).unwrap_or_default();
        assert!(!why.is_empty(), "an unavailable cgroup says why");
        assert!(w.bounds[0].starts_with(&format!("memory: no cgroup ({why})")), "{:?}", w.bounds);
        println!("no cgroups on this lane ({why}); bounds: {:?}", w.bounds);
        d.stop();
        return;
    };
    assert_eq!(layer(&w, Layer::Cgroup), LayerWord::Applied, "{w:?}");
    let mem = cgroup_dir(pid, "memory");
    assert!(mem.ends_with(format!("airlock.{}/peer", d.pid())), "{}", mem.display());
    match layout {
        Layout::V1 { .. } => {
            assert_eq!(read(&mem.join("memory.limit_in_bytes")), (96u64 << 20).to_string());
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(read(&mem.join("memory.memsw.limit_in_bytes")), (96u64 << 20).to_string());
            }
            assert_eq!(read(&cgroup_dir(pid, "pids").join("pids.max")), "40");
            let cpu = cgroup_dir(pid, "cpu");
            assert_eq!(read(&cpu.join("cpu.shares")), "512");
            assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "150000");
        }
        Layout::V2 { .. } => {
            assert_eq!(read(&mem.join("memory.max")), (96u64 << 20).to_string());
            assert_eq!(read(&mem.join("memory.swap.max")), "0");
            assert_eq!(read(&mem.join("pids.max")), "40");
            assert_eq!(read(&mem.join("cpu.weight")), "50");
            assert_eq!(read(&mem.join("cpu.max")), "150000 100000");
        }
    }
    assert!(w.bounds[0].starts_with("memory: cgroup v"), "{:?}", w.bounds);
    // A restart gets a fresh cgroup; a stop removes them all.
    kill9_pid(pid);
    let again = d.wait_for("peer", "a restart", |w| w.pid.is_some_and(|p| p != pid) && w.restarts == 1);
    let pid2 = again.pid.expect("pid");
    assert_eq!(cgroup_dir(pid2, "memory"), mem);
    let instance = mem.parent().expect("instance").to_path_buf();
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert!(!instance.exists(), "{} left behind", instance.display());
}

#[test]
fn a_memory_hog_is_killed_alone_by_its_limit_or_held_to_the_stated_ceiling() {
    let hog = "\n[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nargs = [\"memhog\", \"4\", \"512\"]\nservices = [\"hostile\"]\n[worker.rlimits]\nnofile = 32\nnproc = 512\naddress-space-mib = 256\nfile-size-mib = 4\n[worker.limits]\nmemory-mib = 64\n[worker.restart]\npolicy = \"never\"\n";
    let d = Daemon::start(&format!("{}{hog}", echo_worker("peer", "peer", "")));
    let peer = d.pid_of("peer");
    if expected_layout().is_some() {
        let w = d.wait_for("hostile", "its death", |w| w.last_exit.is_some());
        assert_eq!(
            w.last_exit.as_deref(),
            Some("killed by its memory limit (64 MiB): the kernel's OOM killer in its own cgroup"),
            "{w:?}"
        );
        assert!(w.bounds[0].starts_with("memory: cgroup v") && w.bounds[0].contains("limit 64 MiB"), "{:?}", w.bounds);
    } else {
        // No cgroup: the rlimits bound it, as `airlock status` states.
        let line = d.wait_log("memhog memfds");
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |k: &str| -> u64 {
            words
                .iter()
                .position(|w| w.ends_with(k))
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse().ok())
                .expect(k)
        };
        let (memfds, heap) = (after("memfds"), after("heap"));
        assert!(memfds > 0 && memfds <= 32 * 4, "memfds {memfds} MiB beyond the stated ceiling: {line}");
        assert!(heap < 256, "heap {heap} MiB beyond the address space: {line}");
        let w = d.worker("hostile");
        assert!(w.pid.is_some(), "it holds what it took and still runs: {w:?}");
        assert!(
            w.bounds
                .iter()
                .any(|b| b
                    .contains("mappings ≤ address space 256 MiB, unmapped memfds ≤ 32 descriptors × 4 MiB = 128 MiB")),
            "{:?}",
            w.bounds
        );
        println!("no cgroup: the hog held {memfds} MiB in memfds and {heap} MiB of heap");
    }
    // The other worker never noticed.
    assert_eq!(d.call("peer", "echo", "alive"), (true, "alive".to_string()));
    assert_eq!(d.pid_of("peer"), peer);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn cgroups_left_by_a_killed_airlockd_are_removed_at_the_next_start() {
    if expected_layout().is_none() {
        println!("no cgroups on this lane: nothing can be left behind");
        return;
    }
    let d = Daemon::start(&echo_worker("peer", "peer", ""));
    let pid = d.pid_of("peer");
    let instance = cgroup_dir(pid, "memory").parent().expect("instance").to_path_buf();
    assert!(instance.ends_with(format!("airlock.{}", d.pid())), "{}", instance.display());
    let (dir, _) = d.kill9();
    // Its workers die with it (parent-death signal); their cgroups stay.
    for _ in 0..200 {
        if !process_exists(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(instance.exists(), "{} should outlive a kill -9", instance.display());
    let d = Daemon::restart(dir, "airlockd-2.log");
    d.wait_running("peer");
    assert!(!instance.exists(), "{} was not removed", instance.display());
    assert!(d.log_text().contains("removed a stale worker cgroup"), "{}", d.log_text());
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn a_niced_airlockd_gives_its_workers_the_planned_nice_value_or_says_why_not() {
    // airlockd started at nice 5 (a unit's `Nice=`, or `nice airlockd`): its children inherit 5,
    // which no plan asked for. Where airlockd may lower it (root on the host), the worker runs
    // at the planned 0; elsewhere the priority layer fails naming setpriority, not as a
    // confinement verification the worker seemed to fail (what it was).
    let d = Daemon::start_niced(&echo_worker("peer", "peer", ""), 5);
    let w = d.wait_for("peer", "running or failed", |w| {
        w.state == WorkerState::Running || matches!(w.state, WorkerState::Failed(_)) || w.last_exit.is_some()
    });
    match (&w.state, w.pid) {
        (WorkerState::Running, Some(pid)) => {
            assert_eq!(stat_field(pid, 19), 0, "the planned nice value, not airlockd's");
            assert_eq!(stat_field(d.pid(), 19), 5, "airlockd itself runs niced");
        }
        _ => {
            let text = format!("{w:?}\n{}", d.log_text());
            // Root on the host (the lane that can read filters) may lower a child's nice value.
            assert!(!can_read_filters(), "a privileged airlockd failed to: {text}");
            assert!(text.contains("setpriority(nice 0)") && !text.contains("nice is Some(5)"), "{text}");
        }
    }
    d.stop();
}
