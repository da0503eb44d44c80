//! In-process tests of the channel and codec: round trips, every single-bit flip, replay,
//! reorder, truncation, oversize, wrong keys, versions, poisoning, rekeying, hostile bytes.

use airlock_protocol::{
    Bulk, BulkAnnounce, BulkMode, BulkWriter, Channel, ChannelError, ChannelKeys, Hello, Limits, Role,
    DEFAULT_REKEY_INTERVAL,
};
use std::os::fd::AsFd;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Text(String),
    Blob(Vec<u8>),
}

fn established(limits: Limits, rekey: u64) -> (Channel, Channel) {
    let (mut a, mut b) = Channel::pair(limits, rekey).expect("pair");
    let t = std::thread::spawn(move || {
        b.handshake(&Hello::new(Role::Worker, "b")).expect("b handshake");
        b
    });
    let peer = a.handshake(&Hello::new(Role::Supervisor, "a")).expect("a handshake");
    assert_eq!(peer, Hello::new(Role::Worker, "b"));
    (a, t.join().expect("join"))
}

#[test]
fn message_round_trips_with_fds() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let (r, w) = std::io::pipe().expect("pipe");
    a.send_with(&Msg::Text("hello".into()), &[std::os::fd::AsFd::as_fd(&w)]).expect("send");
    drop(w);
    let got = b.recv::<Msg>().expect("recv");
    assert_eq!(got.msg, Msg::Text("hello".into()));
    assert_eq!(got.fds.len(), 1);
    assert!(got.bulk.is_none());
    drop(r);
}

#[test]
fn batch_send_arrives_in_order() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let msgs: Vec<Msg> = (0..200).map(Msg::Ping).collect();
    let t = std::thread::spawn(move || {
        a.send_batch(&msgs).expect("batch");
        a
    });
    for i in 0..200 {
        assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(i));
    }
    drop(t.join());
}

#[test]
fn rekeying_every_few_frames_keeps_both_sides_in_step() {
    let (mut a, mut b) = established(Limits::default(), 3);
    for i in 0..50 {
        a.send(&Msg::Ping(i)).expect("send");
        assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(i));
        b.send(&Msg::Ping(i + 1000)).expect("send back");
        assert_eq!(a.recv::<Msg>().expect("recv back").msg, Msg::Ping(i + 1000));
    }
}

/// Two established ends under the same keys whose rekey intervals differ: `a` (the sender in
/// the tests below) ratchets every `a_rekey` frames, `b` every `b_rekey`.
fn established_with_rekey_intervals(a_rekey: u64, b_rekey: u64) -> (Channel, Channel) {
    let (sa, sb) = airlock_protocol::sys::seqpacket_pair().expect("pair");
    let (mut ka, mut kb) = ChannelKeys::generate(DEFAULT_REKEY_INTERVAL).expect("keys");
    ka.rekey_interval = a_rekey;
    kb.rekey_interval = b_rekey;
    let mut a = Channel::new(sa, ka, Limits::default());
    let mut b = Channel::new(sb, kb, Limits::default());
    let t = std::thread::spawn(move || {
        b.handshake(&Hello::new(Role::Worker, "b")).expect("b handshake");
        b
    });
    a.handshake(&Hello::new(Role::Supervisor, "a")).expect("a handshake");
    (a, t.join().expect("join"))
}

/// Sends frames 1, 2, 3 (the handshake was 0) from `a` to `b` and asserts that `b` takes the
/// first two and refuses the third, the first frame of epoch 1 at an interval of 3.
fn assert_third_frame_fails_authentication(mut a: Channel, mut b: Channel) {
    for i in 1..=3 {
        a.send(&Msg::Ping(i)).expect("send");
    }
    for i in 1..=2 {
        assert_eq!(b.recv::<Msg>().expect("frame of epoch 0").msg, Msg::Ping(i));
    }
    match b.recv::<Msg>() {
        Err(ChannelError::Authenticate { seq: 3 }) => {}
        other => panic!("expected frame 3 to fail authentication, got {other:?}"),
    }
    match b.recv::<Msg>() {
        Err(ChannelError::Poisoned { reason }) => assert!(reason.contains("frame 3 failed"), "{reason}"),
        other => panic!("expected poisoned, got {other:?}"),
    }
}

