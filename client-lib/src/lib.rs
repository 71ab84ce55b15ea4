//! ferry's client library: reach other nodes by public key, end-to-end encrypted, through
//! ferry (or any DERP v2) relays.
//!
//! * [`Endpoint`] — the application API: one node key, one relay map, one UDP socket;
//!   `send(peer, bytes)` / `recv()`, with the current path per peer and path-change events.
//! * [`relaymap`] — Tailscale's DERP map JSON.
//! * [`relay`] — a DERP v2 client that stays connected (TLS, pins, WebSocket fallback,
//!   reconnects, Restarting).
//! * [`netcheck`] — STUN from the data socket: latencies, IPv4/IPv6, hard-NAT detection, home.
//! * [`e2e`] — Noise IK sessions between nodes (sans-IO).
//! * [`disco`] — ping / pong / call-me-maybe between nodes, sealed with the node keys (sans-IO).
//!
//! The wire formats come from `ferry_proto` (shared with the relay); `ferry_relay` is not a
//! dependency.

pub mod disco;
pub mod e2e;
pub mod endpoint;
pub mod keys;
pub mod netcheck;
pub mod relay;
pub mod relaymap;
pub mod stun;
pub mod tls;
pub mod udp;
pub mod udprelay;

pub use endpoint::{
    DirectOptions, Endpoint, EndpointConfig, EndpointError, EndpointStats, Path, PathEvent,
    PingReply, MAX_BATCH,
};
pub use ferry_proto::{PublicKey, SecretKey};
pub use relaymap::RelayMap;
