//! The DERP handshake: ServerKey, then ClientInfo and ServerInfo sealed in NaCl boxes.
//!
//! A box is X25519 + XSalsa20-Poly1305 (`crypto_box::SalsaBox`), laid out as NaCl's
//! `box_easy`: 16-byte tag, then ciphertext. Opening the ClientInfo box with the key the client
//! claims proves it holds that key's private half.

use crypto_box::aead::{Aead, AeadCore};
use crypto_box::SalsaBox;
use serde_json::{Map, Value};

use super::{ProtoError, PublicKey, SecretKey, KEY_LEN, MAGIC, NONCE_LEN};

/// The ServerKey payload: magic + the server's public key.
pub fn server_key_payload(server: &PublicKey) -> [u8; MAGIC.len() + KEY_LEN] {
    let mut out = [0u8; MAGIC.len() + KEY_LEN];
    out[..MAGIC.len()].copy_from_slice(&MAGIC);
    out[MAGIC.len()..].copy_from_slice(server.as_bytes());
    out
}

/// Reads the server's key from a ServerKey payload (extra trailing bytes are allowed).
pub fn parse_server_key(payload: &[u8]) -> Result<PublicKey, ProtoError> {
    if payload.len() < MAGIC.len() + KEY_LEN {
        return Err(ProtoError::BadLength {
            what: "ServerKey",
            len: payload.len(),
            expected: "at least 40",
        });
    }
    if payload[..MAGIC.len()] != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    Ok(PublicKey::from_slice(&payload[MAGIC.len()..]).expect("length checked"))
}

/// What a client says about itself, parsed leniently.
///
/// Go clients send `{"version":2,"CanAckPings":true}` (plus `meshKey`, `IsProber`); Tailscale's
/// Rust client sends snake_case with `"mesh_key":"none"`. Keys are matched ignoring case and
/// underscores; unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Protocol version the client speaks.
    pub version: u32,
    /// The mesh key, if the client presents one (mesh peers only).
    pub mesh_key: Option<[u8; KEY_LEN]>,
    /// The client acks pings; Tailscale's Go client sets this, and also understands the
    /// Health, Restarting and PeerPresent frames.
    pub can_ack_pings: bool,
    /// The client is a prober (derpprobe).
    pub is_prober: bool,
}

fn normalised(map: &Map<String, Value>) -> impl Iterator<Item = (String, &Value)> {
    map.iter()
        .map(|(k, v)| (k.to_ascii_lowercase().replace('_', ""), v))
}

