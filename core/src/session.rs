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

use tokio::sync::Notify;

use crate::protocol::{CloseCode, CloseReason};
pub use crate::protocol::{Outbound, TransportKind};

/// A session id, unique across the cluster with overwhelming probability.
///
/// It is 64 random bits the hub draws from the random source its owner gave it
/// ([`Hub::new_session_id`]).
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
    /// The queue was full and the frame, which may be lost, was dropped.
    ///
    /// The frame was volatile (best effort): the session stays open.
    Dropped,
}

/// The bounds of a session's outbound queue.
///
/// Everything queued for the session (live messages, replays, acks, presence listings)
/// counts against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Frames queued at most.
    pub frames: usize,
    /// Bytes of queued frames at most.
    ///
    /// A frame arriving in an empty queue is always taken, so one frame larger than this
    /// does not close the session: the queue holds at most `bytes` plus one frame.
    pub bytes: usize,
}

impl QueueLimits {
    /// The documented defaults (CONFIG.md `queue_capacity`, `queue_bytes`).
    pub const DEFAULT: QueueLimits = QueueLimits {
        frames: 1024,
        bytes: 1024 * 1024,
    };

    /// A bound of `frames` frames and the default bytes.
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            ..Self::DEFAULT
        }
    }
}

impl Outbound {
    /// Bytes this frame holds on the wire (its payload).
    pub fn len(&self) -> usize {
        match self {
            Outbound::Text(b) | Outbound::Binary(b) | Outbound::Volatile(b) => b.len(),
            Outbound::Ping => 0,
        }
    }

    /// Whether the frame carries no bytes (a ping).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Queue {
    frames: VecDeque<Outbound>,
    /// Bytes of `frames`.
    bytes: usize,
    close: Option<CloseReason>,
    /// Frames still to drain until the last queued history replay is written.
    ///
    /// While it is non-zero, another replay is refused (one replay per session at a time).
    replay_pending: usize,
    /// Whether a recovering join waits for the cluster's history.
    ///
    /// See [`SessionHandle::begin_recovery`].
    recovering: bool,
}

impl Queue {
    /// Whether a frame of `len` bytes fits beside what is queued.
    fn fits(&self, limits: QueueLimits, frames: usize, len: usize) -> bool {
        self.frames.len() + frames <= limits.frames
            && (self.frames.is_empty() || self.bytes + len <= limits.bytes)
    }

    fn push(&mut self, frame: Outbound) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }
}

struct Shared {
    id: SessionId,
    id_text: String,
    transport: TransportKind,
    endpoint: Arc<str>,
    user: OnceLock<Arc<str>>,
    limits: QueueLimits,
    queue: Mutex<Queue>,
    /// Wakes the writer task.
    ///
    /// It is notified when a frame arrived in an empty queue (without a doorbell), the
    /// session closed, or the doorbell's owner handed the writing back to it.
    writer: Notify,
    /// Rung instead of `writer` when a frame arrives in an empty queue, once set.
    doorbell: OnceLock<Arc<dyn Doorbell>>,
    /// Wakes everyone waiting in [`SessionHandle::closed`].
    closed: Notify,
    is_closed: AtomicBool,
}

/// What rings when a frame arrives in a session's empty queue.
///
/// It rings instead of waking the session's writer task directly: it is the transport's
/// write scheduler, which writes the frames of many sessions in one pass (see the gateway's
/// `session::cork`).
pub trait Doorbell: Send + Sync {
    /// Frames wait in the session's queue.
    fn ring(&self);
}

