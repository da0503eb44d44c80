//! `airlock policy ...`: the auditor's command line, as a library so that the `airlock` binary
//! (and the small `airlock-policy` binary of this crate) can mount it.
//!
//! Exit codes: 0 success; 1 the command's finding (check found problems, diff found a
//! widening, verify found no matching filter); 2 the command could not run (bad arguments,
//! unreadable files, missing privilege).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::error::{Finding, PolicyError};
use crate::{audit, bpf, diff, export, learn, verify, PolicySet};

/// Arguments of `airlock policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// Where a command reads policies from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// Read the policies in DIR instead of the ones built into this binary.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Output format of `audit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    /// Markdown tables, for people.
    #[default]
    Md,
    /// JSON, for tools.
    Json,
}

/// Output format of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// OCI runtime-spec seccomp profile (podman, runc, crun, Docker).
    Oci,
    /// Firecracker / seccompiler JSON.
    Seccompiler,
}

/// The `airlock policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// List the worker policies with their default action and size.
    List {
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Lint policies: unknown syscalls per architecture, duplicates, missing or TODO reasons,
    /// unjustified dangerous syscalls, shadowed rules. Exits 1 listing every problem.
    Check {
        /// Policy files to check (with what they include); default: the built-in policies.
        files: Vec<PathBuf>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Every allowed syscall of every worker policy with its conditions, reason, source line
    /// and risk class, dangerous ones first.
    Audit {
        #[arg(long, value_enum, default_value_t = AuditFormat::Md)]
        format: AuditFormat,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// What NEW allows that OLD did not, and what it no longer allows. OLD and NEW are policy
    /// files or directories of policies. Exits 1 if NEW allows anything more.
    Diff { old: PathBuf, new: PathBuf },
    /// A policy as an OCI seccomp profile or as seccompiler (Firecracker) JSON.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Only this architecture (default: both for OCI, this machine's for seccompiler).
        #[arg(long)]
        arch: Option<Arch>,
        /// Add the rules of an include-only group (e.g. common/oci-start.toml); repeatable.
        #[arg(long = "include", value_name = "GROUP")]
        include: Vec<String>,
        /// Write to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The worker policy (all of them for seccompiler when omitted).
        name: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// The compiled BPF program of a policy, one instruction a line.
    Bpf {
        name: String,
        /// Architecture to compile for (default: this machine's).
        #[arg(long)]
        arch: Option<Arch>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Read the seccomp filters installed in a live process and say which policy they are.
    /// Needs CAP_SYS_ADMIN and ptrace access to the process.
    Verify {
        #[arg(long)]
        pid: i32,
        /// Succeed only if the process carries this policy.
        #[arg(long)]
        policy: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Run a command under a tracer and write a draft policy of the syscalls it made, each
    /// with reason = "TODO".
    Learn {
        /// Write the draft to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<OsString>,
    },
}

/// Runs one `airlock policy` command, printing to stdout and stderr; returns the exit code.
pub fn run(args: PolicyArgs) -> i32 {
    match dispatch(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock policy: {e}");
            2
        }
    }
}

/// Writes to stdout; a closed pipe (`... | head`) ends the output quietly instead of panicking.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

fn load(source: &SourceArgs) -> Result<PolicySet, PolicyError> {
    match &source.dir {
        Some(dir) => PolicySet::load_dir(dir),
        None => Ok(crate::embedded().clone()),
    }
}

fn load_path(path: &Path) -> Result<PolicySet, PolicyError> {
    if path.is_dir() {
        PolicySet::load_dir(path)
    } else {
        PolicySet::load_files(&[path.to_path_buf()])
    }
}

fn write_out(out: Option<&Path>, text: &str) -> Result<(), PolicyError> {
    match out {
        Some(p) => std::fs::write(p, text)
            .map_err(|source| PolicyError::ReadPolicy { path: format!("{} (writing)", p.display()), source }),
        None => {
            emit(text);
            Ok(())
        }
    }
}

fn dispatch(cmd: PolicyCommand) -> Result<i32, PolicyError> {
    match cmd {
        PolicyCommand::List { source } => {
            let set = load(&source)?;
            let mut out = format!("{:<12} {:<14} {:>7}  {:<40} description\n", "policy", "default", "allowed", "file");
            for p in set.policies() {
                let allowed: std::collections::BTreeSet<&str> =
                    p.rules.iter().filter(|r| r.action.lets_through()).map(|r| r.syscall.as_str()).collect();
                let _ = writeln!(
                    out,
                    "{:<12} {:<14} {:>7}  {:<40} {}",
                    p.name,
                    p.default_action.to_string(),
                    allowed.len(),
                    p.file,
                    p.description
                );
            }
            emit(&out);
            Ok(0)
        }
        PolicyCommand::Check { files, source } => {
            let (set, mut findings) = if !files.is_empty() {
                PolicySet::load_files_lenient(&files)?
            } else if let Some(dir) = &source.dir {
                PolicySet::load_dir_lenient(dir)?
            } else {
                PolicySet::from_sources(crate::embedded_sources(), "policies")
            };
            findings.extend(set.check());
            findings.sort();
            findings.dedup();
            Ok(report_check(&set, &findings))
        }
        PolicyCommand::Audit { format, source } => {
            let set = load(&source)?;
            let audits = audit::audit(&set);
            match format {
                AuditFormat::Md => emit(&audit::markdown(&set, &audits)),
                AuditFormat::Json => emit(&format!("{:#}\n", audit::json(&set, &audits))),
            }
            Ok(0)
        }
        PolicyCommand::Diff { old, new } => {
            let old = load_path(&old)?;
            let new = load_path(&new)?;
            let changes = diff::diff(&old, &new);
            emit(&diff::render(&changes));
            Ok(if changes.iter().any(|c| c.widening) { 1 } else { 0 })
        }
        PolicyCommand::Export { format, arch, include, out, name, source } => {
            let set = load(&source)?;
            let json = match format {
                ExportFormat::Oci => {
                    let Some(name) = name else {
                        return Err(PolicyError::FindPolicy {
                            name: String::new(),
                            known: format!("{} (an OCI profile is for one policy: name it)", set.names().join(", ")),
                        });
                    };
                    let policy = set.with_groups(&name, &include)?;
                    let arches = arch.map(|a| vec![a]).unwrap_or_else(|| Arch::ALL.to_vec());
                    export::oci(&policy, &arches)?
                }
                ExportFormat::Seccompiler => {
                    let arch = arch.unwrap_or_else(Arch::native);
                    let names: Vec<String> = match name {
                        Some(n) => vec![n],
                        None => set.names().into_iter().map(String::from).collect(),
                    };
                    let mut all = serde_json::Map::new();
                    for n in names {
                        let policy = set.with_groups(&n, &include)?;
                        if let serde_json::Value::Object(m) = export::seccompiler_json(&policy, arch)? {
                            all.extend(m);
                        }
                    }
                    serde_json::Value::Object(all)
                }
            };
            write_out(out.as_deref(), &format!("{json:#}\n"))?;
            Ok(0)
        }
        PolicyCommand::Bpf { name, arch, source } => {
            let set = load(&source)?;
            let arch = arch.unwrap_or_else(Arch::native);
            let prog = set.compile(&name, arch)?;
            emit(&format!("; policy {name} for {arch}: {} instructions\n", prog.len()));
            emit(&bpf::disassemble(&prog, Some(arch)));
            Ok(0)
        }
        PolicyCommand::Verify { pid, policy, source } => {
            let set = load(&source)?;
            if let Some(p) = &policy {
                set.get(p).ok_or_else(|| PolicyError::FindPolicy { name: p.clone(), known: set.names().join(", ") })?;
            }
            let arch = Arch::native();
            let filters = verify::read_installed_filters(pid)?;
            if filters.is_empty() {
                emit(&format!("pid {pid} has no seccomp filter installed\n"));
                return Ok(1);
            }
            let mut out = String::new();
            let mut matched = Vec::new();
            for (i, f) in filters.iter().enumerate() {
                match verify::matching_policy(&set, arch, f)? {
                    Some(name) => {
                        let _ = writeln!(
                            out,
                            "pid {pid} filter {i}: matches policy {name} ({arch}) exactly ({} instructions)",
                            f.len()
                        );
                        matched.push(name.to_string());
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "pid {pid} filter {i}: does not match any shipped policy: {}",
                            verify::describe_filter(&set, arch, f)
                                .unwrap_or_else(|e| format!("cannot be evaluated: {e}"))
                        );
                    }
                }
            }
            let ok = match &policy {
                Some(p) => matched.iter().any(|m| m == p),
                None => !matched.is_empty(),
            };
            if let (Some(p), false) = (&policy, ok) {
                let _ = writeln!(out, "pid {pid} does not carry policy {p}");
            }
            emit(&out);
            Ok(if ok { 0 } else { 1 })
        }
        PolicyCommand::Learn { out, command } => {
            let learned = learn::trace(&command)?;
            let draft = learn::draft(&learned, &command);
            write_out(out.as_deref(), &draft)?;
            eprintln!(
                "learned {} distinct syscalls; the command exited with {}{}",
                learned.names().len(),
                learned.exit_code,
                out.as_ref().map(|p| format!("; draft written to {}", p.display())).unwrap_or_default()
            );
            Ok(0)
        }
    }
}

fn report_check(set: &PolicySet, findings: &[Finding]) -> i32 {
    let mut out = String::new();
    for f in findings {
        let _ = writeln!(out, "{f}");
    }
    let files = set.files().count();
    let code = if findings.is_empty() {
        let _ = writeln!(out, "ok: {files} file(s), {} worker policies, no problems", set.names().len());
        0
    } else {
        let _ = writeln!(out, "{} problem(s)", findings.len());
        1
    };
    emit(&out);
    code
}
