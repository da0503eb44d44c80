//! `airlock-protocol`: the wire format, the secure channel and sealed-memfd bulk transport.
//!
//! This crate owns everything that crosses a trust boundary between airlock processes and
//! nothing else: no policy, no spawning decisions, no confinement. See `ARCHITECTURE.md`.
//!
//! - [`Channel`]: authenticated, encrypted, replay-proof frames over `SOCK_SEQPACKET`.
//! - [`BulkWriter`] / [`Bulk`]: payloads in sealed memfds, mapped read-only by the receiver.
//! - [`stream`]: single-producer, single-consumer record rings in a shared memfd between two
//!   processes, futex-signalled, validated against a hostile peer, encrypted per record.
//! - [`region`]: calls answered in place in a shared memfd (the caller writes a request and
//!   signals, the callee writes the answer back and signals), validated and encrypted likewise.
//! - [`handoff`]: how a spawner gives a child its channel and keys before it reads input.
//! - [`wire`]: the messages between the supervisor and a worker, typed call failures.
//! - [`confinement`]: the confinement plan a worker is sent and the report it answers with.
//! - [`control`]: the control socket's requests and answers.
#![deny(unsafe_code)]

pub mod bulk;
pub mod channel;
pub mod confinement;
pub mod control;
pub mod crypto;
pub mod error;
pub mod frame;
pub mod handoff;
pub mod region;
pub mod stream;
pub mod sys;
pub mod wire;

/// Re-exported so that message types can mark byte fields `#[serde(with = "serde_bytes")]`,
/// which postcard then encodes as one length-prefixed block instead of byte by byte.
pub use serde_bytes;

pub use bulk::{Bulk, BulkMode, BulkPool, BulkReaper, BulkWriter};
pub use channel::{
    BulkAnnounce, Channel, ChannelKeys, Hello, Limits, Received, Role, DEFAULT_REKEY_INTERVAL, PROTOCOL_VERSION,
};
pub use crypto::Key;
pub use error::{BulkError, ChannelError, HandoffError};
pub use region::{RegionCallee, RegionCaller, RegionParams};
pub use stream::{StreamControl, StreamError, StreamKey, StreamParams, StreamReader, StreamWriter};
