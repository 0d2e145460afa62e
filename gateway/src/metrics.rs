//! The Prometheus metrics of one gateway process (`GET /metrics`), on `prometheus-client`.
//!
//! Hot paths never look a label up: the counters of each transport and endpoint are
//! resolved once (a clone shares the atomic) and kept where they are counted, and writers
//! add a whole flush at once. Only rare events (a close code, a rejection status, a
//! backplane error) go through a labelled family.

use std::sync::Arc;

use gateway_core::{session::TransportKind, upstream::CallEvent};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Metric, Registry},
};

/// Whether this build counts (the `metrics` feature).
///
/// Without it every count is compiled out and `/metrics` shows the series at zero.
pub const ENABLED: bool = cfg!(feature = "metrics");

/// Labels of a per-transport metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// Labels of a per-endpoint metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

/// Labels of a per-session metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    endpoint: String,
    transport: &'static str,
}

/// Labels of `gateway_sessions_closed_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    endpoint: String,
    transport: &'static str,
    code: u16,
}

/// Labels of `gateway_handshake_rejections_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    endpoint: String,
    transport: &'static str,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Labels of `gateway_upstream_calls_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamCallLabels {
    endpoint: String,
    event: &'static str,
    result: &'static str,
}

/// Labels of `gateway_upstream_call_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamEventLabels {
    endpoint: String,
    event: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The counters of one transport, resolved once.
#[derive(Debug, Clone)]
pub struct TransportCounters {
    /// Frames read from clients.
    pub frames_received: Counter,
    /// Frames written to clients.
    pub frames_sent: Counter,
    /// Payload bytes read from clients.
    pub bytes_received: Counter,
    /// Payload bytes written to clients.
    pub bytes_sent: Counter,
    /// Messages queued for members and recipients.
    pub deliveries: Counter,
    /// Publish-to-write latency (sampled: `gateway_delivery_seconds`).
    pub delivery_seconds: Histogram,
}

/// The counters of one endpoint and transport, resolved when a session opens.
#[derive(Debug, Clone)]
pub struct SessionCounters {
    /// Open sessions.
    pub sessions: Gauge,
    /// Sessions opened.
    pub opened: Counter,
    /// Publishes accepted.
    pub publishes: Counter,
    /// Sessions closed as slow consumers (4008, queue full).
    pub slow_consumer_closes: Counter,
    /// Frames refused by the rate limit.
    pub rate_limited: Counter,
}

/// The `result` labels of `gateway_upstream_calls_total`.
pub const UPSTREAM_RESULTS: [&str; 8] = [
    "ok",
    "refused",
    "timeout",
    "unreachable",
    "error_status",
    "bad_answer",
    "over_limit",
    "circuit_open",
];

/// One endpoint's upstream call counters, by event and result, and durations by event.
#[derive(Debug, Clone)]
pub struct UpstreamCounters {
    /// By `CallEvent as usize`, then by position in [`UPSTREAM_RESULTS`].
    calls: Vec<Vec<Counter>>,
    /// By `CallEvent as usize`.
    seconds: Vec<Histogram>,
}

impl UpstreamCounters {
    /// Counts a call for `event` by its `result`; `seconds`: it reached the backend.
    pub fn count(&self, event: CallEvent, result: &str, seconds: Option<f64>) {
        if !ENABLED {
            return;
        }
        if let Some(seconds) = seconds {
            self.seconds[event as usize].observe(seconds);
        }
        if let Some(i) = UPSTREAM_RESULTS.iter().position(|r| *r == result) {
            self.calls[event as usize][i].inc();
        }
    }
}

/// The counters of one configured endpoint, resolved at start.
#[derive(Debug, Clone)]
pub struct EndpointCounters {
    /// Publishes accepted.
    pub publishes: Counter,
    /// Frames refused by the rate limit.
    pub rate_limited: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    queue: &'static str,
    reason: &'static str,
}

/// The backplane's error and refusal counters.
///
/// They are `gateway_backplane_errors_total`, by operation, and
/// `gateway_backplane_refused_total`, by queue and reason.
#[derive(Debug, Clone)]
pub struct BackplaneErrors(Family<OpLabel, Counter>, Family<RefusedLabel, Counter>);

impl BackplaneErrors {
    /// The operations counted.
    pub const OPS: [&'static str; 16] = [
        "publish",
        "view",
        "send_user",
        "disconnect",
        "issue_ticket",
        "ticket",
        "members",
        "acquire_user",
        "sweep",
        "subscribe",
        "enter",
        "exit",
        "count_user",
        "reannounce",
        "heartbeat",
        "pubsub",
    ];

