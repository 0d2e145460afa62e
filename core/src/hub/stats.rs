//! Running totals of the hub's work, read by the gateway's metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    room::{state::transport_index, Fanout},
    session::TransportKind,
};

/// Running totals of the hub's work, read by the gateway's metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages queued for members and direct recipients, by transport.
    ///
    /// The transports are WebSocket and WebTransport.
    deliveries: [AtomicU64; 2],
    /// Joins with `since` that recovered exactly, and that did not.
    recovered: AtomicU64,
    not_recovered: AtomicU64,
}

impl HubStats {
    /// Adds the deliveries of one fan-out.
    pub(crate) fn add_deliveries(&self, counted: Fanout) {
        if !cfg!(feature = "stats") {
            return;
        }
        for (total, n) in self.deliveries.iter().zip(counted.0) {
            if n > 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Counts the outcome of a join with `since`.
    pub fn count_recovery(&self, recovered: bool) {
        if !cfg!(feature = "stats") {
            return;
        }
        let counter = if recovered {
            &self.recovered
        } else {
            &self.not_recovered
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages queued so far for sessions on `transport`.
    pub fn deliveries(&self, transport: TransportKind) -> u64 {
        self.deliveries[transport_index(transport)].load(Ordering::Relaxed)
    }

    /// Joins with `since` so far: (recovered, not recovered).
    pub fn recoveries(&self) -> (u64, u64) {
        (
            self.recovered.load(Ordering::Relaxed),
            self.not_recovered.load(Ordering::Relaxed),
        )
    }
}
