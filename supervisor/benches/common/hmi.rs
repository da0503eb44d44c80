//! What the benchmarks that run the HMI share: airlockd with the embedded default HMI, its
//! control socket, an HTTP client for the ui, and the figures read from `/proc`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_supervisor::runtime::{CallResult, ControlRequest, Status, WorkerState};

/// airlockd (next to this bench) with `dir/airlock.toml`, logging at `level` to
/// `dir/airlockd.log`. Until [`stop`] ends it, a panic anywhere in the bench kills it (and so
/// its workers): an assertion that fails while it starts must not leave it running.
pub fn spawn_airlockd(bins: &Path, dir: &Path, level: &str) -> Child {
    let child = Command::new(bins.join("airlockd"))
        .arg("--config")
        .arg(dir.join("airlock.toml"))
        .env("AIRLOCK_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("airlockd.log")).expect("log"))
        .spawn()
        .expect("airlockd");
    kill_on_panic(child.id());
    child
}

/// airlockd processes a panic kills (see [`spawn_airlockd`]).
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn kill_on_panic(pid: u32) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let pids = RUNNING.lock().map(|p| p.clone()).unwrap_or_default();
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
        }));
    });
    if let Ok(mut p) = RUNNING.lock() {
        p.push(pid);
    }
}

/// `status` through airlockd's control socket `sock`; `None` while airlockd does not answer yet.
pub fn status(sock: &Path) -> Option<Status> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    writeln!(s, "{}", serde_json::to_string(&ControlRequest::Status).ok()?).ok()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Waits until every worker named in `names` is running (verified and ready) under the
/// airlockd of `sock`, whose log is `log`. airlockd starts its workers concurrently, so one
/// worker answering says nothing of the others. Panics with the log when one fails or after 60 s.
pub fn wait_running(sock: &Path, names: &[&str], log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some(st) = status(sock) {
            let state = |n: &str| st.workers.iter().find(|w| w.name == n).map(|w| w.state.clone());
            if let Some(n) = names.iter().find(|n| matches!(state(n), Some(WorkerState::Failed(_)))) {
                panic!("worker {n} failed: {:?}; log:\n{}", state(n), std::fs::read_to_string(log).unwrap_or_default());
            }
            if names.iter().all(|n| state(n) == Some(WorkerState::Running)) {
                return;
            }
            last = Some(st.workers.iter().map(|w| format!("{}: {:?}", w.name, w.state)).collect::<Vec<_>>());
        }
        assert!(
            Instant::now() < deadline,
            "workers {names:?} not all running within 60 s; last status {last:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request on airlockd's control socket `sock`, and its answer.
pub fn control(sock: &Path, req: &ControlRequest) -> CallResult {
    let mut s = UnixStream::connect(sock).expect("connect control socket");
    writeln!(s, "{}", serde_json::to_string(req).expect("json")).expect("write");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// CPU time of every thread of `pid` so far, in nanoseconds.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Kills airlockd `pid` (and so its workers) when dropped during a panic.
pub struct KillOnPanic(pub u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::SIGKILL);
        }
    }
}

/// The default HMI under airlockd in a directory of its own, with `edits` applied to the
/// embedded configuration (before its ports are made free ones): (airlockd, its directory, the
/// ui's port). Waits until logic answers.
pub fn start_hmi(bins: &Path, tag: &str, edits: &[(&str, &str)]) -> (Child, PathBuf, u16) {
    let dir = bins.join(format!("airlock-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
    };
    let ui = port(());
    // Edits first, so that they can name the embedded default's own addresses.
    let mut cfg = airlock_supervisor::config::EMBEDDED_DEFAULT.to_string();
    for (from, to) in edits {
        assert!(cfg.contains(from), "the embedded default has no {from:?}");
        cfg = cfg.replace(from, to);
    }
    let cfg = cfg
        .replace(
            "[supervisor]\n",
            &format!(
                "[supervisor]\nstate-directory = \"{d}/state\"\nruntime-directory = \"{d}/run\"\nworker-directory = \"{b}\"\n",
                d = dir.display(),
                b = bins.display()
            ),
        )
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{ui}"))
        .replace("127.0.0.1:1502", &format!("127.0.0.1:{}", port(())));
    std::fs::write(dir.join("airlock.toml"), &cfg).expect("config");
    let d = spawn_airlockd(bins, &dir, "info");
    let guard = KillOnPanic(d.id());
    let sock = dir.join("run/control.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(sock.exists()
        && control(
            &sock,
            &ControlRequest::Call {
                service: "logic".into(),
                method: "values".into(),
                body: String::new(),
                deadline_ms: 0,
            },
        )
        .ok)
    {
        assert!(
            Instant::now() < deadline,
            "the HMI did not start: {}",
            std::fs::read_to_string(dir.join("airlockd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // logic answering says nothing of ui and auth (started concurrently).
    let names: Vec<String> = toml::from_str::<toml::Value>(&cfg)
        .expect("config")
        .get("worker")
        .and_then(toml::Value::as_array)
        .expect("workers")
        .iter()
        .filter_map(|w| w.get("name")?.as_str().map(str::to_string))
        .collect();
    wait_running(&sock, &names.iter().map(String::as_str).collect::<Vec<_>>(), &dir.join("airlockd.log"));
    std::mem::forget(guard);
    (d, dir, ui)
}

/// One HTTP/1.1 request on a kept-alive connection: (status, body).
pub fn http(
    conn: &mut std::net::TcpStream,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    use std::io::Read;
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: airlock_session={c}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\n{cookie}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).expect("read response");
        assert!(n > 0, "the ui closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().expect("length")))
        .expect("content-length");
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).expect("read body");
        assert!(n > 0, "the ui closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    let session = head.lines().find_map(|l| l.strip_prefix("set-cookie: airlock_session=").map(str::to_string));
    if let Some(s) = session {
        let token = s.split(';').next().unwrap_or("").to_string();
        return (status, token.into_bytes());
    }
    (status, buf[head_end..head_end + len].to_vec())
}

/// Stops airlockd `d` as systemd would (SIGTERM) and reaps it.
pub fn stop(mut d: Child) {
    if let Ok(mut p) = RUNNING.lock() {
        p.retain(|&pid| pid != d.id());
    }
    let pidfd = airlock_supervisor::sys::pidfd_open(d.id() as i32).expect("pidfd");
    let _ = airlock_supervisor::sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGTERM);
    let _ = d.wait();
}

/// The first operator's password, from the log `log` of a first start (auth says it once),
/// waited for up to 30 s.
pub fn operator_password(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(p) =
            text.split("created operator \"operator\" with password ").nth(1).and_then(|r| r.split_whitespace().next())
        {
            return p.to_string();
        }
        assert!(Instant::now() < deadline, "no operator password in {}: {text}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A kept-alive connection to the ui on `port`, logged in as the first operator whose
/// password is in `log`: (the connection, the session cookie).
pub fn login(port: u16, log: &Path) -> (std::net::TcpStream, String) {
    let password = operator_password(log);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the ui");
    conn.set_nodelay(true).expect("nodelay");
    let (st, token) =
        http(&mut conn, "POST", "/api/login", None, &format!(r#"{{"user":"operator","password":"{password}"}}"#));
    assert_eq!(st, 200, "login: {}", String::from_utf8_lossy(&token));
    (conn, String::from_utf8(token).expect("token"))
}
