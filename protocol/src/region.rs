//! Region calls: a call answered in place in a memfd that a caller and a callee both map. "The
//! client writes its data into the shared area and signals; the server writes data back to the
//! shared memory area, using the semaphore to indicate that data is ready to be read."
//!
//! This module owns the region's layout, its validation against a hostile peer, per-message
//! authenticated encryption and the wait/wake handshake, and shares the last two's machinery
//! with [`crate::stream`]. It never decides who may call whom (the supervisor's permit table
//! does), never trusts a byte of the shared area, never holds a Rust reference to it, and never
//! waits without a deadline.
//!
//! # Layout
//!
//! The memfd holds one header page ([`HEADER_LEN`] bytes) and then the data area
//! (`region_bytes`, a multiple of 8, [`MIN_REGION`]`..=`[`MAX_REGION`]). Words of the header,
//! each owned (written) by one party, in cache lines of their own so that the caller and the
//! callee never write the same line. The futex words and the flags sit where a stream's do, so
//! that [`StreamControl::revoke`](crate::stream::StreamControl::revoke) revokes a region too:
//!
//! | offset | word | written by |
//! |---|---|---|
//! | 0 | `magic` u64 (`"AIRLCAL1"`) | supervisor, at creation |
//! | 8 | `version` u32, 12 `region_bytes` u32, 20 `flags` u32 (bit 0: encrypted) | supervisor, at creation |
//! | 128 | `req_seq` u64: the number of the last call published, 136 `req_len` u32 | caller |
//! | 256 | `ans_seq` u64: the number of the last call answered, 264 `ans_len` u32, 268 `ans_status` u32 (0 answer, 1 refusal) | callee |
//! | 384 | `request` u32 (futex), 388 `callee_waiting` u32 | caller, revoker / callee |
//! | 512 | `answer` u32 (futex), 516 `caller_waiting` u32 | callee, revoker / caller |
//! | 640 | `caller_closed` u32, 644 `callee_closed` u32, 648 `revoked` u32 | each end / supervisor |
//!
//! A message (a request, an answer, or a refusal's text) lies at offset 0 of the data area, its
//! length in `req_len` or `ans_len`. Calls are numbered from 1. In encrypted mode a message is
//! the ChaCha20-Poly1305 ciphertext followed by its 16-byte tag, under the per-region key, with
//! nonce `4 || n` for call `n`'s request and `5 || n` for its answer or refusal (see
//! `crate::crypto`), and `(n u64, len u32, status u32)` little endian as associated data: a
//! message replayed from another call, moved between directions, cut, or turned from an answer
//! into a refusal fails. In plaintext mode (only where the permit says so) there is no AEAD.
//!
//! # One call
//!
//! The caller (one call at a time, `n` = its previous call's number + 1) checks that `ans_seq`
//! still holds the previous call's number, copies the request into the data area (encrypting
//! it into private memory first), stores `req_len`, then `req_seq = n`, and wakes the callee if
//! it sleeps. It then waits for `ans_seq == n`, reads `ans_len` and `ans_status` once, copies
//! the answer out once, into private memory, and only then checks or decrypts the copy. A
//! refusal comes back as [`StreamError::Refused`] with the callee's text (decoded lossily,
//! neither capped nor escaped here: whoever logs it does that), and the end stays usable.
//!
//! The callee waits for `req_seq == n` (its previous call's number + 1), reads `req_len` once,
//! copies the request out once and checks or decrypts the copy; the function it serves with
//! turns that private buffer into the answer, or refuses with a reason. The callee writes the
//! answer (or the refusal's text, or a refusal of its own when the answer does not fit the
//! region) into the data area, stores `ans_len` and `ans_status`, then `ans_seq = n`, and wakes
//! the caller if it sleeps. The data area is never written by both at once: the caller writes
//! only before publishing a request and after the answer was copied out, the callee only after
//! the request was copied out and before publishing the answer. A call that times out would
//! break that (its answer may still come, into the next request), so a timeout poisons the
//! caller's end.
//!
//! # The peer is hostile
//!
//! Each end reads the other's words once per use, as atomics, and checks them against its
//! private state: the caller accepts in `ans_seq` only the previous call's number (no answer
//! yet) or the current one (answered), the callee in `req_seq` only its last call's number or
//! the next; a length must fit the data area (and hold a tag, encrypted), a status must be an
//! answer or a refusal. Message bytes are copied into private memory once and only the copy is
//! checked, decrypted and used; later writes to the region change nothing of it. No Rust reference to the shared
//! bytes ever exists ([`crate::sys::SharedArea`]). Anything the peer can get wrong poisons this
//! end: a clear [`StreamError::Poisoned`] on this and every later call, never a panic, never a
//! wait without a deadline. The header's identity words are read once, at attach.
//!
//! # Memory ordering and signalling
//!
//! Each end copies its message in, then stores the length and then the sequence number
//! (`SeqCst`, so also a release); the other end loads the sequence number (`SeqCst`, an
//! acquire) before it reads the length and copies the message out: the copy sees the bytes.
//!
//! A waiting end first polls: it spins (`spin_loop` hints) for a moment
//! ([`SPIN_BEFORE_YIELD`]), yields the CPU once (to a peer that shares it, which then answers at
//! once), and keeps polling up to [`SPIN_WINDOW`] in all: a peer on another CPU answers a small
//! call well within that, so a busy pair makes no system call but the yield. Then it sleeps with the same
//! Dekker handshake as a stream's ends: it reads the futex word, sets its `*_waiting` flag,
//! re-reads the peer's sequence number, and only then waits on the word (still holding the
//! value it read); the peer stores its sequence number, then reads the flag and, only if it is
//! set, clears it, bumps the word and `FUTEX_WAKE`s. Every sleep lasts at most [`MAX_SLEEP`],
//! after which the sleeper re-reads the words itself, so a peer that never signals still has
//! its message found. A peer that signals without a message is tolerated [`MAX_IDLE_WAKES`]
//! times in a row, then poisons the end (no busy loop driven by the peer).
//!
//! Revocation and closing: every wait also checks `revoked` ([`StreamError::Revoked`]) and the
//! peer's closed flag ([`StreamError::Closed`]); the supervisor's [`StreamControl`] sets
//! `revoked` and bumps and wakes both futex words, and each end's `close` sets its flag and
//! wakes the other. The words are shared, so a peer can fake a revocation or a close: that only
//! ends its own calls, which it could end anyway by not answering.
//!
//! System calls on the hot path: with the callee polling, one `sched_yield` per wait that
//! outlasts [`SPIN_BEFORE_YIELD`]; a sleeping end costs `futex` (`FUTEX_WAIT`/`FUTEX_WAKE`,
//! shared: ops 0 and 1, as for streams).
//!
//! [`StreamControl`]: crate::stream::StreamControl
//! [`MAX_SLEEP`]: crate::stream::MAX_SLEEP

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::crypto::{nonce, DOMAIN_REGION_ANSWER, DOMAIN_REGION_REQUEST};
use crate::frame::TAG_LEN;
use crate::stream::{
    self, check_key, deadline_after, expired, io, verify_memfd, Cipher, StreamError, StreamKey, HEADER_LEN,
    MAX_IDLE_WAKES,
};
use crate::sys::{self, SharedArea};

/// The smallest data area.
pub const MIN_REGION: u32 = 4096;
/// The largest data area.
pub const MAX_REGION: u32 = 64 << 20;
/// How long a waiting end spins before it yields the CPU once (the clock is read every 16
/// polls, so in practice: after the first 16). Yielding early is what lets a peer that shares
/// the CPU answer at all; where the peer runs on another CPU and nothing else waits for this
/// one, the yield returns at once and costs one system call. Measured with `shm_call_64`, both
/// processes on one CPU of a shared 2-CPU VM: 5.6 us a round trip yielding after 0.25 us, 6.7 us
/// after 1 us, 9 us after 2 us, 25 us after 10 us.
pub const SPIN_BEFORE_YIELD: Duration = Duration::from_nanos(250);
/// How long a waiting end polls (spinning, and yielding once) before it sleeps on the futex.
pub const SPIN_WINDOW: Duration = Duration::from_micros(30);

const MAGIC: u64 = u64::from_le_bytes(*b"AIRLCAL1");
const VERSION: u32 = 1;
const FLAG_ENCRYPTED: u32 = 1;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_REGION: usize = 12;
const OFF_FLAGS: usize = 20;
const OFF_REQ_SEQ: usize = 128;
const OFF_REQ_LEN: usize = 136;
const OFF_ANS_SEQ: usize = 256;
const OFF_ANS_LEN: usize = 264;
const OFF_ANS_STATUS: usize = 268;
const OFF_REQUEST: usize = 384;
const OFF_CALLEE_WAITING: usize = 388;
const OFF_ANSWER: usize = 512;
const OFF_CALLER_WAITING: usize = 516;
const OFF_CALLER_CLOSED: usize = 640;
const OFF_CALLEE_CLOSED: usize = 644;
const OFF_REVOKED: usize = 648;
/// Where the data area starts.
const DATA: usize = HEADER_LEN;

