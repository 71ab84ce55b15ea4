//! ferry-relay: a DERP v2 relay, wire-compatible with Tailscale's clients, with a STUN server
//! beside it.
//!
//! - [`proto`]: the DERP wire protocol, sans-IO: `ferry_proto::derp`, re-exported.
//! - [`server`]: listeners, TLS, HTTP upgrade, the per-client actors and the registry. Start
//!   one with [`Server::spawn`].
//! - `testing` (feature `testing`): a relay on 127.0.0.1:0 for a test, in one call.

pub use ferry_proto::derp as proto;

pub mod server;
#[cfg(feature = "testing")]
pub mod testing;

pub use server::{Config, Server, SpawnError};

/// An error and its sources, `: `-separated (a source whose text the message already holds is
/// left out): for log lines, where only one string goes out.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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
