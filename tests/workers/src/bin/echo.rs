//! The reference worker: serves the `echo` service. Used by the supervisor's tests and
//! benchmarks as a real, confined workload.
//!
//! Methods: `echo` (returns the body), `send_updates` (the bridge's input, for the multi-site
//! benchmark), `sum` (wrapping sum of the bulk payload's bytes as
//! 8 little-endian bytes), `make_bulk` (body: a decimal length, optionally followed by `encrypted`; returns a sealed bulk payload of
//! that many bytes), `exit` (body: a decimal exit code; exits with it), `forbidden` (issues `ptrace`,
//! which every worker policy forbids).
//!
//! Streams: every incoming stream is read on a thread of its own, checking each record (`seq`
//! as 8 little-endian bytes, then bytes equal to `seq as u8`); `stream_stats` answers
//! `records N bad B ended WHY`. `stream_to` (body `SERVICE NAME COUNT SIZE [keep]`) opens a
//! stream and sends COUNT such records of SIZE bytes (waiting up to 5 s for space each),
//! answering `sent N` (or `failed after N: WHY`); with `keep` it holds the stream afterwards,
//! and `stream_send_held` sends one more record on it, answering `ok` or the error.
//!
//! Call regions: every incoming region is served on a thread of its own, answering each request
//! with its bytes plus one (wrapping), or refusing one that starts with `refuse` (one that
//! starts with `slow` is answered after 3 s);
//! `region_stats` answers `calls N ended WHY`. `region_call` (body `SERVICE METHOD COUNT SIZE
//! [keep]`) opens a region and makes COUNT calls of SIZE bytes (2 s each), checking every
//! answer, and answers `called N` (or `failed after N: WHY`); with `keep` it holds the region,
//! and `region_call_held` makes one more call with the request's body, answering the answer
//! or the error.

use airlock_protocol::BulkMode;
use airlock_worker::{Response, Worker};

