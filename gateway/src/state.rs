//! State shared by every listener of one gateway process.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use gateway_core::{
    connection::Services,
    policy::EndpointPolicy,
    protocol::{CloseCode, CloseReason, ServerFrame},
    session::{Outbound, SessionHandle},
    tickets::TicketStore,
};
use rand::{rngs::StdRng, SeedableRng};

use tokio_util::task::TaskTracker;

use crate::{
    cluster::RedisCluster,
    config::Config,
    jwks::Jwks,
    metrics::Metrics,
    upstream::{Upstream, Upstreams},
};

/// The reason of the `reconnect` and of the 1001 close a drain sends.
const DRAIN_REASON: &str = "server draining";

fn drain_reason() -> CloseReason {
    CloseReason::new(CloseCode::GoingAway, DRAIN_REASON)
}

/// Most unredeemed tickets held at once (each is a few hundred bytes).
const MAX_TICKETS: usize = 100_000;

/// Everything the fronts and the HTTP API share.
#[derive(Debug)]
pub struct AppState {
    /// Hub, verifier and connection counters.
    pub services: Services,
    /// Endpoints by path.
    pub endpoints: HashMap<String, Arc<EndpointPolicy>>,
    /// The validated configuration.
    pub config: Config,
    /// The UDP port HTTPS responses advertise in `Alt-Svc`, when WebTransport is on.
    pub h3_port: Option<u16>,
    /// SHA-256 (hex) of the development certificate, when one is served.
    pub dev_cert_sha256: Option<String>,
    /// Outstanding one-time tickets (single node).
    pub tickets: TicketStore,
    /// The cluster, in cluster mode: tickets live there instead.
    pub cluster: Option<Arc<RedisCluster>>,
    /// The Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The JWK Set the verifier's keys come from, when `[auth] jwks_url` is set.
    jwks: std::sync::OnceLock<Arc<Jwks>>,
    /// The application backends of the endpoints that have one.
    upstreams: std::sync::OnceLock<Upstreams>,
    /// Every session's task (WebSocket and WebTransport): shutdown waits for them.
    pub(crate) sessions: TaskTracker,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Shared state for `config` around `services`.
    pub fn new(
        config: Config,
        services: Services,
        h3_port: Option<u16>,
        dev_cert_sha256: Option<String>,
        cluster: Option<Arc<RedisCluster>>,
    ) -> Arc<Self> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect();
        // Ticket values are credentials: drawn from a CSPRNG seeded by the OS.
        let tickets = TicketStore::new(config.ticket_ttl, MAX_TICKETS, StdRng::from_os_rng());
        let metrics = Metrics::new(
            env!("CARGO_PKG_VERSION"),
            config.endpoints.iter().map(|e| e.path.as_str()),
        );
        Arc::new(Self {
            services,
            endpoints,
            config,
            h3_port,
            dev_cert_sha256,
            tickets,
            cluster,
            metrics,
            jwks: std::sync::OnceLock::new(),
            upstreams: std::sync::OnceLock::new(),
            sessions: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Sets the JWK Set the verifier's keys come from (once, at start).
    pub fn set_jwks(&self, jwks: Arc<Jwks>) {
        let _ = self.jwks.set(jwks);
    }

    /// The JWK Set the verifier's keys come from, if any.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.get()
    }

    /// Sets the application backends (once, at start).
    pub fn set_upstreams(&self, upstreams: Upstreams) {
        let _ = self.upstreams.set(upstreams);
    }

    /// The application backend of the endpoint at `path`, if it has one.
    pub fn upstream(&self, path: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.get()?.get(path)
    }

    /// The endpoint configured at `path`.
    pub fn endpoint(&self, path: &str) -> Option<&Arc<EndpointPolicy>> {
        self.endpoints.get(path)
    }

    /// Whether graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Marks the start of graceful shutdown: new sessions are refused, `/healthz` says 503.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Drains this node (SIGTERM, `POST /api/drain`).
    ///
    /// New sessions are refused, `/healthz` answers 503, and every session gets
    /// `reconnect`, its `after_ms` drawn over the drain window so clients do not all come
    /// back at once, then close 1001 once the frames queued before it are written. Returns
    /// how many sessions were told.
    pub fn drain(&self) -> usize {
        self.begin_shutdown();
        let sessions = self.services.hub.session_count();
        self.services
            .hub
            .close_all(|| Some(self.reconnect_frame()), drain_reason());
        tracing::info!(sessions, window = ?self.config.drain, "draining");
        sessions
    }

    /// Sends one session away as a drain does: `reconnect`, then 1001.
    ///
    /// For a session that opened while the drain ran (it passed admission before the flag
    /// was set, and was not yet in the hub when the drain went through it).
    pub(crate) fn send_away(&self, session: &SessionHandle) {
        session.offer(self.reconnect_frame());
        session.close(drain_reason());
    }

    /// A `reconnect` whose `after_ms` is drawn over the drain window.
    fn reconnect_frame(&self) -> Outbound {
        let window_ms = u64::try_from(self.config.drain.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        ServerFrame::Reconnect {
            after_ms: rand::random_range(0..window_ms),
            reason: DRAIN_REASON,
            url: None,
        }
        .to_outbound()
    }
}
