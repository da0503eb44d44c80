//! The message journal: asynchronous messages the supervisor has taken responsibility for,
//! stored in its state directory until their receiver acknowledges them.
//!
//! A log of records, each `u32 length | 12-byte nonce | ChaCha20-Poly1305 ciphertext and tag`
//! under a storage key that only the supervisor holds (`journal.key`, mode 0600, created on
//! first use), with a random 96-bit nonce per record (drawn from the OS RNG in blocks). A record
//! is `Enqueue` (the message) or `DoneMany` (the ids whose receivers' handlers returned during
//! one loop turn; earlier versions wrote one `Done` per id, still read).
//!
//! The file: a first page with the durable-end mark in two slots (see `HEADER`), then the
//! records, written over zeros that the file is grown by ahead of them (see `CHUNK`); a
//! length of zero ends the log. Recovery replays it: every `Enqueue` without its done id is
//! pending, in id order. A record that fails before the durable end is corruption, reported,
//! never skipped; what fails after it is what a crash left of writes no sync had covered, and
//! is dropped with a warning. A file without marks is an earlier version's, read whole.
//! Message bodies are never logged.
//!
//! Files: this one (records, the `Journal` and its writes), `recover` (opening and replaying
//! the file), `syncer` (the fsync thread), `seal` (sealing records, the durable-end mark, the
//! storage key).

mod recover;
mod seal;
mod syncer;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};

use seal::{copy_error, io, next_mark_slot, seal_into, write_end_mark, Nonces};
use syncer::Syncer;

const AAD: &[u8] = b"airlock-journal-v1";
const MAX_RECORD: usize = 16 << 20;
/// The file grows by zero-filled chunks ahead of the records. Records then overwrite blocks
/// that are already allocated, in a file whose size does not change, so a group's
/// `fdatasync` writes data blocks only: no size or extent update, and on a journaling file
/// system no journal commit (about 2.8x the appends+fsyncs per second of a growing file on
/// ext4, measured). A length of zero where a record would start marks the end of the log.
const CHUNK: u64 = 4 << 20;
/// The first page holds the durable-end mark: a sealed `u64`, the log's end as of the last
/// completed sync (written after that sync returns, so it never claims more than is on disk;
/// it reaches the disk with the next sync), in two slots written in turn so that a torn
/// write of one leaves the other. Records start after it. Recovery tells a crash's debris
/// (after the mark: writes no sync had covered, possibly torn or reordered by the disk) from
/// corruption (before it: records that were on disk).
const HEADER: u64 = 4096;
const END_AAD: &[u8] = b"airlock-journal-end-v1";
const MARK_SLOTS: [u64; 2] = [0, 512];

#[doc(hidden)]
pub use recover::replay_for_fuzzing;

/// Fuzzing entry point: appends `plain` to `out` sealed as a journal record (`end_mark`
/// false) or as a durable-end mark's payload (`end_mark` true) under `key`, with `nonce`; with
/// [`replay_for_fuzzing`], a harness builds journal files whose records authenticate.
/// `HEADER` and `MARK_SLOTS` are the file's layout ([`FUZZ_LAYOUT`]).
#[doc(hidden)]
pub fn seal_for_fuzzing(out: &mut Vec<u8>, key: &[u8; 32], end_mark: bool, nonce: [u8; 12], plain: &[u8]) {
    use chacha20poly1305::aead::KeyInit;
    let cipher = ChaCha20Poly1305::new(key.into());
    let _ = seal_into(out, &cipher, if end_mark { END_AAD } else { AAD }, nonce, plain);
}

/// The journal file's layout for fuzz harnesses: where the records start, and the offsets of
/// the two durable-end mark slots.
#[doc(hidden)]
pub const FUZZ_LAYOUT: (u64, [u64; 2]) = (HEADER, MARK_SLOTS);

/// A journaled message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    pub from: String,
    pub service: String,
    pub method: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Enqueue(Entry),
    /// Written by earlier versions, one per acknowledgement; still read.
    Done(u64),
    /// Written first in every compacted file: ids never go back below it, even when every
    /// message was handled and compaction dropped them all.
    NextId(u64),
    /// The acknowledgements of one loop turn.
    DoneMany(Vec<u64>),
}

