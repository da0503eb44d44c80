//! The permit table: which worker may call or send which service and method, in which state.
//! Data an auditor reads (`airlock permits`), enforced by the broker on every request.
//! Pure decisions: no I/O here, so every rule is testable without a process.
//!
//! Every worker starts in state `initial`. A permit may `grant` a state: when a call it allows
//! succeeds, the caller moves to that state (for example `ui` calling `auth.login` grants
//! `operator`). A restart puts the worker back in `initial`. Anything not permitted is refused
//! (fail closed).

use serde::{Deserialize, Serialize};

/// The state every worker starts in.
pub const INITIAL_STATE: &str = "initial";

/// Call (synchronous, with a reply) or send (asynchronous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Call,
    Send,
    /// A shared-memory stream of records (`to` = `service.name`), set up by airlockd.
    Stream,
    /// A shared region for calls answered in place (`to` = `service.method`), set up by
    /// airlockd.
    ShmCall,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Call => "call",
            Kind::Send => "send",
            Kind::Stream => "stream",
            Kind::ShmCall => "shm-call",
        })
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Permit {
    /// The calling worker.
    pub from: String,
    /// `service.method` or `service.*`.
    pub to: String,
    pub kind: Kind,
    /// The caller's required state; `*` (default) for any.
    #[serde(default = "any_state")]
    pub state: String,
    /// The state a successful call moves the caller to.
    pub grant: Option<String>,
    /// Streams only: the ring's size in KiB (a power of two, 4 to 65536; default 256).
    pub ring_kib: Option<u32>,
    /// Streams only: the largest record in bytes (at most a quarter of the ring; default 16384).
    pub max_record: Option<u32>,
    /// Shm-calls only: the region's size in KiB (4 to 65536; default 64). A request or an
    /// answer is at most the region (less a 16-byte tag when encrypted).
    pub region_kib: Option<u32>,
    /// Streams and shm-calls only: records or messages travel unencrypted and unauthenticated
    /// (default: encrypted with a per-stream or per-region key). Shown in `airlock permits`.
    #[serde(default)]
    pub plaintext: bool,
}

impl Default for Permit {
    fn default() -> Permit {
        Permit {
            from: String::new(),
            to: String::new(),
            kind: Kind::Call,
            state: any_state(),
            grant: None,
            ring_kib: None,
            max_record: None,
            region_kib: None,
            plaintext: false,
        }
    }
}

impl Permit {
    /// A stream permit's sizes and mode (defaults filled in); `None` for other kinds.
    pub fn stream_params(&self) -> Option<airlock_protocol::stream::StreamParams> {
        (self.kind == Kind::Stream).then(|| airlock_protocol::stream::StreamParams {
            ring_bytes: self.ring_kib.unwrap_or(256).saturating_mul(1024),
            max_record: self.max_record.unwrap_or(16 * 1024),
            encrypted: !self.plaintext,
        })
    }
}

impl Permit {
    /// A shm-call permit's region size and mode (defaults filled in); `None` for other kinds.
    pub fn region_params(&self) -> Option<airlock_protocol::region::RegionParams> {
        (self.kind == Kind::ShmCall).then(|| airlock_protocol::region::RegionParams {
            region_bytes: self.region_kib.unwrap_or(64).saturating_mul(1024),
            encrypted: !self.plaintext,
        })
    }
}

fn any_state() -> String {
    "*".into()
}

impl Permit {
    fn matches(&self, from: &str, state: &str, service: &str, method: &str, kind: Kind) -> bool {
        if self.from != from || self.kind != kind || (self.state != "*" && self.state != state) {
            return false;
        }
        match self.to.split_once('.') {
            Some((s, "*")) => s == service,
            Some((s, m)) => s == service && m == method,
            None => false,
        }
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; on success the caller moves to `grant`, if any.
    Allow { grant: Option<String> },
    /// Refused, with the reason given to the caller and logged.
    Refuse(String),
}

/// Decides whether `from` (in `state`) may `kind` `service.method`.
/// The row that allows the request, if any: the one [`decide`] allows by (for a stream, its
/// sizes and mode come from exactly this row).
pub fn matching<'a>(
    table: &'a [Permit],
    from: &str,
    state: &str,
    service: &str,
    method: &str,
    kind: Kind,
) -> Option<&'a Permit> {
    table.iter().find(|p| p.matches(from, state, service, method, kind))
}

