//! The disco message parser (client-lib): arbitrary datagrams, and arbitrary plaintext sealed
//! properly (so the parser behind the box is reached). Oracle: what opens re-seals and re-opens
//! to the same message (a CallMeMaybe's or CallMeMaybeVia's addresses cut to the MAX_ENDPOINTS we send).
#![no_main]
use ferry_client::disco;
use ferry_fuzz::{key, MaybeSealed};
use ferry_proto::derp::DISCO_MAGIC;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: MaybeSealed<'_>| {
    let (ours, theirs) = (key(3), key(5));
    // A disco datagram: magic, the sender's key, the box.
    let packet = input.payload(&DISCO_MAGIC, &theirs, &ours.public());
    let _ = disco::is_disco(&packet);
    let _ = disco::sender(&packet);
    match disco::open(&ours, &packet, None) {
        Ok((from, msg)) => {
            assert_eq!(from, theirs.public(), "a box opened for a key that did not seal it");
            let again = disco::seal(&theirs, &ours.public(), &msg);
            let (_, msg2) = disco::open(&ours, &again, Some(&from)).expect("our own seal opens");
            // We read CallMeMaybes of any length (Tailscale's carry up to the MTU) but send at
            // most MAX_ENDPOINTS (documented, tested in disco.rs).
            let mut want = msg;
            match &mut want {
                disco::Message::CallMeMaybe { endpoints, .. } => {
                    endpoints.truncate(disco::MAX_ENDPOINTS)
                }
                disco::Message::CallMeMaybeVia(e) => e.addrs.truncate(disco::MAX_ENDPOINTS),
                _ => {}
            }
            assert_eq!(want, msg2);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
