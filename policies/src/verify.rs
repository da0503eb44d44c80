//! Reading the seccomp filters installed in a live process and naming the policy they are.
//!
//! `PTRACE_SECCOMP_GET_FILTER` needs `CAP_SYS_ADMIN` (in the initial user namespace), ptrace
//! access to the process, and a reader that is not itself under a seccomp filter. We seize the
//! process (`PTRACE_SEIZE`, which sends no signal), stop it with `PTRACE_INTERRUPT`, read every
//! filter, and detach; the process then carries on (an interrupted sleep restarts through
//! `restart_syscall`, which every shipped policy allows).

use std::io;

use seccompiler::{sock_filter, BpfProgram};

use crate::arch::Arch;
use crate::error::PolicyError;
use crate::sys;
use crate::PolicySet;

fn denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The seccomp filters of `pid`'s thread `pid`, index 0 first (the most recently installed, the
/// one the kernel runs first). Empty when the process has none.
pub fn read_installed_filters(pid: i32) -> Result<Vec<BpfProgram>, PolicyError> {
    let fail = |step: &'static str, source: io::Error| {
        if denied(&source) {
            PolicyError::ReadFilterDenied { pid, source }
        } else {
            PolicyError::ReadFilter { pid, step, source }
        }
    };
    sys::ptrace_seize(pid).map_err(|e| fail("PTRACE_SEIZE", e))?;
    let result = (|| {
        sys::ptrace_interrupt(pid).map_err(|e| fail("PTRACE_INTERRUPT", e))?;
        wait_for_stop(pid).map_err(|e| fail("waiting for the stop", e))?;
        let mut filters = Vec::new();
        for index in 0.. {
            match sys::seccomp_filter(pid, index) {
                Ok(Some(f)) => filters.push(f),
                Ok(None) => break,
                // EINVAL at index 0: the process is not in filter mode; say "none" only when
                // /proc confirms seccomp is off (strict mode also answers EINVAL).
                Err(e) if index == 0 && e.raw_os_error() == Some(libc::EINVAL) && seccomp_mode(pid) == Some(0) => break,
                Err(e) => return Err(fail("PTRACE_SECCOMP_GET_FILTER", e)),
            }
        }
        Ok(filters)
    })();
    let detached = sys::ptrace_detach(pid).map_err(|e| fail("PTRACE_DETACH", e));
    let filters = result?;
    detached?;
    Ok(filters)
}

/// The `Seccomp:` mode of `pid` from `/proc` (0 off, 1 strict, 2 filter).
fn seccomp_mode(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).and_then(|v| v.trim().parse().ok())
}

fn wait_for_stop(pid: i32) -> io::Result<()> {
    loop {
        let Some((_, status)) = sys::waitpid(pid, 0)? else { continue };
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the process ended"));
        }
        if libc::WIFSTOPPED(status) {
            // PTRACE_EVENT_STOP (our interrupt or a group-stop): the tracee is stopped. Any
            // other stop is a signal about to be delivered; reading filters there is as good.
            return Ok(());
        }
    }
}

/// The name of the policy of `set` whose program for `arch` is exactly `filter`, if any.
pub fn matching_policy<'a>(
    set: &'a PolicySet,
    arch: Arch,
    filter: &[sock_filter],
) -> Result<Option<&'a str>, PolicyError> {
    for name in set.names() {
        if set.compile(name, arch)? == filter {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Checks that `pid` carries the embedded policy `policy` (compiled for this machine) as one of
/// its installed filters; the error says what it carries instead.
pub fn verify_pid(pid: i32, policy: &str) -> Result<(), PolicyError> {
    let set = crate::embedded();
    let arch = Arch::native();
    let expected = set.compile(policy, arch)?;
    let filters = read_installed_filters(pid)?;
    if filters.contains(&expected) {
        return Ok(());
    }
    let found = if filters.is_empty() {
        "no seccomp filter is installed".to_string()
    } else {
        let mut parts = Vec::new();
        for (i, f) in filters.iter().enumerate() {
            match matching_policy(set, arch, f)? {
                Some(name) => parts.push(format!("filter {i} is policy {name}")),
                None => parts.push(format!("filter {i} ({} instructions) matches no shipped policy", f.len())),
            }
        }
        parts.join("; ")
    };
    Err(PolicyError::MatchFilter { pid, policy: policy.to_string(), arch, found })
}
