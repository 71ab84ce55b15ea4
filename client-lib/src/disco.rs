//! Disco: the path-discovery messages between two nodes (sans-IO). Ping, Pong (with the
//! address the ping was seen from) and CallMeMaybe (the sender's candidate endpoints), sealed
//! end to end with a NaCl box between the two nodes' keys, so neither the relay nor anyone on
//! the path can forge or read them.
//!
//! Wire format (Tailscale's `disco` package, `tailscale.com/disco`):
//!
//! ```text
//! "TS💬" (6 bytes) | sender key (32) | nonce (24) | box(type u8 | version u8 | payload)
//! Ping:        type 0x01, txid (12) | sender node key (32)
//! Pong:        type 0x02, txid (12) | observed source: IPv6 or v4-mapped address (16) | port u16
//! CallMeMaybe: type 0x03, version 0: N × (address (16) | port u16)
//!                         version 1 (ferry): flags u8 | N × (address (16) | port u16)
//! CallMeMaybeVia: type 0x07, version 0: relay server key (32) | client key 0 (32) |
//!                 client key 1 (32) | Lamport id u64 | VNI u32 | bind lifetime ns u64 |
//!                 idle lifetime ns u64 | N ≥ 1 × (address (16) | port u16)
//! ```
//!
//! CallMeMaybeVia (issue 15, Tailscale's layout byte for byte) travels only via DERP: "a UDP
//! relay session for the two of us is at these addresses; bind to it and ping me through it"
//! (see [`crate::udprelay`]). Its client keys must be the sender's and the receiver's.
//!
//! CallMeMaybe version 1 is ferry's extension, two flags: bit 0 (*hard NAT*) says the sender's
//! NAT maps each destination to a different port (from netcheck), which starts birthday
//! probing when the other side is easy; bit 1 (*punched*) says the sender has just opened its
//! NAT towards the receiver's known endpoints, so the receiver may ping at full TTL now
//! (without it, the receiver punches and answers first; see the endpoint docs). ferry sends
//! version 1 and reads both; version 0 means neither flag.
//!
//! Deliberate difference: Tailscale seals with a separate per-process *disco key* that the
//! control plane distributes; ferry has no control plane, so the sender key field carries the
//! **node key** and the box is between the two node keys (the same X25519 keys the relay and
//! the Noise sessions use). A receiver therefore checks that the sender key equals the key it
//! expects (the relay's source key, or the peer it pinged). Like Tailscale, trailing bytes after
//! a known payload are ignored (room for later versions and padding); unknown types are an
//! error.
//!
//! The first byte `T` (0x54) is distinct from the E2E packet types 0x01–0x03 and from STUN
//! (first two bits 0), so one UDP socket carries all three.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ferry_proto::derp::{self as proto, PublicKey, SecretKey, DISCO_MAGIC, KEY_LEN, NONCE_LEN};

/// A ping's transaction id.
pub type TxId = [u8; 12];

const T_PING: u8 = 0x01;
const T_PONG: u8 = 0x02;
const T_CALL_ME_MAYBE: u8 = 0x03;
const T_CALL_ME_MAYBE_VIA: u8 = 0x07;
/// CallMeMaybeVia's fixed part: three keys, Lamport id, VNI, two lifetimes.
const VIA_FIXED: usize = 3 * KEY_LEN + 8 + 4 + 8 + 8;
const VERSION: u8 = 0;
/// CallMeMaybe with a flags byte.
const CMM_VERSION: u8 = 1;
const CMM_HARD_NAT: u8 = 0x01;
const CMM_PUNCHED: u8 = 0x02;
const ADDR_LEN: usize = 18;
const HEADER_LEN: usize = DISCO_MAGIC.len() + KEY_LEN;

/// Most endpoints a CallMeMaybe carries (keeps it well under a 1280-byte IPv6 MTU).
pub const MAX_ENDPOINTS: usize = 48;

