//! `logic`: the HMI's control layer. Holds the tag table (engineering units, scaling),
//! evaluates alarm limits with hysteresis and acknowledgement, and validates every setpoint
//! write (range, rate of change, interlocks, device state) before it can reach `field`.
//! It has no descriptors but its channel.

use std::collections::BTreeMap;
use std::process::ExitCode;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use crate::types::{
    self as hmi, Ack, Alarm, AlarmKind, Event, RawWrite, Sample, SessionInfo, Setpoint, TagValue, Token, Update,
    Verdict,
};
use airlock_worker::{Response, Worker};

#[derive(Debug)]
pub(crate) struct Logic {
    plant: hmi::Plant,
    /// Last raw value per tag and when it was read.
    raw: BTreeMap<String, (u16, i64)>,
    fault: Option<String>,
    alarms: BTreeMap<(String, AlarmKind), Alarm>,
    /// Last accepted write per tag: when, the engineering value, and the change still
    /// allowed then (a bucket of `max-rate` × 1 s, refilled at `max-rate` per second).
    last_write: BTreeMap<String, (Instant, f64, f64)>,
    /// When the newest sample was taken (ms since the epoch), to tell live values from stale.
    last_sample_ms: i64,
}

/// Logic's settings: the plant, and its own table.
#[derive(Debug, serde::Deserialize)]
struct Settings {
    plant: hmi::Plant,
    #[serde(default)]
    logic: LogicSettings,
}

