//! The UDP front: a QUIC endpoint (quinn) speaking HTTP/3 (h3) with WebTransport
//! (h3-webtransport). Plain HTTP/3 requests go to the shared router; an extended CONNECT on
//! an endpoint path goes through the same admission as a WebSocket upgrade and becomes a
//! session of the same hub. This module only adapts streams and datagrams.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use axum::{body::Body, Router};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use gateway_core::{
    connection::Now,
    protocol::{
        stream_frame::{encode_header, FrameDecoder, FrameError, FrameKind},
        CloseCode, CloseReason, ErrorCode, Rejection, ServerFrame,
    },
    session::{Batch, Outbound, OutboxReceiver, TransportKind},
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
    adapter::{open_session, woken, OpenedSession, WriteStats},
    admission::{self, Admission, ConnectionPermit, UpgradeRequest},
    api::rejection_response,
    state::AppState,
    ws::{PeerAddr, CLOSE_GRACE},
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
        Err(_) => return debug!(%peer, "QUIC handshake timed out"),
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
                    Now::read(),
                )
                .await;
                match admission {
                    Err(rejection) => {
                        debug!(%peer, path = req.uri().path(), ?rejection, "CONNECT rejected");
                        reject(&mut stream, rejection).await;
                        quic.close(H3_NO_ERROR.into(), b"");
                        return ConnectionEnd::Done;
                    }
                    Ok(admission) => {
                        wait_for_peer_settings(&mut h3, router, &permit, peer, timeout).await;
                        // Requests already running finish on their own deadlines.
                        requests.detach_all();
                        match WebTransportSession::accept(req, stream, h3).await {
                            Ok(session) => {
                                run_session(session, quic.clone(), admission, app.clone(), router.clone(), peer)
                                    .await;
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
    let deadline = Instant::now() + limit;
    while !h3.settings().enable_webtransport() && Instant::now() < deadline {
        // `accept` is cancel-safe until it yields a request.
        match tokio::time::timeout(Duration::from_millis(5), h3.accept()).await {
            Err(_) => {}
            Ok(Ok(Some(resolver))) => {
                let (router, permit) = (router.clone(), permit.clone());
                tokio::spawn(tokio::time::timeout(limit, async move {
                    if let Ok((req, stream)) = resolver.resolve_request().await {
                        serve_request(req, stream, router, peer, permit, limit).await;
                    }
                }));
            }
            Ok(_) => return,
        }
    }
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

/// Most frames one wake-up of a session's writer takes from its outbox.
const MAX_BATCH: usize = 512;

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

/// Drains the outbox: volatile messages as datagrams when they fit the connection's current
/// maximum datagram size, everything else framed on the message stream. On close, writes
/// the `close` envelope, finishes the stream and closes the connection.
async fn write_loop(
    send: oneshot::Receiver<MessageSend>,
    outbox: OutboxReceiver,
    session: Arc<WtSession>,
    quic: quinn::Connection,
) -> WriteStats {
    let mut stats = WriteStats::default();
    let mut batch = Vec::with_capacity(16);
    let mut send = match send.await {
        Ok(s) => s,
        Err(_) => {
            // The session ended before the client opened its message stream.
            loop {
                batch.clear();
                if let Batch::Close(reason) = outbox.recv_batch(&mut batch, usize::MAX).await {
                    close_connection(&quic, &reason);
                    return stats;
                }
            }
        }
    };
    let mut datagrams = session.datagram_sender();
    let prefix = datagram_prefix_len(&session);
    // Every frame of a wake-up goes out in one write (a few when they are large).
    let mut out = BytesMut::new();
    loop {
        match outbox.recv_batch(&mut batch, MAX_BATCH).await {
            Batch::Frames => {
                // Let the fan-out run once more before writing, so a burst leaves together.
                if batch.len() < MAX_BATCH {
                    tokio::task::yield_now().await;
                    let room = MAX_BATCH - batch.len();
                    outbox.drain_ready(&mut batch, room);
                }
                for frame in batch.drain(..) {
                    let (kind, bytes) = match frame {
                        Outbound::Volatile(b) => {
                            let fits = quic
                                .max_datagram_size()
                                .is_some_and(|max| b.len() + prefix <= max);
                            if fits && datagrams.send_datagram(b.clone()).is_ok() {
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
                    out.extend_from_slice(&encode_header(kind, bytes.len()));
                    out.extend_from_slice(&bytes);
                    if out.len() >= WRITE_CHUNK {
                        if send.write_all(&out).await.is_err() {
                            return stats;
                        }
                        out.clear();
                    }
                }
                if !out.is_empty() && send.write_all(&out).await.is_err() {
                    return stats;
                }
                out.clear();
                if out.capacity() > 4 * WRITE_CHUNK {
                    out = BytesMut::new();
                }
            }
            Batch::Close(reason) => {
                let envelope = ServerFrame::Close {
                    code: reason.code.code(),
                    reason: &reason.reason,
                }
                .to_bytes();
                let _ = write_frame(&mut send, FrameKind::Json, &envelope).await;
                let _ = send.shutdown().await;
                // Give the peer time to read the `close` envelope and close the connection.
                let _ = tokio::time::timeout(CLOSE_FLUSH, quic.closed()).await;
                close_connection(&quic, &reason);
                return stats;
            }
        }
    }
}

/// Closes the QUIC connection. The WebTransport close code travels in the `close` envelope;
/// the connection itself closes with `H3_NO_ERROR` and "CODE reason" as its reason.
fn close_connection(quic: &quinn::Connection, reason: &CloseReason) {
    let text = format!("{} {}", reason.code.code(), reason.reason);
    quic.close(H3_NO_ERROR.into(), text.as_bytes());
}

/// Answers a second bidirectional stream with an `error` frame and finishes it.
async fn refuse_extra_stream(
    stream: h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) {
    let (mut send, mut recv) = stream.split();
    recv.stop_sending(0);
    let error = ServerFrame::Error {
        id: None,
        code: ErrorCode::BadRequest.as_str(),
        message: "one message stream per session: this stream is not used",
    }
    .to_bytes();
    let _ = write_frame(&mut send, FrameKind::Json, &error).await;
    let _ = send.shutdown().await;
}

/// Runs one WebTransport session to its end.
async fn run_session(
    session: WtSession,
    quic: quinn::Connection,
    admission: Admission,
    app: Arc<AppState>,
    router: Router,
    peer: SocketAddr,
) {
    let session = Arc::new(session);
    let max_len = admission.policy.max_message_bytes;
    let stream_deadline = Instant::now() + app.config.limits.handshake_timeout;
    let OpenedSession {
        mut conn,
        outbox,
        log,
        slot,
    } = open_session(&app, admission, TransportKind::WebTransport, peer);
    let handle = conn.handle().clone();

    let (send_tx, send_rx) = oneshot::channel();
    let mut send_tx = Some(send_tx);
    let mut writer = tokio::spawn(write_loop(send_rx, outbox, session.clone(), quic.clone()));
    let mut bidi = Box::pin(stream::unfold(session.clone(), |s| async move {
        let r = s.accept_bi().await;
        Some((r, s))
    }))
    .fuse();
    let mut uni = Box::pin(stream::unfold(session.clone(), |s| async move {
        let r = s.accept_uni().await;
        Some((r, s))
    }))
    .fuse();
    let mut datagrams = Box::pin(stream::unfold(
        session.datagram_reader(),
        |mut r| async move {
            let d = r.read_datagram().await;
            Some((d, r))
        },
    ))
    .fuse();
    // Pending until the client opens its message stream.
    let mut messages: FrameStream = Box::pin(stream::pending());
    let mut has_message_stream = false;
    let mut deadline = conn.poll(Instant::now().into_std());
    let wake = conn.wake_signal();
    loop {
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        // Biased, in this order: h3 resolves a new unidirectional stream while polling for
        // bidirectional ones and stores it without waking the uni acceptor, so the uni
        // acceptor must be polled after the bidi one in every turn.
        tokio::select! {
            biased;
            () = handle.closed() => break,
            accepted = bidi.next() => match accepted {
                Some(Ok(Some(AcceptedBi::BidiStream(_, stream)))) => {
                    if let Some(tx) = send_tx.take() {
                        let (send, recv) = stream.split();
                        let _ = tx.send(send);
                        messages = message_frames(recv, max_len);
                        has_message_stream = true;
                    } else if conn.on_control(1, Now::read()) {
                        // Each unused stream costs a frame of the rate limit.
                        tokio::spawn(refuse_extra_stream(stream));
                    }
                }
                Some(Ok(Some(AcceptedBi::Request(req, stream)))) => {
                    // Requests on a session's connection cost a frame of its rate limit.
                    if conn.on_control(1, Now::read()) {
                        let limit = app.config.limits.handshake_timeout;
                        let permit = ConnectionPermit::Granted(slot.clone());
                        tokio::spawn(serve_request(req, stream, router.clone(), peer, permit, limit));
                    }
                }
                other => {
                    debug!(session = handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "bidirectional accept ended");
                    break;
                }
            },
            accepted = uni.next() => match accepted {
                Some(Ok(Some((_, mut recv)))) => {
                    recv.stop_sending(0);
                    // Each stream costs a frame of the rate limit; past it, no reply.
                    if conn.on_control(1, Now::read()) {
                        handle.send(ServerFrame::Error {
                        id: None,
                        code: ErrorCode::BadRequest.as_str(),
                            message: "unidirectional streams are not used; send frames on the message stream",
                        }.to_outbound());
                    }
                }
                other => {
                    debug!(session = handle.id_str(), result = ?other.map(|r| r.map(|o| o.is_some()).map_err(|e| e.to_string())), "unidirectional accept ended");
                    break;
                }
            },
            frame = messages.next() => match frame {
                Some(Ok((FrameKind::Json, payload))) => conn.on_text(payload, Now::read()),
                Some(Ok((FrameKind::Binary, payload))) => conn.on_binary(payload, Now::read()),
                Some(Err(StreamEnd::Frame(FrameError::TooLarge { .. }))) => {
                    conn.close(CloseReason::new(CloseCode::TooLarge, "message too large"));
                }
                Some(Err(StreamEnd::Frame(e))) => {
                    conn.close(CloseReason::new(CloseCode::ProtocolError, e.to_string()));
                }
                Some(Err(StreamEnd::Closed)) | None => {
                    conn.close(CloseReason::new(CloseCode::Normal, "message stream closed by client"));
                }
            },
            datagram = datagrams.next() => match datagram {
                Some(Ok(d)) => conn.on_datagram(d.into_payload(), Now::read()),
                other => {
                    debug!(session = handle.id_str(), result = ?other.map(|r| r.map(|_| ()).map_err(|e| e.to_string())), "datagram reader ended");
                    break;
                }
            },
            () = timer => deadline = conn.poll(Instant::now().into_std()),
            () = woken(&wake) => conn.on_wake(Now::read()),
            () = tokio::time::sleep_until(stream_deadline), if !has_message_stream => {
                conn.close(CloseReason::new(CloseCode::ProtocolError, "no message stream opened"));
            }
        }
    }
    if !handle.is_closed() {
        handle.close(CloseReason::new(
            CloseCode::Normal,
            "connection closed by client",
        ));
    }
    drop(send_tx);
    let stats = match tokio::time::timeout(CLOSE_GRACE, &mut writer).await {
        Ok(Ok(stats)) => stats,
        _ => {
            writer.abort();
            WriteStats::default()
        }
    };
    if let Some(reason) = handle.close_reason() {
        close_connection(&quic, &reason);
    }
    log.closed(&conn, stats);
}
