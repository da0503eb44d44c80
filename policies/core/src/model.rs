//! The policy format and its loader: TOML files in, resolved [`Policy`] values out.
//!
//! A file is either a worker policy (`[policy]`, with a default action) or an include-only group
//! (`[group]`); both hold `[[rule]]` entries, one per allowed (or explicitly refused) syscall,
//! each with a reason and optional argument conditions, architectures, action and
//! justification. This module parses, resolves symbolic values per architecture, follows
//! includes, and records every problem it meets as a [`Finding`] with its `file:line`, so that
//! `check` can list them all. It never decides whether a policy is *good*: that is `check`'s job.
//!
//! This file is also compiled into `build.rs` (through `#[path]`), so it must only depend on
//! `arch`, `consts`, `error` and `syscalls`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use crate::arch::Arch;
use crate::consts;
use crate::error::{Finding, FindingKind};

// ----------------------------------------------------------------------------- the model

/// What the kernel does when a rule (or, for the default, no rule) matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Run the syscall.
    Allow,
    /// Run the syscall and log it to the audit log.
    Log,
    /// Do not run it; return `-1` with this errno.
    Errno(u32),
    /// Do not run it; send `SIGSYS` to the thread (a handler may report the syscall).
    Trap,
    /// Kill the calling thread.
    KillThread,
    /// Kill the whole process (the kernel cannot be asked for anything stronger).
    KillProcess,
}

impl Action {
    /// The kernel's precedence among stacked filters: higher means more restrictive. Our
    /// compiled programs use the same order when several rules match one call.
    pub fn precedence(self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Log => 1,
            Action::Errno(_) => 3,
            Action::Trap => 4,
            Action::KillThread => 5,
            Action::KillProcess => 6,
        }
    }

    /// True when the syscall runs under this action (`allow`, `log`).
    pub fn lets_through(self) -> bool {
        matches!(self, Action::Allow | Action::Log)
    }

    /// The seccompiler action.
    pub fn seccomp(self) -> seccompiler::SeccompAction {
        match self {
            Action::Allow => seccompiler::SeccompAction::Allow,
            Action::Log => seccompiler::SeccompAction::Log,
            Action::Errno(e) => seccompiler::SeccompAction::Errno(e),
            Action::Trap => seccompiler::SeccompAction::Trap,
            Action::KillThread => seccompiler::SeccompAction::KillThread,
            Action::KillProcess => seccompiler::SeccompAction::KillProcess,
        }
    }

    /// The `SECCOMP_RET_*` value a filter returns for this action.
    pub fn ret_value(self) -> u32 {
        u32::from(self.seccomp())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Allow => f.write_str("allow"),
            Action::Log => f.write_str("log"),
            Action::Errno(e) => match consts::errno_name(*e) {
                Some(n) => write!(f, "errno {n}"),
                None => write!(f, "errno {e}"),
            },
            Action::Trap => f.write_str("trap"),
            Action::KillThread => f.write_str("kill_thread"),
            Action::KillProcess => f.write_str("kill_process"),
        }
    }
}

/// How much of a 64-bit argument register a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Width {
    /// The low 32 bits: right for C `int` arguments, whose upper half the kernel ignores.
    Dword,
    /// All 64 bits (the default).
    Qword,
}

/// A value in a condition, as written and as resolved on each architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// As written: `AF_UNIX`, `CLONE_VM|CLONE_FS`, `0x10`, `2`.
    pub text: String,
    pub x86_64: u64,
    pub aarch64: u64,
}

impl Value {
    pub fn get(&self, arch: Arch) -> u64 {
        match arch {
            Arch::X86_64 => self.x86_64,
            Arch::Aarch64 => self.aarch64,
        }
    }
}

/// The comparison of a condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    Lt(Value),
    Le(Value),
    Gt(Value),
    Ge(Value),
    /// `arg & mask == value` (`bits_clear = M` is `mask = M, masked_eq = 0`).
    MaskedEq {
        mask: Value,
        value: Value,
    },
    /// `arg` equals one of these (each becomes its own alternative).
    OneOf(Vec<Value>),
}

