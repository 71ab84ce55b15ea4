//! The STUN message codec (ferry-proto), hand-written because it sits on the STUN server's and
//! the client's hot path, checked against the `stun_codec` crate: every accessor runs on
//! arbitrary bytes, and whenever `stun_codec` fully decodes a Binding success response with an
//! XOR-MAPPED-ADDRESS, ferry's reader must return the same transaction id and address.
#![no_main]
use bytecodec::DecodeExt;
use ferry_proto::stun::{self, attr, BindingParseError, Message};
use libfuzzer_sys::fuzz_target;
use stun_codec::rfc5389::attributes::XorMappedAddress;
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{MessageClass, MessageDecoder};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        assert_eq!(m.bytes().len(), data.len());
        for a in m.attributes() {
            assert!(a.value.len() <= data.len());
        }
        let _ = (m.class(), m.method(), m.transaction_id(), m.fingerprint());
        let _ = (m.mapped_address(), m.error_code(), m.unknown_attributes());
        let _ = m.address(attr::MAPPED_ADDRESS);
    }
    let _ = stun::success_txid(data);
    let ours = stun::parse_binding_success(data);

    let Ok(Ok(theirs)) = MessageDecoder::<Attribute>::new().decode_from_bytes(data) else {
        return;
    };
    if theirs.class() != MessageClass::SuccessResponse || theirs.method() != BINDING {
        return;
    }
    let Some(xma) = theirs.get_attribute::<XorMappedAddress>() else { return };
    match ours {
        Ok(b) => {
            assert_eq!(&b.txid, theirs.transaction_id().as_bytes());
            assert_eq!(b.mapped, xma.address(), "stun_codec and ferry read different addresses");
        }
        Err(e @ BindingParseError::BadFingerprint) => {
            panic!("stun_codec accepted a FINGERPRINT that ferry refused ({e})")
        }
        Err(e) => panic!("stun_codec read a Binding success ({:?}) that ferry refused: {e}", xma.address()),
    }
});
