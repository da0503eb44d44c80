//! Where the supervisor's state, its control socket and the worker executables are: the
//! environment systemd sets, else the configuration, else per-user defaults. Nothing here
//! creates a directory (`crate::dirs` does, and checks them).

use std::path::{Path, PathBuf};

use super::{Config, WorkerConfig};

impl Config {
    /// The state directory of worker `w`, if it has one.
    pub fn worker_state_directory(&self, w: &WorkerConfig) -> Option<PathBuf> {
        w.state_directory.then(|| self.state_directory().join("workers").join(w.name.get_ref()))
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
fn env_dir(var: &str) -> Option<PathBuf> {
    // systemd may pass several, colon-separated: the first is ours.
    std::env::var_os(var).and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
}