// `StreamControl::revoke` sets `revoked` and wakes the words at a stream's `data` and `space`.
const _: () = assert!(OFF_REQUEST == stream::OFF_DATA);
const _: () = assert!(OFF_ANSWER == stream::OFF_SPACE);
const _: () = assert!(OFF_REVOKED == stream::OFF_REVOKED);

const STATUS_ANSWER: u32 = 0;
const STATUS_REFUSED: u32 = 1;

/// Polls between two reads of the clock while spinning.
const SPINS_PER_CHECK: u32 = 16;

const MEMFD_NAME: &std::ffi::CStr = c"airlock-region";

/// Size and mode of one region, decided by the supervisor from the permit; travels in wire
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionParams {
    /// Bytes of the data area: a multiple of 8, [`MIN_REGION`]`..=`[`MAX_REGION`].
    pub region_bytes: u32,
    /// Messages are authenticated and encrypted (the default); plaintext only where the permit
    /// says so.
    pub encrypted: bool,
}

impl RegionParams {
    pub fn validate(&self) -> Result<(), StreamError> {
        let r = self.region_bytes;
        if !(MIN_REGION..=MAX_REGION).contains(&r) || !r.is_multiple_of(8) {
            return Err(StreamError::BadParams(format!(
                "region of {r} bytes: must be a multiple of 8 from {MIN_REGION} to {MAX_REGION}"
            )));
        }
        Ok(())
    }

    /// Bytes of the memfd: the header page and the data area.
    pub fn area_len(&self) -> usize {
        HEADER_LEN + self.region_bytes as usize
    }

    /// The longest request, answer or refusal text: the data area, less the tag when encrypted.
    pub fn max_message(&self) -> usize {
        self.region_bytes as usize - if self.encrypted { TAG_LEN } else { 0 }
    }

    fn flags(&self) -> u32 {
        if self.encrypted {
            FLAG_ENCRYPTED
        } else {
            0
        }
    }

    fn tag_len(&self) -> usize {
        if self.encrypted {
            TAG_LEN
        } else {
            0
        }
    }
}

/// Supervisor side: a fresh memfd of `params.area_len()` bytes, its header initialised, sealed
/// with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so that no peer can truncate it under the
/// other's mapping (`SIGBUS`) or change its seals.
pub fn create_area(params: &RegionParams) -> Result<OwnedFd, StreamError> {
    params.validate()?;
    let fd = sys::memfd_create(MEMFD_NAME, false).map_err(io("memfd_create"))?;
    sys::ftruncate(fd.as_fd(), params.area_len() as u64).map_err(io("ftruncate region memfd"))?;
    let mut hdr = [0u8; 24];
    hdr[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
    hdr[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    hdr[OFF_REGION..OFF_REGION + 4].copy_from_slice(&params.region_bytes.to_le_bytes());
    hdr[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&params.flags().to_le_bytes());
    sys::pwrite_all(fd.as_fd(), &hdr, 0).map_err(io("write region header"))?;
    sys::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
        .map_err(io("seal region memfd"))?;
    Ok(fd)
}

/// The associated data of call `seq`'s message of `len` stored bytes.
fn aad(seq: u64, len: u32, status: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&seq.to_le_bytes());
    a[8..12].copy_from_slice(&len.to_le_bytes());
    a[12..].copy_from_slice(&status.to_le_bytes());
    a
}

/// Makes `v` exactly `len` bytes long, reusing its bytes and capacity (no clearing pass over a
/// buffer about to be overwritten).
fn set_len(v: &mut Vec<u8>, len: usize) {
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0);
    }
}

/// What a waiting end found in the words it watches.
#[derive(Debug)]
enum Seen {
    Nothing,
    Ready,
    Revoked,
    Closed,
    /// The peer wrote something it may not: poison.
    Bad(String),
}

/// How a wait ended.
#[derive(Debug)]
enum Waited {
    Seen(Seen),
    TimedOut,
    /// The peer woke us [`MAX_IDLE_WAKES`] times in a row with nothing to find.
    Idle,
}

/// What both ends share: the mapping and the parameters checked at attach.
#[derive(Debug)]
struct Region {
    area: SharedArea,
    params: RegionParams,
    local: stream::LocalRevoke,
}

impl Region {
    fn attach(fd: OwnedFd, params: RegionParams) -> Result<Region, StreamError> {
        params.validate()?;
        verify_memfd(fd.as_fd(), params.area_len())?;
        let area = SharedArea::map(fd.as_fd(), params.area_len()).map_err(io("mmap region memfd"))?;
        // The descriptor is not needed once mapped: the mapping keeps the file alive.
        drop(fd);
        let magic = area.u64_at(OFF_MAGIC).load(SeqCst);
        if magic != MAGIC {
            return Err(StreamError::BadArea(format!("wrong magic {magic:#x}")));
        }
        let got = (
            area.u32_at(OFF_VERSION).load(SeqCst),
            area.u32_at(OFF_REGION).load(SeqCst),
            area.u32_at(OFF_FLAGS).load(SeqCst),
        );
        let want = (VERSION, params.region_bytes, params.flags());
        if got != want {
            return Err(StreamError::BadArea(format!(
                "header says (version, region, flags) = {got:?}, the parameters {want:?}"
            )));
        }
        Ok(Region { area, params, local: stream::LocalRevoke::default() })
    }

    fn flag(&self, off: usize) -> bool {
        self.area.u32_at(off).load(SeqCst) != 0 || (off == OFF_REVOKED && self.local.is_set())
    }

    fn seq(&self, off: usize) -> u64 {
        self.area.u64_at(off).load(SeqCst)
    }

    /// Waits until `look` finds something, or `deadline`: polls (spinning, one yield) for up to
    /// [`SPIN_WINDOW`], then sleeps on the futex word at `futex` with the Dekker handshake on the
    /// flag at `waiting`, each sleep at most [`MAX_SLEEP`](stream::MAX_SLEEP). `idle_wakes`
    /// counts the wake-ups that found nothing, across waits, until something is found.
    fn wait(
        &self,
        futex: usize,
        waiting: usize,
        deadline: Option<Instant>,
        idle_wakes: &mut u32,
        look: impl Fn() -> Seen,
    ) -> Result<Waited, StreamError> {
        let start = Instant::now();
        let mut yielded = false;
        loop {
            for _ in 0..SPINS_PER_CHECK {
                match look() {
                    Seen::Nothing => std::hint::spin_loop(),
                    s => {
                        // Progress: a late wake left over from earlier calls is not idleness.
                        *idle_wakes = 0;
                        return Ok(Waited::Seen(s));
                    }
                }
            }
            let spent = start.elapsed();
            if spent >= SPIN_WINDOW || expired(deadline) {
                break;
            }
            if !yielded && spent >= SPIN_BEFORE_YIELD {
                // To a peer that shares this CPU: it answers now instead of after our spinning.
                std::thread::yield_now();
                yielded = true;
            }
        }
        let word = self.area.u32_at(waiting);
        let mut woke = false;
        loop {
            let seen = self.area.u32_at(futex).load(SeqCst);
            word.store(1, SeqCst);
            let s = look();
            if !matches!(s, Seen::Nothing) {
                word.store(0, SeqCst);
                *idle_wakes = 0;
                return Ok(Waited::Seen(s));
            }
            if woke {
                *idle_wakes += 1;
                if *idle_wakes >= MAX_IDLE_WAKES {
                    word.store(0, SeqCst);
                    return Ok(Waited::Idle);
                }
            }
            if expired(deadline) {
                word.store(0, SeqCst);
                return Ok(Waited::TimedOut);
            }
            let r = stream::sleep(&self.area, futex, seen, deadline);
            word.store(0, SeqCst);
            woke = r?;
        }
    }
}

/// The caller's end of a region: makes one call at a time.
#[derive(Debug)]
pub struct RegionCaller {
    region: Region,
    /// The number of the last call made (our own `req_seq`).
    seq: u64,
    cipher: Option<Cipher>,
    /// The encrypted request, built here before it is copied into the region.
    scratch: Vec<u8>,
    poisoned: Option<String>,
    closed: bool,
    idle_wakes: u32,
}

