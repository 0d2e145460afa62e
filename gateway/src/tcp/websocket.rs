//! The WebSocket implementation of the session's transport interface (tokio-tungstenite).
//!
//! It holds its settings, the [`Inbound`] and [`FrameSink`] halves, close frames and the
//! mapping of read errors to faults, and the test-only echo.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use gateway_core::{
    protocol::{CloseReason, TransportFault},
    session::{Outbound, TransportKind},
};
use tokio_tungstenite::{
    tungstenite::{
        self,
        protocol::{frame::coding::OpCode, frame::Frame, CloseFrame, Role, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};

use super::frames::FrameCount;
use crate::{
    http::admission::Admission,
    session::{self, Event, Flushers, FrameSink, Inbound, Transport, WriteStats},
    state::AppState,
};

/// tungstenite's read buffer per connection, kept small.
///
/// It is allocated eagerly, so a larger one dominates idle memory (docs/benchmark.md,
/// "Tuning, each measured").
const READ_BUFFER: usize = 256;

/// tungstenite settings for one endpoint.
///
/// Its defaults (64 MiB messages, 16 MiB frames, 128 KiB eager read buffer, unbounded write
/// buffer) are unsafe or wasteful for a gateway.
fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated eagerly per connection: 256 B instead of 128 KiB keeps idle connections
        // small; larger inbound messages are read in more (memory-to-memory) steps.
        .read_buffer_size(READ_BUFFER)
        // Frames accumulate up to 16 KiB (about one TLS record) before a write.
        .write_buffer_size(16 * 1024)
        // A writer that cannot write fails instead of buffering without bound.
        .max_write_buffer_size(1024 * 1024 + max_message_bytes)
        // Checked from the frame header, before the payload is buffered.
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

fn to_message(frame: Outbound) -> Message {
    use tungstenite::protocol::frame::coding::Data;
    match frame {
        // The hub only ever queues valid UTF-8 JSON as text; a raw frame skips re-validating
        // the shared bytes once per recipient.
        Outbound::Text(b) | Outbound::Volatile(b) => {
            Message::Frame(Frame::message(b, OpCode::Data(Data::Text), true))
        }
        Outbound::Binary(b) => Message::Binary(b),
        Outbound::Ping => Message::Ping(Bytes::new()),
    }
}

/// The WebSocket close frame of a close reason (its code from core's table).
fn close_frame(reason: CloseReason) -> CloseFrame {
    CloseFrame {
        code: reason.code.code().into(),
        reason: reason.reason.into(),
    }
}

/// The fault a tungstenite read error is; `None` when the connection is just gone.
fn fault_of(error: &tungstenite::Error) -> Option<TransportFault> {
    use tungstenite::Error as E;
    match error {
        E::Capacity(_) => Some(TransportFault::TooLarge),
        // The peer went away without a close (EOF, even after TLS close_notify): gone.
        E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => None,
        E::Protocol(p) => Some(TransportFault::Malformed(p.to_string())),
        E::Utf8(_) => Some(TransportFault::InvalidUtf8),
        _ => None,
    }
}

/// Test-only echo of every data message (Autobahn|Testsuite).
///
/// It uses the same WebSocket settings and error-to-close mapping as real sessions.
pub(super) async fn echo<IO>(io: IO, admission: &Admission)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = websocket_config(admission.policy.max_message_bytes);
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    while let Some(message) = ws.next().await {
        let reply = match message {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            Ok(_) => continue,
            Err(e) => {
                if let Some(fault) = fault_of(&e) {
                    let _ = ws.close(Some(close_frame(fault.close_reason()))).await;
                }
                break;
            }
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// One WebSocket session over `io`, to be run to its end.
///
/// `continuations` counts the frames tungstenite reads without showing them; each is
/// charged to the rate limit like any frame.
pub(super) fn run_session<IO>(
    io: IO,
    continuations: Arc<FrameCount>,
    admission: Admission,
    app: Arc<AppState>,
    flushers: Arc<Flushers>,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = websocket_config(admission.policy.max_message_bytes);
    let burst = admission.policy.rate_burst;
    // tokio-tungstenite's constructor is `async` but never waits.
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
        .now_or_never()
        .expect("constructing a WebSocketStream does not wait");
    let transport = Transport {
        kind: TransportKind::WebSocket,
        // WebSocket liveness is ping/pong (the browser answers; PROTOCOL.md section 8).
        pings: true,
        corked: Some(flushers),
    };
    session::run(&app, admission, peer, transport, move |_| {
        let (sink, stream) = ws.split();
        let inbound = WsInbound {
            burst,
            stream,
            continuations,
            pending: None,
        };
        (inbound, WsSink(sink))
    })
}

/// The receiving half of a WebSocket session.
struct WsInbound<S> {
    stream: S,
    continuations: Arc<FrameCount>,
    /// The endpoint's rate burst.
    ///
    /// More hidden continuation frames than this behind a read error is a flood, not a
    /// broken connection.
    burst: u32,
    /// An event read together with continuation frames, reported after them.
    pending: Option<Event>,
}

impl<S> Inbound for WsInbound<S>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin + Send,
{
    async fn next(&mut self) -> Event {
        if let Some(event) = self.pending.take() {
            return event;
        }
        let message = self.stream.next().await;
        let extra = self.continuations.take();
        let event = match message {
            Some(Ok(Message::Text(text))) => Event::Text(text.into()),
            Some(Ok(Message::Binary(bytes))) => Event::Binary(bytes),
            Some(Ok(Message::Pong(_))) => Event::Pong,
            Some(Ok(Message::Ping(_) | Message::Frame(_))) => Event::Control {
                frames: 1,
                then: None,
            },
            // Reading on lets tungstenite send its Close reply (else clients see 1006).
            Some(Ok(Message::Close(_))) => Event::PeerClosed,
            None => Event::Gone,
            Some(Err(e)) => match fault_of(&e) {
                Some(fault) => Event::Fault(fault),
                // The counting reader stopped a message of endless fragments.
                None if extra > self.burst => Event::Fault(TransportFault::Flood),
                None => Event::Gone,
            },
        };
        if extra == 0 {
            return event;
        }
        self.pending = Some(event);
        Event::Control {
            frames: extra,
            then: None,
        }
    }
}

/// The sending half of a WebSocket session.
///
/// Frames are fed to tungstenite (which buffers up to its write buffer) and flushed once
/// per batch.
struct WsSink<S>(S);

impl<S> FrameSink for WsSink<S>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin + Send + 'static,
{
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Outbound>,
        stats: &mut WriteStats,
    ) -> Poll<Result<(), ()>> {
        let mut fed = 0;
        let mut ready = Poll::Ready(Ok(()));
        for frame in frames.iter() {
            match self.0.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    ready = Poll::Ready(Err(()));
                    break;
                }
                Poll::Pending => {
                    ready = Poll::Pending;
                    break;
                }
            }
            if self.0.start_send_unpin(to_message(frame.clone())).is_err() {
                ready = Poll::Ready(Err(()));
                break;
            }
            fed += 1;
            if let Outbound::Text(b) | Outbound::Volatile(b) | Outbound::Binary(b) = frame {
                stats.frames += 1;
                stats.bytes += b.len() as u64;
            }
        }
        frames.drain(..fed);
        match ready {
            Poll::Ready(Ok(())) => self.0.poll_flush_unpin(cx).map_err(drop),
            other => other,
        }
    }

    async fn close(mut self, reason: CloseReason) {
        // A lost connection has nobody to tell.
        if reason.code.is_sent() {
            let _ = self.0.send(Message::Close(Some(close_frame(reason)))).await;
        }
    }
}
