//! The configuration's tests.

use super::*;

fn policies() -> Vec<String> {
    vec!["echo".into(), "ui".into()]
}

#[test]
fn embedded_default_is_valid() {
    let known: Vec<String> = airlock_policies::embedded().names().iter().map(|s| s.to_string()).collect();
    parse(EMBEDDED_DEFAULT, "embedded", &known).expect("embedded default must validate");
}

#[test]
fn syntax_error_reports_its_line() {
    let e = parse("[supervisor]\nshutdown-timeout-ms = \"x\"\n", "t.toml", &policies()).expect_err("bad");
    assert_eq!(e.problems[0].line, 2, "{e}");
}

#[test]
fn unknown_field_is_an_error_with_line() {
    let t = "[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\nfrobnicate = 1\n";
    let e = parse(t, "t.toml", &policies()).expect_err("bad");
    assert!(e.to_string().contains("frobnicate"), "{e}");
    assert_eq!(e.problems[0].line, 5, "{e}");
}

#[test]
fn every_semantic_error_is_listed_with_its_line() {
    let t = r#"
[[worker]]
name = "a"
executable = "x"
policy = "nope"
uid = 0
services = ["s"]

[[worker]]
name = "a"
executable = ""
policy = "echo"
services = ["s"]
[[worker.resource]]
kind = "tcp-listen"
address = "localhost"
"#;
    let e = parse(t, "t.toml", &policies()).expect_err("bad");
    let s = e.to_string();
    for want in [
        "t.toml:5: worker a: unknown policy",
        "t.toml:3: worker a: uid 0",
        "t.toml:10: worker a: duplicate worker name",
        "t.toml:11: worker a: executable is empty",
        "t.toml:10: worker a: service \"s\" is already provided",
        "t.toml:14: worker a: tcp-listen address",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
}

#[test]
fn requirements_default_to_required_and_follow_overrides() {
    let t = "[defaults.confinement]\nlandlock = \"best-effort\"\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[worker.confinement]\nseccomp = \"off\"\n";
    let c = parse(t, "t", &policies()).expect("valid");
    let w = &c.workers[0];
    assert_eq!(c.requirement(w, Layer::Landlock), Requirement::BestEffort);
    assert_eq!(c.requirement(w, Layer::Seccomp), Requirement::Off);
    assert_eq!(c.requirement(w, Layer::NoNewPrivs), Requirement::Required);
}

#[test]
fn every_syntax_and_type_error_is_listed_with_its_line() {
    let t = "[supervisor]\nshutdown-timeout-ms = \"soon\"\n\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\nrestart-everything = true\n[worker.confinement]\nseccomp = \"maybe\"\n\n[[worker]]\nname = \"b\"\nexecutable = = \"x\"\n\n[[worker]]\nname = \"c\"\nexecutable = \"x\"\npolicy = \"echo\"\n";
    let e = parse(t, "t", &policies()).expect_err("broken").to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(lines[0].starts_with("t:2: invalid type: string \"soon\", expected u64"), "{e}");
    assert!(lines[1].starts_with("t:8: unknown field `restart-everything`"), "{e}");
    assert_eq!(lines[2], "t:14: invalid string expected `\"`, `'`", "{e}");
}

#[test]
fn dynamic_uids_must_fit_the_range() {
    let w = |n: &str| format!("[[worker]]\nname = \"{n}\"\nexecutable = \"x\"\npolicy = \"echo\"\n");
    let t = format!("[supervisor]\ndynamic-uid-range = [61000, 61001]\n{}{}{}", w("a"), w("b"), w("c"));
    let e = parse(&t, "t", &policies()).expect_err("three dynamic workers, two uids");
    let text = e.to_string();
    assert!(
        text.contains("t:12: worker c: dynamic uid 61002 lies outside dynamic-uid-range [61000, 61001] (line 2): the range holds 2 uid(s), this is worker 3"),
        "{text}"
    );
    assert!(!text.contains("worker a") && !text.contains("worker b"), "{text}");
    // A fixed uid takes a position but no uid from the range.
    let t = format!("[supervisor]\ndynamic-uid-range = [61000, 61001]\n{}{}uid = 70000\n", w("a"), w("b"));
    parse(&t, "t", &policies()).expect("fits");
    let t =
        "[supervisor]\ndynamic-uid-range = [5, 4]\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n";
    let e = parse(t, "t", &policies()).expect_err("empty range").to_string();
    assert!(e.contains("t:2: dynamic-uid-range [5, 4] must be non-empty and exclude 0"), "{e}");
}

#[test]
fn relaxing_downgrades_required_layers_only() {
    let t = "[defaults.confinement]\nuid = \"required\"\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[worker.confinement]\nseccomp = \"off\"\n";
    let mut c = parse(t, "t", &policies()).expect("valid");
    c.relax(&[Layer::Uid, Layer::Seccomp, Layer::MountNamespace]);
    let w = &c.workers[0];
    assert_eq!(c.requirement(w, Layer::Uid), Requirement::BestEffort);
    assert_eq!(c.requirement(w, Layer::MountNamespace), Requirement::BestEffort, "implicitly required");
    assert_eq!(c.requirement(w, Layer::Seccomp), Requirement::Off, "off stays off");
    assert_eq!(c.requirement(w, Layer::Landlock), Requirement::Required, "not named");
}

#[test]
fn a_worker_named_like_a_cgroup_v1_control_file_is_refused() {
    for name in ["tasks", "notify_on_release", "release_agent"] {
        let t = format!("[[worker]]\nname = \"{name}\"\nexecutable = \"x\"\npolicy = \"echo\"\n");
        let e = parse(&t, "t.toml", &policies()).expect_err("bad");
        assert!(e.to_string().contains("is a cgroup v1 control file's name"), "{e}");
    }
}
