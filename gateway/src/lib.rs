//! The gateway server: configuration, the TCP front (HTTPS + secure WebSocket), the HTTP API,
//! and the wiring around the transport-neutral hub of `gateway-core`.

pub mod admission;
pub mod api;
pub mod assets;
pub mod cluster;
pub mod config;
pub mod linger;
pub mod server;
mod session;
pub mod state;
pub mod tls;
pub mod ws;
pub mod ws_frames;
pub mod wt;

pub use config::Config;
pub use server::Server;
