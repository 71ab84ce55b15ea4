//! The server side of the DERP handshake: the ClientInfo frame (client key, nonce, sealed JSON).
//! Half the inputs are sealed properly with a fixed client key, so the JSON parser behind the
//! box is reached; the other half go in raw (bad lengths, boxes that do not open).
#![no_main]
use arbitrary::Arbitrary;
use ferry_proto::derp::{self as derp, ClientInfo, SecretKey};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    seal: bool,
    bytes: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let server = SecretKey::from_bytes([7; 32]);
    let client = SecretKey::from_bytes([9; 32]);
    let payload = if input.seal {
        let mut p = client.public().0.to_vec();
        p.extend_from_slice(&derp::seal(&client, &server.public(), input.bytes));
        p
    } else {
        input.bytes.to_vec()
    };
    if let Ok((key, info)) = derp::open_client_info(&server, &payload) {
        assert_eq!(key, client.public(), "a box opened for a key that did not seal it");
        // What the server understood survives its own encoding.
        let again = ClientInfo::from_json(&info.to_json()).expect("our own JSON parses");
        assert_eq!(again, info);
    }
    let _ = derp::parse_server_key(input.bytes);
    let _ = derp::ServerInfo::from_json(input.bytes);
});
