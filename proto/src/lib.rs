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
//!
//! Plus [`error_chain`], the one way every crate turns an error and its sources into a line.

pub mod derp;
pub mod pin;
pub mod stun;

pub use derp::{KeyParseError, PublicKey, SecretKey};

/// An error and its sources, `: `-separated, for a log line or a message where only one string
/// goes out (a source whose text the message already holds is left out).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let more = c.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn the_chain_names_each_source_once() {
        let io = || std::io::Error::other("inner");
        assert_eq!(error_chain(&Outer(io())), "outer: inner");
        assert_eq!(error_chain(&Repeats(io())), "outer: inner");
    }
}
