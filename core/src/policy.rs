//! Endpoint and room policies: the per-endpoint and per-room settings the hub enforces.

use std::time::Duration;

use crate::{pattern::Pattern, upstream::UpstreamPolicy};

/// How an endpoint authenticates sessions (CONFIG.md `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A credential must come with the upgrade or CONNECT.
    Required,
    /// As `Required`, but a request without credential opens a pending session.
    ///
    /// The pending session must send `auth` within the auth timeout.
    FirstMessage,
    /// Anonymous sessions; credentials are ignored.
    None,
    /// The endpoint's `connect` upstream decides who the user is (PROTOCOL.md section 10).
    Upstream,
}

/// The settings of one endpoint path.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    /// The path, e.g. `/chat`.
    pub path: String,
    /// Authentication mode.
    pub auth: AuthMode,
    /// Allowed `Origin` values; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    /// Room patterns for identities without a `rooms` claim.
    pub rooms: Vec<Pattern>,
    /// Largest inbound message in bytes.
    pub max_message_bytes: usize,
    /// Rooms one session may be in at once.
    pub max_rooms: usize,
    /// Outbound frames buffered per session before it is a slow consumer.
    pub queue_capacity: usize,
    /// Outbound bytes buffered per session before it is a slow consumer.
    ///
    /// Replays, presence listings and acks are included.
    pub queue_bytes: usize,
    /// Inbound frames per second per session (token bucket refill).
    pub rate_per_sec: u32,
    /// Token bucket size.
    pub rate_burst: u32,
    /// WebSocket ping interval; QUIC keep-alive and idle timeout derive from it.
    pub heartbeat: Duration,
    /// Deadline for the first `auth` frame on `first-message` endpoints.
    pub auth_timeout: Duration,
    /// Test-only: the WebSocket front echoes every message back.
    ///
    /// It does so instead of speaking the protocol (for the Autobahn|Testsuite).
    pub echo: bool,
    /// The application's backend, when `[endpoint.upstream]` is configured.
    pub upstream: Option<UpstreamPolicy>,
}

impl EndpointPolicy {
    /// The documented defaults for `path` (CONFIG.md), with `auth = "required"`.
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            auth: AuthMode::Required,
            allowed_origins: None,
            rooms: vec![Pattern::new("*")],
            max_message_bytes: 65536,
            max_rooms: 128,
            queue_capacity: 1024,
            queue_bytes: 1024 * 1024,
            rate_per_sec: 100,
            rate_burst: 200,
            heartbeat: Duration::from_secs(25),
            auth_timeout: Duration::from_secs(5),
            echo: false,
            upstream: None,
        }
    }

    /// Whether a request with this `Origin` header value may connect.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match (&self.allowed_origins, origin) {
            (None, _) | (_, None) => true,
            (Some(list), Some(origin)) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// Per-room behaviour, chosen by the first pattern that matches the room name.
#[derive(Debug, Clone)]
pub struct RoomPolicy {
    /// Which rooms this applies to.
    pub pattern: Pattern,
    /// Whether members see presence join/leave events.
    pub presence_events: bool,
    /// Messages kept for recovery (0: none).
    pub history: usize,
    /// How long history is kept.
    pub history_ttl: Duration,
}

impl RoomPolicy {
    /// The policy of rooms no configured pattern matches: presence events on, no history.
    pub fn fallback() -> Self {
        Self {
            pattern: Pattern::new("*"),
            presence_events: true,
            history: 0,
            history_ttl: Duration::from_secs(300),
        }
    }
}

/// The ordered list of room policies.
#[derive(Debug, Clone, Default)]
pub struct RoomPolicies(pub Vec<RoomPolicy>);

impl RoomPolicies {
    /// The policy for `room`: the first match, else [`RoomPolicy::fallback`].
    pub fn for_room(&self, room: &str) -> RoomPolicy {
        self.0
            .iter()
            .find(|p| p.pattern.matches(room))
            .cloned()
            .unwrap_or_else(RoomPolicy::fallback)
    }
}
