//! Bulk payloads: sealed memfds that a receiver maps read-only with zero copies, or inline
//! bytes inside the frame when the payload is small enough that a memfd would cost more.
//!
//! A sender gets a [`BulkWriter`], fills it, and hands it to [`crate::Channel::send_bulk`],
//! which (for `SealedEncrypted`) encrypts the bytes in place, drops the writable mapping, and
//! seals the memfd with `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` before the
//! descriptor leaves the process. A receiver checks that the descriptor is a memfd with exactly
//! those seals and the size bound by the authenticated frame before it maps anything.
//! This module never trusts a received descriptor: every check fails closed and the
//! descriptor is closed on every error path (it is an `OwnedFd`).

use std::ffi::CStr;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use crate::crypto::Direction;
use crate::error::BulkError;
use crate::frame::TAG_LEN;
use crate::sys::{self, MapMode, Mapping};

/// How the bulk bytes are protected on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkMode {
    /// Immutability from the kernel's seals; origin and size bound by the authenticated frame.
    /// No hashing on the hot path.
    Sealed,
    /// As `Sealed`, and the bytes are ChaCha20-Poly1305-encrypted under the channel key with a
    /// nonce space distinct from frames'.
    SealedEncrypted,
}

/// Default payload size below which bulk bytes travel inline in the frame. Measured by the
/// `bulk_crossover` benchmark scenario on the reference machine: at 16 KiB a fresh sealed
/// memfd first beats an inline frame (49 us against 52; at 8 KiB 43 against 31).
pub const DEFAULT_INLINE_THRESHOLD: usize = 16 * 1024;

const MEMFD_NAME: &CStr = c"airlock-bulk";

/// A payload being written by its sender. Not yet sealed: only `send_bulk` seals it.
#[derive(Debug)]
pub struct BulkWriter {
    inner: WriterInner,
    len: usize,
}

#[derive(Debug)]
enum WriterInner {
    Inline(Vec<u8>),
    Memfd { fd: OwnedFd, map: Mapping, capacity: usize, lease: Option<PoolLease> },
}

impl BulkWriter {
    /// A writer for `len` bytes: inline below `inline_threshold`, else a fresh memfd.
    pub fn allocate(len: usize, inline_threshold: usize) -> Result<BulkWriter, BulkError> {
        if len < inline_threshold {
            return Ok(BulkWriter { inner: WriterInner::Inline(vec![0; len]), len });
        }
        let (fd, map, _) = new_memfd(len)?;
        Ok(BulkWriter { inner: WriterInner::Memfd { fd, map, capacity: len, lease: None }, len })
    }

    /// A writer for `len` bytes that takes a pre-faulted memfd from `pool` when one fits.
    pub fn allocate_from(pool: &BulkPool, len: usize, inline_threshold: usize) -> Result<BulkWriter, BulkError> {
        if len >= inline_threshold {
            if let Some((fd, map, lease)) = pool.take(len) {
                let capacity = map.len();
                return Ok(BulkWriter { inner: WriterInner::Memfd { fd, map, capacity, lease: Some(lease) }, len });
            }
        }
        BulkWriter::allocate(len, inline_threshold)
    }

