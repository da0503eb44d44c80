//! The supervisor's own directories (state, runtime): created when missing, and refused
//! unless they are really ours.

use std::path::Path;

/// Creates `dir` (mode 0700) if missing, then refuses it unless it is a real directory (not a
/// symlink) owned by this user and writable by no one else: the journal key, the journal and
/// the control socket live there.
pub fn secure_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let m = std::fs::symlink_metadata(dir)?;
    let me = crate::sys::euid();
    if !m.file_type().is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory (a symlink?)", dir.display())));
    }
    if m.uid() != me {
        return Err(std::io::Error::other(format!(
            "{} belongs to uid {}, not to this user ({me})",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is writable by others (mode {:o})",
            dir.display(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}
