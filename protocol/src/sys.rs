//! Thin, audited wrappers over the syscalls the protocol needs.
//!
//! This is the only module of `airlock-protocol` that may use `unsafe`. Calls go through `nix`
//! wherever it has them; what stays raw, each block with its `SAFETY` note, is what nix cannot
//! do for us:
//! - receiving (`recvmsg`, `recvmmsg`): nix's `RecvMsg::cmsgs()` refuses to walk the control
//!   data once `MSG_CTRUNC` is set, so the descriptors the kernel did install would leak; we
//!   must own every one of them and still see the truncation;
//! - `sendmmsg`: nix's version attaches the same control messages to every datagram of a batch;
//! - adopting a descriptor nix hands back as a bare integer (`F_DUPFD_CLOEXEC`, an inherited
//!   number) as an `OwnedFd`;
//! - the memory mapping (`mmap`, `munmap`, `madvise` are `unsafe fn`s in nix too), and
//!   `MADV_POPULATE_WRITE`, `SCHED_IDLE` and `close_range`, which nix 0.29 lacks;
//! - the `pre_exec` hook that installs a child's descriptors;
//! - `ioctl(SIOCOUTQ)`, through nix's `ioctl_read_bad!` (an `unsafe fn` in nix too);
//! - [`SharedArea`]: a mapping another process writes concurrently (stream rings), reached only
//!   through atomics and raw-pointer copies, and the shared `futex` calls on its words, which
//!   nix 0.29 lacks.
//!
//! Each wrapper owns its file descriptors as `OwnedFd` the moment the kernel hands them out, so
//! no error path can leak one. Nothing here knows about frames, keys or policy: it moves bytes
//! and descriptors.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::io::IoSlice;
use std::mem;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag, SealFlag};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::mman::{self, MapFlags, ProtFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;

/// Creates a connected `AF_UNIX` `SOCK_SEQPACKET` pair, close-on-exec on both ends.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(SockType::SeqPacket)
}

/// Creates a connected `AF_UNIX` `SOCK_STREAM` pair, close-on-exec on both ends (benchmarks).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(SockType::Stream)
}

fn socketpair(ty: SockType) -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)?)
}

/// Sets a socket's send and receive buffer sizes (best effort up to the system maximum).
pub fn set_socket_buffers(sock: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let v = bytes.min(libc::c_int::MAX as usize);
    socket::setsockopt(&sock, sockopt::SndBuf, &v)?;
    socket::setsockopt(&sock, sockopt::RcvBuf, &v)?;
    Ok(())
}

/// Sets `SO_RCVTIMEO` (`None`: block forever).
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> io::Result<()> {
    let d = timeout.unwrap_or_default();
    let tv = libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t };
    Ok(socket::setsockopt(&sock, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::from(tv))?)
}

/// One outgoing datagram: up to two byte slices (header, body) and the descriptors to pass.
#[derive(Debug)]
pub struct OutDatagram<'a> {
    pub parts: [&'a [u8]; 2],
    pub fds: &'a [RawFd],
}

