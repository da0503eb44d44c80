//! Two-process tests: the test binary re-executes itself as a peer process that receives its
//! channel and keys through the real hand-off (inherited socket and sealed key memfd), then
//! behaves as told: honestly, or as a hostile peer. The parent asserts the exact error and
//! that no descriptor leaked (counted in `/proc/self/fd`).
//!
//! The tests here share one lock: descriptor counts are process-wide.

use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use airlock_protocol::sys;
use airlock_protocol::{handoff, BulkError, BulkMode, BulkWriter, Channel, ChannelError, Hello, Limits, Role};
use serde::{Deserialize, Serialize};

const PEER_ENV: &str = "AIRLOCK_TEST_PEER";
static LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Sum(u64),
    Report(String),
}

/// Entry point of the peer process. When this binary runs as a normal test it does nothing:
/// it is reached only through `spawn_peer`, which sets `AIRLOCK_TEST_PEER`.
#[test]
fn peer_process_entry() {
    let Ok(mode) = std::env::var(PEER_ENV) else { return };
    let code = match run_peer(&mode) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("peer {mode}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run_peer(mode: &str) -> Result<(), String> {
    // Before anything else: only stdio, the channel and the key memfd may be open.
    let open = open_fds();
    if open != [0, 1, 2, 3, 4] {
        return Err(format!("peer inherited unexpected descriptors: {open:?}"));
    }
    let mut ch = handoff::take_inherited(Limits::default()).map_err(|e| e.to_string())?;
    if open_fds() != [0, 1, 2, 3] {
        return Err(format!("key memfd still open after take_inherited: {:?}", open_fds()));
    }
    let mut hello = Hello::new(Role::Worker, "peer");
    if mode == "old_version" {
        hello.protocol = 99;
    }
    ch.handshake(&hello).map_err(|e| e.to_string())?;
    let ping = Msg::Ping(7);
    match mode {
        "echo" => loop {
            let r = match ch.recv::<Msg>() {
                Ok(r) => r,
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let reply = match r.bulk {
                Some(b) => Msg::Sum(b.iter().map(|&x| u64::from(x)).sum()),
                None => r.msg,
            };
            ch.send(&reply).map_err(|e| e.to_string())?;
        },
        "replay" => {
            let f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&f, &[]).map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&f, &[]).map_err(|e| e.to_string())?;
        }
        "reorder" => {
            let first = ch.seal_raw(&Msg::Ping(1)).map_err(|e| e.to_string())?;
            let second = ch.seal_raw(&Msg::Ping(2)).map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&second, &[]).map_err(|e| e.to_string())?;
            // The receiver refuses frame 2 and may hang up before frame 1 goes out (EPIPE):
            // that is the outcome under test, not a failure of this peer.
            let _ = ch.send_raw_datagram(&first, &[]);
        }
        "tamper" => {
            let mut f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            // The last byte of the ciphertext, just before the 16-byte tag.
            let last = f.len() - 17;
            f[last] ^= 0x40;
            ch.send_raw_datagram(&f, &[]).map_err(|e| e.to_string())?;
        }
        "truncate" => {
            let f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&f[..f.len() - 5], &[]).map_err(|e| e.to_string())?;
        }
        "oversize" => {
            let big = vec![1u8; Limits::default().max_frame + 1];
            ch.send_raw_datagram(&big, &[]).map_err(|e| e.to_string())?;
        }
        "wrong_key" => {
            // A frame with the right sequence number sealed under another channel's key.
            let (mut x, mut y) = Channel::pair(Limits::default(), 1 << 20).map_err(|e| e.to_string())?;
            let t = std::thread::spawn(move || y.handshake(&Hello::new(Role::Worker, "y")).map(|_| ()));
            x.handshake(&Hello::new(Role::Supervisor, "x")).map_err(|e| e.to_string())?;
            let _ = t.join();
            let f = x.seal_raw(&ping).map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&f, &[]).map_err(|e| e.to_string())?;
        }
        "unexpected_fd" => {
            let f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            let (r, _w) = std::io::pipe().map_err(|e| e.to_string())?;
            ch.send_raw_datagram(&f, &[r.as_fd()]).map_err(|e| e.to_string())?;
        }
        "unannounced_fd" => {
            // Descriptors without their notice, after the parent's go: the parent reads the
            // first frame alone with recv(2) (the kernel discards the pipe end) and the second
            // in a recvmmsg batch (the channel closes it unused). The first frame claims no
            // attachment and is delivered; the second claims one and is refused.
            let (r, _w) = std::io::pipe().map_err(|e| e.to_string())?;
            ch.recv::<Msg>().map_err(|e| e.to_string())?;
            let f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            ch.send_raw_datagram_unannounced(&f, &[r.as_fd()]).map_err(|e| e.to_string())?;
            let plain = postcard::to_allocvec(&ping).map_err(|e| e.to_string())?;
            let f = ch.seal_raw_plaintext(airlock_protocol::frame::Kind::Message, 0, 1, &plain);
            ch.send_raw_datagram_unannounced(&f, &[r.as_fd()]).map_err(|e| e.to_string())?;
            // Hold the pipe's write end until the receiver has judged both frames.
            let _ = ch.recv::<Msg>();
        }
        "too_many_fds" | "far_too_many_fds" => {
            let n = if mode == "too_many_fds" { Limits::default().max_attachments + 1 } else { 40 };
            let f = ch.seal_raw(&ping).map_err(|e| e.to_string())?;
            let pipes: Vec<_> = (0..n).map(|_| std::io::pipe()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
            let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
            ch.send_raw_datagram(&f, &fds).map_err(|e| e.to_string())?;
        }
        "unsealed_memfd"
        | "partial_seals"
        | "extra_seal"
        | "wrong_size"
        | "oversized_bulk"
        | "pipe_as_bulk"
        | "regular_file_as_bulk"
        | "shm_file_as_bulk"
        | "bad_bulk_tag" => {
            let len = 64 * 1024u64;
            let (fd, claimed, encrypted): (OwnedFd, u64, bool) = match mode {
                "pipe_as_bulk" => (std::io::pipe().map_err(|e| e.to_string())?.0.into(), len, false),
                "regular_file_as_bulk" => {
                    let dir = disk_dir().ok_or("no writable directory off tmpfs")?;
                    (unlinked_file(&dir, len)?, len, false)
                }
                "shm_file_as_bulk" => (unlinked_file("/dev/shm", len)?, len, false),
                _ => {
                    let fd = sys::memfd_create(c"hostile", false).map_err(|e| e.to_string())?;
                    sys::ftruncate(fd.as_fd(), len).map_err(|e| e.to_string())?;
                    let seals = match mode {
                        "unsealed_memfd" => 0,
                        "partial_seals" => libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
                        "extra_seal" => sys::SEAL_SET | libc::F_SEAL_FUTURE_WRITE,
                        _ => sys::SEAL_SET,
                    };
                    if seals != 0 {
                        sys::add_seals(fd.as_fd(), seals).map_err(|e| e.to_string())?;
                    }
                    let claimed = match mode {
                        "wrong_size" => 2 * len,
                        "oversized_bulk" => Limits::default().max_bulk + 1,
                        _ => len,
                    };
                    (fd, claimed, mode == "bad_bulk_tag")
                }
            };
            ch.send_unchecked_bulk_fd(&ping, fd, claimed, encrypted).map_err(|e| e.to_string())?;
        }
        "old_version" => {}
        other => return Err(format!("unknown peer mode {other}")),
    }
    // Stay until the parent hangs up, so that it reads what we sent.
    let _ = ch.recv::<Msg>();
    Ok(())
}

