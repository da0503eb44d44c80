//! What the supervisor's benchmarks share: the JSON-line output, medians, and the binaries
//! they run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prints one result line; `ratio` is airlock/baseline for times (`lower_is_better`),
/// baseline/airlock for throughputs, so a lower ratio is always better.
pub fn emit(scenario: &str, airlock: f64, baseline: f64, unit: &str, lower_is_better: bool, note: &str) {
    let ratio = if lower_is_better { airlock / baseline } else { baseline / airlock };
    println!(
        "{}",
        serde_json::json!({
            "scenario": scenario,
            "airlock": (airlock * 100.0).round() / 100.0,
            "baseline": (baseline * 100.0).round() / 100.0,
            "unit": unit,
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "note": note,
        })
    );
}

/// `target/<profile>`, where the workspace's binaries are.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Builds the release binaries of `packages` (a no-op when fresh): `cargo bench -p
/// airlock-supervisor` alone does not build another package's binaries.
pub fn build_binaries(packages: &[&str]) {
    let Ok(cargo) = std::env::var("CARGO") else {
        assert!(target_dir().join("airlock-worker-echo").exists(), "run `cargo build --release --workspace` first");
        return;
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--bins"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    assert!(cmd.status().expect("cargo build").success(), "building the binaries failed");
}
