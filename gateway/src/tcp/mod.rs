//! The TCP front: accept loop, WebSocket upgrades and the WebSocket transport.
//!
//! The accept loop covers TLS, the PROXY header and HTTP/1.1 serving the shared router;
//! upgrades are on endpoint paths; the WebSocket implementation of the session's transport
//! interface is on tokio-tungstenite.

mod accept;
pub mod frames;
pub mod linger;
pub mod proxy_header;
pub mod tls;
mod upgrade;
mod websocket;

pub use accept::serve;
pub(crate) use upgrade::upgrade;
