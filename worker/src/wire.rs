//! Messages between the supervisor and a worker, carried by the secure channel.
//! Bodies are postcard-encoded application types, opaque here (never logged).

use serde::{Deserialize, Serialize};

use crate::sandbox::{ConfinementPlan, ConfinementReport, Layer};

/// A call to a service, by name. The body is the caller's postcard-encoded argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub service: String,
    pub method: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The answer to a `Request` with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<ByteBody, String>,
}

/// Bytes that postcard encodes as one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ByteBody(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Supervisor to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// First message after the handshake: what to apply before serving.
    Confine(Box<ConfinementPlan>),
    /// The supervisor verified the confinement from outside: serve.
    Start,
    Request(Request),
    Reply(Reply),
    /// Finish the current request, then exit 0.
    Shutdown,
}

/// Worker to supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    /// Every layer applied (or reported), seccomp included.
    Confined(ConfinementReport),
    /// A required layer failed; the worker exits right after sending this.
    ConfineFailed {
        layer: Layer,
        reason: String,
        report: ConfinementReport,
    },
    /// Serving these services.
    Ready {
        services: Vec<String>,
    },
    Request(Request),
    Reply(Reply),
    /// A short status line from the worker (probes report their outcome this way).
    Event(String),
}
