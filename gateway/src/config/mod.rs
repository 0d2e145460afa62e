//! The configuration file and its validation (CONFIG.md). Every error names the key.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gateway_core::{
    auth::JwtConfig,
    policy::{AuthMode, EndpointPolicy, RoomPolicies},
};

mod file;
mod validate;

pub use crate::jwks::JwksConfig;
pub use file::LogFormat;

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name the system resolves.
///
/// For example `localhost:4433`; the first address it gives is used.
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
    #[error("{}{message}", file_prefix(path))]
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

/// `path: ` before a message about a file, nothing for text that came from no file.
fn file_prefix(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{}: ", path.display())
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
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

/// The Redis of cluster mode (`[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (`redis`).
    Single(String),
    /// A Redis Cluster, by its seed nodes (`redis_cluster`).
    Cluster(Vec<String>),
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// The filter (`info`, `gateway=debug,access=info`); `GATEWAY_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
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
    /// Bytes all rooms and their histories may hold together.
    pub room_budget: usize,
    /// New rooms one user may bring into existence per second (burst twice); 0: no limit.
    pub rooms_per_user_per_sec: u32,
    /// Most members a presence listing names.
    pub max_presence_members: usize,
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
    /// Whether every TCP connection starts with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
    /// Log format and level.
    pub log: LogConfig,
    /// The drain window.
    ///
    /// Reconnect hints are spread over it, and shutdown waits at most this long for
    /// sessions to go.
    pub drain: Duration,
    /// Certificate source.
    pub tls: TlsSource,
    /// JWT verification, when `[auth]` is present.
    pub jwt: Option<JwtConfig>,
    /// The JWK Set the JWT keys come from, when `[auth] jwks_url` is set.
    pub jwks: Option<JwksConfig>,
    /// Lifetime of one-time tickets.
    pub ticket_ttl: Duration,
    /// Server API bearer key.
    pub api_key: Option<String>,
    /// Connection limits.
    pub limits: Limits,
    /// The Redis the cluster goes through, in cluster mode.
    pub redis: Option<RedisTarget>,
    /// How often this node refreshes its liveness in Redis.
    ///
    /// A dead node's presence goes within three of these.
    pub cluster_heartbeat: Duration,
    /// Endpoints by path.
    pub endpoints: Vec<Arc<EndpointPolicy>>,
    /// The `[endpoint.upstream]` clients, by endpoint path.
    pub upstreams: Vec<(String, UpstreamConfig)>,
    /// Room policies.
    pub rooms: RoomPolicies,
    /// Whether this is the built-in dev configuration.
    pub dev_mode: bool,
}

/// How the gateway calls one endpoint's backend (`[endpoint.upstream]`).
///
/// Its `Debug` output leaves the secret out.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Each event is POSTed to this URL plus `/EVENT`.
    pub url: reqwest::Url,
    /// The deadline of one call.
    pub timeout: Duration,
    /// Calls outstanding at once; more fail at once.
    pub max_in_flight: usize,
    /// Request headers passed to `connect`.
    pub forward_headers: Vec<http::HeaderName>,
    /// Sent as `Authorization: Bearer <secret>`.
    pub secret: Option<String>,
    /// Failures in a row that open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit fails calls at once.
    pub breaker_open: Duration,
}

/// A URL without its user and password.
fn redacted(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &redacted(&self.url))
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("forward_headers", &self.forward_headers)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_open", &self.breaker_open)
            .finish()
    }
}

impl UpstreamConfig {
    /// The documented defaults (CONFIG.md) for `url`.
    pub fn defaults(url: reqwest::Url) -> Self {
        Self {
            url,
            timeout: Duration::from_millis(2000),
            max_in_flight: 512,
            forward_headers: Vec::new(),
            secret: None,
            breaker_failures: 10,
            breaker_open: Duration::from_secs(5),
        }
    }

    /// The URL an `event` is POSTed to.
    pub fn event_url(&self, event: gateway_core::upstream::CallEvent) -> reqwest::Url {
        let mut url = self.url.clone();
        let path = format!("{}/{}", url.path().trim_end_matches('/'), event.as_str());
        url.set_path(&path);
        url
    }
}

