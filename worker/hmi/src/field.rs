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

use crate::types::{self as hmi, RawWrite, Sample, Table};
use airlock_worker::{Pump, Response, Worker};
use rmodbus::{client::ModbusRequest, guess_response_frame_len, ModbusProto};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FieldSettings {
    #[serde(default = "d_poll")]
    pub(crate) poll_ms: u64,
    #[serde(default = "d_timeout")]
    pub(crate) timeout_ms: u64,
    /// Publish samples to logic and the historian through streams (`docs/hmi.md`), falling
    /// back to journaled messages while a stream is down.
    #[serde(default)]
    stream_samples: bool,
}
fn d_poll() -> u64 {
    500
}
fn d_timeout() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
pub(crate) struct Settings {
    plant: hmi::Plant,
    #[serde(default)]
    field: Option<FieldSettings>,
}

impl Settings {
    /// The validated plant and field's own settings.
    pub(crate) fn checked(self) -> Result<(hmi::Plant, FieldSettings), String> {
        let plant = self.plant.validated()?;
        let fs =
            self.field.unwrap_or(FieldSettings { poll_ms: d_poll(), timeout_ms: d_timeout(), stream_samples: false });
        if !(20..=3_600_000).contains(&fs.poll_ms) || !(10..=60_000).contains(&fs.timeout_ms) {
            return Err("bad [settings.field]: poll-ms must be 20..=3600000 and timeout-ms 10..=60000".to_string());
        }
        Ok((plant, fs))
    }
}

/// The device connection and the Modbus transaction counter.
#[derive(Debug)]
pub(crate) struct Device {
    stream: Option<TcpStream>,
    tr_id: u16,
    unit: u8,
    timeout: Duration,
    /// The fault being reported, if any (reported once per episode).
    fault: Option<String>,
    next_reopen: Instant,
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("field", &["field"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-field: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = w.settings::<Settings>().map_err(|e| e.to_string()).and_then(Settings::checked);
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
    let mut dev = Device::new(TcpStream::from(first), &plant, &fs);
    let poll_every = Duration::from_millis(fs.poll_ms.max(20));
    let mut next_poll = Instant::now();
    let mut dropped = [0u64; 2];
    let mut streams = [crate::samples::SampleOut::new("logic"), crate::samples::SampleOut::new("historian")];
    let stream_samples = fs.stream_samples;
    loop {
        let wait = next_poll.saturating_duration_since(Instant::now());
        // Rounded up: rounded down, the last millisecond before each poll was a busy loop of
        // zero-timeout polls (about 0.9 ms of CPU per poll; the HMI benchmark found it).
        let wait_ms =
            if w.has_pending() { 0 } else { i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX) };
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
                        dev.write_setpoint(&plant, &hmi::decode(&req.body)?)?;
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
            let sample = dev.sample(&plant);
            let body = hmi::encode(&sample);
            for (k, to) in ["logic", "historian"].into_iter().enumerate() {
                // Samples are periodic: one the broker (or the stream's ring) cannot take now is
                // dropped, said once when dropping starts and once, with the count, when it stops.
                let sent = match stream_samples.then(|| streams[k].publish(&mut w, &body)) {
                    Some(crate::samples::Published::Streamed) => Ok(()),
                    Some(crate::samples::Published::Dropped) => Err("the stream's ring is full".to_string()),
                    Some(crate::samples::Published::NotStreamed) | None => {
                        w.send(to, "sample", body.clone(), false).map_err(|e| e.to_string())
                    }
                };
                match sent {
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

/// Fills `buf` from the device by `deadline`, however the bytes trickle in.
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the device did not answer in time".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| format!("device connection: {e}"))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err("the device closed the connection".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err("the device did not answer in time".into())
            }
            Err(e) => return Err(format!("reading from the device: {e}")),
        }
    }
    Ok(())
}

/// The length of the answer whose 6-byte MBAP head is `head`, refused unless it is a
/// plausible Modbus TCP frame (8..=260 bytes).
pub fn answer_len(head: &[u8; 6]) -> Result<usize, String> {
    let len = guess_response_frame_len(head, ModbusProto::TcpUdp)
        .map_err(|e| format!("device sent a malformed frame header: {e:?}"))?;
    let len = usize::from(len);
    if !(8..=260).contains(&len) {
        return Err(format!("device sent a frame of {len} bytes"));
    }
    Ok(len)
}

/// Checks a whole answer `frame` (its length from [`answer_len`]) against the request
/// `mreq` it answers: transaction and unit ids, function, no exception.
pub fn check_answer(mreq: &ModbusRequest, frame: &[u8]) -> Result<(), String> {
    mreq.parse_ok(frame).map_err(|e| format!("device answered with an error or garbage: {e:?}"))
}

/// The `count` registers of a read answer (function 3 or 4, already checked by
/// [`check_answer`]), refusing an answer whose byte count or length disagrees with what was
/// asked.
pub fn registers(frame: &[u8], count: u16) -> Result<Vec<u16>, String> {
    let want = 2 * usize::from(count);
    let Some(&bytes) = frame.get(8) else {
        return Err("the device's answer has no byte count".into());
    };
    if usize::from(bytes) != want || frame.len() != 9 + want {
        return Err(format!(
            "the device answered {bytes} bytes of registers in a frame of {} bytes, asked {count} registers",
            frame.len()
        ));
    }
    Ok(frame[9..].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect())
}

impl Device {
    /// The device behind connection `s`, with the plant's unit id and field's timeout.
    pub(crate) fn new(s: TcpStream, plant: &hmi::Plant, fs: &FieldSettings) -> Device {
        let timeout = Duration::from_millis(fs.timeout_ms.max(10));
        let mut dev =
            Device { stream: None, tr_id: 0, unit: plant.unit_id, timeout, fault: None, next_reopen: Instant::now() };
        dev.attach(s);
        dev
    }

