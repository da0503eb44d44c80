//! `check` finds every class of problem in crafted bad files, at the right `file:line`, lists
//! them all and exits 1; it passes on the shipped policies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use airlock_policies::{FindingKind, PolicySet};

const BIN: &str = env!("CARGO_BIN_EXE_airlock-policy");

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("airlock-check-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("common")).expect("mkdir");
        TempDir(p)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 1-based line of the first line of `text` containing `needle` after the `nth` occurrence.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.lines().enumerate().filter(|(_, l)| l.contains(needle)).nth(nth).map(|(i, _)| i + 1).expect(needle)
}

const GROUP: &str = r#"[group]
description = "a group with one of each problem"

[[rule]]
syscall = "not_a_syscall"
reason = "unknown everywhere"

[[rule]]
syscall = "open"
reason = "exists on x86_64 only, rule not limited"

[[rule]]
syscall = "getpid"
reason = "first"

[[rule]]
syscall = "getpid"
reason = "the same again"

[[rule]]
syscall = "gettid"

[[rule]]
syscall = "getppid"
reason = "TODO"

[[rule]]
syscall = "ptrace"
reason = "a debugger in a worker"

[[rule]]
syscall = "clone"
reason = "no condition on the flags: namespaces possible"

[[rule]]
syscall = "mmap"
reason = "unconditional"

[[rule]]
syscall = "mmap"
reason = "never executable, but the rule above already allows everything"
args = [{ arg = 2, bits_clear = "PROT_EXEC" }]

[[rule]]
syscall = "clone3"
errno = "ENOSYS"
reason = "refused"

[[rule]]
syscall = "clone3"
reason = "allowed, but the errno rule always decides first"
dangerous = "justified, so only the shadowing is reported"
"#;

const WORKER: &str = r#"[policy]
description = "includes the bad group"
include = ["common/bad.toml"]

[[rule]]
syscall = "brk"
reason = "fine"
"#;

const SYNTAX: &str = r#"[policy]
description = "an unknown key"

[[rule]]
syscall = "brk"
reasn = "typo"
"#;

const BAD_CONSTANT: &str = r#"[group]
description = "an unknown constant"

[[rule]]
syscall = "socket"
reason = "unix only"
args = [{ arg = 0, eq = "AF_UNIXX" }]
"#;

fn bad_tree() -> TempDir {
    let d = TempDir::new("bad");
    d.write("common/bad.toml", GROUP);
    d.write("worker.toml", WORKER);
    d.write("syntax.toml", SYNTAX);
    d.write("common/constant.toml", BAD_CONSTANT);
    d
}

#[test]
fn check_finds_each_class_of_problem_at_its_line() {
    let d = bad_tree();
    let (set, mut findings) = PolicySet::load_dir_lenient(&d.0).expect("load");
    findings.extend(set.check());
    let group = format!("{}/common/bad.toml", d.0.display());
    let at = |kind: FindingKind, file: &str, line: usize, words: &str| {
        assert!(
            findings.iter().any(|f| f.kind == kind && f.file == file && f.line == line && f.message.contains(words)),
            "no {kind:?} at {file}:{line} mentioning {words:?} in:\n{}",
            findings.iter().map(|f| format!("{f} [{:?}]", f.kind)).collect::<Vec<_>>().join("\n")
        );
    };
    at(FindingKind::UnknownSyscall, &group, line_of(GROUP, "not_a_syscall", 0), "unknown syscall `not_a_syscall`");
    at(FindingKind::UnknownSyscall, &group, line_of(GROUP, "\"open\"", 0), "does not exist on aarch64");
    at(FindingKind::Duplicate, &group, line_of(GROUP, "\"getpid\"", 1), "duplicate rule for `getpid`");
    at(FindingKind::MissingReason, &group, line_of(GROUP, "\"gettid\"", 0), "has no reason");
    at(FindingKind::TodoReason, &group, line_of(GROUP, "\"getppid\"", 0), "TODO");
    at(FindingKind::UnjustifiedDangerous, &group, line_of(GROUP, "\"ptrace\"", 0), "`ptrace` is dangerous");
    at(FindingKind::UnjustifiedDangerous, &group, line_of(GROUP, "\"clone\"", 0), "namespace flags");
    at(FindingKind::Shadowed, &group, line_of(GROUP, "\"mmap\"", 1), "shadowed");
    at(FindingKind::Shadowed, &group, line_of(GROUP, "\"clone3\"", 1), "never takes effect");
    let syntax = format!("{}/syntax.toml", d.0.display());
    at(FindingKind::Syntax, &syntax, line_of(SYNTAX, "reasn", 0), "reasn");
    let constant = format!("{}/common/constant.toml", d.0.display());
    at(FindingKind::UnknownConstant, &constant, line_of(BAD_CONSTANT, "AF_UNIXX", 0), "AF_UNIXX");
    // The justified clone3 is not reported as dangerous, the first getpid not as a duplicate,
    // and the unconditional mmap not as shadowed.
    assert!(!findings.iter().any(|f| f.kind == FindingKind::UnjustifiedDangerous && f.message.contains("clone3")));
    assert!(!findings.iter().any(|f| f.line == line_of(GROUP, "\"getpid\"", 0)));
    assert!(!findings.iter().any(|f| f.line == line_of(GROUP, "\"mmap\"", 0)));
    // The group's findings are reported once, not once per file that includes it.
    let unique: BTreeSet<String> = findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(unique.len(), findings.len(), "duplicated findings");
}

