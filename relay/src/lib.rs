//! ferry-relay: a DERP v2 relay, wire-compatible with Tailscale's clients, with a STUN server
//! beside it.
//!
//! - [`proto`]: the wire protocol, sans-IO (always compiled; the client library uses it).
//! - `server` (feature `server`, on by default): listeners, TLS, HTTP upgrade, the per-client
//!   actors and the registry. Start one with [`Server::spawn`].

pub mod proto;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "server")]
pub use server::{Config, Server, SpawnError};
