//! `cargo bench -p airlock-protocol --bench ipc`: two-process benchmarks of the secure channel
//! and the bulk transport, each against a baseline measured in the same run. Prints one JSON
//! object per line: `scenario`, `airlock`, `baseline`, `unit`, `ratio` (lower is better),
//! `ratio_range` and `rounds`. Every scenario runs in `rounds` rounds (`AIRLOCK_BENCH_ROUNDS`;
//! 5, or 1 with `AIRLOCK_BENCH_QUICK`), each measuring it and its baseline back to back; its
//! `ratio` is the median of the rounds' ratios, `ratio_range` their least and greatest, and
//! `airlock` and `baseline` the medians of the rounds' figures.
//!
//! The peer is this same binary re-executed with `--peer MODE`; it receives its descriptors
//! through the real hand-off. Pinned scenarios run both processes on CPU 0.
//!
//! The `stream_*` scenarios put the consumer of a stream (`airlock_protocol::stream`) in the
//! re-executed peer, which gets the stream's memfd at fd 3 and a SEQPACKET control socket at
//! fd 4 (its parameters and key arrive on the socket, as the supervisor's wire message would
//! carry them); the baselines are raw SEQPACKET sockets measured in the same run.
//!
//! The `shm_call_*` scenarios make calls answered in place in a shared region
//! (`airlock_protocol::region`): the callee, in the re-executed peer (region memfd at fd 3,
//! control socket at fd 4 as for streams), adds 1 to every byte of each request and writes the
//! result back as the answer. `shm_call_64`: median microseconds of an encrypted 64-byte call
//! round trip, against a raw SEQPACKET 64-byte ping-pong (the baseline of `rtt_64`); target
//! ratio at most 1.0. `shm_call_1m_plain`: median microseconds of a 1 MiB call in a plaintext
//! region, against the same exchange through a sealed memfd each way (the caller creates a
//! memfd, writes the request, seals it and sends it with `SCM_RIGHTS`; the peer maps it,
//! computes the answer into a fresh sealed memfd and sends that back; the caller maps it and
//! copies the answer out); target ratio at most 0.5.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_protocol::region::{self, RegionCallee, RegionCaller, RegionParams};
use airlock_protocol::stream::{self, StreamError, StreamKey, StreamParams, StreamReader, StreamWriter};
use airlock_protocol::sys;
use airlock_protocol::{handoff, BulkMode, BulkPool, BulkWriter, Channel, Hello, Limits, Role};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum BenchMsg {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Done,
    Count(u64),
    Fold,
    Sum(u64),
}

const MIB16: usize = 16 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        let mode = args.get(i + 1).cloned().unwrap_or_default();
        if let Err(e) = peer(&mode) {
            eprintln!("bench peer {mode}: {e}");
            std::process::exit(1);
        }
        return;
    }
    // AIRLOCK_BENCH_QUICK=1: fewer iterations. AIRLOCK_BENCH_ONLY=name[,name]: some scenarios.
    let quick = std::env::var("AIRLOCK_BENCH_QUICK").is_ok();
    let only_list = std::env::var("AIRLOCK_BENCH_ONLY").ok();
    let want = |name: &str| only_list.as_deref().is_none_or(|l| l.split(',').any(|x| x == name));
    // Each scenario's figure is the median of this many same-run ratios (AIRLOCK_BENCH_ROUNDS;
    // 5, or 1 in quick mode), printed with their range once every round ran.
    let rounds: usize = std::env::var("AIRLOCK_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(if quick { 1 } else { 5 });
    for _ in 0..rounds {
        run_round(quick, &want);
    }
    print_rows();
}

/// Every wanted scenario once, pinned then unpinned.
fn run_round(quick: bool, want: &dyn Fn(&str) -> bool) {
    for pinned in [true, false] {
        if pinned {
            sys::pin_to_cpu(0).expect("pin to CPU 0");
        } else {
            sys::unpin().expect("unpin");
        }
        let sfx = if pinned { "" } else { "_unpinned" };
        if want("rtt_64") {
            rtt_64(sfx, quick);
        }
        if pinned && want("rtt_64_in_process") {
            rtt_64_in_process(quick);
        }
        if want("msgs_1k") {
            msgs_1k(sfx, quick);
        }
        if want("bulk_16m") {
            bulk_16m(sfx, quick, BulkMode::Sealed);
        }
        if want("bulk_16m_encrypted") {
            bulk_16m(sfx, quick, BulkMode::SealedEncrypted);
        }
        if want("stream_1k_plain") {
            stream_1k(sfx, quick, false);
        }
        if want("stream_1k") {
            stream_1k(sfx, quick, true);
        }
        if want("stream_wakeup") {
            stream_wakeup(sfx, quick);
        }
        if want("shm_call_64") {
            shm_call_64(sfx, quick);
        }
        if want("shm_call_1m_plain") {
            shm_call_1m_plain(sfx, quick);
        }
        if pinned && want("memcpy_16m_reference") {
            memcpy_16m();
        }
        if pinned && want("bulk_crossover") {
            bulk_crossover(quick);
        }
    }
}

