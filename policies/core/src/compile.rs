//! Compiles resolved rules to a seccomp BPF program with seccompiler.
//!
//! seccompiler's [`SeccompFilter`] has one action for every rule it holds, while a policy may
//! mix actions (allow most calls, `errno ENOSYS` for `clone3`, `trap` for another). So the rules
//! are grouped by action and each group becomes one seccompiler filter, compiled on its own
//! with a private sentinel as its "no match" action. The programs are then linked: groups run
//! from the most restrictive action to the least (the kernel's own precedence for stacked
//! filters), each sentinel `ret` becomes a jump to the next group, and the last group falls
//! through to one `ret` of the policy's default action. Only the first group keeps
//! seccompiler's architecture check.
//!
//! Output is deterministic and independent of rule order and file layout: syscalls, actions and
//! condition alternatives are all kept in sorted maps and sets.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    sock_filter, BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::arch::Arch;
use crate::error::PolicyError;
use crate::model::{Action, Atom, Cmp, Rule, Width};
use crate::syscalls;

/// The kernel's limit on a classic BPF program (`BPF_MAXINSNS`).
pub const BPF_MAXINSNS: usize = 4096;

/// `SECCOMP_RET_TRACE | 0xa1a1`: the "no rule matched" return of each group before linking.
/// Policies cannot use `trace`, so it never occurs otherwise.
const LINK_SENTINEL: u32 = 0x7ff0_a1a1;

const BPF_RET_K: u16 = 0x06;
const BPF_JMP_JA: u16 = 0x05;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const ARCH_PROLOGUE_LEN: usize = 3;

enum Chain {
    Always,
    Alternatives(BTreeSet<Vec<Atom>>),
}

/// Rules grouped by action, most restrictive first: `(order key) -> (action, syscall -> chain)`.
type Groups = BTreeMap<(Reverse<u8>, u32), (Action, BTreeMap<u32, Chain>)>;

