//! `airlock policy diff OLD NEW`: what a change to a policy (or a tree of policies) lets through
//! that it did not before, and what it takes away.
//!
//! The comparison is per worker policy, architecture and syscall, on resolved condition
//! alternatives: a NEW alternative that no OLD alternative covers (syntactically: contains all
//! of its conditions) is reported as a widening. This errs on the side of reporting: a change
//! that only restates a condition differently shows up as widening, never the reverse.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::arch::Arch;
use crate::check::covers;
use crate::model::{Action, Atom, Policy, Rule};
use crate::PolicySet;

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub policy: String,
    /// True when NEW lets something through that OLD did not (or refuses more softly).
    pub widening: bool,
    pub text: String,
    pub arches: Vec<Arch>,
}

fn alts_by_syscall(p: &Policy, arch: Arch, let_through: bool) -> BTreeMap<String, Vec<(Vec<Atom>, Action)>> {
    let mut m: BTreeMap<String, Vec<(Vec<Atom>, Action)>> = BTreeMap::new();
    for r in p.rules_for(arch).filter(|r| r.action.lets_through() == let_through) {
        for alt in r.alternatives(arch) {
            m.entry(r.syscall.clone()).or_default().push((alt, r.action));
        }
    }
    m
}

fn covered(alt: &[Atom], by: Option<&Vec<(Vec<Atom>, Action)>>, action: Option<Action>) -> bool {
    let Some(by) = by else { return false };
    let set: Vec<Vec<Atom>> =
        by.iter().filter(|(_, a)| action.is_none_or(|x| x == *a)).map(|(alt, _)| alt.clone()).collect();
    covers(&set, &[alt.to_vec()])
}

fn describe(r: &Rule) -> String {
    format!("`{}` when {} ({}, {})", r.syscall, r.conditions_text(), r.action, r.source)
}

type Found = BTreeMap<(bool, String, String), Vec<Arch>>;

fn compare_policy(name: &str, old: &Policy, new: &Policy, out: &mut Found) {
    let mut push = |widening: bool, text: String, arch: Arch| {
        let arches = out.entry((widening, name.to_string(), text)).or_default();
        if !arches.contains(&arch) {
            arches.push(arch);
        }
    };
    for arch in Arch::ALL {
        if old.default_action != new.default_action {
            let widening = new.default_action.precedence() < old.default_action.precedence();
            push(widening, format!("{name}: default action {} -> {}", old.default_action, new.default_action), arch);
        }
        let old_allow = alts_by_syscall(old, arch, true);
        let new_allow = alts_by_syscall(new, arch, true);
        let old_refuse = alts_by_syscall(old, arch, false);
        let new_refuse = alts_by_syscall(new, arch, false);
        // Let-through rules: new or relaxed.
        for r in new.rules_for(arch).filter(|r| r.action.lets_through()) {
            let alts = r.alternatives(arch);
            let prior = old_allow.get(&r.syscall);
            let uncovered = alts.iter().filter(|a| !covered(a, prior, None)).count();
            if prior.is_none() {
                push(true, format!("{name}: newly allows {}", describe(r)), arch);
            } else if uncovered > 0 {
                push(true, format!("{name}: relaxes `{}`: now also allowed by {}", r.syscall, describe(r)), arch);
            }
        }
        for r in old.rules_for(arch).filter(|r| r.action.lets_through()) {
            let alts = r.alternatives(arch);
            let now = new_allow.get(&r.syscall);
            let uncovered = alts.iter().filter(|a| !covered(a, now, None)).count();
            if now.is_none() {
                push(false, format!("{name}: no longer allows {}", describe(r)), arch);
            } else if uncovered > 0 {
                push(false, format!("{name}: narrows `{}`: no longer allowed as by {}", r.syscall, describe(r)), arch);
            }
        }
        // Refusing rules (errno, trap, kill): removed or changed, and added.
        for r in old.rules_for(arch).filter(|r| !r.action.lets_through()) {
            let still = r.alternatives(arch).iter().all(|a| covered(a, new_refuse.get(&r.syscall), Some(r.action)));
            if still {
                continue;
            }
            let lets_through = new_allow.contains_key(&r.syscall);
            let widening = lets_through || new.default_action.precedence() < r.action.precedence();
            let then = if lets_through {
                "it may now be let through".to_string()
            } else {
                format!("the default ({}) applies", new.default_action)
            };
            push(widening, format!("{name}: no longer refuses {}: {then}", describe(r)), arch);
        }
        for r in new.rules_for(arch).filter(|r| !r.action.lets_through()) {
            let before = r.alternatives(arch).iter().all(|a| covered(a, old_refuse.get(&r.syscall), Some(r.action)));
            if !before {
                let widening =
                    !old_allow.contains_key(&r.syscall) && r.action.precedence() < old.default_action.precedence();
                push(widening, format!("{name}: now refuses {}", describe(r)), arch);
            }
        }
    }
}

/// Every difference between `old` and `new`, widenings first.
pub fn diff(old: &PolicySet, new: &PolicySet) -> Vec<Change> {
    let mut out: Found = BTreeMap::new();
    for name in new.names() {
        let Some(n) = new.get(name) else { continue };
        match old.get(name) {
            None => {
                let count = n.rules.iter().filter(|r| r.action.lets_through()).count();
                out.insert(
                    (
                        true,
                        name.to_string(),
                        format!("{name}: new policy ({count} allowing rules, default {})", n.default_action),
                    ),
                    Arch::ALL.to_vec(),
                );
            }
            Some(o) => compare_policy(name, o, n, &mut out),
        }
    }
    for name in old.names() {
        if new.get(name).is_none() {
            out.insert((false, name.to_string(), format!("{name}: policy removed")), Arch::ALL.to_vec());
        }
    }
    let mut changes: Vec<Change> = out
        .into_iter()
        .map(|((widening, policy, text), mut arches)| {
            arches.sort();
            Change { policy, widening, text, arches }
        })
        .collect();
    changes.sort_by(|a, b| (!a.widening, &a.policy, &a.text).cmp(&(!b.widening, &b.policy, &b.text)));
    changes
}

/// The changes as text, one a line: `+` widens, `-` narrows.
pub fn render(changes: &[Change]) -> String {
    let mut out = String::new();
    if changes.is_empty() {
        out.push_str("no difference in what the policies allow\n");
        return out;
    }
    for c in changes {
        let arches = if c.arches.len() == Arch::ALL.len() {
            String::new()
        } else {
            format!(" [{}]", c.arches.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "))
        };
        let _ = writeln!(out, "{} {}{arches}", if c.widening { "+" } else { "-" }, c.text);
    }
    let widen = changes.iter().filter(|c| c.widening).count();
    let _ = writeln!(out, "\n{widen} change(s) allow more, {} allow less or the same", changes.len() - widen);
    out
}
