//! The write side of a session: what a transport implements ([`FrameSink`]), and the
//! [`SessionWriter`] that moves the session's queued frames into it, either from the
//! cross-session flusher (`cork`) in one pass with every other session, or from the
//! session's own writer task when the transport cannot take them at once.

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use gateway_core::{
    protocol::{CloseReason, TransportFault},
    session::{Batch, Outbound, OutboxReceiver, SessionHandle},
};

use super::{
    cork::{Flush, Flushers},
    WriteStats,
};

/// Most frames taken from the outbox at once.
const MAX_BATCH: usize = 512;

/// How a transport sends what a session's outbox holds.
pub(crate) trait FrameSink: Send + 'static {
    /// Moves frames from the front of `frames` into the transport and pushes them out,
    /// without waiting, counting them in `stats`. `Ready(Ok)` once every frame is taken
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

    /// Ends the session on the wire with `reason` (close frame, or `close` envelope and
    /// connection close).
    fn close(self, reason: CloseReason) -> impl Future<Output = ()> + Send;
}

/// A session's sink, the frames taken from its outbox and not yet in the sink (only while
/// its transport is full: normally frames pass through the flusher's buffer), and what was
/// written.
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
pub(crate) struct SessionWriter<S> {
    outbox: OutboxReceiver,
    state: Mutex<Option<WriteState<S>>>,
    /// Written by a flusher; else only by the session's task, which then lets the other
    /// ready tasks run once before it writes, so that under load more frames go together.
    corked: bool,
}

impl<S: FrameSink> SessionWriter<S> {
    /// The writer of `session`'s `outbox` into `sink`, corked by one of `flushers`.
    pub(crate) fn corked(
        session: &SessionHandle,
        outbox: OutboxReceiver,
        sink: S,
        flushers: &Flushers,
    ) -> Arc<Self> {
        let writer = Self::new(outbox, sink, true);
        let flush: Arc<dyn Flush> = writer.clone();
        session.set_doorbell(flushers.doorbell(session.id().0, Arc::downgrade(&flush)));
        writer
    }

    /// The writer of `outbox` into `sink` on the session's own task only.
    pub(crate) fn own_task(outbox: OutboxReceiver, sink: S) -> Arc<Self> {
        Self::new(outbox, sink, false)
    }

    fn new(outbox: OutboxReceiver, sink: S, corked: bool) -> Arc<Self> {
        Arc::new(Self {
            outbox,
            state: Mutex::new(Some(WriteState {
                sink,
                pending: Vec::new(),
                stats: WriteStats::default(),
            })),
            corked,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<WriteState<S>>> {
        // The state is only ever replaced whole: a panic cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's writer task: writes whatever the flusher handed back or could not
    /// take, and the close. Returns what was written.
    pub(crate) async fn run(self: Arc<Self>) -> WriteStats {
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
            let written = std::future::poll_fn(|cx| {
                state
                    .sink
                    .poll_write(cx, &mut state.pending, &mut state.stats)
            })
            .await;
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
            match state.sink.poll_write(&mut cx, batch, &mut state.stats) {
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

    fn abandon(&self) {
        self.outbox
            .close(TransportFault::WriteFailed.close_reason());
    }
}
