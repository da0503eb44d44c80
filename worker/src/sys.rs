//! Syscall wrappers a worker needs to confine itself. The only module of `airlock-worker`
//! allowed to use `unsafe`; every block says why it is sound. No policy decisions here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Forbids gaining privileges through execve (setuid bits, file caps).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: integer arguments only; the kernel reads no user memory.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Makes the process non-dumpable: no core dumps, no ptrace attach by same-uid processes,
/// `/proc/PID` owned by root.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
}

/// Asks the kernel to send `SIGKILL` when the parent (the supervisor) dies.
pub fn set_parent_death_signal() -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })
}

pub fn getppid() -> i32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::getppid() }
}

pub fn getpid() -> i32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::getpid() }
}

/// `setrlimit(resource, {limit, limit})`.
pub fn set_rlimit(resource: libc::__rlimit_resource_t, limit: u64) -> io::Result<()> {
    let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: `r` is a valid rlimit read by the kernel.
    cvt(unsafe { libc::setrlimit(resource, &r) })
}

/// Leaves every supplementary group and takes `gid`, then `uid` (real, effective, saved).
pub fn switch_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: an empty group list; the pointer is not read for size 0.
    cvt(unsafe { libc::setgroups(0, ptr::null()) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })
}

pub fn ids() -> (u32, u32) {
    // SAFETY: no arguments; cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))).transpose()?;
    let data = data.map(|s| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string or null, alive for the call.
    cvt(unsafe {
        libc::mount(
            src.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(ptr::null(), |s| s.as_ptr().cast()),
        )
    })
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
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some(Path::new("airlock-root")),
        new_root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=64k"),
    )?;
    let built = build_minimal_root(new_root, binds);
    if built.is_err() {
        // Leave the namespace as it was: do not keep a tmpfs over the staging directory.
        if let Ok(c) = cstr(new_root) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
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
        mount(Some(path), &target, None, libc::MS_BIND | libc::MS_REC, None)?;
        // A remount in a user namespace must keep the flags locked on the original mount.
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | locked_flags(path)?;
        if !writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    std::fs::create_dir_all(new_root.join(".old-root"))?;
    let nr = cstr(new_root)?;
    let old = cstr(&new_root.join(".old-root"))?;
    // SAFETY: two valid NUL-terminated paths.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, nr.as_ptr(), old.as_ptr()) as libc::c_int })?;
    std::env::set_current_dir("/")?;
    let old_in_new = CString::new("/.old-root").map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated path.
    cvt(unsafe { libc::umount2(old_in_new.as_ptr(), libc::MNT_DETACH) })?;
    std::fs::remove_dir("/.old-root")?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// The `MS_*` flags of the mount holding `path` that a bind remount must preserve.
fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = cstr(path)?;
    // SAFETY: all-zero is a valid statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path and `st` a writable statvfs.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    let mut f = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if st.f_flag & st_flag != 0 {
            f |= ms_flag;
        }
    }
    Ok(f)
}

/// Sets the hostname of the (private) UTS namespace.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: `name` is valid for reads of its length.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

static SIGSYS_POLICY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Installs a `SIGSYS` handler that writes `airlock-sigsys nr=N arch=0xA policy=NAME` to
/// stderr (one `write`, no allocation) and then terminates the process by `SIGSYS`: it resets
/// the disposition, which the strict policies kill on, or failing that exits with 159.
/// The supervisor reads the line to name the syscall in its report.
pub fn install_sigsys_reporter(policy: &str) -> io::Result<()> {
    let _ = SIGSYS_POLICY.set(policy.as_bytes().to_vec());
    // SAFETY: all-zero is a valid sigaction; we fill the handler and flags.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = sigsys_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa` is a valid sigaction whose handler is async-signal-safe (see below).
    cvt(unsafe { libc::sigaction(libc::SIGSYS, &sa, ptr::null_mut()) })
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
    // SAFETY: the probe's child only calls `_exit`.
    let rc = unsafe { libc::fork() };
    if rc == -1 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
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
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: null address and length pointers are allowed: the kernel then writes no address.
    let fd = unsafe {
        libc::accept4(listener.as_raw_fd(), ptr::null_mut(), ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
    };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a fresh descriptor that nothing else in this process owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sets `O_NONBLOCK` on the open file description behind `fd` (shared with every duplicate
/// of it, in this process or another).
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: integer arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })
}
