//! `cargo bench -p airlock-supervisor --bench hmi`: what privilege separation costs the HMI.
//! The layered HMI (the embedded default under airlockd: field, logic, historian, auth and ui
//! as confined workers) against its baseline, the same layers' code composed in one process
//! with no IPC and the same durability (`airlock_hmi::single`), both running at once against
//! one simulated device (plcsim's code in a process of its own, outside both). One JSON object
//! per line, as the other benchmarks print; every figure is the median of `rounds` same-run
//! ratios (`AIRLOCK_BENCH_ROUNDS`, default 5; 1 with `AIRLOCK_BENCH_QUICK`), with their range.
//! Nothing is pinned: the layers share the machine as they would in service.
//!
//! - `hmi_setpoint_roundtrip`: an operator's setpoint POST (session checked by the ui and again
//!   by logic with auth, range, rate and interlock checks, the Modbus write, the event made
//!   durable) until its answer, by which time the device holds the value (checked over Modbus
//!   after each round); median per round, p99 over all rounds in `p99_us`. Target 1.5.
//! - `hmi_cpu_per_sample`: the CPU time of every process of the HMI (airlockd and its workers;
//!   the one process) per sample that reached the history, both polling every 20 ms (field's
//!   minimum), over the same window. Target 2.0.
//! - `hmi_rss_total`: the resident memory of every process of the HMI, reported.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::hmi::{cpu_ns, http, login, rss_kib, start_hmi, stop, KillOnPanic};
use common::{build_binaries, emit_rounds, median, target_dir};

