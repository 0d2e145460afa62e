//! Runs one session over a transport.
//!
//! It feeds inbound events into the core [`Connection`] and handles its deadlines and
//! wake-ups, the writer task, and the close procedure.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use gateway_core::{
    connection::{Connection, InboundStats, WakeSignal},
    protocol::{CloseReason, TransportFault},
};
use tokio::task::JoinHandle;

use crate::{clock, upstream::SessionCalls};

use super::{
    open::AccessLog,
    writer::{FrameSink, SessionWriter, WriteStats},
};

/// How long a closing session may take to flush its close and hear the peer's reply.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// What a transport reports from its peer.
pub(crate) enum Event {
    /// A JSON envelope.
    Text(Bytes),
    /// A binary envelope.
    Binary(Bytes),
    /// A WebTransport datagram.
    Datagram(Bytes),
    /// The peer answered a transport ping (it costs a frame of the rate limit too).
    Pong,
    /// Frames that carry no request; `then` runs when they were within the rate limit.
    ///
    /// They are control frames, or streams the protocol does not use: each costs a token of
    /// the rate limit.
    Control {
        frames: u32,
        then: Option<Box<dyn FnOnce() + Send>>,
    },
    /// The transport broke the protocol or a limit: the session closes as the fault says.
    Fault(TransportFault),
    /// The peer started the close.
    ///
    /// The session ends; reading goes on until the transport has finished its closing
    /// handshake.
    PeerClosed,
    /// Nothing more will arrive.
    Gone,
}

/// The receiving side of a session's transport.
pub(crate) trait Inbound: Send {
    /// The next event (cancel-safe: state lives in `self`, not in the future).
    fn next(&mut self) -> impl Future<Output = Event> + Send;

    /// The session is closing: release what the writer may be waiting for.
    fn closing(&mut self) {}

    /// The session is over (the writer has finished or was given up).
    fn finished(self, _reason: Option<&CloseReason>)
    where
        Self: Sized,
    {
    }
}

/// Resolves when call outcomes arrived; never for a session that makes no calls.
async fn answered(calls: &Option<Box<SessionCalls>>) {
    match calls {
        Some(calls) => calls.arrived().await,
        None => std::future::pending().await,
    }
}

/// Hands the outcomes of `conn`'s calls that arrived back to it.
fn hand_back(conn: &mut Connection, calls: &Option<Box<SessionCalls>>) {
    for (id, outcome) in calls.iter().flat_map(|c| c.take()) {
        conn.on_answer(id, outcome, clock::now());
    }
}

/// Starts the calls `conn` asked for.
fn start_calls(conn: &mut Connection, calls: &Option<Box<SessionCalls>>) {
    if let Some(calls) = calls {
        for call in conn.take_calls() {
            calls.start(call, conn.handle());
        }
    }
}

/// Resolves when the session's wake signal fires; never without one.
async fn woken(signal: &Option<WakeSignal>) {
    match signal {
        Some(signal) => signal.notified().await,
        None => std::future::pending().await,
    }
}