fn condition(a: &Atom) -> Result<SeccompCondition, seccompiler::BackendError> {
    let len = match a.width {
        Width::Dword => SeccompCmpArgLen::Dword,
        Width::Qword => SeccompCmpArgLen::Qword,
    };
    let op = match a.cmp {
        Cmp::Eq => SeccompCmpOp::Eq,
        Cmp::Ne => SeccompCmpOp::Ne,
        Cmp::Lt => SeccompCmpOp::Lt,
        Cmp::Le => SeccompCmpOp::Le,
        Cmp::Gt => SeccompCmpOp::Gt,
        Cmp::Ge => SeccompCmpOp::Ge,
        Cmp::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    SeccompCondition::new(a.arg, len, op, a.value)
}

/// Compiles `rules` (those that apply to `arch`) with `default` for everything else.
/// `policy` only names the policy in errors.
pub fn compile(policy: &str, default: Action, rules: &[Rule], arch: Arch) -> Result<BpfProgram, PolicyError> {
    let backend = |source| PolicyError::Compile { policy: policy.to_string(), arch, source };
    // Most restrictive action first; errno groups ordered by errno for determinism.
    let mut groups: Groups = BTreeMap::new();
    for rule in rules.iter().filter(|r| r.applies_to(arch)) {
        let nr = syscalls::number(arch, &rule.syscall).ok_or_else(|| PolicyError::ResolveSyscall {
            policy: policy.to_string(),
            syscall: rule.syscall.clone(),
            arch,
        })?;
        let errno = match rule.action {
            Action::Errno(e) => e,
            _ => 0,
        };
        let (_, chains) =
            groups.entry((Reverse(rule.action.precedence()), errno)).or_insert_with(|| (rule.action, BTreeMap::new()));
        let alts = rule.alternatives(arch);
        let chain = chains.entry(nr).or_insert_with(|| Chain::Alternatives(BTreeSet::new()));
        if alts.iter().any(Vec::is_empty) {
            *chain = Chain::Always;
        } else if let Chain::Alternatives(set) = chain {
            set.extend(alts);
        }
    }
    let mut program: BpfProgram = Vec::new();
    let mut group_ranges: Vec<(usize, usize)> = Vec::new();
    for (action, chains) in groups.into_values() {
        let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (nr, chain) in chains {
            let rules = match chain {
                Chain::Always => Vec::new(),
                Chain::Alternatives(alts) => alts
                    .iter()
                    .map(|alt| {
                        let conds = alt.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(backend)?,
            };
            map.insert(i64::from(nr), rules);
        }
        let filter = SeccompFilter::new(
            map,
            seccompiler::SeccompAction::Trace(LINK_SENTINEL & 0xffff),
            action.seccomp(),
            arch.target(),
        )
        .map_err(backend)?;
        let mut part: BpfProgram = filter.try_into().map_err(backend)?;
        if !program.is_empty() {
            // Every group after the first drops seccompiler's arch check: the first did it.
            if part.len() < ARCH_PROLOGUE_LEN || !is_arch_prologue(&part[..ARCH_PROLOGUE_LEN], arch) {
                return Err(link_error(policy, arch, "seccompiler output does not start with the arch check"));
            }
            part.drain(..ARCH_PROLOGUE_LEN);
        }
        let start = program.len();
        program.extend(part);
        group_ranges.push((start, program.len()));
    }
    if program.is_empty() {
        // No rules: check the architecture, then refuse everything.
        program.extend([
            stmt(BPF_LD_W_ABS, 4),
            jump(BPF_JMP_JEQ_K, arch.audit_arch(), 1, 0),
            stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        ]);
    }
    program.push(stmt(BPF_RET_K, default.ret_value()));
    for &(start, stop) in &group_ranges {
        for (pc, ins) in program.iter_mut().enumerate().take(stop).skip(start) {
            if ins.code == BPF_RET_K && ins.k == LINK_SENTINEL {
                let offset =
                    u32::try_from(stop - (pc + 1)).map_err(|_| link_error(policy, arch, "jump offset out of range"))?;
                *ins = stmt(BPF_JMP_JA, offset);
            }
        }
    }
    if program.iter().any(|i| i.code == BPF_RET_K && i.k == LINK_SENTINEL) {
        return Err(link_error(policy, arch, "unlinked group return left in the program"));
    }
    if program.len() > BPF_MAXINSNS {
        return Err(link_error(
            policy,
            arch,
            &format!("{} instructions, more than the kernel's limit of {BPF_MAXINSNS}", program.len()),
        ));
    }
    Ok(program)
}

fn link_error(policy: &str, arch: Arch, reason: &str) -> PolicyError {
    PolicyError::Link { policy: policy.to_string(), arch, reason: reason.to_string() }
}

fn is_arch_prologue(p: &[sock_filter], arch: Arch) -> bool {
    p[0].code == BPF_LD_W_ABS
        && p[0].k == 4
        && p[1].code == BPF_JMP_JEQ_K
        && p[1].k == arch.audit_arch()
        && p[2].code == BPF_RET_K
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::{evaluate, SeccompData};
    use crate::model::Source;

    fn rule(syscall: &str, action: Action) -> Rule {
        Rule {
            syscall: syscall.into(),
            reason: "r".into(),
            action,
            conditions: Vec::new(),
            arches: Arch::ALL.to_vec(),
            arches_explicit: false,
            dangerous: None,
            widens: false,
            source: Source { file: "f".into(), key: "f".into(), line: 1 },
        }
    }

    #[test]
    fn a_policy_without_rules_checks_the_arch_then_refuses_everything() {
        let p = compile("empty", Action::Trap, &[], Arch::X86_64).expect("compile");
        assert_eq!(p.len(), 4);
        let d = SeccompData::new(Arch::X86_64, 0, [0; 6]);
        assert_eq!(evaluate(&p, &d).expect("eval"), libc::SECCOMP_RET_TRAP);
    }

    #[test]
    fn the_most_restrictive_matching_rule_decides_and_rule_order_does_not_matter() {
        let rules = vec![rule("getpid", Action::Allow), rule("getpid", Action::Errno(1)), rule("gettid", Action::Log)];
        let mut reversed = rules.clone();
        reversed.reverse();
        for arch in Arch::ALL {
            let a = compile("p", Action::KillProcess, &rules, arch).expect("compile");
            let b = compile("p", Action::KillProcess, &reversed, arch).expect("compile");
            assert_eq!(a, b, "{arch}: order changed the program");
            let nr = |n| crate::syscalls::number(arch, n).expect("nr");
            let eval = |n| evaluate(&a, &SeccompData::new(arch, nr(n), [0; 6])).expect("eval");
            assert_eq!(eval("getpid"), 0x0005_0001);
            assert_eq!(eval("gettid"), libc::SECCOMP_RET_LOG);
            assert_eq!(eval("getppid"), libc::SECCOMP_RET_KILL_PROCESS);
        }
    }

    #[test]
    fn an_unknown_name_is_a_resolve_error() {
        let r = compile("p", Action::KillProcess, &[rule("open", Action::Allow)], Arch::Aarch64);
        assert!(matches!(r, Err(PolicyError::ResolveSyscall { .. })), "{r:?}");
    }
}
