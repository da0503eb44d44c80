//! `field`: the HMI's device I/O layer. Polls a Modbus TCP device at a configured rate and
//! writes the setpoints `logic` validated. It has no network of its own: the supervisor
//! connects to the device and passes the socket (fd 5, brokered resource 0), and a new one on
//! request after a failure, with backoff. Reads are published to `logic` and `historian`
//! asynchronously. A device that fails, restarts or answers garbage is reported (a sample
//! with a fault), never a crash.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_worker::hmi::{self, RawWrite, Sample, Table};
use airlock_worker::{Pump, Response, Worker};
use rmodbus::{client::ModbusRequest, guess_response_frame_len, ModbusProto};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FieldSettings {
    #[serde(default = "d_poll")]
    poll_ms: u64,
    #[serde(default = "d_timeout")]
    timeout_ms: u64,
}
fn d_poll() -> u64 {
    500
}
fn d_timeout() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
struct Settings {
    plant: hmi::Plant,
    #[serde(default)]
    field: Option<FieldSettings>,
}

/// The device connection and the Modbus transaction counter.
#[derive(Debug)]
struct Device {
    stream: Option<TcpStream>,
    tr_id: u16,
    unit: u8,
    timeout: Duration,
    /// The fault being reported, if any (reported once per episode).
    fault: Option<String>,
    next_reopen: Instant,
}

fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("field", &["field"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-field: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = w.settings::<Settings>().map_err(|e| e.to_string()).and_then(|s| {
        let fs = s.field.unwrap_or(FieldSettings { poll_ms: d_poll(), timeout_ms: d_timeout() });
        Ok((s.plant.validated()?, fs))
    });
    let (plant, fs) = match settings {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let first = match airlock_protocol::sys::claim_inherited_fd(airlock_protocol::handoff::FIRST_BROKERED_FD) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("no device connection at fd 5 (a tcp-connect resource): {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = Duration::from_millis(fs.timeout_ms.max(10));
    let mut dev =
        Device { stream: None, tr_id: 0, unit: plant.unit_id, timeout, fault: None, next_reopen: Instant::now() };
    dev.attach(TcpStream::from(first));
    let poll_every = Duration::from_millis(fs.poll_ms.max(20));
    let mut next_poll = Instant::now();
    let mut dropped = [0u64; 2];
    loop {
        let wait = next_poll.saturating_duration_since(Instant::now());
        let wait_ms = if w.has_pending() { 0 } else { wait.as_millis() as i32 };
        let readable = match airlock_protocol::sys::poll_readable(w.channel_fd(), wait_ms) {
            Ok(r) => r || w.has_pending(),
            Err(e) => {
                tracing::error!("poll: {e}");
                return ExitCode::from(1);
            }
        };
        if readable {
            let pumped = w.pump(
                |_w, req, _bulk| match req.method.as_str() {
                    "write" => {
                        let wr: RawWrite = hmi::decode(&req.body)?;
                        let known = plant.tag(&wr.tag).is_some_and(|t| t.writable() && t.register == wr.register);
                        if !known {
                            return Err(format!("{} register {} is not a setpoint of this plant", wr.tag, wr.register));
                        }
                        dev.write(wr.register, wr.raw)?;
                        tracing::info!(tag = %wr.tag, register = wr.register, "setpoint written to the device");
                        Ok(Response::bytes(hmi::encode(&())))
                    }
                    other => Err(format!("field has no method {other:?}")),
                },
                |_w, d, _b| tracing::warn!(from = %d.from, "field takes no messages"),
            );
            match pumped {
                Ok(Pump::Idle) => {}
                Ok(Pump::Stop) => return ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(1);
                }
            }
        }
        if Instant::now() >= next_poll {
            next_poll += poll_every;
            if next_poll < Instant::now() {
                next_poll = Instant::now() + poll_every;
            }
            if dev.stream.is_none() {
                dev.try_reopen(&mut w);
            }
            let sample = match dev.read_all(&plant) {
                Ok(values) => {
                    if dev.fault.take().is_some() {
                        tracing::info!("device answers again");
                    }
                    Sample { ts_ms: hmi::now_ms(), values, fault: None }
                }
                Err(why) => {
                    if dev.fault.as_deref() == Some(why.as_str()) {
                        continue;
                    }
                    tracing::warn!("device fault: {why}");
                    dev.fault = Some(why.clone());
                    Sample { ts_ms: hmi::now_ms(), values: Vec::new(), fault: Some(why) }
                }
            };
            let body = hmi::encode(&sample);
            for (k, to) in ["logic", "historian"].into_iter().enumerate() {
                // Samples are periodic: one the broker cannot take now is dropped, said once
                // when dropping starts and once, with the count, when it stops.
                match w.send(to, "sample", body.clone(), false) {
                    Ok(()) if dropped[k] > 0 => {
                        tracing::warn!(to, dropped = dropped[k], "samples flow again");
                        dropped[k] = 0;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if dropped[k] == 0 {
                            tracing::warn!(to, "samples are being dropped: {e}");
                        }
                        dropped[k] += 1;
                    }
                }
            }
        }
    }
}

impl Device {
    fn attach(&mut self, s: TcpStream) {
        let _ = s.set_read_timeout(Some(self.timeout));
        let _ = s.set_write_timeout(Some(self.timeout));
        let _ = s.set_nodelay(true);
        self.stream = Some(s);
    }

    /// Drops a connection that failed: the next poll asks the supervisor for a new one.
    fn fail(&mut self, why: String) -> String {
        self.stream = None;
        why
    }

    fn try_reopen(&mut self, w: &mut Worker) {
        if Instant::now() < self.next_reopen {
            return;
        }
        match w.reopen(0) {
            Ok(fd) => {
                tracing::info!("new device connection from the supervisor");
                self.attach(TcpStream::from(fd));
            }
            Err(e) => {
                tracing::debug!("reopen: {e}");
                // The supervisor's backoff decides; asking again sooner only gets "retry in".
                self.next_reopen = Instant::now() + Duration::from_millis(200);
            }
        }
    }

    /// One request/response exchange; any I/O or framing error drops the connection (a
    /// stream that answered garbage is out of step and cannot be trusted further).
    fn exchange(&mut self, req: &[u8], mreq: &ModbusRequest) -> Result<Vec<u8>, String> {
        let Some(s) = self.stream.as_mut() else {
            return Err(self.fault.clone().unwrap_or_else(|| "no connection to the device".into()));
        };
        let r = (|| -> Result<Vec<u8>, String> {
            s.write_all(req).map_err(|e| format!("writing to the device: {e}"))?;
            let mut head = [0u8; 6];
            s.read_exact(&mut head).map_err(|e| format!("reading from the device: {e}"))?;
            let len = guess_response_frame_len(&head, ModbusProto::TcpUdp)
                .map_err(|e| format!("device sent a malformed frame header: {e:?}"))?;
            let len = usize::from(len);
            if !(8..=260).contains(&len) {
                return Err(format!("device sent a frame of {len} bytes"));
            }
            let mut frame = head.to_vec();
            frame.resize(len, 0);
            s.read_exact(&mut frame[6..]).map_err(|e| format!("reading from the device: {e}"))?;
            mreq.parse_ok(&frame).map_err(|e| format!("device answered with an error or garbage: {e:?}"))?;
            Ok(frame)
        })();
        r.map_err(|why| self.fail(why))
    }

    fn request(&mut self) -> ModbusRequest {
        self.tr_id = self.tr_id.wrapping_add(1);
        ModbusRequest::new_tcp_udp(self.unit, self.tr_id)
    }

    /// Reads every tag, one request per table (registers min..=max of that table).
    fn read_all(&mut self, plant: &hmi::Plant) -> Result<Vec<(String, u16)>, String> {
        let mut out = Vec::new();
        for table in [Table::Input, Table::Holding] {
            let tags: Vec<_> = plant.tags.iter().filter(|t| t.table == table).collect();
            let (Some(lo), Some(hi)) = (tags.iter().map(|t| t.register).min(), tags.iter().map(|t| t.register).max())
            else {
                continue;
            };
            let count = hi - lo + 1;
            if count > 125 {
                return Err(format!("{table:?} registers {lo}..={hi} span more than one Modbus read (125)"));
            }
            let mut mreq = self.request();
            let mut req = Vec::new();
            match table {
                Table::Input => mreq.generate_get_inputs(lo, count, &mut req),
                Table::Holding => mreq.generate_get_holdings(lo, count, &mut req),
            }
            .map_err(|e| format!("building a request: {e:?}"))?;
            let frame = self.exchange(&req, &mreq)?;
            let mut regs: Vec<u16> = Vec::new();
            if let Err(e) = mreq.parse_u16(&frame, &mut regs) {
                return Err(self.fail(format!("device answered garbage: {e:?}")));
            }
            if regs.len() < usize::from(count) {
                return Err(self.fail(format!("device returned {} registers, asked {count}", regs.len())));
            }
            for t in tags {
                out.push((t.name.clone(), regs[usize::from(t.register - lo)]));
            }
        }
        Ok(out)
    }

    fn write(&mut self, register: u16, raw: u16) -> Result<(), String> {
        let mut mreq = self.request();
        let mut req = Vec::new();
        mreq.generate_set_holding(register, raw, &mut req).map_err(|e| format!("building a request: {e:?}"))?;
        self.exchange(&req, &mreq).map(drop).map_err(|why| format!("device write failed: {why}"))
    }
}
