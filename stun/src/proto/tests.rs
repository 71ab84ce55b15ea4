//! (Over 800 lines: one test per RFC 5389/5780/3489 case, sharing the fixtures and the
//! `stun_codec` attribute set at the top; split by RFC they would repeat both.)
//!
//! Byte-level tests of the sans-IO core. Replies are decoded with `stun_codec` (an independent
//! implementation) wherever it can read them; RFC 3489 replies, which it rejects, are decoded
//! by hand.

use super::*;
use bytecodec::{DecodeExt, EncodeExt};
use std::net::{Ipv4Addr, Ipv6Addr};
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint, MappedAddress, MessageIntegrity, Nonce, Realm, Software,
    UnknownAttributes, Username, XorMappedAddress,
};
use stun_codec::rfc5780::attributes::{ChangeRequest, OtherAddress, ResponseOrigin};
use stun_codec::{MessageClass, MessageDecoder, MessageEncoder, TransactionId};

stun_codec::define_attribute_enums!(
    Attr,
    AttrDecoder,
    AttrEncoder,
    [
        MappedAddress,
        XorMappedAddress,
        Software,
        Fingerprint,
        ErrorCode,
        UnknownAttributes,
        Username,
        Realm,
        Nonce,
        MessageIntegrity,
        ResponseOrigin,
        OtherAddress,
        ChangeRequest
    ]
);

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 5769 §2.1 sample request (short-term credentials; padding bytes are 0x20).
fn rfc5769_request() -> Vec<u8> {
    hex("00010058 2112a442 b7e7a701 bc34d686 fa87dfae
         80220010 5354554e 20746573 7420636c 69656e74
         00240004 6e0001ff
         80290008 932ff9b1 51263b36
         00060009 6576746a 3a683676 59202020
         00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
         80280004 e57a3bcf")
}

/// RFC 5769 §2.2 sample IPv4 response.
fn rfc5769_response_v4() -> Vec<u8> {
    hex("0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
         8022000b 74657374 20766563 746f7220
         00200008 0001a147 e112a643
         00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
         80280004 c07d4c96")
}

/// RFC 5769 §2.3 sample IPv6 response.
fn rfc5769_response_v6() -> Vec<u8> {
    hex("01010048 2112a442 b7e7a701 bc34d686 fa87dfae
         8022000b 74657374 20766563 746f7220
         00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
         00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
         80280004 c8fb0b4c")
}

/// RFC 5769 §2.4 sample request with long-term authentication (no FINGERPRINT).
fn rfc5769_long_term_request() -> Vec<u8> {
    hex("00010060 2112a442 78ad3433 c6ad72c0 29da412e
         00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
         0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
         0014000b 6578616d 706c652e 6f726700
         00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
}

const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

fn v4() -> SocketAddr {
    "192.0.2.1:32853".parse().unwrap()
}

fn v6() -> SocketAddr {
    "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap()
}

fn udp() -> Ctx {
    Ctx::new(Transport::Udp)
}

/// Build a message by hand: any type, attributes as given (padded with zeros), optional
/// FINGERPRINT.
fn build(typ: u16, attrs: &[(u16, &[u8])], fingerprint: bool) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&TXID);
    for (t, v) in attrs {
        m.extend_from_slice(&t.to_be_bytes());
        m.extend_from_slice(&(v.len() as u16).to_be_bytes());
        m.extend_from_slice(v);
        while m.len() % 4 != 0 {
            m.push(0);
        }
    }
    let body = m.len() - HEADER_LEN + if fingerprint { 8 } else { 0 };
    m[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    if fingerprint {
        let fp = fingerprint_of(&m);
        m.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&fp.to_be_bytes());
    }
    m
}

/// A cookie-less RFC 3489 message with a 16-byte transaction id.
fn build_classic(typ: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = build(typ, attrs, false);
    m[4..20].copy_from_slice(&[0xA5; 16]);
    m
}

fn run(request: &[u8], src: SocketAddr, ctx: &Ctx) -> (Outcome, Vec<u8>) {
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let outcome = handle(request, src, ctx, &mut out);
    let len = outcome.reply().map_or(0, |r| r.len);
    (outcome, out[..len].to_vec())
}

/// Decode with stun_codec; panics on anything it considers broken (including a wrong
/// FINGERPRINT, which it verifies).
fn oracle(bytes: &[u8]) -> stun_codec::Message<Attr> {
    let mut d = MessageDecoder::<Attr>::new();
    d.decode_from_bytes(bytes)
        .expect("stun_codec: bad header")
        .unwrap_or_else(|broken| panic!("stun_codec: broken message: {broken:?}"))
}

fn expect_success(reply: &[u8], request_txid: &[u8], src: SocketAddr) -> stun_codec::Message<Attr> {
    let m = oracle(reply);
    assert_eq!(m.class(), MessageClass::SuccessResponse);
    assert_eq!(m.method().as_u16(), METHOD_BINDING);
    assert_eq!(m.transaction_id().as_bytes(), request_txid);
    assert_eq!(
        m.get_attribute::<XorMappedAddress>().unwrap().address(),
        src
    );
    m
}

fn attr_types(m: &stun_codec::Message<Attr>) -> Vec<u16> {
    use stun_codec::Attribute as _;
    m.attributes().map(|a| a.get_type().as_u16()).collect()
}

// ---------------------------------------------------------------- RFC 5769 vectors

#[test]
fn rfc5769_sample_request_parses_and_its_fingerprint_verifies() {
    let req = rfc5769_request();
    let m = Message::parse(&req).unwrap();
    assert_eq!(m.message_type(), BINDING_REQUEST);
    assert_eq!(m.class(), Class::Request);
    assert!(m.has_magic_cookie());
    assert_eq!(m.transaction_id(), &req[8..20]);
    assert_eq!(m.fingerprint(), FingerprintStatus::Valid);
    assert_eq!(m.attribute(attr::SOFTWARE), Some(&b"STUN test client"[..]));
    assert_eq!(m.attribute(attr::USERNAME), Some(&b"evtj:h6vY"[..]));
    assert_eq!(
        m.attribute(attr::PRIORITY),
        Some(&[0x6e, 0x00, 0x01, 0xff][..])
    );
    let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
    assert_eq!(
        types,
        [
            attr::SOFTWARE,
            attr::PRIORITY,
            attr::ICE_CONTROLLED,
            attr::USERNAME,
            attr::MESSAGE_INTEGRITY,
            attr::FINGERPRINT
        ]
    );
}

/// Our decision: PRIORITY (ICE) is understood and ignored, USERNAME/MESSAGE-INTEGRITY are
/// ignored (no authentication), so the ICE agent's request gets its reflexive address, with a
/// FINGERPRINT because the request had one.
#[test]
fn rfc5769_sample_request_is_answered_with_fingerprint() {
    let req = rfc5769_request();
    let (outcome, reply) = run(&req, v4(), &udp());
    assert!(matches!(
        outcome,
        Outcome::Success {
            change: Change::NONE,
            response_port: None,
            ..
        }
    ));
    let m = expect_success(&reply, &req[8..20], v4());
    assert_eq!(
        attr_types(&m),
        [attr::XOR_MAPPED_ADDRESS, attr::FINGERPRINT]
    );
    assert_eq!(
        Message::parse(&reply).unwrap().fingerprint(),
        FingerprintStatus::Valid
    );
}

#[test]
fn rfc5769_sample_request_with_a_flipped_bit_has_a_bad_fingerprint() {
    let mut req = rfc5769_request();
    req[30] ^= 0x01; // inside SOFTWARE
    assert_eq!(
        Message::parse(&req).unwrap().fingerprint(),
        FingerprintStatus::Invalid
    );
    assert_eq!(run(&req, v4(), &udp()).0, Outcome::BadFingerprint);
}

#[test]
fn rfc5769_ipv4_response_decodes_to_the_sample_address() {
    let resp = rfc5769_response_v4();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.method(), METHOD_BINDING);
    assert_eq!(m.fingerprint(), FingerprintStatus::Valid);
    assert_eq!(m.mapped_address(), Some(v4()));
    assert_eq!(m.attribute(attr::SOFTWARE), Some(&b"test vector"[..]));
    // A response is never answered.
    assert_eq!(run(&resp, v4(), &udp()).0, Outcome::Ignored);
}

#[test]
fn rfc5769_ipv6_response_decodes_to_the_sample_address() {
    let resp = rfc5769_response_v6();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.fingerprint(), FingerprintStatus::Valid);
    assert_eq!(m.mapped_address(), Some(v6()));
    assert_eq!(
        m.address(attr::XOR_MAPPED_ADDRESS),
        Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0x1234, 0x5678, 0x11, 0x2233, 0x4455, 0x6677
            )),
            32853
        ))
    );
    assert_eq!(run(&resp, v6(), &udp()).0, Outcome::Ignored);
}

