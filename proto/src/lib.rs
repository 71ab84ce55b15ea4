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
//! - [`udprelay`]: the UDP relay path's Geneve header and bind handshake messages
//!   (Tailscale's peer-relay format).
//! - [`queue`]: the bounded drop-oldest queue wherever a sender must never wait (the relay's
//!   receiver and mesh queues, the client's queue per relay connection).
//! - `mmsg` (Linux, feature `mmsg`): the one exception to "no sockets" — the batched UDP
//!   system calls (`recvmmsg`/`sendmmsg`, GRO, GSO) on a descriptor the caller owns, shared by
//!   the STUN server, the UDP relay and the client's endpoint. Still no runtime and no tokio.
//!
//! Plus [`error_chain`], the one way every crate turns an error and its sources into a line, and
//! [`Advised`] + [`report`], how the binaries add operator advice to a library's error.

pub mod derp;
#[cfg(all(target_os = "linux", feature = "mmsg"))]
pub mod mmsg;
pub mod pin;
pub mod queue;
pub mod stun;
pub mod udprelay;

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

/// A library error with a binary's advice for its operator (libraries say what went wrong; the
/// binaries, which know their flags and files, say what to do). Its `Display` is the advice
/// alone; [`report`] prints it after the error and its causes.
#[derive(Debug, thiserror::Error)]
#[error("{advice}")]
pub struct Advised {
    /// What to do, in the binary's own terms.
    pub advice: String,
    /// The error the advice is for.
    #[source]
    pub error: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// An error and its causes, `: `-separated, then the advice of every [`Advised`] in the chain
/// after `; `. Causes for which `skip` is true are left out (a message that already quotes them).
pub fn report(
    e: &(dyn std::error::Error + 'static),
    skip: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> String {
    let (mut parts, mut advice) = (Vec::new(), Vec::new());
    let mut cur = Some(e);
    while let Some(c) = cur {
        match c.downcast_ref::<Advised>() {
            Some(a) => advice.push(a.advice.clone()),
            None if !skip(c) => parts.push(c.to_string()),
            None => {}
        }
        cur = c.source();
    }
    let mut text = parts.join(": ");
    for a in advice {
        text.push_str("; ");
        text.push_str(&a);
    }
    text
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

    #[test]
    fn advice_comes_after_the_error_and_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Wrap(#[source] Advised);
        let advised = Wrap(Advised {
            advice: "do this".into(),
            error: Box::new(std::io::Error::other("root cause")),
        });
        assert_eq!(report(&advised, |_| false), "outer: root cause; do this");
        assert_eq!(
            report(&advised, |c| c.to_string() == "root cause"),
            "outer; do this"
        );
    }
}
