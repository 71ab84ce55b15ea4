//! Curve25519 keys as DERP uses them: 32 raw bytes, shown as lower-case hex.

use std::fmt;
use std::str::FromStr;

use super::KEY_LEN;

/// A node's or server's public key. The registry is keyed by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// Reads a key from the first 32 bytes of `b`; `None` if `b` is shorter.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.get(..KEY_LEN).map(|k| {
            let mut a = [0u8; KEY_LEN];
            a.copy_from_slice(k);
            PublicKey(a)
        })
    }
    /// 64 lower-case hex characters, as in `Derp-Public-Key`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// A short form for logs: the first 8 hex characters.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a key string did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a key is 64 hex characters, optionally prefixed with `{prefix}:`; got {got_len} characters"
)]
pub struct KeyParseError {
    prefix: &'static str,
    got_len: usize,
}

fn parse_hex_key(s: &str, prefixes: &[&'static str]) -> Result<[u8; KEY_LEN], KeyParseError> {
    let s = s.trim();
    let body = prefixes
        .iter()
        .find_map(|p| s.strip_prefix(p).and_then(|r| r.strip_prefix(':')))
        .unwrap_or(s);
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(body, &mut out).map_err(|_| KeyParseError {
        prefix: prefixes[0],
        got_len: body.len(),
    })?;
    Ok(out)
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    /// Accepts bare hex and Tailscale's `nodekey:`/`mkey:`/`discokey:` forms.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex_key(s, &["nodekey", "mkey", "discokey"]).map(PublicKey)
    }
}

/// A Curve25519 private key. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct SecretKey(crypto_box::SecretKey);

impl SecretKey {
    /// A fresh random key from the OS RNG.
    pub fn generate() -> Self {
        SecretKey(crypto_box::SecretKey::generate(&mut rand::rngs::OsRng))
    }
    /// From 32 raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        SecretKey(crypto_box::SecretKey::from(b))
    }
    /// The raw bytes (for writing a key file).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }
    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(*self.0.public_key().as_bytes())
    }
    /// `privkey:<hex>`, the form derper's key file uses.
    pub fn to_privkey_string(&self) -> String {
        format!("privkey:{}", hex::encode(self.to_bytes()))
    }
    pub(crate) fn inner(&self) -> &crypto_box::SecretKey {
        &self.0
    }
}

impl FromStr for SecretKey {
    type Err = KeyParseError;
    /// Accepts bare hex or `privkey:<hex>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex_key(s, &["privkey"]).map(SecretKey::from_bytes)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(MASKED, public {})", self.public().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_strings_round_trip() {
        let sk = SecretKey::generate();
        let parsed: SecretKey = sk.to_privkey_string().parse().unwrap();
        assert_eq!(parsed.to_bytes(), sk.to_bytes());
        let pk = sk.public();
        assert_eq!(pk.to_hex().parse::<PublicKey>().unwrap(), pk);
        assert_eq!(format!("nodekey:{pk}").parse::<PublicKey>().unwrap(), pk);
        assert!(format!("{sk:?}").contains("MASKED"));
        assert!(!format!("{sk:?}").contains(&hex::encode(sk.to_bytes())));
    }

    #[test]
    fn bad_key_strings_say_what_is_expected() {
        let e = "privkey:abcd".parse::<SecretKey>().unwrap_err();
        assert!(e.to_string().contains("64 hex characters"), "{e}");
        assert!("zz".repeat(32).parse::<PublicKey>().is_err());
    }
}
