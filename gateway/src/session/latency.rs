//! Sampled delivery latency (`gateway_delivery_seconds`).
//!
//! It decides which doorbell rings are timed, and holds the clock they are timed on.

use std::{sync::OnceLock, time::Instant};

/// One in this many doorbell rings (per runtime thread) is timed.
///
/// A timed ring times its frames' way to the wire for `gateway_delivery_seconds`: a clock
/// read per sample, not per delivery.
pub(super) const LATENCY_SAMPLE_EVERY: u32 = 64;

/// Nanoseconds since the instant sampled rings are measured from, plus one.
///
/// The one is added so that 0 can mean "no sample pending".
pub(super) fn stamp() -> u64 {
    epoch().elapsed().as_nanos() as u64 + 1
}

/// The instant sampled rings are measured from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether this ring (on this thread) is one of the sampled ones.
pub(super) fn sample_this_ring() -> bool {
    if !crate::metrics::ENABLED {
        return false;
    }
    thread_local! {
        static RINGS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    RINGS.with(|rings| {
        let n = rings.get().wrapping_add(1);
        rings.set(n);
        // The first ring of each thread is one of them: a thread that rang only a few
        // times still shows in `gateway_delivery_seconds`.
        n % LATENCY_SAMPLE_EVERY == 1
    })
}