/// The §2.4 vector is checked with stun_codec's long-term MESSAGE-INTEGRITY (so the bytes
/// here are the RFC's), then answered without authentication.
#[test]
fn rfc5769_long_term_request_is_answered_without_authentication() {
    let req = rfc5769_long_term_request();
    let m = oracle(&req);
    let username = m.get_attribute::<Username>().unwrap();
    assert_eq!(
        username.name(),
        "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}"
    );
    let realm = m.get_attribute::<Realm>().unwrap();
    assert_eq!(realm.text(), "example.org");
    m.get_attribute::<MessageIntegrity>()
        .unwrap()
        .check_long_term_credential(username, realm, "TheMatrIX")
        .expect("RFC 5769 §2.4 vector transcribed correctly");

    let (outcome, reply) = run(&req, v6(), &udp());
    assert!(matches!(outcome, Outcome::Success { .. }));
    let r = expect_success(&reply, &req[8..20], v6());
    // No FINGERPRINT (the request had none), no MESSAGE-INTEGRITY.
    assert_eq!(attr_types(&r), [attr::XOR_MAPPED_ADDRESS]);
}

// ---------------------------------------------------------------- plain requests

#[test]
fn plain_request_gets_the_minimal_reply() {
    let req = binding_request(TXID, None, false);
    assert_eq!(req.len(), 20);
    let (outcome, reply) = run(&req, v4(), &udp());
    assert_eq!(
        outcome,
        Outcome::Success {
            len: 32,
            change: Change::NONE,
            response_port: None,
        }
    );
    let m = expect_success(&reply, &TXID, v4());
    assert_eq!(attr_types(&m), [attr::XOR_MAPPED_ADDRESS]);

    let (_, reply6) = run(&req, v6(), &udp());
    assert_eq!(reply6.len(), 44);
    expect_success(&reply6, &TXID, v6());
}