fn main() {
    airlock_worker::init_logging();
    let mut w = match Worker::start("echo", &["echo"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-echo: {e}");
            std::process::exit(2);
        }
    };
    let received = std::cell::Cell::new(0u64);
    let stats = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, String::from("-"))));
    let reader_stats = stats.clone();
    w.on_incoming_stream(move |h| {
        let st = reader_stats.clone();
        std::thread::spawn(move || loop {
            match h.recv(std::time::Duration::from_secs(1)) {
                Ok(Some(rec)) => {
                    let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                    let seq = rec.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
                    let good = seq.is_some_and(|q| q == g.0 && rec[8..].iter().all(|&b| b == q as u8));
                    g.0 += 1;
                    if !good {
                        g.1 += 1;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    st.lock().unwrap_or_else(|e| e.into_inner()).2 = e.to_string();
                    return;
                }
            }
        });
    });
    let region_stats = std::sync::Arc::new(std::sync::Mutex::new((0u64, String::from("-"))));
    let server_stats = region_stats.clone();
    w.on_incoming_region(move |h| {
        let st = server_stats.clone();
        std::thread::spawn(move || loop {
            let served = h.serve(std::time::Duration::from_secs(1), |buf| {
                if buf.starts_with(b"refuse") {
                    return Err("refused by echo".into());
                }
                if buf.starts_with(b"slow") {
                    // An answer that takes longer than airlockd's release deadline.
                    std::thread::sleep(std::time::Duration::from_secs(3));
                }
                for b in buf.iter_mut() {
                    *b = b.wrapping_add(1);
                }
                Ok(())
            });
            match served {
                Ok(true) => st.lock().unwrap_or_else(|e| e.into_inner()).0 += 1,
                Ok(false) => {}
                Err(e) => {
                    st.lock().unwrap_or_else(|e| e.into_inner()).1 = e.to_string();
                    return;
                }
            }
        });
    });
    let held_region: std::cell::RefCell<Option<airlock_worker::streams::RegionClient>> = Default::default();
    let held: std::cell::RefCell<Option<airlock_worker::streams::StreamOut>> = Default::default();
    let inherited: std::cell::RefCell<std::collections::BTreeMap<i32, std::os::fd::OwnedFd>> = Default::default();
    let r = w.serve_all(
        |w, req, bulk| match req.method.as_str() {
            "received" => Ok(Response::bytes(received.get().to_string().into_bytes())),
            "stream_stats" => {
                let g = stats.lock().unwrap_or_else(|e| e.into_inner());
                Ok(Response::bytes(format!("records {} bad {} ended {}", g.0, g.1, g.2).into_bytes()))
            }
            "stream_to" => {
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let a: Vec<&str> = text.split_whitespace().collect();
                let (Some(service), Some(name)) = (a.first(), a.get(1)) else {
                    return Err("SERVICE NAME COUNT SIZE".into());
                };
                let count: u64 = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(1);
                let size: usize = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(64).max(8);
                let out = w.open_stream(service, name).map_err(|e| e.to_string())?;
                let mut rec = vec![0u8; size];
                for seq in 0..count {
                    rec[..8].copy_from_slice(&seq.to_le_bytes());
                    rec[8..].fill(seq as u8);
                    if let Err(e) = out.send(&rec, Some(std::time::Duration::from_secs(5))) {
                        return Ok(Response::bytes(format!("failed after {seq}: {e}").into_bytes()));
                    }
                }
                if a.get(4) == Some(&"keep") {
                    *held.borrow_mut() = Some(out);
                } else {
                    out.close();
                }
                Ok(Response::bytes(format!("sent {count}").into_bytes()))
            }
            "region_stats" => {
                let g = region_stats.lock().unwrap_or_else(|e| e.into_inner());
                Ok(Response::bytes(format!("calls {} ended {}", g.0, g.1).into_bytes()))
            }
            "region_call" => {
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let a: Vec<&str> = text.split_whitespace().collect();
                let (Some(service), Some(method)) = (a.first(), a.get(1)) else {
                    return Err("SERVICE METHOD COUNT SIZE [keep]".into());
                };
                let count: u64 = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(1);
                let size: usize = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(64);
                let client = w.open_region(service, method).map_err(|e| e.to_string())?;
                let (mut request, mut answer) = (vec![0u8; size], Vec::new());
                let mut outcome = format!("called {count}");
                for seq in 0..count {
                    for (k, b) in request.iter_mut().enumerate() {
                        *b = (seq as usize + k) as u8;
                    }
                    if let Err(e) = client.call(&request, &mut answer, std::time::Duration::from_secs(2)) {
                        outcome = format!("failed after {seq}: {e}");
                        break;
                    }
                    if answer.len() != size || answer.iter().zip(&request).any(|(x, y)| *x != y.wrapping_add(1)) {
                        outcome = format!("failed after {seq}: a wrong answer");
                        break;
                    }
                }
                if a.get(4) == Some(&"keep") {
                    *held_region.borrow_mut() = Some(client);
                } else {
                    client.close();
                }
                Ok(Response::bytes(outcome.into_bytes()))
            }
            "region_call_held" => match held_region.borrow().as_ref() {
                Some(c) => {
                    let mut answer = Vec::new();
                    Ok(Response::bytes(match c.call(&req.body, &mut answer, std::time::Duration::from_secs(2)) {
                        Ok(()) => answer,
                        Err(e) => e.to_string().into_bytes(),
                    }))
                }
                None => Err("no region held".into()),
            },
            "stream_send_held" => match held.borrow().as_ref() {
                Some(out) => Ok(Response::bytes(match out.send(&[0u8; 8], None) {
                    Ok(()) => b"ok".to_vec(),
                    Err(e) => e.to_string().into_bytes(),
                })),
                None => Err("no stream held".into()),
            },
            "echo" => Ok(Response::bytes(req.body.clone())),
            "sum" => {
                let s = bulk.map(|b| b.iter().fold(0u64, |a, &x| a.wrapping_add(u64::from(x)))).unwrap_or(0);
                Ok(Response::bytes(s.to_le_bytes().to_vec()))
            }
            "make_bulk" => {
                let text = std::str::from_utf8(&req.body).unwrap_or("");
                let mut words = text.split_whitespace();
                let len = words.next().and_then(|t| t.parse::<u64>().ok()).ok_or("body must be a decimal length")?;
                let mode = if words.next() == Some("encrypted") { BulkMode::SealedEncrypted } else { BulkMode::Sealed };
                let len = usize::try_from(len).map_err(|_| "length too large")?;
                let mut bw =
                    airlock_protocol::BulkWriter::allocate(len, airlock_protocol::bulk::DEFAULT_INLINE_THRESHOLD)
                        .map_err(|e| e.to_string())?;
                for (i, b) in bw.as_mut_slice().iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
                Ok(Response { body: Vec::new(), bulk: Some((bw, mode)) })
            }
            "exit" => {
                let code = std::str::from_utf8(&req.body).ok().and_then(|t| t.trim().parse::<i32>().ok()).unwrap_or(1);
                std::process::exit(code)
            }
            "forbidden" => {
                let _ = airlock_worker::sys::raw_syscall6(
                    libc::SYS_ptrace,
                    [libc::PTRACE_TRACEME as libc::c_long, 0, 0, 0, 0, 0],
                );
                Err("ptrace was allowed: the policy is not in force".into())
            }
            "relay" => {
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let mut parts = text.splitn(3, ' ');
                let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let body = parts.next().unwrap_or("").as_bytes().to_vec();
                match w.call(service, method, body) {
                    // A bulk reply arrives as a sealed memfd, mapped here without a copy.
                    Ok((b, Some(bulk))) => {
                        let sum = bulk.iter().fold(0u64, |a, &x| a.wrapping_add(u64::from(x)));
                        let how = if bulk.is_mapped() {
                            "sealed memfd"
                        } else if bulk.was_encrypted() {
                            "encrypted memfd"
                        } else {
                            "inline"
                        };
                        Ok(Response::bytes(
                            format!("{}bulk {} bytes sum {sum} via {how}", String::from_utf8_lossy(&b), bulk.len())
                                .into_bytes(),
                        ))
                    }
                    Ok((b, None)) => Ok(Response::bytes(b)),
                    Err(e) => Err(e.to_string()),
                }
            }
            "send_many" => {
                // Body `SERVICE METHOD COUNT durable|volatile [BATCH]`: bodies 0..COUNT-1, BATCH
                // at a time (default 1), waiting while the broker says busy.
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let parts: Vec<&str> = text.split_whitespace().collect();
                let (service, method, count, mode, batch) = match parts[..] {
                    [s, m, c, d] => (s, m, c, d, "1"),
                    [s, m, c, d, b] => (s, m, c, d, b),
                    _ => return Err("body must be: SERVICE METHOD COUNT durable|volatile [BATCH]".into()),
                };
                let count: u64 = count.parse().map_err(|_| "COUNT must be a number")?;
                let batch: u64 = batch.parse::<u64>().map_err(|_| "BATCH must be a number")?.max(1);
                let durable = mode == "durable";
                let mut i = 0;
                // Progress events within airlockd's limit for a worker's events (20 a second, a
                // burst of 50): a bucket of 40 refilled at 15 a second. A fast sender crossing a
                // hundred every few milliseconds was killed for an event flood; the first 4,000
                // messages still get an event every hundred (the durable kill test reads them).
                let (mut tokens, mut refilled) = (40.0f64, std::time::Instant::now());
                while i < count {
                    let k = batch.min(count - i);
                    if k == 1 {
                        w.send_waiting(service, method, i.to_string().into_bytes(), durable)
                            .map_err(|e| e.to_string())?;
                    } else {
                        let bodies = (i..i + k).map(|x| x.to_string().into_bytes()).collect();
                        w.send_many(service, method, bodies, durable).map_err(|e| e.to_string())?;
                    }
                    let before = i;
                    i += k;
                    tokens = (tokens + refilled.elapsed().as_secs_f64() * 15.0).min(40.0);
                    refilled = std::time::Instant::now();
                    if (i / 100 != before / 100 && tokens >= 1.0) || i == count {
                        let _ = w.event(&format!("accepted {i}"));
                        tokens -= 1.0;
                    }
                }
                Ok(Response::bytes(format!("sent {count}").into_bytes()))
            }
            "send_updates" => {
                // Body `COUNT TAGS BATCH START`: COUNT durable `bridge.update` messages (the
                // bridge's real input), each with tags t0..t{TAGS-1} all at START + i, BATCH at
                // a time (the multi-site benchmark's burst).
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let n: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                let [count, tags, batch, start] = n[..] else {
                    return Err("body must be: COUNT TAGS BATCH START".into());
                };
                let names: Vec<String> = (0..tags).map(|t| format!("t{t}")).collect();
                let mut i = 0;
                while i < count {
                    let k = batch.max(1).min(count - i);
                    let bodies = (i..i + k)
                        .map(|x| {
                            let v = (start + x) as f64;
                            airlock_hmi::types::encode(&airlock_hmi::types::Update {
                                ts_ms: airlock_hmi::types::now_ms(),
                                values: names.iter().map(|n| (n.clone(), v)).collect(),
                                fault: None,
                                active_alarms: Vec::new(),
                            })
                        })
                        .collect();
                    w.send_many("bridge", "update", bodies, true).map_err(|e| e.to_string())?;
                    i += k;
                }
                Ok(Response::bytes(format!("sent {count}").into_bytes()))
            }
            "fd_kind" => {
                // Body `N`: what the brokered descriptor N is (fstat), e.g. `socket`.
                let n: i32 = std::str::from_utf8(&req.body)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or("body must be a descriptor number")?;
                if n < airlock_protocol::handoff::FIRST_BROKERED_FD {
                    return Err("only brokered descriptors (5 and up)".into());
                }
                let mut held = inherited.borrow_mut();
                let fd = match held.entry(n) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(airlock_protocol::sys::claim_inherited_fd(n).map_err(|err| format!("fd {n}: {err}"))?)
                    }
                };
                let (mode, _) = airlock_protocol::sys::file_mode_and_size(std::os::fd::AsFd::as_fd(fd))
                    .map_err(|e| e.to_string())?;
                let kind = match mode & libc::S_IFMT {
                    libc::S_IFSOCK => "socket",
                    libc::S_IFREG => "file",
                    libc::S_IFCHR => "character device",
                    _ => "other",
                };
                Ok(Response::bytes(kind.as_bytes().to_vec()))
            }
            "stall" => {
                // Body `MILLIS`: stops reading the channel for that long (a busy or stuck worker).
                let ms = std::str::from_utf8(&req.body).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(1000);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(Response::bytes(b"awake".to_vec()))
            }
            "ping_many" => {
                // Body `SERVICE COUNT [PERCENTILE]`: COUNT calls to SERVICE.echo; returns the
                // median (or the given percentile) in microseconds.
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let mut parts = text.split_whitespace();
                let service = parts.next().unwrap_or("").to_string();
                let count: usize = parts.next().and_then(|c| c.parse().ok()).unwrap_or(100).max(1);
                let percentile: usize = parts.next().and_then(|c| c.parse().ok()).unwrap_or(50).min(100);
                let mut times = Vec::with_capacity(count);
                for _ in 0..count {
                    let t = std::time::Instant::now();
                    w.call(&service, "echo", vec![0u8; 64]).map_err(|e| e.to_string())?;
                    times.push(t.elapsed().as_nanos() as u64);
                }
                times.sort_unstable();
                let at = (count * percentile / 100).min(count - 1);
                let us = times.get(at).copied().unwrap_or(0) as f64 / 1000.0;
                Ok(Response::bytes(format!("{us:.2}").into_bytes()))
            }
            "flood" => {
                // Body `SERVICE METHOD MILLIS`: sends as fast as it can without waiting on Busy,
                // and makes calls past its in-flight quota; returns what got through.
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let parts: Vec<&str> = text.split_whitespace().collect();
                let [service, method, millis] = parts[..] else {
                    return Err("body must be: SERVICE METHOD MILLIS".into());
                };
                let until =
                    std::time::Instant::now() + std::time::Duration::from_millis(millis.parse().unwrap_or(1000));
                let (mut sent, mut busy) = (0u64, 0u64);
                while std::time::Instant::now() < until {
                    match w.send(service, method, vec![7u8; 1024], false) {
                        Ok(()) => sent += 1,
                        Err(airlock_worker::WorkerError::Refused {
                            refusal: airlock_worker::wire::Refusal::Busy(_),
                            ..
                        }) => busy += 1,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(Response::bytes(format!("sent {sent} busy {busy}").into_bytes()))
            }
            "durable_rate" => {
                // Body `SERVICE METHOD COUNT SIZE BATCH`: COUNT durable messages of SIZE bytes,
                // BATCH at a time; returns accepted messages per second.
                let text = String::from_utf8_lossy(&req.body).into_owned();
                let p: Vec<usize> = text.split_whitespace().skip(2).filter_map(|x| x.parse().ok()).collect();
                let mut words = text.split_whitespace();
                let (service, method) =
                    (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
                let [count, size, batch] = p[..] else {
                    return Err("body must be: SERVICE METHOD COUNT SIZE BATCH".into());
                };
                let t = std::time::Instant::now();
                let mut done = 0;
                while done < count {
                    let k = batch.min(count - done);
                    done +=
                        w.send_many(&service, &method, vec![vec![0x5au8; size]; k], true).map_err(|e| e.to_string())?;
                }
                Ok(Response::bytes(format!("{:.0}", done as f64 / t.elapsed().as_secs_f64()).into_bytes()))
            }
            other => Err(format!("echo has no method {other}")),
        },
        // Asynchronous messages are counted (method `received`), nothing more.
        |_, _, _| received.set(received.get() + 1),
    );
    if let Err(e) = r {
        eprintln!("airlock-worker-echo: {e}");
        std::process::exit(2);
    }
}