/// One round's figures of one scenario.
struct Row {
    scenario: String,
    airlock: f64,
    baseline: f64,
    unit: &'static str,
    ratio: f64,
    extra: Option<(String, String)>,
}

thread_local! {
    static ROWS: std::cell::RefCell<Vec<Row>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records one round's figures; [`print_rows`] prints each scenario once every round ran.
fn emit(
    scenario: &str,
    airlock: f64,
    baseline: f64,
    unit: &'static str,
    lower_is_better: bool,
    extra: Option<(&str, String)>,
) {
    let ratio = if lower_is_better { airlock / baseline } else { baseline / airlock };
    let extra = extra.map(|(k, v)| (k.to_string(), v));
    ROWS.with(|r| r.borrow_mut().push(Row { scenario: scenario.to_string(), airlock, baseline, unit, ratio, extra }));
}

/// One line per scenario, in the order first measured: the median of its rounds' ratios (each
/// round measures the scenario and its baseline back to back), their range, and the median
/// airlock and baseline figures.
fn print_rows() {
    let rows = ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    let mut order: Vec<&str> = Vec::new();
    for r in &rows {
        if !order.contains(&r.scenario.as_str()) {
            order.push(&r.scenario);
        }
    }
    for name in order {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.scenario == name).collect();
        let ratios: Vec<f64> = mine.iter().map(|r| r.ratio).collect();
        let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let mut o = serde_json::json!({
            "scenario": name,
            "airlock": round(median(mine.iter().map(|r| r.airlock).collect())),
            "baseline": round(median(mine.iter().map(|r| r.baseline).collect())),
            "unit": mine[0].unit,
            "ratio": (median(ratios) * 1000.0).round() / 1000.0,
            "ratio_range": [(lo * 1000.0).round() / 1000.0, (hi * 1000.0).round() / 1000.0],
            "rounds": mine.len(),
        });
        if let Some((k, v)) = mine.last().and_then(|r| r.extra.clone()) {
            o[k] = serde_json::Value::String(v);
        }
        println!("{o}");
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

// ------------------------------------------------------------------ spawning peers

fn spawn(mode: &str, fds: Vec<(OwnedFd, i32)>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args(["--peer", mode]).stdin(Stdio::null());
    let guard = sys::install_child_fds(&mut cmd, fds).expect("install fds");
    let child = cmd.spawn().expect("spawn peer");
    drop(guard);
    child
}

fn spawn_airlock(mode: &str) -> (Channel, Child) {
    let (mut ch, end) = handoff::prepare(bench_limits(), airlock_protocol::DEFAULT_REKEY_INTERVAL).expect("prepare");
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args(["--peer", mode]).stdin(Stdio::null());
    let guard = end.install(&mut cmd, Vec::new()).expect("install");
    let child = cmd.spawn().expect("spawn");
    drop(guard);
    ch.handshake(&Hello::new(Role::Supervisor, "bench")).expect("handshake");
    (ch, child)
}

fn spawn_raw(mode: &str, stream: bool) -> (OwnedFd, Child) {
    let (a, b) = if stream { sys::stream_pair() } else { sys::seqpacket_pair() }.expect("socketpair");
    sys::set_socket_buffers(a.as_fd(), 256 * 1024).expect("bufs");
    sys::set_socket_buffers(b.as_fd(), 256 * 1024).expect("bufs");
    let child = spawn(mode, vec![(b, 3)]);
    (a, child)
}

fn bench_limits() -> Limits {
    Limits::default()
}

fn finish(mut child: Child) {
    let _ = child.wait();
}

// ------------------------------------------------------------------ scenarios

fn rtt_64(sfx: &str, quick: bool) {
    let iters = if quick { 2000 } else { 20000 };
    let payload = vec![0x5au8; 64];
    let (mut ch, child) = spawn_airlock("airlock");
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        ch.send(&BenchMsg::Echo(payload.clone())).expect("send");
        let r = ch.recv::<BenchMsg>().expect("recv");
        if i >= iters / 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert!(matches!(r.msg, BenchMsg::Echo(v) if v.len() == 64));
    }
    drop(ch);
    finish(child);
    let airlock = median(times);
    emit(&format!("rtt_64{sfx}"), airlock, raw_rtt_64(iters), "us", true, None);
}

/// Median microseconds of a 64-byte round trip over a raw SEQPACKET pair to an echoing peer
/// process (`iters` measured after `iters / 10` of warm-up): the baseline of `rtt_64` and
/// `shm_call_64`.
fn raw_rtt_64(iters: usize) -> f64 {
    let payload = vec![0x5au8; 64];
    let (sock, child) = spawn_raw("raw-echo", false);
    let mut buf = [0u8; 256];
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        sys::send_bytes(sock.as_fd(), &payload).expect("send");
        let n = sys::recv_bytes(sock.as_fd(), &mut buf).expect("recv");
        if i >= iters / 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert_eq!(n, 64);
    }
    drop(sock);
    finish(child);
    median(times)
}

