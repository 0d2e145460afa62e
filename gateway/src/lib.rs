//! The gateway server.
//!
//! It holds the TCP front (TLS, HTTPS, secure WebSocket), the QUIC front (HTTP/3,
//! WebTransport), the HTTP router and API they share, the one session driver both
//! transports use, the Redis cluster backplane, and the wiring around the transport-neutral
//! hub of `gateway-core`.

pub mod cert_reload;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod http;
pub mod jwks;
pub mod metrics;
pub mod quic;
pub mod server;
mod session;
pub mod state;
pub mod tcp;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{Server, StartError};
