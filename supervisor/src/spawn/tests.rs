//! Spawn decisions, tested without spawning.

use std::collections::BTreeMap;

use airlock_protocol::confinement::LayerState;

use super::*;

fn config(confinement: &str) -> Config {
    // The hosts below have no cgroups: tests about other layers take the cgroup as best-effort.
    let cgroup = if confinement.contains("cgroup =") { "" } else { "cgroup = \"best-effort\"" };
    let confinement = format!("{confinement}\n{cgroup}");
    let text = format!(
        "[defaults.confinement]\n{confinement}\n[[worker]]\nname = \"a\"\nexecutable = \"x\"\npolicy = \"echo\"\n[[worker]]\nname = \"b\"\nexecutable = \"x\"\npolicy = \"echo\"\n"
    );
    crate::config::parse(&text, "t", &["echo".to_string()]).expect("valid")
}

fn host(root: bool, userns: Result<(), i32>) -> HostAbilities {
    let mut namespaces: BTreeMap<Layer, Result<(), i32>> = NAMESPACE_FLAGS.iter().map(|(l, _)| (*l, Ok(()))).collect();
    namespaces.insert(Layer::UserNamespace, userns);
    HostAbilities { root, namespaces, cgroups: crate::cgroup::Cgroups::unavailable("no v1 memory hierarchy") }
}

fn state(d: &Decision, l: Layer) -> Option<&LayerState> {
    d.plan.from_supervisor.iter().find(|(x, _)| *x == l).map(|(_, s)| s)
}

#[test]
fn a_required_namespace_the_host_refuses_names_the_layer_and_errno() {
    let cfg = config("user-namespace = \"required\"\nuid = \"off\"");
    match decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)) {
        Err(SpawnError::LayerUnavailable { layer: Layer::UserNamespace, reason }) => {
            assert!(reason.starts_with("EPERM ("), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let e = decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)).expect_err("refused").to_string();
    assert!(e.starts_with("required confinement layer user-namespace is unavailable on this host: EPERM"), "{e}");
}

#[test]
fn best_effort_namespaces_without_a_user_namespace_are_reported_unavailable_and_not_cloned() {
    let cfg = config(
        "user-namespace = \"best-effort\"\npid-namespace = \"best-effort\"\nnet-namespace = \"best-effort\"\nmount-namespace = \"best-effort\"\nipc-namespace = \"best-effort\"\nuts-namespace = \"best-effort\"\ncgroup-namespace = \"best-effort\"\nuid = \"best-effort\"",
    );
    let d = decide(&cfg, 0, &host(false, Err(libc::EPERM)), (1000, 1000)).expect("best-effort");
    assert_eq!(d.clone_flags, 0);
    assert!(!d.use_userns);
    assert!(matches!(state(&d, Layer::UserNamespace), Some(LayerState::Unavailable(w)) if w.starts_with("EPERM")));
    assert_eq!(state(&d, Layer::PidNamespace), Some(&LayerState::Unavailable("needs a user namespace or root".into())));
    assert_eq!(
        state(&d, Layer::Uid),
        Some(&LayerState::Unavailable("supervisor runs unprivileged: workers share uid 1000".into()))
    );
    assert!(!d.plan.minimal_root);
}

#[test]
fn a_required_uid_for_an_unprivileged_supervisor_is_refused() {
    let cfg = config("uid = \"required\"");
    match decide(&cfg, 1, &host(false, Ok(())), (1000, 1000)) {
        Err(SpawnError::LayerUnavailable { layer: Layer::Uid, reason }) => {
            assert_eq!(reason, "supervisor runs unprivileged: workers share uid 1000")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unprivileged_supervisor_with_user_namespaces_clones_every_namespace() {
    let cfg = config("uid = \"best-effort\"");
    let d = decide(&cfg, 0, &host(false, Ok(())), (1000, 1000)).expect("decide");
    let all = NAMESPACE_FLAGS.iter().fold(0, |f, (_, x)| f | x);
    assert_eq!(d.clone_flags, all);
    assert!(d.use_userns && d.plan.minimal_root);
    assert_eq!((d.host_uid, d.host_gid), (1000, 1000));
    assert_eq!(d.plan.switch_to, None);
}

#[test]
fn a_root_supervisor_gives_each_worker_its_dynamic_uid() {
    let cfg = config("user-namespace = \"off\"");
    let d = decide(&cfg, 1, &host(true, Ok(())), (0, 0)).expect("decide");
    let [lo, _] = cfg.supervisor.dynamic_uid_range;
    assert_eq!((d.host_uid, d.host_gid), (lo + 1, lo + 1));
    assert_eq!(d.plan.switch_to, Some((lo + 1, lo + 1)), "without a user namespace the worker switches itself");
    assert_eq!(state(&d, Layer::UserNamespace), Some(&LayerState::Off));
    assert_eq!(d.clone_flags & libc::CLONE_NEWUSER, 0);
    assert_ne!(d.clone_flags & libc::CLONE_NEWPID, 0, "root needs no user namespace for the others");
}

#[test]
fn a_required_cgroup_the_host_lacks_names_the_layer_and_why() {
    let cfg = config("cgroup = \"required\"\nuid = \"off\"");
    match decide(&cfg, 0, &host(false, Ok(())), (1000, 1000)) {
        Err(SpawnError::LayerUnavailable { layer: Layer::Cgroup, reason }) => {
            assert!(reason.contains("no v1 memory hierarchy"), "{reason}")
        }
        other => panic!("expected the cgroup layer to stop the spawn: {other:?}"),
    }
}

#[test]
fn a_best_effort_cgroup_is_reported_unavailable_and_priority_stays_wanted() {
    let cfg = config("cgroup = \"best-effort\"\nuid = \"off\"");
    let d = decide(&cfg, 0, &host(false, Ok(())), (1000, 1000)).expect("decides");
    assert!(!d.cgroup && d.priority);
    assert!(matches!(state(&d, Layer::Cgroup), Some(LayerState::Unavailable(w)) if w.contains("no v1 memory")));
    assert_eq!(state(&d, Layer::Priority), None, "applied after the clone, not decided here");
    let off = config("cgroup = \"off\"\npriority = \"off\"\nuid = \"off\"");
    let d = decide(&off, 0, &host(false, Ok(())), (1000, 1000)).expect("decides");
    assert_eq!(
        (state(&d, Layer::Cgroup), state(&d, Layer::Priority)),
        (Some(&LayerState::Off), Some(&LayerState::Off))
    );
}
