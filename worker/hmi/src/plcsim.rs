//! `plcsim`: a small Modbus TCP device, so that the default job runs on a machine with no
//! hardware. A confined worker like the others: it serves on a listening socket the
//! supervisor opened (fd 5) and has no other access.
//!
//! The plant: a heated tank. Registers (unit 1):
//! - input 0: level, 0.1 %; input 1: temperature, 0.1 °C (signed); input 2: inflow,
//!   0.01 m³/h; input 3: pressure at the bottom, 0.01 bar.
//! - holding 100: inlet valve, 0.1 %; holding 101: heater setpoint, 0.1 °C; holding 102:
//!   outlet valve, 0.1 %.
//!
//! Every `tick-ms` the level follows inflow minus outflow, the temperature follows the heater
//! setpoint with a first-order lag (no heating below 20 % level), and the pressure follows
//! the level.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_worker::{Pump, Worker};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rmodbus::server::context::ModbusContext;
use rmodbus::server::storage::ModbusStorageSmall;
use rmodbus::server::ModbusFrame;
use rmodbus::{ModbusFrameBuf, ModbusProto};
use serde::Deserialize;

const LEVEL: u16 = 0;
const TEMPERATURE: u16 = 1;
const INFLOW: u16 = 2;
const PRESSURE: u16 = 3;
const INLET: u16 = 100;
const HEATER_SP: u16 = 101;
const OUTLET: u16 = 102;
/// Connections served at once; more are closed on accept.
const MAX_CLIENTS: usize = 16;
/// How long accepting pauses after accept fails (out of descriptors or memory).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SimSettings {
    #[serde(default = "d_unit")]
    unit_id: u8,
    #[serde(default = "d_tick")]
    tick_ms: u64,
}
fn d_unit() -> u8 {
    1
}
fn d_tick() -> u64 {
    100
}

#[derive(Debug, Deserialize)]
struct Settings {
    plcsim: Option<SimSettings>,
}

#[derive(Debug)]
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Tank {
    level: f64,
    temperature: f64,
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("plcsim", &[]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-plcsim: {e}");
            return ExitCode::from(2);
        }
    };
    let s = match w.settings::<Settings>() {
        Ok(s) => s.plcsim.unwrap_or(SimSettings { unit_id: d_unit(), tick_ms: d_tick() }),
        Err(e) => {
            tracing::error!("bad [settings.plcsim]: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match airlock_protocol::sys::claim_inherited_fd(airlock_protocol::handoff::FIRST_BROKERED_FD) {
        Ok(fd) => TcpListener::from(fd),
        Err(e) => {
            tracing::error!("no listening socket at fd 5 (a tcp-listen resource): {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!("listener: {e}");
        return ExitCode::from(2);
    }
    let mut sim = Sim::new(s.unit_id, s.tick_ms);
    loop {
        // A wait on the channel, the listener and every client, until the next tick at most.
        let max = if w.has_pending() { Duration::ZERO } else { Duration::from_secs(1) };
        match sim.wait(&listener, Some(w.channel_fd()), max).map(|r| r || w.has_pending()) {
            Ok(true) => match w.pump(|_, _, _| Err("plcsim serves no requests".into()), |_, _, _| {}) {
                Ok(Pump::Idle) => {}
                Ok(Pump::Stop) => return ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(1);
                }
            },
            Ok(false) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                return ExitCode::from(1);
            }
        }
        sim.turn(&listener);
    }
}

/// The simulated device: its registers, the tank and its Modbus clients, served a pass at a
/// time on a non-blocking listener. The worker above drives it; so does the HMI benchmark,
/// which gives the layered HMI and the one-process HMI the same device.
pub struct Sim {
    regs: ModbusStorageSmall,
    tank: Tank,
    clients: Vec<Client>,
    unit: u8,
    tick: Duration,
    next_tick: Instant,
    /// Accepting pauses until then after an accept error (out of descriptors or memory).
    accept_paused_until: Option<Instant>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("tank", &self.tank).field("clients", &self.clients.len()).finish_non_exhaustive()
    }
}

impl Sim {
    /// A tank half full at 20 °C, the inlet at 40 %, the heater at 40 °C, the outlet at 50 %.
    pub fn new(unit_id: u8, tick_ms: u64) -> Sim {
        let mut regs = ModbusStorageSmall::new();
        let tank = Tank { level: 50.0, temperature: 20.0 };
        let _ = regs.set_holding(INLET, 400);
        let _ = regs.set_holding(HEATER_SP, 400);
        let _ = regs.set_holding(OUTLET, 500);
        tank.publish(&mut regs);
        let tick = Duration::from_millis(tick_ms.max(10));
        Sim {
            regs,
            tank,
            clients: Vec::new(),
            unit: unit_id,
            tick,
            next_tick: Instant::now() + tick,
            accept_paused_until: None,
        }
    }

