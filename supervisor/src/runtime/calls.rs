//! Calls between workers (and from the control socket): the permit and quota checks, routing
//! to the provider, replies back to the caller, deadlines. The bookkeeping (which calls wait,
//! how many each worker has in flight) is [`Calls`], a plain structure tested without a
//! process; the rest moves bytes through channels.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use airlock_protocol::control::CallResult;
use airlock_protocol::wire::{ByteBody, CallFailure, FromWorker, Reply, Request, ToWorker};
use airlock_protocol::{Bulk, BulkAnnounce, Channel, ChannelError};

use super::io::printable;
use super::noise::Noise;
use super::slot::Slot;
use super::Supervisor;
use crate::config::Quota;
use crate::permits::{self, Decision, Kind};

/// Who waits for a call's reply.
#[derive(Debug)]
pub(super) enum Caller {
    Worker { slot: usize, id: u64 },
    Control(UnixStream),
}

/// A call forwarded to its provider, waiting for the reply.
#[derive(Debug)]
pub(super) struct PendingCall {
    pub caller: Caller,
    pub target: usize,
    pub deadline: Instant,
    /// The deadline as the caller was told it.
    pub after_ms: u64,
    /// The state the caller moves to when this call succeeds (permit `grant`).
    pub grant: Option<String>,
}

/// Every call waiting for a reply, and how many each worker has in flight. Opening and
/// closing a call are the only ways the counts change, so they cannot drift apart.
#[derive(Debug)]
pub(super) struct Calls {
    pending: BTreeMap<u64, PendingCall>,
    in_flight: Vec<usize>,
    next_id: u64,
}

impl Calls {
    pub fn new(workers: usize) -> Calls {
        Calls { pending: BTreeMap::new(), in_flight: vec![0; workers], next_id: 1 }
    }

    /// Calls worker `slot` made that wait for a reply.
    pub fn in_flight(&self, slot: usize) -> usize {
        self.in_flight[slot]
    }

    /// The id the next forwarded call will carry (ids are the supervisor's, not the caller's).
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records call `id`, forwarded to `target`.
    pub fn open(&mut self, id: u64, call: PendingCall) {
        if let Caller::Worker { slot, .. } = &call.caller {
            self.in_flight[*slot] += 1;
        }
        self.pending.insert(id, call);
    }

    /// Whether `id` is a call waiting for `target`'s reply (anything else is late or forged).
    pub fn awaits(&self, id: u64, target: usize) -> bool {
        self.pending.get(&id).is_some_and(|p| p.target == target)
    }

    /// Takes call `id` out: it was answered, refused or given up.
    pub fn close(&mut self, id: u64) -> Option<PendingCall> {
        let p = self.pending.remove(&id)?;
        if let Caller::Worker { slot, .. } = &p.caller {
            self.in_flight[*slot] = self.in_flight[*slot].saturating_sub(1);
        }
        Some(p)
    }

