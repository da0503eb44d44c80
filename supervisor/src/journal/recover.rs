//! Opening the journal: the storage key, replaying the records up to the durable end (a
//! record that fails before it is corruption, after it a crash's debris), and compacting the
//! file to the pending entries.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::ChaCha20Poly1305;

use super::seal::{io, load_or_create_key, open_sealed, read_end_mark, Nonces};
use super::syncer::Syncer;
use super::{create_fresh, Entry, Journal, JournalError, Record, AAD, HEADER};

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
            (pending, max_id) = replay(&cipher, &data, &path)?;
        }
        // Ids only grow; a journal whose ids are used up cannot take another message.
        let Some(next_id) = max_id.checked_add(1) else {
            let what = "message ids are used up (the largest id is u64::MAX)".to_string();
            return Err(JournalError::Corrupt { path, offset: 0, what });
        };
        // Compaction: rewrite with only the pending entries, atomically.
        let (tmp, file) = create_fresh(dir)?;
        let syncer = Syncer::start(cipher.clone()).map_err(io("starting the sync thread for", &path))?;
        let mut j = Journal {
            path: path.clone(),
            file: Arc::new(file),
            end: HEADER,
            allocated: 0,
            cipher,
            next_id,
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
}

/// Replays the records in `data` (a whole journal file) under `cipher`: the pending entries by
/// id, and the largest id seen. `path` only names the file in errors and logs.
fn replay(cipher: &ChaCha20Poly1305, data: &[u8], path: &Path) -> Result<(BTreeMap<u64, Entry>, u64), JournalError> {
    let mut pending: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut max_id = 0u64;
    let zeros_from = |from: usize| data.get(from..).is_none_or(|rest| rest.iter().all(|&b| b == 0));
    // Where the records start, and how far they were on disk (the durable-end mark).
    let (mut at, durable) = match read_end_mark(cipher, data) {
        Some(end) => (HEADER as usize, usize::try_from(end).unwrap_or(usize::MAX)),
        None if open_sealed(cipher, AAD, data, 0).is_ok() => {
            tracing::info!(journal = %path.display(), "a journal from an earlier version (no durable-end mark): reading it whole");
            (0, 0)
        }
        None if data.is_empty() => (0, 0),
        None => {
            return Err(JournalError::Corrupt {
                path: path.to_path_buf(),
                offset: 0,
                what: "neither durable-end mark authenticates: a journal under another key, or damaged".into(),
            })
        }
    };
    while at < data.len() {
        let stop = if data.len() - at >= 4 && data[at..at + 4] == [0; 4] {
            // The end of the log, in the zero-filled space after it; before the durable
            // end, synced records are missing (checked below).
            if zeros_from(at) && at >= durable {
                break;
            }
            if zeros_from(at) {
                "the log ends (zeros) before its durable-end mark".to_string()
            } else {
                "a record of length zero with data after it".to_string()
            }
        } else {
            match open_sealed(cipher, AAD, data, at).and_then(|(plain, n)| {
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
            return Err(JournalError::Corrupt { path: path.to_path_buf(), offset: at as u64, what: stop });
        }
        // After it: writes no sync had covered when the power went (a torn record,
        // pages the disk wrote out of order). None was acknowledged as durable, so
        // dropping them loses nothing anyone was promised.
        tracing::warn!(journal = %path.display(), offset = at, durable, "dropping what follows the last complete record, never synced: {stop}");
        break;
    }
    if at < durable {
        // Records a completed sync had put on disk are gone: a truncated file.
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: at as u64,
            what: format!("the file ends at byte {} before its durable-end mark ({durable})", data.len()),
        });
    }
    Ok((pending, max_id))
}

/// Fuzzing entry point: replays `data` as a journal file sealed under `key`, entirely in
/// memory (no file, no key file, no compaction). Returns the pending entries in id order and
/// the largest id seen, or why recovery refuses the file.
#[doc(hidden)]
pub fn replay_for_fuzzing(key: &[u8; 32], data: &[u8]) -> Result<(Vec<Entry>, u64), JournalError> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let (pending, max_id) = replay(&cipher, data, Path::new("<fuzz>"))?;
    Ok((pending.into_values().collect(), max_id))
}
