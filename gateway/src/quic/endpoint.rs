//! The QUIC endpoint (quinn): transport settings, binding, and the accept loop.
//!
//! The accept loop admits each connection (Retry when busy, the connection limits, the
//! handshake) and hands it to HTTP/3.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use gateway_core::session::TransportKind;
use tracing::debug;

use super::{
    http3::{self, ConnectionEnd, H3_NO_ERROR},
    webtransport::{self, CLOSE_FLUSH},
};
use crate::{
    http::admission::{self, ConnectionPermit},
    state::AppState,
};

/// Why the QUIC endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The TLS configuration has no cipher suite QUIC can start a connection with.
    #[error(transparent)]
    Tls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// QUIC transport settings.
///
/// Keep-alive every `heartbeat` and an idle timeout of two heartbeats remove a vanished
/// client within about two heartbeats.
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
) -> Result<quinn::Endpoint, BindError> {
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

/// Admits one QUIC connection, sets HTTP/3 up on it and serves it.
///
/// A WebTransport session it opens goes on on a task of its own.
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
    let Some(h3) = http3::connection(&quic, timeout).await else {
        return debug!(%peer, "HTTP/3 setup failed");
    };
    // Kept until the connection is closed, so the refusal's flush counts too.
    let _held = permit.clone();
    let ending = http3::serve_connection(h3, &quic, permit, &app, &router, peer).await;
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
        ConnectionEnd::Session(session, admission) => {
            // On a task of its own: this connection's task (and the state of its
            // handshake and request phase) ends here.
            let session = webtransport::run_session(session, quic, admission, &app, router, peer);
            app.sessions.spawn(session);
        }
        ConnectionEnd::Done => {}
    }
}
