//! The HMI reference service's shared vocabulary: the plant's tag table (from the
//! configuration's `[settings.plant]`), and the postcard-encoded bodies the layers exchange.
//!
//! Services and methods (each allowed by the permit table in the default configuration):
//!
//! | from  | to                        | kind | body → reply                         |
//! |-------|---------------------------|------|--------------------------------------|
//! | field | `logic.sample`            | send | [`Sample`]                           |
//! | field | `historian.sample`        | send | [`Sample`]                           |
//! | logic | `field.write`             | call | [`RawWrite`] → `()`                  |
//! | logic | `auth.validate`           | call | [`Token`] → [`SessionInfo`]          |
//! | logic | `historian.event`         | send | [`Event`]                            |
//! | logic | `bridge.update`           | send | [`Update`] (multi-site only)         |
//! | ui    | `auth.login`              | call | [`Login`] → [`SessionInfo`]          |
//! | ui    | `auth.validate`/`logout`  | call | [`Token`] → [`SessionInfo`] / `()`   |
//! | ui    | `logic.values`            | call | `()` → `Vec<`[`TagValue`]`>`         |
//! | ui    | `logic.alarms`            | call | `()` → `Vec<`[`Alarm`]`>`            |
//! | ui    | `logic.ack`               | call | [`Ack`] → `()`                       |
//! | ui    | `logic.setpoint`          | call | [`Setpoint`] → [`Verdict`]           |
//! | ui    | `historian.trend`         | call | [`TrendQuery`] → `Vec<(i64, f64)>`   |
//! | ui    | `historian.export`        | call | [`Range`] → `u64` rows, CSV as bulk  |

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which Modbus table a tag lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    /// Input registers (function 4): measured values, read-only.
    Input,
    /// Holding registers (function 3, written with 6): setpoints.
    Holding,
}

/// One tag of the plant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TagDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub table: Table,
    pub register: u16,
    /// Engineering unit, for display.
    #[serde(default)]
    pub unit: String,
    /// Engineering value = raw (as signed 16-bit when `signed`) × scale + offset.
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub signed: bool,
    /// Alarm limits, in engineering units.
    pub alarm_high: Option<f64>,
    pub alarm_low: Option<f64>,
    /// A raised alarm clears only once the value is this far back inside its limit.
    #[serde(default)]
    pub hysteresis: f64,
    /// Setpoints (holding registers) only: the accepted range and the fastest change, in
    /// engineering units per second, between two accepted writes.
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub max_rate: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl TagDef {
    /// The engineering value of a raw register.
    pub fn to_eng(&self, raw: u16) -> f64 {
        let v = if self.signed { f64::from(raw as i16) } else { f64::from(raw) };
        // Rounded to a millionth, so 399 × 0.1 reads 39.9 and not 39.900000000000006.
        ((v * self.scale + self.offset) * 1e6).round() / 1e6
    }

    /// The raw register for an engineering value, if it is representable.
    pub fn to_raw(&self, eng: f64) -> Option<u16> {
        if !eng.is_finite() || self.scale == 0.0 {
            return None;
        }
        let r = ((eng - self.offset) / self.scale).round();
        if self.signed {
            (f64::from(i16::MIN)..=f64::from(i16::MAX)).contains(&r).then_some(r as i16 as u16)
        } else {
            (0.0..=f64::from(u16::MAX)).contains(&r).then_some(r as u16)
        }
    }

    pub fn writable(&self) -> bool {
        self.table == Table::Holding
    }
}

/// An interlock: writes to `tag` are refused while `when` is below `below` (or above
/// `above`), with `reason` shown to the operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Interlock {
    pub tag: String,
    pub when: String,
    pub below: Option<f64>,
    pub above: Option<f64>,
    pub reason: String,
}

/// `[settings.plant]`: the tag table every HMI layer shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Plant {
    #[serde(default = "d_unit")]
    pub unit_id: u8,
    #[serde(rename = "tag")]
    pub tags: Vec<TagDef>,
    #[serde(default, rename = "interlock")]
    pub interlocks: Vec<Interlock>,
    /// Values older than this count as a device fault (no sample is fresh enough to act on).
    #[serde(default = "d_stale")]
    pub stale_ms: i64,
}

fn d_stale() -> i64 {
    5000
}

fn d_unit() -> u8 {
    1
}

impl Plant {
    pub fn tag(&self, name: &str) -> Option<&TagDef> {
        self.tags.iter().find(|t| t.name == name)
    }