/// One argument condition; all conditions of a rule must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Argument index, 0 to 5.
    pub arg: u8,
    pub width: Width,
    pub op: Op,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lhs = match self.width {
            Width::Dword => format!("(u32)arg{}", self.arg),
            Width::Qword => format!("arg{}", self.arg),
        };
        match &self.op {
            Op::Eq(v) => write!(f, "{lhs} == {}", v.text),
            Op::Ne(v) => write!(f, "{lhs} != {}", v.text),
            Op::Lt(v) => write!(f, "{lhs} < {}", v.text),
            Op::Le(v) => write!(f, "{lhs} <= {}", v.text),
            Op::Gt(v) => write!(f, "{lhs} > {}", v.text),
            Op::Ge(v) => write!(f, "{lhs} >= {}", v.text),
            Op::MaskedEq { mask, value } if mask.text.contains('|') => {
                write!(f, "{lhs} & ({}) == {}", mask.text, value.text)
            }
            Op::MaskedEq { mask, value } => write!(f, "{lhs} & {} == {}", mask.text, value.text),
            Op::OneOf(vs) => {
                let names: Vec<&str> = vs.iter().map(|v| v.text.as_str()).collect();
                write!(f, "{lhs} in {{{}}}", names.join(", "))
            }
        }
    }
}

/// The comparison of one resolved [`Atom`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `arg & mask == value`.
    MaskedEq(u64),
}

/// A condition resolved for one architecture, with `one_of` expanded: what the compiler emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Atom {
    pub arg: u8,
    pub width: Width,
    pub cmp: Cmp,
    pub value: u64,
}

impl Atom {
    /// Whether argument register value `v` satisfies this atom.
    pub fn holds(&self, v: u64) -> bool {
        let v = match self.width {
            Width::Dword => v & 0xffff_ffff,
            Width::Qword => v,
        };
        match self.cmp {
            Cmp::Eq => v == self.value,
            Cmp::Ne => v != self.value,
            Cmp::Lt => v < self.value,
            Cmp::Le => v <= self.value,
            Cmp::Gt => v > self.value,
            Cmp::Ge => v >= self.value,
            Cmp::MaskedEq(mask) => v & mask == self.value & mask,
        }
    }
}

/// Where a rule was written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    /// The file as shown to users (`policies/common/channel.toml`).
    pub file: String,
    /// The file's key in its set (`common/channel.toml`).
    pub key: String,
    /// 1-based line of the rule's `syscall = ...`.
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One `[[rule]]`: a syscall, why it is needed, and under which conditions and action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub syscall: String,
    pub reason: String,
    pub action: Action,
    pub conditions: Vec<Condition>,
    /// The architectures the rule applies to (both unless `arches` says otherwise).
    pub arches: Vec<Arch>,
    /// True when the file limits the rule with `arches = [...]`.
    pub arches_explicit: bool,
    /// The reviewed justification for allowing a dangerous syscall.
    pub dangerous: Option<String>,
    /// The rule deliberately widens a narrower rule of an included group.
    pub widens: bool,
    pub source: Source,
}

/// More one-of expansions than this in a single rule is refused as a likely mistake.
pub const MAX_ALTERNATIVES: usize = 64;

impl Rule {
    pub fn applies_to(&self, arch: Arch) -> bool {
        self.arches.contains(&arch)
    }

    /// The rule as a disjunction of conjunctions of atoms on `arch`: one alternative per
    /// combination of `one_of` values. A rule without conditions is one empty alternative.
    /// Atoms in an alternative are sorted and deduplicated; so are the alternatives.
    pub fn alternatives(&self, arch: Arch) -> Vec<Vec<Atom>> {
        let mut alts: Vec<Vec<Atom>> = vec![Vec::new()];
        for c in &self.conditions {
            let choices: Vec<Atom> = match &c.op {
                Op::OneOf(vs) => {
                    vs.iter().map(|v| Atom { arg: c.arg, width: c.width, cmp: Cmp::Eq, value: v.get(arch) }).collect()
                }
                op => vec![single_atom(c.arg, c.width, op, arch)],
            };
            let mut next = Vec::with_capacity(alts.len() * choices.len());
            for alt in &alts {
                for a in &choices {
                    let mut n = alt.clone();
                    n.push(*a);
                    next.push(n);
                }
            }
            alts = next;
        }
        for alt in alts.iter_mut() {
            alt.sort();
            alt.dedup();
        }
        alts.sort();
        alts.dedup();
        alts
    }

    /// The conditions as one line (`always` when there are none).
    pub fn conditions_text(&self) -> String {
        if self.conditions.is_empty() {
            return "always".into();
        }
        self.conditions.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" && ")
    }
}

