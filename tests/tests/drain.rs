//! Draining a node (`POST /api/drain`, and SIGTERM through `Server::shutdown`): every
//! message queued before the drain arrives, then `reconnect` with an `after_ms` inside the
//! drain window, then the close (1001; on WebTransport the `close` envelope); `/healthz`
//! answers 503 and new sessions are refused.

use std::time::Duration;

use gateway_tests::*;
use serde_json::{json, Value};

const KEY: &str = "drain-api-key-0123456789";

fn config(drain_secs: u64) -> String {
    format!(
        "[shutdown]\ndrain_secs = {drain_secs}\n[api]\nkey = \"{KEY}\"\n\
         [[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 10000\nrate_burst = 10000\n"
    )
}

/// Publishes `n` messages to `room` from `publisher` and waits for the last ack, so every
/// one of them is queued for the members.
async fn publish_all(publisher: &mut WsClient, room: &str, n: u64) {
    for i in 1..=n {
        publisher
            .send(json!({"type":"publish","room":room,"id":i,"data":{"i":i}}))
            .await;
    }
    let mut acked = 0;
    while acked < n {
        let ack = publisher.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked = ack["id"].as_u64().unwrap();
    }
}

/// Checks that `frames` are messages 1..=n in order, then `reconnect` inside the window.
fn check_messages_then_reconnect(frames: &[Value], n: u64, window_ms: u64) {
    assert_eq!(frames.len() as u64, n + 1, "{frames:?}");
    for (i, m) in frames[..n as usize].iter().enumerate() {
        assert_eq!(
            (m["type"].as_str(), m["seq"].as_u64()),
            (Some("message"), Some(i as u64 + 1)),
            "{m}"
        );
    }
    let r = &frames[n as usize];
    assert_eq!(
        (r["type"].as_str(), r["reason"].as_str()),
        (Some("reconnect"), Some("server draining")),
        "{r}"
    );
    assert!(r["after_ms"].as_u64().unwrap() < window_ms, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_drain_flushes_queued_messages_then_reconnect_then_close_on_both_transports() {
    within(60, async {
        const N: u64 = 300;
        let gw = TestGateway::start(&config(4)).await;
        let join = json!({"type":"join","room":"d","id":0});
        let (mut ws, _) = gw.ws_welcomed("/chat").await;
        assert_eq!(ws.request(join.clone()).await["type"], "ack");
        let (mut wt, _) = gw.wt_welcomed("/chat").await;
        assert_eq!(wt.request(join).await["type"], "ack");
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        publish_all(&mut publisher, "d", N).await;

        // Without the key: refused, nothing drains.
        let (status, _) = gw.https("POST", "/api/drain", &[], "").await;
        assert_eq!(status, 401);
        let auth = format!("Bearer {KEY}");
        let (status, body) = gw
            .https("POST", "/api/drain", &[("authorization", &auth)], "")
            .await;
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, json!({"draining": true, "sessions": 3}));

        // Presence events (the other member joining) are not counted.
        let mut frames = Vec::new();
        while frames
            .last()
            .map(|f: &Value| f["type"] != "reconnect")
            .unwrap_or(true)
        {
            let f = ws.recv().await;
            if f["type"] != "presence" {
                frames.push(f);
            }
        }
        check_messages_then_reconnect(&frames, N, 4000);
        let (ending, skipped) = ws.ending().await;
        assert_eq!(
            (ending, skipped),
            (Ending::Close(1001, "server draining".into()), 0)
        );

        let mut frames = Vec::new();
        while frames
            .last()
            .map(|f: &Value| f["type"] != "reconnect")
            .unwrap_or(true)
        {
            let f = wt.recv().await;
            if f["type"] != "presence" {
                frames.push(f);
            }
        }
        check_messages_then_reconnect(&frames, N, 4000);
        assert_eq!(
            wt.recv().await,
            json!({"type":"close","code":1001,"reason":"server draining"})
        );

        // The node stays up but takes no one new.
        let (status, _) = gw.https("GET", "/healthz", &[], "").await;
        assert_eq!(status, 503);
        let refused = gw.ws("/chat").await.err().expect("refused while draining");
        assert_eq!(http_status(&refused), Some(503));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_sessions_then_returns_within_the_drain_window() {
    within(60, async {
        let mut gw = TestGateway::start(&config(2)).await;
        let (mut ws, _) = gw.ws_welcomed("/chat").await;
        let server = gw.server.take().unwrap();
        let started = std::time::Instant::now();
        let shutdown = tokio::spawn(server.shutdown());
        let r = ws.recv().await;
        assert_eq!(r["type"], "reconnect");
        assert!(r["after_ms"].as_u64().unwrap() < 2000, "{r}");
        let (ending, _) = ws.ending().await;
        assert_eq!(ending, Ending::Close(1001, "server draining".into()));
        drop(ws);
        // The only session is gone: shutdown returns without waiting out the window.
        shutdown.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}
