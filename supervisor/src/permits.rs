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
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Call => "call",
            Kind::Send => "send",
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
        if p.grant.is_some() && p.kind == Kind::Send {
            out.push(format!("permit {} -> {}: only a call can grant a state (a send has no reply)", p.from, p.to));
        }
    }
    out
}

/// The table as an auditor reads it.
pub fn render(table: &[Permit]) -> String {
    let mut rows: Vec<&Permit> = table.iter().collect();
    rows.sort_by(|a, b| (&a.from, &a.to, a.kind as u8, &a.state).cmp(&(&b.from, &b.to, b.kind as u8, &b.state)));
    let mut s = format!("{:<12} {:<5} {:<28} {:<12} {}\n", "FROM", "KIND", "TO", "STATE", "GRANTS");
    for p in rows {
        s.push_str(&format!(
            "{:<12} {:<5} {:<28} {:<12} {}\n",
            p.from,
            p.kind,
            p.to,
            p.state,
            p.grant.as_deref().unwrap_or("-")
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
            },
            Permit {
                from: "ui".into(),
                to: "control.write_setpoint".into(),
                kind: Kind::Call,
                state: "operator".into(),
                grant: None,
            },
            Permit { from: "field".into(), to: "logic.*".into(), kind: Kind::Send, state: "*".into(), grant: None },
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
            Permit { from: "ghost".into(), to: "a.b".into(), kind: Kind::Call, state: "*".into(), grant: None },
            Permit { from: "ui".into(), to: "nodot".into(), kind: Kind::Call, state: "*".into(), grant: None },
            Permit {
                from: "ui".into(),
                to: "a.b".into(),
                kind: Kind::Send,
                state: "*".into(),
                grant: Some("x".into()),
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