#[test]
fn sender_rekeying_earlier_than_receiver_fails_authentication_at_new_epoch() {
    let (a, b) = established_with_rekey_intervals(3, DEFAULT_REKEY_INTERVAL);
    assert_third_frame_fails_authentication(a, b);
}

#[test]
fn receiver_rekeying_earlier_than_sender_fails_authentication_at_new_epoch() {
    let (a, b) = established_with_rekey_intervals(DEFAULT_REKEY_INTERVAL, 3);
    assert_third_frame_fails_authentication(a, b);
}

#[test]
fn channel_sockets_and_received_descriptors_are_close_on_exec() {
    use airlock_protocol::sys::is_cloexec;
    use std::os::fd::AsFd;
    let cloexec = |fd: std::os::fd::BorrowedFd<'_>| is_cloexec(fd).expect("F_GETFD");

    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    assert!(cloexec(a.as_fd()) && cloexec(b.as_fd()), "Channel::pair sockets");
    let (parent, child) =
        airlock_protocol::handoff::prepare(Limits::default(), DEFAULT_REKEY_INTERVAL).expect("prepare");
    let (child_sock, key_memfd) = child.into_parts();
    assert!(cloexec(parent.as_fd()), "handoff parent socket");
    assert!(cloexec(child_sock.as_fd()) && cloexec(key_memfd.as_fd()), "handoff child end, before install");

    // FD_CLOEXEC belongs to a descriptor, not to the file: a received descriptor is a new one,
    // close-on-exec only if the receiver asked for it, whatever the sender's flag.
    let (r, w) = std::io::pipe().expect("pipe");
    // `b` has not sent since the handshake: it reads as a streaming receiver (recvmmsg).
    a.send_with(&Msg::Ping(1), &[r.as_fd(), w.as_fd()]).expect("send fds");
    let got = b.recv::<Msg>().expect("recv fds (recvmmsg)");
    assert_eq!(got.fds.len(), 2);
    assert!(got.fds.iter().all(|f| cloexec(f.as_fd())), "descriptors received through recvmmsg");
    // After a send, `b` reads one frame at a time (recvmsg).
    b.send(&Msg::Ping(2)).expect("reply");
    assert_eq!(a.recv::<Msg>().expect("reply").msg, Msg::Ping(2));
    a.send_with(&Msg::Ping(3), &[r.as_fd()]).expect("send fd");
    let got = b.recv::<Msg>().expect("recv fd (recvmsg)");
    assert_eq!(got.fds.len(), 1);
    assert!(cloexec(got.fds[0].as_fd()), "descriptor received through recvmsg");
    // A bulk memfd.
    let w_bulk = BulkWriter::copy_from(&vec![5u8; 1 << 20], a.limits().inline_threshold).expect("writer");
    a.send_bulk(&Msg::Ping(4), &[], w_bulk, BulkMode::Sealed).expect("send bulk");
    let got = b.recv::<Msg>().expect("recv bulk");
    let bulk = got.bulk.expect("bulk");
    assert!(cloexec(bulk.sealed_fd().expect("memfd bulk")), "received bulk memfd");
}

