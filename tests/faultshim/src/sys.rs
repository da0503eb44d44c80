//! The interposed symbol and the calls it needs.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// Matching `fdatasync` calls so far (all threads).
static CALLS: AtomicU64 = AtomicU64::new(0);

type Fdatasync = unsafe extern "C" fn(libc::c_int) -> libc::c_int;

fn targeted(fd: libc::c_int) -> bool {
    let Ok(suffix) = std::env::var("AIRLOCK_FAULT_FDATASYNC_PATH") else { return false };
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|p| p.to_string_lossy().ends_with(&suffix))
}

fn fail(errno: libc::c_int) -> libc::c_int {
    // SAFETY: errno is this thread's own.
    unsafe { *libc::__errno_location() = errno };
    -1
}

/// `fdatasync(2)`, failing as the environment says.
#[no_mangle]
pub extern "C" fn fdatasync(fd: libc::c_int) -> libc::c_int {
    if targeted(fd) {
        let after: u64 = std::env::var("AIRLOCK_FAULT_FDATASYNC_AFTER").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if CALLS.fetch_add(1, Ordering::SeqCst) >= after {
            return fail(libc::EIO);
        }
    }
    // SAFETY: a lookup of libc's own symbol, past this library, by a NUL-terminated name.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, c"fdatasync".as_ptr()) };
    if next.is_null() {
        return fail(libc::ENOSYS);
    }
    // SAFETY: `next` is libc's fdatasync, which has this signature.
    let real: Fdatasync = unsafe { std::mem::transmute::<*mut libc::c_void, Fdatasync>(next) };
    // SAFETY: the real call with the caller's argument.
    unsafe { real(fd) }
}
