//! Worker I/O: what the event loop watches for each worker (pidfd, channel, stderr), reading
//! a worker's channel a bounded number of messages per turn, its stderr line by line at its
//! own level, and flushing or bounding what waits to be sent to it.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Instant;

use airlock_protocol::wire::{CallFailure, FromWorker, Refusal, ToWorker};
use airlock_protocol::ChannelError;

use super::calls::{admits_bulk, Caller};
use super::noise::Noise;
use super::{io_err, security, token, RuntimeError, Supervisor, WHAT_CHANNEL, WHAT_EXIT, WHAT_STDERR};

/// The most characters of a worker's event line that are logged.
pub(super) const MAX_EVENT_CHARS: usize = 500;
/// The most characters of a worker's stderr line that are logged.
pub(super) const MAX_STDERR_CHARS: usize = 2000;

/// `text` with control characters escaped (`\n`, `\u{1b}`) and cut to `max` characters: a
/// peer's text is one field of one log line, never more.
pub(super) fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push_str("[...]");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The level of a worker's stderr line: its own when it is one of its log lines
/// (`  INFO airlock_worker: ...`), WARN for anything else.
pub(super) fn stderr_level(line: &str) -> tracing::Level {
    match line.split_whitespace().next() {
        Some("ERROR") => tracing::Level::ERROR,
        Some("WARN") => tracing::Level::WARN,
        Some("INFO") => tracing::Level::INFO,
        Some("DEBUG") | Some("TRACE") => tracing::Level::DEBUG,
        _ => tracing::Level::WARN,
    }
}

impl Supervisor {
    pub(super) fn flush_queued(&mut self, i: usize) {
        let Some(r) = self.slots[i].run.as_mut() else { return };
        if let Err(e) = r.channel.flush_queued() {
            self.channel_failed(i, e);
        }
    }

    /// A worker whose unread frames exceed the bound has stopped reading its channel: kill it
    /// (its queued frames go with it; journaled messages are redelivered after its restart).
    pub(super) fn enforce_send_queues(&mut self) {
        const MAX_QUEUED: usize = 16 << 20;
        for i in 0..self.slots.len() {
            let queued = self.slots[i].run.as_ref().map_or(0, |r| r.channel.queued_bytes());
            if queued > MAX_QUEUED {
                let pid = self.slots[i].run.as_ref().map(|r| r.pid);
                let what = format_args!("worker does not read its channel ({queued} bytes queued); killing it");
                security::event(&self.slots[i].name, pid, what);
                if let Some(r) = self.slots[i].run.as_mut() {
                    r.channel_down = true;
                }
                self.kill(i);
            }
        }
    }

