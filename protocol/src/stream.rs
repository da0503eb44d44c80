//! Streams: a single-producer, single-consumer ring of records in a memfd that two confined
//! processes map, with futex signalling used only when the other end sleeps.
//!
//! This module owns the ring's layout, its validation against a hostile peer, per-record
//! authenticated encryption and the wait/wake handshake. It never decides who may stream to whom
//! (the supervisor's permit table does), never trusts a byte of the shared area, and never
//! waits without a deadline.
//!
//! # Layout
//!
//! The memfd holds one header page ([`HEADER_LEN`] bytes) and then the ring (`ring_bytes`, a
//! power of two). Words of the header, each owned (written) by one party, in cache lines of
//! their own so that the producer and consumer never write the same line:
//!
//! | offset | word | written by |
//! |---|---|---|
//! | 0 | `magic` u64 (`"AIRLSTR1"`) | supervisor, at creation |
//! | 8 | `version` u32, 12 `ring_bytes` u32, 16 `max_record` u32, 20 `flags` u32 (bit 0: encrypted) | supervisor, at creation |
//! | 128 | `head` u64: total bytes the producer has published | producer |
//! | 256 | `tail` u64: total bytes the consumer has released | consumer |
//! | 384 | `data` u32 (futex), 388 `consumer_waiting` u32 | producer, revoker / consumer |
//! | 512 | `space` u32 (futex), 516 `producer_waiting` u32 | consumer, revoker / producer |
//! | 640 | `producer_closed` u32, 644 `consumer_closed` u32, 648 `revoked` u32 | each end / supervisor |
//!
//! `head` and `tail` count bytes since the stream began and never wrap (2^64 bytes); the ring
//! offset of either is `index & (ring_bytes - 1)`. Both are multiples of 8. A record is an
//! 8-byte header, `len` u32 then `kind` u32 (little endian), and `len` payload bytes, padded to
//! 8. A record never wraps: when it does not fit before the ring's end the producer writes a
//! skip marker (`kind` 2, `len` = the bytes from after the marker to the ring's end) and puts
//! the record at offset 0; the skip and the record are published by one store of `head`. Since
//! every index is a multiple of 8 and the ring at least 4 KiB, at least 8 bytes always remain
//! before the end, so no implicit wrap is ever needed. In encrypted mode the payload is the
//! ChaCha20-Poly1305 ciphertext followed by its 16-byte tag, under the per-stream key, with
//! nonce `3 || sequence` (see `crate::crypto`) and the record header as associated data; the
//! consumer counts sequence numbers itself, so a replayed, reordered or rewritten record fails.
//!
//! # The peer is hostile
//!
//! Each end reads the other's index once per use, as an atomic, checks it against its own
//! private copy (the producer: `tail` never goes back and never passes `head`; the consumer:
//! `head` never goes back and is never more than a ring ahead of `tail`), copies a record's
//! header and payload into private memory, and only then checks or decrypts the copy. No Rust
//! reference to the shared bytes ever exists ([`crate::sys::SharedArea`]). Anything the peer can
//! get wrong poisons this end: a clear [`StreamError::Poisoned`] on this and every later call,
//! never a panic, never a wait without a deadline. The header's identity words are read once, at
//! attach; later changes to them are ignored.
//!
//! # Memory ordering and signalling
//!
//! The producer copies a record into the ring, then stores `head` (`SeqCst`, so also a release);
//! the consumer loads `head` (`SeqCst`, an acquire) before it copies the record out: the copy
//! sees the bytes. Symmetrically, the consumer copies out before storing `tail`, and the
//! producer loads `tail` before it overwrites those bytes.
//!
//! Sleeping is a Dekker handshake on two `SeqCst` words, so no wake-up is lost: the consumer
//! reads the `data` futex word, sets `consumer_waiting`, re-reads `head`, and only then waits on
//! `data` (still holding the value it read, with a timeout); the producer stores `head`, then
//! reads `consumer_waiting` and, only if it is set, clears it, bumps `data` and `FUTEX_WAKE`s.
//! In the single total order of `SeqCst` operations either the producer's read of the flag
//! follows the consumer's write (the producer wakes it, and the bump makes a wait that has not
//! started yet return at once) or it precedes it, and then so does the `head` store, which the
//! consumer's re-read sees. The producer waiting for space does the same on `space` and
//! `producer_waiting`; the consumer wakes it once the ring is at most half full or empty, so a
//! producer and consumer sharing one CPU hand over batches rather than single records. A busy
//! pair thus makes no system call per record. A consumer that finds the ring empty spins
//! briefly and yields the CPU once before it sleeps.
//!
//! Every wait is bounded: by the caller's deadline, and each sleep by [`MAX_SLEEP`], after
//! which the sleeper re-reads the indices itself, so a peer that never signals still has its
//! data found. A peer that signals without data or space is tolerated [`MAX_IDLE_WAKES`] times
//! in a row, then poisons the stream (no busy loop driven by the peer).
//!
//! Revocation: the supervisor maps the header page only ([`StreamControl`]), sets `revoked`, and
//! bumps and wakes both futex words; both ends then answer [`StreamError::Revoked`]. It never
//! reads the ring. The word is shared, so a peer can fake a revocation (or a close) of its own
//! stream: that only ends what it could end anyway by not reading or not writing; the
//! supervisor's own word to each end (over its channel) is what to believe.
//!
//! System calls on the hot path: none while both ends are busy. A sleeping end costs `futex`
//! (`FUTEX_WAIT`/`FUTEX_WAKE`, shared, i.e. without `FUTEX_PRIVATE_FLAG`: ops 0 and 1) and the
//! consumer's one `sched_yield` before it sleeps; a seccomp policy tightening `futex` must
//! allow these two operations besides the private ones the standard library uses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::{nonce, Aead, DOMAIN_STREAM, KEY_LEN};
use crate::frame::TAG_LEN;
use crate::sys::{self, FutexWait, SharedArea};

/// Bytes of the header page in front of the ring.
pub const HEADER_LEN: usize = 4096;
/// The smallest ring.
pub const MIN_RING: u32 = 4096;
/// The largest ring.
pub const MAX_RING: u32 = 64 << 20;
/// The longest single sleep: a sleeper re-reads the indices at least this often, so a peer that
/// never signals delays data by at most this much.
pub const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Consecutive wake-ups that bring neither data nor space nor a state change before the waiting
/// end gives up on its peer and poisons the stream.
pub const MAX_IDLE_WAKES: u32 = 64;

const MAGIC: u64 = u64::from_le_bytes(*b"AIRLSTR1");
const VERSION: u32 = 1;
const FLAG_ENCRYPTED: u32 = 1;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_RING: usize = 12;
const OFF_MAX_RECORD: usize = 16;
const OFF_FLAGS: usize = 20;
const OFF_HEAD: usize = 128;
const OFF_TAIL: usize = 256;
pub(crate) const OFF_DATA: usize = 384;
const OFF_CONSUMER_WAITING: usize = 388;
pub(crate) const OFF_SPACE: usize = 512;
const OFF_PRODUCER_WAITING: usize = 516;
const OFF_PRODUCER_CLOSED: usize = 640;
const OFF_CONSUMER_CLOSED: usize = 644;
pub(crate) const OFF_REVOKED: usize = 648;

/// Bytes of a record's header.
pub const RECORD_HEADER: usize = 8;
const KIND_DATA: u32 = 1;
const KIND_SKIP: u32 = 2;

/// Spins on an empty ring before yielding and sleeping (each a `spin_loop` hint and a load).
const SPINS: u32 = 256;

const MEMFD_NAME: &std::ffi::CStr = c"airlock-stream";

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("the ring is full")]
    Busy,
    #[error("timed out waiting for the peer (for space in the ring, or for a call's answer)")]
    TimedOut,
    #[error("the stream is closed")]
    Closed,
    #[error("the stream was revoked by the supervisor")]
    Revoked,
    #[error("record of {len} bytes exceeds the stream's {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("stream is poisoned: {0}")]
    Poisoned(String),
    #[error("stream area rejected: {0}")]
    BadArea(String),
    #[error("stream parameters rejected: {0}")]
    BadParams(String),
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A call in a shared region ([`crate::region`]) that the callee refused; the caller's end
    /// stays usable.
    #[error("the callee refused the call: {0}")]
    Refused(String),
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| StreamError::Io { what, source }
}

