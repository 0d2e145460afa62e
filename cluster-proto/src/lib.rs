//! What the nodes of a cluster say to each other through Redis, without any I/O.
//!
//! It holds the names of channels and keys ([`channel`]) and the typed channel message with
//! its one encoding ([`message`]). The gateway's `cluster` module does the Redis I/O around
//! it; the fuzz targets build this crate alone.
#![warn(missing_docs)]

pub mod channel;
pub mod message;
