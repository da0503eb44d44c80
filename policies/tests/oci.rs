//! The OCI export, accepted by a real OCI runtime: rootless podman (through
//! `run-unprivileged`, `RUN_UNPRIVILEGED_SECCOMP=<exported profile>`) runs this
//! binary as an echo worker under the exported `echo` profile (plus `common/oci-start.toml`,
//! which lets the runtime exec it and the program start). The worker receives its channel and
//! keys through the real hand-off (`--preserve-fds`), echoes messages and sealed bulk payloads
//! back to this process outside the container, and exits 0; a second run makes a syscall the
//! policy forbids and must die by SIGSYS (podman reports 128 + 31 = 159).
//!
//! No libtest harness: `main` is both the driver and, with `AIRLOCK_OCI_PROBE` set, the probe,
//! so the profile only has to allow what a plain Rust program does. The driver needs root (to
//! set up rootless podman for an unprivileged runner user); elsewhere it says why it skips.
//! The runner is `$AIRLOCK_SHARED/run-unprivileged`, else in the `shared` directory beside the
//! repository (as for `.ci/run`); with `CI=true`, a missing runner fails the test.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use airlock_policies::{embedded, export, Arch, PolicySet};
use airlock_protocol::{handoff, BulkMode, BulkWriter, Hello, Limits, Role, DEFAULT_REKEY_INTERVAL};
use serde::{Deserialize, Serialize};

const PROBE: &str = "AIRLOCK_OCI_PROBE";
const START_GROUP: &str = "common/oci-start.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Sum(u64),
    Stop,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

fn main() {
    if let Ok(what) = std::env::var(PROBE) {
        common::exit(probe(&what));
    }
    match drive() {
        Ok(Some(skip)) => println!("test oci ... skipped: {skip}"),
        Ok(None) => println!("test oci ... ok"),
        Err(e) => {
            eprintln!("test oci ... FAILED: {e}");
            std::process::exit(1);
        }
    }
}

/// Inside the container, under the exported profile from the first instruction.
fn probe(what: &str) -> i32 {
    match what {
        "worker" => match echo_worker() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("oci probe worker: {e}");
                1
            }
        },
        forbidden => {
            let args = match forbidden {
                "socket" => [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
                _ => [u64::MAX; 6],
            };
            let Some(nr) = airlock_policies::syscalls::number(Arch::native(), forbidden) else { return 201 };
            match common::raw_syscall(nr, args) {
                Ok(_) => 200,
                Err(errno) => errno,
            }
        }
    }
}

fn echo_worker() -> Result<(), String> {
    let e = |x: airlock_protocol::ChannelError| x.to_string();
    let mut ch = handoff::take_inherited(Limits::default()).map_err(e)?;
    ch.handshake(&Hello::new(Role::Worker, "oci-echo")).map_err(e)?;
    loop {
        let r = ch.recv::<Msg>().map_err(e)?;
        match (r.msg, r.bulk) {
            (Msg::Stop, _) => return Ok(()),
            (Msg::Ping(n), Some(bulk)) => ch.send(&Msg::Sum(checksum(&bulk) ^ n)).map_err(e)?,
            (Msg::Ping(n), None) => ch.send(&Msg::Ping(n)).map_err(e)?,
            (m, _) => return Err(format!("unexpected {m:?}")),
        }
    }
}

/// `$AIRLOCK_SHARED/run-unprivileged`, else `run-unprivileged` in the `shared` directory next
/// to the repository.
fn runner() -> PathBuf {
    let shared = match std::env::var_os("AIRLOCK_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let repository = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
            repository.parent().unwrap_or(repository).join("shared")
        }
    };
    shared.join("run-unprivileged")
}