    /// The table if it has no problems, else all of them in one message.
    pub fn validated(self) -> Result<Plant, String> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(format!("bad [settings.plant]: {}", problems.join("; ")))
        }
    }

    /// Problems with the table (each a message), for the workers to refuse to start on.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tags {
            if t.name.is_empty() || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                out.push(format!("tag {:?}: name must be ASCII letters, digits, '_' or '-'", t.name));
            }
            if !seen.insert(&t.name) {
                out.push(format!("tag {}: defined twice", t.name));
            }
            if t.scale == 0.0 || !t.scale.is_finite() {
                out.push(format!("tag {}: scale must be a non-zero number", t.name));
            }
            let numbers = [Some(t.offset), Some(t.hysteresis), t.min, t.max, t.max_rate, t.alarm_high, t.alarm_low];
            if numbers.iter().flatten().any(|v| !v.is_finite()) {
                out.push(format!("tag {}: offset, hysteresis, limits and rates must be finite numbers", t.name));
            }
            if t.max_rate.is_some_and(|r| r <= 0.0) {
                out.push(format!("tag {}: max-rate must be positive", t.name));
            }
            if let (Some(lo), Some(hi)) = (t.min, t.max) {
                if lo > hi {
                    out.push(format!("tag {}: min {lo} above max {hi}", t.name));
                }
            }
            if t.hysteresis < 0.0 {
                out.push(format!("tag {}: negative hysteresis", t.name));
            }
        }
        if !(100..=3_600_000).contains(&self.stale_ms) {
            out.push(format!("stale-ms {} must be 100..=3600000", self.stale_ms));
        }
        for i in &self.interlocks {
            if i.below.iter().chain(&i.above).any(|v| !v.is_finite()) {
                out.push(format!("interlock on {}: bounds must be finite numbers", i.tag));
            }
            if self.tag(&i.tag).is_none_or(|t| !t.writable()) {
                out.push(format!("interlock on {:?}: no such setpoint tag", i.tag));
            }
            if self.tag(&i.when).is_none() {
                out.push(format!("interlock on {}: no such tag {:?}", i.tag, i.when));
            }
        }
        out
    }
}

/// The settings every HMI worker receives.
#[derive(Debug, Clone, Deserialize)]
pub struct PlantSettings {
    pub plant: Plant,
}

/// The plant's state after one sample, in engineering units: what `logic` sends the bridge
/// (`bridge.update`, a durable message) for it to publish beyond the site
/// (`docs/multi-site.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// When the sample was taken (ms since the epoch).
    pub ts_ms: i64,
    /// Every tag read in the sample; empty when the device could not be read.
    pub values: Vec<(String, f64)>,
    pub fault: Option<String>,
    /// The alarms active after this sample.
    pub active_alarms: Vec<(String, AlarmKind)>,
}

/// One poll of the device: raw registers by tag name, or why the poll failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub ts_ms: i64,
    pub values: Vec<(String, u16)>,
    /// Set when the device could not be read: `values` is then empty.
    pub fault: Option<String>,
}

/// A raw register write, already validated by `logic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawWrite {
    pub tag: String,
    pub register: u16,
    pub raw: u16,
}

/// A session token, as issued by `auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub user: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub user: String,
    pub token: String,
    pub expires_ms: i64,
}

/// A tag's current value, in engineering units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagValue {
    pub name: String,
    pub description: String,
    pub value: Option<f64>,
    pub unit: String,
    pub ts_ms: i64,
    pub writable: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Set while the device cannot be read.
    pub fault: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    High,
    Low,
}

impl std::fmt::Display for AlarmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AlarmKind::High => "high",
            AlarmKind::Low => "low",
        })
    }
}

/// An alarm: shown while active or not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    pub tag: String,
    pub kind: AlarmKind,
    pub limit: f64,
    pub value: f64,
    pub active: bool,
    pub acked_by: Option<String>,
    pub since_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub token: String,
    pub tag: String,
    pub kind: AlarmKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setpoint {
    pub token: String,
    pub tag: String,
    pub value: f64,
}

/// The logic layer's answer to a setpoint write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: String,
}

/// Something the historian records besides samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: i64,
    /// `alarm`, `ack`, `setpoint`, `refused`, `fault`.
    pub kind: String,
    pub tag: String,
    pub user: Option<String>,
    pub value: Option<f64>,
    pub text: String,
}

/// The historian's refusal of a trend too large to answer in a call region: the ui then asks
/// through airlockd (no operator sees it).
pub const TOO_LARGE_FOR_REGION: &str = "too large a range for a call region";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrendQuery {
    pub tag: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// At most this many points (the historian averages into buckets beyond it).
    pub max_points: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Encodes a body.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

/// Decodes a body, with an error a caller can return as the reply.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(b).map_err(|e| format!("malformed body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(signed: bool) -> TagDef {
        TagDef {
            name: "t".into(),
            description: String::new(),
            table: Table::Holding,
            register: 0,
            unit: "C".into(),
            scale: 0.1,
            offset: 0.0,
            signed,
            alarm_high: None,
            alarm_low: None,
            hysteresis: 0.0,
            min: None,
            max: None,
            max_rate: None,
        }
    }

    #[test]
    fn scaling_round_trips_and_refuses_what_a_register_cannot_hold() {
        let t = tag(false);
        assert_eq!(t.to_raw(42.3), Some(423));
        assert!((t.to_eng(423) - 42.3).abs() < 1e-9);
        assert_eq!(t.to_raw(-1.0), None);
        assert_eq!(t.to_raw(7000.0), None);
        assert_eq!(t.to_raw(f64::NAN), None);
        let s = tag(true);
        assert_eq!(s.to_raw(-5.0), Some((-50i16) as u16));
        assert!((s.to_eng((-50i16) as u16) + 5.0).abs() < 1e-9);
    }
}
