//! The client half of STUN (RFC 8489): a Binding request and its success response, on
//! ferry-proto's codec (tested there against `stun_codec`).
//!
//! Requests carry SOFTWARE `tailnode` and FINGERPRINT, exactly as Tailscale's clients send them:
//! Tailscale's derper answers nothing else (`net/stun.ParseBindingRequest` refuses any other
//! SOFTWARE), so a node whose region has derper nodes, or that uses Tailscale's own DERP map,
//! would otherwise see "UDP blocked". ferry's STUN server answers every valid request.

use std::net::SocketAddr;

use ferry_proto::stun::{self as codec, BindingParseError};

pub use ferry_proto::stun::{new_txid, TxId};

/// What Tailscale's clients put in SOFTWARE, the only value derper answers.
pub const SOFTWARE: &str = "tailnode";

/// A Binding request with SOFTWARE and FINGERPRINT.
pub fn binding_request(txid: &TxId) -> Vec<u8> {
    codec::binding_request(*txid, Some(SOFTWARE), true)
}

/// Whether a datagram looks like a STUN message: how the data socket tells STUN from other
/// traffic.
pub fn is_stun(b: &[u8]) -> bool {
    codec::looks_like_stun(b)
}

/// Why a datagram is not a usable Binding success response.
pub type StunParseError = BindingParseError;

/// Reads a Binding success response: its transaction id and the reflexive address.
pub fn parse_binding_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunParseError> {
    codec::parse_binding_success(b).map(|r| (r.txid, r.mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tailscales_and_answers_are_read() {
        let txid = new_txid();
        let req = binding_request(&txid);
        assert!(is_stun(&req));
        // Byte for byte what Tailscale's net/stun.Request writes: type, length 20, cookie,
        // txid, SOFTWARE "tailnode" (8 bytes, no padding), FINGERPRINT.
        assert_eq!(&req[..4], &[0x00, 0x01, 0x00, 0x14]);
        assert_eq!(&req[20..32], b"\x80\x22\x00\x08tailnode");
        assert_eq!(&req[32..36], &[0x80, 0x28, 0x00, 0x04]);
        assert_eq!(req.len(), 40);
        assert!(matches!(
            parse_binding_response(&req),
            Err(StunParseError::NotBindingSuccess(0x0001))
        ));
        assert_eq!(
            parse_binding_response(b"hello"),
            Err(StunParseError::NotStun)
        );
    }
}
