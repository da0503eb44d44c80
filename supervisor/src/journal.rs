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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use serde::{Deserialize, Serialize};

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

/// Record nonces: 96 bits each from the OS RNG, drawn in blocks (one `getrandom` per
/// `NONCES_PER_DRAW` records rather than one per record). Each nonce is used once.
const NONCES_PER_DRAW: usize = 128;

struct Nonces {
    pool: [u8; 12 * NONCES_PER_DRAW],
    used: usize,
}

impl Nonces {
    fn new() -> Nonces {
        Nonces { pool: [0; 12 * NONCES_PER_DRAW], used: 12 * NONCES_PER_DRAW }
    }

    fn next(&mut self) -> Result<[u8; 12], getrandom::Error> {
        if self.used == self.pool.len() {
            getrandom::getrandom(&mut self.pool)?;
            self.used = 0;
        }
        let mut n = [0u8; 12];
        n.copy_from_slice(&self.pool[self.used..self.used + 12]);
        self.used += 12;
        Ok(n)
    }
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

/// The journal's fsync thread. The event loop writes records and asks for a sync; the
/// thread runs `fdatasync` while the loop goes on serving every worker, and counts each
/// completed sync into an eventfd the loop waits on. Syncs asked for while one runs are
/// served by the next one (group commit across loop turns).
struct Syncer {
    shared: Arc<SyncShared>,
    done_fd: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SyncShared {
    state: Mutex<SyncState>,
    wake: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// The last generation asked for, the file its records were written to, and the log's
    /// end then.
    requested: u64,
    file: Option<Arc<File>>,
    end: u64,
    /// The durable-end slot written last.
    mark_slot: usize,
    /// Every generation up to this one is on disk.
    done: u64,
    /// A failed `fdatasync`: fatal for the journal (see the runtime).
    failed: Option<std::io::Error>,
    stop: bool,
}

impl SyncShared {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        // The thread holds the lock only to copy a few fields and cannot panic while it does.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Syncer {
    fn start(cipher: ChaCha20Poly1305) -> std::io::Result<Syncer> {
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

/// Appends `plain` sealed as `u32 length | nonce | ciphertext | tag` to `out` (encrypted in
/// place there); on failure `out` is as it was.
fn seal_into(out: &mut Vec<u8>, cipher: &ChaCha20Poly1305, aad: &[u8], nonce: [u8; 12], plain: &[u8]) -> Option<()> {
    let len = u32::try_from(12 + plain.len() + 16).ok()?;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    match cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[start + 16..]) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Some(())
        }
        Err(_) => {
            out.truncate(start);
            None
        }
    }
}

/// Opens the sealed record at `at`: its plaintext and its size on disk, or why not.
fn open_sealed(cipher: &ChaCha20Poly1305, aad: &[u8], data: &[u8], at: usize) -> Result<(Vec<u8>, usize), String> {
    let len_bytes = data.get(at..at + 4).ok_or("length cut off")?;
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if !(12 + 16..=MAX_RECORD).contains(&len) {
        return Err("implausible record length".into());
    }
    let body = data.get(at + 4..at + 4 + len).ok_or("record cut off")?;
    let (ct, tag) = body[12..].split_at(len - 12 - 16);
    let mut buf = ct.to_vec();
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(&body[..12]), aad, &mut buf, Tag::from_slice(tag))
        .map_err(|_| "record fails authentication".to_string())?;
    Ok((buf, 4 + len))
}

/// Writes the durable-end mark in `slot` (see [`HEADER`]).
fn write_end_mark(file: &File, cipher: &ChaCha20Poly1305, end: u64, slot: usize) -> std::io::Result<()> {
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut mark = Vec::with_capacity(40);
    seal_into(&mut mark, cipher, END_AAD, nonce, &end.to_le_bytes()).ok_or_else(|| std::io::Error::other("sealing"))?;
    file.write_all_at(&mark, MARK_SLOTS[slot % 2])
}

/// The slot for the next mark: the one not written last.
fn next_mark_slot(shared: &SyncShared) -> usize {
    let mut st = shared.lock();
    st.mark_slot ^= 1;
    st.mark_slot
}

