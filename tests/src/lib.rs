//! Test support: a real gateway on an ephemeral port with a fresh dev certificate, and
//! clients that trust that certificate and speak PROTOCOL.md.

pub mod backend;
pub mod both;
pub mod load;
pub mod redis_cluster;
pub mod wt;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use gateway::{Config, Server};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, protocol::frame::coding::CloseCode, Message},
    WebSocketStream,
};

/// HS256 secret used by test configurations with `[auth]`.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// The `[auth]` section matching [`SECRET`].
pub const AUTH_SECTION: &str =
    "[auth]\nalgorithm = \"HS256\"\nsecret = \"test-secret-0123456789abcdef\"\nleeway_secs = 0\n";

/// How long any single wait in a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// The request id of the `ping` that ends an `expect_silence` window.
pub const SILENCE_MARKER: u64 = 9_000_001;

/// Runs a test body with a hard timeout.
pub async fn within<F: Future<Output = T>, T>(secs: u64, f: F) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its time limit")
}

/// A gateway started in-process on 127.0.0.1:0 from a TOML text.
pub struct TestGateway {
    /// The running server.
    pub server: Option<Server>,
    /// Its TCP address.
    pub addr: SocketAddr,
    /// SHA-256 (hex) of its certificate.
    pub cert_sha256: String,
    /// The dev certificate PEM it serves.
    pub cert_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway with `toml` (which must not set `listen`, `node_id` or `[tls]`).
    pub async fn start(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Self::start_server(toml, dir.path()).await;
        Self {
            addr: server.tcp_addr,
            cert_sha256: server
                .dev_cert
                .as_ref()
                .expect("dev certificate")
                .sha256
                .clone(),
            cert_path: server.dev_cert_path.clone().expect("dev certificate"),
            server: Some(server),
            _dir: dir,
        }
    }

