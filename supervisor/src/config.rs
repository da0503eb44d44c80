//! The supervisor's TOML configuration: schema, defaults, the embedded default job, and
//! validation that reports every error with its line. Documented in `docs/configuration.md`.
//! Pure data and checks: nothing here opens, spawns or confines anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use airlock_protocol::confinement::{Layer, Requirement};
use serde::Deserialize;
use toml::Spanned;

/// The configuration `airlockd` runs when started without `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub supervisor: SupervisorSection,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default, rename = "worker")]
    pub workers: Vec<WorkerConfig>,
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default, rename = "permit")]
    pub permits: Vec<Spanned<crate::permits::Permit>>,
    /// Named tables of application settings (`[settings.NAME]`), given to the workers that
    /// list them in `settings`, over the channel: workers read no configuration files.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    /// Layers the operator downgraded from `required` to `best-effort` on the command line
    /// (`airlockd --best-effort LAYER,...`); never read from the file.
    #[serde(skip)]
    pub relaxed: Vec<Layer>,
}

/// How the broker treats requests between workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BrokerSection {
    /// A worker refused this many times is killed (a security event); 0: never.
    #[serde(default = "d_violations")]
    pub max_violations: u32,
    /// The deadline of a call that names none.
    #[serde(default = "d_deadline")]
    pub call_deadline_ms: u64,
    /// Asynchronous messages delivered to one worker and not yet acknowledged.
    #[serde(default = "d_delivery_window")]
    pub delivery_window: usize,
}
fn d_violations() -> u32 {
    3
}
fn d_deadline() -> u64 {
    5000
}
fn d_delivery_window() -> usize {
    64
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            max_violations: d_violations(),
            call_deadline_ms: d_deadline(),
            delivery_window: d_delivery_window(),
        }
    }
}

/// Per-worker limits on what it can make the supervisor hold for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Quota {
    /// Calls this worker has waiting for replies.
    #[serde(default = "q_calls")]
    pub in_flight_calls: usize,
    /// Bytes of this worker's asynchronous messages in the journal, not yet handled.
    #[serde(default = "q_journal")]
    pub journal_bytes: usize,
    /// Largest single message or call body.
    #[serde(default = "q_body")]
    pub max_body_bytes: usize,
    /// Largest bulk payload this worker may pass through the broker (a sealed memfd the
    /// broker passes on without mapping it).
    #[serde(default = "q_bulk")]
    pub bulk_bytes: u64,
}
fn q_bulk() -> u64 {
    64 << 20
}
fn q_calls() -> usize {
    16
}
fn q_journal() -> usize {
    16 << 20
}
fn q_body() -> usize {
    60 * 1024
}

