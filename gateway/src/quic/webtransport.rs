//! The WebTransport implementation of the session's transport interface (h3-webtransport).
//!
//! It covers the message stream (framing, one per session), datagrams for volatile
//! messages, and the streams and requests a client opens besides.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use gateway_core::{
    protocol::{
        stream_frame::{encode_header, FrameDecoder, FrameError, FrameKind},
        CloseReason, ErrorCode, ServerFrame, TransportFault,
    },
    session::{Outbound, SessionHandle, TransportKind},
};
use h3::quic::{BidiStream as _, RecvStream as _};
use h3_webtransport::server::AcceptedBi;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    time::Instant,
};
use tracing::debug;

use super::http3::{Requests, WtSession, H3_NO_ERROR};
use crate::{
    http::admission::{Admission, ConnectionPermit},
    session::{self, Event, FrameSink, Inbound, Transport, WriteStats},
    state::AppState,
};

type MessageSend = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
type MessageRecv = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;
/// What accepting a bidirectional stream (the message stream, or a request) yields.
type BidiAccept = Result<Option<AcceptedBi<h3_quinn::Connection, Bytes>>, h3::error::StreamError>;
/// What accepting a unidirectional stream yields.
type UniAccept =
    Result<Option<(h3_webtransport::SessionId, MessageRecv)>, h3::error::ConnectionError>;

/// How long a closing session waits for the peer to close the connection.
///
/// After the `close` envelope, it waits this long before closing the connection itself.
pub(super) const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Runs one WebTransport session to its end.
pub(super) fn run_session(
    session: Arc<WtSession>,
    quic: quinn::Connection,
    admission: Admission,
    app: &Arc<AppState>,
    router: Router,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let max_len = admission.policy.max_message_bytes;
    let limit = app.config.limits.handshake_timeout;
    let stream_deadline = Instant::now() + limit;
    let requests = Requests {
        router,
        peer,
        permit: ConnectionPermit::Granted(admission.slot.clone()),
        limit,
    };
    let transport = Transport {
        kind: TransportKind::WebTransport,
        // QUIC keep-alive and idle timeout (transport_config) watch liveness.
        pings: false,
        // Not corked: each write is a QUIC packet, and the session's own task, which
        // yields once before writing, puts more frames in each under load (the figures are
        // in docs/benchmark.md, "Tuning, each measured").
        corked: None,
    };
    session::run(app, admission, peer, transport, move |handle| {
        let (send_tx, send_rx) = oneshot::channel();
        let sink = WtSink {
            send: None,
            opened: Some(send_rx),
            datagrams: session.datagram_sender(),
            prefix: datagram_prefix_len(&session),
            quic: quic.clone(),
            out: BytesMut::new(),
            written: 0,
        };
        let inbound = WtInbound {
            bidi: boxed(stream::unfold(session.clone(), |s| async move {
                let r = s.accept_bi().await;
                Some((r, s))
            })),
            uni: boxed(stream::unfold(session.clone(), |s| async move {
                let r = s.accept_uni().await;
                Some((r, s))
            })),
            datagrams: boxed(stream::unfold(
                session.datagram_reader(),
                |mut r| async move {
                    let d = r.read_datagram().await;
                    Some((d, r))
                },
            )),
            // Pending until the client opens its message stream.
            messages: Box::pin(stream::pending()),
            send_tx: Some(send_tx),
            stream_deadline: Some(stream_deadline),
            max_len,
            handle: handle.clone(),
            requests,
            quic,
        };
        (inbound, sink)
    })
}