/// Space for one `SCM_RIGHTS` control message carrying `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((n * mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends every datagram in `out`, batching them with `sendmmsg`. Blocks until all are queued.
pub fn send_datagrams(sock: BorrowedFd<'_>, out: &[OutDatagram<'_>]) -> io::Result<()> {
    const BATCH: usize = 64;
    let mut done = 0;
    while done < out.len() {
        let chunk = &out[done..out.len().min(done + BATCH)];
        let mut iovs: Vec<[libc::iovec; 2]> = Vec::with_capacity(chunk.len());
        // Control buffers as u64 so that cmsghdr alignment holds.
        let mut cmsgs: Vec<Vec<u64>> = Vec::with_capacity(chunk.len());
        for d in chunk {
            iovs.push([
                libc::iovec { iov_base: d.parts[0].as_ptr() as *mut _, iov_len: d.parts[0].len() },
                libc::iovec { iov_base: d.parts[1].as_ptr() as *mut _, iov_len: d.parts[1].len() },
            ]);
            let space = cmsg_space(d.fds.len());
            cmsgs.push(vec![0u64; space.div_ceil(8)]);
        }
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(chunk.len());
        for (i, d) in chunk.iter().enumerate() {
            // SAFETY: mmsghdr is a plain C struct for which all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
            h.msg_hdr.msg_iovlen = 2;
            if !d.fds.is_empty() {
                let space = cmsg_space(d.fds.len());
                h.msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = space as _;
                // SAFETY: msg_control points at `space` zeroed, aligned bytes, which is exactly
                // CMSG_SPACE for `fds.len()` descriptors, so CMSG_FIRSTHDR is non-null and the
                // data area holds `fds.len()` ints.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of_val(d.fds) as u32) as _;
                    ptr::copy_nonoverlapping(d.fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), d.fds.len());
                }
            }
            hdrs.push(h);
        }
        let mut sent = 0;
        while sent < hdrs.len() {
            // SAFETY: every header points at iovecs, payload slices and control buffers that
            // live until the end of this loop iteration; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs[sent..].as_mut_ptr(),
                    (hdrs.len() - sent) as libc::c_uint,
                    libc::MSG_NOSIGNAL,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            sent += rc as usize;
        }
        done += chunk.len();
    }
    Ok(())
}

/// Sends one datagram with `sendmsg` (one iovec; descriptors ride in one `SCM_RIGHTS` message).
pub fn send_datagram(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_datagram_flags(sock, buf, fds, MsgFlags::empty())
}

/// As [`send_datagram`]; with `nonblocking`, fails with `WouldBlock` instead of waiting.
pub fn send_datagram_nonblocking(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_datagram_flags(sock, buf, fds, MsgFlags::MSG_DONTWAIT)
}

