//! The control socket: who may connect (root or the service uid, never a worker; checked with
//! `SO_PEERCRED`), and its two requests, `status` and `call`, one JSON line each way.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::control::{ControlRequest, Status};
use airlock_protocol::wire::Request;

use super::calls::Caller;
use super::{security, Supervisor};
use crate::sys;

impl Supervisor {
    pub(super) fn accept_control(&mut self) {
        loop {
            let (stream, _) = match self.control.accept() {
                Ok(s) => s,
                Err(_) => return,
            };
            let creds = sys::peer_credentials(stream.as_fd());
            let me = sys::euid();
            match creds {
                Ok((pid, uid, _)) if self.slots.iter().any(|s| s.run.as_ref().is_some_and(|r| r.pid == pid)) => {
                    let worker = self.slots.iter().find(|s| s.run.as_ref().is_some_and(|r| r.pid == pid));
                    let name = worker.map_or("?", |s| s.name.as_str());
                    security::event(
                        name,
                        Some(pid),
                        format_args!("connected to the control socket (uid {uid}); refused"),
                    );
                    let mut s = stream;
                    let _ = writeln!(s, "{{\"error\":\"permission denied: workers may not use the control socket\"}}");
                    continue;
                }
                Ok((pid, uid, _)) if uid == 0 || uid == me => {
                    tracing::debug!(peer_pid = pid, peer_uid = uid, "control connection");
                }
                Ok((pid, uid, _)) => {
                    security::event("-", Some(pid), format_args!("control connection refused: uid {uid}"));
                    let mut s = stream;
                    let _ = writeln!(
                        s,
                        "{{\"error\":\"permission denied: uid {uid} is neither root nor the service uid {me}\"}}"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SO_PEERCRED failed; refusing control connection");
                    continue;
                }
            }
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut rd = BufReader::new((&stream).take(64 * 1024));
            if rd.read_line(&mut line).is_err() {
                continue;
            }
            drop(rd);
            let mut stream = stream;
            match serde_json::from_str::<ControlRequest>(line.trim()) {
                Ok(ControlRequest::Status) => {
                    let st = self.status();
                    let _ = writeln!(stream, "{}", serde_json::to_string(&st).unwrap_or_default());
                }
                Ok(ControlRequest::Call { service, method, body, deadline_ms }) => {
                    // The administrator (root or the service uid) is not bound by the permit
                    // table, which governs workers.
                    let req = Request { id: 0, service, method, body: body.into_bytes(), deadline_ms };
                    self.route(Caller::Control(stream), req, None, None);
                }
                Ok(ControlRequest::RevokeStream { stream: id }) => {
                    let found = self.revoke_stream(id, "revoked by the operator");
                    let answer = if found {
                        format!("{{\"ok\":true,\"stream\":{id}}}")
                    } else {
                        format!("{{\"error\":\"no stream {id}\"}}")
                    };
                    let _ = writeln!(stream, "{answer}");
                }
                Err(e) => {
                    let _ = writeln!(
                        stream,
                        "{{\"error\":{}}}",
                        serde_json::to_string(&format!("bad request: {e}")).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// What `airlock status` shows.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        Status {
            pid: std::process::id(),
            uid: sys::euid(),
            workers: self.slots.iter().map(|s| s.status(now)).collect(),
            journal_pending: self.journal.live(),
            streams: self.stream_status(),
        }
    }
}