    /// One poll: every tag read, or the fault that prevented it.
    pub(crate) fn sample(&mut self, plant: &hmi::Plant) -> Sample {
        match self.read_all(plant) {
            Ok(values) => {
                if self.fault.take().is_some() {
                    tracing::info!("device answers again");
                }
                Sample { ts_ms: hmi::now_ms(), values, fault: None }
            }
            Err(why) => {
                // Said once per episode in the log; published every poll, so that the
                // layers above never mistake silence for a healthy device.
                if self.fault.as_deref() != Some(why.as_str()) {
                    tracing::warn!("device fault: {why}");
                    self.fault = Some(why.clone());
                }
                Sample { ts_ms: hmi::now_ms(), values: Vec::new(), fault: Some(why) }
            }
        }
    }

    /// Writes a setpoint logic checked, if it names a writable register of this plant.
    pub(crate) fn write_setpoint(&mut self, plant: &hmi::Plant, wr: &RawWrite) -> Result<(), String> {
        let known = plant.tag(&wr.tag).is_some_and(|t| t.writable() && t.register == wr.register);
        if !known {
            return Err(format!("{} register {} is not a setpoint of this plant", wr.tag, wr.register));
        }
        self.write(wr.register, wr.raw)?;
        tracing::info!(tag = %wr.tag, register = wr.register, "setpoint written to the device");
        Ok(())
    }

    /// Takes a connection; its timeouts are set per exchange (see `exchange`).
    fn attach(&mut self, s: TcpStream) {
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
        // One deadline for the whole exchange: a device that trickles bytes cannot hold the
        // layer longer than its timeout (the socket timeout alone is per read).
        let deadline = Instant::now() + self.timeout;
        let r = (|| -> Result<Vec<u8>, String> {
            s.set_write_timeout(Some(self.timeout)).map_err(|e| format!("device connection: {e}"))?;
            s.write_all(req).map_err(|e| format!("writing to the device: {e}"))?;
            let mut head = [0u8; 6];
            read_by(s, &mut head, deadline)?;
            let len = answer_len(&head)?;
            let mut frame = head.to_vec();
            frame.resize(len, 0);
            read_by(s, &mut frame[6..], deadline)?;
            check_answer(mreq, &frame)?;
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
            let span = u32::from(hi) - u32::from(lo) + 1;
            if span > 125 {
                return Err(format!("{table:?} registers {lo}..={hi} span more than one Modbus read (125)"));
            }
            let count = span as u16;
            let mut mreq = self.request();
            let mut req = Vec::new();
            match table {
                Table::Input => mreq.generate_get_inputs(lo, count, &mut req),
                Table::Holding => mreq.generate_get_holdings(lo, count, &mut req),
            }
            .map_err(|e| format!("building a request: {e:?}"))?;
            let frame = self.exchange(&req, &mreq)?;
            let regs = match registers(&frame, count) {
                Ok(r) => r,
                Err(why) => return Err(self.fail(why)),
            };
            for t in tags {
                match regs.get(usize::from(t.register - lo)) {
                    Some(v) => out.push((t.name.clone(), *v)),
                    None => return Err(self.fail(format!("no register {} in the device's answer", t.register))),
                }
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

#[cfg(test)]
mod tests {
    use super::registers;

    #[test]
    fn answers_that_disagree_with_the_request_are_refused_not_indexed() {
        // MBAP (7 bytes), function 4, byte count, data.
        let ok = [0, 1, 0, 0, 0, 7, 1, 4, 4, 0x01, 0x02, 0xff, 0xfe];
        assert_eq!(registers(&ok, 2), Ok(vec![0x0102, 0xfffe]));
        // Byte count 0 (a reply that made rmodbus index an empty slice).
        assert!(registers(&[0, 1, 0, 0, 0, 3, 1, 4, 0], 2).is_err());
        // Fewer registers than asked, or a byte count the frame does not hold.
        assert!(registers(&ok, 3).is_err());
        assert!(registers(&[0, 1, 0, 0, 0, 7, 1, 4, 4, 0x01], 2).is_err());
        assert!(registers(&[0, 1, 0, 0, 0, 2, 1, 4], 1).is_err());
    }
}
