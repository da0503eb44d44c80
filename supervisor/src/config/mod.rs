//! The supervisor's TOML configuration: schema, defaults, the embedded default job, and
//! validation that reports every error with its line. Documented in `docs/configuration.md`.
//! Pure data and checks: nothing here opens, spawns or confines anything.
//!
//! Files: this one (the schema and what the rest of the supervisor asks of it), `parse`
//! (reading a file and reporting every problem), `paths` (where state, the control socket and
//! worker executables are). Creating and checking directories is `crate::dirs`' job.

mod parse;
mod paths;
#[cfg(test)]
mod tests;

pub use parse::{parse, ConfigError, ConfigProblem};

use std::collections::BTreeMap;

use std::path::PathBuf;

use airlock_protocol::confinement::{Layer, Requirement};
use serde::Deserialize;
use toml::Spanned;

/// The configuration `airlockd` runs when started without `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../default.toml");

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
    /// Bytes of messages waiting for this worker (journaled, not yet handled), from every
    /// sender together; a message over it is refused `Busy` to its sender. Unbounded when
    /// absent: each sender's `journal-bytes` bounds it then. A worker that holds messages
    /// while a peer outside is away (the bridge's store and forward) sets it, so that its
    /// backlog cannot fill a sender's quota and starve that sender's other destinations.
    #[serde(default)]
    pub inbox_bytes: Option<usize>,
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
        Quota {
            in_flight_calls: q_calls(),
            journal_bytes: q_journal(),
            max_body_bytes: q_body(),
            bulk_bytes: q_bulk(),
            inbox_bytes: None,
        }
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
    pub cgroup: Option<Requirement>,
    pub priority: Option<Requirement>,
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
            Layer::Cgroup => self.cgroup,
            Layer::Priority => self.priority,
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
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// A worker's share of the machine: its cgroup's limits (the `cgroup` layer) and its
/// scheduling priority and OOM score (the `priority` layer). Each key left out of a worker's
/// `[worker.limits]` comes from `[defaults.limits]`, else from the built-in value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Memory of the worker's cgroup, swap included (built-in 512 MiB).
    pub memory_mib: Option<u64>,
    /// Processes and threads in the worker's cgroup (built-in 256).
    pub pids: Option<u64>,
    /// Relative CPU share, 1 to 10000 (cgroup v2 `cpu.weight`; built-in 100).
    pub cpu_weight: Option<u64>,
    /// A CPU ceiling in percent of one CPU (`cpu.max`); none by default.
    pub cpu_max_percent: Option<u64>,
    /// Nice value 0 to 19 (built-in 0): raising it needs no privilege, lowering it does.
    pub nice: Option<i32>,
    /// Run only when a CPU has nothing else to do (`SCHED_IDLE`): for the least trusted layers.
    pub sched_idle: Option<bool>,
    /// The kernel's OOM killer picks this worker before airlockd: 0 to 1000 (built-in 500).
    pub oom_score_adj: Option<i32>,
}

/// [`LimitsConfig`] with every value decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_weight: u64,
    pub cpu_max_percent: Option<u64>,
    pub nice: i32,
    pub sched_idle: bool,
    pub oom_score_adj: i32,
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
    pub limits: LimitsConfig,
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

    pub fn rlimits<'a>(&'a self, w: &'a WorkerConfig) -> &'a RlimitConfig {
        w.rlimits.as_ref().unwrap_or(&self.defaults.rlimits)
    }

    /// `w`'s limits: its own keys, else `[defaults.limits]`, else the built-in values.
    pub fn limits(&self, w: &WorkerConfig) -> WorkerLimits {
        let (o, d) = (&w.limits, &self.defaults.limits);
        WorkerLimits {
            memory_bytes: o.memory_mib.or(d.memory_mib).unwrap_or(512) << 20,
            pids: o.pids.or(d.pids).unwrap_or(256),
            cpu_weight: o.cpu_weight.or(d.cpu_weight).unwrap_or(100),
            cpu_max_percent: o.cpu_max_percent.or(d.cpu_max_percent),
            nice: o.nice.or(d.nice).unwrap_or(0),
            sched_idle: o.sched_idle.or(d.sched_idle).unwrap_or(false),
            oom_score_adj: o.oom_score_adj.or(d.oom_score_adj).unwrap_or(500),
        }
    }
}