fn single_atom(arg: u8, width: Width, op: &Op, arch: Arch) -> Atom {
    let (cmp, value) = match op {
        Op::Eq(v) => (Cmp::Eq, v.get(arch)),
        Op::Ne(v) => (Cmp::Ne, v.get(arch)),
        Op::Lt(v) => (Cmp::Lt, v.get(arch)),
        Op::Le(v) => (Cmp::Le, v.get(arch)),
        Op::Gt(v) => (Cmp::Gt, v.get(arch)),
        Op::Ge(v) => (Cmp::Ge, v.get(arch)),
        Op::MaskedEq { mask, value } => (Cmp::MaskedEq(mask.get(arch)), value.get(arch) & mask.get(arch)),
        // Expanded by the caller; an empty set never matches, which Eq on an impossible
        // value cannot express, so the loader refuses empty `one_of` lists.
        Op::OneOf(_) => (Cmp::Eq, 0),
    };
    Atom { arg, width, cmp, value }
}

/// Whether a file is a worker policy or an include-only group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Worker,
    Group,
}

/// One `include = [...]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// As written in the file.
    pub written: String,
    /// Resolved relative to the including file.
    pub key: String,
    pub line: usize,
}

/// A parsed file, before includes are followed.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    pub key: String,
    pub display: String,
    pub name: String,
    pub kind: FileKind,
    pub description: String,
    pub default_action: Action,
    pub includes: Vec<Include>,
    /// The file's own rules.
    pub rules: Vec<Rule>,
    /// Line of the `[policy]` or `[group]` header.
    pub header_line: usize,
}

/// A worker policy with its includes resolved: what gets compiled and installed.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    /// The file as shown to users.
    pub file: String,
    pub key: String,
    pub description: String,
    /// What happens to every syscall no rule lets through.
    pub default_action: Action,
    /// Every group this policy includes, directly or not, in resolution order.
    pub includes: Vec<String>,
    /// Included rules first (depth first), then the policy's own.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The rules that apply on `arch`.
    pub fn rules_for(&self, arch: Arch) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.applies_to(arch))
    }
}

// ----------------------------------------------------------------------------- raw TOML

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    policy: Option<Spanned<RawHeader>>,
    group: Option<Spanned<RawHeader>>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    #[serde(default)]
    description: String,
    default_action: Option<Spanned<String>>,
    default_errno: Option<Spanned<RawValue>>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    syscall: Spanned<String>,
    reason: Option<String>,
    action: Option<Spanned<String>>,
    errno: Option<Spanned<RawValue>>,
    #[serde(default)]
    args: Vec<Spanned<RawCond>>,
    arches: Option<Spanned<Vec<String>>>,
    dangerous: Option<String>,
    #[serde(default)]
    widens: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCond {
    arg: u8,
    width: Option<u8>,
    eq: Option<RawValue>,
    ne: Option<RawValue>,
    lt: Option<RawValue>,
    le: Option<RawValue>,
    gt: Option<RawValue>,
    ge: Option<RawValue>,
    one_of: Option<Vec<RawValue>>,
    bits_clear: Option<RawValue>,
    masked_eq: Option<RawValue>,
    mask: Option<RawValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawValue {
    Int(i64),
    Text(String),
}

// ----------------------------------------------------------------------------- parsing

/// 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// One file to load.
#[derive(Debug, Clone)]
pub struct Input {
    /// Key in the set: the path relative to the set's root (`common/channel.toml`).
    pub key: String,
    /// The path shown in findings and the audit.
    pub display: String,
    /// The policy name if this is a worker policy (`echo`).
    pub name: String,
    pub text: String,
}

struct FileCtx<'a> {
    display: &'a str,
    text: &'a str,
    findings: Vec<Finding>,
}

impl FileCtx<'_> {
    fn at(&mut self, offset: usize, kind: FindingKind, message: impl Into<String>) {
        let line = line_of(self.text, offset);
        self.findings.push(Finding { file: self.display.to_string(), line, kind, message: message.into() });
    }
}

fn parse_number(token: &str) -> Option<i64> {
    let (neg, t) = match token.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, token),
    };
    let t = t.replace('_', "");
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(o) = t.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()?
    } else if let Some(b) = t.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()?
    } else if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        t.parse::<i64>().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

fn fit(v: i64, width: Width, text: &str) -> Result<u64, (FindingKind, String)> {
    match width {
        Width::Qword => Ok(v as u64),
        Width::Dword => {
            if v < i64::from(i32::MIN) || v > i64::from(u32::MAX) {
                Err((FindingKind::Syntax, format!("value {text} does not fit the 32 bits this condition compares")))
            } else {
                Ok(u64::from(v as u32))
            }
        }
    }
}