    /// A writer holding a copy of `data`.
    pub fn copy_from(data: &[u8], inline_threshold: usize) -> Result<BulkWriter, BulkError> {
        let mut w = BulkWriter::allocate(data.len(), inline_threshold)?;
        w.as_mut_slice().copy_from_slice(data);
        Ok(w)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_memfd(&self) -> bool {
        matches!(self.inner, WriterInner::Memfd { .. })
    }

    /// The payload's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.inner {
            WriterInner::Inline(v) => v.as_mut_slice(),
            WriterInner::Memfd { map, .. } => match map.as_mut_slice() {
                Some(s) => &mut s[..self.len],
                None => &mut [],
            },
        }
    }

    /// Encrypts (when asked), unmaps, trims and seals. Returns what goes on the wire.
    pub(crate) fn finish(self, encrypt: Option<(&Direction, u64)>) -> Result<Outgoing, BulkError> {
        let len = self.len;
        match self.inner {
            WriterInner::Inline(v) => Ok(Outgoing::Inline(v)),
            WriterInner::Memfd { fd, mut map, capacity, lease } => {
                let mut tag = [0u8; TAG_LEN];
                if let Some((dir, seq)) = encrypt {
                    if let Some(s) = map.as_mut_slice() {
                        tag = dir.seal_bulk(seq, &mut s[..len]);
                    }
                }
                // No writable mapping may remain, or F_SEAL_WRITE fails with EBUSY.
                drop(map);
                if capacity != len {
                    sys::ftruncate(fd.as_fd(), len as u64).map_err(|e| BulkError::io("ftruncate bulk memfd", e))?;
                }
                sys::add_seals(fd.as_fd(), sys::SEAL_SET).map_err(|e| BulkError::io("seal bulk memfd", e))?;
                // Written, unmapped and sealed: the pool may refill now.
                drop(lease);
                Ok(Outgoing::Memfd { fd, len: len as u64, tag })
            }
        }
    }
}

/// A finished payload, ready to go on the wire.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Inline(Vec<u8>),
    Memfd { fd: OwnedFd, len: u64, tag: [u8; TAG_LEN] },
}

/// The huge page size hugetlb memfds are tried with (x86_64 and aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// A fresh memfd of `len` bytes, mapped writable with every page already faulted in, and
/// whether its pages are hugetlb pages. Huge pages where the host offers them: first hugetlb
/// (`vm.nr_hugepages`, for a length that is a whole number of huge pages), else transparent
/// huge pages for shmem (`shmem_enabled` = `advise`, `within_size` or `always`). Mapping,
/// unmapping and freeing 16 MiB then costs a few PMD entries instead of 4096 PTEs.
fn new_memfd(len: usize) -> Result<(OwnedFd, Mapping, bool), BulkError> {
    if len >= HUGE_PAGE && len.is_multiple_of(HUGE_PAGE) {
        if let Some((fd, map)) = new_hugetlb_memfd(len) {
            return Ok((fd, map, true));
        }
    }
    let fd = sys::memfd_create(MEMFD_NAME, false).map_err(|e| BulkError::io("memfd_create", e))?;
    sys::ftruncate(fd.as_fd(), len as u64).map_err(|e| BulkError::io("ftruncate bulk memfd", e))?;
    let mut map =
        Mapping::map_lazy(fd.as_fd(), len, MapMode::SharedWrite).map_err(|e| BulkError::io("mmap bulk memfd", e))?;
    // Best effort: refused (EINVAL) where THP is compiled out; harmless where shmem THP is off.
    let _ = sys::advise_hugepage(&map);
    // Best effort, before the pages are faulted in: no page aging, so the unmap before sealing
    // is cheaper. Only advice; nothing depends on it.
    let _ = sys::advise_used_once(&map);
    sys::populate_write(&mut map).map_err(|e| BulkError::io("populate bulk memfd", e))?;
    Ok((fd, map, false))
}

/// A hugetlb memfd of `len` bytes, mapped and populated; `None` where the host has no free huge
/// pages (the mapping's reservation fails) or no hugetlb at all.
fn new_hugetlb_memfd(len: usize) -> Option<(OwnedFd, Mapping)> {
    let fd = sys::memfd_create(MEMFD_NAME, true).ok()?;
    sys::ftruncate(fd.as_fd(), len as u64).ok()?;
    let mut map = Mapping::map_lazy(fd.as_fd(), len, MapMode::SharedWrite).ok()?;
    sys::populate_write(&mut map).ok()?;
    Some((fd, map))
}

/// A received bulk payload. Dereferences to its bytes; a memfd payload is a read-only mapping
/// of a sealed memfd (zero copies), which its sender can no longer change.
#[derive(Debug)]
pub struct Bulk {
    inner: BulkInner,
}