/// Runs a session to its end, then logs it.
///
/// It feeds `inbound`'s events to `conn`, runs its timers, writes its outbox through
/// `writer`, and closes it (within [`CLOSE_GRACE`]).
pub(super) async fn drive<I: Inbound, S: FrameSink>(
    mut conn: Connection,
    mut inbound: I,
    writer: Arc<SessionWriter<S>>,
    log: Box<AccessLog>,
    calls: Option<Box<SessionCalls>>,
) {
    let handle = conn.handle().clone();
    let mut counted = InboundStats::default();
    let writer = tokio::spawn(writer.run());
    let mut deadline = conn.poll(clock::instant());
    let wake = conn.wake_signal();
    let mut gone = false;
    loop {
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = handle.closed() => break,
            event = inbound.next() => {
                let now = clock::now();
                match event {
                    Event::Text(frame) => conn.on_text(frame, now),
                    Event::Binary(frame) => conn.on_binary(frame, now),
                    Event::Datagram(frame) => conn.on_datagram(frame, now),
                    Event::Pong => {
                        conn.on_pong();
                        conn.on_control(1, now);
                    }
                    Event::Control { frames, then } => {
                        if conn.on_control(frames, now) {
                            if let Some(then) = then {
                                then();
                            }
                        }
                    }
                    Event::Fault(fault) => {
                        conn.close(fault.close_reason());
                        break;
                    }
                    Event::PeerClosed => break,
                    Event::Gone => {
                        gone = true;
                        break;
                    }
                }
            }
            () = timer => deadline = conn.poll(clock::instant()),
            () = woken(&wake) => conn.on_wake(clock::now()),
            () = answered(&calls) => hand_back(&mut conn, &calls),
        }
        start_calls(&mut conn, &calls);
        count_inbound(&log, &handle, &mut counted, conn.stats());
    }
    count_inbound(&log, &handle, &mut counted, conn.stats());
    if !handle.is_closed() {
        let ended = if gone {
            TransportFault::ConnectionLost
        } else {
            TransportFault::PeerClosed
        };
        handle.close(ended.close_reason());
    }
    // Calls asked for are made, even by a session that is gone (only their answers are
    // dropped); the backend hears of the end once.
    start_calls(&mut conn, &calls);
    if let (Some(calls), Some(call)) = (&calls, conn.disconnect_call(log.duration_ms())) {
        calls.start(call, &handle);
    }
    drop(calls);
    // Boxed: the task of an open session does not carry the closing procedure's state.
    Box::pin(finish(conn, inbound, writer, gone, log)).await;
}

/// Brings a session's inbound counters up to its connection's running totals.
///
/// The counters are frames and bytes per transport, publishes and rate-limited frames per
/// endpoint (atomic adds of what changed since `counted`). They are looked up here rather
/// than kept in the session's task, which an idle session would carry.
fn count_inbound(
    log: &AccessLog,
    session: &gateway_core::session::SessionHandle,
    counted: &mut InboundStats,
    now: InboundStats,
) {
    if !crate::metrics::ENABLED || now == *counted {
        return;
    }
    let add = |counter: &prometheus_client::metrics::counter::Counter, was: u64, is: u64| {
        if is > was {
            counter.inc_by(is - was);
        }
    };
    let was = std::mem::replace(counted, now);
    let transport = log.metrics().transport(session.transport());
    add(&transport.frames_received, was.frames, now.frames);
    add(&transport.bytes_received, was.bytes, now.bytes);
    if let Some(c) = log.metrics().endpoint(session.endpoint()) {
        add(&c.publishes, was.publishes, now.publishes);
        add(&c.rate_limited, was.rate_limited, now.rate_limited);
    }
}

/// The close procedure, within [`CLOSE_GRACE`]; then logs the session.
///
/// It lets the writer flush what is queued and the close, and keeps reading so the
/// transport can finish its closing handshake.
async fn finish<I: Inbound>(
    conn: Connection,
    mut inbound: I,
    mut writer: JoinHandle<WriteStats>,
    mut gone: bool,
    log: Box<AccessLog>,
) {
    let handle = conn.handle();
    inbound.closing();
    let grace = tokio::time::sleep(CLOSE_GRACE);
    tokio::pin!(grace);
    let mut stats = WriteStats::default();
    let mut writer_done = false;
    loop {
        tokio::select! {
            result = &mut writer, if !writer_done => {
                stats = result.unwrap_or_default();
                writer_done = true;
                if gone { break; }
            }
            event = inbound.next(), if !gone => {
                if matches!(event, Event::Gone | Event::Fault(_)) {
                    gone = true;
                    if writer_done { break; }
                }
            }
            () = &mut grace => {
                writer.abort();
                break;
            }
        }
    }
    inbound.finished(handle.close_reason().as_ref());
    log.closed(&conn, stats);
}
