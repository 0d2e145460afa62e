//! Turning each section of the file into what the server runs with.
//!
//! It checks what the types cannot say: one function per section, each error naming its
//! key.

use std::{collections::HashSet, num::NonZeroU64, path::Path, sync::Arc, time::Duration};

use gateway_core::{
    auth::{JwtAlgorithm, JwtConfig, JwtVerifier},
    pattern::Pattern,
    policy::{self, EndpointPolicy, RoomPolicy},
    upstream::{CallEvent, UpstreamPolicy},
};

use super::{
    file::{self, Algorithm},
    invalid, ConfigError, JwksConfig, Limits, LogConfig, TlsSource, UpstreamConfig, DEFAULT_LISTEN,
};

/// Most messages one room may keep (`[[room]] history`).
const MAX_HISTORY: usize = 100_000;

/// Largest `max_message_bytes` an endpoint may set.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The longest deadline an upstream call may have (`timeout_ms`).
const MAX_UPSTREAM_TIMEOUT_MS: u64 = 60_000;

/// HS256 secrets shorter than this are refused.
const MIN_SECRET_BYTES: usize = 16;

/// `listen`.
pub(super) fn listen(listen: Option<&str>) -> Result<std::net::SocketAddr, ConfigError> {
    super::parse_listen(listen.unwrap_or(DEFAULT_LISTEN)).map_err(|m| invalid("listen", m))
}

/// `[log]`: the level must be a filter tracing understands.
pub(super) fn log(section: file::LogSection) -> Result<LogConfig, ConfigError> {
    if let Some(level) = &section.level {
        tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| invalid("log.level", format!("`{level}`: {e}")))?;
    }
    Ok(LogConfig {
        format: section.format,
        level: section.level.unwrap_or_else(|| "info".to_owned()),
    })
}

/// `[tls]`: both files or neither (then the dev certificate in `base/.gateway`).
pub(super) fn tls(
    section: Option<file::TlsSection>,
    base: &Path,
) -> Result<TlsSource, ConfigError> {
    let dev = || TlsSource::Dev(base.join(".gateway"));
    match section {
        None => Ok(dev()),
        Some(file::TlsSection { cert, key }) => match (cert, key) {
            (None, None) => Ok(dev()),
            (Some(cert), Some(key)) => Ok(TlsSource::Files {
                cert: resolve(base, cert),
                key: resolve(base, key),
            }),
            (None, Some(_)) => Err(invalid("tls.cert", "required when tls.key is set")),
            (Some(_), None) => Err(invalid("tls.key", "required when tls.cert is set")),
        },
    }
}