/// What the channel itself costs per 64-byte round trip, without any scheduling: both ends in
/// this thread (send, receive, send back, receive), against the same on a raw SEQPACKET pair.
/// The difference (crypto, codec, sendmsg/recvmsg with descriptors) is what `rtt_64` adds to a
/// raw round trip at the least; a reference for reading `rtt_64`'s ratio.
fn rtt_64_in_process(quick: bool) {
    let iters = if quick { 5000 } else { 50000 };
    let payload = vec![0x5au8; 64];
    let (mut a, mut b) = Channel::pair(bench_limits(), airlock_protocol::DEFAULT_REKEY_INTERVAL).expect("pair");
    let t = std::thread::spawn(move || {
        b.handshake(&Hello::new(Role::Worker, "b")).expect("handshake");
        b
    });
    a.handshake(&Hello::new(Role::Supervisor, "a")).expect("handshake");
    let mut b = t.join().expect("join");
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.send(&BenchMsg::Echo(payload.clone())).expect("send");
        let BenchMsg::Echo(v) = b.recv::<BenchMsg>().expect("recv").msg else { panic!("echo") };
        b.send(&BenchMsg::Echo(v)).expect("send back");
        let r = a.recv::<BenchMsg>().expect("recv back");
        times.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(matches!(r.msg, BenchMsg::Echo(v) if v.len() == 64));
    }
    let airlock = median(times);
    let (x, y) = sys::seqpacket_pair().expect("pair");
    let mut buf = [0u8; 256];
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        sys::send_bytes(x.as_fd(), &payload).expect("send");
        let n = sys::recv_bytes(y.as_fd(), &mut buf).expect("recv");
        sys::send_bytes(y.as_fd(), &buf[..n]).expect("send back");
        let n = sys::recv_bytes(x.as_fd(), &mut buf).expect("recv back");
        times.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(n, 64);
    }
    let raw = median(times);
    emit(
        "rtt_64_in_process",
        airlock,
        raw,
        "us",
        true,
        Some((
            "note",
            format!("both ends in one thread, no scheduling: the channel adds {:.2} us per round trip", airlock - raw),
        )),
    );
}

fn msgs_1k(sfx: &str, quick: bool) {
    let n = if quick { 20_000 } else { 100_000 };
    let runs = 5;
    let payload = vec![0xa5u8; 1024];
    let batch: Vec<BenchMsg> = (0..64).map(|_| BenchMsg::Data(payload.clone())).collect();
    let (mut ch, child) = spawn_airlock("airlock");
    let mut rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = (n - sent).min(batch.len());
            ch.send_batch(&batch[..k]).expect("batch");
            sent += k;
        }
        ch.send(&BenchMsg::Done).expect("done");
        let r = ch.recv::<BenchMsg>().expect("count");
        let secs = t.elapsed().as_secs_f64();
        assert!(matches!(r.msg, BenchMsg::Count(c) if c == n as u64), "{:?}", r.msg);
        rates.push(n as f64 / secs);
    }
    drop(ch);
    finish(child);
    let airlock = median(rates);

    let (sock, child) = spawn_raw("raw-sink", false);
    let mut rates = Vec::new();
    let mut ack = [0u8; 8];
    for _ in 0..runs {
        let t = Instant::now();
        sys::send_bytes(sock.as_fd(), &(n as u64).to_le_bytes()).expect("send n");
        for _ in 0..n {
            sys::send_bytes(sock.as_fd(), &payload).expect("send");
        }
        sys::recv_bytes(sock.as_fd(), &mut ack).expect("ack");
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    drop(sock);
    finish(child);
    emit(&format!("msgs_1k{sfx}"), airlock, median(rates), "msgs/s", false, None);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect()
}

/// Reads every byte: a wrapping sum of little-endian u64 words (vectorizes well).
fn fold(b: &[u8]) -> u64 {
    let mut acc = 0u64;
    let chunks = b.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc = acc.wrapping_add(u64::from_le_bytes(w));
    }
    for &x in rem {
        acc = acc.wrapping_add(u64::from(x));
    }
    acc
}

