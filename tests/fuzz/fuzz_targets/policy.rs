//! Policy files: one fuzzed file beside the shipped include-only groups (parsed once), loaded,
//! checked and compiled for both architectures. Whatever compiles must give every probed call the action
//! the policy's rules give it, in the project's BPF evaluator.
#![no_main]

use airlock_policy_core::bpf::{evaluate, SeccompData};
use airlock_policy_core::check::decision_order;
use airlock_policy_core::{syscalls, Action, Arch, Policy, PolicySet};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const GROUPS: &[(&str, &str)] = &[
    ("common/channel.toml", include_str!("../../../policies/common/channel.toml")),
    ("common/no-files.toml", include_str!("../../../policies/common/no-files.toml")),
    ("common/oci-start.toml", include_str!("../../../policies/common/oci-start.toml")),
    ("common/rust-runtime.toml", include_str!("../../../policies/common/rust-runtime.toml")),
    ("common/tcp-server.toml", include_str!("../../../policies/common/tcp-server.toml")),
];

/// The action the rules give a call (the test suite's independent reading, `semantics.rs`).
fn expected(policy: &Policy, arch: Arch, nr: u32, args: &[u64; 6]) -> Action {
    let Some(name) = syscalls::name(arch, nr) else { return policy.default_action };
    policy
        .rules_for(arch)
        .filter(|r| r.syscall == name)
        .filter(|r| r.alternatives(arch).iter().any(|alt| alt.iter().all(|a| a.holds(args[usize::from(a.arg)]))))
        .map(|r| r.action)
        .min_by_key(|a| decision_order(*a))
        .unwrap_or(policy.default_action)
}

fuzz_target!(|data: &[u8]| {
    // The shipped groups never change: parsed once, not once per input (13.7 KB of TOML, most
    // of the parsing an input cost). The fuzzed file is parsed, resolved against them, checked and
    // compiled as `PolicySet::from_sources` would (a test in airlock-policy-core holds the
    // two loads equal).
    static BASE: OnceLock<PolicySet> = OnceLock::new();
    let base = BASE.get_or_init(|| PolicySet::from_sources(GROUPS, "policies").0);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (set, _findings) = base.with_sources(&[("fuzz.toml", text)], "policies");
    let _ = set.check();
    let Some(policy) = set.get("fuzz").cloned() else { return };
    for arch in Arch::ALL {
        let Ok(prog) = set.compile("fuzz", arch) else { continue };
        // Calls worth asking about: each rule's syscall with arguments from its conditions.
        let mut calls: Vec<(u32, [u64; 6])> = Vec::new();
        for rule in policy.rules_for(arch).take(32) {
            let Some(nr) = syscalls::number(arch, &rule.syscall) else { continue };
            calls.push((nr, [0; 6]));
            calls.push((nr, [u64::MAX; 6]));
            for alt in rule.alternatives(arch).iter().take(8) {
                let mut args = [0u64; 6];
                for a in alt {
                    args[usize::from(a.arg)] = a.value;
                }
                calls.push((nr, args));
                for a in alt {
                    let mut b = args;
                    b[usize::from(a.arg)] = a.value.wrapping_add(1);
                    calls.push((nr, b));
                    b[usize::from(a.arg)] = a.value | 0xdead_beef_0000_0000;
                    calls.push((nr, b));
                }
            }
        }
        for (nr, args) in calls {
            let got = evaluate(&prog, &SeccompData::new(arch, nr, args)).expect("our own program evaluates");
            let want = expected(&policy, arch, nr, &args).ret_value();
            assert_eq!(got, want, "{arch} syscall {nr} args {args:x?}");
        }
    }
});
