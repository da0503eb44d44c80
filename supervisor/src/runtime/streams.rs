//! Streams between workers: set up after a `stream` permit check, revoked when an end dies or
//! the operator asks, and enforced from outside: an end that still maps or holds the area after
//! the release deadline is killed (airlockd cannot unmap a peer's mapping itself). Where airlockd
//! may not read a worker's maps (a container runtime without `CAP_SYS_PTRACE`, workers without a
//! user namespace), the end's own `StreamReleased` is taken instead, and an end that never says
//! it is killed.
//!
//! airlockd creates the area (a sealed memfd, `airlock_protocol::stream`), keeps only a mapping
//! of its header page to revoke it, and never reads what the ends write.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use airlock_protocol::control::StreamStatus;
use airlock_protocol::stream::{create_area, StreamControl, StreamKey, StreamParams};
use airlock_protocol::wire::{CallFailure, StreamGrant, ToWorker};

use super::{io::printable, security, Supervisor};
use crate::permits::{self, Kind};

/// How long an end gets to unmap and close a revoked stream before it is killed.
pub(super) const RELEASE_DEADLINE: Duration = Duration::from_secs(2);

/// Streams one worker may have as producer at once, revoked ones not yet released included:
/// each holds a descriptor and a mapping in airlockd until both ends let go.
pub(super) const MAX_STREAMS_PER_PRODUCER: usize = 16;

/// A stream's service or name as `OpenStream` may carry it (it reaches logs and `airlock status`).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One stream airlockd set up.
#[derive(Debug)]
pub(super) struct Stream {
    pub producer: usize,
    pub consumer: usize,
    /// The ends' incarnations when it was opened: a restarted end is a new process.
    pub incarnations: (u64, u64),
    pub to: String,
    pub params: StreamParams,
    pub control: StreamControl,
    /// `(st_dev, st_ino)` of the area: how it is found in an end's maps and descriptors.
    pub identity: (u64, u64),
    /// Revoked: why, and when the ends must have let go of it.
    pub revoked: Option<(String, Instant)>,
    /// Each end said it released the area (`StreamReleased`): (producer, consumer).
    pub released: (bool, bool),
}

/// The streams, by id.
#[derive(Debug, Default)]
pub(super) struct Streams {
    pub open: BTreeMap<u64, Stream>,
    pub next_id: u64,
}

