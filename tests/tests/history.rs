//! Message history and exact recovery on one node (PROTOCOL.md section 7), over both
//! transports: missed messages exactly once and in order, then live ones; publishes racing
//! the join neither lost nor doubled; wrong epochs, long gaps and expired history give
//! `recovered: false`; binary messages come back binary.

use std::time::Duration;

use gateway_tests::{wt::WtFrame, *};
use serde_json::{json, Value};

const CONFIG: &str = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 100000\nrate_burst = 100000\n[[room]]\npattern = \"h-*\"\nhistory = 1000\nhistory_ttl_secs = 60\n[[room]]\npattern = \"gap-*\"\nhistory = 3\nhistory_ttl_secs = 60\n[[room]]\npattern = \"short-*\"\nhistory = 3\nhistory_ttl_secs = 1\n";

/// Publishes `n` JSON messages `from..from+n` to `room` and returns the last `seq`.
async fn publish_many(publisher: &mut WsClient, room: &str, from: u64, n: u64) -> u64 {
    let mut seq = 0;
    for i in from..from + n {
        let ack = publisher
            .request(json!({"type":"publish","room":room,"data":i,"id":i}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        seq = ack["seq"].as_u64().unwrap();
    }
    seq
}

fn recovering_join(room: &str, since: u64, epoch: &Value) -> Value {
    json!({"type":"join","room":room,"id":99,"since":since,"epoch":epoch})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_client_recovers_every_missed_message_then_live_ones() {
    within(60, async {
        let gw = TestGateway::start(CONFIG).await;
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let (mut client, _) = gw.ws_welcomed("/chat").await;
        let ack = client.join("h-ws").await;
        let epoch = ack["epoch"].clone();
        publish_many(&mut publisher, "h-ws", 1, 3).await;
        for expected in 1..=3 {
            assert_eq!(client.recv().await["seq"], expected);
        }
        drop(client);
        // Published while the client is away.
        publish_many(&mut publisher, "h-ws", 4, 5).await;
        let (mut client, _) = gw.ws_welcomed("/chat").await;
        let ack = client.request(recovering_join("h-ws", 3, &epoch)).await;
        assert_eq!(
            (ack["type"].as_str(), ack["recovered"].as_bool()),
            (Some("ack"), Some(true)),
            "{ack}"
        );
        assert_eq!((ack["seq"].as_u64(), &ack["epoch"]), (Some(8), &epoch));
        for expected in 4..=8u64 {
            let m = client.recv().await;
            assert_eq!(
                (m["seq"].as_u64(), m["data"].as_u64()),
                (Some(expected), Some(expected)),
                "{m}"
            );
        }
        publish_many(&mut publisher, "h-ws", 9, 1).await;
        assert_eq!(client.recv().await["seq"], 9, "then live messages");
        client.expect_silence(Duration::from_millis(200)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_webtransport_client_recovers_json_and_binary_messages() {
    within(60, async {
        let gw = TestGateway::start(CONFIG).await;
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let (mut client, _) = gw.wt_welcomed("/chat").await;
        let epoch = client.join("h-wt").await["epoch"].clone();
        drop(client);
        publish_many(&mut publisher, "h-wt", 1, 2).await;
        publisher
            .send_binary(
                json!({"type":"publish","room":"h-wt","id":50}),
                &[0, 1, 2, 255],
            )
            .await;
        assert_eq!(publisher.recv().await["seq"], 3);
        let (mut client, _) = gw.wt_welcomed("/chat").await;
        let ack = client.request(recovering_join("h-wt", 0, &epoch)).await;
        assert_eq!(ack["recovered"], true, "{ack}");
        assert_eq!(client.recv().await["data"], 1);
        assert_eq!(client.recv().await["data"], 2);
        match client.next_frame().await {
            Some(WtFrame::Binary(frame)) => {
                let (header, payload) = split_binary(&frame).unwrap();
                assert_eq!(
                    header,
                    json!({"type":"message","room":"h-wt","seq":3,"from":header["from"]})
                );
                assert_eq!(payload, [0, 1, 2, 255]);
            }
            other => panic!("expected the binary message, got {other:?}"),
        }
        // WebSocket recovers the binary message as binary too.
        let (mut ws, _) = gw.ws_welcomed("/chat").await;
        let ack = ws.request(recovering_join("h-wt", 2, &epoch)).await;
        assert_eq!(ack["recovered"], true, "{ack}");
        match ws.next_data().await {
            tokio_tungstenite::tungstenite::Message::Binary(b) => {
                assert_eq!(split_binary(&b).unwrap().1, [0, 1, 2, 255]);
            }
            other => panic!("expected binary, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_a_recovering_join_are_neither_lost_nor_doubled() {
    within(120, async {
        let gw = TestGateway::start(CONFIG).await;
        let (mut first, _) = gw.ws_welcomed("/chat").await;
        let epoch = first.join("h-race").await["epoch"].clone();
        drop(first);
        // A publisher that never stops, on its own connection.
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let publishing = tokio::spawn(async move {
            for i in 0u64.. {
                publisher
                    .send(json!({"type":"publish","room":"h-race","data":i}))
                    .await;
                assert_eq!(publisher.recv().await["type"], "ack");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut last = 0u64;
        for round in 0..40 {
            let (mut client, _) = gw.ws_welcomed("/chat").await;
            let ack = client
                .request(recovering_join("h-race", last, &epoch))
                .await;
            assert_eq!(ack["recovered"], true, "round {round}: {ack}");
            // Every message after `last`, consecutive, whether replayed or live.
            let target = ack["seq"].as_u64().unwrap() + 3;
            while last < target {
                let m = client.recv().await;
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(
                    m["seq"].as_u64(),
                    Some(last + 1),
                    "round {round}: gap or duplicate"
                );
                last += 1;
            }
        }
        assert!(!publishing.is_finished(), "the publisher kept going");
        publishing.abort();
        assert!(last >= 40 * 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_epochs_long_gaps_and_expired_history_are_not_recovered() {
    within(60, async {
        let gw = TestGateway::start(CONFIG).await;
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let (mut client, _) = gw.ws_welcomed("/chat").await;
        let epoch = client.join("gap-a").await["epoch"].clone();
        client
            .request(json!({"type":"leave","room":"gap-a","id":2}))
            .await;
        publish_many(&mut publisher, "gap-a", 1, 5).await;
        // Wrong epoch: nothing replayed.
        let ack = client
            .request(recovering_join("gap-a", 4, &json!("not-the-epoch")))
            .await;
        assert_eq!(ack["recovered"], false, "{ack}");
        client.expect_silence(Duration::from_millis(200)).await;
        client
            .request(json!({"type":"leave","room":"gap-a","id":2}))
            .await;
        // Five missed, three kept: a gap.
        let ack = client.request(recovering_join("gap-a", 0, &epoch)).await;
        assert_eq!(ack["recovered"], false, "{ack}");
        client.expect_silence(Duration::from_millis(200)).await;
        client
            .request(json!({"type":"leave","room":"gap-a","id":2}))
            .await;
        // Within what is kept: recovered.
        let ack = client.request(recovering_join("gap-a", 3, &epoch)).await;
        assert_eq!(ack["recovered"], true, "{ack}");
        assert_eq!(client.recv().await["seq"], 4);
        assert_eq!(client.recv().await["seq"], 5);
        // History lives `history_ttl_secs` (1 s here); an empty room is forgotten one
        // lifetime later (swept every second): then its sequence restarts in a new epoch
        // and nothing can be recovered.
        let epoch = client.join("short-b").await["epoch"].clone();
        client
            .request(json!({"type":"leave","room":"short-b","id":2}))
            .await;
        publish_many(&mut publisher, "short-b", 1, 2).await;
        tokio::time::sleep(Duration::from_millis(4500)).await;
        let ack = client.request(recovering_join("short-b", 1, &epoch)).await;
        assert_eq!(ack["recovered"], false, "{ack}");
        assert_ne!(ack["epoch"], epoch);
        assert_eq!(ack["seq"], 0);
    })
    .await;
}