/// Resolves `A|B|0x10` (or an integer) to its value on each architecture.
fn resolve_value(raw: &RawValue, width: Width) -> Result<Value, (FindingKind, String)> {
    match raw {
        RawValue::Int(v) => {
            let u = fit(*v, width, &v.to_string())?;
            Ok(Value { text: v.to_string(), x86_64: u, aarch64: u })
        }
        RawValue::Text(s) => {
            let text = s.trim().to_string();
            if text.is_empty() {
                return Err((FindingKind::Syntax, "empty value".into()));
            }
            let mut per = [0i64; 2];
            for token in text.split('|').map(str::trim) {
                for (i, arch) in Arch::ALL.into_iter().enumerate() {
                    let v = match parse_number(token) {
                        Some(v) => v,
                        None => match consts::lookup(token, arch) {
                            Some(v) => v,
                            None => {
                                return Err((
                                    FindingKind::UnknownConstant,
                                    format!("unknown constant {token:?} (see docs/policies.md for the names known)"),
                                ))
                            }
                        },
                    };
                    per[i] |= v;
                }
            }
            Ok(Value { text, x86_64: fit(per[0], width, s)?, aarch64: fit(per[1], width, s)? })
        }
    }
}

fn parse_condition(raw: &RawCond) -> Result<Condition, (FindingKind, String)> {
    if raw.arg > 5 {
        return Err((FindingKind::Syntax, format!("arg = {}: syscalls have arguments 0 to 5", raw.arg)));
    }
    let width = match raw.width {
        None | Some(64) => Width::Qword,
        Some(32) => Width::Dword,
        Some(w) => return Err((FindingKind::Syntax, format!("width = {w}: must be 32 or 64"))),
    };
    let mut ops: Vec<Op> = Vec::new();
    let one = |v: &Option<RawValue>| v.as_ref().map(|v| resolve_value(v, width)).transpose();
    if let Some(v) = one(&raw.eq)? {
        ops.push(Op::Eq(v));
    }
    if let Some(v) = one(&raw.ne)? {
        ops.push(Op::Ne(v));
    }
    if let Some(v) = one(&raw.lt)? {
        ops.push(Op::Lt(v));
    }
    if let Some(v) = one(&raw.le)? {
        ops.push(Op::Le(v));
    }
    if let Some(v) = one(&raw.gt)? {
        ops.push(Op::Gt(v));
    }
    if let Some(v) = one(&raw.ge)? {
        ops.push(Op::Ge(v));
    }
    if let Some(list) = &raw.one_of {
        if list.is_empty() {
            return Err((FindingKind::Syntax, "one_of = []: an empty list matches nothing".into()));
        }
        let vs = list.iter().map(|v| resolve_value(v, width)).collect::<Result<Vec<_>, _>>()?;
        ops.push(Op::OneOf(vs));
    }
    if let Some(m) = one(&raw.bits_clear)? {
        ops.push(Op::MaskedEq { mask: m, value: Value { text: "0".into(), x86_64: 0, aarch64: 0 } });
    }
    match (one(&raw.masked_eq)?, one(&raw.mask)?) {
        (Some(value), Some(mask)) => ops.push(Op::MaskedEq { mask, value }),
        (Some(_), None) => return Err((FindingKind::Syntax, "masked_eq needs mask = ...".into())),
        (None, Some(_)) => return Err((FindingKind::Syntax, "mask is only meaningful with masked_eq".into())),
        (None, None) => {}
    }
    if ops.len() != 1 {
        return Err((
            FindingKind::Syntax,
            format!(
                "a condition needs exactly one of eq, ne, lt, le, gt, ge, one_of, bits_clear, masked_eq (found {})",
                ops.len()
            ),
        ));
    }
    let op = ops.remove(0);
    Ok(Condition { arg: raw.arg, width, op })
}

fn parse_errno(raw: &RawValue) -> Result<u32, String> {
    match raw {
        RawValue::Int(v) if (1..4096).contains(v) => Ok(*v as u32),
        RawValue::Int(v) => Err(format!("errno = {v}: must be 1 to 4095")),
        RawValue::Text(s) => consts::errno(s.trim()).ok_or_else(|| format!("unknown errno name {s:?}")),
    }
}

fn parse_action(name: &str) -> Option<Action> {
    match name {
        "allow" => Some(Action::Allow),
        "log" => Some(Action::Log),
        "trap" => Some(Action::Trap),
        "kill_thread" => Some(Action::KillThread),
        "kill_process" => Some(Action::KillProcess),
        _ => None,
    }
}

