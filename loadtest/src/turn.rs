//! `turn` mode (issue 15): a TURN relay's (RFC 8656 / 5766, e.g. coturn's) forwarding capacity,
//! measured the way [`udp-relay`](crate::udprelay) measures ferry's UDP relay, so the two can
//! be compared at the same load and each at its own full load.
//!
//! Setup: `--clients` UDP sockets each ask the server for a relayed address (Allocate, no
//! credentials: the server must run without auth, e.g. `turnserver --no-auth`) and bind a
//! channel (ChannelBind, channel 0x4000) to a peer: a second UDP socket of this process,
//! connected to that relayed address. A probe each way proves the channel forwards. Then the
//! same thread and loop as `udp-relay` drive every (client, peer) pair with
//! `sendmmsg`/`recvmmsg`: the client sends ChannelData (4-byte header + `--size` bytes) to the
//! server, which relays the payload to the peer; the peer sends `--size`-byte datagrams to the
//! relayed address, which the server relays to the client as ChannelData. Each datagram that
//! arrives is one forward by the server, as in `udp-relay`. At the end each allocation is
//! released (Refresh, lifetime 0).
//!
//! Why not coturn's own `turnutils_uclient`: it paces itself (one message per client per
//! millisecond), so it measures coturn at its load, not at coturn's capacity.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{ErrorCode, Software, XorMappedAddress};
use stun_codec::rfc5766::attributes::{
    ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
};
use stun_codec::rfc5766::methods::{ALLOCATE, CHANNEL_BIND, REFRESH};
use stun_codec::rfc8656::attributes::{AddressFamily, RequestedAddressFamily};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, Method, TransactionId};

use crate::cli::TurnArgs;
use crate::procfs;
use crate::udprelay::{blast, probe, set_buffers, Side, UdpRelayReport};

stun_codec::define_attribute_enums!(
    Attr,
    AttrDecoder,
    AttrEncoder,
    [
        XorMappedAddress,
        Software,
        ErrorCode,
        XorRelayAddress,
        XorPeerAddress,
        Lifetime,
        RequestedTransport,
        RequestedAddressFamily,
        ChannelNumber
    ]
);

/// The channel every client binds (each client has an allocation of its own).
const CHANNEL: u16 = 0x4000;
/// ChannelData's header: channel number and length.
const CHANNEL_HEADER: usize = 4;
/// How long a request waits for its answer in all (resent every 200 ms).
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// UDP, in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;
/// A permission (what ChannelBind installs) lasts 300 s and data does not refresh it (RFC 8656
/// §9); this mode sends no refreshes, so a run must end well before.
const MAX_RUN: Duration = Duration::from_secs(240);

/// Runs the mode. See the module docs.
pub async fn run(a: &TurnArgs) -> Result<UdpRelayReport> {
    if a.clients == 0 || a.size < 8 || a.size > 65_000 {
        bail!("--clients must be at least 1 and --size between 8 and 65000 bytes");
    }
    if a.run.warmup + a.run.duration > MAX_RUN {
        bail!(
            "--warmup + --duration must be at most {} s: the server's permissions expire after \
             300 s and this mode does not refresh them (forwarding would stop mid-run)",
            MAX_RUN.as_secs()
        );
    }
    if let Some(pid) = a.run.server_pid {
        procfs::check_pid(pid)?;
    }
    let a = a.clone();
    tokio::task::spawn_blocking(move || run_blocking(&a))
        .await
        .context("the sending thread")?
}

fn run_blocking(a: &TurnArgs) -> Result<UdpRelayReport> {
    let mut sides = Vec::with_capacity(a.clients);
    let mut allocations = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let (client, peer) =
            allocate_and_bind(a.server, a.size).with_context(|| format!("client {i}"))?;
        probe(&client, &peer).with_context(|| format!("client {i}: client -> peer"))?;
        probe(&peer, &client).with_context(|| format!("client {i}: peer -> client"))?;
        allocations.push(client.sock.try_clone()?);
        sides.push((client, peer));
    }
    let r = blast(sides, &a.flow, &a.run)?;
    // Release the allocations (best effort: the server would expire them anyway).
    for s in &allocations {
        let _ = s.send(&request(REFRESH, |m| {
            m.add_attribute(Lifetime::new(Duration::ZERO).expect("zero is in range"));
        }));
    }
    Ok(UdpRelayReport::new(
        "turn", a.clients, a.size, &a.flow, &a.run, &r,
    ))
}

