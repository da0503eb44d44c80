//! The secure channel: one authenticated, encrypted, replay-proof frame per `SOCK_SEQPACKET`
//! datagram, with descriptors and bulk payloads attached.
//!
//! A channel accepts only the exact next sequence number of its receive direction, so replayed,
//! reordered and dropped frames are all detected. The first failed check poisons the channel:
//! every later call returns [`ChannelError::Poisoned`] naming the first failure, because after
//! a failure the two sides can no longer agree on what the peer saw. This module never logs key
//! material or payload bytes; spans carry only sequence numbers and sizes.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bulk::{self, Bulk, BulkMode, BulkWriter, Outgoing};
use crate::crypto::{Direction, Key};
use crate::error::ChannelError;
use crate::frame::{
    BulkDescriptor, Header, Kind, BULK_DESCRIPTOR_LEN, FLAG_BULK_ENCRYPTED, FLAG_BULK_INLINE, FLAG_BULK_MEMFD,
    HEADER_LEN, TAG_LEN,
};
use crate::sys;

/// The protocol version carried in `Hello`. Bump on any incompatible change of message types
/// or of the framing. 2: a frame with descriptors follows a descriptor notice
/// (`sys::DESCRIPTOR_NOTICE`), which a version 1 peer would take for a malformed frame; the
/// `Hello` exchange itself is unchanged, so mixed versions fail there, by name.
pub const PROTOCOL_VERSION: u16 = 2;

/// Bounds on everything a peer controls. Both sides of a channel should use the same values.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest datagram, header and tag included.
    pub max_frame: usize,
    /// Most descriptors on one frame (a bulk memfd counts).
    pub max_attachments: usize,
    /// Largest bulk payload accepted.
    pub max_bulk: u64,
    /// Bulk payloads below this size travel inline in the frame.
    pub inline_threshold: usize,
    /// Frames pulled from the socket per `recvmmsg`.
    pub recv_batch: usize,
    /// Map received sealed memfds (zero-copy reads). A broker that only passes payloads on
    /// turns this off: payloads are still verified (seals, size) but never mapped, so a
    /// flood of large payloads costs it no memory.
    pub map_bulk: bool,
    /// Largest bulk payload this end maps or decrypts (all of them with `map_bulk`, only
    /// encrypted ones without): what a received payload can cost this process in memory.
    pub max_mapped_bulk: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 64 * 1024,
            max_attachments: 8,
            max_bulk: 1 << 30,
            inline_threshold: bulk::DEFAULT_INLINE_THRESHOLD,
            recv_batch: 16,
            map_bulk: true,
            max_mapped_bulk: 1 << 30,
        }
    }
}

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Supervisor,
    Worker,
}

/// The first frame each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub role: Role,
    /// The speaker's name (a worker's configured name, or `airlockd`).
    pub name: String,
}

impl Hello {
    pub fn new(role: Role, name: impl Into<String>) -> Hello {
        Hello { protocol: PROTOCOL_VERSION, role, name: name.into() }
    }
}

/// The keys of one end of a channel: what it sends under and what it receives under.
#[derive(Debug, Clone)]
pub struct ChannelKeys {
    pub send: Key,
    pub recv: Key,
    /// Frames per key epoch before both directions ratchet forward.
    pub rekey_interval: u64,
}

impl ChannelKeys {
    /// Fresh keys for both ends; the second is the mirror of the first.
    pub fn generate(rekey_interval: u64) -> std::io::Result<(ChannelKeys, ChannelKeys)> {
        let a_to_b = Key::generate()?;
        let b_to_a = Key::generate()?;
        Ok((
            ChannelKeys { send: a_to_b.clone(), recv: b_to_a.clone(), rekey_interval },
            ChannelKeys { send: b_to_a, recv: a_to_b, rekey_interval },
        ))
    }
}

/// Default number of frames per key epoch.
pub const DEFAULT_REKEY_INTERVAL: u64 = 1 << 20;

/// A received message with what came attached.
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    /// Descriptors passed with the message (the bulk memfd, if any, is not among them).
    pub fds: Vec<OwnedFd>,
    pub bulk: Option<Bulk>,
    /// A memfd bulk payload the receiver declined ([`Channel::try_recv_admitting`]): never
    /// verified, mapped or decrypted.
    pub declined: Option<BulkAnnounce>,
    /// The declined payload's descriptor, as it came. Whoever closes a memfd's last reference
    /// pays the kernel for freeing its pages: a broker hands it back to its sender with the
    /// refusal where it can, and closes it otherwise.
    pub declined_fd: Option<OwnedFd>,
}

/// What an authenticated frame says of its memfd bulk payload, known before any byte of the
/// payload is read: enough for a receiver to decide whether to take it in at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkAnnounce {
    /// The payload's length, as the frame states it.
    pub len: u64,
    /// Whether it is encrypted under the channel key (taking it in costs a copy and a
    /// decryption of `len` bytes).
    pub encrypted: bool,
    /// Descriptors attached besides the payload's memfd.
    pub other_fds: usize,
}

