//! Sparkplug B 3.0 for an edge node: the payload (the fields of Eclipse Tahu's
//! `sparkplug_b.proto` an edge node uses, declared with prost's derive; fields we do not
//! declare are skipped when decoding), the topics, and the node's metric table built from the
//! plant: NBIRTH with every metric and its properties, NDATA by exception with a deadband,
//! NDEATH with `bdSeq`.

use std::collections::BTreeMap;

use crate::types::{AlarmKind, Plant, Update};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

impl Payload {
    /// The payload's protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    Int(u32),
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueKind", tags = "6, 8")]
    pub value: Option<PropertyValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    #[prost(double, tag = "6")]
    Double(f64),
    #[prost(string, tag = "8")]
    String(String),
}

/// Sparkplug's data types (the `DataType` enum), the ones this node uses.
pub mod datatype {
    pub const UINT64: u32 = 8;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
}

/// The node's own metrics.
pub const BD_SEQ: &str = "bdSeq";
pub const REBIRTH: &str = "Node Control/Rebirth";
pub const SAMPLE_TIME: &str = "Node Info/Sample Time";
pub const DEVICE_FAULT: &str = "Device/Fault";

/// `spBv1.0/<group>/<type>/<edge node>`.
pub fn topic(group: &str, kind: &str, node: &str) -> String {
    format!("spBv1.0/{group}/{kind}/{node}")
}

/// The primary host's STATE topic (Sparkplug 3.0).
pub fn state_topic(host: &str) -> String {
    format!("spBv1.0/STATE/{host}")
}

/// Whether `id` may be a group, edge node or host id: not empty, and none of MQTT's
/// separators and wildcards (`/`, `+`, `#`).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(['/', '+', '#']) && !id.chars().any(char::is_control)
}

/// One metric's value, as the node tracks it.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Double(f64),
    Boolean(bool),
    Text(String),
    DateTime(u64),
}

impl Val {
    fn datatype(&self) -> u32 {
        match self {
            Val::Double(_) => datatype::DOUBLE,
            Val::Boolean(_) => datatype::BOOLEAN,
            Val::Text(_) => datatype::STRING,
            Val::DateTime(_) => datatype::DATETIME,
        }
    }

    fn wire(&self) -> Value {
        match self {
            Val::Double(v) => Value::Double(*v),
            Val::Boolean(b) => Value::Boolean(*b),
            Val::Text(s) => Value::String(s.clone()),
            Val::DateTime(t) => Value::Long(*t),
        }
    }
}

/// A metric of the node: its name, what it says about itself in NBIRTH, its deadband.
#[derive(Debug, Clone)]
struct MetricDef {
    name: String,
    datatype: u32,
    properties: Option<PropertySet>,
    deadband: f64,
}

/// The node's metric table and the values last published (the deadband's reference).
#[derive(Debug, Clone)]
pub struct Node {
    defs: Vec<MetricDef>,
    /// For each metric, its value and when it was taken (ms since the epoch).
    current: BTreeMap<String, (Val, i64)>,
    sample_time: bool,
}

/// Where a value stands against the last one published: whether it is news.
fn changed(def_deadband: f64, old: Option<&Val>, new: &Val) -> bool {
    match (old, new) {
        (Some(Val::Double(a)), Val::Double(b)) => (a - b).abs() > def_deadband || a.is_nan() != b.is_nan(),
        (Some(a), b) => a != b,
        (None, _) => true,
    }
}

