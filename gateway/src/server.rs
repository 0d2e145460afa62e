//! Wiring: certificates, listeners, the hub, the flushers, and graceful shutdown.
//!
//! The TCP and UDP listeners share one port number.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{body::Body, extract::State, Router};
use gateway_certs::{ensure_dev_cert, load_pem, CertError, DevCert, ReloadableResolver};
use gateway_core::{
    auth::{AuthError, JwtVerifier},
    backplane::LocalBackplane,
    connection::Services,
    hub::{Hub, HubConfig},
    limits::ConnectionLimits,
};
use rand::{rngs::StdRng, SeedableRng};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::info;

use crate::{
    cert_reload::{CertReload, CertReloader, ReloadError, Trigger, POLL_INTERVAL},
    cluster::{ClusterError, RedisCluster},
    config::{Config, RedisTarget, TlsSource},
    http::api,
    jwks::{Jwks, JwksError},
    quic,
    session::Flushers,
    state::AppState,
    tcp, tls,
};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An `[endpoint.upstream]` HTTP client could not be built.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The `[tls]` certificate or key could not be loaded or used.
    #[error(transparent)]
    Tls(#[from] CertError),
    /// The development certificate in `dir` could not be made or loaded.
    #[error("dev certificate in {}", dir.display())]
    DevCert {
        /// Where it is kept.
        dir: PathBuf,
        /// What went wrong.
        #[source]
        source: CertError,
    },
    /// The TCP listener could not be bound.
    #[error("binding TCP {addr}")]
    BindTcp {
        /// The address asked for.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The QUIC endpoint could not be bound.
    #[error("binding UDP {addr}")]
    BindUdp {
        /// The address asked for.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: quic::BindError,
    },
    /// A bound listener's address could not be read.
    #[error(transparent)]
    Address(#[from] std::io::Error),
    /// The `[jwt]` key is unusable.
    #[error(transparent)]
    Jwt(#[from] AuthError),
    /// The cluster backplane could not be set up.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The first JWK Set of `[auth] jwks_url` could not be fetched or used.
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

/// A started gateway: its bound addresses and the tasks serving them.
pub struct Server {
    /// The TCP (HTTPS + WSS) address actually bound.
    pub tcp_addr: SocketAddr,
    /// The UDP (HTTP/3 + WebTransport) address, when WebTransport is on.
    pub udp_addr: Option<SocketAddr>,
    quic: Option<quinn::Endpoint>,
    /// The development certificate in use, if any.
    pub dev_cert: Option<DevCert>,
    /// Where the dev certificate PEM was written.
    pub dev_cert_path: Option<std::path::PathBuf>,
    /// Shared state.
    pub state: Arc<AppState>,
    /// Reloads the `[tls]` files (none with a dev certificate).
    reloader: Option<Arc<CertReloader>>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tcp_addr", &self.tcp_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads certificates, binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        tls::install_crypto_provider();
        let certs = Certificates::load(&config.tls)?;
        let heartbeat = config
            .endpoints
            .iter()
            .map(|e| e.heartbeat)
            .min()
            .unwrap_or(Duration::from_secs(25));
        let quic_tls = config
            .webtransport
            .then(|| tls::quic_config(certs.resolver.clone()));
        let (tcp, quic) = bind_same_port(config.listen, quic_tls, heartbeat).await?;
        let tcp_addr = tcp.local_addr()?;
        let udp_addr = quic.as_ref().map(|q| q.local_addr()).transpose()?;

        let jwks = match (&config.jwks, &config.jwt) {
            (Some(jwks), Some(jwt)) => Some(Jwks::start(jwks.clone(), jwt).await?),
            _ => None,
        };
        let verifier = match (&jwks, &config.jwt) {
            (Some(jwks), _) => Some(jwks.verifier().clone()),
            (None, Some(jwt)) => Some(Arc::new(JwtVerifier::new(jwt)?)),
            (None, None) => None,
        };
        let (services, cluster) = services(&config, verifier)?;
        let state = AppState::new(
            config,
            services,
            udp_addr.map(|a| a.port()),
            certs.dev_cert.as_ref().map(|d| d.sha256.clone()),
            cluster,
        );
        if let Some(jwks) = jwks {
            jwks.spawn_refresh();
            state.set_jwks(jwks);
        }
        let max_message_bytes =
            |path: &str| state.endpoint(path).map_or(0, |p| p.max_message_bytes);
        state.set_upstreams(crate::upstream::Upstreams::new(
            &state.config.upstreams,
            max_message_bytes,
            &state.metrics,
        )?);
        if let Some(cluster) = &state.cluster {
            cluster.count_errors_in(state.metrics.backplane_errors());
        }
        // The cross-session write passes WebSocket sessions' frames leave through.
        let flushers = Arc::new(Flushers::spawn());
        let router = router(&state, flushers);
        let mut tasks = JoinSet::new();
        let tls_config = tls::tcp_config(certs.resolver.clone());
        tasks.spawn(tcp::serve(tcp, tls_config, state.clone(), router.clone()));
        if let Some(endpoint) = quic.clone() {
            tasks.spawn(quic::serve(endpoint, state.clone(), router));
        }
        tasks.spawn(expire_history(state.clone()));
        if let Some(reloader) = &certs.reloader {
            tasks.spawn(reloader.clone().watch(POLL_INTERVAL));
        }

        info!(%tcp_addr, node = state.config.node_id, "gateway started");
        Ok(Self {
            tcp_addr,
            udp_addr,
            quic,
            dev_cert: certs.dev_cert,
            dev_cert_path: certs.dev_cert_path,
            state,
            reloader: certs.reloader,
            tasks,
        })
    }

    /// Loads the `[tls]` certificate and key again (as SIGHUP does).
    ///
    /// New TCP and QUIC handshakes use them, established connections keep theirs. A pair
    /// that cannot be used is refused and the current one stays; either outcome is logged.
    /// With a development certificate there is nothing to reload.
    pub fn reload_certificate(&self, trigger: Trigger) -> Result<CertReload, ReloadError> {
        match &self.reloader {
            Some(reloader) => reloader.reload(trigger),
            None => Ok(CertReload::DevCertificate),
        }
    }

    /// The lines printed on start, one per listener (CONFIG.md).
    pub fn listener_lines(&self) -> Vec<String> {
        let mut lines = vec![format!("listening https+wss on {} (tcp)", self.tcp_addr)];
        if let Some(udp) = self.udp_addr {
            lines.push(format!("listening h3+webtransport on {udp} (udp)"));
        }
        if let (Some(dev), Some(path)) = (&self.dev_cert, &self.dev_cert_path) {
            lines.push(format!(
                "dev certificate {} sha256={} spki-sha256={}",
                path.display(),
                dev.sha256,
                dev.spki_sha256
            ));
        }
        lines
    }

    /// Graceful shutdown: drain, wait for the sessions to go, then stop.
    ///
    /// The drain refuses new sessions and tells every session to reconnect within the drain
    /// window, then closes 1001; shutdown waits up to the drain window for the sessions to
    /// go.
    pub async fn shutdown(mut self) {
        self.state.drain();
        // Every session task ends once its queued frames and its close are written (or its
        // close grace runs out); the drain deadline bounds the wait.
        self.state.sessions.close();
        let drain = self.state.config.drain;
        let _ = tokio::time::timeout(drain, self.state.sessions.wait()).await;
        if let Some(q) = &self.quic {
            q.close(0x100u32.into(), b"shutting down");
        }
        self.tasks.abort_all();
    }
}

/// The certificate the listeners serve, and where it comes from.
struct Certificates {
    resolver: Arc<ReloadableResolver>,
    /// Reloads the `[tls]` files (none with a dev certificate).
    reloader: Option<Arc<CertReloader>>,
    dev_cert: Option<DevCert>,
    dev_cert_path: Option<PathBuf>,
}

impl Certificates {
    /// Loads the `[tls]` files, or makes (or reuses) the development certificate.
    fn load(source: &TlsSource) -> Result<Self, StartError> {
        let (identity, dev_cert, dev_cert_path) = match source {
            TlsSource::Files { cert, key } => (load_pem(cert, key)?, None, None),
            TlsSource::Dev(dir) => {
                let (dev, _new) = ensure_dev_cert(dir).map_err(|source| dev_cert(dir, source))?;
                (dev.identity()?, Some(dev), Some(dir.join("cert.pem")))
            }
        };
        let resolver = ReloadableResolver::new(&identity)?;
        let reloader = match source {
            TlsSource::Files { cert, key } => Some(CertReloader::new(
                cert.clone(),
                key.clone(),
                resolver.clone(),
            )),
            TlsSource::Dev(_) => None,
        };
        Ok(Self {
            resolver,
            reloader,
            dev_cert,
            dev_cert_path,
        })
    }
}

/// The error of a development certificate in `dir` that could not be made or loaded.
fn dev_cert(dir: &Path, source: CertError) -> StartError {
    StartError::DevCert {
        dir: dir.to_owned(),
        source,
    }
}

/// The hub, the JWT verifier and the connection limits; and the cluster, in cluster mode.
///
/// The hub is single node, or over the Redis cluster of `[redis]`.
fn services(
    config: &Config,
    verifier: Option<Arc<JwtVerifier>>,
) -> Result<(Services, Option<Arc<RedisCluster>>), StartError> {
    let hub_config = HubConfig {
        room_budget: config.limits.room_budget,
        max_presence_members: config.limits.max_presence_members,
        rooms_per_user_per_sec: config.limits.rooms_per_user_per_sec,
        ..HubConfig::new(config.node_id.clone(), config.rooms.clone())
    };
    let mut cluster_handle = None;
    let hub = match &config.redis {
        None => Hub::new(hub_config, Arc::new(LocalBackplane), StdRng::from_os_rng()),
        Some(url) => {
            let cluster = RedisCluster::start(
                url,
                config.rooms.clone(),
                &config.node_id,
                config.cluster_heartbeat,
                config.limits.room_budget,
            )?;
            let hub = Hub::new(hub_config, cluster.clone(), StdRng::from_os_rng());
            cluster.attach(&hub);
            cluster_handle = Some(cluster.clone());
            let (kind, urls) = match url {
                RedisTarget::Single(u) => ("redis", vec![redacted(u)]),
                RedisTarget::Cluster(seeds) => {
                    ("redis cluster", seeds.iter().map(|u| redacted(u)).collect())
                }
            };
            info!(redis = ?urls, "cluster mode: rooms and direct messages go through {kind}");
            hub
        }
    };
    let limits = ConnectionLimits::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
        config.limits.max_connections_per_user,
    );
    let services = Services {
        hub,
        verifier,
        limits,
    };
    Ok((services, cluster_handle))
}

/// The router both fronts serve.
///
/// Its fallback is the WebSocket upgrade on endpoint paths, whose sessions' writes are
/// corked by `flushers`.
fn router(state: &Arc<AppState>, flushers: Arc<Flushers>) -> Router {
    api::router(
        state.clone(),
        move |State(app): State<Arc<AppState>>, req: http::Request<Body>| {
            tcp::upgrade(app, flushers.clone(), req)
        },
    )
}

/// How often expired room history is dropped (and rooms left with nothing forgotten).
const HISTORY_SWEEP: Duration = Duration::from_secs(1);

/// Drops expired history every [`HISTORY_SWEEP`].
async fn expire_history(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(HISTORY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.services.hub.expire_history(crate::clock::instant());
    }
}

/// Binds TCP on `addr`, then UDP on the same port number.
///
/// With port 0 the UDP port may be taken: then both are bound again on a new port (a few
/// times).
async fn bind_same_port(
    addr: SocketAddr,
    quic_tls: Option<rustls::ServerConfig>,
    heartbeat: Duration,
) -> Result<(TcpListener, Option<quinn::Endpoint>), StartError> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::BindTcp { addr, source })?;
        let Some(tls) = &quic_tls else {
            return Ok((tcp, None));
        };
        let udp_addr = tcp.local_addr()?;
        match quic::bind(udp_addr, tls.clone(), heartbeat) {
            Ok(endpoint) => return Ok((tcp, Some(endpoint))),
            Err(source) => {
                last_error = Some(StartError::BindUdp {
                    addr: udp_addr,
                    source,
                })
            }
        }
    }
    Err(last_error.expect("at least one attempt"))
}

/// A Redis URL for the log: a password in it (`redis://:secret@host`) is replaced by `***`.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redis_password_is_not_logged() {
        assert_eq!(
            super::redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(super::redacted("rediss://user:pw@h:1"), "rediss://***@h:1");
        assert_eq!(
            super::redacted("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
