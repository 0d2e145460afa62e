//! The write side of a session: [`FrameSink`] and the [`SessionWriter`].
//!
//! A transport implements [`FrameSink`]; the [`SessionWriter`] moves the session's queued
//! frames into it, either from the cross-session flusher (`cork`) in one pass with every
//! other session, or from the session's own writer task when the transport cannot take them
//! at once.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    task::{Context, Poll, Waker},
};

use gateway_core::{
    protocol::{CloseReason, TransportFault},
    session::{Batch, Doorbell, Outbound, OutboxReceiver, SessionHandle, TransportKind},
};

use super::{
    cork::{Flush, Flushers},
    latency,
};
use crate::metrics::Metrics;

/// Most frames taken from the outbox at once.
const MAX_BATCH: usize = 512;

/// Outbound counters a session's writer reports at the end.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WriteStats {
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    pub(crate) datagrams: u64,
}

/// How a transport sends what a session's outbox holds.
pub(crate) trait FrameSink: Send + 'static {
    /// Moves frames from the front of `frames` into the transport and pushes them out.
    ///
    /// It does not wait, and counts them in `stats`. `Ready(Ok)` once every frame is taken
    /// and nothing is left buffered; `Pending` when the transport cannot take more now
    /// (what is left stays in `frames` or in the sink, and `cx` is woken when it can);
    /// `Ready(Err)` when the transport is gone. Called with an empty `frames` it finishes
    /// what an earlier `Pending` left buffered.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Outbound>,
        stats: &mut WriteStats,
    ) -> Poll<Result<(), ()>>;

    /// Ends the session on the wire with `reason`.
    ///
    /// That is a close frame, or a `close` envelope and connection close.
    fn close(self, reason: CloseReason) -> impl Future<Output = ()> + Send;
}

/// A session's sink, the frames not yet in it, and what was written.
///
/// The frames are those taken from its outbox and not yet in the sink, only while its
/// transport is full: normally frames pass through the flusher's buffer.
struct WriteState<S> {
    sink: S,
    pending: Vec<Outbound>,
    stats: WriteStats,
}

/// The write side of one session, shared by the flusher and the session's writer task.
///
/// Invariant: the flusher only writes with a waker that is never woken, and whenever that
/// leaves work behind it wakes the writer task, which writes with its own waker. While
/// the task writes it holds the state (the slot is empty) and the flusher keeps off.
pub(super) struct SessionWriter<S> {
    outbox: OutboxReceiver,
    state: Mutex<Option<WriteState<S>>>,
    /// Written by a flusher; else only by the session's task.
    ///
    /// The session's task then lets the other ready tasks run once before it writes, so
    /// that under load more frames go together.
    corked: bool,
    transport: TransportKind,
    metrics: Arc<Metrics>,
    /// When a sampled ring put frames in the empty queue.
    ///
    /// It is a [`latency::stamp`], 0: none pending.
    sampled_at: AtomicU64,
}

impl<S: FrameSink> SessionWriter<S> {
    /// The writer of `session`'s `outbox` into `sink`, corked by one of `flushers`.
    pub(super) fn corked(
        session: &SessionHandle,
        outbox: OutboxReceiver,
        sink: S,
        flushers: &Flushers,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        let writer = Self::new(session, outbox, sink, true, metrics);
        let flush: Arc<dyn Flush> = writer.clone();
        session.set_doorbell(flushers.doorbell(session.id().0, Arc::downgrade(&flush)));
        writer
    }

    /// The writer of `outbox` into `sink` on the session's own task only.
    pub(super) fn own_task(
        session: &SessionHandle,
        outbox: OutboxReceiver,
        sink: S,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        let writer = Self::new(session, outbox, sink, false, metrics);
        let weak: Weak<Self> = Arc::downgrade(&writer);
        session.set_doorbell(Arc::new(TaskBell(weak)));
        writer
    }

