//! An `LD_PRELOAD` library for failure tests of the real `airlockd` binary: `fdatasync` on a
//! file whose path ends in `$AIRLOCK_FAULT_FDATASYNC_PATH` fails with `EIO` once
//! `$AIRLOCK_FAULT_FDATASYNC_AFTER` such calls have gone through (0 when unset). Every other
//! call goes to libc. Used by `tests/tests/broker.rs`; never shipped.
#![deny(unsafe_code)]

mod sys;