#[test]
fn memfd_with_exec_seal_besides_the_required_four_is_accepted() {
    use airlock_protocol::sys;
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::from(sys::memfd_create(c"exec-sealed", false).expect("memfd"));
    file.set_len(4096).expect("ftruncate");
    // As a memfd made with MFD_NOEXEC_SEAL: no exec bits. (On a memfd that still has them the
    // kernel adds F_SEAL_FUTURE_WRITE along with F_SEAL_EXEC, and that seal is refused.)
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).expect("fchmod");
    match sys::add_seals(std::os::fd::AsFd::as_fd(&file), libc::F_SEAL_EXEC) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipped: this kernel has no F_SEAL_EXEC (Linux 6.3+), so no peer can send it");
            return;
        }
        r => r.expect("F_SEAL_EXEC"),
    }
    let fd = std::os::fd::AsFd::as_fd(&file);
    sys::add_seals(fd, sys::SEAL_SET).expect("seal");
    assert_eq!(sys::get_seals(fd).expect("seals"), sys::SEAL_SET | libc::F_SEAL_EXEC);
    airlock_protocol::bulk::verify_sealed_memfd(fd, 4096, 4096).expect("F_SEAL_EXEC only takes rights away");
}

fn bulk_round_trip(len: usize, mode: BulkMode) -> Bulk {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let w = BulkWriter::copy_from(&data, a.limits().inline_threshold).expect("writer");
    let t = std::thread::spawn(move || {
        a.send_bulk(&Msg::Ping(len as u64), &[], w, mode).expect("send bulk");
        a
    });
    let got = b.recv::<Msg>().expect("recv");
    drop(t.join());
    assert_eq!(got.msg, Msg::Ping(len as u64));
    let bulk = got.bulk.expect("bulk present");
    assert!(bulk[..] == data[..], "bulk bytes differ");
    bulk
}

#[test]
fn small_bulk_travels_inline() {
    let b = bulk_round_trip(100, BulkMode::Sealed);
    assert!(!b.is_mapped());
}

#[test]
fn large_bulk_arrives_as_sealed_mapping() {
    let b = bulk_round_trip(1 << 20, BulkMode::Sealed);
    assert!(b.is_mapped());
    let fd = b.sealed_fd().expect("fd");
    airlock_protocol::bulk::verify_sealed_memfd(fd, 1 << 20, 1 << 20).expect("still sealed");
}

#[test]
fn large_encrypted_bulk_round_trips() {
    let b = bulk_round_trip(3 << 20, BulkMode::SealedEncrypted);
    assert!(!b.is_mapped());
}

#[test]
fn empty_bulk_round_trips() {
    let b = bulk_round_trip(0, BulkMode::Sealed);
    assert!(b.is_empty());
}

/// A descriptor that is no memfd at all: taking it in as a payload (verifying, mapping or
/// decrypting it) can only fail.
fn not_a_memfd() -> std::os::fd::OwnedFd {
    let (x, _) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    x.into()
}

#[test]
fn declined_encrypted_bulk_is_closed_unread_and_the_channel_stays_in_step() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    a.send_unchecked_bulk_fd(&Msg::Ping(1), not_a_memfd(), 1 << 20, true).expect("send");
    let mut asked = Vec::new();
    let got = b
        .try_recv_admitting::<Msg>(|m, ann| {
            asked.push((m.clone(), *ann));
            false
        })
        .expect("a declined payload is no error")
        .expect("a message");
    let announced = BulkAnnounce { len: 1 << 20, encrypted: true, other_fds: 0 };
    assert_eq!(asked, vec![(Msg::Ping(1), announced)], "asked once, with the message, before reading it");
    assert_eq!((got.msg, got.bulk.is_none(), got.declined), (Msg::Ping(1), true, Some(announced)));
    // The next payload, admitted, is decrypted as usual: the channel is still in step.
    let data = vec![7u8; 1 << 20];
    let w = BulkWriter::copy_from(&data, a.limits().inline_threshold).expect("writer");
    a.send_bulk(&Msg::Ping(2), &[], w, BulkMode::SealedEncrypted).expect("send bulk");
    let got = b.try_recv_admitting::<Msg>(|_, _| true).expect("recv").expect("a message");
    let bulk = got.bulk.expect("admitted");
    assert!(bulk.was_encrypted() && bulk[..] == data[..]);
    assert_eq!(got.declined, None);
}

