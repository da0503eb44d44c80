//! Symbolic constants a policy may use in argument conditions and errno actions.
//!
//! Values are the kernel's, per architecture: most are the same on x86_64 and aarch64 (both use
//! the generic `ioctl`, `fcntl`, `mman` and errno numbering), but some `O_*` flags differ, so
//! every entry carries both. A unit test checks the native column against the `libc` crate.
//! Nothing here decides what is allowed.

use crate::arch::Arch;

/// One named constant and its value on each architecture.
#[derive(Debug, Clone, Copy)]
pub struct Const {
    pub name: &'static str,
    pub x86_64: i64,
    pub aarch64: i64,
}

impl Const {
    pub fn value(&self, arch: Arch) -> i64 {
        match arch {
            Arch::X86_64 => self.x86_64,
            Arch::Aarch64 => self.aarch64,
        }
    }
}

const fn same(name: &'static str, v: i64) -> Const {
    Const { name, x86_64: v, aarch64: v }
}

const fn per_arch(name: &'static str, x86_64: i64, aarch64: i64) -> Const {
    Const { name, x86_64, aarch64 }
}

/// Every constant a policy may name in a condition.
pub static CONSTANTS: &[Const] = &[
    // socket(2) domains and types
    same("AF_UNSPEC", 0),
    same("AF_UNIX", 1),
    same("AF_LOCAL", 1),
    same("AF_INET", 2),
    same("AF_INET6", 10),
    same("AF_NETLINK", 16),
    same("AF_PACKET", 17),
    same("AF_VSOCK", 40),
    same("SOCK_STREAM", 1),
    same("SOCK_DGRAM", 2),
    same("SOCK_RAW", 3),
    same("SOCK_SEQPACKET", 5),
    same("SOCK_NONBLOCK", 0o4000),
    same("SOCK_CLOEXEC", 0o2000000),
    // socket options, shutdown, message flags
    same("SOL_SOCKET", 1),
    same("SO_TYPE", 3),
    same("SO_ERROR", 4),
    same("SO_SNDBUF", 7),
    same("SO_RCVBUF", 8),
    same("SO_KEEPALIVE", 9),
    same("SO_RCVTIMEO", 20),
    same("SO_SNDTIMEO", 21),
    same("IPPROTO_TCP", 6),
    same("TCP_NODELAY", 1),
    same("SHUT_RD", 0),
    same("SHUT_WR", 1),
    same("SHUT_RDWR", 2),
    same("MSG_PEEK", 2),
    same("MSG_TRUNC", 0x20),
    same("MSG_DONTWAIT", 0x40),
    same("MSG_NOSIGNAL", 0x4000),
    same("MSG_WAITFORONE", 0x10000),
    same("MSG_CMSG_CLOEXEC", 0x4000_0000),
    // mmap(2) and mprotect(2)
    same("PROT_NONE", 0),
    same("PROT_READ", 1),
    same("PROT_WRITE", 2),
    same("PROT_EXEC", 4),
    same("MAP_SHARED", 0x01),
    same("MAP_PRIVATE", 0x02),
    same("MAP_SHARED_VALIDATE", 0x03),
    same("MAP_FIXED", 0x10),
    same("MAP_ANONYMOUS", 0x20),
    same("MAP_GROWSDOWN", 0x100),
    same("MAP_NORESERVE", 0x4000),
    same("MAP_POPULATE", 0x8000),
    same("MAP_STACK", 0x20000),
    same("MAP_HUGETLB", 0x40000),
    same("MAP_FIXED_NOREPLACE", 0x10_0000),
    // futex(2) operations (the op word: command | FUTEX_PRIVATE_FLAG 128 | FUTEX_CLOCK_REALTIME 256)
    same("FUTEX_WAIT", 0),
    same("FUTEX_WAKE", 1),
    same("FUTEX_WAIT_BITSET", 9),
    same("FUTEX_WAKE_BITSET", 10),
    same("FUTEX_WAIT_REALTIME", 256),
    same("FUTEX_WAIT_BITSET_REALTIME", 265),
    same("FUTEX_WAIT_PRIVATE", 128),
    same("FUTEX_WAKE_PRIVATE", 129),
    same("FUTEX_WAIT_BITSET_PRIVATE", 137),
    same("FUTEX_WAKE_BITSET_PRIVATE", 138),
    same("FUTEX_WAIT_PRIVATE_REALTIME", 384),
    same("FUTEX_WAIT_BITSET_PRIVATE_REALTIME", 393),
    // madvise(2)
    same("MADV_NORMAL", 0),
    same("MADV_RANDOM", 1),
    same("MADV_SEQUENTIAL", 2),
    same("MADV_WILLNEED", 3),
    same("MADV_DONTNEED", 4),
    same("MADV_FREE", 8),
    same("MADV_REMOVE", 9),
    same("MADV_DONTFORK", 10),
    same("MADV_DOFORK", 11),
    same("MADV_MERGEABLE", 12),
    same("MADV_UNMERGEABLE", 13),
    same("MADV_HUGEPAGE", 14),
    same("SCHED_IDLE", 5),
    same("MADV_NOHUGEPAGE", 15),
    same("MADV_DONTDUMP", 16),
    same("MADV_DODUMP", 17),
    same("MADV_WIPEONFORK", 18),
    same("MADV_KEEPONFORK", 19),
    same("MADV_COLD", 20),
    same("MADV_PAGEOUT", 21),
    same("MADV_POPULATE_READ", 22),
    same("MADV_POPULATE_WRITE", 23),
    same("MADV_HWPOISON", 100),
    // clone(2) flags
    same("CSIGNAL", 0xff),
    same("SIGCHLD", 17),
    same("CLONE_NEWTIME", 0x80),
    same("CLONE_VM", 0x100),
    same("CLONE_FS", 0x200),
    same("CLONE_FILES", 0x400),
    same("CLONE_SIGHAND", 0x800),
    same("CLONE_PIDFD", 0x1000),
    same("CLONE_PTRACE", 0x2000),
    same("CLONE_VFORK", 0x4000),
    same("CLONE_PARENT", 0x8000),
    same("CLONE_THREAD", 0x10000),
    same("CLONE_NEWNS", 0x20000),
    same("CLONE_SYSVSEM", 0x40000),
    same("CLONE_SETTLS", 0x80000),
    same("CLONE_PARENT_SETTID", 0x10_0000),
    same("CLONE_CHILD_CLEARTID", 0x20_0000),
    same("CLONE_DETACHED", 0x40_0000),
    same("CLONE_UNTRACED", 0x80_0000),
    same("CLONE_CHILD_SETTID", 0x100_0000),
    same("CLONE_NEWCGROUP", 0x200_0000),
    same("CLONE_NEWUTS", 0x400_0000),
    same("CLONE_NEWIPC", 0x800_0000),
    same("CLONE_NEWUSER", 0x1000_0000),
    same("CLONE_NEWPID", 0x2000_0000),
    same("CLONE_NEWNET", 0x4000_0000),
    same("CLONE_IO", 0x8000_0000),
    // fcntl(2) commands, descriptor flags and seals
    same("F_DUPFD", 0),
    same("F_GETFD", 1),
    same("F_SETFD", 2),
    same("F_GETFL", 3),
    same("F_SETFL", 4),
    same("F_GETLK", 5),
    same("F_SETLK", 6),
    same("F_SETLKW", 7),
    same("F_SETOWN", 8),
    same("F_GETOWN", 9),
    same("F_OFD_GETLK", 36),
    same("F_OFD_SETLK", 37),
    same("F_OFD_SETLKW", 38),
    same("F_DUPFD_CLOEXEC", 1030),
    same("F_ADD_SEALS", 1033),
    same("F_GET_SEALS", 1034),
    same("FD_CLOEXEC", 1),
    same("F_SEAL_SEAL", 0x01),
    same("F_SEAL_SHRINK", 0x02),
    same("F_SEAL_GROW", 0x04),
    same("F_SEAL_WRITE", 0x08),
    same("F_SEAL_FUTURE_WRITE", 0x10),
    same("F_SEAL_EXEC", 0x20),
    // memfd_create(2)
    same("MFD_CLOEXEC", 0x01),
    same("MFD_ALLOW_SEALING", 0x02),
    same("MFD_HUGETLB", 0x04),
    same("MFD_NOEXEC_SEAL", 0x08),
    same("MFD_EXEC", 0x10),
    // prctl(2) options
    same("PR_SET_PDEATHSIG", 1),
    same("PR_GET_PDEATHSIG", 2),
    same("PR_GET_DUMPABLE", 3),
    same("PR_SET_DUMPABLE", 4),
    same("PR_SET_KEEPCAPS", 8),
    same("PR_SET_NAME", 15),
    same("PR_GET_NAME", 16),
    same("PR_GET_SECCOMP", 21),
    same("PR_SET_SECCOMP", 22),
    same("PR_CAPBSET_READ", 23),
    same("PR_CAPBSET_DROP", 24),
    same("PR_SET_NO_NEW_PRIVS", 38),
    same("PR_GET_NO_NEW_PRIVS", 39),
    same("PR_SET_VMA", 0x5356_4d41),
    // ioctl(2) requests (the generic numbering, shared by x86_64 and aarch64)
    same("TCGETS", 0x5401),
    same("TCSETS", 0x5402),
    same("TIOCSTI", 0x5412),
    same("TIOCGWINSZ", 0x5413),
    same("TIOCSWINSZ", 0x5414),
    same("FIONREAD", 0x541B),
    same("TIOCLINUX", 0x541C),
    same("FIONBIO", 0x5421),
    same("FIONCLEX", 0x5450),
    same("FIOCLEX", 0x5451),
    // open(2) flags; the four that differ between the architectures come per arch
    same("O_RDONLY", 0),
    same("O_WRONLY", 0o1),
    same("O_RDWR", 0o2),
    same("O_ACCMODE", 0o3),
    same("O_CREAT", 0o100),
    same("O_EXCL", 0o200),
    same("O_NOCTTY", 0o400),
    same("O_TRUNC", 0o1000),
    same("O_APPEND", 0o2000),
    same("O_NONBLOCK", 0o4000),
    same("O_DSYNC", 0o10000),
    same("O_NOATIME", 0o1000000),
    same("O_CLOEXEC", 0o2000000),
    same("O_SYNC", 0o4010000),
    same("O_PATH", 0o10000000),
    per_arch("O_DIRECT", 0o40000, 0o200000),
    per_arch("O_LARGEFILE", 0o100000, 0o400000),
    per_arch("O_DIRECTORY", 0o200000, 0o40000),
    per_arch("O_NOFOLLOW", 0o400000, 0o100000),
    per_arch("O_TMPFILE", 0o20200000, 0o20040000),
    // *at(2)
    same("AT_FDCWD", -100),
    same("AT_SYMLINK_NOFOLLOW", 0x100),
    same("AT_REMOVEDIR", 0x200),
    same("AT_SYMLINK_FOLLOW", 0x400),
    same("AT_EMPTY_PATH", 0x1000),
    // epoll, clocks, getrandom, signals
    same("EPOLL_CLOEXEC", 0o2000000),
    same("EPOLL_CTL_ADD", 1),
    same("EPOLL_CTL_DEL", 2),
    same("EPOLL_CTL_MOD", 3),
    same("CLOCK_REALTIME", 0),
    same("CLOCK_MONOTONIC", 1),
    same("CLOCK_PROCESS_CPUTIME_ID", 2),
    same("CLOCK_THREAD_CPUTIME_ID", 3),
    same("CLOCK_MONOTONIC_RAW", 4),
    same("CLOCK_REALTIME_COARSE", 5),
    same("CLOCK_MONOTONIC_COARSE", 6),
    same("CLOCK_BOOTTIME", 7),
    same("GRND_NONBLOCK", 1),
    same("GRND_RANDOM", 2),
    same("GRND_INSECURE", 4),
    same("SIG_BLOCK", 0),
    same("SIG_UNBLOCK", 1),
    same("SIG_SETMASK", 2),
    // standard descriptors
    same("STDIN_FILENO", 0),
    same("STDOUT_FILENO", 1),
    same("STDERR_FILENO", 2),
];

