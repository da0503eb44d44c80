//! Per-worker cgroups: a worker's memory (swap included), processes and CPU share are bounded
//! by a cgroup of its own, so a compromised layer can exhaust only what it was given, and the
//! kernel's OOM killer, when that cgroup runs out, kills that worker alone.
//!
//! Two backends, found once at start from `/proc/self/mountinfo` and `/proc/self/cgroup`:
//! - **cgroup v2** when airlockd's own cgroup has the `memory`, `pids` and `cpu` controllers
//!   and is writable by it (a delegated subtree: systemd's `Delegate=yes`). v2 forbids
//!   processes in a cgroup whose controllers are enabled for children, so airlockd first moves
//!   itself into a leaf `supervisor` beside the workers' cgroups.
//! - **cgroup v1** when airlockd may create cgroups in the `memory`, `pids` and `cpu`
//!   hierarchies (root on a host that mounts them writable).
//!
//! Each airlockd keeps its workers under `airlock.<its pid>` in its own cgroup, so that several
//! supervisors (tests run many at once) never touch each other's; one whose process is gone is
//! stale and removed at the next start, with anything left in it killed.
//!
//! Files are plain reads and writes; what each backend writes, and every parse, is a pure
//! function tested without a cgroup file system.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::WorkerLimits;

/// Controllers a worker's cgroup needs.
pub const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// One line of `/proc/self/mountinfo`, as far as cgroups need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    /// The cgroup the mount shows at its mount point (`/` on a host; a container's own cgroup
    /// where it mounts only its part of a v1 hierarchy).
    pub root: String,
    pub fstype: String,
    pub read_only: bool,
    /// Super options (for cgroup v1: the controllers of the hierarchy).
    pub super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo`, keeping cgroup mounts only.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 || !r[0].starts_with("cgroup") {
            continue;
        }
        let point = PathBuf::from(unescape(l[4]));
        let read_only = l[5].split(',').any(|o| o == "ro");
        out.push(Mount {
            point,
            root: unescape(l[3]),
            fstype: r[0].to_string(),
            read_only,
            super_options: r[2].split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/PID/cgroup`: hierarchy id, its controllers (empty for v2), the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let hierarchy = it.next()?.parse().ok()?;
            let ctl = it.next()?;
            let path = it.next()?.to_string();
            let controllers = if ctl.is_empty() { Vec::new() } else { ctl.split(',').map(str::to_string).collect() };
            Some(Membership { hierarchy, controllers, path })
        })
        .collect()
}

/// Where the workers' cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One directory per controller: airlockd's own cgroup in each v1 hierarchy.
    V1 { memory: PathBuf, pids: PathBuf, cpu: PathBuf },
    /// airlockd's own cgroup in the unified hierarchy.
    V2 { base: PathBuf },
}

/// Where cgroup `path` (as `/proc/PID/cgroup` names it) is under mount `m`; `None` when the
/// mount does not show it (a container's mount of its own part of a hierarchy).
pub fn cgroup_dir(m: &Mount, path: &str) -> Option<PathBuf> {
    let root = m.root.trim_end_matches('/');
    let rel = if root.is_empty() {
        path
    } else {
        let rest = path.strip_prefix(root)?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest
    };
    Some(m.point.join(rel.trim_start_matches('/')))
}

