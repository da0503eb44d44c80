//! The hostile worker: plays a fully compromised worker after its confinement is applied
//! (attacker code talking raw frames on its channel) and performs one attack on the supervisor,
//! named by its first argument, then serves `hostile.echo` (so that a test can see it survived
//! or was killed). Every forged text carries the marker `FORGED`. (A test worker; not packaged.)
//!
//! Attacks:
//! - `forge-log`: log lines forged through every string it chooses: the services it announces,
//!   an event, its stderr, the service and method of a call and of a message.
//! - `flood-events COUNT BYTES`: COUNT events of BYTES bytes each.
//! - `bulk-event`: one event with a 1 MiB sealed payload attached (events carry none).
//! - `unknown-replies COUNT`: COUNT replies to calls nobody made.
//! - `unknown-acks COUNT`: COUNT acknowledgements of messages never delivered to it.
//! - `forge-sigsys`: writes a fake SIGSYS report naming `execve`, closes its stderr so that
//!   the real report cannot follow, and makes a forbidden call (`ptrace`).
//! - `hang-at-start`: never says hello: sleeps before taking its channel, as a worker stuck
//!   (or malicious) at start-up would.
//! - `bulk-calls SERVICE COUNT BYTES` (also on demand: a call to `hostile.attack` with that
//!   text as its body answers `OK BUSY REFUSED RETURNED` when done; BYTES 0 sends no payload): COUNT calls to `SERVICE.bulk`, each with an encrypted
//!   bulk payload of BYTES bytes, one after the other; then an event `bulk done OK BUSY REFUSED
//!   RETURNED` (RETURNED: refusals that brought the payload's memfd back).
//! - `memhog MEMFD_MIB HEAP_MIB`: takes memory the way the address-space limit does not see:
//!   memfds of MEMFD_MIB MiB each (filled through a mapping, unmapped, kept open) until it may open or grow
//!   no more, then heap in 1 MiB blocks (touched) up to HEAP_MIB MiB or the first refusal; an
//!   event `memhog memfds M MiB heap H MiB` says what it held; then it serves, holding it all.
//!   With a cgroup of its own, the kernel kills it long before.
//! - `spin THREADS` (also on demand through `hostile.attack`): THREADS threads that spin
//!   forever, competing for the CPU with every other worker.
//! - `stream-hold SERVICE NAME`: opens a stream on the raw channel and keeps its area (a
//!   descriptor and a mapping) whatever airlockd says: after a revocation it must be killed.
//! - `stream-garbage SERVICE NAME`: opens a stream and writes an impossible `head` into the
//!   shared area: the consumer's end must be poisoned, nothing else harmed.
//! - `region-hold SERVICE METHOD`: opens a call region on the raw channel and keeps its area
//!   whatever airlockd says (killed after a revocation).
//! - `region-rewrite SERVICE METHOD`: a caller that makes 200 calls of 64 KiB while a thread of
//!   its keeps rewriting the region's data, so the callee copies requests that change under
//!   it; an event `region-rewrite answered N, then: WHY` says how far it got.
//! - `region-callee-mute` and `region-callee-garbage`: waits (on the raw channel, until a
//!   shutdown) for a call region another worker opens to `hostile`, then never answers, or answers its
//!   first call with an authentic-looking header and garbage bytes.

use airlock_protocol::wire::{ByteBody, CallFailure, FromWorker, Reply, Request, ToWorker};
use airlock_protocol::BulkMode;
use airlock_worker::{Response, Worker};

/// A complete log line as airlockd would write it, after a newline and a carriage return.
const FORGED_LINE: &str =
    "\n\r\u{1b}[2K1999-01-01T00:00:00.000000Z  INFO airlock_supervisor::runtime::lifecycle: worker ready pid=1 services=auth FORGED";

fn num(args: &[String], i: usize) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(1)
}