#[test]
fn check_command_lists_every_problem_and_exits_1() {
    let d = bad_tree();
    let out = Command::new(BIN).args(["check", "--dir"]).arg(&d.0).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let group = format!("{}/common/bad.toml", d.0.display());
    for (needle, nth) in [
        ("not_a_syscall", 0),
        ("\"open\"", 0),
        ("\"getpid\"", 1),
        ("\"gettid\"", 0),
        ("\"getppid\"", 0),
        ("\"ptrace\"", 0),
    ] {
        let prefix = format!("{group}:{}: ", line_of(GROUP, needle, nth));
        assert!(stdout.lines().any(|l| l.starts_with(&prefix)), "no line starting {prefix:?} in:\n{stdout}");
    }
    assert!(stdout.contains("syntax.toml:"), "{stdout}");
    assert!(stdout.lines().last().unwrap_or_default().ends_with("problem(s)"), "{stdout}");
}

#[test]
fn check_of_named_files_follows_their_includes() {
    let d = bad_tree();
    let out = Command::new(BIN).arg("check").arg(d.0.join("worker.toml")).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("common/bad.toml:") && stdout.contains("`ptrace` is dangerous"), "{stdout}");
    assert!(!stdout.contains("syntax.toml"), "a file not named was checked: {stdout}");
}

#[test]
fn include_problems_are_reported() {
    let d = TempDir::new("include");
    d.write("a.toml", "[policy]\ndescription = \"a\"\ninclude = [\"common/missing.toml\", \"b.toml\"]\n");
    d.write("b.toml", "[policy]\ndescription = \"b\"\n");
    d.write("common/x.toml", "[group]\ndescription = \"x\"\ninclude = [\"y.toml\"]\n");
    d.write("common/y.toml", "[group]\ndescription = \"y\"\ninclude = [\"x.toml\"]\n");
    let (_, findings) = PolicySet::load_dir_lenient(&d.0).expect("load");
    let text = findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n");
    assert!(text.contains("a.toml:3: include \"common/missing.toml\": no such policy file"), "{text}");
    assert!(text.contains("only [group] files can be included"), "{text}");
    assert!(text.contains("include cycle"), "{text}");
    assert!(PolicySet::load_dir(&d.0).is_err());
}

#[test]
fn check_passes_on_the_shipped_policies() {
    assert!(airlock_policies::embedded().check().is_empty());
    let out = Command::new(BIN).arg("check").output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    // The source tree too (what a reviewer checks before a commit).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(BIN).args(["check", "--dir"]).arg(dir).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn widening_an_included_rule_needs_widens_true() {
    let d = TempDir::new("widens");
    d.write(
        "common/rt.toml",
        "[group]\ndescription = \"rt\"\n\n[[rule]]\nsyscall = \"write\"\nreason = \"stderr\"\nargs = [{ arg = 0, width = 32, eq = 2 }]\n",
    );
    let role = "[policy]\ndescription = \"r\"\ninclude = [\"common/rt.toml\"]\n\n[[rule]]\nsyscall = \"write\"\nreason = \"files\"\n";
    d.write("role.toml", role);
    let (set, _) = PolicySet::load_dir_lenient(&d.0).expect("load");
    let findings = set.check();
    assert!(findings.iter().any(|f| f.kind == FindingKind::Shadowed && f.file.ends_with("rt.toml")), "{findings:?}");
    d.write("role.toml", &format!("{role}widens = true\n"));
    let (set, _) = PolicySet::load_dir_lenient(&d.0).expect("load");
    assert!(set.check().is_empty(), "{:?}", set.check());
    // widens = true where nothing is widened is itself a finding.
    d.write("common/rt.toml", "[group]\ndescription = \"rt\"\n");
    let (set, _) = PolicySet::load_dir_lenient(&d.0).expect("load");
    assert!(set.check().iter().any(|f| f.message.contains("widens = true, but")), "{:?}", set.check());
}
