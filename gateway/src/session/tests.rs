//! The session writer corked by the flushers.
//!
//! The tests cover one write per session per pass, counting, transports that take little at
//! a time, and stuck or panicking transports.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use gateway_core::{
    protocol::{CloseCode, CloseReason},
    session::{Delivery, Outbound, SessionHandle, SessionId, TransportKind},
};

use super::{
    cork::Flushers,
    latency::LATENCY_SAMPLE_EVERY,
    writer::{FrameSink, SessionWriter, WriteStats},
};
use crate::metrics::Metrics;

/// What a test sink saw: each write's frames, and the close.
#[derive(Default)]
struct Wire {
    writes: Vec<Vec<Outbound>>,
    closed: Option<CloseReason>,
}

/// An in-memory transport that takes at most `room` frames per poll.
///
/// Then it is `Pending`, and asks to be polled again unless `stuck`.
struct TestSink {
    wire: Arc<Mutex<Wire>>,
    room: usize,
    stuck: bool,
    panics: bool,
}

impl FrameSink for TestSink {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Outbound>,
        stats: &mut WriteStats,
    ) -> Poll<Result<(), ()>> {
        if frames.is_empty() {
            return Poll::Ready(Ok(()));
        }
        assert!(!self.panics, "a broken transport");
        if self.stuck {
            return Poll::Pending;
        }
        let n = frames.len().min(self.room);
        stats.frames += n as u64;
        stats.bytes += frames[..n]
            .iter()
            .map(|f| match f {
                Outbound::Binary(b) => b.len() as u64,
                _ => 0,
            })
            .sum::<u64>();
        self.wire
            .lock()
            .unwrap()
            .writes
            .push(frames.drain(..n).collect());
        if frames.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    async fn close(self, reason: CloseReason) {
        self.wire.lock().unwrap().closed = Some(reason);
    }
}

fn frame(i: usize) -> Outbound {
    Outbound::Binary(Bytes::from(i.to_string()))
}

type TestSession = (
    SessionHandle,
    Arc<Mutex<Wire>>,
    tokio::task::JoinHandle<WriteStats>,
);

fn session(flushers: &Flushers, room: usize, stuck: bool) -> TestSession {
    session_with(flushers, room, stuck, false)
}

fn session_with(flushers: &Flushers, room: usize, stuck: bool, panics: bool) -> TestSession {
    let (handle, outbox) = SessionHandle::new(
        SessionId(1),
        TransportKind::WebSocket,
        "/t".into(),
        gateway_core::session::QueueLimits::frames(8),
    );
    let wire = Arc::new(Mutex::new(Wire::default()));
    let sink = TestSink {
        wire: wire.clone(),
        room,
        stuck,
        panics,
    };
    let writer = SessionWriter::corked(&handle, outbox, sink, flushers, &Metrics::new("t", []));
    let task = tokio::spawn(writer.run());
    (handle, wire, task)
}

/// A session whose own writer task never runs: only the flusher can write it.
fn flusher_only_session(
    flushers: &Flushers,
) -> (SessionHandle, Arc<Mutex<Wire>>, Arc<dyn std::any::Any>) {
    flusher_only_session_counted(flushers, &Metrics::new("t", []))
}