#[test]
fn fast_path_and_general_path_agree() {
    // The same request with an ignorable attribute goes through the general parser.
    let plain = binding_request(TXID, None, false);
    let with_optional = build(BINDING_REQUEST, &[(0xC0DE, b"xyz")], false);
    for src in [
        v4(),
        v6(),
        "[::1]:1".parse().unwrap(),
        "10.0.0.1:0".parse().unwrap(),
    ] {
        let (_, a) = run(&plain, src, &udp());
        let (_, b) = run(&with_optional, src, &udp());
        assert_eq!(a, b, "{src}");
    }
}

#[test]
fn software_is_added_only_when_configured() {
    let req = binding_request(TXID, None, true);
    let ctx = udp().with_software(Some("ferry 0.1")).unwrap();
    let (_, reply) = run(&req, v4(), &ctx);
    let m = expect_success(&reply, &TXID, v4());
    assert_eq!(
        m.get_attribute::<Software>().unwrap().description(),
        "ferry 0.1"
    );
    assert_eq!(
        attr_types(&m),
        [attr::XOR_MAPPED_ADDRESS, attr::SOFTWARE, attr::FINGERPRINT]
    );
    // Fast path too.
    let (_, reply) = run(&binding_request(TXID, None, false), v4(), &ctx);
    assert_eq!(
        oracle(&reply)
            .get_attribute::<Software>()
            .unwrap()
            .description(),
        "ferry 0.1"
    );

    let long = "x".repeat(MAX_SOFTWARE_CHARS + 1);
    assert_eq!(
        udp().with_software(Some(&long)).unwrap_err(),
        SoftwareTooLong { chars: 128 }
    );
    assert!(udp().with_software(Some(&long[1..])).is_ok());
}

/// Tailscale's request: SOFTWARE "tailnode" and FINGERPRINT, built here by stun_codec.
#[test]
fn tailscale_style_request_is_answered() {
    let txid = TransactionId::new(TXID);
    let mut msg = stun_codec::Message::<Attr>::new(
        MessageClass::Request,
        stun_codec::rfc5389::methods::BINDING,
        txid,
    );
    msg.add_attribute(Software::new("tailnode".to_owned()).unwrap());
    let fp = Fingerprint::new(&msg).unwrap();
    msg.add_attribute(fp);
    let req = MessageEncoder::<Attr>::new()
        .encode_into_bytes(msg)
        .unwrap();
    assert_eq!(req.len(), 20 + 12 + 8);

    let (outcome, reply) = run(&req, v4(), &udp());
    assert!(matches!(outcome, Outcome::Success { .. }));
    let m = expect_success(&reply, &TXID, v4());
    assert_eq!(
        attr_types(&m),
        [attr::XOR_MAPPED_ADDRESS, attr::FINGERPRINT]
    );
}

#[test]
fn binding_request_helper_is_read_by_stun_codec() {
    for (sw, fp) in [
        (None, false),
        (Some("tailnode"), true),
        (Some("abc"), false),
    ] {
        let req = binding_request(TXID, sw, fp);
        let m = oracle(&req);
        assert_eq!(m.class(), MessageClass::Request);
        assert_eq!(
            m.get_attribute::<Software>()
                .map(|s| s.description().to_owned()),
            sw.map(str::to_owned)
        );
        assert_eq!(m.get_attribute::<Fingerprint>().is_some(), fp);
    }
}

#[test]
fn ipv4_mapped_source_is_reported_as_ipv4() {
    let mapped: SocketAddr = "[::ffff:192.0.2.1]:32853".parse().unwrap();
    let (_, reply) = run(&binding_request(TXID, None, false), mapped, &udp());
    expect_success(&reply, &TXID, v4());
}

#[test]
fn handle_is_deterministic() {
    let ctx = udp().with_software(Some("x")).unwrap();
    for req in [rfc5769_request(), binding_request(TXID, Some("a"), true)] {
        assert_eq!(run(&req, v6(), &ctx), run(&req, v6(), &ctx));
    }
}

// ---------------------------------------------------------------- what is not answered

