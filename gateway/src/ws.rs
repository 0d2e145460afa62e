//! The TCP front: TLS accept loop, HTTP/1.1 (hyper) serving the shared router, WebSocket
//! upgrades on endpoint paths, and the WebSocket session adapter (tokio-tungstenite).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{body::Body, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gateway_core::{
    connection::Now,
    protocol::{CloseCode, CloseReason},
    session::{Batch, Outbound, OutboxReceiver, TransportKind},
};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, time::Instant};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    tungstenite::{
        self,
        handshake::derive_accept_key,
        protocol::{frame::coding::OpCode, frame::Frame, CloseFrame, Role, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};
use tower::ServiceExt;
use tracing::debug;

use crate::{
    adapter::{open_session, woken, OpenedSession, WriteStats},
    admission::{self, Admission, ConnectionPermit, UpgradeRequest},
    api::rejection_response,
    linger::Lingering,
    state::AppState,
    ws_frames::{CountingReader, FrameCount},
};

/// How long a closing session may take to flush its close frame and hear the peer's reply.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Most frames the writer takes from the queue per flush.
const MAX_BATCH: usize = 512;
/// tungstenite's read buffer per connection (measured: the default 128 KiB, and even 4 KiB,
/// dominate idle memory).
const READ_BUFFER: usize = 1024;
/// Largest request head accepted (431 beyond).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The client address of a request, set by the front that received it.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Accepts TCP connections until the listener fails; each is served on its own task.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<AppState>,
    router: Router,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Counted from accept on, so idle and plain HTTP connections count too. Over a limit,
        // a bounded number are still answered with the status; the rest are dropped here.
        let Some(permit) = ConnectionPermit::acquire(&app, peer.ip()) else {
            debug!(%peer, "connection over the limits dropped");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, app, router) = (acceptor.clone(), app.clone(), router.clone());
        tokio::spawn(async move {
            let timeout = app.config.limits.handshake_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let alt_svc = app
                .h3_port
                .and_then(|p| HeaderValue::from_str(&format!("h3=\":{p}\"; ma=86400")).ok());
            let refused = permit.rejection().is_some();
            // Held by the socket itself, so a lingering close still counts.
            let guard = permit.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(permit.clone());
                let (router, alt_svc) = (router.clone(), alt_svc.clone());
                async move {
                    let mut response = router.oneshot(req.map(Body::new)).await?;
                    if let Some(v) = alt_svc {
                        response.headers_mut().insert(header::ALT_SVC, v);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            // The header timeout also runs while a kept-alive connection waits for its next
            // request, so an idle connection is closed after it. A refused connection
            // answers one request and closes.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(!refused)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(Lingering::new(tls, guard)), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// Whether the request is a WebSocket upgrade RFC 6455 accepts.
fn is_websocket_upgrade(req: &Request<Body>) -> bool {
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    req.method() == http::Method::GET
        && req.version() == http::Version::HTTP_11
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
        && h.get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13")
        && h.get(header::SEC_WEBSOCKET_KEY).is_some()
}

/// Handles a request on an endpoint path (or an unknown path): admission, then the 101
/// response and the WebSocket session on its own task.
pub async fn upgrade(app: Arc<AppState>, mut req: Request<Body>) -> Response<Body> {
    let peer = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let valid_upgrade = on_upgrade.is_some() && is_websocket_upgrade(&req);
    let now = Now::read();
    let admission = admission::admit(
        &app,
        &UpgradeRequest::of(&req, peer.ip(), valid_upgrade),
        now,
    )
    .await;
    let admission = match admission {
        Ok(a) => a,
        Err(rejection) => {
            debug!(%peer, path = req.uri().path(), ?rejection, "upgrade rejected");
            return rejection_response(rejection);
        }
    };
    let (Some(on_upgrade), Some(key)) = (on_upgrade, req.headers().get(header::SEC_WEBSOCKET_KEY))
    else {
        return rejection_response(gateway_core::protocol::Rejection::BadUpgrade);
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) if admission.policy.echo => echo(TokioIo::new(upgraded), &admission).await,
            Ok(upgraded) => {
                let count = Arc::new(FrameCount::default());
                let io = CountingReader::new(
                    TokioIo::new(upgraded),
                    count.clone(),
                    admission.policy.rate_burst,
                );
                run_session(io, count, admission, app, peer).await
            }
            Err(e) => debug!(%peer, error = %e, "upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("static response parts are valid")
}

/// tungstenite settings for one endpoint. Its defaults (64 MiB messages, 16 MiB frames,
/// 128 KiB eager read buffer, unbounded write buffer) are unsafe or wasteful for a gateway.
fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated eagerly per connection: 1 KiB instead of 128 KiB keeps idle connections
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

/// Drains the session's outbox to the socket: each wake-up takes every queued frame, feeds
/// them to tungstenite and flushes once. Ends after writing the close frame.
async fn write_loop<S>(mut sink: S, outbox: OutboxReceiver) -> WriteStats
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let mut stats = WriteStats::default();
    // Allocated on the first frame after the welcome, and shrunk back after large bursts.
    let mut batch = Vec::new();
    loop {
        match outbox.recv_batch(&mut batch, MAX_BATCH).await {
            Batch::Frames => {
                // Let the fan-out and the other writers run once before writing: under load
                // more frames arrive meanwhile and a burst leaves in one write and few TLS
                // records; when idle the yield returns at once.
                if batch.len() < MAX_BATCH {
                    tokio::task::yield_now().await;
                    let room = MAX_BATCH - batch.len();
                    outbox.drain_ready(&mut batch, room);
                }
                for frame in batch.drain(..) {
                    if let Outbound::Text(b) | Outbound::Volatile(b) | Outbound::Binary(b) = &frame
                    {
                        stats.frames += 1;
                        stats.bytes += b.len() as u64;
                    }
                    if sink.feed(to_message(frame)).await.is_err() {
                        return stats;
                    }
                }
                if sink.flush().await.is_err() {
                    return stats;
                }
                if batch.capacity() > 4 * MAX_BATCH {
                    batch.shrink_to(16);
                }
            }
            Batch::Close(reason) => {
                let frame = CloseFrame {
                    code: reason.code.code().into(),
                    reason: reason.reason.into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return stats;
            }
        }
    }
}

/// The close a tungstenite read error calls for; `None` when the connection is just gone.
fn close_for(error: &tungstenite::Error) -> Option<CloseReason> {
    use tungstenite::Error as E;
    match error {
        E::Capacity(_) => Some(CloseReason::new(CloseCode::TooLarge, "message too large")),
        E::Protocol(p) => Some(CloseReason::new(CloseCode::ProtocolError, p.to_string())),
        E::Utf8(_) => Some(CloseReason::new(CloseCode::InvalidPayload, "invalid UTF-8")),
        _ => None,
    }
}

/// Test-only echo of every data message (Autobahn|Testsuite), with the same WebSocket
/// settings and error-to-close mapping as real sessions.
async fn echo<IO>(io: IO, admission: &Admission)
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
                if let Some(reason) = close_for(&e) {
                    let frame = CloseFrame {
                        code: reason.code.code().into(),
                        reason: reason.reason.into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                }
                break;
            }
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// Runs one WebSocket session to its end. `continuations` counts the frames tungstenite
/// reads without showing them; each is charged to the rate limit like any frame.
async fn run_session<IO>(
    io: IO,
    continuations: Arc<FrameCount>,
    admission: Admission,
    app: Arc<AppState>,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = websocket_config(admission.policy.max_message_bytes);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let OpenedSession {
        mut conn,
        outbox,
        log,
        slot: _slot,
    } = open_session(&app, admission, TransportKind::WebSocket, peer);
    let handle = conn.handle().clone();
    let admission_burst = conn.policy().rate_burst;
    let (sink, mut stream) = ws.split();
    let mut writer = tokio::spawn(write_loop(sink, outbox));
    let mut deadline = conn.poll(Instant::now().into_std());
    let wake = conn.wake_signal();
    // Set once the read half yields nothing more; a received Close frame is not the end:
    // reading on lets tungstenite send its Close reply (else clients see 1006).
    let mut stream_ended = false;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = stream.next() => {
                let now = Now::read();
                let extra = continuations.take();
                if extra > 0 {
                    conn.on_control(extra, now);
                }
                match message {
                    Some(Ok(Message::Text(text))) => conn.on_text(text.into(), now),
                    Some(Ok(Message::Binary(bytes))) => conn.on_binary(bytes, now),
                    Some(Ok(Message::Pong(_))) => {
                        conn.on_pong();
                        conn.on_control(1, now);
                    }
                    Some(Ok(Message::Ping(_) | Message::Frame(_))) => {
                        conn.on_control(1, now);
                    }
                    Some(Ok(Message::Close(_))) => break,
                    None => {
                        stream_ended = true;
                        break;
                    }
                    Some(Err(e)) => {
                        match close_for(&e) {
                            Some(reason) => conn.close(reason),
                            // The counting reader stopped a message of endless fragments.
                            None if extra > admission_burst => conn.close(CloseReason::new(
                                CloseCode::TooSlowOrTooFast,
                                "rate limit exceeded",
                            )),
                            None => stream_ended = true,
                        }
                        break;
                    }
                }
            },
            () = sleep => deadline = conn.poll(Instant::now().into_std()),
            () = woken(&wake) => conn.on_wake(Now::read()),
            () = handle.closed() => break,
        }
    }
    // Let the writer flush what is queued and the close frame, and hear the peer's reply,
    // within the grace period; then drop the connection whatever state it is in.
    if !handle.is_closed() {
        handle.close(CloseReason::new(CloseCode::Normal, "closed by client"));
    }
    let grace = tokio::time::sleep(CLOSE_GRACE);
    tokio::pin!(grace);
    let mut stats = WriteStats::default();
    let mut writer_done = false;
    loop {
        tokio::select! {
            result = &mut writer, if !writer_done => {
                stats = result.unwrap_or_default();
                writer_done = true;
                if stream_ended { break; }
            }
            message = stream.next(), if !stream_ended => {
                if matches!(message, None | Some(Err(_))) {
                    stream_ended = true;
                    if writer_done { break; }
                }
            }
            () = &mut grace => {
                writer.abort();
                break;
            }
        }
    }
    log.closed(&conn, stats);
}
