//! `learn` traces a real command and writes a draft that parses as a policy, lists what the
//! command did with `reason = "TODO"`, and that `check` refuses until it is reviewed.

use std::ffi::OsString;
use std::process::Command;

use airlock_policies::{learn, FindingKind, PolicySet};

const BIN: &str = env!("CARGO_BIN_EXE_airlock-policy");

fn draft_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("airlock-learn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

#[test]
fn learn_true_writes_a_parseable_todo_draft_with_execve_and_exit_group() {
    let dir = draft_dir("true");
    let out_file = dir.join("true.toml");
    let out =
        Command::new(BIN).arg("learn").arg("--out").arg(&out_file).args(["--", "/bin/true"]).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let (set, load_findings) = PolicySet::load_files_lenient(std::slice::from_ref(&out_file)).expect("load draft");
    assert!(load_findings.is_empty(), "draft does not parse: {load_findings:?}");
    let policy = set.get("true").expect("policy named after the file");
    let names: Vec<&str> = policy.rules.iter().map(|r| r.syscall.as_str()).collect();
    for needed in ["execve", "exit_group", "brk", "mmap"] {
        assert!(names.contains(&needed), "{needed} missing from {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "draft not sorted");
    assert!(policy.rules.iter().all(|r| r.reason == "TODO"));
    // check refuses every TODO, and the dangerous execve (no justification in a draft).
    let findings = set.check();
    let todo = findings.iter().filter(|f| f.kind == FindingKind::TodoReason).count();
    assert_eq!(todo, policy.rules.len(), "{findings:?}");
    assert!(findings.iter().any(|f| f.kind == FindingKind::UnjustifiedDangerous && f.message.contains("execve")));
    let check = Command::new(BIN).arg("check").arg(&out_file).output().expect("run check");
    assert_eq!(check.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn learn_follows_forked_children_and_reports_the_exit_code() {
    let cmd: Vec<OsString> = ["/bin/sh", "-c", "/bin/true; exit 3"].iter().map(OsString::from).collect();
    let learned = learn::trace(&cmd).expect("trace");
    assert_eq!(learned.exit_code, 3);
    let names = learned.names();
    // The shell forks (clone or fork), waits (wait4) and the child execs /bin/true.
    assert!(names.contains("wait4"), "{names:?}");
    assert!(names.contains("clone") || names.contains("fork") || names.contains("vfork"), "{names:?}");
    let execs = learned
        .calls
        .iter()
        .filter(|((a, nr), _)| airlock_policies::syscalls::name(*a, *nr) == Some("execve"))
        .map(|(_, n)| *n)
        .sum::<u64>();
    assert!(execs >= 2, "expected the shell's and the child's execve, saw {execs}");
}

#[test]
fn learn_of_a_missing_program_fails_cleanly() {
    let cmd = vec![OsString::from("/nonexistent/airlock-no-such-program")];
    match learn::trace(&cmd) {
        // execve fails in the child, which exits 127.
        Ok(l) => assert_eq!(l.exit_code, 127),
        Err(e) => panic!("{e}"),
    }
    let out = Command::new(BIN).args(["learn", "--", "airlock-no-such-program-in-path"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found in PATH"));
}
