//! Typed errors of the protocol crate. Each variant names the check that failed, so that a
//! poisoned channel or a rejected attachment tells an operator exactly what went wrong.

use std::io;

/// Why a frame, a handshake or a channel operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("peer closed the channel")]
    Closed,
    #[error("frame of {len} bytes is shorter than the {min}-byte header: truncated frame")]
    Truncated { len: usize, min: usize },
    #[error("frame exceeds the {limit}-byte limit: oversized frame")]
    Oversized { limit: usize },
    #[error("frame header is malformed: {reason}")]
    BadHeader { reason: &'static str },
    #[error("peer speaks wire version {theirs}, this side speaks {ours}")]
    WireVersion { ours: u8, theirs: u8 },
    #[error("peer speaks protocol version {theirs}, this side speaks {ours}")]
    ProtocolVersion { ours: u16, theirs: u16 },
    #[error("expected sequence {expected}, got {got}: replayed or reordered frame")]
    Sequence { expected: u64, got: u64 },
    #[error("frame {seq} failed authentication: tampered frame or wrong key")]
    Authenticate { seq: u64 },
    #[error("header says {header} body bytes, datagram carries {actual}: truncated or padded frame")]
    BodyLength { header: usize, actual: usize },
    #[error("the kernel truncated the frame's control data (MSG_CTRUNC): too many descriptors")]
    ControlTruncated,
    #[error("frame carries a control message other than SCM_RIGHTS")]
    ForeignControl,
    #[error("frame carries {count} descriptors, limit is {limit}")]
    TooManyAttachments { count: usize, limit: usize },
    #[error("header announces {header} descriptors, {received} arrived: unexpected fd")]
    AttachmentCount { header: usize, received: usize },
    #[error("expected a {expected} frame, got {got}")]
    UnexpectedKind { expected: &'static str, got: u8 },
    #[error("message body does not decode: {0}")]
    Decode(#[source] postcard::Error),
    #[error("message body does not encode: {0}")]
    Encode(#[source] postcard::Error),
    #[error("message of {len} bytes does not fit a {limit}-byte frame; send it as bulk")]
    MessageTooLarge { len: usize, limit: usize },
    #[error("bulk payload rejected: {0}")]
    Bulk(#[from] BulkError),
    #[error("key hand-off failed: {0}")]
    Handoff(#[from] HandoffError),
    #[error("a {kind} message arrived with a bulk payload where none belongs (closed unread)")]
    UnexpectedBulk { kind: &'static str },
    #[error("channel is poisoned by an earlier failure: {reason}")]
    Poisoned { reason: String },
}

impl ChannelError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        ChannelError::Io { op, source }
    }
}

/// Why a bulk payload could not be created, sent or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BulkError {
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("attachment is not a memfd ({detail})")]
    NotMemfd { detail: String },
    #[error("memfd is not sealed as required: has seals {seals:#x}, missing {missing:#x}")]
    MissingSeals { seals: i32, missing: i32 },
    #[error("memfd carries unexpected seals {extra:#x}")]
    UnexpectedSeals { extra: i32 },
    #[error("memfd holds {actual} bytes, the authenticated frame says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("bulk payload of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: u64, limit: u64 },
    #[error("bulk payload failed authentication: tampered bytes or wrong key")]
    Authenticate,
    #[error("frame announces a bulk payload but carries no descriptor for it")]
    MissingFd,
    #[error("wrote {written} of the {len} bytes the bulk buffer holds")]
    Incomplete { written: u64, len: u64 },
}

impl BulkError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        BulkError::Io { op, source }
    }
}

/// Why a child could not take its keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not an inherited airlock key memfd: {detail}")]
    NotKeyMemfd { fd: i32, detail: String },
    #[error("key memfd has an unknown format (magic or version mismatch)")]
    Format,
}