/// Sizes and mode of one stream, decided by the supervisor from the permit; travels in wire
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamParams {
    /// Bytes of the ring: a power of two, [`MIN_RING`]`..=`[`MAX_RING`].
    pub ring_bytes: u32,
    /// The largest record's plaintext, at most `ring_bytes / 4`.
    pub max_record: u32,
    /// Records are authenticated and encrypted (the default); plaintext only where the
    /// permit says so.
    pub encrypted: bool,
}

impl StreamParams {
    pub fn validate(&self) -> Result<(), StreamError> {
        let r = self.ring_bytes;
        if !r.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&r) {
            return Err(StreamError::BadParams(format!(
                "ring of {r} bytes: must be a power of two from {MIN_RING} to {MAX_RING}"
            )));
        }
        if self.max_record == 0 || self.max_record > r / 4 {
            return Err(StreamError::BadParams(format!(
                "maximum record of {} bytes: must be 1 to a quarter of the ring ({})",
                self.max_record,
                r / 4
            )));
        }
        Ok(())
    }

    /// Bytes of the memfd: the header page and the ring.
    pub fn area_len(&self) -> usize {
        HEADER_LEN + self.ring_bytes as usize
    }

    fn flags(&self) -> u32 {
        if self.encrypted {
            FLAG_ENCRYPTED
        } else {
            0
        }
    }

    /// The most payload bytes a record may occupy in the ring (plaintext plus tag).
    fn max_stored(&self) -> usize {
        self.max_record as usize + if self.encrypted { TAG_LEN } else { 0 }
    }
}

/// A per-stream 256-bit key. It travels inside the encrypted channel; it is wiped on drop and
/// never formatted.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
pub struct StreamKey([u8; KEY_LEN]);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(..)")
    }
}

impl StreamKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<StreamKey, StreamError> {
        let mut k = StreamKey([0u8; KEY_LEN]);
        getrandom::getrandom(&mut k.0)
            .map_err(|e| StreamError::Io { what: "getrandom", source: std::io::Error::other(e.to_string()) })?;
        Ok(k)
    }

    fn cipher(&self) -> Aead {
        Aead::new(&self.0)
    }
}

