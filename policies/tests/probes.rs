//! Probes under the real compiled policies: a process installs a shipped policy on itself and
//! then makes one named syscall (or runs a real workload); the parent asserts the exact outcome:
//! killed by SIGSYS, the errno the policy names, or success.
//!
//! Installing a filter needs only no_new_privs, so every test here runs as root, as an
//! unprivileged user and inside rootless containers alike.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use airlock_policies::{risk, syscalls, Action, Arch, Policy};
use airlock_protocol::{BulkMode, BulkPool, BulkWriter, Channel, Hello, Limits, Role, DEFAULT_REKEY_INTERVAL};
use common::{call_and_exit, confine, exit, probe_spec, run_probe, RETURNED_OK, SETUP_FAILED};
use serde::{Deserialize, Serialize};

/// Entry point of the probe process; a no-op when this binary runs as a normal test.
#[test]
fn probe_entry() {
    let Some(spec) = probe_spec() else { return };
    let (policy, what) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
    match what {
        "workload" => {
            let code = match channel_workload(policy) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("probe workload under {policy}: {e}");
                    1
                }
            };
            exit(code)
        }
        "tcp" => exit(tcp_workload(policy).map(|()| 0).unwrap_or_else(|e| report(policy, &e))),
        "client" => exit(tcp_client_workload(policy).map(|()| 0).unwrap_or_else(|e| report(policy, &e))),
        "files" => exit(file_workload(policy, true).map(|()| 0).unwrap_or_else(|e| report(policy, &e))),
        "read-files" => exit(file_workload(policy, false).map(|()| 0).unwrap_or_else(|e| report(policy, &e))),
        _ => {}
    }
    let (name, args) = syscall_case(what);
    confine(policy);
    call_and_exit(name, args)
}

fn report(policy: &str, e: &str) -> i32 {
    eprintln!("probe under {policy}: {e}");
    1
}

const MAX: u64 = u64::MAX;

/// The syscall and harmless arguments of a probe case: invalid pointers (EFAULT), invalid
/// descriptors (EBADF) or invalid flags (EINVAL), so that even an allowed call changes nothing.
fn syscall_case(what: &str) -> (&str, [u64; 6]) {
    let ns_flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_FS) as u64;
    match what {
        // clone with namespace flags (and CLONE_FS, which they conflict with: EINVAL if run)
        "clone-namespaces" => ("clone", [ns_flags, 0, 0, 0, 0, 0]),
        "mmap-exec" => (
            "mmap",
            [
                0,
                4096,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                MAX,
                0,
            ],
        ),
        "mmap-rw" => (
            "mmap",
            [
                0,
                4096,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                MAX,
                0,
            ],
        ),
        "mprotect-exec" => ("mprotect", [0, 0, (libc::PROT_READ | libc::PROT_EXEC) as u64, 0, 0, 0]),
        "socket-inet" => ("socket", [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]),
        "write-stdout" => ("write", [1, 0, 0, 0, 0, 0]),
        "write-stderr" => ("write", [2, 0, 0, 0, 0, 0]),
        "fcntl-setfl" => ("fcntl", [MAX, libc::F_SETFL as u64, 0, 0, 0, 0]),
        "fcntl-getfd" => ("fcntl", [MAX, libc::F_GETFD as u64, 0, 0, 0, 0]),
        "fcntl-getlk" => ("fcntl", [MAX, libc::F_GETLK as u64, 0, 0, 0, 0]),
        "fcntl-setlk" => ("fcntl", [MAX, libc::F_SETLK as u64, 0, 0, 0, 0]),
        "fcntl-setlkw" => ("fcntl", [MAX, libc::F_SETLKW as u64, 0, 0, 0, 0]),
        "fcntl-ofd-setlk" => ("fcntl", [MAX, libc::F_OFD_SETLK as u64, 0, 0, 0, 0]),
        "fchown" => ("fchown", [MAX, 0, 0, 0, 0, 0]),
        "ioctl-fionbio" => ("ioctl", [MAX, libc::FIONBIO, 0, 0, 0, 0]),
        "ioctl-tiocsti" => ("ioctl", [MAX, libc::TIOCSTI, 0, 0, 0, 0]),
        "ioctl-fionread" => ("ioctl", [MAX, libc::FIONREAD, 0, 0, 0, 0]),
        "setsockopt-rcvtimeo" => sockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO),
        "setsockopt-sndtimeo" => sockopt(libc::SOL_SOCKET, libc::SO_SNDTIMEO),
        "setsockopt-nodelay" => sockopt(libc::IPPROTO_TCP, libc::TCP_NODELAY),
        "setsockopt-reuseaddr" => sockopt(libc::SOL_SOCKET, libc::SO_REUSEADDR),
        // TCP_NODELAY's number (1) at the socket level: SO_DEBUG
        "setsockopt-nodelay-at-sol-socket" => sockopt(libc::SOL_SOCKET, libc::TCP_NODELAY),
        "prctl-dumpable" => ("prctl", [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0]),
        "prctl-seccomp" => ("prctl", [libc::PR_SET_SECCOMP as u64, MAX, 0, 0, 0, 0]),
        "madvise-hwpoison" => ("madvise", [0, 0, libc::MADV_HWPOISON as u64, 0, 0, 0]),
        "getpid" => ("getpid", [0; 6]),
        // rt_sigaction(sig, NULL, NULL, 8) only queries: harmless if it runs
        "sigaction-sigsys" => ("rt_sigaction", [libc::SIGSYS as u64, 0, 0, 8, 0, 0]),
        "sigaction-sigsegv" => ("rt_sigaction", [libc::SIGSEGV as u64, 0, 0, 8, 0, 0]),
        "openat" => ("openat", [MAX, MAX, 0, 0, 0, 0]),
        // glibc's own probe of /proc/sys/vm/overcommit_memory (flags O_RDONLY|O_CLOEXEC)
        "openat-rdonly-cloexec" => ("openat", [MAX, MAX, libc::O_CLOEXEC as u64, 0, 0, 0]),
        // every dangerous syscall by name
        name => (name, [MAX; 6]),
    }
}