/// `[auth]`: checks the key the algorithm reads.
///
/// That key must be present, the other absent, and usable now rather than at the first
/// connection.
pub(super) fn auth(
    section: Option<file::AuthSection>,
    base: &Path,
) -> Result<(Option<JwtConfig>, Option<JwksConfig>, Duration), ConfigError> {
    let Some(mut a) = section else {
        return Ok((None, None, Duration::from_secs(30)));
    };
    let jwks = jwks(&mut a, base)?;
    let (algorithm, key_field) = match a.algorithm {
        Algorithm::Hs256 => (JwtAlgorithm::Hs256, "auth.secret"),
        Algorithm::Rs256 => (JwtAlgorithm::Rs256, "auth.public_key"),
        Algorithm::Es256 => (JwtAlgorithm::Es256, "auth.public_key"),
        Algorithm::EdDsa => (JwtAlgorithm::EdDsa, "auth.public_key"),
    };
    let key = if jwks.is_some() {
        Vec::new()
    } else if algorithm == JwtAlgorithm::Hs256 {
        if a.public_key.is_some() {
            return Err(invalid(
                "auth.public_key",
                "not used with HS256; set auth.secret",
            ));
        }
        let secret = a
            .secret
            .ok_or_else(|| invalid("auth.secret", "required for HS256"))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(invalid(
                "auth.secret",
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        secret.into_bytes()
    } else {
        if a.secret.is_some() {
            return Err(invalid(
                "auth.secret",
                "not used with RS256, ES256 or EdDSA; set auth.public_key",
            ));
        }
        let path = a
            .public_key
            .ok_or_else(|| invalid("auth.public_key", "required for RS256, ES256 and EdDSA"))?;
        let path = resolve(base, path);
        std::fs::read(&path)
            .map_err(|e| invalid("auth.public_key", format!("{}: {e}", path.display())))?
    };
    let jwt = JwtConfig {
        algorithm,
        key,
        issuer: a.issuer,
        audience: a.audience,
        leeway_secs: a.leeway_secs,
        max_lifetime_secs: a.max_token_lifetime_secs.map(NonZeroU64::get),
    };
    if jwks.is_none() {
        JwtVerifier::new(&jwt).map_err(|e| invalid(key_field, e.to_string()))?;
    }
    Ok((
        Some(jwt),
        jwks,
        Duration::from_secs(a.ticket_ttl_secs.get()),
    ))
}

/// `[auth] jwks_*`: a JWK Set in place of `public_key`, for an asymmetric algorithm only.
///
/// The URL must be `https://`, except on a loopback host; `jwks_ca` is read now.
fn jwks(a: &mut file::AuthSection, base: &Path) -> Result<Option<JwksConfig>, ConfigError> {
    let Some(url) = a.jwks_url.take() else {
        if a.jwks_ca.is_some() {
            return Err(invalid("auth.jwks_ca", "only used with auth.jwks_url"));
        }
        if a.jwks_refresh_secs.is_some() {
            return Err(invalid(
                "auth.jwks_refresh_secs",
                "only used with auth.jwks_url",
            ));
        }
        return Ok(None);
    };
    if a.algorithm == Algorithm::Hs256 {
        return Err(invalid(
            "auth.jwks_url",
            "needs an asymmetric algorithm (RS256, ES256 or EdDSA)",
        ));
    }
    if a.public_key.is_some() || a.secret.is_some() {
        return Err(invalid(
            "auth.jwks_url",
            "set either auth.jwks_url or auth.public_key, not both (and no auth.secret)",
        ));
    }
    let url = reqwest::Url::parse(&url).map_err(|e| invalid("auth.jwks_url", e.to_string()))?;
    // A loopback address, not a name: a name could resolve elsewhere.
    let loopback = url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    if !(url.scheme() == "https" || url.scheme() == "http" && loopback) {
        return Err(invalid(
            "auth.jwks_url",
            "must be https:// (http:// only on a loopback address)",
        ));
    }
    let ca = match a.jwks_ca.take() {
        None => None,
        Some(path) => {
            let path = resolve(base, path);
            let pem = std::fs::read(&path)
                .map_err(|e| invalid("auth.jwks_ca", format!("{}: {e}", path.display())))?;
            Some(pem)
        }
    };
    Ok(Some(JwksConfig {
        url,
        refresh: Duration::from_secs(a.jwks_refresh_secs.map_or(300, NonZeroU64::get)),
        ca,
    }))
}

/// `[cluster] redis` or `redis_cluster` (not both): URLs the Redis client accepts.
pub(super) fn redis(
    single: Option<String>,
    cluster: Option<Vec<String>>,
) -> Result<Option<super::RedisTarget>, ConfigError> {
    let check = |key: &str, url: &str| {
        redis::parse_redis_url(url)
            .map(drop)
            .ok_or_else(|| invalid(key, format!("`{url}` is not a redis:// URL")))
    };
    match (single, cluster) {
        (Some(_), Some(_)) => Err(invalid(
            "cluster.redis_cluster",
            "set either cluster.redis (one Redis) or cluster.redis_cluster (a Redis Cluster), not both",
        )),
        (Some(url), None) => {
            check("cluster.redis", &url)?;
            Ok(Some(super::RedisTarget::Single(url)))
        }
        (None, Some(seeds)) => {
            if seeds.is_empty() {
                return Err(invalid("cluster.redis_cluster", "at least one seed node"));
            }
            for url in &seeds {
                check("cluster.redis_cluster", url)?;
            }
            Ok(Some(super::RedisTarget::Cluster(seeds)))
        }
        (None, None) => Ok(None),
    }
}

/// `[limits]`.
pub(super) fn limits(section: file::LimitsSection) -> Limits {
    let defaults = Limits::default();
    Limits {
        max_connections: section
            .max_connections
            .map_or(defaults.max_connections, |v| v.get()),
        max_connections_per_ip: section
            .max_connections_per_ip
            .map_or(defaults.max_connections_per_ip, |v| v.get()),
        max_connections_per_user: section
            .max_connections_per_user
            .map_or(defaults.max_connections_per_user, |v| v.get()),
        handshake_timeout: section
            .handshake_timeout_secs
            .map_or(defaults.handshake_timeout, |v| Duration::from_secs(v.get())),
        room_budget: section.room_budget_mb.map_or(defaults.room_budget, |v| {
            v.get().saturating_mul(1024 * 1024)
        }),
        rooms_per_user_per_sec: section
            .rooms_per_user_per_sec
            .unwrap_or(defaults.rooms_per_user_per_sec),
        max_presence_members: section
            .max_presence_members
            .map_or(defaults.max_presence_members, |v| v.get()),
    }
}

/// An endpoint's policy, and its `[endpoint.upstream]` client settings if it has one.
pub(super) type ConfiguredEndpoint = (Arc<EndpointPolicy>, Option<UpstreamConfig>);

/// `[[endpoint]]`: at least one, distinct absolute paths, tokens verifiable where needed.
///
/// Each comes with its `[endpoint.upstream]` client settings, if it has one.
pub(super) fn endpoints(
    sections: Vec<file::EndpointSection>,
    has_auth: bool,
) -> Result<Vec<ConfiguredEndpoint>, ConfigError> {
    if sections.is_empty() {
        return Err(invalid("endpoint", "at least one [[endpoint]] is required"));
    }
    let mut seen = HashSet::new();
    sections
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let key = |k: &str| format!("endpoint[{i}].{k}");
            if !e.path.starts_with('/') || e.path.contains(['?', '#', ' ']) {
                return Err(invalid(key("path"), "must be an absolute path like /chat"));
            }
            if !seen.insert(e.path.clone()) {
                return Err(invalid(
                    key("path"),
                    format!("`{}` is configured twice", e.path),
                ));
            }
            endpoint(e, has_auth).map_err(|(k, message)| invalid(key(k), message))
        })
        .collect()
}