fn props(pairs: Vec<(&str, PropertyValueKind)>) -> Option<PropertySet> {
    if pairs.is_empty() {
        return None;
    }
    let (keys, values) = pairs
        .into_iter()
        .map(|(k, v)| {
            let t = match v {
                PropertyValueKind::Double(_) => datatype::DOUBLE,
                PropertyValueKind::String(_) => datatype::STRING,
            };
            (k.to_string(), PropertyValue { r#type: Some(t), is_null: None, value: Some(v) })
        })
        .unzip();
    Some(PropertySet { keys, values })
}

/// The alarm metric of `tag` for `kind`.
pub fn alarm_metric(tag: &str, kind: AlarmKind) -> String {
    match kind {
        AlarmKind::High => format!("{tag}/Alarm High"),
        AlarmKind::Low => format!("{tag}/Alarm Low"),
    }
}

impl Node {
    /// The metric table for `plant`: every tag (Double, with its unit, range and description
    /// as properties), a Boolean per alarm limit, the device fault, the sample time when
    /// `sample_time` (a heartbeat that tells a quiet plant from a silent link), and the node
    /// controls. `deadbands` overrides `deadband` per tag.
    pub fn new(plant: &Plant, deadband: f64, deadbands: &BTreeMap<String, f64>, sample_time: bool) -> Node {
        let mut defs = Vec::new();
        for t in &plant.tags {
            let mut p = vec![("engUnit", PropertyValueKind::String(t.unit.clone()))];
            if !t.description.is_empty() {
                p.push(("Documentation", PropertyValueKind::String(t.description.clone())));
            }
            if let Some(lo) = t.min {
                p.push(("engLow", PropertyValueKind::Double(lo)));
            }
            if let Some(hi) = t.max {
                p.push(("engHigh", PropertyValueKind::Double(hi)));
            }
            defs.push(MetricDef {
                name: t.name.clone(),
                datatype: datatype::DOUBLE,
                properties: props(p),
                deadband: deadbands.get(&t.name).copied().unwrap_or(deadband),
            });
            for (kind, limit) in [(AlarmKind::High, t.alarm_high), (AlarmKind::Low, t.alarm_low)] {
                if let Some(limit) = limit {
                    defs.push(MetricDef {
                        name: alarm_metric(&t.name, kind),
                        datatype: datatype::BOOLEAN,
                        properties: props(vec![("limit", PropertyValueKind::Double(limit))]),
                        deadband: 0.0,
                    });
                }
            }
        }
        defs.push(MetricDef { name: DEVICE_FAULT.into(), datatype: datatype::STRING, properties: None, deadband: 0.0 });
        if sample_time {
            defs.push(MetricDef {
                name: SAMPLE_TIME.into(),
                datatype: datatype::DATETIME,
                properties: None,
                deadband: 0.0,
            });
        }
        Node { defs, current: BTreeMap::new(), sample_time }
    }

    /// The metrics' values after `u`: every tag read, every alarm, the fault, the sample time.
    fn values_of(&self, plant_alarms: &[(String, AlarmKind)], u: &Update) -> Vec<(String, Val)> {
        let mut out: Vec<(String, Val)> = u.values.iter().map(|(n, v)| (n.clone(), Val::Double(*v))).collect();
        for (tag, kind) in plant_alarms {
            let active = u.active_alarms.iter().any(|(t, k)| t == tag && k == kind);
            out.push((alarm_metric(tag, *kind), Val::Boolean(active)));
        }
        out.push((DEVICE_FAULT.into(), Val::Text(u.fault.clone().unwrap_or_default())));
        if self.sample_time {
            out.push((SAMPLE_TIME.into(), Val::DateTime(u64::try_from(u.ts_ms).unwrap_or(0))));
        }
        out
    }

    /// The alarm metrics the table has, as (tag, kind).
    fn alarms(&self, plant: &Plant) -> Vec<(String, AlarmKind)> {
        plant
            .tags
            .iter()
            .flat_map(|t| {
                [(AlarmKind::High, t.alarm_high), (AlarmKind::Low, t.alarm_low)]
                    .into_iter()
                    .filter(|(_, l)| l.is_some())
                    .map(|(k, _)| (t.name.clone(), k))
            })
            .collect()
    }

    /// Takes `u` in: returns the metrics it changed beyond their deadbands (what NDATA
    /// carries), `historical` set on each when asked, and makes them the new reference.
    pub fn apply(&mut self, plant: &Plant, u: &Update, historical: bool) -> Vec<Metric> {
        let alarms = self.alarms(plant);
        let mut out = Vec::new();
        for (name, val) in self.values_of(&alarms, u) {
            let Some(def) = self.defs.iter().find(|d| d.name == name) else { continue };
            if !changed(def.deadband, self.current.get(&name).map(|(v, _)| v), &val) {
                continue;
            }
            out.push(Metric {
                name: Some(name.clone()),
                timestamp: Some(u64::try_from(u.ts_ms).unwrap_or(0)),
                datatype: Some(def.datatype),
                is_historical: historical.then_some(true),
                value: Some(val.wire()),
                ..Metric::default()
            });
            self.current.insert(name, (val, u.ts_ms));
        }
        out
    }

    /// NBIRTH's metrics: `bdSeq`, the rebirth control, then every metric of the table with
    /// its properties and its current value (null until the first sample).
    pub fn birth(&self, bd_seq: u64, now_ms: u64) -> Vec<Metric> {
        let mut out = vec![
            Metric {
                name: Some(BD_SEQ.into()),
                timestamp: Some(now_ms),
                datatype: Some(datatype::UINT64),
                value: Some(Value::Long(bd_seq)),
                ..Metric::default()
            },
            Metric {
                name: Some(REBIRTH.into()),
                timestamp: Some(now_ms),
                datatype: Some(datatype::BOOLEAN),
                value: Some(Value::Boolean(false)),
                ..Metric::default()
            },
        ];
        for d in &self.defs {
            let cur = self.current.get(&d.name);
            out.push(Metric {
                name: Some(d.name.clone()),
                timestamp: Some(cur.map_or(now_ms, |(_, ts)| u64::try_from(*ts).unwrap_or(0))),
                datatype: Some(d.datatype),
                is_null: cur.is_none().then_some(true),
                properties: d.properties.clone(),
                value: cur.map(|(v, _)| {
                    debug_assert_eq!(v.datatype(), d.datatype);
                    v.wire()
                }),
                ..Metric::default()
            });
        }
        out
    }

    /// The reference values, to save and restore around a publication that may not arrive.
    pub fn snapshot(&self) -> BTreeMap<String, (Val, i64)> {
        self.current.clone()
    }

    pub fn restore(&mut self, s: BTreeMap<String, (Val, i64)>) {
        self.current = s;
    }
}

/// NDEATH (and the will): `bdSeq` only, no `seq`.
pub fn death(bd_seq: u64, now_ms: u64) -> Payload {
    Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some(BD_SEQ.into()),
            timestamp: Some(now_ms),
            datatype: Some(datatype::UINT64),
            value: Some(Value::Long(bd_seq)),
            ..Metric::default()
        }],
        ..Payload::default()
    }
}

