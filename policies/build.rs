//! Checks every policy file in this crate (parse, lint, compile for x86_64 and aarch64) with
//! `airlock-policy-core`, an ordinary build-dependency, and refuses to build if anything is
//! wrong. Then embeds exactly the checked sources (`include_str!`) for
//! `airlock_policies::embedded()`. Cargo reruns this script when the core crate changes; the
//! policy files are watched one by one (and their folders, for added files).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use airlock_policy_core::{Arch, PolicySet};

/// Folders that hold code, not policies.
const SKIPPED_DIRS: &[&str] = &["src", "tests", "target", "benches", "examples", "core"];

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
    println!("cargo:rerun-if-changed={}", manifest.join("build.rs").display());
    let mut keys = Vec::new();
    walk(&manifest, "", &mut keys);
    let mut texts = Vec::new();
    for key in &keys {
        let path = manifest.join(key);
        println!("cargo:rerun-if-changed={}", path.display());
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
        texts.push((key.clone(), text));
    }
    let sources: Vec<(&str, &str)> = texts.iter().map(|(k, t)| (k.as_str(), t.as_str())).collect();
    let (set, mut findings) = PolicySet::from_sources(&sources, "policies");
    findings.extend(set.check());
    if set.names().is_empty() {
        fail("no worker policy ([policy] file) found in policies/");
    }
    for name in set.names() {
        for arch in Arch::ALL {
            if let Err(e) = set.compile(name, arch) {
                let file = set.get(name).map(|p| p.file.clone()).unwrap_or_default();
                findings.push(airlock_policy_core::Finding {
                    file,
                    line: 0,
                    kind: airlock_policy_core::FindingKind::Compile,
                    message: e.to_string(),
                });
            }
        }
    }
    findings.sort();
    findings.dedup();
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
