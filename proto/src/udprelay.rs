//! The UDP relay path's wire format (issue 15), sans-IO: the Geneve header that frames every
//! datagram to and from a UDP relay, and the bind handshake's three disco messages
//! (Bind / Challenge / Answer) that prove a client owns its source address. Byte-compatible
//! with Tailscale's peer relays (`net/packet/geneve.go`, `disco/disco.go` types 0x04–0x06 of
//! tailscale.com v1.102.5; docs/notes-udp-relay.md §1–2 has the layouts with `file:line`).
//!
//! ```text
//! Geneve (8):  0x00 | O(0x80) | protocol u16 (0x7A11 disco, 0x7A12 WireGuard) | VNI u24 | 0x00
//! control:     Geneve(O=1, 0x7A11, vni) | "TS💬" | sender key (32) | box(type | 0 | body)
//! body (72):   VNI u32 | generation u32 (nonzero) | remote key (32) | challenge (32)
//!              (zero in Bind, the relay's MAC in Challenge, echoed in Answer)
//! ```
//!
//! The box is NaCl `crypto_box` between the client's key and the relay's *server disco key*
//! (an X25519 key of the relay process, not its DERP key), as [`crate::derp::seal`] does for
//! ClientInfo. A ferry client uses its node key as its disco key (as in ferry's disco).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::derp::{self, ProtoError, PublicKey, SecretKey, DISCO_MAGIC, KEY_LEN, NONCE_LEN};

/// Geneve's fixed header, the only part used (no options).
pub const GENEVE_LEN: usize = 8;
/// Geneve protocol of disco messages (control, and client-to-client pings over the relay).
pub const PROTO_DISCO: u16 = 0x7A11;
/// Geneve protocol of WireGuard packets (Tailscale's data).
pub const PROTO_WIREGUARD: u16 = 0x7A12;
/// Largest VNI (24 bits; 0 is never allocated).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Disco message types of the bind handshake.
pub const T_BIND: u8 = 0x04;
/// The relay's challenge.
pub const T_CHALLENGE: u8 = 0x05;
/// The client's answer.
pub const T_ANSWER: u8 = 0x06;
/// The handshake messages' body length.
pub const BIND_BODY_LEN: usize = 72;
/// A handshake datagram: Geneve + magic + key + nonce + tag + type + version + body (160).
pub const BIND_DATAGRAM_LEN: usize =
    GENEVE_LEN + DISCO_MAGIC.len() + KEY_LEN + NONCE_LEN + 16 + 2 + BIND_BODY_LEN;

/// A Geneve header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geneve {
    /// The O bit: a message for the relay itself (the bind handshake), not for the peer.
    pub control: bool,
    /// [`PROTO_DISCO`], [`PROTO_WIREGUARD`], or another (the relay forwards any).
    pub protocol: u16,
    /// The session (Virtual Network Identifier), 1..=[`MAX_VNI`].
    pub vni: u32,
}

impl Geneve {
    /// The 8 header bytes: version 0, no options, reserved bits and the last byte 0 (a stock
    /// Tailscale client classifies a datagram as Geneve only with those zero).
    pub fn encode(&self) -> [u8; GENEVE_LEN] {
        let mut b = [0u8; GENEVE_LEN];
        if self.control {
            b[1] = 0x80;
        }
        b[2..4].copy_from_slice(&self.protocol.to_be_bytes());
        b[4..8].copy_from_slice(&((self.vni & MAX_VNI) << 8).to_be_bytes());
        b
    }

    /// Reads the header of `datagram` (the relay accepts any version, options length and
    /// reserved bits, as Tailscale's does); `None` if shorter than 8 bytes. The payload
    /// follows at [`GENEVE_LEN`].
    pub fn parse(datagram: &[u8]) -> Option<Geneve> {
        let b: &[u8; GENEVE_LEN] = datagram.get(..GENEVE_LEN)?.try_into().ok()?;
        Some(Geneve {
            control: b[1] & 0x80 != 0,
            protocol: u16::from_be_bytes([b[2], b[3]]),
            vni: u32::from_be_bytes([b[4], b[5], b[6], b[7]]) >> 8,
        })
    }
}

