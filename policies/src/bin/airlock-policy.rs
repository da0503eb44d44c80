//! `airlock-policy`: this crate's `airlock policy` commands as a stand-alone binary (the
//! supervisor's `airlock` binary mounts the same commands as `airlock policy ...`).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "airlock-policy",
    about = "Check, audit, diff, export, disassemble, verify and learn seccomp policies"
)]
struct Cli {
    #[command(flatten)]
    args: airlock_policies::cli::PolicyArgs,
}

fn main() {
    std::process::exit(airlock_policies::cli::run(Cli::parse().args));
}
