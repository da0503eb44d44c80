//! `airlock-policies`: seccomp policies as audited data, their compiler, and the auditor's tools.
//!
//! Policies are TOML files in this crate's directory (one per worker role, plus include-only
//! groups under `common/`); `build.rs` parses, lints and compiles every one of them, so a broken
//! policy breaks the build, and embeds exactly those sources in the binary ([`embedded`]).
//! The model, checks and compiler are `airlock-policy-core` (re-exported here), which
//! `build.rs` uses as an ordinary build-dependency. Auditors use `airlock policy` ([`cli`]) to check, audit, diff, export,
//! disassemble, live-verify and learn policies. See `docs/policies.md`.
//!
//! This crate decides nothing about *when* a worker is confined, and never spawns workers.
//! Unsafe code lives only in `sys`.
#![deny(unsafe_code)]

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("airlock-policies supports x86_64 and aarch64 only");

pub mod audit;
pub mod cli;
pub mod diff;
pub mod export;
pub mod learn;
mod sys;
pub mod verify;

// The model, checks and compiler, under the paths the auditor's modules use.
pub use airlock_policy_core::*;

use std::sync::OnceLock;

pub use verify::{matching_policy, read_installed_filters, verify_pid};

mod embedded_sources {
    // Written by build.rs: `SOURCES: &[(&str, &str)]`, the (key, text) of every policy file the
    // build checked, each text an `include_str!` of the file.
    include!(concat!(env!("OUT_DIR"), "/embedded_policies.rs"));
}

/// The policies compiled into this binary: exactly the files `build.rs` checked.
pub fn embedded() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        // build.rs refused to build with any finding, so this set is complete; were it not, the
        // broken files would be missing from it, and asking for them fails with FindPolicy.
        let (set, findings) = PolicySet::from_sources(embedded_sources::SOURCES, "policies");
        debug_assert!(findings.is_empty(), "embedded policies have findings: {findings:?}");
        set
    })
}

/// The embedded sources as `(key, text)`, e.g. `("common/channel.toml", "...")`.
pub fn embedded_sources() -> &'static [(&'static str, &'static str)] {
    embedded_sources::SOURCES
}
