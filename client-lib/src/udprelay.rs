//! The client side of the UDP relay path (issue 15), sans-IO: binding one side of a session
//! that a relay allocated ([`crate::relay::RelayClient::allocate_udp_relay`]), and framing
//! packets for it. The relay forwards a datagram only between the session's two bound
//! addresses, so each side first proves it owns its source address: Bind → the relay's
//! Challenge (to that address) → Answer ([`Binding`]). Then every packet travels as
//! `Geneve(vni) ‖ packet` to the relay, which passes it on unchanged ([`Binding::wrap`],
//! [`unwrap`]). The relay sees session ids and ciphertext only: what ferry sends inside is its
//! end-to-end encrypted packets and disco messages.
//!
//! [`crate::Endpoint`] uses it for its `Path::UdpRelay` (module docs of [`crate::endpoint`], 6.).

use std::net::SocketAddr;

use ferry_proto::udprelay::{BindKind, BindMsg, Endpoint, Geneve, GENEVE_LEN};
use ferry_proto::{PublicKey, SecretKey};

/// Geneve protocol of ferry's end-to-end packets on the UDP relay path (the relay forwards any;
/// Tailscale uses 0x7A11 for disco and 0x7A12 for WireGuard, `ferry_proto::udprelay`).
pub const PROTO_FERRY_E2E: u16 = 0x7A1E;

/// Whether `d` looks like a Geneve datagram of a UDP relay, by Tailscale's client rule: version
/// 0, no options, reserved bits and the last header byte zero, and not a STUN binding message
/// (whose second byte is 0x01; a Geneve header's is 0x00 or 0x80).
pub fn is_geneve(d: &[u8]) -> bool {
    d.len() >= GENEVE_LEN && d[0] == 0 && d[1] & 0x3F == 0 && d[7] == 0
}

/// A relayed datagram's header and payload (`None` if it is not Geneve).
pub fn unwrap(d: &[u8]) -> Option<(Geneve, &[u8])> {
    if !is_geneve(d) {
        return None;
    }
    Some((Geneve::parse(d)?, &d[GENEVE_LEN..]))
}

/// Where the bind handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindState {
    /// Bind sent (or to be sent), no Challenge yet.
    Binding,
    /// The Answer went out. The relay does not acknowledge it: the side is bound when
    /// packets through the relay arrive (or a ping over it is answered).
    Answered,
}

/// One side's bind handshake with a relay, and the framing of its packets.
#[derive(Debug, Clone)]
pub struct Binding {
    key: SecretKey,
    ep: Endpoint,
    relay: SocketAddr,
    other: PublicKey,
    generation: u32,
    state: BindState,
}

impl Binding {
    /// Binding our side (`key`, one of `ep.keys`) of `ep` at the relay's `relay` address, with
    /// the other side `other`.
    pub fn new(key: SecretKey, ep: Endpoint, relay: SocketAddr, other: PublicKey) -> Binding {
        Binding {
            key,
            ep,
            relay,
            other,
            generation: rand::random::<u32>().max(1),
            state: BindState::Binding,
        }
    }

    /// The relay's UDP address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// Binds to the relay's other address `relay` instead (the one in use went unanswered):
    /// a new handshake there.
    pub fn move_to(&mut self, relay: SocketAddr) {
        self.relay = relay;
        self.generation = self.generation.wrapping_add(1).max(1);
        self.state = BindState::Binding;
    }

    /// The session.
    pub fn vni(&self) -> u32 {
        self.ep.vni
    }

    /// Where the handshake is.
    pub fn state(&self) -> BindState {
        self.state
    }

    fn msg(&self, kind: BindKind, challenge: [u8; 32]) -> BindMsg {
        BindMsg {
            kind,
            vni: self.ep.vni,
            generation: self.generation,
            remote_key: self.other,
            challenge,
        }
    }

    /// A Bind to send to [`Binding::relay`] (again, if no Challenge came: datagrams get lost).
    /// Starts a new handshake (a new generation) when the last one was answered.
    pub fn bind(&mut self) -> Vec<u8> {
        if self.state == BindState::Answered {
            self.generation = self.generation.wrapping_add(1).max(1);
            self.state = BindState::Binding;
        }
        self.msg(BindKind::Bind, [0; 32])
            .seal(&self.key, &self.ep.server_key)
    }

    /// A datagram from `from`: the Answer to send back if it is this session's Challenge to
    /// our handshake in progress, else `None` (ignored).
    pub fn on_datagram(&mut self, from: SocketAddr, d: &[u8]) -> Option<Vec<u8>> {
        if from != self.relay || BindMsg::sender(d) != Some(self.ep.server_key) {
            return None;
        }
        let m = BindMsg::open(&self.key, &self.ep.server_key, d).ok()?;
        if m.kind != BindKind::Challenge
            || m.vni != self.ep.vni
            || m.generation != self.generation
            || m.remote_key != self.other
        {
            return None;
        }
        self.state = BindState::Answered;
        Some(
            self.msg(BindKind::Answer, m.challenge)
                .seal(&self.key, &self.ep.server_key),
        )
    }

    /// `packet` framed for the session (`protocol`: [`PROTO_FERRY_E2E`], or
    /// [`ferry_proto::udprelay::PROTO_DISCO`] for a disco message), to send to
    /// [`Binding::relay`].
    pub fn wrap(&self, protocol: u16, packet: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(GENEVE_LEN + packet.len());
        d.extend_from_slice(
            &Geneve {
                control: false,
                protocol,
                vni: self.ep.vni,
            }
            .encode(),
        );
        d.extend_from_slice(packet);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geneve_is_told_apart_from_stun_disco_and_e2e() {
        let g = Geneve {
            control: false,
            protocol: PROTO_FERRY_E2E,
            vni: 5,
        }
        .encode();
        assert!(is_geneve(&g));
        let mut control = g;
        control[1] = 0x80;
        assert!(is_geneve(&control));
        // A STUN binding request/response: type 0x0001 / 0x0101.
        let stun = crate::stun::binding_request(&[7; 12]);
        assert!(!is_geneve(&stun));
        assert!(!is_geneve(
            b"TS\xF0\x9F\x92\xAC and the rest of a disco message"
        ));
        assert!(
            !is_geneve(&[0x01, 0, 0, 0, 0, 0, 0, 0, 9]),
            "an E2E initiation"
        );
        assert!(!is_geneve(&[0u8; 7]));
        let (h, p) = unwrap(&[&g[..], b"payload"].concat())
            .map(|(h, p)| (h, p.to_vec()))
            .unwrap();
        assert_eq!(
            (h.vni, h.protocol, &p[..]),
            (5, PROTO_FERRY_E2E, &b"payload"[..])
        );
    }
}