fn bulk_16m(sfx: &str, quick: bool, mode: BulkMode) {
    let iters = if quick { 5 } else { 25 };
    let data = pattern(MIB16);
    let want = fold(&data);
    let (mut ch, child) = spawn_airlock("airlock");
    let pool = BulkPool::new(MIB16, 2).expect("pool");
    let mut times = Vec::new();
    for _ in 0..iters + 2 {
        pool.wait_full().expect("pool");
        let t = Instant::now();
        let mut w = BulkWriter::allocate_from(&pool, MIB16, ch.limits().inline_threshold).expect("writer");
        w.as_mut_slice().copy_from_slice(&data);
        ch.send_bulk(&BenchMsg::Fold, &[], w, mode).expect("send bulk");
        let r = ch.recv::<BenchMsg>().expect("recv");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(matches!(r.msg, BenchMsg::Sum(s) if s == want));
    }
    drop(ch);
    finish(child);
    let airlock = median(times[2..].to_vec());

    let baseline = if mode == BulkMode::Sealed {
        let (sock, child) = spawn_raw("stream-sink", true);
        let mut f = std::fs::File::from(sock);
        let mut times = Vec::new();
        let mut ack = [0u8; 8];
        for _ in 0..iters + 2 {
            let t = Instant::now();
            f.write_all(&(MIB16 as u64).to_le_bytes()).expect("len");
            f.write_all(&data).expect("write");
            f.read_exact(&mut ack).expect("ack");
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        drop(f);
        finish(child);
        median(times[2..].to_vec())
    } else {
        let key = chacha20poly1305::Key::from([7u8; 32]);
        let c = ChaCha20Poly1305::new(&key);
        let nonce = chacha20poly1305::Nonce::from([1u8; 12]);
        let mut buf = data.clone();
        let mut times = Vec::new();
        for _ in 0..iters + 2 {
            let t = Instant::now();
            let tag = c.encrypt_in_place_detached(&nonce, b"", &mut buf).expect("seal");
            c.decrypt_in_place_detached(&nonce, b"", &mut buf, &tag).expect("open");
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        assert_eq!(fold(&buf), want);
        median(times[2..].to_vec())
    };
    let name = if mode == BulkMode::Sealed { "bulk_16m" } else { "bulk_16m_encrypted" };
    emit(&format!("{name}{sfx}"), airlock, baseline, "ms", true, Some(("note", huge_pages_offered())));
}

/// Whether this host offers huge pages for bulk memfds, which the bulk figures depend on.
fn huge_pages_offered() -> String {
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("HugePages_Free:").map(|v| v.trim().to_string())))
        .unwrap_or_else(|| "?".into());
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .ok()
        .and_then(|t| t.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string()))
        .unwrap_or_else(|| "?".into());
    format!("huge pages offered: {free} free hugetlb pages (vm.nr_hugepages), shmem THP {thp}")
}

fn memcpy_16m() {
    let src = pattern(MIB16);
    let mut dst = vec![0u8; MIB16];
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let m = median(times);
    emit("memcpy_16m_reference", m, m, "ms", true, Some(("note", "in-process memcpy of 16 MiB, for reference".into())));
}

fn bulk_crossover(quick: bool) {
    let iters = if quick { 50 } else { 300 };
    let (mut ch, child) = spawn_airlock("airlock");
    let sizes = [1024usize, 4096, 8192, 16384, 24576, 32768, 49152, 61440];
    let mut crossover = None;
    for &len in &sizes {
        let data = pattern(len);
        let want = fold(&data);
        let mut run = |threshold: usize| {
            let mut times = Vec::new();
            for _ in 0..iters {
                let t = Instant::now();
                let w = BulkWriter::copy_from(&data, threshold).expect("writer");
                ch.send_bulk(&BenchMsg::Fold, &[], w, BulkMode::Sealed).expect("send");
                let r = ch.recv::<BenchMsg>().expect("recv");
                times.push(t.elapsed().as_secs_f64() * 1e6);
                assert!(matches!(r.msg, BenchMsg::Sum(s) if s == want));
            }
            median(times)
        };
        let inline = run(usize::MAX);
        let memfd = run(0);
        emit(
            &format!("bulk_crossover_{len}"),
            memfd,
            inline,
            "us",
            true,
            Some(("note", "memfd vs inline frame".into())),
        );
        if crossover.is_none() && memfd < inline {
            crossover = Some(len);
        }
    }
    drop(ch);
    finish(child);
    let measured = crossover.map_or_else(|| "above 61440".to_string(), |c| c.to_string());
    let c = crossover.unwrap_or(64 * 1024) as f64;
    let configured = airlock_protocol::bulk::DEFAULT_INLINE_THRESHOLD as f64;
    emit(
        "bulk_crossover",
        c,
        configured,
        "bytes",
        true,
        Some(("note", format!("smallest size where a memfd beat inline: {measured}; airlock = measured, baseline = configured threshold"))),
    );
}

// ------------------------------------------------------------------ streams

/// What the stream peer is told on its control socket: the parameters and key the supervisor
/// would send in a wire message.
#[derive(Debug, Serialize, Deserialize)]
struct StreamSetup {
    params: StreamParams,
    key: Option<StreamKey>,
}

