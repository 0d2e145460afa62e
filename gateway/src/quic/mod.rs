//! The UDP front: a QUIC endpoint (quinn) speaking HTTP/3 (h3) with WebTransport
//! (h3-webtransport). Plain HTTP/3 requests go to the shared router; an extended CONNECT on
//! an endpoint path goes through the same admission as a WebSocket upgrade and becomes a
//! session of the same hub. This module only adapts streams and datagrams.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, Router};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use gateway_core::{
    protocol::{
        stream_frame::{encode_header, FrameDecoder, FrameError, FrameKind},
        CloseReason, ErrorCode, Rejection, ServerFrame, TransportFault,
    },
    session::{Outbound, SessionHandle, TransportKind},
};
use h3::{ext::Protocol, quic::BidiStream as _, quic::RecvStream as _, server::RequestStream};
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinSet,
    time::Instant,
};
use tower::ServiceExt;
use tracing::debug;

use crate::{
    clock,
    http::{
        admission::{self, Admission, ConnectionPermit, UpgradeRequest},
        api::rejection_response,
        PeerAddr,
    },
    session::{
        drive, open_session, Event, FrameSink, Inbound, OpenedSession, SessionWriter, WriteStats,
    },
    state::AppState,
};

type WtSession = WebTransportSession<h3_quinn::Connection, Bytes>;
type H3Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type MessageSend = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
type MessageRecv = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;

/// HTTP/3 `H3_NO_ERROR`, used to close QUIC connections.
const H3_NO_ERROR: u32 = 0x100;
/// Most plain HTTP/3 requests served at once on one QUIC connection (before a session).
const MAX_REQUESTS_PER_CONNECTION: usize = 4;
/// Largest HTTP/3 header section accepted (h3's default is unlimited).
const MAX_FIELD_SECTION: u64 = 16 * 1024;
/// How long a closing session waits for the peer to close the connection after the
/// `close` envelope, before closing it itself.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// QUIC transport settings. Keep-alive every `heartbeat` and an idle timeout of two
/// heartbeats remove a vanished client within about two heartbeats.
pub fn transport_config(heartbeat: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(heartbeat));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(heartbeat * 2).unwrap_or(quinn::VarInt::MAX.into()),
    ));
    // One message stream, a few HTTP/3 requests; HTTP/3 control and QPACK streams.
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    // Flow-control windows bound what a client can make the server buffer: quinn's defaults
    // (1.25 MB per stream, unlimited per connection) would let unread streams pin tens of MB.
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((1024u32 * 1024).into());
    t.send_window(1024 * 1024);
    // Datagrams are on (a receive buffer must exist, else they vanish); keep it modest.
    t.datagram_receive_buffer_size(Some(64 * 1024));
    t.datagram_send_buffer_size(64 * 1024);
    t
}

/// Binds the QUIC endpoint on `addr` with the HTTP/3 TLS configuration.
pub fn bind(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    heartbeat: Duration,
) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(heartbeat)));
    Ok(quinn::Endpoint::server(server, addr)?)
}

/// Accepts QUIC connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, app: Arc<AppState>, router: Router) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(handle_connection(incoming, app.clone(), router.clone()));
    }
}

async fn handle_connection(incoming: quinn::Incoming, app: Arc<AppState>, router: Router) {
    let peer = incoming.remote_address();
    if !incoming.remote_address_validated()
        && incoming.may_retry()
        && app.services.limits.is_busy(peer.ip())
    {
        // Busy: a Retry makes the client prove its address before it is counted (or
        // answered), at the cost of one round trip, so spoofed sources cannot fill another
        // address's quota.
        let _ = incoming.retry();
        return;
    }
    // Counted from the first packet on, like a TCP connection from accept.
    let Some(permit) = ConnectionPermit::acquire(&app, peer.ip()) else {
        debug!(%peer, "QUIC connection over the limits refused");
        return incoming.refuse();
    };
    let timeout = app.config.limits.handshake_timeout;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return debug!(%peer, error = %e, "QUIC accept failed"),
    };
    let quic = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return debug!(%peer, error = %e, "QUIC handshake failed"),
        Err(_) => return admission::timed_out(&app, TransportKind::WebTransport, peer),
    };
    let mut builder = h3::server::builder();
    builder
        .enable_webtransport(true)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .max_webtransport_sessions(1)
        .max_field_section_size(MAX_FIELD_SECTION)
        .send_grease(true);
    let builder = builder.build(h3_quinn::Connection::new(quic.clone()));
    let h3 = match tokio::time::timeout(timeout, builder).await {
        Ok(Ok(h3)) => h3,
        _ => return debug!(%peer, "HTTP/3 setup failed"),
    };
    // Kept until the connection is closed, so the refusal's flush counts too.
    let _held = permit.clone();
    let ending = serve_connection(h3, &quic, permit, &app, &router, peer).await;
    match ending {
        ConnectionEnd::Idle => {
            debug!(%peer, "QUIC connection closed: no session and no request in flight");
            quic.close(H3_NO_ERROR.into(), b"idle");
        }
        ConnectionEnd::Refused => {
            // Let the client read the status before the connection goes.
            let _ = tokio::time::timeout(CLOSE_FLUSH, quic.closed()).await;
            quic.close(H3_NO_ERROR.into(), b"");
        }
        ConnectionEnd::Done => {}
    }
}

