//! Headless Chromium (Debian `chromium`, driven by Playwright) against the real gateway:
//! a WebTransport session trusted through `serverCertificateHashes` and a wss connection
//! trusted through the SPKI hash chat in the same room.

use std::{path::Path, process::Command};

use gateway_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_webtransport_and_wss_and_they_chat() {
    within(120, async {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
        assert!(
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core is missing: run ./scripts/test-all.sh (it runs `npm ci` in tests/js)"
        );
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let spki = gw
            .server
            .as_ref()
            .unwrap()
            .dev_cert
            .as_ref()
            .unwrap()
            .spki_sha256
            .clone();
        let port = gw.addr.port().to_string();
        let sha = gw.cert_sha256.clone();
        let output = tokio::task::spawn_blocking(move || {
            Command::new("node")
                .arg("smoke.mjs")
                .args([&port, &sha, &spki])
                .current_dir(&dir)
                .output()
                .expect("node runs (is Node.js installed?)")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "browser smoke failed: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
        assert_eq!(r["welcome"]["type"], "welcome");
        assert_eq!(r["welcome"]["transport"], "webtransport");
        assert_eq!(r["joinAck"]["type"], "ack");
        assert_eq!(r["joinAck"]["room"], "browser");
        assert_eq!(r["wsWelcome"]["transport"], "websocket");
        assert_eq!(r["presence"]["event"], "join");
        assert_eq!(r["presence"]["user"], r["wsWelcome"]["user"]);
        assert_eq!(r["fromWs"]["data"], "from wss");
        assert_eq!(r["fromWs"]["from"], r["wsWelcome"]["user"]);
        assert_eq!(r["fromWt"]["data"], "from webtransport");
        assert_eq!(r["fromWt"]["from"], r["welcome"]["user"]);
    })
    .await;
}
