//! The session abstraction shared by both transports.
//!
//! A transport adapter gets a [`SessionHandle`] (held by the hub and every room the session is
//! in) and an [`OutboxReceiver`] (held by the adapter's writer). The hub only ever calls
//! [`SessionHandle::send`], which never blocks and never awaits: a full queue closes the
//! session as a slow consumer instead of stalling the room.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::{CloseCode, CloseReason};

/// A frame queued for one session, already encoded. Cloning shares the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A JSON envelope.
    Text(Bytes),
    /// A binary envelope.
    Binary(Bytes),
    /// A volatile JSON `message`: WebTransport may send it as a datagram.
    Volatile(Bytes),
    /// A transport-level liveness probe (WebSocket ping).
    Ping,
}

/// The transport a session arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Secure WebSocket over TCP.
    WebSocket,
    /// WebTransport over HTTP/3.
    WebTransport,
}

impl TransportKind {
    /// The wire name: `websocket` or `webtransport`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::WebTransport => "webtransport",
        }
    }
}

/// A session id, unique across the cluster with overwhelming probability: 64 random bits
/// the hub draws from the random source its owner gave it ([`Hub::new_session_id`]).
///
/// [`Hub::new_session_id`]: crate::hub::Hub::new_session_id
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Outcome of [`SessionHandle::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the writer.
    Queued,
    /// The queue was full: the session is now closed with 4008.
    Overflow,
    /// The session is already closing; the frame was dropped.
    Closed,
    /// The queue was full and the frame may be lost (volatile, best effort): dropped, the
    /// session stays open.
    Dropped,
}

struct Queue {
    frames: VecDeque<Outbound>,
    close: Option<CloseReason>,
    /// Frames of history replays still queued: they occupy the queue without counting
    /// against its capacity, so a replay larger than the queue does not make the session a
    /// slow consumer, while live frames still get exactly the configured room on top.
    replay_credit: usize,
    /// Where the queued replays are, front to back, so that draining frames queued ahead of
    /// a replay frees capacity and draining replayed frames spends credit.
    replays: VecDeque<ReplaySpan>,
}

/// A replay in the queue: `ahead` other frames, then `len` replayed ones.
#[derive(Debug, Clone, Copy)]
struct ReplaySpan {
    ahead: usize,
    len: usize,
}

impl Queue {
    /// Accounts for `n` frames taken from the front.
    fn drained(&mut self, mut n: usize) {
        while n > 0 {
            let Some(span) = self.replays.front_mut() else {
                return;
            };
            let ahead = n.min(span.ahead);
            span.ahead -= ahead;
            n -= ahead;
            let replayed = n.min(span.len);
            span.len -= replayed;
            n -= replayed;
            self.replay_credit -= replayed;
            if span.ahead > 0 || span.len > 0 {
                return;
            }
            self.replays.pop_front();
        }
    }
}

struct Shared {
    id: SessionId,
    id_text: String,
    transport: TransportKind,
    endpoint: Arc<str>,
    user: OnceLock<Arc<str>>,
    capacity: usize,
    queue: Mutex<Queue>,
    /// Wakes the writer task: a frame arrived in an empty queue (without a doorbell), the
    /// session closed, or the doorbell's owner handed the writing back to it.
    writer: Notify,
    /// Rung instead of `writer` when a frame arrives in an empty queue, once set.
    doorbell: OnceLock<Arc<dyn Doorbell>>,
    /// Wakes everyone waiting in [`SessionHandle::closed`].
    closed: Notify,
    is_closed: AtomicBool,
}

/// What rings when a frame arrives in a session's empty queue, instead of waking its writer
/// task directly: the transport's write scheduler, which writes the frames of many sessions
/// in one pass (see the gateway's `session::cork`).
pub trait Doorbell: Send + Sync {
    /// Frames wait in the session's queue.
    fn ring(&self);
}

/// The hub's side of a session: identity, transport, and the sending half of its bounded
/// outbound queue. Cheap to clone.
#[derive(Clone)]
pub struct SessionHandle(Arc<Shared>);

/// The adapter's side of a session's outbound queue.
pub struct OutboxReceiver(Arc<Shared>);

/// What the writer gets from [`OutboxReceiver::recv_batch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames were appended to the caller's buffer.
    Frames,
    /// The queue is drained and the session is closing for this reason.
    Close(CloseReason),
}