/// How the HTTP/3 part of a QUIC connection ended.
enum ConnectionEnd {
    /// Neither a session nor a request for the handshake timeout.
    Idle,
    /// A connection over a limit answered its request.
    Refused,
    /// A session ran to its end, a CONNECT was refused, or the peer went away.
    Done,
}

/// Serves the requests of one QUIC connection until a WebTransport session takes it over,
/// it idles for the handshake timeout, or the peer goes. At most
/// [`MAX_REQUESTS_PER_CONNECTION`] requests are served at once; each must complete within
/// the handshake timeout.
async fn serve_connection(
    mut h3: h3::server::Connection<h3_quinn::Connection, Bytes>,
    quic: &quinn::Connection,
    permit: ConnectionPermit,
    app: &Arc<AppState>,
    router: &Router,
    peer: SocketAddr,
) -> ConnectionEnd {
    let timeout = app.config.limits.handshake_timeout;
    let refused = permit.rejection().is_some();
    let mut requests = JoinSet::new();
    let idle = tokio::time::sleep(timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            accepted = h3.accept(), if requests.len() < MAX_REQUESTS_PER_CONNECTION => {
                let resolver = match accepted {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => {
                        // Requests in flight finish on their own deadlines.
                        requests.detach_all();
                        return ConnectionEnd::Done;
                    }
                };
                let (mut req, mut stream) =
                    match tokio::time::timeout(timeout, resolver.resolve_request()).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "bad HTTP/3 request");
                            continue;
                        }
                        Err(_) => {
                            requests.detach_all();
                            return ConnectionEnd::Idle;
                        }
                    };
                req.extensions_mut().insert(permit.clone());
                let is_connect = req.method() == http::Method::CONNECT;
                if !is_connect {
                    let permit = permit.clone();
                    requests.spawn(serve_request(req, stream, router.clone(), peer, permit, timeout));
                    continue;
                }
                let is_webtransport =
                    req.extensions().get::<Protocol>() == Some(&Protocol::WEB_TRANSPORT);
                let admission = admission::admit(
                    app,
                    &UpgradeRequest::of(&req, peer.ip(), is_webtransport),
                    clock::now(),
                )
                .await;
                match admission {
                    Err(rejection) => {
                        let path = req.uri().path();
                        admission::rejected(app, path, TransportKind::WebTransport, peer, rejection);
                        reject(&mut stream, rejection).await;
                        quic.close(H3_NO_ERROR.into(), b"");
                        return ConnectionEnd::Done;
                    }
                    Ok(admission) => {
                        wait_for_peer_settings(&mut h3, router, &permit, peer, timeout).await;
                        // Requests already running finish on their own deadlines.
                        requests.detach_all();
                        match WebTransportSession::accept(req, stream, h3).await {
                            // On a task of its own: this connection's task (and the state of
                            // its handshake and request phase) ends here.
                            Ok(session) => {
                                app.sessions.spawn(run_session(session, quic.clone(), admission, app.clone(), router.clone(), peer));
                            }
                            Err(e) => debug!(%peer, error = %e, "WebTransport accept failed"),
                        }
                        return ConnectionEnd::Done;
                    }
                }
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => {
                if requests.is_empty() {
                    if refused {
                        return ConnectionEnd::Refused;
                    }
                    idle.as_mut().reset(Instant::now() + timeout);
                }
            }
            () = &mut idle, if requests.is_empty() => return ConnectionEnd::Idle,
        }
    }
}

