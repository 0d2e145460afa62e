//! Calls to the application's backend (PROTOCOL.md section 10, CONFIG.md
//! `[endpoint.upstream]`).
//!
//! One [`Upstream`] per endpoint that has one: a pooled keep-alive HTTP client, a deadline
//! per call, a concurrency limit that fails at once when full, a circuit breaker and the
//! call metrics. Core's connection asks for the calls ([`gateway_core::upstream::Call`]);
//! [`SessionCalls`] runs them for one session and feeds the outcomes back.

mod breaker;
mod connect;
mod session;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway_core::upstream::{read_answer, CallEvent, Failure, Outcome};
use tokio::{sync::Semaphore, time::Instant};

use connect::ConnectSlot;
use tracing::{debug, warn};

pub(crate) use connect::{connect, Checked};
pub(crate) use session::SessionCalls;

use crate::{
    config::UpstreamConfig,
    metrics::{Metrics, UpstreamCounters},
};
use breaker::{Breaker, Passed};

/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `connect` calls one client address may have in flight; more get 503 at once.
pub const MAX_CONNECTS_PER_IP: u32 = 16;

/// hyper's pooled HTTP/1.1 client over plain TCP.
type PlainClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
#[error("upstream HTTP client: {0}")]
pub struct UpstreamError(#[from] reqwest::Error);

/// The upstreams of every endpoint that has one, by endpoint path.
#[derive(Debug, Default)]
pub struct Upstreams(HashMap<String, Arc<Upstream>>);

impl Upstreams {
    /// Builds the clients of `configs` (endpoint path, settings).
    ///
    /// `max_message_bytes` bounds each endpoint's answers (with room for base64).
    pub fn new(
        configs: &[(String, UpstreamConfig)],
        max_message_bytes: impl Fn(&str) -> usize,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, UpstreamError> {
        let mut upstreams = HashMap::new();
        for (endpoint, config) in configs {
            let upstream = Upstream::new(
                endpoint,
                config.clone(),
                max_message_bytes(endpoint),
                metrics.clone(),
            )?;
            upstreams.insert(endpoint.clone(), Arc::new(upstream));
        }
        Ok(Self(upstreams))
    }

    /// The upstream of the endpoint at `path`.
    pub fn get(&self, path: &str) -> Option<&Arc<Upstream>> {
        self.0.get(path)
    }
}

/// One endpoint's backend.
///
/// Each event has its own circuit and `connect`, session calls (`join`, `publish`, `rpc`)
/// and `disconnect` each their own `max_in_flight` calls, so that what fails or fills one
/// (an rpc method that errors on a client's input, an anonymous flood of upgrades) never
/// blocks the others.
#[derive(Debug)]
pub struct Upstream {
    endpoint: String,
    config: UpstreamConfig,
    client: reqwest::Client,
    /// The URL of each event, by `CallEvent as usize`.
    urls: Vec<reqwest::Url>,
    /// The client of `http://` backends: hyper's pooled client, without reqwest's
    /// layers (about 9 µs less CPU per call; `https://` goes through `client`).
    plain: PlainClient,
    /// The URI of each event, by `CallEvent as usize`.
    uris: Vec<http::Uri>,
    /// `Bearer <secret>`, built once.
    authorization: Option<http::HeaderValue>,
    /// The circuit of each event, by `CallEvent as usize`.
    breakers: Vec<Breaker>,
    /// Outstanding calls: `connect`, session calls, `disconnect`.
    in_flight: [Semaphore; 3],
    /// `connect` calls in flight per client address.
    connects_by_ip: Mutex<HashMap<IpAddr, u32>>,
    max_answer_bytes: usize,
    metrics: UpstreamCounters,
}

impl Upstream {
    fn new(
        endpoint: &str,
        config: UpstreamConfig,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamError> {
        // No proxy from the environment and no redirects: calls go to the configured host.
        // As many idle connections as calls may be out: a smaller pool closes and reopens
        // connections under load (about 700 a second at 10,000 calls/s with 64).
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(config.max_in_flight)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let plain =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(config.max_in_flight)
                .pool_idle_timeout(IDLE_TIMEOUT)
                .build(connector);
        // Validated as header-safe by the configuration.
        let authorization = config
            .secret
            .as_ref()
            .and_then(|s| http::HeaderValue::from_str(&format!("Bearer {s}")).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Ok(Self {
            authorization,
            plain,
            uris: CallEvent::ALL
                .iter()
                .map(|e| config.event_url(*e).as_str().parse().expect("a valid URI"))
                .collect(),
            endpoint: endpoint.to_owned(),
            urls: CallEvent::ALL
                .iter()
                .map(|e| config.event_url(*e))
                .collect(),
            breakers: CallEvent::ALL
                .iter()
                .map(|_| Breaker::new(config.breaker_failures, config.breaker_open))
                .collect(),
            in_flight: [(); 3].map(|()| Semaphore::new(config.max_in_flight)),
            connects_by_ip: Mutex::default(),
            // A message, base64 (4/3) and the JSON around it.
            max_answer_bytes: max_message_bytes / 3 * 4 + 64 * 1024,
            metrics: metrics.upstream(endpoint),
            config,
            client,
        })
    }

    /// The settings.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The `connect` call of a client at `ip`: at most [`MAX_CONNECTS_PER_IP`] at once.
    pub(crate) async fn connect_from(&self, ip: IpAddr, body: Vec<u8>) -> Outcome {
        let Some(_slot) = ConnectSlot::take(&self.connects_by_ip, ip) else {
            return self.count(
                CallEvent::Connect,
                Outcome::Failed(Failure::OverLimit),
                None,
            );
        };
        self.call(CallEvent::Connect, body).await
    }

    /// POSTs `body` for `event` and reads the answer.
    ///
    /// The call fails at once when `max_in_flight` calls of its kind are outstanding or
    /// its event's circuit is open; otherwise it has `timeout` to be answered. It is
    /// counted either way.
    pub async fn call(&self, event: CallEvent, body: Vec<u8>) -> Outcome {
        let pool = match event {
            CallEvent::Connect => 0,
            CallEvent::Join | CallEvent::Publish | CallEvent::Rpc => 1,
            CallEvent::Disconnect => 2,
        };
        let Ok(_permit) = self.in_flight[pool].try_acquire() else {
            return self.count(event, Outcome::Failed(Failure::OverLimit), None);
        };
        let Some(passed) = Passed::new(&self.breakers[event as usize], Instant::now()) else {
            return self.count(event, Outcome::Failed(Failure::CircuitOpen), None);
        };
        let started = Instant::now();
        let outcome =
            match tokio::time::timeout(self.config.timeout, self.exchange(event, body)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed(Failure::Timeout),
            };
        let answered = !matches!(outcome, Outcome::Failed(f) if f.is_backend_failure());
        let trial = passed.is_trial();
        if passed.record(answered, Instant::now()) {
            warn!(endpoint = %self.endpoint, event = event.as_str(),
                failures = self.config.breaker_failures,
                open_secs = self.config.breaker_open.as_secs_f64(),
                "upstream circuit opened");
        } else if trial && answered {
            warn!(endpoint = %self.endpoint, event = event.as_str(),
                "upstream circuit closed: the trial call was answered");
        }
        self.count(event, outcome, Some(started.elapsed().as_secs_f64()))
    }

    /// One POST and its answer, its body bounded (`https://` backends).
    async fn exchange(&self, event: CallEvent, body: Vec<u8>) -> Outcome {
        if self.config.url.scheme() == "http" {
            return self.exchange_plain(event, body).await;
        }
        let mut request = self
            .client
            .post(self.urls[event as usize].clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                debug!(endpoint = %self.endpoint, event = event.as_str(), error = %e,
                    "upstream call failed");
                return Outcome::Failed(Failure::Unreachable);
            }
        };
        let status = response.status().as_u16();
        let mut answer = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if answer.len() + chunk.len() <= self.max_answer_bytes => {
                    answer.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => return Outcome::Failed(Failure::BadAnswer),
                Ok(None) => break,
                Err(_) => return Outcome::Failed(Failure::Unreachable),
            }
        }
        read_answer(event, status, &answer)
    }

    /// One POST to an `http://` backend and its answer, its body bounded.
    async fn exchange_plain(&self, event: CallEvent, body: Vec<u8>) -> Outcome {
        use http_body_util::BodyExt;
        let mut request = http::Request::post(self.uris[event as usize].clone())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let Ok(request) = request.body(http_body_util::Full::new(bytes::Bytes::from(body))) else {
            return Outcome::Failed(Failure::Unreachable);
        };
        let response = match self.plain.request(request).await {
            Ok(response) => response,
            Err(_) => return Outcome::Failed(Failure::Unreachable),
        };
        let status = response.status().as_u16();
        let limited = http_body_util::Limited::new(response.into_body(), self.max_answer_bytes);
        match limited.collect().await {
            Ok(collected) => read_answer(event, status, &collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Outcome::Failed(Failure::BadAnswer)
            }
            Err(_) => Outcome::Failed(Failure::Unreachable),
        }
    }

    fn count(&self, event: CallEvent, outcome: Outcome, seconds: Option<f64>) -> Outcome {
        let result = match &outcome {
            Outcome::Answered(_) => "ok",
            Outcome::Refused(_) => "refused",
            Outcome::Failed(f) => f.label(),
        };
        self.metrics.count(event, result, seconds);
        outcome
    }
}
