//! Sealing journal records (`u32 length | nonce | ciphertext | tag` under the storage key),
//! record nonces, the durable-end mark in the file's first page, and the storage key file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

use super::syncer::SyncShared;
use super::{JournalError, END_AAD, MARK_SLOTS, MAX_RECORD};

/// Record nonces: 96 bits each from the OS RNG, drawn in blocks (one `getrandom` per
/// `NONCES_PER_DRAW` records rather than one per record). Each nonce is used once.
pub(super) const NONCES_PER_DRAW: usize = 128;

pub(super) struct Nonces {
    pub(super) pool: [u8; 12 * NONCES_PER_DRAW],
    pub(super) used: usize,
}

impl Nonces {
    pub(super) fn new() -> Nonces {
        Nonces { pool: [0; 12 * NONCES_PER_DRAW], used: 12 * NONCES_PER_DRAW }
    }

    pub(super) fn next(&mut self) -> Result<[u8; 12], getrandom::Error> {
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

/// Appends `plain` sealed as `u32 length | nonce | ciphertext | tag` to `out` (encrypted in
/// place there); on failure `out` is as it was.
pub(super) fn seal_into(
    out: &mut Vec<u8>,
    cipher: &ChaCha20Poly1305,
    aad: &[u8],
    nonce: [u8; 12],
    plain: &[u8],
) -> Option<()> {
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
pub(super) fn open_sealed(
    cipher: &ChaCha20Poly1305,
    aad: &[u8],
    data: &[u8],
    at: usize,
) -> Result<(Vec<u8>, usize), String> {
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
pub(super) fn write_end_mark(file: &File, cipher: &ChaCha20Poly1305, end: u64, slot: usize) -> std::io::Result<()> {
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut mark = Vec::with_capacity(40);
    seal_into(&mut mark, cipher, END_AAD, nonce, &end.to_le_bytes()).ok_or_else(|| std::io::Error::other("sealing"))?;
    file.write_all_at(&mark, MARK_SLOTS[slot % 2])
}

/// The slot for the next mark: the one not written last.
pub(super) fn next_mark_slot(shared: &SyncShared) -> usize {
    let mut st = shared.lock();
    st.mark_slot ^= 1;
    st.mark_slot
}

/// The durable end the marks in `data` record: the larger of the slots that authenticate.
pub(super) fn read_end_mark(cipher: &ChaCha20Poly1305, data: &[u8]) -> Option<u64> {
    MARK_SLOTS
        .iter()
        .filter_map(|&at| open_sealed(cipher, END_AAD, data, at as usize).ok())
        .filter_map(|(plain, _)| <[u8; 8]>::try_from(plain.as_slice()).ok().map(u64::from_le_bytes))
        .max()
}

/// An `io::Error` again (they are not `Clone`): the same errno, or the same kind and text.
pub(super) fn copy_error(e: &std::io::Error) -> std::io::Error {
    e.raw_os_error().map_or_else(|| std::io::Error::new(e.kind(), e.to_string()), std::io::Error::from_raw_os_error)
}

pub(super) fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { step, path: path.to_path_buf(), source }
}

pub(super) fn load_or_create_key(dir: &Path) -> Result<[u8; 32], JournalError> {
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
