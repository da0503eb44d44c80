//! What the host lets the supervisor do (probed once), and the decisions for one worker
//! before it is cloned: namespaces, ids, the confinement plan. Pure, testable without a spawn.

use std::collections::BTreeMap;

use airlock_protocol::confinement::{ConfinementPlan, Layer, LayerState, Requirement, Rlimits};

use crate::cgroup::Cgroups;
use crate::config::{Config, UidSpec, WorkerLimits};
use crate::sys;

use super::SpawnError;

/// What this host lets the supervisor do, probed once at start.
#[derive(Debug, Clone)]
pub struct HostAbilities {
    pub root: bool,
    /// For each namespace layer: usable (Ok) or the errno that refused it.
    pub namespaces: BTreeMap<Layer, Result<(), i32>>,
    /// Per-worker cgroups, or why there are none.
    pub cgroups: Cgroups,
}

pub const NAMESPACE_FLAGS: [(Layer, libc::c_int); 7] = [
    (Layer::UserNamespace, libc::CLONE_NEWUSER),
    (Layer::PidNamespace, libc::CLONE_NEWPID),
    (Layer::NetNamespace, libc::CLONE_NEWNET),
    (Layer::MountNamespace, libc::CLONE_NEWNS),
    (Layer::IpcNamespace, libc::CLONE_NEWIPC),
    (Layer::UtsNamespace, libc::CLONE_NEWUTS),
    (Layer::CgroupNamespace, libc::CLONE_NEWCGROUP),
];

impl HostAbilities {
    pub fn probe() -> HostAbilities {
        let root = sys::euid() == 0;
        let user = sys::can_clone(libc::CLONE_NEWUSER);
        let mut namespaces = BTreeMap::new();
        namespaces.insert(Layer::UserNamespace, user);
        for (layer, flag) in NAMESPACE_FLAGS.iter().skip(1) {
            // With a user namespace, the others come with it; without, only root has them.
            let with_user = user.is_ok() && sys::can_clone(libc::CLONE_NEWUSER | flag).is_ok();
            let alone = sys::can_clone(*flag);
            let r = if with_user || alone.is_ok() { Ok(()) } else { alone };
            namespaces.insert(*layer, r);
        }
        let (cgroups, cleaned) = Cgroups::probe();
        for c in cleaned {
            tracing::info!(cgroup = %c, "removed a stale worker cgroup left by an airlockd that is gone");
        }
        HostAbilities { root, namespaces, cgroups }
    }
}

fn errno_str(n: i32) -> String {
    format!("{} ({})", airlock_protocol::confinement::errno_name(n), std::io::Error::from_raw_os_error(n))
}

/// The decisions for one worker before it is cloned.
#[derive(Debug, Clone)]
pub struct Decision {
    pub clone_flags: libc::c_int,
    pub use_userns: bool,
    pub host_uid: u32,
    pub host_gid: u32,
    pub plan: ConfinementPlan,
    /// The worker gets its own cgroup (the `cgroup` layer is wanted and the host has them).
    pub cgroup: bool,
    /// Its priority and OOM score are set (the `priority` layer is wanted).
    pub priority: bool,
    pub limits: WorkerLimits,
}

