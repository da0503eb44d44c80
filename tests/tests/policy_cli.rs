//! `airlock policy ...` is the auditor's command as documented: the `airlock` binary mounts
//! `airlock_policies::cli`, and must print byte for byte what the stand-alone `airlock-policy`
//! prints (which `policies/tests/cli.rs` checks in depth), with the same exit code.

mod common;

use std::process::{Command, Output};

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// The first line where `a` (airlock policy) and `b` (airlock-policy) differ, for the message.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let mut lines = a.lines().zip(b.lines()).enumerate();
    match lines.find(|(_, (x, y))| x != y) {
        Some((i, (x, y))) => format!("line {}:\n  airlock policy: {x}\n  airlock-policy: {y}", i + 1),
        None => format!("the end: {} against {} lines", a.lines().count(), b.lines().count()),
    }
}

#[test]
fn airlock_policy_prints_exactly_what_airlock_policy_prints() {
    let airlock = common::bin("airlock");
    let standalone = common::bin("airlock-policy");
    assert!(standalone.exists(), "{} is missing: run `cargo build --workspace --bins`", standalone.display());
    let cases: [(&[&str], i32); 4] =
        [(&["check"], 0), (&["audit", "--format", "json"], 0), (&["bpf", "echo"], 0), (&["bpf", "no-such-policy"], 2)];
    for (args, code) in cases {
        let mounted = output(Command::new(&airlock).arg("policy").args(args));
        let alone = output(Command::new(&standalone).args(args));
        for (who, out) in [("airlock policy", &mounted), ("airlock-policy", &alone)] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{who} {args:?}: {stderr}");
        }
        assert!(code != 0 || !alone.stdout.is_empty(), "airlock-policy {args:?} printed nothing");
        for (stream, a, b) in [("stdout", &mounted.stdout, &alone.stdout), ("stderr", &mounted.stderr, &alone.stderr)] {
            assert!(a == b, "{args:?}: {stream} differs first at {}", first_difference(a, b));
        }
    }
}
