//! Our syscall tables agree with libseccomp's resolver (`scmp_sys_resolver`, Debian package
//! `seccomp`), for every name any shipped policy or the dangerous list uses, on both
//! architectures, and for every entry of both tables. Skipped, saying so, where the tool is
//! absent (CI installs it).

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use airlock_policies::{embedded, risk, syscalls, Arch};

fn resolver() -> Option<&'static str> {
    let ok = Command::new("scmp_sys_resolver").arg("read").output().map(|o| o.status.success()).unwrap_or(false);
    if ok {
        Some("scmp_sys_resolver")
    } else {
        common::say("skipped: scmp_sys_resolver not found (install the Debian package `seccomp`)");
        None
    }
}

/// libseccomp's number for `name` on `arch`; `None` where it says the syscall does not exist
/// there (it answers with a negative pseudo-syscall number).
fn resolve(tool: &str, arch: Arch, name: &str) -> Option<u32> {
    let out = Command::new(tool).args(["-a", arch.name(), name]).output().expect("run scmp_sys_resolver");
    let text = String::from_utf8_lossy(&out.stdout);
    let n: i64 = text.trim().parse().unwrap_or_else(|_| panic!("scmp_sys_resolver said {text:?} for {name}"));
    u32::try_from(n).ok()
}

#[test]
fn every_name_the_policies_use_has_libseccomps_number_on_both_arches() {
    let Some(tool) = resolver() else { return };
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for file in embedded().files() {
        names.extend(file.rules.iter().map(|r| r.syscall.as_str()));
    }
    names.extend(risk::DANGEROUS.iter().map(|(n, _)| *n));
    names.extend(risk::SENSITIVE.iter().copied());
    assert!(names.len() > 100, "{}", names.len());
    let mut wrong = Vec::new();
    for name in &names {
        for arch in Arch::ALL {
            let ours = syscalls::number(arch, name);
            let theirs = resolve(tool, arch, name);
            if ours != theirs {
                wrong.push(format!("{name} on {arch}: ours {ours:?}, libseccomp {theirs:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_table_entry_is_libseccomps_name_for_its_number() {
    let Some(tool) = resolver() else { return };
    for arch in Arch::ALL {
        let table = syscalls::table(arch);
        assert!(table.len() > 250, "{arch}: {} entries", table.len());
        assert!(table.windows(2).all(|w| w[0].0 < w[1].0), "{arch} table not sorted");
        for (nr, name) in table {
            let out = Command::new(tool).args(["-a", arch.name(), &nr.to_string()]).output().expect("run");
            let theirs = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(&theirs, name, "{arch} nr {nr}");
            assert_eq!(syscalls::name(arch, *nr), Some(*name));
        }
    }
}