impl Config {
    /// The built-in development configuration.
    ///
    /// It listens on loopback, with the dev certificate in `.gateway/` and endpoint `/chat`
    /// with `auth = "none"`.
    pub fn dev() -> Self {
        let mut chat = EndpointPolicy::new("/chat");
        chat.auth = AuthMode::None;
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            node_id: random_node_id(),
            webtransport: true,
            proxy_protocol: false,
            log: LogConfig::default(),
            drain: Duration::from_secs(10),
            tls: TlsSource::Dev(PathBuf::from(".gateway")),
            jwt: None,
            jwks: None,
            ticket_ttl: Duration::from_secs(30),
            api_key: None,
            limits: Limits::default(),
            redis: None,
            cluster_heartbeat: DEFAULT_CLUSTER_HEARTBEAT,
            endpoints: vec![Arc::new(chat)],
            upstreams: Vec::new(),
            rooms: RoomPolicies::default(),
            dev_mode: true,
        }
    }

    /// Reads and validates a configuration file.
    ///
    /// Relative paths in it are relative to the file's directory.
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
        let file = parse_file(text)?;
        let (jwt, jwks, ticket_ttl) = validate::auth(file.auth, base)?;
        let (endpoints, upstreams) = validate::endpoints(file.endpoints, jwt.is_some())?
            .into_iter()
            .map(|(policy, upstream)| {
                let path = policy.path.clone();
                (policy, upstream.map(|u| (path, u)))
            })
            .unzip::<_, _, Vec<_>, Vec<_>>();
        Ok(Self {
            listen: validate::listen(file.listen.as_deref())?,
            node_id: file.node_id.unwrap_or_else(random_node_id),
            webtransport: file.webtransport,
            proxy_protocol: file.proxy_protocol,
            log: validate::log(file.log)?,
            drain: Duration::from_secs(file.shutdown.drain_secs.get()),
            tls: validate::tls(file.tls, base)?,
            endpoints,
            upstreams: upstreams.into_iter().flatten().collect(),
            jwt,
            jwks,
            ticket_ttl,
            api_key: file.api.key,
            limits: validate::limits(file.limits),
            redis: validate::redis(file.cluster.redis, file.cluster.redis_cluster)?,
            cluster_heartbeat: Duration::from_secs(file.cluster.heartbeat_secs.get()),
            rooms: RoomPolicies(validate::rooms(file.rooms)?),
            dev_mode: false,
        })
    }
}