/// A regular file of `len` bytes in `dir`, already unlinked: a file, but not a memfd.
fn unlinked_file(dir: &str, len: u64) -> Result<OwnedFd, String> {
    let path = std::path::Path::new(dir).join(format!("airlock-not-memfd-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    f.set_len(len).map_err(|e| e.to_string())?;
    Ok(f.into())
}

/// A writable directory whose files are not shmem, for a regular file posing as a memfd: the
/// target's tmp directory, else the system's temporary directories (in a container lane the
/// target directory may belong to another uid, and /tmp may be an overlay). The test and its
/// peer both ask, and get the same answer.
fn disk_dir() -> Option<String> {
    let candidates =
        [env!("CARGO_TARGET_TMPDIR").to_string(), "/var/tmp".into(), std::env::temp_dir().display().to_string()];
    candidates.into_iter().find(|dir| {
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(std::path::Path::new(dir).join(format!("airlock-probe-{}", std::process::id())))
            .map(|_| {
                std::fs::remove_file(std::path::Path::new(dir).join(format!("airlock-probe-{}", std::process::id())))
            })
            .is_ok();
        writable && !on_tmpfs(dir)
    })
}

/// Whether files in `dir` live on tmpfs (shmem), from `fstatfs`. Under the lock: opening the
/// directory would otherwise skew another test's descriptor count.
fn on_tmpfs(dir: &str) -> bool {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = std::fs::File::open(dir).expect("open directory");
    sys::fs_magic(d.as_fd()).expect("fstatfs") == sys::TMPFS_MAGIC
}

fn open_fds() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    // The read_dir descriptor itself is gone by now but was listed; drop numbers that are
    // no longer open.
    v.retain(|&fd| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists());
    v
}

struct Peer {
    ch: Channel,
    child: Child,
}

fn spawn_peer(mode: &str) -> Peer {
    let (mut ch, child_end) = handoff::prepare(Limits::default(), 1 << 20).expect("prepare");
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "peer_process_entry", "--nocapture", "--test-threads", "1", "-q"])
        .env(PEER_ENV, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let guard = child_end.install(&mut cmd, Vec::new()).expect("install fds");
    let child = cmd.spawn().expect("spawn peer");
    drop(guard);
    let peer = ch.handshake(&Hello::new(Role::Supervisor, "test")).map(|h| h.name);
    if mode != "old_version" {
        assert_eq!(peer.expect("handshake"), "peer");
    } else {
        let e = peer.expect_err("version mismatch must fail");
        assert!(
            matches!(e, ChannelError::ProtocolVersion { ours: airlock_protocol::PROTOCOL_VERSION, theirs: 99 }),
            "{e}"
        );
    }
    Peer { ch, child }
}