/// A disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Are you there on this address?
    Ping {
        /// Echoed in the pong.
        txid: TxId,
        /// The sender's node key (redundant with the header here; kept for Tailscale's layout).
        node_key: PublicKey,
    },
    /// Yes; and this is where your ping came from.
    Pong {
        /// The ping's id.
        txid: TxId,
        /// The ping's source address as the answering node saw it.
        src: SocketAddr,
    },
    /// My candidate endpoints: ping them (and I ping yours) — simultaneous open.
    CallMeMaybe {
        /// The sender's candidate addresses.
        endpoints: Vec<SocketAddr>,
        /// The sender is behind a hard NAT (endpoint-dependent mapping).
        hard_nat: bool,
        /// The sender has punched towards the receiver's endpoints it knows: ping it now.
        punched: bool,
    },
    /// A UDP relay session for the sender and the receiver (only via DERP).
    CallMeMaybeVia(ferry_proto::udprelay::Endpoint),
}

/// Why a datagram is not an acceptable disco message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    /// It does not start with the disco magic.
    #[error("not a disco message (no \"TS💬\" magic)")]
    NotDisco,
    /// Too short for the header, nonce and box tag.
    #[error("disco message too short: {0} bytes, need at least {min}", min = HEADER_LEN + NONCE_LEN + 16)]
    TooShort(usize),
    /// The sender key is not the one expected.
    #[error("disco message from {got} where {expected} was expected")]
    WrongSender {
        /// The key in the header.
        got: String,
        /// The key expected.
        expected: String,
    },
    /// The box does not open: tampered, or not sealed to this node by the claimed sender.
    #[error("disco box does not open (tampered, or sealed with other keys)")]
    BoxOpen,
    /// The plaintext is not a valid message.
    #[error("malformed disco {kind}: {why}")]
    Malformed {
        /// The message type.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A type this version does not know.
    #[error("unknown disco message type {0:#04x} (version {1})")]
    UnknownType(u8, u8),
}

/// Whether `packet` looks like disco (magic and minimal length); cheap, no crypto.
pub fn is_disco(packet: &[u8]) -> bool {
    proto::looks_like_disco(packet)
}

/// The sender key in a disco header, without opening the box.
pub fn sender(packet: &[u8]) -> Result<PublicKey, DiscoError> {
    if !packet.starts_with(&DISCO_MAGIC) {
        return Err(DiscoError::NotDisco);
    }
    if packet.len() < HEADER_LEN + NONCE_LEN + 16 {
        return Err(DiscoError::TooShort(packet.len()));
    }
    Ok(PublicKey::from_slice(&packet[DISCO_MAGIC.len()..]).expect("length checked"))
}

/// A fresh random transaction id.
pub fn new_txid() -> TxId {
    rand::random()
}

/// Seals `msg` from `ours` to `theirs`: the whole datagram.
pub fn seal(ours: &SecretKey, theirs: &PublicKey, msg: &Message) -> Vec<u8> {
    seal_padded(ours, theirs, msg, 0)
}

/// Largest disco datagram [`seal_padded`] makes (the most one IPv4 UDP datagram carries).
pub const MAX_PADDED: usize = 65_507;

/// [`seal`], with zero padding after the payload (parsers ignore trailing bytes) so that the
/// datagram is at least `min_len` bytes (at most [`MAX_PADDED`]): a ping as large as the data
/// it acknowledges travels like it (fragments and all).
pub fn seal_padded(ours: &SecretKey, theirs: &PublicKey, msg: &Message, min_len: usize) -> Vec<u8> {
    envelope(
        &ours.public(),
        &proto::SharedBox::new(ours, theirs),
        msg,
        min_len,
    )
}