/// A client may send its CONNECT before h3 has processed the client's SETTINGS, and
/// h3-webtransport refuses a session whose peer has not (yet) announced WebTransport. Drive
/// the connection (which reads the control stream) until the settings are known; requests
/// that arrive meanwhile are served as usual.
async fn wait_for_peer_settings(
    h3: &mut h3::server::Connection<h3_quinn::Connection, Bytes>,
    router: &Router,
    permit: &ConnectionPermit,
    peer: SocketAddr,
    limit: Duration,
) {
    use h3::ConnectionState;
    let wait = async {
        loop {
            // Each poll drives the connection once: it reads the control stream, and the
            // task is woken when more arrives; the settings are looked at after every poll.
            // `accept` is cancel-safe until it yields a request, so its future is dropped
            // after each poll to let go of the connection.
            let accepted = std::future::poll_fn(|cx| {
                if h3.settings().enable_webtransport() {
                    return Poll::Ready(None);
                }
                let polled = std::pin::pin!(h3.accept()).poll(cx);
                match polled {
                    Poll::Ready(accepted) => Poll::Ready(Some(accepted)),
                    Poll::Pending if h3.settings().enable_webtransport() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match accepted {
                Some(Ok(Some(resolver))) => {
                    let (router, permit) = (router.clone(), permit.clone());
                    tokio::spawn(tokio::time::timeout(limit, async move {
                        if let Ok((req, stream)) = resolver.resolve_request().await {
                            serve_request(req, stream, router, peer, permit, limit).await;
                        }
                    }));
                }
                // Known settings, or the connection is over.
                None | Some(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(limit, wait).await;
}

/// Answers a refused CONNECT with its status, then keeps the stream until the client is
/// done with it: dropping it at once makes browsers report a QUIC error instead.
async fn reject(stream: &mut H3Stream, rejection: Rejection) {
    let response = rejection_response(rejection);
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if stream
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.send_data(body).await;
    let _ = stream.finish().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(_)) = stream.recv_data().await {}
    })
    .await;
}

/// Serves one plain HTTP/3 request through the shared router, which checks credentials
/// before the body, limits it per route and answers 408 past the handshake timeout. The
/// body is streamed to the handler, never buffered here; an unread body is refused with
/// STOP_SENDING when the request ends. Sending the response gets as long again.
async fn serve_request(
    req: Request<()>,
    stream: H3Stream,
    router: Router,
    peer: SocketAddr,
    permit: ConnectionPermit,
    limit: Duration,
) {
    let (mut send, recv) = stream.split();
    let (parts, ()) = req.into_parts();
    let mut request = Request::from_parts(parts, Body::from_stream(request_body(recv)));
    request.extensions_mut().insert(PeerAddr(peer));
    request.extensions_mut().insert(permit);
    let served = async move {
        let response = match router.oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        send_response(&mut send, response).await
    };
    if tokio::time::timeout(limit * 2, served).await.is_err() {
        debug!(%peer, "HTTP/3 request abandoned past its deadline");
    }
}

/// The DATA frames of an HTTP/3 request as a body stream.
fn request_body(
    recv: RequestStream<h3_quinn::RecvStream, Bytes>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    stream::unfold(Some(recv), |recv| async move {
        let mut recv = recv?;
        match recv.recv_data().await {
            Ok(Some(mut chunk)) => Some((Ok(chunk.copy_to_bytes(chunk.remaining())), Some(recv))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    })
}

async fn send_response<S: h3::quic::SendStream<Bytes>>(
    stream: &mut RequestStream<S, Bytes>,
    response: Response<Body>,
) -> anyhow::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    stream
        .send_response(Response::from_parts(parts, ()))
        .await?;
    if !body.is_empty() {
        stream.send_data(body).await?;
    }
    stream.finish().await?;
    Ok(())
}

/// Why the message stream stopped yielding frames.
#[derive(Debug)]
enum StreamEnd {
    Frame(FrameError),
    Closed,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<(FrameKind, Bytes), StreamEnd>> + Send>>;

/// The frames of the message stream, as a cancel-safe stream (its state lives in the stream,
/// not in a future that `select!` might drop).
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

/// Length of the QUIC varint that prefixes each HTTP/3 datagram with the session's
/// quarter stream id.
fn datagram_prefix_len(session: &WtSession) -> usize {
    let stream_id: h3::quic::StreamId = session.session_id().into();
    match stream_id.into_inner() / 4 {
        0..=63 => 1,
        64..=16383 => 2,
        16384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// The sending half of a WebTransport session: frames on the message stream (every frame
/// of a batch in one write), volatile messages as datagrams when they fit the connection's
/// current maximum datagram size. Closing writes the `close` envelope, finishes the
/// stream and closes the connection.
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

    /// Encodes frames from the front of `frames` into `out` until it holds a chunk; volatile
    /// frames that fit go out as datagrams instead.
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
        if let Some(send) = self
            .send
            .as_mut()
            .filter(|_| reason.code != gateway_core::protocol::CloseCode::Abnormal)
        {
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

/// Closes the QUIC connection. The WebTransport close code travels in the `close` envelope;
/// the connection itself closes with `H3_NO_ERROR` and "CODE reason" as its reason.
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

/// Runs one WebTransport session to its end.
///
/// Not an `async fn`: the session's state is built here and moved into the driver's
/// future (an async wrapper would keep a second copy of it for the session's whole life).
fn run_session(
    session: WtSession,
    quic: quinn::Connection,
    admission: Admission,
    app: Arc<AppState>,
    router: Router,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send {
    let session = Arc::new(session);
    let max_len = admission.policy.max_message_bytes;
    let stream_deadline = Instant::now() + app.config.limits.handshake_timeout;
    let OpenedSession {
        conn,
        outbox,
        log,
        slot,
    } = open_session(
        &app,
        admission,
        TransportKind::WebTransport,
        // QUIC keep-alive and idle timeout (transport_config) watch liveness.
        false,
        peer,
    );
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
        handle: conn.handle().clone(),
        requests: RequestContext {
            router,
            peer,
            permit: ConnectionPermit::Granted(slot),
            limit: app.config.limits.handshake_timeout,
        },
        quic,
    };
    // Not corked: each write is a QUIC packet, and the session's own task, which yields
    // once before writing, puts more frames in each under load (measured, see README).
    let writer = SessionWriter::own_task(conn.handle(), outbox, sink, &app.metrics);
    drive(conn, inbound, writer, log)
}

/// What serving an HTTP/3 request on a session's connection needs.
struct RequestContext {
    router: Router,
    peer: SocketAddr,
    permit: ConnectionPermit,
    limit: Duration,
}

/// An acceptor as a long-lived, cancel-safe stream (h3's accept futures are not
/// cancel-safe: they must not be re-created in each `select!` turn).
type Accepted<T> = futures_util::stream::Fuse<Pin<Box<dyn Stream<Item = T> + Send>>>;

fn boxed<S: Stream + Send + 'static>(s: S) -> Accepted<S::Item> {
    let s: Pin<Box<dyn Stream<Item = S::Item> + Send>> = Box::pin(s);
    s.fuse()
}

/// The receiving side of a WebTransport session: the message stream, datagrams, and the
/// streams and requests the client opens besides.
struct WtInbound {
    bidi: Accepted<Result<Option<AcceptedBi<h3_quinn::Connection, Bytes>>, h3::error::StreamError>>,
    uni: Accepted<
        Result<Option<(h3_webtransport::SessionId, MessageRecv)>, h3::error::ConnectionError>,
    >,
    datagrams: Accepted<Result<h3_datagram::datagram::Datagram<Bytes>, h3::error::StreamError>>,
    messages: FrameStream,
    /// Hands the message stream's sending half to the writer.
    send_tx: Option<oneshot::Sender<MessageSend>>,
    /// Until the client opens its message stream.
    stream_deadline: Option<Instant>,
    max_len: usize,
    handle: SessionHandle,
    requests: RequestContext,
    quic: quinn::Connection,
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
                accepted = self.bidi.next() => match accepted {
                    Some(Ok(Some(AcceptedBi::BidiStream(_, stream)))) => {
                        if let Some(tx) = self.send_tx.take() {
                            let (send, recv) = stream.split();
                            let _ = tx.send(send);
                            self.messages = message_frames(recv, self.max_len);
                            self.stream_deadline = None;
                            continue;
                        }
                        // Each unused stream costs a frame of the rate limit.
                        return Event::Control {
                            frames: 1,
                            then: Some(Box::new(move || {
                                tokio::spawn(refuse_extra_stream(stream));
                            })),
                        };
                    }
                    Some(Ok(Some(AcceptedBi::Request(req, stream)))) => {
                        // Requests on a session's connection cost a frame of its rate limit.
                        let r = &self.requests;
                        let (router, peer, permit, limit) =
                            (r.router.clone(), r.peer, r.permit.clone(), r.limit);
                        return Event::Control {
                            frames: 1,
                            then: Some(Box::new(move || {
                                tokio::spawn(serve_request(req, stream, router, peer, permit, limit));
                            })),
                        };
                    }
                    other => {
                        debug!(session = self.handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "bidirectional accept ended");
                        return Event::Gone;
                    }
                },
                accepted = self.uni.next() => match accepted {
                    Some(Ok(Some((_, mut recv)))) => {
                        recv.stop_sending(0);
                        // Each stream costs a frame of the rate limit; past it, no reply.
                        let handle = self.handle.clone();
                        return Event::Control {
                            frames: 1,
                            then: Some(Box::new(move || {
                                handle.send(ServerFrame::Error {
                                    id: None,
                                    code: ErrorCode::BadRequest,
                                    message: "unidirectional streams are not used; send frames on the message stream",
                                }.to_outbound());
                            })),
                        };
                    }
                    other => {
                        debug!(session = self.handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "unidirectional accept ended");
                        return Event::Gone;
                    }
                },
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
