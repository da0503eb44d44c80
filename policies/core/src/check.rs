//! The policy linter behind `airlock policy check` and the build script.
//!
//! It reports, as `file:line: message` findings: syscall names unknown on an architecture a
//! rule applies to, duplicate rules, missing or `TODO` reasons, dangerous syscalls allowed
//! without a justification, rules that never take effect because another rule always decides
//! first (shadowed), and policies that do not compile. It reads the model only; it never
//! changes a policy.

use std::collections::{BTreeMap, BTreeSet};

use crate::arch::Arch;
use crate::compile;
use crate::error::{Finding, FindingKind, PolicyError};
use crate::model::{resolve, Action, Atom, FileKind, Policy, PolicyFile, Rule};
use crate::risk;
use crate::syscalls;

/// All findings for a set of parsed files and their resolved worker policies.
pub fn lint(files: &BTreeMap<String, PolicyFile>, policies: &BTreeMap<String, Policy>) -> Vec<Finding> {
    let mut out: BTreeSet<Finding> = BTreeSet::new();
    for file in files.values() {
        for rule in &file.rules {
            lint_rule(rule, &mut out);
        }
        let mut ignored = BTreeSet::new();
        let (_, rules) = resolve(files, &file.key, &mut ignored);
        lint_interactions(file, &rules, &mut out);
    }
    for policy in policies.values() {
        for arch in Arch::ALL {
            match compile::compile(&policy.name, policy.default_action, &policy.rules, arch) {
                Ok(_) | Err(PolicyError::ResolveSyscall { .. }) => {}
                Err(e) => {
                    let line = files.get(&policy.key).map(|f| f.header_line).unwrap_or(0);
                    out.insert(Finding {
                        file: policy.file.clone(),
                        line,
                        kind: FindingKind::Compile,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    out.into_iter().collect()
}

fn finding(rule: &Rule, kind: FindingKind, message: String) -> Finding {
    Finding { file: rule.source.file.clone(), line: rule.source.line, kind, message }
}

/// True when `reason` is a placeholder rather than a reason.
pub fn is_todo(reason: &str) -> bool {
    let r = reason.trim();
    r.len() >= 4 && r[..4].eq_ignore_ascii_case("todo")
}

fn lint_rule(rule: &Rule, out: &mut BTreeSet<Finding>) {
    let name = &rule.syscall;
    let exists_on = syscalls::arches_of(name);
    if exists_on.is_empty() {
        out.insert(finding(
            rule,
            FindingKind::UnknownSyscall,
            format!("unknown syscall `{name}` (on every architecture)"),
        ));
    } else {
        for arch in &rule.arches {
            if !exists_on.contains(arch) {
                let list: Vec<String> = exists_on.iter().map(|a| format!("\"{a}\"")).collect();
                out.insert(finding(
                    rule,
                    FindingKind::UnknownSyscall,
                    format!(
                        "syscall `{name}` does not exist on {arch}: limit the rule with arches = [{}]",
                        list.join(", ")
                    ),
                ));
            }
        }
    }
    if rule.reason.trim().is_empty() {
        out.insert(finding(rule, FindingKind::MissingReason, format!("rule for `{name}` has no reason")));
    } else if is_todo(&rule.reason) {
        out.insert(finding(
            rule,
            FindingKind::TodoReason,
            format!("rule for `{name}` has reason {:?}: write down why the worker needs it", rule.reason.trim()),
        ));
    }
    if let Some(why) = risk::why_dangerous(rule) {
        let justified = rule.dangerous.as_deref().is_some_and(|j| !j.trim().is_empty() && !is_todo(j));
        if !justified {
            out.insert(finding(
                rule,
                FindingKind::UnjustifiedDangerous,
                format!("`{name}` is dangerous ({why}): allowing it needs dangerous = \"<reviewed justification>\""),
            ));
        }
    }
}

/// `a` matches whenever `b` does (syntactically: each alternative of `b` contains all the
/// atoms of some alternative of `a`).
pub fn covers(a: &[Vec<Atom>], b: &[Vec<Atom>]) -> bool {
    b.iter().all(|bb| a.iter().any(|aa| aa.iter().all(|atom| bb.contains(atom))))
}

/// The order in which the compiled program tries the rules' actions: lower decides first.
pub fn decision_order(action: Action) -> (u8, u32) {
    let errno = match action {
        Action::Errno(e) => e,
        _ => 0,
    };
    (u8::MAX - action.precedence(), errno)
}

fn lint_interactions(file: &PolicyFile, rules: &[Rule], out: &mut BTreeSet<Finding>) {
    // (rule index, message, kind) -> arches where it holds
    let mut found: BTreeMap<(usize, FindingKind, String), BTreeSet<Arch>> = BTreeMap::new();
    let mut widened: BTreeSet<usize> = BTreeSet::new();
    for arch in Arch::ALL {
        let mut by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in rules.iter().enumerate() {
            if r.applies_to(arch) && syscalls::number(arch, &r.syscall).is_some() {
                by_name.entry(r.syscall.as_str()).or_default().push(i);
            }
        }
        for idxs in by_name.values() {
            if idxs.len() < 2 {
                continue;
            }
            let alts: Vec<Vec<Vec<Atom>>> = idxs.iter().map(|&i| rules[i].alternatives(arch)).collect();
            for (x, &bi) in idxs.iter().enumerate() {
                let b = &rules[bi];
                for (y, &ai) in idxs.iter().enumerate() {
                    if x == y {
                        continue;
                    }
                    let a = &rules[ai];
                    let a_first = decision_order(a.action) < decision_order(b.action);
                    let same = decision_order(a.action) == decision_order(b.action);
                    if !covers(&alts[y], &alts[x]) || !(a_first || same) {
                        continue;
                    }
                    if a.widens && a.source.key != b.source.key {
                        widened.insert(ai);
                        continue;
                    }
                    let (kind, message) = if same && covers(&alts[x], &alts[y]) {
                        // Identical: report only the later of the two.
                        if bi < ai {
                            continue;
                        }
                        (FindingKind::Duplicate, format!("duplicate rule for `{}`: same as {}", b.syscall, a.source))
                    } else if same {
                        (
                            FindingKind::Shadowed,
                            format!(
                                "rule for `{}` when {} is shadowed: {} already {} it whenever this rule would",
                                b.syscall,
                                b.conditions_text(),
                                a.source,
                                verb(a.action)
                            ),
                        )
                    } else {
                        (
                            FindingKind::Shadowed,
                            format!(
                                "rule for `{}` ({}) never takes effect: {} ({}, {}) always decides first",
                                b.syscall,
                                b.action,
                                a.source,
                                a.action,
                                a.conditions_text()
                            ),
                        )
                    };
                    found.entry((bi, kind, message)).or_default().insert(arch);
                }
            }
        }
    }
    for ((i, kind, message), arches) in found {
        let r = &rules[i];
        let message = if arches.len() < r.arches.len() {
            let names: Vec<&str> = arches.iter().map(|a| a.name()).collect();
            format!("{message} (on {})", names.join(", "))
        } else {
            message
        };
        out.insert(finding(r, kind, message));
    }
    for (i, r) in rules.iter().enumerate() {
        if r.widens && r.source.key == file.key && !widened.contains(&i) {
            let what = match file.kind {
                FileKind::Worker => "policy",
                FileKind::Group => "group",
            };
            out.insert(finding(
                r,
                FindingKind::Shadowed,
                format!("rule for `{}` says widens = true, but no rule this {what} includes is narrower", r.syscall),
            ));
        }
    }
}

fn verb(action: Action) -> &'static str {
    if action.lets_through() {
        "allows"
    } else {
        "refuses"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cmp, Width};

    #[test]
    fn todo_reasons_are_recognized() {
        assert!(is_todo("TODO"));
        assert!(is_todo("  todo: find out"));
        assert!(!is_todo("to do"));
        assert!(!is_todo("the allocator"));
    }

    #[test]
    fn fewer_conditions_cover_more_calls() {
        let a = Atom { arg: 0, width: Width::Dword, cmp: Cmp::Eq, value: 2 };
        let b = Atom { arg: 1, width: Width::Dword, cmp: Cmp::Eq, value: 3 };
        assert!(covers(&[vec![]], &[vec![a]]));
        assert!(covers(&[vec![a]], &[vec![a, b]]));
        assert!(!covers(&[vec![a, b]], &[vec![a]]));
        assert!(covers(&[vec![a], vec![b]], &[vec![a, b]]));
        assert!(!covers(&[vec![a]], &[vec![b]]));
    }
}