const STREAM_WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Creates a stream, spawns `mode` as its consumer (memfd at fd 3, control socket at fd 4) and
/// attaches the producer here.
fn spawn_stream(mode: &str, params: StreamParams) -> (StreamWriter, OwnedFd, Child) {
    let area = stream::create_area(&params).expect("create stream area");
    let key = params.encrypted.then(|| StreamKey::generate().expect("stream key"));
    let (ctl, peer_ctl) = sys::seqpacket_pair().expect("socketpair");
    let setup = postcard::to_allocvec(&StreamSetup { params, key: key.clone() }).expect("encode setup");
    sys::send_bytes(ctl.as_fd(), &setup).expect("send setup");
    let writer = StreamWriter::attach(area.try_clone().expect("dup"), params, key).expect("attach writer");
    let child = spawn(mode, vec![(area, 3), (peer_ctl, 4)]);
    (writer, ctl, child)
}

/// 1 KiB records per second through a stream (the consumer in another process, every record
/// copied out, plaintext or authenticated and decrypted), against raw SEQPACKET with one
/// `send` per message.
fn stream_1k(sfx: &str, quick: bool, encrypted: bool) {
    let n = if quick { 20_000 } else { 100_000 };
    let runs = 5;
    let params = StreamParams { ring_bytes: 256 * 1024, max_record: 4096, encrypted };
    let (mut w, ctl, child) = spawn_stream("ring-sink", params);
    let mut payload = vec![0xa5u8; 1024];
    let mut rates = Vec::new();
    let mut ack = [0u8; 8];
    for _ in 0..runs {
        let t = Instant::now();
        for i in 0..n as u64 {
            payload[..8].copy_from_slice(&i.to_le_bytes());
            w.send(&payload, STREAM_WAIT).expect("stream send");
        }
        // An 8-byte record ends the run; the peer answers with its count.
        w.send(&(n as u64).to_le_bytes(), STREAM_WAIT).expect("stream send end");
        sys::recv_bytes(ctl.as_fd(), &mut ack).expect("count");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(u64::from_le_bytes(ack), n as u64, "peer counted every record");
        rates.push(n as f64 / secs);
    }
    w.close();
    drop(ctl);
    finish(child);
    let airlock = median(rates);

    let (sock, child) = spawn_raw("raw-sink", false);
    let payload = vec![0xa5u8; 1024];
    let mut rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        sys::send_bytes(sock.as_fd(), &(n as u64).to_le_bytes()).expect("send n");
        for _ in 0..n {
            sys::send_bytes(sock.as_fd(), &payload).expect("send");
        }
        sys::recv_bytes(sock.as_fd(), &mut ack).expect("ack");
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    drop(sock);
    finish(child);
    let name = if encrypted { "stream_1k" } else { "stream_1k_plain" };
    let note = if encrypted {
        format!(
            "1 KiB records, ChaCha20-Poly1305 per record, 256 KiB ring; baseline: raw SEQPACKET, one send per \
             message; the AEAD alone (seal + open of 1 KiB, one thread) runs at {:.0} records/s here",
            aead_1k_rate(n)
        )
    } else {
        "1 KiB records, plaintext, 256 KiB ring; baseline: raw SEQPACKET, one send per message".to_string()
    };
    emit(&format!("{name}{sfx}"), airlock, median(rates), "msgs/s", false, Some(("note", note)));
}

/// Seals and opens `n` 1 KiB records in this thread: the floor of an encrypted stream's cost.
fn aead_1k_rate(n: usize) -> f64 {
    let c = ChaCha20Poly1305::new(&chacha20poly1305::Key::from([7u8; 32]));
    let mut buf = vec![0xa5u8; 1024];
    let t = Instant::now();
    for i in 0..n as u64 {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&i.to_le_bytes());
        let nonce = chacha20poly1305::Nonce::from(nonce);
        let tag = c.encrypt_in_place_detached(&nonce, b"hdr", &mut buf).expect("seal");
        c.decrypt_in_place_detached(&nonce, b"hdr", &mut buf, &tag).expect("open");
    }
    std::hint::black_box(&buf);
    n as f64 / t.elapsed().as_secs_f64()
}

