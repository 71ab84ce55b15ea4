//! The server side of the DERP handshake: the ClientInfo frame (client key, nonce, sealed JSON).
//! Half the inputs are sealed properly with a fixed client key, so the JSON parser behind the
//! box is reached; the other half go in raw (bad lengths, boxes that do not open).
#![no_main]
use ferry_fuzz::{key, MaybeSealed};
use ferry_proto::derp::{self as derp, ClientInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: MaybeSealed<'_>| {
    let (server, client) = (key(7), key(9));
    // ClientInfo: the client's key, then the box.
    let payload = input.payload(&[], &client, &server.public());
    if let Ok((key, info)) = derp::open_client_info(&server, &payload) {
        assert_eq!(key, client.public(), "a box opened for a key that did not seal it");
        // What the server understood survives its own encoding.
        let again = ClientInfo::from_json(&info.to_json()).expect("our own JSON parses");
        assert_eq!(again, info);
    }
    let _ = derp::parse_server_key(input.bytes);
    let _ = derp::ServerInfo::from_json(input.bytes);
});