impl Peer {
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.ch);
        self.child.wait().expect("wait")
    }
}

/// Runs a hostile peer and returns the error the parent saw, checking no fd leaked.
fn hostile(mode: &str) -> ChannelError {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = sys::count_open_fds().expect("count fds");
    let mut p = spawn_peer(mode);
    // An implementation that wrongly accepts everything must fail the test, not hang it.
    p.ch.set_recv_timeout(Some(std::time::Duration::from_secs(30))).expect("recv timeout");
    // A hostile peer may send valid frames first (a replay repeats one): read until refused.
    let err = (0..3).find_map(|_| p.ch.recv::<Msg>().err()).expect("hostile input must be rejected");
    // Poisoned from now on.
    assert!(matches!(p.ch.recv::<Msg>(), Err(ChannelError::Poisoned { .. })));
    let after = sys::count_open_fds().expect("count fds");
    // Only the channel's own socket remains.
    assert_eq!(after, before + 1, "{mode}: descriptors leaked ({before} before, {after} with the channel open)");
    let status = p.finish();
    assert_eq!(sys::count_open_fds().expect("count fds"), before, "{mode}: descriptors leaked");
    assert!(status.success(), "{mode}: peer failed: {status:?}");
    err
}

#[test]
fn honest_peer_echoes_messages_and_bulk() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = sys::count_open_fds().expect("count");
    let mut p = spawn_peer("echo");
    for i in 0..100 {
        p.ch.send(&Msg::Ping(i)).expect("send");
        assert_eq!(p.ch.recv::<Msg>().expect("recv").msg, Msg::Ping(i));
    }
    for (len, mode) in [(10usize, BulkMode::Sealed), (1 << 20, BulkMode::Sealed), (1 << 20, BulkMode::SealedEncrypted)]
    {
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let want: u64 = data.iter().map(|&x| u64::from(x)).sum();
        let w = BulkWriter::copy_from(&data, p.ch.limits().inline_threshold).expect("writer");
        p.ch.send_bulk(&Msg::Report("bulk".into()), &[], w, mode).expect("send bulk");
        assert_eq!(p.ch.recv::<Msg>().expect("recv").msg, Msg::Sum(want), "{len} {mode:?}");
    }
    assert!(p.finish().success());
    assert_eq!(sys::count_open_fds().expect("count"), before, "descriptors leaked");
}