/// `setsockopt(-1, level, option, NULL, 0)`: EBADF if the policy lets it run.
fn sockopt(level: i32, option: i32) -> (&'static str, [u64; 6]) {
    ("setsockopt", [MAX, level as u64, option as u64, 0, 0, 0])
}

/// How a probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Sigsys,
    Errno(i32),
    Returned,
}

fn outcome(status: ExitStatus, stderr: &str) -> Outcome {
    if status.signal() == Some(libc::SIGSYS) {
        return Outcome::Sigsys;
    }
    match status.code() {
        Some(RETURNED_OK) => Outcome::Returned,
        Some(SETUP_FAILED) | None => panic!("probe did not reach its syscall: {status:?}\n{stderr}"),
        Some(e) => Outcome::Errno(e),
    }
}

fn probe(policy: &str, case: &str) -> Outcome {
    let (status, stderr) = run_probe(&format!("{policy}:{case}"));
    outcome(status, &stderr)
}

/// The cases probed as dangerous: every name of the list plus `clone` with namespace flags.
fn dangerous_cases() -> Vec<&'static str> {
    let mut cases = Vec::new();
    for (name, _) in risk::DANGEROUS {
        if syscalls::number(Arch::native(), name).is_some() {
            cases.push(*name);
        } else {
            common::say(&format!("note: {name} does not exist on {}, nothing to probe", Arch::native()));
        }
    }
    cases.push("clone-namespaces");
    cases
}

/// What `policy` must do with dangerous `case`: what its rules say for the probe's very
/// arguments (the independent reading in `common::semantics`): an errno it names (the runtime
/// group's ENOSYS for `clone3`), or death by SIGSYS. `Err` with the justification when the
/// policy lets the call run by a reviewed dangerous rule: then there is nothing to refuse.
fn expected_for_dangerous(policy: &Policy, case: &str) -> Result<Outcome, String> {
    let (name, args) = syscall_case(case);
    let nr = syscalls::number(Arch::native(), name).expect("dangerous cases exist natively");
    match common::semantics::expected(policy, Arch::native(), nr, &args) {
        Action::Errno(e) => Ok(Outcome::Errno(e as i32)),
        Action::Trap | Action::KillThread | Action::KillProcess => Ok(Outcome::Sigsys),
        Action::Allow | Action::Log => {
            let mut rules = policy.rules_for(Arch::native()).filter(|r| r.syscall == name);
            let justified = rules.find_map(|r| risk::why_dangerous(r).and(r.dangerous.clone()));
            Err(justified.unwrap_or_else(|| panic!("{}: {case} runs without a dangerous justification", policy.name)))
        }
    }
}

