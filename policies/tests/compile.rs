//! The compiled programs and the exports mean exactly what the policies say: every shipped
//! policy compiles for both architectures, deterministically, and its program (run by our BPF
//! evaluator) gives every call the action the rules give it; the seccompiler export, compiled
//! by seccompiler itself and stacked as documented, agrees; the OCI export allows nothing the
//! policy does not.

mod common;

use std::collections::BTreeSet;

use airlock_policies::bpf::evaluate;
use airlock_policies::{embedded, export, syscalls, Action, Arch, PolicySet};
use common::semantics::{data, expected, stacked, vectors};
use serde_json::Value as Json;

#[test]
fn every_shipped_policy_compiles_for_both_arches_byte_identically_twice() {
    let set = embedded();
    assert!(set.names().len() >= 7, "{:?}", set.names());
    let (fresh, findings) = PolicySet::from_sources(airlock_policies::embedded_sources(), "policies");
    assert!(findings.is_empty(), "{findings:?}");
    for name in set.names() {
        for arch in Arch::ALL {
            let a = set.compile(name, arch).expect("compile");
            let b = set.compile(name, arch).expect("compile again");
            let c = fresh.compile(name, arch).expect("compile from a fresh load");
            assert!(a.len() > 10, "{name}/{arch}: {} instructions", a.len());
            assert_eq!(a, b, "{name}/{arch}: two compilations differ");
            assert_eq!(a, c, "{name}/{arch}: compilation of a fresh load differs");
        }
    }
}

#[test]
fn arch_specific_rules_compile_only_where_the_syscall_exists() {
    // `poll` is x86_64-only in the channel group: allowed there; aarch64 has ppoll instead.
    let set = embedded();
    let echo = set.get("echo").expect("echo");
    let poll = echo.rules.iter().find(|r| r.syscall == "poll").expect("poll rule");
    assert_eq!(poll.arches, vec![Arch::X86_64]);
    let x = set.compile("echo", Arch::X86_64).expect("x86_64");
    let nr = syscalls::number(Arch::X86_64, "poll").expect("poll nr");
    let allow = Action::Allow.ret_value();
    assert_eq!(evaluate(&x, &data(Arch::X86_64, nr, [0; 6])).expect("eval"), allow);
    let a = set.compile("echo", Arch::Aarch64).expect("aarch64");
    let ppoll = syscalls::number(Arch::Aarch64, "ppoll").expect("ppoll nr");
    assert_eq!(evaluate(&a, &data(Arch::Aarch64, ppoll, [0; 6])).expect("eval"), allow);
}

#[test]
fn channel_sendto_is_allowed_only_without_a_destination_address() {
    // The channel sends descriptor-less frames with send(2): sendto with no address. A worker
    // that only has the channel cannot name a destination; the TCP workers' own rules widen it.
    channel_call_is_allowed_only_without_an_address("sendto", [3, 0x1000, 64, 0x4000]);
}

#[test]
fn channel_recvfrom_is_allowed_only_without_a_source_address() {
    // The channel reads frames that no descriptor notice announced with recv(2): recvfrom
    // with no address. The TCP workers' own rules widen it for their connections.
    channel_call_is_allowed_only_without_an_address("recvfrom", [3, 0x1000, 65536, 0x20]);
}

/// `syscall` (whose arguments 4 and 5 are an address and its length) with `first` as its first
/// four arguments: allowed without an address for roles that have only the channel group, the
/// default action with one, on both arches; allowed with one for the roles whose own rule
/// widens the group's.
fn channel_call_is_allowed_only_without_an_address(syscall: &str, first: [u64; 4]) {
    let set = embedded();
    let allow = Action::Allow.ret_value();
    let args = |addr: u64, len: u64| [first[0], first[1], first[2], first[3], addr, len];
    let (addr, len) = (0x7fff_0000_1000_u64, 16u64);
    for arch in Arch::ALL {
        let nr = syscalls::number(arch, syscall).expect("syscall nr");
        for name in ["echo", "logic", "auth", "historian"] {
            let prog = set.compile(name, arch).expect("compile");
            let policy = set.get(name).expect("policy");
            assert_eq!(evaluate(&prog, &data(arch, nr, args(0, 0))).expect("eval"), allow, "{name}/{arch}");
            for a in [args(addr, len), args(addr, 0), args(0, len)] {
                assert_eq!(
                    evaluate(&prog, &data(arch, nr, a)).expect("eval"),
                    policy.default_action.ret_value(),
                    "{name}/{arch}: {syscall} with an address {a:x?}"
                );
            }
        }
        for name in ["field", "bridge", "ui", "plcsim"] {
            let prog = set.compile(name, arch).expect("compile");
            assert_eq!(evaluate(&prog, &data(arch, nr, args(addr, len))).expect("eval"), allow, "{name}/{arch}");
        }
    }
}

