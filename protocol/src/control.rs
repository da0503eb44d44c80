//! The control socket's requests and answers (one JSON line each way), shared by `airlockd`
//! and every client of its socket (`airlock`, the HMI's tools, the tests).

use serde::{Deserialize, Serialize};

use crate::confinement::{Layer, LayerState};
use crate::wire::CallFailure;

/// The externally visible state of one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Spawned, confining, being verified: not yet serving (see `airlock status` for long).
    Starting,
    Running,
    Restarting {
        in_ms: u64,
    },
    Failed(String),
    Stopped,
}

/// A control-socket request (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    Call {
        service: String,
        method: String,
        body: String,
        #[serde(default)]
        deadline_ms: u32,
    },
    /// Revokes stream or call region `stream` (see `Status::streams`).
    RevokeStream {
        stream: u64,
    },
}

/// One open stream or call region in `airlock status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub stream: u64,
    /// A region for in-place calls rather than a stream: `producer` is its caller, `consumer`
    /// its callee, `to` the `service.method`, `ring_bytes` the region's size and `max_record`
    /// the largest message.
    #[serde(default)]
    pub call_region: bool,
    pub producer: String,
    pub consumer: String,
    /// `service.name`.
    pub to: String,
    pub ring_bytes: u32,
    pub max_record: u32,
    pub encrypted: bool,
    /// Set once revoked: why, while airlockd waits for both ends to let go of it.
    pub revoked: Option<String>,
}

/// One worker in `airlock status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub state: WorkerState,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub services: Vec<String>,
    pub last_exit: Option<String>,
    /// Every layer of the worker's last confinement report, in report order.
    pub confinement: Vec<LayerStatus>,
    pub notes: Vec<String>,
    /// Broker state (permit table).
    pub broker_state: String,
    pub violations: u32,
    /// Asynchronous messages waiting for this worker, and delivered but unacknowledged.
    pub queued: usize,
    pub unacknowledged: usize,
    /// Calls routed to this worker (since airlockd started): what it was asked to serve.
    #[serde(default)]
    pub calls_served: u64,
    /// Calls this worker made that the permit table allowed.
    #[serde(default)]
    pub calls_made: u64,
    /// Encrypted bulk payloads from this worker that airlockd decrypted (to re-encrypt them
    /// for their receiver): only those of calls and replies the permits and quotas allowed.
    #[serde(default)]
    pub bulk_decrypted: u64,
    /// Memfd bulk payloads from this worker that airlockd refused (permit table, quota, or a
    /// reply nobody waits for) unread: never verified, mapped or decrypted; handed back to the
    /// sender with the refusal where one goes back, else closed.
    #[serde(default)]
    pub bulk_refused_unread: u64,
    /// Which bounds hold this worker's memory, CPU and processes, one line each
    /// (`memory: cgroup v1 limit 256 MiB, swap included`, or the rlimit ceiling without one).
    #[serde(default)]
    pub bounds: Vec<String>,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub uid: u32,
    pub workers: Vec<WorkerStatus>,
    /// Journaled messages not yet handled by their receiver.
    pub journal_pending: usize,
    /// Open streams.
    #[serde(default)]
    pub streams: Vec<StreamStatus>,
}

/// The answer to `call`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallResult {
    pub ok: bool,
    /// The reply's body as text, or the failure as text.
    pub body: String,
    /// When not `ok`: why, by type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<CallFailure>,
}

/// One confinement layer in `airlock status --json`, spelled as the text output spells it:
/// `{"layer": "seccomp", "state": "applied"}`, or with `"why"` when degraded or unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStatus {
    pub layer: Layer,
    pub state: LayerWord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// A layer's state without its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerWord {
    Applied,
    Degraded,
    Unavailable,
    Off,
}

impl From<(Layer, &LayerState)> for LayerStatus {
    fn from((layer, state): (Layer, &LayerState)) -> LayerStatus {
        let word = match state {
            LayerState::Applied => LayerWord::Applied,
            LayerState::Degraded(_) => LayerWord::Degraded,
            LayerState::Unavailable(_) => LayerWord::Unavailable,
            LayerState::Off => LayerWord::Off,
        };
        LayerStatus { layer, state: word, why: state.why().map(str::to_owned) }
    }
}

impl std::fmt::Display for LayerStatus {
    /// As the text output and the log show a layer's state: `applied`, `degraded (why)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = match self.state {
            LayerWord::Applied => "applied",
            LayerWord::Degraded => "degraded",
            LayerWord::Unavailable => "unavailable",
            LayerWord::Off => "off",
        };
        match &self.why {
            Some(why) => write!(f, "{word} ({why})"),
            None => f.write_str(word),
        }
    }
}

impl WorkerStatus {
    /// The state of `layer`, if the worker reported it.
    pub fn layer(&self, layer: Layer) -> Option<&LayerStatus> {
        self.confinement.iter().find(|l| l.layer == layer)
    }

    /// The state of `layer` without its reason, if the worker reported it.
    pub fn state(&self, layer: Layer) -> Option<LayerWord> {
        self.layer(layer).map(|l| l.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_status_json_spells_states_as_the_text_output() {
        let st = LayerStatus::from((Layer::MountNamespace, &LayerState::Unavailable("EPERM".into())));
        let json = serde_json::to_string(&st).expect("json");
        assert_eq!(json, r#"{"layer":"mount-namespace","state":"unavailable","why":"EPERM"}"#);
        assert_eq!(st.to_string(), LayerState::Unavailable("EPERM".into()).to_string());
        let applied = LayerStatus::from((Layer::Seccomp, &LayerState::Applied));
        assert_eq!(serde_json::to_string(&applied).expect("json"), r#"{"layer":"seccomp","state":"applied"}"#);
    }
}