impl Default for Quota {
    fn default() -> Self {
        Quota { in_flight_calls: q_calls(), journal_bytes: q_journal(), max_body_bytes: q_body(), bulk_bytes: q_bulk() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SupervisorSection {
    /// Journal and worker state. `$STATE_DIRECTORY` (systemd) wins when set.
    pub state_directory: Option<PathBuf>,
    /// Control socket directory. `$RUNTIME_DIRECTORY` (systemd) wins when set.
    pub runtime_directory: Option<PathBuf>,
    /// Where relative worker executables are found; default: next to `airlockd`.
    pub worker_directory: Option<PathBuf>,
    /// Host uids handed to workers configured with `uid = "dynamic"` (root supervisor only).
    #[serde(default = "default_uid_range")]
    pub dynamic_uid_range: [u32; 2],
    #[serde(default = "default_shutdown_ms")]
    pub shutdown_timeout_ms: u64,
    #[serde(default = "default_ready_ms")]
    pub ready_timeout_ms: u64,
}

fn default_uid_range() -> [u32; 2] {
    [61000, 61999]
}
fn default_shutdown_ms() -> u64 {
    3000
}
fn default_ready_ms() -> u64 {
    10_000
}

impl Default for SupervisorSection {
    fn default() -> Self {
        SupervisorSection {
            state_directory: None,
            runtime_directory: None,
            worker_directory: None,
            dynamic_uid_range: default_uid_range(),
            shutdown_timeout_ms: default_shutdown_ms(),
            ready_timeout_ms: default_ready_ms(),
        }
    }
}

/// Per-layer requirements; any layer left out is `required`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Confinement {
    pub user_namespace: Option<Requirement>,
    pub pid_namespace: Option<Requirement>,
    pub net_namespace: Option<Requirement>,
    pub mount_namespace: Option<Requirement>,
    pub ipc_namespace: Option<Requirement>,
    pub uts_namespace: Option<Requirement>,
    pub cgroup_namespace: Option<Requirement>,
    pub uid: Option<Requirement>,
    pub capabilities: Option<Requirement>,
    pub no_new_privs: Option<Requirement>,
    pub landlock: Option<Requirement>,
    pub rlimits: Option<Requirement>,
    pub not_dumpable: Option<Requirement>,
    pub parent_death_signal: Option<Requirement>,
    pub seccomp: Option<Requirement>,
}

impl Confinement {
    fn get(&self, l: Layer) -> Option<Requirement> {
        match l {
            Layer::UserNamespace => self.user_namespace,
            Layer::PidNamespace => self.pid_namespace,
            Layer::NetNamespace => self.net_namespace,
            Layer::MountNamespace => self.mount_namespace,
            Layer::IpcNamespace => self.ipc_namespace,
            Layer::UtsNamespace => self.uts_namespace,
            Layer::CgroupNamespace => self.cgroup_namespace,
            Layer::Uid => self.uid,
            Layer::Capabilities => self.capabilities,
            Layer::NoNewPrivs => self.no_new_privs,
            Layer::Landlock => self.landlock,
            Layer::Rlimits => self.rlimits,
            Layer::NotDumpable => self.not_dumpable,
            Layer::ParentDeathSignal => self.parent_death_signal,
            Layer::Seccomp => self.seccomp,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default)]
    pub confinement: Confinement,
    #[serde(default)]
    pub rlimits: RlimitConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum UidSpec {
    Fixed(u32),
    Named(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerConfig {
    pub name: Spanned<String>,
    pub executable: Spanned<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub policy: Spanned<String>,
    /// A host uid, or `"dynamic"` (from the supervisor's range). Used when the supervisor
    /// runs as root; an unprivileged supervisor's workers share its uid.
    pub uid: Option<UidSpec>,
    pub gid: Option<u32>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub confinement: Confinement,
    #[serde(default)]
    pub landlock: LandlockConfig,
    pub rlimits: Option<RlimitConfig>,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default, rename = "resource")]
    pub resources: Vec<Spanned<Resource>>,
    #[serde(default)]
    pub quota: Quota,
    /// The `[settings.NAME]` tables this worker receives.
    #[serde(default)]
    pub settings: Vec<Spanned<String>>,
    /// Give the worker its own directory `<state directory>/workers/<name>`, owned by its
    /// uid, mode 0700, writable through Landlock: the only place it may write.
    #[serde(default)]
    pub state_directory: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockConfig {
    #[serde(default)]
    pub read: Vec<PathBuf>,
    #[serde(default)]
    pub write: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RlimitConfig {
    #[serde(default = "d_nofile")]
    pub nofile: u64,
    #[serde(default = "d_nproc")]
    pub nproc: u64,
    #[serde(default = "d_as")]
    pub address_space_mib: u64,
    #[serde(default = "d_fsize")]
    pub file_size_mib: u64,
}
fn d_nofile() -> u64 {
    64
}
fn d_nproc() -> u64 {
    512
}
fn d_as() -> u64 {
    2048
}
fn d_fsize() -> u64 {
    1024
}

impl Default for RlimitConfig {
    fn default() -> Self {
        RlimitConfig { nofile: d_nofile(), nproc: d_nproc(), address_space_mib: d_as(), file_size_mib: d_fsize() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RestartConfig {
    #[serde(default)]
    pub policy: RestartPolicy,
    #[serde(default = "d_init")]
    pub initial_backoff_ms: u64,
    #[serde(default = "d_maxb")]
    pub max_backoff_ms: u64,
    /// More restarts than this within `window_s` is a crash loop: the worker stays down.
    #[serde(default = "d_maxr")]
    pub max_restarts: u32,
    #[serde(default = "d_window")]
    pub window_s: u64,
}
fn d_init() -> u64 {
    100
}
fn d_maxb() -> u64 {
    10_000
}
fn d_maxr() -> u32 {
    5
}
fn d_window() -> u64 {
    60
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            policy: RestartPolicy::default(),
            initial_backoff_ms: d_init(),
            max_backoff_ms: d_maxb(),
            max_restarts: d_maxr(),
            window_s: d_window(),
        }
    }
}

/// A privileged resource the supervisor opens and passes to the worker as a descriptor, in
/// the order listed, from fd 5 on.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Resource {
    TcpListen {
        address: String,
    },
    UnixListen {
        path: PathBuf,
    },
    File {
        path: PathBuf,
        #[serde(default)]
        write: bool,
    },
    Device {
        path: PathBuf,
    },
    /// A socket systemd opened and passed by socket activation (`FileDescriptorName=`).
    SystemdSocket {
        name: String,
    },
    /// A TCP connection to `address` (IP:PORT), started by the supervisor (non-blocking: the
    /// worker waits for it to complete). The worker may ask for a new one after a failure
    /// (`Worker::reopen`); the supervisor applies a backoff between reopens.
    TcpConnect {
        address: String,
    },
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub line: usize,
    pub message: String,
}

/// Every problem found, formatted as `PATH:LINE: message` lines.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.source_name, .problems))]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

fn render(name: &str, problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("{name}:{}: {}", p.line, p.message)).collect::<Vec<_>>().join("\n")
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The TOML parser stops at the first syntax or type error. To list every one, the file is
/// decoded again in pieces: each top-level table (a `[[worker]]` with its `[worker.*]`
/// sub-tables, `[supervisor]`, each `[[permit]]`, ...) on its own, its lines counted from
/// where it starts. An error only the whole file has (a table defined twice across pieces)
/// is reported as the parser gave it.
fn every_decoding_problem(text: &str, whole: &toml::de::Error) -> Vec<ConfigProblem> {
    let problem = |e: &toml::de::Error, piece: &str, first_line: usize| ConfigProblem {
        line: first_line + e.span().map_or(0, |s| line_of(piece, s.start) - 1),
        message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
    };
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        // A table header, not a line of a multi-line array: `[name]` or `[[name]]` alone.
        let body = t.split('#').next().unwrap_or("").trim_end();
        let header = body.starts_with('[') && body.ends_with(']') && !body.contains([',', '=']);
        let worker_part = t.starts_with("[worker.") || t.starts_with("[[worker.");
        if header && !worker_part && at != 0 {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    let mut problems: Vec<ConfigProblem> = starts
        .windows(2)
        .filter_map(|w| {
            let piece = &text[w[0]..w[1]];
            toml::from_str::<Config>(piece).err().map(|e| problem(&e, piece, line_of(text, w[0])))
        })
        .collect();
    // What the parser said of the whole file, unless a piece already said it at that line (an
    // error only the whole file has, such as a table defined twice across pieces).
    let first = problem(whole, text, 1);
    if !problems.iter().any(|p| p.line == first.line) {
        problems.push(first);
        problems.sort_by_key(|p| p.line);
    }
    problems
}

/// Parses and validates a configuration. `known_policies` are the policy names compiled in.
pub fn parse(text: &str, source_name: &str, known_policies: &[String]) -> Result<Config, ConfigError> {
    let cfg: Config = toml::from_str(text)
        .map_err(|e| ConfigError { source_name: source_name.into(), problems: every_decoding_problem(text, &e) })?;
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut services: BTreeMap<String, String> = BTreeMap::new();
    let mut fixed_uids: BTreeMap<u32, String> = BTreeMap::new();
    let [lo, hi] = cfg.supervisor.dynamic_uid_range;
    let range_line = text.find("dynamic-uid-range").map_or(1, |at| line_of(text, at));
    if lo == 0 || lo > hi {
        problems.push(ConfigProblem {
            line: range_line,
            message: format!("dynamic-uid-range [{lo}, {hi}] must be non-empty and exclude 0"),
        });
    }
    if cfg.workers.is_empty() {
        problems.push(ConfigProblem { line: 1, message: "no [[worker]] defined".into() });
    }
    for (index, w) in cfg.workers.iter().enumerate() {
        let name = w.name.get_ref();
        let line = line_of(text, w.name.span().start);
        let mut bad =
            |line: usize, m: String| problems.push(ConfigProblem { line, message: format!("worker {name}: {m}") });
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bad(line, "name must be non-empty ASCII letters, digits, '-' or '_'".into());
        }
        if let Some(prev) = seen.insert(name.clone(), line) {
            bad(line, format!("duplicate worker name (first defined on line {prev})"));
        }
        if w.executable.get_ref().is_empty() {
            bad(line_of(text, w.executable.span().start), "executable is empty".into());
        }
        if !known_policies.iter().any(|p| p == w.policy.get_ref()) {
            bad(
                line_of(text, w.policy.span().start),
                format!("unknown policy {:?} (known: {})", w.policy.get_ref(), known_policies.join(", ")),
            );
        }
        match &w.uid {
            Some(UidSpec::Named(s)) if s != "dynamic" => {
                bad(line, format!("uid must be a number or \"dynamic\", not {s:?}"))
            }
            // A dynamic uid is the range's start plus the worker's position (spawn::decide).
            Some(UidSpec::Named(_)) | None if lo != 0 && lo <= hi && u64::from(lo) + index as u64 > u64::from(hi) => bad(
                line,
                format!(
                    "dynamic uid {} lies outside dynamic-uid-range [{lo}, {hi}] (line {range_line}): the range holds {} uid(s), this is worker {}",
                    u64::from(lo) + index as u64,
                    u64::from(hi - lo) + 1,
                    index + 1
                ),
            ),
            Some(UidSpec::Fixed(0)) => bad(line, "uid 0 is not allowed for a worker".into()),
            Some(UidSpec::Fixed(u)) => {
                if let Some(other) = fixed_uids.insert(*u, name.clone()) {
                    bad(line, format!("uid {u} is already used by worker {other}: each worker needs its own uid"));
                }
                if (lo..=hi).contains(u) {
                    bad(line, format!("uid {u} lies in the dynamic range [{lo}, {hi}]"));
                }
            }
            _ => {}
        }
        if w.gid == Some(0) {
            bad(line, "gid 0 is not allowed for a worker".into());
        }
        for s in &w.services {
            if let Some(other) = services.insert(s.clone(), name.clone()) {
                bad(line, format!("service {s:?} is already provided by worker {other}"));
            }
        }
        for p in w.landlock.read.iter().chain(&w.landlock.write) {
            if !p.is_absolute() {
                bad(line, format!("landlock path {} must be absolute", p.display()));
            }
        }
        let r = &w.restart;
        if r.initial_backoff_ms == 0 || r.initial_backoff_ms > r.max_backoff_ms {
            bad(line, "restart: initial-backoff-ms must be > 0 and <= max-backoff-ms".into());
        }
        for res in &w.resources {
            let rline = line_of(text, res.span().start);
            match res.get_ref() {
                Resource::TcpListen { address } | Resource::TcpConnect { address } => {
                    if address.parse::<SocketAddr>().is_err() {
                        let kind =
                            if matches!(res.get_ref(), Resource::TcpListen { .. }) { "listen" } else { "connect" };
                        bad(rline, format!("tcp-{kind} address {address:?} is not IP:PORT"));
                    }
                }
                Resource::SystemdSocket { name } => {
                    if name.is_empty() || name.contains(':') {
                        bad(rline, format!("systemd-socket name {name:?} must be a non-empty FileDescriptorName"));
                    }
                }
                Resource::UnixListen { path } | Resource::File { path, .. } | Resource::Device { path } => {
                    if !path.is_absolute() {
                        bad(rline, format!("resource path {} must be absolute", path.display()));
                    }
                }
            }
        }
        for set in &w.settings {
            if !cfg.settings.contains_key(set.get_ref()) {
                bad(line_of(text, set.span().start), format!("no [settings.{}] table", set.get_ref()));
            }
        }
        let rl = w.rlimits.as_ref().unwrap_or(&cfg.defaults.rlimits);
        if rl.nofile < 16 {
            bad(line, "rlimits.nofile below 16 cannot run a worker".into());
        }
    }
    let names: Vec<String> = cfg.workers.iter().map(|w| w.name.get_ref().clone()).collect();
    for p in &cfg.permits {
        for m in crate::permits::validate(std::slice::from_ref(p.get_ref()), &names) {
            problems.push(ConfigProblem { line: line_of(text, p.span().start), message: m });
        }
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError { source_name: source_name.into(), problems })
    }
}

impl Config {
    /// The requirement for `layer` of `w`: the worker's own, else the defaults, else required.
    pub fn requirement(&self, w: &WorkerConfig, layer: Layer) -> Requirement {
        match w.confinement.get(layer).or(self.defaults.confinement.get(layer)).unwrap_or(Requirement::Required) {
            Requirement::Required if self.relaxed.contains(&layer) => Requirement::BestEffort,
            r => r,
        }
    }

    /// Downgrades `layers` from `required` to `best-effort` for every worker (`off` stays off):
    /// the operator's explicit, logged choice for a host that cannot give them, such as the
    /// unprivileged systemd unit, which cannot give workers their own uids.
    pub fn relax(&mut self, layers: &[Layer]) {
        for l in layers {
            if !self.relaxed.contains(l) {
                self.relaxed.push(*l);
            }
        }
    }

    /// The permit table, without spans.
    pub fn permit_table(&self) -> Vec<crate::permits::Permit> {
        self.permits.iter().map(|p| p.get_ref().clone()).collect()
    }

    /// The settings tables `w` receives, as TOML text (each under its own name).
    pub fn settings_for(&self, w: &WorkerConfig) -> String {
        let mut t = toml::map::Map::new();
        for name in &w.settings {
            if let Some(v) = self.settings.get(name.get_ref()) {
                t.insert(name.get_ref().clone(), v.clone());
            }
        }
        toml::to_string(&toml::Value::Table(t)).unwrap_or_default()
    }

    /// The state directory of worker `w`, if it has one.
    pub fn worker_state_directory(&self, w: &WorkerConfig) -> Option<PathBuf> {
        w.state_directory.then(|| self.state_directory().join("workers").join(w.name.get_ref()))
    }

    pub fn rlimits<'a>(&'a self, w: &'a WorkerConfig) -> &'a RlimitConfig {
        w.rlimits.as_ref().unwrap_or(&self.defaults.rlimits)
    }

    /// `$STATE_DIRECTORY`, else the configured one, else `/var/lib/airlock` for root and
    /// `$XDG_STATE_HOME/airlock` (or `$TMPDIR/airlock-state-UID`) for others. Whatever it is,
    /// [`secure_dir`] refuses it unless this user owns it and no one else can write it.
    pub fn state_directory(&self) -> PathBuf {
        env_dir("STATE_DIRECTORY").or_else(|| self.supervisor.state_directory.clone()).unwrap_or_else(|| {
            default_dir(
                "/var/lib/airlock",
                "XDG_STATE_HOME",
                "airlock",
                &format!("airlock-state-{}", crate::sys::euid()),
            )
        })
    }

    /// `$RUNTIME_DIRECTORY`, else the configured one, else `/run/airlock` for root and
    /// `$XDG_RUNTIME_DIR/airlock` (or `$TMPDIR/airlock-run-UID`) for others; checked likewise.
    pub fn runtime_directory(&self) -> PathBuf {
        env_dir("RUNTIME_DIRECTORY").or_else(|| self.supervisor.runtime_directory.clone()).unwrap_or_else(|| {
            default_dir("/run/airlock", "XDG_RUNTIME_DIR", "airlock", &format!("airlock-run-{}", crate::sys::euid()))
        })
    }

    /// Resolves a worker's executable: absolute as given, else in `worker-directory`, else
    /// next to the running `airlockd`.
    pub fn resolve_executable(&self, w: &WorkerConfig) -> PathBuf {
        let exe = Path::new(w.executable.get_ref());
        if exe.is_absolute() {
            return exe.to_path_buf();
        }
        let dir = self
            .supervisor
            .worker_directory
            .clone()
            .or_else(|| std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)));
        dir.map_or_else(|| exe.to_path_buf(), |d| d.join(exe))
    }
}

fn default_dir(root: &str, xdg: &str, leaf: &str, tmp_leaf: &str) -> PathBuf {
    if crate::sys::euid() == 0 {
        return PathBuf::from(root);
    }
    match std::env::var_os(xdg).filter(|v| !v.is_empty()) {
        Some(base) => PathBuf::from(base).join(leaf),
        None => std::env::temp_dir().join(tmp_leaf),
    }
}

/// Creates `dir` (mode 0700) if missing, then refuses it unless it is a real directory (not a
/// symlink) owned by this user and writable by no one else: the journal key, the journal and
/// the control socket live there.
pub fn secure_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let m = std::fs::symlink_metadata(dir)?;
    let me = crate::sys::euid();
    if !m.file_type().is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory (a symlink?)", dir.display())));
    }
    if m.uid() != me {
        return Err(std::io::Error::other(format!(
            "{} belongs to uid {}, not to this user ({me})",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is writable by others (mode {:o})",
            dir.display(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

fn env_dir(var: &str) -> Option<PathBuf> {
    // systemd may pass several, colon-separated: the first is ours.
    std::env::var_os(var).and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Vec<String> {
        vec!["echo".into(), "ui".into()]
    }

    #[test]
    fn embedded_default_is_valid() {
        let known: Vec<String> = airlock_policies::embedded().names().iter().map(|s| s.to_string()).collect();
        parse(EMBEDDED_DEFAULT, "embedded", &known).expect("embedded default must validate");
    }

    #[test]
    fn syntax_error_reports_its_line() {
        let e = parse("[supervisor]\nshutdown-timeout-ms = \"x\"\n", "t.toml", &policies()).expect_err("bad");
        assert_eq!(e.problems[0].line, 2, "{e}");
    }

    #[test]
    fn unknown_field_is_an_error_with_line() {
        let t = "[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\nfrobnicate = 1\n";
        let e = parse(t, "t.toml", &policies()).expect_err("bad");
        assert!(e.to_string().contains("frobnicate"), "{e}");
        assert_eq!(e.problems[0].line, 5, "{e}");
    }

    #[test]
    fn every_semantic_error_is_listed_with_its_line() {
        let t = r#"
[[worker]]
name = "a"
executable = "x"
policy = "nope"
uid = 0
services = ["s"]

[[worker]]
name = "a"
executable = ""
policy = "echo"
services = ["s"]
[[worker.resource]]
kind = "tcp-listen"
address = "localhost"
"#;
        let e = parse(t, "t.toml", &policies()).expect_err("bad");
        let s = e.to_string();
        for want in [
            "t.toml:5: worker a: unknown policy",
            "t.toml:3: worker a: uid 0",
            "t.toml:10: worker a: duplicate worker name",
            "t.toml:11: worker a: executable is empty",
            "t.toml:10: worker a: service \"s\" is already provided",
            "t.toml:14: worker a: tcp-listen address",
        ] {
            assert!(s.contains(want), "missing {want:?} in:\n{s}");
        }
    }

    #[test]
    fn requirements_default_to_required_and_follow_overrides() {
        let t = "[defaults.confinement]\nlandlock = \"best-effort\"\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[worker.confinement]\nseccomp = \"off\"\n";
        let c = parse(t, "t", &policies()).expect("valid");
        let w = &c.workers[0];
        assert_eq!(c.requirement(w, Layer::Landlock), Requirement::BestEffort);
        assert_eq!(c.requirement(w, Layer::Seccomp), Requirement::Off);
        assert_eq!(c.requirement(w, Layer::NoNewPrivs), Requirement::Required);
    }

    #[test]
    fn every_syntax_and_type_error_is_listed_with_its_line() {
        let t = "[supervisor]\nshutdown-timeout-ms = \"soon\"\n\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\nrestart-everything = true\n[worker.confinement]\nseccomp = \"maybe\"\n\n[[worker]]\nname = \"b\"\nexecutable = = \"x\"\n\n[[worker]]\nname = \"c\"\nexecutable = \"x\"\npolicy = \"echo\"\n";
        let e = parse(t, "t", &policies()).expect_err("broken").to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].starts_with("t:2: invalid type: string \"soon\", expected u64"), "{e}");
        assert!(lines[1].starts_with("t:8: unknown field `restart-everything`"), "{e}");
        assert_eq!(lines[2], "t:14: invalid string expected `\"`, `'`", "{e}");
    }

    #[test]
    fn dynamic_uids_must_fit_the_range() {
        let w = |n: &str| format!("[[worker]]\nname = \"{n}\"\nexecutable = \"x\"\npolicy = \"echo\"\n");
        let t = format!("[supervisor]\ndynamic-uid-range = [61000, 61001]\n{}{}{}", w("a"), w("b"), w("c"));
        let e = parse(&t, "t", &policies()).expect_err("three dynamic workers, two uids");
        let text = e.to_string();
        assert!(
            text.contains("t:12: worker c: dynamic uid 61002 lies outside dynamic-uid-range [61000, 61001] (line 2): the range holds 2 uid(s), this is worker 3"),
            "{text}"
        );
        assert!(!text.contains("worker a") && !text.contains("worker b"), "{text}");
        // A fixed uid takes a position but no uid from the range.
        let t = format!("[supervisor]\ndynamic-uid-range = [61000, 61001]\n{}{}uid = 70000\n", w("a"), w("b"));
        parse(&t, "t", &policies()).expect("fits");
        let t = "[supervisor]\ndynamic-uid-range = [5, 4]\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n";
        let e = parse(t, "t", &policies()).expect_err("empty range").to_string();
        assert!(e.contains("t:2: dynamic-uid-range [5, 4] must be non-empty and exclude 0"), "{e}");
    }

    #[test]
    fn relaxing_downgrades_required_layers_only() {
        let t = "[defaults.confinement]\nuid = \"required\"\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[worker.confinement]\nseccomp = \"off\"\n";
        let mut c = parse(t, "t", &policies()).expect("valid");
        c.relax(&[Layer::Uid, Layer::Seccomp, Layer::MountNamespace]);
        let w = &c.workers[0];
        assert_eq!(c.requirement(w, Layer::Uid), Requirement::BestEffort);
        assert_eq!(c.requirement(w, Layer::MountNamespace), Requirement::BestEffort, "implicitly required");
        assert_eq!(c.requirement(w, Layer::Seccomp), Requirement::Off, "off stays off");
        assert_eq!(c.requirement(w, Layer::Landlock), Requirement::Required, "not named");
    }
}
