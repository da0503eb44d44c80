//! Syscall wrappers the supervisor needs: spawning into namespaces, pidfds, signalfd, peer
//! credentials. The only module of `airlock-supervisor` allowed to use `unsafe`. Calls go
//! through `nix` wherever it has them; what stays raw, each block with its `SAFETY` note, is
//! what nix cannot do:
//! - a fork-like `clone` with `CLONE_NEW*` flags and the child's path to `execve` (nix's
//!   `clone` wants a separate stack and a callback; the child must run only async-signal-safe
//!   calls on memory prepared before the clone);
//! - `pidfd_open` and `pidfd_send_signal`, which nix 0.29 does not wrap;
//! - `waitid(P_PIDFD)`: nix's `WaitStatus` cannot hold a death by a real-time signal and would
//!   turn an exit already reaped into an error;
//! - `setpriority` and `sched_setscheduler(SCHED_IDLE)` on a child, which nix 0.29 lacks.
//!
//! No policy decisions here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use airlock_protocol::sys::dup_above;
use nix::errno::Errno;
use nix::sys::epoll::{self, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{self, pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{self, sockopt};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Everything the child needs between clone and exec, prepared in advance so that the child
/// allocates nothing (only async-signal-safe syscalls run there).
#[derive(Debug)]
pub struct SpawnPlan {
    pub exe: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// `(source, target)`: the child finds `source` at `target`.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// `CLONE_NEW*` flags.
    pub clone_flags: libc::c_int,
    /// With a new user namespace: once released, become uid/gid 0 of that namespace (mapped
    /// to the worker's host ids) and drop supplementary groups, before exec.
    pub become_ns_root: bool,
}

/// A child that has been cloned but not yet released to exec.
#[derive(Debug)]
pub struct Pending {
    pub pid: i32,
    release: OwnedFd,
    exec_err: OwnedFd,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Clones a child into new namespaces (`plan.clone_flags`); the child waits until
/// [`release`] so that the parent can write its uid/gid maps, then installs its descriptors,
/// closes everything else, resets signal dispositions and the signal mask, and execs.
pub fn spawn(plan: SpawnPlan) -> io::Result<Pending> {
    let (release_r, release_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // Move every source above every target so no dup2 clobbers a later source.
    let top = plan.fds.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
    let mut moved = Vec::with_capacity(plan.fds.len());
    for (fd, target) in plan.fds {
        moved.push((dup_above(fd.as_fd(), top.max(64))?, target));
    }
    let pairs: Vec<(RawFd, RawFd)> = moved.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    // The exec-error pipe goes above every source, so no dup2 in the child can clobber it and
    // close_range can spare it; it is close-on-exec, so a successful exec closes it.
    let above = pairs.iter().map(|(f, _)| *f).max().unwrap_or(64).max(err_w.as_raw_fd()) + 1;
    let err_high_owned = dup_above(err_w.as_fd(), above)?;
    let err_high = err_high_owned.as_raw_fd();
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(ptr::null());
    let release_fd = release_r.as_raw_fd();
    let release_w_fd = release_w.as_raw_fd();
    let exe = plan.exe.as_ptr();
    let become_root = plan.become_ns_root;

    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of our
    // address space and runs only the async-signal-safe syscalls below before execve or
    // _exit; every buffer it reads was prepared above and is not freed in the child.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (plan.clone_flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child.
        // SAFETY: async-signal-safe syscalls only, on memory prepared before the clone.
        unsafe {
            let mut b = 0u8;
            // Our copy of the write end goes first, so that the parent's exit (or its drop of
            // the pending child) reads as EOF here instead of a wait forever.
            libc::close(release_w_fd);
            // Wait for the parent (uid/gid maps); EOF also releases us (parent gone: exec
            // then fails the handshake, which is the safe outcome).
            while libc::read(release_fd, (&mut b as *mut u8).cast(), 1) == -1
                && *libc::__errno_location() == libc::EINTR
            {}
            if become_root {
                // Our credentials still carry the creator's ids; switch to the namespace's
                // root, which the maps now point at the worker's host ids. Supplementary
                // groups go first (refused, harmlessly, where setgroups is denied).
                libc::syscall(libc::SYS_setgroups, 0usize, ptr::null::<libc::gid_t>());
                if libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) == -1
                    || libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) == -1
                {
                    child_fail(err_high);
                }
            }
            for &(src, dst) in &pairs {
                if libc::dup2(src, dst) == -1 {
                    child_fail(err_high);
                }
            }
            // Reset what a process inherits across exec from a supervisor with custom
            // signal handling: the mask and the dispositions.
            let mut set: libc::sigset_t = mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            // Close everything but the targets and the error pipe.
            if libc::syscall(
                libc::SYS_close_range,
                top as libc::c_uint,
                (err_high - 1) as libc::c_uint,
                0 as libc::c_uint,
            ) == -1
                || libc::syscall(
                    libc::SYS_close_range,
                    (err_high + 1) as libc::c_uint,
                    libc::c_uint::MAX,
                    0 as libc::c_uint,
                ) == -1
            {
                child_fail(err_high);
            }
            libc::execve(exe, argv.as_ptr(), envp.as_ptr());
            child_fail(err_high);
        }
    }
    drop(moved);
    drop(err_high_owned);
    drop(err_w);
    drop(release_r);
    Ok(Pending { pid: pid as i32, release: release_w, exec_err: err_r })
}

/// In the child: report errno on the error pipe and exit 127.
unsafe fn child_fail(err_fd: RawFd) -> ! {
    // SAFETY: async-signal-safe calls; `e` is a local.
    unsafe {
        let e = *libc::__errno_location();
        libc::write(err_fd, (&e as *const i32).cast(), mem::size_of::<i32>());
        libc::_exit(127)
    }
}

impl Pending {
    /// Lets the child exec. Returns the child's errno if the exec failed.
    pub fn release(self) -> io::Result<()> {
        let _ = nix::unistd::write(&self.release, &[1u8]);
        drop(self.release);
        let mut e = [0u8; 4];
        loop {
            return match nix::unistd::read(self.exec_err.as_raw_fd(), &mut e) {
                Err(Errno::EINTR) => continue,
                Ok(4) => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(e))),
                _ => Ok(()),
            };
        }
    }
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: pidfd_open returned a fresh descriptor, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd (no pid-reuse race).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: integer arguments and a null siginfo.
    Errno::result(unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, ptr::null::<libc::siginfo_t>(), 0)
    })?;
    Ok(())
}

