//! How a worker confines itself, layer by layer, from the plan its supervisor sent.
//!
//! Order (documented in `ARCHITECTURE.md`; the supervisor has already placed the process in
//! its namespaces and mapped its ids before exec):
//! 1. parent-death signal, and a check that the supervisor is still there;
//! 2. mount namespace: a read-only tmpfs root holding only the Landlock paths;
//! 3. uid/gid (when the supervisor is root and no user namespace is in use);
//! 4. rlimits; 5. not dumpable; 6. capabilities dropped from all five sets;
//! 7. `no_new_privs`; 8. Landlock; 9. seccomp (last: the filter only allows what serving needs).
//!
//! Each layer is `Required`, `BestEffort` or `Off`. A required layer that fails stops here with
//! an error naming the layer and the errno; a best-effort one is reported `degraded` or
//! `unavailable` with the reason. Nothing is ever silently skipped.

use airlock_protocol::confinement::{errno_name, ConfinementPlan, ConfinementReport, Layer, LayerState, Requirement};

use crate::sys;

/// A required layer could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("required confinement layer {layer} failed: {reason}")]
pub struct LayerFailed {
    pub layer: Layer,
    pub reason: String,
    pub report: ConfinementReport,
}

fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{} ({})", errno_name(n), e),
        None => e.to_string(),
    }
}

struct Applier<'a> {
    plan: &'a ConfinementPlan,
    report: ConfinementReport,
}

impl Applier<'_> {
    /// Records the outcome of `layer`; fails closed when it is required and not applied.
    fn outcome(&mut self, layer: Layer, result: Result<LayerState, String>) -> Result<(), LayerFailed> {
        let req = self.plan.requirement(layer);
        let state = match (req, result) {
            (Requirement::Off, _) => LayerState::Off,
            (_, Ok(s)) => s,
            (Requirement::BestEffort, Err(why)) => LayerState::Unavailable(why),
            (Requirement::Required, Err(why)) => {
                self.report.set(layer, LayerState::Unavailable(why.clone()));
                return Err(LayerFailed { layer, reason: why, report: self.report.clone() });
            }
        };
        if req == Requirement::Required && state != LayerState::Applied {
            let why = state.to_string();
            self.report.set(layer, state);
            return Err(LayerFailed { layer, reason: why, report: self.report.clone() });
        }
        self.report.set(layer, state);
        Ok(())
    }

    fn wants(&self, layer: Layer) -> bool {
        self.plan.requirement(layer) != Requirement::Off
    }
}

/// Applies every layer except seccomp, in the documented order. Returns the report so far.
pub fn apply_before_seccomp(plan: &ConfinementPlan) -> Result<ConfinementReport, LayerFailed> {
    let mut a = Applier { plan, report: ConfinementReport::default() };
    for (layer, state) in &plan.from_supervisor {
        let r = match state {
            LayerState::Applied => Ok(LayerState::Applied),
            LayerState::Off => Ok(LayerState::Off),
            LayerState::Degraded(w) => Ok(LayerState::Degraded(w.clone())),
            LayerState::Unavailable(w) => Err(w.clone()),
        };
        a.outcome(*layer, r)?;
    }

    // 1. Parent-death signal.
    if a.wants(Layer::ParentDeathSignal) {
        let r = sys::set_parent_death_signal().map_err(|e| errno_text(&e)).and_then(|()| {
            // In a pid namespace our parent is outside it and getppid() is 0; otherwise a
            // parent of 1 means the supervisor already died.
            if sys::getppid() == 1 && sys::getpid() != 1 {
                Err("supervisor already exited".into())
            } else {
                Ok(LayerState::Applied)
            }
        });
        a.outcome(Layer::ParentDeathSignal, r)?;
    }

    // 2. Minimal root in the private mount namespace.
    if plan.minimal_root {
        let mut binds: Vec<(&std::path::Path, bool)> = Vec::new();
        for p in &plan.landlock_read {
            if p.exists() {
                binds.push((p.as_path(), false));
            }
        }
        for p in &plan.landlock_write {
            if p.exists() {
                binds.push((p.as_path(), true));
            }
        }
        let r = sys::enter_minimal_root(&binds)
            .map(|()| LayerState::Applied)
            .map_err(|e| format!("minimal root: {}", errno_text(&e)));
        a.outcome(Layer::MountNamespace, r)?;
        if plan.requirement(Layer::UtsNamespace) != Requirement::Off
            && matches!(a.report.get(Layer::UtsNamespace), Some(LayerState::Applied))
        {
            let _ = sys::set_hostname("airlock-worker");
        }
    }

    // 3. Own uid/gid (root supervisor without a user namespace).
    if let Some((uid, gid)) = plan.switch_to {
        let r = sys::switch_ids(uid, gid)
            .map(|()| LayerState::Applied)
            .map_err(|e| format!("setresuid({uid}): {}", errno_text(&e)));
        a.outcome(Layer::Uid, r)?;
    }

    // 4. Resource limits.
    if a.wants(Layer::Rlimits) {
        let l = &plan.rlimits;
        let mut r: Result<(), String> =
            sys::set_rlimit(libc::RLIMIT_CORE, l.core).map_err(|e| format!("RLIMIT_CORE: {}", errno_text(&e)));
        let pairs = [
            (libc::RLIMIT_NOFILE, l.nofile, "RLIMIT_NOFILE"),
            (libc::RLIMIT_NPROC, l.nproc, "RLIMIT_NPROC"),
            (libc::RLIMIT_AS, l.address_space, "RLIMIT_AS"),
            (libc::RLIMIT_FSIZE, l.fsize, "RLIMIT_FSIZE"),
        ];
        for (res, v, name) in pairs {
            if let (Ok(()), Some(v)) = (&r, v) {
                r = sys::set_rlimit(res, v).map_err(|e| format!("{name}: {}", errno_text(&e)));
            }
        }
        a.outcome(Layer::Rlimits, r.map(|()| LayerState::Applied))?;
    }

    // 5. Not dumpable.
    if a.wants(Layer::NotDumpable) {
        let r = sys::set_not_dumpable().map(|()| LayerState::Applied).map_err(|e| errno_text(&e));
        a.outcome(Layer::NotDumpable, r)?;
    }

    // 6. Capabilities: all five sets.
    if a.wants(Layer::Capabilities) {
        let r = drop_capabilities();
        a.outcome(Layer::Capabilities, r)?;
    }

    // 7. no_new_privs.
    if a.wants(Layer::NoNewPrivs) {
        let r = sys::set_no_new_privs().map(|()| LayerState::Applied).map_err(|e| errno_text(&e));
        a.outcome(Layer::NoNewPrivs, r)?;
    }

    // 8. Landlock.
    if a.wants(Layer::Landlock) {
        let r = apply_landlock(plan);
        a.outcome(Layer::Landlock, r)?;
    }
    Ok(a.report)
}

