//! The HMI in one process: the baseline of the benchmark that measures what privilege
//! separation costs (`cargo bench -p airlock-supervisor --bench hmi`, `docs/performance.md`).
//!
//! The same layers' code as the workers run (field's device I/O, logic's checks and alarms,
//! the historian's SQLite history, auth's sessions, the ui's HTTP loop and handlers), composed
//! with no IPC and no confinement: where a worker would call another through airlockd, this
//! calls the other layer's code directly. The durability is the same, with the same fsyncs on
//! the same paths: an event (an operator's action, an alarm) is appended to an event log and
//! `fdatasync`ed before logic goes on (the layered HMI journals it in airlockd, one
//! `fdatasync`), and committed to the history database afterwards, off the operator's path,
//! as the historian commits it in the layered HMI; every sample is committed to the history
//! as it arrives, as the historian commits a streamed sample.
//!
//! Not a product: it runs with the privileges it was started with, has no supervisor to
//! restart it, and answers no CSV export (the workers pass that as a sealed memfd).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use airlock_protocol::wire::CallFailure;
use airlock_protocol::Bulk;

use crate::auth::Auth;
use crate::field::Device;
use crate::historian::Historian;
use crate::logic::{Logic, Peers};
use crate::types::{self as hmi, Event, RawWrite, SessionInfo, Token};
use crate::ui::api::{Backend, CallError};

/// Every layer, each behind a lock of its own (taken in the order logic, then auth, device,
/// history or the event log; never the other way round, and none while the event log's is held).
#[derive(Debug)]
struct Layers {
    plant: hmi::Plant,
    logic: Mutex<Logic>,
    auth: Mutex<Auth>,
    device: Mutex<Device>,
    history: Mutex<Historian>,
    events: Mutex<EventLog>,
}

/// Events made durable before logic goes on, then handed to the history thread.
#[derive(Debug)]
struct EventLog {
    file: std::fs::File,
    /// Events written here and not yet committed to the history.
    pending: usize,
    to_history: std::sync::mpsc::Sender<Event>,
}

/// Runs the HMI described by `config` (an airlockd configuration: its `[settings]` tables)
/// until the process ends: the history and the credential file under `state`, HTTP on `ui`,
/// the device on `device`. Field polls on a thread of its own; the ui's loop runs here.
pub fn run(config: &str, state: &Path, ui: TcpListener, device: TcpStream) -> Result<(), String> {
    let doc: toml::Table = toml::from_str(config).map_err(|e| format!("configuration: {e}"))?;
    let settings = doc.get("settings").cloned().unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
    let (plant, field) = settings
        .clone()
        .try_into::<crate::field::Settings>()
        .map_err(|e| format!("[settings]: {e}"))
        .and_then(crate::field::Settings::checked)?;
    let (_, retention_days) = settings
        .clone()
        .try_into::<crate::historian::Settings>()
        .map_err(|e| format!("[settings]: {e}"))
        .and_then(crate::historian::Settings::checked)?;
    let auth = settings.try_into::<crate::auth::Settings>().map_err(|e| format!("[settings.auth]: {e}"))?;
    for dir in ["historian", "auth"] {
        std::fs::create_dir_all(state.join(dir)).map_err(|e| format!("{}: {e}", state.join(dir).display()))?;
    }
    let path = state.join("historian/history.sqlite3");
    let history = Historian::open(&path, plant.clone(), retention_days)
        .map_err(|e| format!("cannot open the history database {}: {e}", path.display()))?;
    let log_path = state.join("events.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let (to_history, events_in) = std::sync::mpsc::channel();
    let layers = Arc::new(Layers {
        logic: Mutex::new(Logic::new(plant.clone())),
        auth: Mutex::new(Auth::open(auth, &state.join("auth"))?),
        device: Mutex::new(Device::new(device, &plant, &field)),
        history: Mutex::new(history),
        events: Mutex::new(EventLog { file, pending: 0, to_history }),
        plant,
    });
    let stored = layers.clone();
    std::thread::Builder::new()
        .name("historian".into())
        .spawn(move || store_events(&stored, &events_in))
        .map_err(|e| format!("no thread for the historian: {e}"))?;
    let every = Duration::from_millis(field.poll_ms);
    let polled = layers.clone();
    std::thread::Builder::new()
        .name("field".into())
        .spawn(move || poll(&polled, every))
        .map_err(|e| format!("no thread for field: {e}"))?;
    ui.set_nonblocking(true).map_err(|e| format!("ui listener: {e}"))?;
    tracing::info!("one-process HMI serving HTTP");
    crate::ui::serve_loop(&mut Direct { layers: &layers }, &OwnedFd::from(ui)).map_err(|e| e.to_string())
}

/// Field's loop: a sample every `every`, to the history and to logic, as the streams carry
/// it in the layered HMI.
fn poll(layers: &Layers, every: Duration) {
    let mut next = Instant::now();
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += every;
        if next < Instant::now() {
            next = Instant::now() + every;
        }
        let sample = lock(&layers.device).sample(&layers.plant);
        if let Err(e) = lock(&layers.history).store_sample(None, &sample) {
            tracing::error!("a sample was not stored: {e}");
        }
        lock(&layers.logic).on_sample(&sample, &mut Direct { layers });
    }
}

