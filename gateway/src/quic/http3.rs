//! HTTP/3 on a QUIC connection (h3).
//!
//! Plain requests are served through the shared router; an extended CONNECT is turned by
//! admission into a WebTransport session, or refused with its status.

use std::{future::Future, net::SocketAddr, sync::Arc, task::Poll, time::Duration};

use axum::{body::Body, Router};
use bytes::{Buf, Bytes};
use futures_util::{stream, Stream};
use gateway_core::{protocol::Rejection, session::TransportKind};
use h3::{ext::Protocol, server::RequestStream};
use h3_webtransport::server::WebTransportSession;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::{task::JoinSet, time::Instant};
use tower::ServiceExt;
use tracing::debug;

use crate::{
    clock,
    http::{
        admission::{self, Admission, ConnectionPermit, UpgradeRequest},
        api::rejection_response,
        PeerAddr,
    },
    state::AppState,
};

/// A WebTransport session on a QUIC connection.
pub(super) type WtSession = WebTransportSession<h3_quinn::Connection, Bytes>;
/// The HTTP/3 side of a QUIC connection.
pub(super) type H3Connection = h3::server::Connection<h3_quinn::Connection, Bytes>;
/// One HTTP/3 request's stream.
pub(super) type H3Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// HTTP/3 `H3_NO_ERROR`, used to close QUIC connections.
pub(super) const H3_NO_ERROR: u32 = 0x100;
/// Most plain HTTP/3 requests served at once on one QUIC connection (before a session).
const MAX_REQUESTS_PER_CONNECTION: usize = 4;
/// Largest HTTP/3 header section accepted (h3's default is unlimited).
const MAX_FIELD_SECTION: u64 = 16 * 1024;

/// HTTP/3 over an established QUIC connection, with WebTransport on.
///
/// Extended CONNECT and datagrams are on too; `None` if its set-up fails or does not finish
/// within `timeout`.
pub(super) async fn connection(
    quic: &quinn::Connection,
    timeout: Duration,
) -> Option<H3Connection> {
    let mut builder = h3::server::builder();
    builder
        .enable_webtransport(true)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .max_webtransport_sessions(1)
        .max_field_section_size(MAX_FIELD_SECTION)
        .send_grease(true);
    let builder = builder.build(h3_quinn::Connection::new(quic.clone()));
    match tokio::time::timeout(timeout, builder).await {
        Ok(Ok(h3)) => Some(h3),
        _ => None,
    }
}

/// How the HTTP/3 part of a QUIC connection ended.
pub(super) enum ConnectionEnd {
    /// Neither a session nor a request for the handshake timeout.
    Idle,
    /// A connection over a limit answered its request.
    Refused,
    /// An admitted CONNECT became this WebTransport session: it takes the connection over.
    Session(Arc<WtSession>, Admission),
    /// A CONNECT was refused or failed, or the peer went away.
    Done,
}

