//! The binaries' command lines, run as a user runs them. Being an integration test of this
//! package, it also makes `cargo test --workspace` build `airlockd` and `airlock`, which the
//! cross-crate tests in `tests/` run.

use std::process::Command;

fn airlockd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlockd"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("airlock-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn check_config_lists_every_error_with_its_line() {
    let dir = scratch("checkcfg");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"no-such-policy\"\n\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n").expect("write");
    let out = airlockd().arg("--check-config").arg(&bad).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml:4: worker a: unknown policy \"no-such-policy\""), "{err}");
    assert!(err.contains("bad.toml:7: worker a: duplicate worker name (first defined on line 2)"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_embedded_default_configuration_passes_its_own_check() {
    let dir = scratch("default");
    let good = dir.join("default.toml");
    let out = airlockd().arg("--print-default-config").output().expect("run");
    assert!(out.status.success());
    std::fs::write(&good, &out.stdout).expect("write");
    let out = airlockd().arg("--check-config").arg(&good).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_cli_says_clearly_when_no_supervisor_is_listening() {
    let dir = scratch("nosock");
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["status", "--socket"])
        .arg(dir.join("control.sock"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("control.sock"), "the error names the socket: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn best_effort_names_an_unknown_layer_and_lists_the_real_ones() {
    let out = airlockd().args(["--best-effort", "uid,no-such-layer"]).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown confinement layer \"no-such-layer\""), "{err}");
    assert!(err.contains("layers that can be downgraded: user-namespace, pid-namespace,"), "{err}");
    for layer in ["seccomp", "no-new-privs", "capabilities", "rlimits", "not-dumpable", "parent-death-signal"] {
        let out = airlockd().args(["--best-effort", layer]).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{layer}: {err}");
        assert!(err.contains(&format!("{layer} needs no privilege on any host and cannot be downgraded")), "{err}");
    }
}

/// `airlock permits | head -1` and the like: when the reader goes away the CLI stops quietly
/// with status 0, instead of panicking with "failed printing to stdout: Broken pipe".
#[test]
fn cli_output_to_a_closed_pipe_ends_quietly() {
    for args in [&["permits"][..], &["--print-default-config"][..]] {
        let exe = if args[0] == "permits" { env!("CARGO_BIN_EXE_airlock") } else { env!("CARGO_BIN_EXE_airlockd") };
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(exe)
            .args(args)
            .env("HOME", "/nonexistent")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} wrote to stderr: {err}");
    }
}
