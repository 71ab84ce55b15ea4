//! Frame types, the streaming decoder, typed frames and encoders.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{ProtoError, PublicKey, FRAME_HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, MAX_PACKET_SIZE};

/// DERP frame type bytes (see `derp-v2.md`; hex, so 0x0a is followed by 0x10).
#[allow(missing_docs)]
pub mod frame_type {
    pub const SERVER_KEY: u8 = 0x01;
    pub const CLIENT_INFO: u8 = 0x02;
    pub const SERVER_INFO: u8 = 0x03;
    pub const SEND_PACKET: u8 = 0x04;
    pub const RECV_PACKET: u8 = 0x05;
    pub const KEEP_ALIVE: u8 = 0x06;
    pub const NOTE_PREFERRED: u8 = 0x07;
    pub const PEER_GONE: u8 = 0x08;
    pub const PEER_PRESENT: u8 = 0x09;
    pub const FORWARD_PACKET: u8 = 0x0a;
    pub const WATCH_CONNS: u8 = 0x10;
    pub const CLOSE_PEER: u8 = 0x11;
    pub const PING: u8 = 0x12;
    pub const PONG: u8 = 0x13;
    pub const HEALTH: u8 = 0x14;
    pub const RESTARTING: u8 = 0x15;
}
use frame_type as ft;

/// Why a peer is gone (the reason byte of PeerGone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// The peer was connected and left.
    Disconnected,
    /// A packet was addressed to a key that is not connected here.
    NotHere,
    /// A reason this version does not know.
    Other(u8),
}

impl PeerGoneReason {
    fn to_byte(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0,
            PeerGoneReason::NotHere => 1,
            PeerGoneReason::Other(b) => b,
        }
    }
    fn from_byte(b: u8) -> Self {
        match b {
            0 => PeerGoneReason::Disconnected,
            1 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// A raw frame: its type byte and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The type byte.
    pub frame_type: u8,
    /// The payload (without the 5-byte header).
    pub payload: Bytes,
}

/// The largest payload ferry accepts for a frame of this type from a client.
///
/// SendPacket may carry a 64 KiB packet plus its key; ForwardPacket two keys. Everything else is
/// small, but unknown types may be up to [`MAX_FRAME_SIZE`] and are skipped, as derper does, so
/// that newer clients keep working.
pub fn max_payload_len(frame_type: u8) -> usize {
    match frame_type {
        ft::SEND_PACKET | ft::RECV_PACKET => KEY_LEN + MAX_PACKET_SIZE,
        ft::FORWARD_PACKET => 2 * KEY_LEN + MAX_PACKET_SIZE,
        ft::CLIENT_INFO => super::MAX_CLIENT_INFO_LEN,
        _ => MAX_FRAME_SIZE,
    }
}

/// Reads frames out of a growing byte buffer.
///
/// Call [`FrameDecoder::decode`] after each read; it returns whole frames as zero-copy slices of
/// the buffer, and `Ok(None)` when more bytes are needed. The header's length is checked against
/// [`max_payload_len`] before any payload is buffered, so a peer cannot make us allocate more.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    _priv: (),
}

impl FrameDecoder {
    /// A new decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes the next frame needs beyond what `buf` holds (0 if a whole frame is
    /// buffered). Lets a reader size its next read.
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        if buf.len() < FRAME_HEADER_LEN {
            return FRAME_HEADER_LEN - buf.len();
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        (FRAME_HEADER_LEN + len).saturating_sub(buf.len())
    }

    /// Takes one whole frame off the front of `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, ProtoError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let frame_type = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let max = max_payload_len(frame_type);
        if len > max {
            return Err(ProtoError::FrameTooLong {
                frame_type,
                len,
                max,
            });
        }
        if buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Ok(Some(RawFrame {
            frame_type,
            payload,
        }))
    }
}

/// A frame a client sends to the server, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Relay `packet` to `dst`.
    SendPacket { dst: PublicKey, packet: Bytes },
    /// Whether this relay is the client's home.
    NotePreferred(bool),
    /// Mesh: relay a packet on behalf of a client of another relay.
    ForwardPacket {
        src: PublicKey,
        dst: PublicKey,
        packet: Bytes,
    },
    /// Mesh: subscribe to PeerPresent/PeerGone for every client.
    WatchConns,
    /// Mesh: close this key's connections.
    ClosePeer(PublicKey),
    /// Ping with its (first) 8 bytes, to be echoed in a Pong.
    Ping([u8; 8]),
    /// Answer to a server Ping.
    Pong([u8; 8]),
    /// ferry: a UDP relay session for two disco keys ([`crate::udprelay::FRAME_ALLOCATE`]).
    AllocateUdpRelay(crate::udprelay::AllocRequest),
    /// A frame type the server does not act on (skipped, counted).
    Other(u8),
}