#[test]
fn indications_and_responses_are_ignored() {
    let indication = build(BINDING_INDICATION, &[], false);
    assert_eq!(run(&indication, v4(), &udp()).0, Outcome::Ignored);
    let with_fp = build(BINDING_INDICATION, &[(attr::SOFTWARE, b"x")], true);
    assert_eq!(run(&with_fp, v4(), &udp()).0, Outcome::Ignored);
    // Even an indication with an unknown comprehension-required attribute: never answered.
    let odd = build(BINDING_INDICATION, &[(0x7777, b"")], false);
    assert_eq!(run(&odd, v4(), &udp()).0, Outcome::Ignored);
    assert_eq!(
        run(&build(BINDING_SUCCESS, &[], false), v4(), &udp()).0,
        Outcome::Ignored
    );
    assert_eq!(
        run(&build(BINDING_ERROR, &[], false), v4(), &udp()).0,
        Outcome::Ignored
    );
    // A TURN Send indication (method 0x006).
    let send = build(message_type(0x006, Class::Indication), &[], false);
    assert_eq!(run(&send, v4(), &udp()).0, Outcome::Ignored);
    assert_eq!(Outcome::Ignored.result(), RequestResult::Ignored);
}

/// Datagrams that are not STUN: dropped without a reply, counted as malformed.
#[test]
fn malformed_datagrams_are_dropped() {
    let ok = build(BINDING_REQUEST, &[(attr::SOFTWARE, b"abcd")], false);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one byte", vec![0]),
        ("19 bytes", ok[..19].to_vec()),
        ("header claims 8 body bytes, has none", {
            let mut m = ok[..20].to_vec();
            m[3] = 8;
            m
        }),
        ("trailing bytes beyond the length", {
            let mut m = binding_request(TXID, None, false);
            m.extend_from_slice(&[0; 4]);
            m
        }),
        ("length not a multiple of 4", {
            let mut m = binding_request(TXID, None, false);
            m[3] = 2;
            m.extend_from_slice(&[0; 2]);
            m
        }),
        ("top bit set", {
            let mut m = binding_request(TXID, None, false);
            m[0] |= 0x80;
            m
        }),
        ("second bit set (e.g. RTP/DTLS-ish)", {
            let mut m = binding_request(TXID, None, false);
            m[0] |= 0x40;
            m
        }),
        ("attribute longer than the message", {
            let mut m = ok.clone();
            m[22..24].copy_from_slice(&8u16.to_be_bytes());
            m
        }),
        ("attribute padding past the end", {
            let mut m = ok.clone();
            m[22..24].copy_from_slice(&5u16.to_be_bytes());
            m
        }),
        ("attribute header cut short", {
            // 4 body bytes: one attribute header claiming 4 value bytes that are absent.
            build(BINDING_REQUEST, &[(attr::SOFTWARE, b"")], false)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 23 { 4 } else { b })
                .collect()
        }),
        ("FINGERPRINT not last", {
            let mut m = build(BINDING_REQUEST, &[], true);
            m.extend_from_slice(&[0x80, 0x22, 0, 0]);
            m[3] += 4;
            m
        }),
        ("FINGERPRINT of the wrong size", {
            build(BINDING_REQUEST, &[(attr::FINGERPRINT, &[0; 8])], false)
        }),
        (
            "cookie-less, not a Binding request",
            build_classic(0x0002, &[]),
        ),
        (
            "cookie-less Binding response",
            build_classic(BINDING_SUCCESS, &[]),
        ),
    ];
    // Random-looking junk of STUN size.
    cases.push((
        "junk",
        (0u8..48).map(|i| i.wrapping_mul(37) | 0xC0).collect(),
    ));
    for (name, bytes) in &cases {
        let (outcome, reply) = run(bytes, v4(), &udp());
        assert_eq!(outcome, Outcome::Malformed, "{name}");
        assert_eq!(outcome.result(), RequestResult::Malformed, "{name}");
        assert!(reply.is_empty(), "{name}");
        assert!(
            Message::parse(bytes).is_err() || !bytes[4..8].eq(&MAGIC_COOKIE.to_be_bytes()),
            "{name}"
        );
    }
}

#[test]
fn bad_fingerprint_is_dropped_and_a_good_one_is_optional() {
    let mut req = binding_request(TXID, Some("tailnode"), true);
    let last = req.len() - 1;
    req[last] ^= 0xFF;
    let (outcome, reply) = run(&req, v4(), &udp());
    assert_eq!(outcome, Outcome::BadFingerprint);
    assert_eq!(outcome.result(), RequestResult::BadFingerprint);
    assert!(reply.is_empty());
    // Same request without FINGERPRINT: fine, and the reply has none.
    let (_, reply) = run(
        &binding_request(TXID, Some("tailnode"), false),
        v4(),
        &udp(),
    );
    assert_eq!(attr_types(&oracle(&reply)), [attr::XOR_MAPPED_ADDRESS]);
}

// ---------------------------------------------------------------- error responses

