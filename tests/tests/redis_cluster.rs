//! Cluster mode on a real Redis Cluster (what the single-Redis tests cannot show): rooms
//! on different masters with sharded pub/sub (a publish touches only its room's shard),
//! and a master failover that publishing survives without restarting a gateway, after
//! which a reconnecting client gets every missed message or `recovered: false`, never a
//! gap. The tests shared with one Redis are in `cluster.rs` (`::redis_cluster`).

use std::time::{Duration, Instant};

use gateway_tests::{redis_cluster::RedisCluster, *};
use serde_json::{json, Value};

fn node_config(cluster: &RedisCluster, heartbeat_secs: u64) -> String {
    format!(
        "[api]\nkey = \"k\"\n[cluster]\nredis_cluster = {}\nheartbeat_secs = {heartbeat_secs}\n\
         [[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 10000\nrate_burst = 10000\n\
         [[room]]\npattern = \"*\"\nhistory = 1000\nhistory_ttl_secs = 60\n",
        cluster.seeds_toml()
    )
}

/// The next `message` (presence events skipped).
async fn next_message(c: &mut WsClient) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == "message" {
            return m;
        }
    }
}

/// Two room names whose keys (and channels) live on different masters.
async fn rooms_on_two_masters(cluster: &RedisCluster) -> ((String, u16), (String, u16)) {
    let first = "shard-0".to_owned();
    let first_master = cluster
        .master_port_of(&format!("gw:{{room:{first}}}"))
        .await;
    for i in 1..100 {
        let room = format!("shard-{i}");
        let master = cluster.master_port_of(&format!("gw:{{room:{room}}}")).await;
        if master != first_master {
            return ((first, first_master), (room, master));
        }
    }
    panic!("no two rooms on different masters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_travels_only_within_its_room_s_shard() {
    within(120, async {
        let cluster = RedisCluster::start(3, 0).await;
        let ((one, one_master), (two, two_master)) = rooms_on_two_masters(&cluster).await;
        let a = TestGateway::start(&node_config(&cluster, 10)).await;
        let b = TestGateway::start(&node_config(&cluster, 10)).await;
        let (mut on_a, _) = a.ws_welcomed("/chat").await;
        let (mut on_b, _) = b.wt_welcomed("/chat").await;
        // Joins, skipping the presence events the other member's joins cause.
        for room in [&one, &two] {
            on_a.send(json!({"type":"join","room":room,"id":1})).await;
            while on_a.recv().await["type"] != "ack" {}
            on_b.send(json!({"type":"join","room":room,"id":1})).await;
            while on_b.recv().await["type"] != "ack" {}
        }
        // Each room's channel is subscribed (sharded) on its own master only, once per
        // gateway node.
        for (room, master, other) in [
            (&one, one_master, two_master),
            (&two, two_master, one_master),
        ] {
            let channel = format!("gw:{{room:{room}}}");
            assert_eq!(
                cluster.shard_subscribers(master, &channel).await,
                2,
                "{channel}"
            );
            assert_eq!(
                cluster.shard_subscribers(other, &channel).await,
                0,
                "{channel}"
            );
        }
        // 50 publishes to room one: SPUBLISH runs on its master, none on the other.
        let before = (
            cluster.spublish_calls(one_master).await,
            cluster.spublish_calls(two_master).await,
        );
        let (mut publisher, _) = b.ws_welcomed("/chat").await;
        for i in 1..=50u64 {
            let ack = publisher
                .request(json!({"type":"publish","room":one,"data":i,"id":i}))
                .await;
            assert_eq!(ack["seq"], i, "{ack}");
        }
        for i in 1..=50u64 {
            assert_eq!(next_message(&mut on_a).await["seq"], i);
            let mut m = on_b.recv().await;
            while m["type"] != "message" {
                m = on_b.recv().await;
            }
            assert_eq!(
                (m["room"].as_str(), m["seq"].as_u64()),
                (Some(one.as_str()), Some(i))
            );
        }
        let after = (
            cluster.spublish_calls(one_master).await,
            cluster.spublish_calls(two_master).await,
        );
        assert!(after.0 - before.0 >= 50, "{before:?} → {after:?}");
        assert_eq!(
            after.1, before.1,
            "the other shard saw nothing: {before:?} → {after:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_resumes_after_a_master_fails_over_and_recovery_never_hides_a_gap() {
    within(180, async {
        // GATEWAY_TEST_LOG=info shows the nodes' logs (their resubscriptions) on failure.
        if let Ok(filter) = std::env::var("GATEWAY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut cluster = RedisCluster::start(3, 1).await;
        let a = TestGateway::start(&node_config(&cluster, 1)).await;
        let b = TestGateway::start(&node_config(&cluster, 1)).await;
        let room = "failover";
        let (mut member, _) = a.ws_welcomed("/chat").await;
        let epoch = member.join(room).await["epoch"].clone();
        let (mut publisher, _) = b.ws_welcomed("/chat").await;
        for i in 1..=20u64 {
            let ack = publisher
                .request(json!({"type":"publish","room":room,"data":i,"id":i}))
                .await;
            assert_eq!(ack["seq"], i, "{ack}");
        }
        for i in 1..=20u64 {
            assert_eq!(next_message(&mut member).await["seq"], i);
        }

        let master = cluster.master_port_of(&format!("gw:{{room:{room}}}")).await;
        let killed = Instant::now();
        cluster.kill_master_and_wait_failover(master).await;
        assert_ne!(
            cluster.master_port_of(&format!("gw:{{room:{room}}}")).await,
            master
        );
        // Publishing resumes within 10 s of the kill, with no gateway restarted.
        let mut id = 100;
        let resumed = loop {
            id += 1;
            let ack = publisher
                .request(json!({"type":"publish","room":room,"data":"after","id":id}))
                .await;
            if ack["type"] == "ack" {
                break ack;
            }
            assert_eq!(ack["code"], "internal", "{ack}");
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "still failing: {ack}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{:?}",
            killed.elapsed()
        );
        // The member on the other node cannot continue its sequence: the room restarted in
        // a new epoch on the promoted replica (which may lack the failed master's last
        // writes). It is told so (`resync`, never left to skip silently), stays a member
        // and gets what follows live.
        let resync = loop {
            let f = member.recv().await;
            assert_ne!(
                f["type"], "message",
                "a message across the epoch change: {f}"
            );
            if f["type"] == "resync" {
                break f;
            }
        };
        assert_eq!(resync["reason"], "continuity", "{resync}");
        assert_eq!(resync["room"], room, "{resync}");
        assert_ne!(resync["epoch"], epoch, "{resync}");
        let after = resync["seq"].as_u64().expect("seq");
        let live = publisher
            .request(json!({"type":"publish","room":room,"data":"live","id":999}))
            .await;
        assert_eq!(live["type"], "ack", "{live}");
        // Live from then on: every message is after the latest `resync` (a second one may
        // come if the subscription drops again while the cluster settles, and then accounts
        // for what it skipped).
        let live_seq = live["seq"].as_u64().expect("seq");
        let mut after = after;
        loop {
            let f = member.recv().await;
            match f["type"].as_str() {
                Some("message") => {
                    let seq = f["seq"].as_u64().unwrap();
                    assert!(seq > after, "{f} after a resync to {after}");
                    after = seq;
                    if f["data"] == "live" {
                        break;
                    }
                }
                Some("resync") => {
                    after = f["seq"].as_u64().unwrap();
                    if after >= live_seq {
                        break;
                    }
                }
                _ => {}
            }
        }

        // A client that saw up to 20 in the old epoch: every missed message, or
        // `recovered: false` (the room's history may lack the failed master's last
        // writes), never a gap.
        let (mut back, _) = b.ws_welcomed("/chat").await;
        let ack = back
            .request(json!({"type":"join","room":room,"id":1,"since":20,"epoch":epoch}))
            .await;
        // After a failover the room always restarts in a new epoch: `recovered: false`,
        // and the new epoch holds what was published since.
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["recovered"], false, "{ack}");
        assert_ne!(ack["epoch"], epoch, "{ack}");
        assert_eq!(ack["seq"], live["seq"], "{ack}");
        assert!(
            live["seq"].as_u64() > resumed["seq"].as_u64(),
            "{live} {resumed}"
        );
    })
    .await;
}
