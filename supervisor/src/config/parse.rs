//! Reading a configuration file: TOML syntax and types, then every semantic check, with
//! every problem reported with its line (not just the first).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::*;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub line: usize,
    pub message: String,
}

/// Every problem found, formatted as `PATH:LINE: message` lines.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.source_name, .problems))]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

fn render(name: &str, problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("{name}:{}: {}", p.line, p.message)).collect::<Vec<_>>().join("\n")
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The TOML parser stops at the first syntax or type error. To list every one, the file is
/// decoded again in pieces: each top-level table (a `[[worker]]` with its `[worker.*]`
/// sub-tables, `[supervisor]`, each `[[permit]]`, ...) on its own, its lines counted from
/// where it starts. An error only the whole file has (a table defined twice across pieces)
/// is reported as the parser gave it.
fn every_decoding_problem(text: &str, whole: &toml::de::Error) -> Vec<ConfigProblem> {
    let problem = |e: &toml::de::Error, piece: &str, first_line: usize| ConfigProblem {
        line: first_line + e.span().map_or(0, |s| line_of(piece, s.start) - 1),
        message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
    };
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        // A table header, not a line of a multi-line array: `[name]` or `[[name]]` alone.
        let body = t.split('#').next().unwrap_or("").trim_end();
        let header = body.starts_with('[') && body.ends_with(']') && !body.contains([',', '=']);
        let worker_part = t.starts_with("[worker.") || t.starts_with("[[worker.");
        if header && !worker_part && at != 0 {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    let mut problems: Vec<ConfigProblem> = starts
        .windows(2)
        .filter_map(|w| {
            let piece = &text[w[0]..w[1]];
            toml::from_str::<Config>(piece).err().map(|e| problem(&e, piece, line_of(text, w[0])))
        })
        .collect();
    // What the parser said of the whole file, unless a piece already said it at that line (an
    // error only the whole file has, such as a table defined twice across pieces).
    let first = problem(whole, text, 1);
    if !problems.iter().any(|p| p.line == first.line) {
        problems.push(first);
        problems.sort_by_key(|p| p.line);
    }
    problems
}

/// Parses and validates a configuration. `known_policies` are the policy names compiled in.
pub fn parse(text: &str, source_name: &str, known_policies: &[String]) -> Result<Config, ConfigError> {
    let cfg: Config = toml::from_str(text)
        .map_err(|e| ConfigError { source_name: source_name.into(), problems: every_decoding_problem(text, &e) })?;
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut services: BTreeMap<String, String> = BTreeMap::new();
    let mut fixed_uids: BTreeMap<u32, String> = BTreeMap::new();
    let [lo, hi] = cfg.supervisor.dynamic_uid_range;
    let range_line = text.find("dynamic-uid-range").map_or(1, |at| line_of(text, at));
    if lo == 0 || lo > hi {
        problems.push(ConfigProblem {
            line: range_line,
            message: format!("dynamic-uid-range [{lo}, {hi}] must be non-empty and exclude 0"),
        });
    }
    if cfg.workers.is_empty() {
        problems.push(ConfigProblem { line: 1, message: "no [[worker]] defined".into() });
    }
    for (index, w) in cfg.workers.iter().enumerate() {
        let name = w.name.get_ref();
        let line = line_of(text, w.name.span().start);
        let mut bad =
            |line: usize, m: String| problems.push(ConfigProblem { line, message: format!("worker {name}: {m}") });
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bad(line, "name must be non-empty ASCII letters, digits, '-' or '_'".into());
        } else if crate::cgroup::V1_CONTROL_FILES.contains(&name.as_str()) {
            // A worker's cgroup is a directory named after it beside these files.
            bad(line, format!("name {name:?} is a cgroup v1 control file's name: choose another"));
        }
        if let Some(prev) = seen.insert(name.clone(), line) {
            bad(line, format!("duplicate worker name (first defined on line {prev})"));
        }
        if w.executable.get_ref().is_empty() {
            bad(line_of(text, w.executable.span().start), "executable is empty".into());
        }
        if !known_policies.iter().any(|p| p == w.policy.get_ref()) {
            bad(
                line_of(text, w.policy.span().start),
                format!("unknown policy {:?} (known: {})", w.policy.get_ref(), known_policies.join(", ")),
            );
        }
        match &w.uid {
            Some(UidSpec::Named(s)) if s != "dynamic" => {
                bad(line, format!("uid must be a number or \"dynamic\", not {s:?}"))
            }
            // A dynamic uid is the range's start plus the worker's position (spawn::decide).
            Some(UidSpec::Named(_)) | None if lo != 0 && lo <= hi && u64::from(lo) + index as u64 > u64::from(hi) => bad(
                line,
                format!(
                    "dynamic uid {} lies outside dynamic-uid-range [{lo}, {hi}] (line {range_line}): the range holds {} uid(s), this is worker {}",
                    u64::from(lo) + index as u64,
                    u64::from(hi - lo) + 1,
                    index + 1
                ),
            ),
            Some(UidSpec::Fixed(0)) => bad(line, "uid 0 is not allowed for a worker".into()),
            Some(UidSpec::Fixed(u)) => {
                if let Some(other) = fixed_uids.insert(*u, name.clone()) {
                    bad(line, format!("uid {u} is already used by worker {other}: each worker needs its own uid"));
                }
                if (lo..=hi).contains(u) {
                    bad(line, format!("uid {u} lies in the dynamic range [{lo}, {hi}]"));
                }
            }
            _ => {}
        }
        if w.gid == Some(0) {
            bad(line, "gid 0 is not allowed for a worker".into());
        }
        for s in &w.services {
            if let Some(other) = services.insert(s.clone(), name.clone()) {
                bad(line, format!("service {s:?} is already provided by worker {other}"));
            }
        }
        for p in w.landlock.read.iter().chain(&w.landlock.write) {
            if !p.is_absolute() {
                bad(line, format!("landlock path {} must be absolute", p.display()));
            }
        }
        let r = &w.restart;
        if r.initial_backoff_ms == 0 || r.initial_backoff_ms > r.max_backoff_ms {
            bad(line, "restart: initial-backoff-ms must be > 0 and <= max-backoff-ms".into());
        }
        for res in &w.resources {
            let rline = line_of(text, res.span().start);
            match res.get_ref() {
                Resource::TcpListen { address } | Resource::TcpConnect { address } => {
                    if address.parse::<SocketAddr>().is_err() {
                        let kind =
                            if matches!(res.get_ref(), Resource::TcpListen { .. }) { "listen" } else { "connect" };
                        bad(rline, format!("tcp-{kind} address {address:?} is not IP:PORT"));
                    }
                }
                Resource::SystemdSocket { name } => {
                    if name.is_empty() || name.contains(':') {
                        bad(rline, format!("systemd-socket name {name:?} must be a non-empty FileDescriptorName"));
                    }
                }
                Resource::UnixListen { path } | Resource::File { path, .. } | Resource::Device { path } => {
                    if !path.is_absolute() {
                        bad(rline, format!("resource path {} must be absolute", path.display()));
                    }
                }
            }
        }
        for set in &w.settings {
            if !cfg.settings.contains_key(set.get_ref()) {
                bad(line_of(text, set.span().start), format!("no [settings.{}] table", set.get_ref()));
            }
        }
        let rl = w.rlimits.as_ref().unwrap_or(&cfg.defaults.rlimits);
        if rl.nofile < 16 {
            bad(line, "rlimits.nofile below 16 cannot run a worker".into());
        }
        for m in limit_problems(&cfg.limits(w)) {
            bad(line, m);
        }
    }
    let names: Vec<String> = cfg.workers.iter().map(|w| w.name.get_ref().clone()).collect();
    for p in &cfg.permits {
        for m in crate::permits::validate(std::slice::from_ref(p.get_ref()), &names) {
            problems.push(ConfigProblem { line: line_of(text, p.span().start), message: m });
        }
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError { source_name: source_name.into(), problems })
    }
}