#[test]
fn replayed_frame_from_peer_is_a_sequence_error() {
    let e = hostile("replay");
    assert!(matches!(e, ChannelError::Sequence { expected: 2, got: 1 }), "{e}");
}

#[test]
fn reordered_frames_from_peer_are_a_sequence_error() {
    // The peer's handshake was its frame 0; it sealed frames 1 and 2 and sent 2 first.
    let e = hostile("reorder");
    assert!(matches!(e, ChannelError::Sequence { expected: 1, got: 2 }), "{e}");
}

#[test]
fn tampered_frame_from_peer_fails_authentication() {
    assert!(matches!(hostile("tamper"), ChannelError::Authenticate { seq: 1 }));
}

#[test]
fn truncated_frame_from_peer_is_rejected() {
    assert!(matches!(hostile("truncate"), ChannelError::BodyLength { .. }));
}

#[test]
fn oversized_frame_from_peer_is_rejected() {
    assert!(matches!(hostile("oversize"), ChannelError::Oversized { .. }));
}

#[test]
fn frame_under_wrong_key_from_peer_fails_authentication() {
    assert!(matches!(hostile("wrong_key"), ChannelError::Authenticate { seq: 1 }));
}

#[test]
fn unexpected_fd_is_rejected_and_closed() {
    assert!(matches!(hostile("unexpected_fd"), ChannelError::AttachmentCount { header: 0, received: 1 }));
}

#[test]
fn descriptors_without_their_notice_are_never_installed() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = sys::count_open_fds().expect("count fds");
    let mut p = spawn_peer("unannounced_fd");
    p.ch.set_recv_timeout(Some(std::time::Duration::from_secs(30))).expect("recv timeout");
    // Having just sent, the channel reads the first frame alone with recv(2), the second in a
    // batch with recvmmsg: both paths are under test.
    p.ch.send(&Msg::Ping(1)).expect("go");
    // The first frame claims no attachment: delivered, without the pipe end the peer attached.
    let first = p.ch.recv::<Msg>().expect("first frame");
    assert_eq!(first.msg, Msg::Ping(7));
    assert!(first.fds.is_empty() && first.bulk.is_none());
    assert_eq!(sys::count_open_fds().expect("count fds"), before + 1, "an unannounced descriptor was installed");
    // The second claims one: refused, since none can arrive without a notice.
    let e = p.ch.recv::<Msg>().expect_err("a frame whose descriptor was discarded must be refused");
    assert!(matches!(e, ChannelError::AttachmentCount { header: 1, received: 0 }), "{e}");
    assert_eq!(sys::count_open_fds().expect("count fds"), before + 1, "descriptors leaked");
    let status = p.finish();
    assert!(status.success(), "peer failed: {status:?}");
    assert_eq!(sys::count_open_fds().expect("count fds"), before, "descriptors leaked");
}