#[test]
fn unknown_comprehension_required_attributes_get_420() {
    let req = build(
        BINDING_REQUEST,
        &[
            (0x7F00, b"a"),
            (0xC000, b"optional"),
            (0x0030, b""),
            (0x7F00, b"dup"),
        ],
        true,
    );
    let (outcome, reply) = run(&req, v4(), &udp());
    assert_eq!(
        outcome,
        Outcome::ErrorResponse {
            len: reply.len(),
            code: 420
        }
    );
    assert_eq!(outcome.result(), RequestResult::ErrorResponse);
    let m = oracle(&reply);
    assert_eq!(m.class(), MessageClass::ErrorResponse);
    assert_eq!(m.method().as_u16(), METHOD_BINDING);
    assert_eq!(m.transaction_id().as_bytes(), &TXID);
    assert_eq!(m.get_attribute::<ErrorCode>().unwrap().code(), 420);
    let unknown: Vec<u16> = m
        .get_attribute::<UnknownAttributes>()
        .unwrap()
        .unknowns()
        .iter()
        .map(|t| t.as_u16())
        .collect();
    assert_eq!(unknown, [0x7F00, 0x0030]);
    // FINGERPRINT echoed on error responses too (stun_codec verified it).
    assert!(m.get_attribute::<Fingerprint>().is_some());
    assert!(reply.len() <= req.len() + 20);
}

#[test]
fn unknown_comprehension_optional_attributes_are_ignored() {
    let req = build(
        BINDING_REQUEST,
        &[(0x8FFF, b"whatever"), (0xFFFF, b"")],
        false,
    );
    assert!(matches!(run(&req, v4(), &udp()).0, Outcome::Success { .. }));
}

#[test]
fn unknown_attribute_list_is_deduplicated_and_capped() {
    let types: Vec<u16> = (0x7000..0x7000 + 40).collect();
    let attrs: Vec<(u16, &[u8])> = types.iter().map(|&t| (t, &b""[..])).collect();
    let (_, reply) = run(&build(BINDING_REQUEST, &attrs, false), v4(), &udp());
    let m = Message::parse(&reply).unwrap();
    assert_eq!(m.error_code().unwrap().0, 420);
    assert_eq!(m.unknown_attributes(), types[..MAX_UNKNOWN_LISTED]);
}

/// ICE connectivity-check attributes: PRIORITY and USE-CANDIDATE are understood (ignored),
/// ICE-CONTROLLED/-CONTROLLING are comprehension-optional.
#[test]
fn ice_attributes_are_accepted() {
    let req = build(
        BINDING_REQUEST,
        &[
            (attr::PRIORITY, &[0x6e, 0, 1, 0xff]),
            (attr::USE_CANDIDATE, b""),
            (attr::ICE_CONTROLLING, &[1; 8]),
            (attr::ICE_CONTROLLED, &[2; 8]),
        ],
        true,
    );
    let (outcome, reply) = run(&req, v4(), &udp());
    assert!(matches!(outcome, Outcome::Success { .. }));
    expect_success(&reply, &TXID, v4());
}

#[test]
fn authentication_attributes_are_ignored() {
    let req = build(
        BINDING_REQUEST,
        &[
            (attr::USERNAME, b"user"),
            (attr::USERHASH, &[0; 32]),
            (attr::REALM, b"example.org"),
            (attr::NONCE, b"nonce"),
            (attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]),
            (attr::MESSAGE_INTEGRITY, &[0; 20]),
            (attr::MESSAGE_INTEGRITY_SHA256, &[0; 32]),
        ],
        true,
    );
    let (outcome, reply) = run(&req, v4(), &udp());
    assert!(matches!(outcome, Outcome::Success { .. }));
    assert_eq!(
        attr_types(&expect_success(&reply, &TXID, v4())),
        [attr::XOR_MAPPED_ADDRESS, attr::FINGERPRINT]
    );
}

/// RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored, unknown ones included.
#[test]
fn attributes_after_message_integrity_are_ignored() {
    let after = build(
        BINDING_REQUEST,
        &[(attr::MESSAGE_INTEGRITY, &[0; 20]), (0x7F01, b"")],
        true,
    );
    assert!(matches!(
        run(&after, v4(), &udp()).0,
        Outcome::Success { .. }
    ));
    let after256 = build(
        BINDING_REQUEST,
        &[(attr::MESSAGE_INTEGRITY_SHA256, &[0; 32]), (0x7F01, b"")],
        false,
    );
    assert!(matches!(
        run(&after256, v4(), &udp()).0,
        Outcome::Success { .. }
    ));
    let before = build(
        BINDING_REQUEST,
        &[(0x7F01, b""), (attr::MESSAGE_INTEGRITY, &[0; 20])],
        false,
    );
    assert_eq!(
        run(&before, v4(), &udp()).0.result(),
        RequestResult::ErrorResponse
    );
}

