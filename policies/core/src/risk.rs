//! Risk classes: which syscalls are dangerous, which are sensitive, and why.
//!
//! `dangerous`: a syscall that opens a way out of the sandbox or into the kernel's most exposed
//! code (exec, tracing other processes, namespaces and mounts, kernel modules, eBPF, io_uring,
//! keyrings, raw I/O ports, system-wide state). A policy may allow one only with a reviewed
//! `dangerous = "justification"`. `sensitive`: a syscall that reaches beyond the process's own
//! memory and descriptors (the file system, the network, other processes, memory permissions)
//! or whose effect depends on a multiplexed request (`ioctl`, `prctl`, `fcntl`); it needs no
//! justification, but the audit lists it with its conditions right after the dangerous ones.
//! Everything else is `ordinary`.

use std::fmt;

use crate::arch::Arch;
use crate::model::{Cmp, Rule};

/// Dangerous syscalls, each with the reason it is.
pub static DANGEROUS: &[(&str, &str)] = &[
    ("execve", "replaces the program: the policy no longer describes what runs"),
    ("execveat", "replaces the program: the policy no longer describes what runs"),
    ("ptrace", "reads and writes other processes' memory and registers"),
    ("process_vm_readv", "reads another process's memory"),
    ("process_vm_writev", "writes another process's memory"),
    ("pidfd_getfd", "copies a descriptor out of another process (a ptrace-level reach into it)"),
    ("process_madvise", "acts on another process's memory (a ptrace-level reach into it)"),
    ("mount", "changes the mount table"),
    ("umount2", "changes the mount table"),
    ("pivot_root", "changes the root file system"),
    ("chroot", "changes the root directory (a classic escape with a held directory fd)"),
    ("unshare", "creates namespaces: user namespaces expose root-only kernel code"),
    ("setns", "enters other namespaces"),
    ("bpf", "loads eBPF programs: a large kernel attack surface"),
    ("perf_event_open", "kernel and hardware performance counters: a large attack surface, side channels"),
    ("userfaultfd", "stalls kernel page faults at will: the standard race-widening exploit primitive"),
    ("io_uring_setup", "io_uring: a second syscall interface that seccomp cannot see into"),
    ("io_uring_enter", "io_uring: a second syscall interface that seccomp cannot see into"),
    ("io_uring_register", "io_uring: a second syscall interface that seccomp cannot see into"),
    ("kexec_load", "loads a new kernel"),
    ("kexec_file_load", "loads a new kernel"),
    ("init_module", "loads kernel code"),
    ("finit_module", "loads kernel code"),
    ("delete_module", "unloads kernel code"),
    ("keyctl", "kernel keyrings: shared key material and a history of kernel bugs"),
    ("add_key", "kernel keyrings: shared key material and a history of kernel bugs"),
    ("request_key", "kernel keyrings: shared key material and a history of kernel bugs"),
    ("open_by_handle_at", "opens files by handle, bypassing path-based confinement (the 'shocker' escape)"),
    ("personality", "changes the execution domain (e.g. READ_IMPLIES_EXEC)"),
    ("uselib", "maps a library executable, around any condition that keeps mmap non-executable"),
    ("iopl", "raw access to I/O ports"),
    ("ioperm", "raw access to I/O ports"),
    ("reboot", "reboots or halts the machine"),
    ("swapon", "changes system-wide swap"),
    ("swapoff", "changes system-wide swap"),
    ("settimeofday", "sets the system clock"),
    ("clock_settime", "sets the system clock"),
    ("clock_adjtime", "adjusts the system clock"),
    ("adjtimex", "adjusts the system clock"),
    ("acct", "switches process accounting system-wide"),
    ("quotactl", "manipulates disk quotas"),
    ("quotactl_fd", "manipulates disk quotas"),
    ("clone3", "creates processes; its flags live in memory, where seccomp cannot check for namespace flags"),
    ("fsopen", "the new mount API"),
    ("fsmount", "the new mount API"),
    ("fsconfig", "the new mount API"),
    ("move_mount", "the new mount API"),
    ("open_tree", "the new mount API"),
    ("mount_setattr", "the new mount API"),
    ("fspick", "the new mount API"),
    ("kcmp", "compares kernel objects of other processes (address-space layout leaks)"),
    ("lookup_dcookie", "reads kernel directory-entry cookies (privileged profiling interface)"),
    ("vm86", "legacy virtual-8086 mode"),
    ("vm86old", "legacy virtual-8086 mode"),
];

/// The namespace flags of `clone(2)`. `CLONE_NEWTIME` (0x80) is left out: in `clone`, the low
/// byte is the exit signal, and only `clone3`/`unshare` accept it.
pub const CLONE_NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// Sensitive syscalls: allowed without justification, listed with their conditions.
pub static SENSITIVE: &[&str] = &[
    // the file system
    "open",
    "openat",
    "openat2",
    "creat",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "fchownat",
    "lchown",
    "truncate",
    "mknod",
    "mknodat",
    "name_to_handle_at",
    // the network
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "setsockopt",
    // other processes and signals
    "clone",
    "fork",
    "vfork",
    "kill",
    "tkill",
    "tgkill",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "pidfd_open",
    "pidfd_send_signal",
    "setpriority",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setattr",
    "prlimit64",
    "setrlimit",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "capset",
    // memory permissions and mappings
    "mmap",
    "mprotect",
    "mremap",
    "pkey_mprotect",
    "memfd_create",
    "madvise",
    "mbind",
    "migrate_pages",
    "move_pages",
    // multiplexers
    "ioctl",
    "prctl",
    "fcntl",
    "arch_prctl",
    "seccomp",
];

