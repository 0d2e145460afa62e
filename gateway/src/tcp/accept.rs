//! Accepting TCP connections.
//!
//! It covers the accept loop, the PROXY protocol header, the connection limits, the TLS
//! handshake, then HTTP/1.1 (hyper) serving the shared router.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{body::Body, Router};
use gateway_core::session::TransportKind;
use http::{header, HeaderValue, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{timeout_at, Instant},
};
use tower::ServiceExt;
use tracing::debug;

use super::{linger::Lingering, proxy_header, tls::TlsStream};
use crate::{
    http::{
        admission::{self, ConnectionPermit},
        PeerAddr,
    },
    state::AppState,
};

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

/// Serves one accepted connection from `peer` (its client address).
///
/// It runs the TLS handshake by `deadline`, then HTTP/1.1 and WebSocket upgrades. Over a
/// limit (`permit` refused), a bounded number are still answered with the status; the rest
/// were dropped at accept.
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
