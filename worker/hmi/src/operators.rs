//! `airlock-hmi user add|list`: manages the operators in the `auth` layer's credential file.
//!
//! The file lives in the `auth` worker's state directory, which airlockd creates at
//! `<state directory>/workers/<name>/` (owned by that worker's uid, mode 0700). This tool finds
//! it the way airlockd does: `--file`, else the configuration (`--config`, else the installed
//! `/etc/airlock/airlock.toml` when present) for the state directory and the name of the worker
//! whose policy is `auth`, else the defaults of the embedded configuration (worker `auth`).
//! It writes a new file beside the old one and renames it over, so `auth` never reads half a
//! file, and keeps the directory owner's uid on it when run as root.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::credentials;

/// The installed configuration, read when no `--config` is given.
const INSTALLED_CONFIG: &str = "/etc/airlock/airlock.toml";

#[derive(Debug, Parser)]
#[command(name = "airlock-hmi", version, about = "Manage the airlock HMI's own data")]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Manage the HMI's operators (the auth layer's credential file).
    #[command(subcommand)]
    User(UserCmd),
    /// Write this tool's man pages (airlock-hmi.8, airlock-hmi-user.8) into DIR (packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add operator NAME, or set a new password for an existing one. Without
    /// --password-stdin, a random password is generated and printed once.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        place: Place,
    },
    /// List the operators (names only).
    List {
        #[command(flatten)]
        place: Place,
    },
}

/// Where the credential file is.
#[derive(Debug, clap::Args)]
pub struct Place {
    /// The credential file (default: <state directory>/workers/<auth worker>/operators).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The airlockd configuration whose state directory holds the file (default:
    /// /etc/airlock/airlock.toml when present, else the embedded default's layout).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// The parts of airlockd's configuration that say where the credential file is. Everything
/// else in the file is airlockd's business and ignored here.
#[derive(Debug, Default, Deserialize)]
struct Layout {
    #[serde(default)]
    supervisor: SupervisorLayout,
    #[serde(default)]
    worker: Vec<WorkerLayout>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SupervisorLayout {
    state_directory: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct WorkerLayout {
    name: String,
    policy: String,
    #[serde(default)]
    state_directory: bool,
}

/// The tool's entry point.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::User(UserCmd::Add { name, password_stdin, place }) => user_add(&name, password_stdin, &place),
        Cmd::User(UserCmd::List { place }) => user_list(&place),
        Cmd::Man { dir } => write_man_pages(&dir),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`airlock-hmi user list | head -1`): nothing more to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-hmi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The credential file `place` names.
pub fn credential_file(place: &Place) -> anyhow::Result<PathBuf> {
    if let Some(f) = &place.file {
        return Ok(f.clone());
    }
    let installed = PathBuf::from(INSTALLED_CONFIG);
    let config = place.config.clone().or_else(|| installed.exists().then_some(installed));
    let layout = match &config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<Layout>(&text).with_context(|| format!("reading the layout of {}", p.display()))?
        }
        None => Layout::default(),
    };
    let auth = if config.is_some() {
        let w = layout
            .worker
            .iter()
            .find(|w| w.policy == "auth")
            .context("the configuration has no worker with policy `auth`: pass --file")?;
        anyhow::ensure!(w.state_directory, "the auth worker `{}` has no state directory: pass --file", w.name);
        w.name.clone()
    } else {
        "auth".to_string()
    };
    Ok(state_directory(layout.supervisor.state_directory).join("workers").join(auth).join(credentials::FILE_NAME))
}

/// airlockd's state directory: `$STATE_DIRECTORY` (systemd), else the configured one, else
/// `/var/lib/airlock` for root and `$XDG_STATE_HOME/airlock` (or `$TMPDIR/airlock-state-UID`)
/// for others, exactly as airlockd decides it.
fn state_directory(configured: Option<PathBuf>) -> PathBuf {
    let from_env = std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from));
    from_env.or(configured).unwrap_or_else(|| {
        let uid = nix::unistd::geteuid();
        if uid.is_root() {
            return PathBuf::from("/var/lib/airlock");
        }
        match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(base) => PathBuf::from(base).join("airlock"),
            None => std::env::temp_dir().join(format!("airlock-state-{uid}")),
        }
    })
}

/// Renders the man pages of this tool and of its visible subcommands into `dir`.
fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let cmd = Args::command();
    let mut pages = vec![("airlock-hmi".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((format!("airlock-hmi-{}", sub.get_name()), sub.clone()));
    }
    for (name, page) in pages {
        let mut out = Vec::new();
        // A one-off use: the few page names live until the tool exits.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(page.name(title)).section("8").render(&mut out)?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn read_operators(path: &Path) -> anyhow::Result<Vec<credentials::Operator>> {
    match std::fs::read_to_string(path) {
        Ok(text) => credentials::parse(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn user_add(name: &str, password_stdin: bool, place: &Place) -> anyhow::Result<()> {
    let path = credential_file(place)?;
    let mut ops = read_operators(&path)?;
    let (password, generated) = if password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
        (line.trim_end_matches(['\n', '\r']).to_string(), false)
    } else {
        (credentials::random_password().context("generating a password")?, true)
    };
    credentials::set(&mut ops, name, &password)?;
    let dir = path.parent().context("the credential file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Our own name (pid), created exclusively: never a path someone else prepared. Owned like
    // the directory (the auth worker's uid), readable by no one else.
    let tmp = dir.join(format!(".{}.{}.tmp", credentials::FILE_NAME, std::process::id()));
    let owner = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let written = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(credentials::render(&ops).as_bytes())?;
        if nix::unistd::geteuid().is_root() {
            // On the open file, not the path: a swapped-in symlink cannot redirect it.
            std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))
                .with_context(|| format!("chown {}", tmp.display()))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let mut out = std::io::stdout().lock();
    if generated {
        writeln!(out, "operator {name}: password {password}")?;
    } else {
        writeln!(out, "operator {name}: password set")?;
    }
    Ok(())
}

fn user_list(place: &Place) -> anyhow::Result<()> {
    let path = credential_file(place)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    for op in credentials::parse(&text).with_context(|| format!("{}", path.display()))? {
        writeln!(out, "{}", op.name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(config: &Path) -> Place {
        Place { file: None, config: Some(config.to_path_buf()) }
    }

    #[test]
    fn credential_file_follows_the_configured_state_directory_and_auth_worker() {
        let dir = std::env::temp_dir().join(format!("airlock-hmi-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = dir.join("airlock.toml");
        std::fs::write(
            &cfg,
            "[supervisor]\nstate-directory = \"/srv/hmi\"\n[[worker]]\nname = \"login\"\npolicy = \"auth\"\nstate-directory = true\n[worker.restart]\npolicy = \"never\"\n",
        )
        .expect("write");
        // STATE_DIRECTORY would win (as in airlockd); the test runs without it.
        if std::env::var_os("STATE_DIRECTORY").is_none() {
            assert_eq!(credential_file(&place(&cfg)).expect("path"), PathBuf::from("/srv/hmi/workers/login/operators"));
        }
        std::fs::write(&cfg, "[[worker]]\nname = \"login\"\npolicy = \"auth\"\n").expect("write");
        let e = credential_file(&place(&cfg)).expect_err("no state directory");
        assert!(e.to_string().contains("has no state directory"), "{e}");
        std::fs::write(&cfg, "[[worker]]\nname = \"ui\"\npolicy = \"ui\"\n").expect("write");
        let e = credential_file(&place(&cfg)).expect_err("no auth worker");
        assert!(e.to_string().contains("no worker with policy `auth`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
