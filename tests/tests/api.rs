//! The HTTP API over HTTPS: one-time tickets and the server API behind its key.

use gateway_tests::*;
use serde_json::{json, Value};

const KEY: &str = "server-api-key-0123456789";

fn config(ticket_ttl: u64) -> String {
    format!(
        "{AUTH_SECTION}ticket_ttl_secs = {ticket_ttl}\n[api]\nkey = \"{KEY}\"\n[[endpoint]]\npath = \"/chat\"\n"
    )
}

async fn ticket(gw: &TestGateway, jwt: &str) -> (u16, Value) {
    let (status, body) = gw
        .https(
            "POST",
            "/api/tickets",
            &[("authorization", &format!("Bearer {jwt}"))],
            "",
        )
        .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_admits_exactly_one_connection_and_expires() {
    within(60, async {
        // Expiry after `expires_in` is tested in core (tickets.rs) on an explicit clock; here
        // the configured lifetime reaches the API.
        let gw = TestGateway::start(&config(7)).await;
        let (status, body) = ticket(&gw, &token("tia", 300, json!({}))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_in"], 7);
        let t = body["ticket"].as_str().unwrap().to_owned();
        let (_c, w) = gw.ws_welcomed(&format!("/chat?ticket={t}")).await;
        assert_eq!(w["user"], "tia");
        let again = gw
            .ws(&format!("/chat?ticket={t}"))
            .await
            .err()
            .expect("reuse refused");
        assert_eq!(http_status(&again), Some(401));

        // Two connections racing with one ticket: exactly one gets in.
        let (_, body) = ticket(&gw, &token("tia", 300, json!({}))).await;
        let t = body["ticket"].as_str().unwrap().to_owned();
        let path = format!("/chat?ticket={t}");
        let (a, b) = tokio::join!(gw.ws(&path), gw.ws(&path));
        let statuses: Vec<Option<u16>> = [a, b]
            .into_iter()
            .map(|r| r.err().map(|e| http_status(&e).unwrap_or(0)))
            .collect();
        assert_eq!(
            statuses.iter().filter(|s| s.is_none()).count(),
            1,
            "{statuses:?}"
        );
        assert!(statuses.contains(&Some(401)), "{statuses:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_need_a_valid_jwt() {
    within(30, async {
        let gw = TestGateway::start(&config(30)).await;
        let (status, body) = gw.https("POST", "/api/tickets", &[], "").await;
        assert_eq!(status, 401, "{body}");
        let (status, body) = ticket(&gw, &token("x", -100, json!({}))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized"))
        );
        assert!(
            !body["message"].as_str().unwrap().contains("ey"),
            "no token echoed: {body}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_publishes_sends_lists_and_disconnects() {
    within(30, async {
        let gw = TestGateway::start(&config(30)).await;
        let auth = format!("Bearer {KEY}");
        let h = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let (mut alice, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("alice", 300, json!({}))))
            .await;
        alice.join("news").await;

        let (status, body) = gw
            .https(
                "POST",
                "/api/publish",
                &h,
                r#"{"room":"news","data":{"headline":"hi"}}"#,
            )
            .await;
        assert_eq!((status, body.as_str()), (200, r#"{"seq":1}"#));
        assert_eq!(
            alice.recv().await,
            json!({"type":"message","room":"news","seq":1,"data":{"headline":"hi"}})
        );

        let (status, body) = gw
            .https("POST", "/api/send", &h, r#"{"user":"alice","data":[1,2]}"#)
            .await;
        assert_eq!((status, body.as_str()), (200, r#"{"delivered":true}"#));
        assert_eq!(alice.recv().await, json!({"type":"direct","data":[1,2]}));
        let (_, body) = gw
            .https("POST", "/api/send", &h, r#"{"user":"nobody","data":1}"#)
            .await;
        assert_eq!(body, r#"{"delivered":false}"#);

        let (status, body) = gw.https("GET", "/api/rooms/news", &h, "").await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["room"], "news");
        assert_eq!(v["members"][0]["user"], "alice");
        assert_eq!(v["members"][0]["transport"], "websocket");
        assert_eq!(v["members"][0]["node"], "test-node");

        let (status, _) = gw
            .https(
                "POST",
                "/api/publish",
                &h,
                r#"{"room":"bad room","data":1}"#,
            )
            .await;
        assert_eq!(status, 400);
        let (status, _) = gw
            .https("POST", "/api/publish", &h, r#"{"room":"news"}"#)
            .await;
        assert_eq!(status, 400);

        let (status, body) = gw
            .https(
                "POST",
                "/api/disconnect",
                &h,
                r#"{"user":"alice","code":4003,"reason":"banned"}"#,
            )
            .await;
        assert_eq!((status, body.as_str()), (200, r#"{"disconnected":1}"#));
        let (ending, _) = alice.ending().await;
        assert_eq!(ending, Ending::Close(4003, "banned".into()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_refuses_wrong_or_missing_keys() {
    within(30, async {
        let gw = TestGateway::start(&config(30)).await;
        for (headers, expected) in [
            (vec![], 401),
            (vec![("authorization", "Bearer wrong")], 401),
            (vec![("authorization", "Basic abc")], 401),
        ] {
            let (status, body) = gw
                .https("POST", "/api/publish", &headers, r#"{"room":"r","data":1}"#)
                .await;
            assert_eq!(status, expected, "{headers:?}: {body}");
            assert!(body.contains("unauthorized"));
        }
        let open = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let (status, body) = open
            .https(
                "GET",
                "/api/rooms/r",
                &[("authorization", "Bearer anything")],
                "",
            )
            .await;
        assert_eq!(status, 403, "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_is_served_with_its_content_hash_over_both_protocols() {
    within(30, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let source = include_str!("../../clients/js/client.js");
        let header = |head: &str, name: &str| {
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        let (head, body) = https_exchange(gw.addr, &gw.cert_path, "GET", "/client.js", &[], "")
            .await
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, source);
        assert_eq!(
            header(&head, "content-type"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(header(&head, "access-control-allow-origin"), "*");
        assert_eq!(header(&head, "cache-control"), "public, no-cache");
        let etag = header(&head, "etag");
        assert!(etag.len() == 34 && etag.starts_with('"'), "{etag}");

        // Revalidation: 304 without a body while the binary (and so the file) is the same.
        let (head, body) = https_exchange(
            gw.addr,
            &gw.cert_path,
            "GET",
            "/client.js",
            &[("If-None-Match", &etag)],
            "",
        )
        .await
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 304"), "{head}");
        assert_eq!(header(&head, "etag"), etag);
        assert!(body.is_empty());
        let (head, _) = https_exchange(
            gw.addr,
            &gw.cert_path,
            "GET",
            "/client.js",
            &[("If-None-Match", "\"stale\"")],
            "",
        )
        .await
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");

        let (head, body) = https_exchange(gw.addr, &gw.cert_path, "GET", "/client.d.ts", &[], "")
            .await
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            body.contains("export function connect(url: string"),
            "{body}"
        );
        assert_ne!(header(&head, "etag"), etag);

        let (status, body) = h3_get(gw.udp_port(), &gw.cert_path, "/client.js")
            .await
            .unwrap();
        assert_eq!((status, body.len()), (200, source.len()));
    })
    .await;
}
