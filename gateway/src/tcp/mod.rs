//! The TCP front: the accept loop (TLS, the PROXY header, HTTP/1.1 serving the shared
//! router), WebSocket upgrades on endpoint paths, and the WebSocket implementation of the
//! session's transport interface (tokio-tungstenite).

mod accept;
pub mod frames;
pub mod linger;
pub mod proxy_header;
pub mod tls;
mod upgrade;
mod websocket;

pub use accept::serve;
pub(crate) use upgrade::upgrade;