/// Other methods (here TURN Allocate, 0x003) get 400 from this Binding-only server.
#[test]
fn other_methods_get_400() {
    let req = build(
        message_type(0x003, Class::Request),
        &[(0x0019, &[17, 0, 0, 0])],
        false,
    );
    let (outcome, reply) = run(&req, v4(), &udp());
    assert_eq!(
        outcome,
        Outcome::ErrorResponse {
            len: reply.len(),
            code: 400
        }
    );
    let m = Message::parse(&reply).unwrap();
    assert_eq!(m.message_type(), 0x0113);
    assert_eq!(m.class(), Class::Error);
    assert_eq!(m.method(), 0x003);
    assert_eq!(m.error_code(), Some((400, "Bad Request")));
    assert_eq!(reply.len(), 40);
}

// ---------------------------------------------------------------- RFC 3489

fn classic_mapped(reply: &[u8]) -> Option<SocketAddr> {
    Message::parse(reply).unwrap().address(attr::MAPPED_ADDRESS)
}

#[test]
fn rfc3489_request_gets_mapped_address_and_the_16_byte_id() {
    let req = build_classic(BINDING_REQUEST, &[]);
    let (outcome, reply) = run(&req, v4(), &udp());
    assert!(matches!(outcome, Outcome::Success { .. }));
    assert_eq!(&reply[..2], &BINDING_SUCCESS.to_be_bytes());
    assert_eq!(&reply[4..20], &[0xA5; 16]);
    let m = Message::parse(&reply).unwrap();
    assert!(!m.has_magic_cookie());
    assert_eq!(m.transaction_id(), &[0xA5; 16]);
    let types: Vec<u16> = m.attributes().map(|a| a.typ).collect();
    assert_eq!(types, [attr::MAPPED_ADDRESS]);
    assert_eq!(classic_mapped(&reply), Some(v4()));
    // Exact bytes of the attribute: family 1, port, address in clear.
    assert_eq!(&reply[20..], &hex("00010008 0001 8055 c0000201")[..]);
}

#[test]
fn rfc3489_request_from_ipv6_gets_an_ipv6_mapped_address() {
    let (_, reply) = run(&build_classic(BINDING_REQUEST, &[]), v6(), &udp());
    assert_eq!(reply.len(), 20 + 24);
    assert_eq!(classic_mapped(&reply), Some(v6()));
}

#[test]
fn rfc3489_response_address_is_refused_with_420() {
    let req = build_classic(
        BINDING_REQUEST,
        &[(attr::RESPONSE_ADDRESS, &[0, 1, 0, 80, 1, 2, 3, 4])],
    );
    let (outcome, reply) = run(&req, v4(), &udp());
    assert_eq!(outcome.result(), RequestResult::ErrorResponse);
    let m = Message::parse(&reply).unwrap();
    assert_eq!(m.message_type(), BINDING_ERROR);
    assert_eq!(m.transaction_id(), &[0xA5; 16]);
    assert_eq!(m.error_code().unwrap().0, 420);
    // RFC 3489 pads an odd list by repeating an entry.
    assert_eq!(
        m.unknown_attributes(),
        [attr::RESPONSE_ADDRESS, attr::RESPONSE_ADDRESS]
    );
}

#[test]
fn rfc3489_over_tcp_is_malformed() {
    let tcp = Ctx::new(Transport::Tcp);
    assert_eq!(
        run(&build_classic(BINDING_REQUEST, &[]), v4(), &tcp).0,
        Outcome::Malformed
    );
}

// ---------------------------------------------------------------- RFC 5780

fn grid() -> Grid {
    Grid {
        ips: [
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
        ],
        ports: [3478, 3479],
    }
}

fn change_request(ip: bool, port: bool) -> [u8; 4] {
    [0, 0, 0, (u8::from(ip) << 2) | (u8::from(port) << 1)]
}

/// RFC 5780 §6.1: without an alternate address, CHANGE-REQUEST gets 420 — whatever the flags.
#[test]
fn change_request_without_rfc5780_gets_420() {
    for (ip, port) in [(false, false), (true, false), (true, true)] {
        let req = build(
            BINDING_REQUEST,
            &[(attr::CHANGE_REQUEST, &change_request(ip, port))],
            false,
        );
        let (_, reply) = run(&req, v4(), &udp());
        let m = oracle(&reply);
        assert_eq!(m.get_attribute::<ErrorCode>().unwrap().code(), 420);
        assert_eq!(
            m.get_attribute::<UnknownAttributes>().unwrap().unknowns()[0].as_u16(),
            attr::CHANGE_REQUEST
        );
    }
}