/// What the journal writes, encoded exactly as [`Record`] but borrowing, so that appending a
/// message does not copy its body first.
#[derive(Serialize)]
enum RecordRef<'a> {
    Enqueue(&'a Entry),
    /// Not written any more (tests write it as an earlier version would); here so that the
    /// variants keep `Record`'s indexes.
    #[cfg_attr(not(test), allow(dead_code))]
    Done(u64),
    NextId(u64),
    DoneMany(&'a [u64]),
}

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is corrupt at byte {offset}: {what}")]
    Corrupt { path: PathBuf, offset: u64, what: String },
}

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: Arc<File>,
    /// Where the next record goes, and how far the file is zero-filled.
    end: u64,
    allocated: u64,
    cipher: ChaCha20Poly1305,
    next_id: u64,
    live: usize,
    dead: usize,
    dirty: bool,
    /// Records encoded but not yet written: written together by `flush` (each loop turn) and
    /// before every `sync`, so a group of messages costs one write and one fsync.
    buf: Vec<u8>,
    /// Acknowledged ids not yet recorded: one `DoneMany` record at the next `flush`.
    done_ids: Vec<u64>,
    nonces: Nonces,
    /// A record's encoding before it is sealed into `buf` (kept for its allocation).
    scratch: Vec<u8>,
    syncer: Syncer,
    /// The last sync generation asked of the thread, and the last one `sync` covered itself.
    requested: u64,
    synced_here: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).field("live", &self.live).finish_non_exhaustive()
    }
}

impl Journal {
    /// Writes `live` (in id order) as the whole content of `self.file`, a fresh
    /// `journal.tmp`, makes it durable and renames it over the journal: a crash leaves either
    /// the old file or the new one.
    fn install_fresh(&mut self, live: &[&Entry], tmp: &Path) -> Result<(), JournalError> {
        self.write(&RecordRef::NextId(self.next_id))?;
        for e in live {
            self.write(&RecordRef::Enqueue(e))?;
        }
        self.flush()?;
        write_end_mark(&self.file, &self.cipher, self.end, next_mark_slot(&self.syncer.shared))
            .map_err(io("marking", tmp))?;
        self.file.sync_all().map_err(io("syncing", tmp))?;
        std::fs::rename(tmp, &self.path).map_err(io("renaming", tmp))?;
        if let Some(Ok(d)) = self.path.parent().map(File::open) {
            let _ = d.sync_all();
        }
        self.live = live.len();
        self.dead = 0;
        self.dirty = false;
        Ok(())
    }

    /// Encodes and seals one record at the end of `buf` (see [`seal_into`]).
    fn write(&mut self, rec: &RecordRef<'_>) -> Result<(), JournalError> {
        let nonce = self.nonces.next().map_err(|e| JournalError::Io {
            step: "nonce for",
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.scratch = postcard::to_extend(rec, scratch).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            offset: 0,
            what: format!("encoding: {e}"),
        })?;
        seal_into(&mut self.buf, &self.cipher, AAD, nonce, &self.scratch).ok_or_else(|| JournalError::Corrupt {
            path: self.path.clone(),
            offset: 0,
            what: "sealing (a record over 4 GiB?)".into(),
        })?;
        self.dirty = true;
        Ok(())
    }