/// One endpoint; an error names the key within the endpoint.
fn endpoint(
    e: file::EndpointSection,
    has_auth: bool,
) -> Result<ConfiguredEndpoint, (&'static str, String)> {
    let mut p = EndpointPolicy::new(&e.path);
    p.auth = match e.auth {
        file::AuthMode::Required => policy::AuthMode::Required,
        file::AuthMode::FirstMessage => policy::AuthMode::FirstMessage,
        file::AuthMode::None => policy::AuthMode::None,
        file::AuthMode::Upstream => policy::AuthMode::Upstream,
    };
    let verifies = !matches!(p.auth, policy::AuthMode::None | policy::AuthMode::Upstream);
    if verifies && !has_auth {
        return Err(("auth", "needs an [auth] section to verify tokens".into()));
    }
    let upstream = e.upstream.map(upstream).transpose()?;
    p.upstream = upstream.as_ref().map(|(policy, _)| policy.clone());
    let connects = p
        .upstream
        .as_ref()
        .is_some_and(|u| u.calls(CallEvent::Connect));
    if p.auth == policy::AuthMode::Upstream && !connects {
        return Err((
            "auth",
            "`upstream` needs an [endpoint.upstream] whose events list `connect`".into(),
        ));
    }
    if connects
        && matches!(
            p.auth,
            policy::AuthMode::None | policy::AuthMode::FirstMessage
        )
    {
        // The grant's user and rooms would have no identity to apply to.
        return Err((
            "upstream.events",
            "`connect` needs auth = \"upstream\" or \"required\"".into(),
        ));
    }
    p.allowed_origins = e.allowed_origins;
    if let Some(rooms) = e.rooms {
        p.rooms = rooms.iter().map(|r| Pattern::new(r)).collect();
    }
    if let Some(v) = e.max_message_bytes {
        if v.get() > MAX_MESSAGE_BYTES {
            return Err(("max_message_bytes", "must be at most 16 MiB".into()));
        }
        p.max_message_bytes = v.get();
    }
    let secs = |v: std::num::NonZeroU64| Duration::from_secs(v.get());
    p.max_rooms = e.max_rooms.map_or(p.max_rooms, |v| v.get());
    p.queue_capacity = e.queue_capacity.map_or(p.queue_capacity, |v| v.get());
    // By default the queue holds at least two of the largest messages.
    let default_bytes = p.queue_bytes.max(p.max_message_bytes.saturating_mul(2));
    p.queue_bytes = e.queue_bytes.map_or(default_bytes, |v| v.get());
    p.rate_per_sec = e.rate_per_sec.map_or(p.rate_per_sec, |v| v.get());
    p.rate_burst = e.rate_burst.map_or(p.rate_burst, |v| v.get());
    p.heartbeat = e.heartbeat_secs.map_or(p.heartbeat, secs);
    p.auth_timeout = e.auth_timeout_secs.map_or(p.auth_timeout, secs);
    p.echo = e.echo;
    Ok((Arc::new(p), upstream.map(|(_, config)| config)))
}

