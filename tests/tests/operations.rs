//! Operations: the PROXY protocol in front of the TCP listener, and certificate reload (files
//! changed on disk, the reload API, SIGHUP to the real binary) over both transports.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway::cert_reload::{CertReload, Trigger};
use gateway_certs::{CertError, DevCert};
use gateway_tests::{wt::WtClient, *};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const CHAT: &str = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n";

/// A PROXY v1 header for a TCP4 client `ip:port` (written by hand: the test does not use
/// the parser the gateway uses).
fn v1(ip: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {ip} 10.0.0.1 {port} 443\r\n").into_bytes()
}

/// A PROXY v2 header: signature, version 2 and `command`, `family`, length, payload.
fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A v2 `PROXY` header for a TCP over IPv4 client `ip:port`.
fn v2_tcp4(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut payload = ip.to_vec();
    payload.extend([10, 0, 0, 1]);
    payload.extend(port.to_be_bytes());
    payload.extend(443u16.to_be_bytes());
    v2(0x1, 0x11, &payload)
}

/// A v2 `LOCAL` header (a balancer's health check): no client address.
fn v2_local() -> Vec<u8> {
    v2(0x0, 0x00, &[])
}

async fn ping_ws(c: &mut WsClient) {
    let pong = c.request(json!({"type":"ping","id":7})).await;
    assert_eq!(pong, json!({"type":"pong","id":7}));
}

async fn ping_wt(c: &mut WtClient) {
    let pong = c.request(json!({"type":"ping","id":7})).await;
    assert_eq!(pong, json!({"type":"pong","id":7}));
}

