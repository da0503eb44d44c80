//! `airlockd`: the airlock supervisor.

use airlock_supervisor::cli::AirlockdArgs as Args;
use anyhow::Context;
use clap::Parser;

fn main() -> std::process::ExitCode {
    airlock_supervisor::init_logging();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlockd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let activated = airlock_supervisor::spawn::take_activated_sockets();
    if !activated.is_empty() {
        tracing::info!(sockets = ?activated, "sockets passed by systemd");
    }
    let known = airlock_supervisor::known_policies();
    if args.print_default_config {
        airlock_supervisor::out!("{}", airlock_supervisor::config::EMBEDDED_DEFAULT);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(path) = args.check_config {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(match airlock_supervisor::config::parse(&text, &path.display().to_string(), &known) {
            Ok(c) => {
                airlock_supervisor::outln!("{}: OK ({} workers)", path.display(), c.workers.len());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::ExitCode::FAILURE
            }
        });
    }
    let (text, name) = match &args.config {
        Some(p) => {
            (std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?, p.display().to_string())
        }
        None => {
            (airlock_supervisor::config::EMBEDDED_DEFAULT.to_string(), "embedded default configuration".to_string())
        }
    };
    let mut cfg = airlock_supervisor::config::parse(&text, &name, &known)
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    if !args.best_effort.is_empty() {
        let names: Vec<_> = args.best_effort.iter().map(|l| l.name()).collect();
        tracing::warn!(
            layers = %names.join(","),
            "--best-effort: these layers are best-effort for every worker, whatever the configuration requires"
        );
        cfg.relax(&args.best_effort);
    }
    tracing::info!(config = %name, workers = cfg.workers.len(), "starting airlockd");
    let sup = airlock_supervisor::runtime::Supervisor::start(cfg).context("starting the supervisor")?;
    sup.run().context("running the supervisor")?;
    Ok(std::process::ExitCode::SUCCESS)
}
