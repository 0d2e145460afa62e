//! The secure WebSocket front, end to end: real TLS, real tokio-tungstenite clients, the real
//! hub, on an ephemeral port.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway_tests::*;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

const OPEN: &str = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_in_a_room_with_and_without_echo() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, wa) = gw.ws_welcomed("/chat").await;
        let (mut b, wb) = gw.ws_welcomed("/chat").await;
        assert_eq!(wa["transport"], "websocket");
        assert_eq!(wa["endpoint"], "/chat");
        assert_eq!(wa["node"], "test-node");
        assert_eq!(wa["heartbeat_ms"], 25000);
        assert!(wa["user"].as_str().unwrap().starts_with("anon-"));
        let ack = a.join("lobby").await;
        assert_eq!(ack["room"], "lobby");
        assert_eq!(ack["seq"], 0);
        assert_eq!(ack["members"], 1);
        assert!(ack["epoch"].is_string());
        let ack = b.join("lobby").await;
        assert_eq!(ack["members"], 2);
        let presence = a.recv().await;
        assert_eq!(
            presence,
            json!({"type":"presence","room":"lobby","event":"join","user":wb["user"]})
        );

        // echo off (default): the publisher gets only its ack.
        let ack = b
            .request(json!({"type":"publish","room":"lobby","id":7,"data":{"text":"hi"}}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":7,"seq":1}));
        let msg = a.recv().await;
        assert_eq!(
            msg,
            json!({"type":"message","room":"lobby","from":wb["user"],"seq":1,"data":{"text":"hi"}})
        );
        b.expect_silence(Duration::from_millis(200)).await;

        // echo on: the publisher receives its own message too.
        b.send(json!({"type":"publish","room":"lobby","id":8,"data":[1,2],"echo":true}))
            .await;
        let first = b.recv().await;
        let second = b.recv().await;
        let mut got = [first, second];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
        assert_eq!(got[0], json!({"type":"ack","id":8,"seq":2}));
        assert_eq!(got[1]["data"], json!([1, 2]));
        assert_eq!(got[1]["seq"], 2);
        assert_eq!(a.recv().await["seq"], 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_send_reaches_every_session_of_the_user_and_nobody_else() {
    within(30, async {
        let toml = format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let alice = token("alice", 300, json!({}));
        let bob = token("bob", 300, json!({}));
        let carol = token("carol", 300, json!({}));
        let (mut a1, w) = gw.ws_welcomed(&format!("/chat?token={alice}")).await;
        assert_eq!(w["user"], "alice");
        let (mut a2, _) = gw.ws_welcomed(&format!("/chat?token={alice}")).await;
        let mut b = gw
            .ws_with_headers("/chat", &[("authorization", &format!("Bearer {bob}"))])
            .await
            .unwrap();
        assert_eq!(b.recv().await["user"], "bob");
        let (mut c, _) = gw.ws_welcomed(&format!("/chat?token={carol}")).await;

        let ack = b
            .request(json!({"type":"send","to":"alice","id":3,"data":{"x":1}}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":3,"delivered":true}));
        let expected = json!({"type":"direct","from":"bob","data":{"x":1}});
        assert_eq!(a1.recv().await, expected);
        assert_eq!(a2.recv().await, expected);
        c.expect_silence(Duration::from_millis(200)).await;
        b.expect_silence(Duration::from_millis(200)).await;

        let ack = b
            .request(json!({"type":"send","to":"nobody","id":4,"data":1}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":4,"delivered":false}));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_members_and_emits_user_level_join_and_leave() {
    within(30, async {
        let toml = format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let (mut w, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("watcher", 300, json!({}))))
            .await;
        w.join("room-1").await;
        let u = token("u", 300, json!({}));
        let (mut tab1, t1) = gw.ws_welcomed(&format!("/chat?token={u}")).await;
        let (mut tab2, _) = gw.ws_welcomed(&format!("/chat?token={u}")).await;
        tab1.join("room-1").await;
        assert_eq!(
            w.recv().await,
            json!({"type":"presence","room":"room-1","event":"join","user":"u"})
        );
        tab2.join("room-1").await;
        // The user's second tab is not announced again, and the user never hears about itself.
        w.expect_silence(Duration::from_millis(200)).await;
        tab1.expect_silence(Duration::from_millis(200)).await;

        let ack = w
            .request(json!({"type":"presence","room":"room-1","id":9}))
            .await;
        assert_eq!(ack["id"], 9);
        let mut members: Vec<(String, String)> = ack["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["user"].as_str().unwrap().to_owned(),
                    m["transport"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        members.sort();
        assert_eq!(
            members,
            vec![
                ("u".into(), "websocket".into()),
                ("u".into(), "websocket".into()),
                ("watcher".into(), "websocket".into())
            ]
        );
        assert!(ack["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["session"] == t1["session"]));

        // The first tab leaving is silent; the last one produces the leave event.
        let ack = tab1
            .request(json!({"type":"leave","room":"room-1","id":2}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":2}));
        w.expect_silence(Duration::from_millis(200)).await;
        drop(tab2);
        assert_eq!(
            w.recv().await,
            json!({"type":"presence","room":"room-1","event":"leave","user":"u"})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_stops_delivery_and_leaving_twice_is_not_member() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, _) = gw.ws_welcomed("/chat").await;
        let (mut b, _) = gw.ws_welcomed("/chat").await;
        a.join("r").await;
        b.join("r").await;
        a.recv().await; // presence join of b
        assert_eq!(
            a.request(json!({"type":"leave","room":"r","id":5})).await,
            json!({"type":"ack","id":5})
        );
        b.recv().await; // presence leave of a
        b.request(json!({"type":"publish","room":"r","id":6,"data":"after"}))
            .await;
        a.expect_silence(Duration::from_millis(300)).await;
        let e = a.request(json!({"type":"leave","room":"r","id":7})).await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "not_member");
        assert_eq!(e["id"], 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_bad_request_and_the_session_keeps_working() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, _) = gw.ws_welcomed("/chat").await;
        let cases = [
            ("{not json", "invalid JSON"),
            (r#"{"type":"teleport","id":1}"#, "unknown type `teleport`"),
            (r#"{"type":"join","id":2}"#, "missing field `room`"),
            (
                r#"{"type":"publish","room":"r","id":3}"#,
                "missing field `data`",
            ),
            (
                r#"{"type":"join","room":"no spaces","id":4}"#,
                "field `room`",
            ),
            (r#"[1,2,3]"#, "JSON object"),
        ];
        for (input, expected) in cases {
            a.send_text(input).await;
            let e = a.recv().await;
            assert_eq!(e["type"], "error", "{input}");
            assert_eq!(e["code"], "bad_request", "{input}");
            assert!(
                e["message"].as_str().unwrap().contains(expected),
                "{input}: {e}"
            );
        }
        // Errors echo the id when it could be read.
        a.send_text(r#"{"type":"join","id":42}"#).await;
        assert_eq!(a.recv().await["id"], 42);
        // The session still works.
        assert_eq!(
            a.request(json!({"type":"ping","id":11})).await,
            json!({"type":"pong","id":11})
        );
        a.join("still-here").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_closes_with_1009() {
    within(30, async {
        let gw = TestGateway::start(&format!("{OPEN}max_message_bytes = 1024\n")).await;
        let (mut a, _) = gw.ws_welcomed("/chat").await;
        let (mut other, _) = gw.ws_welcomed("/chat").await;
        a.send_text(&format!(
            r#"{{"type":"publish","room":"r","data":"{}"}}"#,
            "x".repeat(2000)
        ))
        .await;
        let (ending, _) = a.ending().await;
        assert_eq!(ending, Ending::Close(1009, "message too large".into()));
        // Nobody else is affected.
        assert_eq!(
            other.request(json!({"type":"ping","id":1})).await["type"],
            "pong"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404_and_bad_or_missing_credentials_are_401_before_upgrade() {
    within(30, async {
        let toml = format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let status = |r: Result<WsClient, _>| http_status(&r.err().expect("upgrade must fail"));
        assert_eq!(status(gw.ws("/nowhere").await), Some(404));
        assert_eq!(status(gw.ws("/chat").await), Some(401));
        assert_eq!(status(gw.ws("/chat?token=not-a-jwt").await), Some(401));
        let expired = token("alice", -120, json!({}));
        assert_eq!(
            status(gw.ws(&format!("/chat?token={expired}")).await),
            Some(401)
        );
        let forged = {
            let t = token("alice", 300, json!({}));
            format!("{}x", &t[..t.len() - 1])
        };
        assert_eq!(
            status(
                gw.ws_with_headers("/chat", &[("authorization", &format!("Bearer {forged}"))])
                    .await
            ),
            Some(401)
        );
        // The key must be 16 bytes in base64 (RFC 6455 section 4.2.1).
        for (key, expected) in [
            ("dGhlIHNhbXBsZSBub25jZQ==", "HTTP/1.1 101"),
            ("abc", "HTTP/1.1 400"),
            ("dGhlIHNhbXBsZSBub25jZQ", "HTTP/1.1 400"),
            ("dGhlIHNhbXBsZSBub25jZSBi", "HTTP/1.1 400"),
        ] {
            let mut tls = tls_connect(gw.addr, &gw.cert_path).await.unwrap();
            let request = format!(
                "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer {}\r\n\r\n",
                token("alice", 300, json!({}))
            );
            tokio::io::AsyncWriteExt::write_all(&mut tls, request.as_bytes())
                .await
                .unwrap();
            let mut head = vec![0u8; 12];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut head)
                .await
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&head), expected, "key {key:?}");
        }
        // A plain GET on an endpoint path is not an upgrade.
        let (code, body) = gw.https("GET", "/chat", &[], "").await;
        assert_eq!(code, 400);
        assert!(body.contains("bad_request"), "{body}");
        let (code, _) = gw.https("GET", "/nowhere", &[], "").await;
        assert_eq!(code, 404);
        // And a valid token is admitted.
        let ok = token("alice", 300, json!({}));
        gw.ws_welcomed(&format!("/chat?token={ok}")).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        assert_eq!(
            gw.https("GET", "/healthz", &[], "").await,
            (200, "ok".to_owned())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_publish_is_delivered_as_a_binary_envelope() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, wa) = gw.ws_welcomed("/chat").await;
        let (mut b, _) = gw.ws_welcomed("/chat").await;
        b.join("bin").await;
        a.join("bin").await;
        let payload: Vec<u8> = (0..=255u8).collect();
        a.send_binary(json!({"type":"publish","room":"bin","id":4}), &payload)
            .await;
        // The reply is a JSON text ack even for a binary request.
        assert_eq!(a.recv().await, json!({"type":"ack","id":4,"seq":1}));
        b.recv().await; // presence join of a
        match b.next_data().await {
            Message::Binary(frame) => {
                let (header, body) = split_binary(&frame).unwrap();
                assert_eq!(
                    header,
                    json!({"type":"message","room":"bin","from":wa["user"],"seq":1})
                );
                assert_eq!(body, payload);
            }
            other => panic!("expected binary, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_4008_while_others_get_everything() {
    within(120, async {
        // Rooms are shared across endpoints: the slow member sits on an endpoint with a tiny
        // queue, the others on one with the default queue.
        let toml = format!(
            "{OPEN}rate_per_sec = 100000\nrate_burst = 100000\n\
             [[endpoint]]\npath = \"/tiny\"\nauth = \"none\"\nqueue_capacity = 8\n"
        );
        let gw = TestGateway::start(&toml).await;
        let (mut slow, _) = gw.ws_welcomed("/tiny").await;
        let (mut fast, _) = gw.ws_welcomed("/chat").await;
        let (publisher, _) = gw.ws_welcomed("/chat").await;
        slow.join("firehose").await;
        fast.join("firehose").await;
        slow.recv().await; // presence of fast; from now on `slow` reads nothing

        // ~36 MB: far more than the kernel's socket buffers and an 8-frame queue hold.
        const N: u64 = 1200;
        const WINDOW: u64 = 20;
        let blob = "y".repeat(30_000);
        let (mut tx, mut rx) = publisher.ws.split();
        let acks = tokio::spawn(async move {
            let mut n = 0;
            while n < N {
                match rx.next().await {
                    Some(Ok(Message::Text(t))) => {
                        assert!(t.contains("\"ack\""), "{t}");
                        n += 1;
                    }
                    Some(Ok(_)) => {}
                    other => panic!("publisher lost: {other:?}"),
                }
            }
        });
        // The publisher runs at most WINDOW messages ahead of the fast member, so only the
        // member that stopped reading falls behind.
        let mut sent = 0;
        for expected in 1..=N {
            while sent < N && sent < expected - 1 + WINDOW {
                let m = json!({"type":"publish","room":"firehose","data":{"i":sent,"blob":blob}});
                tx.send(Message::text(m.to_string())).await.unwrap();
                sent += 1;
            }
            let m = fast.recv().await;
            assert_eq!(m["seq"], expected, "fast member missed a message");
            assert_eq!(m["data"]["i"], expected - 1);
        }
        acks.await.unwrap();
        // The slow member now reads what the kernel held, then the close frame.
        let (ending, delivered) = slow.ending().await;
        assert_eq!(
            ending,
            Ending::Close(4008, "slow consumer: outbound queue full".into())
        );
        assert!(
            (delivered as u64) < N,
            "slow consumer was not cut off ({delivered} delivered)"
        );
        // Counted once as a slow consumer of its endpoint, and as a 4008 close, when its
        // session has ended on the server.
        drop(slow);
        let counted = [
            r#"gateway_slow_consumer_closes_total{endpoint="/tiny"} 1"#,
            r#"gateway_sessions_closed_total{endpoint="/tiny",transport="websocket",code="4008"} 1"#,
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (status, text) = gw.https("GET", "/metrics", &[], "").await;
            assert_eq!(status, 200);
            if counted.iter().all(|line| text.lines().any(|l| l == *line)) {
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "{counted:?} not in\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            text.lines()
                .any(|l| l == r#"gateway_slow_consumer_closes_total{endpoint="/chat"} 0"#),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_answer_pings_is_closed_4009() {
    within(30, async {
        let gw = TestGateway::start(&format!("{OPEN}heartbeat_secs = 1\n")).await;
        let (mut quiet, w) = gw.ws_welcomed("/chat").await;
        assert_eq!(w["heartbeat_ms"], 1000);
        // `lively` keeps reading, so tungstenite answers its pings, until `quiet` is closed.
        let (mut lively, _) = gw.ws_welcomed("/chat").await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let keep = tokio::spawn(async move {
            let mut stopped = std::pin::pin!(stopped);
            loop {
                tokio::select! {
                    m = lively.ws.next() => match m {
                        Some(Ok(Message::Ping(_))) => {}
                        m => panic!("lively got {m:?} while quiet timed out"),
                    },
                    _ = &mut stopped => return lively,
                }
            }
        });
        // `quiet` reads the raw TLS stream, below tungstenite, so no ping is answered, until
        // the close frame: 4009 "heartbeat timeout" (unmasked, from the server).
        let started = std::time::Instant::now();
        let close = [&[0x88u8, 19, 0x0f, 0xa9][..], b"heartbeat timeout"].concat();
        let raw_tls = quiet.ws.get_mut();
        let mut raw = Vec::new();
        while !raw.windows(close.len()).any(|w| w == close) {
            let mut chunk = [0u8; 256];
            let n = tokio::time::timeout(STEP, raw_tls.read(&mut chunk))
                .await
                .expect("the close frame came in time")
                .unwrap();
            assert!(n > 0, "connection ended without the close frame: {raw:?}");
            raw.extend_from_slice(&chunk[..n]);
        }
        // One ping unanswered by the next: between one and three heartbeats.
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(900)..Duration::from_secs(4)).contains(&waited),
            "{waited:?}"
        );
        stop.send(()).unwrap();
        let mut lively = keep.await.unwrap();
        assert_eq!(
            lively.request(json!({"type":"ping","id":1})).await["type"],
            "pong"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_a_close_frame() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, _) = gw.ws_welcomed("/chat").await;
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        let bye = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        a.ws.close(Some(bye)).await.unwrap();
        let (ending, _) = a.ending().await;
        assert_eq!(
            ending,
            Ending::Close(1000, "bye".into()),
            "the server echoes the close"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_reconnect_then_1001_and_healthz_turns_503() {
    within(30, async {
        let mut gw = TestGateway::start(OPEN).await;
        let (mut a, _) = gw.ws_welcomed("/chat").await;
        let (mut b, _) = gw.ws_welcomed("/chat").await;
        let server = gw.server.take().unwrap();
        let state = server.state.clone();
        let shutdown = tokio::spawn(server.shutdown());
        for c in [&mut a, &mut b] {
            let r = c.recv().await;
            assert_eq!(
                (r["type"].as_str(), r["reason"].as_str()),
                (Some("reconnect"), Some("server draining"))
            );
            // Spread over the drain window (`[shutdown] drain_secs`, default 10).
            let after = r["after_ms"].as_u64().unwrap();
            assert!(after < 10_000, "{after}");
            let (ending, _) = c.ending().await;
            assert_eq!(ending, Ending::Close(1001, "server draining".into()));
        }
        assert!(state.is_shutting_down());
        shutdown.await.unwrap();
    })
    .await;
}
