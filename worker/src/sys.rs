//! Syscall wrappers a worker needs to confine itself. The only module of `airlock-worker`
//! allowed to use `unsafe`. Calls go through `nix` wherever it has them; what stays raw, each
//! block with its `SAFETY` note, is what nix cannot do:
//! - the `SIGSYS` reporter: installing it (`sigaction` is an `unsafe fn` in nix too) and the
//!   handler itself, which may only make async-signal-safe raw calls;
//! - raw syscalls for probes, `fork` (an `unsafe fn` in nix) and `_exit`;
//! - `poll` over the caller's `libc::pollfd` slice, whose entries may hold negative (ignored)
//!   descriptors that nix's `PollFd` cannot express;
//! - adopting the descriptor `accept4` hands back as a bare integer as an `OwnedFd`.
//!
//! No policy decisions here.
#![allow(unsafe_code)]

use std::io;
use std::path::Path;
use std::ptr;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::prctl;
use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};

/// Forbids gaining privileges through execve (setuid bits, file caps).
pub fn set_no_new_privs() -> io::Result<()> {
    Ok(prctl::set_no_new_privs()?)
}

/// Makes the process non-dumpable: no core dumps, no ptrace attach by same-uid processes,
/// `/proc/PID` owned by root.
pub fn set_not_dumpable() -> io::Result<()> {
    Ok(prctl::set_dumpable(false)?)
}

/// Asks the kernel to send `SIGKILL` when the parent (the supervisor) dies.
pub fn set_parent_death_signal() -> io::Result<()> {
    Ok(prctl::set_pdeathsig(Signal::SIGKILL)?)
}

pub fn getppid() -> i32 {
    nix::unistd::getppid().as_raw()
}

pub fn getpid() -> i32 {
    nix::unistd::getpid().as_raw()
}

/// `setrlimit(resource, {limit, limit})`.
pub fn set_rlimit(resource: libc::__rlimit_resource_t, limit: u64) -> io::Result<()> {
    Ok(nix::sys::resource::setrlimit(to_resource(resource)?, limit, limit)?)
}

fn to_resource(r: libc::__rlimit_resource_t) -> io::Result<Resource> {
    Ok(match r {
        libc::RLIMIT_AS => Resource::RLIMIT_AS,
        libc::RLIMIT_CORE => Resource::RLIMIT_CORE,
        libc::RLIMIT_CPU => Resource::RLIMIT_CPU,
        libc::RLIMIT_DATA => Resource::RLIMIT_DATA,
        libc::RLIMIT_FSIZE => Resource::RLIMIT_FSIZE,
        libc::RLIMIT_LOCKS => Resource::RLIMIT_LOCKS,
        libc::RLIMIT_MEMLOCK => Resource::RLIMIT_MEMLOCK,
        libc::RLIMIT_MSGQUEUE => Resource::RLIMIT_MSGQUEUE,
        libc::RLIMIT_NICE => Resource::RLIMIT_NICE,
        libc::RLIMIT_NOFILE => Resource::RLIMIT_NOFILE,
        libc::RLIMIT_NPROC => Resource::RLIMIT_NPROC,
        libc::RLIMIT_RSS => Resource::RLIMIT_RSS,
        libc::RLIMIT_RTPRIO => Resource::RLIMIT_RTPRIO,
        libc::RLIMIT_RTTIME => Resource::RLIMIT_RTTIME,
        libc::RLIMIT_SIGPENDING => Resource::RLIMIT_SIGPENDING,
        libc::RLIMIT_STACK => Resource::RLIMIT_STACK,
        // What the kernel says of a resource it does not know.
        _ => return Err(Errno::EINVAL.into()),
    })
}

/// Leaves every supplementary group and takes `gid`, then `uid` (real, effective, saved).
pub fn switch_ids(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{setgroups, setresgid, setresuid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[])?;
    setresgid(gid, gid, gid)?;
    Ok(setresuid(uid, uid, uid)?)
}