/// Joins `include` to the directory of `from` and normalizes `.` and `..`.
pub fn resolve_key(from: &str, include: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let absolute = include.starts_with('/') || (from.starts_with('/') && !include.starts_with('/'));
    if !include.starts_with('/') {
        parts.extend(from.split('/').filter(|p| !p.is_empty()));
        parts.pop();
    }
    for p in include.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if matches!(parts.last(), Some(last) if *last != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else {
        joined
    }
}

fn parse_file(input: &Input) -> Result<PolicyFile, Vec<Finding>> {
    let mut cx = FileCtx { display: &input.display, text: &input.text, findings: Vec::new() };
    let raw: RawFile = match toml::from_str(&input.text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            cx.at(offset, FindingKind::Syntax, e.message().trim().to_string());
            return Err(cx.findings);
        }
    };
    let (kind, header) = match (raw.policy, raw.group) {
        (Some(h), None) => (FileKind::Worker, h),
        (None, Some(h)) => (FileKind::Group, h),
        (Some(h), Some(_)) => {
            cx.at(h.span().start, FindingKind::Syntax, "a file is either a [policy] or a [group], not both");
            return Err(cx.findings);
        }
        (None, None) => {
            cx.findings.push(Finding {
                file: input.display.clone(),
                line: 0,
                kind: FindingKind::Syntax,
                message: "needs a [policy] table (a worker policy) or a [group] table (include-only)".into(),
            });
            return Err(cx.findings);
        }
    };
    let header_line = line_of(&input.text, header.span().start);
    let header = header.into_inner();
    let mut default_action = Action::KillProcess;
    match kind {
        FileKind::Group => {
            if let Some(d) = &header.default_action {
                cx.at(d.span().start, FindingKind::Syntax, "a [group] has no default action: only a [policy] does");
            }
            if let Some(d) = &header.default_errno {
                cx.at(d.span().start, FindingKind::Syntax, "a [group] has no default action: only a [policy] does");
            }
        }
        FileKind::Worker => {
            let name = header.default_action.as_ref().map(|d| d.get_ref().as_str()).unwrap_or("kill_process");
            let at = header.default_action.as_ref().map(|d| d.span().start).unwrap_or(0);
            match (name, &header.default_errno) {
                ("errno", Some(e)) => match parse_errno(e.get_ref()) {
                    Ok(n) => default_action = Action::Errno(n),
                    Err(m) => cx.at(e.span().start, FindingKind::UnknownConstant, m),
                },
                ("errno", None) => {
                    cx.at(at, FindingKind::Syntax, "default_action = \"errno\" needs default_errno = \"NAME\"")
                }
                (_, Some(e)) => {
                    cx.at(e.span().start, FindingKind::Syntax, "default_errno needs default_action = \"errno\"")
                }
                ("allow" | "log", None) => cx.at(
                    at,
                    FindingKind::Syntax,
                    format!("default_action = {name:?} lets everything through: use kill_process, kill_thread, trap or errno"),
                ),
                (n, None) => match parse_action(n) {
                    Some(a) => default_action = a,
                    None => cx.at(
                        at,
                        FindingKind::Syntax,
                        format!("unknown default_action {n:?} (kill_process, kill_thread, trap or errno)"),
                    ),
                },
            }
        }
    }
    let includes: Vec<Include> = header
        .include
        .iter()
        .map(|i| Include {
            written: i.get_ref().clone(),
            key: resolve_key(&input.key, i.get_ref()),
            line: line_of(&input.text, i.span().start),
        })
        .collect();
    let mut rules = Vec::new();
    for r in raw.rule {
        if let Some(rule) = parse_rule(&mut cx, &input.key, r) {
            rules.push(rule);
        }
    }
    if !cx.findings.is_empty() {
        return Err(cx.findings);
    }
    Ok(PolicyFile {
        key: input.key.clone(),
        display: input.display.clone(),
        name: input.name.clone(),
        kind,
        description: header.description,
        default_action,
        includes,
        rules,
        header_line,
    })
}