/// Decides the layout from the mounts, airlockd's memberships and each candidate's available
/// controllers (`v2_controllers`: the text of `cgroup.controllers` in airlockd's own v2
/// cgroup, if readable). v2 wins when it has every controller; else v1 when every controller
/// has a writable hierarchy. Pure: the caller checks writability by trying.
pub fn choose_layout(
    mounts: &[Mount],
    own: &[Membership],
    v2_controllers: Option<&str>,
) -> Result<Layout, CgroupError> {
    let mut why = Vec::new();
    let v2_mount = mounts.iter().find(|m| m.fstype == "cgroup2");
    let v2_own = own.iter().find(|m| m.hierarchy == 0 && m.controllers.is_empty());
    match (v2_mount, v2_own) {
        (Some(m), Some(o)) => {
            let have: Vec<&str> = v2_controllers.unwrap_or("").split_whitespace().collect();
            let missing: Vec<&str> = CONTROLLERS.iter().copied().filter(|c| !have.contains(c)).collect();
            if m.read_only {
                why.push(format!("cgroup2 at {} is read-only", m.point.display()));
            } else if let (true, Some(base)) = (missing.is_empty(), cgroup_dir(m, &o.path)) {
                return Ok(Layout::V2 { base });
            } else if missing.is_empty() {
                why.push(format!("airlockd's cgroup {} is outside the cgroup2 mount at {}", o.path, m.point.display()));
            } else {
                why.push(format!(
                    "cgroup2 at {} lacks the {} controller(s) in airlockd's cgroup {} (not delegated)",
                    m.point.display(),
                    missing.join(", "),
                    o.path
                ));
            }
        }
        _ => why.push("no cgroup2 hierarchy".into()),
    }
    let mut v1 = Vec::new();
    for c in CONTROLLERS {
        let mount = mounts.iter().find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == c));
        let mine = own.iter().find(|m| m.controllers.iter().any(|x| x == c));
        match (mount, mine) {
            (Some(m), _) if m.read_only => {
                why.push(format!("the v1 {c} hierarchy at {} is read-only", m.point.display()));
                break;
            }
            (Some(m), Some(o)) => match cgroup_dir(m, &o.path) {
                Some(d) => v1.push(d),
                None => {
                    why.push(format!(
                        "airlockd's {c} cgroup {} is outside the mount at {} (root {})",
                        o.path,
                        m.point.display(),
                        m.root
                    ));
                    break;
                }
            },
            _ => {
                why.push(format!("no v1 {c} hierarchy"));
                break;
            }
        }
    }
    if let [memory, pids, cpu] = &v1[..] {
        return Ok(Layout::V1 { memory: memory.clone(), pids: pids.clone(), cpu: cpu.clone() });
    }
    Err(CgroupError::NoLayout(why))
}

/// Control files of a cgroup v1 directory whose names have no dot, so a worker could be named
/// like them (every other control file, and every v2 one, has a dot; worker names have none).
pub const V1_CONTROL_FILES: [&str; 3] = ["tasks", "notify_on_release", "release_agent"];

/// The files a worker's cgroup gets, in the order written: `(controller, file, value)`.
/// `memsw`: the memory controller accounts swap (v1 `memory.memsw.*`, v2 `memory.swap.max`
/// exist: not on kernels built or booted without swap accounting).
pub fn limit_files(layout: &Layout, l: &WorkerLimits, memsw: bool) -> Vec<(&'static str, &'static str, String)> {
    let mut out = Vec::new();
    match layout {
        Layout::V1 { .. } => {
            out.push(("memory", "memory.limit_in_bytes", l.memory_bytes.to_string()));
            if memsw {
                out.push(("memory", "memory.memsw.limit_in_bytes", l.memory_bytes.to_string()));
            }
            out.push(("pids", "pids.max", l.pids.to_string()));
            // v1 shares: 1024 is the default weight (v2's 100).
            out.push(("cpu", "cpu.shares", (l.cpu_weight * 1024 / 100).max(2).to_string()));
            if let Some(p) = l.cpu_max_percent {
                out.push(("cpu", "cpu.cfs_period_us", "100000".into()));
                out.push(("cpu", "cpu.cfs_quota_us", (p * 1000).to_string()));
            }
        }
        Layout::V2 { .. } => {
            out.push(("memory", "memory.max", l.memory_bytes.to_string()));
            // Swap included: nothing of this worker may go to swap beyond its limit.
            if memsw {
                out.push(("memory", "memory.swap.max", "0".into()));
            }
            out.push(("pids", "pids.max", l.pids.to_string()));
            out.push(("cpu", "cpu.weight", l.cpu_weight.to_string()));
            let max = l.cpu_max_percent.map_or("max".to_string(), |p| (p * 1000).to_string());
            out.push(("cpu", "cpu.max", format!("{max} 100000")));
        }
    }
    out
}

/// The number after `key` in a flat-keyed file (`memory.events`, `memory.oom_control`).
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The pid in an instance directory's name (`airlock.<pid>`).
pub fn instance_pid(name: &str) -> Option<i32> {
    name.strip_prefix("airlock.")?.parse().ok().filter(|p| *p > 0)
}

/// What this host gives airlockd for per-worker cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    state: Result<Active, String>,
}