/// The plcsim worker's block in the embedded default: the device runs outside both HMIs.
const PLCSIM_WORKER: &str = "[[worker]]\nname = \"plcsim\"\nexecutable = \"airlock-worker-plcsim\"\npolicy = \"plcsim\"\nuid = \"dynamic\"\nsettings = [\"plcsim\"]\n\n[[worker.resource]]\nkind = \"tcp-listen\"\naddress = \"127.0.0.1:1502\"\n\n";
/// The heater setpoint's holding register, and the two values the rounds alternate between
/// (0.1 °C apart: well inside its 30 °C/s rate, and the level interlock never applies).
const HEATER_SP: u16 = 101;
const SETPOINTS: [f64; 2] = [40.0, 40.1];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--device") {
        device(Path::new(&args[i + 1]));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--single") {
        single(&args[i + 1..]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("AIRLOCK_BENCH_QUICK").is_some();
    let rounds = common::rounds();
    let (posts, window) = if quick { (50, Duration::from_secs(1)) } else { (200, Duration::from_secs(4)) };
    build_binaries(&["airlock-supervisor", "airlock-hmi"]);
    let bins = target_dir();

    let (dev, dev_port) = start_device(&bins);
    let _dev_guard = KillOnPanic(dev.id());
    let edits = [
        (PLCSIM_WORKER, String::new()),
        ("address = \"127.0.0.1:1502\"", format!("address = \"127.0.0.1:{dev_port}\"")),
        ("poll-ms = 500", "poll-ms = 20".to_string()),
    ];
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let (layered, dir, layered_ui) = start_hmi(&bins, "hmi-layered", &edits);
    let _layered_guard = KillOnPanic(layered.id());
    let (one, one_dir, one_ui) = start_single(&bins, &dir.join("airlock.toml"), dev_port);
    let _one_guard = KillOnPanic(one.id());
    let (mut layered_conn, layered_cookie) = login(layered_ui, &dir.join("airlockd.log"));
    let (mut one_conn, one_cookie) = login(one_ui, &one_dir.join("single.log"));
    let mut modbus = TcpStream::connect(("127.0.0.1", dev_port)).expect("connect to the device");
    modbus.set_nodelay(true).expect("nodelay");
    // Both have samples, so logic takes writes (values are stale before the first one).
    std::thread::sleep(Duration::from_secs(1));

    let (mut setpoint, mut cpu, mut rss, mut pss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The layered HMI's CPU per sample by process (its executable's name), summed over the rounds.
    let mut by_process: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    let mut layered_samples = 0usize;
    let (mut all_layered, mut all_one) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Which goes first alternates, so that neither always meets a warmer device.
        let mut order = [(true, &mut layered_conn, &layered_cookie), (false, &mut one_conn, &one_cookie)];
        if round % 2 == 1 {
            order.swap(0, 1);
        }
        let mut medians = [0.0; 2];
        for (is_layered, conn, cookie) in order {
            // Another value in the device first, so that only this HMI's writes can leave the
            // last setpoint there.
            write_holding(&mut modbus, HEATER_SP, 399);
            let times = setpoints(conn, cookie, posts, &mut modbus);
            medians[usize::from(!is_layered)] = median(times.clone());
            if is_layered { &mut all_layered } else { &mut all_one }.extend(times);
        }
        setpoint.push((medians[0], medians[1]));

        // What the setpoints left behind (events committed to the history after the answers)
        // settles before the CPU window.
        std::thread::sleep(Duration::from_millis(500));
        // The same window for both: CPU time of every process, samples that reached the history.
        let (layered_pids, one_pids) = (family(layered.id()), vec![one.id()]);
        let from_ms = now_ms();
        let (l0, o0) = (cpu_sum(&layered_pids), cpu_sum(&one_pids));
        let each0: Vec<u64> = layered_pids.iter().map(|p| cpu_ns(*p)).collect();
        std::thread::sleep(window);
        let (l1, o1) = (cpu_sum(&layered_pids), cpu_sum(&one_pids));
        // A worker that restarted during the window would make its CPU time meaningless.
        assert_eq!(family(layered.id()), layered_pids, "the layered HMI's processes changed during the window");
        for (p, before) in layered_pids.iter().zip(each0) {
            let argv0 = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
            let name = argv0.rsplit('/').next().unwrap_or_default().trim_start_matches("airlock-worker-").to_string();
            *by_process.entry(name).or_default() += cpu_ns(*p).saturating_sub(before) as f64 / 1e3;
        }
        let to_ms = now_ms();
        let ls = stored(&mut layered_conn, &layered_cookie, from_ms, to_ms);
        let os = stored(&mut one_conn, &one_cookie, from_ms, to_ms);
        // At least half the polls the window holds (one every 20 ms) reached each history.
        let expected = (to_ms - from_ms) as usize / 20;
        assert!(
            ls * 2 >= expected && os * 2 >= expected,
            "samples missing from a history: layered {ls}, one process {os}, of {expected} polls"
        );
        layered_samples += ls;
        cpu.push((l1.saturating_sub(l0) as f64 / 1e3 / ls as f64, o1.saturating_sub(o0) as f64 / 1e3 / os as f64));
        rss.push((layered_pids.iter().map(|p| rss_kib(*p)).sum(), rss_kib(one.id())));
        let layered_pss: Option<f64> = layered_pids.iter().map(|p| pss_kib(*p)).sum();
        pss.push(layered_pss.zip(pss_kib(one.id())));
    }
    let p99 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let mut extra = serde_json::Map::new();
    extra.insert("p99_us".into(), serde_json::json!([p99(all_layered).round(), p99(all_one).round()]));
    emit_rounds(
        "hmi_setpoint_roundtrip",
        &setpoint,
        "us",
        true,
        "median per round of an operator's setpoint POST until answered (the device holds the value), layered under airlockd vs the same layers in one process; p99_us [layered, one process]; target 1.5",
        extra,
    );
    let mut extra = serde_json::Map::new();
    let per_sample = by_process.into_iter().map(|(k, v)| (k, serde_json::json!((v / layered_samples as f64).round())));
    extra.insert("layered_by_process_us".into(), serde_json::Value::Object(per_sample.collect()));
    emit_rounds(
        "hmi_cpu_per_sample",
        &cpu,
        "us/sample",
        true,
        "CPU time of every process of the HMI (airlockd and its workers; the one process) per sample stored in the history, polling every 20 ms; layered_by_process_us over all rounds; target 2.0",
        extra,
    );
    // RSS counts a page shared by several processes (libc, the kernel's zero page) in each;
    // PSS divides it among them.
    let mut extra = serde_json::Map::new();
    // Only where every process's PSS could be read (smaps_rollup of a non-dumpable worker may
    // not be): a partial sum would understate the layered HMI.
    if let Some(last) = pss.last().copied().flatten() {
        extra.insert("pss_kib".into(), serde_json::json!([last.0.round(), last.1.round()]));
    }
    emit_rounds(
        "hmi_rss_total",
        &rss,
        "KiB",
        true,
        "resident memory of every process of the HMI (airlockd and its workers; the one process); pss_kib [layered, one process] in the last round; reported",
        extra,
    );
    stop(layered);
    let _ = Command::new("kill").arg(one.id().to_string()).status();
    for mut c in [one, dev] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&one_dir);
}

/// `n` setpoint POSTs through the ui on `conn`, alternating between [`SETPOINTS`]: each
/// one's microseconds until answered. Every one must be accepted, and the device must hold
/// the last value.
fn setpoints(conn: &mut TcpStream, cookie: &str, n: usize, modbus: &mut TcpStream) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    let mut last = 0.0;
    for i in 0..n {
        last = SETPOINTS[i % 2];
        let body = format!(r#"{{"tag":"heater_sp","value":{last}}}"#);
        let t = Instant::now();
        let (st, answer) = http(conn, "POST", "/api/setpoint", Some(cookie), &body);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let answer = String::from_utf8_lossy(&answer);
        assert!(st == 200 && answer.contains("\"accepted\":true"), "setpoint refused: {st} {answer}");
    }
    let raw = read_holding(modbus, HEATER_SP);
    assert_eq!(f64::from(raw) / 10.0, last, "the device does not hold the last setpoint");
    times
}