fn parse_rule(cx: &mut FileCtx<'_>, key: &str, r: RawRule) -> Option<Rule> {
    let at = r.syscall.span().start;
    let before = cx.findings.len();
    let syscall = r.syscall.into_inner().trim().to_string();
    if syscall.is_empty() {
        cx.at(at, FindingKind::Syntax, "empty syscall name");
    }
    let action = match (&r.action, &r.errno) {
        (None, None) => Action::Allow,
        (Some(a), Some(_)) if a.get_ref() != "errno" => {
            cx.at(
                a.span().start,
                FindingKind::Syntax,
                format!("errno = ... conflicts with action = {:?}", a.get_ref()),
            );
            Action::Allow
        }
        (_, Some(e)) => match parse_errno(e.get_ref()) {
            Ok(n) => Action::Errno(n),
            Err(m) => {
                cx.at(e.span().start, FindingKind::UnknownConstant, m);
                Action::Allow
            }
        },
        (Some(a), None) if a.get_ref() == "errno" => {
            cx.at(a.span().start, FindingKind::Syntax, "action = \"errno\" needs errno = \"NAME\"");
            Action::Allow
        }
        (Some(a), None) => match parse_action(a.get_ref()) {
            Some(act) => act,
            None => {
                cx.at(
                    a.span().start,
                    FindingKind::Syntax,
                    format!(
                        "unknown action {:?} (allow, log, trap, kill_thread, kill_process, or errno = \"NAME\")",
                        a.get_ref()
                    ),
                );
                Action::Allow
            }
        },
    };
    let mut conditions = Vec::new();
    for c in &r.args {
        match parse_condition(c.get_ref()) {
            Ok(cond) => conditions.push(cond),
            Err((kind, m)) => cx.at(c.span().start, kind, m),
        }
    }
    let alternatives: usize = conditions
        .iter()
        .map(|c| match &c.op {
            Op::OneOf(v) => v.len(),
            _ => 1,
        })
        .product();
    if alternatives > MAX_ALTERNATIVES {
        cx.at(at, FindingKind::Syntax, format!("{alternatives} one_of combinations: at most {MAX_ALTERNATIVES}"));
    }
    let (arches, arches_explicit) = match &r.arches {
        None => (Arch::ALL.to_vec(), false),
        Some(list) => {
            let mut v = Vec::new();
            for a in list.get_ref() {
                match a.parse::<Arch>() {
                    Ok(a) if !v.contains(&a) => v.push(a),
                    Ok(_) => {}
                    Err(m) => cx.at(list.span().start, FindingKind::Syntax, m),
                }
            }
            if list.get_ref().is_empty() {
                cx.at(list.span().start, FindingKind::Syntax, "arches = []: the rule would apply nowhere");
            }
            v.sort();
            (v, true)
        }
    };
    if cx.findings.len() != before {
        return None;
    }
    Some(Rule {
        syscall,
        reason: r.reason.unwrap_or_default(),
        action,
        conditions,
        arches,
        arches_explicit,
        dangerous: r.dangerous,
        widens: r.widens,
        source: Source { file: cx.display.to_string(), key: key.to_string(), line: line_of(cx.text, at) },
    })
}

// ----------------------------------------------------------------------------- loading

/// Everything a load produced: parsed files, resolved worker policies, and problems.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: BTreeMap<String, PolicyFile>,
    pub policies: BTreeMap<String, Policy>,
    pub findings: Vec<Finding>,
}

/// Where to get a file an `include` names that is not among the inputs: `None` when there is
/// no such file, `Some(Err(why))` when it cannot be read.
pub type Fetch<'a> = dyn FnMut(&str) -> Option<Result<Input, String>> + 'a;

/// Parses `inputs` and everything they include, resolves every worker policy, and collects
/// every problem met on the way. Never stops at the first problem.
pub fn load(inputs: Vec<Input>, fetch: &mut Fetch<'_>) -> Loaded {
    load_onto(&BTreeMap::new(), inputs, fetch)
}

