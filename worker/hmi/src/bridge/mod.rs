//! `bridge`: publishes the site beyond itself, as a Sparkplug B 3.0 edge node over MQTT
//! (`docs/multi-site.md`). `logic` sends it the plant's state after every sample
//! (`bridge.update`, durable messages in airlockd's journal); the bridge publishes what
//! changed as NDATA and acknowledges a message only once the broker has confirmed it took
//! everything published before it (a PINGRESP after the PUBLISHes, on the same ordered
//! connection). Until then, and while the broker or the primary host is away, the messages
//! stay in airlockd's journal, encrypted, bounded by the bridge's `inbox-bytes` quota: store
//! and forward that survives a restart of the bridge, of airlockd and of the broker. On
//! return they are published again, in order, flagged historical when they were taken
//! before the new birth certificate.
//!
//! The bridge has no network of its own: airlockd connects to the broker and passes the
//! socket (brokered resource 0), and a new one on request after a failure. The CA, the
//! client certificate and key and the password come as descriptors of `file` resources,
//! read once at start; the bridge opens no path. Commands (NCMD, DCMD) other than a rebirth
//! request are refused and logged: remote writes are not accepted.

pub mod mqtt;
pub mod sparkplug;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use airlock_worker::{Pump, Worker};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use prost::Message as _;
use serde::Deserialize;

use crate::types::{self as hmi, Plant, Update};
use mqtt::{Incoming, Link, LinkError, Tls};
use sparkplug::{Command, Node, Payload};

/// `[settings.bridge]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BridgeSettings {
    /// Sparkplug group id and edge node id: topics `spBv1.0/<group>/<type>/<edge-node>`.
    pub group: String,
    pub edge_node: String,
    /// The primary host application's id: when set, the bridge publishes only while that
    /// host's STATE says it is online, and stores otherwise.
    #[serde(default)]
    pub primary_host: Option<String>,
    /// MQTT client id; `<group>-<edge-node>` when absent.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// The brokered resource (a `file`; 1 is the first after the broker connection) that
    /// holds the password: it never appears in the configuration.
    #[serde(default)]
    pub password: Option<u32>,
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    #[serde(default = "d_keepalive")]
    pub keepalive_s: u16,
    /// A tag's value is published when it moved more than this from the last one published
    /// (engineering units); `deadbands` overrides it per tag.
    #[serde(default)]
    pub deadband: f64,
    #[serde(default)]
    pub deadbands: BTreeMap<String, f64>,
    /// Publish `Node Info/Sample Time` with every sample, a heartbeat by which a host tells a
    /// quiet plant from a silent link, and sees any gap.
    #[serde(default = "yes")]
    pub sample_time: bool,
}

/// `[settings.bridge.tls]`: resources are indices of `file` resources of the bridge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSettings {
    /// The name the broker's certificate must carry.
    pub server_name: String,
    pub ca: u32,
    #[serde(default)]
    pub client_cert: Option<u32>,
    #[serde(default)]
    pub client_key: Option<u32>,
}

