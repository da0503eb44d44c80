//! `cargo bench -p airlock-supervisor --bench broker`: the broker against baselines measured in
//! the same run. One JSON object per line, as the protocol benchmark prints: every scenario
//! runs in `rounds` rounds (`AIRLOCK_BENCH_ROUNDS`, 5; 1 with `AIRLOCK_BENCH_QUICK`, which also
//! shortens the HMI scenarios), and its line gives the median of the rounds' ratios and their
//! range. Every process
//! (and every baseline) is pinned to CPU 0, except in `async_durable_1k_all_cpus` and
//! `call_under_flood_64`.
//!
//! - `call_via_broker_64`: median round trip of a 64-byte call from one confined worker to
//!   another through `airlockd` (two encrypted hops each way, permit check, routing), versus a
//!   raw `SOCK_SEQPACKET` ping-pong through a relay process doing the same hops, no crypto.
//! - `call_via_broker_64_no_seccomp`, `call_via_broker_64_no_cgroup`,
//!   `call_via_broker_64_unconfined`: the same calls between the same two workers with their
//!   seccomp layer off, with their cgroup layer off, and with every layer that can be off
//!   (seccomp, cgroup, Landlock, every namespace but the user namespace) off, versus the same
//!   relay: what the confinement costs on this path. Reported; not a setting to deploy.
//! - `async_durable_1k`: durable 1 KiB messages per second (journaled, encrypted, fsynced in
//!   groups of 64), versus writing the same bytes to a file in the same directory and
//!   `fdatasync`ing every 64; `async_durable_1k_all_cpus`: the same on all CPUs.
//! - `call_under_flood_64`: `call_via_broker_64`'s median while another worker floods the
//!   broker past its journal quota, versus unloaded (target: at most 2).
//! - `call_under_durable_64`: the same while another worker streams durable messages (the
//!   journal's fsyncs must not hold up the event loop).
//! - `supervisor_cpu_under_bulk_flood`: airlockd's CPU time (all its threads, from
//!   `/proc/PID/task/*/schedstat`) while a hostile worker makes 2,000 calls, each with an
//!   encrypted 1 MiB bulk payload, that the permit table refuses, versus the same count of
//!   refused calls without a payload (target: at most 1.5; a refused payload is never
//!   decrypted or mapped).
//! - `call_under_cpu_attack_64`: `call_via_broker_64`'s median (and p99 in the note) while a
//!   hostile worker spins 64 threads, versus the same calls before the attack in the same run,
//!   unpinned; the hostile worker has the ui's limits (cpu-weight 25, nice 10) and its own cgroup
//!   where the host gives one (target: at most 2.0 with the cgroup layer applied; the note says
//!   whether it was). `call_under_cpu_attack_64_priority_only`: the same with the cgroup layer
//!   off, as on a host without cgroups: only the nice value holds the attacker back.
//! - `hmi_sample_cpu`: airlockd's CPU time per second while the default HMI polls its device
//!   every 20 ms and field's samples reach logic and the historian through streams, versus the
//!   same HMI with `stream-samples = false` (each sample journaled twice through airlockd), in
//!   the same run; per sample = per second / 50 (target: at least 5 times less).
//! - `hmi_trend_in_place`: median latency of a trend query from an HTTP client to the default
//!   HMI, the ui asking the historian in a call region shared with it (`[settings.ui]
//!   trend-in-place = true`), versus through airlockd (`false`), in the same run; reported.
//! - `supervisor_rss_under_attack`: airlockd's RSS after a CPU attack, a memory hog and a
//!   flood of refused 1 MiB bulk calls, versus its RSS at rest before them (bounded).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_protocol::sys;
use airlock_supervisor::runtime::ControlRequest;

const CALLS: usize = 20_000;
const MESSAGES: usize = 20_000;
const BATCH: usize = 64;

mod common;
use common::hmi::{control, cpu_ns, http, login, rss_kib, spawn_airlockd, start_hmi, stop, KillOnPanic};
use common::{build_binaries, emit, median, target_dir};