#[test]
fn compiled_programs_give_every_call_the_action_of_the_rules() {
    let set = embedded();
    let mut checked = 0usize;
    for policy in set.policies() {
        for arch in Arch::ALL {
            let prog = set.compile(&policy.name, arch).expect("compile");
            for (nr, args) in vectors(policy, arch) {
                let got = evaluate(&prog, &data(arch, nr, args)).expect("evaluate");
                let want = expected(policy, arch, nr, &args).ret_value();
                assert_eq!(
                    got,
                    want,
                    "{}/{arch}: syscall {nr} ({:?}) args {args:x?}",
                    policy.name,
                    syscalls::name(arch, nr)
                );
                checked += 1;
            }
            // Another architecture's calls, and x32 numbers, never get through.
            let other = Arch::ALL.into_iter().find(|a| *a != arch).expect("two arches");
            let mut foreign = data(arch, 0, [0; 6]);
            foreign.arch = other.audit_arch();
            assert_eq!(evaluate(&prog, &foreign).expect("eval"), libc::SECCOMP_RET_KILL_PROCESS);
            let read = syscalls::number(arch, "read").expect("read");
            let x32 = data(arch, read | 0x4000_0000, [0; 6]);
            assert_eq!(evaluate(&prog, &x32).expect("eval"), policy.default_action.ret_value());
        }
    }
    assert!(checked > 10_000, "only {checked} calls checked");
}

#[test]
fn no_shipped_worker_policy_allows_a_dangerous_syscall() {
    for policy in embedded().policies() {
        for rule in &policy.rules {
            assert!(
                airlock_policies::risk::classify(rule) != Some(airlock_policies::risk::Risk::Dangerous),
                "{} allows dangerous {} at {}",
                policy.name,
                rule.syscall,
                rule.source
            );
        }
    }
}

#[test]
fn seccompiler_export_compiled_by_seccompiler_and_stacked_equals_our_program() {
    let set = embedded();
    for policy in set.policies() {
        for arch in Arch::ALL {
            let json = export::seccompiler_json(policy, arch).expect("export");
            let text = serde_json::to_string(&json).expect("serialize");
            let target = seccompiler::TargetArch::try_from(arch.name()).expect("target");
            let filters = seccompiler::compile_from_json(text.as_bytes(), target)
                .unwrap_or_else(|e| panic!("{}/{arch}: seccompiler refused our export: {e}", policy.name));
            assert!(filters.contains_key(&policy.name), "{:?}", filters.keys());
            let ours = set.compile(&policy.name, arch).expect("compile");
            for (nr, args) in vectors(policy, arch) {
                let d = data(arch, nr, args);
                let rets: Vec<u32> = filters.values().map(|f| evaluate(f, &d).expect("evaluate export")).collect();
                assert_eq!(
                    stacked(&rets),
                    evaluate(&ours, &d).expect("evaluate ours"),
                    "{}/{arch}: syscall {nr} args {args:x?}",
                    policy.name
                );
            }
        }
    }
}

