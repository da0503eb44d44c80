//! The journal's fsync thread (group commit across loop turns).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use chacha20poly1305::ChaCha20Poly1305;

use super::seal::{next_mark_slot, write_end_mark};

/// The journal's fsync thread. The event loop writes records and asks for a sync; the
/// thread runs `fdatasync` while the loop goes on serving every worker, and counts each
/// completed sync into an eventfd the loop waits on. Syncs asked for while one runs are
/// served by the next one (group commit across loop turns).
pub(super) struct Syncer {
    pub(super) shared: Arc<SyncShared>,
    pub(super) done_fd: Arc<OwnedFd>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

pub(super) struct SyncShared {
    pub(super) state: Mutex<SyncState>,
    pub(super) wake: Condvar,
}

#[derive(Default)]
pub(super) struct SyncState {
    /// The last generation asked for, the file its records were written to, and the log's
    /// end then.
    pub(super) requested: u64,
    pub(super) file: Option<Arc<File>>,
    pub(super) end: u64,
    /// The durable-end slot written last.
    pub(super) mark_slot: usize,
    /// Every generation up to this one is on disk.
    pub(super) done: u64,
    /// A failed `fdatasync`: fatal for the journal (see the runtime).
    pub(super) failed: Option<std::io::Error>,
    pub(super) stop: bool,
}

impl SyncShared {
    pub(super) fn lock(&self) -> MutexGuard<'_, SyncState> {
        // The thread holds the lock only to copy a few fields and cannot panic while it does.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Syncer {
    pub(super) fn start(cipher: ChaCha20Poly1305) -> std::io::Result<Syncer> {
        let shared = Arc::new(SyncShared { state: Mutex::new(SyncState::default()), wake: Condvar::new() });
        let done_fd = Arc::new(crate::sys::eventfd()?);
        let (sh, fd) = (shared.clone(), done_fd.clone());
        let thread = std::thread::Builder::new().name("journal-sync".into()).spawn(move || {
            // Signals belong to the event loop's signalfd, never to this thread.
            let _ = crate::sys::block_signals_in_this_thread();
            let mut started = 0u64;
            loop {
                let (generation, file, end) = {
                    let mut st = sh.lock();
                    while st.requested == started && !st.stop {
                        st = sh.wake.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    if st.stop {
                        return;
                    }
                    started = st.requested;
                    (st.requested, st.file.clone(), st.end)
                };
                let r = file.as_ref().map_or(Ok(()), |f| f.sync_data());
                if let (Ok(()), Some(f)) = (&r, &file) {
                    // A mark that does not get written only leaves recovery more cautious.
                    let _ = write_end_mark(f, &cipher, end, next_mark_slot(&sh));
                }
                {
                    let mut st = sh.lock();
                    match r {
                        Ok(()) => st.done = st.done.max(generation),
                        Err(e) => {
                            st.failed.get_or_insert(e);
                        }
                    }
                }
                // The loop also learns of a failure from the state; a full counter cannot
                // happen (it would take 2^64 syncs).
                let _ = crate::sys::eventfd_add(fd.as_fd(), 1);
            }
        })?;
        Ok(Syncer { shared, done_fd, thread: Some(thread) })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
