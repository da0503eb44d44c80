//! The HMI reference service end to end, through real processes: airlockd runs the embedded
//! default configuration (on free ports), and the tests speak HTTP to the ui layer as a
//! browser or a hostile client would, then check what reached the device, the database and
//! the other layers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{assert_report_is_truthful, Daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The embedded default, on `ui` and `device` ports, polling faster, without its own
/// `[supervisor]` table (the harness writes one).
fn hmi_config(ui: u16, device: u16) -> String {
    let text = airlock_supervisor::config::EMBEDDED_DEFAULT;
    let start = text.find("[supervisor]").expect("[supervisor]");
    let end = text[start..].find("\n\n").map(|e| start + e).expect("end of [supervisor]");
    let body = format!("{}{}", &text[..start], &text[end..]);
    assert!(body.contains("127.0.0.1:8080") && body.contains("127.0.0.1:1502"), "default ports moved");
    body.replace("127.0.0.1:8080", &format!("127.0.0.1:{ui}"))
        .replace("127.0.0.1:1502", &format!("127.0.0.1:{device}"))
        .replace("poll-ms = 500", "poll-ms = 200")
}

struct Hmi {
    d: Daemon,
    port: u16,
    password: String,
}

impl Hmi {
    fn start() -> Hmi {
        let (ui, device) = (free_port(), free_port());
        let d = Daemon::start_config(&hmi_config(ui, device));
        for w in ["plcsim", "field", "logic", "historian", "auth", "ui"] {
            let status = d.wait_running(w);
            // Every layer of the default job, checked from outside on every lane.
            assert_report_is_truthful(&status, d.pid(), if w == "ui" { 2048 } else { 64 });
        }
        let line = d.wait_log("created operator \"operator\" with password ");
        let password = line
            .split("with password ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("password in the log line")
            .to_string();
        Hmi { d, port: ui, password }
    }

    fn login(&self) -> String {
        let body = format!(r#"{{"user":"operator","password":"{}"}}"#, self.password);
        let r = self.request("POST", "/api/login", &[("Content-Type", "application/json")], body.as_bytes());
        assert_eq!(r.status, 200, "login: {}", r.text());
        let cookie = r.header("set-cookie").expect("a session cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        cookie.split(';').next().expect("cookie").trim().to_string()
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut raw = req.into_bytes();
        raw.extend_from_slice(body);
        self.raw(&raw)
    }

    fn get(&self, path: &str, cookie: &str) -> Resp {
        self.request("GET", path, &[("Cookie", cookie)], b"")
    }

    fn post_json(&self, path: &str, cookie: &str, body: &str) -> Resp {
        self.request("POST", path, &[("Cookie", cookie), ("Content-Type", "application/json")], body.as_bytes())
    }

    /// Sends `raw` and reads the answer until the server closes.
    fn raw(&self, raw: &[u8]) -> Resp {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the ui");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let _ = s.write_all(raw);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Resp::parse(&out)
    }

    fn json(&self, path: &str, cookie: &str) -> serde_json::Value {
        let r = self.get(path, cookie);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        serde_json::from_slice(&r.body).expect("json")
    }

    fn value(&self, cookie: &str, tag: &str) -> Option<f64> {
        let v = self.json("/api/values", cookie);
        v["tags"].as_array().expect("tags").iter().find(|t| t["name"] == tag).and_then(|t| t["value"].as_f64())
    }

    fn wait_value(&self, cookie: &str, tag: &str, what: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.value(cookie, tag) {
                if pred(v) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "{tag}: timed out waiting for {what}; log:\n{}", self.d.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn parse(raw: &[u8]) -> Resp {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len());
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let body = raw.get(split + 4..).unwrap_or_default().to_vec();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Resp { status, head, body }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn text(&self) -> String {
        format!("{}\n\n{}", self.head, String::from_utf8_lossy(&self.body))
    }
}

fn now_ms() -> i64 {
    airlock_hmi::types::now_ms()
}

#[test]
fn an_operator_logs_in_watches_the_plant_writes_setpoints_and_downloads_the_history() {
    let h = Hmi::start();
    // The page and its assets are in the binary.
    let page = h.get("/", "");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("app.js"));
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("default-src 'self'")));
    assert_eq!(h.get("/app.js", "").status, 200);

    let wrong = h.request(
        "POST",
        "/api/login",
        &[("Content-Type", "application/json")],
        br#"{"user":"operator","password":"not-the-password"}"#,
    );
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    let cookie = h.login();
    assert_eq!(h.json("/api/session", &cookie)["user"], "operator");

    // Live values from the simulated device, scaled by the tag table.
    let level = h.wait_value(&cookie, "level", "a first reading", |v| (0.0..=100.0).contains(&v));
    let _ = level;
    let t0 = h.wait_value(&cookie, "temperature", "a reading", |_| true);
    // A setpoint the logic layer accepts reaches the device and reads back from it.
    let r = h.post_json("/api/setpoint", &cookie, r#"{"tag":"heater_sp","value":45.5}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["accepted"], true, "{v}");
    // Straight after it, a jump the rate limit forbids (30 °C/s; 43.5 °C within a second).
    let r = h.post_json("/api/setpoint", &cookie, r#"{"tag":"heater_sp","value":89}"#);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["accepted"], false, "{v}");
    assert!(v["reason"].as_str().is_some_and(|s| s.contains("exceeds the allowed rate")), "{v}");
    h.wait_value(&cookie, "heater_sp", "the device's register to read 45.5", |v| (v - 45.5).abs() < 1e-6);
    // The temperature follows the new setpoint (the device simulates the lag).
    h.wait_value(&cookie, "temperature", "the temperature to move towards 45.5", |v| v > t0 + 0.5);

    // Refusals carry the logic layer's reason, and nothing reaches the device.
    for (body, reason) in [
        (r#"{"tag":"heater_sp","value":150}"#, "above the maximum 90"),
        (r#"{"tag":"heater_sp","value":5}"#, "below the minimum 10"),
        (r#"{"tag":"level","value":50}"#, "is a measurement, not a setpoint"),
        (r#"{"tag":"nosuch","value":50}"#, "no tag"),
    ] {
        let r = h.post_json("/api/setpoint", &cookie, body);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["accepted"], false, "{body}: {v}");
        assert!(v["reason"].as_str().is_some_and(|s| s.contains(reason)), "{body}: {v}");
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(h.value(&cookie, "heater_sp"), Some(45.5), "a refused setpoint changed the device");

    // A trend and the CSV export of a closed range, row for row what the database holds. The
    // range closes once the history holds at least ten polls of the seven tags (a busy machine
    // may have polled fewer times by now: the plant's pace is not the test's).
    let db = h.d.dir.join("state/workers/historian/history.sqlite3");
    let stored = |upto: i64| -> i64 {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM samples WHERE ts <= ?1", [upto], |r| r.get(0)))
            .unwrap_or(0)
    };
    let patience = Instant::now() + Duration::from_secs(20);
    while stored(now_ms() - 200) < 7 * 10 && Instant::now() < patience {
        std::thread::sleep(Duration::from_millis(100));
    }
    let to = now_ms() - 200;
    let from = to - 60_000;
    let trend = h.json(&format!("/api/trend?tag=level&from={from}&to={to}"), &cookie);
    assert!(!trend["points"].as_array().expect("points").is_empty(), "{trend}");
    // The trend was answered in place, in a call region between ui and historian, and the
    // same query through airlockd answers the same points.
    let regions: Vec<_> = h.d.status().streams.into_iter().filter(|s| s.call_region).collect();
    assert_eq!(regions.len(), 1, "{regions:?}");
    assert_eq!(
        (regions[0].producer.as_str(), regions[0].consumer.as_str(), regions[0].to.as_str(), regions[0].encrypted),
        ("ui", "historian", "historian.trend", true)
    );
    assert_eq!(h.json(&format!("/api/trend?tag=level&from={from}&to={to}"), &cookie), trend);
    // In place indeed: the ui opened the region and no call in it failed over to airlockd.
    let log = h.d.log_text();
    assert!(log.contains("calling in place") && !log.contains("call region failed"), "{log}");
    // Revoked (as if the historian restarted): the next trend goes through airlockd, answered the same.
    let out = h.d.airlock(&["revoke-stream", &regions[0].stream.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.json(&format!("/api/trend?tag=level&from={from}&to={to}"), &cookie), trend);
    // At the latest the one after opens a new region, and is answered there.
    assert_eq!(h.json(&format!("/api/trend?tag=level&from={from}&to={to}"), &cookie), trend);
    let again: Vec<_> = h.d.status().streams.into_iter().filter(|s| s.call_region && s.revoked.is_none()).collect();
    assert!(again.len() == 1 && again[0].stream != regions[0].stream, "{again:?}");
    assert!(!h.d.log_text().contains("call region failed"));
    let csv = h.get(&format!("/api/export.csv?from={from}&to={to}"), &cookie);
    assert_eq!(csv.status, 200, "{}", csv.text());
    assert!(csv.header("content-type").is_some_and(|t| t.starts_with("text/csv")));
    let text = String::from_utf8(csv.body).expect("utf-8 csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("time_ms,time_utc,tag,value,unit,kind,user,text"));
    let mut csv_samples: Vec<(i64, String, String)> = Vec::new();
    let mut setpoint_events = 0;
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f.get(5) == Some(&"sample") {
            csv_samples.push((f[0].parse().expect("time"), f[2].to_string(), f[3].to_string()));
        } else if f.get(5) == Some(&"setpoint") && f.get(6) == Some(&"operator") {
            setpoint_events += 1;
        }
    }
    assert_eq!(setpoint_events, 1, "the accepted setpoint is recorded once, with its operator:\n{text}");
    let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open db");
    let mut st =
        conn.prepare("SELECT ts, tag, value FROM samples WHERE ts >= ?1 AND ts <= ?2 ORDER BY ts, tag").expect("query");
    let db_rows: Vec<(i64, String, String)> = st
        .query_map([from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, format!("{}", r.get::<_, f64>(2)?)))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(db_rows.len() >= 7 * 10, "too few samples stored: {}", db_rows.len());
    assert_eq!(csv_samples, db_rows, "the CSV's samples are the database's rows");

    let r = h.post_json("/api/logout", &cookie, "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.get("/api/values", &cookie).status, 401, "a logged-out session still works");
    for w in ["plcsim", "field", "logic", "historian", "auth", "ui"] {
        assert_eq!(h.d.worker(w).restarts, 0, "{w} restarted; log:\n{}", h.d.log_text());
    }
    let (st, log) = h.d.stop();
    assert!(st.success(), "{log}");
    assert!(!log.contains("SIGSYS"), "a worker hit its seccomp filter:\n{log}");
}

/// Raises this process's descriptor limit (for many client connections), to at most
/// `want`; returns the limit in force.
fn raise_nofile(want: u64) -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap_or(1024);
    let target = want.min(hard);
    if airlock_worker::sys::set_rlimit(libc::RLIMIT_NOFILE, target).is_ok() {
        target
    } else {
        1024
    }
}

#[test]
fn hostile_clients_get_the_right_status_and_never_reach_the_other_layers() {
    let h = Hmi::start();
    let before: Vec<u64> = ["logic", "historian", "auth"].iter().map(|w| h.d.worker(w).calls_served).collect();

    // Requests without a session stop at the ui.
    assert_eq!(h.get("/api/values", "").status, 401);
    assert_eq!(h.get("/api/export.csv?from=0&to=1", "").status, 401);
    assert_eq!(h.post_json("/api/setpoint", "", r#"{"tag":"heater_sp","value":50}"#).status, 401);
    assert_eq!(h.post_json("/api/ack", "", r#"{"tag":"level","kind":"high"}"#).status, 401);
    // Malformed HTTP.
    for raw in [&b"GARBAGE\r\n\r\n"[..], b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\x01\x02\x03\r\n\r\n"] {
        let r = h.raw(raw);
        assert_eq!(r.status, 400, "{:?}: {}", String::from_utf8_lossy(raw), r.text());
    }
    // Oversized heads and bodies.
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(16 * 1024));
    assert_eq!(h.raw(big.as_bytes()).status, 431);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(h.raw(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes()).status, 431);
    let huge = h.raw(
        b"POST /api/login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{",
    );
    assert_eq!(huge.status, 413, "{}", huge.text());
    let form = h.request("POST", "/api/login", &[("Content-Type", "application/x-www-form-urlencoded")], b"user=a");
    assert_eq!(form.status, 415, "{}", form.text());
    // Path traversal: there are no files behind the routes.
    for p in
        ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/app.js/../../etc/shadow", "/api/../../etc"]
    {
        assert_eq!(h.get(p, "").status, 404, "{p}");
    }
    // A forged session is checked by auth, and goes no further.
    assert_eq!(h.get("/api/values", "airlock_session=0123456789abcdef").status, 401);

    // 1,000 slow connections (a head that never ends) do not stop anyone else.
    let n = (raise_nofile(4096).saturating_sub(100) as usize).min(1000);
    let mut slow = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).expect("slow connection");
        s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ").expect("partial head");
        slow.push(s);
    }
    let t = Instant::now();
    let page = h.get("/", "");
    assert_eq!(page.status, 200, "{}", page.text());
    println!("{n} slow connections open: a page still took {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "served only after {:?}", t.elapsed());
    let cookie = h.login();
    assert_eq!(h.get("/api/values", &cookie).status, 200);
    drop(slow);

    // Only the forged-session check and the login reached auth; logic saw one values call;
    // the historian saw nothing.
    let after: Vec<u64> = ["logic", "historian", "auth"].iter().map(|w| h.d.worker(w).calls_served).collect();
    assert_eq!(after[1], before[1], "the historian saw a hostile request");
    assert_eq!(after[0], before[0] + 1, "logic saw more than the one authenticated request");
    assert!(after[2] <= before[2] + 3, "auth saw {} calls", after[2] - before[2]);
    for w in ["plcsim", "field", "logic", "historian", "auth", "ui"] {
        let s = h.d.worker(w);
        assert_eq!(s.restarts, 0, "{w} restarted; log:\n{}", h.d.log_text());
        assert_eq!(s.state, airlock_supervisor::runtime::WorkerState::Running, "{w}");
    }
    let (st, log) = h.d.stop();
    assert!(st.success(), "{log}");
    assert!(!log.contains("SIGSYS"), "a worker hit its seccomp filter:\n{log}");
}

#[test]
fn the_control_layer_keeps_answering_while_the_historian_is_down() {
    let (ui, device) = (free_port(), free_port());
    let cfg = hmi_config(ui, device)
        .replacen(
            "[[worker]]\nname = \"historian\"",
            "[worker.quota]\njournal-bytes = 1024\n\n[[worker]]\nname = \"historian\"",
            1,
        )
        .replacen(
            "journal-bytes = 67108864\n",
            "journal-bytes = 67108864\n\n[worker.restart]\npolicy = \"never\"\n",
            1,
        );
    assert!(cfg.contains("journal-bytes = 1024") && cfg.contains("policy = \"never\""), "config edits missed");
    let d = Daemon::start_config(&cfg);
    for w in ["plcsim", "field", "logic", "historian", "auth", "ui"] {
        d.wait_running(w);
    }
    let line = d.wait_log("created operator \"operator\" with password ");
    let password = line.split("with password ").nth(1).and_then(|r| r.split_whitespace().next()).expect("password");
    let h = Hmi { d, port: ui, password: password.to_string() };
    let cookie = h.login();
    h.wait_value(&cookie, "heater_sp", "a first reading", |_| true);
    let pid = h.d.pid_of("historian");
    common::kill9_pid(pid);
    h.d.wait_for("historian", "down", |w| w.pid.is_none());
    // Every setpoint is an event for the historian; logic's 1 KiB journal quota fills after
    // a few. The writes must still be answered, promptly, with the logic layer's verdict.
    for i in 0..30 {
        let v = 45.0 + 0.5 * f64::from(i % 2);
        let t = Instant::now();
        let r = h.post_json("/api/setpoint", &cookie, &format!(r#"{{"tag":"heater_sp","value":{v}}}"#));
        assert_eq!(r.status, 200, "setpoint {i}: {}", r.text());
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(body["accepted"], true, "setpoint {i}: {body}");
        assert!(t.elapsed() < Duration::from_secs(3), "setpoint {i} took {:?}", t.elapsed());
    }
    assert!(
        h.d.log_text().contains("events wait for the historian"),
        "the quota was never reached:\n{}",
        h.d.log_text()
    );
    assert_eq!(h.d.worker("logic").restarts, 0);
    let (st, log) = h.d.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn airlock_hmi_user_add_manages_the_operators_auth_checks_without_a_restart() {
    let h = Hmi::start();
    let cfg = h.d.dir.join("airlock.toml");
    let user_add = |name: &str, password: Option<&str>| {
        let mut cmd = std::process::Command::new(common::bin("airlock-hmi"));
        cmd.args(["user", "add", name, "--config"]).arg(&cfg);
        if password.is_some() {
            cmd.arg("--password-stdin");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("airlock-hmi user add");
        if let Some(p) = password {
            child.stdin.take().expect("stdin").write_all(format!("{p}\n").as_bytes()).expect("password");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("wait")
    };
    let login = |user: &str, password: &str| {
        let body = format!(r#"{{"user":"{user}","password":"{password}"}}"#);
        h.request("POST", "/api/login", &[("Content-Type", "application/json")], body.as_bytes()).status
    };
    assert_eq!(login("alice", "correct horse battery"), 401);
    let out = user_add("alice", Some("correct horse battery"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(login("alice", "correct horse battery"), 200, "auth did not see the new operator");
    assert_eq!(login("alice", "wrong horse battery"), 401);
    // A generated password, printed once.
    let out = user_add("bob", None);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pw = text.trim().rsplit(' ').next().expect("password").to_string();
    assert!(text.starts_with("operator bob: password ") && pw.len() == 20, "{text}");
    assert_eq!(login("bob", &pw), 200);
    // The first operator is still there; the file is the auth worker's alone.
    assert_eq!(login("operator", &h.password), 200);
    let file = h.d.dir.join("state/workers/auth/operators");
    let meta = std::fs::metadata(&file).expect("credential file");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    let dir_owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(file.parent().expect("dir")).expect("dir"));
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), dir_owner, "the file must belong to auth's uid");
    // Bad input is refused with a reason, and the file is left as it was.
    let before = std::fs::read_to_string(&file).expect("read");
    let out = user_add("eve:root", Some("long enough password"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("operator name"));
    let out = user_add("eve", Some("short"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("8 to 256 bytes"));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), before);
    let out = std::process::Command::new(common::bin("airlock-hmi"))
        .args(["user", "list", "--config"])
        .arg(&cfg)
        .output()
        .expect("list");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "operator\nalice\nbob\n");
}

#[test]
fn at_the_fastest_poll_every_sample_reaches_the_history_through_streams() {
    let (ui, device) = (free_port(), free_port());
    let cfg = hmi_config(ui, device).replace("poll-ms = 200", "poll-ms = 20");
    assert!(cfg.contains("stream-samples = true"), "the default streams its samples");
    let d = Daemon::start_config(&cfg);
    for w in ["plcsim", "field", "logic", "historian", "auth", "ui"] {
        d.wait_running(w);
    }
    // Both sample streams open (field -> logic, field -> historian).
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.status().streams.len() < 2 {
        assert!(Instant::now() < deadline, "streams: {:?}\n{}", d.status().streams, d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut tos: Vec<String> = d.status().streams.iter().map(|s| s.to.clone()).collect();
    tos.sort();
    assert_eq!(tos, ["historian.samples", "logic.samples"]);
    std::thread::sleep(Duration::from_secs(3));
    let db = d.dir.join("state/workers/historian/history.sqlite3");
    let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open db");
    let polls: i64 = conn.query_row("SELECT COUNT(DISTINCT ts) FROM samples", [], |r| r.get(0)).expect("count");
    let (first, last): (i64, i64) =
        conn.query_row("SELECT MIN(ts), MAX(ts) FROM samples", [], |r| Ok((r.get(0)?, r.get(1)?))).expect("span");
    // Every poll field made is stored: field says when it drops one (a full ring, a stream
    // down), and it never does. The pace itself is the machine's: field's polls run late on a
    // busy machine, so the count is only checked to be of the right order.
    assert!(polls >= 50, "only {polls} polls stored in 3 s");
    let expected = (last - first) / 20 + 1;
    assert!(polls * 2 >= expected, "{polls} polls stored over {} ms (one per 20 ms would be {expected})", last - first);
    println!("{polls} polls stored over {} ms", last - first);
    let log = d.log_text();
    assert!(!log.contains("samples are being dropped"), "{log}");
    assert!(!log.contains("sample stream down"), "{log}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}
