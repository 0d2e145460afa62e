//! The configuration file and its validation (CONFIG.md). Every error names the key.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gateway_core::{
    auth::{JwtAlgorithm, JwtConfig},
    pattern::Pattern,
    policy::{AuthMode, EndpointPolicy, RoomPolicies, RoomPolicy},
};
use serde::Deserialize;

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name the system resolves
/// (`localhost:4433`; the first address it gives is used).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let not = || format!("`{text}` is not HOST:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(not)?;
    port.parse::<u16>().map_err(|_| not())?;
    if host.is_empty() {
        return Err(not());
    }
    std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("`{text}`: cannot resolve `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{text}`: `{host}` has no address"))
}

/// Default listen address (dev mode and files without `listen`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";

/// `[cluster] heartbeat_secs` when absent.
pub const DEFAULT_CLUSTER_HEARTBEAT: Duration = Duration::from_secs(10);

/// Most messages one room may keep (`[[room]] history`).
const MAX_HISTORY: usize = 100_000;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and key.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `endpoint[1].path`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    node_id: Option<String>,
    webtransport: Option<bool>,
    tls: Option<TlsSection>,
    auth: Option<AuthSection>,
    api: Option<ApiSection>,
    limits: Option<LimitsSection>,
    cluster: Option<ClusterSection>,
    #[serde(default, rename = "endpoint")]
    endpoints: Vec<EndpointSection>,
    #[serde(default, rename = "room")]
    rooms: Vec<RoomSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    algorithm: Option<String>,
    secret: Option<String>,
    public_key: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: Option<u64>,
    ticket_ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_connections_per_user: Option<usize>,
    handshake_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    redis: Option<String>,
    heartbeat_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSection {
    path: Option<String>,
    auth: Option<String>,
    allowed_origins: Option<Vec<String>>,
    rooms: Option<Vec<String>>,
    max_message_bytes: Option<usize>,
    max_rooms: Option<usize>,
    queue_capacity: Option<usize>,
    rate_per_sec: Option<u32>,
    rate_burst: Option<u32>,
    heartbeat_secs: Option<u64>,
    auth_timeout_secs: Option<u64>,
    /// Test-only echo endpoint (Autobahn|Testsuite).
    echo: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomSection {
    pattern: Option<String>,
    presence_events: Option<bool>,
    history: Option<usize>,
    history_ttl_secs: Option<u64>,
}

/// Where the TLS certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// A development certificate generated into (and reused from) this directory.
    Dev(PathBuf),
}

/// Connection limits (CONFIG.md `[limits]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Global maximum of open connections.
    pub max_connections: usize,
    /// Maximum per client IP.
    pub max_connections_per_ip: usize,
    /// Maximum per user.
    pub max_connections_per_user: usize,
    /// TCP accept to upgraded session, TLS included.
    pub handshake_timeout: Duration,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP and UDP listen address.
    pub listen: SocketAddr,
    /// Node id (random when not configured).
    pub node_id: String,
    /// Whether the UDP (HTTP/3, WebTransport) listener runs.
    pub webtransport: bool,
    /// Certificate source.
    pub tls: TlsSource,
    /// JWT verification, when `[auth]` is present.
    pub jwt: Option<JwtConfig>,
    /// Lifetime of one-time tickets.
    pub ticket_ttl: Duration,
    /// Server API bearer key.
    pub api_key: Option<String>,
    /// Connection limits.
    pub limits: Limits,
    /// Redis URL for clustering.
    pub redis: Option<String>,
    /// How often this node refreshes its liveness in Redis; a dead node's presence goes
    /// within three of these.
    pub cluster_heartbeat: Duration,
    /// Endpoints by path.
    pub endpoints: Vec<Arc<EndpointPolicy>>,
    /// Room policies.
    pub rooms: RoomPolicies,
    /// Whether this is the built-in dev configuration.
    pub dev_mode: bool,
}

