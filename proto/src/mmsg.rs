//! `recvmmsg`/`sendmmsg` batches with UDP GRO and GSO (Linux; feature `mmsg`): the one copy of
//! the batched UDP system calls that the STUN server, the relay's UDP relay path and the
//! client's endpoint share (re-exported as `ferry_stun::mmsg`). Not sans-IO like the rest of
//! this crate: system calls on a file descriptor the caller owns, no runtime, no tokio. It is
//! here, behind a feature, because the client must not link the server crates. The buffers
//! live in the batch structs; the
//! `mmsghdr`/`iovec` arrays pointing into them are rebuilt on the stack for every call, so no
//! raw pointer outlives a call (and the structs stay `Send`).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

/// Datagrams read or written per system call.
pub const UDP_BATCH: usize = 64;

/// A raw source/destination address as the kernel gave it.
pub type RawAddr = (libc::sockaddr_storage, libc::socklen_t);

/// The most a UDP datagram (and so a GRO or GSO batch) can carry.
pub const MAX_UDP_PAYLOAD: usize = 65_535;

/// The most segments one GSO send carries here: the kernel's `UDP_MAX_SEGMENTS` (64 before
/// Linux 6.3, 128 since), so 64 is safe everywhere.
pub const MAX_GSO_SEGMENTS: usize = 64;

/// The largest datagram coalesced into a GSO send: what fits a 1,500-byte MTU under IPv6 and
/// UDP headers. The kernel refuses (`EINVAL`) a GSO send whose segments exceed the path MTU,
/// where the same datagram sent alone would be fragmented; larger datagrams go alone.
pub const MAX_GSO_SEGMENT: usize = 1500 - 40 - 8;

/// Room for one `cmsghdr` with a small integer (`CMSG_SPACE(4)` is 24 bytes on 64-bit Linux),
/// 8-byte aligned as `cmsghdr` needs.
type Cmsg = [u64; 4];

/// Receive side: `n` datagrams of at most `stride` bytes each. With
/// [`RecvBatch::enable_gro`], one entry can hold several datagrams of the same flow that the
/// kernel coalesced (UDP GRO): [`RecvBatch::segment_size`] says where to cut it.
pub struct RecvBatch {
    bufs: Vec<u8>,
    stride: usize,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    /// With GRO: a control buffer and the segment size per entry.
    ctrl: Vec<Cmsg>,
    segs: Vec<usize>,
    n: usize,
}

impl RecvBatch {
    pub fn new(batch: usize, stride: usize) -> RecvBatch {
        assert!(batch <= UDP_BATCH);
        RecvBatch {
            bufs: vec![0; batch * stride],
            stride,
            lens: vec![0; batch],
            truncated: vec![false; batch],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { zeroed() }; batch],
            addr_lens: vec![0; batch],
            ctrl: Vec::new(),
            segs: Vec::new(),
            n: 0,
        }
    }

    /// Asks the kernel to coalesce datagrams of one flow into one entry (`UDP_GRO`, Linux
    /// 5.0+). Needs a stride of [`MAX_UDP_PAYLOAD`] (a coalesced entry can be that large).
    /// Returns whether GRO is on; without it every entry is one datagram, as before.
    pub fn enable_gro(&mut self, fd: RawFd) -> bool {
        if self.stride < MAX_UDP_PAYLOAD || !set_int_opt(fd, libc::SOL_UDP, libc::UDP_GRO, 1) {
            return false;
        }
        let batch = self.lens.len();
        self.ctrl = vec![[0; 4]; batch];
        self.segs = vec![0; batch];
        true
    }

    /// One `recvmmsg(MSG_DONTWAIT)`; returns the number of entries read.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let batch = self.lens.len();
        // SAFETY: iovec and mmsghdr are plain old data; zero is valid (null pointers, 0 lengths).
        let mut iov: [libc::iovec; UDP_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; UDP_BATCH] = unsafe { zeroed() };
        let base = self.bufs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        for i in 0..batch {
            // SAFETY: i * stride + stride <= bufs.len() and i < addrs.len().
            iov[i].iov_base = unsafe { base.add(i * self.stride) }.cast();
            iov[i].iov_len = self.stride;
            let h = &mut hdrs[i].msg_hdr;
            // SAFETY: i < addrs.len().
            h.msg_name = unsafe { addrs.add(i) }.cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            if let Some(c) = self.ctrl.get_mut(i) {
                h.msg_control = c.as_mut_ptr().cast();
                h.msg_controllen = size_of::<Cmsg>() as _;
            }
        }
        // SAFETY: every header points at live, correctly sized buffers owned by `self` or by
        // this stack frame, which outlive the call; `batch` <= the arrays' length.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                batch as _,
                libc::MSG_DONTWAIT as _,
                ptr::null_mut(),
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = h.msg_len as usize;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.addr_lens[i] = h.msg_hdr.msg_namelen;
            if let Some(seg) = self.segs.get_mut(i) {
                // SAFETY: the header's control pointer and length are the kernel's answer
                // about our own buffer `ctrl[i]`, which is live.
                *seg = unsafe { gro_segment_size(&h.msg_hdr) }.unwrap_or(0);
            }
        }
        self.n = n;
        Ok(n)
    }

    /// The size of each datagram coalesced into entry `i` (the last may be shorter): the
    /// entry's length when it is one datagram.
    pub fn segment_size(&self, i: usize) -> usize {
        match self.segs.get(i) {
            Some(&s) if s > 0 => s,
            _ => self.lens.get(i).copied().unwrap_or(0),
        }
    }

    /// Datagram `i` and its source; `None` if it was truncated or has no IP source.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.n || self.truncated[i] {
            return None;
        }
        let src = to_std(&self.addrs[i])?;
        let start = i * self.stride;
        Some((&self.bufs[start..start + self.lens[i]], src))
    }

    /// The source of datagram `i` exactly as received, to send the reply to.
    pub fn raw_addr(&self, i: usize) -> RawAddr {
        (self.addrs[i], self.addr_lens[i])
    }
}

