//! Thin wrappers over the syscalls this crate needs: `no_new_privs`, `ptrace` (reading a live
//! process's filters, tracing a command to learn its syscalls), `fork`/`execve` of a traced
//! child, and `waitpid`.
//!
//! This is the only module of `airlock-policies` that may use `unsafe`. Calls go through `nix`
//! wherever it has them; what stays raw, each block with its `SAFETY` note, is what nix cannot
//! do: `PTRACE_SECCOMP_GET_FILTER` and `PTRACE_GET_SYSCALL_INFO` (not in nix 0.29);
//! `PTRACE_SYSCALL` and `waitpid`, whose signals and status words may be real-time signals that
//! nix's `Signal` cannot hold; and the traced child between `fork` and `execve`. Nothing here
//! knows about policies: it moves integers and buffers.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::ptr;

use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use seccompiler::sock_filter;

/// `PTRACE_SECCOMP_GET_FILTER` (not in the libc crate for glibc targets).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// Attaches to `pid` without stopping it (`PTRACE_SEIZE`).
pub fn ptrace_seize(pid: i32) -> io::Result<()> {
    Ok(ptrace::seize(Pid::from_raw(pid), Options::empty())?)
}

/// Stops a seized tracee (`PTRACE_INTERRUPT`); wait for the stop with [`waitpid`].
pub fn ptrace_interrupt(pid: i32) -> io::Result<()> {
    Ok(ptrace::interrupt(Pid::from_raw(pid))?)
}

/// Detaches from a stopped tracee, letting it run on without a signal.
pub fn ptrace_detach(pid: i32) -> io::Result<()> {
    Ok(ptrace::detach(Pid::from_raw(pid), None)?)
}

/// The classic BPF program of filter `index` of a stopped tracee (0 is the most recently
/// installed), or `None` when there is no filter at that index.
pub fn seccomp_filter(pid: i32, index: usize) -> io::Result<Option<Vec<sock_filter>>> {
    // SAFETY: with a null buffer the kernel only returns the instruction count.
    let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, ptr::null_mut::<sock_filter>()) };
    if n == -1 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) };
    }
    let len = usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![sock_filter { code: 0, jt: 0, jf: 0, k: 0 }; len];
    // SAFETY: `buf` holds `len` sock_filter structs (repr(C), the kernel's layout), exactly as
    // many as the kernel said this filter has; filters are immutable once installed.
    let got = Errno::result(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index, buf.as_mut_ptr()) })?;
    buf.truncate(usize::try_from(got).unwrap_or(0).min(len));
    Ok(Some(buf))
}

/// `waitpid(pid, __WALL | extra)`; `pid` may be `-pgid`. Returns `(pid, status)`, or `None`
/// with `WNOHANG` when nothing changed. Retries on `EINTR`.
pub fn waitpid(pid: i32, extra: libc::c_int) -> io::Result<Option<(i32, libc::c_int)>> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable int.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | extra) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok((rc != 0).then_some((rc, status)));
    }
}

/// A child about to run a command under our tracing, stopped before its `execve`.
///
/// The child puts itself in a new process group (so the tracer can wait for exactly its
/// tracees), asks to be traced, stops itself with `SIGSTOP` and then calls `execve`.
pub fn spawn_traced(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Result<i32> {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(ptr::null());
    // SAFETY: fork has no memory-safety preconditions of its own; the child below only makes
    // async-signal-safe calls (setpgid, ptrace, getpid, kill, execve, _exit) on memory that was
    // prepared before the fork, so it is sound even if other threads held locks.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; `path`, `argv_ptrs` and `envp_ptrs` are NUL-terminated arrays of
        // valid C strings that live until execve replaces the image (or _exit).
        unsafe {
            libc::setpgid(0, 0);
            if libc::ptrace(libc::PTRACE_TRACEME, 0, ptr::null_mut::<libc::c_void>(), 0usize) == -1 {
                libc::_exit(126);
            }
            libc::kill(libc::getpid(), libc::SIGSTOP);
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    // Also from the parent, so that the group exists before our first wait for it (the
    // child's own call may not have run yet). EACCES once the child has exec'd is harmless.
    let _ = nix::unistd::setpgid(Pid::from_raw(pid), Pid::from_raw(pid));
    Ok(pid)
}

/// `PTRACE_SETOPTIONS`.
pub fn ptrace_setoptions(pid: i32, options: libc::c_int) -> io::Result<()> {
    Ok(ptrace::setoptions(Pid::from_raw(pid), Options::from_bits_retain(options))?)
}

/// Resumes a tracee until its next syscall entry or exit (`PTRACE_SYSCALL`), delivering `sig`.
pub fn ptrace_syscall(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only. Raw rather than nix's `syscall`, because `sig` may be a
    // real-time signal (glibc's SIGCANCEL, SIGSETXID) that nix's `Signal` cannot hold.
    Errno::result(unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, ptr::null_mut::<libc::c_void>(), sig as usize) })?;
    Ok(())
}

/// True when the stop of `pid` is a signal-delivery stop (`PTRACE_GETSIGINFO` succeeds), false
/// for a group-stop.
pub fn is_signal_delivery_stop(pid: i32) -> bool {
    ptrace::getsiginfo(Pid::from_raw(pid)).is_ok()
}

/// The syscall a tracee stopped at: `(op, audit arch, number)`, where `op` is
/// `PTRACE_SYSCALL_INFO_ENTRY` (1) at syscall entry.
pub fn syscall_info(pid: i32) -> io::Result<(u8, u32, u64)> {
    // SAFETY: all-zero is a valid ptrace_syscall_info (integers and padding only).
    let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::ptrace_syscall_info>();
    // SAFETY: `info` is writable for `size` bytes, which is what we tell the kernel.
    Errno::result(unsafe {
        libc::ptrace(libc::PTRACE_GET_SYSCALL_INFO, pid, size, &mut info as *mut libc::ptrace_syscall_info)
    })?;
    let nr = if info.op == libc::PTRACE_SYSCALL_INFO_ENTRY {
        // SAFETY: for an entry stop the kernel filled the `entry` member of the union.
        unsafe { info.u.entry.nr }
    } else {
        0
    };
    Ok((info.op, info.arch, nr))
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    let sig = if sig == 0 { None } else { Some(Signal::try_from(sig)?) };
    Ok(signal::kill(Pid::from_raw(pid), sig)?)
}
