//! Only in fuzzing builds (`cargo fuzz` sets `--cfg fuzzing`): Noise with the same X25519
//! results, computed once instead of on every input.
//!
//! The `e2e` fuzz target runs two real Noise IK handshakes per input, about two dozen X25519
//! scalar multiplications, and they were 90 % of its time (perf, 2026-12-05): 10 M inputs
//! needed hours of both cores. None of that arithmetic is steered by the fuzzed bytes except on
//! the paths where the input carries a public key, so this resolver changes two things and
//! nothing else:
//!
//! - The RNG behind ephemeral keys is a hash of a per-thread counter that [`start_input`]
//!   resets: the n-th ephemeral key of every input is the same, and every input is
//!   reproducible. Within one input each key is still different (sessions renewed by a rekey
//!   get new keys, as in production).
//! - X25519 (public key of a private key, and DH; also `Sessions::new`'s own public key) is
//!   memoized per thread: a cached result is the
//!   one the real curve computed for the same inputs, by snow's own implementation. A public
//!   key from the fuzzer misses the cache and is computed for real. The caches are emptied when
//!   they pass [`CACHE_LIMIT`] entries, so memory stays bounded.
//!
//! Everything else (hashing, the AEAD, snow's state machine and ferry's session code) runs
//! unchanged.

use std::cell::RefCell;
use std::collections::HashMap;

use ferry_proto::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// Entries kept per cache before it is emptied.
pub const CACHE_LIMIT: usize = 1 << 16;

#[derive(Default)]
struct State {
    counter: u64,
    public: HashMap<[u8; 32], [u8; 32]>,
    shared: HashMap<([u8; 32], [u8; 32]), [u8; 32]>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Call at the start of each fuzz input: ephemeral keys start again from the first.
pub fn start_input() {
    STATE.with(|s| s.borrow_mut().counter = 0);
}

/// `key.public()`, memoized in the same cache (X25519 of the clamped key times the base point,
/// as snow computes it): `Sessions::new` and the harness ask for it on every input.
pub fn public(key: &SecretKey) -> PublicKey {
    let private = key.to_bytes();
    PublicKey(STATE.with(|s| {
        *bounded(&mut s.borrow_mut().public)
            .entry(private)
            .or_insert_with(|| key.public().0)
    }))
}

/// snow's default resolver with [`CounterRng`] and [`MemoDh`].
pub(crate) struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(CounterRng))
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(MemoDh::default())),
            _ => None,
        }
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

/// Deterministic bytes: SHA-256 of the per-thread counter, which moves on every call.
struct CounterRng;

impl Random for CounterRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        for chunk in dest.chunks_mut(32) {
            let n = STATE.with(|s| {
                let mut s = s.borrow_mut();
                s.counter += 1;
                s.counter
            });
            let block = Sha256::new()
                .chain_update(b"ferry e2e fuzzing rng")
                .chain_update(n.to_be_bytes())
                .finalize();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        Ok(())
    }
}

/// Curve25519 with memoized results; a miss asks snow's own implementation.
#[derive(Default)]
struct MemoDh {
    private: [u8; 32],
    public: [u8; 32],
}

fn real(private: &[u8; 32]) -> Box<dyn Dh> {
    let mut dh = DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
        .expect("snow's default resolver has X25519");
    dh.set(private);
    dh
}

fn bounded<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) -> &mut HashMap<K, V> {
    if map.len() >= CACHE_LIMIT {
        map.clear();
    }
    map
}

impl Dh for MemoDh {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        self.private.copy_from_slice(&privkey[..32]);
        let private = self.private;
        self.public = STATE.with(|s| {
            let mut s = s.borrow_mut();
            *bounded(&mut s.public).entry(private).or_insert_with(|| {
                real(&private)
                    .pubkey()
                    .try_into()
                    .expect("32-byte public key")
            })
        });
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut private = [0u8; 32];
        rng.try_fill_bytes(&mut private)?;
        self.set(&private);
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.public
    }
    fn privkey(&self) -> &[u8] {
        &self.private
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; 32] = pubkey[..32].try_into().expect("32-byte slice");
        let key = (self.private, peer);
        let shared = STATE.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(v) = s.shared.get(&key) {
                return Ok(*v);
            }
            let mut v = [0u8; 32];
            real(&self.private).dh(&peer, &mut v)?;
            bounded(&mut s.shared).insert(key, v);
            Ok::<_, snow::Error>(v)
        })?;
        out[..32].copy_from_slice(&shared);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::NOISE_PARAMS;

    fn builder(fuzzing: bool) -> snow::Builder<'static> {
        let params = NOISE_PARAMS.parse().unwrap();
        if fuzzing {
            snow::Builder::with_resolver(params, Box::new(Resolver))
        } else {
            snow::Builder::new(params)
        }
    }

    /// A handshake and a transport message between the memoized side and snow's own, both
    /// ways round: the cached X25519 results are the real ones.
    #[test]
    fn memoized_noise_interoperates_with_snow_default() {
        for fuzzing_initiates in [true, false] {
            let (ki, kr) = (
                builder(false).generate_keypair().unwrap(),
                builder(false).generate_keypair().unwrap(),
            );
            // Twice per direction: the second run takes its X25519 results from the caches.
            for _ in 0..2 {
                start_input();
                let mut i = builder(fuzzing_initiates)
                    .local_private_key(&ki.private)
                    .and_then(|b| b.remote_public_key(&kr.public))
                    .and_then(|b| b.build_initiator())
                    .unwrap();
                let mut r = builder(!fuzzing_initiates)
                    .local_private_key(&kr.private)
                    .and_then(|b| b.build_responder())
                    .unwrap();
                let (mut m, mut p) = ([0u8; 256], [0u8; 256]);
                let n = i.write_message(b"init", &mut m).unwrap();
                assert_eq!(r.read_message(&m[..n], &mut p).unwrap(), 4);
                assert_eq!(r.get_remote_static().unwrap(), ki.public.as_slice());
                let n = r.write_message(b"resp", &mut m).unwrap();
                assert_eq!(i.read_message(&m[..n], &mut p).unwrap(), 4);
                let (mut ti, mut tr) = (
                    i.into_transport_mode().unwrap(),
                    r.into_transport_mode().unwrap(),
                );
                let n = ti.write_message(b"data", &mut m).unwrap();
                let k = tr.read_message(&m[..n], &mut p).unwrap();
                assert_eq!(&p[..k], b"data");
                let n = tr.write_message(b"back", &mut m).unwrap();
                let k = ti.read_message(&m[..n], &mut p).unwrap();
                assert_eq!(&p[..k], b"back");
            }
        }
    }

    /// Ephemeral keys repeat per input (what makes the caches hit) and differ within one.
    #[test]
    fn ephemeral_keys_repeat_per_input_and_differ_within_it() {
        let draw = || {
            let mut dh = MemoDh::default();
            dh.generate(&mut CounterRng).unwrap();
            (dh.private, dh.public)
        };
        start_input();
        let (a, b) = (draw(), draw());
        start_input();
        assert_eq!(draw(), a);
        assert_ne!(a, b);
        assert_eq!(
            real(&a.0).pubkey(),
            a.1.as_slice(),
            "the memoized public key is snow's"
        );
    }
}