/// One client: an allocation on `server`, a channel to a peer socket, the peer connected to
/// the relayed address. Both sockets non-blocking on return.
fn allocate_and_bind(server: SocketAddr, size: usize) -> Result<(Side, Side)> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let client = UdpSocket::bind(any)?;
    client.connect(server)?;
    let _ = set_buffers(&client);
    // The peer listens on the address this host uses towards the server (connect chose it:
    // 127.0.0.1 for a server on loopback), so the server can reach it.
    let local = SocketAddr::new(client.local_addr()?.ip(), 0);
    let answer = transact(&client, ALLOCATE, |m| {
        m.add_attribute(RequestedTransport::new(PROTO_UDP));
        if server.is_ipv6() {
            // The relayed address must be of the peer's family (RFC 8656 §7.1; IPv4 otherwise).
            m.add_attribute(RequestedAddressFamily::new(AddressFamily::V6));
        }
    })
    .context("Allocate")?;
    let relayed = answer
        .get_attribute::<XorRelayAddress>()
        .map(|a| a.address())
        .context("the Allocate answer has no XOR-RELAYED-ADDRESS")?;
    let peer = UdpSocket::bind(local)?;
    let _ = set_buffers(&peer);
    let peer_addr = peer.local_addr()?;
    transact(&client, CHANNEL_BIND, |m| {
        m.add_attribute(ChannelNumber::new(CHANNEL).expect("in range"));
        m.add_attribute(XorPeerAddress::new(peer_addr));
    })
    .with_context(|| {
        format!(
            "ChannelBind to the peer {peer_addr} (a peer on loopback needs coturn's \
             --allow-loopback-peers; the relayed address {relayed} must be of its family)"
        )
    })?;
    peer.connect(relayed)?;
    client.set_nonblocking(true)?;
    peer.set_nonblocking(true)?;
    let mut tx = vec![0u8; CHANNEL_HEADER + size];
    tx[..2].copy_from_slice(&CHANNEL.to_be_bytes());
    tx[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    Ok((
        Side {
            sock: client,
            // What comes back is ChannelData on the same channel with the same length.
            rx_prefix: tx[..CHANNEL_HEADER].to_vec(),
            tx,
            seq_at: CHANNEL_HEADER,
            // Over UDP a server may pad ChannelData to a multiple of 4 (RFC 8656 §12.5).
            rx_size: (CHANNEL_HEADER + size).next_multiple_of(4),
            rx_min: CHANNEL_HEADER + size,
        },
        Side {
            sock: peer,
            tx: vec![0u8; size],
            seq_at: 0,
            rx_size: size,
            rx_min: size,
            // The payload alone; only the relayed address sends to this socket.
            rx_prefix: Vec::new(),
        },
    ))
}

/// A request of `method` with a random transaction id; `add` puts its attributes in.
fn request(method: Method, add: impl FnOnce(&mut Message<Attr>)) -> Vec<u8> {
    let mut m = Message::new(
        MessageClass::Request,
        method,
        TransactionId::new(rand::random()),
    );
    add(&mut m);
    MessageEncoder::new()
        .encode_into_bytes(m)
        .expect("a request of known attributes encodes")
}

/// Sends a request on the connected `sock` until its answer comes (every 200 ms, at most
/// [`SETUP_TIMEOUT`]); an error answer is an error that says what the server said.
fn transact(
    sock: &UdpSocket,
    method: Method,
    add: impl FnOnce(&mut Message<Attr>),
) -> Result<Message<Attr>> {
    let req = request(method, add);
    let id = &req[8..20];
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        sock.send(&req)?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                bail!("nothing listens there (ICMP port unreachable): is the TURN server running?")
            }
            Err(e) => return Err(e.into()),
        };
        if n < 20 || &buf[8..20] != id {
            continue;
        }
        let m = match MessageDecoder::<Attr>::new().decode_from_bytes(&buf[..n]) {
            Ok(Ok(m)) => m,
            Ok(Err(broken)) => bail!("the answer does not parse: {broken:?}"),
            Err(e) => bail!("the answer does not parse: {e}"),
        };
        return match m.class() {
            MessageClass::SuccessResponse => Ok(m),
            _ => {
                let why = m
                    .get_attribute::<ErrorCode>()
                    .map(|e| format!("{} {}", e.code(), e.reason_phrase()))
                    .unwrap_or_else(|| "no ERROR-CODE".into());
                if why.starts_with("401") {
                    bail!(
                        "the server wants credentials ({why}): this mode does not do TURN's \
                         long-term credentials; run the server without auth (turnserver --no-auth)"
                    )
                }
                bail!("the server refused: {why}")
            }
        };
    }
    bail!("no answer within {SETUP_TIMEOUT:?} (is it a TURN server, and is UDP to it blocked?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allocate_request_asks_for_udp_and_decodes_with_stun_codec() {
        let b = request(ALLOCATE, |m| {
            m.add_attribute(RequestedTransport::new(PROTO_UDP))
        });
        let m = MessageDecoder::<Attr>::new()
            .decode_from_bytes(&b)
            .unwrap()
            .unwrap();
        assert_eq!((m.class(), m.method()), (MessageClass::Request, ALLOCATE));
        assert_eq!(
            m.get_attribute::<RequestedTransport>().unwrap().protocol(),
            17
        );
    }
}