    /// Starts a gateway with `toml` (as [`start`](Self::start)) serving the certificate
    /// and key files `cert` and `key` (`[tls]` is appended to `toml`).
    pub async fn start_with_tls(toml: &str, cert: &Path, key: &Path) -> Self {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = format!(
            "{toml}\n[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
        let der = CertificateDer::from_pem_file(cert).expect("certificate file");
        let server = Self::start_server(&toml, dir.path()).await;
        Self {
            addr: server.tcp_addr,
            cert_sha256: gateway_certs::sha256_hex(&der),
            cert_path: cert.to_owned(),
            server: Some(server),
            _dir: dir,
        }
    }

    async fn start_server(toml: &str, dir: &Path) -> Server {
        // Nodes of one cluster need their own ids; a lone node is `test-node`.
        static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let node = if toml.contains("[cluster]") {
            let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("test-node-{}-{n}", std::process::id())
        } else {
            "test-node".to_owned()
        };
        let text = format!("listen = \"127.0.0.1:0\"\nnode_id = \"{node}\"\n{toml}");
        let config = Config::from_toml(&text, dir).expect("valid test config");
        Server::start(config).await.expect("gateway starts")
    }

    /// Opens a WebTransport session and message stream on `path`.
    pub async fn wt(&self, path: &str) -> Result<wt::WtClient, web_transport_quinn::ClientError> {
        wt::WtClient::connect(self.udp_port(), &self.cert_sha256, path).await
    }

    /// Opens a WebTransport session and reads its `welcome`.
    pub async fn wt_welcomed(&self, path: &str) -> (wt::WtClient, Value) {
        let mut c = self.wt(path).await.expect("WebTransport session opens");
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }

    /// The UDP port of the HTTP/3 listener.
    pub fn udp_port(&self) -> u16 {
        self.server
            .as_ref()
            .unwrap()
            .udp_addr
            .expect("WebTransport enabled")
            .port()
    }

    /// `wss://127.0.0.1:PORT{path}`.
    pub fn wss_url(&self, path: &str) -> String {
        format!("wss://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Connects a WebSocket client to `path` (may include a query).
    pub async fn ws(&self, path: &str) -> Result<WsClient, tungstenite::Error> {
        WsClient::connect(self.addr, &self.cert_path, path, &[]).await
    }

    /// Connects with extra request headers.
    pub async fn ws_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, tungstenite::Error> {
        WsClient::connect(self.addr, &self.cert_path, path, headers).await
    }

    /// Connects and reads the `welcome`, returning both.
    pub async fn ws_welcomed(&self, path: &str) -> (WsClient, Value) {
        let mut c = self.ws(path).await.expect("upgrade succeeds");
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }

    /// Sends a raw HTTP/1.1 request over TLS and returns the status and body.
    pub async fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        https_request(self.addr, &self.cert_path, method, path, headers, body)
            .await
            .expect("HTTPS request")
    }
}

/// A rustls client config trusting exactly the PEM certificate at `cert`.
pub fn client_tls(cert: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).expect("cert file") {
        roots.add(c.expect("cert")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection (ALPN http/1.1) to `addr`, trusting `cert`.
pub async fn tls_connect(addr: SocketAddr, cert: &Path) -> anyhow::Result<TlsStream<TcpStream>> {
    tls_connect_with_prefix(addr, cert, &[]).await
}

/// A TLS connection (ALPN http/1.1) to `addr`, trusting `cert`, that first sends `prefix`
/// (a PROXY protocol header) in the clear.
pub async fn tls_connect_with_prefix(
    addr: SocketAddr,
    cert: &Path,
    prefix: &[u8],
) -> anyhow::Result<TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(prefix).await?;
    let connector = TlsConnector::from(client_tls(cert, &[b"http/1.1"]));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    Ok(connector.connect(name, tcp).await?)
}

/// As [`tls_connect`], with the client's receive buffer fixed at `recv_buffer` bytes (set
/// before connecting, so the kernel does not grow it): what a client that stops reading
/// can hold does not depend on the machine's `tcp_rmem`.
pub async fn tls_connect_with_recv_buffer(
    addr: SocketAddr,
    cert: &Path,
    recv_buffer: u32,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_recv_buffer_size(recv_buffer)?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = TlsConnector::from(client_tls(cert, &[b"http/1.1"]));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    Ok(connector.connect(name, tcp).await?)
}

/// A minimal HTTP/1.1 client over TLS (`Connection: close`).
pub async fn https_request(
    addr: SocketAddr,
    cert: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let (head, body) = https_exchange(addr, cert, method, path, headers, body).await?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {head:?}"))?;
    Ok((status, body))
}

/// The response head (status line and headers) of a GET over HTTPS.
pub async fn https_head(addr: SocketAddr, cert: &Path, path: &str) -> anyhow::Result<String> {
    Ok(https_exchange(addr, cert, "GET", path, &[], "").await?.0)
}

/// One request over a fresh TLS connection (`Connection: close`): the response head and body.
pub async fn https_exchange(
    addr: SocketAddr,
    cert: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(addr, cert).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tls.write_all(req.as_bytes()).await?;
    // tokio-rustls may keep encrypted records buffered until flushed.
    tls.flush().await?;
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut raw))
        .await
        .context("response timed out")?
        .ok();
    let text = String::from_utf8_lossy(&raw).into_owned();
    Ok(match text.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_owned(), body.to_owned()),
        None => (text, String::new()),
    })
}

/// A QUIC client endpoint speaking ALPN h3 and trusting exactly the PEM certificate `cert`.
pub fn quic_client(cert: &Path) -> anyhow::Result<quinn::Endpoint> {
    let tls = (*client_tls(cert, &[b"h3"])).clone();
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic_tls)));
    Ok(endpoint)
}