/// Decides namespaces, ids and the plan for `w`. Pure: testable without spawning.
pub fn decide(cfg: &Config, index: usize, host: &HostAbilities, self_ids: (u32, u32)) -> Result<Decision, SpawnError> {
    let w = &cfg.workers[index];
    let req = |l| cfg.requirement(w, l);
    let mut from_sup: Vec<(Layer, LayerState)> = Vec::new();
    let mut flags = 0;
    let userns_ok = host.namespaces.get(&Layer::UserNamespace).copied().unwrap_or(Err(libc::ENOSYS));
    let use_userns = req(Layer::UserNamespace) != Requirement::Off && userns_ok.is_ok();
    for (layer, flag) in NAMESPACE_FLAGS {
        let r = req(layer);
        if r == Requirement::Off {
            from_sup.push((layer, LayerState::Off));
            continue;
        }
        let avail = host.namespaces.get(&layer).copied().unwrap_or(Err(libc::ENOSYS));
        // Other namespaces need either root or our user namespace.
        let usable = match avail {
            Ok(()) if layer == Layer::UserNamespace || host.root || use_userns => Ok(()),
            Ok(()) => Err("needs a user namespace or root".to_string()),
            Err(n) => Err(errno_str(n)),
        };
        match usable {
            Ok(()) => {
                flags |= flag;
                from_sup.push((layer, LayerState::Applied));
            }
            Err(why) if r == Requirement::Required => return Err(SpawnError::LayerUnavailable { layer, reason: why }),
            Err(why) => from_sup.push((layer, LayerState::Unavailable(why))),
        }
    }
    // Host ids.
    let [lo, _] = cfg.supervisor.dynamic_uid_range;
    let (host_uid, host_gid, switch_to, uid_state) = if host.root {
        let uid = match &w.uid {
            Some(UidSpec::Fixed(u)) => *u,
            _ => lo + index as u32,
        };
        let gid = w.gid.unwrap_or(uid);
        if use_userns {
            (uid, gid, None, Ok(LayerState::Applied))
        } else {
            (uid, gid, Some((uid, gid)), Ok(LayerState::Applied))
        }
    } else {
        let why = format!("supervisor runs unprivileged: workers share uid {}", self_ids.0);
        (self_ids.0, self_ids.1, None, Err(why))
    };
    match (req(Layer::Uid), uid_state) {
        (Requirement::Off, _) => from_sup.push((Layer::Uid, LayerState::Off)),
        (_, Ok(s)) if switch_to.is_none() => from_sup.push((Layer::Uid, s)),
        (_, Ok(_)) => {} // applied by the worker itself (setresuid), reported by it
        (Requirement::Required, Err(why)) => {
            return Err(SpawnError::LayerUnavailable { layer: Layer::Uid, reason: why })
        }
        (Requirement::BestEffort, Err(why)) => from_sup.push((Layer::Uid, LayerState::Unavailable(why))),
    }
    // The cgroup and the priority are applied after the clone, and their states added then.
    let cgroup = match (req(Layer::Cgroup), host.cgroups.unavailable_reason()) {
        (Requirement::Off, _) => {
            from_sup.push((Layer::Cgroup, LayerState::Off));
            false
        }
        (_, None) => true,
        (Requirement::Required, Some(why)) => {
            return Err(SpawnError::LayerUnavailable { layer: Layer::Cgroup, reason: why.to_string() })
        }
        (Requirement::BestEffort, Some(why)) => {
            from_sup.push((Layer::Cgroup, LayerState::Unavailable(why.to_string())));
            false
        }
    };
    let priority = req(Layer::Priority) != Requirement::Off;
    if !priority {
        from_sup.push((Layer::Priority, LayerState::Off));
    }
    let rl = cfg.rlimits(w);
    let plan = ConfinementPlan {
        worker: w.name.get_ref().clone(),
        policy: w.policy.get_ref().clone(),
        requirements: Layer::ALL.iter().map(|l| (*l, req(*l))).collect(),
        minimal_root: flags & libc::CLONE_NEWNS != 0,
        switch_to: if req(Layer::Uid) == Requirement::Off { None } else { switch_to },
        landlock_read: w.landlock.read.clone(),
        landlock_write: w.landlock.write.clone(),
        rlimits: Rlimits {
            nofile: Some(rl.nofile),
            nproc: Some(rl.nproc),
            address_space: Some(rl.address_space_mib << 20),
            fsize: Some(rl.file_size_mib << 20),
            core: 0,
        },
        from_supervisor: from_sup,
        seccomp_program: Vec::new(),
        state_directory: cfg.worker_state_directory(w),
    };
    let mut plan = plan;
    if let Some(dir) = &plan.state_directory {
        plan.landlock_write.push(dir.clone());
    }
    Ok(Decision { clone_flags: flags, use_userns, host_uid, host_gid, plan, cgroup, priority, limits: cfg.limits(w) })
}