fn flusher_only_session_counted(
    flushers: &Flushers,
    metrics: &Arc<Metrics>,
) -> (SessionHandle, Arc<Mutex<Wire>>, Arc<dyn std::any::Any>) {
    let (handle, outbox) = SessionHandle::new(
        SessionId(1),
        TransportKind::WebSocket,
        "/t".into(),
        gateway_core::session::QueueLimits::frames(8),
    );
    let wire = Arc::new(Mutex::new(Wire::default()));
    let sink = TestSink {
        wire: wire.clone(),
        room: 100,
        stuck: false,
        panics: false,
    };
    let writer = SessionWriter::corked(&handle, outbox, sink, flushers, metrics);
    (handle, wire, writer)
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn frames_queued_in_one_pass_leave_as_one_write_per_session() {
    let flushers = Flushers::spawn();
    // The sessions' own writer tasks never run: every write below is the flusher's.
    let sessions: Vec<_> = (0..3).map(|_| flusher_only_session(&flushers)).collect();
    settle().await;
    // A fan-out of five publishes to three sessions, without yielding in between.
    for i in 0..5 {
        for (handle, _, _) in &sessions {
            assert_eq!(handle.send(frame(i)), Delivery::Queued);
        }
    }
    settle().await;
    for (_, wire, _) in &sessions {
        let wire = wire.lock().unwrap();
        assert_eq!(wire.writes, vec![(0..5).map(frame).collect::<Vec<_>>()]);
    }
    // The next publish is a new pass and a new write.
    sessions[0].0.send(frame(5));
    settle().await;
    assert_eq!(sessions[0].1.lock().unwrap().writes.len(), 2);
}

#[tokio::test]
async fn writes_are_counted_and_sampled_rings_timed() {
    let flushers = Flushers::spawn();
    let metrics = Metrics::new("t", []);
    let (handle, _wire, _keep) = flusher_only_session_counted(&flushers, &metrics);
    settle().await;
    // Every ring of an emptied queue is a new pass; one in 64 is timed.
    for i in 0..(2 * LATENCY_SAMPLE_EVERY as usize) {
        handle.send(frame(i));
        settle().await;
    }
    let text = metrics.encode();
    let sent = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("transport=\"websocket\""))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.to_owned())
    };
    assert_eq!(
        sent("gateway_frames_sent_total").as_deref(),
        Some("128"),
        "{text}"
    );
    let bytes: usize = (0..128usize).map(|i| i.to_string().len()).sum();
    assert_eq!(sent("gateway_bytes_sent_total"), Some(bytes.to_string()));
    // The thread-local sample counter is shared with other tests on this thread: at
    // least one of 128 consecutive rings is a sampled one.
    let timed: u64 = sent("gateway_delivery_seconds_count")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&timed), "{timed} samples\n{text}");
}

#[tokio::test]
async fn a_transport_that_takes_little_at_a_time_gets_every_frame_in_order_then_the_close() {
    let flushers = Flushers::spawn();
    let (handle, wire, task) = session(&flushers, 3, false);
    settle().await;
    for i in 0..8 {
        handle.send(frame(i));
    }
    handle.close(CloseReason::new(CloseCode::Normal, "bye"));
    let stats = task.await.unwrap();
    assert_eq!(stats.frames, 8);
    let wire = wire.lock().unwrap();
    let sent: Vec<Outbound> = wire.writes.iter().flatten().cloned().collect();
    assert_eq!(sent, (0..8).map(frame).collect::<Vec<_>>());
    assert!(wire.writes.iter().all(|w| w.len() <= 3));
    assert_eq!(
        wire.closed.as_ref().map(|r| r.code),
        Some(CloseCode::Normal)
    );
}

#[tokio::test]
async fn a_stuck_transport_still_makes_its_session_a_slow_consumer() {
    let flushers = Flushers::spawn();
    let (handle, wire, _task) = session(&flushers, 100, true);
    let (other, other_wire, _other_task) = session(&flushers, 100, false);
    settle().await;
    let mut outcomes = Vec::new();
    for i in 0..40 {
        outcomes.push(handle.send(frame(i)));
        other.send(frame(i));
        settle().await;
    }
    assert!(outcomes.contains(&Delivery::Overflow), "{outcomes:?}");
    assert_eq!(
        handle.close_reason().map(|r| r.code),
        Some(CloseCode::TooSlowOrTooFast)
    );
    assert!(wire.lock().unwrap().writes.is_empty());
    // The other session of the same flusher got everything.
    let got: usize = other_wire.lock().unwrap().writes.iter().map(Vec::len).sum();
    assert_eq!(got, 40);
}

#[tokio::test]
async fn a_panicking_transport_closes_its_session_and_the_flusher_goes_on() {
    let flushers = Flushers::spawn();
    let (broken, _, _broken_task) = session_with(&flushers, 100, false, true);
    let (other, other_wire, _other_task) = session(&flushers, 100, false);
    settle().await;
    broken.send(frame(0));
    other.send(frame(0));
    settle().await;
    assert_eq!(
        broken.close_reason().map(|r| r.code),
        Some(CloseCode::Internal)
    );
    other.send(frame(1));
    settle().await;
    let got: Vec<Outbound> = other_wire.lock().unwrap().writes.concat();
    assert_eq!(got, vec![frame(0), frame(1)]);
}
