//! Verifying a worker's confinement from outside, before any work is routed to it: what its
//! report claims must be what `/proc/PID/status` shows (and, where the supervisor holds the
//! privilege, the installed seccomp filter must be exactly the compiled policy).
//! A disagreement is a security event: the caller kills the worker.

use airlock_protocol::confinement::{ConfinementPlan, ConfinementReport, Layer, LayerState, Requirement, Rlimits};

/// The fields of `/proc/PID/status` that confinement is judged by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved, filesystem uid as seen from the supervisor's user namespace.
    pub uid: [u32; 4],
    /// The same for gids.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    /// `Seccomp_filters` (Linux 5.9 and later): how many filters the process carries,
    /// inherited ones included.
    pub seccomp_filters: Option<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> Result<ProcStatus, String> {
    let mut s = ProcStatus::default();
    let mut seen = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|e| format!("{k}: {e}"));
        match k {
            "Uid" => {
                let ids: Vec<u32> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                if ids.len() != 4 {
                    return Err(format!("Uid line malformed: {v:?}"));
                }
                s.uid = [ids[0], ids[1], ids[2], ids[3]];
                seen += 1;
            }
            "Gid" => {
                let ids: Vec<u32> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                if ids.len() != 4 {
                    return Err(format!("Gid line malformed: {v:?}"));
                }
                s.gid = [ids[0], ids[1], ids[2], ids[3]];
            }
            "Groups" => s.groups = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "NoNewPrivs" => {
                s.no_new_privs = v == "1";
                seen += 1;
            }
            "Seccomp" => {
                s.seccomp = v.parse().map_err(|e| format!("Seccomp: {e}"))?;
                seen += 1;
            }
            "Seccomp_filters" => s.seccomp_filters = v.parse().ok(),
            "CapInh" => s.cap_inh = hex(v)?,
            "CapPrm" => s.cap_prm = hex(v)?,
            "CapEff" => s.cap_eff = hex(v)?,
            "CapBnd" => s.cap_bnd = hex(v)?,
            "CapAmb" => s.cap_amb = hex(v)?,
            _ => {}
        }
    }
    if seen < 3 {
        return Err("status lacks Uid, NoNewPrivs or Seccomp".into());
    }
    Ok(s)
}

/// What the report promises, in checkable form.
#[derive(Debug, Clone)]
pub struct Expectations {
    pub uid: u32,
    pub gid: u32,
    /// The uid layer is applied: the worker has its own ids and no supplementary groups.
    pub own_ids: bool,
    /// The rlimits the plan sets, when that layer is applied or required.
    pub rlimits: Option<Rlimits>,
    pub seccomp: bool,
    pub no_new_privs: bool,
    pub caps_cleared: bool,
    pub bounding_cleared: bool,
    /// Whether this supervisor may read the installed filter (root).
    pub read_filter: bool,
    pub policy: String,
    /// Claims the report makes that the supervisor knows to be false (a required layer it does
    /// not claim, a namespace or uid state the supervisor set otherwise): mismatches by
    /// themselves.
    pub contradictions: Vec<String>,
    /// How many seccomp filters the supervisor itself carries (from a container runtime or a
    /// systemd unit), which the worker inherits: its own filter must come on top.
    pub inherited_filters: Option<u32>,
}

impl Expectations {
    /// What to check: every layer the report claims, and every layer the plan requires whatever
    /// the report claims (a worker that says `off` for a required seccomp is checked for it).
    /// `from_supervisor` holds the states of the layers the supervisor applied itself
    /// (namespaces, uid mapping): the report must not claim better.
    pub fn from_report(
        report: &ConfinementReport,
        plan: &ConfinementPlan,
        ids: (u32, u32),
        privileged: bool,
    ) -> Expectations {
        let required = |l| plan.requirement(l) == Requirement::Required;
        let from_supervisor = &plan.from_supervisor;
        let applied = |l| matches!(report.get(l), Some(LayerState::Applied)) || required(l);
        let says = |l| report.get(l).map_or("nothing".to_string(), |s| s.to_string());
        // The worker fails any required layer it cannot fully apply, so anything but
        // `applied` for one is a lie (a claimed `degraded` would skip the bounding-set check).
        let mut contradictions: Vec<String> = Layer::ALL
            .into_iter()
            .filter(|&l| required(l) && !matches!(report.get(l), Some(LayerState::Applied)))
            .map(|l| format!("{} is required, the report says {}", l.name(), says(l)))
            .collect();
        for (l, ours) in from_supervisor {
            // The worker may only degrade what the supervisor applied (a minimal root it could
            // not build); it cannot have applied what the supervisor did not.
            if !matches!(ours, LayerState::Applied) && report.get(*l) != Some(ours) {
                contradictions.push(format!("report says {} {}, airlockd set it {ours}", l.name(), says(*l)));
            }
        }
        let caps = report.get(Layer::Capabilities);
        Expectations {
            uid: ids.0,
            gid: ids.1,
            own_ids: applied(Layer::Uid),
            rlimits: applied(Layer::Rlimits).then(|| plan.rlimits.clone()),
            seccomp: applied(Layer::Seccomp),
            no_new_privs: applied(Layer::NoNewPrivs),
            caps_cleared: applied(Layer::Capabilities) || matches!(caps, Some(LayerState::Degraded(_))),
            bounding_cleared: applied(Layer::Capabilities),
            read_filter: privileged && crate::sys::euid() == 0,
            policy: plan.policy.clone(),
            contradictions,
            inherited_filters: own_seccomp_filters(),
        }
    }
}

