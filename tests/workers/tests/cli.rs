//! A worker binary started by hand, outside the supervisor, refuses to run: it has no key
//! hand-off and no channel, and says so. Being an integration test of this package, it also
//! makes `cargo test --workspace` build the worker binaries that the tests in `tests/` spawn.

use std::process::{Command, Stdio};

#[test]
fn workers_started_outside_the_supervisor_refuse_with_a_clear_error() {
    for exe in [
        env!("CARGO_BIN_EXE_airlock-worker-echo"),
        env!("CARGO_BIN_EXE_airlock-worker-probe"),
        env!("CARGO_BIN_EXE_airlock-worker-sink"),
    ] {
        let out = Command::new(exe).stdin(Stdio::null()).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{exe}: {err}");
        assert!(err.contains("key hand-off failed"), "{exe}: {err}");
        assert!(out.stdout.is_empty(), "{exe} wrote to stdout");
    }
}