/// Nanoseconds of the realtime clock: the one clock both processes can stamp and compare.
fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One-way latency of one record to a consumer asleep in `recv` (1 ms idle before each), stamped
/// by the sender and compared by the receiver, against a SEQPACKET datagram to a receiver asleep
/// in `recv`.
fn stream_wakeup(sfx: &str, quick: bool) {
    let iters = if quick { 200 } else { 2000 };
    let params = StreamParams { ring_bytes: 64 * 1024, max_record: 1024, encrypted: true };
    let (mut w, ctl, child) = spawn_stream("ring-latency", params);
    let mut rec = [0u8; 64];
    let mut lat = [0u8; 8];
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        std::thread::sleep(Duration::from_millis(1));
        rec[..8].copy_from_slice(&now_ns().to_le_bytes());
        w.send(&rec, STREAM_WAIT).expect("stream send");
        sys::recv_bytes(ctl.as_fd(), &mut lat).expect("latency");
        if i >= iters / 10 {
            times.push(u64::from_le_bytes(lat) as f64 / 1e3);
        }
    }
    w.close();
    drop(ctl);
    finish(child);
    let airlock = median(times);

    let (sock, child) = spawn_raw("raw-latency", false);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        std::thread::sleep(Duration::from_millis(1));
        rec[..8].copy_from_slice(&now_ns().to_le_bytes());
        sys::send_bytes(sock.as_fd(), &rec).expect("send");
        sys::recv_bytes(sock.as_fd(), &mut lat).expect("latency");
        if i >= iters / 10 {
            times.push(u64::from_le_bytes(lat) as f64 / 1e3);
        }
    }
    drop(sock);
    finish(child);
    emit(
        &format!("stream_wakeup{sfx}"),
        airlock,
        median(times),
        "us",
        true,
        Some(("note", "one-way, 64-byte encrypted record to a sleeping consumer, median; baseline: SEQPACKET datagram to a receiver blocked in recv".into())),
    );
}

/// The consumer end in a peer: its control socket and the reader it attached.
fn stream_peer_attach() -> Result<(OwnedFd, StreamReader), String> {
    let area = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
    let ctl = sys::claim_inherited_fd(4).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let n = sys::recv_bytes(ctl.as_fd(), &mut buf).map_err(|e| e.to_string())?;
    let setup: StreamSetup = postcard::from_bytes(&buf[..n]).map_err(|e| e.to_string())?;
    let reader = StreamReader::attach(area, setup.params, setup.key).map_err(|e| e.to_string())?;
    Ok((ctl, reader))
}

// ------------------------------------------------------------------ region calls

/// What the region callee is told on its control socket, as a supervisor's wire message would.
#[derive(Debug, Serialize, Deserialize)]
struct RegionSetup {
    params: RegionParams,
    key: Option<StreamKey>,
}

const CALL_WAIT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

/// Creates a region, spawns `mode` as its callee (memfd at fd 3, control socket at fd 4) and
/// attaches the caller here.
fn spawn_region(mode: &str, params: RegionParams) -> (RegionCaller, OwnedFd, Child) {
    let area = region::create_area(&params).expect("create region area");
    let key = params.encrypted.then(|| StreamKey::generate().expect("region key"));
    let (ctl, peer_ctl) = sys::seqpacket_pair().expect("socketpair");
    let setup = postcard::to_allocvec(&RegionSetup { params, key: key.clone() }).expect("encode setup");
    sys::send_bytes(ctl.as_fd(), &setup).expect("send setup");
    let caller = RegionCaller::attach(area.try_clone().expect("dup"), params, key).expect("attach caller");
    let child = spawn(mode, vec![(area, 3), (peer_ctl, 4)]);
    (caller, ctl, child)
}

fn plus_one(b: &mut [u8]) {
    for x in b.iter_mut() {
        *x = x.wrapping_add(1);
    }
}

/// An encrypted 64-byte call answered in place by a callee in another process, against a raw
/// SEQPACKET 64-byte round trip.
fn shm_call_64(sfx: &str, quick: bool) {
    let iters = if quick { 2000 } else { 20000 };
    let params = RegionParams { region_bytes: 4096, encrypted: true };
    let (mut caller, ctl, child) = spawn_region("region-callee", params);
    let mut request = [0u8; 64];
    let mut answer = Vec::with_capacity(params.max_message());
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        request.fill(i as u8);
        let t = Instant::now();
        caller.call(&request, &mut answer, CALL_WAIT).expect("region call");
        if i >= iters / 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert!(answer.len() == 64 && answer.iter().all(|&b| b == (i as u8).wrapping_add(1)), "answer {i}");
    }
    caller.close();
    drop(ctl);
    finish(child);
    let airlock = median(times);
    emit(
        &format!("shm_call_64{sfx}"),
        airlock,
        raw_rtt_64(iters),
        "us",
        true,
        Some(("note", "encrypted 64-byte call answered in place (callee adds 1 to each byte), median round trip; baseline: raw SEQPACKET 64-byte ping-pong".into())),
    );
}

