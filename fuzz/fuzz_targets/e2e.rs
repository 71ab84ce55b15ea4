//! The end-to-end session layer (client-lib `e2e::Sessions`): two nodes with a real session
//! receive a fuzzed mix of genuine packets, genuine packets with one byte changed, replays and
//! raw bytes, while the clock moves. Oracles: plaintext only ever comes out of a genuine,
//! unmodified packet, and it is exactly what was sealed; a modified packet never yields any.
//! Noise runs with a deterministic RNG and memoized X25519 in this build (`cfg(fuzzing)`, see
//! client-lib/src/e2e_fuzzing.rs): the same results, without recomputing the curve per input.
#![no_main]
use arbitrary::Arbitrary;
use ferry_client::e2e::{fuzzing, Sessions};
use ferry_proto::derp::SecretKey;
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    /// A sends `payload` to B; `flip` changes one byte of each packet on the way; `replay`
    /// first sends B the last packet it accepted again.
    Send { payload: &'a [u8], flip: Option<(u16, u8)>, replay: bool },
    /// Raw bytes to B, as if from A.
    Raw(&'a [u8]),
    /// Time passes (seconds).
    Wait(u8),
}

fuzz_target!(|ops: Vec<Op<'_>>| {
    // Ephemeral keys from the first again: the handshakes' X25519 results come from the cache.
    fuzzing::start_input();
    let (ka, kb) = (SecretKey::from_bytes([1; 32]), SecretKey::from_bytes([2; 32]));
    let (pa, pb) = (fuzzing::public(&ka), fuzzing::public(&kb));
    let (mut a, mut b) = (Sessions::new(ka), Sessions::new(kb));
    let mut now = Instant::now();
    // The last packet B accepted with plaintext: the one a replay sends again.
    let mut accepted: Option<Vec<u8>> = None;
    for op in ops.into_iter().take(64) {
        match op {
            Op::Send { payload, flip, replay } => {
                if replay {
                    if let Some(p) = &accepted {
                        if let Ok(o) = b.open(&pa, p, now) {
                            assert!(o.plaintext.is_none(), "a replayed packet was accepted");
                        }
                    }
                }
                let Ok(packets) = a.seal(&pb, payload, now) else { continue };
                for mut p in packets {
                    let mut changed = false;
                    if let Some((at, x)) = flip.filter(|(_, x)| *x != 0) {
                        let at = usize::from(at) % p.len().max(1);
                        if let Some(byte) = p.get_mut(at) {
                            *byte ^= x;
                            changed = true;
                        }
                    }
                    let Ok(opened) = b.open(&pa, &p, now) else { continue };
                    if let Some(pt) = &opened.plaintext {
                        assert!(!changed, "a modified packet was accepted");
                        assert_eq!(pt.as_slice(), payload, "plaintext differs from what was sealed");
                        accepted = Some(p.clone());
                    }
                    // B's replies (handshake responses) go back to A unmodified, and what A
                    // then releases (data queued during the handshake) goes to B.
                    for r in opened.replies {
                        if let Ok(o) = a.open(&pb, &r, now) {
                            for r2 in o.replies {
                                let _ = b.open(&pa, &r2, now);
                            }
                        }
                    }
                }
            }
            Op::Raw(bytes) => {
                if let Ok(o) = b.open(&pa, bytes, now) {
                    assert!(o.plaintext.is_none(), "raw bytes decrypted to plaintext");
                }
            }
            Op::Wait(s) => {
                now += Duration::from_secs(u64::from(s));
                for (_, p) in a.poll(now) {
                    let _ = b.open(&pa, &p, now);
                }
                let _ = b.poll(now);
            }
        }
    }
});