impl RegionCaller {
    /// Verifies the memfd (a memfd of `params.area_len()` bytes, sealed against shrinking and
    /// growing, header matching `params`, no call made yet) and maps it. `key` must be `Some`
    /// exactly when `params.encrypted`.
    pub fn attach(fd: OwnedFd, params: RegionParams, key: Option<StreamKey>) -> Result<RegionCaller, StreamError> {
        let cipher = check_key(params.encrypted, key)?;
        let region = Region::attach(fd, params)?;
        let req = region.seq(OFF_REQ_SEQ);
        let ans = region.seq(OFF_ANS_SEQ);
        if req != 0 || ans != 0 || region.flag(OFF_CALLER_CLOSED) {
            return Err(StreamError::BadArea(format!(
                "region already used (request {req}, answer {ans}): a caller attaches once"
            )));
        }
        let scratch = Vec::with_capacity(if params.encrypted { params.region_bytes as usize } else { 0 });
        Ok(RegionCaller { region, seq: 0, cipher, scratch, poisoned: None, closed: false, idle_wakes: 0 })
    }

    /// A handle that revokes this end from within this process (see [`stream::LocalRevoke`]).
    pub fn local_revoke(&self) -> stream::LocalRevoke {
        self.region.local.clone()
    }

    pub fn params(&self) -> RegionParams {
        self.region.params
    }

    fn poison(&mut self, why: String) -> StreamError {
        tracing::warn!(reason = %why, "region caller poisoned by its callee");
        self.poisoned = Some(why.clone());
        self.close();
        StreamError::Poisoned(why)
    }

    fn usable(&self) -> Result<(), StreamError> {
        if let Some(why) = &self.poisoned {
            return Err(StreamError::Poisoned(why.clone()));
        }
        if self.region.flag(OFF_REVOKED) {
            return Err(StreamError::Revoked);
        }
        if self.closed || self.region.flag(OFF_CALLEE_CLOSED) {
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    /// One call: writes `request` into the region, signals, waits up to `timeout` for the
    /// answer, and copies it out into `answer` (whose contents are replaced; its capacity is
    /// reused). A refusal is [`StreamError::Refused`] (`answer` empty) and the end stays usable;
    /// a request longer than [`RegionParams::max_message`] is [`StreamError::TooLarge`] and
    /// nothing is sent. A call that times out ([`StreamError::TimedOut`]) poisons this end: its
    /// answer could still arrive, over the next request. Anything a hostile callee can do is
    /// [`StreamError::Poisoned`], on this call and every later one.
    pub fn call(&mut self, request: &[u8], answer: &mut Vec<u8>, timeout: Duration) -> Result<(), StreamError> {
        answer.clear();
        self.usable()?;
        let max = self.region.params.max_message();
        if request.len() > max {
            return Err(StreamError::TooLarge { len: request.len(), max });
        }
        let prev = self.seq;
        let n = prev + 1;
        let ans = self.region.seq(OFF_ANS_SEQ);
        if ans != prev {
            return Err(self.poison(format!("callee published answer {ans} before call {n} was made")));
        }
        let stored = request.len() + self.region.params.tag_len();
        let area = &self.region.area;
        match &self.cipher {
            None => area.copy_in(DATA, request).map_err(io("write request"))?,
            Some(Cipher(c)) => {
                self.scratch.clear();
                self.scratch.extend_from_slice(request);
                let ad = aad(n, stored as u32, STATUS_ANSWER);
                let tag = c
                    .encrypt_in_place_detached(&nonce(DOMAIN_REGION_REQUEST, n), &ad, &mut self.scratch)
                    .map_err(|_| StreamError::BadParams("request too long to encrypt".into()))?;
                self.scratch.extend_from_slice(&tag);
                area.copy_in(DATA, &self.scratch).map_err(io("write request"))?;
            }
        }
        area.u32_at(OFF_REQ_LEN).store(stored as u32, SeqCst);
        // Publish (release, and the first half of the Dekker handshake), then wake a sleeper.
        area.u64_at(OFF_REQ_SEQ).store(n, SeqCst);
        self.seq = n;
        stream::wake_if_waiting(area, OFF_CALLEE_WAITING, OFF_REQUEST);

        let region = &self.region;
        let look = || {
            if region.flag(OFF_REVOKED) {
                return Seen::Revoked;
            }
            let a = region.seq(OFF_ANS_SEQ);
            if a == n {
                Seen::Ready
            } else if a != prev {
                Seen::Bad(format!("callee published answer {a} while call {n} was outstanding"))
            } else if region.flag(OFF_CALLEE_CLOSED) {
                Seen::Closed
            } else {
                Seen::Nothing
            }
        };
        let waited = region.wait(OFF_ANSWER, OFF_CALLER_WAITING, deadline_after(timeout), &mut self.idle_wakes, look);
        match waited {
            Ok(Waited::Seen(Seen::Ready)) => {}
            Ok(Waited::Seen(Seen::Bad(why))) => return Err(self.poison(why)),
            Ok(Waited::Idle) => {
                return Err(self.poison(format!("callee woke the caller {MAX_IDLE_WAKES} times without answering")))
            }
            Ok(Waited::TimedOut) => {
                let why = format!("call {n} timed out after {timeout:?}; its answer could overwrite a later request");
                tracing::warn!(reason = %why, "region caller gave up on its callee");
                self.poisoned = Some(why);
                self.close();
                return Err(StreamError::TimedOut);
            }
            // The call stays outstanding: this end is finished.
            Ok(Waited::Seen(Seen::Revoked)) => {
                self.close();
                return Err(StreamError::Revoked);
            }
            Ok(Waited::Seen(Seen::Closed | Seen::Nothing)) => {
                self.close();
                return Err(StreamError::Closed);
            }
            Err(e) => {
                self.poisoned = Some(format!("call {n} abandoned: {e}"));
                self.close();
                return Err(e);
            }
        }
        self.read_answer(n, answer)
    }

    /// Copies call `n`'s published answer out once, then checks and decrypts the copy.
    fn read_answer(&mut self, n: u64, answer: &mut Vec<u8>) -> Result<(), StreamError> {
        let area = &self.region.area;
        let len = area.u32_at(OFF_ANS_LEN).load(SeqCst) as usize;
        let status = area.u32_at(OFF_ANS_STATUS).load(SeqCst);
        let max = self.region.params.region_bytes as usize;
        if status != STATUS_ANSWER && status != STATUS_REFUSED {
            return Err(self.poison(format!("answer {n} has status {status}, neither answer nor refusal")));
        }
        if len > max {
            return Err(self.poison(format!("answer {n} of {len} bytes, more than the {max}-byte region")));
        }
        if self.cipher.is_some() && len < TAG_LEN {
            return Err(self.poison(format!("encrypted answer {n} of {len} bytes, shorter than its tag")));
        }
        set_len(answer, len);
        if let Err(e) = area.copy_out(DATA, answer) {
            answer.clear();
            return Err(self.poison(format!("answer copy failed: {e}")));
        }
        // The copy is private now: nothing the callee writes from here on changes it.
        if let Some(Cipher(c)) = &self.cipher {
            let body = len - TAG_LEN;
            let tag = stream::tag_of(&answer[body..]);
            answer.truncate(body);
            let ad = aad(n, len as u32, status);
            if c.decrypt_in_place_detached(&nonce(DOMAIN_REGION_ANSWER, n), &ad, answer, &tag).is_err() {
                answer.clear();
                return Err(self.poison(format!("answer {n} failed authentication: rewritten, replayed or forged")));
            }
        }
        if status == STATUS_REFUSED {
            let why = String::from_utf8_lossy(answer).into_owned();
            answer.clear();
            return Err(StreamError::Refused(why));
        }
        Ok(())
    }

    /// Calls made so far (the last of them may have timed out or failed).
    pub fn calls(&self) -> u64 {
        self.seq
    }

    /// Marks the caller closed and wakes the callee, whose next `serve` answers
    /// [`StreamError::Closed`]. Idempotent; also done on drop.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.region.area.u32_at(OFF_CALLER_CLOSED).store(1, SeqCst);
        stream::bump_and_wake(&self.region.area, OFF_REQUEST);
    }
}

impl Drop for RegionCaller {
    fn drop(&mut self) {
        self.close();
    }
}

/// The callee's end of a region: answers one call at a time.
#[derive(Debug)]
pub struct RegionCallee {
    region: Region,
    /// The number of the last call taken (our own view of `req_seq`).
    seq: u64,
    cipher: Option<Cipher>,
    /// The private copy of a request, turned into its answer in place.
    buf: Vec<u8>,
    poisoned: Option<String>,
    closed: bool,
    idle_wakes: u32,
    /// A call taken with [`RegionCallee::take_request`] and not answered yet.
    pending: Option<u64>,
    /// `serve`'s second buffer: requests and answers trade places between the two, so that a
    /// large region's buffers are allocated once, not per call.
    spare: Vec<u8>,
}

impl RegionCallee {
    /// Verifies the memfd as [`RegionCaller::attach`] does (nothing answered yet) and maps it.
    pub fn attach(fd: OwnedFd, params: RegionParams, key: Option<StreamKey>) -> Result<RegionCallee, StreamError> {
        let cipher = check_key(params.encrypted, key)?;
        let region = Region::attach(fd, params)?;
        let ans = region.seq(OFF_ANS_SEQ);
        if ans != 0 || region.flag(OFF_CALLEE_CLOSED) {
            return Err(StreamError::BadArea(format!("region already answered ({ans}): a callee attaches once")));
        }
        Ok(RegionCallee {
            region,
            seq: 0,
            cipher,
            buf: Vec::new(),
            poisoned: None,
            closed: false,
            idle_wakes: 0,
            pending: None,
            spare: Vec::new(),
        })
    }