/// `[endpoint.upstream]`: what core needs (events, rooms) and what the client needs.
fn upstream(
    u: file::UpstreamSection,
) -> Result<(UpstreamPolicy, UpstreamConfig), (&'static str, String)> {
    let url = reqwest::Url::parse(&u.url)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
        .ok_or(("upstream.url", "must be an http:// or https:// URL".into()))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(("upstream.url", "must not have a query or fragment".into()));
    }
    if u.timeout_ms
        .is_some_and(|t| t.get() > MAX_UPSTREAM_TIMEOUT_MS)
    {
        return Err((
            "upstream.timeout_ms",
            format!("must be at most {MAX_UPSTREAM_TIMEOUT_MS}"),
        ));
    }
    let mut events = Vec::new();
    for name in &u.events {
        let event = CallEvent::parse(name).ok_or((
            "upstream.events",
            format!("`{name}` is not one of connect, join, publish, rpc, disconnect"),
        ))?;
        if events.contains(&event) {
            return Err(("upstream.events", format!("`{name}` is listed twice")));
        }
        events.push(event);
    }
    if events.is_empty() {
        return Err(("upstream.events", "must list at least one event".into()));
    }
    let mut forward_headers = Vec::new();
    for name in u.forward_headers {
        let header = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            (
                "upstream.forward_headers",
                format!("`{name}` is not a header name"),
            )
        })?;
        forward_headers.push(header);
    }
    if u.secret.as_ref().is_some_and(|s| {
        s.is_empty() || http::HeaderValue::from_str(&format!("Bearer {s}")).is_err()
    }) {
        return Err((
            "upstream.secret",
            "must be a non-empty header-safe string".into(),
        ));
    }
    let rooms = u.rooms.unwrap_or_else(|| vec!["*".into()]);
    let policy = UpstreamPolicy::new(events, rooms.iter().map(|r| Pattern::new(r)).collect());
    let defaults = UpstreamConfig::defaults(url.clone());
    Ok((
        policy,
        UpstreamConfig {
            url,
            timeout: u
                .timeout_ms
                .map_or(defaults.timeout, |v| Duration::from_millis(v.get())),
            max_in_flight: u.max_in_flight.map_or(defaults.max_in_flight, |v| v.get()),
            forward_headers,
            secret: u.secret,
            breaker_failures: u
                .breaker_failures
                .map_or(defaults.breaker_failures, |v| v.get()),
            breaker_open: u
                .breaker_secs
                .map_or(defaults.breaker_open, |v| Duration::from_secs(v.get())),
        },
    ))
}

/// `[[room]]`: bounded history, and a positive lifetime for history that is kept.
pub(super) fn rooms(sections: Vec<file::RoomSection>) -> Result<Vec<RoomPolicy>, ConfigError> {
    sections
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if r.history > MAX_HISTORY {
                return Err(invalid(
                    format!("room[{i}].history"),
                    format!("at most {MAX_HISTORY} messages per room"),
                ));
            }
            if r.history > 0 && r.history_ttl_secs == Some(0) {
                return Err(invalid(
                    format!("room[{i}].history_ttl_secs"),
                    "must be positive when history is kept",
                ));
            }
            Ok(RoomPolicy {
                pattern: Pattern::new(&r.pattern),
                presence_events: r.presence_events,
                history: r.history,
                history_ttl: r
                    .history_ttl_secs
                    .map_or(RoomPolicy::fallback().history_ttl, Duration::from_secs),
            })
        })
        .collect()
}

/// A path from the file: relative paths are relative to the file's directory.
fn resolve(base: &Path, path: std::path::PathBuf) -> std::path::PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}
