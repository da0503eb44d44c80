//! The command lines of `airlockd` and `airlock`, as data: the binaries parse them, and
//! `airlock-mangen` renders them as man pages, so the two never disagree.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The airlock supervisor: spawns, confines, verifies and restarts sandboxed workers.
#[derive(Debug, Parser)]
#[command(name = "airlockd", version)]
pub struct AirlockdArgs {
    /// Configuration file (TOML). Without it, the embedded default configuration runs.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate a configuration file, print every error with its line, and exit.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Downgrade these confinement layers from `required` to `best-effort` for every worker
    /// (comma-separated layer names as in the configuration, e.g. `uid,mount-namespace`). For a
    /// host that cannot give them, such as the unprivileged unit; logged at start, and the
    /// confinement report shows what was not applied. Only namespaces, `uid` and `landlock`:
    /// the other layers need no privilege anywhere.
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', value_parser = parse_layer)]
    pub best_effort: Vec<airlock_protocol::confinement::Layer>,
}

fn parse_layer(s: &str) -> Result<airlock_protocol::confinement::Layer, String> {
    use airlock_protocol::confinement::Layer;
    // Only what a host can lack: namespaces (refused by a container runtime or a sysctl), an
    // own uid (needs a privileged supervisor), Landlock (needs a kernel with it), a cgroup
    // (needs a delegated cgroup v2 subtree or writable v1 hierarchies). Seccomp,
    // no_new_privs, capabilities, rlimits, not-dumpable and the parent-death signal need no
    // privilege anywhere, so there is never a reason to downgrade them.
    let may = |l: Layer| {
        matches!(l, Layer::Uid | Layer::Landlock | Layer::Cgroup)
            || crate::spawn::NAMESPACE_FLAGS.iter().any(|(n, _)| *n == l)
    };
    let names = || Layer::ALL.into_iter().filter(|l| may(*l)).map(|l| l.name()).collect::<Vec<_>>().join(", ");
    match Layer::ALL.into_iter().find(|l| l.name() == s) {
        Some(l) if may(l) => Ok(l),
        Some(_) => {
            Err(format!("{s} needs no privilege on any host and cannot be downgraded (layers that can: {})", names()))
        }
        None => Err(format!("unknown confinement layer {s:?} (layers that can be downgraded: {})", names())),
    }
}

#[derive(Debug, Parser)]
#[command(name = "airlock", version, about = "Administer airlock: status, calls, policy audit")]
pub struct AirlockArgs {
    /// The supervisor's control socket (default: $RUNTIME_DIRECTORY/control.sock, then
    /// /run/airlock/control.sock, then the per-user fallback airlockd uses).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Every worker: state, pid, restarts, services, and each confinement layer.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Call SERVICE.METHOD through the supervisor with BODY (UTF-8) and print the reply.
    Call {
        service: String,
        method: String,
        #[arg(default_value = "")]
        body: String,
        /// How long to wait for the reply (default: the supervisor's call deadline).
        #[arg(long, default_value_t = 0)]
        deadline_ms: u32,
    },
    /// Revoke stream or call region ID (from `airlock status`): both ends are told to let go of
    /// it, and an end that still holds it after the deadline is killed.
    RevokeStream { stream: u64 },
    /// Print the permit table (who may call or send what, in which state) for audit.
    Permits {
        /// Configuration file; without it, the embedded default configuration.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Audit, check, diff, export, disassemble and verify seccomp policies.
    Policy(airlock_policies::cli::PolicyArgs),
}

/// Renders the man pages of both binaries (and of `airlock`'s subcommands) into `dir`:
/// `airlockd.8`, `airlock.8`, `airlock-status.8`, ...
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    use clap::CommandFactory;
    let mut written = Vec::new();
    let mut page = |cmd: clap::Command, name: String| -> std::io::Result<()> {
        let path = dir.join(format!("{name}.8"));
        let mut out = Vec::new();
        // A one-off tool: the few page names live until it exits.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(cmd.name(title)).section("8").render(&mut out)?;
        std::fs::write(&path, out)?;
        written.push(path);
        Ok(())
    };
    page(AirlockdArgs::command(), "airlockd".into())?;
    let airlock = AirlockArgs::command();
    page(airlock.clone(), "airlock".into())?;
    for sub in airlock.get_subcommands() {
        page(sub.clone(), format!("airlock-{}", sub.get_name()))?;
    }
    Ok(written)
}

/// Writes `text` to standard output. When the reader has gone away (`airlock status | head -5`)
/// the CLI has nothing more to say and exits 0 at once, quietly, as `cat` would; any other
/// write error ends it with status 1 and the error.
pub fn print_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`print_out`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::print_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` through [`print_out`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::print_out(format_args!($($arg)*)) };
}