/// Which handshake message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// Client → relay: bind me (challenge zero).
    Bind,
    /// Relay → client: prove your source address (challenge = the relay's MAC).
    Challenge,
    /// Client → relay: the challenge, echoed from the address it was sent to.
    Answer,
}

impl BindKind {
    fn code(self) -> u8 {
        match self {
            BindKind::Bind => T_BIND,
            BindKind::Challenge => T_CHALLENGE,
            BindKind::Answer => T_ANSWER,
        }
    }
}

/// A bind handshake message (the 72-byte body shared by all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindMsg {
    /// Which of the three.
    pub kind: BindKind,
    /// The session; must equal the Geneve header's.
    pub vni: u32,
    /// Chosen by the client per handshake, nonzero, echoed.
    pub generation: u32,
    /// The disco key of the *other* client of the session.
    pub remote_key: PublicKey,
    /// Zero in Bind; the relay's MAC in Challenge and Answer.
    pub challenge: [u8; 32],
}

/// Why a control datagram was not a handshake message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Not Geneve-with-O-bit + disco, or too short for the envelope.
    #[error("not a UDP relay control datagram")]
    NotControl,
    /// The box did not open with the given keys.
    #[error("the control message does not open (wrong key or corrupted)")]
    BoxOpen,
    /// Opened, but not a Bind, Challenge or Answer of 72 bytes.
    #[error("not a bind handshake message (type {0:#04x})")]
    WrongType(u8),
    /// The body's VNI is not the header's.
    #[error("the message's VNI {body} is not the header's {header}")]
    VniMismatch {
        /// In the header.
        header: u32,
        /// In the body.
        body: u32,
    },
}

impl BindMsg {
    /// The plaintext: type, version 0, the 72-byte body.
    fn plaintext(&self) -> [u8; 2 + BIND_BODY_LEN] {
        let mut p = [0u8; 2 + BIND_BODY_LEN];
        p[0] = self.kind.code();
        p[2..6].copy_from_slice(&self.vni.to_be_bytes());
        p[6..10].copy_from_slice(&self.generation.to_be_bytes());
        p[10..42].copy_from_slice(self.remote_key.as_bytes());
        p[42..74].copy_from_slice(&self.challenge);
        p
    }

    /// The whole datagram from `ours` (its public key in the envelope) to `theirs`.
    pub fn seal(&self, ours: &SecretKey, theirs: &PublicKey) -> Vec<u8> {
        self.seal_with(&ours.public(), &derp::SharedBox::new(ours, theirs))
    }

    /// [`BindMsg::seal`] with the box precomputed (`ours_public` goes in the envelope).
    pub fn seal_with(&self, ours_public: &PublicKey, b: &derp::SharedBox) -> Vec<u8> {
        let mut out = Vec::with_capacity(BIND_DATAGRAM_LEN);
        out.extend_from_slice(
            &Geneve {
                control: true,
                protocol: PROTO_DISCO,
                vni: self.vni,
            }
            .encode(),
        );
        out.extend_from_slice(&DISCO_MAGIC);
        out.extend_from_slice(ours_public.as_bytes());
        out.extend_from_slice(&derp::seal_with(b, &self.plaintext()));
        out
    }

    /// The sender key of a control datagram (cleartext in the envelope), to look up before
    /// any crypto; `None` if it is not one.
    pub fn sender(datagram: &[u8]) -> Option<PublicKey> {
        let g = Geneve::parse(datagram)?;
        let env = &datagram[GENEVE_LEN..];
        if !g.control || g.protocol != PROTO_DISCO || !derp::looks_like_disco(env) {
            return None;
        }
        PublicKey::from_slice(&env[DISCO_MAGIC.len()..DISCO_MAGIC.len() + KEY_LEN])
    }

    /// Opens a control datagram from `theirs` to `ours` (the caller checked [`BindMsg::sender`]
    /// is `theirs`). Like Tailscale's parser: the version byte is ignored, trailing bytes too.
    pub fn open(
        ours: &SecretKey,
        theirs: &PublicKey,
        datagram: &[u8],
    ) -> Result<BindMsg, BindError> {
        if BindMsg::sender(datagram) != Some(*theirs) {
            return Err(BindError::NotControl);
        }
        BindMsg::open_with(&derp::SharedBox::new(ours, theirs), theirs, datagram)
    }

