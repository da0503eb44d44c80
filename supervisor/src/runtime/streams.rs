//! Streams between workers: set up after a `stream` permit check, revoked when an end dies or
//! the operator asks, and enforced from outside: an end that still maps or holds the area after
//! the release deadline is killed (airlockd cannot unmap a peer's mapping itself). Where airlockd
//! may not read a worker's maps (a container runtime without `CAP_SYS_PTRACE`, workers without a
//! user namespace), the end's own `StreamReleased` is taken instead, and an end that never says
//! it is killed.
//!
//! Regions for in-place calls (`airlock_protocol::region`, a `shm-call` permit) are set up,
//! revoked and enforced the same way, in the same table and id space: the caller in the
//! producer's place, the callee in the consumer's.
//!
//! airlockd creates the area (a sealed memfd), keeps only a mapping of its header page to
//! revoke it (a region's revocation words sit where a stream's do), and never reads what the
//! ends write.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use airlock_protocol::control::StreamStatus;
use airlock_protocol::region::RegionParams;
use airlock_protocol::stream::{create_area, StreamControl, StreamError, StreamKey, StreamParams};
use airlock_protocol::wire::{CallFailure, RegionGrant, StreamGrant, ToWorker};

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

/// What kind of shared area, with its sizes and mode (from the permit row that allowed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Area {
    Stream(StreamParams),
    Region(RegionParams),
}

impl Area {
    fn word(&self) -> &'static str {
        match self {
            Area::Stream(_) => "stream",
            Area::Region(_) => "call region",
        }
    }

    fn encrypted(&self) -> bool {
        match self {
            Area::Stream(p) => p.encrypted,
            Area::Region(p) => p.encrypted,
        }
    }

    fn create(&self) -> Result<OwnedFd, StreamError> {
        match self {
            Area::Stream(p) => create_area(p),
            Area::Region(p) => airlock_protocol::region::create_area(p),
        }
    }
}

/// Which kind of area a worker asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    Stream,
    Region,
}

/// One stream or call region airlockd set up.
#[derive(Debug)]
pub(super) struct Stream {
    /// The producer of a stream, the caller of a region.
    pub producer: usize,
    /// The consumer of a stream, the callee of a region.
    pub consumer: usize,
    /// The ends' incarnations when it was opened: a restarted end is a new process.
    pub incarnations: (u64, u64),
    pub to: String,
    pub area: Area,
    pub control: StreamControl,
    /// `(st_dev, st_ino)` of the area: how it is found in an end's maps and descriptors.
    pub identity: (u64, u64),
    /// Revoked: why, and when the ends must have let go of it.
    pub revoked: Option<(String, Instant)>,
    /// Each end said it released the area (`StreamReleased`): (producer, consumer).
    pub released: (bool, bool),
}

/// What `set_up_area` grants the asking end.
#[derive(Debug)]
pub(super) enum Grant {
    Stream(StreamGrant),
    Region(RegionGrant),
}