fn exact<const N: usize>(
    what: &'static str,
    p: &[u8],
    expected: &'static str,
) -> Result<[u8; N], ProtoError> {
    p.try_into().map_err(|_| ProtoError::BadLength {
        what,
        len: p.len(),
        expected,
    })
}

impl ClientFrame {
    /// Parses a client→server frame. Lengths are checked as derper checks them.
    pub fn parse(f: RawFrame) -> Result<Self, ProtoError> {
        let p = f.payload;
        Ok(match f.frame_type {
            ft::SEND_PACKET => {
                if p.len() < KEY_LEN {
                    return Err(ProtoError::BadLength {
                        what: "SendPacket",
                        len: p.len(),
                        expected: "at least 32",
                    });
                }
                let dst = PublicKey::from_slice(&p).expect("length checked");
                ClientFrame::SendPacket {
                    dst,
                    packet: p.slice(KEY_LEN..),
                }
            }
            ft::FORWARD_PACKET => {
                if p.len() < 2 * KEY_LEN {
                    return Err(ProtoError::BadLength {
                        what: "ForwardPacket",
                        len: p.len(),
                        expected: "at least 64",
                    });
                }
                let src = PublicKey::from_slice(&p).expect("length checked");
                let dst = PublicKey::from_slice(&p[KEY_LEN..]).expect("length checked");
                ClientFrame::ForwardPacket {
                    src,
                    dst,
                    packet: p.slice(2 * KEY_LEN..),
                }
            }
            ft::NOTE_PREFERRED => {
                let [b] = exact::<1>("NotePreferred", &p, "exactly 1")?;
                ClientFrame::NotePreferred(b != 0)
            }
            ft::WATCH_CONNS => {
                if !p.is_empty() {
                    return Err(ProtoError::BadLength {
                        what: "WatchConns",
                        len: p.len(),
                        expected: "0",
                    });
                }
                ClientFrame::WatchConns
            }
            ft::CLOSE_PEER => {
                ClientFrame::ClosePeer(PublicKey(exact("ClosePeer", &p, "exactly 32")?))
            }
            ft::PING => {
                // derper accepts 8..=1000 bytes and echoes the first 8.
                if p.len() < 8 || p.len() > 1000 {
                    return Err(ProtoError::BadLength {
                        what: "Ping",
                        len: p.len(),
                        expected: "8 to 1000",
                    });
                }
                ClientFrame::Ping(p[..8].try_into().expect("length checked"))
            }
            ft::PONG => ClientFrame::Pong(exact("Pong", &p, "exactly 8")?),
            crate::udprelay::FRAME_ALLOCATE => {
                ClientFrame::AllocateUdpRelay(crate::udprelay::AllocRequest::parse(&p)?)
            }
            other => ClientFrame::Other(other),
        })
    }
}

/// A frame the server sends to a client, parsed (for ferry's client and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// A relayed packet and its authenticated source.
    RecvPacket { src: PublicKey, packet: Bytes },
    /// Nothing; keeps NATs and proxies from timing out.
    KeepAlive,
    /// A peer left, or was never here.
    PeerGone {
        key: PublicKey,
        reason: PeerGoneReason,
    },
    /// A peer is connected (to watchers).
    PeerPresent {
        key: PublicKey,
        addr: Option<std::net::SocketAddr>,
        flags: u8,
    },
    /// Ping from the server.
    Ping([u8; 8]),
    /// Answer to the client's Ping.
    Pong([u8; 8]),
    /// Health text; empty means healthy.
    Health(String),
    /// The server is restarting: reconnect after `reconnect_in_ms`, keep trying for `try_for_ms`.
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// ferry: the answer to an AllocateUdpRelay ([`crate::udprelay::FRAME_ENDPOINT`]).
    UdpRelayEndpoint(crate::udprelay::AllocResponse),
    /// Any other type (a client should skip it).
    Other(u8),
}