/// What an OCI runtime (libseccomp) does with a profile, for one call: the most restrictive
/// action among matching entries, else the default. Arguments compare as 64-bit values.
fn oci_decision(profile: &Json, arch: Arch, nr: u32, args: &[u64; 6]) -> u32 {
    let action = |name: &str, errno: Option<u64>| -> u32 {
        match name {
            "SCMP_ACT_ALLOW" => 0x7fff_0000,
            "SCMP_ACT_LOG" => 0x7ffc_0000,
            "SCMP_ACT_ERRNO" => 0x0005_0000 | errno.unwrap_or(1) as u32,
            "SCMP_ACT_TRAP" => 0x0003_0000,
            "SCMP_ACT_KILL_THREAD" | "SCMP_ACT_KILL" => 0,
            "SCMP_ACT_KILL_PROCESS" => 0x8000_0000,
            other => panic!("unexpected action {other}"),
        }
    };
    let mut rets = Vec::new();
    for entry in profile["syscalls"].as_array().expect("syscalls") {
        let names = entry["names"].as_array().expect("names");
        if !names.iter().any(|n| n.as_str().and_then(|n| syscalls::number(arch, n)) == Some(nr)) {
            continue;
        }
        let holds = entry["args"].as_array().map(|list| {
            list.iter().all(|c| {
                let i = c["index"].as_u64().expect("index") as usize;
                let v = c["value"].as_u64().expect("value");
                let v2 = c["valueTwo"].as_u64().unwrap_or(0);
                let a = args[i];
                match c["op"].as_str().expect("op") {
                    "SCMP_CMP_EQ" => a == v,
                    "SCMP_CMP_NE" => a != v,
                    "SCMP_CMP_LT" => a < v,
                    "SCMP_CMP_LE" => a <= v,
                    "SCMP_CMP_GT" => a > v,
                    "SCMP_CMP_GE" => a >= v,
                    "SCMP_CMP_MASKED_EQ" => a & v == v2,
                    other => panic!("unexpected op {other}"),
                }
            })
        });
        if holds.unwrap_or(true) {
            rets.push(action(entry["action"].as_str().expect("action"), entry["errnoRet"].as_u64()));
        }
    }
    if rets.is_empty() {
        action(profile["defaultAction"].as_str().expect("defaultAction"), profile["defaultErrnoRet"].as_u64())
    } else {
        stacked(&rets)
    }
}

fn assert_oci_allows_nothing_more(set: &PolicySet, name: &str, groups: &[String]) {
    let policy = set.with_groups(name, groups).expect("policy with groups");
    let profile = export::oci(&policy, &Arch::ALL).expect("export");
    assert_eq!(profile["defaultAction"], export::oci_action(policy.default_action));
    let arches: Vec<&str> =
        profile["architectures"].as_array().expect("arches").iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(arches, ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"]);
    // Every name the profile mentions is a syscall the policy has a rule for.
    let ruled: BTreeSet<&str> = policy.rules.iter().map(|r| r.syscall.as_str()).collect();
    for entry in profile["syscalls"].as_array().expect("syscalls") {
        for n in entry["names"].as_array().expect("names") {
            let n = n.as_str().expect("name");
            assert!(ruled.contains(n), "{name}: profile names {n}, which no rule of the policy names");
        }
    }
    for arch in Arch::ALL {
        let prog = airlock_policies::compile::compile(&policy.name, policy.default_action, &policy.rules, arch)
            .expect("compile");
        for (nr, args) in vectors(&policy, arch) {
            let ours = evaluate(&prog, &data(arch, nr, args)).expect("evaluate");
            let oci = oci_decision(&profile, arch, nr, &args);
            let allow = Action::Allow.ret_value();
            if oci == allow {
                assert_eq!(ours, allow, "{name}/{arch}: OCI allows syscall {nr} args {args:x?}, the policy does not");
            }
            // Where no argument has bits in its upper half (which a 32-bit condition ignores
            // and OCI's 64-bit comparison does not), they agree exactly.
            if args.iter().all(|a| *a >> 32 == 0) {
                assert_eq!(oci, ours, "{name}/{arch}: syscall {nr} args {args:x?}");
            }
        }
    }
}

#[test]
fn oci_export_of_every_shipped_policy_allows_nothing_the_policy_does_not() {
    let set = embedded();
    for name in set.names() {
        assert_oci_allows_nothing_more(set, name, &[]);
    }
}

#[test]
fn oci_export_with_the_start_up_group_allows_nothing_beyond_policy_and_group() {
    assert_oci_allows_nothing_more(embedded(), "echo", &["common/oci-start.toml".to_string()]);
}