/// `Seccomp_filters` of this process: filters its children inherit.
fn own_seccomp_filters() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&text).ok()?.seccomp_filters
}

/// The compiled program of `policy` for this machine, compiled once per process.
pub fn compiled(policy: &str) -> Result<std::sync::Arc<airlock_policies::BpfProgram>, airlock_policies::PolicyError> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<airlock_policies::BpfProgram>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(policy).cloned()) {
        return Ok(p);
    }
    let prog = Arc::new(airlock_policies::embedded().compile(policy, airlock_policies::Arch::native())?);
    if let Ok(mut c) = cache.lock() {
        c.insert(policy.to_string(), Arc::clone(&prog));
    }
    Ok(prog)
}

/// Checks a parsed status against the expectations; returns every mismatch.
pub fn check(s: &ProcStatus, e: &Expectations) -> Vec<String> {
    let mut bad = e.contradictions.clone();
    if s.uid.iter().any(|&u| u != e.uid) {
        bad.push(format!("uids {:?}, expected all {}", s.uid, e.uid));
    }
    if s.gid.iter().any(|&g| g != e.gid) {
        bad.push(format!("gids {:?}, expected all {}", s.gid, e.gid));
    }
    if e.own_ids && !s.groups.is_empty() {
        bad.push(format!("report says uid applied, status says Groups: {:?}", s.groups));
    }
    if e.seccomp && s.seccomp != 2 {
        bad.push(format!("report says seccomp applied, status says Seccomp: {}", s.seccomp));
    } else if let (true, Some(theirs), Some(ours)) = (e.seccomp, s.seccomp_filters, e.inherited_filters) {
        if theirs <= ours {
            bad.push(format!(
                "report says seccomp applied, but the worker carries no filter of its own (Seccomp_filters: {theirs}, inherited from airlockd: {ours})"
            ));
        }
    }
    if e.no_new_privs && !s.no_new_privs {
        bad.push("report says no_new_privs applied, status says NoNewPrivs: 0".into());
    }
    if e.caps_cleared {
        for (name, v) in [("CapInh", s.cap_inh), ("CapPrm", s.cap_prm), ("CapEff", s.cap_eff), ("CapAmb", s.cap_amb)] {
            if v != 0 {
                bad.push(format!("report says capabilities dropped, status says {name}: {v:016x}"));
            }
        }
    }
    if e.bounding_cleared && s.cap_bnd != 0 {
        bad.push(format!("report says bounding set cleared, status says CapBnd: {:016x}", s.cap_bnd));
    }
    bad
}

/// Checks the text of `/proc/PID/limits` against the limits the plan set (soft and hard).
pub fn check_limits(text: &str, want: &Rlimits) -> Vec<String> {
    let mut bad = Vec::new();
    for (row, value) in [
        ("Max core file size", Some(want.core)),
        ("Max open files", want.nofile),
        ("Max processes", want.nproc),
        ("Max address space", want.address_space),
        ("Max file size", want.fsize),
    ] {
        let Some(value) = value else { continue };
        let got: Vec<&str> = text
            .lines()
            .find_map(|l| l.strip_prefix(row))
            .map(|r| r.split_whitespace().take(2).collect())
            .unwrap_or_default();
        if got != [value.to_string(), value.to_string()] {
            bad.push(format!("report says rlimits applied, /proc limits say {row}: {got:?}, expected {value}"));
        }
    }
    bad
}