impl SessionHandle {
    /// A new session `id` with an outbound queue of `capacity` frames.
    pub fn new(
        id: SessionId,
        transport: TransportKind,
        endpoint: Arc<str>,
        capacity: usize,
    ) -> (SessionHandle, OutboxReceiver) {
        let shared = Arc::new(Shared {
            id,
            id_text: id.to_string(),
            transport,
            endpoint,
            user: OnceLock::new(),
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                close: None,
                replay_credit: 0,
                replays: VecDeque::new(),
            }),
            writer: Notify::new(),
            doorbell: OnceLock::new(),
            closed: Notify::new(),
            is_closed: AtomicBool::new(false),
        });
        (SessionHandle(shared.clone()), OutboxReceiver(shared))
    }

    /// The session id.
    pub fn id(&self) -> SessionId {
        self.0.id
    }

    /// The session id as sent on the wire.
    pub fn id_str(&self) -> &str {
        &self.0.id_text
    }

    /// The transport.
    pub fn transport(&self) -> TransportKind {
        self.0.transport
    }

    /// The endpoint path the session connected to.
    pub fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    /// The user id, once authenticated.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.0.user.get()
    }

    /// Sets the user id; the first call wins (a session never changes user).
    pub fn set_user(&self, user: Arc<str>) -> &Arc<str> {
        self.0.user.get_or_init(|| user)
    }

    /// Whether two handles are the same session.
    pub fn same_session(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Queues a frame without waiting. A full queue closes the session with 4008 and drops
    /// what it held (the client reconnects and recovers from history); a volatile frame
    /// that does not fit is dropped instead, since volatile messages may be lost.
    pub fn send(&self, frame: Outbound) -> Delivery {
        let droppable = matches!(frame, Outbound::Volatile(_));
        self.push(frame, droppable)
    }

    /// Queues a frame if there is room, else drops it; never closes the session.
    pub fn offer(&self, frame: Outbound) -> Delivery {
        self.push(frame, true)
    }

    /// Queues a history replay (bounded by the room's history) whatever the queue holds:
    /// its frames take their place in the queue but not its capacity (see `Queue`).
    pub fn send_replay<'a>(&self, frames: impl IntoIterator<Item = &'a Outbound>) -> Delivery {
        let mut q = self.lock();
        if q.close.is_some() {
            return Delivery::Closed;
        }
        let was_empty = q.frames.is_empty();
        let before = q.frames.len();
        q.frames.extend(frames.into_iter().cloned());
        let added = q.frames.len() - before;
        let spanned: usize = q.replays.iter().map(|r| r.ahead + r.len).sum();
        q.replays.push_back(ReplaySpan {
            ahead: before - spanned,
            len: added,
        });
        q.replay_credit += added;
        drop(q);
        if was_empty && added > 0 {
            self.0.frames_waiting();
        }
        Delivery::Queued
    }

    fn push(&self, frame: Outbound, droppable: bool) -> Delivery {
        let mut q = self.lock();
        if q.close.is_some() {
            return Delivery::Closed;
        }
        let capacity = self.0.capacity + q.replay_credit;
        if q.frames.len() >= capacity && droppable {
            return Delivery::Dropped;
        }
        if q.frames.len() >= capacity {
            q.frames.clear();
            q.frames.shrink_to_fit();
            q.replays.clear();
            q.replay_credit = 0;
            drop(q);
            self.close(CloseReason::new(
                CloseCode::TooSlowOrTooFast,
                "slow consumer: outbound queue full",
            ));
            return Delivery::Overflow;
        }
        let was_empty = q.frames.is_empty();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            self.0.frames_waiting();
        }
        Delivery::Queued
    }

    /// Closes the session: frames already queued are still written, then the close.
    /// Later calls keep the first reason.
    pub fn close(&self, reason: CloseReason) {
        let mut q = self.lock();
        if q.close.is_some() {
            return;
        }
        q.close = Some(reason);
        drop(q);
        self.0.is_closed.store(true, Ordering::Release);
        self.0.writer.notify_one();
        self.0.closed.notify_waiters();
    }

    /// From now on, a frame arriving in the empty queue rings `doorbell` instead of waking
    /// the writer task (closing still wakes the task). Only the first call takes effect.
    pub fn set_doorbell(&self, doorbell: Arc<dyn Doorbell>) {
        let _ = self.0.doorbell.set(doorbell);
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed.load(Ordering::Acquire)
    }

    /// The close reason, once closed.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Resolves once the session is closed.
    pub async fn closed(&self) {
        loop {
            let notified = self.0.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Number of frames waiting in the queue.
    pub fn queued(&self) -> usize {
        self.lock().frames.len()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        lock(&self.0.queue)
    }
}

impl Shared {
    /// Frames arrived in the empty queue: ring the doorbell, or wake the writer task.
    fn frames_waiting(&self) {
        match self.doorbell.get() {
            Some(doorbell) => doorbell.ring(),
            None => self.writer.notify_one(),
        }
    }
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // The queue holds plain data; a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.0.id_text)
            .field("transport", &self.0.transport)
            .field("user", &self.0.user.get())
            .finish()
    }
}