/// Sets the nice value of thread `pid` (a child not yet released to exec is single-threaded,
/// and every thread it creates inherits the value).
pub fn set_nice(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    Errno::result(unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) })?;
    Ok(())
}

/// Moves thread `pid` to `SCHED_IDLE` (inherited by the threads it creates).
pub fn set_sched_idle(pid: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; the other arguments are integers.
    Errno::result(unsafe { libc::sched_setscheduler(pid, libc::SCHED_IDLE, &param) })?;
    Ok(())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// Reaps the process behind `pidfd` if it has exited (`waitid(P_PIDFD, WNOHANG)`).
pub fn reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    // SAFETY: all-zero is a valid siginfo_t.
    let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
    const P_PIDFD: libc::idtype_t = 3;
    loop {
        // SAFETY: `info` is a valid, writable siginfo_t.
        let rc =
            unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG) };
        match Errno::result(rc) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => break,
        }
    }
    // SAFETY: waitid filled `info` (si_pid 0 means still running).
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match code {
        libc::CLD_EXITED => ExitStatus::Code(status),
        _ => ExitStatus::Signal(status),
    }))
}

/// Blocks `signals` in this thread (and threads it creates) and returns a signalfd for them.
pub fn signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    use nix::sys::signalfd::SfdFlags;
    let mut set = SigSet::empty();
    for &s in signals {
        set.add(Signal::try_from(s)?);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    // The deprecated free function, because nix 0.29's `SignalFd` cannot give up its `OwnedFd`.
    #[allow(deprecated)]
    let fd =
        nix::sys::signalfd::signalfd(None::<BorrowedFd<'_>>, &set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    Ok(fd)
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    // A `signalfd_siginfo` is 128 bytes and starts with `u32 ssi_signo`.
    let mut si = [0u8; mem::size_of::<libc::signalfd_siginfo>()];
    match nix::unistd::read(fd.as_raw_fd(), &mut si) {
        Ok(_) => Ok(Some(u32::from_ne_bytes([si[0], si[1], si[2], si[3]]) as i32)),
        Err(Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A level-triggered `epoll` instance: the supervisor's event loop registers each descriptor
/// once instead of handing the kernel its whole poll set on every turn.
#[derive(Debug)]
pub struct Epoll(epoll::Epoll);

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> io::Result<Epoll> {
        Ok(Epoll(epoll::Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?))
    }

    fn event(token: u64, events: u32) -> EpollEvent {
        EpollEvent::new(EpollFlags::from_bits_retain(events as libc::c_int), token)
    }

    /// Watches `fd` for `events` (`EPOLLIN`, `EPOLLOUT`), reported with `token`. A descriptor
    /// number still registered (its file kept open elsewhere) is re-registered.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        match self.0.add(fd, Self::event(token, events)) {
            Err(Errno::EEXIST) => self.modify(fd, token, events),
            r => Ok(r?),
        }
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        Ok(self.0.modify(fd, &mut Self::event(token, events))?)
    }

    /// Stops watching `fd` (closing its last reference does the same).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(self.0.delete(fd)?)
    }

    /// Waits up to `timeout_ms` and replaces `out` with the ready `(token, events)` pairs.
    pub fn wait(&self, out: &mut Vec<(u64, u32)>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 64;
        let mut evs = [EpollEvent::empty(); MAX];
        let timeout = EpollTimeout::try_from(timeout_ms.max(-1)).map_err(|_| io::Error::from(Errno::EINVAL))?;
        out.clear();
        loop {
            match self.0.wait(&mut evs, timeout) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(n) => {
                    out.extend(evs[..n].iter().map(|e| (e.data(), e.events().bits() as u32)));
                    return Ok(());
                }
            }
        }
    }
}