/// Reads `/proc/PID/status` (and, where privileged, the installed filter) and checks it.
/// Returns informational notes; `Err` lists the mismatches.
pub fn verify(pid: i32, e: &Expectations) -> Result<Vec<String>, String> {
    // Every thread: confinement is per thread, and a worker that confined only its main
    // thread would otherwise pass. And no children: a process forked before confinement
    // would be a second, unverified worker.
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|err| format!("reading /proc/{pid}/task: {err}"))?;
    let mut bad = Vec::new();
    for task in tasks {
        let task = task.map_err(|err| format!("reading /proc/{pid}/task: {err}"))?;
        let tid = task.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(task.path().join("status"))
            .map_err(|err| format!("reading /proc/{pid}/task/{tid}/status: {err}"))?;
        let s = parse_status(&text)?;
        let main = tid == pid.to_string();
        // The report's contradictions are the process's, said once (with the main thread).
        let found = check(&s, e).into_iter().filter(|b| main || !e.contradictions.contains(b));
        bad.extend(found.map(|b| if main { b } else { format!("thread {tid}: {b}") }));
        if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
            if !children.trim().is_empty() {
                bad.push(format!("thread {tid} has child processes ({})", children.trim()));
            }
        }
    }
    if let Some(want) = &e.rlimits {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .map_err(|err| format!("reading /proc/{pid}/limits: {err}"))?;
        bad.extend(check_limits(&limits, want));
    }
    if !bad.is_empty() {
        return Err(bad.join("; "));
    }
    let mut notes = Vec::new();
    if e.seccomp {
        if e.read_filter {
            let expected = compiled(&e.policy).map_err(|err| format!("compiling policy {}: {err}", e.policy))?;
            match airlock_policies::read_installed_filters(pid).and_then(|fs| {
                if fs.iter().any(|f| f[..] == expected[..]) {
                    Ok(())
                } else {
                    // Name what is installed instead, for the security event.
                    let set = airlock_policies::embedded();
                    let named = fs.iter().find_map(|f| {
                        airlock_policies::matching_policy(set, airlock_policies::Arch::native(), f).ok().flatten()
                    });
                    Err(airlock_policies::PolicyError::MatchFilter {
                        pid,
                        policy: e.policy.clone(),
                        arch: airlock_policies::Arch::native(),
                        found: match named {
                            Some(n) => format!("policy {n}"),
                            None => match fs.first() {
                                Some(f) => format!(
                                    "{} filter(s) matching no shipped policy; the newest: {}",
                                    fs.len(),
                                    airlock_policies::verify::describe_filter(set, airlock_policies::Arch::native(), f)
                                        .unwrap_or_else(|e| e.to_string())
                                ),
                                None => "no seccomp filter".to_string(),
                            },
                        },
                    })
                }
            }) {
                Ok(()) => notes.push(format!("installed seccomp filter is exactly policy {}", e.policy)),
                // Missing privilege (no CAP_SYS_ADMIN in the initial namespace, or the
                // supervisor itself runs under a seccomp filter, as in a container) is not a
                // mismatch: say what was not checked.
                Err(err @ airlock_policies::PolicyError::ReadFilterDenied { .. }) => {
                    notes.push(format!("installed filter not compared: {err}"))
                }
                Err(err) => return Err(format!("installed seccomp filter: {err}")),
            }
        } else {
            notes.push("installed filter not compared: needs CAP_SYS_ADMIN".into());
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFINED: &str = "Name:\tx\nUid:\t61000\t61000\t61000\t61000\nGid:\t61000\t61000\t61000\t61000\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    /// A plan requiring `required` (everything else best-effort), with the supervisor's states.
    fn plan(required: &[Layer], from_supervisor: Vec<(Layer, LayerState)>) -> ConfinementPlan {
        ConfinementPlan {
            worker: "w".into(),
            policy: "echo".into(),
            requirements: Layer::ALL
                .iter()
                .map(|l| (*l, if required.contains(l) { Requirement::Required } else { Requirement::BestEffort }))
                .collect(),
            from_supervisor,
            ..ConfinementPlan::default()
        }
    }

    fn expect() -> Expectations {
        Expectations {
            uid: 61000,
            gid: 61000,
            own_ids: true,
            rlimits: None,
            seccomp: true,
            no_new_privs: true,
            caps_cleared: true,
            bounding_cleared: true,
            read_filter: false,
            policy: "echo".into(),
            contradictions: Vec::new(),
            inherited_filters: Some(0),
        }
    }

    #[test]
    fn confined_status_passes() {
        let s = parse_status(CONFINED).expect("parse");
        assert!(check(&s, &expect()).is_empty());
    }

    #[test]
    fn each_lie_is_caught() {
        for (from, to, what) in [
            ("Seccomp:\t2", "Seccomp:\t0", "Seccomp"),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs"),
            ("CapEff:\t0000000000000000", "CapEff:\t0000000000200000", "CapEff"),
            ("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff", "CapBnd"),
            ("Uid:\t61000\t61000\t61000\t61000", "Uid:\t61000\t0\t61000\t61000", "uids"),
            ("Gid:\t61000\t61000\t61000\t61000", "Gid:\t61000\t0\t61000\t61000", "gids"),
            ("Gid:\t61000\t61000\t61000\t61000\n", "Gid:\t61000\t61000\t61000\t61000\nGroups:\t0 27\n", "Groups"),
        ] {
            let s = parse_status(&CONFINED.replace(from, to)).expect("parse");
            let bad = check(&s, &expect());
            assert!(bad.iter().any(|b| b.contains(what)), "{what}: {bad:?}");
        }
    }

    #[test]
    fn a_required_layer_is_checked_whatever_the_report_says() {
        let mut report = ConfinementReport::default();
        report.set(Layer::Seccomp, LayerState::Off);
        report.set(Layer::NoNewPrivs, LayerState::Applied);
        let e = Expectations::from_report(
            &report,
            &plan(&[Layer::Seccomp, Layer::NoNewPrivs], vec![]),
            (61000, 61000),
            false,
        );
        assert!(e.seccomp, "required seccomp is expected in /proc even when the report says off");
        assert_eq!(e.contradictions, vec!["seccomp is required, the report says off".to_string()]);
        let s = parse_status(&CONFINED.replace("Seccomp:\t2", "Seccomp:\t0")).expect("parse");
        let bad = check(&s, &e);
        assert!(bad.iter().any(|b| b.contains("seccomp is required")), "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("status says Seccomp: 0")), "{bad:?}");
        // Not required and reported off: nothing to check.
        let e = Expectations::from_report(&report, &plan(&[Layer::NoNewPrivs], vec![]), (61000, 61000), false);
        assert!(!e.seccomp && e.contradictions.is_empty());
        // A required layer claimed only `degraded` is a lie: the worker fails such a layer.
        report.set(Layer::Capabilities, LayerState::Degraded("bounding set kept".into()));
        let e = Expectations::from_report(&report, &plan(&[Layer::Capabilities], vec![]), (61000, 61000), false);
        assert!(e.bounding_cleared, "a required capabilities layer is checked in full");
        assert_eq!(
            e.contradictions,
            vec!["capabilities is required, the report says degraded (bounding set kept)".to_string()]
        );
    }

    #[test]
    fn a_namespace_airlockd_did_not_create_cannot_be_claimed() {
        let mut report = ConfinementReport::default();
        report.set(Layer::UserNamespace, LayerState::Applied);
        report.set(Layer::PidNamespace, LayerState::Applied);
        report.set(Layer::MountNamespace, LayerState::Degraded("no minimal root".into()));
        let ours = [
            (Layer::UserNamespace, LayerState::Unavailable("EPERM".into())),
            (Layer::PidNamespace, LayerState::Applied),
            (Layer::MountNamespace, LayerState::Applied),
        ];
        let e = Expectations::from_report(&report, &plan(&[], ours.to_vec()), (61000, 61000), false);
        assert_eq!(
            e.contradictions,
            vec!["report says user-namespace applied, airlockd set it unavailable (EPERM)".to_string()]
        );
    }

    #[test]
    fn an_inherited_filter_is_not_the_workers_own() {
        let s = parse_status(&CONFINED.replace("Seccomp_filters:\t1", "Seccomp_filters:\t2")).expect("parse");
        let mut e = expect();
        e.inherited_filters = Some(2);
        let bad = check(&s, &e);
        assert!(
            bad.iter().any(|b| b.contains("no filter of its own (Seccomp_filters: 2, inherited from airlockd: 2)")),
            "{bad:?}"
        );
        e.inherited_filters = Some(1);
        assert!(check(&s, &e).is_empty());
        e.inherited_filters = None; // a kernel without Seccomp_filters: not checked
        assert!(check(&parse_status(&CONFINED.replace("Seccomp_filters:\t1\n", "")).expect("parse"), &e).is_empty());
    }

    #[test]
    fn limits_are_checked_soft_and_hard() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\nMax core file size        0                    0                    bytes\nMax open files            64                   64                   files\nMax processes             512                  4096                 processes\n";
        let want = Rlimits { nofile: Some(64), nproc: Some(512), address_space: None, fsize: None, core: 0 };
        assert_eq!(
            check_limits(text, &want),
            vec!["report says rlimits applied, /proc limits say Max processes: [\"512\", \"4096\"], expected 512"
                .to_string()]
        );
        assert!(check_limits(&text.replace("4096      ", "512       "), &want).is_empty());
    }

    #[test]
    fn malformed_status_is_an_error() {
        assert!(parse_status("Name: x\n").is_err());
        assert!(parse_status("Uid: 1 2\nNoNewPrivs: 1\nSeccomp: 2\n").is_err());
    }
}
