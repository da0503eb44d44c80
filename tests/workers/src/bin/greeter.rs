//! `greeter`: the worked example of `docs/new-worker.md`. It serves `greeter.hello`: the body
//! is a name, the answer `hello, NAME (call N)`, where N counts every call it ever answered,
//! kept in a file in its own state directory (the only place it may write).

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use airlock_worker::{Response, Worker};

fn main() -> ExitCode {
    airlock_worker::init_logging();
    // Takes the channel and keys, applies every confinement layer the supervisor planned
    // (seccomp last), waits until the supervisor has verified them, then returns.
    let mut w = match Worker::start("greeter", &["greeter"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-greeter: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(dir) = w.state_directory().map(|d| d.to_path_buf()) else {
        eprintln!("airlock-worker-greeter: no state directory (set `state-directory = true`)");
        return ExitCode::from(2);
    };
    let path = dir.join("count");
    let mut file = match std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("airlock-worker-greeter: opening {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // The count is one fixed-width line; a file that does not parse starts again at 0.
    let mut text = [0u8; 21];
    let n = file.read(&mut text).unwrap_or(0);
    let mut count: u64 = std::str::from_utf8(&text[..n]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let served = w.serve(|_w, req, _bulk| {
        if req.method != "hello" {
            return Err(format!("greeter has no method {}", req.method));
        }
        let name = std::str::from_utf8(&req.body).map_err(|_| "the name is not UTF-8".to_string())?;
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err("a name is 1 to 64 printable characters".into());
        }
        count += 1;
        // Written in place and made durable before the answer: a count once answered is kept.
        file.write_all_at(format!("{count:020}\n").as_bytes(), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("saving the count: {e}"))?;
        Ok(Response::bytes(format!("hello, {name} (call {count})").into_bytes()))
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-worker-greeter: {e}");
            ExitCode::from(2)
        }
    }
}