    /// [`BindMsg::open`] with the box precomputed (no X25519 per datagram: a relay opens
    /// whatever anyone sends it for a session, so this is the cheap path).
    pub fn open_with(
        b: &derp::SharedBox,
        theirs: &PublicKey,
        datagram: &[u8],
    ) -> Result<BindMsg, BindError> {
        let g = Geneve::parse(datagram).ok_or(BindError::NotControl)?;
        if BindMsg::sender(datagram) != Some(*theirs) {
            return Err(BindError::NotControl);
        }
        let sealed = &datagram[GENEVE_LEN + DISCO_MAGIC.len() + KEY_LEN..];
        let pt = derp::open_with(b, sealed).map_err(|_| BindError::BoxOpen)?;
        let kind = match pt.first() {
            Some(&T_BIND) => BindKind::Bind,
            Some(&T_CHALLENGE) => BindKind::Challenge,
            Some(&T_ANSWER) => BindKind::Answer,
            Some(&t) => return Err(BindError::WrongType(t)),
            None => return Err(BindError::WrongType(0)),
        };
        let body = pt
            .get(2..2 + BIND_BODY_LEN)
            .ok_or(BindError::WrongType(kind.code()))?;
        let vni = u32::from_be_bytes(body[0..4].try_into().expect("len"));
        if vni != g.vni {
            return Err(BindError::VniMismatch {
                header: g.vni,
                body: vni,
            });
        }
        Ok(BindMsg {
            kind,
            vni,
            generation: u32::from_be_bytes(body[4..8].try_into().expect("len")),
            remote_key: PublicKey::from_slice(&body[8..40]).expect("len"),
            challenge: body[40..72].try_into().expect("len"),
        })
    }
}

/// ferry's DERP frame (client → relay) asking for a UDP relay session on the client's own
/// authenticated connection. Not a Tailscale frame: derper skips it as unknown; a ferry relay
/// answers with [`FRAME_ENDPOINT`] (only ever to a client that asked).
pub const FRAME_ALLOCATE: u8 = 0xF0;
/// The relay's answer to [`FRAME_ALLOCATE`].
pub const FRAME_ENDPOINT: u8 = 0xF1;

/// The payload of [`FRAME_ALLOCATE`]: a request id (echoed) and the two clients' disco keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRequest {
    /// Echoed in the answer.
    pub id: u32,
    /// The two sides (any order).
    pub keys: [PublicKey; 2],
}

impl AllocRequest {
    /// The 68-byte payload.
    pub fn encode(&self) -> [u8; 4 + 2 * KEY_LEN] {
        let mut b = [0u8; 4 + 2 * KEY_LEN];
        b[..4].copy_from_slice(&self.id.to_be_bytes());
        b[4..36].copy_from_slice(self.keys[0].as_bytes());
        b[36..68].copy_from_slice(self.keys[1].as_bytes());
        b
    }

    /// Parses the payload (exactly 68 bytes).
    pub fn parse(p: &[u8]) -> Result<AllocRequest, ProtoError> {
        if p.len() != 4 + 2 * KEY_LEN {
            return Err(ProtoError::BadLength {
                what: "AllocateUdpRelay",
                len: p.len(),
                expected: "exactly 68",
            });
        }
        Ok(AllocRequest {
            id: u32::from_be_bytes(p[..4].try_into().expect("len")),
            keys: [
                PublicKey::from_slice(&p[4..36]).expect("len"),
                PublicKey::from_slice(&p[36..68]).expect("len"),
            ],
        })
    }
}

/// A granted session, as the relay describes it (Tailscale's `UDPRelayEndpoint` fields, plus
/// the port for a client that knows the relay's address only from the DERP map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The relay's server key (Bind and Answer are sealed to it).
    pub server_key: PublicKey,
    /// The two client keys, sorted.
    pub keys: [PublicKey; 2],
    /// Increases with every allocation of the relay process.
    pub lamport: u64,
    /// The session.
    pub vni: u32,
    /// Time to bind both sides.
    pub bind_lifetime: Duration,
    /// A bound session ends after this long without data from a side.
    pub idle_lifetime: Duration,
    /// The UDP relay port.
    pub port: u16,
    /// The relay's addresses for it, if it knows them (else: the DERP node's address + port).
    pub addrs: Vec<SocketAddr>,
}

