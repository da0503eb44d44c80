//! An independent reading of what a policy means, to hold the compiled programs and the
//! exports against: which action the policy's *rules* give a call, computed from the model
//! with `Atom::holds`, without the compiler; and the calls worth asking about.

use airlock_policies::bpf::SeccompData;
use airlock_policies::check::decision_order;
use airlock_policies::model::{Atom, Cmp, Width};
use airlock_policies::{syscalls, Action, Arch, Policy};

/// The action the policy's rules give syscall `nr` with `args` on `arch`: the matching rule
/// whose action decides first (most restrictive), else the default.
pub fn expected(policy: &Policy, arch: Arch, nr: u32, args: &[u64; 6]) -> Action {
    let Some(name) = syscalls::name(arch, nr) else { return policy.default_action };
    policy
        .rules_for(arch)
        .filter(|r| r.syscall == name)
        .filter(|r| r.alternatives(arch).iter().any(|alt| alt.iter().all(|a| a.holds(args[usize::from(a.arg)]))))
        .map(|r| r.action)
        .min_by_key(|a| decision_order(*a))
        .unwrap_or(policy.default_action)
}

fn witness(a: &Atom) -> Option<u64> {
    Some(match a.cmp {
        Cmp::Eq | Cmp::Le | Cmp::Ge => a.value,
        Cmp::Ne | Cmp::Gt => a.value.checked_add(1)?,
        Cmp::Lt => a.value.checked_sub(1)?,
        Cmp::MaskedEq(m) => a.value & m,
    })
}

fn violation(a: &Atom) -> Option<u64> {
    Some(match a.cmp {
        Cmp::Eq => a.value ^ 1,
        Cmp::Ne | Cmp::Lt | Cmp::Gt => a.value,
        Cmp::Le => a.value.checked_add(1)?,
        Cmp::Ge => a.value.checked_sub(1)?,
        Cmp::MaskedEq(m) => {
            if m == 0 {
                return None;
            }
            (a.value & m) ^ (m & m.wrapping_neg())
        }
    })
}

/// Calls worth asking about on `arch`: every syscall number the table knows with all-zero and
/// all-ones arguments, plus, for every rule, arguments that satisfy each alternative, violate
/// each condition in turn, and (for 32-bit conditions) carry garbage in the upper half.
pub fn vectors(policy: &Policy, arch: Arch) -> Vec<(u32, [u64; 6])> {
    let mut out = Vec::new();
    for (nr, _) in syscalls::table(arch) {
        out.push((*nr, [0; 6]));
        out.push((*nr, [u64::MAX; 6]));
    }
    for rule in policy.rules_for(arch) {
        let Some(nr) = syscalls::number(arch, &rule.syscall) else { continue };
        for alt in rule.alternatives(arch) {
            let mut base = [0u64; 6];
            let mut ok = true;
            for a in &alt {
                match witness(a) {
                    Some(v) => base[usize::from(a.arg)] = v,
                    None => ok = false,
                }
            }
            if !ok {
                continue;
            }
            out.push((nr, base));
            let mut high = base;
            for a in alt.iter().filter(|a| a.width == Width::Dword) {
                high[usize::from(a.arg)] |= 0xdead_beef_0000_0000;
            }
            out.push((nr, high));
            for a in &alt {
                if let Some(v) = violation(a) {
                    let mut bad = base;
                    bad[usize::from(a.arg)] = v;
                    out.push((nr, bad));
                }
            }
        }
    }
    out
}

pub fn data(arch: Arch, nr: u32, args: [u64; 6]) -> SeccompData {
    SeccompData::new(arch, nr, args)
}

/// The kernel's choice among the returns of stacked filters: the lowest action value read as
/// a signed number (KILL_PROCESS, KILL_THREAD, TRAP, ERRNO, ..., ALLOW).
pub fn stacked(rets: &[u32]) -> u32 {
    rets.iter().copied().min_by_key(|r| (r & 0xffff_0000) as i32).unwrap_or(0x7fff_0000)
}