#[test]
fn one_fd_too_many_is_rejected_and_all_closed() {
    assert!(matches!(hostile("too_many_fds"), ChannelError::TooManyAttachments { count: 9, limit: 8 }));
}

#[test]
fn far_too_many_fds_is_control_truncation_and_all_closed() {
    assert!(matches!(hostile("far_too_many_fds"), ChannelError::ControlTruncated));
}

#[test]
fn unsealed_memfd_is_rejected_and_closed() {
    let e = hostile("unsealed_memfd");
    assert!(matches!(e, ChannelError::Bulk(BulkError::MissingSeals { seals: 0, .. })), "{e}");
}

#[test]
fn memfd_missing_shrink_and_grow_seals_is_rejected() {
    let e = hostile("partial_seals");
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    assert!(matches!(e, ChannelError::Bulk(BulkError::MissingSeals { missing, .. }) if missing == want), "{e}");
}

#[test]
fn memfd_with_future_write_seal_beyond_the_required_four_is_rejected() {
    let e = hostile("extra_seal");
    assert!(
        matches!(e, ChannelError::Bulk(BulkError::UnexpectedSeals { extra }) if extra == libc::F_SEAL_FUTURE_WRITE),
        "{e}"
    );
}

#[test]
fn bulk_announced_above_max_bulk_is_rejected_as_too_large() {
    let e = hostile("oversized_bulk");
    let limit = Limits::default().max_bulk;
    assert!(
        matches!(e, ChannelError::Bulk(BulkError::TooLarge { len, limit: l }) if len == limit + 1 && l == limit),
        "{e}"
    );
}

#[test]
fn memfd_of_wrong_size_is_rejected() {
    let e = hostile("wrong_size");
    assert!(matches!(e, ChannelError::Bulk(BulkError::Size { expected: 131072, actual: 65536 })), "{e}");
}

#[test]
fn pipe_posing_as_bulk_is_rejected_as_not_memfd() {
    let e = hostile("pipe_as_bulk");
    assert!(matches!(e, ChannelError::Bulk(BulkError::NotMemfd { .. })), "{e}");
}

#[test]
fn regular_file_posing_as_bulk_is_rejected_as_not_memfd() {
    if disk_dir().is_none() {
        eprintln!(
            "skipped: no writable directory off tmpfs here (a file on tmpfs is shmem; the shm test covers that case)"
        );
        return;
    }
    let e = hostile("regular_file_as_bulk");
    assert!(matches!(&e, ChannelError::Bulk(BulkError::NotMemfd { detail }) if detail.contains("not shmem")), "{e}");
}

#[test]
fn shmem_file_that_is_not_a_memfd_is_rejected_for_its_seals() {
    if !on_tmpfs("/dev/shm") {
        eprintln!("skipped: /dev/shm is not a tmpfs on this host");
        return;
    }
    // A tmpfs file made by open() answers F_GET_SEALS with F_SEAL_SEAL alone and can never be
    // sealed further, so it fails the seal check rather than the filesystem check.
    let e = hostile("shm_file_as_bulk");
    let want_missing = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    assert!(
        matches!(e, ChannelError::Bulk(BulkError::MissingSeals { seals, missing })
            if seals == libc::F_SEAL_SEAL && missing == want_missing),
        "{e}"
    );
}

#[test]
fn encrypted_bulk_with_forged_tag_fails_authentication() {
    let e = hostile("bad_bulk_tag");
    assert!(matches!(e, ChannelError::Bulk(BulkError::Authenticate)), "{e}");
}

#[test]
fn peer_with_other_protocol_version_is_refused() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let p = spawn_peer("old_version");
    assert!(p.ch.poisoned().is_some_and(|r| r.contains("99")), "{:?}", p.ch.poisoned());
    assert!(p.finish().success());
}