/// Whether process `pid` maps or holds the file `identity`, from `/proc`; `None` when this
/// airlockd may not read the worker's maps (a non-dumpable worker of its own uid without a
/// user namespace, under a container runtime that dropped `CAP_SYS_PTRACE`).
fn holds(pid: i32, identity: (u64, u64)) -> Option<bool> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    for line in maps.lines() {
        // address perms offset dev inode path
        let f: Vec<&str> = line.split_whitespace().collect();
        let dev = f
            .get(3)
            .and_then(|d| d.split_once(':'))
            .and_then(|(ma, mi)| Some((u64::from_str_radix(ma, 16).ok()?, u64::from_str_radix(mi, 16).ok()?)));
        let want = (nix::sys::stat::major(identity.0), nix::sys::stat::minor(identity.0));
        if f.len() >= 5 && f[4] != "0" && f[4].parse::<u64>().ok() == Some(identity.1) && dev == Some(want) {
            return Some(true);
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for e in fds.flatten() {
        if let Ok(m) = std::fs::metadata(e.path()) {
            use std::os::unix::fs::MetadataExt;
            if (m.dev(), m.ino()) == identity {
                return Some(true);
            }
        }
    }
    Some(false)
}

impl Supervisor {
    /// `OpenStream` from worker `i`: the permit table, then the consumer, then the area.
    pub(super) fn open_stream(&mut self, i: usize, id: u64, service: String, name: String) {
        let from = self.slots[i].name.clone();
        let _span =
            tracing::info_span!("stream", from = %from, to = %printable(&format!("{service}.{name}"), 200)).entered();
        let result = self.set_up_stream(i, &service, &name);
        let (answer, fd) = match result {
            Ok((grant, fd)) => (Ok(grant), Some(fd)),
            Err(f) => (Err(f), None),
        };
        if let Err(CallFailure::NotPermitted { rule }) = &answer {
            self.violation(i, &printable(rule, 300));
        }
        let Some(run) = self.slots[i].run.as_mut() else { return };
        let msg = ToWorker::StreamOpened { id, result: answer };
        let sent = match &fd {
            Some(fd) => run.channel.send_with(&msg, &[fd.as_fd()]),
            None => run.channel.send(&msg),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not answer OpenStream");
        }
    }

    fn set_up_stream(&mut self, i: usize, service: &str, name: &str) -> Result<(StreamGrant, OwnedFd), CallFailure> {
        let from = self.slots[i].name.clone();
        if self.slots[i].run.as_ref().is_none_or(|r| r.channel_down || r.killed) {
            return Err(CallFailure::Busy { why: format!("{from} is being stopped") });
        }
        if !valid_name(service) || !valid_name(name) {
            return Err(CallFailure::NotPermitted {
                rule: "a stream's service and name are 1 to 64 ASCII letters, digits, '-' or '_'".into(),
            });
        }
        let state = self.slots[i].broker_state.clone();
        let params = match permits::decide(&self.permits, &from, &state, service, name, Kind::Stream) {
            permits::Decision::Allow { .. } => {
                permits::matching(&self.permits, &from, &state, service, name, Kind::Stream)
                    .and_then(|p| p.stream_params())
            }
            permits::Decision::Refuse(rule) => return Err(CallFailure::NotPermitted { rule }),
        }
        .ok_or_else(|| CallFailure::NotPermitted { rule: format!("{from} may not stream to {service}.{name}") })?;
        // One stream per (producer, service.name): a new one replaces the old (revoked).
        let to = format!("{service}.{name}");
        let inc = self.slots[i].incarnation;
        let old: Vec<u64> = self
            .streams
            .open
            .iter()
            .filter(|(_, s)| s.producer == i && s.incarnations.0 == inc && s.to == to && s.revoked.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.revoke_stream(id, "replaced by a new stream of the same name");
        }
        let held = self.streams.open.values().filter(|s| s.producer == i).count();
        if held >= MAX_STREAMS_PER_PRODUCER {
            return Err(CallFailure::Busy {
                why: format!(
                    "{from} has {held} streams (at most {MAX_STREAMS_PER_PRODUCER}, revoked ones until released)"
                ),
            });
        }
        let Some(&c) = self.providers.get(service) else {
            return Err(CallFailure::NoSuchService { service: service.to_string() });
        };
        let worker = self.slots[c].name.clone();
        if self.slots[c].run.as_ref().is_none_or(|r| r.channel_down || r.killed) {
            return Err(CallFailure::NotRunning { service: service.to_string() });
        }
        let fail = |e: airlock_protocol::stream::StreamError| CallFailure::Unreachable {
            worker: "airlockd".into(),
            why: format!("setting up the stream: {e}"),
        };
        let area = create_area(&params).map_err(fail)?;
        let control = StreamControl::attach(area.as_fd()).map_err(fail)?;
        let key = if params.encrypted { Some(StreamKey::generate().map_err(fail)?) } else { None };
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::File::from(
                area.try_clone()
                    .map_err(|e| fail(airlock_protocol::stream::StreamError::Io { what: "dup", source: e }))?,
            )
            .metadata()
            .map_err(|e| fail(airlock_protocol::stream::StreamError::Io { what: "fstat", source: e }))?;
            (m.dev(), m.ino())
        };
        self.streams.next_id += 1;
        let stream = self.streams.next_id;
        let grant = StreamGrant { stream, params, key };
        let incoming = ToWorker::StreamIncoming {
            from: from.clone(),
            service: service.to_string(),
            name: name.to_string(),
            grant: grant.clone(),
        };
        let consumer_run =
            self.slots[c].run.as_mut().ok_or_else(|| CallFailure::NotRunning { service: service.to_string() })?;
        consumer_run
            .channel
            .send_with(&incoming, &[area.as_fd()])
            .map_err(|e| CallFailure::Unreachable { worker: worker.clone(), why: e.to_string() })?;
        self.streams.open.insert(
            stream,
            Stream {
                producer: i,
                consumer: c,
                incarnations: (self.slots[i].incarnation, self.slots[c].incarnation),
                to,
                params,
                control,
                identity,
                revoked: None,
                released: (false, false),
            },
        );
        tracing::info!(
            stream,
            consumer = %worker,
            ring_bytes = params.ring_bytes,
            max_record = params.max_record,
            encrypted = params.encrypted,
            "stream opened"
        );
        Ok((grant, area))
    }

    /// Revokes stream `id`: both ends see `revoked` at once (the shared word, woken), are told
    /// why, and must let go of the area within [`RELEASE_DEADLINE`].
    pub(super) fn revoke_stream(&mut self, id: u64, reason: &str) -> bool {
        let Some(s) = self.streams.open.get_mut(&id) else { return false };
        if s.revoked.is_some() {
            return true;
        }
        s.control.revoke();
        s.revoked = Some((reason.to_string(), Instant::now() + RELEASE_DEADLINE));
        let ends = [(s.producer, s.incarnations.0), (s.consumer, s.incarnations.1)];
        tracing::info!(stream = id, reason, "stream revoked");
        for (slot, inc) in ends {
            if self.slots[slot].incarnation == inc {
                if let Some(run) = self.slots[slot].run.as_mut() {
                    let _ = run.channel.send(&ToWorker::StreamRevoked { stream: id, reason: reason.to_string() });
                }
            }
        }
        true
    }

    /// Worker `i` exited: every stream it was an end of is revoked.
    pub(super) fn revoke_streams_of(&mut self, i: usize) {
        let name = self.slots[i].name.clone();
        let ids: Vec<(u64, bool)> = self
            .streams
            .open
            .iter()
            .filter(|(_, s)| s.producer == i || s.consumer == i)
            .map(|(id, s)| (*id, s.producer == i))
            .collect();
        for (id, producer) in ids {
            let end = if producer { "producer" } else { "consumer" };
            self.revoke_stream(id, &format!("its {end} {name} exited"));
        }
    }

    /// After the deadline, an end that still maps or holds a revoked area is killed; a stream
    /// both ends let go of is forgotten.
    pub(super) fn enforce_stream_releases(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .streams
            .open
            .iter()
            .filter(|(_, s)| s.revoked.as_ref().is_some_and(|(_, t)| *t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(s) = self.streams.open.remove(&id) else { continue };
            let ends = [(s.producer, s.incarnations.0, s.released.0), (s.consumer, s.incarnations.1, s.released.1)];
            for (slot, inc, said) in ends {
                let Some(pid) =
                    self.slots[slot].run.as_ref().filter(|_| self.slots[slot].incarnation == inc).map(|r| r.pid)
                else {
                    continue;
                };
                // What /proc shows wins; only where it cannot be read is the worker's word taken.
                let seen = holds(pid, s.identity);
                if seen.is_none() {
                    tracing::debug!(stream = id, pid, released = said, "cannot read the end's maps: its word is taken");
                }
                if seen.unwrap_or(!said) {
                    let name = self.slots[slot].name.clone();
                    security::event(
                        &name,
                        Some(pid),
                        format_args!(
                            "still holds revoked stream {id} ({}) {} ms after revocation; killing the worker",
                            s.to,
                            RELEASE_DEADLINE.as_millis()
                        ),
                    );
                    self.kill(slot);
                }
            }
        }
    }

    /// `StreamReleased` from worker `i`.
    pub(super) fn stream_released(&mut self, i: usize, id: u64) {
        let inc = self.slots[i].incarnation;
        if let Some(s) = self.streams.open.get_mut(&id) {
            if s.producer == i && s.incarnations.0 == inc {
                s.released.0 = true;
            }
            if s.consumer == i && s.incarnations.1 == inc {
                s.released.1 = true;
            }
        }
    }

    /// The next release deadline, for the event loop's timeout.
    pub(super) fn next_stream_deadline(&self) -> Option<Instant> {
        self.streams.open.values().filter_map(|s| s.revoked.as_ref().map(|(_, t)| *t)).min()
    }

    /// Open streams for `airlock status`.
    pub(super) fn stream_status(&self) -> Vec<StreamStatus> {
        self.streams
            .open
            .iter()
            .map(|(id, s)| StreamStatus {
                stream: *id,
                producer: self.slots[s.producer].name.clone(),
                consumer: self.slots[s.consumer].name.clone(),
                to: s.to.clone(),
                ring_bytes: s.params.ring_bytes,
                max_record: s.params.max_record,
                encrypted: s.params.encrypted,
                revoked: s.revoked.as_ref().map(|(why, _)| why.clone()),
            })
            .collect()
    }
}