/// Probes every dangerous case under `policy`; returns the wrong outcomes.
fn dangerous_syscalls_refused_under(policy: &Policy, cases: &[&str]) -> Vec<String> {
    let mut wrong = Vec::new();
    for case in cases {
        match expected_for_dangerous(policy, case) {
            Ok(want) => {
                let got = probe(&policy.name, case);
                if got != want {
                    wrong.push(format!("{}: {case}: expected {want:?}, got {got:?}", policy.name));
                }
            }
            Err(why) => common::say(&format!("skipped: {} allows {case}, justified: {why}", policy.name)),
        }
    }
    wrong
}

#[test]
fn dangerous_syscalls_under_every_worker_policy_die_by_sigsys_or_get_the_named_errno() {
    let cases = dangerous_cases();
    assert!(cases.len() > 40, "only {} dangerous cases probed", cases.len());
    let policies = airlock_policies::embedded().policies();
    let wrong: Vec<String> = policies.flat_map(|policy| dangerous_syscalls_refused_under(policy, &cases)).collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn mmap_with_prot_exec_under_echo_dies_by_sigsys() {
    assert_eq!(probe("echo", "mmap-exec"), Outcome::Sigsys);
}

#[test]
fn mmap_read_write_under_echo_runs() {
    // The positive control of the PROT_EXEC condition: same call, without PROT_EXEC. The fd
    // is -1 with MAP_ANONYMOUS, so the call succeeds.
    assert_eq!(probe("echo", "mmap-rw"), Outcome::Returned);
}

#[test]
fn mprotect_to_exec_under_echo_dies_by_sigsys() {
    assert_eq!(probe("echo", "mprotect-exec"), Outcome::Sigsys);
}

#[test]
fn socket_under_echo_dies_by_sigsys() {
    assert_eq!(probe("echo", "socket-inet"), Outcome::Sigsys);
}

#[test]
fn write_to_stdout_under_echo_dies_but_stderr_is_allowed() {
    assert_eq!(probe("echo", "write-stdout"), Outcome::Sigsys);
    // write(2, NULL, 0) returns 0: allowed.
    assert_eq!(probe("echo", "write-stderr"), Outcome::Returned);
}

#[test]
fn fcntl_under_echo_allows_named_commands_only() {
    assert_eq!(probe("echo", "fcntl-setfl"), Outcome::Sigsys);
    // F_GETFD on fd -1 runs and fails with EBADF: allowed, and harmless.
    assert_eq!(probe("echo", "fcntl-getfd"), Outcome::Errno(libc::EBADF));
}

#[test]
fn fcntl_under_historian_allows_posix_locks_and_echo_refuses_them() {
    // On fd -1 an allowed command fails with EBADF: it ran, harmlessly.
    for case in ["fcntl-getlk", "fcntl-setlk", "fcntl-setlkw"] {
        assert_eq!(probe("historian", case), Outcome::Errno(libc::EBADF), "historian {case}");
        assert_eq!(probe("echo", case), Outcome::Sigsys, "echo {case}");
    }
    assert_eq!(probe("historian", "fcntl-ofd-setlk"), Outcome::Sigsys);
    assert_eq!(probe("historian", "fcntl-setfl"), Outcome::Sigsys);
}

#[test]
fn fchown_under_historian_gets_eperm_without_running() {
    // fchown(-1, ...) would fail with EBADF if it ran: EPERM is the policy's answer.
    assert_eq!(probe("historian", "fchown"), Outcome::Errno(libc::EPERM));
    assert_eq!(probe("echo", "fchown"), Outcome::Sigsys);
}

#[test]
fn ioctl_under_plcsim_allows_fionbio_only() {
    assert_eq!(probe("plcsim", "ioctl-fionbio"), Outcome::Errno(libc::EBADF));
    assert_eq!(probe("plcsim", "ioctl-tiocsti"), Outcome::Sigsys);
    assert_eq!(probe("plcsim", "ioctl-fionread"), Outcome::Sigsys);
    assert_eq!(probe("field", "ioctl-fionbio"), Outcome::Sigsys);
}

#[test]
fn setsockopt_under_field_and_plcsim_allows_their_named_options_only() {
    // Allowed options run and fail with EBADF on fd -1; field bounds reads too, plcsim
    // only writes.
    for (policy, case, want) in [
        ("field", "setsockopt-rcvtimeo", Outcome::Errno(libc::EBADF)),
        ("field", "setsockopt-sndtimeo", Outcome::Errno(libc::EBADF)),
        ("field", "setsockopt-nodelay", Outcome::Errno(libc::EBADF)),
        ("field", "setsockopt-reuseaddr", Outcome::Sigsys),
        ("field", "setsockopt-nodelay-at-sol-socket", Outcome::Sigsys),
        ("plcsim", "setsockopt-rcvtimeo", Outcome::Sigsys),
        ("plcsim", "setsockopt-sndtimeo", Outcome::Errno(libc::EBADF)),
        ("plcsim", "setsockopt-nodelay", Outcome::Errno(libc::EBADF)),
        ("plcsim", "setsockopt-reuseaddr", Outcome::Sigsys),
        ("plcsim", "setsockopt-nodelay-at-sol-socket", Outcome::Sigsys),
    ] {
        assert_eq!(probe(policy, case), want, "{policy} {case}");
    }
}

#[test]
fn bridge_has_no_network_and_no_path_of_its_own_only_its_socket_options() {
    // The bridge reaches the broker only on the connection airlockd opened, and reads its
    // certificates and password from descriptors airlockd opened.
    for (case, want) in [
        ("socket-inet", Outcome::Sigsys),
        ("openat", Outcome::Sigsys),
        ("openat-rdonly-cloexec", Outcome::Errno(libc::EACCES)),
        ("ioctl-fionbio", Outcome::Sigsys),
        ("setsockopt-rcvtimeo", Outcome::Errno(libc::EBADF)),
        ("setsockopt-sndtimeo", Outcome::Errno(libc::EBADF)),
        ("setsockopt-nodelay", Outcome::Errno(libc::EBADF)),
        ("setsockopt-reuseaddr", Outcome::Sigsys),
        ("setsockopt-nodelay-at-sol-socket", Outcome::Sigsys),
    ] {
        assert_eq!(probe("bridge", case), want, "bridge {case}");
    }
}

#[test]
fn prctl_under_echo_allows_thread_names_only() {
    assert_eq!(probe("echo", "prctl-dumpable"), Outcome::Sigsys);
    assert_eq!(probe("echo", "prctl-seccomp"), Outcome::Sigsys);
}

#[test]
fn madvise_hwpoison_under_echo_dies_by_sigsys() {
    assert_eq!(probe("echo", "madvise-hwpoison"), Outcome::Sigsys);
}

#[test]
fn sigaction_for_sigsys_under_echo_dies_but_other_signals_are_allowed() {
    // A confined worker can neither replace nor reset its SIGSYS reporter.
    assert_eq!(probe("echo", "sigaction-sigsys"), Outcome::Sigsys);
    assert_eq!(probe("echo", "sigaction-sigsegv"), Outcome::Returned);
}

#[test]
fn getpid_under_echo_runs() {
    assert_eq!(probe("echo", "getpid"), Outcome::Returned);
}

#[test]
fn openat_is_refused_by_echo_and_ui_and_allowed_by_historian() {
    assert_eq!(probe("echo", "openat"), Outcome::Sigsys);
    // ui traps: no handler in the probe, so the trap's SIGSYS kills it just the same.
    assert_eq!(probe("ui", "openat"), Outcome::Sigsys);
    assert_eq!(probe("historian", "openat"), Outcome::Errno(libc::EFAULT));
}

#[test]
fn glibc_read_only_open_under_echo_gets_eacces_and_historian_runs_it() {
    assert_eq!(probe("echo", "openat-rdonly-cloexec"), Outcome::Errno(libc::EACCES));
    assert_eq!(probe("historian", "openat-rdonly-cloexec"), Outcome::Errno(libc::EFAULT));
}

// ----------------------------------------------------------------------------- workloads

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Sum(u64),
    Stop,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// The echo worker's job under its own policy: channels come from the hand-off before
/// confinement (creating sockets is not in the policy); everything after runs confined.
fn channel_workload(policy: &str) -> Result<(), String> {
    let e = |x: airlock_protocol::ChannelError| x.to_string();
    let (mut sup, mut worker) = Channel::pair(Limits::default(), DEFAULT_REKEY_INTERVAL).map_err(e)?;
    confine(policy);
    let peer = std::thread::Builder::new()
        .name("echo-worker".into())
        .spawn(move || -> Result<u64, String> {
            let e = |x: airlock_protocol::ChannelError| x.to_string();
            worker.handshake(&Hello::new(Role::Worker, "echo")).map_err(e)?;
            let mut handled = 0;
            loop {
                let r = worker.recv::<Msg>().map_err(e)?;
                handled += 1;
                match (r.msg, r.bulk) {
                    (Msg::Stop, _) => return Ok(handled),
                    (Msg::Ping(n), Some(bulk)) => {
                        worker.send(&Msg::Sum(checksum(&bulk) ^ n)).map_err(e)?;
                    }
                    (Msg::Ping(n), None) => worker.send(&Msg::Ping(n)).map_err(e)?,
                    (m, _) => return Err(format!("unexpected {m:?}")),
                }
            }
        })
        .map_err(|x| format!("spawning a thread: {x}"))?;
    let hello = sup.handshake(&Hello::new(Role::Supervisor, "probe")).map_err(e)?;
    if hello.name != "echo" {
        return Err(format!("peer said {hello:?}"));
    }
    sup.send(&Msg::Ping(1)).map_err(e)?;
    if sup.recv::<Msg>().map_err(e)?.msg != Msg::Ping(1) {
        return Err("ping not echoed".into());
    }
    let batch: Vec<Msg> = (0..300).map(Msg::Ping).collect();
    sup.send_batch(&batch).map_err(e)?;
    for i in 0..300 {
        let got = sup.recv_timeout::<Msg>(Duration::from_secs(10)).map_err(e)?.ok_or("batch echo timed out")?;
        if got.msg != Msg::Ping(i) {
            return Err(format!("batch echo {i}: {:?}", got.msg));
        }
    }
    let threshold = sup.limits().inline_threshold;
    for (seed, mode) in [(1usize, BulkMode::Sealed), (2, BulkMode::SealedEncrypted)] {
        let data = pattern(1 << 20, seed);
        let w = BulkWriter::copy_from(&data, threshold).map_err(|x| x.to_string())?;
        if !w.is_memfd() {
            return Err("1 MiB bulk did not use a memfd".into());
        }
        sup.send_bulk(&Msg::Ping(seed as u64), &[], w, mode).map_err(e)?;
        let want = Msg::Sum(checksum(&data) ^ seed as u64);
        let got = sup.recv::<Msg>().map_err(e)?.msg;
        if got != want {
            return Err(format!("{mode:?} bulk: got {got:?}, want {want:?}"));
        }
    }
    let pool = BulkPool::new(1 << 20, 2).map_err(|x| format!("BulkPool: {x}"))?;
    pool.wait_full()?;
    let mut w = BulkWriter::allocate_from(&pool, 1 << 20, threshold).map_err(|x| x.to_string())?;
    let data = pattern(1 << 20, 3);
    w.as_mut_slice().copy_from_slice(&data);
    sup.send_bulk(&Msg::Ping(3), &[], w, BulkMode::Sealed).map_err(e)?;
    if sup.recv::<Msg>().map_err(e)?.msg != Msg::Sum(checksum(&data) ^ 3) {
        return Err("pooled bulk not echoed".into());
    }
    drop(pool);
    sup.send(&Msg::Stop).map_err(e)?;
    let handled = peer.join().map_err(|_| "worker thread panicked")??;
    if handled != 1 + 300 + 2 + 1 + 1 {
        return Err(format!("worker handled {handled} messages"));
    }
    Ok(())
}

#[test]
fn echo_workload_runs_under_the_echo_policy() {
    let (status, stderr) = run_probe("echo:workload");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

#[test]
fn logic_workload_runs_under_the_logic_policy() {
    let (status, stderr) = run_probe("logic:workload");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

/// A TCP role's job: accept on an inherited listener, exchange bytes, shut down. The listener
/// and the client's connection are made before confinement (the client stands in for a
/// browser on another machine; connect completes in the kernel's backlog).
fn tcp_workload(policy: &str) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut client = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    confine(policy);
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    client.write_all(b"GET /").map_err(|e| format!("client write: {e}"))?;
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    conn.write_all(b"200 OK").map_err(|e| format!("write: {e}"))?;
    let mut reply = [0u8; 6];
    client.read_exact(&mut reply).map_err(|e| format!("client read: {e}"))?;
    conn.shutdown(std::net::Shutdown::Both).map_err(|e| format!("shutdown: {e}"))?;
    if &buf != b"GET /" || &reply != b"200 OK" {
        return Err("bytes garbled".into());
    }
    Ok(())
}

#[test]
fn ui_serves_a_tcp_client_under_the_ui_policy() {
    let (status, stderr) = run_probe("ui:tcp");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

#[test]
fn plcsim_serves_a_tcp_client_under_its_policy() {
    let (status, stderr) = run_probe("plcsim:tcp");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

/// The field layer's job: a Modbus exchange on a connection the supervisor made and passed
/// (made here before confinement), with timeouts on its reads and writes.
fn tcp_client_workload(policy: &str) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let mut device =
        TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?).map_err(|e| format!("connect: {e}"))?;
    let (mut peer, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    confine(policy);
    device.set_read_timeout(Some(std::time::Duration::from_secs(2))).map_err(|e| format!("timeout: {e}"))?;
    device.set_write_timeout(Some(std::time::Duration::from_secs(2))).map_err(|e| format!("timeout: {e}"))?;
    device.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    device.write_all(b"req").map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 3];
    peer.read_exact(&mut buf).map_err(|e| format!("device read: {e}"))?;
    peer.write_all(b"ans").map_err(|e| format!("device write: {e}"))?;
    device.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if &buf != b"ans" {
        return Err("bytes garbled".into());
    }
    Ok(())
}

#[test]
fn field_exchanges_on_a_brokered_connection_under_its_policy() {
    let (status, stderr) = run_probe("field:client");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

#[test]
fn field_cannot_open_a_network_connection_of_its_own() {
    let (status, _) = run_probe("field:socket-inet");
    assert_eq!(status.signal(), Some(31), "field made a socket of its own: {status:?}");
}

/// The historian's job (write, sync, read back, remove a record file) or, with `write` false,
/// auth's (read a file). The directory is made before confinement, as the supervisor would.
fn file_workload(policy: &str, write: bool) -> Result<(), String> {
    let dir = std::env::var_os(DIR_ENV).map(std::path::PathBuf::from).ok_or("no state directory given")?;
    let path = dir.join("record");
    if !write {
        std::fs::write(&path, b"operator:hash").map_err(|e| format!("seed: {e}"))?;
    }
    confine(policy);
    if write {
        let mut f = std::fs::File::create(&path).map_err(|e| format!("create: {e}"))?;
        f.write_all(b"t=1 v=42\n").map_err(|e| format!("write: {e}"))?;
        f.sync_all().map_err(|e| format!("fsync: {e}"))?;
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        drop(f);
        let back = std::fs::read(&path).map_err(|e| format!("read: {e}"))?;
        if back != b"t=1 v=42\n" {
            return Err("record garbled".into());
        }
        std::fs::remove_file(&path).map_err(|e| format!("unlink: {e}"))?;
    } else {
        let back = std::fs::read(&path).map_err(|e| format!("read: {e}"))?;
        if back != b"operator:hash" {
            return Err("credential store garbled".into());
        }
    }
    Ok(())
}

const DIR_ENV: &str = "AIRLOCK_POLICY_PROBE_DIR";

/// Runs a file probe with a fresh state directory (made here, as the supervisor would, and
/// removed afterwards).
fn run_file_probe(spec: &str) -> (ExitStatus, String) {
    let dir = std::env::temp_dir().join(format!("airlock-policies-{}-{}", spec.replace(':', "-"), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let out = common::probe_command(spec).env(DIR_ENV, &dir).stderr(std::process::Stdio::piped()).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("spawn probe");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn historian_writes_syncs_reads_and_removes_a_record_under_its_policy() {
    let (status, stderr) = run_file_probe("historian:files");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}

#[test]
fn auth_reads_its_store_under_its_policy() {
    let (status, stderr) = run_file_probe("auth:read-files");
    assert!(status.success(), "{status:?} (signal {:?})\n{stderr}", status.signal());
}
