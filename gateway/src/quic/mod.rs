//! The UDP front: a QUIC endpoint (quinn) speaking HTTP/3 (h3) with WebTransport.
//!
//! WebTransport comes from h3-webtransport. Plain HTTP/3 requests go to the shared router;
//! an extended CONNECT on an endpoint path goes through the same admission as a WebSocket
//! upgrade and becomes a session of the same hub. This module only adapts streams and
//! datagrams.

mod endpoint;
mod http3;
mod webtransport;

pub use endpoint::{bind, serve, transport_config, BindError};
