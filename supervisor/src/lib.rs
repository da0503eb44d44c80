//! `airlock-supervisor`: the privileged layer. It reads the configuration, probes what the
//! host allows, spawns every worker into its confinement, verifies that confinement from
//! outside before routing any work, restarts crashed workers, and answers the admin CLI.
//!
//! Modules: [`config`] (schema and validation), [`spawn`] (namespaces, ids, hand-off,
//! verification order), [`verify`] (`/proc/PID/status` and the installed filter),
//! [`runtime`] (event loop, routing, lifecycle, control socket), [`notify`] (sd_notify),
//! [`sys`] (every raw syscall, and so every `// SAFETY:` block, lives there).
#![deny(unsafe_code)]

pub mod cgroup;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod journal;
pub mod notify;
pub mod permits;
pub mod runtime;
pub mod spawn;
pub mod sys;
pub mod verify;

/// Names of the policies compiled into this build.
pub fn known_policies() -> Vec<String> {
    airlock_policies::embedded().names().iter().map(|s| s.to_string()).collect()
}

/// Installs the stderr logger (`AIRLOCK_LOG`, default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
}
