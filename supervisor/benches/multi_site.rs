//! `cargo bench -p airlock-supervisor --bench multi_site`: the bridge (#19) against a plain
//! MQTT publisher, both publishing to the same Mosquitto (Debian's `mosquitto`, started here on
//! a free loopback port, plain TCP) in the same run. One JSON object per line, as the other
//! benchmarks print; figures are the median of `rounds` same-run ratios
//! (`AIRLOCK_BENCH_ROUNDS`, default 5; 1 with `AIRLOCK_BENCH_QUICK`), with their range.
//!
//! - `bridge_publish_rate`: a burst of 100,000 tag changes (10,000 updates of 10 tags) fed to
//!   the bridge through its real input path (durable `bridge.update` messages through
//!   airlockd's journal, sent by the echo test worker in batches of 100), until a subscriber
//!   has received every change; against a plain publisher that takes the same updates from
//!   memory and publishes them with the same code (the bridge's `Node`, 32 updates per NDATA),
//!   the same MQTT codec and the same broker, with no IPC, no journal and no acknowledgement.
//!   Target 1.5.
//! - `bridge_latency`: one update fed to the bridge until the subscriber has it, median and p99
//!   over 200; against the plain publisher's. Reported.
//! - `bridge_latency_device`: a register change at the device (plcsim's holding register 102,
//!   written over Modbus by the bench) until the subscriber has the new value, through the whole
//!   site: field polling every 20 ms, logic, the bridge, the broker. Median and p99 over 50 a
//!   round; the baseline is the poll interval (a change waits for the next poll: half of it on
//!   average). Reported.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::hmi::{control, cpu_ns, spawn_airlockd, start_hmi, wait_running, KillOnPanic};
use common::{build_binaries, emit_rounds, locate_binaries, median};

use airlock_hmi::bridge::{mqtt, sparkplug};
use airlock_hmi::types::{Plant, Update};
use airlock_supervisor::runtime::ControlRequest;

const TAGS: usize = 10;
const UPDATES: u64 = 10_000;
const BATCH: u64 = 100;
/// The bridge's and the plain publisher's topics: the same length.
const BRIDGE_TOPIC: &str = "spBv1.0/bench/NDATA/bridge";
const PLAIN_TOPIC: &str = "spBv1.0/bench/NDATA/plain1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

fn plant_toml() -> String {
    let mut s = String::from("[settings.plant]\nunit-id = 1\n");
    for t in 0..TAGS {
        s += &format!("\n[[settings.plant.tag]]\nname = \"t{t}\"\ntable = \"input\"\nregister = {t}\n");
    }
    s
}

fn plant() -> Plant {
    let text = plant_toml().replace("[settings.plant", "[plant");
    toml::from_str::<airlock_hmi::types::PlantSettings>(&text).expect("plant").plant.validated().expect("valid")
}

