//! ferry's wire formats, sans-IO: bytes in, typed messages out, and encoders that append to a
//! caller's buffer. No runtime, no sockets: the relay, the STUN server, the client library, the
//! load tester and the mesh all speak through this crate, each with its own I/O around it.
//!
//! - [`derp`]: DERP v2 (Tailscale's relay protocol): keys, the frame codec, the handshake's
//!   messages, and the client side of the HTTP upgrade and handshake as a state machine.
//! - [`stun`]: the STUN message codec (RFC 8489): parse, encode, Binding requests and answers.
//!   What a server answers is policy and stays in `ferry-stun`.
//! - [`pin`]: the DERP map's `CertName` and its `sha256-raw:` pin of a self-signed certificate,
//!   with a rustls verifier behind the `rustls` feature.

pub mod derp;
pub mod pin;
pub mod stun;

pub use derp::{KeyParseError, PublicKey, SecretKey};
