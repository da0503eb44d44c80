//! `verify --pid` reads the filter a live process installed and names the policy it is.
//!
//! Reading filters needs CAP_SYS_ADMIN and ptrace access, and a reader not under seccomp
//! itself. As root (outside a container) these tests check the exact match, the mismatch and
//! the foreign-filter reports, and then the missing-privilege message by running the verifier
//! as `nobody`; without the privilege they check the message only. Each test prints which.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};

use airlock_policies::{embedded, read_installed_filters, verify_pid, Arch, PolicyError, PolicySet};
use common::{confine, probe_command, probe_spec};

const BIN: &str = env!("CARGO_BIN_EXE_airlock-policy");

/// Probe: confine with a policy, say "ready" on stderr, then sleep until killed.
#[test]
fn probe_entry() {
    let Some(spec) = probe_spec() else { return };
    match spec.as_str() {
        "hold:foreign" => {
            // A filter no shipped policy compiles to: echo plus one more allowed syscall.
            let base = embedded().get("echo").expect("echo");
            let (set, _) = PolicySet::from_sources(
                &[("extra.toml", "[group]\ndescription = \"x\"\n\n[[rule]]\nsyscall = \"getppid\"\nreason = \"x\"\n")],
                "t",
            );
            let mut rules = base.rules.clone();
            rules.extend(set.file("extra.toml").expect("extra").rules.clone());
            let prog = airlock_policies::compile::compile("foreign", base.default_action, &rules, Arch::native())
                .expect("compile");
            airlock_policies::set_no_new_privs().expect("nnp");
            airlock_policies::install(&prog).expect("install");
        }
        other => confine(other.trim_start_matches("hold:")),
    }
    eprintln!("ready");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

struct Held(Child);

impl Held {
    fn start(spec: &str) -> Held {
        let mut child = probe_command(spec).stderr(Stdio::piped()).spawn().expect("spawn probe");
        let stderr = child.stderr.take().expect("stderr");
        let mut line = String::new();
        BufReader::new(stderr).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready", "probe did not confine itself: {line:?}");
        Held(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Kills the probe and asserts it was still alive (not killed by its filter meanwhile).
    fn kill_and_check_alive(mut self) {
        assert!(self.0.try_wait().expect("try_wait").is_none(), "probe died after being verified");
        let _ = self.0.kill();
        let status = self.0.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn privileged() -> bool {
    let unconfined = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('0')))
        .unwrap_or(false);
    common::is_root() && unconfined
}

fn verify_cli(pid: i32, policy: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["verify", "--pid", &pid.to_string()]);
    if let Some(p) = policy {
        cmd.args(["--policy", p]);
    }
    cmd.output().expect("run verify")
}

fn assert_privilege_message(out: &std::process::Output, pid: i32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("needs CAP_SYS_ADMIN and ptrace access to {pid}")), "{stderr}");
}

#[test]
fn verify_reports_an_exact_match_for_a_confined_echo_process() {
    let held = Held::start("hold:echo");
    let pid = held.pid();
    if !privileged() {
        common::say("verify: unprivileged lane: checking the missing-privilege report only");
        assert_privilege_message(&verify_cli(pid, None), pid);
        assert!(matches!(read_installed_filters(pid), Err(PolicyError::ReadFilterDenied { .. })));
        return;
    }
    common::say("verify: privileged lane: checking the exact match");
    let filters = read_installed_filters(pid).expect("read filters");
    assert_eq!(filters.len(), 1, "one filter installed");
    assert_eq!(filters[0], embedded().compile("echo", Arch::native()).expect("compile"));
    verify_pid(pid, "echo").expect("verify echo");
    match verify_pid(pid, "ui") {
        Err(PolicyError::MatchFilter { found, .. }) => assert!(found.contains("policy echo"), "{found}"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let out = verify_cli(pid, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("filter 0: matches policy echo ({}) exactly", Arch::native())), "{stdout}");
    assert_eq!(verify_cli(pid, Some("echo")).status.code(), Some(0));
    let out = verify_cli(pid, Some("ui"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not carry policy ui"));
    // Being stopped and read did not kill it: its interrupted sleep restarted.
    held.kill_and_check_alive();
}

#[test]
fn verify_says_when_a_filter_matches_no_shipped_policy() {
    let held = Held::start("hold:foreign");
    let pid = held.pid();
    if !privileged() {
        common::say("verify: unprivileged lane: checking the missing-privilege report only");
        assert_privilege_message(&verify_cli(pid, None), pid);
        return;
    }
    common::say("verify: privileged lane: checking the foreign-filter report");
    let n = read_installed_filters(pid).expect("read")[0].len();
    let out = verify_cli(pid, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // Echo's filter plus getppid: named as the nearest policy with the difference.
    assert!(
        stdout.contains(&format!(
            "filter 0: does not match any shipped policy: {n} instructions; with zeroed arguments it allows "
        )),
        "{stdout}"
    );
    assert!(stdout.contains("; nearest shipped policy: echo; it also allows getppid\n"), "{stdout}");
    assert!(!stdout.contains("container runtime"), "{stdout}");
    held.kill_and_check_alive();
}

#[test]
fn verify_of_an_unconfined_process_says_it_has_no_filter() {
    if !privileged() {
        common::say("skipped: verify of an unconfined process needs CAP_SYS_ADMIN outside seccomp to read filters (see the other tests)");
        return;
    }
    let mut child = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
    let out = verify_cli(child.id() as i32, None);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has no seccomp filter installed"));
}

#[test]
fn verify_without_the_privilege_says_what_is_missing() {
    let held = Held::start("hold:echo");
    let pid = held.pid();
    if !common::is_root() {
        common::say("verify: unprivileged lane: this process lacks the privilege itself");
        assert_privilege_message(&verify_cli(pid, None), pid);
        return;
    }
    // As root: run the verifier as nobody, who may neither ptrace root's process nor read
    // filters.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "verify", "--pid", &pid.to_string()])
        .output();
    match out {
        Ok(out) if out.status.code() == Some(2) || out.status.code() == Some(1) => {
            common::say("verify: root lane: verifier run as nobody");
            assert_privilege_message(&out, pid);
        }
        Ok(out) => common::say(&format!("skipped: could not run the verifier as nobody: {out:?}")),
        Err(e) => common::say(&format!("skipped: setpriv unavailable: {e}")),
    }
}