#[derive(Debug, Clone)]
struct Active {
    layout: Layout,
    /// `airlock.<pid>` in each hierarchy airlockd uses.
    instance: Vec<(&'static str, PathBuf)>,
    memsw: bool,
}

/// Why a worker's cgroup could not be set up or verified, or why airlockd has none to give;
/// each names the file and the errno, as the layer report shows them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// No layout airlockd may use here: the reasons found, one per hierarchy.
    #[error("{}", .0.join("; "))]
    NoLayout(Vec<String>),
    /// This airlockd has no cgroups to give (why, as probed at start).
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} {}: {errno} ({message})", path.display())]
    Io { what: String, path: PathBuf, errno: &'static str, message: String },
    #[error("/proc/{pid}/cgroup: {message}")]
    ProcUnreadable { pid: i32, message: String },
    #[error("/proc/{pid}/cgroup does not place the worker in its {controller} cgroup {}", dir.display())]
    NotPlaced { pid: i32, controller: &'static str, dir: PathBuf },
    #[error("{} holds {got}, not {want}", path.display())]
    LimitDiffers { path: PathBuf, got: String, want: String },
}

fn io_why(what: &str, path: &Path, e: &io::Error) -> CgroupError {
    CgroupError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        errno: e.raw_os_error().map_or("error", airlock_protocol::confinement::errno_name),
        message: e.to_string(),
    }
}

impl Cgroups {
    /// Nothing to use: every worker's `cgroup` layer is unavailable for `why`.
    pub fn unavailable(why: impl Into<String>) -> Cgroups {
        Cgroups { state: Err(why.into()) }
    }

    /// Finds the layout, creates this airlockd's instance directories and removes stale ones
    /// from supervisors that are gone. Returns the cgroups and what was cleaned.
    pub fn probe() -> (Cgroups, Vec<String>) {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo"));
        let own = parse_proc_cgroup(&read("/proc/self/cgroup"));
        let v2 = mounts.iter().find(|m| m.fstype == "cgroup2").and_then(|m| {
            let o = own.iter().find(|o| o.hierarchy == 0)?;
            fs::read_to_string(cgroup_dir(m, &o.path)?.join("cgroup.controllers")).ok()
        });
        let layout = match choose_layout(&mounts, &own, v2.as_deref()) {
            Ok(l) => l,
            Err(why) => return (Cgroups::unavailable(why.to_string()), Vec::new()),
        };
        match Self::activate(layout) {
            Ok((a, cleaned)) => (Cgroups { state: Ok(a) }, cleaned),
            Err(why) => (Cgroups::unavailable(why.to_string()), Vec::new()),
        }
    }

    fn activate(layout: Layout) -> Result<(Active, Vec<String>), CgroupError> {
        let me = format!("airlock.{}", std::process::id());
        let bases: Vec<(&'static str, PathBuf)> = match &layout {
            Layout::V1 { memory, pids, cpu } => {
                vec![("memory", memory.clone()), ("pids", pids.clone()), ("cpu", cpu.clone())]
            }
            Layout::V2 { base } => vec![("unified", base.clone())],
        };
        let mut cleaned = Vec::new();
        for (_, base) in &bases {
            cleaned.extend(clean_stale(base));
        }
        if let Layout::V2 { base } = &layout {
            // No processes in a cgroup that hands controllers to children: airlockd moves
            // itself into a leaf first.
            let leaf = base.join("supervisor");
            mkdir(&leaf).map_err(|e| io_why("creating", &leaf, &e))?;
            let procs = leaf.join("cgroup.procs");
            fs::write(&procs, "0").map_err(|e| io_why("moving airlockd into", &procs, &e))?;
            enable_controllers(base)?;
        }
        let mut instance = Vec::new();
        for (c, base) in bases {
            let dir = base.join(&me);
            mkdir(&dir).map_err(|e| io_why("creating", &dir, &e))?;
            instance.push((c, dir));
        }
        if let Layout::V2 { .. } = &layout {
            enable_controllers(&instance[0].1)?;
        }
        let memsw = match &layout {
            Layout::V1 { .. } => instance[0].1.join("memory.memsw.limit_in_bytes").exists(),
            Layout::V2 { .. } => instance[0].1.join("memory.swap.max").exists(),
        };
        Ok((Active { layout, instance, memsw }, cleaned))
    }

