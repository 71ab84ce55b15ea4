//! The client side of a DERP connection's start (`ClientHandshake`): an HTTP response head and
//! the ServerKey/ServerInfo frames, fed in arbitrary read sizes. The ServerInfo JSON is sealed
//! properly to the client's key when asked, so its parser is reached.
#![no_main]
use arbitrary::Arbitrary;
use bytes::BytesMut;
use ferry_proto::derp::client::{ClientHandshake, HttpUpgrade, Step, Upgrade};
use ferry_proto::derp::{self as derp, frame_type as ft, ClientInfo, SecretKey};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    chunk: u8,
    http: bool,
    head: &'a [u8],
    server_key: bool,
    info: Option<&'a [u8]>,
    tail: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let server = SecretKey::from_bytes([7; 32]);
    let client = SecretKey::from_bytes([9; 32]);
    let mut stream = input.head.to_vec();
    if input.server_key {
        let mut out = BytesMut::new();
        derp::put_frame(&mut out, ft::SERVER_KEY, &[&derp::server_key_payload(&server.public())]);
        stream.extend_from_slice(&out);
    }
    if let Some(json) = input.info {
        let mut out = BytesMut::new();
        let sealed = derp::seal(&server, &client.public(), json);
        derp::put_frame(&mut out, ft::SERVER_INFO, &[&sealed]);
        stream.extend_from_slice(&out);
    }
    stream.extend_from_slice(input.tail);

    let upgrade = if input.http {
        Upgrade::Http(HttpUpgrade::new("relay.example:443", "ferry-fuzz"))
    } else {
        Upgrade::AlreadyUpgraded
    };
    let (mut hs, _) = ClientHandshake::new(client, ClientInfo::default(), upgrade);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(usize::from(input.chunk).max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match hs.feed(&mut buf) {
                Ok(Step::NeedMore) => break,
                Ok(Step::ServerKey { .. }) => continue,
                Ok(Step::Established(e)) => {
                    // Only a ServerKey frame names the server; a forged one must have come
                    // from the input, so just check that the machine says it is done.
                    let _ = e.server_key;
                    return;
                }
                Err(e) => {
                    let _ = e.to_string(); // every error renders
                    return;
                }
            }
        }
    }
});