/// A 1 MiB call in a plaintext region, every byte rewritten by the callee, against the same
/// exchange through a fresh sealed memfd each way.
fn shm_call_1m_plain(sfx: &str, quick: bool) {
    let iters = if quick { 30 } else { 300 };
    let warm = 5;
    let data = pattern(MIB);
    let mut want = data.clone();
    plus_one(&mut want);
    let params = RegionParams { region_bytes: MIB as u32, encrypted: false };
    let (mut caller, ctl, child) = spawn_region("region-callee", params);
    let mut answer = Vec::with_capacity(MIB);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + warm {
        let t = Instant::now();
        caller.call(&data, &mut answer, CALL_WAIT).expect("region call");
        if i >= warm {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert!(answer == want, "answer {i}");
    }
    caller.close();
    drop(ctl);
    finish(child);
    let airlock = median(times);

    let (sock, child) = spawn_raw("memfd-callee", false);
    let mut slot = sys::RecvSlot::new(64, 1);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + warm {
        let t = Instant::now();
        let fd = sys::memfd_create(c"bench-request", false).expect("memfd");
        sys::pwrite_all(fd.as_fd(), &data, 0).expect("write request");
        sys::add_seals(fd.as_fd(), sys::SEAL_SET).expect("seal request");
        sys::send_datagram(sock.as_fd(), &(MIB as u64).to_le_bytes(), &[fd.as_raw_fd()]).expect("send");
        drop(fd);
        let mut got = sys::recv_datagram(sock.as_fd(), &mut slot, false).expect("recv").expect("datagram");
        let fd = got.fds.pop().expect("answer memfd");
        airlock_protocol::bulk::verify_sealed_memfd(fd.as_fd(), MIB as u64, MIB as u64).expect("sealed answer");
        let map = sys::Mapping::map(fd.as_fd(), MIB, sys::MapMode::SharedRead).expect("map answer");
        answer.clear();
        answer.extend_from_slice(map.as_slice());
        drop(map);
        drop(fd);
        if i >= warm {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert!(answer == want, "memfd answer {i}");
    }
    drop(sock);
    finish(child);
    emit(
        &format!("shm_call_1m_plain{sfx}"),
        airlock,
        median(times),
        "us",
        true,
        Some(("note", "1 MiB call, plaintext region, callee rewrites every byte in place, median round trip; baseline: a fresh sealed memfd each way over SEQPACKET (write + seal + SCM_RIGHTS; map, compute into a new memfd, seal, send; map and copy out)".into())),
    );
}

// ------------------------------------------------------------------ peers

fn peer(mode: &str) -> Result<(), String> {
    match mode {
        "airlock" => {
            let mut ch = handoff::take_inherited(bench_limits()).map_err(|e| e.to_string())?;
            ch.handshake(&Hello::new(Role::Worker, "bench-peer")).map_err(|e| e.to_string())?;
            // Received payloads are unmapped and freed at idle priority, after the answer, as
            // the sender's pool allocates and faults them ahead (`BulkReaper`, `BulkPool`).
            let reaper = airlock_protocol::BulkReaper::new(2).map_err(|e| e.to_string())?;
            let mut count = 0u64;
            loop {
                let r = match ch.recv::<BenchMsg>() {
                    Ok(r) => r,
                    Err(airlock_protocol::ChannelError::Closed) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                };
                match r.msg {
                    BenchMsg::Echo(v) => ch.send(&BenchMsg::Echo(v)).map_err(|e| e.to_string())?,
                    BenchMsg::Data(_) => count += 1,
                    BenchMsg::Done => {
                        ch.send(&BenchMsg::Count(count)).map_err(|e| e.to_string())?;
                        count = 0;
                    }
                    BenchMsg::Fold => {
                        let s = r.bulk.as_deref().map(fold).unwrap_or(0);
                        ch.send(&BenchMsg::Sum(s)).map_err(|e| e.to_string())?;
                        if let Some(b) = r.bulk {
                            reaper.release(b);
                        }
                    }
                    other => return Err(format!("unexpected {other:?}")),
                }
            }
        }
        "raw-echo" => {
            let s = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 256];
            loop {
                let n = sys::recv_bytes(s.as_fd(), &mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                sys::send_bytes(s.as_fd(), &buf[..n]).map_err(|e| e.to_string())?;
            }
        }
        "raw-sink" => {
            let s = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = sys::recv_bytes(s.as_fd(), &mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                let mut w = [0u8; 8];
                w.copy_from_slice(&buf[..8]);
                for _ in 0..u64::from_le_bytes(w) {
                    sys::recv_bytes(s.as_fd(), &mut buf).map_err(|e| e.to_string())?;
                }
                sys::send_bytes(s.as_fd(), &[1u8; 8]).map_err(|e| e.to_string())?;
            }
        }
        "stream-sink" => {
            let s = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let mut f = std::fs::File::from(s);
            let mut buf = vec![0u8; MIB16];
            loop {
                let mut len = [0u8; 8];
                if f.read_exact(&mut len).is_err() {
                    return Ok(());
                }
                let len = u64::from_le_bytes(len) as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                f.read_exact(&mut buf[..len]).map_err(|e| e.to_string())?;
                std::hint::black_box(&buf);
                f.write_all(&[1u8; 8]).map_err(|e| e.to_string())?;
            }
        }
        "ring-sink" => {
            let (ctl, mut r) = stream_peer_attach()?;
            let mut count = 0u64;
            loop {
                match r.recv(Duration::from_secs(30)) {
                    Ok(Some(rec)) if rec.len() == 1024 => {
                        let mut i = [0u8; 8];
                        i.copy_from_slice(&rec[..8]);
                        if u64::from_le_bytes(i) != count {
                            return Err(format!("record {count} arrived as {}", u64::from_le_bytes(i)));
                        }
                        count += 1;
                    }
                    Ok(Some(rec)) if rec.len() == 8 => {
                        sys::send_bytes(ctl.as_fd(), &count.to_le_bytes()).map_err(|e| e.to_string())?;
                        count = 0;
                    }
                    Ok(Some(rec)) => return Err(format!("unexpected record of {} bytes", rec.len())),
                    Ok(None) => return Err("no record for 30 s".into()),
                    Err(StreamError::Closed) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        "ring-latency" => {
            let (ctl, mut r) = stream_peer_attach()?;
            loop {
                match r.recv(Duration::from_secs(30)) {
                    Ok(Some(rec)) if rec.len() >= 8 => {
                        let at = now_ns();
                        let mut t = [0u8; 8];
                        t.copy_from_slice(&rec[..8]);
                        let lat = at.saturating_sub(u64::from_le_bytes(t));
                        sys::send_bytes(ctl.as_fd(), &lat.to_le_bytes()).map_err(|e| e.to_string())?;
                    }
                    Ok(Some(rec)) => return Err(format!("unexpected record of {} bytes", rec.len())),
                    Ok(None) => return Err("no record for 30 s".into()),
                    Err(StreamError::Closed) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        "region-callee" => {
            let area = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let ctl = sys::claim_inherited_fd(4).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 256];
            let n = sys::recv_bytes(ctl.as_fd(), &mut buf).map_err(|e| e.to_string())?;
            let setup: RegionSetup = postcard::from_bytes(&buf[..n]).map_err(|e| e.to_string())?;
            let mut callee = RegionCallee::attach(area, setup.params, setup.key).map_err(|e| e.to_string())?;
            loop {
                let served = callee.serve(Duration::from_secs(30), |b| {
                    plus_one(b);
                    Ok(())
                });
                match served {
                    Ok(true) => {}
                    Ok(false) => return Err("no call for 30 s".into()),
                    Err(StreamError::Closed) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        "memfd-callee" => {
            let s = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let mut slot = sys::RecvSlot::new(64, 1);
            loop {
                let Some(mut got) = sys::recv_datagram(s.as_fd(), &mut slot, false).map_err(|e| e.to_string())? else {
                    continue;
                };
                if got.len == 0 {
                    return Ok(());
                }
                let mut len = [0u8; 8];
                len.copy_from_slice(&slot.buf[..8]);
                let len = u64::from_le_bytes(len);
                let fd = got.fds.pop().ok_or("no memfd")?;
                airlock_protocol::bulk::verify_sealed_memfd(fd.as_fd(), len, MIB as u64).map_err(|e| e.to_string())?;
                let len = len as usize;
                let input = sys::Mapping::map(fd.as_fd(), len, sys::MapMode::SharedRead).map_err(|e| e.to_string())?;
                let out = sys::memfd_create(c"bench-answer", false).map_err(|e| e.to_string())?;
                sys::ftruncate(out.as_fd(), len as u64).map_err(|e| e.to_string())?;
                let mut map =
                    sys::Mapping::map(out.as_fd(), len, sys::MapMode::SharedWrite).map_err(|e| e.to_string())?;
                let dst = map.as_mut_slice().ok_or("answer mapping not writable")?;
                for (d, s) in dst.iter_mut().zip(input.as_slice()) {
                    *d = s.wrapping_add(1);
                }
                drop(map);
                drop(input);
                drop(fd);
                sys::add_seals(out.as_fd(), sys::SEAL_SET).map_err(|e| e.to_string())?;
                sys::send_datagram(s.as_fd(), &(len as u64).to_le_bytes(), &[out.as_raw_fd()])
                    .map_err(|e| e.to_string())?;
            }
        }
        "raw-latency" => {
            let s = sys::claim_inherited_fd(3).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 256];
            loop {
                let n = sys::recv_bytes(s.as_fd(), &mut buf).map_err(|e| e.to_string())?;
                let at = now_ns();
                if n == 0 {
                    return Ok(());
                }
                let mut t = [0u8; 8];
                t.copy_from_slice(&buf[..8]);
                let lat = at.saturating_sub(u64::from_le_bytes(t));
                sys::send_bytes(s.as_fd(), &lat.to_le_bytes()).map_err(|e| e.to_string())?;
            }
        }
        other => Err(format!("unknown peer mode {other}")),
    }
}