fn main() {
    airlock_worker::init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let attack = args.first().map(String::as_str).unwrap_or("");
    let forged_service = format!("hostile{FORGED_LINE}");
    let services: Vec<&str> = if attack == "forge-log" { vec!["hostile", &forged_service] } else { vec!["hostile"] };
    if attack == "hang-at-start" {
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
    let mut w = match Worker::start("hostile", &services) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("hostile: start failed: {e}");
            std::process::exit(1);
        }
    };
    match attack {
        "forge-log" => forge_log(&mut w),
        "flood-events" => {
            let line = format!("{}{FORGED_LINE}", "x".repeat(num(&args, 2) as usize));
            for _ in 0..num(&args, 1) {
                if w.event(&line).is_err() {
                    break;
                }
            }
        }
        "unknown-replies" => {
            for k in 0..num(&args, 1) {
                let rep = FromWorker::Reply(Reply { id: 1_000_000 + k, result: Ok(ByteBody(Vec::new())) });
                if w.raw_channel().send(&rep).is_err() {
                    break;
                }
            }
        }
        "unknown-acks" => {
            for k in 0..num(&args, 1) {
                if w.raw_channel().send(&FromWorker::Ack { id: 1_000_000 + k }).is_err() {
                    break;
                }
            }
        }
        "forge-sigsys" => {
            // x86_64's audit arch; the number is execve's there. The call made is ptrace.
            eprintln!("airlock-sigsys nr=59 arch=3221225534 policy=hostile");
            let _ = airlock_worker::sys::raw_syscall6(libc::SYS_close, [2, 0, 0, 0, 0, 0]);
            let _ = airlock_worker::sys::raw_syscall6(
                libc::SYS_ptrace,
                [libc::PTRACE_TRACEME as libc::c_long, 0, 0, 0, 0, 0],
            );
        }
        "bulk-calls" => {
            bulk_calls(&mut w, args.get(1).map_or("peer", String::as_str), num(&args, 2), num(&args, 3));
        }
        "bulk-event" => {
            // An event (which carries nothing) with a 1 MiB payload attached.
            if let Ok(mut writer) = w.bulk_writer(1 << 20) {
                writer.as_mut_slice().fill(0x5a);
                let _ = w.raw_channel().send_bulk(
                    &FromWorker::Event("with a payload".into()),
                    &[],
                    writer,
                    BulkMode::Sealed,
                );
            }
        }
        "memhog" => {
            let held = memhog(num(&args, 1), num(&args, 2));
            let _ = w.event(&held);
        }
        "spin" => {
            let n = spin(num(&args, 1));
            let _ = w.event(&format!("spinning {n}"));
        }
        "stream-hold" | "stream-garbage" => {
            let service = args.get(1).map_or("peer", String::as_str);
            let name = args.get(2).map_or("samples", String::as_str);
            let outcome = raw_stream(&mut w, service, name, attack == "stream-garbage");
            let _ = w.event(&outcome);
        }
        "region-hold" | "region-rewrite" => {
            let service = args.get(1).map_or("peer", String::as_str);
            let method = args.get(2).map_or("calc", String::as_str);
            let outcome = raw_region(&mut w, service, method, attack == "region-rewrite");
            let _ = w.event(&outcome);
        }
        "region-callee-mute" | "region-callee-garbage" => {
            let outcome = hostile_callee(&mut w, attack == "region-callee-garbage");
            let _ = w.event(&outcome);
        }
        _ => {}
    }
    let served = w.serve(|w, req, _| match req.method.as_str() {
        "echo" => Ok(Response::bytes(req.body.clone())),
        // `bulk-calls SERVICE COUNT BYTES` on demand (the broker benchmark times airlockd's CPU
        // around it); answers `OK BUSY REFUSED`.
        "attack" => {
            let text = String::from_utf8_lossy(&req.body).into_owned();
            let a: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            if a.first().map(String::as_str) == Some("spin") {
                return Ok(Response::bytes(format!("spinning {}", spin(num(&a, 1))).into_bytes()));
            }
            if a.first().map(String::as_str) != Some("bulk-calls") {
                return Err(format!("unknown attack {text:?}"));
            }
            Ok(Response::bytes(
                bulk_calls(w, a.get(1).map_or("peer", String::as_str), num(&a, 2), num(&a, 3)).into_bytes(),
            ))
        }
        other => Err(format!("no method {other}")),
    });
    if let Err(e) = served {
        eprintln!("hostile: {e}");
    }
}

fn forge_log(w: &mut Worker) {
    let _ = w.event(&format!("hello{FORGED_LINE}"));
    eprintln!("stderr{}", FORGED_LINE.replace('\n', "\r"));
    let _ = w.call("peer", &format!("echo{FORGED_LINE}"), Vec::new());
    let _ = w.call(&format!("peer{FORGED_LINE}"), "echo", Vec::new());
    let _ = w.send(&format!("peer{FORGED_LINE}"), "echo", Vec::new(), false);
}

