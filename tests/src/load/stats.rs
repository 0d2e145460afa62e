//! Latency histogram and loss/duplicate bookkeeping shared by the subscribers of one run
//! (the load generator is single-threaded, so plain interior mutability suffices).

use std::cell::RefCell;

use hdrhistogram::Histogram;

/// What subscribers observed.
pub struct Observed {
    /// One-way latency in microseconds of deliveries sent inside the measured window.
    pub latency_us: Histogram<u64>,
    /// Deliveries sent inside the measured window.
    pub window_deliveries: u64,
    /// All deliveries, warm-up and drain included.
    pub total_deliveries: u64,
    /// Deliveries seen twice.
    pub duplicates: u64,
    /// Deliveries that skipped ahead of the expected sequence (a gap).
    pub gaps: u64,
    window: (u64, u64),
}

impl Observed {
    /// Counts deliveries sent in `[window.0, window.1)` (ns since the run epoch).
    pub fn new(window: (u64, u64)) -> RefCell<Self> {
        RefCell::new(Self {
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"),
            window_deliveries: 0,
            total_deliveries: 0,
            duplicates: 0,
            gaps: 0,
            window,
        })
    }

    /// Records the delivery whose binary envelope is `envelope`, checking its sequence.
    pub fn record_envelope(&mut self, seqs: &mut SeqTracker, envelope: &[u8], now_ns: u64) {
        let probe = super::wire::envelope_payload(envelope).and_then(super::read_probe);
        if let Some((publisher, seq, sent)) = probe {
            let (dup, skipped) = seqs.check(publisher, seq);
            if dup {
                self.duplicates += 1;
            } else {
                self.gaps += skipped;
                self.record(sent, now_ns);
            }
        }
    }

    /// Records one delivery.
    pub fn record(&mut self, sent_ns: u64, now_ns: u64) {
        self.total_deliveries += 1;
        if sent_ns >= self.window.0 && sent_ns < self.window.1 {
            self.window_deliveries += 1;
            let us = now_ns.saturating_sub(sent_ns) / 1000;
            let _ = self.latency_us.record(us.max(1));
        }
    }
}

/// Per-subscriber sequence tracking: the next expected sequence from each publisher.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    next: Vec<u64>,
}

impl SeqTracker {
    /// Tracks `publishers` publishers.
    pub fn new(publishers: usize) -> Self {
        Self {
            next: vec![0; publishers],
        }
    }

    /// Checks one delivery; returns (is_duplicate, skipped).
    pub fn check(&mut self, publisher: u32, seq: u64) -> (bool, u64) {
        let Some(next) = self.next.get_mut(publisher as usize) else {
            return (false, 0);
        };
        if seq < *next {
            return (true, 0);
        }
        let skipped = seq - *next;
        *next = seq + 1;
        (false, skipped)
    }
}
