//! `airlock policy export`: a policy as an OCI runtime-spec seccomp profile (what podman, runc,
//! crun and Docker read), or as Firecracker/seccompiler JSON.
//!
//! An export never allows more than the policy: where a format cannot say exactly what the
//! policy says, the export says something stricter (a 32-bit `<` of an allowing rule becomes a
//! 64-bit `<`) or refuses with the reason (a 32-bit `!=`, two conditions on one argument, a rule
//! limited to one architecture of a syscall both have). A 32-bit `==` is exact in OCI as
//! `SCMP_CMP_MASKED_EQ` with the mask `0xffffffff`, and an allowing 32-bit `!=` as 32 entries,
//! one per bit that can differ. OCI runtimes install the profile before they exec the
//! worker, so the profile must also allow the exec and the program's start-up: `--include` adds
//! groups such as `common/oci-start.toml` for that (see docs/policies.md).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value as Json};

use crate::arch::Arch;
use crate::error::PolicyError;
use crate::model::{Action, Atom, Cmp, Policy, Rule, Width};
use crate::syscalls;

fn err(policy: &Policy, reason: String) -> PolicyError {
    PolicyError::Export { policy: policy.name.clone(), reason }
}

/// The OCI / libseccomp name of an action.
pub fn oci_action(a: Action) -> &'static str {
    match a {
        Action::Allow => "SCMP_ACT_ALLOW",
        Action::Log => "SCMP_ACT_LOG",
        Action::Errno(_) => "SCMP_ACT_ERRNO",
        Action::Trap => "SCMP_ACT_TRAP",
        Action::KillThread => "SCMP_ACT_KILL_THREAD",
        Action::KillProcess => "SCMP_ACT_KILL_PROCESS",
    }
}

fn oci_arg(policy: &Policy, rule: &Rule, a: &Atom) -> Result<Json, PolicyError> {
    const LOW32: u64 = 0xffff_ffff;
    let lets_through = rule.action.lets_through();
    let (op, value, value_two) = match (a.cmp, a.width) {
        (Cmp::Eq, Width::Qword) => ("SCMP_CMP_EQ", a.value, 0),
        (Cmp::Ne, Width::Qword) => ("SCMP_CMP_NE", a.value, 0),
        (Cmp::Lt, Width::Qword) => ("SCMP_CMP_LT", a.value, 0),
        (Cmp::Le, Width::Qword) => ("SCMP_CMP_LE", a.value, 0),
        (Cmp::Gt, Width::Qword) => ("SCMP_CMP_GT", a.value, 0),
        (Cmp::Ge, Width::Qword) => ("SCMP_CMP_GE", a.value, 0),
        (Cmp::MaskedEq(mask), Width::Qword) => ("SCMP_CMP_MASKED_EQ", mask, a.value),
        // 32-bit comparisons: OCI compares all 64 bits, so mask the upper half away (exact).
        (Cmp::Eq, Width::Dword) => ("SCMP_CMP_MASKED_EQ", LOW32, a.value & LOW32),
        (Cmp::MaskedEq(mask), Width::Dword) => ("SCMP_CMP_MASKED_EQ", mask & LOW32, a.value & LOW32),
        // A 64-bit `<` of a 32-bit value is stricter: fine for a rule that allows, wrong for
        // one that refuses (it would refuse less).
        (Cmp::Lt, Width::Dword) if lets_through => ("SCMP_CMP_LT", a.value, 0),
        (Cmp::Le, Width::Dword) if lets_through => ("SCMP_CMP_LE", a.value, 0),
        (cmp, Width::Dword) => {
            return Err(err(
                policy,
                format!(
                    "rule for `{}` ({}) compares 32 bits with {cmp:?}, which OCI's 64-bit comparisons cannot \
                     express without {} more",
                    rule.syscall,
                    rule.source,
                    if lets_through { "allowing" } else { "refusing" }
                ),
            ))
        }
    };
    Ok(json!({ "index": a.arg, "value": value, "valueTwo": value_two, "op": op }))
}