/// The hub's side of a session.
///
/// It holds the identity, the transport, and the sending half of the session's bounded
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
    /// A new session `id` with an outbound queue bounded by `limits`.
    pub fn new(
        id: SessionId,
        transport: TransportKind,
        endpoint: Arc<str>,
        limits: QueueLimits,
    ) -> (SessionHandle, OutboxReceiver) {
        let shared = Arc::new(Shared {
            id,
            id_text: id.to_string(),
            transport,
            endpoint,
            user: OnceLock::new(),
            limits: QueueLimits {
                frames: limits.frames.max(1),
                bytes: limits.bytes.max(1),
            },
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                bytes: 0,
                close: None,
                replay_pending: 0,
                recovering: false,
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

    /// Queues a frame without waiting.
    ///
    /// A full queue closes the session with 4008 and drops what it held (the client
    /// reconnects and recovers from history); a volatile frame that does not fit is dropped
    /// instead, since volatile messages may be lost.
    pub fn send(&self, frame: Outbound) -> Delivery {
        let droppable = matches!(frame, Outbound::Volatile(_));
        self.push(frame, droppable)
    }

    /// Queues a frame if there is room, else drops it; never closes the session.
    pub fn offer(&self, frame: Outbound) -> Delivery {
        self.push(frame, true)
    }

    /// Queues the reply to a recovering join and, when they fit, the replayed `frames`.
    ///
    /// Both are queued under one lock, the frames after the reply, so that nothing is
    /// queued between them. The replay is taken only when the reply and every replayed
    /// frame fit the queue's bounds beside what it holds, and no earlier replay is still
    /// queued (one replay per session at a time); `reply` is told whether it was, and its
    /// frame is queued either way (as [`send`](Self::send) would). Returns what happened to
    /// the reply and whether the replay was queued.
    pub fn send_with_replay<F>(
        &self,
        frames: &[F],
        reply: impl FnOnce(bool) -> Outbound,
    ) -> (Delivery, bool)
    where
        F: std::borrow::Borrow<Outbound>,
    {
        let mut q = self.lock();
        q.recovering = false;
        if q.close.is_some() {
            return (Delivery::Closed, false);
        }
        let replay_bytes: usize = frames.iter().map(|f| f.borrow().len()).sum();
        // Sized with a placeholder reply: acks of either outcome differ by a few bytes.
        let replay = q.replay_pending == 0
            && q.frames.len() + 1 + frames.len() <= self.0.limits.frames
            && q.bytes + replay_bytes + REPLY_ALLOWANCE <= self.0.limits.bytes;
        let reply = reply(replay);
        if !q.fits(self.0.limits, 1, reply.len()) {
            drop(q);
            self.overflow();
            return (Delivery::Overflow, false);
        }
        let was_empty = q.frames.is_empty();
        q.push(reply);
        if replay {
            for frame in frames {
                q.push(frame.borrow().clone());
            }
            if !frames.is_empty() {
                q.replay_pending = q.frames.len();
            }
        }
        drop(q);
        if was_empty {
            self.0.frames_waiting();
        }
        (Delivery::Queued, replay)
    }

    /// Whether a history replay is still queued (another one would be refused).
    pub fn replay_pending(&self) -> bool {
        self.lock().replay_pending > 0
    }

    /// Reserves the session's one recovery before its history is read from a store.
    ///
    /// This is for cluster mode, so that a session cannot make the store read histories it
    /// will not take: the reservation needs no replay queued or being read already, and the
    /// queue at most half full (a client that does not read fills it with acks). Released
    /// by the replay being queued ([`send_with_replay`](Self::send_with_replay)) or
    /// [`end_recovery`](Self::end_recovery).
    pub fn begin_recovery(&self) -> bool {
        let mut q = self.lock();
        let limits = self.0.limits;
        let room = q.frames.len() <= limits.frames / 2 && q.bytes <= limits.bytes / 2;
        if q.close.is_some() || q.recovering || q.replay_pending > 0 || !room {
            return false;
        }
        q.recovering = true;
        true
    }

    /// Releases what [`begin_recovery`](Self::begin_recovery) reserved.
    pub fn end_recovery(&self) {
        self.lock().recovering = false;
    }

    fn push(&self, frame: Outbound, droppable: bool) -> Delivery {
        let mut q = self.lock();
        if q.close.is_some() {
            return Delivery::Closed;
        }
        if !q.fits(self.0.limits, 1, frame.len()) {
            if droppable {
                return Delivery::Dropped;
            }
            drop(q);
            self.overflow();
            return Delivery::Overflow;
        }
        let was_empty = q.frames.is_empty();
        q.push(frame);
        drop(q);
        if was_empty {
            self.0.frames_waiting();
        }
        Delivery::Queued
    }

    /// The queue is full: drop what it holds and close the session with 4008.
    fn overflow(&self) {
        let mut q = self.lock();
        q.frames = VecDeque::new();
        q.bytes = 0;
        q.replay_pending = 0;
        drop(q);
        self.close(CloseReason::new(CloseCode::TooSlowOrTooFast, SLOW_CONSUMER));
    }

    /// Closes the session: frames already queued are still written, then the close.
    ///
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

    /// Makes a frame arriving in the empty queue ring `doorbell` from now on.
    ///
    /// The doorbell rings instead of waking the writer task (closing still wakes the task).
    /// Only the first call takes effect.
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

/// The close reason of a session whose outbound queue overflowed (4008).
pub const SLOW_CONSUMER: &str = "slow consumer: outbound queue full";

/// Bytes kept free for the reply queued ahead of a replay when deciding whether it fits.
const REPLY_ALLOWANCE: usize = 512;

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
    /// Waits until frames are queued or the session closes, then moves a batch into `out`.
    ///
    /// It moves up to `max` frames, under one lock for the whole batch. Returns
    /// [`Batch::Close`] only once the queue is drained. For a session without a doorbell:
    /// with one, new frames ring it instead of waking this.
    pub async fn recv_batch(&self, out: &mut Vec<Outbound>, max: usize) -> Batch {
        loop {
            if let Some(batch) = self.try_batch(out, max) {
                return batch;
            }
            self.woken().await;
        }
    }

    /// [`recv_batch`](Self::recv_batch) without waiting.
    ///
    /// Returns `None` when the queue is empty and the session open.
    pub fn try_batch(&self, out: &mut Vec<Outbound>, max: usize) -> Option<Batch> {
        let mut q = lock(&self.0.queue);
        if !q.frames.is_empty() {
            let n = q.frames.len().min(max.max(1));
            let mut freed = 0;
            out.extend(q.frames.drain(..n).inspect(|f| freed += f.len()));
            q.bytes -= freed;
            q.replay_pending = q.replay_pending.saturating_sub(n);
            if q.frames.is_empty() {
                // An idle session holds no queue storage.
                q.frames = VecDeque::new();
            }
            return Some(Batch::Frames);
        }
        q.close.as_ref().map(|reason| Batch::Close(reason.clone()))
    }

    /// Resolves when the writer task is woken.
    ///
    /// That is when frames arrived in the empty queue (without a doorbell), the session
    /// closed, or [`wake_writer`](Self::wake_writer) was called. A wake-up while nobody
    /// waits is kept for the next call.
    pub async fn woken(&self) {
        self.0.writer.notified().await;
    }

    /// Wakes the writer task (see [`woken`](Self::woken)).
    pub fn wake_writer(&self) {
        self.0.writer.notify_one();
    }

    /// Closes the session from the writing side, as [`SessionHandle::close`] does.
    ///
    /// The writing side closes it when its transport failed.
    pub fn close(&self, reason: CloseReason) {
        SessionHandle(self.0.clone()).close(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::future::Future;

    fn limits(frames: usize) -> QueueLimits {
        QueueLimits::frames(frames)
    }

    fn text(s: &'static str) -> Outbound {
        Outbound::Text(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn batches_in_order_then_closes() {
        let (h, rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(8),
        );
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
        let (h, rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebTransport,
            "/chat".into(),
            limits(2),
        );
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
        let (h, _rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(1),
        );
        h.send(text("a"));
        let volatile = Outbound::Volatile(Bytes::from_static(b"{}"));
        assert_eq!(h.send(volatile), Delivery::Dropped);
        assert_eq!(h.offer(text("b")), Delivery::Dropped);
        assert!(!h.is_closed());
        assert_eq!(h.send(text("c")), Delivery::Overflow);
    }

    fn ack(recovered: bool) -> Outbound {
        text(if recovered { "ack+" } else { "ack-" })
    }

    #[tokio::test]
    async fn a_replay_that_does_not_fit_is_refused_and_the_reply_says_so() {
        let (h, _rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
        let replay: Vec<Outbound> = (0..5).map(|_| text("old")).collect();
        assert_eq!(h.send_with_replay(&replay, ack), (Delivery::Queued, false));
        assert_eq!(h.queued(), 1, "only the reply");
        assert!(!h.replay_pending());
        let (h, _rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
        assert_eq!(
            h.send_with_replay(&replay[..3], ack),
            (Delivery::Queued, true)
        );
        assert_eq!(h.queued(), 4, "the reply and three replayed frames");
        // Replays count against the bound like any frame.
        assert_eq!(h.send(text("live")), Delivery::Overflow);
    }

    #[tokio::test]
    async fn one_replay_at_a_time() {
        let (h, rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(64),
        );
        let replay: Vec<Outbound> = (0..3).map(|_| text("old")).collect();
        assert_eq!(h.send_with_replay(&replay, ack), (Delivery::Queued, true));
        assert!(h.replay_pending());
        assert_eq!(h.send_with_replay(&replay, ack), (Delivery::Queued, false));
        let mut out = Vec::new();
        rx.recv_batch(&mut out, 3).await;
        assert!(h.replay_pending(), "one replayed frame is still queued");
        rx.recv_batch(&mut out, 2).await;
        assert!(!h.replay_pending());
        assert_eq!(h.send_with_replay(&replay, ack), (Delivery::Queued, true));
        out.clear();
        rx.recv_batch(&mut out, 64).await;
        assert_eq!(out, vec![ack(true), text("old"), text("old"), text("old")]);
    }

    #[test]
    fn a_recovery_is_reserved_once_and_only_with_room_in_the_queue() {
        let (h, _rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
        assert!(h.begin_recovery());
        assert!(!h.begin_recovery(), "one at a time");
        h.end_recovery();
        assert!(h.begin_recovery());
        assert_eq!(
            h.send_with_replay(&[text("old")], ack),
            (Delivery::Queued, true)
        );
        assert!(!h.begin_recovery(), "its replay is still queued");
        let (h, _rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
        h.send(text("a"));
        h.send(text("b"));
        h.send(text("c"));
        assert!(!h.begin_recovery(), "the queue is more than half full");
    }

    #[test]
    fn bytes_bound_the_queue_as_frames_do() {
        let bounds = QueueLimits {
            frames: 100,
            bytes: 10,
        };
        let (h, _rx) =
            SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/c".into(), bounds);
        // An empty queue takes any frame, however large.
        assert_eq!(h.send(text("0123456789abcdef")), Delivery::Queued);
        let (h, _rx) =
            SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/c".into(), bounds);
        assert_eq!(h.send(text("01234")), Delivery::Queued);
        assert_eq!(h.send(text("56789")), Delivery::Queued);
        assert_eq!(h.offer(text("x")), Delivery::Dropped);
        assert_eq!(h.send(text("x")), Delivery::Overflow);
        assert!(h.is_closed());
    }

    #[tokio::test]
    async fn draining_gives_the_bytes_back() {
        let bounds = QueueLimits {
            frames: 100,
            bytes: 10,
        };
        let (h, rx) =
            SessionHandle::new(SessionId(1), TransportKind::WebSocket, "/c".into(), bounds);
        h.send(text("01234"));
        h.send(text("56789"));
        let mut out = Vec::new();
        rx.recv_batch(&mut out, 1).await;
        assert_eq!(h.send(text("abcde")), Delivery::Queued);
        assert_eq!(h.send(text("f")), Delivery::Overflow);
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
        let (h, rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
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
        let (h, rx) = SessionHandle::new(
            SessionId(1),
            TransportKind::WebSocket,
            "/chat".into(),
            limits(4),
        );
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