#[derive(Debug)]
enum BulkInner {
    Inline(Vec<u8>),
    Mapped {
        map: Mapping,
        fd: OwnedFd,
    },
    /// Decrypted into private memory. The ciphertext's memfd and mapping are kept until the
    /// payload is dropped: unmapping it and (when this is the last reference) freeing its pages
    /// then happens where the payload is released (a [`BulkReaper`]), not while receiving.
    Decrypted {
        bytes: Vec<u8>,
        _ciphertext: (Mapping, OwnedFd),
    },
    /// Verified (memfd, exact seals, size) but not mapped: received with `map_bulk` off.
    Sealed {
        fd: OwnedFd,
        len: u64,
    },
}

impl Bulk {
    pub(crate) fn inline(v: Vec<u8>) -> Bulk {
        Bulk { inner: BulkInner::Inline(v) }
    }

    /// True when the bytes live in a sealed memfd mapped read-only.
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, BulkInner::Mapped { .. })
    }

    /// The payload's length (also for a payload received unmapped).
    pub fn len(&self) -> usize {
        match &self.inner {
            BulkInner::Sealed { len, .. } => *len as usize,
            _ => self.bytes().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes; empty for a payload received unmapped (`Limits::map_bulk` off).
    pub fn bytes(&self) -> &[u8] {
        match &self.inner {
            BulkInner::Inline(v) | BulkInner::Decrypted { bytes: v, .. } => v,
            BulkInner::Mapped { map, .. } => map.as_slice(),
            BulkInner::Sealed { .. } => &[],
        }
    }

    /// The verified sealed memfd behind a memfd payload, for passing on unchanged.
    pub fn sealed_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.inner {
            BulkInner::Mapped { fd, .. } | BulkInner::Sealed { fd, .. } => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// True for a payload that arrived encrypted (now decrypted in private memory): a broker
    /// passes it on re-encrypted under the next channel's key.
    pub fn was_encrypted(&self) -> bool {
        matches!(self.inner, BulkInner::Decrypted { .. })
    }

    /// An inline payload's bytes, for passing on (a broker re-sends them inline).
    pub fn inline_bytes(&self) -> Option<&[u8]> {
        match &self.inner {
            BulkInner::Inline(v) => Some(v),
            _ => None,
        }
    }
}

/// The payload's bytes. A payload received with `Limits::map_bulk` off has none here (an
/// empty slice): such a receiver only passes payloads on (`sealed_fd`) and reads `len()`.
impl Deref for Bulk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

/// Checks that `fd` is a memfd sealed with exactly the required seals and holding exactly
/// `expected_len` bytes. Does not map it.
pub fn verify_sealed_memfd(fd: BorrowedFd<'_>, expected_len: u64, max_len: u64) -> Result<(), BulkError> {
    if expected_len > max_len {
        return Err(BulkError::TooLarge { len: expected_len, limit: max_len });
    }
    let (mode, size) = sys::file_mode_and_size(fd).map_err(|e| BulkError::io("fstat bulk fd", e))?;
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Err(BulkError::NotMemfd { detail: format!("not a regular file (mode {mode:#o})") });
    }
    let magic = sys::fs_magic(fd).map_err(|e| BulkError::io("fstatfs bulk fd", e))?;
    if magic != sys::TMPFS_MAGIC && magic != sys::HUGETLBFS_MAGIC {
        return Err(BulkError::NotMemfd { detail: format!("lives on filesystem {magic:#x}, not shmem") });
    }
    let seals = match sys::get_seals(fd) {
        Ok(s) => s,
        Err(e) => return Err(BulkError::NotMemfd { detail: format!("F_GET_SEALS refused: {e}") }),
    };
    let missing = sys::SEAL_SET & !seals;
    if missing != 0 {
        return Err(BulkError::MissingSeals { seals, missing });
    }
    // F_SEAL_EXEC (memfds made with MFD_NOEXEC_SEAL) only takes rights away; nothing else may
    // be present.
    let extra = seals & !(sys::SEAL_SET | libc::F_SEAL_EXEC);
    if extra != 0 {
        return Err(BulkError::UnexpectedSeals { extra });
    }
    if size != expected_len {
        return Err(BulkError::Size { expected: expected_len, actual: size });
    }
    Ok(())
}

/// Verifies a received memfd without mapping it.
pub(crate) fn accept_memfd_unmapped(fd: OwnedFd, len: u64, max_len: u64) -> Result<Bulk, BulkError> {
    verify_sealed_memfd(fd.as_fd(), len, max_len)?;
    Ok(Bulk { inner: BulkInner::Sealed { fd, len } })
}

/// Verifies and maps a received memfd; decrypts it when the frame says it is encrypted.
pub(crate) fn accept_memfd(
    fd: OwnedFd,
    len: u64,
    max_len: u64,
    decrypt: Option<(&Direction, u64, &[u8; TAG_LEN])>,
) -> Result<Bulk, BulkError> {
    verify_sealed_memfd(fd.as_fd(), len, max_len)?;
    let len = usize::try_from(len).map_err(|_| BulkError::TooLarge { len, limit: max_len })?;
    // Mapped lazily: reading it faults its pages in sixteen at a time (the kernel's fault-around),
    // cheaper than `MAP_POPULATE`'s page-by-page walk. It cannot fault past its end (the size is
    // verified and sealed) nor fail to allocate (its pages exist, or read as the zero page; a
    // hugetlb memfd reserves its pages at `mmap`). Advised like the sender's mapping (best
    // effort): no page aging, a cheaper unmap.
    let map =
        Mapping::map_lazy(fd.as_fd(), len, MapMode::SharedRead).map_err(|e| BulkError::io("mmap bulk memfd", e))?;
    let _ = sys::advise_used_once(&map);
    match decrypt {
        None => Ok(Bulk { inner: BulkInner::Mapped { map, fd } }),
        Some((dir, seq, tag)) => {
            let mut v = map.as_slice().to_vec();
            if !dir.open_bulk(seq, &mut v, tag) {
                return Err(BulkError::Authenticate);
            }
            Ok(Bulk { inner: BulkInner::Decrypted { bytes: v, _ciphertext: (map, fd) } })
        }
    }
}

/// A pool of pre-faulted, writable memfds of one capacity, refilled by a background thread,
/// so that a sender's hot path neither allocates nor faults pages. The thread runs at idle
/// priority, and refills only while no writer taken from the pool is still unsealed (unless
/// the pool is empty): faulting in 16 MiB beside a writer's copy and unmap slowed them by
/// ~0.4 ms on two CPUs (memory bandwidth, and the mmap lock the unmap waits for).
#[derive(Debug)]
pub struct BulkPool {
    shared: Arc<PoolShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct PoolShared {
    state: Mutex<PoolState>,
    changed: Condvar,
    capacity: usize,
    depth: usize,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Ready memfds, their mappings, and whether their pages are hugetlb pages.
    ready: Vec<(OwnedFd, Mapping, bool)>,
    /// Writers taken from the pool and not yet sealed (or dropped).
    leased: usize,
    shutdown: bool,
    failed: Option<String>,
}

/// A writer taken from a [`BulkPool`]: the pool holds back its refill until every lease has
/// ended (the writer sealed or dropped).
#[derive(Debug)]
struct PoolLease(Arc<PoolShared>);

impl Drop for PoolLease {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.leased = st.leased.saturating_sub(1);
        }
        self.0.changed.notify_all();
    }
}