    /// Counts a failed `op` (one of [`Self::OPS`]).
    pub fn count(&self, op: &'static str) {
        self.0.get_or_create(&OpLabel { op }).inc();
    }

    /// The worker's queues (kinds of operation).
    pub const QUEUES: [&'static str; 5] = ["rooms", "presence", "listing", "users", "tickets"];
    /// Why a command was refused without running.
    ///
    /// `busy` (its queue was full), `open` (the circuit breaker), `expired` (its deadline
    /// passed while it waited), `room_budget` (it would have created a room beyond the
    /// budget).
    pub const REASONS: [&'static str; 4] = ["busy", "open", "expired", "room_budget"];

    /// Counts a command of `queue` refused for `reason`.
    pub fn refused(&self, queue: &'static str, reason: &'static str) {
        self.1.get_or_create(&RefusedLabel { queue, reason }).inc();
    }
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    endpoints: std::collections::HashMap<String, EndpointCounters>,
    /// Serialises copying the hub's totals into their counters at a scrape.
    hub_sync: std::sync::Mutex<()>,
    websocket: TransportCounters,
    webtransport: TransportCounters,
    sessions: Family<SessionLabels, Gauge>,
    opened: Family<SessionLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    publishes: Family<EndpointLabel, Counter>,
    slow_consumer_closes: Family<EndpointLabel, Counter>,
    rate_limited: Family<EndpointLabel, Counter>,
    /// Datagrams written (WebTransport volatile messages).
    pub datagrams_sent: Counter,
    /// Rooms with members on this node (set at each scrape).
    pub rooms: Gauge,
    backplane_errors: Family<OpLabel, Counter>,
    backplane_refused: Family<RefusedLabel, Counter>,
    recoveries: Family<ResultLabel, Counter>,
    jwks_fetches: Family<ResultLabel, Counter>,
    upstream_calls: Family<UpstreamCallLabels, Counter>,
    upstream_seconds: Family<UpstreamEventLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Registers every metric, with the counters of each of `endpoints` resolved.
    ///
    /// `version` goes into `gateway_build_info`.
    pub fn new<'a>(
        version: &'static str,
        endpoints: impl IntoIterator<Item = &'a str>,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        let (websocket, webtransport) = register_transports(&mut registry);
        let families = SessionFamilies::register(&mut registry);
        let node = NodeFamilies::register(&mut registry, version);
        let SessionFamilies {
            sessions,
            opened,
            closed,
            rejections,
            publishes,
            datagrams_sent,
            slow_consumer_closes,
            rate_limited,
            rooms,
        } = families;
        let endpoints = endpoints
            .into_iter()
            .map(|path| {
                let label = EndpointLabel {
                    endpoint: path.to_owned(),
                };
                let counters = EndpointCounters {
                    publishes: publishes.get_or_create_owned(&label),
                    rate_limited: rate_limited.get_or_create_owned(&label),
                };
                (path.to_owned(), counters)
            })
            .collect();
        Arc::new(Self {
            registry,
            endpoints,
            hub_sync: std::sync::Mutex::new(()),
            websocket,
            webtransport,
            sessions,
            opened,
            closed,
            rejections,
            publishes,
            slow_consumer_closes,
            rate_limited,
            datagrams_sent,
            rooms,
            backplane_errors: node.backplane_errors,
            backplane_refused: node.backplane_refused,
            recoveries: node.recoveries,
            jwks_fetches: node.jwks_fetches,
            upstream_calls: node.upstream_calls,
            upstream_seconds: node.upstream_seconds,
        })
    }

    /// The upstream call counters of `endpoint`, resolved once (every series starts at 0).
    pub fn upstream(&self, endpoint: &str) -> UpstreamCounters {
        let calls = CallEvent::ALL
            .iter()
            .map(|event| {
                UPSTREAM_RESULTS
                    .iter()
                    .map(|result| {
                        self.upstream_calls
                            .get_or_create_owned(&UpstreamCallLabels {
                                endpoint: endpoint.to_owned(),
                                event: event.as_str(),
                                result,
                            })
                    })
                    .collect()
            })
            .collect();
        let seconds = CallEvent::ALL
            .iter()
            .map(|event| {
                self.upstream_seconds
                    .get_or_create_owned(&UpstreamEventLabels {
                        endpoint: endpoint.to_owned(),
                        event: event.as_str(),
                    })
            })
            .collect();
        UpstreamCounters { calls, seconds }
    }

    /// The counters of `transport`.
    pub fn transport(&self, transport: TransportKind) -> &TransportCounters {
        match transport {
            TransportKind::WebSocket => &self.websocket,
            TransportKind::WebTransport => &self.webtransport,
        }
    }

    /// The counters a session of `endpoint` over `transport` keeps.
    pub fn session(&self, endpoint: &str, transport: TransportKind) -> SessionCounters {
        let labels = SessionLabels {
            endpoint: endpoint.to_owned(),
            transport: transport.as_str(),
        };
        let endpoint = EndpointLabel {
            endpoint: endpoint.to_owned(),
        };
        SessionCounters {
            sessions: self.sessions.get_or_create_owned(&labels),
            opened: self.opened.get_or_create_owned(&labels),
            publishes: self.publishes.get_or_create_owned(&endpoint),
            slow_consumer_closes: self.slow_consumer_closes.get_or_create_owned(&endpoint),
            rate_limited: self.rate_limited.get_or_create_owned(&endpoint),
        }
    }

    /// The counters of the configured endpoint at `path`.
    pub fn endpoint(&self, path: &str) -> Option<&EndpointCounters> {
        self.endpoints.get(path)
    }

    /// Brings the delivery and recovery counters up to the hub's running totals.
    ///
    /// This runs at a scrape: the hub counts with plain atomics on its fan-out path.
    pub fn sync_hub(&self, stats: &gateway_core::hub::HubStats) {
        let _one_at_a_time = self.hub_sync.lock().unwrap_or_else(|e| e.into_inner());
        let catch_up = |counter: &Counter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        for kind in [TransportKind::WebSocket, TransportKind::WebTransport] {
            catch_up(&self.transport(kind).deliveries, stats.deliveries(kind));
        }
        let (recovered, not_recovered) = stats.recoveries();
        catch_up(
            &self.recoveries.get_or_create_owned(&ResultLabel {
                result: "recovered",
            }),
            recovered,
        );
        catch_up(
            &self.recoveries.get_or_create_owned(&ResultLabel {
                result: "not_recovered",
            }),
            not_recovered,
        );
    }

    /// Brings the JWK Set fetch counters up to `fetches` in all, `failures` of them failed.
    ///
    /// This runs at a scrape.
    pub fn sync_jwks(&self, fetches: u64, failures: u64) {
        let _one_at_a_time = self.hub_sync.lock().unwrap_or_else(|e| e.into_inner());
        for (result, total) in [
            ("ok", fetches.saturating_sub(failures)),
            ("error", failures),
        ] {
            let counter = self
                .jwks_fetches
                .get_or_create_owned(&ResultLabel { result });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Counts a session's close with `code`.
    pub fn session_closed(&self, endpoint: &str, transport: TransportKind, code: u16) {
        self.closed
            .get_or_create(&CloseLabels {
                endpoint: endpoint.to_owned(),
                transport: transport.as_str(),
                code,
            })
            .inc();
    }

    /// Counts a refused upgrade or CONNECT: `status` is the HTTP status, or `timeout`.
    pub fn handshake_rejected(&self, endpoint: &str, transport: TransportKind, status: &str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                endpoint: endpoint.to_owned(),
                transport: transport.as_str(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// Counts a publish through the HTTP API.
    pub fn api_published(&self) {
        self.publishes
            .get_or_create(&EndpointLabel {
                endpoint: "api".to_owned(),
            })
            .inc();
    }

    /// The counter of failed backplane operations, for the cluster worker.
    ///
    /// Every known operation starts at 0 so dashboards see the series before the first
    /// failure.
    pub fn backplane_errors(&self) -> BackplaneErrors {
        for op in BackplaneErrors::OPS {
            drop(self.backplane_errors.get_or_create(&OpLabel { op }));
        }
        for queue in BackplaneErrors::QUEUES {
            for reason in BackplaneErrors::REASONS {
                drop(
                    self.backplane_refused
                        .get_or_create(&RefusedLabel { queue, reason }),
                );
            }
        }
        BackplaneErrors(
            self.backplane_errors.clone(),
            self.backplane_refused.clone(),
        )
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Registers `metric` as `name` with `help`, and returns it (a clone shares its values).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers the per-transport metrics and resolves the counters of both transports.
fn register_transports(registry: &mut Registry) -> (TransportCounters, TransportCounters) {
    let counter = Family::<TransportLabel, Counter>::default;
    let mut add = |name: &str, help: &str| registered(registry, name, help, counter());
    let frames_received = add("gateway_frames_received", "Frames read from clients");
    let frames_sent = add("gateway_frames_sent", "Frames written to clients");
    let bytes_received = add("gateway_bytes_received", "Payload bytes read from clients");
    let bytes_sent = add("gateway_bytes_sent", "Payload bytes written to clients");
    let deliveries = add(
        "gateway_deliveries",
        "Messages queued for room members and direct recipients",
    );
    let latency = registered(
        registry,
        "gateway_delivery_seconds",
        "From a frame entering a session's queue to its write (sampled)",
        Family::<TransportLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))) as fn() -> Histogram,
        ),
    );
    let of = |kind: TransportKind| {
        let label = TransportLabel {
            transport: kind.as_str(),
        };
        TransportCounters {
            frames_received: frames_received.get_or_create_owned(&label),
            frames_sent: frames_sent.get_or_create_owned(&label),
            bytes_received: bytes_received.get_or_create_owned(&label),
            bytes_sent: bytes_sent.get_or_create_owned(&label),
            deliveries: deliveries.get_or_create_owned(&label),
            delivery_seconds: latency.get_or_create_owned(&label),
        }
    };
    (
        of(TransportKind::WebSocket),
        of(TransportKind::WebTransport),
    )
}

/// The per-session and per-endpoint families, and the node's datagram and room counts.
struct SessionFamilies {
    sessions: Family<SessionLabels, Gauge>,
    opened: Family<SessionLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    publishes: Family<EndpointLabel, Counter>,
    datagrams_sent: Counter,
    slow_consumer_closes: Family<EndpointLabel, Counter>,
    rate_limited: Family<EndpointLabel, Counter>,
    rooms: Gauge,
}

impl SessionFamilies {
    /// Registers them, in this order.
    fn register(registry: &mut Registry) -> Self {
        let r = registry;
        Self {
            sessions: registered(r, "gateway_sessions", "Open sessions", Family::default()),
            opened: registered(
                r,
                "gateway_sessions_opened",
                "Sessions opened",
                Family::default(),
            ),
            closed: registered(
                r,
                "gateway_sessions_closed",
                "Sessions closed, by close code",
                Family::default(),
            ),
            rejections: registered(
                r,
                "gateway_handshake_rejections",
                "Upgrades and CONNECTs refused before a session, by HTTP status (or timeout)",
                Family::default(),
            ),
            publishes: registered(
                r,
                "gateway_publishes",
                "Publishes accepted (endpoint `api`: the HTTP API)",
                Family::default(),
            ),
            datagrams_sent: registered(
                r,
                "gateway_datagrams_sent",
                "WebTransport datagrams written",
                Counter::default(),
            ),
            slow_consumer_closes: registered(
                r,
                "gateway_slow_consumer_closes",
                "Sessions closed because their outbound queue was full",
                Family::default(),
            ),
            rate_limited: registered(
                r,
                "gateway_rate_limited",
                "Inbound frames refused by the per-session rate limit",
                Family::default(),
            ),
            rooms: registered(
                r,
                "gateway_rooms",
                "Rooms with members on this node",
                Gauge::default(),
            ),
        }
    }
}

/// The backplane and recovery families; `gateway_build_info` is registered with them.
struct NodeFamilies {
    backplane_errors: Family<OpLabel, Counter>,
    backplane_refused: Family<RefusedLabel, Counter>,
    recoveries: Family<ResultLabel, Counter>,
    jwks_fetches: Family<ResultLabel, Counter>,
    upstream_calls: Family<UpstreamCallLabels, Counter>,
    upstream_seconds: Family<UpstreamEventLabels, Histogram, fn() -> Histogram>,
}

impl NodeFamilies {
    /// Registers them, in this order, then `gateway_build_info` for `version`.
    fn register(registry: &mut Registry, version: &'static str) -> Self {
        let r = &mut *registry;
        let families = Self {
            backplane_errors: registered(
                r,
                "gateway_backplane_errors",
                "Failed cluster backplane (Redis) operations",
                Family::default(),
            ),
            backplane_refused: registered(
                r,
                "gateway_backplane_refused",
                "Cluster backplane commands refused without running, by queue and reason",
                Family::default(),
            ),
            recoveries: registered(
                r,
                "gateway_recoveries",
                "Joins with `since`: recovered exactly, or not",
                Family::default(),
            ),
            jwks_fetches: registered(
                r,
                "gateway_jwks_fetches",
                "Fetches of the JWK Set of `[auth] jwks_url`, by result (ok or error)",
                Family::default(),
            ),
            upstream_calls: registered(
                r,
                "gateway_upstream_calls",
                "Calls to the application's backend, by endpoint, event and result",
                Family::default(),
            ),
            upstream_seconds: registered(
                r,
                "gateway_upstream_call_seconds",
                "Duration of calls that reached the application's backend",
                Family::new_with_constructor(
                    (|| Histogram::new(exponential_buckets(0.0001, 2.0, 16))) as fn() -> Histogram,
                ),
            ),
        };
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info.get_or_create(&VersionLabel { version }).set(1);
        registry.register("gateway_build_info", "The gateway's version", build_info);
        families
    }
}
