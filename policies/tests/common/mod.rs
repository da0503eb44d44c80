//! Shared by the integration tests: re-executing the test binary as a probe process, and the
//! raw syscalls a probe issues after it confined itself.
//!
//! A probe is this same test binary, started with `AIRLOCK_POLICY_PROBE=<spec>` and told by
//! libtest to run only `probe_entry`, which does nothing unless the variable is set. The raw
//! syscalls a probe issues live in `sys`, the one module of the tests allowed to use them.
#![allow(dead_code)]

pub mod semantics;
pub mod sys;

#[allow(unused_imports)]
pub use sys::{exit, is_root, raw_syscall};

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
