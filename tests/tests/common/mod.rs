//! Shared harness: runs the real `airlockd` with a test configuration in a private directory
//! and talks to it through the real `airlock` CLI.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use airlock_protocol::confinement::Layer;
use airlock_protocol::control::{LayerWord, Status, WorkerState, WorkerStatus};

/// The directory holding the workspace's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    for b in ["airlockd", "airlock", "airlock-worker-echo", "airlock-worker-probe"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo test --workspace` (it builds every binary) or `cargo build --workspace --bins`",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Whether a supervisor started by this test process can read its workers' seccomp filters
/// (`PTRACE_SECCOMP_GET_FILTER`): root, `CAP_SYS_ADMIN`, and not itself under a filter (the
/// kernel refuses the read to a filtered reader). True on the host-root lane only.
pub fn can_read_filters() -> bool {
    let st = proc_status(std::process::id() as i32);
    let cap_eff = u64::from_str_radix(status_field(&st, "CapEff"), 16).unwrap_or(0);
    is_root() && status_field(&st, "Seccomp") == "0" && cap_eff & (1 << 21) != 0
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running `airlockd`.
pub struct Daemon {
    pub child: std::cell::RefCell<Option<Child>>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// The embedded default's `[defaults]` section, for test configurations.
pub const DEFAULTS: &str = r#"
[defaults.confinement]
user-namespace = "best-effort"
pid-namespace = "best-effort"
net-namespace = "best-effort"
mount-namespace = "best-effort"
ipc-namespace = "best-effort"
uts-namespace = "best-effort"
cgroup-namespace = "best-effort"
cgroup = "best-effort"
uid = "best-effort"
landlock = "best-effort"

# Above the address space below: the escape tests see the rlimit refuse first.
[defaults.limits]
memory-mib = 2048

[defaults.rlimits]
nofile = 64
nproc = 512
address-space-mib = 1024
file-size-mib = 64
"#;

pub fn echo_worker(name: &str, service: &str, extra: &str) -> String {
    format!(
        "\n[[worker]]\nname = \"{name}\"\nexecutable = \"airlock-worker-echo\"\npolicy = \"echo\"\nservices = [\"{service}\"]\n{extra}\n"
    )
}

impl Daemon {
    /// Starts `airlockd` with `workers` (TOML `[[worker]]` tables) and waits until every
    /// worker is running, failed or restarting (or `wait_running` is false).
    pub fn start(workers: &str) -> Daemon {
        Daemon::start_with_env(workers, &[])
    }

    /// As `start`, with extra environment variables for `airlockd`.
    /// As `start`, but returns as soon as the control socket is there, while workers may
    /// still be starting.
    pub fn start_without_waiting(workers: &str) -> Daemon {
        let dir = Daemon::prepare(workers);
        Daemon::launch_with(dir, "airlockd.log", &[], false)
    }

    pub fn start_with_env(workers: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = Daemon::prepare(workers);
        Daemon::launch(dir, "airlockd.log", env)
    }

    /// Starts `airlockd` on a whole configuration `body` (its own `[defaults]`, workers and
    /// permits; no `[supervisor]` table, which the harness writes).
    pub fn start_config(body: &str) -> Daemon {
        let dir = Daemon::prepare_with(body, false);
        Daemon::launch(dir, "airlockd.log", &[])
    }

    /// A fresh test directory holding the configuration for `workers`.
    fn prepare(workers: &str) -> PathBuf {
        Daemon::prepare_with(workers, true)
    }

    fn prepare_with(workers: &str, with_defaults: bool) -> PathBuf {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("airlock-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        // Workers run under their own uids: let them write where a test points them (@DIR@).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod test dir");
        let workers = workers.replace("@DIR@", &dir.display().to_string());
        let cfg = format!(
            "[supervisor]\nstate-directory = \"{d}/state\"\nruntime-directory = \"{d}/run\"\nworker-directory = \"{b}\"\nshutdown-timeout-ms = 2000\nready-timeout-ms = 10000\n{defaults}\n{workers}",
            d = dir.display(),
            b = bin_dir().display(),
            defaults = if with_defaults { DEFAULTS } else { "" }
        );
        std::fs::write(dir.join("airlock.toml"), cfg).expect("write config");
        dir
    }

    /// Starts `airlockd` again on the configuration and state a killed daemon left in `dir`.
    pub fn restart(dir: PathBuf, log_name: &str) -> Daemon {
        let _ = std::fs::remove_file(dir.join("run/control.sock"));
        Daemon::launch(dir, log_name, &[])
    }

    /// Starts `airlockd` as systemd would with socket activation: `listener` at fd 3,
    /// `LISTEN_PID` (airlockd's own pid, set by a shell that then execs it), `LISTEN_FDS=1`,
    /// `LISTEN_FDNAMES=name`.
    pub fn start_activated(workers: &str, listener: std::os::fd::OwnedFd, name: &str) -> Daemon {
        let dir = Daemon::prepare(workers);
        let log = dir.join("airlockd.log");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={name} exec \"$0\" --config \"$1\""))
            .arg(bin("airlockd"))
            .arg(dir.join("airlock.toml"))
            .env("AIRLOCK_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        let guard = airlock_protocol::sys::install_child_fds(&mut cmd, vec![(listener, 3)]).expect("fd 3");
        let child = cmd.spawn().expect("spawn airlockd");
        drop(guard);
        let d = Daemon { child: std::cell::RefCell::new(Some(child)), socket: dir.join("run/control.sock"), dir, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.socket.exists() {
            assert!(Instant::now() < deadline, "activated airlockd did not start:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        d.wait_first_starts();
        d
    }

    /// As `start`, with airlockd itself started at nice value `nice` (`nice -n`).
    pub fn start_niced(workers: &str, nice: i32) -> Daemon {
        let dir = Daemon::prepare(workers);
        Daemon::launch_cmd(dir, "airlockd.log", &[], true, Some(nice))
    }

    fn launch(dir: PathBuf, log_name: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::launch_with(dir, log_name, env, true)
    }

    fn launch_with(dir: PathBuf, log_name: &str, env: &[(&str, &str)], wait_starts: bool) -> Daemon {
        Daemon::launch_cmd(dir, log_name, env, wait_starts, None)
    }

    fn launch_cmd(dir: PathBuf, log_name: &str, env: &[(&str, &str)], wait_starts: bool, nice: Option<i32>) -> Daemon {
        let cfg_path = dir.join("airlock.toml");
        let log = dir.join(log_name);
        let mut cmd = match nice {
            Some(n) => {
                let mut c = Command::new("nice");
                c.arg("-n").arg(n.to_string()).arg(bin("airlockd"));
                c
            }
            None => Command::new(bin("airlockd")),
        };
        cmd.arg("--config")
            .arg(&cfg_path)
            .env("AIRLOCK_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("STATE_DIRECTORY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn airlockd");
        let d = Daemon { child: std::cell::RefCell::new(Some(child)), socket: dir.join("run/control.sock"), dir, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.socket.exists() {
            if Instant::now() > deadline {
                panic!("airlockd did not open its control socket; log:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if wait_starts {
            d.wait_first_starts();
        }
        d
    }

    /// Waits (up to 30 s) until no worker is `Starting`: airlockd answers its control socket
    /// while workers start, and tests begin where a user's `systemctl start` returns. Returns
    /// early if airlockd exits or stops answering.
    pub fn wait_first_starts(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.borrow_mut().as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                return;
            }
            let out = self.airlock(&["status", "--json"]);
            if out.status.success() {
                match serde_json::from_slice::<Status>(&out.stdout) {
                    Ok(st) if !st.workers.iter().any(|w| w.state == WorkerState::Starting) => return,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn airlock(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("airlock")).arg("--socket").arg(&self.socket).args(args).output().expect("run airlock")
    }

    pub fn status(&self) -> Status {
        let out = self.airlock(&["status", "--json"]);
        if !out.status.success() {
            let exited = self.child.borrow_mut().as_mut().map(|c| c.try_wait());
            panic!(
                "airlock status failed: {}\nairlockd: {exited:?}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn worker(&self, name: &str) -> WorkerStatus {
        self.status().workers.into_iter().find(|w| w.name == name).expect("worker in status")
    }

    /// Waits until `pred` holds for worker `name`.
    pub fn wait_for(&self, name: &str, what: &str, pred: impl Fn(&WorkerStatus) -> bool) -> WorkerStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = self.worker(name);
            if pred(&w) {
                return w;
            }
            if Instant::now() > deadline {
                panic!("worker {name}: timed out waiting for {what}; last status {w:?}\nlog:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn wait_running(&self, name: &str) -> WorkerStatus {
        self.wait_for(name, "running", |w| w.state == WorkerState::Running && w.pid.is_some())
    }

    pub fn call(&self, service: &str, method: &str, body: &str) -> (bool, String) {
        let out = self.airlock(&["call", service, method, body]);
        let text = if out.status.success() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            String::from_utf8_lossy(&out.stderr)
        };
        (out.status.success(), text.trim().to_string())
    }

    /// Runs `airlock call --deadline-ms DEADLINE SERVICE METHOD BODY` on a thread, for calls
    /// that last while the test does something else; join it for the CLI's output.
    pub fn call_in_background(
        &self,
        deadline_ms: u32,
        service: &str,
        method: &str,
        body: &str,
    ) -> std::thread::JoinHandle<std::process::Output> {
        let sock = self.socket.clone();
        let args: Vec<String> =
            ["call", "--deadline-ms", &deadline_ms.to_string(), service, method, body].map(String::from).into();
        std::thread::spawn(move || {
            Command::new(bin("airlock")).arg("--socket").arg(&sock).args(&args).output().expect("run airlock call")
        })
    }

    /// Waits for a line containing `needle` in the supervisor's log.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.log_text();
            if let Some(line) = t.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!("no log line containing {needle:?}; log:\n{t}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `kill -9` the supervisor (its workers die with it through their parent-death signal)
    /// and keep its directory for [`Daemon::restart`]. Returns the directory and the log.
    pub fn kill9(self) -> (PathBuf, String) {
        let mut child = self.child.borrow_mut().take().expect("child");
        let _ = child.kill();
        let _ = child.wait();
        let log = self.log_text();
        let dir = self.dir.clone();
        std::mem::forget(self);
        (dir, log)
    }

    /// Waits (up to `within`) for the supervisor to exit by itself and keeps its directory
    /// for [`Daemon::restart`]. Returns its exit status, the directory and the log.
    pub fn wait_exit(self, within: Duration) -> (std::process::ExitStatus, PathBuf, String) {
        let mut child = self.child.borrow_mut().take().expect("child");
        let deadline = Instant::now() + within;
        let st = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("airlockd did not exit within {within:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log_text();
        let dir = self.dir.clone();
        std::mem::forget(self);
        (st, dir, log)
    }

    /// The pid of a running worker.
    pub fn pid_of(&self, name: &str) -> i32 {
        self.wait_running(name).pid.expect("pid")
    }

    /// SIGTERM, then wait; returns the exit status and the log.
    pub fn stop(self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.borrow_mut().take().expect("child");
        let pidfd = airlock_supervisor::sys::pidfd_open(child.id() as i32).expect("pidfd_open");
        airlock_supervisor::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&pidfd), libc::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                let log = self.log_text();
                return (st, log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("airlockd did not stop within 20 s of SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.borrow_mut().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fields of `/proc/PID/status` read from outside the worker.
pub fn proc_status(pid: i32) -> String {
    let mut s = String::new();
    std::fs::File::open(format!("/proc/{pid}/status")).and_then(|mut f| f.read_to_string(&mut s)).expect("read status");
    s
}

pub fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':'))).map(str::trim).unwrap_or("")
}

/// `kill -9` a process (a worker, by its host pid from `airlock status`).
pub fn kill9_pid(pid: i32) {
    let fd = airlock_supervisor::sys::pidfd_open(pid).expect("pidfd_open");
    airlock_supervisor::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&fd), libc::SIGKILL).expect("SIGKILL");
}

pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn signal_of(st: &std::process::ExitStatus) -> Option<i32> {
    st.signal()
}

impl Daemon {
    /// airlockd's own pid (the supervisor the workers' namespaces are compared with).
    pub fn pid(&self) -> i32 {
        self.child.borrow().as_ref().map(|c| c.id() as i32).expect("airlockd runs")
    }
}

/// Checks from outside that `w`'s confinement report tells the truth: every layer it calls
/// applied is visible in `/proc` (status, limits, namespaces), every namespace it calls
/// unavailable is really shared with the supervisor, and, on the host-root lane, every layer
/// is applied. `nofile` is the worker's configured `RLIMIT_NOFILE`.
pub fn assert_report_is_truthful(w: &WorkerStatus, supervisor: i32, nofile: u64) {
    let name = &w.name;
    let pid = w.pid.unwrap_or_else(|| panic!("{name} has no pid"));
    let st = proc_status(pid);
    for l in &w.confinement {
        // A layer not applied always says why; an applied or off one never does.
        let needs_why = matches!(l.state, LayerWord::Degraded | LayerWord::Unavailable);
        assert_eq!(l.why.is_some(), needs_why, "{name}: {}: {l}", l.layer);
        if can_read_filters() {
            assert_eq!(l.state, LayerWord::Applied, "{name}: on the host-root lane every layer is applied: {l:?}");
        }
    }
    let applied = |l: Layer| w.state(l) == Some(LayerWord::Applied);
    if applied(Layer::Cgroup) {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
        let mine = format!("/airlock.{supervisor}/{name}");
        assert!(cg.lines().any(|l| l.ends_with(&mine)), "{name}: cgroup applied, but /proc/{pid}/cgroup is {cg}");
    }
    if applied(Layer::Seccomp) {
        assert_eq!(status_field(&st, "Seccomp"), "2", "{name}");
    }
    if applied(Layer::NoNewPrivs) {
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{name}");
    }
    if matches!(w.state(Layer::Capabilities), Some(LayerWord::Applied | LayerWord::Degraded)) {
        for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(status_field(&st, cap), "0000000000000000", "{name}: {cap}");
        }
    }
    if applied(Layer::Capabilities) {
        assert_eq!(status_field(&st, "CapBnd"), "0000000000000000", "{name}");
    }
    let sup = proc_status(supervisor);
    if applied(Layer::Uid) {
        assert_ne!(status_field(&st, "Uid"), status_field(&sup, "Uid"), "{name}: own uid");
        assert_ne!(status_field(&st, "Gid"), status_field(&sup, "Gid"), "{name}: own gid");
        assert_eq!(status_field(&st, "Groups"), "", "{name}: no supplementary groups");
    }
    if applied(Layer::Rlimits) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let row = |what: &str| -> Vec<String> {
            let line = limits.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what} in {limits}"));
            line[what.len()..].split_whitespace().take(2).map(str::to_string).collect()
        };
        assert_eq!(row("Max core file size"), ["0", "0"], "{name}: no core dumps");
        assert_eq!(row("Max open files"), [nofile.to_string(), nofile.to_string()], "{name}: bounded fds");
        assert_ne!(row("Max processes")[0], "unlimited", "{name}: bounded processes");
        assert_ne!(row("Max address space")[0], "unlimited", "{name}: bounded memory");
    }
    for (layer, ns) in [
        (Layer::UserNamespace, "user"),
        (Layer::PidNamespace, "pid"),
        (Layer::NetNamespace, "net"),
        (Layer::MountNamespace, "mnt"),
        (Layer::IpcNamespace, "ipc"),
        (Layer::UtsNamespace, "uts"),
        (Layer::CgroupNamespace, "cgroup"),
    ] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/{supervisor}/ns/{ns}")).expect("supervisor's namespace");
        let theirs = match theirs {
            Ok(t) => t,
            // Reading another process's namespace links takes ptrace-read access to it.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                println!("{name}: /proc/{pid}/ns/ not readable here ({e}); namespaces not checked");
                break;
            }
            Err(e) => panic!("{name}: /proc/{pid}/ns/{ns}: {e}"),
        };
        match w.state(layer) {
            Some(LayerWord::Applied) => assert_ne!(theirs, ours, "{name}: {layer} applied, but shared with airlockd"),
            Some(s @ (LayerWord::Unavailable | LayerWord::Off)) => {
                assert_eq!(theirs, ours, "{name}: {layer} is {s:?}, but the worker has its own")
            }
            _ => {}
        }
    }
    if applied(Layer::PidNamespace) {
        let nspid = status_field(&st, "NSpid");
        assert_eq!(nspid.split_whitespace().last(), Some("1"), "{name}: pid 1 in its own pid namespace: {nspid}");
    }
}