impl ServerFrame {
    /// Parses a server→client frame.
    pub fn parse(f: RawFrame) -> Result<Self, ProtoError> {
        let p = f.payload;
        Ok(match f.frame_type {
            ft::RECV_PACKET => {
                if p.len() < KEY_LEN {
                    return Err(ProtoError::BadLength {
                        what: "RecvPacket",
                        len: p.len(),
                        expected: "at least 32",
                    });
                }
                ServerFrame::RecvPacket {
                    src: PublicKey::from_slice(&p).expect("checked"),
                    packet: p.slice(KEY_LEN..),
                }
            }
            ft::KEEP_ALIVE => ServerFrame::KeepAlive,
            ft::PEER_GONE => {
                let key = PublicKey::from_slice(&p).ok_or(ProtoError::BadLength {
                    what: "PeerGone",
                    len: p.len(),
                    expected: "32 or 33",
                })?;
                let reason = PeerGoneReason::from_byte(p.get(KEY_LEN).copied().unwrap_or(0));
                ServerFrame::PeerGone { key, reason }
            }
            ft::PEER_PRESENT => {
                let key = PublicKey::from_slice(&p).ok_or(ProtoError::BadLength {
                    what: "PeerPresent",
                    len: p.len(),
                    expected: "at least 32",
                })?;
                let addr = (p.len() >= KEY_LEN + 18).then(|| {
                    let ip: [u8; 16] = p[KEY_LEN..KEY_LEN + 16].try_into().expect("checked");
                    let port = u16::from_be_bytes([p[KEY_LEN + 16], p[KEY_LEN + 17]]);
                    let ip = std::net::Ipv6Addr::from(ip);
                    let ip = ip
                        .to_ipv4_mapped()
                        .map(std::net::IpAddr::V4)
                        .unwrap_or(std::net::IpAddr::V6(ip));
                    std::net::SocketAddr::new(ip, port)
                });
                let flags = p.get(KEY_LEN + 18).copied().unwrap_or(0);
                ServerFrame::PeerPresent { key, addr, flags }
            }
            ft::PING => ServerFrame::Ping(exact("Ping", &p, "exactly 8")?),
            ft::PONG => ServerFrame::Pong(exact("Pong", &p, "exactly 8")?),
            ft::HEALTH => ServerFrame::Health(String::from_utf8_lossy(&p).into_owned()),
            ft::RESTARTING => {
                let b: [u8; 8] = exact("Restarting", &p, "exactly 8")?;
                ServerFrame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes(b[..4].try_into().expect("4")),
                    try_for_ms: u32::from_be_bytes(b[4..].try_into().expect("4")),
                }
            }
            crate::udprelay::FRAME_ENDPOINT => {
                ServerFrame::UdpRelayEndpoint(crate::udprelay::AllocResponse::parse(&p)?)
            }
            other => ServerFrame::Other(other),
        })
    }
}

/// Appends a frame header.
pub fn put_header(out: &mut impl BufMut, frame_type: u8, len: usize) {
    debug_assert!(len <= u32::MAX as usize);
    out.put_u8(frame_type);
    out.put_u32(len as u32);
}

/// Appends a whole frame with the given payload pieces.
pub fn put_frame(out: &mut impl BufMut, frame_type: u8, parts: &[&[u8]]) {
    put_header(out, frame_type, parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.put_slice(p);
    }
}

/// Appends RecvPacket(src, packet).
pub fn put_recv_packet(out: &mut impl BufMut, src: &PublicKey, packet: &[u8]) {
    put_frame(out, ft::RECV_PACKET, &[src.as_bytes(), packet]);
}

/// Appends SendPacket(dst, packet).
pub fn put_send_packet(out: &mut impl BufMut, dst: &PublicKey, packet: &[u8]) {
    put_frame(out, ft::SEND_PACKET, &[dst.as_bytes(), packet]);
}

/// Appends ForwardPacket(src, dst, packet) (mesh: a packet for a client of the peer relay).
pub fn put_forward_packet(out: &mut impl BufMut, src: &PublicKey, dst: &PublicKey, packet: &[u8]) {
    put_frame(
        out,
        ft::FORWARD_PACKET,
        &[src.as_bytes(), dst.as_bytes(), packet],
    );
}

/// Appends PeerGone(key, reason).
pub fn put_peer_gone(out: &mut impl BufMut, key: &PublicKey, reason: PeerGoneReason) {
    put_frame(out, ft::PEER_GONE, &[key.as_bytes(), &[reason.to_byte()]]);
}

/// PeerPresent flag bits (derper's `PeerPresentFlags`).
pub mod present_flags {
    /// An ordinary client.
    pub const REGULAR: u8 = 1 << 0;
    /// A mesh peer (a relay of the region, connected with the mesh key).
    pub const MESH_PEER: u8 = 1 << 1;
    /// A prober (`derpprobe`).
    pub const PROBER: u8 = 1 << 2;
    /// The client says this relay is not its region's ideal node.
    pub const NOT_IDEAL: u8 = 1 << 3;
}

/// Appends PeerPresent(key, addr, flags) in the 32+16+2+1 layout.
pub fn put_peer_present(
    out: &mut impl BufMut,
    key: &PublicKey,
    addr: std::net::SocketAddr,
    flags: u8,
) {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    put_frame(
        out,
        ft::PEER_PRESENT,
        &[
            key.as_bytes(),
            &ip.octets(),
            &addr.port().to_be_bytes(),
            &[flags],
        ],
    );
}