/// The payload of [`FRAME_ENDPOINT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocResponse {
    /// The request's id.
    pub id: u32,
    /// The session, or why not (a sentence for the log).
    pub result: Result<Endpoint, String>,
}

const ENDPOINT_FIXED: usize = 4 + 1 + 3 * KEY_LEN + 8 + 4 + 8 + 8 + 2;

impl AllocResponse {
    /// The payload: id u32 | status u8 (0 granted) | granted: server key | key 0 | key 1 |
    /// lamport u64 | VNI u32 | bind lifetime ns u64 | idle lifetime ns u64 | port u16 |
    /// N × (IPv6 or v4-mapped address (16) | port u16); refused: a UTF-8 reason.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ENDPOINT_FIXED + 18 * 4);
        b.extend_from_slice(&self.id.to_be_bytes());
        match &self.result {
            Ok(e) => {
                b.push(0);
                b.extend_from_slice(e.server_key.as_bytes());
                b.extend_from_slice(e.keys[0].as_bytes());
                b.extend_from_slice(e.keys[1].as_bytes());
                b.extend_from_slice(&e.lamport.to_be_bytes());
                b.extend_from_slice(&e.vni.to_be_bytes());
                b.extend_from_slice(&(e.bind_lifetime.as_nanos() as u64).to_be_bytes());
                b.extend_from_slice(&(e.idle_lifetime.as_nanos() as u64).to_be_bytes());
                b.extend_from_slice(&e.port.to_be_bytes());
                for a in &e.addrs {
                    let ip = match a.ip() {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                        IpAddr::V6(v6) => v6,
                    };
                    b.extend_from_slice(&ip.octets());
                    b.extend_from_slice(&a.port().to_be_bytes());
                }
            }
            Err(why) => {
                b.push(1);
                b.extend_from_slice(why.as_bytes());
            }
        }
        b
    }

    /// Parses the payload. Bytes after the last whole address are ignored (room for later
    /// fields: a client must not drop its DERP connection over them).
    pub fn parse(p: &[u8]) -> Result<AllocResponse, ProtoError> {
        let bad = |expected| ProtoError::BadLength {
            what: "UdpRelayEndpoint",
            len: p.len(),
            expected,
        };
        if p.len() < 5 {
            return Err(bad("at least 5"));
        }
        let id = u32::from_be_bytes(p[..4].try_into().expect("len"));
        if p[4] != 0 {
            return Ok(AllocResponse {
                id,
                result: Err(String::from_utf8_lossy(&p[5..]).into_owned()),
            });
        }
        if p.len() < ENDPOINT_FIXED {
            return Err(bad("at least 119"));
        }
        let key = |o: usize| PublicKey::from_slice(&p[o..o + KEY_LEN]).expect("len");
        let u64_at = |o: usize| u64::from_be_bytes(p[o..o + 8].try_into().expect("len"));
        let o = 5 + 3 * KEY_LEN;
        let addrs = p[ENDPOINT_FIXED..]
            .chunks_exact(18)
            .map(|c| {
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&c[..16]).expect("len"));
                let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
                SocketAddr::new(ip, u16::from_be_bytes([c[16], c[17]]))
            })
            .collect();
        Ok(AllocResponse {
            id,
            result: Ok(Endpoint {
                server_key: key(5),
                keys: [key(5 + KEY_LEN), key(5 + 2 * KEY_LEN)],
                lamport: u64_at(o),
                vni: u32::from_be_bytes(p[o + 8..o + 12].try_into().expect("len")),
                bind_lifetime: Duration::from_nanos(u64_at(o + 12)),
                idle_lifetime: Duration::from_nanos(u64_at(o + 20)),
                port: u16::from_be_bytes([p[o + 28], p[o + 29]]),
                addrs,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geneve_headers_are_tailscales_bytes() {
        // docs/notes-udp-relay.md §1: VNI 1, bind/challenge/answer, relayed disco, WireGuard.
        let h = |control, protocol| Geneve {
            control,
            protocol,
            vni: 1,
        };
        assert_eq!(
            h(true, PROTO_DISCO).encode(),
            [0x00, 0x80, 0x7A, 0x11, 0x00, 0x00, 0x01, 0x00]
        );
        assert_eq!(
            h(false, PROTO_DISCO).encode(),
            [0x00, 0x00, 0x7A, 0x11, 0x00, 0x00, 0x01, 0x00]
        );
        assert_eq!(
            h(false, PROTO_WIREGUARD).encode(),
            [0x00, 0x00, 0x7A, 0x12, 0x00, 0x00, 0x01, 0x00]
        );
        let g = Geneve {
            control: true,
            protocol: 0xBEEF,
            vni: MAX_VNI,
        };
        assert_eq!(Geneve::parse(&g.encode()), Some(g));
        assert_eq!(Geneve::parse(&[0u8; 7]), None);
        // A header never looks like a STUN binding request (second byte 0x01).
        assert_ne!(g.encode()[1], 0x01);
    }

    #[test]
    fn a_bind_message_seals_to_160_bytes_and_opens_only_for_its_keys() {
        let (client, server, other) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let m = BindMsg {
            kind: BindKind::Answer,
            vni: 77,
            generation: 9,
            remote_key: other.public(),
            challenge: [5; 32],
        };
        let d = m.seal(&client, &server.public());
        assert_eq!(d.len(), BIND_DATAGRAM_LEN);
        assert_eq!(d.len(), 160, "Tailscale's size");
        assert_eq!(&d[..8], &[0x00, 0x80, 0x7A, 0x11, 0x00, 0x00, 77, 0x00]);
        assert_eq!(BindMsg::sender(&d), Some(client.public()));
        assert_eq!(BindMsg::open(&server, &client.public(), &d), Ok(m));
        assert_eq!(
            BindMsg::open(&other, &client.public(), &d),
            Err(BindError::BoxOpen)
        );
        assert_eq!(
            BindMsg::open(&server, &other.public(), &d),
            Err(BindError::NotControl),
            "the claimed sender must be the caller's"
        );
        // The header's VNI must be the body's.
        let mut bad = d.clone();
        bad[6] = 78;
        assert_eq!(
            BindMsg::open(&server, &client.public(), &bad),
            Err(BindError::VniMismatch {
                header: 78,
                body: 77
            })
        );
        // Not control: no O bit.
        let mut data = d;
        data[1] = 0;
        assert_eq!(BindMsg::sender(&data), None);
    }

    #[test]
    fn allocation_frames_round_trip_and_reject_bad_lengths() {
        let k = || SecretKey::generate().public();
        let req = AllocRequest {
            id: 7,
            keys: [k(), k()],
        };
        assert_eq!(AllocRequest::parse(&req.encode()).unwrap(), req);
        assert!(AllocRequest::parse(&req.encode()[..67]).is_err());
        let ok = AllocResponse {
            id: 7,
            result: Ok(Endpoint {
                server_key: k(),
                keys: [k(), k()],
                lamport: 3,
                vni: 42,
                bind_lifetime: Duration::from_secs(30),
                idle_lifetime: Duration::from_secs(300),
                port: 3480,
                addrs: vec![
                    "203.0.113.1:3480".parse().unwrap(),
                    "[2001:db8::1]:3480".parse().unwrap(),
                ],
            }),
        };
        let b = ok.encode();
        assert_eq!(b.len(), ENDPOINT_FIXED + 2 * 18);
        assert_eq!(AllocResponse::parse(&b).unwrap(), ok);
        // A partial trailing address is ignored; a short fixed part is an error.
        let cut = AllocResponse::parse(&b[..b.len() - 1]).unwrap();
        assert_eq!(cut.result.unwrap().addrs.len(), 1);
        assert!(AllocResponse::parse(&b[..ENDPOINT_FIXED - 1]).is_err());
        let no = AllocResponse {
            id: 9,
            result: Err("too many sessions".into()),
        };
        assert_eq!(AllocResponse::parse(&no.encode()).unwrap(), no);
        assert!(AllocResponse::parse(&[0, 0, 0]).is_err());
    }
}