    /// Why workers get no cgroup here, if they do not.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.state.as_ref().err().map(String::as_str)
    }

    /// `"v1"` or `"v2"`, when available.
    pub fn version(&self) -> Option<&'static str> {
        match &self.state.as_ref().ok()?.layout {
            Layout::V1 { .. } => Some("v1"),
            Layout::V2 { .. } => Some("v2"),
        }
    }

    /// Creates (afresh) the cgroup of worker `name` with limits `l`.
    pub fn create(&self, name: &str, l: &WorkerLimits) -> Result<WorkerCgroup, CgroupError> {
        let a = self.state.as_ref().map_err(|why| CgroupError::Unavailable(why.clone()))?;
        let mut dirs = Vec::new();
        for (c, inst) in &a.instance {
            let dir = inst.join(name);
            if dir.exists() {
                remove_dir(&dir);
            }
            mkdir(&dir).map_err(|e| io_why("creating", &dir, &e))?;
            dirs.push((*c, dir));
        }
        let cg = WorkerCgroup { dirs, layout: a.layout.clone(), limits: *l, memsw: a.memsw };
        for (c, file, value) in limit_files(&a.layout, l, a.memsw) {
            let path = cg.dir(c).join(file);
            if let Err(e) = fs::write(&path, &value) {
                cg.remove();
                return Err(io_why(&format!("writing {value} to"), &path, &e));
            }
        }
        Ok(cg)
    }

    /// Removes this airlockd's instance directories (at shutdown, after the workers).
    pub fn remove_all(&self) {
        if let Ok(a) = &self.state {
            for (_, dir) in &a.instance {
                remove_tree(dir);
            }
        }
    }
}

/// A worker's own cgroup.
#[derive(Debug, Clone)]
pub struct WorkerCgroup {
    dirs: Vec<(&'static str, PathBuf)>,
    layout: Layout,
    pub limits: WorkerLimits,
    memsw: bool,
}

impl WorkerCgroup {
    fn dir(&self, controller: &str) -> &Path {
        match &self.layout {
            Layout::V2 { .. } => &self.dirs[0].1,
            Layout::V1 { .. } => {
                self.dirs.iter().find(|(c, _)| *c == controller).map_or(&self.dirs[0].1, |(_, d)| d.as_path())
            }
        }
    }

    /// Moves process `pid` (not yet exec'd) into this cgroup, in every hierarchy.
    pub fn attach(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, d) in &self.dirs {
            let procs = d.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(|e| io_why("moving the worker into", &procs, &e))?;
        }
        Ok(())
    }

    /// Moves `pid` back where it came from (airlockd's own cgroup; on v2 its `supervisor` leaf),
    /// so that removing this cgroup does not kill it: after a partial attach.
    pub fn detach(&self, pid: i32) {
        for (_, d) in &self.dirs {
            let Some(base) = d.parent().and_then(Path::parent) else { continue };
            let home = match self.layout {
                Layout::V1 { .. } => base.to_path_buf(),
                Layout::V2 { .. } => base.join("supervisor"),
            };
            let _ = fs::write(home.join("cgroup.procs"), pid.to_string());
        }
    }

