//! The worked example of `docs/new-worker.md`, built and run as the guide says: the greeter's
//! code and policy in the guide are the files the build uses, and its configuration entry and
//! permit, taken from the guide, run under the real airlockd with every layer the host gives.

mod common;

use airlock_protocol::confinement::Layer;
use airlock_protocol::control::LayerWord;
use common::*;

const GUIDE: &str = include_str!("../../docs/new-worker.md");

/// The guide's fenced blocks of `lang`, in order.
fn blocks(lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = GUIDE;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("\n```").expect("an unterminated block in docs/new-worker.md");
        out.push(body[..end + 1].to_string());
        rest = &body[end + 4..];
    }
    out
}

#[test]
fn the_guide_shows_the_files_the_build_uses() {
    let rust = blocks("rust");
    let code = include_str!("../workers/src/bin/greeter.rs");
    assert!(rust.iter().any(|b| b == code), "docs/new-worker.md must show tests/workers/src/bin/greeter.rs as it is");
    let policy = include_str!("../../policies/greeter.toml");
    assert!(blocks("toml").iter().any(|b| b == policy), "docs/new-worker.md must show policies/greeter.toml as it is");
}

fn guide_config() -> String {
    blocks("toml").into_iter().find(|b| b.contains("name = \"greeter\"")).expect("the configuration block")
}

#[test]
fn the_greeter_runs_confined_answers_permitted_callers_and_keeps_its_count() {
    let workers = format!("{}{}", echo_worker("front", "front", ""), guide_config());
    let d = Daemon::start(&workers);
    let g = d.wait_running("greeter");
    assert_eq!(g.services, ["greeter"]);
    assert_report_is_truthful(&g, d.pid(), 64);
    assert_eq!(g.state(Layer::Seccomp), Some(LayerWord::Applied));
    // The permit: front may call greeter.hello (through the broker), nothing else.
    assert_eq!(d.call("front", "relay", "greeter hello world"), (true, "hello, world (call 1)".to_string()));
    let (ok, msg) = d.call("front", "relay", "greeter goodbye world");
    assert!(!ok && msg.contains("not permitted: front may not call greeter.goodbye"), "{msg}");
    assert_eq!(d.worker("front").violations, 1);
    // The administrator is not bound by the permit table; the greeter's own refusals arrive.
    assert_eq!(d.call("greeter", "hello", "admin"), (true, "hello, admin (call 2)".to_string()));
    let (ok, msg) = d.call("greeter", "hello", "");
    assert!(!ok && msg.contains("1 to 64 printable characters"), "{msg}");
    // The count survives the supervisor (and the worker) going away.
    let (dir, _) = d.kill9();
    let d = Daemon::restart(dir, "airlockd-2.log");
    d.wait_running("greeter");
    assert_eq!(d.call("greeter", "hello", "again"), (true, "hello, again (call 3)".to_string()));
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert!(!log.contains("SIGSYS"), "the greeter hit its seccomp filter:\n{log}");
}
