//! Asynchronous messages: the permit and quota checks, the journal (written before a sender is
//! told `Accepted`, fsynced first when durable), delivery within the window, acknowledgements,
//! and the journal's last flush at shutdown. The quota charge is a plain function.

use std::collections::BTreeMap;

use airlock_protocol::control::WorkerState;
use airlock_protocol::wire::{Delivery, Message, Refusal, ToWorker};

use super::io::printable;
use super::noise::Noise;
use super::{RuntimeError, Supervisor};
use crate::config::Quota;
use crate::permits::{self, Decision, Kind};

/// What one journaled message costs its sender's `journal-bytes` quota: the whole entry
/// (body, names and a fixed overhead), so that empty bodies cannot grow the journal unbounded.
pub(super) fn entry_charge(service: &str, method: &str, body: usize) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD + service.len() + method.len() + body
}

/// Whether `name`, with `waiting` bytes of its messages in the journal, may send `msg`; on
/// success, what it is charged.
pub(super) fn check_send_quota(name: &str, q: &Quota, waiting: usize, msg: &Message) -> Result<usize, String> {
    if msg.body.len() > q.max_body_bytes {
        return Err(format!("message of {} bytes exceeds {name}'s quota of {}", msg.body.len(), q.max_body_bytes));
    }
    let charge = entry_charge(&msg.service, &msg.method, msg.body.len());
    if waiting + charge > q.journal_bytes {
        return Err(format!("{name} has {waiting} bytes of messages waiting (quota {})", q.journal_bytes));
    }
    Ok(charge)
}

/// Whether worker `name`, with `waiting` bytes of messages for it not yet handled, may be
/// sent one more that costs `charge` (its `inbox-bytes` quota).
pub(super) fn check_inbox(name: &str, q: &Quota, waiting: usize, charge: usize) -> Result<(), String> {
    match q.inbox_bytes {
        Some(limit) if waiting + charge > limit => {
            Err(format!("{name} has {waiting} bytes of messages waiting for it (its inbox-bytes quota is {limit})"))
        }
        _ => Ok(()),
    }
}

