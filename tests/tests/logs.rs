//! The real binary's logs with `[log] format = "json"`: every line is JSON, the access log
//! has a line per session open and close and per refused handshake, and no credential (a
//! JWT, a ticket, the API key) appears anywhere, after a run that used all three.

use gateway_tests::*;
use serde_json::{json, Value};

const API_KEY: &str = "log-test-api-key-5f1c0a9e77";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_opens_closes_and_rejections_and_no_credentials() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n\
                 {AUTH_SECTION}[api]\nkey = \"{API_KEY}\"\n[[endpoint]]\npath = \"/chat\"\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("gateway.log");
        let mut gw = RunningGateway::start_logged(&config, dir.path(), &log).await;
        let jwt = token("logged-user", 300, json!({}));

        // A session with the token in the query, one with a ticket, a refused bad token,
        // an API publish with the key.
        let mut a = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?token={jwt}"), &[])
            .await
            .unwrap();
        assert_eq!(a.recv().await["type"], "welcome");
        let bearer = format!("Bearer {jwt}");
        let (status, body) = https_request(
            gw.addr,
            &gw.cert,
            "POST",
            "/api/tickets",
            &[("authorization", &bearer)],
            "",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let ticket = serde_json::from_str::<Value>(&body).unwrap()["ticket"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut b = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?ticket={ticket}"), &[])
            .await
            .unwrap();
        assert_eq!(b.recv().await["type"], "welcome");
        let forged = format!("{jwt}x");
        let refused = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?token={forged}"), &[])
            .await
            .err()
            .expect("a bad token is refused");
        assert_eq!(http_status(&refused), Some(401));
        let key = format!("Bearer {API_KEY}");
        let (status, body) = https_request(
            gw.addr,
            &gw.cert,
            "POST",
            "/api/publish",
            &[
                ("authorization", &key),
                ("content-type", "application/json"),
            ],
            r#"{"room":"r","data":1}"#,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        a.ws.close(None).await.unwrap();
        let _ = a.ending().await;
        b.ws.close(None).await.unwrap();
        let _ = b.ending().await;

        // The closes are logged once the sessions end on the server.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            let closed = text.matches("session closed").count();
            if closed >= 2 || tokio::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        gw.stop();

        for secret in [
            jwt.as_str(),
            ticket.as_str(),
            API_KEY,
            jwt.rsplit('.').next().unwrap(),
        ] {
            assert!(
                !lines.contains(secret),
                "a credential is in the log:\n{lines}"
            );
        }
        let events: Vec<Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let access = |message: &str| -> Vec<&Value> {
            events
                .iter()
                .filter(|e| e["target"] == "access" && e["message"] == message)
                .collect()
        };
        let opened = access("session open");
        assert_eq!(opened.len(), 2, "{lines}");
        for e in &opened {
            assert_eq!(
                (e["endpoint"].as_str(), e["transport"].as_str()),
                (Some("/chat"), Some("websocket"))
            );
            assert_eq!(e["user"], "logged-user");
            assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
        }
        let closed = access("session closed");
        assert_eq!(closed.len(), 2, "{lines}");
        for e in &closed {
            assert_eq!(e["close_code"], 1000, "{e}");
            for field in [
                "duration_ms",
                "frames_in",
                "bytes_in",
                "frames_out",
                "bytes_out",
            ] {
                assert!(e[field].is_u64(), "{field} in {e}");
            }
            assert!(
                e["frames_out"].as_u64().unwrap() >= 1,
                "the welcome at least: {e}"
            );
        }
        let rejected = access("handshake rejected");
        assert_eq!(rejected.len(), 1, "{lines}");
        assert_eq!(
            (
                rejected[0]["status"].as_u64(),
                rejected[0]["endpoint"].as_str()
            ),
            (Some(401), Some("/chat"))
        );
    })
    .await;
}