/// Mosquitto on a free loopback port.
fn broker(dir: &Path) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"),
    )
    .expect("conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("mosquitto (Debian's package `mosquitto`) could not start: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// An MQTT client connection (clean session) with CONNACK read.
fn client(port: u16, id: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let will_topic = format!("bench/{id}/will");
    s.write_all(&mqtt::connect(&mqtt::ConnectArgs {
        client_id: id,
        keepalive_s: 60,
        username: None,
        password: None,
        will_topic: &will_topic,
        will: b"",
    }))
    .expect("connect");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = std::io::Read::read(&mut s, &mut chunk).expect("read");
        assert!(n > 0, "the broker closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = mqtt::next_packet(&mut buf).expect("packet") {
            assert!(matches!(p, mqtt::Incoming::Connack { accepted: true, .. }), "{p:?}");
            return (s, buf);
        }
    }
}

/// What the subscriber saw: per topic, (metrics received, when the last one arrived); and for
/// the device site's topic, per "metric=value", when it first arrived.
type Seen = Arc<Mutex<std::collections::BTreeMap<String, (u64, Instant)>>>;
const DEVICE_TOPIC: &str = "spBv1.0/bench/NDATA/device";

fn subscriber(port: u16) -> Seen {
    let (mut s, mut buf) = client(port, "bench-sub");
    s.write_all(&mqtt::subscribe(1, &["spBv1.0/bench/#".to_string()])).expect("subscribe");
    let seen: Seen = Arc::default();
    let out = seen.clone();
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let n = match std::io::Read::read(&mut s, &mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(p)) = mqtt::next_packet(&mut buf) {
                if let mqtt::Incoming::Publish { topic, payload, .. } = p {
                    let decoded = sparkplug::decode(&payload).ok();
                    let metrics = decoded.as_ref().map_or(0, |p| p.metrics.len() as u64);
                    let mut g = out.lock().unwrap_or_else(|e| e.into_inner());
                    if topic == DEVICE_TOPIC {
                        for m in decoded.iter().flat_map(|p| &p.metrics) {
                            if let (Some(n), Some(sparkplug::Value::Double(v))) = (&m.name, &m.value) {
                                g.entry(format!("{n}={v:.1}")).or_insert((1, Instant::now()));
                            }
                        }
                    }
                    let e = g.entry(topic).or_insert((0, Instant::now()));
                    e.0 += metrics;
                    e.1 = Instant::now();
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    seen
}

fn count(seen: &Seen, topic: &str) -> (u64, Option<Instant>) {
    let g = seen.lock().unwrap_or_else(|e| e.into_inner());
    g.get(topic).map_or((0, None), |(n, t)| (*n, Some(*t)))
}

/// Waits until `topic` has `target` metrics in all; returns when the last arrived.
fn wait_metrics(seen: &Seen, topic: &str, target: u64, what: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (n, t) = count(seen, topic);
        if n >= target {
            return t.unwrap_or_else(Instant::now);
        }
        assert!(Instant::now() < deadline, "{what}: {n} of {target} metrics arrived");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The plain publisher: the same updates from memory, the same `Node` and batching as the
/// bridge, published at QoS 0 on one connection, then a PINGREQ.
struct Plain {
    s: TcpStream,
    node: sparkplug::Node,
    plant: Plant,
    seq: u64,
}

impl Plain {
    fn new(port: u16, plant: &Plant) -> Plain {
        let (s, _) = client(port, "bench-plain");
        let node = sparkplug::Node::new(plant, 0.0, &Default::default(), false);
        Plain { s, node, plant: plant.clone(), seq: 0 }
    }

    fn publish(&mut self, updates: &[Update]) {
        let mut out = Vec::new();
        for chunk in updates.chunks(32) {
            let metrics: Vec<_> = chunk.iter().flat_map(|u| self.node.apply(&self.plant, u, false)).collect();
            self.seq = (self.seq + 1) % 256;
            let payload = sparkplug::Payload {
                timestamp: Some(airlock_hmi::types::now_ms() as u64),
                metrics,
                seq: Some(self.seq),
                ..Default::default()
            }
            .to_bytes();
            out.extend(mqtt::publish(PLAIN_TOPIC, &payload, None));
        }
        out.extend(mqtt::pingreq());
        self.s.write_all(&out).expect("publish");
    }
}

fn updates(start: u64, n: u64) -> Vec<Update> {
    (0..n)
        .map(|i| Update {
            ts_ms: airlock_hmi::types::now_ms(),
            values: (0..TAGS).map(|t| (format!("t{t}"), (start + i) as f64)).collect(),
            fault: None,
            active_alarms: Vec::new(),
        })
        .collect()
}

fn config(bins: &Path, dir: &Path, port: u16) -> String {
    let default = airlock_supervisor::config::EMBEDDED_DEFAULT;
    let head =
        default.split("# ----------------------------------------------------------------").next().expect("head");
    let head = head.replace(
        "[supervisor]\n",
        &format!(
            "[supervisor]\nstate-directory = \"{d}/state\"\nruntime-directory = \"{d}/run\"\nworker-directory = \"{b}\"\n",
            d = dir.display(),
            b = bins.display()
        ),
    );
    format!(
        "{head}{plant}
[settings.bridge]
group = \"bench\"
edge-node = \"bridge\"
sample-time = false
keepalive-s = 60

[[worker]]
name = \"echo\"
executable = \"airlock-worker-echo\"
policy = \"echo\"
uid = \"dynamic\"
services = [\"echo\"]

[worker.quota]
journal-bytes = 67108864

[[worker]]
name = \"bridge\"
executable = \"airlock-worker-bridge\"
policy = \"bridge\"
uid = \"dynamic\"
services = [\"bridge\"]
settings = [\"plant\", \"bridge\"]

[worker.quota]
inbox-bytes = 33554432

[[worker.resource]]
kind = \"tcp-connect\"
address = \"127.0.0.1:{port}\"

[[permit]]
from = \"echo\"
to = \"bridge.update\"
kind = \"send\"
",
        plant = plant_toml()
    )
}

/// airlockd's workers by executable name (`/proc/PID/cmdline`'s first word).
fn workers(airlockd: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(airlockd) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let first = cmd.split(|b| *b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(first).rsplit('/').next().unwrap_or_default().to_string();
        out.push((name, pid));
    }
    out
}

fn feed(sock: &Path, count: u64, start: u64) {
    let r = control(
        sock,
        &ControlRequest::Call {
            service: "echo".into(),
            method: "send_updates".into(),
            body: format!("{count} {TAGS} {BATCH} {start}"),
            deadline_ms: 120_000,
        },
    );
    assert!(r.ok, "send_updates: {r:?}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("bridge_publish_rate: bench\nbridge_latency: bench");
        return;
    }
    build_binaries(&["airlock-supervisor", "airlock-hmi", "airlock-test-workers"]);
    let bins = locate_binaries(&["airlockd", "airlock-worker-echo", "airlock-worker-bridge"]);
    let dir: PathBuf = bins.join(format!("airlock-bench-{}-multi-site", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let (mut mosq, port) = broker(&dir);
    let seen = subscriber(port);
    std::fs::write(dir.join("airlock.toml"), config(&bins, &dir, port)).expect("config");
    let d = spawn_airlockd(&bins, &dir, "info");
    let guard = KillOnPanic(d.id());
    let sock = dir.join("run/control.sock");
    let log = || std::fs::read_to_string(dir.join("airlockd.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log().contains("NBIRTH published: live") {
        assert!(Instant::now() < deadline, "the bridge did not go live:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bridge being live says nothing of echo, which feeds it (started concurrently).
    wait_running(&sock, &["echo", "bridge"], &dir.join("airlockd.log"));
    let plant = plant();
    let mut plain = Plain::new(port, &plant);
    let quick = std::env::var_os("AIRLOCK_BENCH_QUICK").is_some();
    let rounds = common::rounds();
    let per_round = if quick { UPDATES / 10 } else { UPDATES };
    let changes = per_round * TAGS as u64;

    // Warm-up, not measured: both connections' first bursts (the plain one's first burst ran
    // at a fifth of its later rate), the journal's first chunk, the bridge's first delivery.
    let warm = 1_000;
    let before = count(&seen, BRIDGE_TOPIC).0;
    feed(&sock, warm, 1);
    wait_metrics(&seen, BRIDGE_TOPIC, before + warm * TAGS as u64, "the bridge's warm-up");
    let before = count(&seen, PLAIN_TOPIC).0;
    plain.publish(&updates(1, warm));
    wait_metrics(&seen, PLAIN_TOPIC, before + warm * TAGS as u64, "the plain publisher's warm-up");

    // bridge_publish_rate
    let (mut rate_rounds, mut feed_ms, mut start) = (Vec::new(), Vec::new(), 1 + warm);
    // CPU per update of each process on the bridge's path, and of the broker on both.
    let mut procs = workers(d.id());
    procs.push(("airlockd".into(), d.id()));
    procs.push(("mosquitto".into(), mosq.id()));
    let mut cpu: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut broker_plain = Vec::new();
    for _ in 0..rounds {
        let before = count(&seen, BRIDGE_TOPIC).0;
        let cpu0: Vec<u64> = procs.iter().map(|(_, p)| cpu_ns(*p)).collect();
        let t = Instant::now();
        feed(&sock, per_round, start);
        feed_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let last = wait_metrics(&seen, BRIDGE_TOPIC, before + changes, "the bridge's burst");
        for ((name, pid), c0) in procs.iter().zip(&cpu0) {
            cpu.entry(name.clone()).or_default().push((cpu_ns(*pid) - c0) as f64 / 1e3 / per_round as f64);
        }
        let bridge = changes as f64 / last.duration_since(t).as_secs_f64();

        let before = count(&seen, PLAIN_TOPIC).0;
        let batch = updates(start, per_round);
        let m0 = cpu_ns(mosq.id());
        let t = Instant::now();
        plain.publish(&batch);
        let last = wait_metrics(&seen, PLAIN_TOPIC, before + changes, "the plain publisher's burst");
        broker_plain.push((cpu_ns(mosq.id()) - m0) as f64 / 1e3 / per_round as f64);
        let base = changes as f64 / last.duration_since(t).as_secs_f64();
        rate_rounds.push((bridge, base));
        start += per_round;
    }
    emit_rounds(
        "bridge_publish_rate",
        &rate_rounds,
        "changes/s",
        false,
        "tag changes from the bridge's input (durable messages through airlockd's journal) to a subscriber, vs the same updates published from memory with the same code",
        serde_json::Map::from_iter([
            ("feed_accepted_ms".to_string(), serde_json::json!((median(feed_ms) * 10.0).round() / 10.0)),
            (
                "cpu_us_per_update".to_string(),
                serde_json::Value::Object(
                    cpu.into_iter().map(|(k, v)| (k, serde_json::json!((median(v) * 100.0).round() / 100.0))).collect(),
                ),
            ),
            ("broker_cpu_us_per_update_plain".to_string(), serde_json::json!((median(broker_plain) * 100.0).round() / 100.0)),
        ]),
    );

    // bridge_latency
    let samples = if quick { 20 } else { 200 };
    let (mut lat_rounds, mut all_b, mut all_p) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut b, mut p) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let before = count(&seen, BRIDGE_TOPIC).0;
            let t = Instant::now();
            feed(&sock, 1, start);
            let last = wait_metrics(&seen, BRIDGE_TOPIC, before + TAGS as u64, "one update through the bridge");
            b.push(last.duration_since(t).as_secs_f64() * 1e6);
            let before = count(&seen, PLAIN_TOPIC).0;
            let one = updates(start, 1);
            let t = Instant::now();
            plain.publish(&one);
            let last = wait_metrics(&seen, PLAIN_TOPIC, before + TAGS as u64, "one update, plain");
            p.push(last.duration_since(t).as_secs_f64() * 1e6);
            start += 1;
        }
        lat_rounds.push((median(b.clone()), median(p.clone())));
        all_b.extend(b);
        all_p.extend(p);
    }
    let p99 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
    };
    let mut extra = serde_json::Map::new();
    extra.insert("p99_us".into(), serde_json::json!((p99(all_b) * 10.0).round() / 10.0));
    extra.insert("baseline_p99_us".into(), serde_json::json!((p99(all_p) * 10.0).round() / 10.0));
    emit_rounds(
        "bridge_latency",
        &lat_rounds,
        "us",
        true,
        "one update (10 tags) from the bridge's input to a subscriber (the echo worker's call included), vs published from memory",
        extra,
    );

    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), nix::sys::signal::SIGTERM);
    let mut d = d;
    let _ = d.wait();
    std::mem::forget(guard);

    device_latency(&bins, port, &seen, rounds, if quick { 10 } else { 50 });
    let _ = mosq.kill();
    let _ = mosq.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole site: the embedded default HMI with field polling every 20 ms, logic publishing
/// to the bridge, the bridge publishing as edge node `device`.
fn device_latency(bins: &Path, port: u16, seen: &Seen, rounds: usize, samples: usize) {
    let bridge = format!(
        "[[worker]]\nname = \"bridge\"\nexecutable = \"airlock-worker-bridge\"\npolicy = \"bridge\"\nuid = \"dynamic\"\n\
         services = [\"bridge\"]\nsettings = [\"plant\", \"bridge\"]\n\n[[worker.resource]]\nkind = \"tcp-connect\"\n\
         address = \"127.0.0.1:{port}\"\n\n[[permit]]\nfrom = \"logic\"\nto = \"bridge.update\"\nkind = \"send\"\n\n\
         # ---------------------------------------------------------------- the permit table"
    );
    let (d, dir, _ui) = start_hmi(
        bins,
        "multi-site-device",
        &[
            ("settings = [\"plant\"]\n\n[worker.limits]\ncpu-weight = 400", "settings = [\"plant\", \"logic\"]\n\n[worker.limits]\ncpu-weight = 400"),
            (
                "[settings.plcsim]",
                "[settings.logic]\npublish-to-bridge = true\n\n[settings.bridge]\ngroup = \"bench\"\nedge-node = \"device\"\nsample-time = false\n\n[settings.plcsim]",
            ),
            ("poll-ms = 500", "poll-ms = 20"),
            ("# ---------------------------------------------------------------- the permit table", &bridge),
        ],
    );
    let guard = KillOnPanic(d.id());
    let log = || std::fs::read_to_string(dir.join("airlockd.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log().contains("NBIRTH published: live") {
        assert!(Instant::now() < deadline, "the site's bridge did not go live:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // plcsim's port, as start_hmi chose it: the address after plcsim's tcp-listen.
    let cfg = std::fs::read_to_string(dir.join("airlock.toml")).expect("config");
    let plcsim = cfg.split("name = \"plcsim\"").nth(1).expect("plcsim");
    let device: u16 = plcsim
        .split("address = \"127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|p| p.parse().ok())
        .expect("plcsim's port");
    let mut modbus = TcpStream::connect(("127.0.0.1", device)).expect("connect to plcsim");
    modbus.set_nodelay(true).expect("nodelay");
    modbus.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let (mut per_round, mut all, mut raw) = (Vec::new(), Vec::new(), 100u16);
    for _ in 0..rounds {
        let mut lat = Vec::new();
        for _ in 0..samples {
            raw = if raw >= 900 { 100 } else { raw + 7 };
            let key = format!("outlet_valve={:.1}", f64::from(raw) / 10.0);
            // Modbus/TCP write single register 102 (the outlet valve, 0.1 %), unit 1.
            let [hi, lo] = raw.to_be_bytes();
            let t = Instant::now();
            modbus.write_all(&[0, 1, 0, 0, 0, 6, 1, 6, 0, 102, hi, lo]).expect("modbus write");
            let mut answer = [0u8; 12];
            std::io::Read::read_exact(&mut modbus, &mut answer).expect("modbus answer");
            let deadline = Instant::now() + Duration::from_secs(10);
            let arrived = loop {
                if let Some((_, at)) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                    break *at;
                }
                assert!(Instant::now() < deadline, "{key} never reached the subscriber:\n{}", log());
                std::thread::sleep(Duration::from_micros(200));
            };
            lat.push(arrived.duration_since(t).as_secs_f64() * 1e6);
            // Not in step with the poll.
            std::thread::sleep(Duration::from_millis(3 + u64::from(raw % 17)));
            seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }
        per_round.push((median(lat.clone()), 20_000.0));
        all.extend(lat);
    }
    all.sort_by(f64::total_cmp);
    let p99 = all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)];
    let mut extra = serde_json::Map::new();
    extra.insert("p99_us".into(), serde_json::json!((p99 * 10.0).round() / 10.0));
    emit_rounds(
        "bridge_latency_device",
        &per_round,
        "us",
        true,
        "a register change at the device until the subscriber has it (field polls every 20 ms; baseline: the poll interval)",
        extra,
    );
    common::hmi::stop(d);
    std::mem::forget(guard);
    let _ = std::fs::remove_dir_all(&dir);
}