/// Waits until the server closes a raw connection (end of stream or reset); panics if it
/// sends anything or stays open past `within`.
async fn expect_closed(tcp: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, tcp.read(&mut buf)).await {
        Err(_) => panic!("the connection stayed open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected a close, got {:?}", &buf[..n]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_address_is_the_one_the_limits_count() {
    within(60, async {
        let gw = TestGateway::start(&format!(
            "proxy_protocol = true\n[limits]\nmax_connections_per_ip = 1\n{CHAT}"
        ))
        .await;
        let connect = |prefix: Vec<u8>| {
            let (addr, cert) = (gw.addr, gw.cert_path.clone());
            async move { WsClient::connect_with_prefix(addr, &cert, "/chat", &[], &prefix).await }
        };
        let welcomed = |mut c: WsClient| async move {
            assert_eq!(c.recv().await["type"], "welcome");
            c
        };
        // Every client below connects from 127.0.0.1; the limit of one per address holds
        // for the addresses their headers carry.
        let mut first = welcomed(connect(v1("203.0.113.7", 51000)).await.unwrap()).await;
        let e = connect(v1("203.0.113.7", 51001))
            .await
            .err()
            .expect("a second connection claiming 203.0.113.7 is refused");
        assert_eq!(http_status(&e), Some(429), "{e}");
        let mut other = welcomed(connect(v2_tcp4([198, 51, 100, 9], 40000)).await.unwrap()).await;
        // LOCAL keeps the socket's own address: 127.0.0.1 has its one slot, then no more.
        let mut local = welcomed(connect(v2_local()).await.unwrap()).await;
        let e = connect(v2_local())
            .await
            .err()
            .expect("a second LOCAL connection from 127.0.0.1 is refused");
        assert_eq!(http_status(&e), Some(429), "{e}");
        for c in [&mut first, &mut other, &mut local] {
            ping_ws(c).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_proxy_header_are_closed() {
    within(60, async {
        let timeout = Duration::from_secs(5);
        let gw = TestGateway::start(&format!(
            "proxy_protocol = true\n[limits]\nhandshake_timeout_secs = {}\n{CHAT}",
            timeout.as_secs()
        ))
        .await;
        // Closed as soon as the bytes show they are no header, well before the timeout.
        let at_once = timeout / 2;
        let started = Instant::now();
        let e = gw
            .ws("/chat")
            .await
            .err()
            .expect("a direct TLS client is refused");
        assert!(started.elapsed() < at_once, "{e}: {:?}", started.elapsed());
        let mut bad_version = v2_tcp4([203, 0, 113, 7], 1);
        bad_version[12] = 0x11;
        let mut huge = v2_tcp4([203, 0, 113, 7], 1);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let cases: [(&str, Vec<u8>); 6] = [
            (
                "v1 without addresses",
                b"PROXY TCP4 203.0.113.7\r\n".to_vec(),
            ),
            ("v1 with a bad address", v1("203.0.113.777", 1)),
            (
                "v1 without CRLF",
                [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
            ),
            ("v2 version 1", bad_version),
            ("v2 of 65535 bytes", huge),
            (
                "plain HTTP",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ),
        ];
        for (name, bytes) in cases {
            let started = Instant::now();
            let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
            tcp.write_all(&bytes).await.unwrap();
            expect_closed(&mut tcp, at_once).await;
            assert!(
                started.elapsed() < at_once,
                "{name}: {:?}",
                started.elapsed()
            );
        }
        // A malformed header followed by TLS: no handshake either.
        let e = WsClient::connect_with_prefix(
            gw.addr,
            &gw.cert_path,
            "/chat",
            &[],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1\r\n",
        )
        .await
        .err()
        .expect("refused");
        assert!(http_status(&e).is_none(), "{e}");
        // Nothing at all: closed at the handshake timeout.
        let started = Instant::now();
        let mut silent = TcpStream::connect(gw.addr).await.unwrap();
        expect_closed(&mut silent, timeout * 3).await;
        let waited = started.elapsed();
        assert!(waited >= timeout - Duration::from_millis(100), "{waited:?}");
        // The listener still serves a client that sends its header.
        let mut c = WsClient::connect_with_prefix(
            gw.addr,
            &gw.cert_path,
            "/chat",
            &[],
            &v1("203.0.113.7", 5),
        )
        .await
        .unwrap();
        assert_eq!(c.recv().await["type"], "welcome");
    })
    .await;
}

/// A certificate and key file pair, and what clients trusting one certificate need.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new(dir: &Path) -> Self {
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn write(&self, c: &DevCert) {
        std::fs::write(&self.cert, &c.cert_pem).unwrap();
        std::fs::write(&self.key, &c.key_pem).unwrap();
    }
}

/// A certificate a client trusts: its PEM file (wss) and SHA-256 (WebTransport).
struct Trusted {
    pem: PathBuf,
    sha256: String,
}

impl Trusted {
    fn of(dir: &Path, name: &str, c: &DevCert) -> Self {
        let pem = dir.join(format!("trust-{name}.pem"));
        std::fs::write(&pem, &c.cert_pem).unwrap();
        Self {
            pem,
            sha256: c.sha256.clone(),
        }
    }
}

/// New connections on both transports: those trusting `served` get a session, those
/// trusting only `old` fail their handshake.
async fn assert_serves(tcp: std::net::SocketAddr, udp_port: u16, served: &Trusted, old: &Trusted) {
    let mut ws = WsClient::connect(tcp, &served.pem, "/chat", &[])
        .await
        .expect("wss trusting the new certificate");
    assert_eq!(ws.recv().await["type"], "welcome");
    let e = WsClient::connect(tcp, &old.pem, "/chat", &[])
        .await
        .err()
        .expect("wss trusting only the old certificate fails");
    assert!(e.to_string().contains("certificate"), "{e}");
    let mut wt = WtClient::connect(udp_port, &served.sha256, "/chat")
        .await
        .expect("WebTransport trusting the new certificate");
    assert_eq!(wt.recv().await["type"], "welcome");
    assert!(
        WtClient::connect(udp_port, &old.sha256, "/chat")
            .await
            .is_err(),
        "WebTransport trusting only the old certificate fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_served_to_new_connections() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let files = CertFiles::new(dir.path());
        files.write(&a);
        let (trust_a, trust_b) = (
            Trusted::of(dir.path(), "a", &a),
            Trusted::of(dir.path(), "b", &b),
        );
        let gw = TestGateway::start_with_tls(CHAT, &files.cert, &files.key).await;
        let server = gw.server.as_ref().unwrap();
        let mut ws_a = WsClient::connect(gw.addr, &trust_a.pem, "/chat", &[])
            .await
            .unwrap();
        assert_eq!(ws_a.recv().await["type"], "welcome");
        let mut wt_a = WtClient::connect(gw.udp_port(), &trust_a.sha256, "/chat")
            .await
            .unwrap();
        assert_eq!(wt_a.recv().await["type"], "welcome");

        // The files change; the gateway notices by itself (it polls every 2 s and loads a
        // change once it has held still for one poll).
        files.write(&b);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tls_connect(gw.addr, &trust_b.pem).await.is_err() {
            assert!(Instant::now() < deadline, "the new files were not loaded");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_serves(gw.addr, gw.udp_port(), &trust_b, &trust_a).await;
        ping_ws(&mut ws_a).await;
        ping_wt(&mut wt_a).await;

        // B's certificate with A's key, then garbage: refused, B stays.
        std::fs::write(&files.key, &a.key_pem).unwrap();
        let e = server.reload_certificate(Trigger::Request).unwrap_err();
        assert!(matches!(e.source, CertError::KeyMismatch), "{e}");
        let text = e.to_string();
        assert!(text.contains(&*files.cert.to_string_lossy()), "{text}");
        assert!(text.contains(&*files.key.to_string_lossy()), "{text}");
        std::fs::write(&files.cert, "garbage").unwrap();
        let e = server.reload_certificate(Trigger::Request).unwrap_err();
        assert!(matches!(e.source, CertError::NoCertificate(_)), "{e}");
        assert_serves(gw.addr, gw.udp_port(), &trust_b, &trust_a).await;

        // A good pair again, through the API.
        files.write(&a);
        assert_eq!(
            server.reload_certificate(Trigger::Request).unwrap(),
            CertReload::Replaced {
                sha256: a.sha256.clone()
            }
        );
        assert_serves(gw.addr, gw.udp_port(), &trust_a, &trust_b).await;
        ping_ws(&mut ws_a).await;
        ping_wt(&mut wt_a).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_does_nothing_with_a_dev_certificate() {
    within(30, async {
        let gw = TestGateway::start(CHAT).await;
        let server = gw.server.as_ref().unwrap();
        assert_eq!(
            server.reload_certificate(Trigger::Request).unwrap(),
            CertReload::DevCertificate
        );
        gw.ws_welcomed("/chat").await;
    })
    .await;
}

/// The real binary, with its stderr (the log) collected line by line.
struct LoggedGateway {
    child: Child,
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl LoggedGateway {
    /// Starts `gateway --config config` (listening on port 0) and waits for both listener
    /// lines on stdout.
    async fn start(config: &Path) -> Self {
        let mut child = Command::new(gateway_binary())
            .arg("--config")
            .arg(config)
            .env("GATEWAY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("gateway: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let tcp = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut tcp = None;
            loop {
                let mut line = String::new();
                assert!(reader.read_line(&mut line).unwrap() > 0, "gateway exited");
                if let Some(rest) = line.strip_prefix("listening https+wss on ") {
                    tcp = rest.split_whitespace().next().map(str::to_owned);
                }
                if line.starts_with("listening h3+webtransport on ") {
                    break;
                }
            }
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            tcp.expect("TCP listener line")
        })
        .await
        .unwrap();
        Self {
            child,
            addr: tcp.parse().unwrap(),
            log,
        }
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// The first log line after the first `skip` that satisfies `matches` (waits for it).
    async fn log_line(&self, skip: usize, matches: impl Fn(&str) -> bool) -> (usize, String) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some((i, line)) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, l)| matches(l))
            {
                return (i + 1, line.clone());
            }
            assert!(Instant::now() < deadline, "no such log line");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LoggedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file in `dir` serving `cert.pem` and `key.pem` from there, with `extra` on top.
fn config_file(dir: &Path, extra: &str) -> PathBuf {
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\n{extra}\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n{CHAT}"
        ),
    )
    .unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    within(180, async {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let files = CertFiles::new(dir.path());
        files.write(&a);
        let (trust_a, trust_b) = (
            Trusted::of(dir.path(), "a", &a),
            Trusted::of(dir.path(), "b", &b),
        );
        let gw = LoggedGateway::start(&config_file(dir.path(), "")).await;
        let port = gw.addr.port();
        let mut ws_a = WsClient::connect(gw.addr, &trust_a.pem, "/chat", &[])
            .await
            .unwrap();
        assert_eq!(ws_a.recv().await["type"], "welcome");
        let mut wt_a = WtClient::connect(port, &trust_a.sha256, "/chat")
            .await
            .unwrap();
        assert_eq!(wt_a.recv().await["type"], "welcome");

        files.write(&b);
        gw.hangup();
        let (seen, line) = gw
            .log_line(0, |l| {
                l.contains("certificate reloaded") && l.contains("SIGHUP")
            })
            .await;
        assert!(line.contains(&b.sha256), "{line}");
        assert_serves(gw.addr, port, &trust_b, &trust_a).await;
        ping_ws(&mut ws_a).await;
        ping_wt(&mut wt_a).await;

        // A's key with B's certificate: one warning naming the files and the reason.
        std::fs::write(&files.key, &a.key_pem).unwrap();
        gw.hangup();
        let (_, line) = gw.log_line(seen, |l| l.contains("refused")).await;
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("SIGHUP"), "{line}");
        assert!(
            line.contains(&*files.cert.to_string_lossy())
                && line.contains(&*files.key.to_string_lossy()),
            "{line}"
        );
        assert!(line.contains("does not match the certificate"), "{line}");
        assert_serves(gw.addr, port, &trust_b, &trust_a).await;
        ping_ws(&mut ws_a).await;
        ping_wt(&mut wt_a).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_address_from_the_proxy_header() {
    within(180, async {
        let dir = tempfile::tempdir().unwrap();
        let a = DevCert::generate().unwrap();
        CertFiles::new(dir.path()).write(&a);
        let gw = LoggedGateway::start(&config_file(dir.path(), "proxy_protocol = true")).await;
        let mut c = WsClient::connect_with_prefix(
            gw.addr,
            &dir.path().join("cert.pem"),
            "/chat",
            &[],
            &v1("203.0.113.7", 51000),
        )
        .await
        .unwrap();
        assert_eq!(c.recv().await["type"], "welcome");
        let (_, line) = gw.log_line(0, |l| l.contains("session open")).await;
        assert!(line.contains("peer=203.0.113.7:51000"), "{line}");
    })
    .await;
}
