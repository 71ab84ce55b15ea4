//! The disco message parser (client-lib): arbitrary datagrams, and arbitrary plaintext sealed
//! properly (so the parser behind the box is reached). Oracle: what opens re-seals and re-opens
//! to the same message.
#![no_main]
use arbitrary::Arbitrary;
use ferry_client::disco;
use ferry_proto::derp::{self as derp, SecretKey, DISCO_MAGIC};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    seal: bool,
    bytes: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let ours = SecretKey::from_bytes([3; 32]);
    let theirs = SecretKey::from_bytes([5; 32]);
    let packet = if input.seal {
        let mut p = DISCO_MAGIC.to_vec();
        p.extend_from_slice(theirs.public().as_bytes());
        p.extend_from_slice(&derp::seal(&theirs, &ours.public(), input.bytes));
        p
    } else {
        input.bytes.to_vec()
    };
    let _ = disco::is_disco(&packet);
    let _ = disco::sender(&packet);
    match disco::open(&ours, &packet, None) {
        Ok((from, msg)) => {
            assert_eq!(from, theirs.public(), "a box opened for a key that did not seal it");
            let again = disco::seal(&theirs, &ours.public(), &msg);
            let (_, msg2) = disco::open(&ours, &again, Some(&from)).expect("our own seal opens");
            assert_eq!(msg, msg2);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
