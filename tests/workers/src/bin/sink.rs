//! A message sink: handles asynchronous messages by appending `ID FROM BODY` lines to a log
//! file (its first argument) and making each durable before it is acknowledged. On start it
//! reads the log back and tells the library which ids it has already handled, so a
//! redelivery after any crash is acknowledged without being recorded twice. The broker's tests
//! read the log to check exactly-once, in-order delivery.
//!
//! Methods: `count` (number of messages recorded).

use std::io::{BufRead, Write};

use airlock_worker::{Response, Worker};

fn main() {
    airlock_worker::init_logging();
    let path = std::env::args().nth(1).unwrap_or_default();
    let mut w = match Worker::start("sink", &["sink"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-sink: {e}");
            std::process::exit(2);
        }
    };
    let (last, count) = match std::fs::File::open(&path) {
        Ok(f) => {
            let mut last = 0u64;
            let mut n = 0u64;
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                // A line is complete only with its newline; lines() drops a torn last one
                // only if it cannot parse, which is what we want.
                if let Some(id) = line.split(' ').next().and_then(|x| x.parse::<u64>().ok()) {
                    last = last.max(id);
                    n += 1;
                }
            }
            (last, n)
        }
        Err(_) => (0, 0),
    };
    w.resume_after(last);
    let count = std::cell::Cell::new(count);
    let mut log = match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("airlock-worker-sink: opening {path}: {e}");
            std::process::exit(2);
        }
    };
    let r = w.serve_all(
        |_, req, _| match req.method.as_str() {
            "count" => Ok(Response::bytes(count.get().to_string().into_bytes())),
            other => Err(format!("sink has no method {other}")),
        },
        |_, d, _| {
            let line = format!("{} {} {}\n", d.id, d.from, String::from_utf8_lossy(&d.body));
            // One write per line, then durable, then (on return) acknowledged.
            if log.write_all(line.as_bytes()).and_then(|()| log.sync_data()).is_err() {
                eprintln!("airlock-worker-sink: cannot record message {}", d.id);
                std::process::exit(3);
            }
            count.set(count.get() + 1);
        },
    );
    if let Err(e) = r {
        eprintln!("airlock-worker-sink: {e}");
        std::process::exit(2);
    }
}