/// Errno names a policy may use in `errno = "..."` (identical on x86_64 and aarch64).
pub static ERRNOS: &[(&str, u32)] = &[
    ("EPERM", 1),
    ("ENOENT", 2),
    ("ESRCH", 3),
    ("EINTR", 4),
    ("EIO", 5),
    ("ENXIO", 6),
    ("E2BIG", 7),
    ("ENOEXEC", 8),
    ("EBADF", 9),
    ("ECHILD", 10),
    ("EAGAIN", 11),
    ("ENOMEM", 12),
    ("EACCES", 13),
    ("EFAULT", 14),
    ("EBUSY", 16),
    ("EEXIST", 17),
    ("EXDEV", 18),
    ("ENODEV", 19),
    ("ENOTDIR", 20),
    ("EISDIR", 21),
    ("EINVAL", 22),
    ("ENFILE", 23),
    ("EMFILE", 24),
    ("ENOTTY", 25),
    ("EFBIG", 27),
    ("ENOSPC", 28),
    ("ESPIPE", 29),
    ("EROFS", 30),
    ("EMLINK", 31),
    ("EPIPE", 32),
    ("ERANGE", 34),
    ("ENOSYS", 38),
    ("ENOTSOCK", 88),
    ("EPROTONOSUPPORT", 93),
    ("EOPNOTSUPP", 95),
    ("ENOTSUP", 95),
    ("EAFNOSUPPORT", 97),
    ("EADDRINUSE", 98),
    ("ETIMEDOUT", 110),
    ("ECONNREFUSED", 111),
];