/// RFC 3489 clients (Debian's `stun`) send CHANGE-REQUEST with no flag on their first test:
/// answered from the same socket. A real change cannot be done without RFC 5780: 420.
#[test]
fn rfc3489_change_request_without_rfc5780() {
    let none = build_classic(
        BINDING_REQUEST,
        &[(attr::CHANGE_REQUEST, &change_request(false, false))],
    );
    let (outcome, reply) = run(&none, v4(), &udp());
    assert!(matches!(
        outcome,
        Outcome::Success {
            change: Change::NONE,
            response_port: None,
            ..
        }
    ));
    assert_eq!(classic_mapped(&reply), Some(v4()));
    for (ip, port) in [(true, false), (false, true), (true, true)] {
        let req = build_classic(
            BINDING_REQUEST,
            &[(attr::CHANGE_REQUEST, &change_request(ip, port))],
        );
        let (outcome, reply) = run(&req, v4(), &udp());
        assert!(matches!(outcome, Outcome::ErrorResponse { code: 420, .. }));
        assert_eq!(
            Message::parse(&reply).unwrap().unknown_attributes(),
            [attr::CHANGE_REQUEST, attr::CHANGE_REQUEST]
        );
    }
}

#[test]
fn rfc5780_reply_carries_origin_and_other_address() {
    let g = grid();
    let local = GridPos::default();
    let ctx = udp().with_rfc5780(g, local);
    let req = binding_request(TXID, None, false);
    let (outcome, reply) = run(&req, v4(), &ctx);
    assert_eq!(
        outcome,
        Outcome::Success {
            len: reply.len(),
            change: Change::NONE,
            response_port: None,
        }
    );
    let m = expect_success(&reply, &TXID, v4());
    assert_eq!(m.get_attribute::<MappedAddress>().unwrap().address(), v4());
    assert_eq!(
        m.get_attribute::<ResponseOrigin>().unwrap().address(),
        "198.51.100.1:3478".parse().unwrap()
    );
    assert_eq!(
        m.get_attribute::<OtherAddress>().unwrap().address(),
        "198.51.100.2:3479".parse().unwrap()
    );
}

/// RFC 5780 Table 1, from every socket of the grid and for every flag combination.
#[test]
fn rfc5780_change_request_selects_the_sending_socket() {
    let g = grid();
    for local in GridPos::ALL {
        let ctx = udp().with_rfc5780(g, local);
        for (ip, port) in [(false, false), (true, false), (false, true), (true, true)] {
            let req = build(
                BINDING_REQUEST,
                &[(attr::CHANGE_REQUEST, &change_request(ip, port))],
                true,
            );
            let (outcome, reply) = run(&req, v6(), &ctx);
            let change = Change { ip, port };
            assert_eq!(
                outcome,
                Outcome::Success {
                    len: reply.len(),
                    change,
                    response_port: None,
                }
            );
            let from = g.addr(local.changed(change));
            assert_eq!(from.ip(), g.ips[usize::from(local.alternate_ip ^ ip)]);
            assert_eq!(
                from.port(),
                g.ports[usize::from(local.alternate_port ^ port)]
            );
            let m = expect_success(&reply, &TXID, v6());
            assert_eq!(m.get_attribute::<ResponseOrigin>().unwrap().address(), from);
            assert_eq!(
                m.get_attribute::<OtherAddress>().unwrap().address(),
                g.addr(GridPos {
                    alternate_ip: !local.alternate_ip,
                    alternate_port: !local.alternate_port
                })
            );
        }
    }
}

#[test]
fn rfc5780_padding_is_not_supported() {
    let ctx = udp().with_rfc5780(grid(), GridPos::default());
    let req = build(BINDING_REQUEST, &[(attr::PADDING, &[0; 64])], false);
    let (_, reply) = run(&req, v4(), &ctx);
    assert_eq!(
        Message::parse(&reply).unwrap().unknown_attributes(),
        [attr::PADDING]
    );
    // With RESPONSE-PORT: 400 (RFC 5780 §6.1).
    let both = build(
        BINDING_REQUEST,
        &[
            (attr::PADDING, &[0; 8]),
            (attr::RESPONSE_PORT, &[0x30, 0x39, 0, 0]),
        ],
        false,
    );
    let (outcome, _) = run(&both, v4(), &ctx);
    assert!(matches!(outcome, Outcome::ErrorResponse { code: 400, .. }));
}

/// RESPONSE-PORT (as coturn's turnutils_stunclient sends it, with CHANGE-REQUEST) is honoured
/// with RFC 5780 on, and gets 420 without.
#[test]
fn rfc5780_response_port() {
    let req = build(
        BINDING_REQUEST,
        &[
            (attr::RESPONSE_PORT, &[0x30, 0x39, 0, 0]),
            (attr::CHANGE_REQUEST, &change_request(true, true)),
        ],
        false,
    );
    let ctx = udp().with_rfc5780(grid(), GridPos::default());
    let (outcome, reply) = run(&req, v4(), &ctx);
    let change = Change {
        ip: true,
        port: true,
    };
    assert_eq!(
        outcome,
        Outcome::Success {
            len: reply.len(),
            change,
            response_port: Some(12345),
        }
    );
    let r = outcome.reply().unwrap();
    assert!(!r.is_direct());
    assert_eq!(r.destination(v4()), "192.0.2.1:12345".parse().unwrap());
    expect_success(&reply, &TXID, v4());

    let (_, reply) = run(&req, v4(), &udp());
    assert_eq!(
        Message::parse(&reply).unwrap().unknown_attributes(),
        [attr::RESPONSE_PORT, attr::CHANGE_REQUEST]
    );
    let zero = build(
        BINDING_REQUEST,
        &[(attr::RESPONSE_PORT, &[0, 0, 0, 0])],
        false,
    );
    assert_eq!(run(&zero, v4(), &ctx).0, Outcome::Malformed);
}

