//! The escape probe: a worker that enters the real sandbox and then tries exactly one thing
//! it must not be able to do, named by its first argument. It reports the outcome as an
//! `Event("outcome ATTEMPT RESULT")` to the supervisor, or dies trying (seccomp kills it).
//!
//! Attempts: read-shadow, read-outside, execve, ptrace-supervisor PID, kill-other PID,
//! list-proc, tcp-connect PORT, unshare, raise-cap, fork-bomb, exhaust-fds, exhaust-memory.
//!
//! With `on-call` it serves the `probe` service instead and makes each attempt a call names
//! (`ATTEMPT [ARG]`), for targets known only once airlockd runs.
//!
//! Two more modes play a worker that lies about its confinement, to test that the supervisor
//! verifies from outside instead of believing the report: `lie-unconfined` reports every layer
//! applied and applies none; `lie-filter POLICY` applies every layer but installs POLICY's
//! filter instead of its own; `unconfined-thread` confines its main thread truthfully but
//! keeps a thread started before confinement. And `ignore-shutdown` is confined truthfully but
//! ignores the supervisor's `Shutdown`. (The probe is a test worker; it is not packaged.)

use airlock_protocol::confinement::errno_name;
use airlock_worker::sys::raw_syscall6;
use airlock_worker::Worker;

fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("errno {}", errno_name(n)),
        None => format!("error {e}"),
    }
}

fn sys_result(r: Result<libc::c_long, i32>) -> String {
    match r {
        Ok(v) => format!("ok {v}"),
        Err(n) => format!("errno {}", errno_name(n)),
    }
}

fn attempt(what: &str, arg: Option<&str>) -> String {
    let arg_num = || arg.and_then(|a| a.parse::<i64>().ok()).unwrap_or(0);
    match what {
        "read-shadow" => match std::fs::read("/etc/shadow") {
            Ok(b) => format!("ok read {} bytes", b.len()),
            Err(e) => errno(&e),
        },
        "read-outside" => match std::fs::read("/etc/passwd") {
            Ok(b) => format!("ok read {} bytes", b.len()),
            Err(e) => errno(&e),
        },
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            sys_result(raw_syscall6(
                libc::SYS_execve,
                [path.as_ptr() as libc::c_long, argv.as_ptr() as libc::c_long, envp.as_ptr() as libc::c_long, 0, 0, 0],
            ))
        }
        "ptrace-supervisor" => {
            sys_result(raw_syscall6(libc::SYS_ptrace, [libc::PTRACE_ATTACH as libc::c_long, arg_num(), 0, 0, 0, 0]))
        }
        "kill-other" => {
            sys_result(raw_syscall6(libc::SYS_kill, [arg_num(), libc::SIGKILL as libc::c_long, 0, 0, 0, 0]))
        }
        "list-proc" => match std::fs::read_dir("/proc") {
            Ok(d) => {
                let pids =
                    d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()).count();
                format!("ok {pids} processes visible")
            }
            Err(e) => errno(&e),
        },
        "tcp-connect" => match std::net::TcpStream::connect(("127.0.0.1", arg_num() as u16)) {
            Ok(_) => "ok connected".into(),
            Err(e) => errno(&e),
        },
        // A priority-inheritance futex operation (the family of CVE-2014-3153): never allowed.
        "futex-pi" => {
            let word = 0u32;
            sys_result(raw_syscall6(
                libc::SYS_futex,
                [&word as *const u32 as libc::c_long, libc::FUTEX_LOCK_PI as libc::c_long, 0, 0, 0, 0],
            ))
        }
        "unshare" => sys_result(raw_syscall6(libc::SYS_unshare, [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0, 0])),
        "raise-cap" => {
            // capset(v3, all caps): header {version, pid=0}, two data structs.
            let header: [u32; 2] = [0x2008_0522, 0];
            let data: [u32; 6] = [u32::MAX; 6];
            sys_result(raw_syscall6(
                libc::SYS_capset,
                [header.as_ptr() as libc::c_long, data.as_ptr() as libc::c_long, 0, 0, 0, 0],
            ))
        }
        "fork-bomb" => {
            let mut made = 0;
            loop {
                match airlock_worker::sys::fork() {
                    Ok(0) => airlock_worker::sys::exit_now(0),
                    Ok(_) => {
                        made += 1;
                        if made >= 10_000 {
                            return format!("ok forked {made}");
                        }
                    }
                    Err(n) => return format!("errno {} after {made} forks", errno_name(n)),
                }
            }
        }
        "exhaust-fds" => {
            let mut held = Vec::new();
            loop {
                match airlock_protocol::sys::memfd_create(c"probe", false) {
                    Ok(fd) => {
                        held.push(fd);
                        if held.len() >= 1_000_000 {
                            return format!("ok opened {}", held.len());
                        }
                    }
                    Err(e) => return format!("{} after {} descriptors", errno(&e), held.len()),
                }
            }
        }
        "exhaust-memory" => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            let mut total = 0usize;
            loop {
                let mut v: Vec<u8> = Vec::new();
                if v.try_reserve_exact(64 << 20).is_err() {
                    return format!("errno ENOMEM after {} MiB", total >> 20);
                }
                v.resize(64 << 20, 1);
                total += v.len();
                held.push(v);
                if total >= 64 << 30 {
                    return format!("ok allocated {} MiB", total >> 20);
                }
            }
        }
        other => format!("unknown attempt {other}"),
    }
}