impl BulkPool {
    /// Keeps `depth` memfds of `capacity` bytes ready.
    pub fn new(capacity: usize, depth: usize) -> std::io::Result<BulkPool> {
        let shared =
            Arc::new(PoolShared { state: Mutex::new(PoolState::default()), changed: Condvar::new(), capacity, depth });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("airlock-bulk-pool".into()).spawn(move || refill(&s))?;
        Ok(BulkPool { shared, thread: Some(thread) })
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    fn take(&self, len: usize) -> Option<(OwnedFd, Mapping, PoolLease)> {
        if len > self.shared.capacity {
            return None;
        }
        let mut st = self.shared.state.lock().ok()?;
        // A hugetlb memfd can only be trimmed to a whole number of huge pages.
        let fits = |huge: bool| !huge || len.is_multiple_of(HUGE_PAGE);
        let at = st.ready.iter().rposition(|(_, _, huge)| fits(*huge))?;
        let (fd, map, _) = st.ready.remove(at);
        st.leased += 1;
        drop(st);
        // The refill thread decides: an emptied pool refills at once, another waits for the lease.
        self.shared.changed.notify_all();
        Some((fd, map, PoolLease(Arc::clone(&self.shared))))
    }

    /// Blocks until the pool is full (or its refill failed); returns the refill error if any.
    /// While a writer taken from it is still unsealed the pool does not refill beyond one ready
    /// memfd, so then this returns once one is ready.
    pub fn wait_full(&self) -> Result<(), String> {
        let Ok(mut st) = self.shared.state.lock() else { return Err("pool lock poisoned".into()) };
        while st.ready.len() < self.shared.depth && st.failed.is_none() && (st.leased == 0 || st.ready.is_empty()) {
            st = match self.shared.changed.wait(st) {
                Ok(g) => g,
                Err(_) => return Err("pool lock poisoned".into()),
            };
        }
        match &st.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn refill(s: &PoolShared) {
    // Faulting in fresh pages is the expensive part of a bulk payload: done here, when the CPU
    // is otherwise idle, so it never competes with the sender's hot path (on a busy or pinned
    // CPU it waits; `wait_full` and an empty pool's fallback still work). Best effort.
    let _ = sys::make_current_thread_idle();
    loop {
        {
            let Ok(mut st) = s.state.lock() else { return };
            // Not while a writer it handed out is being filled: faulting in 16 MiB would compete
            // with the writer's copy for memory bandwidth and hold the mmap lock that the
            // writer's unmap before sealing waits for. An empty pool refills regardless.
            while !st.shutdown && (st.ready.len() >= s.depth || (st.leased > 0 && !st.ready.is_empty())) {
                st = match s.changed.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            if st.shutdown {
                return;
            }
        }
        let made = new_memfd(s.capacity);
        let Ok(mut st) = s.state.lock() else { return };
        match made {
            Ok(item) => st.ready.push(item),
            Err(e) => {
                st.failed = Some(e.to_string());
                s.changed.notify_all();
                return;
            }
        }
        s.changed.notify_all();
    }
}

/// Releases received payloads on a background thread at idle priority, the receiver's
/// counterpart of [`BulkPool`]: unmapping 16 MiB and freeing its 4,096 pages (the last close of
/// the memfd) costs about 2 ms, which a receiver that drops a payload right after answering
/// otherwise pays before it reads its next frame, on the CPU its peer waits for. The CPU cost
/// stays; it moves to idle time.
///
/// Bounded: at most `depth` payloads wait; [`BulkReaper::release`] drops one inline when that
/// many are already waiting (a busy CPU starves an idle-priority thread), so memory held by
/// released payloads never grows without bound.
#[derive(Debug)]
pub struct BulkReaper {
    tx: Option<std::sync::mpsc::SyncSender<Bulk>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BulkReaper {
    /// A reaper thread that holds at most `depth` released payloads (at least one).
    pub fn new(depth: usize) -> std::io::Result<BulkReaper> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bulk>(depth.max(1));
        let thread = std::thread::Builder::new().name("airlock-bulk-reap".into()).spawn(move || {
            // Best effort, as the pool's refill: at normal priority it still works, only sooner.
            let _ = sys::make_current_thread_idle();
            // Each payload is dropped (unmapped, closed) as it arrives; ends when the reaper is.
            for bulk in rx {
                drop(bulk);
            }
        })?;
        Ok(BulkReaper { tx: Some(tx), thread: Some(thread) })
    }

    /// Hands `bulk` to the reaper thread, or drops it here when `depth` payloads are already
    /// waiting or the thread is gone. Returns whether it was handed over.
    pub fn release(&self, bulk: Bulk) -> bool {
        let Some(tx) = &self.tx else {
            drop(bulk);
            return false;
        };
        match tx.try_send(bulk) {
            Ok(()) => true,
            Err(std::sync::mpsc::TrySendError::Full(b) | std::sync::mpsc::TrySendError::Disconnected(b)) => {
                drop(b);
                false
            }
        }
    }
}

impl Drop for BulkReaper {
    /// Waits until every payload handed over has been released.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BulkPool {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.shutdown = true;
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload whose release is observable: it owns the write end of a pipe, so its read end
    /// becomes readable (end of file) exactly when the payload has been dropped.
    fn observable() -> (Bulk, OwnedFd) {
        let (r, w) = std::io::pipe().expect("pipe");
        (Bulk { inner: BulkInner::Sealed { fd: OwnedFd::from(w), len: 0 } }, OwnedFd::from(r))
    }

    fn released(r: &OwnedFd) -> bool {
        sys::poll_readable(r.as_fd(), 0).expect("poll")
    }

    #[test]
    fn a_reaper_releases_everything_it_takes_and_what_it_cannot_take_at_once() {
        let reaper = BulkReaper::new(2).expect("reaper");
        let mut handed = Vec::new();
        for _ in 0..64 {
            let (b, r) = observable();
            assert!(!released(&r));
            if reaper.release(b) {
                handed.push(r);
            } else {
                // Refused (two already waiting): dropped before `release` returned.
                assert!(released(&r), "a payload the reaper refused must be released at once");
            }
        }
        drop(reaper);
        assert!(!handed.is_empty());
        for r in &handed {
            assert!(released(r), "dropping the reaper waits for every payload it took");
        }
    }

    /// `pool.wait_full()` on another thread; whether it returned within ten seconds.
    fn waits_full(pool: &Arc<BulkPool>) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = Arc::clone(pool);
        std::thread::spawn(move || {
            let _ = tx.send(p.wait_full());
        });
        matches!(rx.recv_timeout(std::time::Duration::from_secs(10)), Ok(Ok(())))
    }

    fn ready(pool: &BulkPool) -> usize {
        pool.shared.state.lock().expect("lock").ready.len()
    }

    #[test]
    fn a_pool_refills_once_its_writer_is_sealed_or_dropped_and_never_deadlocks_a_waiter() {
        const CAP: usize = 64 * 1024;
        let pool = Arc::new(BulkPool::new(CAP, 2).expect("pool"));
        assert!(waits_full(&pool));
        assert_eq!(ready(&pool), 2);
        let mut w = BulkWriter::allocate_from(&pool, CAP, 1024).expect("writer");
        w.as_mut_slice().fill(7);
        // While the writer is unsealed the pool keeps one memfd ready and refills no further;
        // waiting for it returns all the same.
        assert!(waits_full(&pool), "wait_full must not wait for a writer the caller holds");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(ready(&pool), 1, "no refill while a writer is being filled");
        let out = w.finish(None).expect("seal");
        assert!(matches!(out, Outgoing::Memfd { len, .. } if len == CAP as u64));
        assert!(waits_full(&pool));
        assert_eq!(ready(&pool), 2, "refilled once the writer was sealed");
        // A writer dropped unsent ends its lease too.
        let w = BulkWriter::allocate_from(&pool, CAP, 1024).expect("writer");
        drop(w);
        assert!(waits_full(&pool));
        assert_eq!(ready(&pool), 2);
        // Both taken: an empty pool refills even while writers are out.
        let a = BulkWriter::allocate_from(&pool, CAP, 1024).expect("writer");
        let b = BulkWriter::allocate_from(&pool, CAP, 1024).expect("writer");
        assert!(a.is_memfd() && b.is_memfd());
        assert!(waits_full(&pool));
        assert_eq!(ready(&pool), 1);
    }

    #[test]
    fn a_reaper_releases_without_being_dropped() {
        let reaper = BulkReaper::new(1).expect("reaper");
        let (b, r) = observable();
        assert!(reaper.release(b));
        // The reaper's thread is idle-priority: it runs once this thread waits.
        assert!(sys::poll_readable(r.as_fd(), 10_000).expect("poll"), "released within 10 s");
        drop(reaper);
    }
}
