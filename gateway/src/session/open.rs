//! Opening a session in the hub from an admission, and its access-log lines.
//!
//! There is one line at open and one at close.

use std::{net::SocketAddr, sync::Arc};

use gateway_core::{
    connection::Connection,
    limits::ConnectionSlot,
    protocol::{CloseCode, CloseReason},
    session::{OutboxReceiver, SessionHandle, TransportKind},
};
use tokio::time::Instant;
use tracing::info;

use super::writer::WriteStats;
use crate::{
    clock, http::admission::Admission, metrics::Metrics, state::AppState, upstream::SessionCalls,
};

/// An opened session: its protocol driver, its outbox, and its access log.
pub(super) struct OpenedSession {
    pub(super) conn: Connection,
    pub(super) outbox: OutboxReceiver,
    /// Boxed: an idle session's task does not carry the log's fields.
    pub(super) log: Box<AccessLog>,
    /// The session's calls to its endpoint's backend, if it has one.
    pub(super) calls: Option<Box<SessionCalls>>,
}

/// Registers an admitted session with the hub and logs its opening.
///
/// It queues `welcome` when authenticated. `pings`: the transport needs pings for liveness
/// (see `Connection::open`).
pub(super) fn open_session(
    app: &Arc<AppState>,
    admission: Admission,
    transport: TransportKind,
    pings: bool,
    peer: SocketAddr,
) -> OpenedSession {
    let Admission {
        policy,
        admitted,
        slot,
        welcome,
    } = admission;
    let calls = app.upstream(&policy.path).map(|upstream| {
        let node = app.services.hub.node_id().into();
        Box::new(SessionCalls::new(
            upstream.clone(),
            node,
            peer,
            app.sessions.clone(),
        ))
    });
    let (conn, outbox) = Connection::open(
        app.services.clone(),
        policy,
        transport,
        pings,
        admitted,
        welcome,
        clock::now(),
    );
    let handle = conn.handle().clone();
    // A drain that began after this session's admission may have gone through the hub
    // before the session was in it: this session is sent away too.
    if app.is_shutting_down() {
        app.send_away(&handle);
    }
    info!(target: "access", session = handle.id_str(), %peer, endpoint = handle.endpoint(),
        transport = transport.as_str(), user = handle.user().map(|u| &**u), "session open");
    if crate::metrics::ENABLED {
        let counters = app.metrics.session(handle.endpoint(), transport);
        counters.opened.inc();
        counters.sessions.inc();
    }
    OpenedSession {
        conn,
        outbox,
        log: Box::new(AccessLog {
            opened: Instant::now(),
            peer,
            metrics: app.metrics.clone(),
            session: handle.clone(),
            counted: false,
            _slot: slot,
        }),
        calls,
    }
}

/// The data of a session's closing access-log line.
pub(super) struct AccessLog {
    opened: Instant,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    session: SessionHandle,
    /// Whether the session's end is counted in the metrics.
    ///
    /// It is counted once: by `closed`, or on drop if its task ended otherwise.
    counted: bool,
    /// The session's connection slot, held until the log's last line.
    _slot: Arc<ConnectionSlot>,
}

impl AccessLog {
    /// The process's metrics.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How long the session has been open, in milliseconds.
    pub(super) fn duration_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Logs the session's end: duration, traffic both ways and the close code.
    pub(super) fn closed(mut self, conn: &Connection, out: WriteStats) {
        let handle = conn.handle();
        let reason = handle.close_reason();
        let inbound = conn.stats();
        info!(target: "access", session = handle.id_str(), peer = %self.peer,
            endpoint = handle.endpoint(), transport = handle.transport().as_str(),
            user = handle.user().map(|u| &**u),
            duration_ms = self.opened.elapsed().as_millis() as u64,
            frames_in = inbound.frames, bytes_in = inbound.bytes,
            frames_out = out.frames, bytes_out = out.bytes, datagrams_out = out.datagrams,
            close_code = reason.as_ref().map(|r| r.code.code()),
            close_reason = reason.as_ref().map(|r| r.reason.as_str()), "session closed");
        self.count_end();
    }

    /// Counts the session's end and takes it off the gauge, once.
    ///
    /// The end is counted by its close code; 1011 for a session whose task ended without
    /// one.
    fn count_end(&mut self) {
        if std::mem::replace(&mut self.counted, true) || !crate::metrics::ENABLED {
            return;
        }
        let (endpoint, transport) = (self.session.endpoint(), self.session.transport());
        let reason = self.session.close_reason();
        let counters = self.metrics.session(endpoint, transport);
        counters.sessions.dec();
        let code = reason
            .as_ref()
            .map_or(CloseCode::Internal, |r| r.code)
            .code();
        self.metrics.session_closed(endpoint, transport, code);
        if reason.as_ref().is_some_and(is_slow_consumer) {
            counters.slow_consumer_closes.inc();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // A session task that panicked or was dropped still leaves the gauge.
        self.count_end();
    }
}

/// Whether a session was closed because its outbound queue overflowed.
///
/// 4008 is also the code of rate-limit abuse.
fn is_slow_consumer(reason: &CloseReason) -> bool {
    reason.code == CloseCode::TooSlowOrTooFast && reason.reason.starts_with("slow consumer")
}
