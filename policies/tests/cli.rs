//! The auditor's commands as a new user would run them: list, audit (Markdown and JSON),
//! diff, export (OCI and seccompiler) and bpf. Every claim the audit prints is checked
//! against the model here, and against the kernel by `probes.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use airlock_policies::{embedded, risk, Arch};
use serde_json::Value as Json;

const BIN: &str = env!("CARGO_BIN_EXE_airlock-policy");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run airlock-policy")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A copy of the shipped policy tree to edit.
struct Tree(PathBuf);

impl Tree {
    fn copy(tag: &str) -> Tree {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("airlock-cli-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("common")).expect("mkdir");
        for (key, text) in airlock_policies::embedded_sources() {
            std::fs::write(dir.join(key), text).expect("write");
        }
        Tree(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn edit(&self, key: &str, f: impl FnOnce(String) -> String) {
        let p = self.0.join(key);
        let text = std::fs::read_to_string(&p).expect("read");
        std::fs::write(&p, f(text)).expect("write");
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn list_names_every_shipped_policy() {
    let out = run(&["list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for name in embedded().names() {
        assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{text}");
    }
}

#[test]
fn audit_lists_every_rule_with_its_source_line_and_risk_dangerous_first() {
    let out = run(&["audit", "--format", "json"]);
    assert!(out.status.success());
    let json: Json = serde_json::from_slice(&out.stdout).expect("audit json");
    let set = embedded();
    let policies = json["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), set.names().len());
    for p in policies {
        let name = p["name"].as_str().expect("name");
        let policy = set.get(name).expect("policy");
        let rules = p["rules"].as_array().expect("rules");
        assert_eq!(rules.len(), policy.rules.len(), "{name}: every rule listed");
        for r in rules {
            // The file and line point at the rule's `syscall = "..."` line.
            let file = r["file"].as_str().expect("file");
            let line = r["line"].as_u64().expect("line") as usize;
            let syscall = r["syscall"].as_str().expect("syscall");
            let key = file.strip_prefix("policies/").expect("shipped path");
            let (_, text) = airlock_policies::embedded_sources().iter().find(|(k, _)| *k == key).expect("source");
            let at = text.lines().nth(line - 1).unwrap_or_default();
            assert_eq!(at, format!("syscall = \"{syscall}\""), "{file}:{line}");
            assert!(!r["reason"].as_str().unwrap_or_default().is_empty(), "{file}:{line}: no reason");
        }
        // Risk order: dangerous, sensitive, ordinary, refused.
        let rank = |r: &Json| match r["risk"].as_str() {
            Some("dangerous") => 0,
            Some("sensitive") => 1,
            Some("ordinary") => 2,
            _ => 3,
        };
        let ranks: Vec<i32> = rules.iter().map(rank).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{name}: not in risk order: {ranks:?}");
        assert_eq!(p["totals"]["dangerous"], 0, "{name}");
        assert!(p["totals"]["sensitive"].as_u64().unwrap_or(0) > 0, "{name}: mmap and clone are sensitive");
    }
    assert_eq!(json["totals"]["dangerous_allowed"], 0);
    let md = stdout(&run(&["audit"]));
    assert!(md.contains("None: no worker policy allows a dangerous syscall."), "{md}");
    assert!(md.contains("## Policy `echo`") && md.contains("| refused | `clone3` |"), "{md}");
}

#[test]
fn audit_puts_a_justified_dangerous_rule_first_with_its_justification() {
    let tree = Tree::copy("danger");
    tree.edit("echo.toml", |t| {
        format!("{t}\n[[rule]]\nsyscall = \"ptrace\"\nreason = \"a test\"\ndangerous = \"reviewed for this test\"\n")
    });
    let dir = tree.path().display().to_string();
    assert_eq!(run(&["check", "--dir", &dir]).status.code(), Some(0), "a justified rule passes check");
    let md = stdout(&run(&["audit", "--dir", &dir]));
    assert!(md.contains("- **ptrace** in `echo`"), "{md}");
    assert!(md.contains("justification: reviewed for this test"), "{md}");
    let echo = md.split("## Policy `echo`").nth(1).expect("echo section");
    let first_row = echo.lines().find(|l| l.starts_with("| dangerous") || l.starts_with("| sensitive")).expect("row");
    assert!(first_row.starts_with("| dangerous | `ptrace`"), "{first_row}");
}

#[test]
fn audit_lists_every_justified_dangerous_rule_even_in_groups_no_worker_policy_includes() {
    let md = stdout(&run(&["audit"]));
    let json: Json = serde_json::from_slice(&run(&["audit", "--format", "json"]).stdout).expect("audit json");
    // Every dangerous rule the JSON shows, as (file, line, justification).
    let in_policies =
        json["policies"].as_array().expect("policies").iter().flat_map(|p| p["rules"].as_array().expect("rules"));
    let in_groups = json["unused_group_dangerous"].as_array().expect("unused_group_dangerous");
    let listed: Vec<(&str, u64, &str)> = in_policies
        .filter(|r| r["risk"] == "dangerous")
        .chain(in_groups)
        .map(|r| {
            let j = r["dangerous_justification"].as_str().unwrap_or_default();
            (r["file"].as_str().unwrap_or_default(), r["line"].as_u64().unwrap_or_default(), j)
        })
        .collect();
    let mut dangerous = 0;
    for rule in embedded().files().flat_map(|f| &f.rules).filter(|r| risk::why_dangerous(r).is_some()) {
        dangerous += 1;
        let (file, line) = (rule.source.file.as_str(), rule.source.line);
        let why = rule.dangerous.as_deref().expect("check refuses an unjustified dangerous rule");
        assert!(listed.contains(&(file, line as u64, why)), "{file}:{line} missing from the JSON audit: {listed:?}");
        let bullet = format!("- **{}** in ", rule.syscall);
        let at = format!("({file}:{line}) when ");
        assert!(
            md.lines()
                .any(|l| l.starts_with(&bullet) && l.contains(&at) && l.ends_with(&format!("justification: {why}"))),
            "{file}:{line} missing from the Markdown audit:\n{md}"
        );
    }
    // The one the shipped set has: the OCI start-up group's execve.
    assert!(dangerous >= 1, "no justified dangerous rule in the shipped set");
    let execve = in_groups.iter().find(|r| r["syscall"] == "execve").expect("oci-start's execve");
    assert_eq!(execve["group"], "common/oci-start.toml");
    assert!(execve["dangerous_justification"].as_str().unwrap_or_default().contains("execs the worker"), "{execve}");
    assert!(md.contains("- **execve** in group `common/oci-start.toml` (policies/common/oci-start.toml:"), "{md}");
}

#[test]
fn audit_and_export_print_byte_identical_output_on_every_run() {
    let mut commands: Vec<Vec<&str>> = vec![
        vec!["audit", "--format", "json"],
        vec!["audit"],
        vec!["export", "--format", "seccompiler"],
        vec!["export", "--format", "seccompiler", "--arch", "aarch64"],
        vec!["export", "--format", "oci", "--include", "common/oci-start.toml", "echo"],
    ];
    for name in embedded().names() {
        commands.push(vec!["export", "--format", "oci", name]);
    }
    for args in commands {
        let (first, second) = (run(&args), run(&args));
        assert!(first.status.success(), "{args:?}: {}", String::from_utf8_lossy(&first.stderr));
        assert!(first.stdout.len() > 100, "{args:?}: {}", stdout(&first));
        assert!(first.stdout == second.stdout, "{args:?} printed different output on a second run");
    }
}

#[test]
fn diff_reports_widening_and_narrowing_and_exits_1_on_widening() {
    let old = Tree::copy("old");
    let new = Tree::copy("new");
    let (o, n) = (old.path().display().to_string(), new.path().display().to_string());
    let same = run(&["diff", &o, &n]);
    assert_eq!(same.status.code(), Some(0));
    assert!(stdout(&same).contains("no difference"));
    // Widen: a new syscall, and mmap without its PROT_EXEC condition. Narrow: no fstatfs.
    new.edit("echo.toml", |t| format!("{t}\n[[rule]]\nsyscall = \"getppid\"\nreason = \"new\"\n"));
    new.edit("common/rust-runtime.toml", |t| t.replacen("args = [{ arg = 2, bits_clear = \"PROT_EXEC\" }]\n", "", 1));
    new.edit("common/channel.toml", |t| {
        t.replace("[[rule]]\nsyscall = \"fstatfs\"\n", "[[rule]]\nsyscall = \"fstatfs\"\narches = [\"x86_64\"]\n")
    });
    let out = run(&["diff", &o, &n]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("+ echo: newly allows `getppid` when always"), "{text}");
    assert!(text.contains("+ echo: relaxes `mmap`: now also allowed by `mmap` when always"), "{text}");
    assert!(text.contains("- echo: no longer allows `fstatfs`") && text.contains("[aarch64]"), "{text}");
    // The reverse direction: getppid goes away, fstatfs comes back on aarch64.
    let back = run(&["diff", &n, &o]);
    let text = stdout(&back);
    assert_eq!(back.status.code(), Some(1), "{text}");
    assert!(text.contains("- echo: no longer allows `getppid`"), "{text}");
    assert!(text.contains("+ echo: newly allows `fstatfs`") && text.contains("[aarch64]"), "{text}");
    // Only narrowing: exit 0.
    let narrow = Tree::copy("narrow");
    narrow.edit("echo.toml", |t| t.replace("\"common/no-files.toml\"]", "]").replace(", ]", "]"));
    let out = run(&["diff", &o, &narrow.path().display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("- echo: no longer refuses `openat`"), "{}", stdout(&out));
}

#[test]
fn diff_of_single_files_and_of_a_default_action_change() {
    let old = Tree::copy("dold");
    let new = Tree::copy("dnew");
    let before = embedded().get("echo").expect("echo").default_action;
    new.edit("echo.toml", |t| {
        t.replace(&format!("default_action = \"{before}\""), "default_action = \"errno\"\ndefault_errno = \"EPERM\"")
    });
    let out = run(&[
        "diff",
        &old.path().join("echo.toml").display().to_string(),
        &new.path().join("echo.toml").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let want = format!("+ echo: default action {before} -> errno EPERM");
    assert!(stdout(&out).contains(&want), "{}", stdout(&out));
}

#[test]
fn export_oci_is_a_runtime_spec_profile() {
    let out = run(&["export", "--format", "oci", "echo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: Json = serde_json::from_slice(&out.stdout).expect("json");
    let default = embedded().get("echo").expect("echo").default_action;
    assert_eq!(p["defaultAction"], airlock_policies::export::oci_action(default));
    assert_eq!(p["architectures"], serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"]));
    let entries = p["syscalls"].as_array().expect("syscalls");
    let find = |name: &str| entries.iter().filter(move |e| e["names"][0] == name).collect::<Vec<_>>();
    assert_eq!(find("mmap")[0]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    assert_eq!(find("mmap")[0]["args"][0]["value"], libc::PROT_EXEC);
    assert_eq!(find("clone3")[0]["action"], "SCMP_ACT_ERRNO");
    assert_eq!(find("clone3")[0]["errnoRet"], libc::ENOSYS);
    assert_eq!(find("fcntl").len(), 6, "one entry per allowed fcntl command");
    assert!(find("execve").is_empty());
    // An OCI profile is for one policy.
    assert_eq!(run(&["export", "--format", "oci"]).status.code(), Some(2));
    // With the start-up group, execve is allowed (and only then).
    let with = run(&["export", "--format", "oci", "--include", "common/oci-start.toml", "echo"]);
    let p: Json = serde_json::from_slice(&with.stdout).expect("json");
    assert!(p["syscalls"].as_array().expect("syscalls").iter().any(|e| e["names"][0] == "execve"));
}

#[test]
fn export_seccompiler_covers_every_policy_and_arch() {
    for arch in ["x86_64", "aarch64"] {
        let out = run(&["export", "--format", "seccompiler", "--arch", arch]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let m: Json = serde_json::from_slice(&out.stdout).expect("json");
        for name in embedded().names() {
            assert_eq!(m[name]["filter_action"], "allow", "{name}");
            assert_eq!(m[format!("{name}/errno ENOSYS").replace(' ', "-")]["filter_action"]["errno"], libc::ENOSYS);
        }
        let echo_filter = m["echo"]["filter"].as_array().expect("filter");
        let has = |n: &str| echo_filter.iter().any(|r| r["syscall"] == n);
        assert_eq!(has("poll"), arch == "x86_64", "poll is x86_64-only");
        assert!(has("ppoll"));
    }
}

#[test]
fn bpf_disassembles_one_instruction_a_line_with_names() {
    let out = run(&["bpf", "echo", "--arch", "x86_64"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let prog = embedded().compile("echo", Arch::X86_64).expect("compile");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("; policy echo for x86_64: {} instructions", prog.len()));
    assert_eq!(lines.len(), prog.len() + 1);
    for (i, l) in lines[1..].iter().enumerate() {
        assert!(l.starts_with(&format!("{i:04}: ")), "{l}");
    }
    assert!(lines[1].contains("ld   [4]") && lines[2].contains("AUDIT_ARCH_X86_64"), "{text}");
    assert!(text.contains("; clone3") && text.contains("ret  ERRNO(38 ENOSYS)"), "{text}");
    let default = embedded().get("echo").expect("echo").default_action.ret_value();
    let last = format!("ret  {}", airlock_policies::bpf::action_name(default));
    assert!(text.lines().last().unwrap_or_default().ends_with(&last), "{text}");
    let arm = stdout(&run(&["bpf", "echo", "--arch", "aarch64"]));
    assert!(arm.contains("AUDIT_ARCH_AARCH64") && arm.contains("; ppoll") && !arm.contains("; poll\n"));
    assert_eq!(run(&["bpf", "no-such-policy"]).status.code(), Some(2));
}
