//! `airlock-policy-core`: the seccomp policy model, its checks and its compiler, and the one
//! call that installs a compiled filter.
//!
//! Policies are TOML files (one per worker role, plus include-only groups); this crate parses
//! them into a [`PolicySet`], lints them ([`PolicySet::check`]) and compiles them to BPF
//! ([`PolicySet::compile`]). `airlock-policies` embeds the project's files and checks them at
//! build time with this very code (an ordinary build-dependency); a worker links this crate
//! only to unpack and [`install`] the program its supervisor compiled. The auditor's tools
//! (`airlock policy`) live in `airlock-policies`, not here: no command-line parser, no JSON.
//!
//! This crate decides nothing about *when* a worker is confined, and never spawns workers.
#![deny(unsafe_code)]

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("airlock-policy-core supports x86_64 and aarch64 only");

pub mod arch;
pub mod bpf;
pub mod check;
pub mod compile;
pub mod consts;
pub mod error;
pub mod model;
pub mod risk;
pub mod syscalls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use arch::Arch;
pub use bpf::{pack_program, unpack_program};
pub use error::{Finding, FindingKind, PolicyError};
pub use model::{Action, Policy, PolicyFile, Rule};
pub use seccompiler::{sock_filter, BpfProgram};

use model::{FileKind, Input, Loaded};

/// A set of policy files and the worker policies they define.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    files: BTreeMap<String, PolicyFile>,
    policies: BTreeMap<String, Policy>,
    origin: String,
}

/// The name of syscall `nr` on `arch` (for reports of a `SIGSYS`).
pub fn syscall_name(arch: Arch, nr: u32) -> Option<&'static str> {
    syscalls::name(arch, nr)
}

/// Sets `no_new_privs` for the calling thread (inherited by threads created later), which lets
/// an unprivileged process [`install`] a filter.
pub fn set_no_new_privs() -> std::io::Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)
}

/// Installs `prog` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`).
///
/// The caller must have set `no_new_privs` first (as part of dropping privileges); this
/// function checks and refuses otherwise rather than set it behind the caller's back.
pub fn install(prog: &BpfProgram) -> Result<(), PolicyError> {
    if !nix::sys::prctl::get_no_new_privs().map_err(|e| PolicyError::QueryNoNewPrivs(e.into()))? {
        return Err(PolicyError::RequireNoNewPrivs);
    }
    seccompiler::apply_filter_all_threads(prog).map_err(PolicyError::InstallFilter)
}

/// Directories `load_dir` does not descend into: a crate's code, tests and build output.
const SKIPPED_DIRS: &[&str] = &["src", "tests", "target", "benches", "examples"];

fn name_of(key: &str) -> String {
    key.strip_suffix(".toml").unwrap_or(key).to_string()
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::ReadPolicy { path: path.display().to_string(), source })
}

fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), PolicyError> {
    let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
    let entries = std::fs::read_dir(&dir)
        .map_err(|source| PolicyError::ReadPolicy { path: dir.display().to_string(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::ReadPolicy { path: dir.display().to_string(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let key = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let ty = entry.file_type().map_err(|source| PolicyError::ReadPolicy { path: key.clone(), source })?;
        if ty.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) {
                walk(root, &key, out)?;
            }
        } else if name.ends_with(".toml") && name != "Cargo.toml" {
            out.push(key);
        }
    }
    Ok(())
}

fn display_join(root: &str, key: &str) -> String {
    if root.is_empty() || root == "." {
        key.to_string()
    } else {
        format!("{}/{key}", root.trim_end_matches('/'))
    }
}

/// In-memory sources `(key, text)` as the loader's inputs.
fn inputs_of(sources: &[(&str, &str)], display_root: &str) -> Vec<Input> {
    sources
        .iter()
        .map(|(key, text)| Input {
            key: key.to_string(),
            display: display_join(display_root, key),
            name: name_of(key),
            text: text.to_string(),
        })
        .collect()
}

impl PolicySet {
    fn from_loaded(loaded: Loaded, origin: String) -> (PolicySet, Vec<Finding>) {
        (PolicySet { files: loaded.files, policies: loaded.policies, origin }, loaded.findings)
    }

    /// Loads in-memory sources `(key, text)`; includes resolve among them. Returns the usable
    /// part of the set and every loading problem (files with problems are left out).
    pub fn from_sources(sources: &[(&str, &str)], display_root: &str) -> (PolicySet, Vec<Finding>) {
        let loaded = model::load(inputs_of(sources, display_root), &mut |_| None);
        PolicySet::from_loaded(loaded, display_root.to_string())
    }

    /// Loads in-memory sources `(key, text)` on top of this set's files, which are not parsed
    /// again (a file checked against the shipped groups, as the policy fuzz target does it once
    /// per input). Includes resolve among both; a source with the key of a file already in the
    /// set is left out. Returns the usable part of the new set and every problem of the sources.
    pub fn with_sources(&self, sources: &[(&str, &str)], display_root: &str) -> (PolicySet, Vec<Finding>) {
        let loaded = model::load_onto(&self.files, inputs_of(sources, display_root), &mut |_| None);
        PolicySet::from_loaded(loaded, display_root.to_string())
    }

    /// Like [`PolicySet::load_dir`], but returns the usable part of the set with the loading
    /// problems instead of failing on them (what `check` needs).
    pub fn load_dir_lenient(dir: &Path) -> Result<(PolicySet, Vec<Finding>), PolicyError> {
        let mut keys = Vec::new();
        walk(dir, "", &mut keys)?;
        keys.sort();
        let root = dir.display().to_string();
        let mut inputs = Vec::new();
        for key in keys {
            let text = read(&dir.join(&key))?;
            inputs.push(Input { display: display_join(&root, &key), name: name_of(&key), key, text });
        }
        let loaded = model::load(inputs, &mut |_| None);
        Ok(PolicySet::from_loaded(loaded, root))
    }

    /// Loads every `*.toml` below `dir` (except Cargo manifests and the `src`, `tests`,
    /// `target`, `benches` and `examples` folders). A policy's name is its path relative to
    /// `dir` without `.toml` (`echo`, `sub/role`). Fails if any file cannot be read, parsed or
    /// resolved; lint findings are [`PolicySet::check`]'s business.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<PolicySet, PolicyError> {
        let (set, findings) = PolicySet::load_dir_lenient(dir.as_ref())?;
        if findings.is_empty() {
            Ok(set)
        } else {
            Err(PolicyError::LoadPolicies { findings })
        }
    }

    /// Like [`PolicySet::load_files`], but returns the loading problems with the usable part.
    pub fn load_files_lenient(paths: &[PathBuf]) -> Result<(PolicySet, Vec<Finding>), PolicyError> {
        let mut inputs = Vec::new();
        for p in paths {
            let key = model::resolve_key("", &p.display().to_string());
            let text = read(p)?;
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| key.clone());
            inputs.push(Input { key: key.clone(), display: key, name, text });
        }
        let mut fetch = |key: &str| -> Option<Result<Input, String>> {
            let path = Path::new(key);
            if !path.exists() {
                return None;
            }
            Some(match std::fs::read_to_string(path) {
                Ok(text) => Ok(Input { key: key.to_string(), display: key.to_string(), name: name_of(key), text }),
                Err(e) => Err(format!("cannot read {key}: {e}")),
            })
        };
        let loaded = model::load(inputs, &mut fetch);
        Ok(PolicySet::from_loaded(loaded, String::new()))
    }

    /// Loads the given files and whatever they include (relative to each including file). A
    /// worker policy's name is its file stem.
    pub fn load_files(paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        let (set, findings) = PolicySet::load_files_lenient(paths)?;
        if findings.is_empty() {
            Ok(set)
        } else {
            Err(PolicyError::LoadPolicies { findings })
        }
    }

    /// Where the set came from (`policies` for the embedded set, or the directory).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Names of the worker policies, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.policies.keys().map(String::as_str).collect()
    }

    /// The worker policy `name`.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    /// Every worker policy, by name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    /// Every parsed file (worker policies and groups), by key.
    pub fn files(&self) -> impl Iterator<Item = &PolicyFile> {
        self.files.values()
    }

    /// The file with key `key` (`common/channel.toml`).
    pub fn file(&self, key: &str) -> Option<&PolicyFile> {
        self.files.get(key)
    }

    /// Keys of the include-only groups no worker policy includes.
    pub fn unused_groups(&self) -> Vec<&str> {
        let used: BTreeSet<&str> = self.policies.values().flat_map(|p| p.includes.iter().map(String::as_str)).collect();
        self.files
            .values()
            .filter(|f| f.kind == FileKind::Group && !used.contains(f.key.as_str()))
            .map(|f| f.key.as_str())
            .collect()
    }

    /// Every lint finding (see `check`); empty for a clean set.
    pub fn check(&self) -> Vec<Finding> {
        check::lint(&self.files, &self.policies)
    }

    fn require(&self, name: &str) -> Result<&Policy, PolicyError> {
        self.get(name).ok_or_else(|| PolicyError::FindPolicy { name: name.to_string(), known: self.names().join(", ") })
    }

    /// Compiles worker policy `name` for `arch`. Deterministic: the same set always gives the
    /// same program.
    pub fn compile(&self, name: &str, arch: Arch) -> Result<BpfProgram, PolicyError> {
        let p = self.require(name)?;
        compile::compile(&p.name, p.default_action, &p.rules, arch)
    }

    /// Worker policy `name` with the rules of extra include-only `groups` (keys such as
    /// `common/oci-start.toml`, or names without `.toml`) added, as `export --include` needs.
    pub fn with_groups(&self, name: &str, groups: &[String]) -> Result<Policy, PolicyError> {
        let mut p = self.require(name)?.clone();
        for g in groups {
            let key = if g.ends_with(".toml") { g.clone() } else { format!("{g}.toml") };
            let file =
                self.files.get(&key).filter(|f| f.kind == FileKind::Group).ok_or_else(|| PolicyError::FindPolicy {
                    name: g.clone(),
                    known: self
                        .files
                        .values()
                        .filter(|f| f.kind == FileKind::Group)
                        .map(|f| f.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let mut ignored = BTreeSet::new();
            let (includes, rules) = model::resolve(&self.files, &file.key, &mut ignored);
            for inc in includes.into_iter().chain(std::iter::once(file.key.clone())) {
                if !p.includes.contains(&inc) {
                    let added: Vec<Rule> = rules.iter().filter(|r| r.source.key == inc).cloned().collect();
                    p.rules.extend(added);
                    p.includes.push(inc);
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = "[group]\ndescription = \"g\"\n\n[[rule]]\nsyscall = \"read\"\nreason = \"r\"\n";
    const WORKER: &str = "[policy]\ndescription = \"w\"\ndefault_action = \"trap\"\ninclude = [\"common/g.toml\"]\n\n\
                          [[rule]]\nsyscall = \"write\"\nreason = \"w\"\nargs = [{ arg = 0, eq = 2 }]\n";

    #[test]
    fn sources_on_top_of_a_set_load_as_if_loaded_together() {
        let (base, findings) = PolicySet::from_sources(&[("common/g.toml", GROUP)], "p");
        assert!(findings.is_empty(), "{findings:?}");
        let (onto, f1) = base.with_sources(&[("w.toml", WORKER)], "p");
        let (together, f2) = PolicySet::from_sources(&[("common/g.toml", GROUP), ("w.toml", WORKER)], "p");
        assert_eq!(f1, f2);
        assert_eq!(format!("{:?}", onto.get("w")), format!("{:?}", together.get("w")));
        assert_eq!(onto.check(), together.check());
        for arch in Arch::ALL {
            let (a, b) = (onto.compile("w", arch).expect("compiles"), together.compile("w", arch).expect("compiles"));
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
        // A source with a missing include is refused the same way, and a key already in the
        // set is not parsed again.
        let bad = "[policy]\ndefault_action = \"trap\"\ninclude = [\"nope.toml\"]\n";
        assert_eq!(
            base.with_sources(&[("b.toml", bad)], "p").1,
            PolicySet::from_sources(&[("common/g.toml", GROUP), ("b.toml", bad)], "p").1
        );
        let (same, _) = base.with_sources(&[("common/g.toml", "not toml [")], "p");
        assert_eq!(same.file("common/g.toml").map(|f| f.rules.len()), Some(1));
    }
}