#[test]
fn admitted_payload_is_still_verified() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    a.send_unchecked_bulk_fd(&Msg::Ping(1), not_a_memfd(), 1 << 20, true).expect("send");
    let err = b.try_recv_admitting::<Msg>(|_, _| true).expect_err("not a memfd");
    assert!(matches!(err, ChannelError::Bulk(_)), "{err:?}");
}

/// Sends `frame` raw to a fresh receiver that expects it as its first message.
fn deliver_raw(frame: &[u8]) -> Result<Msg, ChannelError> {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    a.send_raw_datagram(frame, &[]).expect("raw send");
    // Hung up, so that a datagram the receiver takes for a descriptor notice ends in `Closed`
    // rather than a wait for the frame it announced.
    drop(a);
    b.recv::<Msg>().map(|r| r.msg)
}

#[test]
fn descriptor_frames_keep_their_descriptors_when_read_in_a_batch() {
    // Nothing is read until everything is sent: the receiver takes the frames with recvmmsg,
    // notices and all, and each frame gets exactly what was attached to it.
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let mut keep = Vec::new();
    for i in 0..24u64 {
        if i % 3 == 0 {
            a.send(&Msg::Ping(i)).expect("send");
        } else {
            let (r, w) = std::io::pipe().expect("pipe");
            let both = [r.as_fd(), w.as_fd()];
            let fds = &both[..1 + usize::from(i % 3 == 2)];
            a.send_with(&Msg::Ping(i), fds).expect("send with fds");
            keep.push((r, w));
        }
    }
    for i in 0..24u64 {
        let got = b.recv::<Msg>().expect("recv");
        assert_eq!(got.msg, Msg::Ping(i));
        assert_eq!(got.fds.len(), [0, 1, 2][(i % 3) as usize], "frame {i}");
    }
}

#[test]
fn queued_descriptor_frames_are_announced_once_and_arrive_with_their_descriptors() {
    // Non-blocking sends: fill the socket so that a frame with a descriptor waits in the queue,
    // then drain and flush alternately.
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    a.set_nonblocking_sends(true);
    let blob = Msg::Blob(vec![7; 60_000]);
    let mut blobs = 0;
    while !a.wants_write() {
        a.send(&blob).expect("send");
        blobs += 1;
        assert!(blobs < 1000, "the socket never filled");
    }
    let (r, w) = std::io::pipe().expect("pipe");
    a.send_with(&Msg::Text("with fd".into()), &[w.as_fd()]).expect("queued send");
    drop(w);
    let mut seen = 0;
    let got = loop {
        a.flush_queued().expect("flush");
        let m = b.recv::<Msg>().expect("recv");
        if seen < blobs {
            assert_eq!(m.msg, blob);
            assert!(m.fds.is_empty());
            seen += 1;
        } else {
            break m;
        }
    };
    assert_eq!(got.msg, Msg::Text("with fd".into()));
    assert_eq!(got.fds.len(), 1);
    // The descriptor is the pipe's write end: writing through it reaches our read end.
    let mut f = std::fs::File::from(got.fds.into_iter().next().expect("fd"));
    std::io::Write::write_all(&mut f, b"x").expect("write");
    let mut buf = [0u8; 1];
    std::io::Read::read_exact(&mut std::fs::File::from(std::os::fd::OwnedFd::from(r)), &mut buf).expect("read");
    assert_eq!(&buf, b"x");
}

