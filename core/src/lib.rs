//! Transport-neutral core of the gateway.
//!
//! Everything that is the same for WebSocket and WebTransport sessions lives here: the wire
//! protocol ([`protocol`]), the session abstraction ([`session`]), the hub of rooms and users
//! ([`hub`]), the per-connection protocol driver ([`connection`]), authentication
//! ([`auth`]), liveness rules ([`liveness`]), limits ([`limits`]) and the backplane trait
//! ([`backplane`]).
//!
//! This crate owns no socket, no TLS, no QUIC and no clock: adapters pass `now` in, so every
//! rule is testable without sleeping.
#![warn(missing_docs)]

pub mod auth;
pub mod backplane;
pub mod connection;
pub mod history;
pub mod hub;
pub mod jwks;
pub mod limits;
pub mod liveness;
pub mod pattern;
pub mod policy;
pub mod presence;
pub mod protocol;
pub mod room;
pub mod session;
pub mod tickets;
pub mod upstream;

pub use connection::Connection;
pub use hub::Hub;
pub use session::{Outbound, SessionHandle, TransportKind};