/// Why the message stream stopped yielding frames.
#[derive(Debug)]
enum StreamEnd {
    Frame(FrameError),
    Closed,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<(FrameKind, Bytes), StreamEnd>> + Send>>;

/// The frames of the message stream, as a cancel-safe stream.
///
/// Its state lives in the stream, not in a future that `select!` might drop.
fn message_frames(recv: MessageRecv, max_len: usize) -> FrameStream {
    let decoder = FrameDecoder::new(max_len);
    let state = Some((recv, BytesMut::new()));
    Box::pin(
        stream::unfold(state, move |state| {
            let decoder = decoder.clone();
            async move {
                let (mut recv, mut buf) = state?;
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(frame)) => return Some((Ok(frame), Some((recv, buf)))),
                        Ok(None) => {}
                        Err(e) => return Some((Err(StreamEnd::Frame(e)), None)),
                    }
                    let want = decoder.wanted(&buf);
                    buf.reserve(want);
                    let mut limited = (&mut buf).limit(want);
                    match recv.read_buf(&mut limited).await {
                        Ok(0) | Err(_) => return Some((Err(StreamEnd::Closed), None)),
                        Ok(_) => {}
                    }
                }
            }
        })
        .fuse(),
    )
}

/// A session's writer writes once it has this many bytes of frames.
const WRITE_CHUNK: usize = 64 * 1024;

/// Writes one frame (header and payload) on the message stream.
async fn write_frame(
    send: &mut MessageSend,
    kind: FrameKind,
    payload: &[u8],
) -> std::io::Result<()> {
    send.write_all(&encode_header(kind, payload.len())).await?;
    send.write_all(payload).await
}