/// Deserializes the file's types.
///
/// An error names the key it is about (`endpoint[0].auth`) and the line.
fn parse_file(text: &str) -> Result<file::File, ConfigError> {
    let parse_error = |key: String, e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| format!(" (line {})", text[..span.start].matches('\n').count() + 1))
            .unwrap_or_default();
        let message = if key == "." {
            e.to_string().trim_end().replace('\n', " ")
        } else {
            format!("{key}: {}{line}", e.message().trim_end())
        };
        ConfigError::Parse {
            path: PathBuf::new(),
            message,
        }
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| parse_error(".".into(), e))?;
    serde_path_to_error::deserialize(deserializer)
        .map_err(|e| parse_error(e.path().to_string(), e.into_inner()))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 1000,
            max_connections_per_user: 100,
            handshake_timeout: Duration::from_secs(10),
            room_budget: gateway_core::hub::DEFAULT_ROOM_BUDGET,
            rooms_per_user_per_sec: gateway_core::hub::DEFAULT_ROOMS_PER_USER_PER_SEC,
            max_presence_members: gateway_core::presence::DEFAULT_MAX_PRESENCE_MEMBERS,
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
        assert_eq!(e.queue_bytes, 1024 * 1024);
        assert_eq!(
            (
                c.limits.room_budget,
                c.limits.rooms_per_user_per_sec,
                c.limits.max_presence_members
            ),
            (256 * 1024 * 1024, 10, 1000)
        );
        // A larger message size raises the default byte bound to two messages.
        let big =
            parse("[[endpoint]]\npath = \"/a\"\nauth = \"none\"\nmax_message_bytes = 1048576\n")
                .unwrap();
        assert_eq!(big.endpoints[0].queue_bytes, 2 * 1024 * 1024);
        let set = parse("[limits]\nroom_budget_mb = 2\nrooms_per_user_per_sec = 0\nmax_presence_members = 5\n[[endpoint]]\npath = \"/a\"\nauth = \"none\"\nqueue_bytes = 4096\n").unwrap();
        assert_eq!(set.endpoints[0].queue_bytes, 4096);
        assert_eq!(
            (
                set.limits.room_budget,
                set.limits.rooms_per_user_per_sec,
                set.limits.max_presence_members
            ),
            (2 * 1024 * 1024, 0, 5)
        );
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
            ("[[endpoint]]\nauth=\"none\"", "endpoint[0]: missing field `path`"),
            ("[log]\nformat=\"xml\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "log.format: unknown variant `xml`"),
            ("[log]\nlevel=\"info,[\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "log.level"),
            ("[shutdown]\ndrain_secs=0\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "shutdown.drain_secs"),
            ("proxy_protocol=\"yes\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "proxy_protocol"),
            ("[cluster]\nheartbeat_secs=0\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "cluster.heartbeat_secs"),
            ("[limits]\nmax_connections=0\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "limits.max_connections: invalid value: integer `0`"),
            ("[cluster]\nredis=\"redis://a:1\"\nredis_cluster=[\"redis://b:1\"]\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "cluster.redis_cluster: set either"),
            ("[cluster]\nredis_cluster=[]\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "cluster.redis_cluster: at least one"),
            ("[cluster]\nredis_cluster=[\"http://b:1\"]\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "cluster.redis_cluster: `http://b:1` is not a redis:// URL"),
            ("[cluster]\nredis=\"nope\"\n[[endpoint]]\npath=\"/a\"\nauth=\"none\"", "cluster.redis: `nope`"),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn operations_keys_are_read() {
        let c = parse(&format!(
            "proxy_protocol = true\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\
             [shutdown]\ndrain_secs = 3\n{MINIMAL}"
        ))
        .unwrap();
        assert!(c.proxy_protocol);
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Json, "debug")
        );
        assert_eq!(c.drain, Duration::from_secs(3));
        let d = parse(MINIMAL).unwrap();
        assert!(!d.proxy_protocol);
        assert_eq!(
            (d.log.format, d.log.level.as_str()),
            (LogFormat::Text, "info")
        );
        assert_eq!(d.drain, Duration::from_secs(10));
    }

    #[test]
    fn one_redis_or_a_redis_cluster() {
        let c = parse(&format!("[cluster]\nredis = \"redis://r:6379\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.redis, Some(RedisTarget::Single("redis://r:6379".into())));
        let c = parse(&format!(
            "[cluster]\nredis_cluster = [\"redis://a:7000\", \"redis://b:7000\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.redis,
            Some(RedisTarget::Cluster(vec![
                "redis://a:7000".into(),
                "redis://b:7000".into()
            ]))
        );
        assert_eq!(parse(MINIMAL).unwrap().redis, None);
    }

    #[test]
    fn auth_claims_and_max_token_lifetime_are_read() {
        let auth = "[auth]\nsecret = \"0123456789abcdef0123\"\n";
        let endpoint = "[[endpoint]]\npath = \"/a\"\n";
        let c = parse(&format!(
            "{auth}issuer = \"https://i\"\naudience = \"gw\"\nmax_token_lifetime_secs = 86400\n{endpoint}"
        ))
        .unwrap();
        let jwt = c.jwt.unwrap();
        assert_eq!(jwt.max_lifetime_secs, Some(86400));
        assert_eq!(
            (jwt.issuer.as_deref(), jwt.audience.as_deref()),
            (Some("https://i"), Some("gw"))
        );
        let c = parse(&format!("{auth}{endpoint}")).unwrap();
        assert_eq!(c.jwt.unwrap().max_lifetime_secs, None, "absent: no maximum");
        let e = parse(&format!("{auth}max_token_lifetime_secs = 0\n{endpoint}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.max_token_lifetime_secs"), "{e}");
        let e = parse(&format!("{auth}max_token_lifetime_secs = -1\n{endpoint}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.max_token_lifetime_secs"), "{e}");
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
