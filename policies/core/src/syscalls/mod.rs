//! Syscall names and numbers for each architecture.
//!
//! seccompiler keeps its table private, so we keep our own, generated once from libseccomp's
//! (`generate.sh` beside this file runs `scmp_sys_resolver`), and a test checks every name a
//! policy uses against the resolver again. Policies only ever name syscalls; numbers come from
//! here and nowhere else.

use crate::arch::Arch;

mod aarch64;
mod x86_64;

/// `(number, name)` of every syscall of `arch`, sorted by number.
pub fn table(arch: Arch) -> &'static [(u32, &'static str)] {
    match arch {
        Arch::X86_64 => x86_64::TABLE,
        Arch::Aarch64 => aarch64::TABLE,
    }
}

/// The number of syscall `name` on `arch`, or `None` where it does not exist (e.g. `open` on
/// aarch64).
pub fn number(arch: Arch, name: &str) -> Option<u32> {
    table(arch).iter().find(|(_, n)| *n == name).map(|(nr, _)| *nr)
}

/// The name of syscall number `nr` on `arch`.
pub fn name(arch: Arch, nr: u32) -> Option<&'static str> {
    let t = table(arch);
    t.binary_search_by_key(&nr, |(n, _)| *n).ok().map(|i| t[i].1)
}

/// The architectures on which `name` exists.
pub fn arches_of(name: &str) -> Vec<Arch> {
    Arch::ALL.into_iter().filter(|a| number(*a, name).is_some()).collect()
}