#[test]
fn rfc5780_is_udp_only() {
    let tcp = Ctx::new(Transport::Tcp).with_rfc5780(grid(), GridPos::default());
    let req = build(
        BINDING_REQUEST,
        &[(attr::CHANGE_REQUEST, &change_request(false, false))],
        false,
    );
    assert_eq!(
        run(&req, v4(), &tcp).0.result(),
        RequestResult::ErrorResponse
    );
    let (_, reply) = run(&binding_request(TXID, None, false), v4(), &tcp);
    assert_eq!(attr_types(&oracle(&reply)), [attr::XOR_MAPPED_ADDRESS]);
}

#[test]
fn rfc5780_change_request_of_the_wrong_size_is_malformed() {
    let ctx = udp().with_rfc5780(grid(), GridPos::default());
    let req = build(BINDING_REQUEST, &[(attr::CHANGE_REQUEST, &[0; 8])], false);
    assert_eq!(run(&req, v4(), &ctx).0, Outcome::Malformed);
}

#[test]
fn rfc5780_classic_reply_has_source_and_changed_address() {
    let g = grid();
    let ctx = udp().with_rfc5780(g, GridPos::default());
    let req = build_classic(
        BINDING_REQUEST,
        &[(attr::CHANGE_REQUEST, &change_request(true, false))],
    );
    let (outcome, reply) = run(&req, v4(), &ctx);
    assert_eq!(
        outcome,
        Outcome::Success {
            len: reply.len(),
            change: Change {
                ip: true,
                port: false
            },
            response_port: None,
        }
    );
    let m = Message::parse(&reply).unwrap();
    assert_eq!(m.address(attr::MAPPED_ADDRESS), Some(v4()));
    assert_eq!(
        m.address(attr::SOURCE_ADDRESS),
        Some("198.51.100.2:3478".parse().unwrap())
    );
    assert_eq!(
        m.address(attr::CHANGED_ADDRESS),
        Some("198.51.100.2:3479".parse().unwrap())
    );
}

// ---------------------------------------------------------------- framing helpers

#[test]
fn message_type_composition_round_trips() {
    for method in 0..0x1000u16 {
        for class in [
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ] {
            let t = message_type(method, class);
            assert_eq!(t & 0xC000, 0);
            assert_eq!((method_of(t), class_of(t)), (method, class));
        }
    }
    assert_eq!(
        message_type(METHOD_BINDING, Class::Request),
        BINDING_REQUEST
    );
    assert_eq!(
        message_type(METHOD_BINDING, Class::Indication),
        BINDING_INDICATION
    );
    assert_eq!(
        message_type(METHOD_BINDING, Class::Success),
        BINDING_SUCCESS
    );
    assert_eq!(message_type(METHOD_BINDING, Class::Error), BINDING_ERROR);
}

/// The largest replies we can produce still fit in MAX_RESPONSE_LEN.
#[test]
fn worst_case_replies_fit() {
    // 127 four-byte characters: the longest SOFTWARE in bytes.
    let sw = "\u{1F600}".repeat(MAX_SOFTWARE_CHARS);
    let ctx6 = udp().with_software(Some(&sw)).unwrap().with_rfc5780(
        Grid {
            ips: [
                "2001:db8::1".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
            ],
            ports: [1, 2],
        },
        GridPos::default(),
    );
    let (_, reply) = run(&binding_request(TXID, None, true), v6(), &ctx6);
    assert!(reply.len() <= MAX_RESPONSE_LEN);
    oracle(&reply);
    let types: Vec<u16> = (0x7000..0x7000 + 64).collect();
    let attrs: Vec<(u16, &[u8])> = types.iter().map(|&t| (t, &b""[..])).collect();
    let (outcome, reply) = run(&build(BINDING_REQUEST, &attrs, true), v6(), &ctx6);
    assert_eq!(outcome.result(), RequestResult::ErrorResponse);
    assert!(reply.len() <= MAX_RESPONSE_LEN);
    oracle(&reply);
}

#[test]
#[should_panic(expected = "MAX_RESPONSE_LEN")]
fn small_output_buffer_is_a_programming_error() {
    let mut out = [0u8; 64];
    handle(&binding_request(TXID, None, false), v4(), &udp(), &mut out);
}

#[test]
fn result_labels_are_stable() {
    let labels: Vec<&str> = RequestResult::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "success",
            "error_response",
            "malformed",
            "ignored",
            "bad_fingerprint"
        ]
    );
    for (i, r) in RequestResult::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
    assert_eq!(Transport::Udp.as_str(), "udp");
    assert_eq!(Transport::Tcp.as_str(), "tcp");
}
