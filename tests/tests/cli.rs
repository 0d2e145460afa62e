//! The real `gateway` binary: dev mode, listener lines, `check-config`, `certs dev`.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use gateway_tests::*;
use serde_json::json;

struct Running(
    Child,
    #[allow(dead_code)] Option<BufReader<std::process::ChildStdout>>,
);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and reads its listener lines until the dev-certificate line (or the
/// TCP line when `until_tcp`).
fn start(args: &[&str], cwd: &std::path::Path, lines_wanted: usize) -> (Running, Vec<String>) {
    let mut child = Command::new(gateway_binary())
        .args(args)
        .current_dir(cwd)
        .env("GATEWAY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("gateway starts");
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    while lines.len() < lines_wanted {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "gateway exited early: {lines:?}"
        );
        lines.push(line.trim_end().to_owned());
    }
    (Running(child, Some(reader)), lines)
}

fn port_of(line: &str) -> u16 {
    // "listening https+wss on 127.0.0.1:40211 (tcp)"
    let addr = line.split_whitespace().nth(3).unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_wss_with_its_printed_certificate() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let (_gw, lines) = start(&["--listen", "127.0.0.1:0"], dir.path(), 3);
        assert!(
            lines[0].starts_with("listening https+wss on 127.0.0.1:"),
            "{lines:?}"
        );
        assert!(lines[0].ends_with("(tcp)"));
        // Both listeners share the port number.
        assert!(
            lines[1].starts_with("listening h3+webtransport on 127.0.0.1:"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with("(udp)"));
        assert_eq!(port_of(&lines[0]), port_of(&lines[1]));
        let cert_line = lines
            .iter()
            .find(|l| l.starts_with("dev certificate "))
            .expect("cert line");
        let sha = cert_line
            .split("sha256=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert_eq!(sha.len(), 64);
        let cert = dir.path().join(".gateway/cert.pem");
        assert!(cert.exists());
        let pem = std::fs::read(&cert).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert_eq!(
            gateway_certs::sha256_hex(&der),
            sha,
            "printed hash is the served certificate's"
        );

        let addr = format!("127.0.0.1:{}", port_of(&lines[0])).parse().unwrap();
        let mut a = WsClient::connect(addr, &cert, "/chat", &[]).await.unwrap();
        let mut b = WsClient::connect(addr, &cert, "/chat", &[]).await.unwrap();
        assert_eq!(a.recv().await["type"], "welcome");
        assert_eq!(b.recv().await["type"], "welcome");
        a.join("lobby").await;
        b.join("lobby").await;
        a.recv().await;
        b.send(json!({"type":"publish","room":"lobby","data":"hello from b"}))
            .await;
        assert_eq!(a.recv().await["data"], "hello from b");
    })
    .await;
}

#[tokio::test]
async fn listen_takes_a_host_name() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let (_gw, lines) = start(&["--listen", "localhost:0"], dir.path(), 3);
        // `localhost` resolves to a loopback address, whichever family comes first.
        assert!(
            lines[0].starts_with("listening https+wss on 127.0.0.1:")
                || lines[0].starts_with("listening https+wss on [::1]:"),
            "{lines:?}"
        );
        assert_ne!(port_of(&lines[0]), 0);
    })
    .await;
}

#[test]
fn listen_refuses_what_is_not_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "localhost",
        "localhost:http",
        ":4433",
        "no-such-host.invalid:4433",
    ] {
        let out = Command::new(gateway_binary())
            .args(["--listen", bad])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--listen") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

#[test]
fn dev_mode_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(gateway_binary())
        .args(["--listen", "0.0.0.0:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn check_config_loads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(gateway_binary())
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let check = |cert: &str, key: &str| {
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            format!(
                "[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
                 [[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n"
            ),
        )
        .unwrap();
        Command::new(gateway_binary())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = check("certs/cert.pem", "certs/key.pem");
    assert!(out.status.success(), "{out:?}");
    // A missing certificate, and a key file that holds a certificate.
    for (cert, key, named) in [
        ("certs/missing.pem", "certs/key.pem", "missing.pem"),
        ("certs/cert.pem", "certs/cert.pem", "cert.pem"),
    ] {
        let out = check(cert, key);
        assert_eq!(out.status.code(), Some(1), "{cert} {key}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tls") && err.contains(named), "{err}");
    }
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").unwrap();
    let out = Command::new(gateway_binary())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nqueue_capacty = 5\n",
    )
    .unwrap();
    let out = Command::new(gateway_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("queue_capacty"),
        "{out:?}"
    );
}

#[test]
fn certs_dev_writes_a_certificate_and_prints_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(gateway_binary())
        .args(["certs", "dev", "--out"])
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sha = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sha256="))
        .expect("hash line");
    let pem = std::fs::read(dir.path().join("c/cert.pem")).unwrap();
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    assert_eq!(gateway_certs::sha256_hex(&der), sha);
    assert!(dir.path().join("c/key.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_with_port_zero_prints_the_bound_port() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(
            &file,
            format!("listen = \"127.0.0.1:0\"\n{AUTH_SECTION}[[endpoint]]\npath = \"/secure\"\n"),
        )
        .unwrap();
        let (_gw, lines) = start(&["--config", file.to_str().unwrap()], dir.path(), 1);
        let port = port_of(&lines[0]);
        assert_ne!(port, 0);
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let cert = dir.path().join(".gateway/cert.pem");
        let e = WsClient::connect(addr, &cert, "/secure", &[])
            .await
            .err()
            .unwrap();
        assert_eq!(http_status(&e), Some(401));
        let t = token("zed", 60, json!({}));
        let mut c = WsClient::connect(addr, &cert, &format!("/secure?token={t}"), &[])
            .await
            .unwrap();
        assert_eq!(c.recv().await["user"], "zed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    })
    .await;
}