#[test]
fn a_notice_without_descriptors_after_it_costs_nothing_but_a_read() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    b.send(&Msg::Ping(0)).expect("send");
    a.recv::<Msg>().expect("recv");
    // Two stray notices (what the channel sends before a frame with descriptors), then a
    // plain frame: delivered as usual; then one more, and the peer hangs up.
    a.send_raw_datagram(&airlock_protocol::sys::DESCRIPTOR_NOTICE, &[]).expect("notice");
    a.send_raw_datagram(&airlock_protocol::sys::DESCRIPTOR_NOTICE, &[]).expect("notice");
    a.send(&Msg::Ping(1)).expect("send");
    assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(1));
    assert!(b.try_recv::<Msg>().expect("try").is_none());
    a.send_raw_datagram(&airlock_protocol::sys::DESCRIPTOR_NOTICE, &[]).expect("notice");
    assert!(b.try_recv::<Msg>().expect("try").is_none());
    drop(a);
    assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Closed)));
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let frame = a.seal_raw(&Msg::Text("setpoint 42".into())).expect("seal");
    // Sanity: the untouched frame is accepted.
    a.send_raw_datagram(&frame, &[]).expect("raw");
    assert_eq!(b.recv::<Msg>().expect("clean frame").msg, Msg::Text("setpoint 42".into()));
    for bit in 0..frame.len() * 8 {
        let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
        let mut f = a.seal_raw(&Msg::Text("setpoint 42".into())).expect("seal");
        f[bit / 8] ^= 1 << (bit % 8);
        a.send_raw_datagram(&f, &[]).expect("raw");
        let r = b.recv::<Msg>();
        assert!(r.is_err(), "bit {bit} flipped was accepted: {r:?}");
        assert!(b.poisoned().is_some(), "bit {bit}: channel not poisoned");
    }
}

#[test]
fn replayed_frame_is_rejected_as_sequence_error() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let f = a.seal_raw(&Msg::Ping(1)).expect("seal");
    a.send_raw_datagram(&f, &[]).expect("raw");
    a.send_raw_datagram(&f, &[]).expect("raw again");
    assert_eq!(b.recv::<Msg>().expect("first").msg, Msg::Ping(1));
    match b.recv::<Msg>() {
        Err(ChannelError::Sequence { expected: 2, got: 1 }) => {}
        other => panic!("expected a sequence error, got {other:?}"),
    }
    // Poisoned from now on, naming the first failure.
    match b.recv::<Msg>() {
        Err(ChannelError::Poisoned { reason }) => assert!(reason.contains("replayed"), "{reason}"),
        other => panic!("expected poisoned, got {other:?}"),
    }
}

#[test]
fn reordered_frames_are_rejected() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let f1 = a.seal_raw(&Msg::Ping(1)).expect("seal");
    let f2 = a.seal_raw(&Msg::Ping(2)).expect("seal");
    a.send_raw_datagram(&f2, &[]).expect("raw");
    a.send_raw_datagram(&f1, &[]).expect("raw");
    assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Sequence { expected: 1, got: 2 })));
}

#[test]
fn truncated_frames_are_rejected() {
    let (mut a, _b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let f = a.seal_raw(&Msg::Ping(1)).expect("seal");
    assert!(matches!(deliver_raw(&f[..10]), Err(ChannelError::Truncated { len: 10, .. })));
    assert!(matches!(deliver_raw(&f[..f.len() - 1]), Err(ChannelError::BodyLength { .. })));
}

#[test]
fn oversized_frame_is_rejected() {
    let limits = Limits::default();
    let big = vec![0u8; limits.max_frame + 100];
    assert!(matches!(deliver_raw(&big), Err(ChannelError::Oversized { .. })));
}

#[test]
fn too_large_message_is_refused_before_sending_and_channel_survives() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let r = a.send(&Msg::Blob(vec![7; 100_000]));
    assert!(matches!(r, Err(ChannelError::MessageTooLarge { .. })), "{r:?}");
    a.send(&Msg::Ping(5)).expect("channel still usable");
    assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(5));
}