fn call(sock: &Path, service: &str, method: &str, body: &str) -> String {
    let r = control(
        sock,
        &ControlRequest::Call {
            service: service.into(),
            method: method.into(),
            body: body.into(),
            deadline_ms: 600_000,
        },
    );
    assert!(r.ok, "{service}.{method}: {}", r.body);
    r.body
}

/// `dir`, emptied (or created) and writable by the workers' dynamic uids.
fn fresh_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
}

/// The configuration of an echo worker `name` serving the service `name`.
fn echo_worker(name: &str) -> String {
    format!("[[worker]]\nname = \"{name}\"\nexecutable = \"airlock-worker-echo\"\npolicy = \"echo\"\nuid = \"dynamic\"\nservices = [\"{name}\"]\n")
}

fn start_airlockd(dir: &Path, bins: &Path) -> Child {
    let worker = |name: &str, extra: &str| format!("{}{extra}\n", echo_worker(name));
    let cfg = format!(
        "{}{}{}{}{}{}{}\n[[permit]]\nfrom = \"flooder\"\nto = \"stuck.*\"\nkind = \"send\"\n[[permit]]\nfrom = \"pinger\"\nto = \"peer.echo\"\nkind = \"call\"\n[[permit]]\nfrom = \"writer\"\nto = \"receiver.*\"\nkind = \"send\"\n",
        config_head(dir, bins, &[]),
        worker("pinger", ""),
        worker("peer", ""),
        worker("writer", "[worker.quota]\njournal-bytes = 268435456"),
        worker("receiver", ""),
        worker("flooder", "[worker.quota]\njournal-bytes = 262144"),
        "[[worker]]\nname = \"stuck\"\nexecutable = \"airlock-worker-sink\"\npolicy = \"sink\"\nargs = [\"/proc/no-such-dir/log\"]\nservices = [\"stuck\"]\n[worker.restart]\npolicy = \"never\"\n",
    );
    std::fs::write(dir.join("airlock.toml"), cfg).expect("config");
    let child = spawn_airlockd(bins, dir, "warn");
    let sock = dir.join("run/control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "airlockd did not start: {}",
            std::fs::read_to_string(dir.join("airlockd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The sink `stuck` is meant not to start.
    common::hmi::wait_running(&sock, &["pinger", "peer", "writer", "receiver", "flooder"], &dir.join("airlockd.log"));
    child
}

fn spawn_peer(mode: &str, fds: Vec<(OwnedFd, i32)>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args(["--peer", mode]).stdin(Stdio::null());
    let guard = sys::install_child_fds(&mut cmd, fds).expect("fds");
    let c = cmd.spawn().expect("spawn peer");
    drop(guard);
    c
}

/// The confinement layers every broker-bench configuration names, each `best-effort` unless
/// said otherwise (the layers not named keep their default, `required`).
const LAYERS: [&str; 10] = [
    "user-namespace",
    "pid-namespace",
    "net-namespace",
    "mount-namespace",
    "ipc-namespace",
    "uts-namespace",
    "cgroup-namespace",
    "cgroup",
    "uid",
    "landlock",
];

/// The `[supervisor]` section for `dir` and `bins`, and `[defaults.confinement]` with every
/// layer of [`LAYERS`] `best-effort` except where `overrides` says otherwise (it may also name
/// other layers).
fn config_head(dir: &Path, bins: &Path, overrides: &[(&str, &str)]) -> String {
    let requirement = |layer: &str| overrides.iter().find(|(l, _)| *l == layer).map_or("best-effort", |(_, r)| *r);
    let others = overrides.iter().map(|(l, _)| *l).filter(|l| !LAYERS.contains(l));
    let confinement: String =
        LAYERS.into_iter().chain(others).map(|l| format!("{l} = \"{}\"\n", requirement(l))).collect();
    format!(
        "[supervisor]\nstate-directory = \"{d}/state\"\nruntime-directory = \"{d}/run\"\nworker-directory = \"{b}\"\n\n[defaults.confinement]\n{confinement}\n",
        d = dir.display(),
        b = bins.display()
    )
}

/// airlockd with only `pinger` and `peer` (as in [`start_airlockd`]), the confinement layers
/// in `off` turned off, seccomp `best-effort` unless it is one of them, and every other layer
/// as [`config_head`] writes it.
fn start_call_pair(dir: &Path, bins: &Path, off: &[&str]) -> Child {
    fresh_dir(dir);
    let mut overrides: Vec<(&str, &str)> = off.iter().map(|l| (*l, "off")).collect();
    if !off.contains(&"seccomp") {
        overrides.push(("seccomp", "best-effort"));
    }
    let cfg = format!(
        "{}{}\n{}\n[[permit]]\nfrom = \"pinger\"\nto = \"peer.echo\"\nkind = \"call\"\n",
        config_head(dir, bins, &overrides),
        echo_worker("pinger"),
        echo_worker("peer"),
    );
    std::fs::write(dir.join("airlock.toml"), cfg).expect("config");
    let child = spawn_airlockd(bins, dir, "warn");
    let sock = dir.join("run/control.sock");
    common::hmi::wait_running(&sock, &["pinger", "peer"], &dir.join("airlockd.log"));
    // The row means what it says only if exactly the layers named are off, and seccomp,
    // where it stays on, is applied.
    let status = common::hmi::status(&sock).expect("status");
    for w in &status.workers {
        for l in &w.confinement {
            let name = l.layer.name();
            let is_off = l.state == airlock_protocol::control::LayerWord::Off;
            assert_eq!(is_off, off.contains(&name), "{}: layer {name} is {:?}", w.name, l.state);
            if name == "seccomp" && !is_off {
                assert_eq!(l.state, airlock_protocol::control::LayerWord::Applied, "{}: seccomp", w.name);
            }
        }
    }
    child
}

fn relay_baseline() -> f64 {
    let (a, relay_a) = sys::seqpacket_pair().expect("pair");
    let (relay_b, b) = sys::seqpacket_pair().expect("pair");
    let mut relay = spawn_peer("relay", vec![(relay_a, 3), (relay_b, 4)]);
    let mut echo = spawn_peer("echo", vec![(b, 3)]);
    let payload = [0x5au8; 64];
    let mut buf = [0u8; 256];
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..CALLS + CALLS / 10 {
        let t = Instant::now();
        sys::send_bytes(a.as_fd(), &payload).expect("send");
        let n = sys::recv_bytes(a.as_fd(), &mut buf).expect("recv");
        assert_eq!(n, 64);
        if i >= CALLS / 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(a);
    let _ = relay.wait();
    let _ = echo.wait();
    median(times)
}

fn fsync_baseline(dir: &Path) -> f64 {
    let path = dir.join("baseline.dat");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open");
    let record = vec![0x5au8; 1024];
    let t = Instant::now();
    let mut done = 0;
    while done < MESSAGES {
        let k = BATCH.min(MESSAGES - done);
        for _ in 0..k {
            f.write_all(&record).expect("write");
        }
        f.sync_data().expect("fdatasync");
        done += k;
    }
    let rate = MESSAGES as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    rate
}

fn peer(mode: &str) {
    match mode {
        "relay" => {
            let a = sys::claim_inherited_fd(3).expect("fd 3");
            let b = sys::claim_inherited_fd(4).expect("fd 4");
            let mut buf = [0u8; 256];
            loop {
                let n = sys::recv_bytes(a.as_fd(), &mut buf).unwrap_or(0);
                if n == 0 {
                    return;
                }
                sys::send_bytes(b.as_fd(), &buf[..n]).expect("to echo");
                let n = sys::recv_bytes(b.as_fd(), &mut buf).expect("from echo");
                sys::send_bytes(a.as_fd(), &buf[..n]).expect("back");
            }
        }
        "echo" => {
            let s = sys::claim_inherited_fd(3).expect("fd 3");
            let mut buf = [0u8; 256];
            loop {
                let n = sys::recv_bytes(s.as_fd(), &mut buf).unwrap_or(0);
                if n == 0 {
                    return;
                }
                sys::send_bytes(s.as_fd(), &buf[..n]).expect("echo");
            }
        }
        other => panic!("unknown peer {other}"),
    }
}

/// airlockd with a `peer` and a hostile worker that may call nothing of it, never killed for
/// its violations (the flood goes on).
fn start_hostile_airlockd(dir: &Path, bins: &Path) -> Child {
    let cfg = format!(
        "{}[broker]\nmax-violations = 0\n\n{}\n[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nuid = \"dynamic\"\nservices = [\"hostile\"]\n",
        config_head(dir, bins, &[]),
        echo_worker("peer"),
    );
    std::fs::write(dir.join("airlock.toml"), cfg).expect("config");
    let d = spawn_airlockd(bins, dir, "warn");
    wait_hostile_up(dir);
    d
}

/// Waits until the hostile worker answers through the control socket.
fn wait_hostile_up(dir: &Path) {
    let sock = dir.join("run/control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let echo =
        ControlRequest::Call { service: "hostile".into(), method: "echo".into(), body: "x".into(), deadline_ms: 0 };
    while !(sock.exists() && control(&sock, &echo).body == "x") {
        assert!(
            Instant::now() < deadline,
            "airlockd did not start: {}",
            std::fs::read_to_string(dir.join("airlockd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// airlockd with `pinger` calling `peer`, and a hostile worker with the ui's limits; `cgroup` is
/// that layer's requirement.
fn start_attack_airlockd(dir: &Path, bins: &Path, cgroup: &str) -> Child {
    fresh_dir(dir);
    let cfg = format!(
        "{}[broker]\nmax-violations = 0\n\n{}{}[[worker]]\nname = \"hostile\"\nexecutable = \"airlock-worker-hostile\"\npolicy = \"hostile\"\nuid = \"dynamic\"\nservices = [\"hostile\"]\n[worker.limits]\ncpu-weight = 25\nnice = 10\nmemory-mib = 128\npids = 1024\n[worker.rlimits]\nnofile = 64\nnproc = 4096\naddress-space-mib = 1024\nfile-size-mib = 4\n\n[[permit]]\nfrom = \"pinger\"\nto = \"peer.echo\"\nkind = \"call\"\n",
        config_head(dir, bins, &[("cgroup", cgroup)]),
        echo_worker("pinger"),
        echo_worker("peer"),
    );
    std::fs::write(dir.join("airlock.toml"), cfg).expect("config");
    let d = spawn_airlockd(bins, dir, "warn");
    wait_hostile_up(dir);
    let sock = dir.join("run/control.sock");
    for w in ["pinger", "peer"] {
        let echo = ControlRequest::Call { service: w.into(), method: "echo".into(), body: "x".into(), deadline_ms: 0 };
        let deadline = Instant::now() + Duration::from_secs(30);
        while control(&sock, &echo).body != "x" {
            assert!(Instant::now() < deadline, "{w} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    d
}

/// `call_under_cpu_attack_64` (or its `_priority_only` twin): returns airlockd's RSS at rest.
fn cpu_attack(bins: &Path, scenario: &str, cgroup: &str) -> (Child, PathBuf, f64) {
    // Short: the control socket's path must fit in sun_path.
    let dir = bins.join(format!("airlock-bench-broker-{}-cpu-{cgroup}", std::process::id()));
    let d = start_attack_airlockd(&dir, bins, cgroup);
    // A panic below must not leave airlockd and 64 spinning threads behind.
    let guard = KillOnPanic(d.id());
    let sock = dir.join("run/control.sock");
    let applied = {
        let mut s = UnixStream::connect(&sock).expect("connect control socket");
        writeln!(s, "{}", serde_json::to_string(&ControlRequest::Status).expect("json")).expect("write");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        let st: airlock_protocol::control::Status = serde_json::from_str(&line).expect("status");
        st.workers
            .iter()
            .find(|w| w.name == "hostile")
            .and_then(|w| w.state(airlock_protocol::confinement::Layer::Cgroup))
            == Some(airlock_protocol::control::LayerWord::Applied)
    };
    let _ = call(&sock, "pinger", "ping_many", "peer 500");
    let rest_rss = rss_kib(d.id());
    let unloaded: f64 = call(&sock, "pinger", "ping_many", "peer 2000").parse().expect("median");
    let unloaded_p99: f64 = call(&sock, "pinger", "ping_many", "peer 2000 99").parse().expect("p99");
    let spinning = call(&sock, "hostile", "attack", "spin 64");
    std::thread::sleep(Duration::from_millis(300));
    let loaded: f64 = call(&sock, "pinger", "ping_many", "peer 2000").parse().expect("median");
    let loaded_p99: f64 = call(&sock, "pinger", "ping_many", "peer 2000 99").parse().expect("p99");
    let layer = if applied { "its own cgroup (weight 25) and nice 10" } else { "no cgroup, nice 10 only" };
    let threads = spinning.strip_prefix("spinning ").unwrap_or("?");
    emit(
        scenario,
        loaded,
        unloaded,
        "us",
        true,
        &format!(
            "call median while a hostile worker spins {threads} of 64 threads ({layer}), versus before the attack, all CPUs; 99th percentile {loaded_p99} us versus {unloaded_p99} us; target 2.0 with a cgroup"
        ),
    );
    std::mem::forget(guard);
    (d, dir, rest_rss)
}

/// The embedded default HMI polling every 20 ms, with or without sample streams; returns
/// airlockd's CPU milliseconds over `secs` seconds after a second of warm-up.
fn hmi_cpu(bins: &Path, streams: bool, secs: u64) -> f64 {
    let samples = format!("stream-samples = {streams}");
    let (d, dir, _) = start_hmi(
        bins,
        &format!("cpu-{streams}"),
        &[("poll-ms = 500", "poll-ms = 20"), ("stream-samples = true", &samples)],
    );
    let guard = KillOnPanic(d.id());
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_ns(d.id());
    std::thread::sleep(Duration::from_secs(secs));
    let ms = (cpu_ns(d.id()) - before) as f64 / 1e6;
    std::mem::forget(guard);
    stop(d);
    let _ = std::fs::remove_dir_all(&dir);
    ms
}

/// Median and p99 microseconds of `n` trend queries of the last minute through the HMI's ui,
/// with `[settings.ui] trend-in-place` as given: the query answered in a call region shared
/// with the historian, or through airlockd.
fn hmi_trend(bins: &Path, in_place: bool, n: usize) -> (f64, f64) {
    let setting = format!("trend-in-place = {in_place}");
    let (d, dir, ui) = start_hmi(bins, &format!("trend-{in_place}"), &[("trend-in-place = true", &setting)]);
    let guard = KillOnPanic(d.id());
    // Password first: auth says it as it starts, before any history is worth querying.
    let password_log = dir.join("airlockd.log");
    common::hmi::operator_password(&password_log);
    // A minute of history (the default polls every 500 ms) for every query to read.
    std::thread::sleep(Duration::from_secs(5));
    let (mut conn, cookie) = login(ui, &password_log);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let path = format!("/api/trend?tag=level&from={}&to={now}", now - 60_000);
    let (st, first) = http(&mut conn, "GET", &path, Some(&cookie), "");
    assert_eq!(st, 200, "trend: {}", String::from_utf8_lossy(&first));
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (st, body) = http(&mut conn, "GET", &path, Some(&cookie), "");
        times.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(st == 200 && body == first, "a trend query failed or changed: {st}");
    }
    if in_place {
        let mut s = UnixStream::connect(dir.join("run/control.sock")).expect("connect control socket");
        writeln!(s, "{}", serde_json::to_string(&ControlRequest::Status).expect("json")).expect("write");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        assert!(line.contains("\"call_region\":true"), "no call region was used: {line}");
    }
    std::mem::forget(guard);
    stop(d);
    let _ = std::fs::remove_dir_all(&dir);
    times.sort_by(f64::total_cmp);
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    (median(times), p99)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        peer(args.get(i + 1).map(String::as_str).unwrap_or(""));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo bench --bench broker -- NAME[,NAME...]`: only the scenarios named.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned().unwrap_or_default();
    let wants = |name: &str| filter.is_empty() || filter.split(',').any(|f| f == name);
    build_binaries(&["airlock-test-workers", "airlock-supervisor", "airlock-hmi"]);
    let bins = target_dir();
    // Every scenario in each round; each line printed at the end is the median of the
    // rounds' ratios (common::print_rows).
    for _ in 0..common::rounds() {
        run_round(&bins, &wants);
    }
    common::print_rows();
}

/// One round of every scenario `wants`.
fn run_round(bins: &Path, wants: &dyn Fn(&str) -> bool) {
    let bins = bins.to_path_buf();
    // On the target's file system (not /tmp, which may be tmpfs where fsync is free).
    let dir = bins.join(format!("airlock-bench-broker-{}", std::process::id()));
    fresh_dir(&dir);
    sys::pin_to_cpu(0).expect("pin");
    let d = start_airlockd(&dir, &bins);
    let sock = dir.join("run/control.sock");

    // One relay baseline per round for the three call rows.
    let mut relay = None;
    let mut relay_us = || *relay.get_or_insert_with(relay_baseline);
    if wants("call_via_broker_64") {
        let airlock_us: f64 = call(&sock, "pinger", "ping_many", &format!("peer {CALLS}")).parse().expect("median");
        let base_us = relay_us();
        emit(
            "call_via_broker_64",
            airlock_us,
            base_us,
            "us",
            true,
            "worker -> airlockd -> worker and back, median measured inside the calling worker",
        );
    }
    // Every layer that can be off while the workers keep their own uid (which needs the user
    // namespace here).
    let unconfined: Vec<&str> =
        LAYERS.into_iter().filter(|l| !["user-namespace", "uid"].contains(l)).chain(["seccomp"]).collect();
    for (i, (name, off, what)) in [
        ("call_via_broker_64_no_seccomp", &["seccomp"][..], "the workers' seccomp layer off"),
        ("call_via_broker_64_no_cgroup", &["cgroup"][..], "the workers' cgroup layer off"),
        (
            "call_via_broker_64_unconfined",
            &unconfined[..],
            "the workers' seccomp, cgroup, Landlock and namespace layers off (user namespace and uid kept)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        if !wants(name) {
            continue;
        }
        // A short name: the control socket's path must fit in sockaddr_un (108 bytes).
        let pair_dir = bins.join(format!("airlock-bench-broker-{}-p{i}", std::process::id()));
        let pair = start_call_pair(&pair_dir, &bins, off);
        let pair_sock = pair_dir.join("run/control.sock");
        let airlock_us: f64 =
            call(&pair_sock, "pinger", "ping_many", &format!("peer {CALLS}")).parse().expect("median");
        stop(pair);
        let _ = std::fs::remove_dir_all(&pair_dir);
        let base_us = relay_us();
        emit(
            name,
            airlock_us,
            base_us,
            "us",
            true,
            &format!("call_via_broker_64 with {what}: reported, not a setting to deploy"),
        );
    }

    // Durable messages, everything on one CPU as the issue specifies ...
    if wants("async_durable_1k") {
        let airlock_rate: f64 =
            call(&sock, "writer", "durable_rate", &format!("receiver deliver {MESSAGES} 1024 {BATCH}"))
                .parse()
                .expect("rate");
        let base_rate = fsync_baseline(&dir.join("state"));
        emit(
            "async_durable_1k",
            airlock_rate,
            base_rate,
            "msgs/s",
            false,
            "durable sends accepted per second, groups of 64, supervisor, workers and baseline on CPU 0",
        );
    }
    stop(d);

    // ... and as deployed: supervisor, sender and receiver on the machine's CPUs, the baseline
    // too (the broker is a pipeline of three processes).
    sys::unpin().expect("unpin");
    let dir2 = bins.join(format!("airlock-bench-broker-{}-all", std::process::id()));
    fresh_dir(&dir2);
    let d = start_airlockd(&dir2, &bins);
    let sock = dir2.join("run/control.sock");
    // A flooding worker against its quota: another pair's calls while it floods, versus the
    // same calls unloaded (the 2x bound is a benchmark figure, not a timed test). Unpinned,
    // as in the test: pinned to one CPU, the flooder's own CPU time alone would double latency.
    if wants("call_under_flood_64") {
        let unloaded: f64 = call(&sock, "pinger", "ping_many", "peer 2000").parse().expect("median");
        let flood_sock = sock.clone();
        let flood = std::thread::spawn(move || call(&flood_sock, "flooder", "flood", "stuck deliver 3000"));
        std::thread::sleep(Duration::from_millis(300));
        let loaded: f64 = call(&sock, "pinger", "ping_many", "peer 2000").parse().expect("median");
        let flooded = flood.join().expect("flood");
        emit(
            "call_under_flood_64",
            loaded,
            unloaded,
            "us",
            true,
            &format!(
                "call median while another worker floods its quota ({flooded}), versus unloaded, all CPUs; target 2.0"
            ),
        );
    }

    if wants("call_under_durable_64") {
        // Calls between two workers while a third streams durable messages: the journal's
        // fsyncs run on their own thread, so the event loop keeps answering.
        let unloaded: f64 = call(&sock, "pinger", "ping_many", "peer 2000").parse().expect("median");
        let unloaded_p99: f64 = call(&sock, "pinger", "ping_many", "peer 2000 99").parse().expect("p99");
        let stream_sock = sock.clone();
        let stream = std::thread::spawn(move || {
            call(&stream_sock, "writer", "durable_rate", &format!("receiver deliver {} 1024 {BATCH}", MESSAGES * 6))
        });
        std::thread::sleep(Duration::from_millis(100));
        let loaded: f64 = call(&sock, "pinger", "ping_many", "peer 1000").parse().expect("median");
        let loaded_p99: f64 = call(&sock, "pinger", "ping_many", "peer 1000 99").parse().expect("p99");
        let rate = stream.join().expect("stream");
        emit(
            "call_under_durable_64",
            loaded,
            unloaded,
            "us",
            true,
            &format!(
                "call median while another worker streams durable 1 KiB messages ({rate} msgs/s), versus unloaded, all CPUs; 99th percentile {loaded_p99} us versus {unloaded_p99} us"
            ),
        );
    }

    if wants("async_durable_1k_all_cpus") {
        let all_rate: f64 = call(&sock, "writer", "durable_rate", &format!("receiver deliver {MESSAGES} 1024 {BATCH}"))
            .parse()
            .expect("rate");
        let all_base = fsync_baseline(&dir2.join("state"));
        emit(
            "async_durable_1k_all_cpus",
            all_rate,
            all_base,
            "msgs/s",
            false,
            "durable sends accepted per second, groups of 64, all CPUs",
        );
    }
    stop(d);

    if wants("supervisor_cpu_under_bulk_flood") {
        let dir3 = bins.join(format!("airlock-bench-broker-{}-hostile", std::process::id()));
        fresh_dir(&dir3);
        let d = start_hostile_airlockd(&dir3, &bins);
        let sock = dir3.join("run/control.sock");
        const FLOOD: u64 = 2000;
        let cpu_of = |bytes: u64| -> (f64, String) {
            let before = cpu_ns(d.id());
            let outcome = call(&sock, "hostile", "attack", &format!("bulk-calls peer {FLOOD} {bytes}"));
            ((cpu_ns(d.id()) - before) as f64 / 1e6, outcome)
        };
        let (plain_ms, plain) = cpu_of(0);
        let (bulk_ms, bulk) = cpu_of(1 << 20);
        // OK BUSY REFUSED RETURNED: every call refused; RETURNED, the refusals that brought the
        // payload's memfd back to the sender (airlockd closes the others itself).
        let returned = bulk
            .strip_prefix(&format!("0 0 {FLOOD} "))
            .unwrap_or_else(|| panic!("not every bulk call refused: {bulk}"));
        assert_eq!(plain, format!("0 0 {FLOOD} 0"), "every plain call refused");
        emit(
            "supervisor_cpu_under_bulk_flood",
            bulk_ms,
            plain_ms,
            "ms",
            true,
            &format!(
                "airlockd CPU for {FLOOD} permit-refused calls with an encrypted 1 MiB bulk payload each, versus without a payload, all CPUs; {returned} payloads handed back to the sender; target 1.5"
            ),
        );
        stop(d);
        let _ = std::fs::remove_dir_all(&dir3);
    }

    if wants("hmi_sample_cpu") {
        let secs = if std::env::var_os("AIRLOCK_BENCH_QUICK").is_some() { 3 } else { 10 };
        let journaled = hmi_cpu(&bins, false, secs);
        let streamed = hmi_cpu(&bins, true, secs);
        let per = |ms: f64| ms * 1000.0 / (secs as f64 * 50.0);
        emit(
            "hmi_sample_cpu",
            per(streamed),
            per(journaled),
            "us/sample",
            true,
            &format!(
                "airlockd CPU per sample (nominal: one per 20 ms) of the default HMI over {secs} s: samples through streams ({streamed:.1} ms), versus journaled through airlockd ({journaled:.1} ms); target at most 0.2"
            ),
        );
    }

    if wants("hmi_trend_in_place") {
        let n = if std::env::var_os("AIRLOCK_BENCH_QUICK").is_some() { 200 } else { 2000 };
        let (via_airlockd, p99_via) = hmi_trend(&bins, false, n);
        let (in_place, p99_in_place) = hmi_trend(&bins, true, n);
        emit(
            "hmi_trend_in_place",
            in_place,
            via_airlockd,
            "us",
            true,
            &format!(
                "median of {n} trend queries (the last minute of one tag) from an HTTP client to the default HMI: the ui asks the historian in a call region shared with it (p99 {p99_in_place:.0} us), versus through airlockd (p99 {p99_via:.0} us), the same history; reported"
            ),
        );
    }

    if wants("call_under_cpu_attack_64") || wants("supervisor_rss_under_attack") {
        let (d, dir4, rest_rss) = cpu_attack(&bins, "call_under_cpu_attack_64", "best-effort");
        if wants("supervisor_rss_under_attack") {
            let sock = dir4.join("run/control.sock");
            let after_cpu = rss_kib(d.id());
            let _ = call(&sock, "hostile", "attack", "bulk-calls peer 500 1048576");
            let after_bulk = rss_kib(d.id());
            let worst = after_cpu.max(after_bulk);
            emit(
                "supervisor_rss_under_attack",
                worst / 1024.0,
                rest_rss / 1024.0,
                "MiB",
                true,
                &format!(
                    "airlockd's RSS after 64 spinning threads ({:.1} MiB) and 500 refused encrypted 1 MiB bulk calls ({:.1} MiB) from a hostile worker, versus at rest; bounded",
                    after_cpu / 1024.0,
                    after_bulk / 1024.0
                ),
            );
        }
        stop(d);
        let _ = std::fs::remove_dir_all(&dir4);
    }
    if wants("call_under_cpu_attack_64_priority_only") {
        let (d, dir5, _) = cpu_attack(&bins, "call_under_cpu_attack_64_priority_only", "off");
        stop(d);
        let _ = std::fs::remove_dir_all(&dir5);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}