    fn new(
        session: &SessionHandle,
        outbox: OutboxReceiver,
        sink: S,
        corked: bool,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            outbox,
            state: Mutex::new(Some(WriteState {
                sink,
                pending: Vec::new(),
                stats: WriteStats::default(),
            })),
            corked,
            transport: session.transport(),
            metrics: metrics.clone(),
            sampled_at: AtomicU64::new(0),
        })
    }

    /// Notes when frames arrived in the empty queue (a sampled ring).
    fn note_ring(&self) {
        let at = latency::stamp();
        let _ = self
            .sampled_at
            .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Counts what a write moved (`before` → `after`), and the latency of a sampled ring.
    ///
    /// The latency is counted once its frames are written (`all_written`).
    fn count(&self, before: WriteStats, after: WriteStats, all_written: bool) {
        if !crate::metrics::ENABLED {
            return;
        }
        let counters = self.metrics.transport(self.transport);
        if after.frames > before.frames {
            counters.frames_sent.inc_by(after.frames - before.frames);
            counters.bytes_sent.inc_by(after.bytes - before.bytes);
        }
        if after.datagrams > before.datagrams {
            self.metrics
                .datagrams_sent
                .inc_by(after.datagrams - before.datagrams);
        }
        if all_written {
            let at = self.sampled_at.swap(0, Ordering::Relaxed);
            if at != 0 {
                let now = latency::stamp();
                counters
                    .delivery_seconds
                    .observe(now.saturating_sub(at) as f64 / 1e9);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<WriteState<S>>> {
        // The state is only ever replaced whole: a panic cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's writer task.
    ///
    /// It writes whatever the flusher handed back or could not take, and the close. Returns
    /// what was written.
    pub(super) async fn run(self: Arc<Self>) -> WriteStats {
        loop {
            let mut state = self
                .lock()
                .take()
                .expect("only the writer task takes the state");
            match self.write_all(&mut state).await {
                Written::Drained => *self.lock() = Some(state),
                Written::Closing(reason) => {
                    // Boxed: the task of an idle session does not carry its size.
                    Box::pin(state.sink.close(reason)).await;
                    return state.stats;
                }
                Written::Gone => return state.stats,
            }
            self.outbox.woken().await;
            if !self.corked {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Writes until the outbox is empty, or up to the session's close.
    async fn write_all(&self, state: &mut WriteState<S>) -> Written {
        loop {
            let before = state.stats;
            let written = std::future::poll_fn(|cx| {
                state
                    .sink
                    .poll_write(cx, &mut state.pending, &mut state.stats)
            })
            .await;
            self.count(before, state.stats, written.is_ok());
            if written.is_err() {
                return Written::Gone;
            }
            match self.outbox.try_batch(&mut state.pending, MAX_BATCH) {
                Some(Batch::Frames) => continue,
                Some(Batch::Close(reason)) => return Written::Closing(reason),
                None => {
                    // Frames normally pass through the flusher's buffer, not this one.
                    state.pending = Vec::new();
                    return Written::Drained;
                }
            }
        }
    }
}

/// How far the writer task got.
enum Written {
    /// Everything queued is written.
    Drained,
    /// Everything before the session's close is written; the close is next.
    Closing(CloseReason),
    /// The transport is gone.
    Gone,
}

impl<S: FrameSink> Flush for SessionWriter<S> {
    fn flush(&self, batch: &mut Vec<Outbound>) {
        let mut slot = self.lock();
        let Some(state) = slot.as_mut() else {
            // The writer task is writing: it looks at the outbox again when done.
            return self.outbox.wake_writer();
        };
        // Frames still pending mean the transport was full and the task was asked to
        // finish them: it writes these first.
        if !state.pending.is_empty() {
            return self.outbox.wake_writer();
        }
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..4 {
            match self.outbox.try_batch(batch, MAX_BATCH) {
                Some(Batch::Frames) => {}
                // Nothing left, or the close: the task writes the close.
                None => return,
                Some(Batch::Close(_)) => return self.outbox.wake_writer(),
            }
            let before = state.stats;
            let written = state.sink.poll_write(&mut cx, batch, &mut state.stats);
            self.count(before, state.stats, matches!(written, Poll::Ready(Ok(()))));
            match written {
                Poll::Ready(Ok(())) => debug_assert!(batch.is_empty(), "a sink left frames"),
                // Full or gone: the task waits for the transport with its own waker.
                Poll::Pending | Poll::Ready(Err(())) => {
                    // What the transport did not take stays with the session, in order.
                    state.pending.append(batch);
                    return self.outbox.wake_writer();
                }
            }
        }
        // A long backlog: the rest is the task's, so one session cannot hold up the pass.
        self.outbox.wake_writer();
    }

    fn sampled_ring(&self) {
        self.note_ring();
    }

    fn abandon(&self) {
        self.outbox
            .close(TransportFault::WriteFailed.close_reason());
    }
}

/// The doorbell of a session written by its own task: notes a sampled ring, wakes the task.
struct TaskBell<S>(Weak<SessionWriter<S>>);

impl<S: FrameSink> Doorbell for TaskBell<S> {
    fn ring(&self) {
        if let Some(writer) = self.0.upgrade() {
            if latency::sample_this_ring() {
                writer.note_ring();
            }
            writer.outbox.wake_writer();
        }
    }
}
