//! The STUN server's request handler (`ferry_stun::proto::handle`) on arbitrary datagrams, over
//! UDP and TCP, with and without SOFTWARE and an RFC 5780 grid. Oracles: a reply fits the buffer,
//! parses with ferry's codec, carries a valid FINGERPRINT when it has one, echoes the request's
//! transaction id, and a direct success reply with the magic cookie is a Binding success that
//! `stun_codec` decodes to the requester's address.
#![no_main]
use arbitrary::Arbitrary;
use bytecodec::DecodeExt;
use ferry_proto::stun::{self as codec, FingerprintStatus, Message};
use ferry_stun::proto::{handle, Ctx, Grid, GridPos, Outcome, Transport, MAX_RESPONSE_LEN};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use stun_codec::rfc5389::attributes::XorMappedAddress;
use stun_codec::rfc5389::Attribute;
use stun_codec::MessageDecoder;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    tcp: bool,
    software: bool,
    grid: Option<u8>,
    v6: bool,
    ip: [u8; 16],
    port: u16,
    request: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let ip = if input.v6 {
        IpAddr::V6(Ipv6Addr::from(input.ip))
    } else {
        IpAddr::V4(Ipv4Addr::new(input.ip[0], input.ip[1], input.ip[2], input.ip[3]))
    };
    let src = SocketAddr::new(ip, input.port);
    let mut ctx = Ctx::new(if input.tcp { Transport::Tcp } else { Transport::Udp });
    if input.software {
        ctx = ctx.with_software(Some("ferry-fuzz")).expect("short");
    }
    if let Some(pos) = input.grid {
        let grid = Grid {
            ips: ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
            ports: [3478, 3479],
        };
        ctx = ctx.with_rfc5780(grid, GridPos::ALL[usize::from(pos % 4)]);
    }
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let outcome = handle(input.request, src, &ctx, &mut out);
    let Some(reply) = outcome.reply() else { return };
    assert!(reply.len <= MAX_RESPONSE_LEN);
    let bytes = &out[..reply.len];
    let m = Message::parse(bytes).expect("our own reply parses");
    assert_ne!(m.fingerprint(), FingerprintStatus::Invalid, "our own FINGERPRINT is wrong");
    assert_eq!(&bytes[4..20], &input.request[4..20], "the transaction id is not echoed");
    if let Outcome::Success { .. } = outcome {
        if reply.is_direct() && m.has_magic_cookie() {
            // A dual-stack socket sees an IPv4 client as ::ffff:a.b.c.d; the client is told
            // its IPv4 address.
            let src = SocketAddr::new(src.ip().to_canonical(), src.port());
            let b = codec::parse_binding_success(bytes).expect("a success reply reads back");
            assert_eq!(b.mapped, src);
            let theirs = MessageDecoder::<Attribute>::new()
                .decode_from_bytes(bytes)
                .expect("complete")
                .expect("stun_codec reads our reply");
            let xma = theirs.get_attribute::<XorMappedAddress>().expect("XOR-MAPPED-ADDRESS");
            assert_eq!(xma.address(), src);
        }
    }
});
