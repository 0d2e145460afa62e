//! What both fronts share above the transport: the router and admission.
//!
//! The router (health, API, demo page, `/client.js`) is served on HTTPS and HTTP/3;
//! admission is the one decision on whether a WebSocket upgrade or a WebTransport CONNECT
//! may open a session. Nothing here imports the fronts: the router's fallback (endpoint
//! upgrades) is passed in.

pub mod admission;
pub mod api;
pub mod assets;

use std::net::SocketAddr;

/// The client address of a request, set by the front that received it.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);
