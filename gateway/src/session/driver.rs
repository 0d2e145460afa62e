//! Runs one session over a transport: inbound events into the core [`Connection`], its
//! deadlines and wake-ups, the writer task, and the close procedure.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use gateway_core::{
    connection::{Connection, InboundStats, WakeSignal},
    protocol::{CloseReason, TransportFault},
};
use tokio::task::JoinHandle;

use crate::clock;

use crate::metrics::EndpointCounters;

use super::{
    open::AccessLog,
    writer::{FrameSink, SessionWriter},
    WriteStats,
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
    /// Frames that carry no request (control frames, streams the protocol does not use):
    /// each costs a token of the rate limit; `then` runs when they were within it.
    Control {
        frames: u32,
        then: Option<Box<dyn FnOnce() + Send>>,
    },
    /// The transport broke the protocol or a limit: the session closes as the fault says.
    Fault(TransportFault),
    /// The peer started the close: the session ends, reading goes on until the transport
    /// has finished its closing handshake.
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

/// Resolves when the session's wake signal fires; never without one.
async fn woken(signal: &Option<WakeSignal>) {
    match signal {
        Some(signal) => signal.notified().await,
        None => std::future::pending().await,
    }
}

/// Runs a session to its end: feeds `inbound`'s events to `conn`, runs its timers, writes
/// its outbox through `writer`, and closes it (within [`CLOSE_GRACE`]), then logs it.
pub(crate) async fn drive<I: Inbound, S: FrameSink>(
    mut conn: Connection,
    mut inbound: I,
    writer: Arc<SessionWriter<S>>,
    log: AccessLog,
) {
    let handle = conn.handle().clone();
    let inbound_counters = log.metrics().transport(handle.transport());
    let received = |frame: &Bytes| {
        if !crate::metrics::ENABLED {
            return;
        }
        inbound_counters.frames_received.inc();
        inbound_counters.bytes_received.inc_by(frame.len() as u64);
    };
    let endpoint_counters = log.metrics().endpoint(handle.endpoint());
    let mut counted = conn.stats();
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
                    Event::Text(frame) => {
                        received(&frame);
                        conn.on_text(frame, now)
                    }
                    Event::Binary(frame) => {
                        received(&frame);
                        conn.on_binary(frame, now)
                    }
                    Event::Datagram(frame) => {
                        received(&frame);
                        conn.on_datagram(frame, now)
                    }
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
                count_requests(endpoint_counters, &mut counted, conn.stats());
            }
            () = timer => deadline = conn.poll(clock::instant()),
            () = woken(&wake) => conn.on_wake(clock::now()),
        }
    }
    if !handle.is_closed() {
        handle.close(TransportFault::PeerClosed.close_reason());
    }
    // Boxed: the task of an open session does not carry the closing procedure's state.
    Box::pin(finish(conn, inbound, writer, gone, log)).await;
}

/// Adds the publishes and rate-limited frames since `counted` to the endpoint's counters.
fn count_requests(
    counters: Option<&EndpointCounters>,
    counted: &mut InboundStats,
    now: InboundStats,
) {
    if let Some(c) = counters.filter(|_| crate::metrics::ENABLED) {
        if now.publishes != counted.publishes {
            c.publishes.inc_by(now.publishes - counted.publishes);
        }
        if now.rate_limited != counted.rate_limited {
            c.rate_limited
                .inc_by(now.rate_limited - counted.rate_limited);
        }
    }
    *counted = now;
}

/// The close procedure: lets the writer flush what is queued and the close, and keeps
/// reading so the transport can finish its closing handshake, within [`CLOSE_GRACE`]; then
/// logs the session.
async fn finish<I: Inbound>(
    conn: Connection,
    mut inbound: I,
    mut writer: JoinHandle<WriteStats>,
    mut gone: bool,
    log: AccessLog,
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