    /// How many times the kernel's OOM killer killed a process here (its memory limit).
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.layout {
            Layout::V1 { .. } => ("memory.oom_control", "oom_kill"),
            Layout::V2 { .. } => ("memory.events", "oom_kill"),
        };
        fs::read_to_string(self.dir("memory").join(file)).ok().and_then(|t| keyed_value(&t, key)).unwrap_or(0)
    }

    /// Checks from outside that `pid` is in this cgroup and that the limit files hold the
    /// configured values.
    pub fn verify(&self, pid: i32) -> Result<(), CgroupError> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| CgroupError::ProcUnreadable { pid, message: e.to_string() })?;
        let own = parse_proc_cgroup(&text);
        for (c, d) in &self.dirs {
            let want = d.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let member = own.iter().any(|m| {
                let in_hierarchy = match self.layout {
                    Layout::V2 { .. } => m.hierarchy == 0 && m.controllers.is_empty(),
                    Layout::V1 { .. } => m.controllers.iter().any(|x| x == c),
                };
                in_hierarchy && m.path.ends_with(&format!("/airlock.{}/{want}", std::process::id()))
            });
            if !member {
                return Err(CgroupError::NotPlaced { pid, controller: c, dir: d.clone() });
            }
        }
        for (c, file, value) in limit_files(&self.layout, &self.limits, self.memsw) {
            let path = self.dir(c).join(file);
            let got = fs::read_to_string(&path).map_err(|e| io_why("reading", &path, &e))?;
            let got = got.trim();
            // The kernel rounds memory limits down to whole pages.
            let same = got == value
                || matches!((got.parse::<u64>(), value.parse::<u64>()), (Ok(g), Ok(v)) if file.starts_with("memory") && g <= v && v - g < 4096);
            if !same {
                return Err(CgroupError::LimitDiffers { path, got: got.to_string(), want: value });
            }
        }
        Ok(())
    }

    /// What bounds this worker, for the report.
    pub fn describe(&self) -> Vec<String> {
        let v = match self.layout {
            Layout::V1 { .. } => "v1",
            Layout::V2 { .. } => "v2",
        };
        let l = &self.limits;
        let swap = if self.memsw { "swap included" } else { "this kernel does not account swap" };
        let mut cpu = format!("cpu: cgroup {v} weight {}", l.cpu_weight);
        if let Some(p) = l.cpu_max_percent {
            cpu.push_str(&format!(", at most {p}% of a CPU"));
        }
        vec![
            format!(
                "memory: cgroup {v} limit {} MiB ({swap}); beyond it the kernel kills this worker alone",
                l.memory_bytes >> 20
            ),
            format!("pids: cgroup {v} limit {}", l.pids),
            cpu,
        ]
    }

    /// Kills whatever is left in it and removes it.
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            remove_dir(d);
        }
    }
}

fn mkdir(p: &Path) -> io::Result<()> {
    match fs::create_dir(p) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let ctl = dir.join("cgroup.subtree_control");
    let want = CONTROLLERS.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    fs::write(&ctl, want).map_err(|e| io_why("enabling memory, pids and cpu in", &ctl, &e))
}

