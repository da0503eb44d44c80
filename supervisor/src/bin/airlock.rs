//! `airlock`: the admin CLI. Talks to a running `airlockd` over its control socket, and
//! audits seccomp policies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use airlock_supervisor::cli::{AirlockArgs as Args, Cmd};
use airlock_supervisor::runtime::{CallResult, ControlRequest, Status, WorkerState};
use anyhow::Context;
use clap::Parser;

fn default_socket() -> PathBuf {
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY") {
        return PathBuf::from(d).join("control.sock");
    }
    let system = PathBuf::from("/run/airlock/control.sock");
    if system.exists() {
        return system;
    }
    // The same fallback as airlockd's Config::runtime_directory.
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(base) => PathBuf::from(base).join("airlock/control.sock"),
        None => {
            std::env::temp_dir().join(format!("airlock-run-{}", airlock_supervisor::sys::euid())).join("control.sock")
        }
    }
}

fn request<T: serde::de::DeserializeOwned>(sock: &PathBuf, req: &ControlRequest) -> anyhow::Result<T> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to {} (is airlockd running?)", sock.display()))?;
    // The supervisor may refuse (and close) before reading: read its answer even when the
    // write fails.
    let wrote = writeln!(s, "{}", serde_json::to_string(req)?);
    let mut line = String::new();
    let read = BufReader::new(&s).read_line(&mut line);
    if line.is_empty() {
        wrote.context("sending the request")?;
        read.context("reading the supervisor's answer")?;
        anyhow::bail!("the supervisor closed the connection without answering");
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
        if let Some(e) = v.get("error") {
            anyhow::bail!("supervisor refused: {e}");
        }
    }
    serde_json::from_str(&line).with_context(|| format!("unexpected answer: {}", line.trim()))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let sock = args.socket.clone().unwrap_or_else(default_socket);
    let r = match args.cmd {
        Cmd::Policy(p) => return std::process::ExitCode::from(airlock_policies::cli::run(p).clamp(0, 255) as u8),
        Cmd::Status { json } => status(&sock, json),
        Cmd::Call { service, method, body, deadline_ms } => call(&sock, service, method, body, deadline_ms),
        Cmd::Permits { config } => permits(config),
        Cmd::RevokeStream { stream } => revoke_stream(&sock, stream),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn status(sock: &PathBuf, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let st: Status = request(sock, &ControlRequest::Status)?;
    if json {
        airlock_supervisor::outln!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    airlock_supervisor::outln!(
        "airlockd pid {} uid {}, {} journaled messages pending",
        st.pid,
        st.uid,
        st.journal_pending
    );
    for w in &st.workers {
        let state = match &w.state {
            WorkerState::Running => "running".to_string(),
            WorkerState::Starting => "starting".to_string(),
            WorkerState::Restarting { in_ms } => format!("restarting in {in_ms} ms"),
            WorkerState::Failed(why) => format!("failed: {why}"),
            WorkerState::Stopped => "stopped".to_string(),
        };
        let pid = w.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        airlock_supervisor::outln!(
            "\nworker {} ({state}) pid {pid} restarts {} services [{}]",
            w.name,
            w.restarts,
            w.services.join(", ")
        );
        if let Some(e) = &w.last_exit {
            airlock_supervisor::outln!("  last exit: {e}");
        }
        airlock_supervisor::outln!(
            "  broker: state {}, calls served {}, calls made {}, violations {}, queued {}, unacknowledged {}",
            w.broker_state,
            w.calls_served,
            w.calls_made,
            w.violations,
            w.queued,
            w.unacknowledged
        );
        for l in &w.confinement {
            airlock_supervisor::outln!("  {:<20} {l}", l.layer.to_string());
        }
        for b in &w.bounds {
            airlock_supervisor::outln!("  bound: {b}");
        }
        for n in &w.notes {
            airlock_supervisor::outln!("  note: {n}");
        }
    }
    for t in &st.streams {
        let (what, size, unit) =
            if t.call_region { ("call region", "", "messages") } else { ("stream", "ring ", "records") };
        airlock_supervisor::outln!(
            "\n{what} {} {} -> {} ({}): {size}{} KiB, {unit} <= {} B, {}{}",
            t.stream,
            t.producer,
            t.consumer,
            t.to,
            t.ring_bytes / 1024,
            t.max_record,
            if t.encrypted { "encrypted" } else { "PLAINTEXT" },
            t.revoked.as_ref().map_or(String::new(), |why| format!(", revoked: {why}"))
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The configuration as given, else the installed one (`/etc/airlock/airlock.toml`), else the
/// embedded default.
fn load_config(config: Option<PathBuf>) -> anyhow::Result<(airlock_supervisor::config::Config, String)> {
    let installed = PathBuf::from("/etc/airlock/airlock.toml");
    let config = config.or_else(|| installed.exists().then_some(installed));
    let (text, name) = match &config {
        Some(p) => {
            (std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?, p.display().to_string())
        }
        None => (airlock_supervisor::config::EMBEDDED_DEFAULT.to_string(), "embedded default configuration".into()),
    };
    let cfg = airlock_supervisor::config::parse(&text, &name, &airlock_supervisor::known_policies())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    Ok((cfg, name))
}

fn permits(config: Option<PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let (cfg, name) = load_config(config)?;
    airlock_supervisor::outln!(
        "# permit table of {name}; every worker starts in state `initial`; anything not listed is refused"
    );
    airlock_supervisor::out!("{}", airlock_supervisor::permits::render(&cfg.permit_table()));
    Ok(std::process::ExitCode::SUCCESS)
}

fn revoke_stream(sock: &PathBuf, stream: u64) -> anyhow::Result<std::process::ExitCode> {
    let _: serde_json::Value = request(sock, &ControlRequest::RevokeStream { stream })?;
    airlock_supervisor::outln!("stream {stream} revoked");
    Ok(std::process::ExitCode::SUCCESS)
}

fn call(
    sock: &PathBuf,
    service: String,
    method: String,
    body: String,
    deadline_ms: u32,
) -> anyhow::Result<std::process::ExitCode> {
    let r: CallResult = request(sock, &ControlRequest::Call { service, method, body, deadline_ms })?;
    if r.ok {
        airlock_supervisor::outln!("{}", r.body);
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!("airlock: call failed: {}", r.body);
        Ok(std::process::ExitCode::FAILURE)
    }
}
