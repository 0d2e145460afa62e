//! The WebTransport front end to end, with an independent client (web-transport-quinn) and
//! WebSocket clients in the same rooms.

use std::time::Duration;

use gateway_tests::{wt::*, *};
use serde_json::json;

const OPEN: &str = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_port_number_for_tcp_and_udp_and_alt_svc_advertises_it() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        assert_eq!(gw.udp_port(), gw.addr.port());
        let head = https_head(gw.addr, &gw.cert_path, "/healthz")
            .await
            .unwrap();
        let expected = format!("alt-svc: h3=\":{}\"", gw.addr.port());
        assert!(head.to_lowercase().contains(&expected), "{head}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_get_healthz_is_answered_by_the_same_router() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (status, body) = h3_get(gw.udp_port(), &gw.cert_path, "/healthz")
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "ok"));
        let (status, _) = h3_get(gw.udp_port(), &gw.cert_path, "/nope").await.unwrap();
        assert_eq!(status, 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_clients_chat_in_a_room() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut a, wa) = gw.wt_welcomed("/chat").await;
        assert_eq!(wa["transport"], "webtransport");
        assert_eq!(wa["endpoint"], "/chat");
        let (mut b, wb) = gw.wt_welcomed("/chat").await;
        a.join("wt-room").await;
        assert_eq!(b.join("wt-room").await["members"], 2);
        assert_eq!(
            a.recv().await,
            json!({"type":"presence","room":"wt-room","event":"join","user":wb["user"]})
        );
        let ack = a
            .request(json!({"type":"publish","room":"wt-room","id":5,"data":{"n":1}}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":5,"seq":1}));
        assert_eq!(
            b.recv().await,
            json!({"type":"message","room":"wt-room","from":wa["user"],"seq":1,"data":{"n":1}})
        );
        // Binary envelopes travel as kind 0x01 frames.
        b.send_binary(
            json!({"type":"publish","room":"wt-room","id":6}),
            &[9, 8, 7],
        )
        .await;
        assert_eq!(b.recv().await, json!({"type":"ack","id":6,"seq":2}));
        match a.next_frame().await {
            Some(WtFrame::Binary(frame)) => {
                let (header, payload) = split_binary(&frame).unwrap();
                assert_eq!(header["seq"], 2);
                assert_eq!(payload, vec![9, 8, 7]);
            }
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_and_websocket_members_share_rooms_and_presence() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut wt, wt_welcome) = gw.wt_welcomed("/chat").await;
        let (mut ws, ws_welcome) = gw.ws_welcomed("/chat").await;
        wt.join("mixed").await;
        ws.join("mixed").await;
        wt.recv().await; // presence join of the WebSocket user
        ws.send(json!({"type":"publish","room":"mixed","data":"from ws"}))
            .await;
        ws.recv().await; // ack
        let m = wt.recv().await;
        assert_eq!(
            (m["from"].clone(), m["data"].clone()),
            (ws_welcome["user"].clone(), json!("from ws"))
        );
        wt.send(json!({"type":"publish","room":"mixed","data":"from wt"}))
            .await;
        wt.recv().await; // ack
        let m = ws.recv().await;
        assert_eq!(
            (m["from"].clone(), m["data"].clone()),
            (wt_welcome["user"].clone(), json!("from wt"))
        );
        let ack = ws
            .request(json!({"type":"presence","room":"mixed","id":3}))
            .await;
        let mut transports: Vec<String> = ack["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["transport"].as_str().unwrap().to_owned())
            .collect();
        transports.sort();
        assert_eq!(transports, vec!["websocket", "webtransport"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_send_crosses_transports() {
    within(30, async {
        let toml = format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let alice = token("alice", 300, json!({}));
        let (mut a_wt, w) = gw.wt_welcomed(&format!("/chat?token={alice}")).await;
        assert_eq!(w["user"], "alice");
        let (mut a_ws, _) = gw.ws_welcomed(&format!("/chat?token={alice}")).await;
        let (mut bob, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("bob", 300, json!({}))))
            .await;
        let ack = bob
            .request(json!({"type":"send","to":"alice","id":1,"data":"psst"}))
            .await;
        assert_eq!(ack["delivered"], true);
        let expected = json!({"type":"direct","from":"bob","data":"psst"});
        assert_eq!(a_wt.recv().await, expected);
        assert_eq!(a_ws.recv().await, expected);
        // And back, from WebTransport to WebSocket.
        let ack = a_wt
            .request(json!({"type":"send","to":"bob","id":2,"data":"hi bob"}))
            .await;
        assert_eq!(ack["delivered"], true);
        assert_eq!(
            bob.recv().await,
            json!({"type":"direct","from":"alice","data":"hi bob"})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_messages_use_datagrams_both_ways() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut wt, _) = gw.wt_welcomed("/chat").await;
        let (mut ws, ws_welcome) = gw.ws_welcomed("/chat").await;
        let (mut sender, sender_welcome) = gw.wt_welcomed("/chat").await;
        wt.join("cursor").await;
        ws.join("cursor").await;
        sender.join("cursor").await;
        wt.recv().await;
        wt.recv().await; // presence joins
        ws.recv().await;

        // A volatile publish reaches the WebTransport member as a datagram, the WebSocket
        // member as a normal frame, and is acknowledged without a sequence number.
        let ack = ws.request(json!({"type":"publish","room":"cursor","id":4,"volatile":true,"data":{"x":1}})).await;
        assert_eq!(ack, json!({"type":"ack","id":4}));
        let d = wt.recv_datagram().await;
        assert_eq!(d, json!({"type":"message","room":"cursor","from":ws_welcome["user"],"volatile":true,"data":{"x":1}}));
        wt.expect_silence(Duration::from_millis(200)).await;
        let m = sender.recv_datagram().await;
        assert_eq!(m["data"], json!({"x":1}));

        // A client may publish volatile messages by datagram; they get no ack.
        let publish = json!({"type":"publish","room":"cursor","id":9,"data":{"y":2}});
        sender.session.send_datagram(publish.to_string().into()).unwrap();
        let m = ws.recv().await;
        assert_eq!(m, json!({"type":"message","room":"cursor","from":sender_welcome["user"],"volatile":true,"data":{"y":2}}));
        assert_eq!(wt.recv_datagram().await["data"], json!({"y":2}));
        sender.expect_silence(Duration::from_millis(200)).await;

        // A volatile message larger than a datagram travels on the message stream.
        let big = "z".repeat(4000);
        ws.request(json!({"type":"publish","room":"cursor","volatile":true,"data":big})).await;
        let m = wt.recv().await;
        assert_eq!(m["volatile"], true);
        assert_eq!(m["data"].as_str().unwrap().len(), 4000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_1009_without_buffering_it() {
    within(30, async {
        let gw = TestGateway::start(&format!("{OPEN}max_message_bytes = 1024\n")).await;
        let (mut c, _) = gw.wt_welcomed("/chat").await;
        // Only the header announcing 1 MiB is sent: the server must not wait for the payload.
        let mut header = vec![0u8];
        header.extend_from_slice(&(1u32 << 20).to_be_bytes());
        c.send_raw(&header).await;
        assert_eq!(
            c.recv().await,
            json!({"type":"close","code":1009,"reason":"message too large"})
        );
        assert_eq!(
            c.next_frame().await,
            None,
            "message stream ends after the close envelope"
        );
        // The session then ends (the QUIC connection closes) without the client's help.
        tokio::time::timeout(STEP, c.session.closed())
            .await
            .expect("connection closes");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_answered_404_for_unknown_paths_and_401_for_bad_tokens() {
    within(30, async {
        let toml = format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let port = gw.udp_port();
        let status = |r: Result<_, _>| {
            let Err(e) = r else {
                panic!("CONNECT must fail")
            };
            connect_status(&e).ok_or_else(|| e.to_string())
        };
        assert_eq!(
            status(open_session(port, &gw.cert_sha256, "/nowhere").await),
            Ok(404)
        );
        assert_eq!(
            status(open_session(port, &gw.cert_sha256, "/chat").await),
            Ok(401)
        );
        assert_eq!(
            status(open_session(port, &gw.cert_sha256, "/chat?token=bad").await),
            Ok(401)
        );
        let expired = token("a", -100, json!({}));
        assert_eq!(
            status(open_session(port, &gw.cert_sha256, &format!("/chat?token={expired}")).await),
            Ok(401)
        );
        // No session was created by any of them.
        assert_eq!(
            gw.server
                .as_ref()
                .unwrap()
                .state
                .services
                .hub
                .session_count(),
            0
        );
        let good = token("a", 100, json!({}));
        let (_c, w) = gw.wt_welcomed(&format!("/chat?token={good}")).await;
        assert_eq!(w["user"], "a");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_streams_are_refused_without_harming_the_session() {
    within(30, async {
        let gw = TestGateway::start(OPEN).await;
        let (mut c, _) = gw.wt_welcomed("/chat").await;
        // A second bidirectional stream gets an error frame and is finished.
        let (mut send2, mut recv2) = c.session.open_bi().await.unwrap();
        send2
            .write_all(&frame(0, br#"{"type":"ping","id":1}"#))
            .await
            .unwrap();
        let bytes = tokio::time::timeout(STEP, recv2.read_to_end(4096))
            .await
            .unwrap()
            .unwrap();
        let error: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert_eq!(error["type"], "error");
        assert_eq!(error["code"], "bad_request");
        // A unidirectional stream from this client (web-transport-quinn) is dropped by h3
        // 0.0.8 before the gateway sees it: h3 never resolves its type header, so the
        // session is never handed the stream (docs/protocol.md). All this part can check is
        // that such a stream does not disturb the message stream, and that should h3 ever
        // hand it over, the answer is the documented `error`. What the gateway does with a
        // unidirectional stream that reaches it (`error`, STOP_SENDING, rate limit) is
        // tested with aioquic, whose streams h3 does surface: `interop.rs`, uni_flood.py.
        let mut uni = c.session.open_uni().await.unwrap();
        uni.write_all(&frame(0, br#"{"type":"ping","id":99}"#))
            .await
            .unwrap();
        if let Ok(answer) = tokio::time::timeout(Duration::from_millis(300), c.next_frame()).await {
            match answer {
                Some(gateway_tests::wt::WtFrame::Json(v)) => {
                    assert_eq!(
                        (v["type"].as_str(), v["code"].as_str()),
                        (Some("error"), Some("bad_request")),
                        "{v}"
                    )
                }
                other => panic!("unexpected answer to a unidirectional stream: {other:?}"),
            }
        }
        // Garbage JSON on the message stream is an error reply, not a close.
        c.send_raw(&frame(0, b"{{{")).await;
        assert_eq!(c.recv().await["code"], "bad_request");
        // The session still works.
        assert_eq!(
            c.request(json!({"type":"ping","id":7})).await,
            json!({"type":"pong","id":7})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_removed_and_its_presence_leave_emitted() {
    within(60, async {
        let gw = TestGateway::start(&format!("{OPEN}heartbeat_secs = 1\n")).await;
        let (mut watcher, _) = gw.ws_welcomed("/chat").await;
        watcher.join("v").await;
        let port = gw.udp_port();
        let sha = gw.cert_sha256.clone();
        // The vanishing client lives in its own runtime; shutting that runtime down stops its
        // QUIC driver without a CONNECTION_CLOSE: no more packets, like a pulled cable.
        let (user_tx, user_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let client = rt.block_on(async move {
                let mut c = WtClient::connect(port, &sha, "/chat").await.unwrap();
                let w = c.recv().await;
                c.join("v").await;
                user_tx
                    .send(w["user"].as_str().unwrap().to_owned())
                    .unwrap();
                c
            });
            stop_rx.recv().unwrap();
            rt.shutdown_background();
            std::mem::forget(client);
        });
        let user = tokio::task::spawn_blocking(move || user_rx.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(
            watcher.recv().await,
            json!({"type":"presence","room":"v","event":"join","user":user})
        );
        let vanished_at = std::time::Instant::now();
        stop_tx.send(()).unwrap();
        thread.join().unwrap();
        let leave = watcher.recv().await;
        assert_eq!(
            leave,
            json!({"type":"presence","room":"v","event":"leave","user":user})
        );
        let took = vanished_at.elapsed();
        assert!(took < Duration::from_secs(5), "removed after {took:?}");
    })
    .await;
}
