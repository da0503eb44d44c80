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
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_worker::{Pump, Worker};
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
    let mut regs = ModbusStorageSmall::new();
    let mut tank = Tank { level: 50.0, temperature: 20.0 };
    let _ = regs.set_holding(INLET, 400);
    let _ = regs.set_holding(HEATER_SP, 400);
    let _ = regs.set_holding(OUTLET, 500);
    tank.publish(&mut regs);
    let tick = Duration::from_millis(s.tick_ms.max(10));
    let mut next_tick = Instant::now() + tick;
    let mut clients: Vec<Client> = Vec::new();
    loop {
        // A short wait on the channel; the sockets are non-blocking and served every pass.
        let wait_ms = if w.has_pending() { 0 } else { 10 };
        match airlock_protocol::sys::poll_readable(w.channel_fd(), wait_ms).map(|r| r || w.has_pending()) {
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
        loop {
            match listener.accept() {
                Ok((stream, _)) if clients.len() < MAX_CLIENTS && stream.set_nonblocking(true).is_ok() => {
                    let _ = stream.set_nodelay(true);
                    clients.push(Client { stream, buf: Vec::new() });
                }
                Ok(_) => tracing::warn!("too many Modbus clients: connection closed"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    break;
                }
            }
        }
        clients.retain_mut(|c| serve(c, &mut regs, s.unit_id));
        if Instant::now() >= next_tick {
            next_tick += tick;
            tank.step(&mut regs, tick.as_secs_f64());
        }
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
