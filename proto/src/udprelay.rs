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

use crate::derp::{self, PublicKey, SecretKey, DISCO_MAGIC, KEY_LEN, NONCE_LEN};

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
        out.extend_from_slice(ours.public().as_bytes());
        out.extend_from_slice(&derp::seal(ours, theirs, &self.plaintext()));
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
        let g = Geneve::parse(datagram).ok_or(BindError::NotControl)?;
        if BindMsg::sender(datagram) != Some(*theirs) {
            return Err(BindError::NotControl);
        }
        let sealed = &datagram[GENEVE_LEN + DISCO_MAGIC.len() + KEY_LEN..];
        let pt = derp::open(ours, theirs, sealed).map_err(|_| BindError::BoxOpen)?;
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
}