/// The disco datagram of `msg` from `ours_public`, sealed with `b`, padded to `min_len`.
fn envelope(
    ours_public: &PublicKey,
    b: &proto::SharedBox,
    msg: &Message,
    min_len: usize,
) -> Vec<u8> {
    let mut pt = Vec::with_capacity(64);
    match msg {
        Message::Ping { txid, node_key } => {
            pt.extend_from_slice(&[T_PING, VERSION]);
            pt.extend_from_slice(txid);
            pt.extend_from_slice(node_key.as_bytes());
        }
        Message::Pong { txid, src } => {
            pt.extend_from_slice(&[T_PONG, VERSION]);
            pt.extend_from_slice(txid);
            put_addr(&mut pt, src);
        }
        Message::CallMeMaybe {
            endpoints,
            hard_nat,
            punched,
        } => {
            let flags =
                if *hard_nat { CMM_HARD_NAT } else { 0 } | if *punched { CMM_PUNCHED } else { 0 };
            pt.extend_from_slice(&[T_CALL_ME_MAYBE, CMM_VERSION, flags]);
            for e in endpoints.iter().take(MAX_ENDPOINTS) {
                put_addr(&mut pt, e);
            }
        }
        Message::CallMeMaybeVia(e) => {
            pt.extend_from_slice(&[T_CALL_ME_MAYBE_VIA, VERSION]);
            pt.extend_from_slice(e.server_key.as_bytes());
            pt.extend_from_slice(e.keys[0].as_bytes());
            pt.extend_from_slice(e.keys[1].as_bytes());
            pt.extend_from_slice(&e.lamport.to_be_bytes());
            pt.extend_from_slice(&e.vni.to_be_bytes());
            pt.extend_from_slice(&(e.bind_lifetime.as_nanos() as u64).to_be_bytes());
            pt.extend_from_slice(&(e.idle_lifetime.as_nanos() as u64).to_be_bytes());
            for a in e.addrs.iter().take(MAX_ENDPOINTS) {
                put_addr(&mut pt, a);
            }
        }
    }
    let overhead = HEADER_LEN + NONCE_LEN + 16;
    let want = min_len.min(MAX_PADDED).saturating_sub(overhead);
    if pt.len() < want {
        pt.resize(want, 0);
    }
    let mut out = Vec::with_capacity(overhead + pt.len());
    out.extend_from_slice(&DISCO_MAGIC);
    out.extend_from_slice(ours_public.as_bytes());
    out.extend_from_slice(&proto::seal_with(b, &pt));
    out
}

/// Peers whose boxes [`DiscoKeys`] keeps; past this it starts over (a node talks to far
/// fewer peers at once; a stranger spraying keys only makes it recompute).
const MAX_BOXES: usize = 4096;

/// Our key for disco with the X25519 step done once per peer. [`seal`] and [`open`] do a
/// scalar multiplication per message (and [`seal`] a second one for our public key); under
/// load a path is acknowledged with pings every 100 ms or 128 packets, each answered by a
/// pong, so that cost was paid hundreds of times a second per peer.
pub struct DiscoKeys {
    secret: SecretKey,
    public: PublicKey,
    boxes: std::collections::HashMap<PublicKey, proto::SharedBox>,
}

impl std::fmt::Debug for DiscoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiscoKeys({}, {} boxes)",
            self.public.short(),
            self.boxes.len()
        )
    }
}

impl DiscoKeys {
    /// For our node key `secret`.
    pub fn new(secret: SecretKey) -> DiscoKeys {
        DiscoKeys {
            public: secret.public(),
            secret,
            boxes: std::collections::HashMap::new(),
        }
    }

    /// Boxes kept (one per peer sealed to, or heard from with a valid box).
    pub fn cached(&self) -> usize {
        self.boxes.len()
    }

    fn keep(&mut self, theirs: PublicKey, b: proto::SharedBox) {
        if self.boxes.len() >= MAX_BOXES && !self.boxes.contains_key(&theirs) {
            self.boxes.clear();
        }
        self.boxes.insert(theirs, b);
    }

    /// [`seal`].
    pub fn seal(&mut self, theirs: &PublicKey, msg: &Message) -> Vec<u8> {
        self.seal_padded(theirs, msg, 0)
    }

    /// [`seal_padded`].
    pub fn seal_padded(&mut self, theirs: &PublicKey, msg: &Message, min_len: usize) -> Vec<u8> {
        if !self.boxes.contains_key(theirs) {
            let b = proto::SharedBox::new(&self.secret, theirs);
            self.keep(*theirs, b);
        }
        envelope(&self.public, &self.boxes[theirs], msg, min_len)
    }

    /// [`open`]. A sender's box is kept only once a message from it opened.
    pub fn open(
        &mut self,
        packet: &[u8],
        expected: Option<&PublicKey>,
    ) -> Result<(PublicKey, Message), DiscoError> {
        let from = expected_sender(packet, expected)?;
        let sealed = &packet[HEADER_LEN..];
        let pt = match self.boxes.get(&from) {
            Some(b) => proto::open_with(b, sealed).map_err(|_| DiscoError::BoxOpen)?,
            None => {
                let b = proto::SharedBox::new(&self.secret, &from);
                let pt = proto::open_with(&b, sealed).map_err(|_| DiscoError::BoxOpen)?;
                self.keep(from, b);
                pt
            }
        };
        Ok((from, parse(&pt)?))
    }
}

