//! The circuit breaker in front of Redis.
//!
//! A Redis that stops answering (stopped, overloaded, a network partition that drops
//! packets) would otherwise make every command wait for its whole deadline, one after
//! another. After [`TRIP_AFTER`] commands in a row got no answer, the breaker opens: every
//! operation fails at once, without being sent, until a probe (a `PING` every
//! [`PROBE_EVERY`]) is answered. `/healthz` says `degraded` while it is open.

use std::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::Duration,
};

/// Commands in a row without an answer that open the breaker.
pub(super) const TRIP_AFTER: u32 = 3;
/// How often an open breaker probes Redis.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe waits for its answer.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether Redis is taken to be answering. Lock-free: every operation reads it.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    /// Commands in a row that got no answer.
    unanswered: AtomicU32,
    open: AtomicBool,
    /// Woken when the breaker opens (the probe waits for it).
    opened: tokio::sync::Notify,
}

impl Breaker {
    /// Whether operations fail at once.
    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Redis answered a command (even with an error: it is running).
    pub(super) fn answered(&self) {
        self.unanswered.store(0, Ordering::Release);
    }

    /// A command got no answer; returns whether this opened the breaker.
    pub(super) fn unanswered(&self) -> bool {
        let n = self.unanswered.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= TRIP_AFTER && !self.open.swap(true, Ordering::AcqRel) {
            self.opened.notify_one();
            return true;
        }
        false
    }

    /// A probe was answered: operations go through again.
    pub(super) fn close(&self) {
        self.unanswered.store(0, Ordering::Release);
        self.open.store(false, Ordering::Release);
    }

    /// Waits until the breaker is open.
    pub(super) async fn wait_open(&self) {
        while !self.is_open() {
            self.opened.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_opens_after_unanswered_commands_in_a_row_and_a_probe_closes_it() {
        let b = Breaker::default();
        assert!(!b.unanswered());
        b.answered();
        assert!(!b.unanswered());
        assert!(!b.unanswered());
        assert!(!b.is_open(), "an answer in between starts the count again");
        assert!(b.unanswered(), "the third in a row opens it");
        assert!(b.is_open());
        assert!(!b.unanswered(), "opened once");
        b.answered();
        assert!(b.is_open(), "a late answer does not close it: a probe does");
        b.close();
        assert!(!b.is_open());
    }
}
