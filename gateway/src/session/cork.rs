//! Corked writes across sessions, the way uWebSockets corks.
//!
//! A frame that arrives in a session's empty queue rings the session's doorbell, which puts
//! the session on its flusher's list; a flusher (there are as many as runtime workers)
//! takes its whole list at once and writes each session's queued frames at once (one
//! flush). Deliveries produced while a pass runs (a fan-out, many publishes read at once)
//! leave together in the next pass, so a delivery waits about one pass however busy the
//! core is, instead of waiting for its session's own task to come round the scheduler, and
//! under load each write carries more frames.
//!
//! Fairness: the list is served in the order sessions became ready, one write per session
//! per pass (a long backlog goes back to the session's own task), and the flusher yields
//! to the scheduler every [`YIELD_EVERY`] sessions, so one huge room neither starves the
//! small ones nor stops the reading of new requests. A session whose transport is full is
//! handed to its own writer task, which waits for the transport; meanwhile its bounded
//! queue still cuts off a slow consumer.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, Weak},
};

use gateway_core::session::{Doorbell, Outbound};
use tokio::sync::Notify;

use super::latency::sample_this_ring;

/// Sessions written between two yields of a flusher to the scheduler.
const YIELD_EVERY: usize = 128;

/// Something a flusher writes: one session's writer.
pub(crate) trait Flush: Send + Sync {
    /// Writes what the session's queue holds without waiting, through `batch`.
    ///
    /// `batch` is the flusher's buffer, empty before and after; whatever cannot be written
    /// at once is left to the session's own writer task.
    fn flush(&self, batch: &mut Vec<Outbound>);

    /// A sampled ring of the session's doorbell: frames arrived in its empty queue now.
    fn sampled_ring(&self);

    /// A flush panicked: the session is closed (1011), the flusher goes on.
    fn abandon(&self);
}

/// One flusher: its list of sessions with frames waiting, and its wake-up.
#[derive(Default)]
struct Flusher {
    ready: Mutex<Vec<Weak<dyn Flush>>>,
    wake: Notify,
}

impl Flusher {
    fn push(&self, session: Weak<dyn Flush>) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.push(session);
        if ready.len() == 1 {
            drop(ready);
            self.wake.notify_one();
        }
    }

    /// Runs the flusher: each pass takes every ready session and writes it.
    async fn run(self: Arc<Self>) {
        let mut batch = Vec::new();
        let mut frames = Vec::new();
        loop {
            self.wake.notified().await;
            loop {
                std::mem::swap(
                    &mut batch,
                    &mut *self.ready.lock().unwrap_or_else(|e| e.into_inner()),
                );
                if batch.is_empty() {
                    break;
                }
                for (i, session) in batch.drain(..).enumerate() {
                    if let Some(session) = session.upgrade() {
                        // Writes from here are not charged to the flusher's cooperative
                        // budget: it yields on its own below.
                        let flushed = tokio::task::unconstrained(async {
                            std::panic::catch_unwind(AssertUnwindSafe(|| {
                                session.flush(&mut frames)
                            }))
                        })
                        .await;
                        // One broken session must not stop the writes of all the others.
                        if flushed.is_err() {
                            frames.clear();
                            session.abandon();
                        }
                    }
                    if i % YIELD_EVERY == YIELD_EVERY - 1 {
                        tokio::task::yield_now().await;
                    }
                }
                if batch.capacity() > 4096 {
                    batch.shrink_to(64);
                }
                if frames.capacity() > 4096 {
                    frames.shrink_to(512);
                }
            }
        }
    }
}

/// The flushers of one gateway process: one per runtime worker.
///
/// Sessions are spread over them.
pub(crate) struct Flushers {
    flushers: Vec<Arc<Flusher>>,
}

impl std::fmt::Debug for Flushers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flushers")
            .field("count", &self.flushers.len())
            .finish()
    }
}

impl Flushers {
    /// One flusher per worker of the current tokio runtime, each on its own task.
    pub(crate) fn spawn() -> Self {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let flushers: Vec<Arc<Flusher>> = (0..workers.max(1)).map(|_| Arc::default()).collect();
        for flusher in &flushers {
            tokio::spawn(flusher.clone().run());
        }
        Self { flushers }
    }

    /// The doorbell of a session written by `writer`.
    ///
    /// `key` spreads sessions over the flushers.
    pub(crate) fn doorbell(&self, key: u64, writer: Weak<dyn Flush>) -> Arc<dyn Doorbell> {
        let flusher = self.flushers[(key % self.flushers.len() as u64) as usize].clone();
        Arc::new(Bell { flusher, writer })
    }
}

/// A session's doorbell: puts its writer on its flusher's list.
struct Bell {
    flusher: Arc<Flusher>,
    writer: Weak<dyn Flush>,
}

impl Doorbell for Bell {
    fn ring(&self) {
        if sample_this_ring() {
            if let Some(writer) = self.writer.upgrade() {
                writer.sampled_ring();
            }
        }
        self.flusher.push(self.writer.clone());
    }
}