/// What is wrong with a worker's decided limits (each value's range).
fn limit_problems(l: &WorkerLimits) -> Vec<String> {
    let mut out = Vec::new();
    if l.memory_bytes < 16 << 20 {
        out.push(format!("limits.memory-mib {} is below 16: no worker starts in that", l.memory_bytes >> 20));
    }
    if l.memory_bytes >> 20 > 1 << 30 {
        out.push("limits.memory-mib is larger than any machine".into());
    }
    if l.pids < 4 || l.pids > 4_194_304 {
        out.push(format!("limits.pids {} must lie in 4..=4194304", l.pids));
    }
    if !(1..=10_000).contains(&l.cpu_weight) {
        out.push(format!("limits.cpu-weight {} must lie in 1..=10000", l.cpu_weight));
    }
    if let Some(p) = l.cpu_max_percent {
        if !(1..=100_000).contains(&p) {
            out.push(format!("limits.cpu-max-percent {p} must lie in 1..=100000"));
        }
    }
    if !(0..=19).contains(&l.nice) {
        out.push(format!("limits.nice {} must lie in 0..=19 (a worker never gets more than airlockd)", l.nice));
    }
    if !(0..=1000).contains(&l.oom_score_adj) {
        out.push(format!(
            "limits.oom-score-adj {} must lie in 0..=1000 (a worker is never a worse OOM victim than airlockd)",
            l.oom_score_adj
        ));
    }
    out
}
