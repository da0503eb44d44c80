//! `historian`: stores every sample, alarm and operator action in SQLite in its state
//! directory (the only path its Landlock rules open), answers trend queries, and exports a
//! time range as CSV in a sealed memfd for the UI to stream.
//!
//! Exactly once: the id of the last delivery handled is stored in the same transaction as
//! its rows, and handed to [`Worker::resume_after`] at start, so a redelivery after a crash
//! is acknowledged without being stored twice.

use std::process::ExitCode;

use crate::types::{self as hmi, Event, Range, Sample, TrendQuery};
use airlock_protocol::BulkMode;
use airlock_worker::{Response, Worker};
use rusqlite::{params, Connection};

/// Largest CSV export (the UI streams it; beyond this, ask for a shorter range).
const MAX_EXPORT_BYTES: usize = 256 << 20;
/// Samples stored between two passes of the retention clean-up.
const PRUNE_EVERY: u64 = 1000;
/// Rows a trend may read, and an export may hold: beyond, ask for a shorter range (a
/// single-threaded historian must stay responsive to the samples arriving).
const MAX_TREND_ROWS: i64 = 2_000_000;
/// Rows a trend answered in a call region may read (well under a second's work, so the ui,
/// which waits at most 900 ms there, is answered): a longer range goes through airlockd.
const REGION_TREND_ROWS: i64 = 100_000;
const MAX_EXPORT_ROWS: i64 = 1_000_000;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HistorianSettings {
    /// Samples and events older than this are deleted; 0 keeps everything.
    #[serde(default = "d_retention")]
    retention_days: u64,
}
fn d_retention() -> u64 {
    90
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct Settings {
    plant: hmi::Plant,
    historian: Option<HistorianSettings>,
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("historian", &["historian"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-historian: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = w.settings::<Settings>().map_err(|e| e.to_string()).and_then(Settings::checked);
    let (plant, retention_days) = match settings {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(dir) = w.state_directory().map(std::path::Path::to_path_buf) else {
        tracing::error!("historian needs its state directory (state-directory = true) for its database");
        return ExitCode::from(2);
    };
    let path = dir.join("history.sqlite3");
    let historian = match Historian::open(&path, plant, retention_days) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot open the history database: {e}");
            return ExitCode::from(2);
        }
    };
    match historian.db.query_row("SELECT v FROM meta WHERE k = 'last_delivery'", [], |r| r.get::<_, i64>(0)) {
        Ok(id) => w.resume_after(u64::try_from(id).unwrap_or(0)),
        Err(rusqlite::Error::QueryReturnedNoRows) => {}
        Err(e) => {
            tracing::error!("reading the last delivery: {e}");
            return ExitCode::from(2);
        }
    }
    // Shared with the threads that answer trend queries in call regions (see `serve_regions`).
    let h = std::sync::Arc::new(std::sync::Mutex::new(historian));
    let served_by_regions = h.clone();
    w.on_incoming_region(move |r| serve_region(r, served_by_regions.clone()));
    let mut streamed = crate::samples::SampleIn::default();
    let served = w.serve_all_ticking(
        std::time::Duration::from_millis(20),
        |w, req, _bulk| match req.method.as_str() {
            "trend" => Ok(Response::bytes(hmi::encode(&lock(&h).trend(&hmi::decode(&req.body)?)?))),
            "export" => {
                let csv = lock(&h).export(&hmi::decode(&req.body)?)?;
                let rows = csv.lines().count().saturating_sub(1) as u64;
                let mut bulk = w.bulk_writer(csv.len().max(1)).map_err(|e| e.to_string())?;
                bulk.as_mut_slice()[..csv.len()].copy_from_slice(csv.as_bytes());
                if csv.is_empty() {
                    return Ok(Response::bytes(hmi::encode(&0u64)));
                }
                Ok(Response { body: hmi::encode(&rows), bulk: Some((bulk, BulkMode::Sealed)) })
            }
            other => Err(format!("historian has no method {other:?}")),
        },
        |_w, d, _bulk| {
            // A body no one can store is acknowledged (and said), not retried forever.
            let stored = match d.method.as_str() {
                "sample" => match hmi::decode::<Sample>(&d.body) {
                    Ok(s) => lock(&h).store_sample(Some(d.id), &s),
                    Err(e) => {
                        tracing::error!(from = %d.from, id = d.id, "sample dropped: {e}");
                        Ok(())
                    }
                },
                "event" => match hmi::decode::<Event>(&d.body) {
                    Ok(e) => lock(&h).store_event(Some(d.id), &e),
                    Err(e) => {
                        tracing::error!(from = %d.from, id = d.id, "event dropped: {e}");
                        Ok(())
                    }
                },
                other => {
                    tracing::error!(from = %d.from, id = d.id, "dropped: unexpected method {other:?}");
                    Ok(())
                }
            };
            if let Err(e) = stored {
                // Storage failed (disk full, file size limit, I/O): exit without acknowledging,
                // so the supervisor keeps the message and redelivers it after the restart.
                tracing::error!(from = %d.from, method = %d.method, id = d.id, "not stored, exiting so it is redelivered: {e}");
                std::process::exit(3);
            }
        },
        |w| {
            streamed.drain(w, |_w, sample| {
                // A live sample that cannot be stored is lost (a stream is not redelivered);
                // said, and the next one tried.
                if let Err(e) = lock(&h).store_sample(None, &sample) {
                    tracing::error!("a streamed sample was not stored: {e}");
                }
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

impl Settings {
    /// The validated plant and the retention period in days.
    pub(crate) fn checked(self) -> Result<(hmi::Plant, u64), String> {
        let retention = self.historian.map_or(d_retention(), |h| h.retention_days);
        Ok((self.plant.validated()?, retention))
    }
}

pub(crate) fn lock(h: &std::sync::Mutex<Historian>) -> std::sync::MutexGuard<'_, Historian> {
    // A panic while holding it cannot leave the database half-written (SQLite's transactions
    // do not depend on this lock), so a poisoned lock is taken over.
    h.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a call region's thread waits for a call before it looks again (and notices a
/// closed or revoked region).
const REGION_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers trend queries that arrive in call region `r` (a `shm-call` permit for
/// `historian.trend`; the ui's `[settings.ui] trend-in-place`), on a thread of its own until
/// the region ends. The request is the library's private copy, already checked; the answer
/// is written in place, without the supervisor's hop.
fn serve_region(r: airlock_worker::streams::RegionServer, h: std::sync::Arc<std::sync::Mutex<Historian>>) {
    if r.method != "trend" {
        tracing::warn!(region = r.region, from = %r.from, method = %r.method, "a call region for a method answered only through airlockd: closed");
        r.close();
        return;
    }
    let spawned = std::thread::Builder::new().name("trend-region".into()).spawn(move || loop {
        let mut held = std::time::Duration::ZERO;
        let served = r.serve(REGION_POLL, |buf| {
            let q: TrendQuery = hmi::decode(buf)?;
            let t = std::time::Instant::now();
            let points = lock(&h).trend_within(&q, REGION_TREND_ROWS, Some(hmi::TOO_LARGE_FOR_REGION));
            held = t.elapsed();
            *buf = hmi::encode(&points?);
            Ok(())
        });
        if let Err(e) = served {
            tracing::info!(region = r.region, from = %r.from, "call region ended: {e}");
            r.close();
            return;
        }
        // At most half the historian's time goes to queries in regions, however fast they
        // come: storing samples and events (the serving thread) gets the rest.
        std::thread::sleep(held);
    });
    if let Err(e) = spawned {
        tracing::error!("no thread for a call region: {e}");
    }
}

fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    // No -wal/-shm files (no shared mappings under seccomp); temporary data in memory, since
    // the state directory is the only writable path.
    db.pragma_update(None, "journal_mode", "TRUNCATE")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.pragma_update(None, "temp_store", "MEMORY")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS samples (ts INTEGER NOT NULL, tag TEXT NOT NULL, raw INTEGER NOT NULL, value REAL NOT NULL);
         CREATE INDEX IF NOT EXISTS samples_tag_ts ON samples (tag, ts);
         CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts);
         CREATE TABLE IF NOT EXISTS events (ts INTEGER NOT NULL, kind TEXT NOT NULL, tag TEXT NOT NULL, user TEXT, value REAL, text TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
         CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);",
    )?;
    Ok(db)
}

#[derive(Debug)]
pub(crate) struct Historian {
    db: Connection,
    plant: hmi::Plant,
    retention_days: u64,
    /// Samples stored since the start, for the clean-up's pace.
    stored: u64,
}

impl Historian {
    /// Opens (or creates) the history database at `path`.
    pub(crate) fn open(path: &std::path::Path, plant: hmi::Plant, retention_days: u64) -> rusqlite::Result<Historian> {
        Ok(Historian { db: open(path)?, plant, retention_days, stored: 0 })
    }

    /// Stores a sample; `delivery` (a journaled message's id) is marked handled in the same
    /// transaction. A streamed sample has none: a stream is live data, never redelivered.
    pub(crate) fn store_sample(&mut self, delivery: Option<u64>, s: &Sample) -> Result<(), String> {
        let tx = self.db.transaction().map_err(|e| e.to_string())?;
        {
            let mut ins = tx
                .prepare_cached("INSERT INTO samples (ts, tag, raw, value) VALUES (?1, ?2, ?3, ?4)")
                .map_err(|e| e.to_string())?;
            for (tag, raw) in &s.values {
                let Some(def) = self.plant.tag(tag) else { continue };
                ins.execute(params![s.ts_ms, tag, raw, def.to_eng(*raw)]).map_err(|e| e.to_string())?;
            }
        }
        if let Some(id) = delivery {
            mark(&tx, id)?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        self.stored += 1;
        if self.stored % PRUNE_EVERY == 1 {
            self.prune(hmi::now_ms());
        }
        Ok(())
    }

    /// Deletes what is older than the retention period (a failure is logged, not fatal).
    fn prune(&mut self, now_ms: i64) {
        if self.retention_days == 0 {
            return;
        }
        let days = i64::try_from(self.retention_days).unwrap_or(i64::MAX / 86_400_000);
        let cutoff = now_ms.saturating_sub(days.saturating_mul(86_400_000));
        let deleted = self
            .db
            .execute("DELETE FROM samples WHERE ts < ?1", params![cutoff])
            .and_then(|a| Ok(a + self.db.execute("DELETE FROM events WHERE ts < ?1", params![cutoff])?));
        match deleted {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                rows = n,
                retention_days = self.retention_days,
                "history older than the retention period deleted"
            ),
            Err(e) => tracing::error!("retention clean-up failed: {e}"),
        }
    }

    /// Stores an event, durably before it returns (`synchronous = FULL`); `delivery` as for
    /// samples.
    pub(crate) fn store_event(&mut self, delivery: Option<u64>, e: &Event) -> Result<(), String> {
        let tx = self.db.transaction().map_err(|e| e.to_string())?;
        tx.execute(
            "INSERT INTO events (ts, kind, tag, user, value, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.ts_ms, e.kind, e.tag, e.user, e.value, e.text],
        )
        .map_err(|e| e.to_string())?;
        if let Some(id) = delivery {
            mark(&tx, id)?;
        }
        tx.commit().map_err(|e| e.to_string())
    }

    pub(crate) fn trend(&self, q: &TrendQuery) -> Result<Vec<(i64, f64)>, String> {
        self.trend_within(q, MAX_TREND_ROWS, None)
    }

    /// A trend reading at most `max_rows` samples; beyond, `too_many` if given (the region's
    /// marker that sends the query through airlockd), else a refusal naming the limit.
    fn trend_within(&self, q: &TrendQuery, max_rows: i64, too_many: Option<&str>) -> Result<Vec<(i64, f64)>, String> {
        if self.plant.tag(&q.tag).is_none() {
            return Err(format!("no tag {:?}", q.tag));
        }
        if q.to_ms < q.from_ms {
            return Err("the range ends before it starts".into());
        }
        let rows: i64 = self
            .db
            .query_row(
                "SELECT COUNT(*) FROM samples WHERE tag = ?1 AND ts >= ?2 AND ts <= ?3",
                params![q.tag, q.from_ms, q.to_ms],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        if rows > max_rows {
            if let Some(marker) = too_many {
                return Err(marker.to_string());
            }
            return Err(format!("{rows} samples in that range (at most {max_rows}): choose a shorter range"));
        }
        let points = i64::from(q.max_points.clamp(1, 10_000));
        let bucket = (q.to_ms.saturating_sub(q.from_ms) / points).max(1);
        let mut st = self
            .db
            .prepare_cached(
                "SELECT (ts / ?4) * ?4 AS b, AVG(value) FROM samples WHERE tag = ?1 AND ts >= ?2 AND ts <= ?3 GROUP BY b ORDER BY b",
            )
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map(params![q.tag, q.from_ms, q.to_ms, bucket], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
    }

    /// Samples and events of the range as CSV: `time_ms,time_utc,tag,value,unit,kind,user,text`.
    fn export(&self, r: &Range) -> Result<String, String> {
        if r.to_ms < r.from_ms {
            return Err("the range ends before it starts".into());
        }
        let rows: i64 = self
            .db
            .query_row(
                "SELECT (SELECT COUNT(*) FROM samples WHERE ts >= ?1 AND ts <= ?2) + (SELECT COUNT(*) FROM events WHERE ts >= ?1 AND ts <= ?2)",
                params![r.from_ms, r.to_ms],
                |row| row.get(0),
            )
            .map_err(|e| e.to_string())?;
        if rows > MAX_EXPORT_ROWS {
            return Err(format!("{rows} rows in that range (at most {MAX_EXPORT_ROWS}): choose a shorter range"));
        }
        let mut out = String::from("time_ms,time_utc,tag,value,unit,kind,user,text\n");
        let mut st = self
            .db
            .prepare_cached(
                "SELECT ts, tag, value, 'sample', NULL, '' FROM samples WHERE ts >= ?1 AND ts <= ?2
                 UNION ALL
                 SELECT ts, tag, value, kind, user, text FROM events WHERE ts >= ?1 AND ts <= ?2
                 ORDER BY 1, 2",
            )
            .map_err(|e| e.to_string())?;
        let mut rows = st.query(params![r.from_ms, r.to_ms]).map_err(|e| e.to_string())?;
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let ts: i64 = row.get(0).map_err(|e| e.to_string())?;
            let tag: String = row.get(1).map_err(|e| e.to_string())?;
            let value: Option<f64> = row.get(2).map_err(|e| e.to_string())?;
            let kind: String = row.get(3).map_err(|e| e.to_string())?;
            let user: Option<String> = row.get(4).map_err(|e| e.to_string())?;
            let text: String = row.get(5).map_err(|e| e.to_string())?;
            let unit = self.plant.tag(&tag).map_or("", |t| t.unit.as_str());
            out.push_str(&format!(
                "{ts},{},{},{},{},{},{},{}\n",
                utc(ts),
                csv_field(&tag),
                value.map_or(String::new(), |v| format!("{v}")),
                csv_field(unit),
                csv_field(&kind),
                csv_field(user.as_deref().unwrap_or("")),
                csv_field(&text)
            ));
            if out.len() > MAX_EXPORT_BYTES {
                return Err(format!("the export exceeds {} MiB: choose a shorter range", MAX_EXPORT_BYTES >> 20));
            }
        }
        Ok(out)
    }
}

fn mark(tx: &rusqlite::Transaction<'_>, id: u64) -> Result<(), String> {
    tx.execute(
        "INSERT INTO meta (k, v) VALUES ('last_delivery', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        params![i64::try_from(id).unwrap_or(i64::MAX)],
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Quotes a CSV field when it needs it, and defuses spreadsheet formulas.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds (civil-from-days, UTC).
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", sod / 3600, sod % 3600 / 60, sod % 60, ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plant() -> hmi::Plant {
        toml::from_str::<Settings>(
            "[plant]\n[[plant.tag]]\nname = \"level\"\ntable = \"input\"\nregister = 0\nscale = 0.1\nunit = \"%\"\n",
        )
        .expect("plant")
        .plant
    }

    #[test]
    fn history_older_than_the_retention_period_is_deleted_and_the_rest_exported() {
        let dir = std::env::temp_dir().join(format!("airlock-historian-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let db = open(&dir.join("h.sqlite3")).expect("open");
        let mut h = Historian { db, plant: plant(), retention_days: 1, stored: 0 };
        let day = 86_400_000;
        let now = 10 * day;
        for (id, ts) in [(1, now - 3 * day), (2, now - 2 * day), (3, now - 1000), (4, now)] {
            h.store_sample(Some(id), &Sample { ts_ms: ts, values: vec![("level".into(), 421)], fault: None })
                .expect("store");
        }
        h.store_event(
            Some(5),
            &Event {
                ts_ms: now - 5 * day,
                kind: "ack".into(),
                tag: "level".into(),
                user: None,
                value: None,
                text: "old".into(),
            },
        )
        .expect("event");
        h.prune(now);
        let csv = h.export(&Range { from_ms: 0, to_ms: now }).expect("export");
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(rows.len(), 2, "{csv}");
        assert!(rows[0].starts_with(&format!("{},", now - 1000)) && rows[0].contains(",level,42.1,%,sample,"), "{csv}");
        let last: i64 = h.db.query_row("SELECT v FROM meta WHERE k = 'last_delivery'", [], |r| r.get(0)).expect("meta");
        assert_eq!(last, 5, "the last delivery id is stored with its rows");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn utc_and_csv_quoting() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_796_000_000_123), "2026-11-30T00:53:20.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
