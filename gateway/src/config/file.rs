//! The configuration file as serde types (CONFIG.md "File").
//!
//! The types give the shape, enums and positivity of every key. What needs more than a type
//! (a key that requires another, a file that must load) is checked in [`super::validate`].

use std::{
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    path::PathBuf,
};

use serde::Deserialize;

/// The whole file. Unknown keys are errors in every section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub listen: Option<String>,
    pub node_id: Option<String>,
    #[serde(default = "yes")]
    pub webtransport: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub shutdown: ShutdownSection,
    pub tls: Option<TlsSection>,
    pub auth: Option<AuthSection>,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointSection>,
    #[serde(default, rename = "room")]
    pub rooms: Vec<RoomSection>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    pub level: Option<String>,
}

/// `[log] format`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[shutdown]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShutdownSection {
    #[serde(default = "default_drain_secs")]
    pub drain_secs: NonZeroU64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            drain_secs: default_drain_secs(),
        }
    }
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthSection {
    #[serde(default)]
    pub algorithm: Algorithm,
    pub secret: Option<String>,
    pub public_key: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    #[serde(default = "default_ticket_ttl_secs")]
    pub ticket_ttl_secs: NonZeroU64,
    pub max_token_lifetime_secs: Option<NonZeroU64>,
    pub jwks_url: Option<String>,
    pub jwks_refresh_secs: Option<NonZeroU64>,
    pub jwks_ca: Option<PathBuf>,
}

/// `[auth] algorithm`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) enum Algorithm {
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
    #[serde(rename = "EdDSA")]
    EdDsa,
}

/// `[api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiSection {
    pub key: Option<String>,
}

/// `[limits]`; absent keys take the defaults of [`super::Limits`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsSection {
    pub max_connections: Option<NonZeroUsize>,
    pub max_connections_per_ip: Option<NonZeroUsize>,
    pub max_connections_per_user: Option<NonZeroUsize>,
    pub handshake_timeout_secs: Option<NonZeroU64>,
    pub room_budget_mb: Option<NonZeroUsize>,
    pub rooms_per_user_per_sec: Option<u32>,
    pub max_presence_members: Option<NonZeroUsize>,
}

/// `[cluster]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    pub redis: Option<String>,
    pub redis_cluster: Option<Vec<String>>,
    #[serde(default = "default_cluster_heartbeat_secs")]
    pub heartbeat_secs: NonZeroU64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            redis: None,
            redis_cluster: None,
            heartbeat_secs: default_cluster_heartbeat_secs(),
        }
    }
}

/// One `[[endpoint]]`; absent limits take the defaults of `EndpointPolicy::new`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointSection {
    pub path: String,
    #[serde(default)]
    pub auth: AuthMode,
    pub allowed_origins: Option<Vec<String>>,
    pub rooms: Option<Vec<String>>,
    pub max_message_bytes: Option<NonZeroUsize>,
    pub max_rooms: Option<NonZeroUsize>,
    pub queue_capacity: Option<NonZeroUsize>,
    pub queue_bytes: Option<NonZeroUsize>,
    pub rate_per_sec: Option<NonZeroU32>,
    pub rate_burst: Option<NonZeroU32>,
    pub heartbeat_secs: Option<NonZeroU64>,
    pub auth_timeout_secs: Option<NonZeroU64>,
    /// Test-only echo endpoint (Autobahn|Testsuite).
    #[serde(default)]
    pub echo: bool,
    pub upstream: Option<UpstreamSection>,
}

/// `[endpoint.upstream]`: the application's backend (PROTOCOL.md section 10).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamSection {
    pub url: String,
    pub events: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub timeout_ms: Option<NonZeroU64>,
    pub max_in_flight: Option<NonZeroUsize>,
    #[serde(default)]
    pub forward_headers: Vec<String>,
    pub secret: Option<String>,
    pub breaker_failures: Option<std::num::NonZeroU32>,
    pub breaker_secs: Option<NonZeroU64>,
}

/// `[[endpoint]] auth`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum AuthMode {
    #[default]
    Required,
    FirstMessage,
    None,
    Upstream,
}

/// One `[[room]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RoomSection {
    pub pattern: String,
    #[serde(default = "yes")]
    pub presence_events: bool,
    #[serde(default = "default_history")]
    pub history: usize,
    pub history_ttl_secs: Option<u64>,
}

fn yes() -> bool {
    true
}

fn default_drain_secs() -> NonZeroU64 {
    NonZeroU64::new(10).expect("positive")
}

fn default_leeway_secs() -> u64 {
    30
}

fn default_ticket_ttl_secs() -> NonZeroU64 {
    NonZeroU64::new(30).expect("positive")
}

fn default_cluster_heartbeat_secs() -> NonZeroU64 {
    NonZeroU64::new(super::DEFAULT_CLUSTER_HEARTBEAT.as_secs()).expect("positive")
}

fn default_history() -> usize {
    100
}