impl OutboxReceiver {
    /// Waits until frames are queued or the session closes, then moves up to `max` frames
    /// into `out` (one lock for the whole batch). Returns [`Batch::Close`] only once the
    /// queue is drained. For a session without a doorbell: with one, new frames ring it
    /// instead of waking this.
    pub async fn recv_batch(&self, out: &mut Vec<Outbound>, max: usize) -> Batch {
        loop {
            if let Some(batch) = self.try_batch(out, max) {
                return batch;
            }
            self.woken().await;
        }
    }

    /// [`recv_batch`](Self::recv_batch) without waiting: `None` when the queue is empty and
    /// the session open.
    pub fn try_batch(&self, out: &mut Vec<Outbound>, max: usize) -> Option<Batch> {
        let mut q = lock(&self.0.queue);
        if !q.frames.is_empty() {
            let n = q.frames.len().min(max.max(1));
            out.extend(q.frames.drain(..n));
            q.drained(n);
            if q.frames.is_empty() {
                // An idle session holds no queue storage.
                q.frames = VecDeque::new();
            }
            return Some(Batch::Frames);
        }
        q.close.as_ref().map(|reason| Batch::Close(reason.clone()))
    }

    /// Resolves when the writer task is woken: frames arrived in the empty queue (without a
    /// doorbell), the session closed, or [`wake_writer`](Self::wake_writer) was called. A
    /// wake-up while nobody waits is kept for the next call.
    pub async fn woken(&self) {
        self.0.writer.notified().await;
    }

    /// Wakes the writer task (see [`woken`](Self::woken)).
    pub fn wake_writer(&self) {
        self.0.writer.notify_one();
    }