/// Decodes a payload (for consumers: the tests and the benchmark).
pub fn decode(payload: &[u8]) -> Result<Payload, String> {
    <Payload as prost::Message>::decode(payload).map_err(|e| format!("not a Sparkplug B payload: {e}"))
}

/// What a command (NCMD) asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `Node Control/Rebirth` = true: publish NBIRTH again.
    Rebirth,
    /// Anything else: refused (remote writes are not accepted); the metric names, for the log.
    Refused(Vec<String>),
}

/// Decodes an NCMD payload (from the broker: untrusted).
pub fn command(payload: &[u8]) -> Result<Command, String> {
    let p = decode(payload)?;
    let mut refused = Vec::new();
    let mut rebirth = false;
    for m in &p.metrics {
        let name = m.name.clone().unwrap_or_else(|| format!("alias {}", m.alias.unwrap_or(0)));
        if name == REBIRTH && m.value == Some(Value::Boolean(true)) {
            rebirth = true;
        } else {
            refused.push(name);
        }
    }
    Ok(if rebirth && refused.is_empty() { Command::Rebirth } else { Command::Refused(refused) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn plant() -> Plant {
        toml::from_str::<crate::types::PlantSettings>(
            r#"
            [plant]
            [[plant.tag]]
            name = "level"
            table = "input"
            register = 0
            unit = "%"
            alarm-high = 90.0
            [[plant.tag]]
            name = "valve"
            table = "holding"
            register = 1
            min = 0.0
            max = 100.0
            "#,
        )
        .map(|s| s.plant)
        .expect("plant")
    }

    fn update(ts: i64, level: f64, high: bool) -> Update {
        Update {
            ts_ms: ts,
            values: vec![("level".into(), level), ("valve".into(), 10.0)],
            fault: None,
            active_alarms: if high { vec![("level".into(), AlarmKind::High)] } else { vec![] },
        }
    }

    #[test]
    fn birth_lists_every_metric_with_its_type_and_properties_and_data_is_by_exception() {
        let p = plant();
        let mut n = Node::new(&p, 0.5, &BTreeMap::new(), true);
        let birth = n.birth(3, 1000);
        let names: Vec<_> = birth.iter().map(|m| m.name.clone().unwrap_or_default()).collect();
        assert_eq!(
            names,
            ["bdSeq", REBIRTH, "level", "level/Alarm High", "valve", DEVICE_FAULT, SAMPLE_TIME].map(String::from)
        );
        assert_eq!(birth[0].value, Some(Value::Long(3)));
        assert_eq!(birth[2].is_null, Some(true), "no sample yet: null");
        let level_props = birth[2].properties.clone().expect("properties");
        assert_eq!(level_props.keys, ["engUnit"]);
        let valve_props = birth[4].properties.clone().expect("properties");
        assert_eq!(valve_props.keys, ["engUnit", "engLow", "engHigh"]);

        let first = n.apply(&p, &update(2000, 50.0, false), false);
        assert_eq!(first.len(), 5, "everything is news the first time: {first:?}");
        // Within the deadband: only the sample time changes.
        let second = n.apply(&p, &update(2500, 50.4, false), false);
        assert_eq!(second.iter().map(|m| m.name.clone().unwrap_or_default()).collect::<Vec<_>>(), [SAMPLE_TIME]);
        // Beyond it, with the alarm raised, as historical data.
        let third = n.apply(&p, &update(3000, 95.0, true), true);
        let names: Vec<_> = third.iter().map(|m| m.name.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["level", "level/Alarm High", SAMPLE_TIME]);
        assert!(third.iter().all(|m| m.is_historical == Some(true) && m.timestamp == Some(3000)));
        // The birth now carries the current values with their own timestamps.
        let birth = n.birth(3, 4000);
        assert_eq!(birth[2].value, Some(Value::Double(95.0)));
        assert_eq!(birth[2].timestamp, Some(3000));
        assert_eq!(birth[2].is_null, None);
    }

    #[test]
    fn a_restored_reference_publishes_again_what_followed_it() {
        let p = plant();
        let mut n = Node::new(&p, 0.0, &BTreeMap::new(), false);
        n.apply(&p, &update(1, 1.0, false), false);
        let confirmed = n.snapshot();
        assert_eq!(n.apply(&p, &update(2, 2.0, false), false).len(), 1);
        n.restore(confirmed);
        assert_eq!(n.apply(&p, &update(2, 2.0, false), true).len(), 1, "sent again after the link broke");
    }

    #[test]
    fn commands_other_than_rebirth_are_refused_by_name_and_garbage_is_an_error() {
        let ask = |metrics: Vec<Metric>| Payload { metrics, ..Payload::default() }.encode_to_vec();
        let rebirth = Metric { name: Some(REBIRTH.into()), value: Some(Value::Boolean(true)), ..Metric::default() };
        let write = Metric { name: Some("valve".into()), value: Some(Value::Double(80.0)), ..Metric::default() };
        assert_eq!(command(&ask(vec![rebirth.clone()])), Ok(Command::Rebirth));
        assert_eq!(command(&ask(vec![write.clone()])), Ok(Command::Refused(vec!["valve".into()])));
        assert_eq!(command(&ask(vec![rebirth, write])), Ok(Command::Refused(vec!["valve".into()])));
        assert!(command(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn ids_with_mqtt_separators_or_wildcards_are_refused() {
        assert!(valid_id("plant-a"));
        for bad in ["", "a/b", "a+", "#", "a\nb"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
