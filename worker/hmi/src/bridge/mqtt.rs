//! The bridge's MQTT 3.1.1 connection: on the TCP connection airlockd opened (the bridge
//! cannot open one), optionally under TLS (rustls; the CA and client certificate come as
//! descriptors), packets encoded and decoded with `mqttrs`. Everything from the broker is
//! untrusted: packets are framed here with a size bound before `mqttrs` sees them, and a
//! packet it cannot decode ends the connection, never the worker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use mqttrs::{Packet, Pid, QoS, QosPid};

/// The largest packet the bridge takes from the broker (commands and STATE are small).
pub const MAX_PACKET: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker sent a malformed packet: {0}")]
    Malformed(String),
    #[error("the broker sent a packet of {0} bytes (at most {MAX_PACKET} are taken)")]
    TooLarge(usize),
}

/// The TLS settings, built once from the descriptors.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    /// From PEM: the CA certificates to trust, and optionally a client certificate chain and
    /// its key (mutual TLS).
    pub fn new(server_name: &str, ca_pem: &[u8], client: Option<(&[u8], &[u8])>) -> Result<Tls, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            let c = c.map_err(|e| format!("the CA file: {e}"))?;
            roots.add(c).map_err(|e| format!("the CA file: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("the CA file holds no certificate".into());
        }
        // ring, not rustls' default aws-lc-rs: a small C and assembly build against a large
        // CMake one on a 2-core machine. rustls deprecates ring's provider for lacking
        // post-quantum key exchange (X25519MLKEM768); classical X25519 is what the brokers
        // here negotiate anyway (Mosquitto on OpenSSL 3.0). Revisit with rustls 0.24.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain: Vec<_> = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("the client certificate file: {e}"))?;
                if chain.is_empty() {
                    return Err("the client certificate file holds no certificate".into());
                }
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the client key file: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("the client certificate: {e}"))?
            }
        };
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|e| format!("server-name {server_name:?}: {e}"))?;
        Ok(Tls { config: Arc::new(config), server_name })
    }
}

/// The socket as rustls sees it: one `send` per write. rustls writes TLS records with
/// `write_vectored`, which on a `TcpStream` is `writev`, a syscall the bridge's policy keeps
/// for stderr; reads are `recv` either way.
struct Sock<'a>(&'a TcpStream);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection to the broker, plain or under TLS.
#[derive(Debug)]
pub enum Link {
    Plain(TcpStream),
    Tls(Box<rustls::ClientConnection>, TcpStream),
}

impl Link {
    /// Takes a connected stream; under TLS, completes the handshake (bounded by the
    /// stream's timeouts).
    pub fn open(sock: TcpStream, tls: Option<&Tls>) -> Result<Link, LinkError> {
        let Some(tls) = tls else { return Ok(Link::Plain(sock)) };
        let mut conn = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())?;
        while conn.is_handshaking() {
            let (read, written) = conn.complete_io(&mut Sock(&sock))?;
            if read == 0 && written == 0 && conn.is_handshaking() {
                return Err(LinkError::Closed);
            }
        }
        Ok(Link::Tls(Box::new(conn), sock))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Link::Plain(s) | Link::Tls(_, s) => s.as_fd(),
        }
    }

    /// Writes all of `bytes` (blocking, bounded by the send timeout).
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        match self {
            Link::Plain(s) => s.write_all(bytes)?,
            Link::Tls(c, s) => {
                c.writer().write_all(bytes)?;
                while c.wants_write() {
                    c.write_tls(&mut Sock(s))?;
                }
            }
        }
        Ok(())
    }

    /// After the socket polled readable: reads once and appends what it carried to `into`.
    pub fn recv(&mut self, into: &mut Vec<u8>) -> Result<(), LinkError> {
        let mut buf = [0u8; 16 * 1024];
        match self {
            Link::Plain(s) => match s.read(&mut buf)? {
                0 => return Err(LinkError::Closed),
                n => into.extend_from_slice(&buf[..n]),
            },
            Link::Tls(c, s) => {
                if c.read_tls(&mut Sock(s))? == 0 {
                    return Err(LinkError::Closed);
                }
                c.process_new_packets()?;
                loop {
                    match c.reader().read(&mut buf) {
                        Ok(0) => return Err(LinkError::Closed),
                        Ok(n) => into.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                while c.wants_write() {
                    c.write_tls(&mut Sock(s))?;
                }
            }
        }
        if into.len() > 2 * MAX_PACKET {
            return Err(LinkError::TooLarge(into.len()));
        }
        Ok(())
    }
}

/// A packet from the broker, as the bridge uses it (owned: the read buffer moves on).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Connack {
        accepted: bool,
        code: String,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1_pid: Option<u16>,
    },
    Suback {
        pid: u16,
        granted: bool,
    },
    Puback(u16),
    Pingresp,
    /// Anything a client does not expect from a broker.
    Other(String),
}

