//! What the encoder produces and the transport it is for.
//!
//! That is an encoded frame ready to queue, and the kind of transport a session arrived on.

use bytes::Bytes;

/// A frame queued for one session, already encoded. Cloning shares the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A JSON envelope.
    Text(Bytes),
    /// A binary envelope.
    Binary(Bytes),
    /// A volatile JSON `message`: WebTransport may send it as a datagram.
    Volatile(Bytes),
    /// A transport-level liveness probe (WebSocket ping).
    Ping,
}

/// The transport a session arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Secure WebSocket over TCP.
    WebSocket,
    /// WebTransport over HTTP/3.
    WebTransport,
}

impl TransportKind {
    /// The wire name: `websocket` or `webtransport`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::WebTransport => "webtransport",
        }
    }
}
