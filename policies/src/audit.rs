//! `airlock policy audit`: per worker policy, every rule with its syscall, conditions, action,
//! reason, source file and line, and risk class, dangerous ones first; totals per policy and
//! for the set; and the dangerous rules of groups no worker policy includes. Markdown for
//! people, JSON for tools. Reads the model; decides nothing.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::{json, Value as Json};

use crate::arch::Arch;
use crate::model::{Policy, Rule};
use crate::risk::{self, Risk};
use crate::PolicySet;

/// One rule as the audit shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub syscall: String,
    pub arches: Vec<Arch>,
    pub conditions: String,
    pub action: String,
    /// `None` for rules that refuse the syscall (errno, trap, kill).
    pub risk: Option<Risk>,
    pub reason: String,
    pub dangerous: Option<String>,
    pub file: String,
    pub line: usize,
}

/// The audit of one worker policy.
#[derive(Debug, Clone)]
pub struct PolicyAudit {
    pub name: String,
    pub file: String,
    pub description: String,
    pub default_action: String,
    pub includes: Vec<String>,
    /// Dangerous first, then sensitive, ordinary, and the refusing rules last.
    pub entries: Vec<Entry>,
}

impl PolicyAudit {
    /// Distinct syscalls some rule lets through, on any architecture.
    pub fn allowed_syscalls(&self) -> BTreeSet<&str> {
        self.entries.iter().filter(|e| e.risk.is_some()).map(|e| e.syscall.as_str()).collect()
    }

    /// Distinct allowed syscalls whose most severe rule is in class `risk`.
    pub fn count(&self, risk: Risk) -> usize {
        let mut worst: std::collections::BTreeMap<&str, Risk> = std::collections::BTreeMap::new();
        for e in &self.entries {
            if let Some(r) = e.risk {
                let w = worst.entry(e.syscall.as_str()).or_insert(r);
                *w = (*w).min(r);
            }
        }
        worst.values().filter(|r| **r == risk).count()
    }
}

fn entry(rule: &Rule) -> Entry {
    Entry {
        syscall: rule.syscall.clone(),
        arches: rule.arches.clone(),
        conditions: rule.conditions_text(),
        action: rule.action.to_string(),
        risk: risk::classify(rule),
        reason: rule.reason.trim().to_string(),
        dangerous: rule.dangerous.clone(),
        file: rule.source.file.clone(),
        line: rule.source.line,
    }
}

/// The audit of `policy`.
pub fn audit_policy(policy: &Policy) -> PolicyAudit {
    let mut entries: Vec<Entry> = policy.rules.iter().map(entry).collect();
    entries.sort_by(|a, b| {
        let ka = (a.risk.map(|r| r as u8).unwrap_or(u8::MAX), &a.syscall, &a.file, a.line);
        let kb = (b.risk.map(|r| r as u8).unwrap_or(u8::MAX), &b.syscall, &b.file, b.line);
        ka.cmp(&kb)
    });
    PolicyAudit {
        name: policy.name.clone(),
        file: policy.file.clone(),
        description: policy.description.clone(),
        default_action: policy.default_action.to_string(),
        includes: policy.includes.clone(),
        entries,
    }
}

/// The audit of every worker policy of `set`, by name.
pub fn audit(set: &PolicySet) -> Vec<PolicyAudit> {
    set.policies().map(audit_policy).collect()
}