    /// Takes out every call whose deadline has passed.
    pub fn expired(&mut self, now: Instant) -> Vec<PendingCall> {
        let ids: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Takes out every call waiting for `target` (which died).
    pub fn drain_target(&mut self, target: usize) -> Vec<PendingCall> {
        let ids: Vec<u64> = self.pending.iter().filter(|(_, p)| p.target == target).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Forgets the calls worker `slot` made: it died or restarted, nobody waits for them.
    pub fn forget_caller(&mut self, slot: usize) {
        self.pending.retain(|_, p| !matches!(p.caller, Caller::Worker { slot: s, .. } if s == slot));
        self.in_flight[slot] = 0;
    }

    /// The earliest deadline, for the event loop's wait.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

/// Whether worker `name`, in permit state `state` with `in_flight` calls waiting, may make
/// call `req` with a bulk payload of `bulk_len` bytes: the permit table, then its quota. On
/// success, the state the call grants. Decided from the frame alone, before any bulk payload
/// is taken in ([`admits_bulk`]), and again when the call is routed.
pub(super) fn check_call(
    permits: &[permits::Permit],
    name: &str,
    state: &str,
    quota: &Quota,
    in_flight: usize,
    req: &Request,
    bulk_len: Option<u64>,
) -> Result<Option<String>, CallFailure> {
    let grant = match permits::decide(permits, name, state, &req.service, &req.method, Kind::Call) {
        Decision::Allow { grant } => grant,
        Decision::Refuse(rule) => return Err(CallFailure::NotPermitted { rule }),
    };
    check_call_quota(name, quota, in_flight, req.body.len(), bulk_len).map_err(|why| CallFailure::Busy { why })?;
    Ok(grant)
}

/// Whether the supervisor takes in (verifies, and decrypts when encrypted) the memfd bulk
/// payload of `msg` from worker `slot`: only for a call the permit table and the quotas allow
/// and for a reply to a call waiting for it, within its quota. Everything else is refused
/// anyway, so its payload is never read: handed back to its sender with the refusal where
/// one goes back ([`send_returning`]), else closed.
pub(super) fn admits_bulk(
    msg: &FromWorker,
    bulk: &BulkAnnounce,
    slot: &Slot,
    permits: &[permits::Permit],
    calls: &Calls,
    me: usize,
) -> bool {
    match msg {
        FromWorker::Request(req) => {
            bulk.other_fds == 0
                && check_call(
                    permits,
                    &slot.name,
                    &slot.broker_state,
                    &slot.cfg.quota,
                    calls.in_flight(me),
                    req,
                    Some(bulk.len),
                )
                .is_ok()
        }
        FromWorker::Reply(rep) => calls.awaits(rep.id, me) && bulk.len <= slot.cfg.quota.bulk_bytes,
        _ => false,
    }
}

/// Whether `name` may make a call of `body_len` bytes (and a bulk payload of `bulk_len`) with
/// `in_flight` calls already waiting; the refusal says which quota.
pub(super) fn check_call_quota(
    name: &str,
    q: &Quota,
    in_flight: usize,
    body_len: usize,
    bulk_len: Option<u64>,
) -> Result<(), String> {
    if in_flight >= q.in_flight_calls {
        return Err(format!("{name} has {in_flight} calls in flight (quota {})", q.in_flight_calls));
    }
    if body_len > q.max_body_bytes {
        return Err(format!("call body of {body_len} bytes exceeds {name}'s quota of {}", q.max_body_bytes));
    }
    match bulk_len {
        Some(len) if len > q.bulk_bytes => {
            Err(format!("bulk payload of {len} bytes exceeds {name}'s quota of {}", q.bulk_bytes))
        }
        _ => Ok(()),
    }
}

impl Supervisor {
    /// A worker's call: permit table, quota, then routing. `declined` is a bulk payload the
    /// channel did not take in because [`admits_bulk`] refused it (`declined_fd`, unread): the
    /// same checks refuse the call here, and the payload goes back with the refusal.
    pub(super) fn call_from_worker(
        &mut self,
        i: usize,
        req: Request,
        bulk: Option<Bulk>,
        declined: Option<BulkAnnounce>,
        declined_fd: Option<OwnedFd>,
    ) {
        let caller = Caller::Worker { slot: i, id: req.id };
        let name = self.slots[i].name.clone();
        let _span = tracing::debug_span!(
            "call",
            from = %name,
            service = %printable(&req.service, 100),
            method = %printable(&req.method, 100),
            id = req.id
        )
        .entered();
        let slot = &self.slots[i];
        let bulk_len = bulk.as_ref().map(|b| b.len() as u64).or(declined.map(|d| d.len));
        let checked = check_call(
            &self.permits,
            &name,
            &slot.broker_state,
            &slot.cfg.quota,
            self.calls.in_flight(i),
            &req,
            bulk_len,
        );
        let grant = match checked {
            Ok(_) if declined.is_some() => {
                // Not reached: the channel asked the same checks, in the same state.
                let why = "the call's bulk payload was not taken in".to_string();
                self.refuse_returning(i, req.id, CallFailure::Busy { why }, declined_fd);
                return;
            }
            Ok(grant) => grant,
            Err(CallFailure::NotPermitted { rule }) => {
                self.violation(i, &rule);
                self.refuse_returning(i, req.id, CallFailure::NotPermitted { rule }, declined_fd);
                return;
            }
            // Busy (a quota) is backpressure, not a violation.
            Err(other) => {
                self.refuse_returning(i, req.id, other, declined_fd);
                return;
            }
        };
        self.route(caller, req, bulk, grant);
    }

    /// Forwards a permitted call to the worker that provides its service.
    pub(super) fn route(&mut self, caller: Caller, req: Request, bulk: Option<Bulk>, grant: Option<String>) {
        let target = self.providers.get(&req.service).copied();
        let Some(t) = target.filter(|&t| self.slots[t].run.is_some()) else {
            let why = if target.is_some() {
                CallFailure::NotRunning { service: req.service.clone() }
            } else {
                CallFailure::NoSuchService { service: req.service.clone() }
            };
            self.answer(caller, Err(why), None);
            return;
        };
        let id = self.calls.next_id();
        let deadline_ms =
            if req.deadline_ms == 0 { self.cfg.broker.call_deadline_ms } else { u64::from(req.deadline_ms) };
        let fwd = ToWorker::Request(Request {
            id,
            service: req.service.clone(),
            method: req.method.clone(),
            body: req.body,
            deadline_ms: deadline_ms.min(u64::from(u32::MAX)) as u32,
        });
        let sent = match self.slots[t].run.as_mut() {
            Some(r) => forward(&mut r.channel, &fwd, bulk.as_ref()),
            None => return,
        };
        if let Err(e) = sent {
            let why = CallFailure::Unreachable { worker: self.slots[t].name.clone(), why: e.to_string() };
            self.answer(caller, Err(why), None);
            return;
        }
        self.slots[t].calls_served += 1;
        if let Caller::Worker { slot, .. } = &caller {
            self.slots[*slot].calls_made += 1;
        }
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        self.calls.open(id, PendingCall { caller, target: t, deadline, after_ms: deadline_ms, grant });
    }

    /// A reply from worker `from`: only to a call it was asked, within its bulk quota.
    pub(super) fn route_reply(&mut self, from: usize, rep: Reply, bulk: Option<Bulk>, declined: Option<BulkAnnounce>) {
        if !self.calls.awaits(rep.id, from) {
            if self.admit(from, Noise::UnknownReply) {
                tracing::warn!(worker = %self.slots[from].name, id = rep.id, "dropping a late or unknown reply");
            }
            return;
        }
        let Some(p) = self.calls.close(rep.id) else { return };
        let quota = self.slots[from].cfg.quota.bulk_bytes;
        let bulk_len = bulk.as_ref().map(|b| b.len() as u64).or(declined.map(|d| d.len));
        if let Some(len) = bulk_len.filter(|&len| len > quota || declined.is_some()) {
            let why = format!("bulk reply of {len} bytes exceeds {}'s quota of {quota}", self.slots[from].name);
            self.answer(p.caller, Err(CallFailure::Busy { why }), None);
            return;
        }
        if let (Caller::Worker { slot, .. }, Some(g), Ok(_)) = (&p.caller, &p.grant, &rep.result) {
            let caller = &mut self.slots[*slot];
            if caller.broker_state != *g {
                tracing::info!(worker = %caller.name, from = %caller.broker_state, to = %g, "permit grant: state change");
            }
            caller.broker_state = g.clone();
        }
        self.answer(p.caller, rep.result.map(|b| b.0).map_err(CallFailure::from_callee), bulk);
    }

    /// Gives up the calls whose deadline passed.
    pub(super) fn expire_calls(&mut self, now: Instant) {
        for p in self.calls.expired(now) {
            let target = self.slots[p.target].name.clone();
            tracing::warn!(worker = %target, "call timed out");
            self.answer(p.caller, Err(CallFailure::TimedOut { worker: target, after_ms: p.after_ms }), None);
        }
    }

    /// Tells `caller` how its call ended.
    pub(super) fn answer(&mut self, caller: Caller, result: Result<Vec<u8>, CallFailure>, bulk: Option<Bulk>) {
        match caller {
            Caller::Worker { slot, id } => {
                let Some(r) = self.slots[slot].run.as_mut() else { return };
                let msg = ToWorker::Reply(Reply { id, result: result.map(ByteBody) });
                let sent = forward(&mut r.channel, &msg, bulk.as_ref());
                if let Err(e) = sent {
                    tracing::warn!(worker = %self.slots[slot].name, error = %e, "could not deliver a reply");
                }
            }
            Caller::Control(mut stream) => {
                let reply = match result {
                    Ok(b) => {
                        let mut text = String::from_utf8_lossy(&b).into_owned();
                        if let Some(bk) = &bulk {
                            text = format!("{text}[bulk payload of {} bytes]", bk.len());
                        }
                        CallResult { ok: true, body: text, failure: None }
                    }
                    Err(e) => CallResult { ok: false, body: e.to_string(), failure: Some(e) },
                };
                let _ = writeln!(stream, "{}", serde_json::to_string(&reply).unwrap_or_default());
            }
        }
    }

    /// Refuses worker `slot`'s call `id`, handing back the bulk payload airlockd declined
    /// (see [`send_returning`]).
    fn refuse_returning(&mut self, slot: usize, id: u64, failure: CallFailure, returned: Option<OwnedFd>) {
        // A worker its violations got killed gets nothing back (it is going away).
        let Some(r) = self.slots[slot].run.as_mut().filter(|r| !r.killed) else { return };
        let msg = ToWorker::Reply(Reply { id, result: Err(failure) });
        if let Err(e) = send_returning(&mut r.channel, &msg, returned) {
            tracing::warn!(worker = %self.slots[slot].name, error = %e, "could not deliver a reply");
        }
    }
}

/// Sends `msg` (a refusal) with `returned`, a bulk payload's descriptor airlockd declined
/// unread, attached: the sender gets its memfd back and closes it, so the kernel's freeing of
/// its pages is charged to the sender rather than to airlockd's event loop (which would pay
/// it for every refused payload of a hostile flood). Handed back only
/// - if it is a memfd (`F_GET_SEALS` answers; nothing is mapped or read): a worker that
///   announced a payload and attached something else, such as its own channel socket, must
///   not get airlockd to put that into a socket queue (a descriptor cycle in flight);
/// - while the worker has read everything airlockd sent it: descriptors in flight count
///   against airlockd's own limit (`RLIMIT_NOFILE` of in-flight descriptors per user), so a
///   worker that does not read cannot pile them up.
///
/// Otherwise airlockd closes it here, and pays for it: a sender that does not read keeps that
/// cost on airlockd, bounded by what it can send before its violations or quotas stop it.
pub(super) fn send_returning(ch: &mut Channel, msg: &ToWorker, returned: Option<OwnedFd>) -> Result<(), ChannelError> {
    use airlock_protocol::sys::{get_seals, unread_by_peer};
    match returned {
        Some(fd) if get_seals(fd.as_fd()).is_ok() && unread_by_peer(ch.as_fd()).is_ok_and(|n| n == 0) => {
            ch.send_with(msg, &[fd.as_fd()])
        }
        _ => ch.send(msg),
    }
}

/// Sends `msg` with `bulk` passed on as it came: a sealed memfd as the same descriptor (the
/// channel re-verifies its seals and size), inline bytes inline.
pub(super) fn forward(ch: &mut Channel, msg: &ToWorker, bulk: Option<&Bulk>) -> Result<(), ChannelError> {
    let Some(b) = bulk else { return ch.send(msg) };
    if let Some(fd) = b.sealed_fd() {
        let fd = fd.try_clone_to_owned().map_err(|e| ChannelError::Io { op: "dup bulk fd", source: e })?;
        return ch.forward_sealed(msg, fd);
    }
    if let Some(bytes) = b.inline_bytes() {
        let w = airlock_protocol::BulkWriter::copy_from(bytes, usize::MAX)?;
        return ch.send_bulk(msg, &[], w, airlock_protocol::BulkMode::Sealed);
    }
    // Encrypted on the way in: re-encrypted under the receiver's channel key (the one copy
    // encryption needs).
    let threshold = ch.limits().inline_threshold;
    let w = airlock_protocol::BulkWriter::copy_from(b.bytes(), threshold)?;
    ch.send_bulk(msg, &[], w, airlock_protocol::BulkMode::SealedEncrypted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(slot: usize, target: usize, deadline: Instant) -> PendingCall {
        PendingCall { caller: Caller::Worker { slot, id: 9 }, target, deadline, after_ms: 5, grant: None }
    }

    #[test]
    fn in_flight_counts_follow_open_and_close_only() {
        let now = Instant::now();
        let mut c = Calls::new(3);
        let (a, b) = (c.next_id(), c.next_id());
        assert_ne!(a, b);
        c.open(a, call(0, 1, now + Duration::from_secs(1)));
        c.open(b, call(0, 2, now + Duration::from_secs(1)));
        assert_eq!(c.in_flight(0), 2);
        assert!(c.awaits(a, 1) && !c.awaits(a, 2), "a reply counts only from the callee");
        assert!(c.close(a).is_some());
        assert!(c.close(a).is_none(), "closed once");
        assert_eq!(c.in_flight(0), 1);
        assert_eq!(c.drain_target(2).len(), 1);
        assert_eq!(c.in_flight(0), 0);
    }

    #[test]
    fn expired_calls_are_taken_out_and_uncounted() {
        let now = Instant::now();
        let mut c = Calls::new(2);
        c.open(1, call(0, 1, now));
        c.open(2, call(0, 1, now + Duration::from_secs(60)));
        assert_eq!(c.next_deadline(), Some(now));
        let gone = c.expired(now);
        assert_eq!(gone.len(), 1);
        assert_eq!(c.in_flight(0), 1);
        assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(60)));
    }

    #[test]
    fn a_dead_callers_calls_are_forgotten() {
        let now = Instant::now() + Duration::from_secs(5);
        let mut c = Calls::new(2);
        c.open(1, call(0, 1, now));
        c.open(2, call(1, 0, now));
        c.forget_caller(0);
        assert_eq!(c.in_flight(0), 0);
        assert!(!c.awaits(1, 1));
        assert!(c.awaits(2, 0), "other callers' calls stay");
    }

    #[test]
    fn check_call_refuses_by_permit_before_quota_and_quota_is_busy() {
        let table = vec![permits::Permit {
            from: "ui".into(),
            to: "logic.read".into(),
            kind: Kind::Call,
            state: "*".into(),
            grant: Some("operator".into()),
            ..permits::Permit::default()
        }];
        let q = Quota {
            in_flight_calls: 2,
            journal_bytes: 100,
            max_body_bytes: 10,
            bulk_bytes: 1 << 20,
            inbox_bytes: None,
        };
        let req = |method: &str| Request {
            id: 1,
            service: "logic".into(),
            method: method.into(),
            body: Vec::new(),
            deadline_ms: 0,
        };
        assert_eq!(
            check_call(&table, "ui", "initial", &q, 0, &req("read"), Some(1 << 20)),
            Ok(Some("operator".into()))
        );
        // Over every quota too, but the permit table speaks first: a violation, not backpressure.
        let refused = check_call(&table, "ui", "initial", &q, 2, &req("write"), Some(1 << 30));
        assert!(matches!(refused, Err(CallFailure::NotPermitted { .. })), "{refused:?}");
        let busy = check_call(&table, "ui", "initial", &q, 0, &req("read"), Some((1 << 20) + 1));
        assert!(matches!(busy, Err(CallFailure::Busy { .. })), "{busy:?}");
    }

    #[test]
    fn call_quota_says_which_limit_refused() {
        let q =
            Quota { in_flight_calls: 2, journal_bytes: 100, max_body_bytes: 10, bulk_bytes: 1000, inbox_bytes: None };
        assert_eq!(check_call_quota("ui", &q, 1, 10, Some(1000)), Ok(()));
        assert_eq!(check_call_quota("ui", &q, 2, 0, None), Err("ui has 2 calls in flight (quota 2)".into()));
        assert_eq!(
            check_call_quota("ui", &q, 0, 11, None),
            Err("call body of 11 bytes exceeds ui's quota of 10".into())
        );
        assert_eq!(
            check_call_quota("ui", &q, 0, 0, Some(1001)),
            Err("bulk payload of 1001 bytes exceeds ui's quota of 1000".into())
        );
    }
}
