//! Socket creation: `IPV6_V6ONLY`, `SO_REUSEPORT` for worker groups, buffer sizes, and errors
//! that name the address.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::{Grid, GridPos};
use crate::{Rfc5780Config, StunError};

/// Kernel socket buffer size asked for on UDP sockets (the kernel may cap it at
/// `net.core.rmem_max`/`wmem_max`); large buffers absorb bursts.
const UDP_BUFFER_BYTES: usize = 4 << 20;
/// TCP listen backlog.
const TCP_BACKLOG: i32 = 1024;
/// Attempts at finding a port free on both RFC 5780 IPs when the configured port is 0.
const GRID_PORT_ATTEMPTS: usize = 16;

fn udp_error(addr: SocketAddr) -> impl FnOnce(io::Error) -> StunError {
    move |source| StunError::Bind {
        addr,
        transport: "UDP",
        source,
    }
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // So that [::]:3478 and 0.0.0.0:3478 can both be bound.
        s.set_only_v6(true)?;
    }
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    #[cfg(not(all(unix, not(any(target_os = "solaris", target_os = "illumos")))))]
    let _ = reuse_port;
    // Best effort: the kernel caps these silently or refuses without harm.
    let _ = s.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(UDP_BUFFER_BYTES);
    #[cfg(target_os = "linux")]
    if addr.is_ipv4() {
        set_dont_fragment(&s);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Send IPv4 replies with DF set, ignoring the cached path MTU (`IP_PMTUDISC_PROBE`). Replies
/// are at most 1 KiB, so they never need fragmenting, and with DF the kernel skips the
/// per-packet IP ID hash it otherwise computes for unconnected UDP sockets (a few per cent of
/// the server's CPU at high rates). Best effort.
#[cfg(target_os = "linux")]
fn set_dont_fragment(s: &Socket) {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = libc::IP_PMTUDISC_PROBE;
    // SAFETY: a valid socket fd and a c_int option value of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `workers` UDP sockets on `addr` (with `SO_REUSEPORT` when more than one; port 0 resolves to
/// one port shared by all).
pub(crate) fn bind_udp_group(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<UdpSocket>, StunError> {
    let reuse = workers > 1;
    let first = udp_socket(addr, reuse).map_err(udp_error(addr))?;
    let bound = first.local_addr().map_err(udp_error(addr))?;
    let mut group = vec![first];
    for _ in 1..workers {
        group.push(udp_socket(bound, true).map_err(udp_error(bound))?);
    }
    Ok(group)
}

/// A TCP listener on `addr` (`SO_REUSEADDR` so a restart does not wait for TIME_WAIT).
pub(crate) fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, StunError> {
    let err = |source| StunError::Bind {
        addr,
        transport: "TCP",
        source,
    };
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    #[cfg(unix)]
    s.set_reuse_address(true).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(TCP_BACKLOG).map_err(err)?;
    Ok(s.into())
}

/// Check an RFC 5780 configuration and bind its four sockets, in [`GridPos::ALL`] order.
pub(crate) fn bind_grid(cfg: &Rfc5780Config) -> Result<(Grid, [UdpSocket; 4]), StunError> {
    let (a1, a2) = (cfg.primary.ip(), cfg.alternate.ip());
    let (primary, alternate) = (cfg.primary, cfg.alternate);
    if a1.is_unspecified() || a2.is_unspecified() {
        return Err(StunError::Rfc5780Wildcard { primary, alternate });
    }
    if a1.is_ipv4() != a2.is_ipv4() {
        return Err(StunError::Rfc5780Families { primary, alternate });
    }
    if a1 == a2 {
        return Err(StunError::Rfc5780SameIp(a1));
    }
    let (p1, p2) = (cfg.primary.port(), cfg.alternate.port());
    if p1 != 0 && p1 == p2 {
        return Err(StunError::Rfc5780SamePort(p1));
    }
    let (p1_socks, p1) = bind_port_pair(a1, a2, p1)?;
    let (p2_socks, p2) = bind_port_pair(a1, a2, p2)?;
    let [s11, s21] = p1_socks;
    let [s12, s22] = p2_socks;
    let grid = Grid {
        ips: [a1, a2],
        ports: [p1, p2],
    };
    debug_assert_eq!(grid.addr(GridPos::ALL[1]).port(), p2);
    Ok((grid, [s11, s12, s21, s22]))
}

/// Bind `port` on both IPs; port 0 means "any port free on both".
fn bind_port_pair(
    a1: std::net::IpAddr,
    a2: std::net::IpAddr,
    port: u16,
) -> Result<([UdpSocket; 2], u16), StunError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let addr1 = SocketAddr::new(a1, port);
        let s1 = udp_socket(addr1, false).map_err(udp_error(addr1))?;
        let actual = s1.local_addr().map_err(udp_error(addr1))?.port();
        let addr2 = SocketAddr::new(a2, actual);
        match udp_socket(addr2, false) {
            Ok(s2) => return Ok(([s1, s2], actual)),
            Err(e)
                if port == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < GRID_PORT_ATTEMPTS =>
            {
                continue
            }
            Err(e) => return Err(udp_error(addr2)(e)),
        }
    }
}
