//! Clients nobody here wrote, against the real gateway: Python `websockets` and `aioquic`
//! (WebTransport draft-02, as Chromium speaks it) in one room, and Node `ws`.

use std::{path::Path, process::Command};

use gateway_tests::*;
use serde_json::{json, Value};

fn run(program: &str, script: &Path, args: &[String]) -> Value {
    let output = Command::new(program)
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} runs: {e} (run ./scripts/test-all.sh to install it)")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed: {stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

fn tests_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_and_aioquic_share_a_room() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let args = vec![
            gw.addr.port().to_string(),
            gw.cert_path.display().to_string(),
        ];
        let script = tests_dir().join("interop/clients.py");
        let r = tokio::task::spawn_blocking(move || run("python3", &script, &args))
            .await
            .unwrap();
        assert_eq!(r["wt_status"], 200);
        assert_eq!(r["wt_welcome"]["transport"], "webtransport");
        assert_eq!(r["ws_welcome"]["transport"], "websocket");
        assert_eq!(r["wt_join"]["members"], 2);
        assert_eq!(r["ws_presence"]["user"], r["wt_welcome"]["user"]);
        assert_eq!(r["wt_publish_ack"], json!({"type":"ack","id":3,"seq":1}));
        assert_eq!(r["ws_got"]["data"], "from aioquic");
        assert_eq!(r["wt_got"]["data"], "from websockets");
        assert_eq!(r["wt_got"]["seq"], 2);
        assert_eq!(r["wt_datagram"]["data"], json!({"x": 1}));
        assert_eq!(r["wt_datagram"]["volatile"], true);
        assert_eq!(r["ws_got_volatile"]["data"], json!({"y": 2}));
        assert_eq!(r["unknown_path_status"], 404);
        assert_eq!(r["ws_unknown_path_status"], 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_client_speaks_text_and_binary_envelopes() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let script = tests_dir().join("js/ws-client.mjs");
        assert!(
            tests_dir().join("js/node_modules/ws").exists(),
            "Node `ws` is missing: run ./scripts/test-all.sh (it runs `npm ci` in tests/js)"
        );
        let args = vec![
            gw.addr.port().to_string(),
            gw.cert_path.display().to_string(),
        ];
        let r = tokio::task::spawn_blocking(move || run("node", &script, &args))
            .await
            .unwrap();
        assert_eq!(r["welcome"]["type"], "welcome");
        assert_eq!(r["join"]["room"], "node");
        let user = r["welcome"]["user"].clone();
        let mut echoed = [r["first"].clone(), r["second"].clone()];
        echoed.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
        assert_eq!(echoed[0], json!({"type":"ack","id":2,"seq":1}));
        assert_eq!(
            echoed[1],
            json!({"type":"message","room":"node","from":user,"seq":1,"data":{"hello":"node"}})
        );
        assert_eq!(
            r["binaryHeader"],
            json!({"type":"message","room":"node","from":user,"seq":2})
        );
        assert_eq!(r["binaryPayload"], json!([1, 2, 3, 250]));
        assert_eq!(r["binaryAck"], json!({"type":"ack","id":3,"seq":2}));
        assert_eq!(r["unknownPath"], "status 404");
        assert_eq!(r["closeCode"], 1000, "the server answers a client's close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_unidirectional_stream_flood_is_rate_limited() {
    within(60, async {
        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 5\nrate_burst = 5\n",
        )
        .await;
        let args = vec![
            gw.addr.port().to_string(),
            gw.cert_path.display().to_string(),
            "40".to_string(),
        ];
        let script = tests_dir().join("interop/uni_flood.py");
        let r = tokio::task::spawn_blocking(move || run("python3", &script, &args))
            .await
            .unwrap();
        assert_eq!(r["welcome"], "welcome", "{r}");
        // Each stream takes a token: about `rate_burst` answers (plus the rate_limited
        // notices), then the session is closed, instead of one queued error per stream.
        assert_eq!(r["close"]["code"], 4008, "{r}");
        let errors = r["errors"].as_u64().unwrap();
        assert!((5..=12).contains(&errors), "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_arrives_before_the_clients_settings_waits_for_them() {
    within(60, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let args = vec![
            gw.addr.port().to_string(),
            gw.cert_path.display().to_string(),
            "0.5".to_string(),
        ];
        let script = tests_dir().join("interop/late_settings.py");
        let r = tokio::task::spawn_blocking(move || run("python3", &script, &args))
            .await
            .unwrap();
        // Not refused while the settings are unknown, accepted once they arrive.
        assert_eq!(r["answered_before_settings"], false, "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["welcome"], "welcome", "{r}");
    })
    .await;
}
