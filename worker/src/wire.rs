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
    /// How long the caller waits for the reply; 0: the supervisor's default.
    pub deadline_ms: u32,
}

/// An asynchronous message to a service. `seq` is the sender's own counter, echoed in
/// `Accepted`/`Refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub service: String,
    pub method: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Journaled and fsynced before `Accepted` when true.
    pub durable: bool,
}

/// An asynchronous message delivered to its service. `id` is the supervisor's journal id:
/// increasing per destination, stable across restarts of either side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: u64,
    pub from: String,
    pub service: String,
    pub method: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Why the supervisor did not take a message or call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Over a quota; try again later.
    Busy(String),
    /// The permit table does not allow it.
    NotPermitted(String),
    /// No worker provides the service.
    NoSuchService(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Busy(w) => write!(f, "busy: {w}"),
            Refusal::NotPermitted(w) => write!(f, "not permitted: {w}"),
            Refusal::NoSuchService(w) => write!(f, "no such service: {w}"),
        }
    }
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
    /// The supervisor verified the confinement from outside: serve. `settings` is the TOML
    /// text of the configuration's `[settings.NAME]` tables this worker is given (each under
    /// its name), so a worker needs no configuration file of its own.
    Start {
        settings: String,
    },
    Request(Request),
    Reply(Reply),
    /// The supervisor took responsibility for message `seq` (journaled; fsynced if durable).
    Accepted {
        seq: u64,
    },
    Refused {
        seq: u64,
        refusal: Refusal,
    },
    Deliver(Delivery),
    /// Finish the current request, then exit 0.
    Shutdown,
    /// The answer to `Reopen`: on success the new descriptor is attached.
    Reopened {
        index: u32,
        result: Result<(), String>,
    },
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
    Send(Message),
    /// The handler of delivery `id` returned.
    Ack {
        id: u64,
    },
    /// A short status line from the worker (probes report their outcome this way).
    Event(String),
    /// Asks for a fresh descriptor for brokered resource `index` (0 is fd 5) after the old
    /// one failed, for resources that can be reopened (`tcp-connect`). The supervisor applies
    /// a backoff and answers `Reopened`.
    Reopen {
        index: u32,
    },
}