/// The durable end the marks in `data` record: the larger of the slots that authenticate.
fn read_end_mark(cipher: &ChaCha20Poly1305, data: &[u8]) -> Option<u64> {
    MARK_SLOTS
        .iter()
        .filter_map(|&at| open_sealed(cipher, END_AAD, data, at as usize).ok())
        .filter_map(|(plain, _)| <[u8; 8]>::try_from(plain.as_slice()).ok().map(u64::from_le_bytes))
        .max()
}

/// An `io::Error` again (they are not `Clone`): the same errno, or the same kind and text.
fn copy_error(e: &std::io::Error) -> std::io::Error {
    e.raw_os_error().map_or_else(|| std::io::Error::new(e.kind(), e.to_string()), std::io::Error::from_raw_os_error)
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { step, path: path.to_path_buf(), source }
}

fn load_or_create_key(dir: &Path) -> Result<[u8; 32], JournalError> {
    let path = dir.join("journal.key");
    let read = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).and_then(|mut f| {
        let mut v = Vec::new();
        f.read_to_end(&mut v).map(|_| v)
    });
    match read {
        Ok(k) if k.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&k);
            Ok(key)
        }
        Ok(k) => {
            Err(JournalError::Corrupt { path, offset: 0, what: format!("storage key is {} bytes, not 32", k.len()) })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::getrandom(&mut key).map_err(|e| JournalError::Io {
                step: "generating",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io("creating", &path))?;
            f.write_all(&key).map_err(io("writing", &path))?;
            f.sync_all().map_err(io("syncing", &path))?;
            Ok(key)
        }
        Err(e) => Err(JournalError::Io { step: "reading", path, source: e }),
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and returns it with the pending entries, in
    /// id order. Rewrites the file with only the pending entries (compaction).
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Entry>), JournalError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let key = load_or_create_key(dir)?;
        let cipher = ChaCha20Poly1305::new((&key).into());
        let path = dir.join("journal");
        let mut pending: BTreeMap<u64, Entry> = BTreeMap::new();
        let mut max_id = 0u64;
        if let Ok(mut f) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
            let mut data = Vec::new();
            f.read_to_end(&mut data).map_err(io("reading", &path))?;
            let zeros_from = |from: usize| data.get(from..).is_none_or(|rest| rest.iter().all(|&b| b == 0));
            // Where the records start, and how far they were on disk (the durable-end mark).
            let (mut at, durable) = match read_end_mark(&cipher, &data) {
                Some(end) => (HEADER as usize, usize::try_from(end).unwrap_or(usize::MAX)),
                None if open_sealed(&cipher, AAD, &data, 0).is_ok() => {
                    tracing::info!(journal = %path.display(), "a journal from an earlier version (no durable-end mark): reading it whole");
                    (0, 0)
                }
                None if data.is_empty() => (0, 0),
                None => {
                    return Err(JournalError::Corrupt {
                        path,
                        offset: 0,
                        what: "neither durable-end mark authenticates: a journal under another key, or damaged".into(),
                    })
                }
            };
            while at < data.len() {
                let stop = if data.len() - at >= 4 && data[at..at + 4] == [0; 4] {
                    // The end of the log, in the zero-filled space after it.
                    if zeros_from(at) {
                        break;
                    }
                    "a record of length zero with data after it".to_string()
                } else {
                    match open_sealed(&cipher, AAD, &data, at).and_then(|(plain, n)| {
                        postcard::from_bytes::<Record>(&plain)
                            .map(|r| (r, n))
                            .map_err(|e| format!("record does not decode: {e}"))
                    }) {
                        Ok((Record::Enqueue(e), n)) => {
                            max_id = max_id.max(e.id);
                            pending.insert(e.id, e);
                            at += n;
                            continue;
                        }
                        Ok((Record::Done(id), n)) => {
                            pending.remove(&id);
                            max_id = max_id.max(id);
                            at += n;
                            continue;
                        }
                        Ok((Record::DoneMany(ids), n)) => {
                            for id in ids {
                                pending.remove(&id);
                                max_id = max_id.max(id);
                            }
                            at += n;
                            continue;
                        }
                        Ok((Record::NextId(next), n)) => {
                            max_id = max_id.max(next.saturating_sub(1));
                            at += n;
                            continue;
                        }
                        Err(what) => what,
                    }
                };
                if at < durable {
                    // Inside what a completed sync had put on disk: damage, not a crash.
                    return Err(JournalError::Corrupt { path, offset: at as u64, what: stop });
                }
                // After it: writes no sync had covered when the power went (a torn record,
                // pages the disk wrote out of order). None was acknowledged as durable, so
                // dropping them loses nothing anyone was promised.
                tracing::warn!(journal = %path.display(), offset = at, durable, "dropping what follows the last complete record, never synced: {stop}");
                break;
            }
        }
        // Compaction: rewrite with only the pending entries, atomically.
        let (tmp, file) = create_fresh(dir)?;
        let syncer = Syncer::start(cipher.clone()).map_err(io("starting the sync thread for", &path))?;
        let mut j = Journal {
            path: path.clone(),
            file: Arc::new(file),
            end: HEADER,
            allocated: 0,
            cipher,
            next_id: max_id + 1,
            live: 0,
            dead: 0,
            dirty: false,
            buf: Vec::new(),
            done_ids: Vec::new(),
            nonces: Nonces::new(),
            scratch: Vec::new(),
            syncer,
            requested: 0,
            synced_here: 0,
        };
        let entries: Vec<Entry> = pending.into_values().collect();
        j.install_fresh(&entries.iter().collect::<Vec<_>>(), &tmp)?;
        Ok((j, entries))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn pending_entries_survive_reopen_in_order_and_done_ones_do_not() {
        let d = dir("reopen");
        let (mut j, p) = Journal::open(&d).expect("open");
        assert!(p.is_empty());
        let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
        let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
        let c = j.enqueue("w", "s", "m", b"three".to_vec()).expect("c");
        j.done(b.id).expect("done");
        j.sync().expect("sync");
        drop(j);
        let (mut j, p) = Journal::open(&d).expect("reopen");
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a.id, c.id]);
        assert_eq!(p[1].body, b"three");
        let e = j.enqueue("w", "s", "m", vec![]).expect("next");
        assert!(e.id > c.id, "ids keep increasing across restarts");
        // Even when everything was handled and compaction dropped every record.
        for id in [a.id, c.id, e.id] {
            j.done(id).expect("done");
        }
        j.sync().expect("sync");
        drop(j);
        let (_, p) = Journal::open(&d).expect("reopen");
        assert!(p.is_empty());
        let (mut j, _) = Journal::open(&d).expect("reopen twice");
        let f = j.enqueue("w", "s", "m", vec![]).expect("after");
        assert!(f.id > e.id, "ids went back to {} after {}", f.id, e.id);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn borrowed_records_encode_exactly_as_owned_ones() {
        let e = Entry { id: 7, from: "a".into(), service: "b".into(), method: "c".into(), body: vec![1, 2, 3] };
        let enc = |r: &RecordRef<'_>| postcard::to_allocvec(r).expect("encode");
        let own = |r: &Record| postcard::to_allocvec(r).expect("encode");
        assert_eq!(enc(&RecordRef::Enqueue(&e)), own(&Record::Enqueue(e.clone())));
        assert_eq!(enc(&RecordRef::Done(9)), own(&Record::Done(9)));
        assert_eq!(enc(&RecordRef::NextId(9)), own(&Record::NextId(9)));
        assert_eq!(enc(&RecordRef::DoneMany(&[4, 5])), own(&Record::DoneMany(vec![4, 5])));
    }

    #[test]
    fn one_done_record_per_acknowledgement_from_earlier_versions_is_still_read() {
        let d = dir("legacy-done");
        let (mut j, _) = Journal::open(&d).expect("open");
        let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
        let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
        j.write(&RecordRef::Done(a.id)).expect("legacy done");
        j.sync().expect("sync");
        drop(j);
        let (_, p) = Journal::open(&d).expect("reopen");
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b.id]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_sync_thread_reports_each_requested_generation() {
        let d = dir("sync-thread");
        let (mut j, _) = Journal::open(&d).expect("open");
        let wait = |j: &mut Journal, g: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                assert!(std::time::Instant::now() < deadline, "generation {g} never synced");
                let _ = airlock_protocol::sys::poll_readable(j.sync_events(), 100);
                if j.synced().expect("synced") >= g {
                    return;
                }
            }
        };
        j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
        let g1 = j.request_sync().expect("request");
        assert_eq!(g1, 1);
        assert_eq!(j.request_sync().expect("nothing new"), g1, "nothing written since: same generation");
        wait(&mut j, g1);
        j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
        let g2 = j.request_sync().expect("request");
        assert_eq!(g2, 2);
        wait(&mut j, g2);
        drop(j);
        let (_, p) = Journal::open(&d).expect("reopen");
        assert_eq!(p.len(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn records_overwrite_a_zero_filled_file_that_grows_by_whole_chunks() {
        let d = dir("chunks");
        let (mut j, _) = Journal::open(&d).expect("open");
        j.enqueue("w", "s", "m", vec![7; 100]).expect("e");
        j.sync().expect("sync");
        let size = || std::fs::metadata(d.join("journal")).expect("stat").len();
        assert_eq!(size(), CHUNK, "one chunk, zero-filled after {} bytes of records", j.end);
        // Past the first chunk: the file grows by whole chunks, every record still readable.
        let n = (CHUNK as usize / 60_000) + 2;
        for _ in 0..n {
            j.enqueue("w", "s", "m", vec![9; 60_000]).expect("big");
            j.flush().expect("flush");
        }
        j.sync().expect("sync");
        assert!(j.end > CHUNK && size() % CHUNK == 0 && size() > j.end, "size {} end {}", size(), j.end);
        drop(j);
        let (_, p) = Journal::open(&d).expect("reopen");
        assert_eq!(p.len(), n + 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_durable_end_mark_leaves_the_other_slot() {
        let d = dir("mark");
        let (mut j, _) = Journal::open(&d).expect("open");
        let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
        j.sync().expect("sync");
        let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
        j.sync().expect("sync");
        drop(j);
        let path = d.join("journal");
        // (Each open rewrites the file: every case starts from the same bytes.)
        let written = std::fs::read(&path).expect("read");
        for slot in MARK_SLOTS {
            let mut raw = written.clone();
            raw[slot as usize + 20] ^= 0xff;
            std::fs::write(&path, &raw).expect("tear one mark");
            let (_, p) = Journal::open(&d).expect("the other mark stands");
            assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a.id, b.id]);
        }
        // Both marks damaged (or a journal under another key): refused, never read as empty.
        let mut raw = written;
        for slot in MARK_SLOTS {
            raw[slot as usize + 20] ^= 0xff;
        }
        std::fs::write(&path, &raw).expect("tear both");
        assert!(matches!(Journal::open(&d), Err(JournalError::Corrupt { offset: 0, .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_journal_of_the_earlier_format_is_read_whole() {
        // Records from offset 0, no durable-end mark, as airlockd wrote them before.
        let d = dir("earlier");
        let (mut j, _) = Journal::open(&d).expect("open");
        let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
        let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
        j.done(a.id).expect("done");
        j.sync().expect("sync");
        let (start, end) = (HEADER as usize, j.end as usize);
        drop(j);
        let path = d.join("journal");
        let raw = std::fs::read(&path).expect("read");
        std::fs::write(&path, &raw[start..end]).expect("rewrite as the earlier format");
        let (_, p) = Journal::open(&d).expect("reopen");
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b.id]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bodies_are_not_stored_in_clear() {
        let d = dir("clear");
        let (mut j, _) = Journal::open(&d).expect("open");
        j.enqueue("w", "s", "m", b"SECRET-SETPOINT-4242".to_vec()).expect("e");
        j.sync().expect("sync");
        let raw = std::fs::read(d.join("journal")).expect("read");
        assert!(!raw.windows(20).any(|w| w == b"SECRET-SETPOINT-4242"));
        let key = std::fs::metadata(d.join("journal.key")).expect("key");
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn torn_last_record_is_dropped_but_corruption_elsewhere_is_an_error() {
        let d = dir("torn");
        let (mut j, _) = Journal::open(&d).expect("open");
        j.enqueue("w", "s", "m", b"kept".to_vec()).expect("e");
        j.sync().expect("sync");
        // Written, never synced: the power went while its last sector was on its way.
        j.enqueue("w", "s", "m", b"torn".to_vec()).expect("e");
        j.flush().expect("flush");
        let end = j.end as usize;
        drop(j);
        let path = d.join("journal");
        let mut raw = std::fs::read(&path).expect("read");
        raw[end - 5..end].fill(0);
        std::fs::write(&path, &raw).expect("tear");
        let (_, p) = Journal::open(&d).expect("torn tail is recoverable");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].body, b"kept");
        // Now flip a byte in the first (synced) record, with another after it.
        let (mut j, _) = Journal::open(&d).expect("open");
        j.enqueue("w", "s", "m", b"after".to_vec()).expect("e");
        j.sync().expect("sync");
        drop(j);
        let mut raw = std::fs::read(&path).expect("read");
        raw[HEADER as usize + 20] ^= 1;
        std::fs::write(&path, &raw).expect("write");
        match Journal::open(&d) {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, HEADER),
            other => panic!("expected corruption at {HEADER}, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unsynced_writes_the_disk_reordered_are_dropped_not_refused() {
        // R1 synced; R2 and R3 written after it and never synced. The power went with R3's
        // pages on disk and part of R2's not: what is past the durable-end mark is dropped,
        // and airlockd starts.
        let d = dir("reordered");
        let (mut j, _) = Journal::open(&d).expect("open");
        let r1 = j.enqueue("w", "s", "m", vec![1; 100]).expect("r1");
        j.sync().expect("sync");
        let r2_at = j.end as usize;
        j.enqueue("w", "s", "m", vec![2; 9000]).expect("r2");
        j.enqueue("w", "s", "m", vec![3; 100]).expect("r3");
        j.flush().expect("flush");
        drop(j);
        let path = d.join("journal");
        let mut raw = std::fs::read(&path).expect("read");
        raw[r2_at + 4096..r2_at + 8192].fill(0);
        std::fs::write(&path, &raw).expect("write");
        let (_, p) = Journal::open(&d).expect("a crash's debris is not corruption");
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![r1.id]);
        // The same damage to a record a sync had covered is corruption.
        let (mut j, _) = Journal::open(&d).expect("open");
        let at = j.end as usize;
        j.enqueue("w", "s", "m", vec![4; 9000]).expect("r4");
        j.enqueue("w", "s", "m", vec![5; 100]).expect("r5");
        j.sync().expect("sync");
        drop(j);
        let mut raw = std::fs::read(&path).expect("read");
        raw[at + 4096..at + 8192].fill(0);
        std::fs::write(&path, &raw).expect("write");
        match Journal::open(&d) {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, at as u64),
            other => panic!("expected corruption at {at}, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_entries() {
        let d = dir("compact");
        let (mut j, _) = Journal::open(&d).expect("open");
        let mut live = Vec::new();
        for k in 0..100u32 {
            let e = j.enqueue("w", "s", "m", k.to_le_bytes().to_vec()).expect("e");
            if k % 10 == 0 {
                live.push(e);
            } else {
                j.done(e.id).expect("done");
            }
        }
        j.sync().expect("sync");
        let before = j.end - HEADER;
        j.compact(live.iter().collect()).expect("compact");
        let after = j.end - HEADER;
        assert!(after < before / 4, "{after} vs {before} bytes of records");
        let next = j.enqueue("w", "s", "m", b"after".to_vec()).expect("append after compaction");
        j.sync().expect("sync");
        drop(j);
        let (_, p) = Journal::open(&d).expect("reopen");
        let mut want: Vec<u64> = live.iter().map(|e| e.id).collect();
        want.push(next.id);
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), want);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_journal_under_another_key_is_refused() {
        let d = dir("key");
        let (mut j, _) = Journal::open(&d).expect("open");
        j.enqueue("w", "s", "m", b"x".to_vec()).expect("e");
        j.enqueue("w", "s", "m", b"y".to_vec()).expect("e");
        j.sync().expect("sync");
        drop(j);
        std::fs::write(d.join("journal.key"), [9u8; 32]).expect("swap key");
        assert!(matches!(Journal::open(&d), Err(JournalError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }
}