    /// A handle that revokes this end from within this process (see [`stream::LocalRevoke`]).
    pub fn local_revoke(&self) -> stream::LocalRevoke {
        self.region.local.clone()
    }

    pub fn params(&self) -> RegionParams {
        self.region.params
    }

    fn poison(&mut self, why: String) -> StreamError {
        tracing::warn!(reason = %why, "region callee poisoned by its caller");
        self.poisoned = Some(why.clone());
        self.close();
        StreamError::Poisoned(why)
    }

    fn usable(&self) -> Result<(), StreamError> {
        if let Some(why) = &self.poisoned {
            return Err(StreamError::Poisoned(why.clone()));
        }
        if self.region.flag(OFF_REVOKED) {
            return Err(StreamError::Revoked);
        }
        if self.closed {
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next request; copies it out into a private buffer, checks
    /// or decrypts the copy, and hands the buffer to `f`, which turns it in place into the
    /// answer (`Ok`) or refuses with a reason (`Err`); writes the answer or the refusal into the
    /// region and signals. An answer longer than [`RegionParams::max_message`] becomes a
    /// refusal saying so; a reason longer than that is cut. `Ok(false)` when no request came
    /// within `timeout` (the end stays usable); [`StreamError::Closed`] once the caller closed,
    /// [`StreamError::Revoked`] after revocation, [`StreamError::Poisoned`] for anything a
    /// hostile caller can do.
    pub fn serve(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) -> Result<bool, StreamError> {
        let mut request = std::mem::take(&mut self.spare);
        let taken = self.take_request(timeout, &mut request);
        if !matches!(taken, Ok(true)) {
            self.spare = request;
            return taken;
        }
        let result = f(&mut request);
        let answered = self.answer(&mut request, result);
        self.spare = request;
        answered.map(|()| true)
    }

    /// The first half of [`RegionCallee::serve`], for a callee that must not hold the end
    /// while it works out an answer (so that whoever owns the end can drop it, unmapping the
    /// region, at any time): waits up to `timeout` for the next request and puts its private,
    /// checked copy into `request` (replacing what was there). `Ok(true)` when a call was
    /// taken: answer it with [`RegionCallee::answer`] before taking the next.
    pub fn take_request(&mut self, timeout: Duration, request: &mut Vec<u8>) -> Result<bool, StreamError> {
        self.usable()?;
        if self.pending.is_some() {
            return Err(StreamError::BadParams("the call taken before was not answered".into()));
        }
        let last = self.seq;
        let n = last + 1;
        let region = &self.region;
        let look = || {
            if region.flag(OFF_REVOKED) {
                return Seen::Revoked;
            }
            let r = region.seq(OFF_REQ_SEQ);
            if r == n {
                Seen::Ready
            } else if r != last {
                Seen::Bad(format!("caller published request {r}, expected {n}"))
            } else if region.flag(OFF_CALLER_CLOSED) {
                Seen::Closed
            } else {
                Seen::Nothing
            }
        };
        match region.wait(OFF_REQUEST, OFF_CALLEE_WAITING, deadline_after(timeout), &mut self.idle_wakes, look)? {
            Waited::Seen(Seen::Ready) => {}
            Waited::TimedOut => return Ok(false),
            Waited::Seen(Seen::Bad(why)) => return Err(self.poison(why)),
            Waited::Idle => {
                return Err(self.poison(format!("caller woke the callee {MAX_IDLE_WAKES} times without a request")))
            }
            Waited::Seen(Seen::Revoked) => return Err(StreamError::Revoked),
            Waited::Seen(Seen::Closed | Seen::Nothing) => return Err(StreamError::Closed),
        }
        self.read_request(n)?;
        self.seq = n;
        self.pending = Some(n);
        std::mem::swap(request, &mut self.buf);
        Ok(true)
    }

    /// The second half of [`RegionCallee::serve`]: answers the call taken with `answer`'s
    /// bytes (`result` Ok; `answer` gets back a buffer to reuse) or refuses it with a reason.
    /// An answer longer than [`RegionParams::max_message`] becomes a refusal saying so; a
    /// reason longer than that is cut.
    pub fn answer(&mut self, answer: &mut Vec<u8>, result: Result<(), String>) -> Result<(), StreamError> {
        self.usable()?;
        let Some(n) = self.pending.take() else {
            return Err(StreamError::BadParams("no call taken to answer".into()));
        };
        let max = self.region.params.max_message();
        std::mem::swap(answer, &mut self.buf);
        let status = match result {
            Ok(()) if self.buf.len() <= max => STATUS_ANSWER,
            Ok(()) => {
                let why = format!("answer of {} bytes exceeds the region's {max}", self.buf.len());
                self.buf.clear();
                self.buf.extend_from_slice(why.as_bytes());
                STATUS_REFUSED
            }
            Err(why) => {
                self.buf.clear();
                self.buf.extend_from_slice(&why.as_bytes()[..why.len().min(max)]);
                STATUS_REFUSED
            }
        };
        self.write_answer(n, status)
    }

    /// Copies call `n`'s published request out once into `buf`, then checks and decrypts it.
    fn read_request(&mut self, n: u64) -> Result<(), StreamError> {
        let area = &self.region.area;
        let len = area.u32_at(OFF_REQ_LEN).load(SeqCst) as usize;
        let max = self.region.params.region_bytes as usize;
        if len > max {
            return Err(self.poison(format!("request {n} of {len} bytes, more than the {max}-byte region")));
        }
        if self.cipher.is_some() && len < TAG_LEN {
            return Err(self.poison(format!("encrypted request {n} of {len} bytes, shorter than its tag")));
        }
        set_len(&mut self.buf, len);
        if let Err(e) = area.copy_out(DATA, &mut self.buf) {
            return Err(self.poison(format!("request copy failed: {e}")));
        }
        // The copy is private now: nothing the caller writes from here on changes it.
        if let Some(Cipher(c)) = &self.cipher {
            let body = len - TAG_LEN;
            let tag = stream::tag_of(&self.buf[body..]);
            self.buf.truncate(body);
            let ad = aad(n, len as u32, STATUS_ANSWER);
            if c.decrypt_in_place_detached(&nonce(DOMAIN_REGION_REQUEST, n), &ad, &mut self.buf, &tag).is_err() {
                return Err(self.poison(format!("request {n} failed authentication: rewritten, replayed or forged")));
            }
        }
        Ok(())
    }

    /// Writes `buf` (at most `max_message` bytes) as call `n`'s answer or refusal, publishes it
    /// and wakes the caller if it sleeps.
    fn write_answer(&mut self, n: u64, status: u32) -> Result<(), StreamError> {
        let stored = self.buf.len() + self.region.params.tag_len();
        if let Some(Cipher(c)) = &self.cipher {
            let ad = aad(n, stored as u32, status);
            let tag = c
                .encrypt_in_place_detached(&nonce(DOMAIN_REGION_ANSWER, n), &ad, &mut self.buf)
                .map_err(|_| StreamError::BadParams("answer too long to encrypt".into()))?;
            self.buf.extend_from_slice(&tag);
        }
        let area = &self.region.area;
        area.copy_in(DATA, &self.buf).map_err(io("write answer"))?;
        area.u32_at(OFF_ANS_LEN).store(stored as u32, SeqCst);
        area.u32_at(OFF_ANS_STATUS).store(status, SeqCst);
        // Publish (release, and the first half of the Dekker handshake), then wake a sleeper.
        area.u64_at(OFF_ANS_SEQ).store(n, SeqCst);
        stream::wake_if_waiting(area, OFF_CALLER_WAITING, OFF_ANSWER);
        Ok(())
    }

    /// Calls answered or refused so far.
    pub fn served(&self) -> u64 {
        self.seq
    }

    /// Marks the callee closed and wakes the caller, whose call in progress or next call
    /// answers [`StreamError::Closed`]. Idempotent; also done on drop.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.region.area.u32_at(OFF_CALLEE_CLOSED).store(1, SeqCst);
        stream::bump_and_wake(&self.region.area, OFF_ANSWER);
    }
}

impl Drop for RegionCallee {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{StreamControl, MAX_SLEEP};
    use std::sync::atomic::AtomicBool;

