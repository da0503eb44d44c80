//! Shared by the integration tests: re-executing the test binary as a probe process, and the
//! raw syscalls a probe issues after it confined itself.
//!
//! A probe is this same test binary, started with `AIRLOCK_POLICY_PROBE=<spec>` and told by
//! libtest to run only `probe_entry`, which does nothing unless the variable is set. Raw
//! syscalls need `unsafe`; it is confined to this module, each block with its `SAFETY` note.
#![allow(unsafe_code, dead_code)]

pub mod semantics;

use std::process::{Command, ExitStatus, Stdio};

pub const PROBE_ENV: &str = "AIRLOCK_POLICY_PROBE";

/// Exit code of a probe whose forbidden syscall returned success: never a valid errno.
pub const RETURNED_OK: i32 = 200;
/// Exit code of a probe that failed before reaching its syscall.
pub const SETUP_FAILED: i32 = 201;

/// A command that re-runs this test binary as a probe with `spec`.
pub fn probe_command(spec: &str) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "probe_entry", "--nocapture", "--test-threads=1", "-q"])
        .env(PROBE_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Runs a probe to completion and returns how it ended, with its stderr.
pub fn run_probe(spec: &str) -> (ExitStatus, String) {
    let out = probe_command(spec).stderr(Stdio::piped()).output().expect("spawn probe");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The probe spec of this process, if it is a probe.
pub fn probe_spec() -> Option<String> {
    std::env::var(PROBE_ENV).ok()
}

/// Sets no_new_privs and installs the embedded policy `name`: what a worker does last.
pub fn confine(name: &str) {
    let prog = match airlock_policies::embedded().compile(name, airlock_policies::Arch::native()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("probe: compiling {name}: {e}");
            exit(SETUP_FAILED);
        }
    };
    if let Err(e) = airlock_policies::set_no_new_privs() {
        eprintln!("probe: no_new_privs: {e}");
        exit(SETUP_FAILED);
    }
    if let Err(e) = airlock_policies::install(&prog) {
        eprintln!("probe: install {name}: {e}");
        exit(SETUP_FAILED);
    }
}

/// Ends the process at once with `code` (`exit_group`), running no destructors or atexit
/// handlers, which might need syscalls the policy refuses.
pub fn exit(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns.
    unsafe { libc::_exit(code) }
}

/// Issues raw syscall `nr` with `args`; returns the result or the errno.
pub fn raw_syscall(nr: u32, args: [u64; 6]) -> Result<i64, i32> {
    // SAFETY: callers pass arguments that are invalid pointers (u64::MAX, rejected by the
    // kernel with EFAULT before any access), small integers, or pointers to live local
    // memory; the probe process exits right after, so no Rust invariant can be observed
    // broken even if a call succeeded.
    let rc = unsafe {
        libc::syscall(
            libc::c_long::from(nr as i32),
            args[0] as libc::c_long,
            args[1] as libc::c_long,
            args[2] as libc::c_long,
            args[3] as libc::c_long,
            args[4] as libc::c_long,
            args[5] as libc::c_long,
        )
    };
    if rc == -1 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

/// Makes syscall `name` with `args` and exits: 0..=133 is the errno it returned,
/// `RETURNED_OK` if it succeeded. A policy that kills never lets the probe get that far.
pub fn call_and_exit(name: &str, args: [u64; 6]) -> ! {
    let Some(nr) = airlock_policies::syscalls::number(airlock_policies::Arch::native(), name) else {
        eprintln!("probe: {name} does not exist on this architecture");
        exit(SETUP_FAILED);
    };
    match raw_syscall(nr, args) {
        Ok(_) => exit(RETURNED_OK),
        Err(errno) => exit(errno),
    }
}

/// Prints a note straight to stderr, past libtest's output capture, so that skips and the
/// lane a test ran in show in every log.
pub fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// True when this process runs with euid 0 and no seccomp filter of its own.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