/// The start-up of `Worker::start`, with a lie in it (or, for `ignore-shutdown`, none); then it
/// idles until the supervisor stops it (or kills it, which is what the tests expect).
fn lie(mode: &str, policy: Option<&str>) -> Result<(), String> {
    use airlock_protocol::confinement::{ConfinementReport, LayerState};
    use airlock_protocol::{handoff, Hello, Limits, Role};
    use airlock_worker::sandbox;
    use airlock_worker::wire::{FromWorker, ToWorker};
    use airlock_worker::{Layer, Requirement};
    let mut ch = handoff::take_inherited(Limits::default()).map_err(|e| e.to_string())?;
    ch.handshake(&Hello::new(Role::Worker, "probe")).map_err(|e| e.to_string())?;
    let mut plan = match ch.recv::<ToWorker>().map_err(|e| e.to_string())?.msg {
        ToWorker::Confine(p) => p,
        _ => return Err("expected Confine".into()),
    };
    if mode == "unconfined-thread" {
        // A thread started before confinement keeps what the process had (capabilities, no
        // Landlock domain): the supervisor must check every thread, not just the main one.
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        });
    }
    let report = if mode == "ignore-shutdown" || mode == "unconfined-thread" {
        // Truthful: the real confinement; the misbehaviour comes at shutdown.
        let mut r = sandbox::apply_before_seccomp(&plan).map_err(|f| f.reason)?;
        sandbox::apply_seccomp(&plan, &mut r).map_err(|f| f.reason)?;
        r
    } else if mode == "lie-unconfined" {
        let mut r = ConfinementReport::default();
        for l in Layer::ALL {
            let state = if plan.requirement(l) == Requirement::Off { LayerState::Off } else { LayerState::Applied };
            r.set(l, state);
        }
        r
    } else {
        // Another policy's program, compiled here (a real worker never compiles; this
        // liar links the policy files to do it).
        plan.policy = policy.unwrap_or("echo").to_string();
        let prog = airlock_policies::embedded()
            .compile(&plan.policy, airlock_policies::Arch::native())
            .map_err(|e| e.to_string())?;
        plan.seccomp_program = airlock_policies::pack_program(&prog);
        let mut r = sandbox::apply_before_seccomp(&plan).map_err(|f| f.reason)?;
        sandbox::apply_seccomp(&plan, &mut r).map_err(|f| f.reason)?;
        r
    };
    ch.send(&FromWorker::Confined(report)).map_err(|e| e.to_string())?;
    if let ToWorker::Start { .. } = ch.recv::<ToWorker>().map_err(|e| e.to_string())?.msg {
        ch.send(&FromWorker::Ready { services: Vec::new() }).map_err(|e| e.to_string())?;
    }
    while let Ok(m) = ch.recv::<ToWorker>() {
        if let ToWorker::Shutdown = m.msg {
            if mode == "ignore-shutdown" {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            break;
        }
    }
    Ok(())
}

fn main() {
    airlock_worker::init_logging();
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).cloned().unwrap_or_default();
    if what.starts_with("lie-") || what == "ignore-shutdown" || what == "unconfined-thread" {
        if let Err(e) = lie(&what, args.get(2).map(String::as_str)) {
            eprintln!("airlock-worker-probe: {e}");
            std::process::exit(2);
        }
        return;
    }
    // `on-call`: serve the `probe` service; each call's body is `ATTEMPT [ARG]`, for targets
    // known only once airlockd runs (its pid, another worker's pid).
    if what == "on-call" {
        let mut w = match Worker::start("probe", &["probe"]) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("airlock-worker-probe: {e}");
                std::process::exit(2);
            }
        };
        let _ = w.serve(|_, req, _| {
            let text = String::from_utf8_lossy(&req.body).into_owned();
            let mut words = text.split_whitespace();
            let what = words.next().unwrap_or_default();
            Ok(airlock_worker::Response::bytes(attempt(what, words.next()).into_bytes()))
        });
        return;
    }
    let mut w = match Worker::start("probe", &[]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-probe: {e}");
            std::process::exit(2);
        }
    };
    let outcome = attempt(&what, args.get(2).map(String::as_str));
    if w.event(&format!("outcome {what} {outcome}")).is_err() {
        std::process::exit(3);
    }
    let _ = w.serve(|_, _, _| Err("the probe serves nothing".into()));
}