#[test]
fn too_many_descriptors_are_refused_before_sending_and_channel_survives() {
    // Like a too-large message, nothing has left and no sequence number is used: the caller
    // gets a clear error and the channel stays usable (it used to be poisoned).
    let limits = Limits::default();
    let (mut a, mut b) = established(limits.clone(), DEFAULT_REKEY_INTERVAL);
    let files: Vec<std::fs::File> =
        (0..=limits.max_attachments).map(|_| std::fs::File::open("/dev/null").expect("open")).collect();
    let fds: Vec<_> = files.iter().map(std::os::fd::AsFd::as_fd).collect();
    let r = a.send_with(&Msg::Ping(1), &fds);
    assert!(
        matches!(r, Err(ChannelError::TooManyAttachments { count, limit }) if count == limits.max_attachments + 1 && limit == limits.max_attachments),
        "{r:?}"
    );
    assert!(a.poisoned().is_none(), "{:?}", a.poisoned());
    a.send_with(&Msg::Ping(2), &fds[..limits.max_attachments]).expect("channel still usable");
    let got = b.recv::<Msg>().expect("recv");
    assert_eq!(got.msg, Msg::Ping(2));
    assert_eq!(got.fds.len(), limits.max_attachments);
}

#[test]
fn wrong_key_fails_authentication() {
    let (sa, sb) = airlock_protocol::sys::seqpacket_pair().expect("pair");
    let (ka, _) = ChannelKeys::generate(DEFAULT_REKEY_INTERVAL).expect("keys");
    let (_, kb) = ChannelKeys::generate(DEFAULT_REKEY_INTERVAL).expect("keys");
    let mut a = Channel::new(sa, ka, Limits::default());
    let mut b = Channel::new(sb, kb, Limits::default());
    let t = std::thread::spawn(move || a.handshake(&Hello::new(Role::Supervisor, "a")).map(|_| ()));
    match b.handshake(&Hello::new(Role::Worker, "b")) {
        Err(ChannelError::Authenticate { seq: 0 }) => {}
        other => panic!("expected authentication failure, got {other:?}"),
    }
    drop(b);
    assert!(t.join().expect("join").is_err());
}

#[test]
fn protocol_version_mismatch_names_both_versions() {
    let (mut a, mut b) = Channel::pair(Limits::default(), DEFAULT_REKEY_INTERVAL).expect("pair");
    let t = std::thread::spawn(move || {
        let mut old = Hello::new(Role::Worker, "old");
        old.protocol = 99;
        let _ = b.handshake(&old);
    });
    let err = a.handshake(&Hello::new(Role::Supervisor, "a")).expect_err("must fail");
    let s = err.to_string();
    assert!(s.contains("99") && s.contains(&airlock_protocol::PROTOCOL_VERSION.to_string()), "{s}");
    drop(a);
    drop(t.join());
}

#[test]
fn messages_before_handshake_are_refused() {
    let (mut a, _b) = Channel::pair(Limits::default(), DEFAULT_REKEY_INTERVAL).expect("pair");
    assert!(matches!(a.send(&Msg::Ping(1)), Err(ChannelError::UnexpectedKind { .. })));
}

#[test]
fn peer_close_is_reported_as_closed() {
    let (a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    drop(a);
    assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Closed)));
}

