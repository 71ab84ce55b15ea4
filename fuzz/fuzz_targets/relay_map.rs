//! The client's relay map parser (`RelayMap::from_json`: Tailscale's DERPMap JSON, as derper,
//! Headscale and `ferry-relay derpmap` print it). Oracle: a map that parses survives its own
//! JSON encoding unchanged.
#![no_main]
use ferry_client::RelayMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match RelayMap::from_json(text) {
        Ok(map) => {
            let again = RelayMap::from_json(&map.to_json()).expect("our own JSON parses");
            assert_eq!(again, map);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
