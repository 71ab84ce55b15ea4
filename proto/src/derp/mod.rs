//! DERP v2 wire protocol, sans-IO: keys, frame codec, handshake messages.
//!
//! Nothing here touches a socket or a runtime. Bytes go in, typed frames come out, and the
//! encoders append to a caller-owned buffer.
//!
//! The facts are Tailscale's (`tailscale.com/derp`): a frame is `type: u8 | length: u32 BE |
//! payload`, the handshake is ServerKey → ClientInfo (NaCl box) → ServerInfo (NaCl box).

pub mod client;
pub mod frame;
pub mod handshake;
pub mod keys;

pub use frame::*;
pub use handshake::*;
pub use keys::*;

/// The 8-byte magic that opens a ServerKey frame: `DERP🔑`.
pub const MAGIC: [u8; 8] = *b"DERP\xF0\x9F\x94\x91";
/// The protocol version ferry speaks (and announces in `Derp-Version`).
pub const PROTOCOL_VERSION: u32 = 2;
/// Bytes in a frame header: type (1) + big-endian length (4).
pub const FRAME_HEADER_LEN: usize = 5;
/// Length of a Curve25519 public key.
pub const KEY_LEN: usize = 32;
/// Length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// Largest packet a client may send, not counting the destination key (derp.MaxPacketSize).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame ferry reads at all. Clients reject frames over 1 MiB too.
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// Largest ClientInfo frame (key + nonce + box of JSON), as derper allows.
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Disco packets start with this magic (`TS💬`); they get their own queue and PeerGone(not here).
pub const DISCO_MAGIC: [u8; 6] = *b"TS\xF0\x9F\x92\xAC";

/// Whether a packet looks like a Tailscale disco message (by its prefix, as derper decides).
pub fn looks_like_disco(packet: &[u8]) -> bool {
    // A disco message is magic (6) + sender disco key (32) + nonce (24) + box; derper checks the
    // magic and a minimum length.
    packet.len() >= DISCO_MAGIC.len() + KEY_LEN + NONCE_LEN && packet.starts_with(&DISCO_MAGIC)
}

/// Errors from decoding DERP bytes. Each names what was wrong with the peer's input.
///
/// Not `PartialEq`: [`ProtoError::Json`] keeps its [`serde_json::Error`], which has no equality
/// (compare with `matches!` or [`ProtoError::reason`]).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of type {frame_type:#04x} is {len} bytes, over the {max}-byte limit")]
    FrameTooLong {
        frame_type: u8,
        len: usize,
        max: usize,
    },
    #[error("{what} frame is {len} bytes; expected {expected}")]
    BadLength {
        what: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error("ServerKey frame does not start with the DERP magic")]
    BadMagic,
    #[error("expected a {expected} frame, got type {got:#04x}")]
    UnexpectedFrame { expected: &'static str, got: u8 },
    #[error("could not open the sealed box (wrong key, or corrupted)")]
    BoxOpen,
    /// The sealed `what` (ClientInfo or ServerInfo) does not parse as JSON.
    #[error("the sealed {what} is not valid JSON")]
    Json {
        /// "ClientInfo" or "ServerInfo".
        what: &'static str,
        /// The parser's error (line, column, what it expected).
        #[source]
        source: serde_json::Error,
    },
    /// The sealed `what` is JSON, but not an object.
    #[error("the sealed {what} is not a JSON object")]
    NotObject {
        /// "ClientInfo" or "ServerInfo".
        what: &'static str,
    },
    #[error("mesh key must be 64 hex characters")]
    BadMeshKey,
}

impl ProtoError {
    /// A short, stable label for metrics (`reason="..."`).
    pub fn reason(&self) -> &'static str {
        match self {
            ProtoError::FrameTooLong { .. } => "frame_too_long",
            ProtoError::BadLength { .. } => "bad_length",
            ProtoError::BadMagic => "bad_magic",
            ProtoError::UnexpectedFrame { .. } => "unexpected_frame",
            ProtoError::BoxOpen => "box_open",
            ProtoError::Json { .. } | ProtoError::NotObject { .. } => "bad_json",
            ProtoError::BadMeshKey => "bad_mesh_key",
        }
    }
}