/// A plain HTTP/3 GET with the `h3` client (not the gateway's server code); returns the
/// status and body.
pub async fn h3_get(port: u16, cert: &Path, path: &str) -> anyhow::Result<(u16, String)> {
    use bytes::Buf;
    let endpoint = quic_client(cert)?;
    let conn = endpoint
        .connect(format!("127.0.0.1:{port}").parse()?, "127.0.0.1")?
        .await?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
    let drive =
        tokio::spawn(
            async move { futures_util::future::poll_fn(|cx| driver.poll_close(cx)).await },
        );
    let req = http::Request::get(format!("https://127.0.0.1:{port}{path}")).body(())?;
    let mut stream = send.send_request(req).await?;
    // A server may answer before the request is finished and then stop reading it with
    // H3_NO_ERROR (RFC 9114 section 4.1): finishing can then fail while the response
    // stands, so it is read regardless.
    let _ = stream.finish().await;
    let response = stream.recv_response().await?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        while chunk.has_remaining() {
            let c = chunk.chunk();
            body.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    drop(send);
    drive.abort();
    endpoint.close(0u32.into(), b"");
    Ok((
        response.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A WebSocket test client over TLS.
pub struct WsClient {
    /// The stream.
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
}

/// What a client saw at the end of a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code.
    Close(u16, String),
    /// The connection ended without a close frame.
    Dropped,
}

impl WsClient {
    /// Connects to `path` on `addr`, trusting `cert`.
    pub async fn connect(
        addr: SocketAddr,
        cert: &Path,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, tungstenite::Error> {
        Self::connect_with_prefix(addr, cert, path, headers, &[]).await
    }

    /// Connects as [`connect`](Self::connect), sending `prefix` (a PROXY protocol header)
    /// before TLS.
    pub async fn connect_with_prefix(
        addr: SocketAddr,
        cert: &Path,
        path: &str,
        headers: &[(&str, &str)],
        prefix: &[u8],
    ) -> Result<Self, tungstenite::Error> {
        let tls = tls_connect_with_prefix(addr, cert, prefix)
            .await
            .map_err(|e| tungstenite::Error::Io(std::io::Error::other(e.to_string())))?;
        let mut req = format!("wss://127.0.0.1:{}{path}", addr.port())
            .into_client_request()
            .expect("valid URL");
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
        Ok(Self { ws })
    }

    /// Sends a JSON envelope as a text message.
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).await.expect("send");
    }

    /// Sends a binary envelope: `header` (JSON without data) and `payload`.
    pub async fn send_binary(&mut self, header: Value, payload: &[u8]) {
        self.ws
            .send(Message::binary(binary_envelope(&header, payload)))
            .await
            .expect("send");
    }

    /// Next data message (pings are skipped and answered); panics on close or timeout.
    pub async fn next_data(&mut self) -> Message {
        loop {
            let m = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("timed out waiting for a message")
                .expect("stream ended")
                .expect("read error");
            match m {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(c) => panic!("unexpected close {c:?}"),
                m => return m,
            }
        }
    }

    /// Next JSON text envelope.
    pub async fn recv(&mut self) -> Value {
        match self.next_data().await {
            Message::Text(t) => serde_json::from_str(&t).expect("valid JSON from server"),
            other => panic!("expected a text envelope, got {other:?}"),
        }
    }

    /// Sends `v` and returns the next envelope (its reply when nothing else is pending).
    pub async fn request(&mut self, v: Value) -> Value {
        self.send(v).await;
        self.recv().await
    }

    /// Asserts that no data message arrives within `d`, then that the session is still
    /// served: a `ping` sent afterwards is answered by the very next frame (so a window
    /// that was quiet because the session died, or a frame that was merely late, fails).
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
        let marker = self
            .request(json!({"type":"ping","id":SILENCE_MARKER}))
            .await;
        assert_eq!(
            marker,
            json!({"type":"pong","id":SILENCE_MARKER}),
            "after the silence"
        );
    }

    /// Reads until the session ends; data messages before the end are counted.
    pub async fn ending(&mut self) -> (Ending, usize) {
        let mut skipped = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await {
                Err(_) => panic!("session did not end"),
                Ok(None) | Ok(Some(Err(_))) => return (Ending::Dropped, skipped),
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (
                        Ending::Close(u16::from(f.code), f.reason.to_string()),
                        skipped,
                    )
                }
                Ok(Some(Ok(Message::Close(None)))) => {
                    return (
                        Ending::Close(u16::from(CloseCode::Status), String::new()),
                        skipped,
                    )
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(_))) => skipped += 1,
            }
        }
    }

    /// Joins `room` and checks the ack.
    pub async fn join(&mut self, room: &str) -> Value {
        let ack = self
            .request(serde_json::json!({"type": "join", "room": room, "id": 1}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        ack
    }
}

/// Builds a binary envelope.
pub fn binary_envelope(header: &Value, payload: &[u8]) -> Vec<u8> {
    load::wire::envelope(&header.to_string(), payload)
}

/// Splits a binary envelope into its JSON header and payload.
pub fn split_binary(frame: &[u8]) -> anyhow::Result<(Value, Vec<u8>)> {
    if frame.len() < 2 {
        bail!("short binary envelope");
    }
    let n = u16::from_be_bytes([frame[0], frame[1]]) as usize;
    let header = serde_json::from_slice(&frame[2..2 + n])?;
    Ok((header, frame[2 + n..].to_vec()))
}

/// An HS256 token for `sub`, expiring in `exp_in` seconds (negative: already expired),
/// with extra claims merged in.
pub fn token(sub: &str, exp_in: i64, extra: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = serde_json::json!({"sub": sub, "exp": now + exp_in, "iat": now});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The HTTP status of a refused WebSocket upgrade.
pub fn http_status(e: &tungstenite::Error) -> Option<u16> {
    match e {
        tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
        _ => None,
    }
}

/// Path of the `gateway` binary, built on demand.
pub fn gateway_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("gateway");
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "gateway", "--bin", "gateway"])
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the gateway binary failed");
    bin
}