impl ClientInfo {
    /// Parses the JSON a client sealed.
    pub fn from_json(json: &[u8]) -> Result<Self, ProtoError> {
        let v: Value = serde_json::from_slice(json).map_err(|source| ProtoError::Json {
            what: "ClientInfo",
            source,
        })?;
        let Value::Object(map) = v else {
            return Err(ProtoError::NotObject { what: "ClientInfo" });
        };
        let mut info = ClientInfo::default();
        for (k, v) in normalised(&map) {
            match k.as_str() {
                "version" => info.version = v.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32,
                "canackpings" => info.can_ack_pings = v.as_bool().unwrap_or(false),
                "isprober" => info.is_prober = v.as_bool().unwrap_or(false),
                "meshkey" => {
                    info.mesh_key = match v.as_str().map(str::trim) {
                        None | Some("") | Some("none") => None,
                        Some(s) => {
                            let mut k = [0u8; KEY_LEN];
                            hex::decode_to_slice(s, &mut k).map_err(|_| ProtoError::BadMeshKey)?;
                            (k != [0u8; KEY_LEN]).then_some(k)
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// The JSON a Go client would send (ferry's own client uses this).
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = Map::new();
        if let Some(k) = self.mesh_key {
            m.insert("meshKey".into(), Value::String(hex::encode(k)));
        }
        m.insert("version".into(), self.version.into());
        m.insert("CanAckPings".into(), self.can_ack_pings.into());
        if self.is_prober {
            m.insert("IsProber".into(), true.into());
        }
        serde_json::to_vec(&Value::Object(m)).expect("JSON of plain values")
    }
}

/// What the server tells a client after the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// Protocol version.
    pub version: u32,
    /// If set, the client should pace its sends to this rate.
    pub token_bucket_bytes_per_second: Option<u32>,
    /// Burst allowed with the rate above.
    pub token_bucket_bytes_burst: Option<u32>,
}

impl ServerInfo {
    /// The JSON derper sends: `{"version":2}` plus optional pacing.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("version".into(), self.version.into());
        if let Some(r) = self.token_bucket_bytes_per_second {
            m.insert("TokenBucketBytesPerSecond".into(), r.into());
        }
        if let Some(b) = self.token_bucket_bytes_burst {
            m.insert("TokenBucketBytesBurst".into(), b.into());
        }
        serde_json::to_vec(&Value::Object(m)).expect("JSON of plain values")
    }

    /// Parses it leniently, like [`ClientInfo::from_json`].
    pub fn from_json(json: &[u8]) -> Result<Self, ProtoError> {
        let v: Value = serde_json::from_slice(json).map_err(|source| ProtoError::Json {
            what: "ServerInfo",
            source,
        })?;
        let Value::Object(map) = v else {
            return Err(ProtoError::NotObject { what: "ServerInfo" });
        };
        let mut info = ServerInfo::default();
        let num = |v: &Value| v.as_u64().map(|n| n.min(u32::MAX as u64) as u32);
        for (k, v) in normalised(&map) {
            match k.as_str() {
                "version" => info.version = num(v).unwrap_or(0),
                "tokenbucketbytespersecond" => {
                    info.token_bucket_bytes_per_second = num(v).filter(|n| *n > 0)
                }
                "tokenbucketbytesburst" => {
                    info.token_bucket_bytes_burst = num(v).filter(|n| *n > 0)
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

/// A box between two keys with the X25519 step done once ([`seal_with`], [`open_with`]): for a
/// side that seals or opens many messages between the same two keys (the UDP relay's sessions).
pub struct SharedBox(SalsaBox);

impl SharedBox {
    /// The box between `ours` and `theirs`.
    pub fn new(ours: &SecretKey, theirs: &PublicKey) -> SharedBox {
        SharedBox(SalsaBox::new(
            &crypto_box::PublicKey::from(theirs.0),
            ours.inner(),
        ))
    }
}

impl std::fmt::Debug for SharedBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBox(..)")
    }
}

/// Seals `plaintext` from `ours` to `theirs`: returns nonce (24) + tag (16) + ciphertext.
pub fn seal(ours: &SecretKey, theirs: &PublicKey, plaintext: &[u8]) -> Vec<u8> {
    seal_with(&SharedBox::new(ours, theirs), plaintext)
}

/// [`seal`] with a precomputed box.
pub fn seal_with(b: &SharedBox, plaintext: &[u8]) -> Vec<u8> {
    let b = &b.0;
    let nonce = SalsaBox::generate_nonce(&mut rand::rngs::OsRng);
    let ct = b
        .encrypt(&nonce, plaintext)
        .expect("encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens nonce (24) + box, sealed by `theirs` to `ours`.
pub fn open(ours: &SecretKey, theirs: &PublicKey, sealed: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(ProtoError::BoxOpen);
    }
    open_with(&SharedBox::new(ours, theirs), sealed)
}

/// [`open`] with a precomputed box.
pub fn open_with(b: &SharedBox, sealed: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(ProtoError::BoxOpen);
    }
    let b = &b.0;
    let nonce = crypto_box::Nonce::from_slice(&sealed[..NONCE_LEN]);
    b.decrypt(nonce, &sealed[NONCE_LEN..])
        .map_err(|_| ProtoError::BoxOpen)
}

/// The ClientInfo payload: client key (32) + nonce (24) + box(JSON).
pub fn client_info_payload(client: &SecretKey, server: &PublicKey, info: &ClientInfo) -> Vec<u8> {
    let mut out = client.public().0.to_vec();
    out.extend_from_slice(&seal(client, server, &info.to_json()));
    out
}

/// Server side: reads a ClientInfo payload, returning the client's proven key and its info.
pub fn open_client_info(
    server: &SecretKey,
    payload: &[u8],
) -> Result<(PublicKey, ClientInfo), ProtoError> {
    if payload.len() < KEY_LEN + NONCE_LEN {
        return Err(ProtoError::BadLength {
            what: "ClientInfo",
            len: payload.len(),
            expected: "at least 56",
        });
    }
    let client = PublicKey::from_slice(payload).expect("length checked");
    let json = open(server, &client, &payload[KEY_LEN..])?;
    Ok((client, ClientInfo::from_json(&json)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_boxes_round_trip_and_bind_the_claimed_key() {
        let server = SecretKey::generate();
        let client = SecretKey::generate();
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        let payload = client_info_payload(&client, &server.public(), &info);
        let (k, got) = open_client_info(&server, &payload).unwrap();
        assert_eq!(k, client.public());
        assert_eq!(got, info);

        // Claiming someone else's key with a box sealed by our own key fails.
        let mallory = SecretKey::generate();
        let mut forged = payload.clone();
        forged[..32].copy_from_slice(mallory.public().as_bytes());
        assert!(matches!(
            open_client_info(&server, &forged).unwrap_err(),
            ProtoError::BoxOpen
        ));

        let si = ServerInfo {
            version: 2,
            ..Default::default()
        };
        let sealed = seal(&server, &client.public(), &si.to_json());
        let opened = open(&client, &server.public(), &sealed).unwrap();
        assert_eq!(ServerInfo::from_json(&opened).unwrap(), si);
    }

    #[test]
    fn client_info_is_parsed_leniently() {
        let rust = br#"{"version":2,"mesh_key":"none","can_ack_pings":false,"is_prober":false,"extra":[1]}"#;
        assert_eq!(
            ClientInfo::from_json(rust).unwrap(),
            ClientInfo {
                version: 2,
                ..Default::default()
            }
        );
        let go = br#"{"meshKey":"0101010101010101010101010101010101010101010101010101010101010101","version":2,"CanAckPings":true,"IsProber":true}"#;
        let got = ClientInfo::from_json(go).unwrap();
        assert_eq!(got.mesh_key, Some([1; 32]));
        assert!(got.can_ack_pings && got.is_prober);
        assert_eq!(
            ClientInfo::from_json(b"[]").unwrap_err().reason(),
            "bad_json"
        );
        assert_eq!(
            ClientInfo::from_json(b"[]").unwrap_err().to_string(),
            "the sealed ClientInfo is not a JSON object"
        );
        // The parser's error is kept as the source, not flattened into a string.
        let e = ServerInfo::from_json(b"{nope").unwrap_err();
        assert_eq!(e.reason(), "bad_json");
        assert_eq!(e.to_string(), "the sealed ServerInfo is not valid JSON");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.is::<serde_json::Error>(), "{source}");
        assert!(matches!(
            ClientInfo::from_json(br#"{"meshKey":"xyz"}"#).unwrap_err(),
            ProtoError::BadMeshKey
        ));
    }

    #[test]
    fn server_key_frame_checks_magic() {
        let k = SecretKey::generate().public();
        assert_eq!(parse_server_key(&server_key_payload(&k)).unwrap(), k);
        let mut bad = server_key_payload(&k);
        bad[0] = b'X';
        assert!(matches!(
            parse_server_key(&bad).unwrap_err(),
            ProtoError::BadMagic
        ));
        assert!(parse_server_key(&bad[..39]).is_err());
    }
}