    const LONG: Duration = Duration::from_secs(10);

    fn params(region_bytes: u32, encrypted: bool) -> RegionParams {
        RegionParams { region_bytes, encrypted }
    }

    fn key_for(p: RegionParams) -> Option<StreamKey> {
        p.encrypted.then(|| StreamKey::generate().expect("key"))
    }

    /// A region with both ends attached, and the memfd for a test playing a third party.
    fn pair(p: RegionParams) -> (RegionCaller, RegionCallee, OwnedFd) {
        let fd = create_area(&p).expect("create area");
        let key = key_for(p);
        let caller = RegionCaller::attach(fd.try_clone().expect("dup"), p, key.clone()).expect("caller");
        let callee = RegionCallee::attach(fd.try_clone().expect("dup"), p, key).expect("callee");
        (caller, callee, fd)
    }

    /// A revocation made in this process ends a caller waiting for an answer and a callee
    /// waiting for a call, whatever the shared `revoked` word says.
    #[test]
    fn a_local_revocation_ends_waits_whatever_the_shared_word_says() {
        let (mut caller, mut callee, _fd) = pair(params(4096, true));
        let (cl, sl) = (caller.local_revoke(), callee.local_revoke());
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let res = callee.serve(Duration::from_secs(10), |_| Ok(()));
            (res, start.elapsed(), callee)
        });
        std::thread::sleep(Duration::from_millis(50));
        sl.revoke();
        // The callee is kept (not closed): only the local revocation ends the caller's wait.
        let (res, took, _callee) = t.join().expect("callee thread");
        assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // No callee serves any more: the caller's wait ends by the local revocation.
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let mut answer = Vec::new();
            let res = caller.call(b"x", &mut answer, Duration::from_secs(10));
            (res, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        cl.revoke();
        let (res, took) = t.join().expect("caller thread");
        assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// A caller alone; the test is its (hostile) callee, through a mapping of its own.
    fn caller_and_peer(p: RegionParams) -> (RegionCaller, Peer) {
        let fd = create_area(&p).expect("create area");
        let key = key_for(p);
        let caller = RegionCaller::attach(fd.try_clone().expect("dup"), p, key.clone()).expect("caller");
        (caller, Peer::new(&fd, p, key))
    }

    /// A callee alone; the test is its (hostile) caller.
    fn callee_and_peer(p: RegionParams) -> (RegionCallee, Peer) {
        let fd = create_area(&p).expect("create area");
        let key = key_for(p);
        let callee = RegionCallee::attach(fd.try_clone().expect("dup"), p, key.clone()).expect("callee");
        (callee, Peer::new(&fd, p, key))
    }

    /// The other end, written by hand on a raw mapping: it can do anything a hostile peer can.
    struct Peer {
        area: SharedArea,
        cipher: Option<Cipher>,
    }

    impl Peer {
        fn new(fd: &OwnedFd, p: RegionParams, key: Option<StreamKey>) -> Peer {
            let area = SharedArea::map(fd.as_fd(), p.area_len()).expect("peer map");
            Peer { area, cipher: check_key(p.encrypted, key).expect("key") }
        }

        /// `msg` as stored for call `n` (ciphertext and tag when encrypted).
        fn seal(&self, domain: u32, n: u64, status: u32, msg: &[u8]) -> Vec<u8> {
            let mut v = msg.to_vec();
            if let Some(Cipher(c)) = &self.cipher {
                let ad = aad(n, (msg.len() + TAG_LEN) as u32, status);
                let tag = c.encrypt_in_place_detached(&nonce(domain, n), &ad, &mut v).expect("seal");
                v.extend_from_slice(&tag);
            }
            v
        }

        /// Publishes `stored` as call `n`'s answer with `status` and length `len`, waking nobody.
        fn publish_answer(&self, n: u64, status: u32, stored: &[u8], len: u32) {
            self.area.copy_in(DATA, stored).expect("write answer");
            self.area.u32_at(OFF_ANS_LEN).store(len, SeqCst);
            self.area.u32_at(OFF_ANS_STATUS).store(status, SeqCst);
            self.area.u64_at(OFF_ANS_SEQ).store(n, SeqCst);
        }

        /// A well-formed answer (or refusal) to call `n`, with the wake-up.
        fn answer(&self, n: u64, status: u32, msg: &[u8]) {
            let stored = self.seal(DOMAIN_REGION_ANSWER, n, status, msg);
            self.publish_answer(n, status, &stored, stored.len() as u32);
            stream::wake_if_waiting(&self.area, OFF_CALLER_WAITING, OFF_ANSWER);
        }

        fn publish_request(&self, n: u64, stored: &[u8], len: u32) {
            self.area.copy_in(DATA, stored).expect("write request");
            self.area.u32_at(OFF_REQ_LEN).store(len, SeqCst);
            self.area.u64_at(OFF_REQ_SEQ).store(n, SeqCst);
        }

        /// A well-formed request for call `n`, with the wake-up.
        fn request(&self, n: u64, msg: &[u8]) {
            let stored = self.seal(DOMAIN_REGION_REQUEST, n, STATUS_ANSWER, msg);
            self.publish_request(n, &stored, stored.len() as u32);
            stream::wake_if_waiting(&self.area, OFF_CALLEE_WAITING, OFF_REQUEST);
        }

        /// Waits (polling, up to 10 s) until the caller has published call `n`.
        fn wait_for_request(&self, n: u64) {
            let t = Instant::now();
            while self.area.u64_at(OFF_REQ_SEQ).load(SeqCst) != n {
                assert!(t.elapsed() < LONG, "no request {n}");
                std::thread::sleep(Duration::from_micros(100));
            }
        }

        fn wait_for_answer(&self, n: u64) {
            let t = Instant::now();
            while self.area.u64_at(OFF_ANS_SEQ).load(SeqCst) != n {
                assert!(t.elapsed() < LONG, "no answer {n}");
                std::thread::sleep(Duration::from_micros(100));
            }
        }

        /// The answer the callee published, opened.
        fn read_answer(&self, n: u64) -> (u32, Vec<u8>) {
            let len = self.area.u32_at(OFF_ANS_LEN).load(SeqCst) as usize;
            let status = self.area.u32_at(OFF_ANS_STATUS).load(SeqCst);
            let mut v = vec![0u8; len];
            self.area.copy_out(DATA, &mut v).expect("read answer");
            if let Some(Cipher(c)) = &self.cipher {
                let tag = stream::tag_of(&v[len - TAG_LEN..]);
                v.truncate(len - TAG_LEN);
                let ad = aad(n, len as u32, status);
                c.decrypt_in_place_detached(&nonce(DOMAIN_REGION_ANSWER, n), &ad, &mut v, &tag).expect("open");
            }
            (status, v)
        }

        fn flag(&self, off: usize) -> bool {
            self.area.u32_at(off).load(SeqCst) != 0
        }
    }

    // The shape `serve` asks for, so that it can be passed by name.
    #[allow(clippy::ptr_arg)]
    fn plus_one(buf: &mut Vec<u8>) -> Result<(), String> {
        for b in buf.iter_mut() {
            *b = b.wrapping_add(1);
        }
        Ok(())
    }

    fn plus_one_of(v: &[u8]) -> Vec<u8> {
        v.iter().map(|b| b.wrapping_add(1)).collect()
    }

    fn content(seq: u64, max: usize) -> Vec<u8> {
        let len = (seq.wrapping_mul(7919) % (max as u64 + 1)) as usize;
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

    /// `calls` calls of `content` (sizes 0 to `typical`, and the largest message), every byte
    /// checked.
    fn calls_in_two_threads(p: RegionParams, calls: u64, typical: usize) {
        let (mut caller, mut callee, _fd) = pair(p);
        let max = p.max_message();
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                for _ in 0..calls {
                    assert!(callee.serve(LONG, plus_one).expect("serve"), "a request within 10 s");
                }
                callee.served()
            });
            let mut answer = Vec::new();
            for seq in [0, 1, max as u64].into_iter().chain(3..calls) {
                let req = match seq {
                    0 => Vec::new(),
                    1 => vec![0xff],
                    _ if seq == max as u64 => vec![0xab; max],
                    _ => content(seq, typical.min(max)),
                };
                caller.call(&req, &mut answer, LONG).expect("call");
                assert_eq!(answer, plus_one_of(&req), "call {seq}");
            }
            assert_eq!(caller.calls(), calls);
            assert_eq!(t.join().expect("join"), calls);
        });
    }

    #[test]
    fn round_trip_plaintext_every_size() {
        calls_in_two_threads(params(4096, false), 300, usize::MAX);
    }

    #[test]
    fn round_trip_encrypted_every_size() {
        calls_in_two_threads(params(4096, true), 300, usize::MAX);
    }

    #[test]
    fn two_threads_20k_encrypted_calls_every_byte_checked() {
        calls_in_two_threads(params(8192, true), 20_000, 700);
    }

    #[test]
    fn two_threads_20k_plaintext_calls_every_byte_checked() {
        calls_in_two_threads(params(8192, false), 20_000, 700);
    }

    #[test]
    fn largest_message_fits_exactly_and_one_more_byte_is_too_large() {
        for (encrypted, max) in [(false, 4104), (true, 4088)] {
            let p = params(4104, encrypted);
            assert_eq!(p.max_message(), max);
            let (mut caller, mut callee, _fd) = pair(p);
            let mut answer = Vec::new();
            assert!(matches!(
                caller.call(&vec![1; max + 1], &mut answer, LONG),
                Err(StreamError::TooLarge { len, max: m }) if len == max + 1 && m == max
            ));
            assert_eq!(caller.calls(), 0, "nothing was sent");
            std::thread::scope(|s| {
                s.spawn(|| assert!(callee.serve(LONG, plus_one).expect("serve")));
                caller.call(&vec![7; max], &mut answer, LONG).expect("largest call");
            });
            assert_eq!(answer, vec![8; max]);
        }
    }

    #[test]
    fn refusal_reaches_caller_and_both_ends_stay_usable() {
        for encrypted in [false, true] {
            let (mut caller, mut callee, _fd) = pair(params(4096, encrypted));
            std::thread::scope(|s| {
                s.spawn(|| {
                    assert!(callee.serve(LONG, |_| Err("valve 7 is locked".into())).expect("serve"));
                    assert!(callee.serve(LONG, plus_one).expect("serve"));
                    assert_eq!(callee.served(), 2);
                });
                let mut answer = vec![9; 100];
                match caller.call(b"open valve 7", &mut answer, LONG) {
                    Err(StreamError::Refused(why)) => assert_eq!(why, "valve 7 is locked"),
                    other => panic!("expected a refusal, got {other:?}"),
                }
                assert!(answer.is_empty());
                caller.call(b"abc", &mut answer, LONG).expect("call after refusal");
                assert_eq!(answer, b"bcd");
                assert_eq!(caller.calls(), 2);
            });
        }
    }

    #[test]
    fn answer_too_long_for_region_becomes_refusal_and_long_reason_is_cut() {
        let p = params(4096, true);
        let (mut caller, mut callee, _fd) = pair(p);
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(callee
                    .serve(LONG, |b| {
                        b.resize(5000, 1);
                        Ok(())
                    })
                    .expect("serve"));
                assert!(callee.serve(LONG, |_| Err("x".repeat(10_000))).expect("serve"));
            });
            let mut answer = Vec::new();
            match caller.call(b"big", &mut answer, LONG) {
                Err(StreamError::Refused(why)) => {
                    assert_eq!(why, "answer of 5000 bytes exceeds the region's 4080")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            match caller.call(b"why", &mut answer, LONG) {
                Err(StreamError::Refused(why)) => assert_eq!(why.len(), 4080),
                other => panic!("expected a refusal, got {other:?}"),
            }
        });
    }

    #[test]
    fn caller_sleeping_for_slow_answer_is_woken_promptly() {
        let (mut caller, mut callee, _fd) = pair(params(4096, true));
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..3 {
                    assert!(callee
                        .serve(LONG, |b| {
                            std::thread::sleep(Duration::from_millis(30));
                            plus_one(b)
                        })
                        .expect("serve"));
                }
            });
            let mut answer = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                caller.call(b"slow", &mut answer, LONG).expect("call");
                let took = t.elapsed();
                assert!(took >= Duration::from_millis(30));
                assert!(took < Duration::from_millis(30) + MAX_SLEEP / 2, "woken, not timed out: {took:?}");
            }
        });
    }

    #[test]
    fn callee_sleeping_for_request_is_woken_promptly() {
        let (mut caller, mut callee, _fd) = pair(params(4096, false));
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                let mut at = Vec::new();
                for _ in 0..3 {
                    assert!(callee.serve(LONG, plus_one).expect("serve"));
                    at.push(Instant::now());
                }
                at
            });
            let mut answer = Vec::new();
            let mut sent = Vec::new();
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(30));
                sent.push(Instant::now());
                caller.call(b"wake", &mut answer, LONG).expect("call");
            }
            for (s, a) in sent.iter().zip(t.join().expect("join")) {
                assert!(a - *s < MAX_SLEEP / 2, "woken, not timed out: {:?}", a - *s);
            }
        });
    }

    #[test]
    fn call_timing_out_poisons_caller() {
        let (mut caller, mut callee, fd) = pair(params(4096, true));
        let mut answer = Vec::new();
        let t = Instant::now();
        assert!(matches!(caller.call(b"anyone?", &mut answer, Duration::from_millis(30)), Err(StreamError::TimedOut)));
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_poisoned(caller.call(b"again", &mut answer, LONG), "call 1 timed out");
        let header = SharedArea::map(fd.as_fd(), HEADER_LEN).expect("map");
        assert_eq!(header.u32_at(OFF_CALLER_CLOSED).load(SeqCst), 1, "the callee is told");
        // The late callee still finds the request, answers it, and then learns of the close.
        assert!(callee.serve(LONG, plus_one).expect("late serve"));
        assert!(matches!(callee.serve(LONG, plus_one), Err(StreamError::Closed)));
    }

    #[test]
    fn serve_timing_out_returns_false_without_poisoning() {
        let (mut caller, mut callee, _fd) = pair(params(4096, true));
        for wait in [Duration::ZERO, Duration::from_millis(1), Duration::from_millis(30)] {
            let t = Instant::now();
            assert!(!callee.serve(wait, |_| panic!("no request")).expect("serve"));
            assert!(t.elapsed() >= wait);
        }
        assert_eq!(callee.served(), 0);
        std::thread::scope(|s| {
            s.spawn(|| assert!(callee.serve(LONG, plus_one).expect("serve")));
            let mut answer = Vec::new();
            caller.call(b"late", &mut answer, LONG).expect("call");
            assert_eq!(answer, b"mbuf");
        });
    }

    #[test]
    fn revoke_wakes_sleeping_caller_and_callee_promptly() {
        let p = params(4096, true);
        let (mut caller, _idle_callee, fd) = pair(p);
        let (_idle_caller, mut callee, fd2) = pair(p);
        let control = StreamControl::attach(fd.as_fd()).expect("control");
        let control2 = StreamControl::attach(fd2.as_fd()).expect("control");
        std::thread::scope(|s| {
            let c = s.spawn(|| {
                let mut answer = Vec::new();
                (caller.call(b"hello?", &mut answer, LONG), Instant::now())
            });
            let e = s.spawn(|| (callee.serve(LONG, plus_one), Instant::now()));
            std::thread::sleep(Duration::from_millis(50));
            let revoked_at = Instant::now();
            control.revoke();
            control2.revoke();
            let (res, at) = c.join().expect("join");
            assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
            assert!(at - revoked_at < Duration::from_millis(50), "caller woke {:?} after revoke", at - revoked_at);
            let (res, at) = e.join().expect("join");
            assert!(matches!(res, Err(StreamError::Revoked)), "{res:?}");
            assert!(at - revoked_at < Duration::from_millis(50), "callee woke {:?} after revoke", at - revoked_at);
        });
        let mut answer = Vec::new();
        assert!(matches!(caller.call(b"x", &mut answer, LONG), Err(StreamError::Revoked)));
        assert!(matches!(callee.serve(LONG, plus_one), Err(StreamError::Revoked)));
    }

    #[test]
    fn close_by_callee_ends_waiting_call_and_later_calls() {
        let (mut caller, mut callee, _fd) = pair(params(4096, false));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let mut answer = Vec::new();
                let t = Instant::now();
                (caller.call(b"x", &mut answer, LONG), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(30));
            callee.close();
            let (res, took) = t.join().expect("join");
            assert!(matches!(res, Err(StreamError::Closed)), "{res:?}");
            assert!(took < Duration::from_millis(30) + MAX_SLEEP / 2, "{took:?}");
        });
        let mut answer = Vec::new();
        assert!(matches!(caller.call(b"x", &mut answer, LONG), Err(StreamError::Closed)));
        assert!(matches!(callee.serve(LONG, plus_one), Err(StreamError::Closed)));
    }

    #[test]
    fn close_by_caller_ends_waiting_serve_and_drop_closes() {
        let (mut caller, mut callee, _fd) = pair(params(4096, true));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let t = Instant::now();
                (callee.serve(LONG, plus_one), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(30));
            caller.close();
            let (res, took) = t.join().expect("join");
            assert!(matches!(res, Err(StreamError::Closed)), "{res:?}");
            assert!(took < Duration::from_millis(30) + MAX_SLEEP / 2, "{took:?}");
        });
        let mut answer = Vec::new();
        assert!(matches!(caller.call(b"x", &mut answer, LONG), Err(StreamError::Closed)));
        let (caller, mut callee, _fd) = pair(params(4096, true));
        drop(caller);
        assert!(matches!(callee.serve(LONG, plus_one), Err(StreamError::Closed)));
    }

    // ------------------------------------------------------------ hostile callee

    /// Runs `callee` (the test's hand-written peer) in a thread while the caller makes one call.
    fn call_against(
        caller: &mut RegionCaller,
        peer: &Peer,
        request: &[u8],
        callee: impl FnOnce(&Peer) + Send,
    ) -> (Result<(), StreamError>, Vec<u8>) {
        std::thread::scope(|s| {
            s.spawn(|| callee(peer));
            let mut answer = Vec::new();
            let res = caller.call(request, &mut answer, LONG);
            (res, answer)
        })
    }

    #[test]
    fn hand_written_callee_is_understood() {
        for encrypted in [false, true] {
            let (mut caller, peer) = caller_and_peer(params(4096, encrypted));
            let (res, answer) = call_against(&mut caller, &peer, b"ping", |p| {
                p.wait_for_request(1);
                p.answer(1, STATUS_ANSWER, b"pong");
            });
            res.expect("call");
            assert_eq!(answer, b"pong");
            let (res, _) = call_against(&mut caller, &peer, b"ping", |p| {
                p.wait_for_request(2);
                p.answer(2, STATUS_REFUSED, b"no");
            });
            assert!(matches!(res, Err(StreamError::Refused(why)) if why == "no"));
        }
    }

    #[test]
    fn callee_answering_twice_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let (res, _) = call_against(&mut caller, &peer, b"one", |p| {
            p.wait_for_request(1);
            p.answer(1, STATUS_ANSWER, b"1");
        });
        res.expect("call 1");
        // A second answer, to a call not made yet.
        peer.answer(2, STATUS_ANSWER, b"2");
        let mut answer = Vec::new();
        assert_poisoned(caller.call(b"two", &mut answer, LONG), "published answer 2 before call 2 was made");
        assert_poisoned(caller.call(b"three", &mut answer, LONG), "before call 2");
        assert!(peer.flag(OFF_CALLER_CLOSED), "the callee is told");
    }

    #[test]
    fn answer_with_wrong_sequence_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, false));
        let (res, _) = call_against(&mut caller, &peer, b"one", |p| {
            p.wait_for_request(1);
            p.answer(7, STATUS_ANSWER, b"7");
        });
        assert_poisoned(res, "published answer 7 while call 1 was outstanding");
    }

    #[test]
    fn garbage_ciphertext_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let (res, answer) = call_against(&mut caller, &peer, b"one", |p| {
            p.wait_for_request(1);
            p.publish_answer(1, STATUS_ANSWER, &[0x5a; 48], 48);
        });
        assert_poisoned(res, "answer 1 failed authentication");
        assert!(answer.is_empty());
    }

    #[test]
    fn replayed_answer_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let first = peer.seal(DOMAIN_REGION_ANSWER, 1, STATUS_ANSWER, b"valve open");
        let (res, _) = call_against(&mut caller, &peer, b"open", |p| {
            p.wait_for_request(1);
            p.publish_answer(1, STATUS_ANSWER, &first, first.len() as u32);
        });
        res.expect("call 1");
        let (res, _) = call_against(&mut caller, &peer, b"open again", |p| {
            p.wait_for_request(2);
            p.publish_answer(2, STATUS_ANSWER, &first, first.len() as u32);
        });
        assert_poisoned(res, "answer 2 failed authentication");
    }

    #[test]
    fn request_moved_into_answer_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let (res, _) = call_against(&mut caller, &peer, b"echo me", |p| {
            p.wait_for_request(1);
            // The request's own bytes (valid under the request nonce) as the answer.
            let len = p.area.u32_at(OFF_REQ_LEN).load(SeqCst);
            p.area.u64_at(OFF_ANS_SEQ).store(0, SeqCst);
            p.area.u32_at(OFF_ANS_LEN).store(len, SeqCst);
            p.area.u64_at(OFF_ANS_SEQ).store(1, SeqCst);
        });
        assert_poisoned(res, "answer 1 failed authentication");
    }

    #[test]
    fn answer_turned_into_refusal_poisons_encrypted_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let (res, _) = call_against(&mut caller, &peer, b"q", |p| {
            p.wait_for_request(1);
            let stored = p.seal(DOMAIN_REGION_ANSWER, 1, STATUS_ANSWER, b"fine");
            p.publish_answer(1, STATUS_REFUSED, &stored, stored.len() as u32);
        });
        assert_poisoned(res, "failed authentication");
    }

    #[test]
    fn unknown_status_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, false));
        let (res, _) = call_against(&mut caller, &peer, b"q", |p| {
            p.wait_for_request(1);
            p.publish_answer(1, 2, b"??", 2);
        });
        assert_poisoned(res, "status 2");
    }

    #[test]
    fn huge_or_short_answer_length_poisons_caller() {
        for (encrypted, len, needle) in [
            (false, u32::MAX, "more than the 4096-byte region"),
            (true, 4097, "more than the 4096-byte region"),
            (true, 15, "shorter than its tag"),
        ] {
            let (mut caller, peer) = caller_and_peer(params(4096, encrypted));
            let (res, answer) = call_against(&mut caller, &peer, b"q", |p| {
                p.wait_for_request(1);
                p.publish_answer(1, STATUS_ANSWER, &[], len);
            });
            assert_poisoned(res, needle);
            assert!(answer.is_empty());
        }
    }

    #[test]
    fn answer_rewritten_while_caller_copies_is_either_intact_or_poisons() {
        let p = params(4096, true);
        let (mut caller, peer) = caller_and_peer(p);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for n in 1.. {
                    while peer.area.u64_at(OFF_REQ_SEQ).load(SeqCst) != n {
                        if stop.load(SeqCst) {
                            return;
                        }
                        std::hint::spin_loop();
                    }
                    let msg = vec![n as u8; 1000];
                    peer.answer(n, STATUS_ANSWER, &msg);
                    // Flip a byte back and forth while the caller copies (no wake-up needed: it spins).
                    let mut b = [0u8; 1];
                    for _ in 0..2000 {
                        peer.area.copy_out(DATA + 500, &mut b).expect("read");
                        peer.area.copy_in(DATA + 500, &[b[0] ^ 0x80]).expect("flip");
                    }
                }
            });
            let mut answer = Vec::new();
            for n in 1..=200u64 {
                match caller.call(b"q", &mut answer, LONG) {
                    Ok(()) => {
                        assert_eq!(answer, vec![n as u8; 1000], "an accepted answer is the one sealed")
                    }
                    Err(e) => {
                        assert_poisoned(Err::<(), _>(e), "failed authentication");
                        break;
                    }
                }
            }
            stop.store(true, SeqCst);
        });
    }

    #[test]
    fn plaintext_answer_length_rewritten_during_copy_never_panics() {
        let (mut caller, peer) = caller_and_peer(params(4096, false));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for n in 1.. {
                    while peer.area.u64_at(OFF_REQ_SEQ).load(SeqCst) != n {
                        if stop.load(SeqCst) {
                            return;
                        }
                        std::hint::spin_loop();
                    }
                    peer.answer(n, STATUS_ANSWER, &[1u8; 64]);
                    for i in 0..2000u32 {
                        let len = if i % 2 == 0 { u32::MAX } else { 64 };
                        peer.area.u32_at(OFF_ANS_LEN).store(len, SeqCst);
                    }
                    peer.area.u32_at(OFF_ANS_LEN).store(64, SeqCst);
                }
            });
            let mut answer = Vec::new();
            for _ in 0..200 {
                match caller.call(b"q", &mut answer, LONG) {
                    Ok(()) => assert_eq!(answer, vec![1u8; 64]),
                    Err(e) => {
                        assert_poisoned(Err::<(), _>(e), "more than the 4096-byte region");
                        break;
                    }
                }
            }
            stop.store(true, SeqCst);
        });
    }

    #[test]
    fn callee_waking_caller_without_answer_poisons_caller() {
        let (mut caller, peer) = caller_and_peer(params(4096, false));
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(SeqCst) {
                    stream::bump_and_wake(&peer.area, OFF_ANSWER);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let t = Instant::now();
            let mut answer = Vec::new();
            let res = caller.call(b"q", &mut answer, LONG);
            done.store(true, SeqCst);
            assert_poisoned(res, "without answering");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn callee_that_never_signals_still_has_its_answer_found() {
        let (mut caller, peer) = caller_and_peer(params(4096, true));
        let t = Instant::now();
        let (res, answer) = call_against(&mut caller, &peer, b"q", |p| {
            p.wait_for_request(1);
            std::thread::sleep(Duration::from_millis(20));
            let stored = p.seal(DOMAIN_REGION_ANSWER, 1, STATUS_ANSWER, b"quiet");
            p.publish_answer(1, STATUS_ANSWER, &stored, stored.len() as u32); // and no wake-up
        });
        res.expect("call");
        assert_eq!(answer, b"quiet");
        assert!(t.elapsed() < Duration::from_millis(20) + MAX_SLEEP * 2, "{:?}", t.elapsed());
    }

    // ------------------------------------------------------------ hostile caller

    #[test]
    fn request_rewritten_after_copy_changes_nothing() {
        for encrypted in [false, true] {
            let (mut callee, peer) = callee_and_peer(params(4096, encrypted));
            peer.request(1, b"transfer 10 EUR");
            let served = callee.serve(LONG, |buf| {
                // The caller rewrites the request and its length while the callee checks it.
                peer.area.copy_in(DATA, b"transfer 99 EUR and more").expect("rewrite");
                peer.area.u32_at(OFF_REQ_LEN).store(4000, SeqCst);
                assert_eq!(buf.as_slice(), b"transfer 10 EUR", "only the private copy is used");
                plus_one(buf)
            });
            assert!(served.expect("serve"));
            peer.wait_for_answer(1);
            assert_eq!(peer.read_answer(1), (STATUS_ANSWER, plus_one_of(b"transfer 10 EUR")));
        }
    }

    #[test]
    fn request_with_wrong_sequence_poisons_callee() {
        let (mut callee, peer) = callee_and_peer(params(4096, false));
        peer.publish_request(5, b"x", 1);
        assert_poisoned(callee.serve(LONG, plus_one), "caller published request 5, expected 1");
        assert_poisoned(callee.serve(LONG, plus_one), "request 5");
        assert!(peer.flag(OFF_CALLEE_CLOSED), "the caller is told");
    }

    #[test]
    fn request_sequence_going_backwards_poisons_callee() {
        let (mut callee, peer) = callee_and_peer(params(4096, true));
        peer.request(1, b"a");
        assert!(callee.serve(LONG, plus_one).expect("serve"));
        peer.area.u64_at(OFF_REQ_SEQ).store(0, SeqCst);
        assert_poisoned(callee.serve(LONG, plus_one), "caller published request 0, expected 2");
    }

    #[test]
    fn huge_or_short_request_length_poisons_callee() {
        for (encrypted, len, needle) in [
            (false, u32::MAX, "more than the 4096-byte region"),
            (true, 4097, "more than the 4096-byte region"),
            (true, 3, "shorter than its tag"),
        ] {
            let (mut callee, peer) = callee_and_peer(params(4096, encrypted));
            peer.publish_request(1, &[], len);
            assert_poisoned(callee.serve(LONG, |_| panic!("no call")), needle);
        }
    }

    #[test]
    fn garbage_or_replayed_request_poisons_callee() {
        let (mut callee, peer) = callee_and_peer(params(4096, true));
        peer.publish_request(1, &[0x33; 40], 40);
        assert_poisoned(callee.serve(LONG, |_| panic!("no call")), "request 1 failed authentication");

        let (mut callee, peer) = callee_and_peer(params(4096, true));
        let first = peer.seal(DOMAIN_REGION_REQUEST, 1, STATUS_ANSWER, b"open valve");
        peer.publish_request(1, &first, first.len() as u32);
        assert!(callee.serve(LONG, plus_one).expect("serve"));
        peer.publish_request(2, &first, first.len() as u32);
        assert_poisoned(callee.serve(LONG, |_| panic!("no call")), "request 2 failed authentication");
    }

    #[test]
    fn caller_waking_callee_without_request_poisons_callee() {
        let (mut callee, peer) = callee_and_peer(params(4096, false));
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(SeqCst) {
                    stream::bump_and_wake(&peer.area, OFF_REQUEST);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let t = Instant::now();
            let res = callee.serve(LONG, plus_one);
            done.store(true, SeqCst);
            assert_poisoned(res, "without a request");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn caller_that_never_calls_costs_only_timeouts() {
        let (mut callee, _peer) = callee_and_peer(params(4096, true));
        for _ in 0..3 {
            assert!(!callee.serve(Duration::from_millis(5), |_| panic!("no call")).expect("serve"));
        }
        assert!(callee.poisoned.is_none());
    }

    // ------------------------------------------------------------ attach

    fn attach_err(fd: OwnedFd, p: RegionParams) -> String {
        match RegionCallee::attach(fd, p, key_for(p)) {
            Err(StreamError::BadArea(why)) | Err(StreamError::BadParams(why)) => why,
            other => panic!("attach should fail: {other:?}"),
        }
    }

    #[test]
    fn attach_refuses_unsealed_memfd() {
        let p = params(4096, false);
        let fd = sys::memfd_create(c"test", false).expect("memfd");
        sys::ftruncate(fd.as_fd(), p.area_len() as u64).expect("truncate");
        assert!(attach_err(fd, p).contains("not sealed against resizing"));
    }

    #[test]
    fn attach_refuses_header_disagreeing_with_params() {
        let fd = create_area(&params(4096, true)).expect("area");
        let why = attach_err(fd, params(4096, false));
        assert!(why.contains("header says"), "{why}");
        let fd = create_area(&params(4096, true)).expect("area");
        let why = attach_err(fd, params(8192, true));
        assert!(why.contains("holds 8192 bytes, the parameters say 12288"), "{why}");
        let fd = create_area(&params(4096, false)).expect("area");
        sys::pwrite_all(fd.as_fd(), &4104u32.to_le_bytes(), OFF_REGION as u64).expect("write");
        let why = attach_err(fd, params(4096, false));
        assert!(why.contains("header says"), "{why}");
    }

    #[test]
    fn attach_refuses_a_stream_area() {
        let sp = stream::StreamParams { ring_bytes: 4096, max_record: 1024, encrypted: false };
        let fd = stream::create_area(&sp).expect("stream area");
        assert!(attach_err(fd, params(4096, false)).contains("wrong magic"));
    }

    #[test]
    fn attach_refuses_used_area_bad_params_and_key_mismatch() {
        let p = params(4096, false);
        let (mut caller, mut callee, fd) = pair(p);
        std::thread::scope(|s| {
            s.spawn(|| assert!(callee.serve(LONG, plus_one).expect("serve")));
            caller.call(b"x", &mut Vec::new(), LONG).expect("call");
        });
        assert!(matches!(
            RegionCaller::attach(fd.try_clone().expect("dup"), p, None),
            Err(StreamError::BadArea(why)) if why.contains("already used")
        ));
        assert!(attach_err(fd.try_clone().expect("dup"), p).contains("already answered"));
        assert!(matches!(
            RegionCaller::attach(fd.try_clone().expect("dup"), p, Some(StreamKey::generate().expect("key"))),
            Err(StreamError::BadParams(_))
        ));
        assert!(matches!(RegionCallee::attach(fd, params(4096, true), None), Err(StreamError::BadParams(_))));
        let fd = create_area(&p).expect("area");
        assert!(attach_err(fd, params(4100, false)).contains("multiple of 8"));
    }

    // ------------------------------------------------------------ types

    #[test]
    fn params_validate_sizes() {
        for good in [4096, 4104, 12_000, 64 << 20] {
            assert!(params(good, true).validate().is_ok(), "{good}");
        }
        for bad in [0, 8, 4088, 4095, 4100, (64 << 20) + 8, u32::MAX] {
            assert!(matches!(params(bad, true).validate(), Err(StreamError::BadParams(_))), "{bad}");
        }
        assert_eq!(params(4096, true).area_len(), 8192);
        assert_eq!(params(4096, true).max_message(), 4080);
        assert_eq!(params(4096, false).max_message(), 4096);
        assert!(create_area(&params(4100, false)).is_err());
    }

    #[test]
    fn created_area_is_sealed_against_resizing_and_resealing() {
        let fd = create_area(&params(4096, false)).expect("area");
        let seals = sys::get_seals(fd.as_fd()).expect("seals");
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        assert!(sys::ftruncate(fd.as_fd(), 4096).is_err());
    }

    #[test]
    fn region_ends_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<RegionCaller>();
        assert_send::<RegionCallee>();
    }
}
