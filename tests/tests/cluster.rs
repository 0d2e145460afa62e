//! Cluster mode on a real `redis-server`: rooms across nodes and transports in one order,
//! recovery on another node, direct messages across nodes, and a Redis outage (errors
//! during, delivery after, no restart of any gateway). The nodes are real gateways on
//! their own listeners, started in this process.

use std::time::Duration;

use gateway_tests::{redis_cluster::RedisCluster, *};
use serde_json::{json, Value};

/// The Redis the nodes share: one `redis-server`, or a Redis Cluster of three masters.
enum Backplane {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Backplane {
    /// Its `[cluster]` key.
    fn config(&self) -> String {
        match self {
            Backplane::One(r) => format!("redis = \"{}\"", r.url()),
            Backplane::Cluster(c) => format!("redis_cluster = {}", c.seeds_toml()),
        }
    }

    /// The single `redis-server` (tests that stop and restart it).
    fn one(&mut self) -> &mut RedisServer {
        match self {
            Backplane::One(r) => r,
            Backplane::Cluster(_) => panic!("a single redis-server test"),
        }
    }
}

/// Runs the test body `NAME_on` against one Redis (`NAME::one_redis`) and against a Redis
/// Cluster of three masters (`NAME::redis_cluster`).
macro_rules! on_both_backplanes {
    ($name:ident, $body:ident, $secs:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_redis() {
                within($secs, async {
                    $body(Backplane::One(RedisServer::start().await)).await
                })
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                within($secs, async {
                    $body(Backplane::Cluster(RedisCluster::start(3, 0).await)).await
                })
                .await;
            }
        }
    };
}

fn node_config(redis: &Backplane) -> String {
    node_config_beating(redis, 10)
}

/// A node's configuration with a cluster heartbeat of `heartbeat_secs`.
fn node_config_beating(redis: &Backplane, heartbeat_secs: u64) -> String {
    format!(
        "[api]\nkey = \"k\"\n[cluster]\n{}\nheartbeat_secs = {heartbeat_secs}\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 10000\nrate_burst = 10000\n[[room]]\npattern = \"*\"\nhistory = 100\nhistory_ttl_secs = 60\n",
        redis.config()
    )
}

/// Reads until a `resync` arrives; no `message` may come before it (it would cross the
/// epoch change silently).
async fn next_resync(c: &mut WsClient) -> Value {
    loop {
        let f = c.recv().await;
        assert_ne!(
            f["type"], "message",
            "a message across the epoch change: {f}"
        );
        if f["type"] == "resync" {
            return f;
        }
    }
}

/// Reads messages until one of `room` arrives (presence events are skipped).
async fn next_message(c: &mut WsClient) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == "message" {
            return m;
        }
    }
}

on_both_backplanes!(
    a_room_spans_nodes_and_transports_in_one_order,
    a_room_spans_nodes_and_transports_in_one_order_on,
    60
);