/// Rewrites a 32-bit `!=` (which OCI cannot compare) exactly, as 32 alternatives: `(u32)arg != V`
/// holds when some bit of the low half differs from V's, and "bit i of arg is not bit i of V" is
/// one `SCMP_CMP_MASKED_EQ` each. Returns the alternative unchanged when it has no such atom.
fn split_dword_ne(policy: &Policy, rule: &Rule, alt: &[Atom]) -> Result<Vec<(Vec<Atom>, String)>, PolicyError> {
    let ne: Vec<usize> = (0..alt.len()).filter(|i| alt[*i].cmp == Cmp::Ne && alt[*i].width == Width::Dword).collect();
    match ne.as_slice() {
        [] => Ok(vec![(alt.to_vec(), String::new())]),
        [i] => {
            if !rule.action.lets_through() {
                return Err(err(
                    policy,
                    format!(
                        "rule for `{}` ({}) refuses on a 32-bit `!=`, which OCI cannot express",
                        rule.syscall, rule.source
                    ),
                ));
            }
            let a = alt[*i];
            Ok((0..32)
                .map(|bit| {
                    let mask = 1u64 << bit;
                    let mut variant = alt.to_vec();
                    variant[*i] =
                        Atom { arg: a.arg, width: Width::Qword, cmp: Cmp::MaskedEq(mask), value: !a.value & mask };
                    (variant, format!(" [(u32)arg{} != {:#x}: bit {bit} differs]", a.arg, a.value))
                })
                .collect())
        }
        _ => Err(err(
            policy,
            format!(
                "rule for `{}` ({}) has more than one 32-bit `!=`; OCI cannot express it",
                rule.syscall, rule.source
            ),
        )),
    }
}