/// The streams and call regions, by id.
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
    /// `OpenStream` or `OpenRegion` from worker `i`: the permit table, then the other end,
    /// then the area.
    pub(super) fn open_area(&mut self, i: usize, id: u64, service: String, name: String, want: Want) {
        let from = self.slots[i].name.clone();
        let what = if want == Want::Stream { "stream" } else { "region" };
        let _span =
            tracing::info_span!("area", kind = what, from = %from, to = %printable(&format!("{service}.{name}"), 200))
                .entered();
        let result = self.set_up_area(i, &service, &name, want);
        let (answer, fd) = match result {
            Ok((grant, fd)) => (Ok(grant), Some(fd)),
            Err(f) => (Err(f), None),
        };
        if let Err(CallFailure::NotPermitted { rule }) = &answer {
            self.violation(i, &printable(rule, 300));
        }
        let Some(run) = self.slots[i].run.as_mut() else { return };
        // A grant is of the kind asked for (set_up_area), so the grant alone picks the answer.
        let msg = match (want, answer) {
            (_, Ok(Grant::Stream(g))) => ToWorker::StreamOpened { id, result: Ok(g) },
            (_, Ok(Grant::Region(g))) => ToWorker::RegionOpened { id, result: Ok(g) },
            (Want::Stream, Err(e)) => ToWorker::StreamOpened { id, result: Err(e) },
            (Want::Region, Err(e)) => ToWorker::RegionOpened { id, result: Err(e) },
        };
        let sent = match &fd {
            Some(fd) => run.channel.send_with(&msg, &[fd.as_fd()]),
            None => run.channel.send(&msg),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not answer OpenStream or OpenRegion");
        }
    }

    fn set_up_area(
        &mut self,
        i: usize,
        service: &str,
        name: &str,
        want: Want,
    ) -> Result<(Grant, OwnedFd), CallFailure> {
        let from = self.slots[i].name.clone();
        if self.slots[i].run.as_ref().is_none_or(|r| r.channel_down || r.killed) {
            return Err(CallFailure::Busy { why: format!("{from} is being stopped") });
        }
        if !valid_name(service) || !valid_name(name) {
            return Err(CallFailure::NotPermitted {
                rule: "a stream's or region's service and name are 1 to 64 ASCII letters, digits, '-' or '_'".into(),
            });
        }
        let state = self.slots[i].broker_state.clone();
        let kind = if want == Want::Stream { Kind::Stream } else { Kind::ShmCall };
        let area = match permits::decide(&self.permits, &from, &state, service, name, kind) {
            permits::Decision::Allow { .. } => permits::matching(&self.permits, &from, &state, service, name, kind)
                .and_then(|p| match want {
                    Want::Stream => p.stream_params().map(Area::Stream),
                    Want::Region => p.region_params().map(Area::Region),
                }),
            permits::Decision::Refuse(rule) => return Err(CallFailure::NotPermitted { rule }),
        }
        .ok_or_else(|| CallFailure::NotPermitted { rule: format!("{from} may not {kind} {service}.{name}") })?;
        // One area per (producer, service.name): a new one replaces the old (revoked).
        let to = format!("{service}.{name}");
        let inc = self.slots[i].incarnation;
        let old: Vec<u64> = self
            .streams
            .open
            .iter()
            .filter(|(_, s)| {
                s.producer == i
                    && s.incarnations.0 == inc
                    && s.to == to
                    && s.revoked.is_none()
                    && std::mem::discriminant(&s.area) == std::mem::discriminant(&area)
            })
            .map(|(id, _)| *id)
            .collect();
        let held = self.streams.open.values().filter(|s| s.producer == i).count();
        if held >= MAX_STREAMS_PER_PRODUCER {
            return Err(CallFailure::Busy {
                why: format!(
                    "{from} has {held} streams or call regions (at most {MAX_STREAMS_PER_PRODUCER}, revoked ones until released)"
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
        let word = area.word();
        let fail = |e: StreamError| CallFailure::Unreachable {
            worker: "airlockd".into(),
            why: format!("setting up the {word}: {e}"),
        };
        // Only now, with the new one about to exist, is the old one replaced (revoked): a
        // request that fails above leaves the live area alone.
        for id in old {
            self.revoke_stream(id, &format!("replaced by a new {} of the same name", area.word()));
        }
        let fd = area.create().map_err(fail)?;
        let control = StreamControl::attach(fd.as_fd()).map_err(fail)?;
        let key = if area.encrypted() { Some(StreamKey::generate().map_err(fail)?) } else { None };
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::File::from(fd.try_clone().map_err(|e| fail(StreamError::Io { what: "dup", source: e }))?)
                .metadata()
                .map_err(|e| fail(StreamError::Io { what: "fstat", source: e }))?;
            (m.dev(), m.ino())
        };
        self.streams.next_id += 1;
        let stream = self.streams.next_id;
        let (grant, incoming) = match area {
            Area::Stream(params) => {
                let grant = StreamGrant { stream, params, key };
                let incoming = ToWorker::StreamIncoming {
                    from: from.clone(),
                    service: service.to_string(),
                    name: name.to_string(),
                    grant: grant.clone(),
                };
                (Grant::Stream(grant), incoming)
            }
            Area::Region(params) => {
                let grant = RegionGrant { region: stream, params, key };
                let incoming = ToWorker::RegionIncoming {
                    from: from.clone(),
                    service: service.to_string(),
                    method: name.to_string(),
                    grant: grant.clone(),
                };
                (Grant::Region(grant), incoming)
            }
        };
        let consumer_run =
            self.slots[c].run.as_mut().ok_or_else(|| CallFailure::NotRunning { service: service.to_string() })?;
        consumer_run
            .channel
            .send_with(&incoming, &[fd.as_fd()])
            .map_err(|e| CallFailure::Unreachable { worker: worker.clone(), why: e.to_string() })?;
        self.streams.open.insert(
            stream,
            Stream {
                producer: i,
                consumer: c,
                incarnations: (self.slots[i].incarnation, self.slots[c].incarnation),
                to,
                area,
                control,
                identity,
                revoked: None,
                released: (false, false),
            },
        );
        match area {
            Area::Stream(p) => tracing::info!(
                stream,
                consumer = %worker,
                ring_bytes = p.ring_bytes,
                max_record = p.max_record,
                encrypted = p.encrypted,
                "stream opened"
            ),
            Area::Region(p) => tracing::info!(
                region = stream,
                callee = %worker,
                region_bytes = p.region_bytes,
                encrypted = p.encrypted,
                "call region opened"
            ),
        }
        Ok((grant, fd))
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
        tracing::info!(stream = id, kind = s.area.word(), reason, "stream or region revoked");
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
            let region = self.streams.open.get(&id).is_some_and(|s| matches!(s.area, Area::Region(_)));
            let end = match (producer, region) {
                (true, false) => "producer",
                (false, false) => "consumer",
                (true, true) => "caller",
                (false, true) => "callee",
            };
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
                            "still holds revoked {} {id} ({}) {} ms after revocation; killing the worker",
                            s.area.word(),
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
            .map(|(id, s)| {
                let (call_region, ring_bytes, max_record) = match s.area {
                    Area::Stream(p) => (false, p.ring_bytes, p.max_record),
                    Area::Region(p) => (true, p.region_bytes, u32::try_from(p.max_message()).unwrap_or(u32::MAX)),
                };
                StreamStatus {
                    stream: *id,
                    call_region,
                    producer: self.slots[s.producer].name.clone(),
                    consumer: self.slots[s.consumer].name.clone(),
                    to: s.to.clone(),
                    ring_bytes,
                    max_record,
                    encrypted: s.area.encrypted(),
                    revoked: s.revoked.as_ref().map(|(why, _)| why.clone()),
                }
            })
            .collect()
    }
}