fn drop_capabilities() -> Result<LayerState, String> {
    use caps::CapSet;
    let mut notes = Vec::new();
    // The bounding set first (needs CAP_SETPCAP, which we lose last).
    if let Err(e) = caps::clear(None, CapSet::Bounding) {
        let still = caps::read(None, CapSet::Bounding).map(|s| s.len()).unwrap_or(usize::MAX);
        if still != 0 {
            notes.push(format!("bounding set kept ({still} caps): {e}; harmless under no_new_privs"));
        }
    }
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| format!("clearing {set:?}: {e}"))?;
    }
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let left = caps::read(None, set).map_err(|e| format!("reading {set:?}: {e}"))?;
        if !left.is_empty() {
            return Err(format!("{set:?} still holds {} capabilities", left.len()));
        }
    }
    if notes.is_empty() {
        Ok(LayerState::Applied)
    } else {
        Ok(LayerState::Degraded(notes.join("; ")))
    }
}

fn apply_landlock(plan: &ConfinementPlan) -> Result<LayerState, String> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let level = match plan.requirement(Layer::Landlock) {
        Requirement::Required => CompatLevel::SoftRequirement,
        _ => CompatLevel::BestEffort,
    };
    let build = || -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
        Ruleset::default()
            .set_compatibility(level)
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(&plan.landlock_read, AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(&plan.landlock_write, AccessFs::from_all(abi)))?
            .restrict_self()
    };
    match build() {
        Ok(st) => match st.ruleset {
            RulesetStatus::FullyEnforced => Ok(LayerState::Applied),
            RulesetStatus::PartiallyEnforced => {
                Ok(LayerState::Degraded("kernel supports an older Landlock ABI than v6".into()))
            }
            RulesetStatus::NotEnforced => Err("Landlock is not supported or not enabled by this kernel".into()),
        },
        Err(e) => Err(format!("landlock: {e}")),
    }
}

/// Compiles and installs the worker's seccomp policy (the last layer).
pub fn apply_seccomp(plan: &ConfinementPlan, report: &mut ConfinementReport) -> Result<(), LayerFailed> {
    let req = plan.requirement(Layer::Seccomp);
    if req == Requirement::Off {
        report.set(Layer::Seccomp, LayerState::Off);
        return Ok(());
    }
    let result = (|| -> Result<(), String> {
        // The supervisor compiles the policy and sends the program it will compare with what
        // the kernel holds; a worker never compiles (nor carries) policy files.
        if plan.seccomp_program.is_empty() {
            return Err(format!("the plan carries no compiled program for policy {}", plan.policy));
        }
        let prog = airlock_policy_core::unpack_program(&plan.seccomp_program);
        sys::install_sigsys_reporter(&plan.policy).map_err(|e| format!("SIGSYS handler: {e}"))?;
        airlock_policy_core::install(&prog).map_err(|e| e.to_string())
    })();
    match (req, result) {
        (_, Ok(())) => {
            report.set(Layer::Seccomp, LayerState::Applied);
            Ok(())
        }
        (Requirement::BestEffort, Err(why)) => {
            report.set(Layer::Seccomp, LayerState::Unavailable(why));
            Ok(())
        }
        (_, Err(why)) => {
            report.set(Layer::Seccomp, LayerState::Unavailable(why.clone()));
            Err(LayerFailed { layer: Layer::Seccomp, reason: why, report: report.clone() })
        }
    }
}
