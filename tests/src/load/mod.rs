//! The load generator's parts: lean WebSocket and WebTransport clients that speak just
//! enough of PROTOCOL.md to subscribe and publish, the latency and loss bookkeeping, and
//! /proc readings of the server under test.

pub mod proc_stats;
pub mod rpc;
pub mod stats;
pub mod wire;
pub mod ws_client;
pub mod wt_client;

use std::time::Instant;

/// Bytes of the probe at the start of every payload: publisher id (u32), sequence (u64),
/// send time in nanoseconds since the run's epoch (u64), all big-endian.
pub const PROBE_LEN: usize = 20;

/// Writes the probe into the start of `payload` (which is at least [`PROBE_LEN`] long).
pub fn write_probe(payload: &mut [u8], publisher: u32, seq: u64, sent_ns: u64) {
    payload[..4].copy_from_slice(&publisher.to_be_bytes());
    payload[4..12].copy_from_slice(&seq.to_be_bytes());
    payload[12..20].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Reads a probe: (publisher, seq, sent_ns).
pub fn read_probe(payload: &[u8]) -> Option<(u32, u64, u64)> {
    if payload.len() < PROBE_LEN {
        return None;
    }
    Some((
        u32::from_be_bytes(payload[..4].try_into().ok()?),
        u64::from_be_bytes(payload[4..12].try_into().ok()?),
        u64::from_be_bytes(payload[12..20].try_into().ok()?),
    ))
}

/// Nanoseconds since `epoch`.
pub fn since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}
