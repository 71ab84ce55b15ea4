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

pub(crate) use ferry_proto::error_chain;