/// A receiver's decision on a memfd bulk payload, given the message it came with.
type Admit<'a, T> = Option<&'a mut dyn FnMut(&T, &BulkAnnounce) -> bool>;

#[derive(Debug)]
struct Pending {
    slot: usize,
    info: sys::Received,
}

/// One end of a secure channel.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
    tx: Direction,
    rx: Direction,
    limits: Limits,
    poisoned: Option<String>,
    established: bool,
    slots: Vec<sys::RecvSlot>,
    pending: VecDeque<Pending>,
    out_bufs: Vec<Vec<u8>>,
    /// True when this end sent a frame since its last read: request/reply traffic, read one
    /// frame at a time. False while only reading: the peer streams, read in batches.
    sent_since_read: bool,
    /// The last read from the socket found less than it could take (a short batch, or one
    /// request/reply frame): the peer probably has nothing more queued.
    read_short: bool,
    /// Decrypted plaintext of the last `Batch` frame and the entries not yet returned.
    batch_buf: Vec<u8>,
    batch: VecDeque<(usize, usize)>,
    /// With non-blocking sends: sealed frames the socket had no room for yet, in order, with
    /// the descriptors they carry.
    nonblocking_sends: bool,
    out_queue: VecDeque<Queued>,
    out_queued_bytes: usize,
    /// The peer's last datagram was a descriptor notice: the next one carries descriptors and
    /// is read with `recvmsg`; every other one with `recv(2)` (`sys::DESCRIPTOR_NOTICE`).
    fds_announced: bool,
}

/// A sealed frame waiting for room in the socket, with duplicates of its descriptors.
#[derive(Debug)]
struct Queued {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Its descriptor notice has gone out already (only the frame is left to send).
    noticed: bool,
}

/// Most descriptor notices one non-blocking read takes before it returns to the caller's
/// event loop (a peer that sends nothing else is only wasting its own turn).
const MAX_NOTICES_PER_READ: usize = 16;

impl Channel {
    /// Wraps a connected `SOCK_SEQPACKET` socket with this end's keys. No frame is exchanged
    /// until [`Channel::handshake`].
    pub fn new(sock: OwnedFd, keys: ChannelKeys, limits: Limits) -> Channel {
        let _ = sys::set_socket_buffers(sock.as_fd(), limits.max_frame * 4);
        Channel {
            sock,
            tx: Direction::new(keys.send, keys.rekey_interval),
            rx: Direction::new(keys.recv, keys.rekey_interval),
            limits,
            poisoned: None,
            established: false,
            slots: Vec::new(),
            pending: VecDeque::new(),
            out_bufs: Vec::new(),
            sent_since_read: true,
            read_short: false,
            batch_buf: Vec::new(),
            batch: VecDeque::new(),
            nonblocking_sends: false,
            out_queue: VecDeque::new(),
            out_queued_bytes: 0,
            fds_announced: false,
        }
    }