fn podman_usable() -> Result<(), String> {
    let runner = runner();
    let out = Command::new(&runner)
        .arg("/bin/true")
        .env("RUN_UNPRIVILEGED_MODE", "podman")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", runner.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("rootless podman is not usable here: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn write_profile(dir: &Path) -> Result<PathBuf, String> {
    // AIRLOCK_OCI_TEST_POLICIES=DIR tries a policy tree without rebuilding (policy work).
    let set = match std::env::var_os("AIRLOCK_OCI_TEST_POLICIES") {
        Some(d) => PolicySet::load_dir(d).map_err(|e| e.to_string())?,
        None => embedded().clone(),
    };
    let policy = set.with_groups("echo", &[START_GROUP.to_string()]).map_err(|e| e.to_string())?;
    let profile = export::oci(&policy, &Arch::ALL).map_err(|e| e.to_string())?;
    // Static check of the very file podman reads: the default is echo's and ends the process
    // (kill, or trap without a handler), and every name in it has a rule in echo or the
    // start-up group (compile.rs checks the semantics call by call).
    let default = profile["defaultAction"].as_str().unwrap_or_default();
    if default != export::oci_action(policy.default_action)
        || !matches!(default, "SCMP_ACT_KILL_PROCESS" | "SCMP_ACT_TRAP")
    {
        return Err(format!("default action {default}"));
    }
    let ruled: std::collections::BTreeSet<&str> = policy.rules.iter().map(|r| r.syscall.as_str()).collect();
    for entry in profile["syscalls"].as_array().ok_or("no syscalls")? {
        for n in entry["names"].as_array().ok_or("no names")? {
            let n = n.as_str().ok_or("name is not a string")?;
            if !ruled.contains(n) {
                return Err(format!("exported profile allows {n}, which neither echo nor {START_GROUP} names"));
            }
        }
    }
    let path = dir.join("echo-oci.json");
    let text = serde_json::to_string_pretty(&profile).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
    Ok(path)
}

fn container(profile: &Path, what: &str, extra_podman: &str) -> Command {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut cmd = Command::new(runner());
    cmd.arg(exe)
        .env(PROBE, what)
        .env("RUN_UNPRIVILEGED_MODE", "podman")
        .env("RUN_UNPRIVILEGED_SECCOMP", profile)
        .env("RUN_UNPRIVILEGED_INIT", "0")
        .env("RUN_UNPRIVILEGED_ENV", PROBE)
        .env("RUN_UNPRIVILEGED_PODMAN_ARGS", format!("--security-opt no-new-privileges {extra_podman}"))
        .stdin(Stdio::null());
    cmd
}

fn drive() -> Result<Option<String>, String> {
    if !common::is_root() {
        return Ok(Some("needs root to set up rootless podman for its runner user (CI runs it as root)".into()));
    }
    let runner = runner();
    if !runner.exists() {
        let why = format!("{} is not here (AIRLOCK_SHARED names its directory)", runner.display());
        if std::env::var("CI").as_deref() == Ok("true") {
            return Err(format!("{why}, and CI=true: CI must run this test"));
        }
        return Ok(Some(why));
    }
    if let Err(why) = podman_usable() {
        return Ok(Some(why));
    }
    let dir = std::env::temp_dir().join(format!("airlock-oci-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let result = (|| {
        let profile = write_profile(&dir)?;
        run_worker(&profile)?;
        for forbidden in ["ptrace", "socket", "execveat"] {
            let out = container(&profile, forbidden, "").output().map_err(|e| e.to_string())?;
            let code = out.status.code();
            if code != Some(128 + libc::SIGSYS) {
                return Err(format!(
                    "{forbidden} in the container: expected death by SIGSYS (exit 159), got {:?} (signal {:?})\n{}",
                    code,
                    out.status.signal(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(None)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_worker(profile: &Path) -> Result<(), String> {
    let e = |x: airlock_protocol::ChannelError| x.to_string();
    let (mut ch, child_end) = handoff::prepare(Limits::default(), DEFAULT_REKEY_INTERVAL).map_err(e)?;
    let mut cmd = container(profile, "worker", "--preserve-fds 2");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let guard = child_end.install(&mut cmd, Vec::new()).map_err(|x| x.to_string())?;
    let child = cmd.spawn().map_err(|x| format!("spawning {}: {x}", runner().display()))?;
    drop(guard);
    let talk = (|| -> Result<(), String> {
        let peer = ch.handshake(&Hello::new(Role::Supervisor, "oci-test")).map_err(e)?;
        if peer.name != "oci-echo" {
            return Err(format!("peer said {peer:?}"));
        }
        for i in 0..50 {
            ch.send(&Msg::Ping(i)).map_err(e)?;
            if ch.recv::<Msg>().map_err(e)?.msg != Msg::Ping(i) {
                return Err(format!("ping {i} not echoed"));
            }
        }
        let threshold = ch.limits().inline_threshold;
        for (seed, mode) in [(1u64, BulkMode::Sealed), (2, BulkMode::SealedEncrypted)] {
            let data: Vec<u8> = (0..1usize << 20).map(|i| ((i * 7 + seed as usize) % 251) as u8).collect();
            let w = BulkWriter::copy_from(&data, threshold).map_err(|x| x.to_string())?;
            ch.send_bulk(&Msg::Ping(seed), &[], w, mode).map_err(e)?;
            if ch.recv::<Msg>().map_err(e)?.msg != Msg::Sum(checksum(&data) ^ seed) {
                return Err(format!("{mode:?} bulk not echoed"));
            }
        }
        ch.send(&Msg::Stop).map_err(e)
    })();
    let out = child.wait_with_output().map_err(|x| x.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    talk.map_err(|x| format!("talking to the contained worker: {x}; it exited {:?}\n{stderr}", out.status))?;
    if !out.status.success() {
        return Err(format!("contained worker exited {:?}\n{stderr}", out.status));
    }
    Ok(())
}
