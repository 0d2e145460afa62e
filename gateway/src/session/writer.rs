//! The writer of a session: drains its outbox in batches into a [`FrameSink`].

use std::future::Future;

use gateway_core::{
    protocol::CloseReason,
    session::{Batch, Outbound, OutboxReceiver},
};

use super::WriteStats;

/// Most frames one wake-up of a writer takes from its outbox.
const MAX_BATCH: usize = 512;

/// How a transport sends what a session's outbox holds.
pub(crate) trait FrameSink: Send + 'static {
    /// Writes `frames` (all taken: the vector is left empty) in as few writes as the
    /// transport allows, counting them in `stats`; `Err` when the transport is gone.
    fn write_batch(
        &mut self,
        frames: &mut Vec<Outbound>,
        stats: &mut WriteStats,
    ) -> impl Future<Output = Result<(), ()>> + Send;

    /// Ends the session on the wire with `reason` (close frame, or `close` envelope and
    /// connection close).
    fn close(self, reason: CloseReason) -> impl Future<Output = ()> + Send;
}

/// Drains `outbox` into `sink` until the session closes; each wake-up writes every queued
/// frame at once. Returns what was written.
pub(crate) async fn write_loop<S: FrameSink>(mut sink: S, outbox: OutboxReceiver) -> WriteStats {
    let mut stats = WriteStats::default();
    // Allocated on the first frame after the welcome, and shrunk back after large bursts.
    let mut batch = Vec::new();
    loop {
        match outbox.recv_batch(&mut batch, MAX_BATCH).await {
            Batch::Frames => {
                // Let the fan-out and the other writers run once before writing: under load
                // more frames arrive meanwhile and a burst leaves in one write; when idle the
                // yield returns at once.
                if batch.len() < MAX_BATCH {
                    tokio::task::yield_now().await;
                    let room = MAX_BATCH - batch.len();
                    outbox.drain_ready(&mut batch, room);
                }
                if sink.write_batch(&mut batch, &mut stats).await.is_err() {
                    return stats;
                }
                batch.clear();
                if batch.capacity() > 4 * MAX_BATCH {
                    batch.shrink_to(16);
                }
            }
            Batch::Close(reason) => {
                sink.close(reason).await;
                return stats;
            }
        }
    }
}