    /// One pass: accepts waiting clients (`listener` is non-blocking), answers every complete
    /// frame, and steps the tank when a tick is due. The caller waits between passes.
    pub fn turn(&mut self, listener: &TcpListener) {
        if self.accept_paused_until.is_some_and(|t| Instant::now() >= t) {
            self.accept_paused_until = None;
        }
        while self.accept_paused_until.is_none() {
            match listener.accept() {
                Ok((stream, _)) if self.clients.len() < MAX_CLIENTS && stream.set_nonblocking(true).is_ok() => {
                    let _ = stream.set_nodelay(true);
                    self.clients.push(Client { stream, buf: Vec::new() });
                }
                Ok(_) => tracing::warn!("too many Modbus clients: connection closed"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    // Out of descriptors or memory: the connection stays queued and the
                    // listener readable, so accepting pauses rather than spin.
                    tracing::warn!("accept: {e}; accepting pauses for {} ms", ACCEPT_PAUSE.as_millis());
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    break;
                }
            }
        }
        let (regs, unit) = (&mut self.regs, self.unit);
        self.clients.retain_mut(|c| serve(c, regs, unit));
        if Instant::now() >= self.next_tick {
            self.next_tick += self.tick;
            self.tank.step(&mut self.regs, self.tick.as_secs_f64());
        }
    }

    /// Waits until the listener, a client or `also` (the worker's channel) is readable, or
    /// the next tick is due, for `max` at most. Returns whether `also` is readable.
    pub fn wait(&self, listener: &TcpListener, also: Option<BorrowedFd<'_>>, max: Duration) -> std::io::Result<bool> {
        // Until the next tick, or the end of a pause in accepting.
        let next = self.accept_paused_until.map_or(self.next_tick, |t| t.min(self.next_tick));
        let until_tick = next.saturating_duration_since(Instant::now()).min(max);
        // Rounded up, so that the loop does not wake just before the tick.
        let ms = until_tick.as_micros().div_ceil(1000);
        let timeout = PollTimeout::try_from(ms.min(60_000) as i32).map_err(|_| std::io::Error::from(Errno::EINVAL))?;
        let mut fds: Vec<PollFd<'_>> = also.into_iter().map(|fd| PollFd::new(fd, PollFlags::POLLIN)).collect();
        if self.accept_paused_until.is_none() {
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        }
        fds.extend(self.clients.iter().map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)));
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(also.is_some() && fds[0].revents().is_some_and(|r| !r.is_empty()))
    }

    /// A holding register's value (what a write left there).
    pub fn holding(&self, register: u16) -> Option<u16> {
        self.regs.get_holding(register).ok()
    }
}

/// Reads what a client sent and answers every complete frame. False: drop the client.
fn serve(c: &mut Client, regs: &mut ModbusStorageSmall, unit: u8) -> bool {
    let mut chunk = [0u8; 512];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
        if c.buf.len() > 4096 {
            return false;
        }
    }
    while c.buf.len() >= 6 {
        let len = 6 + usize::from(u16::from_be_bytes([c.buf[4], c.buf[5]]));
        if !(8..=256).contains(&len) {
            tracing::warn!("malformed Modbus frame: client dropped");
            return false;
        }
        if c.buf.len() < len {
            break;
        }
        let mut frame: ModbusFrameBuf = [0; 256];
        frame[..len].copy_from_slice(&c.buf[..len]);
        c.buf.drain(..len);
        let mut response = Vec::new();
        let mut f = ModbusFrame::new(unit, &frame, ModbusProto::TcpUdp, &mut response);
        if f.parse().is_err() {
            return false;
        }
        if f.processing_required {
            let r = if f.readonly { f.process_read(regs) } else { f.process_write(regs) };
            if r.is_err() {
                return false;
            }
        }
        if f.response_required {
            if f.finalize_response().is_err() {
                return false;
            }
            // Responses are small; a client that cannot take one is gone.
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
            let ok = c.stream.write_all(&response).is_ok();
            let _ = c.stream.set_nonblocking(true);
            if !ok {
                return false;
            }
        }
    }
    true
}

impl Tank {
    fn step(&mut self, regs: &mut ModbusStorageSmall, dt: f64) {
        let pct = |r: u16| f64::from(regs.get_holding(r).unwrap_or(0)).clamp(0.0, 1000.0) / 10.0;
        let (inlet, outlet) = (pct(INLET), pct(OUTLET));
        let sp = f64::from(regs.get_holding(HEATER_SP).unwrap_or(0) as i16) / 10.0;
        // Inflow up to 2 %/s, outflow up to 1.5 %/s (scaled by the level's head).
        let inflow = inlet / 100.0 * 2.0;
        let outflow = outlet / 100.0 * 1.5 * (self.level / 100.0).sqrt();
        self.level = (self.level + (inflow - outflow) * dt).clamp(0.0, 100.0);
        let target = if self.level >= 20.0 { sp } else { 15.0 };
        self.temperature += (target - self.temperature) * (dt / 2.0).min(1.0);
        self.publish(regs);
    }

    fn publish(&self, regs: &mut ModbusStorageSmall) {
        let inlet = f64::from(regs.get_holding(INLET).unwrap_or(0)).clamp(0.0, 1000.0) / 10.0;
        let _ = regs.set_input(LEVEL, (self.level * 10.0).round() as u16);
        let _ = regs.set_input(TEMPERATURE, (self.temperature * 10.0).round() as i16 as u16);
        let _ = regs.set_input(INFLOW, (inlet * 0.3 * 100.0).round() as u16);
        let _ = regs.set_input(PRESSURE, ((1.0 + self.level * 0.04) * 100.0).round() as u16);
    }
}
