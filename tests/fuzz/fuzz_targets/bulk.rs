//! The checks on a received bulk attachment: a memfd of the input's size with the input's
//! seals, verified against an announced length and limit. Accepted exactly when it carries
//! the required seals (plus at most F_SEAL_EXEC), its size is the announced one and that is
//! within the limit.
#![no_main]

use std::os::fd::AsFd;

use airlock_protocol::bulk::verify_sealed_memfd;
use airlock_protocol::sys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let size = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let announced = u64::from(u16::from_le_bytes([data[2], data[3]]));
    let limit = u64::from(u16::from_le_bytes([data[4], data[5]]));
    let seals = libc::c_int::from(data[6]) & (sys::SEAL_SET | libc::F_SEAL_EXEC | libc::F_SEAL_FUTURE_WRITE);
    let Ok(fd) = sys::memfd_create(c"fuzz", false) else { return };
    if sys::ftruncate(fd.as_fd(), size).is_err() {
        return;
    }
    let content = &data[7..];
    let _ = sys::pwrite_all(fd.as_fd(), &content[..content.len().min(size as usize)], 0);
    let _ = sys::add_seals(fd.as_fd(), seals);
    let applied = sys::get_seals(fd.as_fd()).expect("F_GET_SEALS on our own memfd");
    let ok = verify_sealed_memfd(fd.as_fd(), announced, limit).is_ok();
    let want = applied & sys::SEAL_SET == sys::SEAL_SET
        && applied & !(sys::SEAL_SET | libc::F_SEAL_EXEC) == 0
        && size == announced
        && announced <= limit;
    assert_eq!(ok, want, "size {size} announced {announced} limit {limit} seals {applied:#x}");
});