/// The value of constant `name` on `arch`.
pub fn lookup(name: &str, arch: Arch) -> Option<i64> {
    CONSTANTS.iter().find(|c| c.name == name).map(|c| c.value(arch))
}

/// The number of errno `name`, or `name` itself when it is a decimal number.
pub fn errno(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return (1..4096).contains(&n).then_some(n);
    }
    ERRNOS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The conventional name of errno `value` (the first listed, e.g. `EOPNOTSUPP` for 95).
pub fn errno_name(value: u32) -> Option<&'static str> {
    ERRNOS.iter().find(|(_, v)| *v == value).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_values_match_the_libc_crate() {
        let arch = Arch::native();
        let expect: &[(&str, i64)] = &[
            ("AF_UNIX", libc::AF_UNIX.into()),
            ("AF_INET6", libc::AF_INET6.into()),
            ("SOCK_SEQPACKET", libc::SOCK_SEQPACKET.into()),
            ("SOCK_CLOEXEC", libc::SOCK_CLOEXEC.into()),
            ("SO_SNDBUF", libc::SO_SNDBUF.into()),
            ("SO_TYPE", libc::SO_TYPE.into()),
            ("SO_RCVTIMEO", libc::SO_RCVTIMEO.into()),
            ("SO_SNDTIMEO", libc::SO_SNDTIMEO.into()),
            ("PROT_EXEC", libc::PROT_EXEC.into()),
            ("MAP_SHARED", libc::MAP_SHARED.into()),
            ("MAP_ANONYMOUS", libc::MAP_ANONYMOUS.into()),
            ("MAP_STACK", libc::MAP_STACK.into()),
            ("MAP_HUGETLB", libc::MAP_HUGETLB.into()),
            ("FUTEX_WAIT", libc::FUTEX_WAIT.into()),
            ("FUTEX_WAKE", libc::FUTEX_WAKE.into()),
            ("FUTEX_WAIT_BITSET", libc::FUTEX_WAIT_BITSET.into()),
            ("FUTEX_WAKE_BITSET", libc::FUTEX_WAKE_BITSET.into()),
            ("FUTEX_WAIT_PRIVATE", (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG).into()),
            ("FUTEX_WAKE_PRIVATE", (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG).into()),
            (
                "FUTEX_WAIT_BITSET_PRIVATE_REALTIME",
                (libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME).into(),
            ),
            ("MADV_DONTNEED", libc::MADV_DONTNEED.into()),
            ("MADV_FREE", libc::MADV_FREE.into()),
            ("MADV_HUGEPAGE", libc::MADV_HUGEPAGE.into()),
            ("SCHED_IDLE", libc::SCHED_IDLE.into()),
            ("MADV_HWPOISON", libc::MADV_HWPOISON.into()),
            ("CLONE_VM", libc::CLONE_VM.into()),
            ("CLONE_THREAD", libc::CLONE_THREAD.into()),
            ("CLONE_SETTLS", libc::CLONE_SETTLS.into()),
            ("CLONE_CHILD_CLEARTID", libc::CLONE_CHILD_CLEARTID.into()),
            ("CLONE_NEWUSER", libc::CLONE_NEWUSER.into()),
            ("CLONE_NEWNET", libc::CLONE_NEWNET.into()),
            ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP.into()),
            ("F_GETFL", libc::F_GETFL.into()),
            ("F_SETFL", libc::F_SETFL.into()),
            ("F_DUPFD_CLOEXEC", libc::F_DUPFD_CLOEXEC.into()),
            ("F_ADD_SEALS", libc::F_ADD_SEALS.into()),
            ("F_GET_SEALS", libc::F_GET_SEALS.into()),
            ("F_SEAL_WRITE", libc::F_SEAL_WRITE.into()),
            ("MFD_ALLOW_SEALING", libc::MFD_ALLOW_SEALING.into()),
            ("PR_SET_NAME", libc::PR_SET_NAME.into()),
            ("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS.into()),
            ("PR_SET_SECCOMP", libc::PR_SET_SECCOMP.into()),
            ("TCGETS", libc::TCGETS as i64),
            ("TIOCSTI", libc::TIOCSTI as i64),
            ("FIONBIO", libc::FIONBIO as i64),
            ("O_CLOEXEC", libc::O_CLOEXEC.into()),
            ("O_DIRECTORY", libc::O_DIRECTORY.into()),
            ("O_NOFOLLOW", libc::O_NOFOLLOW.into()),
            ("O_DIRECT", libc::O_DIRECT.into()),
            ("O_PATH", libc::O_PATH.into()),
            ("O_TMPFILE", libc::O_TMPFILE.into()),
            ("AT_FDCWD", libc::AT_FDCWD.into()),
            ("AT_EMPTY_PATH", libc::AT_EMPTY_PATH.into()),
            ("EPOLL_CLOEXEC", libc::EPOLL_CLOEXEC.into()),
            ("SHUT_RDWR", libc::SHUT_RDWR.into()),
            ("MSG_CMSG_CLOEXEC", libc::MSG_CMSG_CLOEXEC.into()),
            ("GRND_NONBLOCK", libc::GRND_NONBLOCK.into()),
        ];
        for (name, want) in expect {
            assert_eq!(lookup(name, arch), Some(*want), "{name} on {arch}");
        }
        for (name, want) in [("EPERM", libc::EPERM), ("EACCES", libc::EACCES), ("ENOSYS", libc::ENOSYS)] {
            assert_eq!(errno(name), Some(want as u32));
        }
        assert_eq!(errno("38"), Some(38));
        assert_eq!(errno("0"), None);
        assert_eq!(errno_name(95), Some("EOPNOTSUPP"));
    }

    #[test]
    fn every_name_is_unique() {
        let mut names: Vec<&str> = CONSTANTS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }
}
