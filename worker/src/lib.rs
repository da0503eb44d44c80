//! `airlock-worker`: what a worker links to take its inherited channel and keys, confine
//! itself as its supervisor planned, and then serve and call services with bulk payloads.
//!
//! A worker is short:
//! ```no_run
//! let mut w = airlock_worker::Worker::start("echo", &["echo"])?;
//! w.serve(|req, _bulk| Ok(airlock_worker::Response::bytes(req.body.clone())))?;
//! # Ok::<(), airlock_worker::WorkerError>(())
//! ```
//! This crate never decides policy: the plan comes from the supervisor over the authenticated
//! channel, and a required layer that fails ends the worker before it serves anything.
#![deny(unsafe_code)]

pub mod sandbox;
pub mod sys;
pub mod wire;

use airlock_protocol::{handoff, Bulk, BulkMode, BulkWriter, Channel, ChannelError, Hello, Limits, Role};

pub use sandbox::{ConfinementPlan, ConfinementReport, Layer, LayerState, Requirement};
use wire::{ByteBody, FromWorker, Reply, Request, ToWorker};

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("{0}")]
    Confine(#[from] sandbox::LayerFailed),
    #[error("supervisor sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("call {service}.{method} failed: {reason}")]
    Call { service: String, method: String, reason: String },
    #[error("bulk: {0}")]
    Bulk(#[from] airlock_protocol::BulkError),
}

/// What a handler returns: a body and, optionally, a bulk payload.
#[derive(Debug, Default)]
pub struct Response {
    pub body: Vec<u8>,
    pub bulk: Option<(BulkWriter, BulkMode)>,
}

impl Response {
    pub fn bytes(body: Vec<u8>) -> Response {
        Response { body, bulk: None }
    }
}

/// A confined, running worker.
#[derive(Debug)]
pub struct Worker {
    ch: Channel,
    name: String,
    report: ConfinementReport,
    next_id: u64,
}

impl Worker {
    /// Takes the inherited channel (fd 3) and keys (fd 4), handshakes, applies the
    /// supervisor's confinement plan (seccomp last), reports it, waits for `Start`, and
    /// announces `services`. Returns only when the worker is fully confined.
    pub fn start(name: &str, services: &[&str]) -> Result<Worker, WorkerError> {
        let mut ch = handoff::take_inherited(Limits::default())?;
        ch.handshake(&Hello::new(Role::Worker, name))?;
        let plan = match ch.recv::<ToWorker>()?.msg {
            ToWorker::Confine(p) => p,
            other => return Err(WorkerError::Unexpected { expected: "Confine", got: format!("{other:?}") }),
        };
        let _span = tracing::info_span!("worker", name = %plan.worker, pid = sys::getpid()).entered();
        let applied = sandbox::apply_before_seccomp(&plan).and_then(|mut report| {
            sandbox::apply_seccomp(&plan, &mut report)?;
            Ok(report)
        });
        let report = match applied {
            Ok(r) => r,
            Err(f) => {
                let _ = ch.send(&FromWorker::ConfineFailed {
                    layer: f.layer,
                    reason: f.reason.clone(),
                    report: f.report.clone(),
                });
                return Err(f.into());
            }
        };
        ch.send(&FromWorker::Confined(report.clone()))?;
        match ch.recv::<ToWorker>()?.msg {
            ToWorker::Start => {}
            ToWorker::Shutdown => sys::exit_now(0),
            other => return Err(WorkerError::Unexpected { expected: "Start", got: format!("{other:?}") }),
        }
        ch.send(&FromWorker::Ready { services: services.iter().map(|s| s.to_string()).collect() })?;
        Ok(Worker { ch, name: name.to_string(), report, next_id: 1 })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the confinement looked like from inside.
    pub fn report(&self) -> &ConfinementReport {
        &self.report
    }

    /// A writer for a bulk payload of `len` bytes (inline or sealed memfd, chosen by size).
    pub fn bulk_writer(&self, len: usize) -> Result<BulkWriter, WorkerError> {
        Ok(BulkWriter::allocate(len, self.ch.limits().inline_threshold)?)
    }

    /// Sends a status line to the supervisor.
    pub fn event(&mut self, line: &str) -> Result<(), WorkerError> {
        Ok(self.ch.send(&FromWorker::Event(line.to_string()))?)
    }

    /// Serves requests until the supervisor says `Shutdown` or closes the channel.
    pub fn serve<F>(&mut self, mut handler: F) -> Result<(), WorkerError>
    where
        F: FnMut(&Request, Option<&Bulk>) -> Result<Response, String>,
    {
        loop {
            let got = match self.ch.recv::<ToWorker>() {
                Ok(g) => g,
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match got.msg {
                ToWorker::Request(req) => {
                    let _span =
                        tracing::debug_span!("request", service = %req.service, method = %req.method, id = req.id)
                            .entered();
                    match handler(&req, got.bulk.as_ref()) {
                        Ok(resp) => {
                            let reply = FromWorker::Reply(Reply { id: req.id, result: Ok(ByteBody(resp.body)) });
                            match resp.bulk {
                                Some((w, mode)) => self.ch.send_bulk(&reply, &[], w, mode)?,
                                None => self.ch.send(&reply)?,
                            }
                        }
                        Err(e) => self.ch.send(&FromWorker::Reply(Reply { id: req.id, result: Err(e) }))?,
                    }
                }
                ToWorker::Shutdown => return Ok(()),
                other => {
                    return Err(WorkerError::Unexpected { expected: "Request or Shutdown", got: format!("{other:?}") })
                }
            }
        }
    }

    /// Calls `service.method` through the supervisor and waits for the reply.
    pub fn call(&mut self, service: &str, method: &str, body: Vec<u8>) -> Result<(Vec<u8>, Option<Bulk>), WorkerError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request { id, service: service.into(), method: method.into(), body };
        self.ch.send(&FromWorker::Request(req))?;
        loop {
            let got = self.ch.recv::<ToWorker>()?;
            match got.msg {
                ToWorker::Reply(r) if r.id == id => {
                    return match r.result {
                        Ok(b) => Ok((b.0, got.bulk)),
                        Err(reason) => {
                            Err(WorkerError::Call { service: service.into(), method: method.into(), reason })
                        }
                    }
                }
                ToWorker::Reply(r) => tracing::warn!(id = r.id, "dropping a reply for an unknown call id"),
                ToWorker::Shutdown => sys::exit_now(0),
                other => return Err(WorkerError::Unexpected { expected: "Reply", got: format!("{other:?}") }),
            }
        }
    }
}

/// Logs to stderr (which the supervisor collects), filtered by `AIRLOCK_LOG` (default
/// `info`). Never logs keys or payload bytes: nothing in airlock passes them to `tracing`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}