/// Like [`load`], with `parsed` (files an earlier load parsed) already in the set: inputs may
/// include them, and every worker policy is resolved again, but those files are not parsed
/// again. An input with the key of a parsed file is left out.
pub fn load_onto(parsed: &BTreeMap<String, PolicyFile>, inputs: Vec<Input>, fetch: &mut Fetch<'_>) -> Loaded {
    let mut out = Loaded { files: parsed.clone(), ..Loaded::default() };
    let mut findings: BTreeSet<Finding> = BTreeSet::new();
    let mut known: BTreeSet<String> = inputs.iter().map(|i| i.key.clone()).chain(parsed.keys().cloned()).collect();
    let mut queue: VecDeque<Input> = inputs.into();
    while let Some(input) = queue.pop_front() {
        if out.files.contains_key(&input.key) {
            continue;
        }
        match parse_file(&input) {
            Err(f) => findings.extend(f),
            Ok(file) => {
                for inc in &file.includes {
                    if known.contains(&inc.key) {
                        continue;
                    }
                    match fetch(&inc.key) {
                        None => {
                            findings.insert(Finding {
                                file: file.display.clone(),
                                line: inc.line,
                                kind: FindingKind::Include,
                                message: format!("include {:?}: no such policy file ({})", inc.written, inc.key),
                            });
                        }
                        Some(Err(why)) => {
                            findings.insert(Finding {
                                file: file.display.clone(),
                                line: inc.line,
                                kind: FindingKind::Include,
                                message: format!("include {:?}: {why}", inc.written),
                            });
                        }
                        Some(Ok(i)) => {
                            known.insert(i.key.clone());
                            queue.push_back(i);
                        }
                    }
                    known.insert(inc.key.clone());
                }
                out.files.insert(file.key.clone(), file);
            }
        }
    }
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for file in out.files.values() {
        let (includes, rules) = resolve(&out.files, &file.key, &mut findings);
        if file.kind != FileKind::Worker {
            continue;
        }
        if let Some(other) = names.insert(file.name.clone(), file.display.clone()) {
            findings.insert(Finding {
                file: file.display.clone(),
                line: 0,
                kind: FindingKind::Duplicate,
                message: format!("policy name {:?} is also the name of {other}", file.name),
            });
            continue;
        }
        out.policies.insert(
            file.name.clone(),
            Policy {
                name: file.name.clone(),
                file: file.display.clone(),
                key: file.key.clone(),
                description: file.description.clone(),
                default_action: file.default_action,
                includes,
                rules,
            },
        );
    }
    out.findings = findings.into_iter().collect();
    out
}

/// The rules of `key` with its includes followed (depth first, each group once), and the keys
/// of the groups it pulled in. Include problems go to `findings`.
pub fn resolve(
    files: &BTreeMap<String, PolicyFile>,
    key: &str,
    findings: &mut BTreeSet<Finding>,
) -> (Vec<String>, Vec<Rule>) {
    let mut includes = Vec::new();
    let mut rules = Vec::new();
    let mut visited = BTreeSet::new();
    let mut stack = vec![key.to_string()];
    visit(files, key, &mut stack, &mut visited, &mut includes, &mut rules, findings);
    (includes, rules)
}

