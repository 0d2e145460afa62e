//! Headless Chromium (Debian `chromium`, driven by Playwright) against the real gateway:
//! raw WebTransport and wss sessions chat in one room (`smoke.mjs`), and the browser
//! client `/client.js` in each scenario of `client-scenarios.mjs`: mixed transports, the
//! fallback, moving back up to WebTransport, datagrams, and the demo page; and pages on
//! both transports, and the demo page, in front of `examples/backend/backend.py` (upstream
//! calls: `welcome.data`, `rpc`, publishes the backend checks).

use std::{path::Path, process::Command};

use gateway_tests::*;
use serde_json::{json, Value};

/// The SPKI hash (base64) of a test gateway's dev certificate, as Chromium's flag takes it.
fn spki(gw: &TestGateway) -> String {
    gw.server
        .as_ref()
        .unwrap()
        .dev_cert
        .as_ref()
        .unwrap()
        .spki_sha256
        .clone()
}

/// Runs one scenario of `client-scenarios.mjs` against `gw` and returns its JSON line.
async fn scenario(name: &str, gw: &TestGateway, extra: Value) -> Value {
    let mut args = json!({
        "port": gw.addr.port(),
        "certHash": gw.cert_sha256,
        "spki": spki(gw),
    });
    args.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    run_scenario(name, args).await
}

/// Runs one scenario of `client-scenarios.mjs` with `args` and returns its JSON line.
async fn run_scenario(name: &str, args: Value) -> Value {
    run_node(&["client-scenarios.mjs".into(), name.into(), args.to_string()]).await
}