/// Samples of `level` stored between `from_ms` and `to_ms`, as a trend through the ui reads
/// them (one point per sample: its buckets are shorter than the poll interval).
fn stored(conn: &mut TcpStream, cookie: &str, from_ms: i64, to_ms: i64) -> usize {
    let (st, body) = http(conn, "GET", &format!("/api/trend?tag=level&from={from_ms}&to={to_ms}"), Some(cookie), "");
    assert_eq!(st, 200, "trend: {}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("trend json");
    v["points"].as_array().map_or(0, Vec::len)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// `pid` and its children (airlockd's workers), from `/proc`.
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    for e in std::fs::read_dir("/proc").expect("/proc").filter_map(Result::ok) {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // The fields after the command's closing parenthesis: state, then the parent's pid.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Proportional set size of `pid` in KiB, if `/proc/PID/smaps_rollup` can be read.
fn pss_kib(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("Pss:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
    })
}

fn cpu_sum(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ns(*p)).sum()
}

/// The simulated device in a process of its own (this bench with `--device`): its port.
fn start_device(bins: &Path) -> (Child, u16) {
    let portfile = bins.join(format!("airlock-bench-hmi-{}-device.port", std::process::id()));
    let _ = std::fs::remove_file(&portfile);
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .arg("--device")
        .arg(&portfile)
        .stdin(Stdio::null())
        .spawn()
        .expect("device");
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&portfile).ok().and_then(|s| s.trim().parse().ok()) {
            break p;
        }
        assert!(Instant::now() < deadline, "the device did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&portfile);
    (child, port)
}

/// `--device PORTFILE`: plcsim's device on a free loopback port, written to PORTFILE.
fn device(portfile: &Path) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    std::fs::write(portfile.with_extension("tmp"), port.to_string()).expect("port file");
    std::fs::rename(portfile.with_extension("tmp"), portfile).expect("port file");
    let mut sim = airlock_hmi::plcsim::Sim::new(1, 100);
    loop {
        sim.wait(&l, None, Duration::from_secs(1)).expect("poll");
        sim.turn(&l);
    }
}

/// The one-process HMI (this bench with `--single`) with `config`'s settings and the same
/// device: (the process, its directory, its ui port). Waits until its ui answers.
fn start_single(bins: &Path, config: &Path, dev_port: u16) -> (Child, PathBuf, u16) {
    let dir = bins.join(format!("airlock-bench-hmi-{}-single", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).expect("dir");
    let ui = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .arg("--single")
        .arg(config)
        .arg(dir.join("state"))
        .arg(ui.to_string())
        .arg(dev_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("single.log")).expect("log"))
        .spawn()
        .expect("one-process HMI");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", ui)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the one-process HMI did not start: {}",
            std::fs::read_to_string(dir.join("single.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, dir, ui)
}

/// `--single CONFIG STATE UI-PORT DEVICE-PORT`: runs `airlock_hmi::single` until killed.
fn single(args: &[String]) {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    let [config, state, ui, dev] = args else { panic!("--single CONFIG STATE UI-PORT DEVICE-PORT") };
    let config = std::fs::read_to_string(config).expect("config");
    let ui = TcpListener::bind(("127.0.0.1", ui.parse::<u16>().expect("ui port"))).expect("bind the ui");
    let dev = TcpStream::connect(("127.0.0.1", dev.parse::<u16>().expect("device port"))).expect("device");
    if let Err(e) = airlock_hmi::single::run(&config, Path::new(state), ui, dev) {
        panic!("the one-process HMI stopped: {e}");
    }
}

/// Writes `value` to holding register `register` of unit 1 over Modbus TCP (function 6).
fn write_holding(s: &mut TcpStream, register: u16, value: u16) {
    let ([rh, rl], [vh, vl]) = (register.to_be_bytes(), value.to_be_bytes());
    s.write_all(&[0, 2, 0, 0, 0, 6, 1, 6, rh, rl, vh, vl]).expect("modbus write");
    let mut answer = [0u8; 12];
    s.read_exact(&mut answer).expect("modbus read");
    assert_eq!(answer[7], 6, "unexpected Modbus answer {answer:?}");
}

/// Holding register `register` of unit 1, read over Modbus TCP (function 3).
fn read_holding(s: &mut TcpStream, register: u16) -> u16 {
    let [hi, lo] = register.to_be_bytes();
    s.write_all(&[0, 1, 0, 0, 0, 6, 1, 3, hi, lo, 0, 1]).expect("modbus write");
    let mut answer = [0u8; 11];
    s.read_exact(&mut answer).expect("modbus read");
    assert_eq!(answer[7..9], [3, 2], "unexpected Modbus answer {answer:?}");
    u16::from_be_bytes([answer[9], answer[10]])
}