pub fn decide(table: &[Permit], from: &str, state: &str, service: &str, method: &str, kind: Kind) -> Decision {
    match table.iter().find(|p| p.matches(from, state, service, method, kind)) {
        Some(p) => Decision::Allow { grant: p.grant.clone() },
        None => {
            let other_state = table.iter().any(|p| {
                p.matches(from, "*", service, method, kind)
                    || (p.from == from && p.state != "*" && p.matches(from, &p.state, service, method, kind))
            });
            let why = if other_state {
                format!("{from} may not {kind} {service}.{method} in state {state}")
            } else {
                format!("{from} may not {kind} {service}.{method}")
            };
            Decision::Refuse(why)
        }
    }
}

/// Problems in a table, for configuration validation (each a message).
pub fn validate(table: &[Permit], workers: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in table {
        if !workers.contains(&p.from) {
            out.push(format!("permit from {:?}: no such worker", p.from));
        }
        match p.to.split_once('.') {
            Some((s, m)) if !s.is_empty() && !m.is_empty() => {}
            _ => out.push(format!("permit to {:?}: must be service.method or service.*", p.to)),
        }
        if p.grant.is_some() && p.kind != Kind::Call {
            out.push(format!(
                "permit {} -> {}: only a call can grant a state (a {} has no reply)",
                p.from, p.to, p.kind
            ));
        }
        match p.stream_params() {
            Some(params) => {
                if let Err(e) = params.validate() {
                    out.push(format!("permit {} -> {}: {e}", p.from, p.to));
                }
            }
            None if p.ring_kib.is_some() || p.max_record.is_some() => {
                out.push(format!("permit {} -> {}: ring-kib and max-record belong to kind = \"stream\"", p.from, p.to))
            }
            None => {}
        }
        match p.region_params() {
            Some(params) => {
                if let Err(e) = params.validate() {
                    out.push(format!("permit {} -> {}: {e}", p.from, p.to));
                }
            }
            None if p.region_kib.is_some() => {
                out.push(format!("permit {} -> {}: region-kib belongs to kind = \"shm-call\"", p.from, p.to))
            }
            None => {}
        }
        if p.plaintext && !matches!(p.kind, Kind::Stream | Kind::ShmCall) {
            out.push(format!("permit {} -> {}: plaintext belongs to kind = \"stream\" or \"shm-call\"", p.from, p.to));
        }
    }
    out
}