fn visit(
    files: &BTreeMap<String, PolicyFile>,
    key: &str,
    stack: &mut Vec<String>,
    visited: &mut BTreeSet<String>,
    includes: &mut Vec<String>,
    rules: &mut Vec<Rule>,
    findings: &mut BTreeSet<Finding>,
) {
    let Some(file) = files.get(key) else { return };
    for inc in &file.includes {
        if stack.contains(&inc.key) {
            let mut cycle = stack.clone();
            cycle.push(inc.key.clone());
            findings.insert(Finding {
                file: file.display.clone(),
                line: inc.line,
                kind: FindingKind::Include,
                message: format!("include cycle: {}", cycle.join(" -> ")),
            });
            continue;
        }
        let Some(target) = files.get(&inc.key) else { continue };
        if target.kind == FileKind::Worker {
            findings.insert(Finding {
                file: file.display.clone(),
                line: inc.line,
                kind: FindingKind::Include,
                message: format!("include {:?} is a worker [policy]; only [group] files can be included", inc.written),
            });
            continue;
        }
        if visited.insert(inc.key.clone()) {
            stack.push(inc.key.clone());
            visit(files, &inc.key, stack, visited, includes, rules, findings);
            stack.pop();
            includes.push(inc.key.clone());
        }
    }
    rules.extend(file.rules.iter().cloned());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicyFile, Vec<Finding>> {
        parse_file(&Input { key: "t.toml".into(), display: "t.toml".into(), name: "t".into(), text: text.into() })
    }

    fn first_problem(text: &str) -> Finding {
        match parse(text) {
            Ok(_) => panic!("expected a finding for:\n{text}"),
            Err(f) => f.into_iter().next().expect("one finding"),
        }
    }

    #[test]
    fn values_resolve_per_architecture_and_show_as_written() {
        let f = parse(
            "[policy]\ndescription = \"d\"\n\n[[rule]]\nsyscall = \"openat\"\nreason = \"r\"\n\
             args = [{ arg = 2, width = 32, masked_eq = \"O_DIRECTORY\", mask = \"O_DIRECTORY|O_NOFOLLOW\" }]\n",
        )
        .expect("parse");
        let rule = &f.rules[0];
        assert_eq!(rule.source.line, 5);
        assert_eq!(rule.conditions_text(), "(u32)arg2 & (O_DIRECTORY|O_NOFOLLOW) == O_DIRECTORY");
        let x = rule.alternatives(Arch::X86_64);
        let a = rule.alternatives(Arch::Aarch64);
        assert_eq!(x[0][0].cmp, Cmp::MaskedEq(0o600000));
        assert_eq!(x[0][0].value, 0o200000);
        assert_eq!(a[0][0].cmp, Cmp::MaskedEq(0o140000));
        assert_eq!(a[0][0].value, 0o40000);
    }

    #[test]
    fn one_of_expands_into_alternatives() {
        let f = parse(
            "[group]\n[[rule]]\nsyscall = \"fcntl\"\nreason = \"r\"\n\
             args = [{ arg = 1, width = 32, one_of = [\"F_GETFD\", 2] }, { arg = 0, eq = -100 }]\n",
        )
        .expect("parse");
        let alts = f.rules[0].alternatives(Arch::X86_64);
        assert_eq!(alts.len(), 2);
        assert!(alts.iter().all(|alt| alt.contains(&Atom {
            arg: 0,
            width: Width::Qword,
            cmp: Cmp::Eq,
            value: (-100i64) as u64
        })));
    }

    #[test]
    fn malformed_rules_are_findings_at_their_line() {
        let cases = [
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nargs = [{ arg = 6, eq = 1 }]\n", 5, "arguments 0 to 5"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nargs = [{ arg = 0, width = 16, eq = 1 }]\n", 5, "32 or 64"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nargs = [{ arg = 0, eq = 1, ne = 2 }]\n", 5, "exactly one"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nargs = [{ arg = 0, masked_eq = 1 }]\n", 5, "needs mask"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nargs = [{ arg = 0, width = 32, eq = 0x100000000 }]\n", 5, "32 bits"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\naction = \"trap\"\nerrno = \"EPERM\"\n", 5, "conflicts"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\nerrno = \"EWHAT\"\n", 5, "unknown errno"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\naction = \"trace\"\n", 5, "unknown action"),
            ("[policy]\n[[rule]]\nsyscall = \"x\"\nreason = \"r\"\narches = [\"riscv64\"]\n", 5, "unknown architecture"),
            ("[policy]\ndefault_action = \"allow\"\n", 2, "lets everything through"),
            ("[group]\ndefault_action = \"trap\"\n", 2, "no default action"),
            ("[policy]\n[group]\n", 1, "not both"),
            ("description = \"x\"\n", 1, "unknown field"),
            ("[policy\n", 1, ""),
        ];
        for (text, line, words) in cases {
            let f = first_problem(text);
            assert_eq!(f.line.max(1), line, "{text}: {f}");
            assert!(f.message.contains(words), "{text}: {f}");
        }
        assert!(first_problem("[[rule]]\nsyscall = \"x\"\n").message.contains("[policy]"));
    }

    #[test]
    fn errno_and_default_actions() {
        let f = parse("[policy]\ndefault_action = \"errno\"\ndefault_errno = \"EPERM\"\n[[rule]]\nsyscall = \"x\"\nerrno = 38\nreason = \"r\"\n")
            .expect("parse");
        assert_eq!(f.default_action, Action::Errno(1));
        assert_eq!(f.rules[0].action, Action::Errno(38));
        assert_eq!(f.rules[0].action.to_string(), "errno ENOSYS");
        assert_eq!(parse("[policy]\n").expect("parse").default_action, Action::KillProcess);
    }

    #[test]
    fn include_keys_resolve_relative_to_the_including_file() {
        assert_eq!(resolve_key("echo.toml", "common/channel.toml"), "common/channel.toml");
        assert_eq!(resolve_key("common/channel.toml", "rust-runtime.toml"), "common/rust-runtime.toml");
        assert_eq!(resolve_key("a/b/c.toml", "../x.toml"), "a/x.toml");
        assert_eq!(resolve_key("", "../p/echo.toml"), "../p/echo.toml");
        assert_eq!(resolve_key("/etc/p/echo.toml", "./common/c.toml"), "/etc/p/common/c.toml");
        assert_eq!(resolve_key("x.toml", "/abs/y.toml"), "/abs/y.toml");
    }

    #[test]
    fn precedence_follows_the_kernel() {
        let order =
            [Action::KillProcess, Action::KillThread, Action::Trap, Action::Errno(1), Action::Log, Action::Allow];
        assert!(order.windows(2).all(|w| w[0].precedence() > w[1].precedence()));
        assert_eq!(Action::Errno(38).ret_value(), 0x0005_0026);
    }
}
