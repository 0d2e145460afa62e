//! The HTTP/1.1 WebSocket upgrade (RFC 6455).
//!
//! It covers the request's validity and key, admission, the 101 response, and the session's
//! task.

use std::{net::SocketAddr, sync::Arc};

use axum::body::Body;
use gateway_core::{protocol::Rejection, session::TransportKind};
use http::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::debug;

use super::{
    frames::{CountingReader, FrameCount},
    websocket::{echo, run_session},
};
use crate::{
    clock,
    http::{
        admission::{self, UpgradeRequest},
        api::rejection_response,
        PeerAddr,
    },
    session::Flushers,
    state::AppState,
};

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

/// The router's fallback on HTTPS: handles a request on an endpoint or unknown path.
///
/// It runs admission, then the 101 response and the WebSocket session on its own task, its
/// writes corked by `flushers`; or the status admission answers (404 for unknown paths).
pub(crate) async fn upgrade(
    app: Arc<AppState>,
    flushers: Arc<Flushers>,
    mut req: Request<Body>,
) -> Response<Body> {
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
        &UpgradeRequest::of(&req, peer, TransportKind::WebSocket, valid_upgrade),
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
        let rejection = Rejection::BadUpgrade;
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
                run_session(io, count, admission, app, flushers, peer).await
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