pub fn ids() -> (u32, u32) {
    (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    Ok(nix::mount::mount(src, target, fstype, flags, data)?)
}

/// Replaces the mount namespace's root with a fresh read-only tmpfs holding only `binds`
/// (each bind-mounted at its own path; `true` = writable). Must run in a private mount
/// namespace with `CAP_SYS_ADMIN` over it. `/proc`, `/dev` and everything else are gone.
pub fn enter_minimal_root(binds: &[(&Path, bool)]) -> io::Result<()> {
    // The new root is staged on an existing directory that holds none of the bound paths
    // (a tmpfs mounted there would hide them).
    let new_root = ["/tmp", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/run"]
        .iter()
        .map(Path::new)
        .find(|c| c.is_dir() && !binds.iter().any(|(p, _)| p.starts_with(c) || c.starts_with(p)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no staging directory outside the bound paths"))?;
    mount(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    mount(
        Some(Path::new("airlock-root")),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=64k"),
    )?;
    let built = build_minimal_root(new_root, binds);
    if built.is_err() {
        // Leave the namespace as it was: do not keep a tmpfs over the staging directory.
        let _ = nix::mount::umount2(new_root, MntFlags::MNT_DETACH);
    }
    built
}

fn build_minimal_root(new_root: &Path, binds: &[(&Path, bool)]) -> io::Result<()> {
    for (path, writable) in binds {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let target = new_root.join(rel);
        let meta = std::fs::metadata(path)?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, b"")?;
        }
        mount(Some(path), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
        // A remount in a user namespace must keep the flags locked on the original mount.
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | locked_flags(path)?;
        if !writable {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    std::fs::create_dir_all(new_root.join(".old-root"))?;
    nix::unistd::pivot_root(new_root, &new_root.join(".old-root"))?;
    std::env::set_current_dir("/")?;
    nix::mount::umount2("/.old-root", MntFlags::MNT_DETACH)?;
    std::fs::remove_dir("/.old-root")?;
    mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
}

/// The `MS_*` flags of the mount holding `path` that a bind remount must preserve.
fn locked_flags(path: &Path) -> io::Result<MsFlags> {
    use nix::sys::statvfs::FsFlags;
    let st = nix::sys::statvfs::statvfs(path)?;
    let mut f = MsFlags::empty();
    for (st_flag, ms_flag) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
    ] {
        if st.flags().contains(st_flag) {
            f |= ms_flag;
        }
    }
    Ok(f)
}

/// Sets the hostname of the (private) UTS namespace.
pub fn set_hostname(name: &str) -> io::Result<()> {
    Ok(nix::unistd::sethostname(name)?)
}

static SIGSYS_POLICY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Installs a `SIGSYS` handler that writes `airlock-sigsys nr=N arch=0xA policy=NAME` to
/// stderr (one `write`, no allocation) and then terminates the process by `SIGSYS`: it resets
/// the disposition, which the strict policies kill on, or failing that exits with 159.
/// The supervisor reads the line to name the syscall in its report.
pub fn install_sigsys_reporter(policy: &str) -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let _ = SIGSYS_POLICY.set(policy.as_bytes().to_vec());
    let sa = SigAction::new(SigHandler::SigAction(sigsys_handler), SaFlags::SA_SIGINFO, SigSet::empty());
    // SAFETY: the handler is async-signal-safe (see below): it allocates nothing, takes no lock
    // and makes only raw syscalls.
    unsafe { sigaction(Signal::SIGSYS, &sa) }?;
    Ok(())
}

extern "C" fn sigsys_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Layout of the SIGSYS part of siginfo_t (see <asm-generic/siginfo.h>): after the three
    // ints (signo, errno, code) and padding: void *call_addr; int syscall; unsigned arch.
    let mut buf = [0u8; 200];
    let mut n = 0;
    let mut put = |b: &[u8], n: &mut usize| {
        for &c in b {
            if *n < buf.len() {
                buf[*n] = c;
                *n += 1;
            }
        }
    };
    let (nr, arch) = if info.is_null() {
        (-1i64, 0u32)
    } else {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the
        // fields at these offsets are the syscall number and audit arch.
        unsafe {
            let base = info.cast::<u8>();
            let nr = ptr::read_unaligned(base.add(24).cast::<i32>());
            let arch = ptr::read_unaligned(base.add(28).cast::<u32>());
            (i64::from(nr), arch)
        }
    };
    put(b"airlock-sigsys nr=", &mut n);
    put(itoa(nr, &mut [0u8; 24]), &mut n);
    put(b" arch=", &mut n);
    put(itoa(i64::from(arch), &mut [0u8; 24]), &mut n);
    put(b" policy=", &mut n);
    if let Some(p) = SIGSYS_POLICY.get() {
        put(p, &mut n);
    }
    put(b"\n", &mut n);
    // SAFETY: write and the raw syscalls below are async-signal-safe; `buf` is valid.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        // Restore the default action and re-raise, so the process ends "killed by SIGSYS".
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGSYS,
            &sa as *const libc::sigaction,
            ptr::null_mut::<libc::sigaction>(),
            8usize,
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &set as *const libc::sigset_t,
            ptr::null_mut::<libc::sigset_t>(),
            8usize,
        );
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::syscall(libc::SYS_gettid), libc::SIGSYS);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

fn itoa(v: i64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Raw syscall for probes: returns the result or the errno, never panics.
pub fn raw_syscall6(nr: libc::c_long, a: [libc::c_long; 6]) -> Result<libc::c_long, i32> {
    // SAFETY: probes call syscalls whose pointer arguments are null or point at live memory
    // they own; an invalid pointer makes the kernel return EFAULT, not corrupt our memory.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if rc == -1 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

/// `fork()` for the fork-bomb probe: returns the child's pid (0 in the child) or the errno.
pub fn fork() -> Result<i32, i32> {
    use nix::unistd::ForkResult;
    // SAFETY: the probe's child only calls `_exit`.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { child }) => Ok(child.as_raw()),
        Ok(ForkResult::Child) => Ok(0),
        Err(e) => Err(e as i32),
    }
}

pub fn exit_now(code: i32) -> ! {
    // SAFETY: terminates the process; no Rust state is relied upon afterwards.
    unsafe { libc::_exit(code) }
}

/// `poll(2)` over `fds` for at most `timeout_ms` (`-1`: no limit). Returns how many entries
/// have events in `revents`; an interrupted wait returns 0. Entries with a negative `fd` are
/// ignored by the kernel.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, writable slice of pollfd and we pass its exact length; the
    // kernel writes only the `revents` of those entries. A descriptor that is not open comes
    // back as POLLNVAL, never as memory access.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
    }
    Ok(rc as usize)
}

/// Accepts one connection on a listening socket as a non-blocking, close-on-exec
/// descriptor (`accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`), without asking for the peer's
/// address. A non-blocking listener with nothing pending gives `WouldBlock`.
pub fn accept_nonblocking(listener: std::os::fd::BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::SockFlag;
    use std::os::fd::{AsRawFd, FromRawFd};
    let fd = nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a fresh descriptor that nothing else in this process owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sets `O_NONBLOCK` on the open file description behind `fd` (shared with every duplicate
/// of it, in this process or another).
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    airlock_protocol::sys::set_nonblocking(fd)
}