/// Removes an empty cgroup; one that still holds processes has them killed first.
fn remove_dir(d: &Path) {
    for attempt in 0..50 {
        match fs::remove_dir(d) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => {
                if attempt == 0 || attempt % 10 == 5 {
                    // v2 (5.14 and later) kills every process in it at once, with no pid to
                    // race with reuse; elsewhere each pid listed is killed.
                    if fs::write(d.join("cgroup.kill"), "1").is_err() {
                        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tracing::warn!(cgroup = %d.display(), "a worker's cgroup could not be removed");
}

/// Removes `dir` and the cgroups below it, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    remove_dir(dir);
}

/// Removes `airlock.<pid>` directories under `base` whose airlockd is gone.
fn clean_stale(base: &Path) -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = fs::read_dir(base) else { return cleaned };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = instance_pid(&name) else { continue };
        if pid as u32 == std::process::id() || supervisor_alive(pid) {
            continue;
        }
        remove_tree(&e.path());
        cleaned.push(e.path().display().to_string());
    }
    cleaned
}

/// Whether process `pid` still exists (a live one owns its instance directory; a reused pid
/// only delays the cleaning to a later start).
fn supervisor_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
28 27 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
29 27 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
33 27 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
34 27 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
35 27 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
";
    const HYBRID_OWN: &str = "\
12:pids:/user.slice/session-3.scope
6:memory:/user.slice/session-3.scope
4:cpu,cpuacct:/user.slice/session-3.scope
1:name=systemd:/user.slice/session-3.scope
0::/user.slice/session-3.scope
";
    const UNIFIED: &str =
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";

    #[test]
    fn a_hybrid_host_uses_v1_when_cgroup2_has_no_controllers() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5, "{m:?}");
        let own = parse_proc_cgroup(HYBRID_OWN);
        let l = choose_layout(&m, &own, Some("hugetlb\n")).expect("a layout");
        assert_eq!(
            l,
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory/user.slice/session-3.scope".into(),
                pids: "/sys/fs/cgroup/pids/user.slice/session-3.scope".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct/user.slice/session-3.scope".into(),
            }
        );
    }

    #[test]
    fn a_delegated_unified_cgroup_uses_v2() {
        let own = parse_proc_cgroup("0::/system.slice/airlockd.service\n");
        let l = choose_layout(&parse_mountinfo(UNIFIED), &own, Some("cpuset cpu io memory pids")).expect("a layout");
        assert_eq!(l, Layout::V2 { base: "/sys/fs/cgroup/system.slice/airlockd.service".into() });
    }

    #[test]
    fn an_undelegated_unified_cgroup_says_which_controllers_are_missing() {
        let own = parse_proc_cgroup("0::/system.slice/airlockd.service\n");
        let e = choose_layout(&parse_mountinfo(UNIFIED), &own, Some("cpu pids")).expect_err("no layout").to_string();
        assert!(e.contains("lacks the memory controller") && e.contains("not delegated"), "{e}");
        assert!(e.contains("no v1 memory hierarchy"), "{e}");
    }

    #[test]
    fn read_only_mounts_are_refused_with_the_reason() {
        let ro =
            HYBRID.replace("rw,nosuid,nodev,noexec,relatime shared:15", "ro,nosuid,nodev,noexec,relatime shared:15");
        let e = choose_layout(&parse_mountinfo(&ro), &parse_proc_cgroup(HYBRID_OWN), None)
            .expect_err("no layout")
            .to_string();
        assert!(e.contains("v1 memory hierarchy at /sys/fs/cgroup/memory is read-only"), "{e}");
    }

    #[test]
    fn a_container_mount_of_its_own_part_of_a_hierarchy_is_joined_at_its_root() {
        let m = parse_mountinfo(
            "33 27 0:30 /libpod_parent/libpod-05a5 /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n",
        );
        assert_eq!(m[0].root, "/libpod_parent/libpod-05a5");
        assert_eq!(
            cgroup_dir(&m[0], "/libpod_parent/libpod-05a5/system.slice/a.service"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/system.slice/a.service"))
        );
        assert_eq!(cgroup_dir(&m[0], "/libpod_parent/libpod-05a5"), Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(cgroup_dir(&m[0], "/libpod_parent/libpod-05a5x"), None);
        assert_eq!(cgroup_dir(&m[0], "/other"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let m = parse_mountinfo("1 2 0:3 / /sys/fs/cg\\040x rw - cgroup2 cgroup2 rw\n");
        assert_eq!(m[0].point, PathBuf::from("/sys/fs/cg x"));
    }

    fn limits() -> WorkerLimits {
        WorkerLimits {
            memory_bytes: 64 << 20,
            pids: 32,
            cpu_weight: 25,
            cpu_max_percent: Some(50),
            nice: 10,
            sched_idle: false,
            oom_score_adj: 900,
        }
    }

    #[test]
    fn v1_files_include_swap_when_accounted_and_scale_the_weight() {
        let l = Layout::V1 { memory: "/m".into(), pids: "/p".into(), cpu: "/c".into() };
        let f = limit_files(&l, &limits(), true);
        let get = |n: &str| f.iter().find(|(_, file, _)| *file == n).map(|(_, _, v)| v.clone());
        assert_eq!(get("memory.limit_in_bytes").as_deref(), Some("67108864"));
        assert_eq!(get("memory.memsw.limit_in_bytes").as_deref(), Some("67108864"));
        assert_eq!(get("pids.max").as_deref(), Some("32"));
        assert_eq!(get("cpu.shares").as_deref(), Some("256"));
        assert_eq!(get("cpu.cfs_quota_us").as_deref(), Some("50000"));
        assert!(limit_files(&l, &limits(), false).iter().all(|(_, f, _)| !f.contains("memsw")));
    }

    #[test]
    fn v2_files_forbid_swap_and_set_weight_and_ceiling() {
        let l = Layout::V2 { base: "/b".into() };
        let f = limit_files(&l, &WorkerLimits { cpu_max_percent: None, ..limits() }, true);
        let get = |n: &str| f.iter().find(|(_, file, _)| *file == n).map(|(_, _, v)| v.clone());
        assert_eq!(get("memory.max").as_deref(), Some("67108864"));
        assert_eq!(get("memory.swap.max").as_deref(), Some("0"));
        assert_eq!(get("cpu.weight").as_deref(), Some("25"));
        assert_eq!(get("cpu.max").as_deref(), Some("max 100000"));
        // Without swap accounting the file does not exist, and writing it would fail the layer.
        assert!(limit_files(&l, &limits(), false).iter().all(|(_, f, _)| !f.contains("swap")));
    }

    #[test]
    fn oom_counters_and_instance_names_parse() {
        assert_eq!(keyed_value("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(keyed_value("low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(instance_pid("airlock.1234"), Some(1234));
        assert_eq!(instance_pid("airlock.x"), None);
        assert_eq!(instance_pid("supervisor"), None);
    }
}
