//! The confinement plan a supervisor sends a worker, and the per-layer report the worker sends
//! back: the layers, how much each matters, and what happened to each.
//!
//! Only types and their spelling live here; applying a plan is the worker library's job and
//! deciding one is the supervisor's.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How much a layer matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Requirement {
    Required,
    #[default]
    BestEffort,
    Off,
}

/// The confinement layers, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    UserNamespace,
    PidNamespace,
    NetNamespace,
    MountNamespace,
    IpcNamespace,
    UtsNamespace,
    CgroupNamespace,
    /// A cgroup of its own with memory, pids and CPU limits (applied by the supervisor).
    Cgroup,
    /// Its scheduling priority and OOM score (applied by the supervisor before exec).
    Priority,
    Uid,
    Capabilities,
    NoNewPrivs,
    Landlock,
    Rlimits,
    NotDumpable,
    ParentDeathSignal,
    Seccomp,
}

impl Layer {
    pub const ALL: [Layer; 17] = [
        Layer::UserNamespace,
        Layer::PidNamespace,
        Layer::NetNamespace,
        Layer::MountNamespace,
        Layer::IpcNamespace,
        Layer::UtsNamespace,
        Layer::CgroupNamespace,
        Layer::Cgroup,
        Layer::Priority,
        Layer::Uid,
        Layer::Capabilities,
        Layer::NoNewPrivs,
        Layer::Landlock,
        Layer::Rlimits,
        Layer::NotDumpable,
        Layer::ParentDeathSignal,
        Layer::Seccomp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layer::UserNamespace => "user-namespace",
            Layer::PidNamespace => "pid-namespace",
            Layer::NetNamespace => "net-namespace",
            Layer::MountNamespace => "mount-namespace",
            Layer::IpcNamespace => "ipc-namespace",
            Layer::UtsNamespace => "uts-namespace",
            Layer::CgroupNamespace => "cgroup-namespace",
            Layer::Cgroup => "cgroup",
            Layer::Priority => "priority",
            Layer::Uid => "uid",
            Layer::Capabilities => "capabilities",
            Layer::NoNewPrivs => "no-new-privs",
            Layer::Landlock => "landlock",
            Layer::Rlimits => "rlimits",
            Layer::NotDumpable => "not-dumpable",
            Layer::ParentDeathSignal => "parent-death-signal",
            Layer::Seccomp => "seccomp",
        }
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerState {
    Applied,
    Degraded(String),
    Unavailable(String),
    /// The configuration turned it off.
    Off,
}

impl std::fmt::Display for LayerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerState::Applied => f.write_str("applied"),
            LayerState::Degraded(why) => write!(f, "degraded ({why})"),
            LayerState::Unavailable(why) => write!(f, "unavailable ({why})"),
            LayerState::Off => f.write_str("off"),
        }
    }
}

impl LayerState {
    /// The state as `airlock status` spells it: `applied`, `degraded`, `unavailable`, `off`.
    pub fn word(&self) -> &'static str {
        match self {
            LayerState::Applied => "applied",
            LayerState::Degraded(_) => "degraded",
            LayerState::Unavailable(_) => "unavailable",
            LayerState::Off => "off",
        }
    }

    /// Why a layer is degraded or unavailable.
    pub fn why(&self) -> Option<&str> {
        match self {
            LayerState::Degraded(w) | LayerState::Unavailable(w) => Some(w),
            LayerState::Applied | LayerState::Off => None,
        }
    }
}

/// Per-layer outcome for one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfinementReport {
    pub layers: Vec<(Layer, LayerState)>,
}

impl ConfinementReport {
    pub fn set(&mut self, layer: Layer, state: LayerState) {
        match self.layers.iter_mut().find(|(l, _)| *l == layer) {
            Some(slot) => slot.1 = state,
            None => self.layers.push((layer, state)),
        }
        self.layers.sort_by_key(|(l, _)| *l);
    }

    pub fn get(&self, layer: Layer) -> Option<&LayerState> {
        self.layers.iter().find(|(l, _)| *l == layer).map(|(_, s)| s)
    }
}

/// Resource limits (hard = soft). `None` leaves a limit as inherited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
    pub address_space: Option<u64>,
    pub fsize: Option<u64>,
    /// Always 0 when the layer is applied: no core dumps.
    pub core: u64,
}

/// What the supervisor asks a worker to apply. Namespaces are applied by the supervisor at
/// spawn; their states arrive pre-filled in `from_supervisor`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfinementPlan {
    pub worker: String,
    pub policy: String,
    pub requirements: Vec<(Layer, Requirement)>,
    /// Set when the worker is in its own mount namespace and should build a minimal root.
    pub minimal_root: bool,
    /// Target ids when the worker starts as host root without a user namespace.
    pub switch_to: Option<(u32, u32)>,
    pub landlock_read: Vec<PathBuf>,
    pub landlock_write: Vec<PathBuf>,
    pub rlimits: Rlimits,
    /// States of the layers the supervisor applied (namespaces, uid mapping).
    pub from_supervisor: Vec<(Layer, LayerState)>,
    /// The policy compiled by the supervisor for this architecture, one instruction per
    /// element (`code | jt << 16 | jf << 24 | k << 32`): the exact program it will verify.
    /// Never empty when seccomp is wanted: a worker does not compile policies.
    pub seccomp_program: Vec<u64>,
    /// The worker's own state directory (also in `landlock_write`), if it has one.
    pub state_directory: Option<PathBuf>,
}

impl ConfinementPlan {
    pub fn requirement(&self, layer: Layer) -> Requirement {
        self.requirements.iter().find(|(l, _)| *l == layer).map_or(Requirement::Required, |(_, r)| *r)
    }
}

/// The symbolic name of an errno, for reports.
pub fn errno_name(n: i32) -> &'static str {
    match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::EBUSY => "EBUSY",
        libc::ENOMEM => "ENOMEM",
        libc::EMFILE => "EMFILE",
        libc::EAGAIN => "EAGAIN",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOSPC => "ENOSPC",
        libc::EUSERS => "EUSERS",
        libc::ESRCH => "ESRCH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EROFS => "EROFS",
        _ => "errno",
    }
}
