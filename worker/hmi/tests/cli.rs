//! The HMI's binaries from outside: a layer started by hand, outside the supervisor, refuses
//! to run with a clear error, and `airlock-hmi user` manages a credential file. Being an
//! integration test of this package, it also makes `cargo test --workspace` build the HMI's
//! binaries, which the tests in `tests/` run under airlockd.

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn layers_started_outside_the_supervisor_refuse_with_a_clear_error() {
    for exe in [
        env!("CARGO_BIN_EXE_airlock-worker-plcsim"),
        env!("CARGO_BIN_EXE_airlock-worker-field"),
        env!("CARGO_BIN_EXE_airlock-worker-logic"),
        env!("CARGO_BIN_EXE_airlock-worker-historian"),
        env!("CARGO_BIN_EXE_airlock-worker-auth"),
    ] {
        let out = Command::new(exe).stdin(Stdio::null()).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{exe}: {err}");
        assert!(err.contains("key hand-off failed"), "{exe}: {err}");
        assert!(out.stdout.is_empty(), "{exe} wrote to stdout");
    }
    // The ui claims its listening socket (descriptor 5) before anything else.
    let out = Command::new(env!("CARGO_BIN_EXE_airlock-worker-ui")).stdin(Stdio::null()).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("descriptor 5"), "{err}");
}

fn hmi(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock-hmi"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("airlock-hmi");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("stdin");
    child.wait_with_output().expect("wait")
}

#[test]
fn user_add_and_list_manage_a_credential_file_and_refuse_bad_input() {
    let dir = std::env::temp_dir().join(format!("airlock-hmi-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("auth/operators");
    let f = file.to_str().expect("utf-8 path");
    let out = hmi(&["user", "add", "alice", "--password-stdin", "--file", f], "correct horse battery\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "operator alice: password set\n");
    let out = hmi(&["user", "add", "bob", "--file", f], "");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("operator bob: password ") && text.trim().rsplit(' ').next().map(str::len) == Some(20));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).expect("file").permissions());
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read_to_string(&file).expect("read");
    let out = hmi(&["user", "add", "eve:root", "--password-stdin", "--file", f], "long enough password\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator name"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), before, "a refused change leaves the file alone");
    let out = hmi(&["user", "list", "--file", f], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\nbob\n");
    let out = hmi(&["user", "list", "--file", dir.join("missing").to_str().expect("path")], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading "), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn user_list_exits_quietly_when_its_reader_goes_away() {
    let dir = std::env::temp_dir().join(format!("airlock-hmi-pipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("operators");
    let f = file.to_str().expect("utf-8 path");
    for i in 0..3 {
        let out = hmi(&["user", "add", &format!("op{i}"), "--password-stdin", "--file", f], "long enough password\n");
        assert!(out.status.success());
    }
    // stdout is a pipe whose reader is already gone: the write fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_airlock-hmi"))
        .args(["user", "list", "--file", f])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
