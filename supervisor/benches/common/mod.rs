//! What the supervisor's benchmarks share: the JSON-line output, medians, and the binaries
//! they run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod hmi;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prints one result line; `ratio` is airlock/baseline for times (`lower_is_better`),
/// baseline/airlock for throughputs, so a lower ratio is always better.
pub fn emit(scenario: &str, airlock: f64, baseline: f64, unit: &str, lower_is_better: bool, note: &str) {
    emit_with(scenario, airlock, baseline, unit, lower_is_better, note, serde_json::Map::new());
}

/// As [`emit`], with `extra` fields appended to the line (figures derived from the same
/// measurement, such as a per-worker increment).
pub fn emit_with(
    scenario: &str,
    airlock: f64,
    baseline: f64,
    unit: &str,
    lower_is_better: bool,
    note: &str,
    extra: serde_json::Map<String, serde_json::Value>,
) {
    let ratio = if lower_is_better { airlock / baseline } else { baseline / airlock };
    let mut line = serde_json::json!({
        "scenario": scenario,
        "airlock": (airlock * 100.0).round() / 100.0,
        "baseline": (baseline * 100.0).round() / 100.0,
        "unit": unit,
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "note": note,
    });
    if let Some(fields) = line.as_object_mut() {
        fields.extend(extra);
    }
    println!("{line}");
}

/// One line for a scenario measured in rounds, each an (airlock, baseline) pair measured
/// back to back: `ratio` is the median of the rounds' ratios (airlock/baseline; a lower
/// ratio is better), `ratio_range` their least and greatest, `airlock` and `baseline` the
/// medians of the rounds' figures, `rounds` how many; then `extra`.
pub fn emit_rounds(
    scenario: &str,
    rounds: &[(f64, f64)],
    unit: &str,
    note: &str,
    extra: serde_json::Map<String, serde_json::Value>,
) {
    let ratios: Vec<f64> = rounds.iter().map(|(a, b)| a / b).collect();
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let mut line = serde_json::json!({
        "scenario": scenario,
        "airlock": (median(rounds.iter().map(|r| r.0).collect()) * 100.0).round() / 100.0,
        "baseline": (median(rounds.iter().map(|r| r.1).collect()) * 100.0).round() / 100.0,
        "unit": unit,
        "ratio": (median(ratios) * 1000.0).round() / 1000.0,
        "ratio_range": [(lo * 1000.0).round() / 1000.0, (hi * 1000.0).round() / 1000.0],
        "rounds": rounds.len(),
        "note": note,
    });
    if let Some(fields) = line.as_object_mut() {
        fields.extend(extra);
    }
    println!("{line}");
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
        eprintln!("not run by cargo: using the binaries already in {} (not rebuilt)", target_dir().display());
        assert!(
            target_dir().join("airlock-worker-echo").exists(),
            "run `cargo build --release --bins -p {}` first",
            packages.join(" -p ")
        );
        return;
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--bins"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    assert!(cmd.status().expect("cargo build").success(), "building the binaries failed");
}

/// `target_dir()`, after checking that every binary in `names` is there; panics naming each
/// missing one and how to build it (`cargo bench` builds the bench, not other packages' bins;
/// [`build_binaries`] does when the bench runs under cargo).
pub fn locate_binaries(names: &[&str]) -> PathBuf {
    let dir = target_dir();
    let missing: Vec<String> =
        names.iter().map(|n| dir.join(n)).filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    assert!(
        missing.is_empty(),
        "missing binaries: {}; build them with `cargo build --release --bins -p airlock-worker -p \
         airlock-supervisor` (same target directory as this bench) or run through `cargo bench`",
        missing.join(", ")
    );
    dir
}