/// `policy` as an OCI runtime-spec seccomp profile covering `arches`.
pub fn oci(policy: &Policy, arches: &[Arch]) -> Result<Json, PolicyError> {
    if arches.is_empty() {
        return Err(err(policy, "no architecture to export for".into()));
    }
    let mut syscalls_out: Vec<Json> = Vec::new();
    for rule in &policy.rules {
        let covered: Vec<Arch> = arches.iter().copied().filter(|a| rule.applies_to(*a)).collect();
        if covered.is_empty() {
            continue;
        }
        // OCI has no per-rule architectures: a name that exists on an architecture the rule
        // excludes would be allowed there too.
        for a in arches {
            if !rule.applies_to(*a) && syscalls::number(*a, &rule.syscall).is_some() {
                return Err(err(
                    policy,
                    format!(
                        "rule for `{}` ({}) applies only to {}, but the syscall exists on {a}: export with --arch",
                        rule.syscall,
                        rule.source,
                        rule.arches.iter().map(|x| x.name()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let alts = rule.alternatives(covered[0]);
        if covered.iter().any(|a| rule.alternatives(*a) != alts) {
            return Err(err(
                policy,
                format!(
                    "rule for `{}` ({}) has values that differ between architectures: export with --arch",
                    rule.syscall, rule.source
                ),
            ));
        }
        for alt in &alts {
            let mut seen = [false; 6];
            for a in alt {
                if std::mem::replace(&mut seen[usize::from(a.arg)], true) {
                    return Err(err(
                        policy,
                        format!(
                            "rule for `{}` ({}) has two conditions on argument {}; OCI runtimes would OR them",
                            rule.syscall, rule.source, a.arg
                        ),
                    ));
                }
            }
            for (variant, note) in split_dword_ne(policy, rule, alt)? {
                let mut entry = Map::new();
                entry.insert("names".into(), json!([rule.syscall]));
                entry.insert("action".into(), json!(oci_action(rule.action)));
                if let Action::Errno(e) = rule.action {
                    entry.insert("errnoRet".into(), json!(e));
                }
                if !variant.is_empty() {
                    let args = variant.iter().map(|a| oci_arg(policy, rule, a)).collect::<Result<Vec<_>, _>>()?;
                    entry.insert("args".into(), Json::Array(args));
                }
                entry.insert("comment".into(), json!(format!("{}{note} ({})", rule.reason.trim(), rule.source)));
                syscalls_out.push(Json::Object(entry));
            }
        }
    }
    let mut profile = Map::new();
    profile.insert("defaultAction".into(), json!(oci_action(policy.default_action)));
    if let Action::Errno(e) = policy.default_action {
        profile.insert("defaultErrnoRet".into(), json!(e));
    }
    profile.insert("architectures".into(), json!(arches.iter().map(|a| a.oci_name()).collect::<Vec<_>>()));
    profile.insert("syscalls".into(), Json::Array(syscalls_out));
    Ok(Json::Object(profile))
}

fn seccompiler_action(a: Action) -> Json {
    match a {
        Action::Allow => json!("allow"),
        Action::Log => json!("log"),
        Action::Errno(e) => json!({ "errno": e }),
        Action::Trap => json!("trap"),
        Action::KillThread => json!("kill_thread"),
        Action::KillProcess => json!("kill_process"),
    }
}

fn seccompiler_rules(rules: &[&Rule], arch: Arch) -> Vec<Json> {
    // Per syscall: one unconditional entry, or one entry per alternative. (seccompiler's JSON
    // frontend drops an unconditional entry when the same syscall also has conditional ones.)
    let mut by_name: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
    for r in rules {
        by_name.entry(r.syscall.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (name, rs) in by_name {
        if let Some(r) = rs.iter().find(|r| r.conditions.is_empty()) {
            out.push(json!({ "syscall": name, "comment": format!("{} ({})", r.reason.trim(), r.source) }));
            continue;
        }
        for r in rs {
            for alt in r.alternatives(arch) {
                let args: Vec<Json> = alt
                    .iter()
                    .map(|a| {
                        let op = match a.cmp {
                            Cmp::Eq => json!("eq"),
                            Cmp::Ne => json!("ne"),
                            Cmp::Lt => json!("lt"),
                            Cmp::Le => json!("le"),
                            Cmp::Gt => json!("gt"),
                            Cmp::Ge => json!("ge"),
                            Cmp::MaskedEq(m) => json!({ "masked_eq": m }),
                        };
                        let ty = match a.width {
                            Width::Dword => "dword",
                            Width::Qword => "qword",
                        };
                        json!({ "index": a.arg, "type": ty, "op": op, "val": a.value })
                    })
                    .collect();
                out.push(json!({
                    "syscall": name,
                    "args": args,
                    "comment": format!("{} ({})", r.reason.trim(), r.source),
                }));
            }
        }
    }
    out
}

/// `policy` for `arch` as seccompiler (Firecracker) JSON: a map of filters to install together.
///
/// seccompiler gives all rules of a filter one action, so the policy becomes one filter named
/// after it (the allowing rules, with the policy's default action) plus one filter per other
/// action, named `<policy>/<action>`, whose default is `allow`. Installed together, the kernel
/// takes the most restrictive answer, which is exactly what our compiled program does.
pub fn seccompiler_json(policy: &Policy, arch: Arch) -> Result<Json, PolicyError> {
    let rules: Vec<&Rule> = policy.rules_for(arch).collect();
    let mut main: Vec<&Rule> = rules.iter().copied().filter(|r| r.action == Action::Allow).collect();
    // A refusing rule softer than the default must get past the main filter to be heard.
    main.extend(
        rules
            .iter()
            .copied()
            .filter(|r| r.action != Action::Allow && r.action.precedence() < policy.default_action.precedence()),
    );
    let mut out = Map::new();
    out.insert(
        policy.name.clone(),
        json!({
            "default_action": seccompiler_action(policy.default_action),
            "filter_action": "allow",
            "filter": seccompiler_rules(&main, arch),
        }),
    );
    let mut actions: Vec<Action> = rules.iter().map(|r| r.action).filter(|a| *a != Action::Allow).collect();
    actions.sort();
    actions.dedup();
    for action in actions {
        let these: Vec<&Rule> = rules.iter().copied().filter(|r| r.action == action).collect();
        let label = action.to_string().replace(' ', "-");
        out.insert(
            format!("{}/{label}", policy.name),
            json!({
                "default_action": "allow",
                "filter_action": seccompiler_action(action),
                "filter": seccompiler_rules(&these, arch),
            }),
        );
    }
    Ok(Json::Object(out))
}