    /// Brings the event loop's registrations up to date: a new worker's pidfd, channel and
    /// stderr; a channel that now has frames queued for sending (`EPOLLOUT`) or none, or that
    /// went down. Closing a descriptor unregisters it, so a worker that is gone needs nothing.
    pub(super) fn watch(&mut self) -> Result<(), RuntimeError> {
        let epoll = &self.epoll;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(r) = s.run.as_mut() else { continue };
            let want = match (r.channel_down, r.channel.wants_write()) {
                (true, _) => 0,
                (false, false) => libc::EPOLLIN as u32,
                (false, true) => (libc::EPOLLIN | libc::EPOLLOUT) as u32,
            };
            let have = match r.watching {
                Some(have) => have,
                None => {
                    epoll
                        .add(r.pidfd.as_fd(), token(i, WHAT_EXIT), libc::EPOLLIN as u32)
                        .map_err(io_err("epoll: pidfd"))?;
                    epoll
                        .add(r.stderr.as_fd(), token(i, WHAT_STDERR), libc::EPOLLIN as u32)
                        .map_err(io_err("epoll: stderr"))?;
                    r.watching = Some(0);
                    0
                }
            };
            if want == have {
                continue;
            }
            let fd = r.channel.as_fd();
            match (have, want) {
                (0, w) => epoll.add(fd, token(i, WHAT_CHANNEL), w),
                (_, 0) => epoll.delete(fd),
                (_, w) => epoll.modify(fd, token(i, WHAT_CHANNEL), w),
            }
            .map_err(io_err("epoll: channel"))?;
            r.watching = Some(want);
        }
        Ok(())
    }

    pub(super) fn drain_stderr(&mut self, i: usize) {
        let epoll = &self.epoll;
        let slot = &mut self.slots[i];
        let name = &slot.name;
        let Some(r) = slot.run.as_mut() else { return };
        let now = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match r.stderr.read(&mut buf) {
                Ok(0) => {
                    // The worker closed its stderr: a pipe at its end stays readable (EPOLLHUP)
                    // and would wake every wait. The pidfd still tells when it exits.
                    let _ = epoll.delete(r.stderr.as_fd());
                    break;
                }
                Ok(n) => r.stderr_buf.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
            if r.stderr_buf.len() > 64 * 1024 {
                break;
            }
        }
        while let Some(pos) = r.stderr_buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = r.stderr_buf.drain(..=pos).collect();
            let raw = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
            // The worker library's SIGSYS reporter writes one such line and the process dies:
            // only the first counts, so a worker cannot overwrite a report with a later one.
            if let (None, Some(rest)) = (&r.sigsys, raw.strip_prefix("airlock-sigsys ")) {
                r.sigsys = Some(rest.chars().take(200).collect());
            }
            // A worker's own log lines keep their level; anything else it prints (a panic, a
            // message before its logging started) is a warning. Control characters are
            // escaped, so a line cannot pose as several or rewrite the terminal.
            if !slot.noise.admit(Noise::Stderr, now) {
                continue;
            }
            let line = printable(&raw, MAX_STDERR_CHARS);
            match stderr_level(&raw) {
                tracing::Level::ERROR => tracing::error!(worker = %name, pid = r.pid, "stderr: {line}"),
                tracing::Level::WARN => tracing::warn!(worker = %name, pid = r.pid, "stderr: {line}"),
                tracing::Level::INFO => tracing::info!(worker = %name, pid = r.pid, "stderr: {line}"),
                _ => tracing::debug!(worker = %name, pid = r.pid, "stderr: {line}"),
            }
        }
        if r.stderr_buf.len() > 8192 {
            r.stderr_buf.clear();
        }
    }

    /// Handles what worker `i` sent, at most `PER_TURN` messages, so that a flooding worker
    /// cannot starve the others: the rest waits in its socket (and the socket's bounded buffer
    /// pushes back on the sender).
    pub(super) fn drain_channel(&mut self, i: usize) {
        const PER_TURN: usize = 64;
        for _ in 0..PER_TURN {
            let (permits, calls) = (&self.permits, &self.calls);
            let slot = &mut self.slots[i];
            let Some(mut r) = slot.run.take() else { return };
            if r.channel_down {
                slot.run = Some(r);
                return;
            }
            // Permits and quotas are checked before a bulk payload is taken in: a payload the
            // broker refuses is never mapped or decrypted (handed back to its sender with the
            // refusal, or closed).
            let got =
                r.channel.try_recv_admitting::<FromWorker>(|msg, bulk| admits_bulk(msg, bulk, slot, permits, calls, i));
            slot.run = Some(r);
            if let Ok(Some(g)) = &got {
                if g.declined.is_some() {
                    slot.bulk_refused_unread += 1;
                }
                if g.bulk.as_ref().is_some_and(|b| b.was_encrypted()) {
                    slot.bulk_decrypted += 1;
                }
            }
            let got = match got {
                Ok(Some(g)) => g,
                Ok(None) => return,
                Err(e) => {
                    self.channel_failed(i, e);
                    return;
                }
            };
            // Only calls, replies and sends may carry a payload (and only calls and sends get it
            // back with their refusal): descriptors or a payload on any other message are a
            // protocol violation, and airlockd will not keep paying for them.
            let carries = !got.fds.is_empty() || got.bulk.is_some() || got.declined.is_some();
            if carries && !matches!(got.msg, FromWorker::Request(_) | FromWorker::Reply(_) | FromWorker::Send(_)) {
                let what =
                    format_args!("descriptors or a bulk payload on a message of kind {}; killing it", got.msg.kind());
                security::event(&self.slots[i].name, self.slots[i].run.as_ref().map(|r| r.pid), what);
                self.kill(i);
                return;
            }
            // Calls go back and forth one frame at a time; sends and acknowledgements stream.
            let exchange = matches!(got.msg, FromWorker::Request(_) | FromWorker::Reply(_));
            match got.msg {
                FromWorker::Event(line) => {
                    if self.admit(i, Noise::Event) {
                        let line = printable(&line, MAX_EVENT_CHARS);
                        tracing::info!(worker = %self.slots[i].name, "event: {line}")
                    }
                }
                FromWorker::Request(req) if !got.fds.is_empty() => {
                    let why = format!(
                        "{} passed {} descriptors with a call: only bulk payloads cross the broker",
                        self.slots[i].name,
                        got.fds.len()
                    );
                    self.refused(i, "refused descriptors", &why);
                    self.answer(
                        Caller::Worker { slot: i, id: req.id },
                        Err(CallFailure::NotPermitted { rule: why }),
                        None,
                    );
                }
                FromWorker::Request(req) => self.call_from_worker(i, req, got.bulk, got.declined, got.declined_fd),
                FromWorker::Reply(rep) => self.route_reply(i, rep, got.bulk, got.declined),
                FromWorker::Send(msg) if carries => {
                    let why = "asynchronous messages carry no descriptors or bulk payloads: use a call".to_string();
                    if let Some(run) = self.slots[i].run.as_mut() {
                        let refused = ToWorker::Refused { seq: msg.seq, refusal: Refusal::NotPermitted(why) };
                        let _ = super::calls::send_returning(&mut run.channel, &refused, got.declined_fd);
                    }
                }
                FromWorker::Send(msg) => self.send_from_worker(i, msg),
                FromWorker::Ack { id } => self.acknowledged(i, id),
                FromWorker::Reopen { index } => self.reopen(i, index),
                FromWorker::OpenStream { id, service, name } => {
                    self.open_area(i, id, service, name, super::streams::Want::Stream)
                }
                FromWorker::OpenRegion { id, service, method } => {
                    self.open_area(i, id, service, method, super::streams::Want::Region)
                }
                FromWorker::StreamReleased { stream } => self.stream_released(i, stream),
                other => {
                    let what = format_args!("unexpected message from a running worker ({}); killing it", other.kind());
                    security::event(&self.slots[i].name, self.slots[i].run.as_ref().map(|r| r.pid), what);
                    self.kill(i);
                    return;
                }
            }
            // After a call or reply the worker usually waits for its answer: rather than a read
            // that would find the socket empty, let the next (level-triggered) wait report it
            // when the worker has sent more. Streams of sends and acknowledgements, and durable
            // messages waiting for this turn's fsync (one more read may grow its group), read on.
            if exchange
                && self.accept_after_sync.is_empty()
                && self.slots[i].run.as_ref().is_some_and(|r| r.channel.drained())
            {
                return;
            }
        }
    }

    pub(super) fn channel_failed(&mut self, i: usize, e: ChannelError) {
        let name = self.slots[i].name.clone();
        if let Some(r) = self.slots[i].run.as_mut() {
            r.channel_down = true;
        }
        match e {
            ChannelError::Closed => tracing::info!(worker = %name, "channel closed"),
            other => security::event(&name, None, format_args!("channel failure: {other}; killing worker")),
        }
        self.kill(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_could_forge_a_log_line() {
        let forged = "ok\n2026-12-04T16:00:00Z  INFO worker ready\r\u{1b}[2K";
        let p = printable(forged, 2000);
        assert!(!p.chars().any(char::is_control), "{p}");
        assert!(p.starts_with("ok\\n2026") && p.contains("\\r\\u{1b}[2K"), "{p}");
        assert_eq!(printable("abcdef", 3), "abc[...]");
    }

    #[test]
    fn stderr_lines_keep_the_workers_level() {
        assert_eq!(stderr_level("  INFO airlock_hmi::auth: first start"), tracing::Level::INFO);
        assert_eq!(stderr_level(" WARN x: y"), tracing::Level::WARN);
        assert_eq!(stderr_level("ERROR x: y"), tracing::Level::ERROR);
        assert_eq!(stderr_level("DEBUG x"), tracing::Level::DEBUG);
        assert_eq!(stderr_level("thread 'main' panicked at ..."), tracing::Level::WARN);
    }
}
