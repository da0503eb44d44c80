//! The fixed frame header. It is sent in clear and authenticated as AEAD associated data; it
//! must never carry anything secret. Decoding checks every field a peer controls.
//!
//! ```text
//! offset size field
//!      0    1 wire version (WIRE_VERSION)
//!      1    1 kind (Hello = 1, Message = 2, Batch = 3)
//!      2    2 flags (little endian; unknown bits are an error)
//!      4    2 number of attached descriptors
//!      6    2 reserved, zero
//!      8    8 sequence number (also the AEAD nonce)
//!     16    4 body length: ciphertext plus the 16-byte tag
//!     20    4 reserved, zero
//! ```

use crate::error::ChannelError;

pub const WIRE_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

/// The body's plaintext starts with a bulk descriptor and the last descriptor is a memfd.
pub const FLAG_BULK_MEMFD: u16 = 1 << 0;
/// The bulk payload's bytes are encrypted under the channel key (memfd bulk only).
pub const FLAG_BULK_ENCRYPTED: u16 = 1 << 1;
/// The body's plaintext starts with a bulk descriptor followed by the bulk bytes inline.
pub const FLAG_BULK_INLINE: u16 = 1 << 2;
const KNOWN_FLAGS: u16 = FLAG_BULK_MEMFD | FLAG_BULK_ENCRYPTED | FLAG_BULK_INLINE;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Message = 2,
    /// Several messages coalesced into one frame by `send_batch`: the plaintext is a sequence
    /// of (u32 little-endian length, postcard message) entries. No descriptors, no bulk.
    Batch = 3,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Message),
            3 => Some(Kind::Batch),
            _ => None,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub attachments: u16,
    pub seq: u64,
    pub body_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = WIRE_VERSION;
        b[1] = self.kind as u8;
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..6].copy_from_slice(&self.attachments.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header. Authentication happens later, over these same bytes.
    pub fn decode(b: &[u8]) -> Result<Header, ChannelError> {
        if b.len() < HEADER_LEN {
            return Err(ChannelError::Truncated { len: b.len(), min: HEADER_LEN });
        }
        if b[0] != WIRE_VERSION {
            return Err(ChannelError::WireVersion { ours: WIRE_VERSION, theirs: b[0] });
        }
        let kind = Kind::from_u8(b[1]).ok_or(ChannelError::BadHeader { reason: "unknown frame kind" })?;
        let flags = u16::from_le_bytes([b[2], b[3]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ChannelError::BadHeader { reason: "unknown flag bits" });
        }
        if flags & FLAG_BULK_MEMFD != 0 && flags & FLAG_BULK_INLINE != 0 {
            return Err(ChannelError::BadHeader { reason: "bulk both inline and in a memfd" });
        }
        if flags & FLAG_BULK_ENCRYPTED != 0 && flags & FLAG_BULK_MEMFD == 0 {
            return Err(ChannelError::BadHeader { reason: "encrypted-bulk flag without a memfd" });
        }
        if b[6..8] != [0, 0] || b[20..24] != [0, 0, 0, 0] {
            return Err(ChannelError::BadHeader { reason: "reserved bytes are not zero" });
        }
        let attachments = u16::from_le_bytes([b[4], b[5]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[16..20]);
        let body_len = u32::from_le_bytes(len);
        if (body_len as usize) < TAG_LEN {
            return Err(ChannelError::BadHeader { reason: "body shorter than the authentication tag" });
        }
        Ok(Header { kind, flags, attachments, seq: u64::from_le_bytes(seq), body_len })
    }
}

/// The bulk descriptor at the start of a bulk frame's plaintext: the payload length bound by
/// the frame's authentication, and for encrypted bulk the payload's own tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkDescriptor {
    pub len: u64,
    pub tag: [u8; TAG_LEN],
}

pub const BULK_DESCRIPTOR_LEN: usize = 8 + TAG_LEN;

impl BulkDescriptor {
    pub fn encode(&self) -> [u8; BULK_DESCRIPTOR_LEN] {
        let mut b = [0u8; BULK_DESCRIPTOR_LEN];
        b[..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..].copy_from_slice(&self.tag);
        b
    }

    pub fn decode(b: &[u8]) -> Option<BulkDescriptor> {
        if b.len() < BULK_DESCRIPTOR_LEN {
            return None;
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[..8]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[8..BULK_DESCRIPTOR_LEN]);
        Some(BulkDescriptor { len: u64::from_le_bytes(len), tag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h =
            Header { kind: Kind::Message, flags: FLAG_BULK_MEMFD, attachments: 3, seq: 0xdead_beef_0102, body_len: 99 };
        assert_eq!(Header::decode(&h.encode()).ok(), Some(h));
    }

    #[test]
    fn decode_reserved_nonzero_is_rejected() {
        let mut b = Header { kind: Kind::Hello, flags: 0, attachments: 0, seq: 0, body_len: 16 }.encode();
        b[21] = 1;
        assert!(matches!(Header::decode(&b), Err(ChannelError::BadHeader { .. })));
    }

    #[test]
    fn decode_other_wire_version_names_both() {
        let mut b = Header { kind: Kind::Hello, flags: 0, attachments: 0, seq: 0, body_len: 16 }.encode();
        b[0] = 9;
        match Header::decode(&b) {
            Err(ChannelError::WireVersion { ours, theirs }) => assert_eq!((ours, theirs), (WIRE_VERSION, 9)),
            other => panic!("{other:?}"),
        }
    }
}
