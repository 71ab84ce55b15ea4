//! ferry-relay: a DERP v2 relay, wire-compatible with Tailscale's clients, with a STUN server
//! beside it.
//!
//! - [`proto`]: the DERP wire protocol, sans-IO: `ferry_proto::derp`, re-exported.
//! - `server` (feature `server`, on by default): listeners, TLS, HTTP upgrade, the per-client
//!   actors and the registry. Start one with [`Server::spawn`].

pub use ferry_proto::derp as proto;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "server")]
pub use server::{Config, Server, SpawnError};