/// The historian's part: commits each logged event to the history, and empties the log once
/// everything in it is committed.
fn store_events(layers: &Layers, events: &std::sync::mpsc::Receiver<Event>) {
    while let Ok(ev) = events.recv() {
        if let Err(e) = lock(&layers.history).store_event(None, &ev) {
            tracing::error!(kind = %ev.kind, tag = %ev.tag, "event not stored (it stays in the event log): {e}");
            continue;
        }
        let mut log = lock(&layers.events);
        log.pending = log.pending.saturating_sub(1);
        if log.pending == 0 {
            if let Err(e) = log.file.set_len(0) {
                tracing::warn!("emptying the event log: {e}");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The other layers, called in this process: logic's [`Peers`] and the ui's [`Backend`].
#[derive(Debug)]
struct Direct<'a> {
    layers: &'a Layers,
}

impl Peers for Direct<'_> {
    fn session(&mut self, token: &str) -> Result<SessionInfo, String> {
        hmi::decode(&lock(&self.layers.auth).handle("validate", &hmi::encode(&Token(token.into())))?)
    }

    fn write(&mut self, write: &RawWrite) -> Result<(), String> {
        lock(&self.layers.device).write_setpoint(&self.layers.plant, write)
    }

    fn record(&mut self, ev: Event) {
        // Durable before logic goes on (the layered HMI's journal append and fdatasync).
        let mut log = lock(&self.layers.events);
        let mut line = hmi::encode(&ev);
        line.splice(0..0, (line.len() as u32).to_le_bytes());
        if let Err(e) = log.file.write_all(&line).and_then(|()| log.file.sync_data()) {
            tracing::error!(kind = %ev.kind, tag = %ev.tag, "event not recorded: {e}");
            return;
        }
        log.pending += 1;
        if log.to_history.send(ev).is_err() {
            tracing::error!("the history thread is gone: the event stays in the event log");
        }
    }
}

impl Backend for Direct<'_> {
    fn call(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        _deadline_ms: u32,
    ) -> Result<(Vec<u8>, Option<Bulk>), CallError> {
        let layers = self.layers;
        let answer = match (service, method) {
            ("auth", m) => lock(&layers.auth).handle(m, &body),
            ("logic", m) => lock(&layers.logic).handle(m, &body, self),
            ("historian", "trend") => {
                hmi::decode(&body).and_then(|q| lock(&layers.history).trend(&q)).map(|points| hmi::encode(&points))
            }
            _ => Err(format!("the one-process HMI has no {service}.{method}")),
        };
        // A layer's refusal reaches the handlers as a callee's would through airlockd.
        answer.map(|a| (a, None)).map_err(|why| CallError::Failed(CallFailure::Callee(why)))
    }
}

impl crate::ui::Host for Direct<'_> {
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn pump(&mut self) -> Result<bool, crate::ui::UiError> {
        Ok(false)
    }

    fn end_turn(&mut self) -> Result<bool, crate::ui::UiError> {
        Ok(false)
    }
}