fn bulk_calls(w: &mut Worker, service: &str, count: u64, bytes: u64) -> String {
    let (mut ok, mut busy, mut refused, mut returned) = (0u64, 0u64, 0u64, 0u64);
    for id in 1..=count {
        let req = Request { id, service: service.into(), method: "bulk".into(), body: Vec::new(), deadline_ms: 0 };
        // BYTES 0: the same call without a payload (the benchmark's baseline).
        let sent = if bytes == 0 {
            w.raw_channel().send(&FromWorker::Request(req))
        } else {
            let Ok(mut writer) = w.bulk_writer(bytes as usize) else { break };
            writer.as_mut_slice().fill(0x5a);
            w.raw_channel().send_bulk(&FromWorker::Request(req), &[], writer, BulkMode::SealedEncrypted)
        };
        if sent.is_err() {
            break;
        }
        let ch = w.raw_channel();
        loop {
            match ch.recv::<ToWorker>() {
                Ok(g) => {
                    let ToWorker::Reply(r) = g.msg else { continue };
                    if r.id != id {
                        continue;
                    }
                    match r.result {
                        Ok(_) => ok += 1,
                        Err(CallFailure::Busy { .. }) => busy += 1,
                        Err(_) => refused += 1,
                    }
                    // A payload airlockd declined comes back with the refusal: this process
                    // closes the last reference (and pays for freeing its pages).
                    let back = |fd: &std::os::fd::OwnedFd| {
                        fd.try_clone().ok().map(std::fs::File::from).and_then(|f| f.metadata().ok()).map(|m| m.len())
                    };
                    if g.fds.len() == 1 && back(&g.fds[0]) == Some(bytes) {
                        returned += 1;
                    }
                    break;
                }
                Err(_) => return format!("{ok} {busy} {refused} {returned} (channel closed)"),
            }
        }
    }
    let done = format!("{ok} {busy} {refused} {returned}");
    let _ = w.event(&format!("bulk done {done}"));
    done
}