fn send_datagram_flags(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd], extra: MsgFlags) -> io::Result<()> {
    if fds.is_empty() {
        // Without descriptors, send(2) (sendto with no address; policies/common/channel.toml)
        // is cheaper than sendmsg: no msghdr to copy in and check.
        loop {
            match socket::send(sock.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL | extra) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let iov = [IoSlice::new(buf)];
    let rights = [ControlMessage::ScmRights(fds)];
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &rights, MsgFlags::MSG_NOSIGNAL | extra, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The one-byte datagram that goes just before every datagram carrying descriptors, so that
/// the receiver takes that one with `recvmsg` and a control buffer and every other one with the
/// cheaper `recv(2)` ([`recv_datagram_plain`]), which installs no descriptor at all. Frames are
/// never this short, so it cannot be mistaken for one. It carries no authority: a notice with no
/// descriptors after it, or two in a row, only costs the receiver a `recvmsg`.
pub const DESCRIPTOR_NOTICE: [u8; 1] = [0xfd];

/// True when a received datagram is a [`DESCRIPTOR_NOTICE`].
pub fn is_descriptor_notice(slot: &RecvSlot, info: &Received) -> bool {
    info.len == DESCRIPTOR_NOTICE.len() && !info.truncated && slot.buf[..info.len] == DESCRIPTOR_NOTICE
}

/// Sends one frame, first its [`DESCRIPTOR_NOTICE`] if it carries descriptors (both with one
/// `sendmmsg`), waiting for room.
pub fn send_announced(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return send_datagram(sock, buf, fds);
    }
    let out = [OutDatagram { parts: [&DESCRIPTOR_NOTICE, &[]], fds: &[] }, OutDatagram { parts: [buf, &[]], fds }];
    send_datagrams(sock, &out)
}

/// As [`send_announced`], without waiting (`WouldBlock` when the socket is full). `noticed`
/// records that the notice went out, so that a retry sends only the frame.
pub fn send_announced_nonblocking(
    sock: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[RawFd],
    noticed: &mut bool,
) -> io::Result<()> {
    if !fds.is_empty() && !*noticed {
        send_datagram_nonblocking(sock, &DESCRIPTOR_NOTICE, &[])?;
        *noticed = true;
    }
    send_datagram_nonblocking(sock, buf, fds)
}

/// Receives one datagram into `slot` with `recv(2)` (`recvfrom` without an address), for a
/// datagram that no [`DESCRIPTOR_NOTICE`] announced. It takes no control message: descriptors
/// a peer attached anyway are discarded by the kernel and never installed here, and the frame,
/// whose authenticated header counts them, then fails its attachment check. `MSG_TRUNC` makes
/// the kernel return the datagram's full length, so an oversized one is still seen as
/// truncated. With `nonblocking`, returns `None` instead of waiting.
pub fn recv_datagram_plain(
    sock: BorrowedFd<'_>,
    slot: &mut RecvSlot,
    nonblocking: bool,
) -> io::Result<Option<Received>> {
    let mut flags = MsgFlags::MSG_TRUNC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match socket::recv(sock.as_raw_fd(), &mut slot.buf, flags) {
            Ok(n) => {
                return Ok(Some(Received {
                    len: n.min(slot.buf.len()),
                    truncated: n > slot.buf.len(),
                    control_truncated: false,
                    foreign_control: false,
                    fds: Vec::new(),
                }))
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if nonblocking => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram into `slot` with `recvmsg(MSG_CMSG_CLOEXEC)`. With `nonblocking`,
/// returns `None` instead of waiting.
pub fn recv_datagram(sock: BorrowedFd<'_>, slot: &mut RecvSlot, nonblocking: bool) -> io::Result<Option<Received>> {
    let mut iov = libc::iovec { iov_base: slot.buf.as_mut_ptr().cast(), iov_len: slot.buf.len() };
    // SAFETY: all-zero is a valid msghdr.
    let mut h: libc::msghdr = unsafe { mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = slot.cmsg.as_mut_ptr().cast();
    h.msg_controllen = (slot.cmsg.len() * 8) as _;
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    let len = loop {
        // SAFETY: `h` points at the slot's buffer and control area, valid and writable for
        // their stated lengths during the call.
        let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut h, flags) };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
            _ => return Err(e),
        }
    };
    Ok(Some(parse_received(&h, len)))
}

fn parse_received(h: &libc::msghdr, len: usize) -> Received {
    let mut r = Received {
        len,
        truncated: h.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: h.msg_flags & libc::MSG_CTRUNC != 0,
        foreign_control: false,
        fds: Vec::new(),
    };
    if h.msg_controllen == 0 {
        return r;
    }
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // within that range and return null past its end. For SCM_RIGHTS, the data area holds
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors that are now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for k in 0..bytes / mem::size_of::<RawFd>() {
                    let fd = ptr::read_unaligned(data.add(k));
                    r.fds.push(OwnedFd::from_raw_fd(fd));
                }
            } else {
                r.foreign_control = true;
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    r
}

/// A receive slot: room for one datagram of up to `buf.len()` bytes and its descriptors.
#[derive(Debug)]
pub struct RecvSlot {
    pub buf: Vec<u8>,
    cmsg: Vec<u64>,
}

impl RecvSlot {
    pub fn new(max_datagram: usize, max_fds: usize) -> Self {
        // Room for one more descriptor than allowed, so that an excess is seen rather than
        // silently truncated; the kernel still sets MSG_CTRUNC beyond that.
        let space = cmsg_space(max_fds + 1).max(cmsg_space(1));
        RecvSlot { buf: vec![0; max_datagram], cmsg: vec![0; space.div_ceil(8)] }
    }
}

/// What the kernel said about one received datagram.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the datagram copied into the slot (0 means the peer closed).
    pub len: usize,
    /// `MSG_TRUNC`: the datagram was larger than the slot.
    pub truncated: bool,
    /// `MSG_CTRUNC`: descriptors or control data were dropped by the kernel.
    pub control_truncated: bool,
    /// A control message other than `SCM_RIGHTS` arrived.
    pub foreign_control: bool,
    /// Every descriptor that arrived, already owned (and so closed on drop).
    pub fds: Vec<OwnedFd>,
}

/// Receives up to `slots.len()` datagrams with `recvmmsg(MSG_WAITFORONE | MSG_CMSG_CLOEXEC)`.
/// With `nonblocking`, returns an empty vector instead of waiting.
pub fn recv_datagrams(sock: BorrowedFd<'_>, slots: &mut [RecvSlot], nonblocking: bool) -> io::Result<Vec<Received>> {
    let n = slots.len();
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(n);
    for s in slots.iter_mut() {
        iovs.push(libc::iovec { iov_base: s.buf.as_mut_ptr().cast(), iov_len: s.buf.len() });
    }
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(n);
    for (i, s) in slots.iter_mut().enumerate() {
        // SAFETY: all-zero is a valid mmsghdr.
        let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
        h.msg_hdr.msg_iov = &mut iovs[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = s.cmsg.as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = (s.cmsg.len() * 8) as _;
        hdrs.push(h);
    }
    let mut flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITFORONE;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    let count = loop {
        // SAFETY: headers point at iovecs and control buffers owned by `slots`/`iovs`, valid
        // and writable for their stated lengths for the duration of the call.
        let rc =
            unsafe { libc::recvmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, flags, ptr::null_mut()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if nonblocking => return Ok(Vec::new()),
                _ => return Err(e),
            }
        }
        break rc as usize;
    };
    Ok(hdrs[..count].iter().map(|h| parse_received(&h.msg_hdr, h.msg_len as usize)).collect())
}

/// Plain `send` of one datagram or stream chunk (benchmark baselines).
pub fn send_bytes(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(socket::send(sock.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL)?)
}

/// Plain `recv` (benchmark baselines).
pub fn recv_bytes(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(socket::recv(sock.as_raw_fd(), buf, MsgFlags::empty())?)
}

// ----------------------------------------------------------------------------- memfd

pub const SEAL_SET: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING [| MFD_HUGETLB])`.
pub fn memfd_create(name: &CStr, hugetlb: bool) -> io::Result<OwnedFd> {
    use nix::sys::memfd::MemFdCreateFlag as F;
    let mut flags = F::MFD_CLOEXEC | F::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= F::MFD_HUGETLB;
    }
    Ok(nix::sys::memfd::memfd_create(name, flags)?)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(Errno::EFBIG))?;
    Ok(nix::unistd::ftruncate(fd, len)?)
}

/// Allocates backing pages for `[0, len)` now, so that later writes do not fault them in.
pub fn fallocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(Errno::EFBIG))?;
    Ok(nix::fcntl::fallocate(fd.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len)?)
}

pub fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals)))?;
    Ok(())
}

/// `F_GET_SEALS`; fails with `EINVAL` for a file that is not a memfd (or other shmem file).
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    Ok(fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)?)
}

/// File type bits and size, from `fstat`.
pub fn file_mode_and_size(fd: BorrowedFd<'_>) -> io::Result<(u32, u64)> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok((st.st_mode, st.st_size as u64))
}

/// `fstatfs` magic of the filesystem holding `fd`.
pub fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
    let st = nix::sys::statfs::fstatfs(fd)?;
    #[allow(clippy::unnecessary_cast)]
    Ok(st.filesystem_type().0 as i64)
}

pub const TMPFS_MAGIC: i64 = 0x0102_1994;
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// `pwrite` the whole of `buf` at `offset`.
pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::sys::uio::pwrite(fd, buf, offset as libc::off_t) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `pread` exactly `buf.len()` bytes at `offset`.
pub fn pread_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::sys::uio::pread(fd, buf, offset as libc::off_t) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A memory mapping of a file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory; shared access follows Rust's rules through the
// `&self`/`&mut self` accessors below.
unsafe impl Send for Mapping {}
// SAFETY: as above; `as_slice` hands out shared references only.
unsafe impl Sync for Mapping {}

/// How to map a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMode {
    /// `PROT_READ`, `MAP_SHARED`: what a receiver gets of a sealed memfd.
    SharedRead,
    /// `PROT_READ | PROT_WRITE`, `MAP_SHARED`: a sender filling an unsealed memfd.
    SharedWrite,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, pre-faulting the pages (`MAP_POPULATE`).
    pub fn map(fd: BorrowedFd<'_>, len: usize, mode: MapMode) -> io::Result<Mapping> {
        Mapping::map_with(fd, len, mode, MapFlags::MAP_POPULATE)
    }

    /// Maps `len` bytes of `fd` from offset 0 without faulting anything in yet.
    pub fn map_lazy(fd: BorrowedFd<'_>, len: usize, mode: MapMode) -> io::Result<Mapping> {
        Mapping::map_with(fd, len, mode, MapFlags::empty())
    }

    fn map_with(fd: BorrowedFd<'_>, len: usize, mode: MapMode, extra: MapFlags) -> io::Result<Mapping> {
        let Some(nonzero) = NonZeroUsize::new(len) else {
            return Ok(Mapping { ptr: ptr::NonNull::<u64>::dangling().as_ptr().cast(), len: 0, writable: false });
        };
        let prot = match mode {
            MapMode::SharedRead => ProtFlags::PROT_READ,
            MapMode::SharedWrite => ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        };
        // SAFETY: a fresh shared file mapping placed by the kernel (no address given), so it
        // aliases no Rust object; `Mapping` unmaps it exactly once, in Drop.
        let p = unsafe { mman::mmap(None, nonzero, prot, MapFlags::MAP_SHARED | extra, fd, 0) }?;
        Ok(Mapping { ptr: p.as_ptr(), len, writable: mode == MapMode::SharedWrite })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes (or a dangling, aligned
        // pointer with len 0), unmapped only in Drop.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    /// The mapped bytes, writable; `None` for a read-only mapping.
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        if !self.writable {
            return None;
        }
        // SAFETY: a live writable mapping of `len` bytes; `&mut self` makes this the only
        // reference handed out.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let (Some(p), true) = (ptr::NonNull::new(self.ptr), self.len != 0) {
            // SAFETY: unmaps exactly the region mapped in `map`; no reference outlives `self`.
            let _ = unsafe { mman::munmap(p, self.len) };
        }
    }
}

// ----------------------------------------------------------------------------- shared areas

/// A read-write `MAP_SHARED` mapping of a file that another, untrusted process maps too and may
/// write at any moment (a stream's memfd).
///
/// It never hands out a `&[u8]`/`&mut [u8]` to the mapped bytes: the peer can change them while
/// such a reference lives, which Rust's aliasing rules forbid. Bytes move only by raw-pointer
/// copies into or out of private memory ([`SharedArea::copy_out`], [`SharedArea::copy_in`]),
/// and words are reached only as atomics ([`SharedArea::u64_at`], [`SharedArea::u32_at`]),
/// which are made for memory changed behind the compiler's back. A copy racing with the peer's
/// writes yields whatever bytes were there (callers validate copies, never the shared bytes).
#[derive(Debug)]
pub struct SharedArea {
    map: Mapping,
}

/// How a [`SharedArea::futex_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken by `FUTEX_WAKE` (or spuriously: the kernel does not promise the word changed).
    Woken,
    /// The word no longer held the expected value when the kernel checked it (`EAGAIN`).
    Changed,
    /// The timeout passed.
    TimedOut,
    /// A signal interrupted the wait (`EINTR`).
    Interrupted,
}