/// Send side: up to `batch` replies of at most `stride` bytes.
pub struct SendBatch {
    bufs: Vec<u8>,
    stride: usize,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    n: usize,
}

impl SendBatch {
    pub fn new(batch: usize, stride: usize) -> SendBatch {
        assert!(batch <= UDP_BATCH);
        SendBatch {
            bufs: vec![0; batch * stride],
            stride,
            lens: vec![0; batch],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { zeroed() }; batch],
            addr_lens: vec![0; batch],
            n: 0,
        }
    }

    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Datagrams kept so far.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The buffer the next reply is written into (kept only if [`SendBatch::commit`]ted).
    pub fn next_buf(&mut self) -> &mut [u8] {
        let start = self.n.min(self.lens.len() - 1) * self.stride;
        &mut self.bufs[start..start + self.stride]
    }

    /// Keep the reply in [`SendBatch::next_buf`] (`len` bytes) for `addr`.
    pub fn commit(&mut self, len: usize, addr: RawAddr) {
        if self.n < self.lens.len() {
            self.lens[self.n] = len;
            self.addrs[self.n] = addr.0;
            self.addr_lens[self.n] = addr.1;
            self.n += 1;
        }
    }

    /// Keep the datagram in [`SendBatch::next_buf`] (`len` bytes) for `addr`.
    pub fn commit_to(&mut self, len: usize, addr: SocketAddr) {
        self.commit(len, from_std(addr));
    }

    /// One `sendmmsg` of the replies `from..len()`; returns how many were sent.
    pub fn send(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let count = self.n.saturating_sub(from);
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: plain old data; zero is valid.
        let mut iov: [libc::iovec; UDP_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; UDP_BATCH] = unsafe { zeroed() };
        let base = self.bufs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        for k in 0..count {
            let i = from + k;
            // SAFETY: i < n <= batch, so the offsets are in bounds.
            iov[k].iov_base = unsafe { base.add(i * self.stride) }.cast();
            iov[k].iov_len = self.lens[i];
            let h = &mut hdrs[k].msg_hdr;
            // SAFETY: i < addrs.len().
            h.msg_name = unsafe { addrs.add(i) }.cast();
            h.msg_namelen = self.addr_lens[i];
            h.msg_iov = &mut iov[k];
            h.msg_iovlen = 1;
        }
        // SAFETY: the headers point at live buffers of the stated lengths that outlive the
        // call; `count` <= the arrays' length.
        let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count as _, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

/// Send side for forwarding: datagrams kept back to back in one buffer, and consecutive ones
/// to the same address of the same size kept as one message that the kernel cuts into
/// datagrams again (UDP GSO, `UDP_SEGMENT`, Linux 4.18+). One pass through the kernel's UDP
/// and IP layers then carries up to [`MAX_GSO_SEGMENTS`] datagrams. What goes out on the wire
/// is the same datagrams in the same order.
///
/// If the kernel refuses a segmented message, it goes out datagram by datagram; when the
/// refusal is `EIO` (a device without checksum offload, or IPsec on the route), GSO is turned
/// off for good. `EINVAL` (segments larger than the path MTU: a client behind a VPN or an
/// overlay with an MTU under 1,500) makes datagrams of that size and larger go alone from then
/// on, so that every later flush does not pay a refused system call first; a socket with many
/// destinations behind different paths (a relay) keeps trying message by message instead
/// ([`GsoSendBatch::many_destinations`]).
pub struct GsoSendBatch {
    buf: Vec<u8>,
    used: usize,
    msgs: Vec<GsoMsg>,
    cap: usize,
    gso: bool,
    /// The largest datagram a new run starts with (lowered by `EINVAL`, see above).
    max_seg: usize,
    learn_mtu: bool,
}

struct GsoMsg {
    start: usize,
    len: usize,
    /// Segment size: every datagram of the message has it, except a shorter last one. Zero:
    /// one datagram that nothing is appended to.
    seg: usize,
    to: SocketAddr,
    raw: RawAddr,
    /// The kernel refused it as one GSO message: it goes datagram by datagram, and `start` /
    /// `len` move past what has gone.
    one_by_one: bool,
}

impl GsoSendBatch {
    /// Up to `batch` messages (≤ [`UDP_BATCH`]) and `bytes` of datagrams; `gso` whether to
    /// coalesce at all.
    pub fn new(batch: usize, bytes: usize, gso: bool) -> GsoSendBatch {
        assert!(batch <= UDP_BATCH && bytes >= MAX_UDP_PAYLOAD);
        GsoSendBatch {
            buf: vec![0; bytes],
            used: 0,
            msgs: Vec::with_capacity(batch),
            cap: batch,
            gso,
            max_seg: MAX_GSO_SEGMENT,
            learn_mtu: true,
        }
    }

    /// For a socket that sends to many addresses over different paths (the relay): a GSO
    /// message refused with `EINVAL` goes out datagram by datagram, and later runs of that size
    /// are still coalesced (another destination's path may carry them).
    pub fn many_destinations(mut self) -> GsoSendBatch {
        self.learn_mtu = false;
        self
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.msgs.clear();
    }

    /// Whether GSO is (still) on.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Messages kept (a message is one datagram, or several with GSO).
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Datagrams kept.
    pub fn datagrams(&self) -> usize {
        self.msgs
            .iter()
            .map(|m| {
                if m.seg == 0 {
                    1
                } else {
                    m.len.div_ceil(m.seg).max(1)
                }
            })
            .sum()
    }

    /// Whether a datagram of `len` bytes surely fits (as a message of its own).
    pub fn has_room(&self, len: usize) -> bool {
        self.msgs.len() < self.cap && self.used + len <= self.buf.len()
    }

    /// Keeps datagram `d` for `to`: appended to the last message when GSO can carry both
    /// (same address, same size, and the last message has no short datagram yet), else as a
    /// new message. Returns false, keeping nothing, when there is no room.
    pub fn push(&mut self, d: &[u8], to: SocketAddr) -> bool {
        if self.gso && !d.is_empty() {
            if let Some(m) = self.msgs.last_mut() {
                if m.to == to
                    && m.seg > 0
                    && d.len() <= m.seg
                    && m.len % m.seg == 0
                    && m.len / m.seg < MAX_GSO_SEGMENTS
                    && m.len + d.len() <= MAX_UDP_PAYLOAD - 8 - 40
                    && self.used + d.len() <= self.buf.len()
                {
                    self.buf[self.used..self.used + d.len()].copy_from_slice(d);
                    self.used += d.len();
                    m.len += d.len();
                    return true;
                }
            }
        }
        let seg = if self.gso && d.len() <= self.max_seg {
            d.len()
        } else {
            0
        };
        self.push_new(d, to, seg)
    }

    /// Keeps datagram `d` for `to` as a message of its own that nothing is appended to
    /// (a reply, say). Returns false, keeping nothing, when there is no room.
    pub fn push_alone(&mut self, d: &[u8], to: SocketAddr) -> bool {
        self.push_new(d, to, 0)
    }

    fn push_new(&mut self, d: &[u8], to: SocketAddr, seg: usize) -> bool {
        if !self.has_room(d.len()) {
            return false;
        }
        self.buf[self.used..self.used + d.len()].copy_from_slice(d);
        self.msgs.push(GsoMsg {
            start: self.used,
            len: d.len(),
            seg,
            to,
            raw: from_std(to),
            one_by_one: false,
        });
        self.used += d.len();
        true
    }

    /// One `sendmmsg` of the messages `from..len()`; returns how many messages went. A
    /// segmented message the kernel refuses goes out datagram by datagram (a datagram the
    /// kernel refuses then is lost as any UDP send can be), and after `EIO` GSO is off. A full
    /// send buffer is `WouldBlock`, as for any send: call again from the same message once the
    /// socket is writable; a message half sent one by one goes on where it stopped.
    pub fn send(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let count = self.msgs.len().saturating_sub(from).min(UDP_BATCH);
        if count == 0 {
            return Ok(0);
        }
        if self.msgs[from].one_by_one {
            return self.send_one_by_one(fd, from);
        }
        // SAFETY: plain old data; zero is valid.
        let mut iov: [libc::iovec; UDP_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; UDP_BATCH] = unsafe { zeroed() };
        let mut ctrl: [Cmsg; UDP_BATCH] = [[0; 4]; UDP_BATCH];
        let base = self.buf.as_mut_ptr();
        for k in 0..count {
            let m = &mut self.msgs[from + k];
            // SAFETY: start + len <= used <= buf.len().
            iov[k].iov_base = unsafe { base.add(m.start) }.cast();
            iov[k].iov_len = m.len;
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = (&mut m.raw.0 as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = m.raw.1;
            h.msg_iov = &mut iov[k];
            h.msg_iovlen = 1;
            if m.seg > 0 && m.len > m.seg {
                h.msg_control = ctrl[k].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
                // SAFETY: the control buffer is 32 bytes, CMSG_SPACE(2) is 24: the header
                // and its data are inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), m.seg as u16);
                }
            }
        }
        // SAFETY: the headers point at live buffers of the stated lengths (in `self` and this
        // frame) that outlive the call; `count` <= the arrays' length.
        let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count as _, 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        let m = &self.msgs[from];
        let refused = matches!(
            e.raw_os_error(),
            Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
        );
        if !(refused && m.seg > 0 && m.len > m.seg) {
            return Err(e);
        }
        let seg = m.seg;
        match e.raw_os_error() {
            Some(libc::EIO) => self.gso = false,
            Some(libc::EINVAL) if self.learn_mtu => self.max_seg = self.max_seg.min(seg - 1),
            _ => {}
        }
        self.msgs[from].one_by_one = true;
        self.send_one_by_one(fd, from)
    }

    /// Message `i`, datagram by datagram, from where it stopped. `Ok(1)` once it is through;
    /// `WouldBlock` (progress kept) when the send buffer is full.
    fn send_one_by_one(&mut self, fd: RawFd, i: usize) -> io::Result<usize> {
        let m = &mut self.msgs[i];
        while m.len > 0 {
            let n = m.len.min(m.seg.max(1));
            let d = &self.buf[m.start..m.start + n];
            // SAFETY: a live buffer and address for the call.
            let r = unsafe {
                libc::sendto(
                    fd,
                    d.as_ptr().cast(),
                    d.len(),
                    libc::MSG_DONTWAIT,
                    (&m.raw.0 as *const libc::sockaddr_storage).cast(),
                    m.raw.1,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(e);
                }
            }
            m.start += n;
            m.len -= n;
        }
        Ok(1)
    }
}

/// `setsockopt` of an `int` option; whether the kernel took it.
pub fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: a pointer to a live int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// The `UDP_GRO` segment size in a received message's control data, if any.
///
/// # Safety
/// `h.msg_control`/`h.msg_controllen` must describe a live buffer the kernel filled.
unsafe fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the caller's promise; CMSG_* walk only inside msg_control..+msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// A std socket address as the kernel takes it.
pub fn from_std(addr: SocketAddr) -> RawAddr {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Convert a kernel socket address to a std one (IPv4 and IPv6 only).
fn to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, which it is large and
            // aligned enough for.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A batch read and a batch write over loopback, without tokio.
    #[test]
    fn recvmmsg_sendmmsg_roundtrip() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = server.local_addr().unwrap();
        for i in 0..5u8 {
            client.send_to(&[i; 7], dst).unwrap();
        }
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rx = RecvBatch::new(8, 64);
        let mut total = 0;
        let mut tx = SendBatch::new(8, 64);
        while total < 5 {
            // Block until something is there, then drain with MSG_DONTWAIT.
            let mut peek = [0u8; 1];
            server.peek_from(&mut peek).unwrap();
            let n = rx.recv(server.as_raw_fd()).unwrap();
            for i in 0..n {
                let (data, src) = rx.get(i).unwrap();
                assert_eq!(src, client.local_addr().unwrap());
                assert_eq!(data, &[(total + i) as u8; 7][..]);
                let buf = tx.next_buf();
                buf[..3].copy_from_slice(b"ack");
                tx.commit(3, rx.raw_addr(i));
            }
            total += n;
        }
        assert_eq!(tx.send(server.as_raw_fd(), 0).unwrap(), 5);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for _ in 0..5 {
            let mut buf = [0u8; 16];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"ack"[..], dst));
        }
    }

    #[test]
    fn truncated_datagram_is_reported() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(&[1u8; 100], server.local_addr().unwrap())
            .unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut peek = [0u8; 1];
        server.peek_from(&mut peek).unwrap();
        let mut rx = RecvBatch::new(4, 32);
        assert_eq!(rx.recv(server.as_raw_fd()).unwrap(), 1);
        assert!(rx.get(0).is_none());
    }

    /// Cuts every entry of `rx` at its segment size: the datagrams as sent.
    fn datagrams(rx: &RecvBatch, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for i in 0..n {
            let (d, _) = rx.get(i).unwrap();
            out.extend(d.chunks(rx.segment_size(i)).map(<[u8]>::to_vec));
        }
        out
    }

    /// Reads until `want` datagrams came (blocking on a peek between batches); also returns
    /// how many entries they came in.
    fn read_all(
        sock: &std::net::UdpSocket,
        rx: &mut RecvBatch,
        want: usize,
    ) -> (Vec<Vec<u8>>, usize) {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (mut got, mut entries) = (Vec::new(), 0);
        while got.len() < want {
            let mut peek = [0u8; 1];
            sock.peek_from(&mut peek).unwrap();
            let n = rx.recv(sock.as_raw_fd()).unwrap();
            got.extend(datagrams(rx, n));
            entries += n;
        }
        (got, entries)
    }

    /// What the relay does with a burst: ten datagrams of 100 bytes and a short one to one
    /// address become one GSO message; a GRO reader gets them as one entry and cuts them
    /// back; a plain reader gets the eleven datagrams one by one. Either way: the same bytes,
    /// the same order.
    #[test]
    fn a_gso_burst_arrives_as_the_same_datagrams_with_or_without_gro() {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent: Vec<Vec<u8>> = (0..11u8)
            .map(|i| vec![i; if i == 10 { 40 } else { 100 }])
            .collect();
        for gro in [true, false] {
            let dst = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut rx = RecvBatch::new(8, MAX_UDP_PAYLOAD);
            if gro {
                assert!(rx.enable_gro(dst.as_raw_fd()), "UDP_GRO needs Linux 5.0+");
            }
            let mut tx = GsoSendBatch::new(8, MAX_UDP_PAYLOAD, true);
            for d in &sent {
                assert!(tx.push(d, dst.local_addr().unwrap()));
            }
            assert_eq!((tx.len(), tx.datagrams()), (1, 11), "one message of 11");
            assert_eq!(tx.send(sender.as_raw_fd(), 0).unwrap(), 1);
            assert!(tx.gso(), "the kernel took the GSO send");
            let (got, entries) = read_all(&dst, &mut rx, 11);
            assert_eq!(got, sent, "gro {gro}");
            assert_eq!(entries, if gro { 1 } else { 11 }, "gro {gro}");
        }
    }

    /// A GSO send the kernel refuses still delivers every datagram, one by one: here the
    /// sending socket has UDP checksums off (`SO_NO_CHECK`), with which the kernel refuses
    /// every GSO send (`EINVAL`, as for segments larger than the path MTU). GSO stays on: only
    /// `EIO` (no checksum offload) turns it off; `EINVAL` stops runs of the refused size.
    #[test]
    fn a_refused_gso_send_goes_out_datagram_by_datagram() {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(set_int_opt(
            sender.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            1
        ));
        let dst = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The premise: this kernel refuses a GSO send on such a socket.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(set_int_opt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            1
        ));
        assert!(set_int_opt(
            probe.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            200
        ));
        let e = probe
            .send_to(&[0; 1000], dst.local_addr().unwrap())
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let sent: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 200]).collect();
        let mut tx = GsoSendBatch::new(8, MAX_UDP_PAYLOAD, true);
        for d in &sent {
            assert!(tx.push(d, dst.local_addr().unwrap()));
        }
        assert_eq!(tx.len(), 1);
        assert_eq!(tx.send(sender.as_raw_fd(), 0).unwrap(), 1);
        let mut rx = RecvBatch::new(8, 2048);
        let (got, entries) = read_all(&dst, &mut rx, 5);
        assert_eq!((got, entries), (sent.clone(), 5));
        assert!(tx.gso(), "EINVAL leaves GSO on");
        // But runs of the refused size are not tried again (each flush would pay a refused
        // system call first); smaller ones still are.
        tx.clear();
        for d in &sent {
            assert!(tx.push(d, dst.local_addr().unwrap()));
        }
        assert_eq!(tx.len(), 5, "200-byte datagrams go alone after EINVAL");
        tx.clear();
        for _ in 0..3 {
            assert!(tx.push(&[9; 100], dst.local_addr().unwrap()));
        }
        assert_eq!(tx.len(), 1, "100-byte ones still run together");
        // A relay's batch keeps trying: another destination's path may take them.
        let mut relay = GsoSendBatch::new(8, MAX_UDP_PAYLOAD, true).many_destinations();
        for d in &sent {
            assert!(relay.push(d, dst.local_addr().unwrap()));
        }
        assert_eq!(relay.send(sender.as_raw_fd(), 0).unwrap(), 1);
        relay.clear();
        for d in &sent {
            assert!(relay.push(d, dst.local_addr().unwrap()));
        }
        assert_eq!(relay.len(), 1, "many_destinations: still coalesced");
        let (got, _) = read_all(&dst, &mut rx, 5);
        assert_eq!(got, sent);
    }

    /// Only runs of one size to one address are coalesced, a short datagram ends a run, a
    /// reply stays alone, and without GSO every datagram is a message of its own.
    #[test]
    fn gso_coalesces_only_same_size_runs_to_one_address() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let mut tx = GsoSendBatch::new(8, MAX_UDP_PAYLOAD, true);
        for (len, to) in [(100, a), (100, a), (50, a), (100, a), (100, b), (120, b)] {
            assert!(tx.push(&vec![0; len], to));
        }
        // [100 100 50] to a, [100] to a, [100] to b, [120] to b (larger than the run's size).
        assert_eq!((tx.len(), tx.datagrams()), (4, 6));
        assert!(tx.push_alone(&[1; 100], b));
        assert!(tx.push(&[2; 100], b));
        assert_eq!((tx.len(), tx.datagrams()), (6, 8), "nothing joins a reply");
        // Larger than a 1,500-byte MTU allows in one segment: alone.
        assert!(tx.push(&[3; MAX_GSO_SEGMENT + 1], b));
        assert!(tx.push(&[3; MAX_GSO_SEGMENT + 1], b));
        assert_eq!((tx.len(), tx.datagrams()), (8, 10));
        // At most MAX_GSO_SEGMENTS per message.
        tx.clear();
        for _ in 0..MAX_GSO_SEGMENTS + 1 {
            assert!(tx.push(&[0; 8], a));
        }
        assert_eq!((tx.len(), tx.datagrams()), (2, MAX_GSO_SEGMENTS + 1));
        let mut plain = GsoSendBatch::new(8, MAX_UDP_PAYLOAD, false);
        for _ in 0..3 {
            assert!(plain.push(&[0; 100], a));
        }
        assert_eq!((plain.len(), plain.datagrams()), (3, 3));
        // Full: no more messages than the batch holds, nothing kept past it.
        for _ in 0..5 {
            assert!(plain.push(&[0; 100], a));
        }
        assert!(!plain.push(&[0; 100], a));
        assert_eq!(plain.len(), 8);
    }

    #[test]
    fn from_std_and_to_std_round_trip() {
        for a in ["203.0.113.7:3478", "[2001:db8::1]:41641"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(to_std(&from_std(a).0), Some(a));
        }
    }
}
