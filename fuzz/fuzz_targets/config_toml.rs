//! `ferry-relay`'s config-file loader (the binary's own TOML parsing into its settings tree,
//! compiled here from relay/src/bin/ferry-relay/{settings,file}.rs). Oracle: every refusal
//! renders, and names a line that exists in the file when it names one.
#![no_main]
#![allow(dead_code, unreachable_pub)]
use libfuzzer_sys::fuzz_target;

#[path = "../../relay/src/bin/ferry-relay/settings.rs"]
mod settings;
#[path = "../../relay/src/bin/ferry-relay/file.rs"]
mod file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = file::parse(text) {
        let msg = e.to_string();
        if let Some(rest) = msg.strip_prefix("line ") {
            let n: usize = rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
            let lines = text.matches('\n').count() + 1;
            assert!(n >= 1 && n <= lines, "line {n} of a {lines}-line file: {msg}");
        }
    }
});
