//! `recvmmsg`/`sendmmsg` batches (Linux), also used by the relay's UDP relay path
//! (`ferry_stun::mmsg`). The buffers live in the batch structs; the
//! `mmsghdr`/`iovec` arrays pointing into them are rebuilt on the stack for every call, so no
//! raw pointer outlives a call (and the structs stay `Send`).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

pub use super::UDP_BATCH;

/// A raw source/destination address as the kernel gave it.
pub type RawAddr = (libc::sockaddr_storage, libc::socklen_t);

/// Receive side: `n` datagrams of at most `stride` bytes each.
pub struct RecvBatch {
    bufs: Vec<u8>,
    stride: usize,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
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
            n: 0,
        }
    }

    /// One `recvmmsg(MSG_DONTWAIT)`; returns the number of datagrams read.
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
        }
        self.n = n;
        Ok(n)
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

    #[test]
    fn from_std_and_to_std_round_trip() {
        for a in ["203.0.113.7:3478", "[2001:db8::1]:41641"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(to_std(&from_std(a).0), Some(a));
        }
    }
}