    /// Writes the records encoded so far (one `write`), without waiting for the disk.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        if !self.done_ids.is_empty() {
            let ids = std::mem::take(&mut self.done_ids);
            self.write(&RecordRef::DoneMany(&ids))?;
        }
        if !self.buf.is_empty() {
            let len = self.buf.len() as u64;
            if self.end + len > self.allocated {
                self.zero_fill(self.end + len)?;
            }
            if let Err(e) = self.file.write_all_at(&self.buf, self.end) {
                // A partial write (EIO) must not leave half a record where the retry writes
                // the whole buffer again: put the zero fill back.
                let _ = self.file.write_all_at(&vec![0; self.buf.len()], self.end);
                return Err(JournalError::Io { step: "writing to", path: self.path.clone(), source: e });
            }
            self.end += len;
            self.buf.clear();
        }
        Ok(())
    }

    /// Grows the file with zeros, in whole chunks, to hold at least `need` bytes. The zeros
    /// reach the disk with the next sync (which then also records the new size).
    fn zero_fill(&mut self, need: u64) -> Result<(), JournalError> {
        let target = (need / CHUNK + 1) * CHUNK;
        let zeros = vec![0u8; 256 << 10];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(zeros.len() as u64);
            if let Err(e) = self.file.write_all_at(&zeros[..n as usize], at) {
                // ENOSPC: give back what this attempt added; nothing was written past `end`.
                let _ = self.file.set_len(self.allocated);
                return Err(JournalError::Io { step: "growing", path: self.path.clone(), source: e });
            }
            at += n;
        }
        self.allocated = target;
        self.dirty = true;
        Ok(())
    }

    /// Appends a message and returns its id (not yet durable: see [`Journal::sync`]).
    pub fn enqueue(&mut self, from: &str, service: &str, method: &str, body: Vec<u8>) -> Result<Entry, JournalError> {
        let e = Entry { id: self.next_id, from: from.into(), service: service.into(), method: method.into(), body };
        self.write(&RecordRef::Enqueue(&e))?;
        self.next_id += 1;
        self.live += 1;
        Ok(e)
    }

    /// Records that entry `id` was handled (in one record with the turn's others, at the
    /// next [`Journal::flush`]; until then a crash means it is delivered again, which the
    /// receiver's dedup window absorbs).
    pub fn done(&mut self, id: u64) -> Result<(), JournalError> {
        self.done_ids.push(id);
        self.live = self.live.saturating_sub(1);
        self.dead += 2;
        Ok(())
    }

    /// Makes everything written so far durable (`fdatasync`), here and now.
    ///
    /// A failure here, or an earlier one on the sync thread, is sticky: Linux reports a failed
    /// writeback once, so a later fsync of the same file may succeed without the lost pages
    /// ever reaching the disk. Nothing written before it may be reported durable again.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.failure()?;
        self.flush()?;
        if self.dirty || self.requested > self.synced_here {
            if let Err(e) = self.file.sync_data() {
                let err = JournalError::Io { step: "syncing", path: self.path.clone(), source: copy_error(&e) };
                self.syncer.shared.lock().failed.get_or_insert(e);
                return Err(err);
            }
            self.dirty = false;
            self.synced_here = self.requested;
            // On disk with the next sync; until then the older mark is the cautious one.
            let _ = write_end_mark(&self.file, &self.cipher, self.end, next_mark_slot(&self.syncer.shared));
        }
        Ok(())
    }

    /// The sticky sync failure, if any (see [`Journal::sync`]).
    fn failure(&self) -> Result<(), JournalError> {
        match &self.syncer.shared.lock().failed {
            Some(e) => Err(JournalError::Io { step: "syncing", path: self.path.clone(), source: copy_error(e) }),
            None => Ok(()),
        }
    }

    /// Writes what is encoded and asks the sync thread to make it durable; returns the
    /// generation to wait for (see [`Journal::synced`]). Returns at once.
    pub fn request_sync(&mut self) -> Result<u64, JournalError> {
        self.flush()?;
        if self.dirty {
            self.requested += 1;
            {
                let mut st = self.syncer.shared.lock();
                st.requested = self.requested;
                st.file = Some(self.file.clone());
                st.end = self.end;
            }
            self.syncer.shared.wake.notify_one();
            self.dirty = false;
        }
        Ok(self.requested)
    }

    /// Readable when the sync thread has finished a sync: the event loop waits for it.
    pub fn sync_events(&self) -> BorrowedFd<'_> {
        self.syncer.done_fd.as_fd()
    }

    /// The last generation known to be on disk; an error if a sync failed (the journal can
    /// then promise nothing more: see the runtime).
    pub fn synced(&mut self) -> Result<u64, JournalError> {
        let _ = crate::sys::eventfd_take(self.syncer.done_fd.as_fd());
        self.failure()?;
        let done = self.syncer.shared.lock().done;
        Ok(done.max(self.synced_here))
    }

    /// Entries written and not yet done.
    pub fn live(&self) -> usize {
        self.live
    }

    /// True when most of the file is records of handled messages: time to rewrite it.
    pub fn wants_compaction(&self) -> bool {
        self.dead > 20_000 && self.dead > 4 * self.live
    }

    /// Rewrites the journal with only `live` (every entry not yet handled, in any order),
    /// atomically: a crash leaves either the old file or the new one.
    pub fn compact(&mut self, mut live: Vec<&Entry>) -> Result<(), JournalError> {
        self.sync()?;
        live.sort_by_key(|e| e.id);
        let dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (tmp, file) = create_fresh(&dir)?;
        let old = (std::mem::replace(&mut self.file, Arc::new(file)), self.end, self.allocated);
        (self.end, self.allocated) = (HEADER, 0);
        if let Err(err) = self.install_fresh(&live, &tmp) {
            // Keep appending to the old, complete journal.
            (self.file, self.end, self.allocated) = old;
            self.buf.clear();
            return Err(err);
        }
        Ok(())
    }
}

/// `journal.tmp` in `dir`, created empty (mode 0600, never through a symlink).
fn create_fresh(dir: &Path) -> Result<(PathBuf, File), JournalError> {
    let tmp = dir.join("journal.tmp");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    Ok((tmp, file))
}