/// The tag at the end of a record (`t` is exactly `TAG_LEN` bytes, cut by the caller).
pub(crate) fn tag_of(t: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(t);
    tag
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The cipher for an area in `encrypted` mode; refuses a key that the mode does not call for
/// and a missing one that it does.
pub(crate) fn check_key(encrypted: bool, key: Option<StreamKey>) -> Result<Option<Cipher>, StreamError> {
    match (encrypted, key) {
        (true, Some(k)) => Ok(Some(Cipher(k.cipher()))),
        (false, None) => Ok(None),
        (true, None) => Err(StreamError::BadParams("an encrypted area needs a key".into())),
        (false, Some(_)) => Err(StreamError::BadParams("a plaintext area takes no key".into())),
    }
}

/// Supervisor side: a fresh memfd of `params.area_len()` bytes, its header initialised, sealed
/// with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so that no peer can truncate it under the
/// other's mapping (`SIGBUS`) or change its seals.
pub fn create_area(params: &StreamParams) -> Result<OwnedFd, StreamError> {
    params.validate()?;
    let fd = sys::memfd_create(MEMFD_NAME, false).map_err(io("memfd_create"))?;
    sys::ftruncate(fd.as_fd(), params.area_len() as u64).map_err(io("ftruncate stream memfd"))?;
    let mut hdr = [0u8; 24];
    hdr[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
    hdr[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    hdr[OFF_RING..OFF_RING + 4].copy_from_slice(&params.ring_bytes.to_le_bytes());
    hdr[OFF_MAX_RECORD..OFF_MAX_RECORD + 4].copy_from_slice(&params.max_record.to_le_bytes());
    hdr[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&params.flags().to_le_bytes());
    sys::pwrite_all(fd.as_fd(), &hdr, 0).map_err(io("write stream header"))?;
    sys::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
        .map_err(io("seal stream memfd"))?;
    Ok(fd)
}

/// Checks that `fd` is a memfd of exactly `len` bytes that cannot shrink or grow, and that a
/// writable mapping is possible.
pub(crate) fn verify_memfd(fd: BorrowedFd<'_>, len: usize) -> Result<(), StreamError> {
    let (mode, size) = sys::file_mode_and_size(fd).map_err(io("fstat stream fd"))?;
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Err(StreamError::BadArea(format!("not a regular file (mode {mode:#o})")));
    }
    let magic = sys::fs_magic(fd).map_err(io("fstatfs stream fd"))?;
    if magic != sys::TMPFS_MAGIC {
        return Err(StreamError::BadArea(format!("lives on filesystem {magic:#x}, not shmem")));
    }
    let seals = sys::get_seals(fd).map_err(|e| StreamError::BadArea(format!("F_GET_SEALS refused: {e}")))?;
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & need != need {
        return Err(StreamError::BadArea(format!("not sealed against resizing (seals {seals:#x})")));
    }
    if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err(StreamError::BadArea(format!("sealed against writes (seals {seals:#x})")));
    }
    if size != len as u64 {
        return Err(StreamError::BadArea(format!("holds {size} bytes, the parameters say {len}")));
    }
    Ok(())
}

/// What both ends share: the mapping and the parameters read at attach.
#[derive(Debug)]
struct Ring {
    area: SharedArea,
    params: StreamParams,
    ring: u64,
    mask: u64,
    local: LocalRevoke,
}

impl Ring {
    fn attach(fd: OwnedFd, params: StreamParams) -> Result<Ring, StreamError> {
        params.validate()?;
        verify_memfd(fd.as_fd(), params.area_len())?;
        let area = SharedArea::map(fd.as_fd(), params.area_len()).map_err(io("mmap stream memfd"))?;
        // The descriptor is not needed once mapped: the mapping keeps the file alive.
        drop(fd);
        let magic = area.u64_at(OFF_MAGIC).load(SeqCst);
        if magic != MAGIC {
            return Err(StreamError::BadArea(format!("wrong magic {magic:#x}")));
        }
        let got = (
            area.u32_at(OFF_VERSION).load(SeqCst),
            area.u32_at(OFF_RING).load(SeqCst),
            area.u32_at(OFF_MAX_RECORD).load(SeqCst),
            area.u32_at(OFF_FLAGS).load(SeqCst),
        );
        let want = (VERSION, params.ring_bytes, params.max_record, params.flags());
        if got != want {
            return Err(StreamError::BadArea(format!(
                "header says (version, ring, max record, flags) = {got:?}, the parameters {want:?}"
            )));
        }
        let ring = u64::from(params.ring_bytes);
        Ok(Ring { area, params, ring, mask: ring - 1, local: LocalRevoke::default() })
    }

    fn word(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        self.area.u32_at(off)
    }

    fn flag(&self, off: usize) -> bool {
        self.word(off).load(SeqCst) != 0 || (off == OFF_REVOKED && self.local.is_set())
    }

    fn bump_and_wake(&self, off: usize) {
        bump_and_wake(&self.area, off);
    }

    fn wake_if_waiting(&self, waiting: usize, word: usize) {
        wake_if_waiting(&self.area, waiting, word);
    }

    fn sleep(&self, word: usize, seen: u32, deadline: Option<Instant>) -> Result<bool, StreamError> {
        sleep(&self.area, word, seen, deadline)
    }
}

// The signalling both shared-memory modules use (this one and `crate::region`), on words of a
// mapping's header page.

/// Bumps the futex word at `off` and wakes whoever sleeps on it.
pub(crate) fn bump_and_wake(area: &SharedArea, off: usize) {
    area.u32_at(off).fetch_add(1, SeqCst);
    // A wake that fails (it cannot, on a valid address) only costs the sleeper a MAX_SLEEP.
    let _ = area.futex_wake(off, i32::MAX);
}

/// The other end sleeps (its flag at `waiting` is set): clear the flag and wake it on `word`.
/// The second half of the Dekker handshake: call it after the `SeqCst` store that publishes.
pub(crate) fn wake_if_waiting(area: &SharedArea, waiting: usize, word: usize) {
    let w = area.u32_at(waiting);
    if w.load(SeqCst) != 0 && w.swap(0, SeqCst) != 0 {
        bump_and_wake(area, word);
    }
}

/// Sleeps on the futex word at `word` while it holds `seen`, until `deadline` and at most
/// [`MAX_SLEEP`]. Returns whether the sleep ended by a wake-up or a changed word (rather
/// than a timeout or a signal).
pub(crate) fn sleep(area: &SharedArea, word: usize, seen: u32, deadline: Option<Instant>) -> Result<bool, StreamError> {
    let mut d = MAX_SLEEP;
    if let Some(deadline) = deadline {
        d = d.min(deadline.saturating_duration_since(Instant::now()));
    }
    match area.futex_wait(word, seen, d).map_err(io("futex wait"))? {
        FutexWait::Woken | FutexWait::Changed => Ok(true),
        FutexWait::TimedOut | FutexWait::Interrupted => Ok(false),
    }
}

/// `now + d`, or `None` (no deadline) when that is not representable.
pub(crate) fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

pub(crate) fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// A revocation of one end made in this process, beside the shared `revoked` word (which the
/// peer can clear): set by whoever must make the end let go (the worker library, when airlockd
/// revokes the area), it makes every call and wait of that end answer
/// [`StreamError::Revoked`], a sleeping one within [`MAX_SLEEP`], so the end's owner returns and
/// the area can be unmapped in time. Shared by [`StreamWriter`], [`StreamReader`] and the
/// region ends (`crate::region`).
#[derive(Debug, Clone, Default)]
pub struct LocalRevoke(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl LocalRevoke {
    pub fn revoke(&self) {
        self.0.store(true, SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(SeqCst)
    }
}

/// Supervisor side: the header page of a stream, mapped to revoke it. Never reads the ring.
#[derive(Debug)]
pub struct StreamControl {
    area: SharedArea,
}

impl StreamControl {
    /// Maps the header page of a stream memfd the supervisor created ([`create_area`]); refuses
    /// one that could shrink under the mapping.
    pub fn attach(fd: BorrowedFd<'_>) -> Result<StreamControl, StreamError> {
        let (_, size) = sys::file_mode_and_size(fd).map_err(io("fstat stream fd"))?;
        if size < HEADER_LEN as u64 {
            return Err(StreamError::BadArea(format!("holds {size} bytes, less than a header page")));
        }
        // A mapping of a file that can shrink can SIGBUS its holder: never map one.
        let seals = sys::get_seals(fd).map_err(|e| StreamError::BadArea(format!("F_GET_SEALS refused: {e}")))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(StreamError::BadArea(format!("not sealed against shrinking (seals {seals:#x})")));
        }
        let area = SharedArea::map(fd, HEADER_LEN).map_err(io("mmap stream header"))?;
        Ok(StreamControl { area })
    }

    /// Sets `revoked` and wakes both ends; each then answers [`StreamError::Revoked`].
    pub fn revoke(&self) {
        self.area.u32_at(OFF_REVOKED).store(1, SeqCst);
        for word in [OFF_DATA, OFF_SPACE] {
            self.area.u32_at(word).fetch_add(1, SeqCst);
            let _ = self.area.futex_wake(word, i32::MAX);
        }
    }
}

/// The producer end of a stream.
#[derive(Debug)]
pub struct StreamWriter {
    ring: Ring,
    /// Bytes published (our own `head`; the shared word is only ever stored, never trusted).
    head: u64,
    /// The consumer's `tail` as last read and validated.
    tail: u64,
    seq: u64,
    cipher: Option<Cipher>,
    scratch: Vec<u8>,
    poisoned: Option<String>,
    closed: bool,
}

/// A ChaCha20-Poly1305 instance (it zeroizes its expanded key on drop); `Debug` shows nothing.
pub(crate) struct Cipher(pub(crate) Aead);

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl StreamWriter {
    /// Verifies the memfd (a memfd of `params.area_len()` bytes, sealed against shrinking and
    /// growing, header magic and sizes matching `params`, nothing published yet) and maps it.
    /// `key` must be `Some` exactly when `params.encrypted`.
    pub fn attach(fd: OwnedFd, params: StreamParams, key: Option<StreamKey>) -> Result<StreamWriter, StreamError> {
        let cipher = check_key(params.encrypted, key)?;
        let ring = Ring::attach(fd, params)?;
        let head = ring.area.u64_at(OFF_HEAD).load(SeqCst);
        let tail = ring.area.u64_at(OFF_TAIL).load(SeqCst);
        if head != 0 || tail != 0 || ring.flag(OFF_PRODUCER_CLOSED) {
            return Err(StreamError::BadArea(format!(
                "stream already used (head {head}, tail {tail}): a producer attaches once"
            )));
        }
        let scratch = Vec::with_capacity(params.max_stored());
        Ok(StreamWriter { ring, head: 0, tail: 0, seq: 0, cipher, scratch, poisoned: None, closed: false })
    }

    /// A handle that revokes this end from within this process (see [`LocalRevoke`]).
    pub fn local_revoke(&self) -> LocalRevoke {
        self.ring.local.clone()
    }

    pub fn params(&self) -> StreamParams {
        self.ring.params
    }

    fn poison(&mut self, why: String) -> StreamError {
        tracing::warn!(reason = %why, "stream producer poisoned by its consumer");
        self.poisoned = Some(why.clone());
        self.close();
        StreamError::Poisoned(why)
    }

    fn usable(&self) -> Result<(), StreamError> {
        if let Some(why) = &self.poisoned {
            return Err(StreamError::Poisoned(why.clone()));
        }
        if self.closed {
            return Err(StreamError::Closed);
        }
        if self.ring.flag(OFF_REVOKED) {
            return Err(StreamError::Revoked);
        }
        if self.ring.flag(OFF_CONSUMER_CLOSED) {
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    /// Reads and validates the consumer's `tail`.
    fn refresh_tail(&mut self) -> Result<(), StreamError> {
        let t = self.ring.area.u64_at(OFF_TAIL).load(SeqCst);
        if t < self.tail {
            return Err(self.poison(format!("consumer moved tail backwards from {} to {t}", self.tail)));
        }
        if t > self.head {
            return Err(self.poison(format!("consumer moved tail to {t}, past the {} bytes published", self.head)));
        }
        if !t.is_multiple_of(8) {
            return Err(self.poison(format!("consumer moved tail to {t}, not a record boundary")));
        }
        self.tail = t;
        Ok(())
    }

    fn free(&self) -> u64 {
        self.ring.ring - (self.head - self.tail)
    }

    /// Makes `total` bytes free, waiting as `wait` says.
    fn reserve(&mut self, total: u64, wait: Option<Duration>) -> Result<(), StreamError> {
        if self.free() >= total {
            return Ok(());
        }
        self.refresh_tail()?;
        if self.free() >= total {
            return Ok(());
        }
        let Some(wait) = wait else { return Err(StreamError::Busy) };
        let deadline = deadline_after(wait);
        let mut idle_wakes = 0u32;
        loop {
            self.usable()?;
            let seen = self.ring.word(OFF_SPACE).load(SeqCst);
            self.ring.word(OFF_PRODUCER_WAITING).store(1, SeqCst);
            let before = self.tail;
            self.refresh_tail()?;
            if self.free() >= total {
                self.ring.word(OFF_PRODUCER_WAITING).store(0, SeqCst);
                return Ok(());
            }
            if expired(deadline) {
                self.ring.word(OFF_PRODUCER_WAITING).store(0, SeqCst);
                return Err(StreamError::TimedOut);
            }
            let woke = match self.ring.sleep(OFF_SPACE, seen, deadline) {
                Ok(w) => w,
                Err(e) => {
                    self.ring.word(OFF_PRODUCER_WAITING).store(0, SeqCst);
                    return Err(e);
                }
            };
            if woke {
                self.refresh_tail()?;
                let state_changed = self.ring.flag(OFF_REVOKED) || self.ring.flag(OFF_CONSUMER_CLOSED);
                if self.tail == before && !state_changed {
                    idle_wakes += 1;
                    if idle_wakes >= MAX_IDLE_WAKES {
                        return Err(
                            self.poison(format!("consumer woke the producer {idle_wakes} times without freeing space"))
                        );
                    }
                } else {
                    idle_wakes = 0;
                }
            }
        }
    }

    /// Appends one record. `wait`: `None` answers [`StreamError::Busy`] at once when the ring is
    /// full; `Some(d)` waits for space up to `d`, then answers [`StreamError::TimedOut`]. Wakes
    /// the consumer (a system call) only when it sleeps.
    pub fn send(&mut self, record: &[u8], wait: Option<Duration>) -> Result<(), StreamError> {
        self.usable()?;
        let max = self.ring.params.max_record as usize;
        if record.len() > max {
            return Err(StreamError::TooLarge { len: record.len(), max });
        }
        let tag = if self.cipher.is_some() { TAG_LEN } else { 0 };
        let stored = record.len() + tag;
        let need = align8(RECORD_HEADER + stored) as u64;
        let pos = self.head & self.ring.mask;
        let to_end = self.ring.ring - pos;
        let skip = if need > to_end { to_end } else { 0 };
        self.reserve(skip + need, wait)?;

        let base = HEADER_LEN as u64;
        let area = &self.ring.area;
        let at = if skip > 0 {
            // `to_end >= 8`: indices are multiples of 8 and the ring a multiple of 8.
            let mut marker = [0u8; RECORD_HEADER];
            marker[..4].copy_from_slice(&((to_end - RECORD_HEADER as u64) as u32).to_le_bytes());
            marker[4..].copy_from_slice(&KIND_SKIP.to_le_bytes());
            area.copy_in((base + pos) as usize, &marker).map_err(io("write skip marker"))?;
            base
        } else {
            base + pos
        } as usize;
        let mut header = [0u8; RECORD_HEADER];
        header[..4].copy_from_slice(&(stored as u32).to_le_bytes());
        header[4..].copy_from_slice(&KIND_DATA.to_le_bytes());
        area.copy_in(at, &header).map_err(io("write record header"))?;
        match &self.cipher {
            None => area.copy_in(at + RECORD_HEADER, record).map_err(io("write record"))?,
            Some(Cipher(c)) => {
                self.scratch.clear();
                self.scratch.extend_from_slice(record);
                let t = c
                    .encrypt_in_place_detached(&nonce(DOMAIN_STREAM, self.seq), &header, &mut self.scratch)
                    .map_err(|_| StreamError::BadParams("record too long to encrypt".into()))?;
                self.scratch.extend_from_slice(&t);
                area.copy_in(at + RECORD_HEADER, &self.scratch).map_err(io("write record"))?;
            }
        }
        self.head += skip + need;
        self.seq += 1;
        // Publish (release, and the first half of the Dekker handshake), then wake a sleeper.
        self.ring.area.u64_at(OFF_HEAD).store(self.head, SeqCst);
        self.ring.wake_if_waiting(OFF_CONSUMER_WAITING, OFF_DATA);
        Ok(())
    }

    /// Records sent so far.
    pub fn sent(&self) -> u64 {
        self.seq
    }

    /// Marks the producer closed and wakes the consumer, which reads what is left and then
    /// gets [`StreamError::Closed`]. Idempotent; also done on drop.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.ring.word(OFF_PRODUCER_CLOSED).store(1, SeqCst);
        self.ring.bump_and_wake(OFF_DATA);
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// The consumer end of a stream.
#[derive(Debug)]
pub struct StreamReader {
    ring: Ring,
    /// Bytes released (our own `tail`).
    tail: u64,
    /// The producer's `head` as last read and validated.
    head: u64,
    seq: u64,
    cipher: Option<Cipher>,
    poisoned: Option<String>,
    closed: bool,
    /// Consecutive wake-ups that brought nothing.
    idle_wakes: u32,
}

impl StreamReader {
    /// Verifies the memfd as [`StreamWriter::attach`] does (nothing consumed yet) and maps it.
    pub fn attach(fd: OwnedFd, params: StreamParams, key: Option<StreamKey>) -> Result<StreamReader, StreamError> {
        let cipher = check_key(params.encrypted, key)?;
        let ring = Ring::attach(fd, params)?;
        let tail = ring.area.u64_at(OFF_TAIL).load(SeqCst);
        if tail != 0 || ring.flag(OFF_CONSUMER_CLOSED) {
            return Err(StreamError::BadArea(format!(
                "stream already consumed (tail {tail}): a consumer attaches once"
            )));
        }
        Ok(StreamReader { ring, tail: 0, head: 0, seq: 0, cipher, poisoned: None, closed: false, idle_wakes: 0 })
    }

    /// A handle that revokes this end from within this process (see [`LocalRevoke`]).
    pub fn local_revoke(&self) -> LocalRevoke {
        self.ring.local.clone()
    }

    pub fn params(&self) -> StreamParams {
        self.ring.params
    }

    fn poison(&mut self, why: String) -> StreamError {
        tracing::warn!(reason = %why, "stream consumer poisoned by its producer");
        self.poisoned = Some(why.clone());
        self.close();
        StreamError::Poisoned(why)
    }

    fn usable(&self) -> Result<(), StreamError> {
        if let Some(why) = &self.poisoned {
            return Err(StreamError::Poisoned(why.clone()));
        }
        if self.closed {
            return Err(StreamError::Closed);
        }
        if self.ring.flag(OFF_REVOKED) {
            return Err(StreamError::Revoked);
        }
        Ok(())
    }

    /// Reads and validates the producer's `head`.
    fn refresh_head(&mut self) -> Result<(), StreamError> {
        let h = self.ring.area.u64_at(OFF_HEAD).load(SeqCst);
        if h < self.head {
            return Err(self.poison(format!("producer moved head backwards from {} to {h}", self.head)));
        }
        if h - self.tail > self.ring.ring {
            return Err(self.poison(format!(
                "producer published {} bytes ahead of tail, more than the {}-byte ring",
                h - self.tail,
                self.ring.ring
            )));
        }
        if !h.is_multiple_of(8) {
            return Err(self.poison(format!("producer moved head to {h}, not a record boundary")));
        }
        self.head = h;
        Ok(())
    }

    /// Whether there is something to act on: data, the producer closed, or a revocation.
    fn ready(&mut self) -> Result<bool, StreamError> {
        self.refresh_head()?;
        Ok(self.head != self.tail || self.ring.flag(OFF_PRODUCER_CLOSED) || self.ring.flag(OFF_REVOKED))
    }

    /// Releases the bytes up to our `tail`; wakes a sleeping producer once the ring is at most
    /// half full (or empty), so that it refills in batches.
    fn release(&mut self) {
        self.ring.area.u64_at(OFF_TAIL).store(self.tail, SeqCst);
        if self.head - self.tail <= self.ring.ring / 2 {
            self.ring.wake_if_waiting(OFF_PRODUCER_WAITING, OFF_SPACE);
        }
    }

    /// The next record, if one is published now.
    pub fn try_recv(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        self.usable()?;
        if self.head == self.tail {
            self.refresh_head()?;
            if self.head == self.tail {
                if !self.ring.flag(OFF_PRODUCER_CLOSED) {
                    return Ok(None);
                }
                // Closed after its last publish: one more read of head finds everything.
                self.refresh_head()?;
                if self.head == self.tail {
                    return Err(StreamError::Closed);
                }
            }
        }
        let mut pos = self.tail & self.ring.mask;
        let (mut len, mut kind) = self.read_header(pos)?;
        if kind == KIND_SKIP {
            let to_end = self.ring.ring - pos;
            if pos == 0 {
                return Err(self.poison("skip marker at the ring's start".into()));
            }
            if u64::from(len) != to_end - RECORD_HEADER as u64 {
                return Err(
                    self.poison(format!("skip marker of {len} bytes at offset {pos} does not end at the ring's end"))
                );
            }
            if to_end >= self.head - self.tail {
                return Err(self.poison("skip marker with no record published after it".into()));
            }
            self.tail += to_end;
            pos = 0;
            (len, kind) = self.read_header(pos)?;
        }
        if kind != KIND_DATA {
            return Err(self.poison(format!("record of unknown kind {kind} at offset {pos}")));
        }
        let len = len as usize;
        let max = self.ring.params.max_stored();
        if len > max {
            return Err(self.poison(format!("record of {len} bytes, more than the {max} allowed")));
        }
        if self.cipher.is_some() && len < TAG_LEN {
            return Err(self.poison(format!("encrypted record of {len} bytes, shorter than its tag")));
        }
        let need = align8(RECORD_HEADER + len) as u64;
        if need > self.ring.ring - pos {
            return Err(self.poison(format!("record of {len} bytes at offset {pos} runs past the ring's end")));
        }
        if need > self.head - self.tail {
            return Err(self.poison(format!("record of {len} bytes at offset {pos} runs past the published head")));
        }
        let mut buf = vec![0u8; len];
        let off = HEADER_LEN + pos as usize + RECORD_HEADER;
        if let Err(e) = self.ring.area.copy_out(off, &mut buf) {
            return Err(self.poison(format!("record copy failed: {e}")));
        }
        // The copy is private now: the slot can go back to the producer before we check it.
        self.tail += need;
        self.release();
        let seq = self.seq;
        self.seq += 1;
        if let Some(Cipher(c)) = &self.cipher {
            let mut header = [0u8; RECORD_HEADER];
            header[..4].copy_from_slice(&(len as u32).to_le_bytes());
            header[4..].copy_from_slice(&KIND_DATA.to_le_bytes());
            let body = len - TAG_LEN;
            let tag = tag_of(&buf[body..]);
            buf.truncate(body);
            if c.decrypt_in_place_detached(&nonce(DOMAIN_STREAM, seq), &header, &mut buf, &tag).is_err() {
                return Err(
                    self.poison(format!("record {seq} failed authentication: rewritten, replayed or reordered"))
                );
            }
        }
        Ok(Some(buf))
    }

    fn read_header(&mut self, pos: u64) -> Result<(u32, u32), StreamError> {
        let mut h = [0u8; RECORD_HEADER];
        if let Err(e) = self.ring.area.copy_out(HEADER_LEN + pos as usize, &mut h) {
            return Err(self.poison(format!("record header copy failed: {e}")));
        }
        let [a, b, c, d, e, f, g, i] = h;
        Ok((u32::from_le_bytes([a, b, c, d]), u32::from_le_bytes([e, f, g, i])))
    }

    /// The next record (a private copy, authenticated and decrypted), waiting up to `timeout`:
    /// `Ok(None)` on timeout; [`StreamError::Closed`] once the producer closed and everything
    /// was read; [`StreamError::Revoked`] after revocation; [`StreamError::Poisoned`] for
    /// anything a hostile producer can do.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, StreamError> {
        let deadline = deadline_after(timeout);
        let mut woke = false;
        loop {
            if let Some(r) = self.try_recv()? {
                self.idle_wakes = 0;
                return Ok(Some(r));
            }
            if woke {
                self.idle_wakes += 1;
                if self.idle_wakes >= MAX_IDLE_WAKES {
                    let n = self.idle_wakes;
                    return Err(self.poison(format!("producer woke the consumer {n} times without data")));
                }
            }
            if !woke && self.spin_for_data()? {
                continue;
            }
            let seen = self.ring.word(OFF_DATA).load(SeqCst);
            self.ring.word(OFF_CONSUMER_WAITING).store(1, SeqCst);
            if self.ready()? {
                self.ring.word(OFF_CONSUMER_WAITING).store(0, SeqCst);
                woke = false;
                continue;
            }
            if expired(deadline) {
                self.ring.word(OFF_CONSUMER_WAITING).store(0, SeqCst);
                return Ok(None);
            }
            let r = self.ring.sleep(OFF_DATA, seen, deadline);
            self.ring.word(OFF_CONSUMER_WAITING).store(0, SeqCst);
            woke = r?;
        }
    }

    /// Spins briefly on an empty ring, then yields the CPU once (to a producer sharing it).
    /// Returns whether anything arrived.
    fn spin_for_data(&mut self) -> Result<bool, StreamError> {
        let head = self.ring.area.u64_at(OFF_HEAD);
        for _ in 0..SPINS {
            if head.load(SeqCst) != self.tail {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        std::thread::yield_now();
        self.ready()
    }

    /// Records received so far.
    pub fn received(&self) -> u64 {
        self.seq
    }

    /// Marks the consumer closed and wakes the producer, whose next send answers
    /// [`StreamError::Closed`]. Idempotent; also done on drop.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.ring.word(OFF_CONSUMER_CLOSED).store(1, SeqCst);
        self.ring.bump_and_wake(OFF_SPACE);
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32};

    const WAIT: Option<Duration> = Some(Duration::from_secs(5));

    fn params(ring_bytes: u32, max_record: u32, encrypted: bool) -> StreamParams {
        StreamParams { ring_bytes, max_record, encrypted }
    }

    /// A stream with both ends attached, and the memfd for a test playing the hostile peer.
    fn pair(p: StreamParams) -> (StreamWriter, StreamReader, OwnedFd) {
        let fd = create_area(&p).expect("create area");
        let key = p.encrypted.then(|| StreamKey::generate().expect("key"));
        let w = StreamWriter::attach(fd.try_clone().expect("dup"), p, key.clone()).expect("writer");
        let r = StreamReader::attach(fd.try_clone().expect("dup"), p, key).expect("reader");
        (w, r, fd)
    }

    /// A peer that clears the shared `revoked` word cannot keep an end waiting: a revocation
    /// made in this process ends a sleeping send and receive within a sleep or two.
    #[test]
    fn a_local_revocation_ends_waits_whatever_the_shared_word_says() {
        let (mut w, mut r, _fd) = pair(params(4096, 1024, true));
        while w.send(&[1u8; 1000], None).is_ok() {}
        let (wl, rl) = (w.local_revoke(), r.local_revoke());
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let res = w.send(&[1u8; 1000], Some(Duration::from_secs(10)));
            (res, start.elapsed(), w)
        });
        std::thread::sleep(Duration::from_millis(50));
        wl.revoke();
        // The writer is kept (not closed): only the local revocation ends the reader's wait.
        let (res, took, _w) = t.join().expect("writer thread");
        assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // The reader drains what is there, then waits: the local revocation ends that too.
        while matches!(r.try_recv(), Ok(Some(_))) {}
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let res = r.recv(Duration::from_secs(10));
            (res, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        rl.revoke();
        let (res, took) = t.join().expect("reader thread");
        assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// A reader alone; the test is its (hostile) producer, through a mapping of its own.
    fn reader_and_peer(p: StreamParams) -> (StreamReader, SharedArea) {
        let fd = create_area(&p).expect("create area");
        let key = p.encrypted.then(|| StreamKey::generate().expect("key"));
        let r = StreamReader::attach(fd.try_clone().expect("dup"), p, key).expect("reader");
        let peer = SharedArea::map(fd.as_fd(), p.area_len()).expect("peer map");
        (r, peer)
    }

    /// A writer alone; the test is its (hostile) consumer.
    fn writer_and_peer(p: StreamParams) -> (StreamWriter, SharedArea) {
        let fd = create_area(&p).expect("create area");
        let key = p.encrypted.then(|| StreamKey::generate().expect("key"));
        let w = StreamWriter::attach(fd.try_clone().expect("dup"), p, key).expect("writer");
        let peer = SharedArea::map(fd.as_fd(), p.area_len()).expect("peer map");
        (w, peer)
    }

    /// Writes a raw record header (and `payload`) at ring offset `pos`.
    fn raw_record(peer: &SharedArea, pos: usize, len: u32, kind: u32, payload: &[u8]) {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&len.to_le_bytes());
        h[4..].copy_from_slice(&kind.to_le_bytes());
        peer.copy_in(HEADER_LEN + pos, &h).expect("write header");
        peer.copy_in(HEADER_LEN + pos + 8, payload).expect("write payload");
    }

    fn publish(peer: &SharedArea, head: u64) {
        peer.u64_at(OFF_HEAD).store(head, SeqCst);
    }

    fn content(seq: u64) -> Vec<u8> {
        let len = (seq.wrapping_mul(7919) % 700) as usize + 1;
        (0..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8).collect()
    }

    fn assert_poisoned<T: std::fmt::Debug>(r: Result<T, StreamError>, needle: &str) {
        match r {
            Err(StreamError::Poisoned(why)) => {
                assert!(why.contains(needle), "poisoned for {why:?}, expected {needle:?}")
            }
            other => panic!("expected poisoning ({needle}), got {other:?}"),
        }
    }

    fn round_trip(encrypted: bool) {
        let (mut w, mut r, _fd) = pair(params(4096, 1024, encrypted));
        // Ten times around the ring, with sizes that force skip markers at many offsets.
        let mut sent = 0u64;
        let mut got = 0u64;
        while sent < 200 {
            for _ in 0..3 {
                w.send(&content(sent), None).expect("send");
                sent += 1;
            }
            while let Some(rec) = r.try_recv().expect("recv") {
                assert_eq!(rec, content(got), "record {got}");
                got += 1;
            }
        }
        assert_eq!(got, sent);
        assert!(w.head > 10 * 4096, "went around the ring: head {}", w.head);
        // Exact-size and one-byte records.
        for rec in [vec![0xee; 1024], vec![1u8], vec![]] {
            w.send(&rec, None).expect("send");
            assert_eq!(r.recv(Duration::from_secs(1)).expect("recv"), Some(rec));
        }
    }

    #[test]
    fn round_trip_plaintext_wraps_around() {
        round_trip(false);
    }

    #[test]
    fn round_trip_encrypted_wraps_around() {
        round_trip(true);
    }

    #[test]
    fn send_to_full_ring_is_busy_then_times_out_then_succeeds_after_recv() {
        for encrypted in [false, true] {
            let (mut w, mut r, _fd) = pair(params(4096, 1024, encrypted));
            let rec = vec![7u8; 1000];
            let mut n = 0;
            loop {
                match w.send(&rec, None) {
                    Ok(()) => n += 1,
                    Err(StreamError::Busy) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(n, 4, "four 1000-byte records fill a 4 KiB ring");
            let t = Instant::now();
            assert!(matches!(w.send(&rec, Some(Duration::from_millis(30))), Err(StreamError::TimedOut)));
            assert!(t.elapsed() >= Duration::from_millis(30));
            assert_eq!(r.try_recv().expect("recv"), Some(rec.clone()));
            w.send(&rec, None).expect("space after a recv");
            assert!(matches!(w.send(&[0u8; 1025], None), Err(StreamError::TooLarge { len: 1025, max: 1024 })));
        }
    }

    #[test]
    fn producer_waiting_for_space_is_woken_when_consumer_drains() {
        let (mut w, mut r, _fd) = pair(params(4096, 1024, true));
        while w.send(&[1u8; 1000], None).is_ok() {}
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                let t = Instant::now();
                w.send(&[2u8; 1000], Some(Duration::from_secs(10))).expect("send after wait");
                t.elapsed()
            });
            std::thread::sleep(Duration::from_millis(30));
            for _ in 0..4 {
                assert_eq!(r.try_recv().expect("recv"), Some(vec![1u8; 1000]));
            }
            let waited = t.join().expect("join");
            assert!(waited < MAX_SLEEP + Duration::from_millis(30), "woken, not timed out: {waited:?}");
        });
    }

    fn threads_100k(encrypted: bool) {
        const N: u64 = 100_000;
        let (mut w, mut r, _fd) = pair(params(64 * 1024, 1024, encrypted));
        std::thread::scope(|s| {
            s.spawn(move || {
                for seq in 0..N {
                    w.send(&content(seq), WAIT).expect("send");
                }
                w.close();
            });
            let mut got = 0u64;
            loop {
                match r.recv(Duration::from_secs(10)) {
                    Ok(Some(rec)) => {
                        assert_eq!(rec, content(got), "record {got}");
                        got += 1;
                    }
                    Ok(None) => panic!("timed out after {got} records"),
                    Err(StreamError::Closed) => break,
                    Err(e) => panic!("after {got} records: {e}"),
                }
            }
            assert_eq!(got, N);
        });
    }

    #[test]
    fn two_threads_100k_plaintext_records_every_byte_checked() {
        threads_100k(false);
    }

    #[test]
    fn two_threads_100k_encrypted_records_every_byte_checked() {
        threads_100k(true);
    }

    #[test]
    fn close_by_producer_lets_consumer_drain_then_closed() {
        let (mut w, mut r, _fd) = pair(params(4096, 1024, true));
        w.send(b"last words", None).expect("send");
        w.close();
        assert!(matches!(w.send(b"more", None), Err(StreamError::Closed)));
        assert_eq!(r.recv(Duration::from_secs(1)).expect("recv"), Some(b"last words".to_vec()));
        assert!(matches!(r.recv(Duration::from_secs(1)), Err(StreamError::Closed)));
    }

    #[test]
    fn close_by_consumer_makes_send_closed_and_wakes_waiting_producer() {
        let (mut w, mut r, _fd) = pair(params(4096, 1024, false));
        while w.send(&[1u8; 1000], None).is_ok() {}
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                let t = Instant::now();
                (w.send(&[1u8; 1000], Some(Duration::from_secs(10))), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(30));
            r.close();
            let (res, waited) = t.join().expect("join");
            assert!(matches!(res, Err(StreamError::Closed)), "{res:?}");
            assert!(waited < Duration::from_secs(1), "{waited:?}");
        });
    }

    #[test]
    fn revoke_wakes_sleeping_consumer_and_producer_promptly() {
        let p = params(4096, 1024, true);
        let (mut w, mut r, fd) = pair(p);
        let control = StreamControl::attach(fd.as_fd()).expect("control");
        while w.send(&[1u8; 1000], None).is_ok() {}
        // Drain so that the consumer sleeps, then refill so that the producer sleeps too.
        let (mut w2, mut r2, fd2) = pair(p);
        let control2 = StreamControl::attach(fd2.as_fd()).expect("control");
        std::thread::scope(|s| {
            let consumer = s.spawn(move || {
                let res = r2.recv(Duration::from_secs(10));
                (res, Instant::now())
            });
            let producer = s.spawn(move || {
                let res = w.send(&[1u8; 1000], Some(Duration::from_secs(10)));
                (res, Instant::now())
            });
            std::thread::sleep(Duration::from_millis(50));
            let revoked_at = Instant::now();
            control2.revoke();
            control.revoke();
            let (res, at) = consumer.join().expect("join");
            assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
            assert!(at - revoked_at < Duration::from_millis(50), "consumer woke {:?} after revoke", at - revoked_at);
            let (res, at) = producer.join().expect("join");
            assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
            assert!(at - revoked_at < Duration::from_millis(50), "producer woke {:?} after revoke", at - revoked_at);
        });
        assert!(matches!(r.try_recv(), Err(StreamError::Revoked)));
        assert!(matches!(w2.send(b"x", None), Err(StreamError::Revoked)));
    }

    // ------------------------------------------------------------ hostile producer

    #[test]
    fn head_more_than_a_ring_ahead_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        publish(&peer, 4096 + 8);
        assert_poisoned(r.try_recv(), "more than the 4096-byte ring");
        // Sticky, through both calls, and the producer is told.
        assert_poisoned(r.try_recv(), "ring");
        assert_poisoned(r.recv(Duration::from_millis(10)), "ring");
        assert_eq!(peer.u32_at(OFF_CONSUMER_CLOSED).load(SeqCst), 1);
    }

    #[test]
    fn head_out_of_range_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        publish(&peer, u64::MAX - 7);
        assert_poisoned(r.try_recv(), "ahead of tail");
    }

    #[test]
    fn head_going_backwards_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, 8, KIND_DATA, &[1; 8]);
        publish(&peer, 16);
        assert_eq!(r.try_recv().expect("recv"), Some(vec![1; 8]));
        publish(&peer, 8);
        assert_poisoned(r.try_recv(), "backwards");
    }

    #[test]
    fn misaligned_head_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        publish(&peer, 13);
        assert_poisoned(r.try_recv(), "record boundary");
    }

    #[test]
    fn length_past_max_record_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, 1025, KIND_DATA, &[]);
        publish(&peer, 1040);
        assert_poisoned(r.try_recv(), "more than the 1024 allowed");
    }

    #[test]
    fn length_past_the_ring_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, u32::MAX, KIND_DATA, &[]);
        publish(&peer, 4096);
        assert_poisoned(r.try_recv(), "more than the 1024 allowed");
    }

    #[test]
    fn record_past_published_head_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, 100, KIND_DATA, &[]);
        publish(&peer, 16);
        assert_poisoned(r.try_recv(), "past the published head");
    }

    /// Publishes valid records up to ring offset 4080 of a 4 KiB ring and reads them.
    fn advance_to_4080(r: &mut StreamReader, peer: &SharedArea) {
        let mut pos = 0;
        for len in [1016u32, 1016, 1016, 1000] {
            raw_record(peer, pos, len, KIND_DATA, &vec![9; len as usize]);
            pos += align8(8 + len as usize);
        }
        assert_eq!(pos, 4080);
        publish(peer, pos as u64);
        for _ in 0..4 {
            assert!(r.try_recv().expect("recv").is_some());
        }
    }

    #[test]
    fn record_wrapping_past_ring_end_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        advance_to_4080(&mut r, &peer);
        raw_record(&peer, 4080, 64, KIND_DATA, &[]);
        publish(&peer, 4080 + 200);
        assert_poisoned(r.try_recv(), "runs past the ring's end");
    }

    #[test]
    fn garbage_skip_marker_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        advance_to_4080(&mut r, &peer);
        raw_record(&peer, 4080, 100, KIND_SKIP, &[]);
        publish(&peer, 4080 + 200);
        assert_poisoned(r.try_recv(), "does not end at the ring's end");
    }

    #[test]
    fn skip_marker_at_ring_start_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, 4088, KIND_SKIP, &[]);
        publish(&peer, 4096);
        assert_poisoned(r.try_recv(), "skip marker at the ring's start");
    }

    #[test]
    fn valid_skip_marker_is_followed() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        advance_to_4080(&mut r, &peer);
        raw_record(&peer, 4080, 8, KIND_SKIP, &[]);
        raw_record(&peer, 0, 3, KIND_DATA, b"abc");
        publish(&peer, 4096 + 16);
        assert_eq!(r.try_recv().expect("recv"), Some(b"abc".to_vec()));
    }

    #[test]
    fn unknown_record_kind_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        raw_record(&peer, 0, 8, 0, &[0; 8]);
        publish(&peer, 16);
        assert_poisoned(r.try_recv(), "unknown kind 0");
    }

    #[test]
    fn record_rewritten_after_publishing_poisons_encrypted_consumer() {
        let p = params(4096, 1024, true);
        let (mut w, mut r, fd) = pair(p);
        let peer = SharedArea::map(fd.as_fd(), p.area_len()).expect("map");
        w.send(b"transfer 10 EUR", None).expect("send");
        let mut b = [0u8; 1];
        peer.copy_out(HEADER_LEN + 8 + 9, &mut b).expect("read");
        peer.copy_in(HEADER_LEN + 8 + 9, &[b[0] ^ 0x01]).expect("flip");
        assert_poisoned(r.try_recv(), "failed authentication");
    }

    #[test]
    fn replayed_record_poisons_encrypted_consumer() {
        let p = params(4096, 1024, true);
        let (mut w, mut r, fd) = pair(p);
        let peer = SharedArea::map(fd.as_fd(), p.area_len()).expect("map");
        w.send(b"open valve", None).expect("send");
        assert_eq!(r.try_recv().expect("recv"), Some(b"open valve".to_vec()));
        // The hostile producer copies record 0 into slot 1 and publishes it.
        let need = align8(8 + 10 + TAG_LEN);
        let mut rec = vec![0u8; need];
        peer.copy_out(HEADER_LEN, &mut rec).expect("read");
        peer.copy_in(HEADER_LEN + need, &rec).expect("replay");
        publish(&peer, 2 * need as u64);
        assert_poisoned(r.try_recv(), "record 1 failed authentication");
    }

    #[test]
    fn encrypted_record_shorter_than_tag_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, true));
        raw_record(&peer, 0, 4, KIND_DATA, &[0; 4]);
        publish(&peer, 16);
        assert_poisoned(r.try_recv(), "shorter than its tag");
    }

    #[test]
    fn wrong_key_poisons_consumer() {
        let p = params(4096, 1024, true);
        let fd = create_area(&p).expect("area");
        let mut w = StreamWriter::attach(fd.try_clone().expect("dup"), p, Some(StreamKey::generate().expect("key")))
            .expect("w");
        let mut r = StreamReader::attach(fd, p, Some(StreamKey::generate().expect("key"))).expect("r");
        w.send(b"hello", None).expect("send");
        assert_poisoned(r.try_recv(), "failed authentication");
    }

    #[test]
    fn producer_that_never_signals_still_has_its_data_found() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                let t = Instant::now();
                (r.recv(Duration::from_secs(10)), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(20));
            raw_record(&peer, 0, 5, KIND_DATA, b"quiet");
            publish(&peer, 16); // and no wake-up
            let (res, waited) = t.join().expect("join");
            assert_eq!(res.expect("recv"), Some(b"quiet".to_vec()));
            assert!(waited < Duration::from_millis(20) + MAX_SLEEP * 2, "{waited:?}");
        });
    }

    #[test]
    fn signalling_without_data_poisons_consumer() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(SeqCst) {
                    peer.u32_at(OFF_DATA).fetch_add(1, SeqCst);
                    let _ = peer.futex_wake(OFF_DATA, i32::MAX);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let t = Instant::now();
            let res = r.recv(Duration::from_secs(10));
            done.store(true, SeqCst);
            assert_poisoned(res, "without data");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn a_few_spurious_wakeups_are_tolerated() {
        let (mut r, peer) = reader_and_peer(params(4096, 1024, false));
        let woken = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..10 {
                    std::thread::sleep(Duration::from_millis(2));
                    peer.u32_at(OFF_DATA).fetch_add(1, SeqCst);
                    let _ = peer.futex_wake(OFF_DATA, i32::MAX);
                    woken.fetch_add(1, SeqCst);
                }
                raw_record(&peer, 0, 2, KIND_DATA, b"ok");
                publish(&peer, 16);
                peer.u32_at(OFF_DATA).fetch_add(1, SeqCst);
                let _ = peer.futex_wake(OFF_DATA, i32::MAX);
            });
            assert_eq!(r.recv(Duration::from_secs(10)).expect("recv"), Some(b"ok".to_vec()));
        });
        assert_eq!(woken.load(SeqCst), 10);
    }

    // ------------------------------------------------------------ hostile consumer

    fn send_until_error(w: &mut StreamWriter) -> StreamError {
        for _ in 0..100 {
            if let Err(e) = w.send(&[3u8; 1000], None) {
                return e;
            }
        }
        panic!("no error after 100 sends");
    }

    #[test]
    fn tail_ahead_of_head_poisons_producer() {
        let (mut w, peer) = writer_and_peer(params(4096, 1024, false));
        w.send(&[3u8; 1000], None).expect("send");
        peer.u64_at(OFF_TAIL).store(1 << 20, SeqCst);
        assert_poisoned(Err::<(), _>(send_until_error(&mut w)), "past the");
        assert_poisoned(w.send(b"x", None), "past the");
        assert_eq!(peer.u32_at(OFF_PRODUCER_CLOSED).load(SeqCst), 1);
    }

    #[test]
    fn tail_moving_by_more_than_published_poisons_producer() {
        let (mut w, peer) = writer_and_peer(params(4096, 1024, false));
        for _ in 0..4 {
            w.send(&[3u8; 1000], None).expect("send");
        }
        // Four records of 1008 bytes are published; the "consumer" releases one word more.
        peer.u64_at(OFF_TAIL).store(4 * 1008 + 8, SeqCst);
        assert_poisoned(Err::<(), _>(send_until_error(&mut w)), "past the 4032 bytes published");
    }

    #[test]
    fn send_to_busy_consumer_makes_no_wake_up() {
        let (mut w, mut r, fd) = pair(params(64 * 1024, 1024, true));
        let peer = SharedArea::map(fd.as_fd(), HEADER_LEN).expect("map");
        let before = peer.u32_at(OFF_DATA).load(SeqCst);
        for i in 0..500u64 {
            w.send(&content(i), None).expect("send");
            assert_eq!(r.try_recv().expect("recv"), Some(content(i)));
        }
        assert_eq!(peer.u32_at(OFF_DATA).load(SeqCst), before, "no futex bump without a sleeper");
        assert_eq!(peer.u32_at(OFF_SPACE).load(SeqCst), 0);
    }

    #[test]
    fn tail_going_backwards_poisons_producer() {
        let (mut w, peer) = writer_and_peer(params(4096, 1024, false));
        for _ in 0..4 {
            w.send(&[3u8; 1000], None).expect("send");
        }
        peer.u64_at(OFF_TAIL).store(2016, SeqCst); // the consumer "read" two records
        w.send(&[3u8; 1000], None).expect("send into freed space");
        peer.u64_at(OFF_TAIL).store(1008, SeqCst);
        assert_poisoned(Err::<(), _>(send_until_error(&mut w)), "backwards");
    }

    #[test]
    fn misaligned_tail_poisons_producer() {
        let (mut w, peer) = writer_and_peer(params(4096, 1024, false));
        for _ in 0..4 {
            w.send(&[3u8; 1000], None).expect("send");
        }
        peer.u64_at(OFF_TAIL).store(1001, SeqCst);
        assert_poisoned(Err::<(), _>(send_until_error(&mut w)), "record boundary");
    }

    #[test]
    fn consumer_waking_producer_without_space_poisons_producer() {
        let (mut w, peer) = writer_and_peer(params(4096, 1024, false));
        while w.send(&[1u8; 1000], None).is_ok() {}
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(SeqCst) {
                    peer.u32_at(OFF_SPACE).fetch_add(1, SeqCst);
                    let _ = peer.futex_wake(OFF_SPACE, i32::MAX);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let res = w.send(&[1u8; 1000], Some(Duration::from_secs(10)));
            done.store(true, SeqCst);
            assert_poisoned(res, "without freeing space");
        });
    }

    // ------------------------------------------------------------ attach

    fn attach_err(fd: OwnedFd, p: StreamParams) -> String {
        match StreamReader::attach(fd, p, p.encrypted.then(|| StreamKey::generate().expect("key"))) {
            Err(StreamError::BadArea(why)) | Err(StreamError::BadParams(why)) => why,
            other => panic!("attach should fail: {other:?}"),
        }
    }

    #[test]
    fn attach_refuses_unsealed_memfd() {
        let p = params(4096, 1024, false);
        let fd = sys::memfd_create(c"test", false).expect("memfd");
        sys::ftruncate(fd.as_fd(), p.area_len() as u64).expect("truncate");
        assert!(attach_err(fd, p).contains("not sealed against resizing"));
    }

    #[test]
    fn attach_refuses_short_memfd() {
        let fd = create_area(&params(4096, 1024, false)).expect("area");
        let why = attach_err(fd, params(8192, 1024, false));
        assert!(why.contains("holds 8192 bytes, the parameters say 12288"), "{why}");
    }

    #[test]
    fn attach_refuses_wrong_magic() {
        let p = params(4096, 1024, false);
        let fd = create_area(&p).expect("area");
        sys::pwrite_all(fd.as_fd(), b"NOTASTRM", 0).expect("write");
        assert!(attach_err(fd, p).contains("wrong magic"));
    }

    #[test]
    fn attach_refuses_header_disagreeing_with_params() {
        let fd = create_area(&params(4096, 1024, true)).expect("area");
        let why = attach_err(fd, params(4096, 512, true));
        assert!(why.contains("header says"), "{why}");
        let fd = create_area(&params(4096, 1024, true)).expect("area");
        let why = attach_err(fd, params(4096, 1024, false));
        assert!(why.contains("header says"), "{why}");
    }

    #[test]
    fn attach_refuses_write_sealed_memfd_and_non_memfd() {
        let p = params(4096, 1024, false);
        let fd = create_area(&p).expect("area");
        let sealed = sys::memfd_create(c"test", false).expect("memfd");
        sys::ftruncate(sealed.as_fd(), p.area_len() as u64).expect("truncate");
        sys::add_seals(sealed.as_fd(), sys::SEAL_SET).expect("seal");
        assert!(attach_err(sealed, p).contains("sealed against writes"));
        drop(fd);
        let (a, _b) = sys::seqpacket_pair().expect("pair");
        assert!(attach_err(a, p).contains("not a regular file"));
    }

    #[test]
    fn attach_refuses_used_area_and_key_mismatch() {
        let p = params(4096, 1024, false);
        let (mut w, _r, fd) = pair(p);
        w.send(b"x", None).expect("send");
        assert!(matches!(
            StreamWriter::attach(fd.try_clone().expect("dup"), p, None),
            Err(StreamError::BadArea(why)) if why.contains("already used")
        ));
        assert!(matches!(
            StreamReader::attach(fd.try_clone().expect("dup"), p, Some(StreamKey::generate().expect("key"))),
            Err(StreamError::BadParams(_))
        ));
        let pe = params(4096, 1024, true);
        assert!(matches!(StreamReader::attach(fd, pe, None), Err(StreamError::BadParams(_))));
    }

    // ------------------------------------------------------------ types

    #[test]
    fn params_validate_sizes() {
        assert!(params(4096, 1024, true).validate().is_ok());
        assert!(params(64 << 20, 16 << 20, true).validate().is_ok());
        for bad in [
            params(4095, 1, true),
            params(2048, 1, true),
            params(128 << 20, 1, true),
            params(4096, 1025, true),
            params(4096, 0, true),
        ] {
            assert!(matches!(bad.validate(), Err(StreamError::BadParams(_))), "{bad:?}");
        }
        assert_eq!(params(4096, 1024, true).area_len(), 8192);
        assert!(create_area(&params(4096, 2048, false)).is_err());
    }

    #[test]
    fn created_area_is_sealed_against_resizing_and_resealing() {
        let fd = create_area(&params(4096, 1024, false)).expect("area");
        let seals = sys::get_seals(fd.as_fd()).expect("seals");
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        assert!(sys::ftruncate(fd.as_fd(), 4096).is_err());
    }

    #[test]
    fn stream_key_debug_redacts_and_serde_round_trips() {
        let k = StreamKey([0xAB; KEY_LEN]);
        assert_eq!(format!("{k:?}"), "StreamKey(..)");
        let bytes = postcard::to_allocvec(&k).expect("encode");
        let back: StreamKey = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back.0, k.0);
        fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}
        assert_zeroize_on_drop::<StreamKey>();
    }

    #[test]
    fn stream_ends_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<StreamWriter>();
        assert_send::<StreamReader>();
        assert_send::<StreamControl>();
    }
}
