//! Giving a spawned child its channel and keys before it reads any input.
//!
//! The spawner creates the socketpair and both keys, writes the child's keys into a memfd,
//! seals it, and arranges for the child to find the channel at [`CHANNEL_FD`] and the key memfd
//! at [`KEYS_FD`]. The child claims both with [`take_inherited`], reads the keys, and closes the
//! memfd; the spawner closes its copy right after the spawn, so the key bytes live in the kernel
//! only until then. Keys never travel in argv, the environment, a file on disk or a log line.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::process::Command;

use zeroize::{Zeroize, Zeroizing};

use crate::channel::{Channel, ChannelKeys, Limits};
use crate::crypto::{Key, KEY_LEN};
use crate::error::{ChannelError, HandoffError};
use crate::sys;

/// Where a child finds its channel socket.
pub const CHANNEL_FD: RawFd = 3;
/// Where a child finds its sealed key memfd (closed by the child once read).
pub const KEYS_FD: RawFd = 4;
/// Brokered descriptors, if any, follow from here in the order the configuration lists them.
pub const FIRST_BROKERED_FD: RawFd = 5;

const MAGIC: &[u8; 8] = b"ALKEYS01";
const BLOB_LEN: usize = 8 + KEY_LEN * 2 + 8;

/// The child's half of a prepared channel: install it into a `Command` before spawning.
#[derive(Debug)]
pub struct ChildEnd {
    sock: OwnedFd,
    keys: OwnedFd,
}

/// Creates a channel for a child about to be spawned. Returns the parent's end (handshake not
/// yet done) and the child's end.
pub fn prepare(limits: Limits, rekey_interval: u64) -> Result<(Channel, ChildEnd), ChannelError> {
    let (parent_sock, child_sock) = sys::seqpacket_pair().map_err(|e| ChannelError::io("socketpair", e))?;
    let (parent_keys, child_keys) =
        ChannelKeys::generate(rekey_interval).map_err(|e| ChannelError::io("getrandom", e))?;
    let keys = write_key_memfd(&child_keys)?;
    Ok((Channel::new(parent_sock, parent_keys, limits), ChildEnd { sock: child_sock, keys }))
}

fn write_key_memfd(k: &ChannelKeys) -> Result<OwnedFd, HandoffError> {
    let io = |op| move |e| HandoffError::Io { op, source: e };
    let fd = sys::memfd_create(c"airlock-keys", false).map_err(io("memfd_create"))?;
    let mut blob = [0u8; BLOB_LEN];
    blob[..8].copy_from_slice(MAGIC);
    blob[8..8 + KEY_LEN].copy_from_slice(k.send.expose());
    blob[8 + KEY_LEN..8 + 2 * KEY_LEN].copy_from_slice(k.recv.expose());
    blob[8 + 2 * KEY_LEN..].copy_from_slice(&k.rekey_interval.to_le_bytes());
    let w = sys::pwrite_all(fd.as_fd(), &blob, 0);
    blob.zeroize();
    w.map_err(io("write key memfd"))?;
    sys::add_seals(fd.as_fd(), sys::SEAL_SET).map_err(io("seal key memfd"))?;
    Ok(fd)
}

impl ChildEnd {
    /// The socket and the key memfd, for a spawner that installs descriptors itself (it must
    /// place them at [`CHANNEL_FD`] and [`KEYS_FD`]).
    pub fn into_parts(self) -> (OwnedFd, OwnedFd) {
        (self.sock, self.keys)
    }

    /// Arranges for `cmd`'s child to inherit the channel at [`CHANNEL_FD`], the keys at
    /// [`KEYS_FD`], and each of `brokered` from [`FIRST_BROKERED_FD`] on. Every other
    /// descriptor of the parent is close-on-exec. Drop the returned guard after `spawn`.
    pub fn install(self, cmd: &mut Command, brokered: Vec<OwnedFd>) -> std::io::Result<sys::ChildFds> {
        let mut plan = vec![(self.sock, CHANNEL_FD), (self.keys, KEYS_FD)];
        for (i, fd) in brokered.into_iter().enumerate() {
            plan.push((fd, FIRST_BROKERED_FD + i as RawFd));
        }
        sys::install_child_fds(cmd, plan)
    }
}

/// In a child: claims the inherited channel and key memfd, reads the keys and closes the memfd.
pub fn take_inherited(limits: Limits) -> Result<Channel, ChannelError> {
    let claim = |fd| {
        sys::claim_inherited_fd(fd)
            .map_err(|e| HandoffError::NotKeyMemfd { fd, detail: format!("cannot claim it: {e}") })
    };
    let keys_fd = claim(KEYS_FD)?;
    let sock = claim(CHANNEL_FD)?;
    match sys::socket_type(sock.as_fd()) {
        Ok(libc::SOCK_SEQPACKET) => {}
        Ok(t) => {
            return Err(HandoffError::NotKeyMemfd {
                fd: CHANNEL_FD,
                detail: format!("socket type {t}, not SOCK_SEQPACKET"),
            }
            .into())
        }
        Err(e) => return Err(HandoffError::NotKeyMemfd { fd: CHANNEL_FD, detail: format!("not a socket: {e}") }.into()),
    }
    let keys = read_key_memfd(keys_fd)?;
    Ok(Channel::new(sock, keys, limits))
}

fn read_key_memfd(fd: OwnedFd) -> Result<ChannelKeys, HandoffError> {
    crate::bulk::verify_sealed_memfd(fd.as_fd(), BLOB_LEN as u64, BLOB_LEN as u64)
        .map_err(|e| HandoffError::NotKeyMemfd { fd: KEYS_FD, detail: e.to_string() })?;
    // Every array that holds key bytes is zeroized when it goes out of scope, on every path.
    let mut blob = Zeroizing::new([0u8; BLOB_LEN]);
    sys::pread_exact(fd.as_fd(), &mut blob[..], 0).map_err(|e| HandoffError::Io { op: "read key memfd", source: e })?;
    drop(fd);
    if &blob[..8] != MAGIC {
        return Err(HandoffError::Format);
    }
    let mut send = Zeroizing::new([0u8; KEY_LEN]);
    let mut recv = Zeroizing::new([0u8; KEY_LEN]);
    send.copy_from_slice(&blob[8..8 + KEY_LEN]);
    recv.copy_from_slice(&blob[8 + KEY_LEN..8 + 2 * KEY_LEN]);
    let mut interval = [0u8; 8];
    interval.copy_from_slice(&blob[8 + 2 * KEY_LEN..]);
    Ok(ChannelKeys {
        send: Key::from_bytes(*send),
        recv: Key::from_bytes(*recv),
        rekey_interval: u64::from_le_bytes(interval),
    })
}