/// The table as an auditor reads it.
pub fn render(table: &[Permit]) -> String {
    let mut rows: Vec<&Permit> = table.iter().collect();
    rows.sort_by(|a, b| (&a.from, &a.to, a.kind as u8, &a.state).cmp(&(&b.from, &b.to, b.kind as u8, &b.state)));
    let mut s = format!("{:<12} {:<8} {:<28} {:<12} {}\n", "FROM", "KIND", "TO", "STATE", "GRANTS / AREA");
    for p in rows {
        s.push_str(&format!(
            "{:<12} {:<8} {:<28} {:<12} {}\n",
            p.from,
            p.kind,
            p.to,
            p.state,
            match (p.stream_params(), p.region_params()) {
                (Some(sp), _) => format!(
                    "ring {} KiB, records <= {} B, {}",
                    sp.ring_bytes / 1024,
                    sp.max_record,
                    if sp.encrypted { "encrypted" } else { "PLAINTEXT" }
                ),
                (None, Some(rp)) => format!(
                    "region {} KiB, messages <= {} B, {}",
                    rp.region_bytes / 1024,
                    rp.max_message(),
                    if rp.encrypted { "encrypted" } else { "PLAINTEXT" }
                ),
                (None, None) => p.grant.clone().unwrap_or_else(|| "-".into()),
            }
        ));
    }
    if table.is_empty() {
        s.push_str("(no permits: workers may not call or send to each other)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<Permit> {
        vec![
            Permit {
                from: "ui".into(),
                to: "auth.login".into(),
                kind: Kind::Call,
                state: "*".into(),
                grant: Some("operator".into()),
                ..Permit::default()
            },
            Permit {
                from: "ui".into(),
                to: "control.write_setpoint".into(),
                kind: Kind::Call,
                state: "operator".into(),
                grant: None,
                ..Permit::default()
            },
            Permit {
                from: "field".into(),
                to: "logic.*".into(),
                kind: Kind::Send,
                state: "*".into(),
                grant: None,
                ..Permit::default()
            },
        ]
    }

    #[test]
    fn login_is_allowed_in_any_state_and_grants_operator() {
        for st in [INITIAL_STATE, "operator"] {
            assert_eq!(
                decide(&table(), "ui", st, "auth", "login", Kind::Call),
                Decision::Allow { grant: Some("operator".into()) }
            );
        }
    }

    #[test]
    fn setpoint_needs_the_operator_state() {
        assert_eq!(
            decide(&table(), "ui", "operator", "control", "write_setpoint", Kind::Call),
            Decision::Allow { grant: None }
        );
        match decide(&table(), "ui", INITIAL_STATE, "control", "write_setpoint", Kind::Call) {
            Decision::Refuse(w) => assert_eq!(w, "ui may not call control.write_setpoint in state initial"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wildcard_method_allows_every_method_of_that_kind_only() {
        assert!(matches!(
            decide(&table(), "field", INITIAL_STATE, "logic", "sample", Kind::Send),
            Decision::Allow { .. }
        ));
        assert!(matches!(decide(&table(), "field", INITIAL_STATE, "logic", "sample", Kind::Call), Decision::Refuse(_)));
        assert!(matches!(
            decide(&table(), "field", INITIAL_STATE, "historian", "sample", Kind::Send),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn anything_unlisted_is_refused() {
        match decide(&table(), "logic", INITIAL_STATE, "auth", "login", Kind::Call) {
            Decision::Refuse(w) => assert_eq!(w, "logic may not call auth.login"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decide(&[], "ui", INITIAL_STATE, "auth", "login", Kind::Call), Decision::Refuse(_)));
    }

    #[test]
    fn validation_catches_bad_rows() {
        let bad = vec![
            Permit {
                from: "ghost".into(),
                to: "a.b".into(),
                kind: Kind::Call,
                state: "*".into(),
                grant: None,
                ..Permit::default()
            },
            Permit {
                from: "ui".into(),
                to: "nodot".into(),
                kind: Kind::Call,
                state: "*".into(),
                grant: None,
                ..Permit::default()
            },
            Permit {
                from: "ui".into(),
                to: "a.b".into(),
                kind: Kind::Send,
                state: "*".into(),
                grant: Some("x".into()),
                ..Permit::default()
            },
        ];
        let p = validate(&bad, &["ui".into()]);
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn render_lists_every_row_sorted() {
        let r = render(&table());
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("field"));
        assert!(lines[2].contains("auth.login") && lines[2].contains("operator"));
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn stream(extra: Permit) -> Permit {
        Permit { from: "field".into(), to: "historian.samples".into(), kind: Kind::Stream, ..extra }
    }

    #[test]
    fn a_stream_permit_allows_only_its_stream_and_has_defaults() {
        let t = vec![stream(Permit::default())];
        assert!(matches!(
            decide(&t, "field", INITIAL_STATE, "historian", "samples", Kind::Stream),
            Decision::Allow { .. }
        ));
        assert!(matches!(decide(&t, "field", INITIAL_STATE, "historian", "samples", Kind::Send), Decision::Refuse(_)));
        assert!(matches!(decide(&t, "ui", INITIAL_STATE, "historian", "samples", Kind::Stream), Decision::Refuse(_)));
        let sp = t[0].stream_params().expect("a stream");
        assert_eq!((sp.ring_bytes, sp.max_record, sp.encrypted), (256 * 1024, 16 * 1024, true));
        assert!(validate(&t, &["field".into()]).is_empty());
        assert!(render(&t).contains("ring 256 KiB, records <= 16384 B, encrypted"), "{}", render(&t));
    }

    #[test]
    fn stream_sizes_are_checked_and_belong_to_streams_only() {
        let bad = vec![
            stream(Permit { ring_kib: Some(3), ..Permit::default() }),
            stream(Permit { ring_kib: Some(4), max_record: Some(2048), ..Permit::default() }),
            Permit { from: "field".into(), to: "a.b".into(), kind: Kind::Send, plaintext: true, ..Permit::default() },
            stream(Permit { grant: Some("x".into()), ..Permit::default() }),
        ];
        let p = validate(&bad, &["field".into()]);
        assert_eq!(p.len(), 4, "{p:?}");
        let plain = vec![stream(Permit { plaintext: true, ..Permit::default() })];
        assert!(render(&plain).contains("PLAINTEXT"));
    }
}

#[cfg(test)]
mod region_tests {
    use super::*;

    fn region(extra: Permit) -> Permit {
        Permit { from: "ui".into(), to: "historian.export".into(), kind: Kind::ShmCall, ..extra }
    }

    #[test]
    fn a_shm_call_permit_allows_only_its_region_and_has_defaults() {
        let t = vec![region(Permit::default())];
        assert!(matches!(
            decide(&t, "ui", INITIAL_STATE, "historian", "export", Kind::ShmCall),
            Decision::Allow { .. }
        ));
        // Neither a call nor a stream of the same name, nor another method.
        for (m, k) in [("export", Kind::Call), ("export", Kind::Stream), ("trend", Kind::ShmCall)] {
            assert!(matches!(decide(&t, "ui", INITIAL_STATE, "historian", m, k), Decision::Refuse(_)), "{m} {k}");
        }
        let rp = t[0].region_params().expect("a region");
        assert_eq!((rp.region_bytes, rp.encrypted), (64 * 1024, true));
        assert!(t[0].stream_params().is_none());
        assert!(validate(&t, &["ui".into()]).is_empty());
        let text = render(&t);
        assert!(text.contains("shm-call") && text.contains("region 64 KiB, messages <= 65520 B, encrypted"), "{text}");
        let plain = vec![region(Permit { plaintext: true, region_kib: Some(1025), ..Permit::default() })];
        assert!(render(&plain).contains("region 1025 KiB, messages <= 1049600 B, PLAINTEXT"), "{}", render(&plain));
    }

    #[test]
    fn region_sizes_are_checked_and_belong_to_shm_calls_only() {
        let bad = vec![
            region(Permit { region_kib: Some(2), ..Permit::default() }),
            region(Permit { region_kib: Some(65537), ..Permit::default() }),
            region(Permit { ring_kib: Some(64), ..Permit::default() }),
            Permit {
                from: "ui".into(),
                to: "a.b".into(),
                kind: Kind::Stream,
                region_kib: Some(64),
                ..Permit::default()
            },
            region(Permit { grant: Some("x".into()), ..Permit::default() }),
        ];
        let p = validate(&bad, &["ui".into()]);
        assert_eq!(p.len(), 5, "{p:?}");
        let toml = "from = \"ui\"\nto = \"historian.export\"\nkind = \"shm-call\"\nregion-kib = 256\n";
        let parsed: Permit = toml::from_str(toml).expect("a shm-call permit parses");
        assert_eq!(parsed.region_params().map(|r| r.region_bytes), Some(256 * 1024));
    }
}