/// How much a rule matters to an auditor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Risk {
    Dangerous,
    Sensitive,
    Ordinary,
}

impl Risk {
    pub fn name(self) -> &'static str {
        match self {
            Risk::Dangerous => "dangerous",
            Risk::Sensitive => "sensitive",
            Risk::Ordinary => "ordinary",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `syscall` is dangerous, if it is in the list.
pub fn dangerous_reason(syscall: &str) -> Option<&'static str> {
    DANGEROUS.iter().find(|(n, _)| *n == syscall).map(|(_, why)| *why)
}

/// True when an allowed `clone` rule can create namespaces on some architecture: some
/// alternative of it leaves a namespace flag of argument 0 unconstrained or set.
pub fn clone_permits_namespaces(rule: &Rule) -> bool {
    Arch::ALL.into_iter().filter(|a| rule.applies_to(*a)).any(|arch| {
        rule.alternatives(arch).iter().any(|alt| {
            !alt.iter().any(|atom| {
                atom.arg == 0
                    && match atom.cmp {
                        Cmp::Eq => atom.value & CLONE_NAMESPACE_FLAGS == 0,
                        Cmp::MaskedEq(mask) => {
                            mask & CLONE_NAMESPACE_FLAGS == CLONE_NAMESPACE_FLAGS
                                && atom.value & CLONE_NAMESPACE_FLAGS == 0
                        }
                        Cmp::Lt => atom.value <= 0x2_0000,
                        Cmp::Le => atom.value < 0x2_0000,
                        _ => false,
                    }
            })
        })
    })
}

/// Why a rule is dangerous, if it is: only rules that let the syscall run can be.
pub fn why_dangerous(rule: &Rule) -> Option<String> {
    if !rule.action.lets_through() {
        return None;
    }
    if rule.syscall == "clone" {
        return clone_permits_namespaces(rule)
            .then(|| "no condition on its flags (argument 0) rules out the namespace flags CLONE_NEW*".into());
    }
    if let Some(why) = dangerous_reason(&rule.syscall) {
        return Some(why.to_string());
    }
    rule.dangerous.as_ref().map(|_| "declared dangerous by the policy".to_string())
}

/// The risk class of a rule that lets its syscall run (`None` for refusing rules).
pub fn classify(rule: &Rule) -> Option<Risk> {
    if !rule.action.lets_through() {
        return None;
    }
    if why_dangerous(rule).is_some() {
        return Some(Risk::Dangerous);
    }
    if SENSITIVE.contains(&rule.syscall.as_str()) {
        return Some(Risk::Sensitive);
    }
    Some(Risk::Ordinary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, Condition, Op, Source, Value, Width};

    fn clone_rule(conditions: Vec<Condition>) -> Rule {
        Rule {
            syscall: "clone".into(),
            reason: "r".into(),
            action: Action::Allow,
            conditions,
            arches: Arch::ALL.to_vec(),
            arches_explicit: false,
            dangerous: None,
            widens: false,
            source: Source { file: "f".into(), key: "f".into(), line: 1 },
        }
    }

    fn v(x: u64) -> Value {
        Value { text: x.to_string(), x86_64: x, aarch64: x }
    }

    #[test]
    fn clone_is_dangerous_unless_namespace_flags_are_ruled_out() {
        assert!(clone_permits_namespaces(&clone_rule(vec![])));
        let thread = 0x3d_0f00;
        assert!(!clone_permits_namespaces(&clone_rule(vec![Condition {
            arg: 0,
            width: Width::Dword,
            op: Op::Eq(v(thread))
        }])));
        let with_ns = thread | 0x1000_0000;
        assert!(clone_permits_namespaces(&clone_rule(vec![Condition {
            arg: 0,
            width: Width::Dword,
            op: Op::Eq(v(with_ns))
        }])));
        let masked = Op::MaskedEq { mask: v(CLONE_NAMESPACE_FLAGS), value: v(0) };
        assert!(!clone_permits_namespaces(&clone_rule(vec![Condition { arg: 0, width: Width::Qword, op: masked }])));
        let partial = Op::MaskedEq { mask: v(0x1000_0000), value: v(0) };
        assert!(clone_permits_namespaces(&clone_rule(vec![Condition { arg: 0, width: Width::Qword, op: partial }])));
        let other_arg = Op::Eq(v(thread));
        assert!(clone_permits_namespaces(&clone_rule(vec![Condition { arg: 1, width: Width::Qword, op: other_arg }])));
        let one_of = Op::OneOf(vec![v(thread), v(with_ns)]);
        assert!(clone_permits_namespaces(&clone_rule(vec![Condition { arg: 0, width: Width::Dword, op: one_of }])));
    }

    #[test]
    fn refusing_rules_are_never_dangerous() {
        let mut r = clone_rule(vec![]);
        r.syscall = "ptrace".into();
        assert_eq!(classify(&r), Some(Risk::Dangerous));
        r.action = Action::Errno(1);
        assert_eq!(classify(&r), None);
        assert!(why_dangerous(&r).is_none());
    }
}
