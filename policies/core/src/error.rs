//! Errors of this crate, and the findings `check` reports.
//!
//! A [`Finding`] is a problem in a policy file, located at `file:line`; [`PolicyError`] is a
//! failed step (reading, loading, compiling, installing, tracing). Loading a set that has
//! findings fails with [`PolicyError::LoadPolicies`], which carries all of them.

use std::fmt;
use std::io;

use crate::arch::Arch;

/// What kind of problem a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum FindingKind {
    /// The file is not valid TOML or not a valid policy (unknown key, bad value, ...).
    Syntax,
    /// An `include` that is missing, cyclic or names a worker policy.
    Include,
    /// A constant name in a condition or an errno name is unknown.
    UnknownConstant,
    /// A syscall name is unknown on an architecture the rule applies to.
    UnknownSyscall,
    /// Two rules say the same thing.
    Duplicate,
    /// A rule has no reason.
    MissingReason,
    /// A rule's reason is still `TODO` (a `learn` draft not yet reviewed).
    TodoReason,
    /// A dangerous syscall is allowed without `dangerous = "justification"`.
    UnjustifiedDangerous,
    /// A rule never takes effect because another rule always decides first.
    Shadowed,
    /// The policy does not compile (too large, invalid argument index, ...).
    Compile,
}

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    /// The file as the user named it (or `policies/...` for the embedded set).
    pub file: String,
    /// 1-based line; 0 when the problem concerns the file as a whole.
    pub line: usize,
    pub kind: FindingKind,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

fn list(findings: &[Finding]) -> String {
    findings.iter().map(|f| format!("\n  {f}")).collect()
}

/// A failed step of reading, compiling, installing, reading back or learning a policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    ReadPolicy {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{} problem(s) in the policies:{}", findings.len(), list(findings))]
    LoadPolicies { findings: Vec<Finding> },
    #[error("no policy named {name:?} (known: {known})")]
    FindPolicy { name: String, known: String },
    #[error("policy {policy}: syscall {syscall} does not exist on {arch}")]
    ResolveSyscall { policy: String, syscall: String, arch: Arch },
    #[error("compiling policy {policy} for {arch}: {source}")]
    Compile {
        policy: String,
        arch: Arch,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling policy {policy} for {arch}: {reason}")]
    Link { policy: String, arch: Arch, reason: String },
    #[error("no_new_privs is not set: set PR_SET_NO_NEW_PRIVS before installing a filter")]
    RequireNoNewPrivs,
    #[error("checking no_new_privs: {0}")]
    QueryNoNewPrivs(#[source] io::Error),
    #[error("installing the seccomp filter: {0}")]
    InstallFilter(#[source] seccompiler::Error),
    #[error(
        "cannot read the seccomp filters of pid {pid}: {source}; this needs CAP_SYS_ADMIN and ptrace access to \
         {pid}, and the reader must not itself run under a seccomp filter"
    )]
    ReadFilterDenied {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("reading the seccomp filters of pid {pid}: {step}: {source}")]
    ReadFilter {
        pid: i32,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} does not carry policy {policy} ({arch}): {found}")]
    MatchFilter { pid: i32, policy: String, arch: Arch, found: String },
    #[error("tracing {command}: {step}: {source}")]
    Trace {
        command: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("exporting policy {policy}: {reason}")]
    Export { policy: String, reason: String },
    #[error("evaluating BPF at instruction {pc}: {reason}")]
    EvaluateBpf { pc: usize, reason: String },
}
