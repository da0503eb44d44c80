//! Messages between the supervisor and a worker, carried by the secure channel.
//! Bodies are postcard-encoded application types, opaque here (never logged).
//!
//! Both sides link exactly these types: the supervisor never sees a worker crate, and a
//! worker never sees the supervisor's.

use serde::{Deserialize, Serialize};

use crate::confinement::{ConfinementPlan, ConfinementReport, Layer};

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

/// Why a call got no answer from its callee, or the callee's own error. The broker's
/// failures are told apart by type, never by wording: a ui maps `NotPermitted`, `Busy`,
/// `NotRunning`, `TimedOut` and `CalleeDied` to "unavailable" and `Callee` to the callee's
/// refusal. A callee can only ever answer `Callee`: the supervisor turns any other failure a
/// worker sends in a reply into `Callee` with the same text ([`CallFailure::from_callee`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum CallFailure {
    /// Refused by the permit table; `rule` says which rule refused it and why.
    #[error("not permitted: {rule}")]
    NotPermitted { rule: String },
    /// Over a quota of the caller or the callee; try again later.
    #[error("busy: {why}")]
    Busy { why: String },
    /// No worker provides the service.
    #[error("no such service: {service}")]
    NoSuchService { service: String },
    /// The worker that provides the service is not running (restarting, failed, stopped).
    #[error("service {service} is not running")]
    NotRunning { service: String },
    /// The callee did not answer within the call's deadline.
    #[error("call to worker {worker} timed out after {after_ms} ms")]
    TimedOut { worker: String, after_ms: u64 },
    /// The callee died before it answered.
    #[error("worker {worker} died during the call")]
    CalleeDied { worker: String },
    /// The supervisor could not forward the call to the callee (its channel failed).
    #[error("forwarding to {worker} failed: {why}")]
    Unreachable { worker: String, why: String },
    /// The callee's own error, in its words.
    #[error("{0}")]
    Callee(String),
}

impl CallFailure {
    /// Whether the failure is the broker's (the callee never answered) rather than the
    /// callee's own.
    pub fn is_broker(&self) -> bool {
        !matches!(self, CallFailure::Callee(_))
    }

    /// A failure a callee sent in its reply, as the caller may see it: only `Callee`. A callee
    /// that claims a broker failure (to make a caller believe, say, that it was refused by the
    /// permit table) is taken at its words, not its type.
    pub fn from_callee(self) -> CallFailure {
        match self {
            CallFailure::Callee(why) => CallFailure::Callee(why),
            other => CallFailure::Callee(other.to_string()),
        }
    }
}

impl From<Refusal> for CallFailure {
    fn from(r: Refusal) -> CallFailure {
        match r {
            Refusal::Busy(why) => CallFailure::Busy { why },
            Refusal::NotPermitted(rule) => CallFailure::NotPermitted { rule },
            Refusal::NoSuchService(service) => CallFailure::NoSuchService { service },
        }
    }
}

/// The answer to a `Request` with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<ByteBody, CallFailure>,
}

/// Bytes that postcard encodes as one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ByteBody(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What an end needs to use a stream (the area's memfd travels attached to the message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamGrant {
    /// airlockd's id for the stream (in `airlock status` and revocations).
    pub stream: u64,
    pub params: crate::stream::StreamParams,
    /// The per-stream key, for an encrypted stream (it travels inside the encrypted channel).
    pub key: Option<crate::stream::StreamKey>,
}

/// What an end needs to use a call region (the area's memfd travels attached to the message).
/// Regions and streams share one id space, and their revocation and release messages
/// (`StreamRevoked`, `StreamReleased`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionGrant {
    /// airlockd's id for the region (in `airlock status` and revocations).
    pub region: u64,
    pub params: crate::region::RegionParams,
    /// The per-region key, for an encrypted region (it travels inside the encrypted channel).
    pub key: Option<crate::stream::StreamKey>,
}

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
    /// The answer to `OpenStream` (same id): on success this worker is the stream's producer
    /// and the area's memfd is attached.
    StreamOpened {
        id: u64,
        result: Result<StreamGrant, CallFailure>,
    },
    /// Worker `from` opened stream `name` to one of this worker's services: this worker is its
    /// consumer; the area's memfd is attached.
    StreamIncoming {
        from: String,
        service: String,
        name: String,
        grant: StreamGrant,
    },
    /// airlockd revoked the stream (an end died, or the operator asked): unmap and close it.
    /// An end that still holds the area after a deadline is killed.
    StreamRevoked {
        stream: u64,
        reason: String,
    },
    /// The answer to `OpenRegion` (same id): on success this worker is the region's caller and
    /// the area's memfd is attached.
    RegionOpened {
        id: u64,
        result: Result<RegionGrant, CallFailure>,
    },
    /// Worker `from` opened a call region for `service.method` of this worker: this worker is
    /// its callee; the area's memfd is attached.
    RegionIncoming {
        from: String,
        service: String,
        method: String,
        grant: RegionGrant,
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
    /// Asks for a stream to `service` named `name` under a `stream` permit; answered by
    /// `StreamOpened` with the same id.
    OpenStream {
        id: u64,
        service: String,
        name: String,
    },
    /// This worker unmapped and closed revoked stream `stream`. airlockd checks it in
    /// `/proc` where it may read the worker's maps, and takes the word only where it may not.
    StreamReleased {
        stream: u64,
    },
    /// Asks for a region for in-place calls of `service.method` under a `shm-call` permit;
    /// answered by `RegionOpened` with the same id.
    OpenRegion {
        id: u64,
        service: String,
        method: String,
    },
}

impl FromWorker {
    /// The message's kind, for errors and logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            FromWorker::Confined(_) => "Confined",
            FromWorker::ConfineFailed { .. } => "ConfineFailed",
            FromWorker::Ready { .. } => "Ready",
            FromWorker::Request(_) => "Request",
            FromWorker::Reply(_) => "Reply",
            FromWorker::Send(_) => "Send",
            FromWorker::Ack { .. } => "Ack",
            FromWorker::Event(_) => "Event",
            FromWorker::Reopen { .. } => "Reopen",
            FromWorker::OpenStream { .. } => "OpenStream",
            FromWorker::StreamReleased { .. } => "StreamReleased",
            FromWorker::OpenRegion { .. } => "OpenRegion",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_callee_keeps_only_the_callees_words() {
        let forged = CallFailure::NotPermitted { rule: "ui may not call x.y".into() };
        assert_eq!(forged.from_callee(), CallFailure::Callee("not permitted: ui may not call x.y".into()));
        let own = CallFailure::Callee("no such alarm".into());
        assert_eq!(own.clone().from_callee(), own);
    }

    #[test]
    fn broker_failures_are_told_apart_by_type() {
        assert!(CallFailure::TimedOut { worker: "logic".into(), after_ms: 5 }.is_broker());
        assert!(CallFailure::from(Refusal::Busy("quota".into())).is_broker());
        assert!(!CallFailure::Callee("busy: but mine".into()).is_broker());
    }

    #[test]
    fn reply_with_typed_failure_round_trips_through_postcard() {
        let r = Reply { id: 7, result: Err(CallFailure::CalleeDied { worker: "auth".into() }) };
        let bytes = postcard::to_allocvec(&r).expect("encode");
        assert_eq!(postcard::from_bytes::<Reply>(&bytes).expect("decode"), r);
    }
}
