//! The reference worker: serves the `echo` service. Used by the supervisor's tests and
//! benchmarks as a real, confined workload.
//!
//! Methods: `echo` (returns the body), `sum` (wrapping sum of the bulk payload's bytes as
//! 8 little-endian bytes), `make_bulk` (body: u64 LE length; returns a sealed bulk payload of
//! that many bytes), `exit` (body: a decimal exit code; exits with it), `forbidden` (issues `ptrace`,
//! which every worker policy forbids).

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
    let r = w.serve(|w, req, bulk| match req.method.as_str() {
        "echo" => Ok(Response::bytes(req.body.clone())),
        "sum" => {
            let s = bulk.map(|b| b.iter().fold(0u64, |a, &x| a.wrapping_add(u64::from(x)))).unwrap_or(0);
            Ok(Response::bytes(s.to_le_bytes().to_vec()))
        }
        "make_bulk" => {
            let len = req
                .body
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or("body must be a u64 length")?;
            let len = usize::try_from(len).map_err(|_| "length too large")?;
            let mut bw = airlock_protocol::BulkWriter::allocate(len, airlock_protocol::bulk::DEFAULT_INLINE_THRESHOLD)
                .map_err(|e| e.to_string())?;
            for (i, b) in bw.as_mut_slice().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            Ok(Response { body: Vec::new(), bulk: Some((bw, BulkMode::Sealed)) })
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
            w.call(service, method, body).map(|(b, _)| Response::bytes(b)).map_err(|e| e.to_string())
        }
        "send_many" => {
            let text = String::from_utf8_lossy(&req.body).into_owned();
            let parts: Vec<&str> = text.split_whitespace().collect();
            let [service, method, count, mode] = parts[..] else {
                return Err("body must be: SERVICE METHOD COUNT durable|volatile".into());
            };
            let count: u64 = count.parse().map_err(|_| "COUNT must be a number")?;
            let durable = mode == "durable";
            for i in 0..count {
                w.send_waiting(service, method, i.to_string().into_bytes(), durable).map_err(|e| e.to_string())?;
                if (i + 1) % 100 == 0 || i + 1 == count {
                    let _ = w.event(&format!("accepted {}", i + 1));
                }
            }
            Ok(Response::bytes(format!("sent {count}").into_bytes()))
        }
        other => Err(format!("echo has no method {other}")),
    });
    if let Err(e) = r {
        eprintln!("airlock-worker-echo: {e}");
        std::process::exit(2);
    }
}