/// Runs `node ARGS` in `tests/js` and returns the one JSON line it prints.
async fn run_node(args: &[String]) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run ./scripts/test-all.sh (it runs `npm ci` in tests/js)"
    );
    let args = args.to_vec();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("node runs (is Node.js installed?)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

fn events<'a>(page: &'a Value, name: &str) -> Vec<&'a Value> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// The `data` of each room message a page received.
fn datas(page: &Value) -> Vec<Value> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_webtransport_and_wss_and_they_chat() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let r = run_node(&[
            "smoke.mjs".into(),
            gw.addr.port().to_string(),
            gw.cert_sha256.clone(),
            spki(&gw),
        ])
        .await;
        assert_eq!(r["welcome"]["type"], "welcome");
        assert_eq!(r["welcome"]["transport"], "webtransport");
        assert_eq!(r["joinAck"]["type"], "ack");
        assert_eq!(r["joinAck"]["room"], "browser");
        assert_eq!(r["wsWelcome"]["transport"], "websocket");
        assert_eq!(r["presence"]["event"], "join");
        assert_eq!(r["presence"]["user"], r["wsWelcome"]["user"]);
        assert_eq!(r["fromWs"]["data"], "from wss");
        assert_eq!(r["fromWs"]["from"], r["wsWelcome"]["user"]);
        assert_eq!(r["fromWt"]["data"], "from webtransport");
        assert_eq!(r["fromWt"]["from"], r["welcome"]["user"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_on_webtransport_and_the_client_on_websocket_chat_in_json_and_binary() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let r = scenario("mixed", &gw, json!({})).await;
        assert_eq!(r["wt"]["transport"], "webtransport");
        assert_eq!(r["ws"]["transport"], "websocket");
        let reason = |page: &Value| events(page, "transport")[0]["reason"].clone();
        assert_eq!(reason(&r["wt"]), "preferred");
        assert_eq!(reason(&r["ws"]), "preferred");
        for ack in r["acks"].as_array().unwrap() {
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        assert_eq!(
            datas(&r["ws"]),
            vec![
                json!({"text":"from webtransport"}),
                json!({"binary":[1,2,3,255]})
            ]
        );
        assert_eq!(
            datas(&r["wt"]),
            vec![json!({"text":"from websocket"}), json!({"binary":[4,5,0]})]
        );
        let seqs: Vec<u64> = r["wt"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![3, 4], "the room's sequence");
        let open = events(&r["ws"], "open")[0];
        assert!(
            open["user"].as_str().unwrap().starts_with("anon-"),
            "{open}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_falls_back_to_websocket_when_webtransport_is_off_or_blackholed() {
    within(120, async {
        let gw = TestGateway::start(
            "webtransport = false\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n",
        )
        .await;
        let off = scenario("fallback", &gw, json!({})).await;
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let blackholed = scenario("fallback", &gw, json!({"holdUdp": true})).await;
        for (page, reasons) in [
            (&off, &["refused", "timeout"][..]),
            (&blackholed, &["timeout"][..]),
        ] {
            assert_eq!(page["transport"], "websocket", "{page}");
            let transport = events(page, "transport");
            assert_eq!(transport.len(), 1, "{page}");
            assert!(
                reasons.contains(&transport[0]["reason"].as_str().unwrap()),
                "{page}"
            );
            // Within webtransportTimeoutMs (3 s) + 1 s.
            let at = events(page, "open")[0]["at"].as_u64().unwrap();
            assert!(at < 4000, "opened after {at} ms");
            assert_eq!(page["ack"]["type"], "ack");
            assert_eq!(datas(page), vec![json!("still works")]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_fell_back_moves_up_to_webtransport_without_loss_or_duplicates() {
    within(150, async {
        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 1000\nrate_burst = 1000\n[[room]]\npattern = \"*\"\nhistory = 1000\nhistory_ttl_secs = 60\n",
        )
        .await;
        let r = scenario("reprobe", &gw, json!({})).await;
        assert_eq!(r["transport"], "webtransport", "{}", r["events"]);
        let transports: Vec<(Value, Value)> = events(&r, "transport")
            .iter()
            .map(|e| (e["transport"].clone(), e["reason"].clone()))
            .collect();
        assert_eq!(
            transports,
            vec![
                (json!("websocket"), json!("timeout")),
                (json!("webtransport"), json!("reprobe"))
            ]
        );
        assert_eq!(events(&r, "open").len(), 2, "one open per session");
        assert!(events(&r, "resync").is_empty());
        let received: Vec<u64> = datas(&r).iter().map(|d| d.as_u64().unwrap()).collect();
        let first = received[0];
        let expected: Vec<u64> = (first..first + received.len() as u64).collect();
        assert_eq!(received, expected, "no gap and no duplicate across the switch");
        assert!(received.len() as u64 >= r["switchedAt"].as_u64().unwrap() + 40);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_publishes_reach_another_webtransport_page_as_datagrams() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let r = scenario("volatile", &gw, json!({})).await;
        for ack in r["acks"].as_array().unwrap() {
            assert_eq!(ack["type"], "ack");
            assert!(ack.get("seq").is_none(), "volatile: no seq {ack}");
        }
        let to = &r["to"];
        assert!(
            to["stats"]["datagrams"].as_u64().unwrap() >= 10,
            "{}",
            to["stats"]
        );
        for m in to["messages"].as_array().unwrap() {
            assert_eq!(m["volatile"], true);
            assert!(m.get("seq").is_none_or(Value::is_null));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_chat_on_the_demo_page() {
    within(120, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/browser-artifacts")
            .canonicalize()
            .unwrap_or_else(|_| {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser-artifacts");
                std::fs::create_dir_all(&dir).unwrap();
                dir
            });
        let r = scenario("demo", &gw, json!({"artifacts": artifacts})).await;
        let tabs = r["tabs"].as_array().unwrap();
        let text = |tab: &Value| tab["messages"].to_string();
        assert!(text(&tabs[0]).contains("Grace") && text(&tabs[0]).contains("Hi Ada, Grace here"));
        assert!(text(&tabs[1]).contains("Ada") && text(&tabs[1]).contains("Hello from Ada"));
        assert_eq!(tabs[0]["transport"], "WebTransport");
        for shot in r["shots"].as_array().unwrap() {
            let size = std::fs::metadata(shot.as_str().unwrap()).unwrap().len();
            assert!(size > 10_000, "{shot}: {size} bytes");
        }
    })
    .await;
}

/// A port number free for both TCP and UDP on 127.0.0.1 (for a process restarted on it).
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Restarts a gateway process under an open page (`mode`: see the scenario) and returns
/// what the page saw.
async fn restart_scenario(mode: &str, redis: Option<&RedisServer>) -> Value {
    process_scenario("restart", mode, redis, "").await
}

/// Runs `scenario` on gateway processes the scenario starts itself (node A, and node B
/// with `redis`), whose `/chat` endpoint has the extra settings `endpoint`.
async fn process_scenario(
    scenario: &str,
    mode: &str,
    redis: Option<&RedisServer>,
    endpoint: &str,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (port, port_b) = (free_port(), free_port());
    let cluster = redis
        .map(|r| format!("[cluster]\nredis = \"{}\"\n", r.url()))
        .unwrap_or_default();
    let config = |port: u16| {
        format!(
            "listen = \"127.0.0.1:{port}\"\n[api]\nkey = \"k\"\n{cluster}[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n{endpoint}[[room]]\npattern = \"*\"\nhistory = 100\nhistory_ttl_secs = 60\n"
        )
    };
    let mut args = json!({"binary": gateway_binary(), "mode": mode, "port": port});
    for (name, port) in [("A", port), ("B", port_b)] {
        if name == "B" && redis.is_none() {
            continue;
        }
        let cwd = dir.path().join(name);
        std::fs::create_dir_all(&cwd).unwrap();
        let file = cwd.join("gateway.toml");
        std::fs::write(&file, config(port)).unwrap();
        args[format!("config{name}")] = json!(file);
        args[format!("cwd{name}")] = json!(cwd);
    }
    args["portB"] = json!(port_b);
    if let Some(redis) = redis {
        args["redisPort"] = json!(redis.port);
    }
    run_scenario(scenario, args).await
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_recovers_what_a_cluster_node_restart_made_it_miss() {
    within(150, async {
        let redis = RedisServer::start().await;
        let r = restart_scenario("cluster", Some(&redis)).await;
        assert_eq!(events(&r, "open").len(), 2, "{}", r["events"]);
        assert!(events(&r, "resync").is_empty(), "{}", r["events"]);
        let close = events(&r, "close")[0];
        assert_eq!(close["willReconnect"], true, "{close}");
        assert_eq!(
            seqs(&r),
            (1..=9).collect::<Vec<u64>>(),
            "every message once, in order"
        );
        assert_eq!(
            r["queuedAck"]["seq"], 7,
            "the publish made while disconnected went out"
        );
        let data: Vec<Value> = datas(&r);
        assert_eq!(
            data,
            [
                "before 1", "before 2", "before 3", "during 1", "during 2", "during 3", "queued",
                "after 1", "after 2"
            ]
            .map(|d| json!(d))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_room_loses_continuity_gets_resync_and_stays_on_its_session() {
    within(120, async {
        let redis = RedisServer::start().await;
        let r = process_scenario("continuity", "cluster", Some(&redis), "").await;
        assert_eq!(events(&r, "open").len(), 1, "no reconnect: {}", r["events"]);
        assert!(events(&r, "close").is_empty(), "{}", r["events"]);
        let resync = events(&r, "resync");
        assert_eq!(resync.len(), 1, "{}", r["events"]);
        assert_eq!(
            (&resync[0]["room"], &resync[0]["reason"]),
            (&json!("cont"), &json!("continuity")),
            "{}",
            resync[0]
        );
        assert!(r["joined"]["epoch"].is_string(), "{}", r["joined"]);
        assert_ne!(resync[0]["epoch"], r["joined"]["epoch"], "a new epoch");
        // The new epoch's first message (seq 1 again) is delivered, not taken for a
        // duplicate of the old epoch's.
        assert_eq!(seqs(&r), vec![1, 2, 3, 1]);
        assert_eq!(datas(&r)[3], json!("after"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_resyncs_when_a_single_node_restarts_with_a_new_epoch() {
    within(150, async {
        let r = restart_scenario("single", None).await;
        assert_eq!(events(&r, "open").len(), 2, "{}", r["events"]);
        let resync = events(&r, "resync");
        assert_eq!(resync.len(), 1, "{}", r["events"]);
        assert_eq!(resync[0]["room"], "restart");
        // The new epoch's messages are delivered, not taken for duplicates; the publish made
        // while disconnected went out on the new session.
        assert_eq!(seqs(&r), vec![1, 2, 3, 1, 2, 3]);
        assert_eq!(
            datas(&r)[3..],
            [json!("queued"), json!("after 1"), json!("after 2")]
        );
        assert_eq!(r["queuedAck"]["type"], "ack");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_frame_on_sigterm_moves_the_page_to_the_next_process_after_its_delay() {
    within(150, async {
        let r = restart_scenario("sigterm", None).await;
        let close = events(&r, "close")[0];
        assert_eq!(
            (close["code"].as_u64(), close["willReconnect"].as_bool()),
            (Some(1001), Some(true)),
            "{close}"
        );
        let reconnecting = events(&r, "reconnecting")[0];
        assert_eq!(reconnecting["code"], 1001);
        // The server's `after_ms`, drawn over the drain window (`drain_secs`, default 10 s),
        // not the client's own backoff (which starts far lower).
        let delay = reconnecting["delayMs"].as_u64().unwrap();
        assert!(delay < 10_000, "{reconnecting}");
        let opens = events(&r, "open");
        assert_eq!(opens.len(), 2);
        assert_ne!(opens[0]["node"], opens[1]["node"], "a new process");
        assert!(opens[1]["at"].as_u64().unwrap() >= close["at"].as_u64().unwrap() + delay);
        assert_eq!(events(&r, "resync").len(), 1, "a new process: a new epoch");
        assert_eq!(r["queuedAck"]["type"], "ack");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_server_stops_answering_gives_up_after_two_heartbeats_and_reconnects() {
    within(120, async {
        let r = process_scenario("stall", "", None, "heartbeat_secs = 1\n").await;
        let close = events(&r, "close")[0];
        assert_eq!(
            (close["code"].as_u64(), close["willReconnect"].as_bool()),
            (Some(4009), Some(true)),
            "{close}"
        );
        // Two heartbeats of 1 s without a frame (the last `pong` came up to one heartbeat
        // before the stop), checked every half heartbeat.
        let after = close["at"].as_u64().unwrap() - r["stoppedAt"].as_u64().unwrap();
        assert!(
            (900..=3500).contains(&after),
            "gave up {after} ms after the stop"
        );
        assert_eq!(events(&r, "open").len(), 2);
        assert_eq!(r["ack"]["type"], "ack");
        assert_eq!(datas(&r), vec![json!("after")]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_4001_a_page_reconnects_only_with_a_fresh_ticket() {
    within(120, async {
        let gw = TestGateway::start(&format!(
            "{AUTH_SECTION}[api]\nkey = \"k\"\n[[endpoint]]\npath = \"/chat\"\n"
        ))
        .await;
        let r = scenario(
            "reauth",
            &gw,
            json!({
                "tokenFixed": token("tina", 300, json!({})),
                "tokenRenewing": token("gus", 300, json!({})),
            }),
        )
        .await;
        let fixed = &r["fixed"];
        let close = events(fixed, "close")[0];
        assert_eq!(
            (close["code"].as_u64(), close["willReconnect"].as_bool()),
            (Some(4001), Some(false)),
            "{close}"
        );
        assert_eq!(events(fixed, "open").len(), 1);
        assert!(events(fixed, "reconnecting").is_empty());
        assert_eq!(fixed["transport"], Value::Null);
        assert_eq!(r["refused"]["code"], "closed", "{}", r["refused"]);

        let renewing = &r["renewing"];
        let close = events(renewing, "close")[0];
        assert_eq!(
            (close["code"].as_u64(), close["willReconnect"].as_bool()),
            (Some(4001), Some(true)),
            "{close}"
        );
        let opens = events(renewing, "open");
        assert_eq!(opens.len(), 2);
        assert_eq!(opens[1]["user"], "gus");
        assert!(
            r["tickets"].as_u64().unwrap() >= 2,
            "a fresh ticket per attempt"
        );
    })
    .await;
}

/// The secret the gateway sends the example backend in these tests.
const BACKEND_SECRET: &str = "browser-test-backend-secret";

/// `examples/backend/backend.py` on a free loopback port, its stdout log collected, stopped
/// on drop.
struct ExampleBackend {
    child: std::process::Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ExampleBackend {
    fn start(secret: &str) -> Self {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/backend/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--listen", "127.0.0.1:0", "--secret", secret])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("a first line").unwrap();
        // "backend listening on http://127.0.0.1:PORT/gateway"
        let port = first
            .rsplit(':')
            .next()
            .and_then(|tail| tail.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {first:?}"));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, port, log }
    }

    /// The log lines so far that contain every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .cloned()
            .collect()
    }
}

impl Drop for ExampleBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Needs the server side of upstream calls (`[endpoint.upstream]`, `auth = "upstream"`,
/// the `rpc` frame; issue 22). The gateway runs `examples/backend/gateway.toml` (its
/// `listen` dropped, its upstream URL and secret pointed at the backend this test starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_both_transports_use_the_example_backend_through_upstream_calls() {
    within(150, async {
        let backend = ExampleBackend::start(BACKEND_SECRET);
        let gw = example_gateway(&backend).await;
        let r = scenario("upstream", &gw, json!({})).await;
        for (user, transport) in [("alice", "websocket"), ("bob", "webtransport")] {
            let page = &r[user];
            let opens = events(page, "open");
            assert_eq!(opens.len(), 2, "{user}: {}", page["events"]);
            for open in &opens {
                assert_eq!(open["transport"], transport);
                assert_eq!(open["user"], user, "admitted by the backend: {open}");
                assert_eq!(
                    open["data"],
                    json!({"name": user, "greeting": format!("Welcome, {user}!"), "rooms": ["lobby"]}),
                    "welcome.data on open: {open}"
                );
            }
            let error = |call: &Value| -> (Value, Value) {
                let e = &call["error"];
                assert_eq!(e["isError"], true, "an Error: {call}");
                assert_eq!(e["name"], "GatewayError", "{call}");
                (e["code"].clone(), e["message"].clone())
            };
            // Nine overlapping calls: eight answered, the ninth refused at once.
            let nine = page["nine"].as_array().unwrap();
            let answered: Vec<&Value> = nine.iter().filter(|c| c.get("ok").is_some()).collect();
            assert_eq!(answered.len(), 8, "{user}: {nine:?}");
            for c in &answered {
                assert_eq!(c["ok"], json!({"slept_ms": 800}));
            }
            let ninth = nine.iter().find(|c| c.get("error").is_some()).unwrap();
            assert_eq!(error(ninth).0, "limit_exceeded", "{ninth}");
            assert!(ninth["ms"].as_u64().unwrap() < 700, "refused at once: {ninth}");
            let slowest = answered.iter().map(|c| c["ms"].as_u64().unwrap()).max().unwrap();
            assert!(slowest < 1600, "the eight overlapped: {slowest} ms");

            let now = page["time"]["ok"]["unix_ms"].as_u64().expect("time answered");
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            assert!(now <= wall && wall - now < 120_000, "{}", page["time"]);
            assert_eq!(page["echo"]["ok"], json!({"a": [1, "two", null]}));
            assert_eq!(page["whoami"]["ok"]["user"], user);
            assert_eq!(page["whoami"]["ok"]["transport"], transport);
            assert_eq!(
                error(&page["unknown"]),
                (json!("rejected"), json!("unknown method nope")),
                "the backend's 404 and its reason"
            );
            assert_eq!(page["unknown"]["error"]["type"], "error");
            assert_eq!(error(&page["empty"]).0, "bad_request");
            assert_eq!(error(&page["long"]).0, "bad_request");
            // The gateway's timeout_ms (2000) before the backend's answer (2600 ms).
            assert_eq!(error(&page["unavailable"]).0, "unavailable", "{}", page["unavailable"]);
            let ms = page["unavailable"]["ms"].as_u64().unwrap();
            assert!((1900..2590).contains(&ms), "unavailable after {ms} ms");
            // The client's own timeoutMs (300) before the backend's answer (1200 ms).
            let (code, message) = error(&page["timeout"]);
            assert_eq!(code, "timeout");
            assert!(message.as_str().unwrap().contains("rpc sleep"), "{message}");
            let ms = page["timeout"]["ms"].as_u64().unwrap();
            assert!((290..1100).contains(&ms), "timed out after {ms} ms");
            assert_eq!(page["afterTimeout"]["ok"], "after");

            assert_eq!(page["joined"]["type"], "ack", "{}", page["joined"]);
            assert_eq!(page["joined"]["data"], json!({"topic": "talk: be kind"}));
            assert_eq!(page["privateJoin"]["code"], "forbidden", "{}", page["privateJoin"]);
            let mut in_lobby: Vec<&str> = page["lobby"]["members"]
                .as_array()
                .expect("lobby presence listed")
                .iter()
                .map(|m| m["user"].as_str().unwrap())
                .collect();
            in_lobby.sort_unstable();
            in_lobby.dedup();
            assert_eq!(in_lobby, ["alice", "bob"], "joined by the connect answer");

            let lost = &page["lost"]["error"];
            assert_eq!(
                (&lost["isError"], &lost["code"]),
                (&json!(true), &json!("connection_lost")),
                "{}",
                page["lost"]
            );
            assert_eq!(page["afterReconnect"]["ok"]["user"], user);

            // What the backend saw.
            let tag = format!("rpc user={user} ");
            assert_eq!(
                backend.lines_with(&[&tag, "\"tag\":\"lost\""]).len(),
                1,
                "the call lost with its session is not sent again"
            );
            assert_eq!(
                backend.lines_with(&[&tag, "method=sleep data={\"ms\":800}"]).len(),
                8,
                "the ninth never reached the backend"
            );
            assert!(backend.lines_with(&[&tag, "method=xxxx"]).is_empty());
            assert!(backend.lines_with(&[&tag, "method= "]).is_empty());
            let starting = |prefix: String| backend.lines_with(&[""]).into_iter().filter(move |l| l.starts_with(&prefix));
            assert_eq!(
                starting(format!("connect user={user} transport={transport} ")).count(),
                2,
                "one connect call per session: {:?}",
                backend.lines_with(&[""])
            );
            assert_eq!(
                starting(format!("disconnect user={user} transport={transport} code=1011 ")).count(),
                1,
                "one disconnect call for the closed session: {:?}",
                backend.lines_with(&[""])
            );
        }
        // Publishes the backend checked: rewritten (trimmed, `name` set to the sender,
        // stamped), refused with its reason, or passed.
        assert!(r["alice"]["published"]["seq"].is_u64(), "{}", r["alice"]["published"]);
        assert_eq!(
            (&r["bob"]["published"]["code"], &r["bob"]["published"]["message"]),
            (&json!("rejected"), &json!("messages about spam are not allowed here"))
        );
        assert!(r["bob"]["published2"]["seq"].is_u64());
        let got = |user: &str| r[user]["delivered"].as_array().unwrap().clone();
        let to_bob = got("bob");
        assert_eq!(to_bob.len(), 1, "{to_bob:?}");
        assert_eq!(to_bob[0]["from"], "alice");
        assert_eq!(to_bob[0]["data"]["text"], "hello bob");
        assert_eq!(to_bob[0]["data"]["name"], "alice", "not the name the page claimed");
        assert!(to_bob[0]["data"]["at"].is_u64(), "{}", to_bob[0]);
        let to_alice = got("alice");
        assert_eq!(to_alice.len(), 1, "the refused publish is not delivered: {to_alice:?}");
        assert_eq!(to_alice[0]["data"]["text"], "hi alice");
        assert_eq!(to_alice[0]["data"]["name"], "bob");
        for user in ["alice", "bob"] {
            // Across the reconnection: each message once, in order.
            let seqs = seqs(&r[user]);
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{user}: {seqs:?}");
            assert_eq!(seqs.last(), Some(&2), "{user}: {seqs:?}");
        }
    })
    .await;
}

/// `examples/backend/gateway.toml` on a test gateway: its `listen` dropped, its upstream
/// URL pointed at `backend` and its secret replaced by [`BACKEND_SECRET`].
async fn example_gateway(backend: &ExampleBackend) -> TestGateway {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/backend/gateway.toml"),
    )
    .unwrap();
    assert!(
        example.contains("\"http://127.0.0.1:9000/gateway\"")
            && example.contains("\"dev-backend-secret\"")
    );
    let config: String = example
        .lines()
        .filter(|l| !l.starts_with("listen"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "http://127.0.0.1:9000/gateway",
            &format!("http://127.0.0.1:{}/gateway", backend.port),
        )
        .replace("dev-backend-secret", BACKEND_SECRET);
    TestGateway::start(&config).await
}

/// Needs the server side of upstream calls (issue 22), as the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_uses_the_example_backend() {
    within(120, async {
        let backend = ExampleBackend::start(BACKEND_SECRET);
        let gw = example_gateway(&backend).await;
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser-artifacts");
        let r = scenario("demoBackend", &gw, json!({"artifacts": artifacts})).await;
        let messages: Vec<&str> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(messages.contains(&"Welcome, Ada!"), "{messages:?}");
        assert!(
            messages.iter().any(|m| m.starts_with("server time: 20")),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"not sent: messages about spam are not allowed here"),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"Adahello everyone"),
            "trimmed by the backend: {messages:?}"
        );
        assert_eq!(
            r["transport"], "WebTransport",
            "admitted by the query on WebTransport"
        );
        assert_eq!(
            backend
                .lines_with(&["connect user=Ada transport=webtransport"])
                .len(),
            1
        );
        let size = std::fs::metadata(r["shot"].as_str().unwrap())
            .unwrap()
            .len();
        assert!(size > 10_000, "{size} bytes");
    })
    .await;
}