    /// Closes the session from the writing side (its transport failed), as
    /// [`SessionHandle::close`] does.
    pub fn close(&self, reason: CloseReason) {
        SessionHandle(self.0.clone()).close(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn text(s: &'static str) -> Outbound {
        Outbound::Text(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn batches_in_order_then_closes() {
        let (h, rx) = SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 8);
        assert_eq!(h.send(text("a")), Delivery::Queued);
        assert_eq!(h.send(text("b")), Delivery::Queued);
        h.close(CloseReason::new(CloseCode::Normal, "bye"));
        assert_eq!(h.send(text("c")), Delivery::Closed);
        let mut out = Vec::new();
        assert_eq!(rx.recv_batch(&mut out, 16).await, Batch::Frames);
        assert_eq!(out, vec![text("a"), text("b")]);
        out.clear();
        assert_eq!(
            rx.recv_batch(&mut out, 16).await,
            Batch::Close(CloseReason::new(CloseCode::Normal, "bye"))
        );
    }

    #[tokio::test]
    async fn overflow_closes_with_4008_and_drops_the_backlog() {
        let (h, rx) =
            SessionHandle::new(SessionId(1), TransportKind::WebTransport, "/chat".into(), 2);
        h.send(text("a"));
        h.send(text("b"));
        assert_eq!(h.send(text("c")), Delivery::Overflow);
        assert!(h.is_closed());
        let mut out = Vec::new();
        match rx.recv_batch(&mut out, 16).await {
            Batch::Close(r) => assert_eq!(r.code, CloseCode::TooSlowOrTooFast),
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
        h.closed().await;
    }

    #[test]
    fn volatile_and_offered_frames_are_dropped_not_fatal_when_full() {
        let (h, _rx) =
            SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 1);
        h.send(text("a"));
        let volatile = Outbound::Volatile(Bytes::from_static(b"{}"));
        assert_eq!(h.send(volatile), Delivery::Dropped);
        assert_eq!(h.offer(text("b")), Delivery::Dropped);
        assert!(!h.is_closed());
        assert_eq!(h.send(text("c")), Delivery::Overflow);
    }

    #[tokio::test]
    async fn a_replay_larger_than_the_queue_is_not_a_slow_consumer() {
        let (h, rx) = SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 2);
        let replay: Vec<Outbound> = (0..5).map(|_| text("old")).collect();
        assert_eq!(h.send_replay(&replay), Delivery::Queued);
        // Live frames still get the configured room on top of the replay...
        assert_eq!(h.send(text("live1")), Delivery::Queued);
        assert_eq!(h.send(text("live2")), Delivery::Queued);
        // ...and no more.
        assert_eq!(h.send(text("live3")), Delivery::Overflow);
        let (h, rx2) =
            SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 2);
        h.send_replay(&replay);
        let mut out = Vec::new();
        rx2.recv_batch(&mut out, 4).await;
        assert_eq!(out.len(), 4);
        // Draining spends the credit: one replayed frame left, and room for two live ones.
        assert_eq!(h.send(text("live1")), Delivery::Queued);
        assert_eq!(h.send(text("live2")), Delivery::Queued);
        assert_eq!(h.send(text("over")), Delivery::Overflow);
        drop(rx);
    }

    #[tokio::test]
    async fn frames_ahead_of_a_replay_free_capacity_when_drained() {
        let (h, rx) = SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 2);
        assert_eq!(h.send(text("ack")), Delivery::Queued);
        let replay: Vec<Outbound> = (0..5).map(|_| text("old")).collect();
        h.send_replay(&replay);
        let mut out = Vec::new();
        // The ack and three replayed frames leave: two replayed frames remain...
        rx.recv_batch(&mut out, 4).await;
        // ...and live frames get the whole capacity on top of them.
        assert_eq!(h.send(text("live1")), Delivery::Queued);
        assert_eq!(h.send(text("live2")), Delivery::Queued);
        assert_eq!(h.send(text("over")), Delivery::Overflow);
    }

    /// A waker that records whether it was woken.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn writer_wakes_for_a_frame_sent_later() {
        use std::task::{Context, Poll, Waker};
        let (h, rx) = SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 4);
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        {
            let mut batch = std::pin::pin!(rx.recv_batch(&mut out, 4));
            assert!(
                batch.as_mut().poll(&mut cx).is_pending(),
                "nothing queued yet"
            );
            assert!(!flag.0.load(Ordering::SeqCst));
            h.send(text("late"));
            assert!(
                flag.0.load(Ordering::SeqCst),
                "a frame in the empty queue wakes the writer"
            );
            assert_eq!(batch.as_mut().poll(&mut cx), Poll::Ready(Batch::Frames));
        }
        assert_eq!(out, vec![text("late")]);
    }

    #[test]
    fn with_a_doorbell_a_frame_rings_it_instead_of_the_writer() {
        use std::task::{Context, Waker};
        #[derive(Default)]
        struct Bell(std::sync::atomic::AtomicUsize);
        impl Doorbell for Bell {
            fn ring(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (h, rx) = SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/chat".into(), 4);
        let bell = Arc::new(Bell::default());
        h.set_doorbell(bell.clone());
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut woken = std::pin::pin!(rx.woken());
        assert!(woken.as_mut().poll(&mut cx).is_pending());
        h.send(text("a"));
        h.send(text("b"));
        assert_eq!(
            bell.0.load(Ordering::SeqCst),
            1,
            "rung once, for the empty queue"
        );
        assert!(!flag.0.load(Ordering::SeqCst), "the writer task sleeps on");
        h.close(CloseReason::new(CloseCode::Normal, "bye"));
        assert!(
            flag.0.load(Ordering::SeqCst),
            "closing wakes the writer task"
        );
    }
}