/// Serves the requests of one QUIC connection until it ends or a session takes it over.
///
/// It serves until a WebTransport session takes it over, it idles for the handshake
/// timeout, or the peer goes. At most [`MAX_REQUESTS_PER_CONNECTION`] requests are served
/// at once; each must complete within the handshake timeout.
pub(super) async fn serve_connection(
    mut h3: H3Connection,
    quic: &quinn::Connection,
    permit: ConnectionPermit,
    app: &Arc<AppState>,
    router: &Router,
    peer: SocketAddr,
) -> ConnectionEnd {
    let timeout = app.config.limits.handshake_timeout;
    let refused = permit.rejection().is_some();
    let context = Requests {
        router: router.clone(),
        peer,
        permit,
        limit: timeout,
    };
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
                let (mut req, stream) =
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
                req.extensions_mut().insert(context.permit.clone());
                if req.method() != http::Method::CONNECT {
                    requests.spawn(context.clone().serve(req, stream));
                    continue;
                }
                return connect(h3, req, stream, requests, quic, app, &context).await;
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

/// An extended CONNECT: admission, then the WebTransport session.
///
/// Or the refusal's status, after which the connection closes. Plain `requests` still
/// running finish on their own deadlines once a session is accepted.
async fn connect(
    mut h3: H3Connection,
    req: Request<()>,
    mut stream: H3Stream,
    mut requests: JoinSet<()>,
    quic: &quinn::Connection,
    app: &Arc<AppState>,
    context: &Requests,
) -> ConnectionEnd {
    let peer = context.peer;
    let is_webtransport = req.extensions().get::<Protocol>() == Some(&Protocol::WEB_TRANSPORT);
    let admission = admission::admit(
        app,
        &UpgradeRequest::of(&req, peer, TransportKind::WebTransport, is_webtransport),
        clock::now(),
    )
    .await;
    let admission = match admission {
        Ok(admission) => admission,
        Err(rejection) => {
            let path = req.uri().path();
            admission::rejected(app, path, TransportKind::WebTransport, peer, rejection);
            reject(&mut stream, rejection).await;
            quic.close(H3_NO_ERROR.into(), b"");
            return ConnectionEnd::Done;
        }
    };
    wait_for_peer_settings(&mut h3, context).await;
    requests.detach_all();
    match WebTransportSession::accept(req, stream, h3).await {
        Ok(session) => ConnectionEnd::Session(Arc::new(session), admission),
        Err(e) => {
            debug!(%peer, error = %e, "WebTransport accept failed");
            ConnectionEnd::Done
        }
    }
}

/// Drives the connection until the client's settings are known.
///
/// A client may send its CONNECT before h3 has processed the client's SETTINGS, and
/// h3-webtransport refuses a session whose peer has not (yet) announced WebTransport.
/// Driving the connection reads the control stream; requests that arrive meanwhile are
/// served as usual.
async fn wait_for_peer_settings(h3: &mut H3Connection, context: &Requests) {
    use h3::ConnectionState;
    let limit = context.limit;
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
                    let context = context.clone();
                    tokio::spawn(tokio::time::timeout(limit, async move {
                        if let Ok((req, stream)) = resolver.resolve_request().await {
                            context.serve(req, stream).await;
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

/// Answers a refused CONNECT with its status, then keeps the stream.
///
/// The stream is kept until the client is done with it: dropping it at once makes browsers
/// report a QUIC error instead.
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

/// What serving plain HTTP/3 requests on one QUIC connection needs.
#[derive(Clone)]
pub(super) struct Requests {
    /// The router both fronts serve.
    pub(super) router: Router,
    /// The client's address.
    pub(super) peer: SocketAddr,
    /// The connection's limit decision.
    pub(super) permit: ConnectionPermit,
    /// The handshake timeout: a request's deadline.
    pub(super) limit: Duration,
}

impl Requests {
    /// Serves one plain HTTP/3 request through the shared router.
    ///
    /// The router checks credentials before the body, limits it per route and answers 408
    /// past the handshake timeout. The body is streamed to the handler, never buffered
    /// here; an unread body is refused with STOP_SENDING when the request ends. Sending the
    /// response gets as long again.
    pub(super) async fn serve(self, req: Request<()>, stream: H3Stream) {
        let Self {
            router,
            peer,
            permit,
            limit,
        } = self;
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

/// Why a response could not be sent (the request is over either way).
#[derive(Debug, thiserror::Error)]
enum ResponseError {
    /// The router's response body failed.
    #[error("response body: {0}")]
    Body(#[from] axum::Error),
    /// The stream failed.
    #[error("response stream: {0}")]
    Stream(#[from] h3::error::StreamError),
}

/// Sends `response` on `stream`: its head, its body (collected) and the end of the stream.
async fn send_response<S: h3::quic::SendStream<Bytes>>(
    stream: &mut RequestStream<S, Bytes>,
    response: Response<Body>,
) -> Result<(), ResponseError> {
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
