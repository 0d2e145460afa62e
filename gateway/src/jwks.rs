//! The JWK Set of `[auth] jwks_url`: fetched at start, refreshed on a period, refetched
//! on an unknown `kid` at most every [`REFETCH_EVERY`].
//!
//! A failed refetch keeps the last good set (logged and counted); the gateway refuses to
//! start without a first one. Which keys of a set may serve is core's
//! ([`KeySet`](gateway_core::jwks::KeySet)).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use gateway_core::{
    auth::{JwtAlgorithm, JwtConfig, JwtVerifier},
    jwks::{KeySet, KeySetError},
};
use tokio::time::Instant;
use tracing::{info, warn};

/// The shortest time between two fetches that an unknown `kid` triggers.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWK Set body read.
const MAX_BODY_BYTES: usize = 1 << 20;

/// `[auth] jwks_*`: where the set is and how often it is read again.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    /// The set's URL (`https://`, or `http://` on a loopback host).
    pub url: reqwest::Url,
    /// The period of refreshes.
    pub refresh: Duration,
    /// An extra trust root for the key server (PEM), besides the system's.
    pub ca: Option<Vec<u8>>,
}

/// Why the set could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The HTTP client could not be built (a bad `jwks_ca`).
    #[error("jwks client: {0}")]
    Client(#[source] reqwest::Error),
    /// The key server answered another status than 200.
    #[error("fetching {url}: status {status}")]
    Status {
        /// The set's URL (without credentials or query).
        url: String,
        /// The status it answered.
        status: u16,
    },
    /// The request failed or timed out.
    #[error("fetching {url}: {source}")]
    Fetch {
        /// The set's URL.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The answer is larger than 1 MiB.
    #[error("fetching {0}: the answer is larger than 1 MiB")]
    TooLarge(String),
    /// The answer is not a usable set.
    #[error("the JWK Set of {url}: {source}")]
    Set {
        /// The set's URL.
        url: String,
        /// Why it cannot be used.
        #[source]
        source: KeySetError,
    },
}

/// The key server, and the verifier whose set it keeps.
#[derive(Debug)]
pub struct Jwks {
    config: JwksConfig,
    algorithm: JwtAlgorithm,
    client: reqwest::Client,
    verifier: Arc<JwtVerifier>,
    /// When the last fetch began; an unknown kid refetches only after [`REFETCH_EVERY`].
    last_fetch: Mutex<Instant>,
    /// Held while a fetch runs, so callers that arrive meanwhile wait for it.
    fetching: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    failures: AtomicU64,
}

impl Jwks {
    /// Fetches the first set and builds the verifier on it; fails when there is none.
    pub async fn start(config: JwksConfig, jwt: &JwtConfig) -> Result<Arc<Self>, JwksError> {
        // No proxy from the environment: the set must come from the host configured (an
        // `http://` loopback URL must not leave the machine through one).
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &config.ca {
            let root = reqwest::Certificate::from_pem(pem).map_err(JwksError::Client)?;
            builder = builder.add_root_certificate(root);
        }
        let client = builder.build().map_err(JwksError::Client)?;
        let set = fetch(&client, &config.url, jwt.algorithm).await?;
        info!(url = %redacted(&config.url), keys = set.len(), "JWK Set fetched");
        let verifier = Arc::new(JwtVerifier::with_key_set(jwt, set));
        let jwks = Arc::new_cyclic(|me: &std::sync::Weak<Self>| {
            // A first-message `auth` with an unknown kid is refused at once (core does not
            // wait); the refetch it starts serves the next attempt.
            let me = me.clone();
            verifier.on_unknown_key(Box::new(move || {
                let (Some(jwks), Ok(runtime)) =
                    (me.upgrade(), tokio::runtime::Handle::try_current())
                else {
                    return;
                };
                // No task for a kid that could not refetch anyway: a flood spawns nothing.
                if jwks.may_refetch() {
                    runtime.spawn(async move { jwks.refetch_for_unknown_kid().await });
                }
            }));
            Self {
                config,
                algorithm: jwt.algorithm,
                client,
                verifier,
                last_fetch: Mutex::new(Instant::now()),
                fetching: tokio::sync::Mutex::new(()),
                fetches: AtomicU64::new(1),
                failures: AtomicU64::new(0),
            }
        });
        Ok(jwks)
    }

    /// The verifier on the current set.
    pub fn verifier(&self) -> &Arc<JwtVerifier> {
        &self.verifier
    }

    /// Fetches (successful or not) since start, and of them the failed ones.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.fetches.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Refreshes the set every `jwks_refresh_secs`, for as long as the gateway runs.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.config.refresh).await;
                me.refetch().await;
            }
        });
    }

    /// A token named a kid the set lacks: refetches the set unless it was fetched less
    /// than [`REFETCH_EVERY`] ago. Callers that arrive during a fetch wait for it.
    pub async fn refetch_for_unknown_kid(&self) {
        let _one = self.fetching.lock().await;
        let since = self
            .last_fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if since >= REFETCH_EVERY {
            self.fetch_now().await;
        }
    }

    /// Whether an unknown kid would refetch now: no fetch is running and the last began at
    /// least [`REFETCH_EVERY`] ago.
    fn may_refetch(&self) -> bool {
        let since = self
            .last_fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        since >= REFETCH_EVERY && self.fetching.try_lock().is_ok()
    }

    /// Refetches now (the period's refresh), unless a fetch is running: then waits for it.
    async fn refetch(&self) {
        let _one = self.fetching.lock().await;
        self.fetch_now().await;
    }

    /// Fetches the set and replaces the verifier's; a failure keeps the last good set.
    async fn fetch_now(&self) {
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match fetch(&self.client, &self.config.url, self.algorithm).await {
            Ok(set) => self.verifier.replace_key_set(set),
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "refetching the JWK Set failed; the last good set stays");
            }
        }
    }
}

/// One GET of the set, its body bounded, parsed for `algorithm`.
async fn fetch(
    client: &reqwest::Client,
    url: &reqwest::Url,
    algorithm: JwtAlgorithm,
) -> Result<KeySet, JwksError> {
    let shown = redacted(url);
    let failed = |source| JwksError::Fetch {
        url: shown.clone(),
        source,
    };
    let mut response = client.get(url.clone()).send().await.map_err(failed)?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(JwksError::Status {
            url: shown,
            status: response.status().as_u16(),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(JwksError::TooLarge(shown));
        }
        body.extend_from_slice(&chunk);
    }
    KeySet::parse(&body, algorithm).map_err(|source| JwksError::Set { url: shown, source })
}

/// The URL without credentials or query, for logs and errors.
fn redacted(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.to_string()
}
