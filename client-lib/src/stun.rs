//! The client half of STUN (RFC 8489): a Binding request and its success response. Small and
//! hand-written, as Tailscale's `net/stun` is; the unit tests check it against `stun_codec`.
//!
//! Requests carry SOFTWARE (`ferry`) and FINGERPRINT, like Tailscale's (`tailnode`), so a
//! server can tell them from other traffic on the data socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The RFC 5389/8489 magic cookie.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Pre-RFC 5389 servers used this type for XOR-MAPPED-ADDRESS.
const ATTR_XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const SOFTWARE: &[u8] = b"ferry";

/// A 96-bit transaction id.
pub type TxId = [u8; 12];

/// A fresh random transaction id.
pub fn new_txid() -> TxId {
    rand::random()
}

/// A Binding request with SOFTWARE and FINGERPRINT.
pub fn binding_request(txid: &TxId) -> Vec<u8> {
    let sw_padded = SOFTWARE.len().div_ceil(4) * 4;
    let attrs_len = 4 + sw_padded + 8;
    let mut b = Vec::with_capacity(20 + attrs_len);
    b.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    b.extend_from_slice(&(attrs_len as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    b.extend_from_slice(txid);
    b.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b.extend_from_slice(&(SOFTWARE.len() as u16).to_be_bytes());
    b.extend_from_slice(SOFTWARE);
    b.resize(b.len() + sw_padded - SOFTWARE.len(), 0);
    let crc = crc32fast::hash(&b) ^ FINGERPRINT_XOR;
    b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b.extend_from_slice(&4u16.to_be_bytes());
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

/// Whether a datagram looks like a STUN message (top two bits zero, the magic cookie, a
/// plausible length): how the data socket tells STUN from other traffic.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= 20
        && b[0] & 0xC0 == 0
        && b[4..8] == MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([b[2], b[3]])) + 20 == b.len()
}

/// Why a datagram is not a usable Binding success response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunParseError {
    /// Not STUN.
    #[error("not a STUN message")]
    NotStun,
    /// STUN, but not a Binding success (an error response, a request, …).
    #[error("STUN message of type {0:#06x}, not a Binding success response")]
    NotBindingSuccess(u16),
    /// An attribute runs past the end.
    #[error("truncated attribute")]
    Truncated,
    /// No (XOR-)MAPPED-ADDRESS.
    #[error("no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS")]
    NoAddress,
}

/// Reads a Binding success response: its transaction id and the reflexive address.
pub fn parse_binding_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunParseError> {
    if !is_stun(b) {
        return Err(StunParseError::NotStun);
    }
    let ty = u16::from_be_bytes([b[0], b[1]]);
    if ty != BINDING_SUCCESS {
        return Err(StunParseError::NotBindingSuccess(ty));
    }
    let txid: TxId = b[8..20].try_into().expect("length checked");
    let mut xor = None;
    let mut plain = None;
    let mut rest = &b[20..];
    while rest.len() >= 4 {
        let at = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = len.div_ceil(4) * 4;
        if rest.len() < 4 + len {
            return Err(StunParseError::Truncated);
        }
        let v = &rest[4..4 + len];
        match at {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_OLD => {
                xor = xor.or_else(|| parse_addr(v, Some(&txid)))
            }
            ATTR_MAPPED_ADDRESS => plain = plain.or_else(|| parse_addr(v, None)),
            _ => {}
        }
        rest = &rest[(4 + padded).min(rest.len())..];
    }
    xor.or(plain)
        .map(|a| (txid, a))
        .ok_or(StunParseError::NoAddress)
}

fn parse_addr(v: &[u8], xor_txid: Option<&TxId>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor_txid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (v[1], v.len()) {
        (0x01, 8) => {
            let mut o: [u8; 4] = v[4..8].try_into().ok()?;
            if xor_txid.is_some() {
                for (i, b) in o.iter_mut().enumerate() {
                    *b ^= cookie[i];
                }
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (0x02, 20) => {
            let mut o: [u8; 16] = v[4..20].try_into().ok()?;
            if let Some(txid) = xor_txid {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&cookie);
                key[4..].copy_from_slice(txid);
                for (b, k) in o.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytecodec::{DecodeExt, EncodeExt};
    use stun_codec::rfc5389::{attributes as a, methods::BINDING, Attribute};
    use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

    #[test]
    fn request_decodes_with_stun_codec_and_fingerprint_checks() {
        let txid = new_txid();
        let req = binding_request(&txid);
        assert!(is_stun(&req));
        let mut dec = MessageDecoder::<Attribute>::new();
        let msg = dec.decode_from_bytes(&req).unwrap().unwrap();
        assert_eq!(msg.class(), MessageClass::Request);
        assert_eq!(msg.method(), BINDING);
        assert_eq!(msg.transaction_id().as_bytes(), &txid);
        assert_eq!(
            msg.get_attribute::<a::Software>().unwrap().description(),
            "ferry"
        );
        // stun_codec verifies FINGERPRINT while decoding; a flipped bit must fail it.
        assert!(msg.get_attribute::<a::Fingerprint>().is_some());
        let mut bad = req.clone();
        bad[25] ^= 1;
        let r = MessageDecoder::<Attribute>::new().decode_from_bytes(&bad);
        assert!(!matches!(r, Ok(Ok(_))), "corrupted request must not decode");
    }

    fn response(txid: TxId, addr: SocketAddr, xor: bool) -> Vec<u8> {
        let mut m = Message::<Attribute>::new(
            MessageClass::SuccessResponse,
            BINDING,
            TransactionId::new(txid),
        );
        if xor {
            m.add_attribute(Attribute::XorMappedAddress(a::XorMappedAddress::new(addr)));
        } else {
            m.add_attribute(Attribute::MappedAddress(a::MappedAddress::new(addr)));
        }
        MessageEncoder::new().encode_into_bytes(m).unwrap()
    }

    #[test]
    fn parses_responses_built_by_stun_codec() {
        for addr in [
            "192.0.2.1:32853".parse::<SocketAddr>().unwrap(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap(),
        ] {
            for xor in [true, false] {
                let txid = new_txid();
                let b = response(txid, addr, xor);
                assert_eq!(parse_binding_response(&b), Ok((txid, addr)), "xor={xor}");
            }
        }
    }

    #[test]
    fn rejects_non_responses() {
        let txid = new_txid();
        assert_eq!(
            parse_binding_response(&binding_request(&txid)),
            Err(StunParseError::NotBindingSuccess(0x0001))
        );
        assert_eq!(
            parse_binding_response(b"hello world, not stun"),
            Err(StunParseError::NotStun)
        );
        let mut b = response(txid, "1.2.3.4:5".parse().unwrap(), true);
        b.truncate(b.len() - 4);
        let l = (b.len() - 20) as u16;
        b[2..4].copy_from_slice(&l.to_be_bytes());
        assert_eq!(parse_binding_response(&b), Err(StunParseError::Truncated));
    }
}