impl Config {
    /// The built-in development configuration: loopback, dev certificate in `.gateway/`,
    /// endpoint `/chat` with `auth = "none"`.
    pub fn dev() -> Self {
        let mut chat = EndpointPolicy::new("/chat");
        chat.auth = AuthMode::None;
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            node_id: random_node_id(),
            webtransport: true,
            tls: TlsSource::Dev(PathBuf::from(".gateway")),
            jwt: None,
            ticket_ttl: Duration::from_secs(30),
            api_key: None,
            limits: Limits::default(),
            redis: None,
            cluster_heartbeat: DEFAULT_CLUSTER_HEARTBEAT,
            endpoints: vec![Arc::new(chat)],
            rooms: RoomPolicies::default(),
            dev_mode: true,
        }
    }

    /// Reads and validates a configuration file. Relative paths in it are relative to the
    /// file's directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let listen = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = parse_listen(listen).map_err(|message| invalid("listen", message))?;

        let tls = match file.tls {
            None => TlsSource::Dev(base.join(".gateway")),
            Some(TlsSection {
                cert: None,
                key: None,
            }) => TlsSource::Dev(base.join(".gateway")),
            Some(TlsSection {
                cert: Some(cert),
                key: Some(key),
            }) => TlsSource::Files {
                cert: resolve(cert),
                key: resolve(key),
            },
            Some(TlsSection { cert: None, .. }) => {
                return Err(invalid("tls.cert", "required when tls.key is set"))
            }
            Some(TlsSection { key: None, .. }) => {
                return Err(invalid("tls.key", "required when tls.cert is set"))
            }
        };

        let (jwt, ticket_ttl) = match file.auth {
            None => (None, Duration::from_secs(30)),
            Some(a) => {
                let algorithm = match a.algorithm.as_deref().unwrap_or("HS256") {
                    "HS256" => JwtAlgorithm::Hs256,
                    "RS256" => JwtAlgorithm::Rs256,
                    "ES256" => JwtAlgorithm::Es256,
                    other => {
                        return Err(invalid(
                            "auth.algorithm",
                            format!("`{other}` is not one of HS256, RS256, ES256"),
                        ))
                    }
                };
                let key = match algorithm {
                    JwtAlgorithm::Hs256 => {
                        if a.public_key.is_some() {
                            return Err(invalid(
                                "auth.public_key",
                                "not used with HS256; set auth.secret",
                            ));
                        }
                        let secret = a
                            .secret
                            .ok_or_else(|| invalid("auth.secret", "required for HS256"))?;
                        if secret.len() < 16 {
                            return Err(invalid("auth.secret", "must be at least 16 bytes"));
                        }
                        secret.into_bytes()
                    }
                    JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                        if a.secret.is_some() {
                            return Err(invalid(
                                "auth.secret",
                                "not used with RS256/ES256; set auth.public_key",
                            ));
                        }
                        let path = resolve(a.public_key.ok_or_else(|| {
                            invalid("auth.public_key", "required for RS256 and ES256")
                        })?);
                        std::fs::read(&path).map_err(|e| {
                            invalid("auth.public_key", format!("{}: {e}", path.display()))
                        })?
                    }
                };
                let jwt = JwtConfig {
                    algorithm,
                    key,
                    issuer: a.issuer,
                    audience: a.audience,
                    leeway_secs: a.leeway_secs.unwrap_or(30),
                };
                // Fail now, not at the first connection, when the key is unusable.
                let key_field = match algorithm {
                    JwtAlgorithm::Hs256 => "auth.secret",
                    JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => "auth.public_key",
                };
                gateway_core::auth::JwtVerifier::new(&jwt)
                    .map_err(|e| invalid(key_field, e.to_string()))?;
                let ttl = a.ticket_ttl_secs.unwrap_or(30);
                if ttl == 0 {
                    return Err(invalid("auth.ticket_ttl_secs", "must be at least 1"));
                }
                (Some(jwt), Duration::from_secs(ttl))
            }
        };

        let mut limits = Limits::default();
        if let Some(l) = file.limits {
            limits.max_connections = l.max_connections.unwrap_or(limits.max_connections);
            limits.max_connections_per_ip = l
                .max_connections_per_ip
                .unwrap_or(limits.max_connections_per_ip);
            limits.max_connections_per_user = l
                .max_connections_per_user
                .unwrap_or(limits.max_connections_per_user);
            if let Some(t) = l.handshake_timeout_secs {
                if t == 0 {
                    return Err(invalid(
                        "limits.handshake_timeout_secs",
                        "must be at least 1",
                    ));
                }
                limits.handshake_timeout = Duration::from_secs(t);
            }
        }

        if file.endpoints.is_empty() {
            return Err(invalid("endpoint", "at least one [[endpoint]] is required"));
        }
        let mut seen = HashSet::new();
        let mut endpoints = Vec::new();
        for (i, e) in file.endpoints.into_iter().enumerate() {
            let key = |k: &str| format!("endpoint[{i}].{k}");
            let path = e.path.ok_or_else(|| invalid(key("path"), "required"))?;
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                return Err(invalid(key("path"), "must be an absolute path like /chat"));
            }
            if !seen.insert(path.clone()) {
                return Err(invalid(
                    key("path"),
                    format!("`{path}` is configured twice"),
                ));
            }
            let mut p = EndpointPolicy::new(&path);
            p.auth = match e.auth.as_deref().unwrap_or("required") {
                "required" => AuthMode::Required,
                "first-message" => AuthMode::FirstMessage,
                "none" => AuthMode::None,
                other => {
                    return Err(invalid(
                        key("auth"),
                        format!("`{other}` is not one of required, first-message, none"),
                    ))
                }
            };
            if p.auth != AuthMode::None && jwt.is_none() {
                return Err(invalid(
                    key("auth"),
                    "needs an [auth] section to verify tokens",
                ));
            }
            p.allowed_origins = e.allowed_origins;
            if let Some(rooms) = e.rooms {
                p.rooms = rooms.iter().map(|r| Pattern::new(r)).collect();
            }
            let positive = |v: Option<usize>, name: &str, default: usize| match v {
                Some(0) => Err(invalid(key(name), "must be at least 1")),
                Some(v) => Ok(v),
                None => Ok(default),
            };
            p.max_message_bytes = positive(
                e.max_message_bytes,
                "max_message_bytes",
                p.max_message_bytes,
            )?;
            if p.max_message_bytes > 16 * 1024 * 1024 {
                return Err(invalid(key("max_message_bytes"), "must be at most 16 MiB"));
            }
            p.max_rooms = positive(e.max_rooms, "max_rooms", p.max_rooms)?;
            p.queue_capacity = positive(e.queue_capacity, "queue_capacity", p.queue_capacity)?;
            p.rate_per_sec = positive(
                e.rate_per_sec.map(|v| v as usize),
                "rate_per_sec",
                p.rate_per_sec as usize,
            )? as u32;
            p.rate_burst = positive(
                e.rate_burst.map(|v| v as usize),
                "rate_burst",
                p.rate_burst as usize,
            )? as u32;
            p.heartbeat = Duration::from_secs(positive(
                e.heartbeat_secs.map(|v| v as usize),
                "heartbeat_secs",
                p.heartbeat.as_secs() as usize,
            )? as u64);
            p.auth_timeout = Duration::from_secs(positive(
                e.auth_timeout_secs.map(|v| v as usize),
                "auth_timeout_secs",
                p.auth_timeout.as_secs() as usize,
            )? as u64);
            p.echo = e.echo.unwrap_or(false);
            endpoints.push(Arc::new(p));
        }

        let mut rooms = Vec::new();
        for (i, r) in file.rooms.into_iter().enumerate() {
            let pattern = r
                .pattern
                .ok_or_else(|| invalid(format!("room[{i}].pattern"), "required"))?;
            let fallback = RoomPolicy::fallback();
            let history = r.history.unwrap_or(100);
            if history > MAX_HISTORY {
                return Err(invalid(
                    format!("room[{i}].history"),
                    format!("at most {MAX_HISTORY} messages per room"),
                ));
            }
            if history > 0 && r.history_ttl_secs == Some(0) {
                return Err(invalid(
                    format!("room[{i}].history_ttl_secs"),
                    "must be positive when history is kept",
                ));
            }
            rooms.push(RoomPolicy {
                pattern: Pattern::new(&pattern),
                presence_events: r.presence_events.unwrap_or(true),
                history,
                history_ttl: r
                    .history_ttl_secs
                    .map(Duration::from_secs)
                    .unwrap_or(fallback.history_ttl),
            });
        }

        let cluster_heartbeat = match file.cluster.as_ref().and_then(|c| c.heartbeat_secs) {
            Some(0) => return Err(invalid("cluster.heartbeat_secs", "must be positive")),
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_CLUSTER_HEARTBEAT,
        };
        Ok(Self {
            listen,
            node_id: file.node_id.unwrap_or_else(random_node_id),
            webtransport: file.webtransport.unwrap_or(true),
            tls,
            jwt,
            ticket_ttl,
            api_key: file.api.and_then(|a| a.key),
            limits,
            cluster_heartbeat,
            redis: file.cluster.and_then(|c| c.redis),
            endpoints,
            rooms: RoomPolicies(rooms),
            dev_mode: false,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 1000,
            max_connections_per_user: 100,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

fn random_node_id() -> String {
    format!("node-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/gw"))
    }

    const MINIMAL: &str = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:4433");
        assert!(c.webtransport);
        assert!(matches!(c.tls, TlsSource::Dev(ref d) if d == Path::new("/etc/gw/.gateway")));
        let e = &c.endpoints[0];
        assert_eq!(
            (e.max_message_bytes, e.max_rooms, e.queue_capacity),
            (65536, 128, 1024)
        );
        assert_eq!((e.rate_per_sec, e.rate_burst), (100, 200));
        assert_eq!(e.heartbeat, Duration::from_secs(25));
        assert_eq!(c.limits.max_connections_per_user, 100);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("colour = 1\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "unknown field `colour`"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"none\"\nmax_mesage_bytes=1", "unknown field `max_mesage_bytes`"),
            ("listen = \"nowhere\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "listen:"),
            ("[[endpoint]]\npath=\"a\"\nauth=\"none\"", "endpoint[0].path"),
            ("[[endpoint]]\npath=\"/a\"", "endpoint[0].auth: needs an [auth]"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"maybe\"", "endpoint[0].auth"),
            ("[auth]\nalgorithm=\"HS512\"\n[[endpoint]]\npath=\"/a\"", "auth.algorithm"),
            ("[auth]\n[[endpoint]]\npath=\"/a\"", "auth.secret: required"),
            ("[tls]\ncert=\"c.pem\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "tls.key"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"none\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "endpoint[1].path"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"none\"\nqueue_capacity=0", "endpoint[0].queue_capacity"),
            ("", "endpoint: at least one"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"none\"\n[[room]]\npattern=\"*\"\nhistory=100001", "room[0].history"),
            ("[[endpoint]]\npath=\"/a\"\nauth=\"none\"\n[[room]]\npattern=\"*\"\nhistory_ttl_secs=0", "room[0].history_ttl_secs"),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn relative_tls_paths_resolve_against_the_file() {
        let c = parse(
            "[tls]\ncert=\"c.pem\"\nkey=\"/abs/k.pem\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"",
        )
        .unwrap();
        match c.tls {
            TlsSource::Files { cert, key } => {
                assert_eq!(cert, Path::new("/etc/gw/c.pem"));
                assert_eq!(key, Path::new("/abs/k.pem"));
            }
            other => panic!("{other:?}"),
        }
    }
}