    /// Two connected ends with fresh keys (one process; tests and in-process use).
    pub fn pair(limits: Limits, rekey_interval: u64) -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = sys::seqpacket_pair().map_err(|e| ChannelError::io("socketpair", e))?;
        let (ka, kb) = ChannelKeys::generate(rekey_interval).map_err(|e| ChannelError::io("getrandom", e))?;
        Ok((Channel::new(a, ka, limits.clone()), Channel::new(b, kb, limits)))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The socket, for `poll`/`epoll` registration. Never read or write it directly.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Bounds how long a blocking receive (`recv`, `handshake`) waits; `None` waits forever.
    /// A receive that times out fails (and so poisons the channel): use it for steps that
    /// must complete, such as a spawn's handshake.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        sys::set_recv_timeout(self.sock.as_fd(), timeout).map_err(|e| ChannelError::io("setsockopt SO_RCVTIMEO", e))
    }

    /// Makes sends never block: a frame the socket has no room for is queued (already sealed,
    /// in order) and goes out with [`Channel::flush_queued`] once the socket is writable. For a
    /// supervisor whose event loop must not wait on any one peer; watch
    /// [`Channel::queued_bytes`] to bound what a peer that stops reading can cost.
    pub fn set_nonblocking_sends(&mut self, on: bool) {
        self.nonblocking_sends = on;
    }

    /// Bytes of sealed frames waiting for room in the socket.
    pub fn queued_bytes(&self) -> usize {
        self.out_queued_bytes
    }

    /// True when queued frames wait for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        !self.out_queue.is_empty()
    }

    /// Sends queued frames until the socket is full again (non-blocking).
    pub fn flush_queued(&mut self) -> Result<(), ChannelError> {
        self.check_poison()?;
        while let Some(q) = self.out_queue.front_mut() {
            let raw: Vec<RawFd> = q.fds.iter().map(|f| f.as_raw_fd()).collect();
            match sys::send_announced_nonblocking(self.sock.as_fd(), &q.bytes, &raw, &mut q.noticed) {
                Ok(()) => {
                    self.out_queued_bytes -= q.bytes.len();
                    self.out_queue.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return self.poison(Err(ChannelError::io("sendmsg", e))),
            }
        }
        Ok(())
    }

    /// Sends one sealed frame now (after its descriptor notice, if it carries descriptors), or
    /// queues it (non-blocking mode) with duplicates of its descriptors (the caller's may close
    /// as soon as we return).
    fn transmit(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if !self.nonblocking_sends {
            return sys::send_announced(self.sock.as_fd(), bytes, &raw).map_err(|e| ChannelError::io("sendmsg", e));
        }
        let mut noticed = false;
        if self.out_queue.is_empty() {
            match sys::send_announced_nonblocking(self.sock.as_fd(), bytes, &raw, &mut noticed) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ChannelError::io("sendmsg", e)),
            }
        }
        let owned = fds
            .iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ChannelError::io("dup queued descriptor", e))?;
        self.out_queued_bytes += bytes.len();
        self.out_queue.push_back(Queued { bytes: bytes.to_vec(), fds: owned, noticed });
        Ok(())
    }

    /// Whether an earlier failure has poisoned the channel, and why.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// True when frames already read from the socket are waiting to be decoded, so a caller
    /// that polls the socket must call `try_recv` first.
    pub fn has_buffered(&self) -> bool {
        !self.pending.is_empty() || !self.batch.is_empty()
    }

    /// True when nothing is buffered and the last read from the socket took less than it could
    /// (a short batch, or the one frame of a request/reply exchange), so the peer probably has
    /// nothing more queued. An event loop with level-triggered readiness can then wait for the
    /// socket instead of probing it with another `try_recv` that would find it empty.
    pub fn drained(&self) -> bool {
        self.read_short && !self.has_buffered()
    }

    fn check_poison(&self) -> Result<(), ChannelError> {
        match &self.poisoned {
            Some(reason) => Err(ChannelError::Poisoned { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, r: Result<T, ChannelError>) -> Result<T, ChannelError> {
        if let Err(e) = &r {
            if self.poisoned.is_none() && !matches!(e, ChannelError::Poisoned { .. }) {
                tracing::warn!(error = %e, "channel poisoned");
                self.poisoned = Some(e.to_string());
                // Drop (and so close) every descriptor already read but not yet decoded.
                self.pending.clear();
                self.batch.clear();
            }
        }
        r
    }

    /// Exchanges `Hello` frames. Returns the peer's `Hello` after checking its version.
    pub fn handshake(&mut self, ours: &Hello) -> Result<Hello, ChannelError> {
        self.check_poison()?;
        if self.established {
            return Err(ChannelError::UnexpectedKind { expected: "no second handshake", got: Kind::Hello as u8 });
        }
        let sent = self.send_frame(Kind::Hello, ours, &[], None);
        self.poison(sent)?;
        let r = self.recv_kind::<Hello>(Kind::Hello, None);
        let theirs = self.poison(r)?.msg;
        if theirs.protocol != PROTOCOL_VERSION {
            let e = ChannelError::ProtocolVersion { ours: PROTOCOL_VERSION, theirs: theirs.protocol };
            return self.poison(Err(e));
        }
        self.established = true;
        Ok(theirs)
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        self.send_with(msg, &[])
    }

    /// Sends one message with descriptors attached.
    pub fn send_with<T: Serialize>(&mut self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        let r = self.send_frame(Kind::Message, msg, fds, None);
        self.poison_send(r)
    }

    /// Sends one message with a bulk payload. The writer is sealed here; the receiver gets a
    /// [`Bulk`] that dereferences to the bytes.
    pub fn send_bulk<T: Serialize>(
        &mut self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        bulk: BulkWriter,
        mode: BulkMode,
    ) -> Result<(), ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        if bulk.len() as u64 > self.limits.max_bulk {
            return Err(crate::BulkError::TooLarge { len: bulk.len() as u64, limit: self.limits.max_bulk }.into());
        }
        let seq = self.tx.next_seq;
        self.tx.ratchet_for(seq);
        let encrypt = (mode == BulkMode::SealedEncrypted).then_some((&self.tx, seq));
        let out = bulk.finish(encrypt)?;
        let r = self.send_frame(Kind::Message, msg, fds, Some((out, mode)));
        if mode == BulkMode::SealedEncrypted && r.is_err() {
            // The bulk nonce of this sequence number is spent: never let it be used again.
            return self.poison(r);
        }
        self.poison_send(r)
    }

    /// Sends a verified sealed memfd received earlier (a broker forwarding a payload without
    /// copying it). The descriptor is re-verified before it leaves.
    pub fn forward_sealed<T: Serialize>(&mut self, msg: &T, memfd: OwnedFd) -> Result<(), ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        let (_, len) = sys::file_mode_and_size(memfd.as_fd()).map_err(|e| ChannelError::io("fstat bulk memfd", e))?;
        bulk::verify_sealed_memfd(memfd.as_fd(), len, self.limits.max_bulk)?;
        let out = Outgoing::Memfd { fd: memfd, len, tag: [0; TAG_LEN] };
        let r = self.send_frame(Kind::Message, msg, &[], Some((out, BulkMode::Sealed)));
        self.poison_send(r)
    }

    /// Sends many messages with as few syscalls and frames as possible: messages are packed
    /// into `Batch` frames of up to `max_frame` bytes (each frame authenticated and sequenced
    /// like any other), and the frames go out with one `sendmmsg`. The receiver's `recv`
    /// returns them one by one, in order. Nothing is sent if any message fails to encode.
    pub fn send_batch<T: Serialize>(&mut self, msgs: &[T]) -> Result<(), ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        if msgs.is_empty() {
            return Ok(());
        }
        let mut frames = std::mem::take(&mut self.out_bufs);
        let packed = self.pack_batch(msgs, &mut frames);
        let n = match packed {
            Ok(n) => n,
            Err(e) => {
                self.out_bufs = frames;
                return Err(e);
            }
        };
        for buf in frames[..n].iter_mut() {
            self.seal_into(buf, Kind::Batch, 0, 0);
        }
        let r = if self.nonblocking_sends {
            let mut r = Ok(());
            for b in &frames[..n] {
                if let Err(e) = self.transmit(b, &[]) {
                    r = Err(e);
                    break;
                }
            }
            r
        } else {
            let out: Vec<sys::OutDatagram<'_>> =
                frames[..n].iter().map(|b| sys::OutDatagram { parts: [b.as_slice(), &[]], fds: &[] }).collect();
            sys::send_datagrams(self.sock.as_fd(), &out).map_err(|e| ChannelError::io("sendmmsg", e))
        };
        self.out_bufs = frames;
        self.poison(r)
    }

    /// Encodes `msgs` into unsealed batch plaintexts in `frames` (header space reserved);
    /// returns how many frames were used. Consumes no sequence number.
    fn pack_batch<T: Serialize>(&self, msgs: &[T], frames: &mut Vec<Vec<u8>>) -> Result<usize, ChannelError> {
        let cap = self.limits.max_frame - TAG_LEN;
        let mut used = 0usize;
        let start_frame = |frames: &mut Vec<Vec<u8>>, used: &mut usize| {
            if frames.len() <= *used {
                frames.push(Vec::new());
            }
            let f = &mut frames[*used];
            f.clear();
            f.resize(HEADER_LEN, 0);
            *used += 1;
        };
        start_frame(frames, &mut used);
        for m in msgs {
            let mut cur = std::mem::take(&mut frames[used - 1]);
            let at = cur.len();
            cur.extend_from_slice(&[0; 4]);
            cur = postcard::to_extend(m, cur).map_err(ChannelError::Encode)?;
            let entry_len = cur.len() - at - 4;
            if cur.len() > cap {
                if at == HEADER_LEN {
                    return Err(ChannelError::MessageTooLarge {
                        len: HEADER_LEN + 4 + entry_len + TAG_LEN,
                        limit: self.limits.max_frame,
                    });
                }
                // Move this entry into a fresh frame.
                let entry = cur.split_off(at);
                frames[used - 1] = cur;
                start_frame(frames, &mut used);
                cur = std::mem::take(&mut frames[used - 1]);
                cur.extend_from_slice(&entry);
                if cur.len() > cap {
                    return Err(ChannelError::MessageTooLarge {
                        len: cur.len() + TAG_LEN,
                        limit: self.limits.max_frame,
                    });
                }
                let at = HEADER_LEN;
                cur[at..at + 4].copy_from_slice(&(entry_len as u32).to_le_bytes());
            } else {
                cur[at..at + 4].copy_from_slice(&(entry_len as u32).to_le_bytes());
            }
            frames[used - 1] = cur;
        }
        Ok(used)
    }

    fn poison_send(&mut self, r: Result<(), ChannelError>) -> Result<(), ChannelError> {
        match r {
            // Encoding, size and descriptor-count errors happen before a sequence number is
            // used: the channel is still consistent.
            Err(
                e @ (ChannelError::Encode(_)
                | ChannelError::MessageTooLarge { .. }
                | ChannelError::TooManyAttachments { .. }
                | ChannelError::Bulk(_)),
            ) => Err(e),
            other => self.poison(other),
        }
    }

    fn require_established(&self) -> Result<(), ChannelError> {
        if self.established {
            Ok(())
        } else {
            Err(ChannelError::UnexpectedKind { expected: "Hello (handshake first)", got: Kind::Message as u8 })
        }
    }

    /// Encodes and encrypts one frame into `buf` (consuming a sequence number).
    fn build_frame<T: Serialize>(
        &mut self,
        buf: &mut Vec<u8>,
        kind: Kind,
        msg: &T,
        attachments: usize,
        bulk: Option<(&Outgoing, BulkMode)>,
    ) -> Result<(), ChannelError> {
        buf.clear();
        buf.resize(HEADER_LEN, 0);
        let mut flags = 0u16;
        match bulk {
            None => {}
            Some((Outgoing::Inline(bytes), _)) => {
                flags |= FLAG_BULK_INLINE;
                let d = BulkDescriptor { len: bytes.len() as u64, tag: [0; TAG_LEN] };
                buf.extend_from_slice(&d.encode());
                buf.extend_from_slice(bytes);
            }
            Some((Outgoing::Memfd { len, tag, .. }, mode)) => {
                flags |= FLAG_BULK_MEMFD;
                if mode == BulkMode::SealedEncrypted {
                    flags |= FLAG_BULK_ENCRYPTED;
                }
                buf.extend_from_slice(&BulkDescriptor { len: *len, tag: *tag }.encode());
            }
        }
        let mut buf_taken = std::mem::take(buf);
        let enc = postcard::to_extend(msg, buf_taken);
        buf_taken = match enc {
            Ok(v) => v,
            Err(e) => return Err(ChannelError::Encode(e)),
        };
        *buf = buf_taken;
        if buf.len() + TAG_LEN > self.limits.max_frame {
            return Err(ChannelError::MessageTooLarge { len: buf.len() + TAG_LEN, limit: self.limits.max_frame });
        }
        self.seal_into(buf, kind, flags, attachments);
        Ok(())
    }

    /// Seals a plaintext that follows `HEADER_LEN` reserved bytes in `buf`: assigns the next
    /// sequence number, writes the header, encrypts in place and appends the tag.
    fn seal_into(&mut self, buf: &mut Vec<u8>, kind: Kind, flags: u16, attachments: usize) {
        let body_len = buf.len() - HEADER_LEN + TAG_LEN;
        let seq = self.tx.next_seq;
        self.tx.ratchet_for(seq);
        let header = Header { kind, flags, attachments: attachments as u16, seq, body_len: body_len as u32 }.encode();
        buf[..HEADER_LEN].copy_from_slice(&header);
        let (h, body) = buf.split_at_mut(HEADER_LEN);
        let tag = self.tx.seal_frame(seq, h, body);
        buf.extend_from_slice(&tag);
        self.tx.next_seq += 1;
        self.sent_since_read = true;
    }

    fn send_frame<T: Serialize>(
        &mut self,
        kind: Kind,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        bulk: Option<(Outgoing, BulkMode)>,
    ) -> Result<(), ChannelError> {
        let mut all: Vec<BorrowedFd<'_>> = fds.to_vec();
        if let Some((Outgoing::Memfd { fd, .. }, _)) = &bulk {
            all.push(fd.as_fd());
        }
        if all.len() > self.limits.max_attachments {
            return Err(ChannelError::TooManyAttachments { count: all.len(), limit: self.limits.max_attachments });
        }
        let mut buf = self.out_bufs.pop().unwrap_or_default();
        let r = self.build_frame(&mut buf, kind, msg, all.len(), bulk.as_ref().map(|(o, m)| (o, *m)));
        let r = r.and_then(|()| self.transmit(&buf, &all));
        self.out_bufs.push(buf);
        r
    }

    /// Receives the next message, blocking.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<Received<T>, ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        let r = self.recv_kind(Kind::Message, None);
        self.poison(r)
    }

    /// Receives the next message if one arrives within `timeout`; `Ok(None)` otherwise.
    pub fn recv_timeout<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Received<T>>, ChannelError> {
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        self.try_recv()
    }

    /// Whether a frame is buffered or arrives within `timeout`.
    fn wait_readable(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        if self.has_buffered() {
            return Ok(true);
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let ready = sys::poll_readable(self.sock.as_fd(), ms).map_err(|e| ChannelError::io("poll", e));
        self.poison(ready)
    }

    /// As [`Channel::recv_timeout`], with a memfd bulk payload taken in only when `admit`
    /// says so (see [`Channel::try_recv_admitting`]).
    pub fn recv_timeout_admitting<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
        admit: impl FnMut(&T, &BulkAnnounce) -> bool,
    ) -> Result<Option<Received<T>>, ChannelError> {
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        self.try_recv_admitting(admit)
    }

    /// Receives a message if one is ready, without blocking.
    pub fn try_recv<T: DeserializeOwned>(&mut self) -> Result<Option<Received<T>>, ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        if self.pending.is_empty() && self.batch.is_empty() {
            let filled = self.fill(true);
            self.poison(filled)?;
            if self.pending.is_empty() {
                return Ok(None);
            }
        }
        let r = self.recv_kind(Kind::Message, None);
        self.poison(r).map(Some)
    }

    /// As [`Channel::try_recv`], but a memfd bulk payload is taken in (verified, mapped or
    /// decrypted) only when `admit` says so, given the decoded message and what its frame
    /// announces of the payload. A declined payload is never verified, mapped or decrypted:
    /// it is reported in [`Received::declined`], its descriptor in [`Received::declined_fd`].
    /// A broker checks its permits and quotas here, so a payload it refuses costs it no
    /// decryption. Inline payloads, inside the frame, are not
    /// asked about.
    pub fn try_recv_admitting<T: DeserializeOwned>(
        &mut self,
        mut admit: impl FnMut(&T, &BulkAnnounce) -> bool,
    ) -> Result<Option<Received<T>>, ChannelError> {
        self.check_poison()?;
        self.require_established()?;
        if self.pending.is_empty() && self.batch.is_empty() {
            let filled = self.fill(true);
            self.poison(filled)?;
            if self.pending.is_empty() {
                return Ok(None);
            }
        }
        let r = self.recv_kind(Kind::Message, Some(&mut admit));
        self.poison(r).map(Some)
    }

    /// Reads what the socket has into `pending`. Blocking, it returns once at least one frame
    /// (or the peer's hang-up) is pending; descriptor notices are consumed on the way.
    fn fill(&mut self, nonblocking: bool) -> Result<(), ChannelError> {
        loop {
            self.fill_once(nonblocking)?;
            if nonblocking || !self.pending.is_empty() {
                return Ok(());
            }
        }
    }

    fn fill_once(&mut self, nonblocking: bool) -> Result<(), ChannelError> {
        let batch = self.limits.recv_batch.max(1);
        // Receive slots are allocated as needed: one for request/reply traffic, a full batch
        // only once the peer streams. An idle channel holds one frame's worth of buffer.
        let slot = || sys::RecvSlot::new(self.limits.max_frame, self.limits.max_attachments);
        if self.slots.is_empty() {
            self.slots.push(slot());
        }
        let streaming = !std::mem::replace(&mut self.sent_since_read, false);
        if batch > 1 && streaming {
            while self.slots.len() < batch {
                self.slots.push(slot());
            }
            let got = sys::recv_datagrams(self.sock.as_fd(), &mut self.slots, nonblocking)
                .map_err(|e| ChannelError::io("recvmmsg", e))?;
            self.read_short = got.len() < self.slots.len();
            for (slot, mut info) in got.into_iter().enumerate() {
                if sys::is_descriptor_notice(&self.slots[slot], &info) {
                    self.fds_announced = true;
                    continue;
                }
                if !std::mem::replace(&mut self.fds_announced, false) {
                    // What recv(2) does on the one-frame path: descriptors no notice announced
                    // are closed unused, and the frame's header, which counts them, decides.
                    info.fds.clear();
                    info.control_truncated = false;
                    info.foreign_control = false;
                }
                self.pending.push_back(Pending { slot, info });
            }
        } else {
            // One frame at a time, cheaper for request/reply traffic: with recv(2), or with
            // recvmsg and a control buffer when a notice announced descriptors.
            self.read_short = true;
            let mut notices = 0;
            loop {
                let slot = &mut self.slots[0];
                let got = if self.fds_announced {
                    sys::recv_datagram(self.sock.as_fd(), slot, nonblocking)
                        .map_err(|e| ChannelError::io("recvmsg", e))?
                } else {
                    sys::recv_datagram_plain(self.sock.as_fd(), slot, nonblocking)
                        .map_err(|e| ChannelError::io("recv", e))?
                };
                let Some(info) = got else { break };
                if sys::is_descriptor_notice(&self.slots[0], &info) {
                    self.fds_announced = true;
                    notices += 1;
                    if nonblocking && notices >= MAX_NOTICES_PER_READ {
                        self.read_short = false;
                        break;
                    }
                    continue;
                }
                self.fds_announced = false;
                self.pending.push_back(Pending { slot: 0, info });
                break;
            }
        }
        Ok(())
    }

    fn recv_kind<T: DeserializeOwned>(
        &mut self,
        expected: Kind,
        admit: Admit<'_, T>,
    ) -> Result<Received<T>, ChannelError> {
        if let Some(r) = self.pop_batched()? {
            return Ok(r);
        }
        if self.pending.is_empty() {
            self.fill(false)?;
        }
        let Some(p) = self.pending.pop_front() else {
            return Err(ChannelError::Closed);
        };
        self.open(expected, p, admit)
    }

    /// Checks and decrypts one datagram.
    fn open<T: DeserializeOwned>(
        &mut self,
        expected: Kind,
        p: Pending,
        admit: Admit<'_, T>,
    ) -> Result<Received<T>, ChannelError> {
        let Pending { slot, info } = p;
        let mut fds = info.fds;
        let len = info.len;
        if len == 0 {
            return Err(ChannelError::Closed);
        }
        if info.truncated {
            return Err(ChannelError::Oversized { limit: self.limits.max_frame });
        }
        if info.control_truncated {
            return Err(ChannelError::ControlTruncated);
        }
        if info.foreign_control {
            return Err(ChannelError::ForeignControl);
        }
        let buf = &mut self.slots[slot].buf[..len];
        let header = Header::decode(buf)?;
        let _span = tracing::trace_span!("frame", seq = header.seq, len).entered();
        if header.seq != self.rx.next_seq {
            return Err(ChannelError::Sequence { expected: self.rx.next_seq, got: header.seq });
        }
        let body_len = header.body_len as usize;
        if len - HEADER_LEN != body_len {
            return Err(ChannelError::BodyLength { header: body_len, actual: len - HEADER_LEN });
        }
        if fds.len() > self.limits.max_attachments {
            return Err(ChannelError::TooManyAttachments { count: fds.len(), limit: self.limits.max_attachments });
        }
        if fds.len() != header.attachments as usize {
            return Err(ChannelError::AttachmentCount { header: header.attachments as usize, received: fds.len() });
        }
        self.rx.ratchet_for(header.seq);
        let (h, rest) = buf.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(body_len - TAG_LEN);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        if !self.rx.open_frame(header.seq, h, body, &t) {
            return Err(ChannelError::Authenticate { seq: header.seq });
        }
        self.rx.next_seq += 1;
        if header.kind == Kind::Batch && expected == Kind::Message {
            if header.flags != 0 || header.attachments != 0 || !fds.is_empty() {
                return Err(ChannelError::BadHeader { reason: "batch frame with attachments or bulk" });
            }
            let body_len = body.len();
            self.index_batch(slot, body_len)?;
            return self.pop_batched()?.ok_or(ChannelError::BadHeader { reason: "empty batch frame" });
        }
        if header.kind != expected {
            let name = match expected {
                Kind::Hello => "Hello",
                Kind::Message | Kind::Batch => "Message",
            };
            return Err(ChannelError::UnexpectedKind { expected: name, got: header.kind as u8 });
        }
        let mut plain: &[u8] = body;
        let mut bulk_out = None;
        let mut memfd = None;
        if header.flags & (FLAG_BULK_INLINE | FLAG_BULK_MEMFD) != 0 {
            let d =
                BulkDescriptor::decode(plain).ok_or(ChannelError::BadHeader { reason: "bulk descriptor truncated" })?;
            plain = &plain[BULK_DESCRIPTOR_LEN..];
            if d.len > self.limits.max_bulk {
                return Err(crate::BulkError::TooLarge { len: d.len, limit: self.limits.max_bulk }.into());
            }
            if header.flags & FLAG_BULK_INLINE != 0 {
                let n = usize::try_from(d.len).unwrap_or(usize::MAX);
                if n > plain.len() {
                    return Err(ChannelError::BadHeader { reason: "inline bulk longer than the frame" });
                }
                bulk_out = Some(Bulk::inline(plain[..n].to_vec()));
                plain = &plain[n..];
            } else {
                memfd = Some((fds.pop().ok_or(crate::BulkError::MissingFd)?, d));
            }
        }
        let (msg, trailing) = postcard::take_from_bytes::<T>(plain).map_err(ChannelError::Decode)?;
        if !trailing.is_empty() {
            return Err(ChannelError::BadHeader { reason: "trailing bytes after the message" });
        }
        // The message is decoded before its memfd payload is touched, so that the receiver can
        // decline the payload (permits, quotas) before it costs a mapping or a decryption.
        let (mut declined, mut declined_fd) = (None, None);
        if let Some((fd, d)) = memfd {
            let encrypted = header.flags & FLAG_BULK_ENCRYPTED != 0;
            let announce = BulkAnnounce { len: d.len, encrypted, other_fds: fds.len() };
            if admit.is_some_and(|a| !a(&msg, &announce)) {
                declined = Some(announce);
                declined_fd = Some(fd);
            } else {
                let decrypt = encrypted.then_some((&self.rx, header.seq, &d.tag));
                bulk_out = Some(if self.limits.map_bulk || decrypt.is_some() {
                    let limit = self.limits.max_bulk.min(self.limits.max_mapped_bulk);
                    bulk::accept_memfd(fd, d.len, limit, decrypt)?
                } else {
                    bulk::accept_memfd_unmapped(fd, d.len, self.limits.max_bulk)?
                });
            }
        }
        Ok(Received { msg, fds, bulk: bulk_out, declined, declined_fd })
    }

    /// Takes over the decrypted plaintext of a batch frame in `slot` and indexes its entries.
    fn index_batch(&mut self, slot: usize, body_len: usize) -> Result<(), ChannelError> {
        if self.batch_buf.len() != self.slots[slot].buf.len() {
            self.batch_buf = vec![0; self.slots[slot].buf.len()];
        }
        std::mem::swap(&mut self.batch_buf, &mut self.slots[slot].buf);
        let plain = &self.batch_buf[HEADER_LEN..HEADER_LEN + body_len];
        let mut at = 0usize;
        while at < plain.len() {
            let Some(len) = plain.get(at..at + 4) else {
                return Err(ChannelError::BadHeader { reason: "batch entry length truncated" });
            };
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let start = at + 4;
            let end = start.checked_add(len).filter(|&e| e <= plain.len());
            let Some(end) = end else {
                return Err(ChannelError::BadHeader { reason: "batch entry overruns the frame" });
            };
            self.batch.push_back((HEADER_LEN + start, HEADER_LEN + end));
            at = end;
        }
        Ok(())
    }

    fn pop_batched<T: DeserializeOwned>(&mut self) -> Result<Option<Received<T>>, ChannelError> {
        let Some((start, end)) = self.batch.pop_front() else { return Ok(None) };
        let (msg, trailing) =
            postcard::take_from_bytes::<T>(&self.batch_buf[start..end]).map_err(ChannelError::Decode)?;
        if !trailing.is_empty() {
            return Err(ChannelError::BadHeader { reason: "trailing bytes after a batched message" });
        }
        Ok(Some(Received { msg, fds: Vec::new(), bulk: None, declined: None, declined_fd: None }))
    }

    /// Test hook: writes raw bytes on the socket as if they were a frame, bypassing all
    /// framing (descriptors, if any, announced as the channel does). Adversarial tests use it
    /// to play a hostile peer.
    #[doc(hidden)]
    pub fn send_raw_datagram(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        sys::send_announced(self.sock.as_fd(), bytes, &raw).map_err(|e| ChannelError::io("sendmsg", e))
    }

    /// Test hook: as [`Channel::send_raw_datagram`], but descriptors go without their notice
    /// (a peer that tries to slip them past the receiver).
    #[doc(hidden)]
    pub fn send_raw_datagram_unannounced(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let d = [sys::OutDatagram { parts: [bytes, &[]], fds: &raw }];
        sys::send_datagrams(self.sock.as_fd(), &d).map_err(|e| ChannelError::io("sendmsg", e))
    }

    /// Test hook: sends `fd` as if it were a sealed bulk memfd of `claimed_len` bytes, without
    /// sealing or checking it. Adversarial tests use it to play a hostile peer.
    #[doc(hidden)]
    pub fn send_unchecked_bulk_fd<T: Serialize>(
        &mut self,
        msg: &T,
        fd: OwnedFd,
        claimed_len: u64,
        encrypted: bool,
    ) -> Result<(), ChannelError> {
        let out = Outgoing::Memfd { fd, len: claimed_len, tag: [0; TAG_LEN] };
        let mode = if encrypted { BulkMode::SealedEncrypted } else { BulkMode::Sealed };
        self.send_frame(Kind::Message, msg, &[], Some((out, mode)))
    }

    /// Test hook: two connected ends under fixed keys (`[0x11; 32]` from the first to the
    /// second, `[0x22; 32]` back), both already past the handshake. Fuzz targets use it to
    /// open frames under a key they know, without a handshake per input. Never use it outside
    /// tests: the keys are public.
    #[doc(hidden)]
    pub fn pair_with_test_keys(limits: Limits, rekey_interval: u64) -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = sys::seqpacket_pair().map_err(|e| ChannelError::io("socketpair", e))?;
        let (ab, ba) = (Key::from_bytes([0x11; 32]), Key::from_bytes([0x22; 32]));
        let ka = ChannelKeys { send: ab.clone(), recv: ba.clone(), rekey_interval };
        let kb = ChannelKeys { send: ba, recv: ab, rekey_interval };
        let (mut a, mut b) = (Channel::new(a, ka, limits.clone()), Channel::new(b, kb, limits));
        a.established = true;
        b.established = true;
        Ok((a, b))
    }

    /// Test hook: seals `plaintext` as the next frame (consuming its sequence number) with
    /// any `kind`, `flags` and attachment count, unchecked, without sending it. Fuzz targets
    /// use it to reach the receiver's checks and decoders behind the authentication tag.
    #[doc(hidden)]
    pub fn seal_raw_plaintext(&mut self, kind: Kind, flags: u16, attachments: u16, plaintext: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN];
        buf.extend_from_slice(plaintext);
        self.seal_into(&mut buf, kind, flags, usize::from(attachments));
        buf
    }

    /// Test hook: builds the next frame exactly as `send` would, without sending it, and
    /// consumes its sequence number. Adversarial tests tamper with it and send it raw.
    #[doc(hidden)]
    pub fn seal_raw<T: Serialize>(&mut self, msg: &T) -> Result<Vec<u8>, ChannelError> {
        let mut buf = Vec::new();
        self.build_frame(&mut buf, Kind::Message, msg, 0, None)?;
        Ok(buf)
    }
}