#[test]
fn try_recv_and_timeout_return_none_when_idle() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    assert!(b.try_recv::<Msg>().expect("try").is_none());
    assert!(b.recv_timeout::<Msg>(std::time::Duration::from_millis(10)).expect("timeout").is_none());
    a.send(&Msg::Ping(3)).expect("send");
    let got = b.recv_timeout::<Msg>(std::time::Duration::from_secs(5)).expect("recv").expect("some");
    assert_eq!(got.msg, Msg::Ping(3));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_round_trip(text in ".{0,200}", blob in proptest::collection::vec(any::<u8>(), 0..2000), n in any::<u64>()) {
        let (mut a, mut b) = established(Limits::default(), 7);
        for m in [Msg::Text(text.clone()), Msg::Blob(blob.clone()), Msg::Ping(n)] {
            a.send(&m).expect("send");
            prop_assert_eq!(b.recv::<Msg>().expect("recv").msg, m);
        }
    }

    #[test]
    fn hostile_datagrams_never_panic_and_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let r = deliver_raw(&bytes);
        prop_assert!(r.is_err());
    }

    #[test]
    fn hostile_bytes_with_valid_header_prefix_are_rejected(tail in proptest::collection::vec(any::<u8>(), 16..300)) {
        let mut f = vec![1u8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        f.extend_from_slice(&((tail.len()) as u32).to_le_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(&tail);
        f[8] = 1; // the sequence number the receiver expects after the handshake
        let r = deliver_raw(&f);
        prop_assert!(matches!(r, Err(ChannelError::Authenticate { seq: 1 } | ChannelError::Sequence { .. })), "{:?}", r);
    }
}

#[test]
fn batch_larger_than_a_frame_spans_frames_in_order() {
    let (mut a, mut b) = established(Limits::default(), 5);
    let msgs: Vec<Msg> = (0..300u64).map(|i| Msg::Blob(vec![(i % 251) as u8; 1000 + i as usize])).collect();
    let expect = msgs.clone();
    let t = std::thread::spawn(move || {
        a.send_batch(&msgs).expect("batch");
        a.send(&Msg::Ping(99)).expect("after batch");
        a
    });
    for m in expect {
        assert_eq!(b.recv::<Msg>().expect("recv").msg, m);
    }
    assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(99));
    drop(t.join());
}

#[test]
fn batch_with_an_oversized_message_sends_nothing_and_channel_survives() {
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let msgs = vec![Msg::Ping(1), Msg::Blob(vec![0; 70_000]), Msg::Ping(2)];
    assert!(matches!(a.send_batch(&msgs), Err(ChannelError::MessageTooLarge { .. })));
    a.send(&Msg::Ping(3)).expect("still usable");
    assert_eq!(b.recv::<Msg>().expect("recv").msg, Msg::Ping(3));
}

/// A bulk payload of whole 2 MiB pages goes into hugetlb pages where the host offers them,
/// and crosses the channel intact. On a host with none reserved, root reserves a few for the
/// test (and gives them back); elsewhere (no root, a read-only /proc/sys) it says so.
#[test]
fn bulk_payloads_use_hugetlb_pages_where_the_host_offers_them() {
    const KNOB: &str = "/proc/sys/vm/nr_hugepages";
    let before: u64 = std::fs::read_to_string(KNOB).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let reserved = before == 0 && std::fs::write(KNOB, "4").is_ok();
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("HugePages_Free:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0);
    if free < 2 {
        if reserved {
            let _ = std::fs::write(KNOB, before.to_string());
        }
        eprintln!("skipped: no free hugetlb pages here (reserving them takes root and a writable /proc/sys, and unfragmented memory)");
        return;
    }
    let (mut a, mut b) = established(Limits::default(), DEFAULT_REKEY_INTERVAL);
    let data: Vec<u8> = (0..4usize << 20).map(|i| (i % 249) as u8).collect();
    let w = BulkWriter::copy_from(&data, a.limits().inline_threshold).expect("writer");
    a.send_bulk(&Msg::Ping(1), &[], w, BulkMode::Sealed).expect("send");
    let r = b.recv::<Msg>().expect("recv");
    let bulk = r.bulk.expect("bulk");
    let magic = bulk.sealed_fd().map(|fd| airlock_protocol::sys::fs_magic(fd).expect("fstatfs"));
    let same = bulk.bytes() == &data[..];
    drop(bulk);
    if reserved {
        let _ = std::fs::write(KNOB, before.to_string());
    }
    assert!(same, "the payload arrived changed");
    assert_eq!(magic, Some(airlock_protocol::sys::HUGETLBFS_MAGIC), "a 4 MiB payload should live in hugetlb pages");
}
