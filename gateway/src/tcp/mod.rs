//! The TCP front: TLS accept loop, HTTP/1.1 (hyper) serving the shared router, WebSocket
//! upgrades on endpoint paths, and the WebSocket implementation of the session driver's
//! transport interface (tokio-tungstenite).

pub mod frames;
pub mod linger;
pub mod proxy_header;
pub mod tls;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, Router};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use gateway_core::{
    protocol::{CloseReason, TransportFault},
    session::{Outbound, TransportKind},
};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{timeout_at, Instant},
};
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
use frames::{CountingReader, FrameCount};
use linger::Lingering;
use tls::TlsStream;

/// tungstenite's read buffer per connection (measured: the default 128 KiB, and even 4 KiB,
/// dominate idle memory).
const READ_BUFFER: usize = 256;
/// Largest request head accepted (431 beyond).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Accepts TCP connections until the listener fails; each is served on its own task.
///
/// With `proxy_protocol`, each connection must first send a PROXY header (see
/// [`proxy_header`]); the client address it carries is the connection's address from then
/// on (limits, logs, sessions). At most `max_connections` connections may be waiting for
/// their header at once (they are not counted by the limits before it); beyond that a new
/// connection is dropped at accept.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<AppState>,
    router: Router,
) {
    let awaiting_header = Arc::new(Semaphore::new(
        app.config
            .limits
            .max_connections
            .min(Semaphore::MAX_PERMITS),
    ));
    loop {
        let (stream, socket_peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The handshake timeout runs from accept: PROXY header and TLS handshake included.
        let deadline = Instant::now() + app.config.limits.handshake_timeout;
        let (tls, app, router) = (tls.clone(), app.clone(), router.clone());
        if !app.config.proxy_protocol {
            // Counted from accept on, so idle and plain HTTP connections count too.
            let Some(permit) = ConnectionPermit::acquire(&app, socket_peer.ip()) else {
                debug!(peer = %socket_peer, "connection over the limits dropped");
                continue;
            };
            tokio::spawn(serve_connection(
                stream,
                socket_peer,
                permit,
                deadline,
                tls,
                app,
                router,
            ));
            continue;
        }
        let Ok(waiting) = awaiting_header.clone().try_acquire_owned() else {
            debug!(peer = %socket_peer, "too many connections waiting for a PROXY header: dropped");
            continue;
        };
        tokio::spawn(async move {
            let mut stream = stream;
            let header = timeout_at(deadline, proxy_header::read_proxy_header(&mut stream)).await;
            drop(waiting);
            let peer = match header {
                Ok(Ok(source)) => source.or(socket_peer),
                Ok(Err(e)) => {
                    return debug!(socket = %socket_peer, error = %e, "PROXY header refused")
                }
                Err(_) => return debug!(socket = %socket_peer, "PROXY header timed out"),
            };
            // Counted from the header on, by the address it carries.
            let Some(permit) = ConnectionPermit::acquire(&app, peer.ip()) else {
                return debug!(%peer, socket = %socket_peer, "connection over the limits dropped");
            };
            serve_connection(stream, peer, permit, deadline, tls, app, router).await;
        });
    }
}

/// Serves one accepted connection from `peer` (its client address): the TLS handshake by
/// `deadline`, then HTTP/1.1 and WebSocket upgrades. Over a limit (`permit` refused), a
/// bounded number are still answered with the status; the rest were dropped at accept.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
    deadline: Instant,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<AppState>,
    router: Router,
) {
    let timeout = app.config.limits.handshake_timeout;
    let tls = match timeout_at(deadline, TlsStream::accept(stream, tls)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return admission::timed_out(&app, TransportKind::WebSocket, peer),
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
    // request, so an idle connection is closed after it. A refused connection answers one
    // request and closes.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(!refused)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(Lingering::new(tls, guard, timeout)), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "HTTP connection ended with an error");
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
        && h.get(header::SEC_WEBSOCKET_KEY)
            .is_some_and(|key| is_valid_key(key.as_bytes()))
}

/// RFC 6455 section 4.2.1: the key is 16 bytes, base64-encoded (24 characters).
fn is_valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// The router's fallback on HTTPS: a WebSocket upgrade on an endpoint path, or the status
/// admission answers (404 for unknown paths).
pub async fn endpoint(
    axum::extract::State(app): axum::extract::State<Arc<AppState>>,
    req: Request<Body>,
) -> Response<Body> {
    upgrade(app, req).await
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
    let now = clock::now();
    let admission = admission::admit(
        &app,
        &UpgradeRequest::of(&req, peer.ip(), valid_upgrade),
        now,
    )
    .await;
    let admission = match admission {
        Ok(a) => a,
        Err(rejection) => {
            // Only upgrade attempts are handshakes: a stray GET (a scanner, a favicon) is not.
            if req.headers().contains_key(header::UPGRADE) {
                let path = req.uri().path();
                admission::rejected(&app, path, TransportKind::WebSocket, peer, rejection);
            }
            return rejection_response(rejection);
        }
    };
    let (Some(on_upgrade), Some(key)) = (on_upgrade, req.headers().get(header::SEC_WEBSOCKET_KEY))
    else {
        let rejection = gateway_core::protocol::Rejection::BadUpgrade;
        let path = req.uri().path();
        admission::rejected(&app, path, TransportKind::WebSocket, peer, rejection);
        return rejection_response(rejection);
    };
    let accept = derive_accept_key(key.as_bytes());
    app.clone().sessions.spawn(async move {
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

/// One WebSocket session, to be run to its end. `continuations` counts the frames
/// tungstenite reads without showing them; each is charged to the rate limit like any frame.
///
/// Not an `async fn`: the session's state is built here and moved into the driver's
/// future, which is all the task holds (an async wrapper would keep a second copy of it
/// for the session's whole life).
fn run_session<IO>(
    io: IO,
    continuations: Arc<FrameCount>,
    admission: Admission,
    app: Arc<AppState>,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = websocket_config(admission.policy.max_message_bytes);
    // tokio-tungstenite's constructor is `async` but never waits.
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
        .now_or_never()
        .expect("constructing a WebSocketStream does not wait");
    let OpenedSession {
        conn, outbox, log, ..
    } = open_session(
        &app,
        admission,
        TransportKind::WebSocket,
        // WebSocket liveness is ping/pong (the browser answers; PROTOCOL.md section 8).
        true,
        peer,
    );
    let (sink, stream) = ws.split();
    let inbound = WsInbound {
        burst: conn.policy().rate_burst,
        stream,
        continuations,
        pending: None,
    };
    let writer = SessionWriter::corked(
        conn.handle(),
        outbox,
        WsSink(sink),
        &app.flushers,
        &app.metrics,
    );
    drive(conn, inbound, writer, log)
}

/// The receiving half of a WebSocket session.
struct WsInbound<S> {
    stream: S,
    continuations: Arc<FrameCount>,
    /// The endpoint's rate burst: more hidden continuation frames than this behind a read
    /// error is a flood, not a broken connection.
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

/// The sending half of a WebSocket session: frames are fed to tungstenite (which buffers
/// up to its write buffer) and flushed once per batch.
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
        if reason.code != gateway_core::protocol::CloseCode::Abnormal {
            let _ = self.0.send(Message::Close(Some(close_frame(reason)))).await;
        }
    }
}
