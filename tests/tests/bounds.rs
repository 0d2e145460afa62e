//! Bounds under abuse, round 2 (issue 20), on the real binary so that its resident memory
//! can be read: recovery replays, presence listings and new rooms cannot make one node hold
//! memory without bound, and a bystander is served within a second throughout.

use std::time::Duration;

use gateway_tests::*;
use serde_json::{json, Value};

/// A bystander joins a fresh room, publishes and receives its own message, each within a
/// second.
async fn bystander_is_served(gw: &RunningGateway, room: &str) {
    let started = std::time::Instant::now();
    let mut b = gw.ws_welcomed("/chat").await;
    let ack = b.request(json!({"type":"join","room":room,"id":1})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    b.send(json!({"type":"publish","room":room,"data":"ok","echo":true,"id":2}))
        .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(b.recv().await);
    }
    assert!(
        got.iter()
            .any(|f| f["type"] == "message" && f["data"] == "ok"),
        "{got:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "bystander served in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_replays_do_not_pile_up_in_a_session_that_never_reads() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let gw = RunningGateway::start_with(
            dir.path(),
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 100000\nrate_burst = 100000\n[[room]]\npattern = \"*\"\nhistory = 1000\nhistory_ttl_secs = 300\n",
        )
        .await;
        // A room with a long history of 1 KB messages.
        let mut filler = gw.ws_welcomed("/chat").await;
        let epoch = filler.join("long").await["epoch"].clone();
        let data = "x".repeat(1000);
        for i in 0..1000 {
            filler
                .send(json!({"type":"publish","room":"long","data":data,"id":i}))
                .await;
        }
        let last = loop {
            let f = filler.recv().await;
            if f["type"] == "ack" && f["id"] == 999 {
                break f;
            }
        };
        assert_eq!(last["seq"], 1000);
        let baseline = gw.rss_kib();
        // One session loops join since=0 / leave and never reads what it is sent.
        let mut attacker = gw.ws_welcomed("/chat").await;
        for i in 0..3000 {
            attacker
                .send(json!({"type":"join","room":"long","since":0,"epoch":epoch,"id":i}))
                .await;
            attacker
                .send(json!({"type":"leave","room":"long","id":i}))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = gw.rss_kib();
        println!("replay loop x3000: RSS {baseline} KiB -> {peak} KiB");
        bystander_is_served(&gw, "elsewhere").await;
        // Unbounded, 3,000 replays of 1,000 frames each would be queued (over 100 MB of
        // queue slots alone); bounded, the session holds at most one replay and its
        // queue's bytes.
        assert!(
            peak < baseline + 30 * 1024,
            "RSS {baseline} KiB -> {peak} KiB"
        );
        // The replay (1,000 × 1 KB) does not fit the session's queue (`queue_bytes`, 1 MiB):
        // every join said `recovered: false` and replayed nothing; reading the attacker's
        // stream now finds acks only, up to a marker (or the close its full queue earned).
        attacker
            .send(json!({"type":"ping","id":SILENCE_MARKER}))
            .await;
        let (mut replayed, mut recovered) = (0, 0);
        loop {
            let next = tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut attacker.ws));
            match next.await {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    replayed += u64::from(v["type"] == "message");
                    recovered += u64::from(v["recovered"] == true);
                    if v["type"] == "pong" {
                        break;
                    }
                }
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))) | Ok(None) => break,
                Ok(Some(Ok(_))) => {}
                other => panic!("reading the attacker's stream: {other:?}"),
            }
        }
        assert_eq!((replayed, recovered), (0, 0), "replays larger than the queue");
        // A client that reads gets its replay, exactly, once.
        let mut reader = gw.ws_welcomed("/chat").await;
        let ack = reader
            .request(json!({"type":"join","room":"long","since":990,"epoch":epoch,"id":1}))
            .await;
        assert_eq!(ack["recovered"], true, "{ack}");
        for seq in 991..=1000 {
            assert_eq!(reader.recv().await["seq"], seq);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_listings_are_cut_and_bounded_in_bytes() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let gw = RunningGateway::start_with(
            dir.path(),
            "[limits]\nmax_presence_members = 50\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 100000\nrate_burst = 100000\n[[room]]\npattern = \"*\"\npresence_events = false\n",
        )
        .await;
        let mut members = Vec::new();
        for _ in 0..300 {
            let mut m = gw.ws_welcomed("/chat").await;
            m.join("crowd").await;
            members.push(m);
        }
        let mut asker = gw.ws_welcomed("/chat").await;
        let ack = asker
            .request(json!({"type":"presence","room":"crowd","id":1}))
            .await;
        assert_eq!(ack["count"], 300, "{}", ack["count"]);
        assert_eq!(ack["truncated"], true);
        assert_eq!(ack["members"].as_array().unwrap().len(), 50);
        let baseline = gw.rss_kib();
        // Four sessions that never read ask for the listing again and again.
        let mut flooders = Vec::new();
        for _ in 0..4 {
            let mut f = gw.ws_welcomed("/chat").await;
            for i in 0..3000 {
                f.send(json!({"type":"presence","room":"crowd","id":i}))
                    .await;
            }
            flooders.push(f);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = gw.rss_kib();
        println!("4 x 3000 presence listings unread: RSS {baseline} KiB -> {peak} KiB");
        bystander_is_served(&gw, "quiet").await;
        // Each flooder's queue holds at most `queue_bytes` (1 MiB).
        assert!(
            peak < baseline + 30 * 1024,
            "RSS {baseline} KiB -> {peak} KiB"
        );
        drop(flooders);
        drop(members);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rooms_are_rate_limited_and_bounded_by_the_budget() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let gw = RunningGateway::start_with(
            dir.path(),
            "[api]\nkey = \"k\"\n[limits]\nroom_budget_mb = 1\nrooms_per_user_per_sec = 5\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 100000\nrate_burst = 100000\n[[room]]\npattern = \"*\"\nhistory = 10\nhistory_ttl_secs = 300\n",
        )
        .await;
        // One session publishing to new rooms: a burst of twice the rate, then refusals.
        let mut c = gw.ws_welcomed("/chat").await;
        let mut refused: Option<Value> = None;
        for i in 0..100 {
            let reply = c
                .request(json!({"type":"publish","room":format!("new-{i}"),"data":1,"id":i}))
                .await;
            if reply["type"] == "error" {
                refused = Some(reply);
                break;
            }
        }
        let refused = refused.expect("refused at some point");
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        assert_eq!(refused["id"], 10, "after a burst of 10: {refused}");
        assert_eq!(refused["message"], "too many new rooms: at most 5 per second");
        // The API has no user rate, but the budget (1 MiB) bounds every room with history.
        let baseline = gw.rss_kib();
        let mut created = 0;
        let refusal = loop {
            let body = json!({"room": format!("api-{created}"), "data": created}).to_string();
            let (status, reply) = https_request(
                gw.addr,
                &gw.cert,
                "POST",
                "/api/publish",
                &[("authorization", "Bearer k"), ("content-type", "application/json")],
                &body,
            )
            .await
            .expect("HTTPS request");
            if status != 200 {
                break (status, reply);
            }
            created += 1;
            assert!(created < 5000, "the budget never ran out");
        };
        assert_eq!(refusal.0, 429, "{refusal:?}");
        assert!(refusal.1.contains("room budget exhausted"), "{refusal:?}");
        assert!(
            (600..1024).contains(&created),
            "{created} rooms in 1 MiB at about 1.2 KB each"
        );
        let peak = gw.rss_kib();
        println!("{created} API rooms until the 1 MiB budget: RSS {baseline} KiB -> {peak} KiB");
        bystander_is_served(&gw, "api-0").await;
        assert!(
            peak < baseline + 20 * 1024,
            "RSS {baseline} KiB -> {peak} KiB"
        );
    })
    .await;
}
