//! `GET /metrics`: real traffic over both transports moves each metric by what was done.

use std::{collections::HashMap, time::Duration};

use gateway_tests::*;
use serde_json::json;

const KEY: &str = "metrics-api-key-0123456789";

/// `name{labels}` → value, from the Prometheus/OpenMetrics text.
async fn scrape(gw: &TestGateway) -> HashMap<String, f64> {
    let (status, text) = gw.https("GET", "/metrics", &[], "").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// How much each series grew from `before` to `after` (absent counts as 0).
fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_on_both_transports_moves_each_metric_by_what_was_done() {
    within(60, async {
        let gw = TestGateway::start(&format!(
            "[api]\nkey = \"{KEY}\"\n\
             [[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n\
             [[endpoint]]\npath = \"/slow\"\nauth = \"none\"\nrate_per_sec = 1\nrate_burst = 1\n\
             [[room]]\npattern = \"*\"\nhistory = 100\n"
        ))
        .await;
        let start = scrape(&gw).await;
        assert_eq!(
            start.get(&format!("gateway_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
            Some(&1.0)
        );

        let (mut ws, _) = gw.ws_welcomed("/chat").await;
        let (mut wt, _) = gw.wt_welcomed("/chat").await;
        let join = json!({"type":"join","room":"m","id":1});
        assert_eq!(ws.request(join.clone()).await["type"], "ack");
        let ack = wt.request(join).await;
        let epoch = ack["epoch"].as_str().unwrap().to_owned();
        assert_eq!(ws.recv().await["type"], "presence");

        // 130 publishes from wss, each read by the WebTransport member before the next (so
        // each rings its empty queue: at least one ring in 64 per thread is timed).
        for i in 0..130 {
            ws.send(json!({"type":"publish","room":"m","data":i})).await;
            assert_eq!(ws.recv().await["type"], "ack");
            let m = wt.recv().await;
            assert_eq!(m["data"], i, "{m}");
        }
        // 3 from WebTransport to the wss member, one volatile (a datagram would be the
        // WebTransport member's; the wss member gets it as a frame).
        for i in 0..2 {
            wt.send(json!({"type":"publish","room":"m","data":i})).await;
            assert_eq!(wt.recv().await["type"], "ack");
            assert_eq!(ws.recv().await["data"], i);
        }
        wt.send(json!({"type":"publish","room":"m","data":"v","volatile":true}))
            .await;
        assert_eq!(wt.recv().await["type"], "ack");
        assert_eq!(ws.recv().await["data"], "v");
        // A volatile one from wss reaches the WebTransport member as a datagram.
        ws.send(json!({"type":"publish","room":"m","data":"d","volatile":true}))
            .await;
        assert_eq!(ws.recv().await["type"], "ack");
        assert_eq!(wt.recv_datagram().await["data"], "d");
        // One through the API reaches both.
        let auth = format!("Bearer {KEY}");
        let (status, body) = gw
            .https(
                "POST",
                "/api/publish",
                &[("authorization", &auth), ("content-type", "application/json")],
                r#"{"room":"m","data":"api"}"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ws.recv().await["data"], "api");
        assert_eq!(wt.recv().await["data"], "api");
        // A third member joins with `since`: recovered from history.
        let (mut late, _) = gw.ws_welcomed("/chat").await;
        let ack = late
            .request(json!({"type":"join","room":"m","id":2,"since":130,"epoch":epoch}))
            .await;
        assert_eq!(ack["recovered"], true, "{ack}");
        // Rejected handshakes: an unknown path on each transport.
        assert_eq!(http_status(&gw.ws("/nope").await.err().unwrap()), Some(404));
        assert!(gw.wt("/nope").await.is_err());
        // Three frames in a burst of one: two are rate limited.
        let (mut slow, _) = gw.ws_welcomed("/slow").await;
        for i in 0..3 {
            slow.send(json!({"type":"ping","id":i})).await;
        }
        assert_eq!(slow.recv().await["type"], "pong");
        assert_eq!(slow.recv().await["code"], "rate_limited");

        let mid = scrape(&gw).await;
        let d = |key: &str| delta(&start, &mid, key);
        let chat_ws = r#"endpoint="/chat",transport="websocket""#;
        let chat_wt = r#"endpoint="/chat",transport="webtransport""#;
        assert_eq!(mid[&format!("gateway_sessions{{{chat_ws}}}")], 2.0);
        assert_eq!(mid[&format!("gateway_sessions{{{chat_wt}}}")], 1.0);
        assert_eq!(d(&format!("gateway_sessions_opened_total{{{chat_ws}}}")), 2.0);
        assert_eq!(d(&format!("gateway_sessions_opened_total{{{chat_wt}}}")), 1.0);
        assert_eq!(d(r#"gateway_publishes_total{endpoint="/chat"}"#), 134.0);
        assert_eq!(d(r#"gateway_publishes_total{endpoint="api"}"#), 1.0);
        // To WebTransport: 130 + the volatile datagram + the API one; to wss: 3 + the API one.
        assert_eq!(d(r#"gateway_deliveries_total{transport="webtransport"}"#), 132.0);
        assert_eq!(d(r#"gateway_deliveries_total{transport="websocket"}"#), 4.0);
        assert_eq!(d("gateway_datagrams_sent_total"), 1.0);
        assert_eq!(d(r#"gateway_recoveries_total{result="recovered"}"#), 1.0);
        assert_eq!(d(r#"gateway_rate_limited_total{endpoint="/slow"}"#), 2.0);
        assert_eq!(mid["gateway_rooms"], 1.0);
        for transport in ["websocket", "webtransport"] {
            let key = format!(
                r#"gateway_handshake_rejections_total{{endpoint="unknown",transport="{transport}",status="404"}}"#
            );
            assert_eq!(d(&key), 1.0, "{key}");
        }
        // Frames in: every request sent over wss (the first member's join, 130 publishes and
        // a volatile one; the late member's join; the three pings). Frames out: at least
        // what the WebTransport member read.
        let ws_in = d(r#"gateway_frames_received_total{transport="websocket"}"#);
        assert_eq!(ws_in, 1.0 + 130.0 + 1.0 + 1.0 + 3.0);
        let wt_out = d(r#"gateway_frames_sent_total{transport="webtransport"}"#);
        assert!(wt_out >= 130.0 + 1.0 + 1.0 + 1.0, "{wt_out}");
        let wt_bytes = d(r#"gateway_bytes_sent_total{transport="webtransport"}"#);
        assert!(wt_bytes > wt_out * 20.0, "{wt_bytes}");
        let timed = d(r#"gateway_delivery_seconds_count{transport="webtransport"}"#);
        assert!(timed >= 1.0, "no delivery of 130 was timed");

        // Closing: the gauge goes back down and each close is counted by its code: a clean
        // close 1000, a dropped connection 1006.
        drop(late);
        ws.ws.close(None).await.unwrap();
        let clean = format!(r#"gateway_sessions_closed_total{{{chat_ws},code="1000"}}"#);
        let lost = format!(r#"gateway_sessions_closed_total{{{chat_ws},code="1006"}}"#);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = scrape(&gw).await;
            if now[&format!("gateway_sessions{{{chat_ws}}}")] == 0.0 {
                assert_eq!(
                    (now.get(&clean), now.get(&lost)),
                    (Some(&1.0), Some(&1.0)),
                    "{now:?}"
                );
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{now:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
