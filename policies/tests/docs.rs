//! `docs/policies.md` against the shipped policies, so that its table of them cannot go stale:
//! every worker policy has a row, and its row gives the default action, exactly the groups it
//! includes, and every syscall its own rules name (not those of its groups).

use std::collections::BTreeSet;

use airlock_policies::embedded;

const DOC: &str = include_str!("../../docs/policies.md");

/// The rows of the table under "The shipped policies", each split into its trimmed cells.
fn shipped_policy_rows() -> Vec<Vec<&'static str>> {
    let section = DOC.split("\n## The shipped policies\n").nth(1).expect("the section 'The shipped policies'");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

/// The policy names of a row's first cell (`` `field`, `plcsim` ``).
fn names(cell: &str) -> impl Iterator<Item = &str> {
    cell.split(", ").map(|n| n.trim_matches('`'))
}

#[test]
fn shipped_policies_table_gives_each_policys_default_includes_and_own_syscalls() {
    let rows = shipped_policy_rows();
    let set = embedded();
    let mut wrong = Vec::new();
    for row in &rows {
        assert_eq!(row.len(), 4, "not a 4-column row: {row:?}");
        for name in names(row[0]).filter(|n| set.get(n).is_none()) {
            wrong.push(format!("the table has a row for `{name}`, which is not a shipped policy"));
        }
    }
    for policy in set.policies() {
        let Some(row) = rows.iter().find(|r| names(r[0]).any(|n| n == policy.name)) else {
            wrong.push(format!("{}: no row", policy.name));
            continue;
        };
        let (default, includes, own) = (row[1], row[2], row[3]);
        if default != format!("`{}`", policy.default_action) {
            wrong.push(format!("{}: default {default}, the policy says {}", policy.name, policy.default_action));
        }
        let listed: BTreeSet<&str> = includes.split(", ").collect();
        let actual: BTreeSet<&str> = policy
            .includes
            .iter()
            .map(|k| k.strip_prefix("common/").unwrap_or(k).strip_suffix(".toml").unwrap_or(k))
            .collect();
        if listed != actual {
            wrong.push(format!("{}: includes {listed:?}, the policy includes {actual:?}", policy.name));
        }
        for rule in policy.rules.iter().filter(|r| r.source.key == policy.key) {
            if !own.contains(&format!("`{}`", rule.syscall)) {
                wrong.push(format!("{}: own rules do not mention `{}` ({})", policy.name, rule.syscall, rule.source));
            }
        }
    }
    assert!(wrong.is_empty(), "docs/policies.md, 'The shipped policies', is stale:\n{}", wrong.join("\n"));
}