impl Supervisor {
    /// A worker's asynchronous message: permit table, quota, journal, then `Accepted`
    /// (after the turn's group fsync when durable).
    pub(super) fn send_from_worker(&mut self, i: usize, msg: Message) {
        let name = self.slots[i].name.clone();
        let _span = tracing::debug_span!(
            "send",
            from = %name,
            service = %printable(&msg.service, 100),
            method = %printable(&msg.method, 100),
            seq = msg.seq
        )
        .entered();
        let refuse = |s: &mut Self, r: Refusal| {
            if let Some(run) = s.slots[i].run.as_mut() {
                let _ = run.channel.send(&ToWorker::Refused { seq: msg.seq, refusal: r });
            }
        };
        if let Decision::Refuse(why) =
            permits::decide(&self.permits, &name, &self.slots[i].broker_state, &msg.service, &msg.method, Kind::Send)
        {
            self.violation(i, &why);
            refuse(self, Refusal::NotPermitted(why));
            return;
        }
        let Some(&t) = self.providers.get(&msg.service) else {
            refuse(self, Refusal::NoSuchService(msg.service.clone()));
            return;
        };
        let quota = &self.slots[i].cfg.quota;
        let len = match check_send_quota(&name, quota, self.slots[i].journal_bytes, &msg) {
            Ok(charge) => charge,
            Err(why) => {
                refuse(self, Refusal::Busy(why));
                return;
            }
        };
        if let Err(why) = check_inbox(&self.slots[t].name, &self.slots[t].cfg.quota, self.slots[t].inbox_bytes, len) {
            refuse(self, Refusal::Busy(why));
            return;
        }
        let entry = match self.journal.enqueue(&name, &msg.service, &msg.method, msg.body) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "journal write failed; refusing the message");
                refuse(self, Refusal::Busy(format!("journal: {e}")));
                return;
            }
        };
        self.slots[i].journal_bytes += len;
        self.slots[t].inbox_bytes += len;
        let id = entry.id;
        self.slots[t].outbox.push_back(entry);
        if msg.durable {
            self.accept_after_sync.push((i, self.slots[i].incarnation, msg.seq));
        } else if let Some(run) = self.slots[i].run.as_mut() {
            let _ = run.channel.send(&ToWorker::Accepted { seq: msg.seq });
        }
        tracing::trace!(id, "journaled");
    }

    /// Writes this turn's journal records; when durable messages are among them, asks the sync
    /// thread for one fsync covering them all (and whatever else was written before it).
    ///
    /// A failed write or fsync is fatal: the messages are in the journal file but perhaps not
    /// on disk, and Linux may report a later fsync as successful without having written them.
    /// Refusing them would make their senders send again while the journal may still deliver
    /// the first copies; instead airlockd stops (systemd restarts it). Their senders were never
    /// told `Accepted`, die with it, and do not send again; after the restart, whatever the
    /// journal holds is delivered once.
    pub(super) fn commit_journal(&mut self) -> Result<(), RuntimeError> {
        let fatal = |step: &str, e: crate::journal::JournalError| {
            tracing::error!(error = %e, "{step} failed: durability can no longer be promised; stopping");
            RuntimeError::Io { step: step.into(), source: std::io::Error::other(e.to_string()) }
        };
        if self.accept_after_sync.is_empty() {
            return self.journal.flush().map_err(|e| fatal("journal write", e));
        }
        let generation = self.journal.request_sync().map_err(|e| fatal("journal write", e))?;
        for (i, inc, seq) in self.accept_after_sync.drain(..) {
            self.awaiting_sync.push_back((generation, i, inc, seq));
        }
        Ok(())
    }

    /// The sync thread finished a sync: `Accepted` for every message it covered, one batch
    /// per sender. A failed fsync stops airlockd (see [`Supervisor::commit_journal`]).
    pub(super) fn accept_synced(&mut self) -> Result<(), RuntimeError> {
        let done = self.journal.synced().map_err(|e| {
            tracing::error!(error = %e, pending = self.awaiting_sync.len(), "journal fsync failed: durability can no longer be promised; stopping");
            RuntimeError::Io { step: "journal fsync".into(), source: std::io::Error::other(e.to_string()) }
        })?;
        self.accept_up_to(done);
        Ok(())
    }

    pub(super) fn accept_up_to(&mut self, done: u64) {
        let mut per_slot: BTreeMap<usize, Vec<ToWorker>> = BTreeMap::new();
        while let Some(&(generation, i, inc, seq)) = self.awaiting_sync.front() {
            if generation > done {
                break;
            }
            self.awaiting_sync.pop_front();
            if self.slots[i].incarnation == inc {
                per_slot.entry(i).or_default().push(ToWorker::Accepted { seq });
            }
        }
        for (i, msgs) in per_slot {
            if let Some(run) = self.slots[i].run.as_mut() {
                let _ = run.channel.send_batch(&msgs);
            }
        }
    }

    /// Delivers queued messages to worker `i` up to the delivery window.
    pub(super) fn deliver(&mut self, i: usize) {
        let window = self.cfg.broker.delivery_window.max(1);
        let slot = &mut self.slots[i];
        if slot.state != WorkerState::Running {
            return;
        }
        let Some(run) = slot.run.as_mut() else { return };
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        while slot.delivered.len() + batch.len() < window {
            let Some(e) = slot.outbox.pop_front() else { break };
            batch.push(ToWorker::Deliver(Delivery {
                id: e.id,
                from: e.from.clone(),
                service: e.service.clone(),
                method: e.method.clone(),
                body: e.body.clone(),
            }));
            ids.push(e);
        }
        if batch.is_empty() {
            return;
        }
        match run.channel.send_batch(&batch) {
            Ok(()) => {
                for e in ids {
                    slot.delivered.insert(e.id, e);
                }
            }
            Err(err) => {
                tracing::warn!(worker = %slot.name, error = %err, "delivery failed; will redeliver after restart");
                for e in ids.into_iter().rev() {
                    slot.outbox.push_front(e);
                }
            }
        }
    }

    pub(super) fn acknowledged(&mut self, i: usize, id: u64) {
        let Some(e) = self.slots[i].delivered.remove(&id) else {
            if self.admit(i, Noise::UnknownAck) {
                tracing::warn!(worker = %self.slots[i].name, id, "acknowledgement for a message not delivered to it; ignored");
            }
            return;
        };
        if let Err(err) = self.journal.done(id) {
            tracing::error!(error = %err, id, "journal: recording a handled message failed; it may be redelivered");
        }
        let charge = entry_charge(&e.service, &e.method, e.body.len());
        self.slots[i].inbox_bytes = self.slots[i].inbox_bytes.saturating_sub(charge);
        if let Some(&f) = self.by_name.get(&e.from) {
            self.slots[f].journal_bytes = self.slots[f].journal_bytes.saturating_sub(charge);
        }
    }

    /// The journal's last commit and sync, and the acceptances they make good.
    pub(super) fn shutdown_journal(&mut self, flush: bool) {
        if !flush {
            tracing::warn!("at shutdown: the journal failed; not flushing it again");
            return;
        }
        let committed = self.commit_journal();
        if let Err(e) = &committed {
            tracing::error!(
                "at shutdown: {e}: {}",
                std::error::Error::source(e).map(ToString::to_string).unwrap_or_default()
            );
        }
        if let Err(e) = self.journal.sync() {
            tracing::error!(error = %e, "journal fsync at shutdown failed");
        } else if committed.is_ok() {
            // Synced here and now: every message waiting for the sync thread is durable.
            self.accept_up_to(u64::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: usize) -> Message {
        Message { seq: 1, service: "historian".into(), method: "event".into(), body: vec![0; body], durable: true }
    }

    #[test]
    fn send_quota_charges_the_whole_entry_and_refuses_past_the_quota() {
        let q = Quota { in_flight_calls: 1, journal_bytes: 200, max_body_bytes: 100, bulk_bytes: 0, inbox_bytes: None };
        let charge = entry_charge("historian", "event", 10);
        assert_eq!(charge, 64 + 9 + 5 + 10);
        assert_eq!(check_send_quota("logic", &q, 0, &msg(10)), Ok(charge));
        // Empty bodies still cost their names and the overhead.
        assert!(entry_charge("historian", "event", 0) > 0);
        assert_eq!(
            check_send_quota("logic", &q, 200 - charge + 1, &msg(10)),
            Err(format!("logic has {} bytes of messages waiting (quota 200)", 200 - charge + 1))
        );
        assert_eq!(
            check_send_quota("logic", &q, 0, &msg(101)),
            Err("message of 101 bytes exceeds logic's quota of 100".into())
        );
    }

    #[test]
    fn an_inbox_bound_refuses_past_it_and_its_absence_bounds_nothing() {
        let mut q = Quota::default();
        assert_eq!(check_inbox("bridge", &q, usize::MAX / 2, 100), Ok(()));
        q.inbox_bytes = Some(1000);
        assert_eq!(check_inbox("bridge", &q, 900, 100), Ok(()));
        assert_eq!(
            check_inbox("bridge", &q, 901, 100),
            Err("bridge has 901 bytes of messages waiting for it (its inbox-bytes quota is 1000)".into())
        );
    }
}