/// The dangerous rules of groups no worker policy includes (such as `common/oci-start.toml`'s
/// `execve`, which `export --include` adds), as `(group key, rule)`: no worker policy's
/// audit shows them, yet an exported profile can carry them.
pub fn unused_group_dangerous(set: &PolicySet) -> Vec<(String, Entry)> {
    set.unused_groups()
        .into_iter()
        .filter_map(|key| set.file(key))
        .flat_map(|f| f.rules.iter().map(entry).filter(|e| e.risk == Some(Risk::Dangerous)).map(|e| (f.key.clone(), e)))
        .collect()
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn arches_text(arches: &[Arch]) -> String {
    if arches.len() == Arch::ALL.len() {
        "all".into()
    } else {
        arches.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
    }
}

/// The audit as Markdown.
pub fn markdown(set: &PolicySet, audits: &[PolicyAudit]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Seccomp policy audit\n");
    let _ = writeln!(out, "Source: `{}`. Risk classes are defined in `docs/policies.md`.\n", set.origin());
    let _ = writeln!(out, "## Totals\n");
    let _ = writeln!(
        out,
        "| policy | default action | allowed syscalls | dangerous | sensitive | ordinary | refused by rule |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for a in audits {
        let refused = a.entries.iter().filter(|e| e.risk.is_none()).count();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            a.name,
            a.default_action,
            a.allowed_syscalls().len(),
            a.count(Risk::Dangerous),
            a.count(Risk::Sensitive),
            a.count(Risk::Ordinary),
            refused
        );
    }
    let dangerous: Vec<(&PolicyAudit, &Entry)> = audits
        .iter()
        .flat_map(|a| a.entries.iter().filter(|e| e.risk == Some(Risk::Dangerous)).map(move |e| (a, e)))
        .collect();
    let justification = |e: &Entry| e.dangerous.clone().unwrap_or_else(|| "NONE (check fails)".into());
    let _ = writeln!(out, "\n## Dangerous syscalls allowed\n");
    if dangerous.is_empty() {
        let _ = writeln!(out, "None: no worker policy allows a dangerous syscall.");
    } else {
        for (a, e) in dangerous {
            let _ = writeln!(
                out,
                "- **{}** in `{}` ({}:{}) when {}: justification: {}",
                e.syscall,
                a.name,
                e.file,
                e.line,
                e.conditions,
                justification(e)
            );
        }
    }
    let in_groups = unused_group_dangerous(set);
    if !in_groups.is_empty() {
        let _ = writeln!(out, "\nIn groups no worker policy includes (added only by `export --include`):\n");
        for (group, e) in &in_groups {
            let _ = writeln!(
                out,
                "- **{}** in group `{group}` ({}:{}) when {}: justification: {}",
                e.syscall,
                e.file,
                e.line,
                e.conditions,
                justification(e)
            );
        }
    }
    for a in audits {
        let _ = writeln!(out, "\n## Policy `{}`\n", a.name);
        let _ = writeln!(out, "{}\n", a.description);
        let _ = writeln!(out, "- file: `{}`", a.file);
        let _ = writeln!(out, "- default action (every syscall no rule lets through): **{}**", a.default_action);
        let includes = if a.includes.is_empty() {
            "none".to_string()
        } else {
            a.includes.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(out, "- includes: {includes}");
        let _ = writeln!(
            out,
            "- {} syscalls allowed: {} dangerous, {} sensitive, {} ordinary\n",
            a.allowed_syscalls().len(),
            a.count(Risk::Dangerous),
            a.count(Risk::Sensitive),
            a.count(Risk::Ordinary)
        );
        let _ = writeln!(out, "| risk | syscall | arches | when | action | reason | source |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for e in &a.entries {
            let mut reason = md_cell(&e.reason);
            if let Some(j) = &e.dangerous {
                let _ = write!(reason, " **Dangerous, justified:** {}", md_cell(j));
            }
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {} | {} | {}:{} |",
                e.risk.map(|r| r.name()).unwrap_or("refused"),
                e.syscall,
                arches_text(&e.arches),
                md_cell(&e.conditions),
                e.action,
                reason,
                e.file,
                e.line
            );
        }
    }
    let unused = set.unused_groups();
    if !unused.is_empty() {
        let _ = writeln!(out, "\n## Groups no worker policy includes\n");
        for g in unused {
            let _ = writeln!(out, "- `{g}` (used only by `export --include`, or not at all)");
        }
    }
    out
}

fn entry_json(e: &Entry) -> Json {
    json!({
        "syscall": e.syscall,
        "arches": e.arches.iter().map(|x| x.name()).collect::<Vec<_>>(),
        "conditions": e.conditions,
        "action": e.action,
        "risk": e.risk.map(|r| r.name()).unwrap_or("refused"),
        "reason": e.reason,
        "dangerous_justification": e.dangerous,
        "file": e.file,
        "line": e.line,
    })
}

/// The audit as JSON.
pub fn json(set: &PolicySet, audits: &[PolicyAudit]) -> Json {
    let policies: Vec<Json> = audits
        .iter()
        .map(|a| {
            let entries: Vec<Json> = a.entries.iter().map(entry_json).collect();
            json!({
                "name": a.name,
                "file": a.file,
                "description": a.description,
                "default_action": a.default_action,
                "includes": a.includes,
                "totals": {
                    "allowed_syscalls": a.allowed_syscalls().len(),
                    "dangerous": a.count(Risk::Dangerous),
                    "sensitive": a.count(Risk::Sensitive),
                    "ordinary": a.count(Risk::Ordinary),
                    "refused_by_rule": a.entries.iter().filter(|e| e.risk.is_none()).count(),
                },
                "rules": entries,
            })
        })
        .collect();
    json!({
        "source": set.origin(),
        "policies": policies,
        "totals": {
            "policies": audits.len(),
            "dangerous_allowed": audits.iter().map(|a| a.count(Risk::Dangerous)).sum::<usize>(),
        },
        "unused_groups": set.unused_groups(),
        "unused_group_dangerous": unused_group_dangerous(set)
            .iter()
            .map(|(group, e)| {
                let mut rule = entry_json(e);
                rule["group"] = json!(group);
                rule
            })
            .collect::<Vec<_>>(),
    })
}
