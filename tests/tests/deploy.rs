//! The files in `deploy/`: the production config passes `check-config`, the dashboard only
//! queries metrics the gateway exposes, and the systemd unit has what the README promises.

use std::{collections::BTreeSet, path::Path, process::Command};

use gateway_tests::*;
use serde_json::Value;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_production_config_passes_check_config_with_its_files_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let cert = gateway_certs::DevCert::generate().unwrap();
    cert.write(dir.path()).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    // The same file with its three paths pointing at real files here.
    let text = deploy("gateway.toml")
        .replace(
            "/etc/gateway/tls/fullchain.pem",
            dir.path().join("cert.pem").to_str().unwrap(),
        )
        .replace(
            "/etc/gateway/tls/privkey.pem",
            dir.path().join("key.pem").to_str().unwrap(),
        )
        .replace(
            "/etc/gateway/jwt-public.pem",
            fixtures.join("jwt-es256-public.pem").to_str().unwrap(),
        );
    assert!(
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .all(|l| !l.contains("/etc/gateway/")),
        "a path was not replaced"
    );
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(gateway_binary())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `gateway_*` name in `expr`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("gateway_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exposed() {
    within(30, async {
        let dashboard: Value = serde_json::from_str(&deploy("grafana-dashboard.json")).unwrap();
        let mut queried = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                queried.extend(metric_names(target["expr"].as_str().unwrap_or("")));
            }
        }
        assert!(queried.len() >= 10, "{queried:?}");

        // Cluster mode (a real redis-server), so the backplane's series exist too.
        let redis = RedisServer::start().await;
        // An endpoint whose backend is down: its call is counted and timed all the same.
        let gw = TestGateway::start(&format!(
            "[cluster]\nredis = \"{}\"\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n\
             [[endpoint]]\npath = \"/app\"\nauth = \"none\"\n[endpoint.upstream]\n\
             url = \"http://127.0.0.1:1/gateway\"\nevents = [\"rpc\"]\n",
            redis.url()
        ))
        .await;
        let (mut app, _) = gw.ws_welcomed("/app").await;
        let failed = app
            .request(serde_json::json!({"type": "rpc", "id": 1, "method": "m"}))
            .await;
        assert_eq!(failed["code"], "unavailable", "{failed}");
        // Labelled series appear once used: one session on each transport (one closed),
        // one rejection.
        let (_ws, _) = gw.ws_welcomed("/chat").await;
        let (_wt, _) = gw.wt_welcomed("/chat").await;
        let (mut closed, _) = gw.ws_welcomed("/chat").await;
        closed.ws.close(None).await.unwrap();
        let _ = closed.ending().await;
        let _ = gw.ws("/nope").await;
        let (status, text) = gw.https("GET", "/metrics", &[], "").await;
        assert_eq!(status, 200);
        for line in [
            r#"gateway_upstream_calls_total{endpoint="/app",event="rpc",result="unreachable"} 1"#,
            r#"gateway_upstream_calls_total{endpoint="/app",event="rpc",result="ok"} 0"#,
            r#"gateway_upstream_call_seconds_count{endpoint="/app",event="rpc"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Every queried series has samples (not only a `# TYPE` line).
        let sampled: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        for name in &queried {
            assert!(
                sampled.contains(name.as_str()),
                "the dashboard queries {name}, /metrics has samples of {sampled:?}"
            );
        }
    })
    .await;
}

#[test]
fn the_systemd_unit_runs_unprivileged_with_a_raised_descriptor_limit() {
    let unit = deploy("gateway.service");
    for line in [
        "ExecStart=/usr/local/bin/gateway --config /etc/gateway/gateway.toml",
        "User=gateway",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "LimitNOFILE=1048576",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "gateway.service lacks `{line}`"
        );
    }
}
