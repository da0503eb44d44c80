//! Thin, audited wrappers over the syscalls the protocol needs.
//!
//! This is the only module of `airlock-protocol` that may use `unsafe`. Each wrapper owns its
//! file descriptors as `OwnedFd` the moment the kernel hands them out, so no error path can leak
//! one, and each `unsafe` block says why it is sound. Nothing here knows about frames, keys or
//! policy: it moves bytes and descriptors.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_ssize(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Creates a connected `AF_UNIX` `SOCK_SEQPACKET` pair, close-on-exec on both ends.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(libc::SOCK_SEQPACKET)
}

/// Creates a connected `AF_UNIX` `SOCK_STREAM` pair, close-on-exec on both ends (benchmarks).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(libc::SOCK_STREAM)
}

fn socketpair(ty: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints the kernel writes on success.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
    // SAFETY: on success both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a socket's send and receive buffer sizes (best effort up to the system maximum).
pub fn set_socket_buffers(sock: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `v` is a live c_int and its size is passed alongside.
        cvt(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Sets `SO_RCVTIMEO` (`None`: block forever).
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> io::Result<()> {
    let d = timeout.unwrap_or_default();
    let tv = libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t };
    // SAFETY: `tv` is a live timeval and its size is passed alongside.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
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

/// Sends one datagram with `sendmsg` (one iovec, no allocation for up to 8 descriptors).
pub fn send_datagram(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_datagram_flags(sock, buf, fds, 0)
}

/// As [`send_datagram`]; with `nonblocking`, fails with `WouldBlock` instead of waiting.
pub fn send_datagram_nonblocking(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_datagram_flags(sock, buf, fds, libc::MSG_DONTWAIT)
}

fn send_datagram_flags(sock: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd], extra: libc::c_int) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
    let mut small = [0u64; 8];
    let mut big = Vec::new();
    let space = cmsg_space(fds.len());
    let control: &mut [u64] = if space <= small.len() * 8 {
        &mut small[..]
    } else {
        big.resize(space.div_ceil(8), 0u64);
        &mut big[..]
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut h: libc::msghdr = unsafe { mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    if !fds.is_empty() {
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = space as _;
        // SAFETY: msg_control points at at least `space` zeroed, 8-aligned bytes, which is
        // CMSG_SPACE for `fds.len()` descriptors, so the first header and its data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as _;
            ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
        }
    }
    loop {
        // SAFETY: `h` points at `iov`, `buf` and `control`, all live for the call; the kernel
        // only reads them.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &h, libc::MSG_NOSIGNAL | extra) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
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
    // SAFETY: `buf` is valid for reads of its length.
    cvt_ssize(unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
}

/// Plain `recv` (benchmark baselines).
pub fn recv_bytes(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    cvt_ssize(unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })
}

// ----------------------------------------------------------------------------- memfd

pub const SEAL_SET: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING [| MFD_HUGETLB])`.
pub fn memfd_create(name: &CStr, hugetlb: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// Allocates backing pages for `[0, len)` now, so that later writes do not fault them in.
pub fn fallocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len) }).map(drop)
}

pub fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// `F_GET_SEALS`; fails with `EINVAL` for a file that is not a memfd (or other shmem file).
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// File type bits and size, from `fstat`.
pub fn file_mode_and_size(fd: BorrowedFd<'_>) -> io::Result<(u32, u64)> {
    // SAFETY: all-zero is a valid `stat`.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((st.st_mode, st.st_size as u64))
}

/// `fstatfs` magic of the filesystem holding `fd`.
pub fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
    // SAFETY: all-zero is a valid `statfs`.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs buffer.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

pub const TMPFS_MAGIC: i64 = 0x0102_1994;
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// `pwrite` the whole of `buf` at `offset`.
pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length.
        let rc = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
        match cvt_ssize(rc) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pread` exactly `buf.len()` bytes at `offset`.
pub fn pread_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for writes of its length.
        let rc = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset as libc::off_t) };
        match cvt_ssize(rc) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
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
        Mapping::map_with(fd, len, mode, libc::MAP_POPULATE)
    }

    /// Maps `len` bytes of `fd` from offset 0 without faulting anything in yet.
    pub fn map_lazy(fd: BorrowedFd<'_>, len: usize, mode: MapMode) -> io::Result<Mapping> {
        Mapping::map_with(fd, len, mode, 0)
    }

    fn map_with(fd: BorrowedFd<'_>, len: usize, mode: MapMode, extra: libc::c_int) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping { ptr: ptr::NonNull::<u64>::dangling().as_ptr().cast(), len: 0, writable: false });
        }
        let prot = match mode {
            MapMode::SharedRead => libc::PROT_READ,
            MapMode::SharedWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr null); it aliases no Rust object.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED | extra, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p, len, writable: mode == MapMode::SharedWrite })
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
        if self.len != 0 {
            // SAFETY: unmaps exactly the region mapped in `map`; no reference outlives `self`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
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
    if m.len == 0 {
        return Ok(());
    }
    // SAFETY: advice on a live mapping we own; it does not change its contents.
    cvt(unsafe { libc::madvise(m.ptr, m.len, libc::MADV_HUGEPAGE) }).map(drop)
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only when its CPU has nothing else to do.
/// For background work (refilling a bulk pool) that must never delay the thread it serves.
pub fn make_current_thread_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }).map(drop)
}

// ----------------------------------------------------------------------------- processes

/// Duplicates `fd` to the lowest free number at or above `min`, close-on-exec.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let n = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: fresh descriptor owned by nobody else.
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
    // close, which are async-signal-safe; it allocates nothing. `moved` keeps the sources open until the
    // Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &plan {
                if libc::dup2(src, dst) == -1 {
                    return Err(io::Error::last_os_error());
                }
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
    // SAFETY: all-zero is an empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: CPU_SET writes within `set` for cpu < CPU_SETSIZE, checked here.
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` is in range, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) }).map(drop)
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() -> io::Result<()> {
    // SAFETY: all-zero is an empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // Not available_parallelism(): it counts the current (pinned) affinity mask.
    // SAFETY: sysconf takes an integer and has no other effect.
    let n = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).unwrap_or(1).max(1);
    for cpu in 0..n.min(libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` < CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) }).map(drop)
}

/// Waits until `fd` is readable (or hung up) or `timeout_ms` passes; `-1` waits forever.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `p` is one valid pollfd, and we pass a count of 1.
        let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(rc > 0);
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
    // SAFETY: integer arguments only; F_GETFD fails with EBADF when `fd` is not open.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    claimed.push(fd);
    // SAFETY: the descriptor is open (checked above) and, by the registry, owned by no other
    // OwnedFd in this process: inherited descriptors are only ever claimed through here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is close-on-exec (`FD_CLOEXEC` from `fcntl(F_GETFD)`).
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: integer arguments only; the kernel reads no user memory.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// `SO_TYPE` of a socket, or an error if `fd` is not a socket.
pub fn socket_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes and `len` holds v's size.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE, (&mut v as *mut libc::c_int).cast(), &mut len)
    })?;
    Ok(v)
}

/// Number of open descriptors of this process, from `/proc/self/fd` (tests use it to prove
/// that nothing leaks).
pub fn count_open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}