fn d_keepalive() -> u16 {
    10
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct Settings {
    plant: Plant,
    bridge: BridgeSettings,
}

impl BridgeSettings {
    /// Checks what a configuration controls; returns the first problem.
    pub fn check(&self, plant: &Plant) -> Result<(), String> {
        for (what, id) in [("group", &self.group), ("edge-node", &self.edge_node)] {
            if !sparkplug::valid_id(id) {
                return Err(format!("[settings.bridge] {what} {id:?}: 1..=128 characters, none of / + # or controls"));
            }
        }
        if let Some(h) = &self.primary_host {
            if !sparkplug::valid_id(h) {
                return Err(format!("[settings.bridge] primary-host {h:?}: 1..=128 characters, none of / + #"));
            }
        }
        if !(5..=3600).contains(&self.keepalive_s) {
            return Err("[settings.bridge] keepalive-s must be 5..=3600".into());
        }
        if !(self.deadband.is_finite() && self.deadband >= 0.0) {
            return Err("[settings.bridge] deadband must be a finite number >= 0".into());
        }
        for (tag, d) in &self.deadbands {
            if plant.tag(tag).is_none() {
                return Err(format!("[settings.bridge.deadbands] {tag:?} is not a tag of the plant"));
            }
            if !(d.is_finite() && *d >= 0.0) {
                return Err(format!("[settings.bridge.deadbands] {tag}: must be a finite number >= 0"));
            }
        }
        let mut files: Vec<u32> = self.password.into_iter().collect();
        if let Some(t) = &self.tls {
            files.push(t.ca);
            match (t.client_cert, t.client_key) {
                (Some(c), Some(k)) => files.extend([c, k]),
                (None, None) => {}
                _ => return Err("[settings.bridge.tls] client-cert and client-key go together".into()),
            }
        }
        if files.contains(&0) {
            return Err("[settings.bridge] resource 0 is the broker connection; files are resources 1 and on".into());
        }
        Ok(())
    }
}

/// Reads a `file` resource the bridge was given (`index` 1 is fd 6), at most 1 MiB.
fn read_resource(index: u32, what: &str) -> Result<Vec<u8>, String> {
    let fd = i32::try_from(index)
        .ok()
        .and_then(|i| airlock_protocol::handoff::FIRST_BROKERED_FD.checked_add(i))
        .ok_or_else(|| format!("{what}: no resource {index}"))?;
    let fd = airlock_protocol::sys::claim_inherited_fd(fd)
        .map_err(|e| format!("{what}: no descriptor for resource {index} (a `file` resource of the bridge): {e}"))?;
    let mut out = Vec::new();
    std::fs::File::from(fd)
        .take(1 << 20)
        .read_to_end(&mut out)
        .map_err(|e| format!("{what} (resource {index}): {e}"))?;
    Ok(out)
}

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("bridge", &["bridge"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    let mut bridge = match Bridge::from_worker(&w) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    w.hold_acks();
    match bridge.run(&mut w) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The broker password: never printed.
struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<password>")
    }
}

/// A message delivered and not yet acknowledged.
#[derive(Debug)]
struct Held {
    id: u64,
    update: Update,
}

/// What was published and not yet confirmed: the PINGREQ that will confirm it.
#[derive(Debug)]
struct Fence {
    /// `held[..covers]` is confirmed by its PINGRESP.
    covers: usize,
    /// The node's reference values after them.
    reference: BTreeMap<String, (sparkplug::Val, i64)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// CONNECT sent.
    Connack,
    /// Subscribed; waiting for the primary host's STATE to say online.
    AwaitHost,
    /// NBIRTH published at `birth_ms`: publishing.
    Live { birth_ms: i64 },
}

#[derive(Debug)]
struct Session {
    link: Link,
    rbuf: Vec<u8>,
    phase: Phase,
    since: Instant,
    last_sent: Instant,
    /// When the PINGREQ in flight went out.
    ping_out: Option<Instant>,
    next_pid: u16,
    /// Sparkplug's message sequence number (0 in NBIRTH).
    seq: u64,
}

#[derive(Debug)]
enum Conn {
    /// Waiting until `next_attempt` to ask airlockd for a new connection.
    Down,
    /// airlockd's connection is being established.
    Connecting(TcpStream, Instant),
    Up(Box<Session>),
}

/// The edge node.
#[derive(Debug)]
pub struct Bridge {
    s: BridgeSettings,
    plant: Plant,
    tls: Option<Tls>,
    password: Option<Secret>,
    node: Node,
    /// Delivered and not acknowledged, in order; `held[..sent]` is published in this session.
    held: VecDeque<Held>,
    sent: usize,
    /// The node's reference values as of the last confirmation: a new session publishes
    /// everything after it again.
    confirmed: BTreeMap<String, (sparkplug::Val, i64)>,
    fence: Option<Fence>,
    /// The session's birth/death sequence number (`bdSeq`): 0 in the first CONNECT after the
    /// bridge starts, one more in each next one, 0 after 255.
    bd_seq: u64,
    connections: u64,
    /// The newest STATE timestamp seen from the primary host.
    host_ts: i64,
    conn: Conn,
    next_attempt: Instant,
    backoff: Duration,
    /// What went wrong last, said once per episode.
    down_because: Option<String>,
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Updates per NDATA message at most (each metric keeps its own timestamp).
const BATCH: usize = 32;

impl Bridge {
    fn from_worker(w: &Worker) -> Result<Bridge, String> {
        let s: Settings = w.settings().map_err(|e| e.to_string())?;
        let plant = s.plant.validated()?;
        s.bridge.check(&plant)?;
        let password = match s.bridge.password {
            Some(i) => {
                let mut p = read_resource(i, "the password file")?;
                while p.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    p.pop();
                }
                Some(p)
            }
            None => None,
        };
        let tls = match &s.bridge.tls {
            Some(t) => {
                let ca = read_resource(t.ca, "the CA file")?;
                let client = match (t.client_cert, t.client_key) {
                    (Some(c), Some(k)) => {
                        Some((read_resource(c, "the client certificate")?, read_resource(k, "the client key")?))
                    }
                    _ => None,
                };
                Some(Tls::new(&t.server_name, &ca, client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))?)
            }
            None => None,
        };
        let first = airlock_protocol::sys::claim_inherited_fd(airlock_protocol::handoff::FIRST_BROKERED_FD)
            .map_err(|e| format!("no broker connection at fd 5 (a tcp-connect resource): {e}"))?;
        Ok(Bridge::new(s.bridge, plant, tls, password, Conn::Connecting(TcpStream::from(first), Instant::now())))
    }

    fn new(s: BridgeSettings, plant: Plant, tls: Option<Tls>, password: Option<Vec<u8>>, conn: Conn) -> Bridge {
        let password = password.map(Secret);
        let node = Node::new(&plant, s.deadband, &s.deadbands, s.sample_time);
        Bridge {
            s,
            plant,
            tls,
            password,
            node,
            held: VecDeque::new(),
            sent: 0,
            confirmed: BTreeMap::new(),
            fence: None,
            bd_seq: 0,
            connections: 0,
            host_ts: 0,
            conn,
            next_attempt: Instant::now(),
            backoff: Duration::from_millis(500),
            down_because: None,
        }
    }

    fn topic(&self, kind: &str) -> String {
        sparkplug::topic(&self.s.group, kind, &self.s.edge_node)
    }

    fn run(&mut self, w: &mut Worker) -> Result<(), String> {
        tracing::info!(group = %self.s.group, node = %self.s.edge_node, tls = self.tls.is_some(), "bridge starting");
        loop {
            let (chan, link) = self.wait(w)?;
            if chan {
                let pumped = w.pump(
                    |_w, req, _bulk| Err(format!("the bridge has no method {:?}", req.method)),
                    |w, d, _bulk| self.take(w, d),
                );
                match pumped.map_err(|e| e.to_string())? {
                    Pump::Idle => {}
                    Pump::Stop => {
                        self.shut_down();
                        return Ok(());
                    }
                }
            }
            if link {
                self.on_link_ready(w);
            }
            self.tick(w);
        }
    }

    /// Waits for the channel or the broker's connection; returns which is ready.
    fn wait(&self, w: &Worker) -> Result<(bool, bool), String> {
        if w.has_pending() {
            return Ok((true, false));
        }
        let mut fds = vec![PollFd::new(w.channel_fd(), PollFlags::POLLIN)];
        match &self.conn {
            Conn::Connecting(s, _) => fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT)),
            Conn::Up(s) => fds.push(PollFd::new(s.link.fd(), PollFlags::POLLIN)),
            Conn::Down => {}
        }
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        Ok((ready(&fds[0]), fds.get(1).is_some_and(ready)))
    }

    /// A delivery from airlockd: held until the broker confirms it.
    fn take(&mut self, w: &mut Worker, d: &airlock_worker::wire::Delivery) {
        let update = if d.method == "update" { hmi::decode::<Update>(&d.body) } else { Err("not an update".into()) };
        match update {
            Ok(update) => self.held.push_back(Held { id: d.id, update }),
            Err(e) => {
                tracing::warn!(from = %d.from, method = %d.method, "dropping a message: {e}");
                if let Err(e) = w.ack([d.id]) {
                    tracing::error!("acknowledging a dropped message: {e}");
                }
            }
        }
    }

    fn fail(&mut self, why: String) {
        if self.down_because.as_deref() != Some(why.as_str()) {
            tracing::warn!(
                unconfirmed = self.sent,
                held = self.held.len(),
                "broker connection lost: {why}; storing until it is back"
            );
            self.down_because = Some(why);
        }
        self.conn = Conn::Down;
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
        // Nothing published in the lost session counts: it is published again.
        self.sent = 0;
        self.fence = None;
        self.node.restore(self.confirmed.clone());
    }

    fn on_link_ready(&mut self, w: &mut Worker) {
        match std::mem::replace(&mut self.conn, Conn::Down) {
            Conn::Connecting(sock, _) => {
                if let Err(e) = self.establish(sock) {
                    let why = match &e {
                        LinkError::Io(io)
                            if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                        {
                            format!("the broker did not answer within {} s", IO_TIMEOUT.as_secs())
                        }
                        _ => e.to_string(),
                    };
                    self.fail(format!("connecting: {why}"));
                }
            }
            Conn::Up(mut s) => {
                let got = s.link.recv(&mut s.rbuf);
                self.conn = Conn::Up(s);
                match got {
                    Ok(()) => self.read_packets(w),
                    Err(e) => self.fail(e.to_string()),
                }
            }
            Conn::Down => {}
        }
    }

    /// The socket is connected (or failed): TLS, then CONNECT.
    fn establish(&mut self, sock: TcpStream) -> Result<(), LinkError> {
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        let mut link = Link::open(sock, self.tls.as_ref())?;
        // Counted per CONNECT written (a connection refused or a handshake that fails sends
        // none), as Sparkplug counts them.
        let bd_seq = self.connections % 256;
        let now = hmi::now_ms();
        let will = sparkplug::death(bd_seq, now.max(0) as u64).encode_to_vec();
        let client_id = self.s.client_id.clone().unwrap_or_else(|| format!("{}-{}", self.s.group, self.s.edge_node));
        let will_topic = self.topic("NDEATH");
        link.send(&mqtt::connect(&mqtt::ConnectArgs {
            client_id: &client_id,
            keepalive_s: self.s.keepalive_s,
            username: self.s.username.as_deref(),
            password: self.password.as_ref().map(|p| p.0.as_slice()),
            will_topic: &will_topic,
            will: &will,
        }))?;
        self.bd_seq = bd_seq;
        self.connections += 1;
        let now = Instant::now();
        self.conn = Conn::Up(Box::new(Session {
            link,
            rbuf: Vec::new(),
            phase: Phase::Connack,
            since: now,
            last_sent: now,
            ping_out: None,
            next_pid: 1,
            seq: 0,
        }));
        Ok(())
    }

    fn session(&mut self) -> Option<&mut Session> {
        match &mut self.conn {
            Conn::Up(s) => Some(s),
            _ => None,
        }
    }

    /// Sends on the session; a failure ends it.
    fn send(&mut self, bytes: &[u8]) -> bool {
        let Some(s) = self.session() else { return false };
        match s.link.send(bytes) {
            Ok(()) => {
                s.last_sent = Instant::now();
                true
            }
            Err(e) => {
                self.fail(format!("sending: {e}"));
                false
            }
        }
    }

    fn read_packets(&mut self, w: &mut Worker) {
        loop {
            let Some(s) = self.session() else { return };
            let p = match mqtt::next_packet(&mut s.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => return self.fail(e.to_string()),
            };
            self.on_packet(w, p);
        }
    }

    fn on_packet(&mut self, w: &mut Worker, p: Incoming) {
        let Some(phase) = self.session().map(|s| std::mem::replace(&mut s.phase, Phase::Connack)) else { return };
        let restore = |b: &mut Bridge, phase: Phase| {
            if let Some(s) = b.session() {
                s.phase = phase;
            }
        };
        match (phase, p) {
            (Phase::Connack, Incoming::Connack { accepted: true, .. }) => {
                let mut topics = vec![self.topic("NCMD"), format!("{}/#", self.topic("DCMD"))];
                if let Some(h) = &self.s.primary_host {
                    topics.push(sparkplug::state_topic(h));
                }
                let sub = mqtt::subscribe(1, &topics);
                if self.send(&sub) {
                    if let Some(s) = self.session() {
                        s.next_pid = 2;
                    }
                    if self.s.primary_host.is_some() {
                        restore(self, Phase::AwaitHost);
                    } else {
                        self.birth();
                    }
                }
            }
            (Phase::Connack, Incoming::Connack { accepted: false, code }) => {
                self.fail(format!("the broker refused the connection: {code}"));
            }
            (phase, Incoming::Publish { topic, payload, qos1_pid }) => {
                restore(self, phase);
                if let Some(pid) = qos1_pid {
                    if !self.send(&mqtt::puback(pid)) {
                        return;
                    }
                }
                self.on_publish(&topic, &payload);
            }
            (phase, Incoming::Suback { granted, .. }) => {
                restore(self, phase);
                if !granted {
                    self.fail(
                        "the broker refused a subscription (its ACL): commands and the primary host's STATE are needed"
                            .into(),
                    );
                }
            }
            (phase, Incoming::Pingresp) => {
                restore(self, phase);
                if let Some(s) = self.session() {
                    s.ping_out = None;
                }
                self.confirm(w);
            }
            (phase, Incoming::Puback(_)) => restore(self, phase),
            (phase, other) => {
                restore(self, phase);
                self.fail(format!("unexpected from the broker: {other:?}"));
            }
        }
    }

    /// The PINGRESP for the fence: everything published before it reached the broker.
    fn confirm(&mut self, w: &mut Worker) {
        let Some(f) = self.fence.take() else { return };
        let ids: Vec<u64> = self.held.drain(..f.covers).map(|h| h.id).collect();
        self.sent -= f.covers;
        self.confirmed = f.reference;
        if let Err(e) = w.ack(ids) {
            tracing::error!("acknowledging published messages: {e}");
        }
        if self.down_because.take().is_some() {
            tracing::info!("publishing again");
        }
        self.backoff = Duration::from_millis(500);
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        if Some(topic) == self.s.primary_host.as_deref().map(sparkplug::state_topic).as_deref() {
            return self.on_host_state(payload);
        }
        if topic == self.topic("NCMD") {
            match sparkplug::command(payload) {
                Ok(Command::Rebirth) => {
                    tracing::info!("rebirth requested: publishing NBIRTH again");
                    if matches!(self.session().map(|s| &s.phase), Some(Phase::Live { .. })) {
                        self.birth();
                    }
                }
                Ok(Command::Refused(metrics)) => tracing::warn!(
                    ?metrics,
                    "NCMD refused: this edge node accepts no remote writes (only Node Control/Rebirth)"
                ),
                Err(e) => tracing::warn!("NCMD refused: {e}"),
            }
        } else if topic.starts_with(&self.topic("DCMD")) {
            tracing::warn!(%topic, "DCMD refused: this edge node has no devices and accepts no remote writes");
        } else {
            tracing::warn!(%topic, "a message on a topic the bridge did not subscribe to; ignored");
        }
    }

    /// Sparkplug 3.0: publish only while the primary host is online; when it goes offline,
    /// say NDEATH, disconnect and wait for it on a new connection.
    fn on_host_state(&mut self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct State {
            online: bool,
            timestamp: i64,
        }
        let st: State = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                return tracing::warn!("the primary host's STATE is not {{\"online\": bool, \"timestamp\": ms}}: {e}")
            }
        };
        if st.timestamp < self.host_ts {
            return tracing::debug!("a STATE older than the last one seen; ignored");
        }
        self.host_ts = st.timestamp;
        let phase = self.session().map(|s| &s.phase);
        match (st.online, phase) {
            (true, Some(Phase::AwaitHost)) => {
                tracing::info!("the primary host is online");
                self.birth();
            }
            (false, Some(Phase::Live { .. })) => {
                tracing::warn!("the primary host is offline: storing until it is back");
                let death = sparkplug::death(self.bd_seq, hmi::now_ms().max(0) as u64).encode_to_vec();
                let topic = self.topic("NDEATH");
                if self.send(&mqtt::publish(&topic, &death, None)) {
                    self.send(&mqtt::disconnect());
                }
                self.fail("the primary host went offline".into());
                self.next_attempt = Instant::now() + Duration::from_millis(500);
            }
            _ => {}
        }
    }

    /// NBIRTH: every metric at its newest known value (the messages held included); then the
    /// messages not confirmed are published again after it.
    fn birth(&mut self) {
        let now = hmi::now_ms();
        let mut newest = self.node.clone();
        newest.restore(self.confirmed.clone());
        for h in &self.held {
            newest.apply(&self.plant, &h.update, false);
        }
        let payload = Payload {
            timestamp: Some(now.max(0) as u64),
            metrics: newest.birth(self.bd_seq, now.max(0) as u64),
            seq: Some(0),
            ..Payload::default()
        }
        .encode_to_vec();
        self.sent = 0;
        self.fence = None;
        self.node.restore(self.confirmed.clone());
        let topic = self.topic("NBIRTH");
        if self.send(&mqtt::publish(&topic, &payload, None)) {
            if let Some(s) = self.session() {
                s.phase = Phase::Live { birth_ms: now };
                s.seq = 0;
            }
            tracing::info!(bd_seq = self.bd_seq, replay = self.held.len(), "NBIRTH published: live");
        }
    }

    /// Publishes what is held and not yet sent, asks for confirmation, keeps the connection
    /// alive, and reconnects when it is down.
    fn tick(&mut self, w: &mut Worker) {
        match &self.conn {
            Conn::Down => {
                if Instant::now() >= self.next_attempt {
                    self.reconnect(w);
                }
                return;
            }
            Conn::Connecting(_, since) => {
                if since.elapsed() > CONNECT_TIMEOUT {
                    self.fail(format!("no connection to the broker within {} s", CONNECT_TIMEOUT.as_secs()));
                }
                return;
            }
            Conn::Up(_) => {}
        }
        let keepalive = Duration::from_secs(u64::from(self.s.keepalive_s));
        let Some(s) = self.session() else { return };
        if let Some(t) = s.ping_out {
            if t.elapsed() > keepalive {
                return self.fail(format!("the broker did not answer a PINGREQ within {} s", keepalive.as_secs()));
            }
        }
        if s.phase == Phase::Connack && s.since.elapsed() > CONNECT_TIMEOUT {
            return self.fail(format!("no CONNACK from the broker within {} s", CONNECT_TIMEOUT.as_secs()));
        }
        if let Phase::Live { birth_ms } = s.phase {
            self.publish_held(birth_ms);
        }
        let Some(s) = self.session() else { return };
        let idle = s.last_sent.elapsed() >= keepalive / 2;
        if s.ping_out.is_none() && (idle || (self.fence.is_none() && self.sent > 0)) {
            if self.sent > 0 && self.fence.is_none() {
                self.fence = Some(Fence { covers: self.sent, reference: self.node.snapshot() });
            }
            if self.send(&mqtt::pingreq()) {
                if let Some(s) = self.session() {
                    s.ping_out = Some(Instant::now());
                }
            }
        }
    }

    /// NDATA for the held messages not yet sent, `BATCH` updates per message.
    fn publish_held(&mut self, birth_ms: i64) {
        let topic = self.topic("NDATA");
        while self.sent < self.held.len() {
            let end = (self.sent + BATCH).min(self.held.len());
            let mut metrics = Vec::new();
            for h in self.held.range(self.sent..end) {
                metrics.extend(self.node.apply(&self.plant, &h.update, h.update.ts_ms < birth_ms));
            }
            if !metrics.is_empty() {
                let Some(s) = self.session() else { return };
                s.seq = (s.seq + 1) % 256;
                let payload = Payload {
                    timestamp: Some(hmi::now_ms().max(0) as u64),
                    metrics,
                    seq: Some(s.seq),
                    ..Payload::default()
                }
                .encode_to_vec();
                if !self.send(&mqtt::publish(&topic, &payload, None)) {
                    return;
                }
            }
            self.sent = end;
        }
    }

    fn reconnect(&mut self, w: &mut Worker) {
        match w.reopen(0) {
            Ok(fd) => {
                tracing::debug!("a new broker connection from airlockd");
                self.conn = Conn::Connecting(TcpStream::from(fd), Instant::now());
            }
            Err(e) => {
                tracing::debug!("reopen: {e}");
                // airlockd's backoff decides; asking again sooner only gets "retry in".
                self.next_attempt = Instant::now() + Duration::from_millis(500);
            }
        }
    }

    /// At shutdown: NDEATH (a clean DISCONNECT suppresses the will), then DISCONNECT. What
    /// is held stays in airlockd's journal for the next start.
    fn shut_down(&mut self) {
        if matches!(self.session().map(|s| &s.phase), Some(Phase::Live { .. })) {
            let death = sparkplug::death(self.bd_seq, hmi::now_ms().max(0) as u64).encode_to_vec();
            let topic = self.topic("NDEATH");
            if self.send(&mqtt::publish(&topic, &death, None)) {
                self.send(&mqtt::disconnect());
            }
        }
        tracing::info!(held = self.held.len(), "bridge stopping; unconfirmed messages stay in airlockd's journal");
    }
}
