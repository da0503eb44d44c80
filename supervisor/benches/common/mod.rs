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

/// How many rounds each scenario runs: `AIRLOCK_BENCH_ROUNDS`, else 5 (1 with
/// `AIRLOCK_BENCH_QUICK`).
pub fn rounds() -> usize {
    let quick = std::env::var_os("AIRLOCK_BENCH_QUICK").is_some();
    std::env::var("AIRLOCK_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(if quick { 1 } else { 5 }).max(1)
}

/// One round's figure of a scenario, kept until [`print_rows`].
struct Row {
    scenario: String,
    airlock: f64,
    baseline: f64,
    unit: String,
    lower_is_better: bool,
    note: String,
    extra: serde_json::Map<String, serde_json::Value>,
}

thread_local! {
    static ROWS: std::cell::RefCell<Vec<Row>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records one round's result of a scenario; `ratio` is airlock/baseline for times
/// (`lower_is_better`), baseline/airlock for throughputs, so a lower ratio is always better.
/// [`print_rows`] prints it.
pub fn emit(scenario: &str, airlock: f64, baseline: f64, unit: &str, lower_is_better: bool, note: &str) {
    emit_with(scenario, airlock, baseline, unit, lower_is_better, note, serde_json::Map::new());
}

/// As [`emit`], with `extra` fields for the line (figures derived from the same measurement,
/// such as a per-worker increment; the last round's are printed).
pub fn emit_with(
    scenario: &str,
    airlock: f64,
    baseline: f64,
    unit: &str,
    lower_is_better: bool,
    note: &str,
    extra: serde_json::Map<String, serde_json::Value>,
) {
    let row = Row {
        scenario: scenario.to_string(),
        airlock,
        baseline,
        unit: unit.to_string(),
        lower_is_better,
        note: note.to_string(),
        extra,
    };
    ROWS.with(|r| r.borrow_mut().push(row));
}

/// One line per scenario recorded with [`emit`], in the order first recorded, as
/// [`emit_rounds`] prints them (the note and extra fields of the last round).
pub fn print_rows() {
    let rows = ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    let mut order: Vec<&str> = Vec::new();
    for r in &rows {
        if !order.contains(&r.scenario.as_str()) {
            order.push(&r.scenario);
        }
    }
    for name in order {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.scenario == name).collect();
        let Some(last) = mine.last() else { continue };
        let pairs: Vec<(f64, f64)> = mine.iter().map(|r| (r.airlock, r.baseline)).collect();
        emit_rounds(name, &pairs, &last.unit, last.lower_is_better, &last.note, last.extra.clone());
    }
}

/// One line for a scenario measured in rounds, each an (airlock, baseline) pair measured
/// back to back: `ratio` is the median of the rounds' ratios (airlock/baseline for times and
/// memory, `lower_is_better`; baseline/airlock for rates: a lower ratio is always better),
/// `ratio_range` their least and greatest, `airlock` and `baseline` the medians of the rounds'
/// figures, `rounds` how many; then `extra`.
pub fn emit_rounds(
    scenario: &str,
    rounds: &[(f64, f64)],
    unit: &str,
    lower_is_better: bool,
    note: &str,
    extra: serde_json::Map<String, serde_json::Value>,
) {
    let ratios: Vec<f64> = rounds.iter().map(|(a, b)| if lower_is_better { a / b } else { b / a }).collect();
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
    // Cargo runs this bench with the variables of the bench's own crate set. Some build
    // scripts watch one of them (ring's: `CARGO_MANIFEST_DIR`), so inherited they made every
    // run rebuild ring, rustls and what depends on them twice, here and in the next
    // `cargo bench` (~70 s a run). They describe the bench, not the build asked for here.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let per_target = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_EXE_"].iter().any(|p| name.starts_with(p))
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&name);
        if per_target {
            cmd.env_remove(name);
        }
    }
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
