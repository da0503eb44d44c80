//! `airlock policy learn`: runs a command under a ptrace tracer and writes a draft policy of
//! every syscall it (and its threads and children) made, each with `reason = "TODO"`, so that a
//! new worker's policy starts from evidence. `check` refuses the draft until every reason has
//! been written by someone who knows why the syscall is needed.
//!
//! The tracer follows threads, forks and vforks (`PTRACE_O_TRACECLONE|TRACEFORK|TRACEVFORK`)
//! and reads each syscall at its entry with `PTRACE_GET_SYSCALL_INFO` (Linux 5.3), which also
//! gives its architecture. It waits only for its own tracees (their process group), so it can
//! run inside a larger program without reaping other children.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsString};
use std::fmt::Write as _;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::arch::Arch;
use crate::error::PolicyError;
use crate::sys;
use crate::syscalls;

/// What a traced run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// Syscalls made, by architecture and number, with how often.
    pub calls: BTreeMap<(Arch, u32), u64>,
    /// Syscalls of architectures we do not support (e.g. i386 compat), as `(audit arch, nr)`.
    pub foreign: BTreeSet<(u32, u64)>,
    /// The command's exit code, or `128 + signal` if a signal ended it.
    pub exit_code: i32,
}

impl Learned {
    /// The distinct syscall names used, sorted.
    pub fn names(&self) -> BTreeSet<&'static str> {
        self.calls.keys().filter_map(|(a, nr)| syscalls::name(*a, *nr)).collect()
    }
}

fn resolve_program(program: &OsString) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.as_os_str().as_bytes().contains(&b'/') {
        return Some(p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(p)).find(|c| c.is_file())
}

fn cstring(s: &[u8], command: &str) -> Result<CString, PolicyError> {
    CString::new(s).map_err(|_| PolicyError::Trace {
        command: command.to_string(),
        step: "preparing arguments",
        source: io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"),
    })
}

/// Runs `command` (program and arguments) to completion under the tracer.
pub fn trace(command: &[OsString]) -> Result<Learned, PolicyError> {
    let shown = command.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
    let err = |step: &'static str, source: io::Error| PolicyError::Trace { command: shown.clone(), step, source };
    let Some(program) = command.first() else {
        return Err(err("starting", io::Error::new(io::ErrorKind::InvalidInput, "no command given")));
    };
    let path = resolve_program(program)
        .ok_or_else(|| err("finding the program", io::Error::new(io::ErrorKind::NotFound, "not found in PATH")))?;
    let path_c = cstring(path.as_os_str().as_bytes(), &shown)?;
    let argv = command.iter().map(|a| cstring(a.as_bytes(), &shown)).collect::<Result<Vec<_>, _>>()?;
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstring(&kv, &shown)?);
    }
    let root = sys::spawn_traced(&path_c, &argv, &envp).map_err(|e| err("fork", e))?;
    let result = trace_loop(root, &err);
    if result.is_err() {
        // Never leave a half-traced command behind.
        let _ = sys::kill(-root, libc::SIGKILL);
        let _ = sys::kill(root, libc::SIGKILL);
        while let Ok(Some(_)) = sys::waitpid(-root, 0) {}
    }
    result
}