impl SharedArea {
    /// Maps `len` bytes of `fd` read-write and shared, pages faulted in now (`MAP_POPULATE`).
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedArea> {
        if len == 0 {
            return Err(io::Error::from(Errno::EINVAL));
        }
        Ok(SharedArea { map: Mapping::map(fd, len, MapMode::SharedWrite)? })
    }

    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    fn word_ptr(&self, off: usize, size: usize) -> *mut u8 {
        // Offsets are compile-time constants of the caller's layout, never values read from the
        // area: a failure here is a bug in this crate, not something a peer can cause.
        assert!(
            off.is_multiple_of(size) && off.checked_add(size).is_some_and(|end| end <= self.map.len),
            "word {off} out of the area"
        );
        // SAFETY: `off + size <= len` was just checked, so the result stays inside the mapping.
        unsafe { self.map.ptr.cast::<u8>().add(off) }
    }

    /// The 64-bit word at byte offset `off` (a multiple of 8 inside the area) as an atomic.
    ///
    /// # Panics
    /// If `off` is misaligned or out of range: callers pass constants of their layout.
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        let p = self.word_ptr(off, 8).cast::<u64>();
        // SAFETY: `p` is 8-aligned (mmap returns page-aligned memory and `off % 8 == 0`), valid
        // for reads and writes for as long as `self` (the borrow's lifetime), and every access
        // this process makes to it goes through atomics. The peer process may write it with
        // plain stores; the hardware makes aligned 8-byte accesses single-copy atomic either way.
        unsafe { AtomicU64::from_ptr(p) }
    }

    /// The 32-bit word at byte offset `off` (a multiple of 4 inside the area) as an atomic.
    ///
    /// # Panics
    /// If `off` is misaligned or out of range: callers pass constants of their layout.
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        let p = self.word_ptr(off, 4).cast::<u32>();
        // SAFETY: as in `u64_at`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(p) }
    }

    fn range_ptr(&self, off: usize, len: usize) -> io::Result<*mut u8> {
        match off.checked_add(len) {
            Some(end) if end <= self.map.len => {
                // SAFETY: `off + len <= map.len`, so the pointer (and `len` bytes after it)
                // stays inside the mapping.
                Ok(unsafe { self.map.ptr.cast::<u8>().add(off) })
            }
            _ => Err(io::Error::from(Errno::EFAULT)),
        }
    }

    /// Copies `dst.len()` bytes at `off` out of the area into private memory. Fails (`EFAULT`)
    /// when the range does not lie inside the area.
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) -> io::Result<()> {
        let src = self.range_ptr(off, dst.len())?;
        // SAFETY: `src..src+len` lies inside the live mapping (checked above) and `dst` is private
        // memory, so the two cannot overlap. No reference to the shared bytes is created; if the
        // peer writes concurrently, `dst` receives some mixture of old and new bytes, which the
        // caller validates as untrusted input.
        unsafe { ptr::copy_nonoverlapping(src.cast_const(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the area at `off`. Fails (`EFAULT`) when the range does not lie inside
    /// the area.
    pub fn copy_in(&self, off: usize, src: &[u8]) -> io::Result<()> {
        let dst = self.range_ptr(off, src.len())?;
        // SAFETY: `dst..dst+len` lies inside the live, writable mapping (checked above) and `src`
        // is private memory, so they cannot overlap. No reference to the shared bytes is created.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// `FUTEX_WAIT` (shared, not `FUTEX_PRIVATE_FLAG`: another process maps the same file) on
    /// the 32-bit word at `off`: sleeps while it holds `expected`, at most `timeout`.
    ///
    /// # Panics
    /// If `off` is misaligned or out of range, as [`SharedArea::u32_at`].
    pub fn futex_wait(&self, off: usize, expected: u32, timeout: std::time::Duration) -> io::Result<FutexWait> {
        let word = self.u32_at(off).as_ptr();
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` is a 4-aligned word inside the live mapping; `ts` is a valid relative
        // timespec on our stack; the kernel only reads both, and uaddr2/val3 are unused by
        // FUTEX_WAIT.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word,
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                ptr::null::<u32>(),
                0u32,
            )
        };
        if rc == 0 {
            return Ok(FutexWait::Woken);
        }
        match Errno::last() {
            Errno::EAGAIN => Ok(FutexWait::Changed),
            Errno::ETIMEDOUT => Ok(FutexWait::TimedOut),
            Errno::EINTR => Ok(FutexWait::Interrupted),
            e => Err(e.into()),
        }
    }

    /// `FUTEX_WAKE` (shared) on the 32-bit word at `off`: wakes up to `n` waiters; returns how
    /// many were woken.
    ///
    /// # Panics
    /// If `off` is misaligned or out of range, as [`SharedArea::u32_at`].
    pub fn futex_wake(&self, off: usize, n: i32) -> io::Result<usize> {
        let word = self.u32_at(off).as_ptr();
        // SAFETY: `word` is a 4-aligned word inside the live mapping; FUTEX_WAKE reads no other
        // argument memory (timeout, uaddr2 and val3 are unused).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word,
                libc::FUTEX_WAKE,
                n,
                ptr::null::<libc::timespec>(),
                ptr::null::<u32>(),
                0u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

// `ioctl(SIOCOUTQ)` (SIOCOUTQ is TIOCOUTQ on every architecture Linux has), through nix's
// ioctl macro; nix 0.29 has no safe wrapper for it.
nix::ioctl_read_bad!(siocoutq, libc::TIOCOUTQ, libc::c_int);

/// Bytes this socket sent that its peer has not read yet (`ioctl(SIOCOUTQ)`; for `AF_UNIX`,
/// what the peer's receive queue holds of ours).
pub fn unread_by_peer(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which is valid for that write;
    // `sock` is a live descriptor for the call's duration.
    unsafe { siocoutq(sock.as_raw_fd(), &mut n) }?;
    // A negative count cannot happen; read as "not drained" (the caller then holds back).
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// Faults in every page of a writable mapping now (`MADV_POPULATE_WRITE`, Linux 5.14), or by
/// touching each page where the kernel is older.
pub fn populate_write(m: &mut Mapping) -> io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    if m.len == 0 {
        return Ok(());
    }
    // In 2 MiB steps: populating holds the process's mmap lock, and a caller running at
    // SCHED_IDLE (the bulk pool's refill) must not hold it long while another thread waits to
    // map or unmap.
    const STEP: usize = 2 << 20;
    let mut done = 0;
    while done < m.len {
        let n = STEP.min(m.len - done);
        // SAFETY: advice on a sub-range of a live mapping we own (`done + n <= len`);
        // populating does not change its contents.
        if unsafe { libc::madvise(m.ptr.cast::<u8>().add(done).cast(), n, MADV_POPULATE_WRITE) } != 0 {
            break;
        }
        done += n;
    }
    if done >= m.len {
        return Ok(());
    }
    let Some(s) = m.as_mut_slice() else { return Err(io::Error::from_raw_os_error(libc::EACCES)) };
    for i in (0..s.len()).step_by(4096) {
        // A volatile read-modify-write of a byte we own: faults the page in writable.
        let p = &mut s[i];
        // SAFETY: `p` is a valid, aligned, exclusive reference into the mapping.
        unsafe { ptr::write_volatile(p, ptr::read_volatile(p)) };
    }
    Ok(())
}

/// `madvise(MADV_HUGEPAGE)` on a mapping (best effort; shmem THP must be set to `advise`).
pub fn advise_hugepage(m: &Mapping) -> io::Result<()> {
    let Some(p) = ptr::NonNull::new(m.ptr).filter(|_| m.len != 0) else { return Ok(()) };
    // SAFETY: advice on a live mapping we own; it does not change its contents.
    Ok(unsafe { mman::madvise(p, m.len, mman::MmapAdvise::MADV_HUGEPAGE) }?)
}

/// `madvise(MADV_RANDOM)` on a bulk payload's mapping (best effort): its pages are written or
/// read once and then freed, so the kernel need not age them. A mapping with this advice has
/// no "recency" (`vma_has_recency`, Linux 6.3+): unmapping it does not mark each page
/// accessed, which for 16 MiB of dirty shared pages is about half of the `munmap` a sender
/// must do before `F_SEAL_WRITE` (figures in docs/performance.md, "Bulk without huge pages").
/// For shmem the advice changes nothing else (there is no readahead to turn off).
pub fn advise_used_once(m: &Mapping) -> io::Result<()> {
    let Some(p) = ptr::NonNull::new(m.ptr).filter(|_| m.len != 0) else { return Ok(()) };
    // SAFETY: advice on a live mapping we own; it does not change its contents.
    Ok(unsafe { mman::madvise(p, m.len, mman::MmapAdvise::MADV_RANDOM) }?)
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only when its CPU has nothing else to do.
/// For background work (refilling a bulk pool) that must never delay the thread it serves.
pub fn make_current_thread_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    Errno::result(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) })?;
    Ok(())
}

// ----------------------------------------------------------------------------- processes

/// Duplicates `fd` to the lowest free number at or above `min`, close-on-exec.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let n = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Arranges for `cmd`'s child to find each `(source, target)` descriptor at `target`, without
/// close-on-exec, and every descriptor above the highest target closed (`close_range`), so the
/// child starts with stdio and exactly the planned descriptors.
///
/// The sources are first moved above every target, so a source can never be clobbered by an
/// earlier `dup2`; the child then only calls `dup2`, which is async-signal-safe.
pub fn install_child_fds(cmd: &mut std::process::Command, fds: Vec<(OwnedFd, RawFd)>) -> io::Result<ChildFds> {
    use std::os::unix::process::CommandExt;
    let top = fds.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
    let mut moved = Vec::with_capacity(fds.len());
    for (fd, target) in fds {
        let high = dup_above(fd.as_fd(), top.max(64))?;
        moved.push((high, target));
    }
    let plan: Vec<(RawFd, RawFd)> = moved.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    // SAFETY: the closure runs between fork and exec and calls only dup2, close_range and
    // close, which are async-signal-safe; it allocates nothing. `moved` keeps the sources open
    // until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &plan {
                nix::unistd::dup2(src, dst)?;
            }
            // Nothing else crosses exec: not even descriptors some ancestor leaked to us
            // without close-on-exec.
            if libc::syscall(libc::SYS_close_range, top as libc::c_uint, libc::c_uint::MAX, 0 as libc::c_uint) == -1 {
                let mut fd = top;
                while fd < 4096 {
                    libc::close(fd);
                    fd += 1;
                }
            }
            Ok(())
        });
    }
    Ok(ChildFds(moved.into_iter().map(|(f, _)| f).collect()))
}

/// The parent's copies of descriptors prepared for a child; drop it once the child is spawned.
#[derive(Debug)]
pub struct ChildFds(#[allow(dead_code)] Vec<OwnedFd>);

/// Pins the calling thread (and the threads it creates later) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    Ok(sched_setaffinity(Pid::from_raw(0), &set)?)
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() -> io::Result<()> {
    let mut set = CpuSet::new();
    // Not available_parallelism(): it counts the current (pinned) affinity mask.
    let conf = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_CONF).ok().flatten();
    let n = conf.and_then(|n| usize::try_from(n).ok()).unwrap_or(1).max(1);
    for cpu in 0..n.min(CpuSet::count()) {
        set.set(cpu)?;
    }
    Ok(sched_setaffinity(Pid::from_raw(0), &set)?)
}

/// Waits until `fd` is readable (or hung up) or `timeout_ms` passes; `-1` waits forever.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout_ms.max(-1)).map_err(|_| io::Error::from(Errno::EINVAL))?;
    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(&mut p, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

static CLAIMED: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Takes ownership of a descriptor this process inherited at a well-known number. Fails if
/// the number is not open, or if it was already claimed (so two owners can never exist).
/// The descriptor is made close-on-exec.
pub fn claim_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut claimed = CLAIMED.lock().map_err(|_| io::Error::other("claim registry poisoned"))?;
    if claimed.contains(&fd) {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("descriptor {fd} was already claimed")));
    }
    // F_GETFD fails with EBADF when `fd` is not open.
    let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
    claimed.push(fd);
    // SAFETY: the descriptor is open (checked above) and, by the registry, owned by no other
    // OwnedFd in this process: inherited descriptors are only ever claimed through here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is close-on-exec (`FD_CLOEXEC` from `fcntl(F_GETFD)`).
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD)?;
    Ok(FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC))
}

/// `SO_TYPE` of a socket, or an error if `fd` is not a socket.
/// (A type nix does not name, such as `SOCK_PACKET`, is reported as `EINVAL`.)
pub fn socket_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    Ok(socket::getsockopt(&fd, sockopt::SockType)? as libc::c_int)
}

/// Sets `O_NONBLOCK` on the open file description behind `fd` (shared with every duplicate
/// of it, in this process or another).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Number of open descriptors of this process, from `/proc/self/fd` (tests use it to prove
/// that nothing leaks).
pub fn count_open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}