async fn a_room_spans_nodes_and_transports_in_one_order_on(redis: Backplane) {
    let a = TestGateway::start(&node_config(&redis)).await;
    let b = TestGateway::start(&node_config(&redis)).await;
    let c = TestGateway::start(&node_config(&redis)).await;
    let (mut on_a, _) = a.ws_welcomed("/chat").await;
    let (mut on_b, _) = b.ws_welcomed("/chat").await;
    let (mut wt_on_c, _) = c.wt_welcomed("/chat").await;
    on_a.join("c-room").await;
    on_b.join("c-room").await;
    wt_on_c.join("c-room").await;
    // Publishers on both nodes, interleaved.
    let (mut pub_a, _) = a.ws_welcomed("/chat").await;
    let (mut pub_c, _) = c.ws_welcomed("/chat").await;
    let mut acked = Vec::new();
    for i in 0..10 {
        let publisher = if i % 2 == 0 { &mut pub_a } else { &mut pub_c };
        let ack = publisher
            .request(json!({"type":"publish","room":"c-room","data":i,"id":i}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(ack["seq"].as_u64().unwrap());
    }
    assert_eq!(
        acked,
        (1..=10).collect::<Vec<u64>>(),
        "one cluster-wide sequence"
    );
    for expected in 1..=10u64 {
        let m = next_message(&mut on_a).await;
        assert_eq!(
            (m["seq"].as_u64(), m["data"].as_u64()),
            (Some(expected), Some(expected - 1))
        );
        assert_eq!(
            next_message(&mut on_b).await["seq"].as_u64(),
            Some(expected)
        );
        let mut w = wt_on_c.recv().await;
        while w["type"] != "message" {
            w = wt_on_c.recv().await;
        }
        assert_eq!(w["seq"].as_u64(), Some(expected));
    }
    // The HTTP API of one node publishes to members on every node.
    let (status, body) = b
        .https(
            "POST",
            "/api/publish",
            &[("Authorization", "Bearer k")],
            r#"{"room":"c-room","data":"api"}"#,
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"seq":11}"#));
    assert_eq!(next_message(&mut on_a).await["data"], "api");
}

on_both_backplanes!(
    publishes_racing_a_recovering_join_on_another_node_are_neither_lost_nor_doubled,
    publishes_racing_a_recovering_join_on_another_node_are_neither_lost_nor_doubled_on,
    120
);

async fn publishes_racing_a_recovering_join_on_another_node_are_neither_lost_nor_doubled_on(
    redis: Backplane,
) {
    let a = TestGateway::start(&node_config(&redis)).await;
    let b = TestGateway::start(&node_config(&redis)).await;
    let (mut first, _) = b.ws_welcomed("/chat").await;
    let epoch = first.join("c-race").await["epoch"].clone();
    drop(first);
    // A publisher on node A that never stops.
    let (mut publisher, _) = a.ws_welcomed("/chat").await;
    let publishing = tokio::spawn(async move {
        for i in 0u64.. {
            publisher
                .send(json!({"type":"publish","room":"c-race","data":i}))
                .await;
            assert_eq!(publisher.recv().await["type"], "ack");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut last = 0u64;
    for round in 0..20 {
        // Alternate nodes: recovery reads the stream, live frames come from the channel.
        let node = if round % 2 == 0 { &b } else { &a };
        let (mut client, _) = node.ws_welcomed("/chat").await;
        let ack = client
            .request(json!({"type":"join","room":"c-race","id":99,"since":last,"epoch":epoch}))
            .await;
        assert_eq!(ack["recovered"], true, "round {round}: {ack}");
        let target = ack["seq"].as_u64().unwrap() + 3;
        while last < target {
            let m = next_message(&mut client).await;
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
}

on_both_backplanes!(
    a_client_recovers_on_another_node_and_direct_messages_cross_nodes,
    a_client_recovers_on_another_node_and_direct_messages_cross_nodes_on,
    60
);

async fn a_client_recovers_on_another_node_and_direct_messages_cross_nodes_on(redis: Backplane) {
    let a = TestGateway::start(&node_config(&redis)).await;
    let b = TestGateway::start(&node_config(&redis)).await;
    let (mut client, _) = a.ws_welcomed("/chat").await;
    let ack = client.join("c-recover").await;
    let epoch = ack["epoch"].clone();
    drop(client);
    let (mut publisher, _) = b.ws_welcomed("/chat").await;
    for i in 1..=5 {
        let ack = publisher
            .request(json!({"type":"publish","room":"c-recover","data":i,"id":i}))
            .await;
        assert_eq!(ack["seq"], i, "{ack}");
    }
    // Back on the other node, with what it saw.
    let (mut client, _) = b.ws_welcomed("/chat").await;
    let ack = client
        .request(json!({"type":"join","room":"c-recover","id":9,"since":0,"epoch":epoch}))
        .await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["seq"].as_u64()),
        (Some(true), Some(5)),
        "{ack}"
    );
    for i in 1..=5u64 {
        assert_eq!(next_message(&mut client).await["seq"].as_u64(), Some(i));
    }
    let ack = client
        .request(json!({"type":"leave","room":"c-recover","id":10}))
        .await;
    assert_eq!(ack["type"], "ack");
    let ack = client
        .request(json!({"type":"join","room":"c-recover","id":11,"since":2,"epoch":"another"}))
        .await;
    assert_eq!(ack["recovered"], false, "{ack}");

    // Direct messages: a user on node B, a sender on node A.
    let (mut receiver, welcome) = b.ws_welcomed("/chat").await;
    let user = welcome["user"].as_str().unwrap().to_owned();
    let (mut sender, _) = a.ws_welcomed("/chat").await;
    let ack = sender
        .request(json!({"type":"send","to":user,"data":"hi","id":1}))
        .await;
    assert_eq!(ack["delivered"], true, "{ack}");
    let direct = receiver.recv().await;
    assert_eq!(
        (direct["type"].as_str(), direct["data"].as_str()),
        (Some("direct"), Some("hi"))
    );
    let ack = sender
        .request(json!({"type":"send","to":"nobody","data":"x","id":2}))
        .await;
    assert_eq!(ack["delivered"], false, "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_gives_errors_then_delivery_resumes_without_restarts() {
    within(90, async {
        let mut redis = Backplane::One(RedisServer::start().await);
        let a = TestGateway::start(&node_config_beating(&redis, 1)).await;
        let b = TestGateway::start(&node_config_beating(&redis, 1)).await;
        let (mut member, _) = b.ws_welcomed("/chat").await;
        let epoch = member.join("c-outage").await["epoch"].clone();
        // A member of a room nobody publishes to during the outage.
        let (mut quiet, quiet_welcome) = b.ws_welcomed("/chat").await;
        quiet.join("c-quiet").await;
        let (mut publisher, _) = a.ws_welcomed("/chat").await;
        let ack = publisher
            .request(json!({"type":"publish","room":"c-outage","data":1,"id":1}))
            .await;
        assert_eq!(ack["seq"], 1);
        assert_eq!(next_message(&mut member).await["data"], 1);

        redis.one().stop();
        let reply = publisher
            .request(json!({"type":"publish","room":"c-outage","data":2,"id":2}))
            .await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some("internal")),
            "{reply}"
        );
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .contains("cluster unavailable"),
            "{reply}"
        );
        // Health says degraded once the subscription notices.
        let mut degraded = false;
        for _ in 0..50 {
            let (status, body) = a.https("GET", "/healthz", &[], "").await;
            if status == 200 && body.starts_with("degraded") {
                degraded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(degraded, "/healthz must say degraded while redis is down");
        // The sessions stay open.
        assert_eq!(
            member.request(json!({"type":"ping","id":5})).await["type"],
            "pong"
        );
        // A join the cluster cannot take is refused and leaves nothing behind.
        let refused = member
            .request(json!({"type":"join","room":"c-elsewhere","id":6}))
            .await;
        assert_eq!(refused["code"], "internal", "{refused}");
        let leave = member
            .request(json!({"type":"leave","room":"c-elsewhere","id":7}))
            .await;
        assert_eq!(leave["code"], "not_member", "{leave}");

        redis.one().restart().await;
        // Delivery resumes: the nodes reconnect and re-subscribe by themselves.
        let mut resumed = false;
        for i in 0..100 {
            let reply = publisher
                .request(json!({"type":"publish","room":"c-outage","data":"back","id":100 + i}))
                .await;
            if reply["type"] == "ack" {
                resumed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(resumed, "publishing must work again after redis is back");
        // Redis came back without its data: the room restarted in a new epoch, which the
        // member's sequence cannot continue. Node B checked its rooms when its subscription
        // came back and told the member so (`resync`) rather than let it skip silently; the
        // member stays in the room and its session stays open.
        let resync = next_resync(&mut member).await;
        assert_eq!(resync["room"], "c-outage", "{resync}");
        assert_eq!(resync["reason"], "continuity", "{resync}");
        assert_ne!(resync["epoch"], epoch, "a new epoch: {resync}");
        let after = resync["seq"].as_u64().expect("seq");
        let ack = publisher
            .request(json!({"type":"publish","room":"c-outage","data":"again","id":500}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        // Live after the resync: only messages after its `seq` (the first publish after
        // the restart may come first).
        loop {
            let m = next_message(&mut member).await;
            assert!(m["seq"].as_u64().unwrap() > after, "{m} after {resync}");
            if m["data"] == "again" {
                break;
            }
        }
        // Rejoining elsewhere with what it saw before: not recovered (the history went
        // with Redis's data), and live from then on.
        let (mut back, _) = b.ws_welcomed("/chat").await;
        let ack = back
            .request(json!({"type":"join","room":"c-outage","id":1,"since":1,"epoch":epoch}))
            .await;
        assert_eq!(ack["recovered"], false, "{ack}");
        let ack = publisher
            .request(json!({"type":"publish","room":"c-outage","data":"more","id":501}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(next_message(&mut back).await["data"], "more");
        assert_eq!(next_message(&mut member).await["data"], "more");
        let (status, body) = a.https("GET", "/healthz", &[], "").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        // The member of the quiet room gets `resync` as well (Redis lost every room's
        // state, so no room on node B can continue its sequence), and stays.
        let resync = next_resync(&mut quiet).await;
        assert_eq!(resync["room"], "c-quiet", "{resync}");
        assert_eq!(
            quiet.request(json!({"type":"ping","id":9})).await["type"],
            "pong"
        );
        let _ = quiet_welcome;
    })
    .await;
}

on_both_backplanes!(
    presence_is_cluster_wide_and_a_killed_node_s_members_leave,
    presence_is_cluster_wide_and_a_killed_node_s_members_leave_on,
    90
);

async fn presence_is_cluster_wide_and_a_killed_node_s_members_leave_on(redis: Backplane) {
    let config = node_config_beating(&redis, 1);
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let (mut watcher, watcher_welcome) = a.ws_welcomed("/chat").await;
    watcher.join("c-presence").await;
    // A user with a tab on node B: one `join` for the user, listed on every node.
    let (mut tab, welcome) = b.ws_welcomed("/chat").await;
    let user = welcome["user"].as_str().unwrap().to_owned();
    let ack = tab.join("c-presence").await;
    assert_eq!(ack["members"], 2, "{ack}");
    let event = watcher.recv().await;
    assert_eq!(
        event,
        json!({"type":"presence","room":"c-presence","event":"join","user":user})
    );
    let listed = watcher
        .request(json!({"type":"presence","room":"c-presence","id":3}))
        .await;
    let mut users: Vec<String> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    let mut expected = vec![
        user.clone(),
        watcher_welcome["user"].as_str().unwrap().to_owned(),
    ];
    expected.sort();
    assert_eq!(users, expected, "{listed}");
    let (status, body) = a
        .https(
            "GET",
            "/api/rooms/c-presence",
            &[("Authorization", "Bearer k")],
            "",
        )
        .await;
    assert_eq!(status, 200);
    let nodes: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(nodes["members"].as_array().unwrap().len(), 2, "{body}");
    drop(tab);
    let event = watcher.recv().await;
    assert_eq!(
        event,
        json!({"type":"presence","room":"c-presence","event":"leave","user":user})
    );

    // A node killed without a goodbye: its members leave within 3 heartbeats.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node-c.toml");
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:0\"\nnode_id = \"node-c\"\n{config}"),
    )
    .unwrap();
    let mut c = RunningGateway::start(&file, dir.path()).await;
    let mut doomed = WsClient::connect(c.addr, &c.cert, "/chat", &[])
        .await
        .unwrap();
    let doomed_user = doomed.recv().await["user"].as_str().unwrap().to_owned();
    let seen = doomed.join("c-presence").await;
    let event = watcher.recv().await;
    assert_eq!(event["event"], "join");
    c.stop(); // SIGKILL
    let started = std::time::Instant::now();
    let event = tokio::time::timeout(Duration::from_secs(8), watcher.recv())
        .await
        .expect("the dead node's member leaves");
    assert_eq!(
        event,
        json!({"type":"presence","room":"c-presence","event":"leave","user":doomed_user})
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let listed = watcher
        .request(json!({"type":"presence","room":"c-presence","id":4}))
        .await;
    assert_eq!(listed["members"].as_array().unwrap().len(), 1, "{listed}");
    // Published while the client's node is dead; it comes back on node A with `since`.
    for i in 1..=3 {
        let ack = watcher
            .request(json!({"type":"publish","room":"c-presence","data":i,"id":20 + i}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (mut back, _) = a.ws_welcomed("/chat").await;
    let ack = back
            .request(json!({"type":"join","room":"c-presence","id":7,"since":seen["seq"],"epoch":seen["epoch"]}))
            .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let first = seen["seq"].as_u64().unwrap();
    for expected in first + 1..=first + 3 {
        assert_eq!(
            next_message(&mut back).await["seq"].as_u64(),
            Some(expected)
        );
    }
}

on_both_backplanes!(
    a_ticket_minted_on_one_node_is_redeemed_once_on_any_node,
    a_ticket_minted_on_one_node_is_redeemed_once_on_any_node_on,
    60
);

async fn a_ticket_minted_on_one_node_is_redeemed_once_on_any_node_on(redis: Backplane) {
    let config = format!(
        "{AUTH_SECTION}[cluster]\n{}\n[[endpoint]]\npath = \"/chat\"\n",
        redis.config()
    );
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let bearer = format!("Bearer {}", token("tess", 300, json!({})));
    let (status, body) = a
        .https("POST", "/api/tickets", &[("Authorization", &bearer)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let ticket = serde_json::from_str::<Value>(&body).unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_session, welcome) = b.ws_welcomed(&format!("/chat?ticket={ticket}")).await;
    assert_eq!(welcome["user"], "tess");
    for node in [&a, &b] {
        let e = node
            .ws(&format!("/chat?ticket={ticket}"))
            .await
            .err()
            .expect("used once");
        assert_eq!(http_status(&e), Some(401));
    }
    // The per-user cap of 16 unredeemed tickets holds cluster-wide (the redeemed one no
    // longer counts).
    let mut statuses = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        statuses.push(
            node.https("POST", "/api/tickets", &[("Authorization", &bearer)], "")
                .await
                .0,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        16,
        "{statuses:?}"
    );
    assert!(statuses[16..].iter().all(|s| *s == 429), "{statuses:?}");
}

on_both_backplanes!(
    the_per_user_connection_limit_holds_across_nodes_and_transports,
    the_per_user_connection_limit_holds_across_nodes_and_transports_on,
    90
);

async fn the_per_user_connection_limit_holds_across_nodes_and_transports_on(redis: Backplane) {
    let config = format!(
        "{AUTH_SECTION}[limits]\nmax_connections_per_user = 2\n[cluster]\n{}\n\
             [[endpoint]]\npath = \"/chat\"\n\
             [[endpoint]]\npath = \"/fm\"\nauth = \"first-message\"\nauth_timeout_secs = 20\n",
        redis.config()
    );
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let jwt = token("uma", 300, json!({}));
    let chat = format!("/chat?token={jwt}");
    // One session on each node, one per transport.
    let (first, _) = a.ws_welcomed(&chat).await;
    let (_second, welcome) = b.wt_welcomed(&chat).await;
    assert_eq!(welcome["user"], "uma");
    for node in [&a, &b] {
        let e = node.ws(&chat).await.err().expect("over the limit");
        assert_eq!(http_status(&e), Some(429), "{e}");
    }
    // Other users are not affected.
    b.ws_welcomed(&format!("/chat?token={}", token("vic", 300, json!({}))))
        .await;

    // First-message auth over the limit: `limit_exceeded`, the session stays pending,
    // and a join sent right behind the auth is handled after it (still unauthorized).
    let mut pending = b.ws("/fm").await.unwrap();
    pending
        .send(json!({"type":"auth","id":1,"token":jwt}))
        .await;
    pending
        .send(json!({"type":"join","room":"c-limit","id":2}))
        .await;
    let refused = pending.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_i64()),
        (Some("limit_exceeded"), Some(1)),
        "{refused}"
    );
    let join = pending.recv().await;
    assert_eq!(
        (join["code"].as_str(), join["id"].as_i64()),
        (Some("unauthorized"), Some(2)),
        "{join}"
    );

    // A session on node A ends: its place is free on node B.
    drop(first);
    let mut admitted = false;
    for attempt in 0..50 {
        pending
            .send(json!({"type":"auth","id":10 + attempt,"token":jwt}))
            .await;
        pending
            .send(json!({"type":"join","room":"c-limit","id":100 + attempt}))
            .await;
        let reply = pending.recv().await;
        if reply["type"] == "ack" {
            assert_eq!(reply["id"], 10 + attempt);
            let welcome = pending.recv().await;
            assert_eq!(
                (welcome["type"].as_str(), welcome["user"].as_str()),
                (Some("welcome"), Some("uma")),
                "{welcome}"
            );
            let join = pending.recv().await;
            assert_eq!(
                (join["type"].as_str(), join["id"].as_i64()),
                (Some("ack"), Some(100 + attempt)),
                "the join queued behind the auth runs after it: {join}"
            );
            admitted = true;
            break;
        }
        assert_eq!(reply["code"], "limit_exceeded", "{reply}");
        assert_eq!(pending.recv().await["code"], "unauthorized");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admitted,
        "the released slot must be usable on the other node"
    );
    // The user is at the limit again, on both nodes.
    for node in [&a, &b] {
        let e = node.ws(&chat).await.err().expect("over the limit");
        assert_eq!(http_status(&e), Some(429), "{e}");
    }
}

/// Runs `redis-cli -p PORT ARGS...` and returns its output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_subscription_past_the_history_resyncs_its_members() {
    within(90, async {
        let redis = RedisServer::start().await;
        let port = redis.port;
        // Node B reaches Redis as its own user, so that it alone can be cut off.
        assert_eq!(
            redis_cli(port, &["ACL", "SETUSER", "nodeb", "on", ">pw", "~*", "&*", "+@all"]),
            "OK"
        );
        let config = |url: String| {
            format!(
                "[cluster]\nredis = \"{url}\"\nheartbeat_secs = 10\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 10000\nrate_burst = 10000\n[[room]]\npattern = \"*\"\nhistory = 3\nhistory_ttl_secs = 60\n"
            )
        };
        let a = TestGateway::start(&config(redis.url())).await;
        let b = TestGateway::start(&config(format!("redis://nodeb:pw@127.0.0.1:{port}"))).await;
        let (mut member, _) = b.ws_welcomed("/chat").await;
        let joined = member.join("c-gap").await;
        let epoch = joined["epoch"].clone();
        let (mut other, _) = b.ws_welcomed("/chat").await;
        other.join("c-untouched").await;
        let (mut publisher, _) = a.ws_welcomed("/chat").await;
        let ack = publisher
            .request(json!({"type":"publish","room":"c-gap","data":0,"id":1}))
            .await;
        assert_eq!(ack["seq"], 1, "{ack}");
        assert_eq!(next_message(&mut member).await["seq"], 1);
        // Node B loses Redis (its subscription included) while ten messages are published:
        // more than the room's history of three holds.
        redis_cli(port, &["ACL", "SETUSER", "nodeb", "off"]);
        redis_cli(port, &["CLIENT", "KILL", "USER", "nodeb"]);
        for i in 2..=11 {
            let ack = publisher
                .request(json!({"type":"publish","room":"c-gap","data":i,"id":i}))
                .await;
            assert_eq!(ack["seq"], i, "{ack}");
        }
        redis_cli(port, &["ACL", "SETUSER", "nodeb", "on"]);
        // Back, node B cannot deliver 2..=8 (gone from the history): the member is told so,
        // in the same epoch, and stays.
        let resync = next_resync(&mut member).await;
        assert_eq!(
            (&resync["room"], &resync["reason"], &resync["epoch"], &resync["seq"]),
            (&json!("c-gap"), &json!("continuity"), &epoch, &json!(11)),
            "{resync}"
        );
        let ack = publisher
            .request(json!({"type":"publish","room":"c-gap","data":"after","id":50}))
            .await;
        assert_eq!(ack["seq"], 12, "{ack}");
        let after = next_message(&mut member).await;
        assert_eq!((&after["seq"], &after["data"]), (&json!(12), &json!("after")));
        // The member of a room that missed nothing is left alone.
        other.expect_silence(Duration::from_millis(300)).await;
    })
    .await;
}

on_both_backplanes!(
    a_publish_rewritten_by_the_backend_is_what_every_node_delivers_and_history_keeps,
    a_publish_rewritten_by_the_backend_is_what_every_node_delivers_and_history_keeps_on,
    60
);

/// Upstream calls in cluster mode (PROTOCOL.md section 10): the node holding the publishing
/// session calls the backend, and the message the backend rewrote is the one members on
/// every node receive and the room's history replays; a skipped publish takes no seq.
async fn a_publish_rewritten_by_the_backend_is_what_every_node_delivers_and_history_keeps_on(
    redis: Backplane,
) {
    let backend = gateway_tests::backend::Backend::start().await;
    backend
        .script(json!([
            {"event":"publish","match":{"data":{"text":"raw"}},"json":{"data":{"text":"clean"}}},
            {"event":"publish","match":{"data":{"text":"spam"}},"json":{"skip":true}}
        ]))
        .await;
    let config = format!(
        "{}[[endpoint]]\npath = \"/up\"\nauth = \"none\"\n[endpoint.upstream]\nurl = \"{}\"\nevents = [\"publish\"]\n",
        node_config(&redis),
        backend.url()
    );
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let (mut on_b, _) = b.ws_welcomed("/chat").await;
    let epoch = on_b.join("c-upstream").await["epoch"].clone();
    let (mut wt_on_a, _) = a.wt_welcomed("/chat").await;
    wt_on_a.join("c-upstream").await;
    let (mut publisher, welcome) = a.ws_welcomed("/up").await;

    let ack = publisher
        .request(json!({"type":"publish","room":"c-upstream","id":1,"data":{"text":"raw"}}))
        .await;
    assert_eq!(ack, json!({"type":"ack","id":1,"seq":1}));
    let ack = publisher
        .request(json!({"type":"publish","room":"c-upstream","id":2,"data":{"text":"spam"}}))
        .await;
    assert_eq!(ack, json!({"type":"ack","id":2}), "skipped: no seq");
    let ack = publisher
        .request(json!({"type":"publish","room":"c-upstream","id":3,"data":{"text":"as sent"}}))
        .await;
    assert_eq!(ack, json!({"type":"ack","id":3,"seq":2}));

    for (seq, data) in [(1, json!({"text":"clean"})), (2, json!({"text":"as sent"}))] {
        let m = next_message(&mut on_b).await;
        assert_eq!((m["seq"].as_u64(), &m["data"]), (Some(seq), &data), "{m}");
        let mut w = wt_on_a.recv().await;
        while w["type"] != "message" {
            w = wt_on_a.recv().await;
        }
        assert_eq!((w["seq"].as_u64(), &w["data"]), (Some(seq), &data), "{w}");
    }

    // The calls were made by the publisher's node.
    let calls = backend.calls_of("publish").await;
    assert_eq!(calls.len(), 3, "{calls:#?}");
    for call in &calls {
        assert_eq!(call.body["node"], welcome["node"], "{}", call.body);
        assert_eq!(call.body["session"], welcome["session"], "{}", call.body);
    }

    // History, read on the other node, holds the rewritten message.
    let (mut late, _) = b.ws_welcomed("/chat").await;
    let ack = late
        .request(json!({"type":"join","room":"c-upstream","id":9,"since":0,"epoch":epoch}))
        .await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["seq"].as_u64()),
        (Some(true), Some(2)),
        "{ack}"
    );
    assert_eq!(
        next_message(&mut late).await["data"],
        json!({"text":"clean"})
    );
    assert_eq!(
        next_message(&mut late).await["data"],
        json!({"text":"as sent"})
    );
}
