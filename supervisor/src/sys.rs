//! Syscall wrappers the supervisor needs: spawning into namespaces, pidfds, signalfd, peer
//! credentials. The only module of `airlock-supervisor` allowed to use `unsafe`; every block
//! says why it is sound. No policy decisions here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// For the pthread functions, which return an errno instead of setting it.
fn cvt_errno(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

fn cvt_ssize(rc: libc::ssize_t) -> io::Result<usize> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

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
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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
        // SAFETY: integer arguments only.
        let n = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top.max(64)) })?;
        // SAFETY: fresh descriptor, ours.
        moved.push((unsafe { OwnedFd::from_raw_fd(n) }, target));
    }
    let pairs: Vec<(RawFd, RawFd)> = moved.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    // The exec-error pipe goes above every source, so no dup2 in the child can clobber it and
    // close_range can spare it; it is close-on-exec, so a successful exec closes it.
    let above = pairs.iter().map(|(f, _)| *f).max().unwrap_or(64).max(err_w.as_raw_fd()) + 1;
    // SAFETY: integer arguments only.
    let err_high = cvt(unsafe { libc::fcntl(err_w.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) })?;
    // SAFETY: fresh descriptor, ours.
    let err_high_owned = unsafe { OwnedFd::from_raw_fd(err_high) };
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
        // SAFETY: writes one byte from a local.
        let b = [1u8];
        // SAFETY: `b` is valid for one byte.
        let _ = unsafe { libc::write(self.release.as_raw_fd(), b.as_ptr().cast(), 1) };
        drop(self.release);
        let mut e = [0u8; 4];
        loop {
            // SAFETY: `e` is valid for 4 bytes.
            let n = unsafe { libc::read(self.exec_err.as_raw_fd(), e.as_mut_ptr().cast(), 4) };
            if n == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n == 4 {
                return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(e)));
            }
            return Ok(());
        }
    }
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd (no pid-reuse race).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: integer arguments and a null siginfo.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, ptr::null::<libc::siginfo_t>(), 0)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
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
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break;
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
    // SAFETY: all-zero sigset, then filled by sigaddset.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is valid; `s` is a signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is valid; the old mask is not requested.
    cvt_errno(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) })?;
    // SAFETY: `set` is valid.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: fresh descriptor, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    // SAFETY: all-zero is a valid signalfd_siginfo.
    let mut si: libc::signalfd_siginfo = unsafe { mem::zeroed() };
    // SAFETY: `si` is valid for its size.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut si as *mut libc::signalfd_siginfo).cast(),
            mem::size_of::<libc::signalfd_siginfo>(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(si.ssi_signo as i32))
}

/// A level-triggered `epoll` instance: the supervisor's event loop registers each descriptor
/// once instead of handing the kernel its whole poll set on every turn.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: integer argument only.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh descriptor owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call (ignored by DEL).
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) }).map(drop)
    }

    /// Watches `fd` for `events` (`EPOLLIN`, `EPOLLOUT`), reported with `token`. A descriptor
    /// number still registered (its file kept open elsewhere) is re-registered.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        match self.ctl(libc::EPOLL_CTL_ADD, fd, token, events) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.modify(fd, token, events),
            r => r,
        }
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// Stops watching `fd` (closing its last reference does the same).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` and replaces `out` with the ready `(token, events)` pairs.
    pub fn wait(&self, out: &mut Vec<(u64, u32)>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 64;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        out.clear();
        loop {
            // SAFETY: `evs` is valid for writes of MAX epoll_events.
            let rc = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), MAX as libc::c_int, timeout_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            out.extend(evs[..rc as usize].iter().map(|e| ({ e.u64 }, { e.events })));
            return Ok(());
        }
    }
}

/// A non-blocking, close-on-exec eventfd: one thread counts completions into it, another
/// waits for it to become readable.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `n` to an eventfd's counter.
pub fn eventfd_add(fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
    let b = n.to_ne_bytes();
    // SAFETY: `b` is valid for reads of 8 bytes.
    cvt_ssize(unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 8) }).map(drop)
}

/// Takes an eventfd's counter (0 when nothing was added since the last take).
pub fn eventfd_take(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: `b` is valid for writes of 8 bytes.
    match cvt_ssize(unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) }) {
        Ok(_) => Ok(u64::from_ne_bytes(b)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Blocks every blockable signal in the calling thread, so that a helper thread never takes
/// a signal meant for the event loop's signalfd.
pub fn block_signals_in_this_thread() -> io::Result<()> {
    // SAFETY: all-zero sigset, then filled by sigfillset.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut set) };
    // SAFETY: `set` is valid; the old mask is not requested.
    cvt_errno(unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) })
}

/// The peer's credentials on a connected Unix socket (`SO_PEERCRED`).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    // SAFETY: all-zero is a valid ucred.
    let mut c: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` and `len` are valid for writes; `len` holds c's size.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((c.pid, c.uid, c.gid))
}

pub fn euid() -> u32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::geteuid() }
}

pub fn egid() -> u32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::getegid() }
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
    let mut status = 0;
    // SAFETY: `status` is valid; reaps exactly our child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::__WALL) };
    Ok(())
}

/// Sets `O_NONBLOCK` on a descriptor.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: integer arguments only.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) }).map(drop)
}

/// Kills `pid` and reaps it (a child we cannot watch through a pidfd).
pub fn kill_and_reap(pid: i32) {
    // SAFETY: integer arguments only; `pid` is our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: `status` is valid; reaps exactly that child.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
}

/// Starts a TCP connection to `addr` without waiting for it: returns the socket (CLOEXEC,
/// blocking mode restored) whose connect is in progress, done, or failed, and the error if
/// it failed at once. The receiver learns the outcome by polling for writability and
/// reading `SO_ERROR`, or from its first I/O (an unconnected socket fails with ENOTCONN).
pub fn tcp_connect_started(addr: std::net::SocketAddr) -> io::Result<(OwnedFd, Option<io::Error>)> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: integer arguments only; a new descriptor on success.
    let raw = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) })?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `ss` holds a valid address of `len` bytes.
    let rc =
        unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len as libc::socklen_t) };
    let mut failed = None;
    if rc == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            failed = Some(e);
        }
    }
    // The worker gets an ordinary blocking socket; it bounds its waits with poll.
    // SAFETY: integer arguments only.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) })?;
    Ok((fd, failed))
}