/// The real `gateway` binary running from a config file, for tests that need a process of
/// its own (resident memory, signals, several nodes).
pub struct RunningGateway {
    child: std::process::Child,
    /// Its TCP address (the UDP listener has the same port number).
    pub addr: SocketAddr,
    /// The dev certificate PEM it serves.
    pub cert: PathBuf,
}

impl RunningGateway {
    /// Starts `gateway --config config` in `cwd` (the config must listen on port 0 and use
    /// the dev certificate) and waits for its listener lines.
    pub async fn start(config: &Path, cwd: &Path) -> Self {
        let mut command = std::process::Command::new(gateway_binary());
        command
            .env("GATEWAY_LOG", "warn")
            .stderr(std::process::Stdio::inherit());
        Self::spawn(command, config, cwd).await
    }

    /// As [`start`](Self::start), logging as the config's `[log]` says into the file `log`.
    pub async fn start_logged(config: &Path, cwd: &Path, log: &Path) -> Self {
        let mut command = std::process::Command::new(gateway_binary());
        command
            .env_remove("GATEWAY_LOG")
            .stderr(std::fs::File::create(log).expect("log file"));
        Self::spawn(command, config, cwd).await
    }

    async fn spawn(mut command: std::process::Command, config: &Path, cwd: &Path) -> Self {
        use std::io::BufRead;
        let mut child = command
            .arg("--config")
            .arg(config)
            .current_dir(cwd)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stdout = child.stdout.take().expect("stdout");
        let lines = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut lines = Vec::new();
            while !lines
                .iter()
                .any(|l: &String| l.starts_with("dev certificate "))
            {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                lines.push(line.trim_end().to_owned());
            }
            // Keep draining stdout so the process never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            lines
        })
        .await
        .expect("reader");
        let tcp = lines
            .iter()
            .find(|l| l.starts_with("listening https+wss on "))
            .unwrap_or_else(|| panic!("no listener line in {lines:?}"));
        let addr = tcp.split_whitespace().nth(3).unwrap().parse().unwrap();
        let cert = lines
            .iter()
            .find_map(|l| l.strip_prefix("dev certificate "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|p| cwd.join(p))
            .expect("dev certificate line");
        Self { child, addr, cert }
    }

    /// Writes `body` after a loopback listener line (`127.0.0.1:0`) to `dir/gateway.toml`
    /// and starts the binary from it in `dir`.
    pub async fn start_with(dir: &Path, body: &str) -> Self {
        let config = dir.join("gateway.toml");
        std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{body}")).expect("config");
        Self::start(&config, dir).await
    }

    /// Connects a WebSocket client to `path` and reads its `welcome`.
    pub async fn ws_welcomed(&self, path: &str) -> WsClient {
        let mut c = WsClient::connect(self.addr, &self.cert, path, &[])
            .await
            .expect("upgrade succeeds");
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        c
    }

    /// Resident memory of the process, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        load::proc_stats::rss_kib(self.child.id()).expect("VmRSS of the gateway")
    }

    /// Stops the process.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real `redis-server` on a free loopback port, without persistence, stopped on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    /// Its port.
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self { child: None, port };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its data is gone: it keeps none).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process without ending it (SIGSTOP): it accepts connections and answers
    /// nothing, as a hung Redis does, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (./scripts/test-all.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