/// A non-blocking, close-on-exec eventfd: one thread counts completions into it, another
/// waits for it to become readable.
pub fn eventfd() -> io::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    Ok(OwnedFd::from(fd))
}

/// Adds `n` to an eventfd's counter.
pub fn eventfd_add(fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
    nix::unistd::write(fd, &n.to_ne_bytes())?;
    Ok(())
}

/// Takes an eventfd's counter (0 when nothing was added since the last take).
pub fn eventfd_take(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_raw_fd(), &mut b) {
        Ok(_) => Ok(u64::from_ne_bytes(b)),
        Err(Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Blocks every blockable signal in the calling thread, so that a helper thread never takes
/// a signal meant for the event loop's signalfd.
pub fn block_signals_in_this_thread() -> io::Result<()> {
    Ok(pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None)?)
}

/// The peer's credentials on a connected Unix socket (`SO_PEERCRED`).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let c = socket::getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok((c.pid(), c.uid(), c.gid()))
}

pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub fn egid() -> u32 {
    nix::unistd::getegid().as_raw()
}

/// Probes whether a child can be cloned with `flags` here (it exits at once).
pub fn can_clone(flags: libc::c_int) -> Result<(), i32> {
    // SAFETY: fork-like clone; the child only calls _exit.
    let pid = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    if pid == -1 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if pid == 0 {
        // SAFETY: terminates the child at once.
        unsafe { libc::_exit(0) };
    }
    // Reaps exactly our child.
    let _ = waitpid(Pid::from_raw(pid as libc::pid_t), Some(WaitPidFlag::__WALL));
    Ok(())
}

/// Sets `O_NONBLOCK` on a descriptor.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    airlock_protocol::sys::set_nonblocking(fd)
}

/// Kills `pid` and reaps it (a child we cannot watch through a pidfd).
pub fn kill_and_reap(pid: i32) {
    // `pid` is our own child, not yet reaped.
    let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL));
}

/// Starts a TCP connection to `addr` without waiting for it: returns the socket (CLOEXEC,
/// blocking mode restored) whose connect is in progress, done, or failed, and the error if
/// it failed at once. The receiver learns the outcome by polling for writability and
/// reading `SO_ERROR`, or from its first I/O (an unconnected socket fails with ENOTCONN).
pub fn tcp_connect_started(addr: std::net::SocketAddr) -> io::Result<(OwnedFd, Option<io::Error>)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    let failed = match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => None,
        Err(e) => Some(io::Error::from(e)),
    };
    // The worker gets an ordinary blocking socket; it bounds its waits with poll.
    let fl = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl & !OFlag::O_NONBLOCK))?;
    Ok((fd, failed))
}