/// Opens a disco datagram sent to `ours`. With `expected`, the sender must be that key.
/// Returns the (now authenticated) sender and the message.
pub fn open(
    ours: &SecretKey,
    packet: &[u8],
    expected: Option<&PublicKey>,
) -> Result<(PublicKey, Message), DiscoError> {
    let from = expected_sender(packet, expected)?;
    let pt = proto::open(ours, &from, &packet[HEADER_LEN..]).map_err(|_| DiscoError::BoxOpen)?;
    Ok((from, parse(&pt)?))
}

/// The sender key of a disco datagram, which must be `expected` if given (checked before any
/// box is opened).
fn expected_sender(packet: &[u8], expected: Option<&PublicKey>) -> Result<PublicKey, DiscoError> {
    let from = sender(packet)?;
    match expected {
        Some(e) if *e != from => Err(DiscoError::WrongSender {
            got: from.short(),
            expected: e.short(),
        }),
        _ => Ok(from),
    }
}

fn parse(pt: &[u8]) -> Result<Message, DiscoError> {
    let (&ty, rest) = pt.split_first().ok_or(DiscoError::Malformed {
        kind: "message",
        why: "empty plaintext".into(),
    })?;
    let (&ver, body) = rest.split_first().ok_or(DiscoError::Malformed {
        kind: "message",
        why: "no version byte".into(),
    })?;
    let short = |kind: &'static str, need: usize| DiscoError::Malformed {
        kind,
        why: format!("payload of {} bytes, need {need}", body.len()),
    };
    match ty {
        T_PING => {
            // Tailscale's oldest pings carry only the txid; ferry always sends the key.
            if body.len() < 12 + KEY_LEN {
                return Err(short("ping", 12 + KEY_LEN));
            }
            Ok(Message::Ping {
                txid: body[..12].try_into().expect("len"),
                node_key: PublicKey::from_slice(&body[12..]).expect("len"),
            })
        }
        T_PONG => {
            if body.len() < 12 + ADDR_LEN {
                return Err(short("pong", 12 + ADDR_LEN));
            }
            Ok(Message::Pong {
                txid: body[..12].try_into().expect("len"),
                src: get_addr(&body[12..12 + ADDR_LEN]),
            })
        }
        T_CALL_ME_MAYBE => {
            let (flags, body) = match (ver, body.split_first()) {
                (0, _) => (0, body),
                (_, Some((f, rest))) => (*f, rest),
                (_, None) => return Err(short("call-me-maybe", 1)),
            };
            if body.len() % ADDR_LEN != 0 {
                return Err(DiscoError::Malformed {
                    kind: "call-me-maybe",
                    why: format!(
                        "payload of {} bytes is not a multiple of {ADDR_LEN}",
                        body.len()
                    ),
                });
            }
            Ok(Message::CallMeMaybe {
                endpoints: body.chunks(ADDR_LEN).map(get_addr).collect(),
                hard_nat: flags & CMM_HARD_NAT != 0,
                punched: flags & CMM_PUNCHED != 0,
            })
        }
        T_CALL_ME_MAYBE_VIA => {
            // Tailscale: at least one address, whole addresses only.
            if body.len() < VIA_FIXED + ADDR_LEN
                || !(body.len() - VIA_FIXED).is_multiple_of(ADDR_LEN)
            {
                return Err(DiscoError::Malformed {
                    kind: "call-me-maybe-via",
                    why: format!(
                        "payload of {} bytes, need {VIA_FIXED} + N × {ADDR_LEN} (N ≥ 1)",
                        body.len()
                    ),
                });
            }
            let key = |o: usize| PublicKey::from_slice(&body[o..o + KEY_LEN]).expect("len");
            let u64_at = |o: usize| u64::from_be_bytes(body[o..o + 8].try_into().expect("len"));
            let o = 3 * KEY_LEN;
            let addrs: Vec<SocketAddr> = body[VIA_FIXED..].chunks(ADDR_LEN).map(get_addr).collect();
            Ok(Message::CallMeMaybeVia(ferry_proto::udprelay::Endpoint {
                server_key: key(0),
                keys: [key(KEY_LEN), key(2 * KEY_LEN)],
                lamport: u64_at(o),
                vni: u32::from_be_bytes(body[o + 8..o + 12].try_into().expect("len")),
                bind_lifetime: std::time::Duration::from_nanos(u64_at(o + 12)),
                idle_lifetime: std::time::Duration::from_nanos(u64_at(o + 20)),
                port: addrs[0].port(),
                addrs,
            }))
        }
        t => Err(DiscoError::UnknownType(t, ver)),
    }
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let ip6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let ip6 = Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).expect("len"));
    let ip = match ip6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip6),
    };
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached boxes seal and open exactly what the one-shot functions do, both ways, and
    /// keep a sender only once its message opened.
    #[test]
    fn disco_keys_agree_with_seal_and_open() {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let mut ka = DiscoKeys::new(a.clone());
        let mut kb = DiscoKeys::new(b.clone());
        let m = Message::Ping {
            txid: [7; 12],
            node_key: a.public(),
        };
        for _ in 0..3 {
            let pkt = ka.seal(&b.public(), &m);
            assert_eq!(
                open(&b, &pkt, Some(&a.public())).unwrap(),
                (a.public(), m.clone())
            );
            assert_eq!(
                kb.open(&pkt, Some(&a.public())).unwrap(),
                (a.public(), m.clone())
            );
            let back = seal(&b, &a.public(), &m);
            assert_eq!(ka.open(&back, None).unwrap(), (b.public(), m.clone()));
        }
        assert_eq!((ka.cached(), kb.cached()), (1, 1));
        let padded = ka.seal_padded(&b.public(), &m, 1200);
        assert_eq!(padded.len(), 1200);
        assert_eq!(kb.open(&padded, None).unwrap().1, m);
        // A forged box from a new key: refused, and its key not kept.
        let c = SecretKey::generate();
        let mut forged = seal(&c, &b.public(), &m);
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert!(matches!(kb.open(&forged, None), Err(DiscoError::BoxOpen)));
        assert_eq!(kb.cached(), 1);
        // The wrong sender is refused before any box is computed.
        let pkt = ka.seal(&b.public(), &m);
        assert!(matches!(
            kb.open(&pkt, Some(&c.public())),
            Err(DiscoError::WrongSender { .. })
        ));
    }

    #[test]
    fn disco_keys_start_over_past_their_bound() {
        let mut k = DiscoKeys::new(SecretKey::generate());
        let m = Message::Pong {
            txid: [1; 12],
            src: "192.0.2.1:1".parse().unwrap(),
        };
        for _ in 0..MAX_BOXES + 10 {
            k.seal(&SecretKey::generate().public(), &m);
        }
        assert!(k.cached() <= MAX_BOXES, "{}", k.cached());
    }

    fn keys() -> (SecretKey, SecretKey) {
        (SecretKey::generate(), SecretKey::generate())
    }

    #[test]
    fn round_trip_every_message() {
        let (a, b) = keys();
        let msgs = [
            Message::Ping {
                txid: new_txid(),
                node_key: a.public(),
            },
            Message::Pong {
                txid: new_txid(),
                src: "192.0.2.7:41641".parse().unwrap(),
            },
            Message::Pong {
                txid: new_txid(),
                src: "[2001:db8::1]:3478".parse().unwrap(),
            },
            Message::CallMeMaybe {
                endpoints: vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "[::1]:65535".parse().unwrap(),
                ],
                hard_nat: false,
                punched: true,
            },
            Message::CallMeMaybe {
                endpoints: vec!["192.0.2.9:4".parse().unwrap()],
                hard_nat: true,
                punched: false,
            },
            Message::CallMeMaybe {
                endpoints: vec![],
                hard_nat: false,
                punched: false,
            },
            Message::CallMeMaybeVia(via_endpoint(&a, &b)),
        ];
        for m in msgs {
            let pkt = seal(&a, &b.public(), &m);
            assert!(is_disco(&pkt));
            assert!(!crate::e2e::is_e2e(&pkt));
            assert!(!crate::stun::is_stun(&pkt));
            assert_eq!(sender(&pkt).unwrap(), a.public());
            let (from, got) = open(&b, &pkt, Some(&a.public())).unwrap();
            assert_eq!(from, a.public());
            assert_eq!(got, m);
        }
    }

    fn via_endpoint(a: &SecretKey, b: &SecretKey) -> ferry_proto::udprelay::Endpoint {
        ferry_proto::udprelay::Endpoint {
            server_key: SecretKey::generate().public(),
            keys: [a.public(), b.public()],
            lamport: 0x0102_0304_0506_0708,
            vni: 0x00AB_CDEF,
            bind_lifetime: std::time::Duration::from_secs(30),
            idle_lifetime: std::time::Duration::from_secs(300),
            port: 3480,
            addrs: vec![
                "192.0.2.1:3480".parse().unwrap(),
                "[2001:db8::1]:3480".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn call_me_maybe_via_is_tailscales_layout() {
        let (a, b) = keys();
        let e = via_endpoint(&a, &b);
        let pkt = seal(&a, &b.public(), &Message::CallMeMaybeVia(e.clone()));
        let pt = proto::open(&b, &a.public(), &pkt[HEADER_LEN..]).unwrap();
        // tailscale.com/disco: type 7, version 0, UDPRelayEndpoint.encode.
        let mut want = vec![0x07, 0];
        want.extend_from_slice(e.server_key.as_bytes());
        want.extend_from_slice(a.public().as_bytes());
        want.extend_from_slice(b.public().as_bytes());
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        want.extend_from_slice(&[0, 0xAB, 0xCD, 0xEF]);
        want.extend_from_slice(&30_000_000_000u64.to_be_bytes());
        want.extend_from_slice(&300_000_000_000u64.to_be_bytes());
        want.extend_from_slice(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 192, 0, 2, 1, 0x0D, 0x98,
        ]);
        want.extend_from_slice(&[
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x0D, 0x98,
        ]);
        assert_eq!(pt, want);
        // No address, or a partial one: refused, as Tailscale does.
        for cut in [18, 5] {
            let bad = &want[..want.len() - 18 - cut];
            let sealed = [&pkt[..HEADER_LEN], &proto::seal(&a, &b.public(), bad)].concat();
            assert!(
                matches!(
                    open(&b, &sealed, None),
                    Err(DiscoError::Malformed {
                        kind: "call-me-maybe-via",
                        ..
                    })
                ),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn layout_follows_tailscale() {
        let (a, b) = keys();
        let txid = [7u8; 12];
        let pkt = seal(
            &a,
            &b.public(),
            &Message::Pong {
                txid,
                src: "1.2.3.4:5".parse().unwrap(),
            },
        );
        assert_eq!(&pkt[..6], "TS💬".as_bytes());
        assert_eq!(&pkt[6..38], a.public().as_bytes());
        // nonce 24 + tag 16 + type, version, txid 12, addr 16, port 2
        assert_eq!(pkt.len(), 38 + 24 + 16 + 2 + 12 + 18);
        let pt = proto::open(&b, &a.public(), &pkt[38..]).unwrap();
        assert_eq!(&pt[..2], &[T_PONG, 0]);
        assert_eq!(&pt[2..14], &txid);
        assert_eq!(
            &pt[14..30],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]
        );
        assert_eq!(&pt[30..], &[0, 5]);
    }

    #[test]
    fn tampering_and_wrong_keys_are_rejected() {
        let (a, b) = keys();
        let c = SecretKey::generate();
        let m = Message::CallMeMaybe {
            endpoints: vec!["10.0.0.1:9".parse().unwrap()],
            hard_nat: false,
            punched: false,
        };
        let pkt = seal(&a, &b.public(), &m);
        // Every byte after the magic matters: sender key, nonce, tag, ciphertext.
        for i in DISCO_MAGIC.len()..pkt.len() {
            let mut t = pkt.clone();
            t[i] ^= 0x01;
            assert!(open(&b, &t, None).is_err(), "flipped byte {i} accepted");
        }
        // Not sealed to c.
        assert_eq!(open(&c, &pkt, None), Err(DiscoError::BoxOpen));
        // c claims to be a: the box does not open.
        let mut forged = seal(&c, &b.public(), &m);
        forged[6..38].copy_from_slice(a.public().as_bytes());
        assert_eq!(open(&b, &forged, None), Err(DiscoError::BoxOpen));
        // Right box, unexpected sender.
        let e = open(&b, &pkt, Some(&c.public())).unwrap_err();
        assert!(matches!(e, DiscoError::WrongSender { .. }), "{e}");
        assert!(e.to_string().contains(&a.public().short()), "{e}");
    }

    #[test]
    fn malformed_input_is_a_clear_error() {
        let (a, b) = keys();
        assert_eq!(open(&b, b"\x01hello", None), Err(DiscoError::NotDisco));
        let mut short = DISCO_MAGIC.to_vec();
        short.extend_from_slice(&[0; 40]);
        let e = open(&b, &short, None).unwrap_err();
        assert_eq!(e, DiscoError::TooShort(46));
        assert!(e.to_string().contains("too short"), "{e}");

        let raw = |pt: &[u8]| {
            let mut p = DISCO_MAGIC.to_vec();
            p.extend_from_slice(a.public().as_bytes());
            p.extend_from_slice(&proto::seal(&a, &b.public(), pt));
            p
        };
        let cases: [(&[u8], &str); 5] = [
            (&[], "empty plaintext"),
            (&[T_PING], "no version byte"),
            (
                &[T_PING, 0, 1, 2, 3],
                "malformed disco ping: payload of 3 bytes, need 44",
            ),
            (
                &[T_PONG, 0, 1, 2, 3],
                "malformed disco pong: payload of 3 bytes, need 30",
            ),
            (
                &[T_CALL_ME_MAYBE, 0, 1, 2, 3],
                "call-me-maybe: payload of 3 bytes is not a multiple of 18",
            ),
        ];
        for (pt, want) in cases {
            let e = open(&b, &raw(pt), None).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (want {want})");
        }
        let e = open(&b, &raw(&[0x7f, 3]), None).unwrap_err();
        assert_eq!(e, DiscoError::UnknownType(0x7f, 3));
        assert!(
            e.to_string().contains("unknown disco message type 0x7f"),
            "{e}"
        );
        // Trailing bytes (padding, later versions) are ignored.
        let mut pt = vec![T_PONG, 0];
        pt.extend_from_slice(&[9; 12]);
        pt.extend_from_slice(&[0; 18]);
        pt.extend_from_slice(b"padding");
        let (_, m) = open(&b, &raw(&pt), None).unwrap();
        assert!(matches!(m, Message::Pong { txid, .. } if txid == [9; 12]));
    }

    #[test]
    fn call_me_maybe_is_capped() {
        let (a, b) = keys();
        let endpoints: Vec<SocketAddr> = (0..100)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 1000 + i)))
            .collect();
        let msg = Message::CallMeMaybe {
            endpoints,
            hard_nat: true,
            punched: true,
        };
        let pkt = seal(&a, &b.public(), &msg);
        let (_, m) = open(&b, &pkt, None).unwrap();
        assert!(
            matches!(m, Message::CallMeMaybe { endpoints, hard_nat: true, punched: true }
            if endpoints.len() == MAX_ENDPOINTS)
        );
    }

    #[test]
    fn padded_pings_parse_and_have_the_size_asked() {
        let (a, b) = keys();
        let m = Message::Ping {
            txid: new_txid(),
            node_key: a.public(),
        };
        let small = seal(&a, &b.public(), &m);
        assert_eq!(seal_padded(&a, &b.public(), &m, 10).len(), small.len());
        for size in [1_400, 9_000, MAX_PADDED, MAX_PADDED + 100] {
            let pkt = seal_padded(&a, &b.public(), &m, size);
            assert_eq!(pkt.len(), size.min(MAX_PADDED));
            assert_eq!(open(&b, &pkt, None).unwrap(), (a.public(), m.clone()));
        }
    }

    #[test]
    fn call_me_maybe_version_0_is_tailscales_layout() {
        // Tailscale's CallMeMaybe: version 0, no flags byte.
        let (a, b) = keys();
        let mut pt = vec![T_CALL_ME_MAYBE, 0];
        put_addr(&mut pt, &"192.0.2.1:41641".parse().unwrap());
        let mut pkt = DISCO_MAGIC.to_vec();
        pkt.extend_from_slice(a.public().as_bytes());
        pkt.extend_from_slice(&proto::seal(&a, &b.public(), &pt));
        let (_, m) = open(&b, &pkt, None).unwrap();
        assert_eq!(
            m,
            Message::CallMeMaybe {
                endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
                hard_nat: false,
                punched: false,
            }
        );
        // Version 1 without its flags byte is malformed.
        let mut pkt = DISCO_MAGIC.to_vec();
        pkt.extend_from_slice(a.public().as_bytes());
        pkt.extend_from_slice(&proto::seal(&a, &b.public(), &[T_CALL_ME_MAYBE, 1]));
        assert!(matches!(
            open(&b, &pkt, None),
            Err(DiscoError::Malformed { .. })
        ));
    }
}
