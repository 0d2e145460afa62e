//! State shared by every listener of one gateway process.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use gateway_core::{connection::Services, policy::EndpointPolicy, tickets::TicketStore};
use rand::{rngs::StdRng, SeedableRng};

use tokio_util::task::TaskTracker;

use crate::{cluster::RedisCluster, config::Config, session::Flushers};

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
    /// The cross-session write passes sessions' frames leave through.
    pub(crate) flushers: Flushers,
    /// Every session's task (WebSocket and WebTransport): shutdown waits for them.
    pub(crate) sessions: TaskTracker,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Shared state for `config` around `services`; starts the flushers on the current
    /// tokio runtime.
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
        Arc::new(Self {
            services,
            endpoints,
            config,
            h3_port,
            dev_cert_sha256,
            tickets,
            cluster,
            flushers: Flushers::spawn(),
            sessions: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
        })
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
}
