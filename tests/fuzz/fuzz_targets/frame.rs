//! Opening frames: a sequence of datagrams built from the input, each either raw bytes (the
//! header checks and the tag check) or a plaintext sealed under the channel's fixed test key
//! with any kind, flags and attachment count (the checks behind the tag: bulk descriptors,
//! inline bulk, batch framing, sealed memfds, and the postcard decoders of `ToWorker` or
//! `FromWorker`). The receiver must refuse or deliver, never panic or hang.
#![no_main]

use std::os::fd::AsFd;

use airlock_protocol::frame::Kind;
use airlock_protocol::sys;
use airlock_protocol::wire::{FromWorker, ToWorker};
use airlock_protocol::{Channel, Limits};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fn drain<T: DeserializeOwned>(rx: &mut Channel, admitting: bool) {
    // Bounded: every datagram yields at most a batch's worth of messages before an error.
    for _ in 0..4096 {
        let r = if admitting {
            rx.try_recv_admitting::<T>(|_, a| a.len % 2 == 0)
                .and_then(|o| o.ok_or(airlock_protocol::ChannelError::Closed))
        } else {
            rx.recv::<T>()
        };
        if r.is_err() {
            assert!(rx.poisoned().is_some() || matches!(r, Err(airlock_protocol::ChannelError::Closed)));
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let limits = Limits {
        recv_batch: if sel & 8 != 0 { 16 } else { 1 },
        max_bulk: 1 << 16,
        max_mapped_bulk: 1 << 16,
        map_bulk: sel & 16 == 0,
        ..Limits::default()
    };
    let rekey = if sel & 4 != 0 { 2 } else { airlock_protocol::DEFAULT_REKEY_INTERVAL };
    let Ok((mut tx, mut rx)) = Channel::pair_with_test_keys(limits, rekey) else { return };
    let mut sent = 0;
    // Chunks: mode (1 byte), length (2 bytes LE), bytes.
    while rest.len() >= 3 && sent < 16 {
        let mode = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        sent += 1;
        if mode & 3 == 0 {
            let _ = tx.send_raw_datagram(bytes, &[]);
            continue;
        }
        let kind = match (mode >> 2) & 3 {
            0 => Kind::Hello,
            3 => Kind::Batch,
            _ => Kind::Message,
        };
        let (flags, bytes) = match bytes {
            [a, b, tail @ ..] => (u16::from_le_bytes([*a, *b]), tail),
            _ => (0, bytes),
        };
        // With a memfd: its size and seals from the mode byte and the first plaintext byte.
        let memfd = if mode & 0x10 != 0 {
            let size = u64::from(bytes.first().copied().unwrap_or(0)) * 8;
            sys::memfd_create(c"fuzz", false).ok().inspect(|fd| {
                let _ = sys::ftruncate(fd.as_fd(), size);
                let seals = if mode & 0x20 != 0 { sys::SEAL_SET } else { libc::c_int::from(mode >> 6) & sys::SEAL_SET };
                let _ = sys::add_seals(fd.as_fd(), seals);
            })
        } else {
            None
        };
        let attachments = u16::from(memfd.is_some()) + u16::from(mode & 0x80 != 0 && memfd.is_none());
        let frame = tx.seal_raw_plaintext(kind, flags, attachments, bytes);
        let fds: Vec<_> = memfd.iter().map(|f| f.as_fd()).collect();
        let _ = tx.send_raw_datagram(&frame, &fds);
    }
    drop(tx);
    if sel & 1 != 0 {
        drain::<ToWorker>(&mut rx, sel & 2 != 0);
    } else {
        drain::<FromWorker>(&mut rx, sel & 2 != 0);
    }
});