/// Length of the QUIC varint that prefixes each HTTP/3 datagram.
///
/// The varint holds the session's quarter stream id.
fn datagram_prefix_len(session: &WtSession) -> usize {
    let stream_id: h3::quic::StreamId = session.session_id().into();
    match stream_id.into_inner() / 4 {
        0..=63 => 1,
        64..=16383 => 2,
        16384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// The sending half of a WebTransport session.
///
/// Frames go on the message stream (every frame of a batch in one write), volatile messages
/// as datagrams when they fit the connection's current maximum datagram size. Closing
/// writes the `close` envelope, finishes the stream and closes the connection.
struct WtSink {
    /// The message stream's sending half, once the client has opened it.
    send: Option<MessageSend>,
    opened: Option<oneshot::Receiver<MessageSend>>,
    datagrams: h3_datagram::datagram_handler::DatagramSender<
        <h3_quinn::Connection as h3_datagram::quic_traits::DatagramConnectionExt<Bytes>>::SendDatagramHandler,
        Bytes,
    >,
    prefix: usize,
    quic: quinn::Connection,
    /// Encoded frames not yet written, from `written` on.
    out: BytesMut,
    written: usize,
}

impl WtSink {
    /// Waits until the client has opened the message stream; `Err` if it never will.
    fn poll_opened(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if self.send.is_some() {
            return Poll::Ready(Ok(()));
        }
        let Some(opened) = self.opened.as_mut() else {
            return Poll::Ready(Err(()));
        };
        let send = std::task::ready!(Pin::new(opened).poll(cx));
        self.opened = None;
        self.send = send.ok();
        Poll::Ready(if self.send.is_some() { Ok(()) } else { Err(()) })
    }

    /// Encodes frames from the front of `frames` into `out` until it holds a chunk.
    ///
    /// Volatile frames that fit go out as datagrams instead.
    fn encode(&mut self, frames: &mut Vec<Outbound>, stats: &mut WriteStats) {
        let mut taken = 0;
        for frame in frames.iter() {
            if self.out.len() >= WRITE_CHUNK {
                break;
            }
            taken += 1;
            let (kind, bytes) = match frame {
                Outbound::Volatile(b) => {
                    let fits = self
                        .quic
                        .max_datagram_size()
                        .is_some_and(|max| b.len() + self.prefix <= max);
                    if fits && self.datagrams.send_datagram(b.clone()).is_ok() {
                        stats.datagrams += 1;
                        continue;
                    }
                    (FrameKind::Json, b)
                }
                Outbound::Text(b) => (FrameKind::Json, b),
                Outbound::Binary(b) => (FrameKind::Binary, b),
                Outbound::Ping => continue,
            };
            stats.frames += 1;
            stats.bytes += bytes.len() as u64;
            self.out
                .extend_from_slice(&encode_header(kind, bytes.len()));
            self.out.extend_from_slice(bytes);
        }
        frames.drain(..taken);
    }
}

impl FrameSink for WtSink {
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Outbound>,
        stats: &mut WriteStats,
    ) -> Poll<Result<(), ()>> {
        if self.out.is_empty() && frames.is_empty() {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(self.poll_opened(cx))?;
        loop {
            let send = self.send.as_mut().expect("opened above");
            while self.written < self.out.len() {
                let n = std::task::ready!(tokio::io::AsyncWrite::poll_write(
                    Pin::new(&mut *send),
                    cx,
                    &self.out[self.written..]
                ))
                .map_err(drop)?;
                self.written += n;
            }
            self.out.clear();
            self.written = 0;
            if frames.is_empty() {
                if self.out.capacity() > 4 * WRITE_CHUNK {
                    self.out = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            self.encode(frames, stats);
        }
    }

    async fn close(mut self, reason: CloseReason) {
        // A session closed before its message stream opened has nothing to write on, and a
        // lost connection has nobody to tell.
        if let Some(send) = self.send.as_mut().filter(|_| reason.code.is_sent()) {
            let envelope = ServerFrame::Close {
                code: reason.code,
                reason: &reason.reason,
            }
            .to_bytes();
            let _ = write_frame(send, FrameKind::Json, &envelope).await;
            let _ = send.shutdown().await;
            // Give the peer time to read the `close` envelope and close the connection.
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.quic.closed()).await;
        }
        close_connection(&self.quic, &reason);
    }
}

/// Closes the QUIC connection.
///
/// The WebTransport close code travels in the `close` envelope; the connection itself
/// closes with `H3_NO_ERROR` and "CODE reason" as its reason.
fn close_connection(quic: &quinn::Connection, reason: &CloseReason) {
    quic.close(H3_NO_ERROR.into(), reason.to_string().as_bytes());
}

/// Answers a second bidirectional stream with an `error` frame and finishes it.
async fn refuse_extra_stream(
    stream: h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) {
    let (mut send, mut recv) = stream.split();
    recv.stop_sending(0);
    let error = ServerFrame::Error {
        id: None,
        code: ErrorCode::BadRequest,
        message: "one message stream per session: this stream is not used",
    }
    .to_bytes();
    let _ = write_frame(&mut send, FrameKind::Json, &error).await;
    let _ = send.shutdown().await;
}

/// An acceptor as a long-lived, cancel-safe stream.
///
/// h3's accept futures are not cancel-safe: they must not be re-created in each `select!`
/// turn.
type Accepted<T> = futures_util::stream::Fuse<Pin<Box<dyn Stream<Item = T> + Send>>>;

fn boxed<S: Stream + Send + 'static>(s: S) -> Accepted<S::Item> {
    let s: Pin<Box<dyn Stream<Item = S::Item> + Send>> = Box::pin(s);
    s.fuse()
}

/// The receiving side of a WebTransport session.
///
/// It takes the message stream, datagrams, and the streams and requests the client opens
/// besides.
struct WtInbound {
    bidi: Accepted<BidiAccept>,
    uni: Accepted<UniAccept>,
    datagrams: Accepted<Result<h3_datagram::datagram::Datagram<Bytes>, h3::error::StreamError>>,
    messages: FrameStream,
    /// Hands the message stream's sending half to the writer.
    send_tx: Option<oneshot::Sender<MessageSend>>,
    /// Until the client opens its message stream.
    stream_deadline: Option<Instant>,
    max_len: usize,
    handle: SessionHandle,
    requests: Requests,
    quic: quinn::Connection,
}

impl WtInbound {
    /// A bidirectional stream: the message stream, one more that is refused, or a request.
    ///
    /// The message stream is the first; the request is an HTTP/3 one. `None` once the
    /// message stream is taken.
    fn on_bidi(&mut self, accepted: Option<BidiAccept>) -> Option<Event> {
        match accepted {
            Some(Ok(Some(AcceptedBi::BidiStream(_, stream)))) => {
                if let Some(tx) = self.send_tx.take() {
                    let (send, recv) = stream.split();
                    let _ = tx.send(send);
                    self.messages = message_frames(recv, self.max_len);
                    self.stream_deadline = None;
                    return None;
                }
                // Each unused stream costs a frame of the rate limit.
                Some(Event::Control {
                    frames: 1,
                    then: Some(Box::new(move || {
                        tokio::spawn(refuse_extra_stream(stream));
                    })),
                })
            }
            Some(Ok(Some(AcceptedBi::Request(req, stream)))) => {
                // Requests on a session's connection cost a frame of its rate limit.
                let requests = self.requests.clone();
                Some(Event::Control {
                    frames: 1,
                    then: Some(Box::new(move || {
                        tokio::spawn(requests.serve(req, stream));
                    })),
                })
            }
            other => {
                debug!(session = self.handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "bidirectional accept ended");
                Some(Event::Gone)
            }
        }
    }

    /// A unidirectional stream: not used, answered with an `error` within the rate limit.
    fn on_uni(&mut self, accepted: Option<UniAccept>) -> Event {
        match accepted {
            Some(Ok(Some((_, mut recv)))) => {
                recv.stop_sending(0);
                // Each stream costs a frame of the rate limit; past it, no reply.
                let handle = self.handle.clone();
                Event::Control {
                    frames: 1,
                    then: Some(Box::new(move || {
                        handle.send(ServerFrame::Error {
                            id: None,
                            code: ErrorCode::BadRequest,
                            message: "unidirectional streams are not used; send frames on the message stream",
                        }.to_outbound());
                    })),
                }
            }
            other => {
                debug!(session = self.handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "unidirectional accept ended");
                Event::Gone
            }
        }
    }
}

impl Inbound for WtInbound {
    async fn next(&mut self) -> Event {
        loop {
            let deadline = self.stream_deadline;
            let no_stream = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // Biased, in this order: h3 resolves a new unidirectional stream while polling
            // for bidirectional ones and stores it without waking the uni acceptor, so the
            // uni acceptor must be polled after the bidi one in every turn.
            tokio::select! {
                biased;
                accepted = self.bidi.next() => match self.on_bidi(accepted) {
                    Some(event) => return event,
                    None => continue,
                },
                accepted = self.uni.next() => return self.on_uni(accepted),
                frame = self.messages.next() => return match frame {
                    Some(Ok((FrameKind::Json, payload))) => Event::Text(payload),
                    Some(Ok((FrameKind::Binary, payload))) => Event::Binary(payload),
                    Some(Err(StreamEnd::Frame(e))) => Event::Fault(e.into()),
                    Some(Err(StreamEnd::Closed)) | None => Event::Fault(TransportFault::StreamClosed),
                },
                datagram = self.datagrams.next() => return match datagram {
                    Some(Ok(d)) => Event::Datagram(d.into_payload()),
                    other => {
                        debug!(session = self.handle.id_str(), result = ?other.map(|r| r.map(|_| ()).map_err(|e| e.to_string())), "datagram reader ended");
                        Event::Gone
                    }
                },
                () = no_stream => {
                    self.stream_deadline = None;
                    return Event::Fault(TransportFault::Malformed(
                        "no message stream opened".into(),
                    ));
                }
            }
        }
    }

    fn closing(&mut self) {
        // A writer still waiting for the message stream stops waiting.
        self.send_tx = None;
    }

    fn finished(self, reason: Option<&CloseReason>) {
        if let Some(reason) = reason {
            close_connection(&self.quic, reason);
        }
    }
}