/// Threads that spin until the process ends; returns how many it could start (a limit on
/// processes may stop it first).
fn spin(threads: u64) -> u64 {
    let mut started = 0;
    for _ in 0..threads {
        let spawned = std::thread::Builder::new().spawn(|| {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => {
                eprintln!("hostile: spin: thread {} not started: {e}", started + 1);
                break;
            }
        }
    }
    started
}

/// Memory in unmapped memfds, then on the heap (see `memhog` above). Returns the event text.
/// Only what its policy allows any worker with a channel: memfd_create, ftruncate, mmap.
fn memhog(memfd_mib: u64, heap_mib: u64) -> String {
    use airlock_protocol::sys::{ftruncate, memfd_create, MapMode, Mapping};
    use std::os::fd::AsFd;
    let len = (memfd_mib << 20) as usize;
    let mut fds = Vec::new();
    let mut memfd_bytes = 0u64;
    while let Ok(fd) = memfd_create(c"hog", false) {
        if ftruncate(fd.as_fd(), len as u64).is_err() {
            break;
        }
        let Ok(mut map) = Mapping::map(fd.as_fd(), len, MapMode::SharedWrite) else { break };
        // Touched through the mapping, then unmapped: the pages stay in the file and count
        // against no address space.
        if let Some(s) = map.as_mut_slice() {
            for i in (0..s.len()).step_by(4096) {
                s[i] = 0x5a;
            }
        }
        drop(map);
        memfd_bytes += len as u64;
        fds.push(fd);
    }
    let mut heap: Vec<Vec<u8>> = Vec::new();
    for _ in 0..heap_mib {
        let mut block: Vec<u8> = Vec::new();
        if block.try_reserve_exact(1 << 20).is_err() {
            break;
        }
        block.resize(1 << 20, 0x5a);
        heap.push(block);
    }
    let text = format!("memhog memfds {} MiB in {} files heap {} MiB", memfd_bytes >> 20, fds.len(), heap.len());
    // Held until the process ends.
    std::mem::forget(heap);
    std::mem::forget(fds);
    text
}

/// Opens a stream on the raw channel, keeps its descriptor and a writable mapping for the life
/// of the process, and with `garbage` writes a `head` no honest producer could (past the ring).
fn raw_stream(w: &mut Worker, service: &str, name: &str, garbage: bool) -> String {
    // The consumer may still be starting: ask again while it is not running.
    let mut last = String::new();
    for _ in 0..100 {
        last = raw_stream_once(w, service, name, garbage);
        if !last.contains("NotRunning") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    last
}

fn raw_stream_once(w: &mut Worker, service: &str, name: &str, garbage: bool) -> String {
    use airlock_protocol::sys::{MapMode, Mapping};
    use std::os::fd::AsFd;
    let ch = w.raw_channel();
    if ch.send(&FromWorker::OpenStream { id: 77, service: service.into(), name: name.into() }).is_err() {
        return "stream: send failed".into();
    }
    loop {
        match ch.recv::<ToWorker>() {
            Ok(g) => {
                if let ToWorker::StreamOpened { id: 77, result } = g.msg {
                    let Ok(grant) = result else { return format!("stream refused: {result:?}") };
                    let Some(fd) = g.fds.into_iter().next() else { return "stream: no area".into() };
                    let len = grant.params.ring_bytes as usize + 4096;
                    let Ok(mut map) = Mapping::map(fd.as_fd(), len, MapMode::SharedWrite) else {
                        return "stream: cannot map".into();
                    };
                    if garbage {
                        if let Some(s) = map.as_mut_slice() {
                            // `head` (offset 128): far past anything the consumer released.
                            s[128..136].copy_from_slice(&u64::MAX.to_le_bytes());
                        }
                    }
                    std::mem::forget(map);
                    std::mem::forget(fd);
                    return format!("stream {} held", grant.stream);
                }
            }
            Err(e) => return format!("stream: {e}"),
        }
    }
}

/// Opens a call region on the raw channel (asking again while the callee is not running yet),
/// keeps its descriptor and a writable mapping for the life of the process, and with `rewrite`
/// calls through it while a thread keeps rewriting the region's data.
fn raw_region(w: &mut Worker, service: &str, method: &str, rewrite: bool) -> String {
    use airlock_protocol::sys::SharedArea;
    use std::os::fd::AsFd;
    let mut last = String::new();
    for attempt in 0..100u64 {
        let ch = w.raw_channel();
        let id = 900 + attempt;
        if ch.send(&FromWorker::OpenRegion { id, service: service.into(), method: method.into() }).is_err() {
            return "region: send failed".into();
        }
        let got = loop {
            match ch.recv::<ToWorker>() {
                Ok(g) => {
                    if let ToWorker::RegionOpened { id: i, .. } = &g.msg {
                        if *i == id {
                            break g;
                        }
                    }
                }
                Err(e) => return format!("region: {e}"),
            }
        };
        let ToWorker::RegionOpened { result, .. } = got.msg else { continue };
        let grant = match result {
            Ok(g) => g,
            Err(f) => {
                last = format!("region refused: {f:?}");
                if last.contains("NotRunning") {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                return last;
            }
        };
        let Some(fd) = got.fds.into_iter().next() else { return "region: no area".into() };
        let len = grant.params.region_bytes as usize + 4096;
        let Ok(area) = SharedArea::map(fd.as_fd(), len) else { return "region: cannot map".into() };
        if !rewrite {
            std::mem::forget(area);
            std::mem::forget(fd);
            return format!("region {} held", grant.region);
        }
        let Ok(dup) = fd.try_clone() else { return "region: dup failed".into() };
        let mut caller = match airlock_protocol::region::RegionCaller::attach(dup, grant.params, grant.key) {
            Ok(c) => c,
            Err(e) => return format!("region: {e}"),
        };
        let area = std::sync::Arc::new(area);
        let scribbler = area.clone();
        std::thread::spawn(move || {
            let mut k = 0u8;
            loop {
                k = k.wrapping_add(1);
                let _ = scribbler.copy_in(4096 + usize::from(k) * 64, &[k; 4096]);
            }
        });
        let request = vec![7u8; 64 * 1024];
        let mut answer = Vec::new();
        for n in 0..200 {
            if let Err(e) = caller.call(&request, &mut answer, std::time::Duration::from_secs(2)) {
                std::mem::forget(fd);
                return format!("region-rewrite answered {n}, then: {e}");
            }
        }
        std::mem::forget(fd);
        return "region-rewrite answered 200, then: -".into();
    }
    last
}

/// Waits for a call region opened to this worker, then never answers (`garbage` false) or
/// answers the first call with garbage under a well-formed header.
fn hostile_callee(w: &mut Worker, garbage: bool) -> String {
    use airlock_protocol::sys::SharedArea;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering::SeqCst;
    let ch = w.raw_channel();
    loop {
        let g = match ch.recv::<ToWorker>() {
            Ok(g) => g,
            Err(e) => return format!("region callee: {e}"),
        };
        if matches!(g.msg, ToWorker::Shutdown) {
            std::process::exit(0);
        }
        let ToWorker::RegionIncoming { grant, .. } = g.msg else { continue };
        let Some(fd) = g.fds.into_iter().next() else { return "region callee: no area".into() };
        let len = grant.params.region_bytes as usize + 4096;
        let Ok(area) = SharedArea::map(fd.as_fd(), len) else { return "region callee: cannot map".into() };
        std::mem::forget(fd);
        if !garbage {
            std::mem::forget(area);
            return format!("region {} taken, never answered", grant.region);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while area.u64_at(128).load(SeqCst) != 1 {
            if std::time::Instant::now() > deadline {
                return "region callee: no call came".into();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = area.copy_in(4096, &[0x5a; 80]);
        area.u32_at(264).store(64, SeqCst);
        area.u32_at(268).store(0, SeqCst);
        area.u64_at(256).store(1, SeqCst);
        area.u32_at(512).fetch_add(1, SeqCst);
        std::mem::forget(area);
        return format!("region {} answered with garbage", grant.region);
    }
}
