//! Reading the seccomp filters installed in a live process and naming the policy they are.
//!
//! `PTRACE_SECCOMP_GET_FILTER` needs `CAP_SYS_ADMIN` (in the initial user namespace), ptrace
//! access to the process, and a reader that is not itself under a seccomp filter. We seize the
//! process (`PTRACE_SEIZE`, which sends no signal), stop it with `PTRACE_INTERRUPT`, read every
//! filter, and detach; the process then carries on (an interrupted sleep restarts through
//! `restart_syscall`, which every shipped policy allows).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
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

/// The syscalls of `arch` that `filter` lets run when called with all arguments zero, and the
/// action it takes on the rest (the most common one).
fn allowed_with_zero_args(filter: &[sock_filter], arch: Arch) -> Result<(BTreeSet<&'static str>, String), PolicyError> {
    let mut allowed = BTreeSet::new();
    let mut others: BTreeMap<String, usize> = BTreeMap::new();
    for &(nr, name) in crate::syscalls::table(arch) {
        let ret = crate::bpf::evaluate(filter, &crate::bpf::SeccompData::new(arch, nr, [0; 6]))?;
        if ret & 0xffff_0000 == 0x7fff_0000 {
            allowed.insert(name);
        } else {
            *others.entry(crate::bpf::action_name(ret)).or_default() += 1;
        }
    }
    let default = others.into_iter().max_by_key(|(_, n)| *n).map_or_else(|| "none".to_string(), |(a, _)| a);
    Ok((allowed, default))
}

/// Says what a filter that is no shipped policy is: how many syscalls of `arch` it lets run
/// (called with zeroed arguments), what it does to the rest, and the shipped policy nearest to
/// it with the differences, so an auditor can tell a stale or tampered policy from a container
/// runtime's default profile or a filter someone else installed.
pub fn describe_filter(set: &PolicySet, arch: Arch, filter: &[sock_filter]) -> Result<String, PolicyError> {
    let mut shipped = Vec::new();
    for name in set.names() {
        shipped.push((name, allowed_with_zero_args(&set.compile(name, arch)?, arch)?.0));
    }
    describe_against(&shipped, arch, filter)
}

/// As [`describe_filter`], against shipped policies' allowed sets computed once (for a process
/// with several filters).
fn describe_against(
    shipped: &[(&str, BTreeSet<&'static str>)],
    arch: Arch,
    filter: &[sock_filter],
) -> Result<String, PolicyError> {
    let (allowed, default) = allowed_with_zero_args(filter, arch)?;
    let mut text = format!(
        "{} instructions; with zeroed arguments it allows {} of {} {arch} syscalls and answers the rest with {default}",
        filter.len(),
        allowed.len(),
        crate::syscalls::table(arch).len()
    );
    let mut nearest: Option<(usize, &str, Vec<&str>, Vec<&str>)> = None;
    for (name, theirs) in shipped {
        let name = *name;
        let extra: Vec<&str> = allowed.difference(theirs).copied().collect();
        let missing: Vec<&str> = theirs.difference(&allowed).copied().collect();
        let distance = extra.len() + missing.len();
        if nearest.as_ref().is_none_or(|(d, ..)| distance < *d) {
            nearest = Some((distance, name, extra, missing));
        }
    }
    let list = |v: &[&str]| {
        let shown: Vec<&str> = v.iter().take(12).copied().collect();
        if v.len() > shown.len() {
            format!("{}, ... ({} in all)", shown.join(", "), v.len())
        } else {
            shown.join(", ")
        }
    };
    if let Some((distance, name, extra, missing)) = nearest {
        if distance == 0 {
            let _ = write!(text, "; it allows the same syscalls as policy {name}, but its program differs (other argument conditions or actions)");
        } else {
            let _ = write!(text, "; nearest shipped policy: {name}");
            if !extra.is_empty() {
                let _ = write!(text, "; it also allows {}", list(&extra));
            }
            if !missing.is_empty() {
                let _ = write!(text, "; it refuses {}", list(&missing));
            }
        }
    }
    if allowed.len() > 200 {
        text.push_str(
            "; a broad allow-list like a container runtime's default profile (podman's, Docker's), not an airlock worker policy",
        );
    }
    Ok(text)
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
                None => parts.push(format!(
                    "filter {i} matches no shipped policy: {}",
                    describe_filter(set, arch, f).unwrap_or_else(|e| format!("cannot be evaluated: {e}"))
                )),
            }
        }
        parts.join("; ")
    };
    Err(PolicyError::MatchFilter { pid, policy: policy.to_string(), arch, found })
}

#[cfg(test)]
mod describe_tests {
    use super::*;

    fn ret(k: u32) -> sock_filter {
        sock_filter { code: 0x06, jt: 0, jf: 0, k }
    }

    #[test]
    fn an_allow_everything_filter_is_called_a_broad_allow_list() {
        let text = describe_filter(crate::embedded(), Arch::X86_64, &[ret(0x7fff_0000)]).expect("describe");
        let n = crate::syscalls::table(Arch::X86_64).len();
        assert!(
            text.starts_with(&format!("1 instructions; with zeroed arguments it allows {n} of {n} x86_64 syscalls")),
            "{text}"
        );
        assert!(text.contains("a broad allow-list like a container runtime's default profile"), "{text}");
    }

    #[test]
    fn a_filter_allowing_nothing_is_compared_with_the_nearest_policy() {
        let set = crate::embedded();
        let echo = set.compile("echo", Arch::Aarch64).expect("compile");
        let (allowed, _) = allowed_with_zero_args(&echo, Arch::Aarch64).expect("eval");
        assert!(allowed.contains("getpid"), "echo allows getpid");
        // An errno-everything filter allows nothing: nearest is the smallest policy, and the
        // description lists what it refuses.
        let text = describe_filter(set, Arch::Aarch64, &[ret(0x0005_0000 | 1)]).expect("describe");
        assert!(text.contains("it allows 0 of") && text.contains("answers the rest with ERRNO(1 EPERM)"), "{text}");
        assert!(text.contains("; nearest shipped policy: ") && text.contains("; it refuses "), "{text}");
        assert!(!text.contains("container runtime"), "{text}");
    }
}
