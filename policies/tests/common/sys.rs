//! The raw syscalls the policy tests' probes issue: the only module of the tests that may use
//! `unsafe`, each block with its `SAFETY` note.
#![allow(unsafe_code)]

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

/// True when this process runs with euid 0 and no seccomp filter of its own.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
