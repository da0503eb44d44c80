//! Parses, lints and compiles every policy file in this crate (for x86_64 and aarch64) with the
//! crate's own model code, and refuses to build if anything is wrong. Then embeds exactly the
//! checked sources (`include_str!`) for `airlock_policies::embedded()`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "src/arch.rs"]
mod arch;
#[allow(dead_code)]
#[path = "src/check.rs"]
mod check;
#[allow(dead_code)]
#[path = "src/compile.rs"]
mod compile;
#[allow(dead_code)]
#[path = "src/consts.rs"]
mod consts;
#[allow(dead_code)]
#[path = "src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "src/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "src/risk.rs"]
mod risk;
#[allow(dead_code)]
#[path = "src/syscalls/mod.rs"]
mod syscalls;

const SKIPPED_DIRS: &[&str] = &["src", "tests", "target", "benches", "examples"];

fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
    let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(e) => fail(&format!("cannot read {}: {e}", dir.display())),
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let key = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            if !SKIPPED_DIRS.contains(&name.as_str()) {
                walk(root, &key, out);
            }
        } else if name.ends_with(".toml") && name != "Cargo.toml" {
            out.push(key);
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| fail("no CARGO_MANIFEST_DIR")));
    for f in [
        "build.rs",
        "src/arch.rs",
        "src/check.rs",
        "src/compile.rs",
        "src/consts.rs",
        "src/error.rs",
        "src/model.rs",
        "src/risk.rs",
        "src/syscalls/mod.rs",
        "src/syscalls/x86_64.rs",
        "src/syscalls/aarch64.rs",
    ] {
        println!("cargo:rerun-if-changed={}", manifest.join(f).display());
    }
    let mut keys = Vec::new();
    walk(&manifest, "", &mut keys);
    let mut inputs = Vec::new();
    for key in &keys {
        let path = manifest.join(key);
        println!("cargo:rerun-if-changed={}", path.display());
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
        inputs.push(model::Input {
            key: key.clone(),
            display: format!("policies/{key}"),
            name: key.strip_suffix(".toml").unwrap_or(key).to_string(),
            text,
        });
    }
    let loaded = model::load(inputs, &mut |_| None);
    let mut findings = loaded.findings.clone();
    findings.extend(check::lint(&loaded.files, &loaded.policies));
    findings.sort();
    findings.dedup();
    if loaded.policies.is_empty() {
        fail("no worker policy ([policy] file) found in policies/");
    }
    for policy in loaded.policies.values() {
        for a in arch::Arch::ALL {
            if let Err(e) = compile::compile(&policy.name, policy.default_action, &policy.rules, a) {
                findings.push(error::Finding {
                    file: policy.file.clone(),
                    line: 0,
                    kind: error::FindingKind::Compile,
                    message: e.to_string(),
                });
            }
        }
    }
    if !findings.is_empty() {
        for f in &findings {
            println!("cargo:warning={f}");
        }
        fail(&format!(
            "{} problem(s) in the seccomp policies (run `airlock policy check` for the same list):\n{}",
            findings.len(),
            findings.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n")
        ));
    }
    let mut out = String::from(
        "/// `(key, text)` of every policy file build.rs checked.\npub static SOURCES: &[(&str, &str)] = &[\n",
    );
    for key in &keys {
        let path = manifest.join(key);
        let _ = writeln!(out, "    ({key:?}, include_str!({:?})),", path.display().to_string());
    }
    out.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("no OUT_DIR")));
    if let Err(e) = std::fs::write(out_dir.join("embedded_policies.rs"), out) {
        fail(&format!("cannot write embedded_policies.rs: {e}"));
    }
}