/// The length of the first whole packet in `buf`, if there is one.
fn frame(buf: &[u8]) -> Result<Option<usize>, LinkError> {
    let mut len = 0usize;
    for pos in 0..4 {
        let Some(&b) = buf.get(1 + pos) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << (7 * pos);
        if b & 0x80 == 0 {
            let total = 2 + pos + len;
            if total > MAX_PACKET {
                return Err(LinkError::TooLarge(total));
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(LinkError::Malformed("a remaining length of more than four bytes".into()))
}

/// Takes the first whole packet off `buf`, if any.
pub fn next_packet(buf: &mut Vec<u8>) -> Result<Option<Incoming>, LinkError> {
    let Some(n) = frame(buf)? else { return Ok(None) };
    let one = &buf[..n];
    // `mqttrs` indexes some fields without bounds checks: it gets exactly one framed packet,
    // and a panic on a malformed one is caught and becomes an error, not the worker's death.
    let decoded = std::panic::catch_unwind(|| match mqttrs::decode_slice(one) {
        Ok(Some(p)) => Ok(incoming(&p)),
        Ok(None) => Err("a packet shorter than its length".to_string()),
        Err(e) => Err(e.to_string()),
    })
    .unwrap_or_else(|_| Err("the decoder rejected it".into()))
    .map_err(LinkError::Malformed)?;
    buf.drain(..n);
    Ok(Some(decoded))
}

fn incoming(p: &Packet<'_>) -> Incoming {
    match p {
        Packet::Connack(c) => {
            Incoming::Connack { accepted: c.code == mqttrs::ConnectReturnCode::Accepted, code: format!("{:?}", c.code) }
        }
        Packet::Publish(p) => Incoming::Publish {
            topic: p.topic_name.to_string(),
            payload: p.payload.to_vec(),
            qos1_pid: match p.qospid {
                QosPid::AtLeastOnce(pid) => Some(pid.get()),
                _ => None,
            },
        },
        Packet::Suback(s) => Incoming::Suback {
            pid: s.pid.get(),
            granted: s.return_codes.iter().all(|c| !matches!(c, mqttrs::SubscribeReturnCodes::Failure)),
        },
        Packet::Puback(pid) => Incoming::Puback(pid.get()),
        Packet::Pingresp => Incoming::Pingresp,
        other => Incoming::Other(format!("{:?}", other.get_type())),
    }
}

fn encode(p: &Packet<'_>, size_hint: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size_hint + 16];
    match mqttrs::encode_slice(p, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        // The hint covers every packet built below; a miss is a bug here, not input.
        Err(e) => unreachable!("encoding an MQTT packet into {} bytes: {e}", buf.len()),
    }
}

/// CONNECT with a clean session and a will.
pub struct ConnectArgs<'a> {
    pub client_id: &'a str,
    pub keepalive_s: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub will_topic: &'a str,
    pub will: &'a [u8],
}

impl std::fmt::Debug for ConnectArgs<'_> {
    // Without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectArgs")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

pub fn connect(a: &ConnectArgs<'_>) -> Vec<u8> {
    let size = 64
        + a.client_id.len()
        + a.username.map_or(0, str::len)
        + a.password.map_or(0, <[u8]>::len)
        + a.will_topic.len()
        + a.will.len();
    encode(
        &Packet::Connect(mqttrs::Connect {
            protocol: mqttrs::Protocol::MQTT311,
            keep_alive: a.keepalive_s,
            client_id: a.client_id,
            clean_session: true,
            last_will: Some(mqttrs::LastWill {
                topic: a.will_topic,
                message: a.will,
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            username: a.username,
            password: a.password,
        }),
        size,
    )
}

/// PUBLISH at QoS 0 (`pid` None) or 1.
pub fn publish(topic: &str, payload: &[u8], pid: Option<u16>) -> Vec<u8> {
    let qospid = match pid.and_then(|p| Pid::try_from(p).ok()) {
        Some(p) => QosPid::AtLeastOnce(p),
        None => QosPid::AtMostOnce,
    };
    encode(
        &Packet::Publish(mqttrs::Publish { dup: false, qospid, retain: false, topic_name: topic, payload }),
        topic.len() + payload.len() + 8,
    )
}

/// SUBSCRIBE to `topics` at QoS 1.
pub fn subscribe(pid: u16, topics: &[String]) -> Vec<u8> {
    let pid = Pid::try_from(pid.max(1)).unwrap_or_default();
    let topics: Vec<_> =
        topics.iter().map(|t| mqttrs::SubscribeTopic { topic_path: t.clone(), qos: QoS::AtLeastOnce }).collect();
    let size: usize = 16 + topics_len(&topics);
    encode(&Packet::Subscribe(mqttrs::Subscribe { pid, topics }), size)
}

fn topics_len(t: &[mqttrs::SubscribeTopic]) -> usize {
    t.iter().map(|t| t.topic_path.len() + 3).sum()
}

pub fn puback(pid: u16) -> Vec<u8> {
    encode(&Packet::Puback(Pid::try_from(pid.max(1)).unwrap_or_default()), 4)
}

pub fn pingreq() -> Vec<u8> {
    encode(&Packet::Pingreq, 2)
}

pub fn disconnect() -> Vec<u8> {
    encode(&Packet::Disconnect, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_framed_before_decoding_and_garbage_is_an_error_not_a_panic() {
        let mut buf = publish("spBv1.0/STATE/host", b"{\"online\":true}", Some(7));
        let whole = buf.len();
        buf.extend_from_slice(&pingreq()[..1]);
        // A Publish from the broker, then half a packet.
        assert_eq!(
            next_packet(&mut buf).expect("decodes"),
            Some(Incoming::Publish {
                topic: "spBv1.0/STATE/host".into(),
                payload: b"{\"online\":true}".to_vec(),
                qos1_pid: Some(7)
            })
        );
        assert_eq!(buf.len(), 1, "the packet ({whole} bytes) was taken off");
        assert_eq!(next_packet(&mut buf).expect("waits"), None);
        // A publish whose topic length runs past its packet.
        let mut bad = vec![0x30, 4, 0, 200, b'a', b'b'];
        assert!(matches!(next_packet(&mut bad), Err(LinkError::Malformed(_))));
        // A remaining length of five bytes, and one beyond the bound.
        assert!(next_packet(&mut vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(matches!(next_packet(&mut vec![0x30, 0xff, 0xff, 0x7f]), Err(LinkError::TooLarge(_))));
        for b in 0..=255u8 {
            let _ = next_packet(&mut vec![b, 3, 0, 1, 2]);
        }
    }

    #[test]
    fn connect_carries_the_will_and_the_credentials() {
        let c = connect(&ConnectArgs {
            client_id: "site-1",
            keepalive_s: 10,
            username: Some("u"),
            password: Some(b"p"),
            will_topic: "spBv1.0/g/NDEATH/site-1",
            will: b"\x01\x02",
        });
        let p = mqttrs::decode_slice(&c).expect("decodes").expect("whole");
        let Packet::Connect(c) = p else { panic!("not a connect: {p:?}") };
        assert!(c.clean_session);
        assert_eq!(c.username, Some("u"));
        let will = c.last_will.expect("a will");
        assert_eq!((will.topic, will.qos, will.retain), ("spBv1.0/g/NDEATH/site-1", QoS::AtLeastOnce, false));
    }
}