/// `[settings.logic]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LogicSettings {
    /// Send the plant's state after every sample to the bridge (`bridge.update`), which
    /// publishes it beyond the site (`docs/multi-site.md`).
    #[serde(default)]
    publish_to_bridge: bool,
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("logic", &["logic"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-logic: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = w.settings::<Settings>().map_err(|e| e.to_string());
    let (plant, own) = match settings.and_then(|s| Ok((s.plant.validated()?, s.logic))) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let logic = std::cell::RefCell::new(Logic::new(plant));
    let pending = std::cell::RefCell::new(std::collections::VecDeque::new());
    let bridge = std::cell::RefCell::new(own.publish_to_bridge.then(BridgeOut::default));
    let mut streamed = crate::samples::SampleIn::default();
    let served = w.serve_all_ticking(
        std::time::Duration::from_millis(20),
        |w, req, _bulk| {
            let body = logic.borrow_mut().handle(
                &req.method,
                &req.body,
                &mut Brokered { w, pending: &pending, bridge: &bridge },
            )?;
            Ok(Response::bytes(body))
        },
        |w, d, _bulk| {
            if d.method != "sample" {
                tracing::warn!(from = %d.from, method = %d.method, "unexpected message");
                return;
            }
            match hmi::decode::<Sample>(&d.body) {
                Ok(s) => logic.borrow_mut().on_sample(&s, &mut Brokered { w, pending: &pending, bridge: &bridge }),
                Err(e) => tracing::warn!(from = %d.from, "dropping a sample: {e}"),
            }
        },
        |w| {
            streamed.drain(w, |w, s| {
                logic.borrow_mut().on_sample(&s, &mut Brokered { w, pending: &pending, bridge: &bridge })
            })
        },
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// What logic asks of the other layers. The layered HMI asks through airlockd
/// ([`Brokered`]); the one-process HMI of the benchmark (`crate::single`) calls the same
/// layers' code directly.
pub(crate) trait Peers {
    /// The operator behind a session token, as `auth` says (logic does not trust the ui's word).
    fn session(&mut self, token: &str) -> Result<SessionInfo, String>;
    /// Writes a raw value to the device through `field`; returns once the device has it.
    fn write(&mut self, write: &RawWrite) -> Result<(), String>;
    /// Records an event durably with the historian (operator actions and alarms are records).
    fn record(&mut self, ev: Event);
    /// Passes the plant's state after a sample on beyond the site, where a bridge does that.
    fn publish(&mut self, _update: &Update) {}
}

/// Logic's peers through airlockd: calls under the permit table, events journaled.
struct Brokered<'a> {
    w: &'a mut Worker,
    pending: &'a Pending,
    /// Set when logic publishes to the bridge (`publish-to-bridge`).
    bridge: &'a std::cell::RefCell<Option<BridgeOut>>,
}

/// Logic's side of the bridge: what it could not hand over, said once per episode.
#[derive(Debug, Default)]
struct BridgeOut {
    /// Updates the broker refused since the last one it took (the bridge's inbox is full or
    /// the bridge is not running).
    refused: u64,
}

impl Peers for Brokered<'_> {
    fn session(&mut self, token: &str) -> Result<SessionInfo, String> {
        let (body, _) = self
            .w
            .call_with_deadline("auth", "validate", hmi::encode(&Token(token.into())), 2000)
            .map_err(|e| match e {
                airlock_worker::WorkerError::Call { failure, .. } => failure.to_string(),
                other => other.to_string(),
            })?;
        hmi::decode(&body)
    }

    fn write(&mut self, write: &RawWrite) -> Result<(), String> {
        self.w.call_with_deadline("field", "write", hmi::encode(write), 3000).map(drop).map_err(|e| match e {
            airlock_worker::WorkerError::Call { failure, .. } => failure.to_string(),
            other => other.to_string(),
        })
    }

    fn record(&mut self, ev: Event) {
        record(self.w, self.pending, ev);
    }

    /// Durable, so that the bridge's store and forward survives airlockd's restart. Never
    /// blocks logic beyond the journal's fsync: an update the broker refuses (the bridge's
    /// inbox is full after a long outage) is dropped and counted, and the bridge's consumers
    /// see the gap in the sample times.
    fn publish(&mut self, update: &Update) {
        let mut bridge = self.bridge.borrow_mut();
        let Some(out) = bridge.as_mut() else { return };
        match self.w.send("bridge", "update", hmi::encode(update), true) {
            Ok(()) => {
                if out.refused > 0 {
                    tracing::warn!(dropped = out.refused, "the bridge takes updates again");
                    out.refused = 0;
                }
            }
            Err(e) => {
                if out.refused == 0 {
                    tracing::error!(
                        "an update for the bridge was dropped (and any more are, until it takes them again): {e}"
                    );
                }
                out.refused += 1;
            }
        }
    }
}

/// Events the broker could not take yet (the historian's backlog is over logic's quota).
type Pending = std::cell::RefCell<std::collections::VecDeque<Event>>;

/// At most this many events wait in logic's memory; beyond it the oldest is dropped (and said).
const MAX_PENDING_EVENTS: usize = 10_000;

/// Journals an event with the historian (durable: operator actions and alarms are records).
/// Never blocks the control layer: when the broker answers Busy (the historian is down and
/// logic's journal quota is full), the event waits here and goes out with the next one.
fn record(w: &mut Worker, pending: &Pending, ev: Event) {
    let mut q = pending.borrow_mut();
    q.push_back(ev);
    if q.len() > MAX_PENDING_EVENTS {
        if let Some(lost) = q.pop_front() {
            tracing::error!(kind = %lost.kind, tag = %lost.tag, "event dropped: the historian has been unreachable too long");
        }
    }
    while let Some(ev) = q.front() {
        match w.send("historian", "event", hmi::encode(ev), true) {
            Ok(()) => {
                q.pop_front();
            }
            Err(airlock_worker::WorkerError::Refused { refusal: airlock_worker::wire::Refusal::Busy(why), .. }) => {
                tracing::warn!(waiting = q.len(), "events wait for the historian: {why}");
                break;
            }
            Err(e) => {
                tracing::error!(kind = %ev.kind, tag = %ev.tag, "event not recorded: {e}");
                q.pop_front();
            }
        }
    }
}

impl Logic {
    /// Before the first sample: no values, and a fault until the device answers.
    pub(crate) fn new(plant: hmi::Plant) -> Logic {
        Logic {
            plant,
            raw: BTreeMap::new(),
            fault: Some("no sample from the device yet".into()),
            alarms: BTreeMap::new(),
            last_write: BTreeMap::new(),
            last_sample_ms: 0,
        }
    }

    /// Answers a request for one of logic's methods.
    pub(crate) fn handle(&mut self, method: &str, body: &[u8], peers: &mut dyn Peers) -> Result<Vec<u8>, String> {
        Ok(match method {
            "values" => hmi::encode(&self.values()),
            "alarms" => hmi::encode(&self.alarms.values().cloned().collect::<Vec<_>>()),
            "ack" => {
                let a: Ack = hmi::decode(body)?;
                let who = peers.session(&a.token)?;
                let ev = self.ack(&a, &who.user)?;
                peers.record(ev);
                hmi::encode(&())
            }
            "setpoint" => {
                let s: Setpoint = hmi::decode(body)?;
                let who = peers.session(&s.token)?;
                let verdict = self.setpoint(peers, &s, &who.user);
                peers.record(Event {
                    ts_ms: hmi::now_ms(),
                    kind: if verdict.accepted { "setpoint" } else { "refused" }.into(),
                    tag: s.tag.clone(),
                    user: Some(who.user),
                    value: Some(s.value),
                    text: verdict.reason.clone(),
                });
                hmi::encode(&verdict)
            }
            other => return Err(format!("logic has no method {other:?}")),
        })
    }

    /// Takes a sample from `field`, recording the alarms and faults it raises or clears.
    pub(crate) fn on_sample(&mut self, s: &Sample, peers: &mut dyn Peers) {
        let mut events = Vec::new();
        self.sample(s, &mut events);
        for ev in events {
            peers.record(ev);
        }
        peers.publish(&self.update(s));
    }

    /// The plant's state after sample `s`, for the bridge.
    fn update(&self, s: &Sample) -> Update {
        let values = s
            .values
            .iter()
            .filter_map(|(name, raw)| Some((name.clone(), self.plant.tag(name)?.to_eng(*raw))))
            .collect();
        let active_alarms = self.alarms.values().filter(|a| a.active).map(|a| (a.tag.clone(), a.kind)).collect();
        Update { ts_ms: s.ts_ms, values, fault: s.fault.clone(), active_alarms }
    }

    fn value(&self, tag: &str) -> Option<f64> {
        let def = self.plant.tag(tag)?;
        self.raw.get(tag).map(|(r, _)| def.to_eng(*r))
    }

    fn values(&self) -> Vec<TagValue> {
        self.plant
            .tags
            .iter()
            .map(|t| TagValue {
                name: t.name.clone(),
                description: t.description.clone(),
                value: self.raw.get(&t.name).map(|(r, _)| t.to_eng(*r)),
                unit: t.unit.clone(),
                ts_ms: self.raw.get(&t.name).map_or(0, |(_, ts)| *ts),
                writable: t.writable(),
                min: t.min,
                max: t.max,
                fault: self.fault_now(),
            })
            .collect()
    }

    /// The device's fault, or staleness: values older than `stale-ms` are not acted on.
    fn fault_now(&self) -> Option<String> {
        if let Some(f) = &self.fault {
            return Some(f.clone());
        }
        let age = hmi::now_ms().saturating_sub(self.last_sample_ms);
        (age > self.plant.stale_ms).then(|| format!("no fresh sample from the device for {} s", age / 1000))
    }

    /// The change a write to `tag` may make now, and the value it is measured from.
    fn allowance(&self, def: &hmi::TagDef, rate: f64, now: Instant) -> (Option<f64>, f64) {
        match self.last_write.get(&def.name) {
            Some((t, v, left)) => (Some(*v), (left + rate * now.duration_since(*t).as_secs_f64()).min(rate)),
            None => (self.value(&def.name), rate),
        }
    }

    fn sample(&mut self, s: &Sample, events: &mut Vec<Event>) {
        if let Some(f) = &s.fault {
            if self.fault.as_deref() != Some(f) {
                events.push(Event {
                    ts_ms: s.ts_ms,
                    kind: "fault".into(),
                    tag: String::new(),
                    user: None,
                    value: None,
                    text: f.clone(),
                });
            }
            self.fault = Some(f.clone());
            return;
        }
        self.fault = None;
        self.last_sample_ms = self.last_sample_ms.max(s.ts_ms);
        for (name, raw) in &s.values {
            let Some(def) = self.plant.tag(name) else { continue };
            self.raw.insert(name.clone(), (*raw, s.ts_ms));
            let v = def.to_eng(*raw);
            for (kind, limit) in [(AlarmKind::High, def.alarm_high), (AlarmKind::Low, def.alarm_low)] {
                let Some(limit) = limit else { continue };
                let key = (name.clone(), kind);
                let beyond = match kind {
                    AlarmKind::High => v > limit,
                    AlarmKind::Low => v < limit,
                };
                let back_inside = match kind {
                    AlarmKind::High => v <= limit - def.hysteresis,
                    AlarmKind::Low => v >= limit + def.hysteresis,
                };
                match self.alarms.get_mut(&key) {
                    Some(a) if a.active => {
                        a.value = v;
                        if back_inside {
                            a.active = false;
                            events.push(alarm_event(a, s.ts_ms, "cleared"));
                            if a.acked_by.is_some() {
                                self.alarms.remove(&key);
                            }
                        }
                    }
                    Some(a) if beyond => {
                        // Raised again before it was acknowledged.
                        a.active = true;
                        a.value = v;
                        a.since_ms = s.ts_ms;
                        events.push(alarm_event(a, s.ts_ms, "raised"));
                    }
                    Some(_) => {}
                    None if beyond => {
                        let a = Alarm {
                            tag: name.clone(),
                            kind,
                            limit,
                            value: v,
                            active: true,
                            acked_by: None,
                            since_ms: s.ts_ms,
                        };
                        events.push(alarm_event(&a, s.ts_ms, "raised"));
                        self.alarms.insert(key, a);
                    }
                    None => {}
                }
            }
        }
    }

    fn ack(&mut self, a: &Ack, user: &str) -> Result<Event, String> {
        let key = (a.tag.clone(), a.kind);
        let alarm = self.alarms.get_mut(&key).ok_or_else(|| format!("no {} alarm on {}", a.kind, a.tag))?;
        if alarm.acked_by.is_some() {
            return Err(format!("the {} alarm on {} is already acknowledged", a.kind, a.tag));
        }
        alarm.acked_by = Some(user.to_string());
        let ev = Event {
            ts_ms: hmi::now_ms(),
            kind: "ack".into(),
            tag: a.tag.clone(),
            user: Some(user.into()),
            value: Some(alarm.value),
            text: format!("{} alarm acknowledged", a.kind),
        };
        if !alarm.active {
            self.alarms.remove(&key);
        }
        tracing::info!(tag = %a.tag, kind = %a.kind, %user, "alarm acknowledged");
        Ok(ev)
    }

    /// Every check a write must pass, in order; the first failure is the operator's answer.
    fn check(&self, s: &Setpoint, now: Instant) -> Result<u16, String> {
        let def = self.plant.tag(&s.tag).ok_or_else(|| format!("no tag {:?}", s.tag))?;
        if !def.writable() {
            return Err(format!("{} is a measurement, not a setpoint", def.name));
        }
        if !s.value.is_finite() {
            return Err("the value is not a number".into());
        }
        if let Some(min) = def.min {
            if s.value < min {
                return Err(format!("{} {} is below the minimum {} {}", s.value, def.unit, min, def.unit));
            }
        }
        if let Some(max) = def.max {
            if s.value > max {
                return Err(format!("{} {} is above the maximum {} {}", s.value, def.unit, max, def.unit));
            }
        }
        if let Some(f) = self.fault_now() {
            return Err(format!("the device is not answering ({f})"));
        }
        if let Some(rate) = def.max_rate {
            // At most max-rate × 1 s at once, refilled at max-rate per second: quick
            // successive writes share one second's allowance.
            let (from, allowed) = self.allowance(def, rate, now);
            if let Some(from) = from {
                if (s.value - from).abs() > allowed + 1e-9 {
                    return Err(format!(
                        "change of {:.1} {} exceeds the allowed rate of {} {}/s (at most {:.1} {} now)",
                        (s.value - from).abs(),
                        def.unit,
                        rate,
                        def.unit,
                        allowed,
                        def.unit
                    ));
                }
            }
        }
        for i in self.plant.interlocks.iter().filter(|i| i.tag == def.name) {
            let Some(v) = self.value(&i.when) else {
                return Err(format!("interlock: {} has no value yet", i.when));
            };
            if i.below.is_some_and(|b| v < b) || i.above.is_some_and(|a| v > a) {
                return Err(format!("interlock: {}", i.reason));
            }
        }
        def.to_raw(s.value).ok_or_else(|| format!("{} cannot be represented in the device register", s.value))
    }

    /// Books an accepted write: what it used of the rate allowance, and the new value.
    fn written(&mut self, s: &Setpoint, raw: u16, now: Instant) {
        let left = match self.plant.tag(&s.tag).and_then(|d| d.max_rate.map(|r| (d, r))) {
            Some((def, rate)) => {
                let (from, allowed) = self.allowance(def, rate, now);
                (allowed - from.map_or(0.0, |f| (s.value - f).abs())).max(0.0)
            }
            None => 0.0,
        };
        self.last_write.insert(s.tag.clone(), (now, s.value, left));
        self.raw.insert(s.tag.clone(), (raw, hmi::now_ms()));
    }

    fn setpoint(&mut self, peers: &mut dyn Peers, s: &Setpoint, user: &str) -> Verdict {
        let now = Instant::now();
        let raw = match self.check(s, now) {
            Ok(r) => r,
            Err(reason) => {
                tracing::info!(tag = %s.tag, %user, "setpoint refused: {reason}");
                return Verdict { accepted: false, reason };
            }
        };
        let Some(register) = self.plant.tag(&s.tag).map(|t| t.register) else {
            return Verdict { accepted: false, reason: format!("no tag {:?}", s.tag) };
        };
        let write = RawWrite { tag: s.tag.clone(), register, raw };
        match peers.write(&write) {
            Ok(()) => {
                self.written(s, raw, now);
                tracing::info!(tag = %s.tag, %user, "setpoint written");
                Verdict { accepted: true, reason: "accepted".into() }
            }
            Err(e) => Verdict { accepted: false, reason: format!("the field layer failed: {e}") },
        }
    }
}

fn alarm_event(a: &Alarm, ts_ms: i64, what: &str) -> Event {
    Event {
        ts_ms,
        kind: "alarm".into(),
        tag: a.tag.clone(),
        user: None,
        value: Some(a.value),
        text: format!("{} alarm {what} (limit {})", a.kind, a.limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logic() -> Logic {
        let plant: hmi::Plant = toml::from_str(
            r#"
[[tag]]
name = "level"
table = "input"
register = 0
scale = 0.1
[[tag]]
name = "sp"
table = "holding"
register = 100
scale = 0.1
min = 0.0
max = 100.0
max-rate = 10.0
[[interlock]]
tag = "sp"
when = "level"
below = 20.0
reason = "level too low"
"#,
        )
        .expect("plant");
        assert!(plant.problems().is_empty());
        let mut l = Logic {
            plant,
            raw: BTreeMap::new(),
            fault: None,
            alarms: BTreeMap::new(),
            last_write: BTreeMap::new(),
            last_sample_ms: 0,
        };
        let mut ev = Vec::new();
        l.sample(
            &Sample { ts_ms: hmi::now_ms(), values: vec![("level".into(), 500), ("sp".into(), 400)], fault: None },
            &mut ev,
        );
        l
    }

    fn sp(v: f64) -> Setpoint {
        Setpoint { token: String::new(), tag: "sp".into(), value: v }
    }

    #[test]
    fn quick_successive_writes_share_one_second_of_rate() {
        let mut l = logic();
        let t0 = Instant::now();
        // 40 -> 50 uses the whole 10/s allowance; a further step at once is refused...
        let raw = l.check(&sp(50.0), t0).expect("first step");
        l.written(&sp(50.0), raw, t0);
        let e = l.check(&sp(51.0), t0 + Duration::from_millis(10)).expect_err("no allowance left");
        assert!(e.contains("exceeds the allowed rate"), "{e}");
        // ... and half a second later, half of it is back.
        assert!(l.check(&sp(54.9), t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check(&sp(55.2), t0 + Duration::from_millis(500)).is_err());
        // Never more than one second's worth, however long the wait.
        assert!(l.check(&sp(61.0), t0 + Duration::from_secs(60)).is_err());
        assert!(l.check(&sp(60.0), t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn stale_values_and_interlocks_refuse_writes() {
        let mut l = logic();
        let now = Instant::now();
        assert!(l.check(&sp(45.0), now).is_ok());
        l.last_sample_ms -= 60_000;
        let e = l.check(&sp(45.0), now).expect_err("stale");
        assert!(e.contains("no fresh sample"), "{e}");
        assert!(l.values().iter().all(|v| v.fault.is_some()), "stale values shown as live");
        let mut ev = Vec::new();
        l.sample(&Sample { ts_ms: hmi::now_ms(), values: vec![("level".into(), 100)], fault: None }, &mut ev);
        let e = l.check(&sp(45.0), now).expect_err("interlock");
        assert_eq!(e, "interlock: level too low");
        assert!(l.check(&sp(f64::NAN), now).is_err());
        assert!(l.check(&sp(150.0), now).expect_err("range").contains("above the maximum"));
    }
}