/// Appends Restarting(reconnect_in, try_for) in milliseconds.
pub fn put_restarting(out: &mut impl BufMut, reconnect_in_ms: u32, try_for_ms: u32) {
    put_frame(
        out,
        ft::RESTARTING,
        &[&reconnect_in_ms.to_be_bytes(), &try_for_ms.to_be_bytes()],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    #[test]
    fn decoder_splits_pipelined_frames_and_waits_for_partial_ones() {
        let mut wire = BytesMut::new();
        put_send_packet(&mut wire, &key(1), b"hello");
        put_frame(&mut wire, ft::PING, &[b"12345678"]);
        put_frame(&mut wire, ft::NOTE_PREFERRED, &[&[1]]);
        let mut dec = FrameDecoder::new();
        // Feed one byte at a time: never a frame early, every frame exactly once.
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(ClientFrame::parse(f).unwrap());
            }
        }
        assert_eq!(
            got,
            vec![
                ClientFrame::SendPacket {
                    dst: key(1),
                    packet: Bytes::from_static(b"hello")
                },
                ClientFrame::Ping(*b"12345678"),
                ClientFrame::NotePreferred(true),
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header_alone() {
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        put_header(&mut buf, ft::SEND_PACKET, KEY_LEN + MAX_PACKET_SIZE + 1);
        let err = dec.decode(&mut buf).unwrap_err();
        assert_eq!(err.reason(), "frame_too_long");
        // An unknown type up to 1 MiB is fine (skipped by the server); beyond is not.
        let mut buf = BytesMut::new();
        put_header(&mut buf, 0x7f, MAX_FRAME_SIZE + 1);
        assert!(dec.decode(&mut buf).is_err());
        assert_eq!(dec.bytes_needed(&[0x7f, 0, 0, 0, 10]), 10);
    }

    #[test]
    fn client_frame_lengths_are_checked() {
        let bad = |t: u8, p: &'static [u8]| {
            ClientFrame::parse(RawFrame {
                frame_type: t,
                payload: Bytes::from_static(p),
            })
        };
        assert!(bad(ft::SEND_PACKET, &[0; 31]).is_err());
        assert!(bad(ft::NOTE_PREFERRED, &[]).is_err());
        assert!(bad(ft::NOTE_PREFERRED, &[1, 1]).is_err());
        assert!(bad(ft::PING, &[0; 7]).is_err());
        assert!(bad(ft::PING, &[0; 1001]).is_err());
        assert_eq!(
            bad(ft::PING, &[7; 1000]).unwrap(),
            ClientFrame::Ping([7; 8])
        );
        assert!(bad(ft::WATCH_CONNS, &[0]).is_err());
        assert!(bad(ft::CLOSE_PEER, &[0; 33]).is_err());
        assert!(bad(ft::FORWARD_PACKET, &[0; 63]).is_err());
        assert_eq!(bad(0x42, b"whatever").unwrap(), ClientFrame::Other(0x42));
    }

    #[test]
    fn server_frames_round_trip() {
        let mut out = BytesMut::new();
        put_recv_packet(&mut out, &key(2), b"pkt");
        put_peer_gone(&mut out, &key(3), PeerGoneReason::NotHere);
        put_peer_present(&mut out, &key(4), "10.1.2.3:4567".parse().unwrap(), 1);
        put_restarting(&mut out, 1500, 30000);
        put_frame(&mut out, ft::KEEP_ALIVE, &[]);
        let mut dec = FrameDecoder::new();
        let mut frames = vec![];
        while let Some(f) = dec.decode(&mut out).unwrap() {
            frames.push(ServerFrame::parse(f).unwrap());
        }
        assert_eq!(
            frames,
            vec![
                ServerFrame::RecvPacket {
                    src: key(2),
                    packet: Bytes::from_static(b"pkt")
                },
                ServerFrame::PeerGone {
                    key: key(3),
                    reason: PeerGoneReason::NotHere
                },
                ServerFrame::PeerPresent {
                    key: key(4),
                    addr: Some("10.1.2.3:4567".parse().unwrap()),
                    flags: 1
                },
                ServerFrame::Restarting {
                    reconnect_in_ms: 1500,
                    try_for_ms: 30000
                },
                ServerFrame::KeepAlive,
            ]
        );
    }

    #[test]
    fn disco_detection_needs_magic_and_length() {
        let mut p = super::super::DISCO_MAGIC.to_vec();
        assert!(!super::super::looks_like_disco(&p));
        p.resize(6 + 32 + 24, 0);
        assert!(super::super::looks_like_disco(&p));
        p[0] = b'X';
        assert!(!super::super::looks_like_disco(&p));
    }
}