fn trace_loop(root: i32, err: &dyn Fn(&'static str, io::Error) -> PolicyError) -> Result<Learned, PolicyError> {
    let options = libc::PTRACE_O_TRACESYSGOOD
        | libc::PTRACE_O_TRACECLONE
        | libc::PTRACE_O_TRACEFORK
        | libc::PTRACE_O_TRACEVFORK
        | libc::PTRACE_O_TRACEEXEC
        | libc::PTRACE_O_EXITKILL;
    let mut learned = Learned::default();
    // Tracees we know, and whether we have seen their first stop yet.
    let mut live: BTreeMap<i32, bool> = BTreeMap::new();
    live.insert(root, false);
    let mut recording = false;
    let mut root_exit: Option<i32> = None;
    while !live.is_empty() {
        let waited = match sys::waitpid(-root, 0) {
            Ok(w) => w,
            // A tracee left our process group (setpgid/setsid): fall back to polling each one.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => poll_each(&live).map_err(|e| err("waitpid", e))?,
            Err(e) => return Err(err("waitpid", e)),
        };
        let Some((pid, status)) = waited else { continue };
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            live.remove(&pid);
            if pid == root {
                root_exit = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
            continue;
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let seen = live.insert(pid, true).unwrap_or(false);
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        let mut inject = 0;
        if !seen {
            // The first stop of a tracee: the root's own SIGSTOP, or a new thread or child
            // starting. Set our options (children inherit them; the root needs them now).
            if pid == root {
                sys::ptrace_setoptions(pid, options).map_err(|e| err("PTRACE_SETOPTIONS", e))?;
            }
        } else if sig == (libc::SIGTRAP | 0x80) {
            let (op, arch, nr) = sys::syscall_info(pid).map_err(|e| err("PTRACE_GET_SYSCALL_INFO", e))?;
            if op == libc::PTRACE_SYSCALL_INFO_ENTRY {
                match (Arch::from_audit_arch(arch), u32::try_from(nr)) {
                    (Some(a), Ok(n)) => {
                        if !recording && pid == root && syscalls::name(a, n) == Some("execve") {
                            recording = true;
                        }
                        if recording {
                            *learned.calls.entry((a, n)).or_insert(0) += 1;
                        }
                    }
                    _ => {
                        if recording {
                            learned.foreign.insert((arch, nr));
                        }
                    }
                }
            }
        } else if sig == libc::SIGTRAP && event != 0 {
            // PTRACE_EVENT_{CLONE,FORK,VFORK,EXEC}: the new tracee announces itself with its
            // own first stop.
        } else if matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU)
            && !sys::is_signal_delivery_stop(pid)
        {
            // A group-stop: resume without a signal.
        } else {
            inject = sig;
        }
        if let Err(e) = sys::ptrace_syscall(pid, inject) {
            // The tracee may have been killed in the meantime (ESRCH); its exit is still to come.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(err("PTRACE_SYSCALL", e));
            }
        }
    }
    learned.exit_code = root_exit.unwrap_or(0);
    Ok(learned)
}

fn poll_each(live: &BTreeMap<i32, bool>) -> io::Result<Option<(i32, libc::c_int)>> {
    loop {
        for &pid in live.keys() {
            match sys::waitpid(pid, libc::WNOHANG) {
                Ok(Some(w)) => return Ok(Some(w)),
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(Some((pid, 0))),
                Err(e) => return Err(e),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A draft policy listing every syscall of `learned`, each with `reason = "TODO"`, sorted by
/// name. Names that exist on one architecture only get `arches = [...]`.
pub fn draft(learned: &Learned, command: &[OsString]) -> String {
    let shown = command.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
    let arches: BTreeSet<Arch> = learned.calls.keys().map(|(a, _)| *a).collect();
    let arch_list = arches.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let _ = writeln!(out, "# Draft policy learned by `airlock policy learn -- {shown}` on {arch_list}.");
    let _ = writeln!(out, "# Every reason is TODO: `airlock policy check` refuses this file until each rule has been");
    let _ = writeln!(out, "# reviewed, narrowed with `args` conditions where it can be, and given its real reason.");
    let _ = writeln!(out, "# Syscalls the run did not make are not here: exercise every path of the worker.");
    if !learned.foreign.is_empty() {
        let list: Vec<String> = learned.foreign.iter().map(|(a, nr)| format!("arch {a:#x} nr {nr}")).collect();
        let _ = writeln!(out, "# Also seen, on architectures airlock does not support: {}", list.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "[policy]");
    let _ = writeln!(out, "description = {}", toml_string(&format!("TODO: draft learned from `{shown}`")));
    let _ = writeln!(out, "default_action = \"kill_process\"");
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    for ((a, nr), n) in &learned.calls {
        if let Some(name) = syscalls::name(*a, *nr) {
            *counts.entry(name).or_insert(0) += n;
        }
    }
    for (name, n) in counts {
        let _ = writeln!(out);
        let _ = writeln!(out, "[[rule]]");
        let _ = writeln!(out, "syscall = \"{name}\"");
        let on = syscalls::arches_of(name);
        if on.len() < Arch::ALL.len() {
            let list: Vec<String> = on.iter().map(|a| format!("\"{a}\"")).collect();
            let _ = writeln!(out, "arches = [{}]", list.join(", "));
        }
        let _ = writeln!(out, "reason = \"TODO\" # seen {n} time(s)");
    }
    out
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
