//! Authentication, authorization and abuse, table-driven, against the real gateway.

use std::{path::Path, time::Duration};

use futures_util::SinkExt;
use gateway_tests::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_cases_are_refused_before_the_session_for_rs256_es256_and_eddsa() {
    within(90, async {
        let rs = EncodingKey::from_rsa_pem(&pem("jwt-rs256-private.pem")).unwrap();
        let es = EncodingKey::from_ec_pem(&pem("jwt-es256-private.pem")).unwrap();
        let ed = EncodingKey::from_ed_pem(&pem("jwt-eddsa-private.pem")).unwrap();
        // Each algorithm, its public key, its signing key, and another algorithm's key.
        for (alg, public, a, key, other_alg, other) in [
            ("RS256", "jwt-rs256-public.pem", Algorithm::RS256, &rs, Algorithm::ES256, &es),
            ("ES256", "jwt-es256-public.pem", Algorithm::ES256, &es, Algorithm::RS256, &rs),
            ("EdDSA", "jwt-eddsa-public.pem", Algorithm::EdDSA, &ed, Algorithm::ES256, &es),
        ] {
            let toml = format!(
                "[auth]\nalgorithm = \"{alg}\"\npublic_key = \"{}\"\nissuer = \"https://issuer\"\naudience = \"gateway\"\nleeway_secs = 0\n[[endpoint]]\npath = \"/chat\"\n",
                fixture(public)
            );
            let gw = TestGateway::start(&toml).await;
            let good = json!({"sub":"u","exp":now()+300,"iss":"https://issuer","aud":"gateway"});
            let with = |extra: Value| {
                let mut c = good.clone();
                for (k, v) in extra.as_object().unwrap() {
                    if v.is_null() {
                        c.as_object_mut().unwrap().remove(k);
                    } else {
                        c[k] = v.clone();
                    }
                }
                c
            };
            let public_as_secret = EncodingKey::from_secret(&pem(public));
            let cases: Vec<(&str, String)> = vec![
                ("algorithm confusion: HS256 signed with the public key", sign(Algorithm::HS256, &public_as_secret, good.clone())),
                ("alg none", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ.".into()),
                ("signed by another key", sign(other_alg, other, good.clone())),
                ("missing exp", sign(a, key, with(json!({"exp": null})))),
                ("expired", sign(a, key, with(json!({"exp": now() - 10})))),
                ("not yet valid", sign(a, key, with(json!({"nbf": now() + 120})))),
                ("wrong issuer", sign(a, key, with(json!({"iss": "https://evil"})))),
                ("wrong audience", sign(a, key, with(json!({"aud": "other"})))),
                ("missing sub", sign(a, key, with(json!({"sub": null})))),
                ("garbage", "a.b.c".into()),
            ];
            for (case, token) in cases {
                let err = gw.ws(&format!("/chat?token={token}")).await.err();
                let status = err.as_ref().and_then(http_status);
                assert_eq!(status, Some(401), "{alg}: {case}");
                let header = format!("Bearer {token}");
                let err = gw.ws_with_headers("/chat", &[("authorization", &header)]).await.err();
                assert_eq!(err.as_ref().and_then(http_status), Some(401), "{alg} header: {case}");
            }
            let (_c, w) = gw.ws_welcomed(&format!("/chat?token={}", sign(a, key, good.clone()))).await;
            assert_eq!(w["user"], "u", "{alg}: valid token admitted");
        }
    })
    .await;
}

fn first_message_config(extra: &str) -> String {
    format!("{AUTH_SECTION}[[endpoint]]\npath = \"/fm\"\nauth = \"first-message\"\nauth_timeout_secs = 1\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_auth_gates_frames_then_welcomes_or_times_out() {
    within(30, async {
        let gw = TestGateway::start(&first_message_config("")).await;
        let mut c = gw.ws("/fm").await.unwrap();
        let e = c.request(json!({"type":"join","room":"r","id":1})).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["id"].as_i64()),
            (Some("error"), Some("unauthorized"), Some(1))
        );
        let e = c
            .request(json!({"type":"auth","id":2,"token":token("u", -50, json!({}))}))
            .await;
        assert_eq!(
            e["code"], "unauthorized",
            "expired token refused, may retry"
        );
        let ack = c
            .request(json!({"type":"auth","id":3,"token":token("u", 300, json!({}))}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":3}));
        let w = c.recv().await;
        assert_eq!(
            (w["type"].as_str(), w["user"].as_str()),
            (Some("welcome"), Some("u"))
        );
        c.join("r").await;

        // A client that never authenticates is closed 4001 after auth_timeout_secs.
        let mut idle = gw.ws("/fm").await.unwrap();
        let (ending, _) = idle.ending().await;
        assert_eq!(ending, Ending::Close(4001, "auth timeout".into()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_4001_unless_refreshed_for_the_same_user() {
    within(30, async {
        let gw =
            TestGateway::start(&format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n")).await;
        let (mut expiring, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("u", 2, json!({}))))
            .await;
        let (mut refreshed, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("v", 2, json!({}))))
            .await;
        let e = refreshed
            .request(json!({"type":"auth","id":1,"token":token("someone-else", 300, json!({}))}))
            .await;
        assert_eq!(
            e["code"], "unauthorized",
            "refresh with another sub is refused"
        );
        let ack = refreshed
            .request(json!({"type":"auth","id":2,"token":token("v", 300, json!({}))}))
            .await;
        assert_eq!(ack, json!({"type":"ack","id":2}));
        let (ending, _) = expiring.ending().await;
        assert_eq!(ending, Ending::Close(4001, "token expired".into()));
        refreshed.expect_silence(Duration::from_millis(1500)).await;
        assert_eq!(
            refreshed.request(json!({"type":"ping","id":3})).await["type"],
            "pong"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_permissions_are_the_endpoint_patterns_narrowed_by_claims() {
    within(30, async {
        let toml = format!(
            "{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\nrooms = [\"chat:*\", \"public:*\"]\n"
        );
        let gw = TestGateway::start(&toml).await;
        let claims = json!({"rooms":["chat:*"],"publish":["chat:news"]});
        let (mut c, _) = gw
            .ws_welcomed(&format!("/chat?token={}", token("u", 300, claims)))
            .await;
        c.join("chat:lobby").await;
        let e = c
            .request(json!({"type":"join","room":"public:x","id":2}))
            .await;
        assert_eq!(
            e["code"], "forbidden",
            "the rooms claim narrows the endpoint's patterns"
        );
        let e = c
            .request(json!({"type":"publish","room":"chat:lobby","id":3,"data":1}))
            .await;
        assert_eq!(
            e["code"], "forbidden",
            "the publish claim narrows publishing"
        );
        let ack = c
            .request(json!({"type":"publish","room":"chat:news","id":4,"data":1}))
            .await;
        assert_eq!(ack["type"], "ack");
        let e = c
            .request(json!({"type":"presence","room":"public:y","id":5}))
            .await;
        assert_eq!(e["code"], "forbidden");
        // A token claiming every room still stays inside the endpoint's patterns.
        let (mut d, _) = gw
            .ws_welcomed(&format!(
                "/chat?token={}",
                token("d", 300, json!({"rooms":["*"]}))
            ))
            .await;
        d.join("public:x").await;
        let e = d
            .request(json!({"type":"join","room":"secret:x","id":6}))
            .await;
        assert_eq!(
            e["code"], "forbidden",
            "claims cannot escape the endpoint's rooms"
        );
        let e = d
            .request(json!({"type":"publish","room":"secret:x","id":7,"data":1}))
            .await;
        assert_eq!(e["code"], "forbidden");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list_refuses_cross_site_upgrades_with_403() {
    within(30, async {
        let toml = "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nallowed_origins = [\"https://app.example\"]\n";
        let gw = TestGateway::start(toml).await;
        let e = gw.ws_with_headers("/chat", &[("origin", "https://evil.example")]).await.err().unwrap();
        assert_eq!(http_status(&e), Some(403));
        gw.ws_with_headers("/chat", &[("origin", "https://app.example")]).await.unwrap();
        gw.ws("/chat").await.unwrap(); // non-browser clients send no Origin
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_answer_503_and_429_before_the_session() {
    within(30, async {
        let global = TestGateway::start("[limits]\nmax_connections = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let _first = global.ws_welcomed("/chat").await;
        assert_eq!(http_status(&global.ws("/chat").await.err().unwrap()), Some(503));

        let per_ip = TestGateway::start("[limits]\nmax_connections_per_ip = 2\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let _a = per_ip.ws_welcomed("/chat").await;
        let b = per_ip.ws_welcomed("/chat").await;
        assert_eq!(http_status(&per_ip.ws("/chat").await.err().unwrap()), Some(429));
        drop(b);
        // The slot comes back once the server has seen the close: retried until it has
        // (the connections refused meanwhile must be 429s).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match per_ip.ws("/chat").await {
                Ok(mut c) => {
                    assert_eq!(c.recv().await["type"], "welcome");
                    break;
                }
                Err(e) => assert_eq!(http_status(&e), Some(429)),
            }
            assert!(tokio::time::Instant::now() < deadline, "the slot never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let toml = format!("[limits]\nmax_connections_per_user = 1\n{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n");
        let per_user = TestGateway::start(&toml).await;
        let t = token("solo", 300, json!({}));
        let _s = per_user.ws_welcomed(&format!("/chat?token={t}")).await;
        let e = per_user.ws(&format!("/chat?token={t}")).await.err().unwrap();
        assert_eq!(http_status(&e), Some(429));
        per_user.ws_welcomed(&format!("/chat?token={}", token("other", 300, json!({})))).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slowloris_clients_are_dropped_within_the_handshake_timeout() {
    within(30, async {
        let gw = TestGateway::start("[limits]\nhandshake_timeout_secs = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        // Sends nothing at all: dropped during the TLS handshake.
        let started = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut silent, &mut buf))
            .await
            .expect("server closes the silent connection");
        // A clean close (the server drops the socket it never read from), not a reset.
        assert!(matches!(n, Ok(0)), "{n:?}");
        assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());

        // Completes TLS, then drips the request head a byte at a time.
        let started = std::time::Instant::now();
        let mut tls = tokio_rustls::TlsConnector::from(client_tls(&gw.cert_path, &[b"http/1.1"]))
            .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tokio::net::TcpStream::connect(gw.addr).await.unwrap())
            .await
            .unwrap();
        let head = b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n";
        let mut dropped = false;
        for b in head {
            if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                dropped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(dropped, "a dripped request head must be cut off");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // Meanwhile normal clients are served.
        gw.ws_welcomed("/chat").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_trips_the_rate_limit_then_4008_while_others_are_served() {
    within(30, async {
        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 5\nrate_burst = 5\n",
        )
        .await;
        let (mut flood, _) = gw.ws_welcomed("/chat").await;
        let (mut calm, _) = gw.ws_welcomed("/chat").await;
        calm.join("room").await;
        for i in 0..40 {
            flood.send(json!({"type":"ping","id":i})).await;
        }
        let mut pongs = 0;
        let mut limited = 0;
        let ending = loop {
            match tokio::time::timeout(STEP, futures_util::StreamExt::next(&mut flood.ws))
                .await
                .unwrap()
            {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("pong") => pongs += 1,
                        Some("error") if v["code"] == "rate_limited" => limited += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                    break f.map(|f| u16::from(f.code))
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(pongs, 5, "the burst is served");
        // Refusals 1, 2 and 4 are answered (powers of two); the 6th (> rate_burst) closes.
        assert_eq!(limited, 3, "excess frames are answered rate_limited");
        assert_eq!(ending, Some(4008));
        assert_eq!(
            calm.request(json!({"type":"ping","id":1})).await["type"],
            "pong"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_inputs_get_precise_answers_while_a_bystander_gets_every_message() {
    within(60, async {
        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nmax_rooms = 2\nmax_message_bytes = 4096\n",
        )
        .await;
        let (mut bystander, _) = gw.ws_welcomed("/chat").await;
        bystander.join("steady").await;
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let (mut attacker, _) = gw.ws_welcomed("/chat").await;

        // Rooms per session.
        attacker.join("a").await;
        attacker.join("b").await;
        let e = attacker.request(json!({"type":"join","room":"c","id":3})).await;
        assert_eq!(e["code"], "limit_exceeded");
        // Room name length.
        let long = "x".repeat(129);
        let e = attacker.request(json!({"type":"join","room":long,"id":4})).await;
        assert_eq!(e["code"], "bad_request");
        // Deep JSON nesting: refused by the parser's depth limit, not a stack overflow.
        let deep = format!("{{\"type\":\"publish\",\"room\":\"a\",\"data\":{}{}}}", "[".repeat(1000), "]".repeat(1000));
        attacker.send_text(&deep).await;
        let e = attacker.recv().await;
        assert_eq!(e["code"], "bad_request", "{e}");
        // Binary garbage.
        attacker.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![0xff; 64])).await.unwrap();
        assert_eq!(attacker.recv().await["code"], "bad_request");

        // Meanwhile every message published to the bystander's room arrived, in order.
        for i in 0..50 {
            publisher.send(json!({"type":"publish","room":"steady","data":i})).await;
        }
        for i in 0..50 {
            let m = bystander.recv().await;
            assert_eq!((m["data"].as_i64(), m["seq"].as_i64()), (Some(i), Some(i + 1)));
        }
        // A request head over 16 KiB is refused by the HTTP layer.
        let big = "a".repeat(20 * 1024);
        let (status, _) = gw.https("GET", "/healthz", &[("x-filler", &big)], "").await;
        assert_eq!(status, 431);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_connects_get_the_same_origin_and_limit_checks() {
    within(30, async {
        use gateway_tests::wt::{connect_status, open_session, WtClient};
        let toml = "[limits]\nmax_connections_per_ip = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n";
        let gw = TestGateway::start(toml).await;
        let _first = gw.wt_welcomed("/chat").await;
        let r = open_session(gw.udp_port(), &gw.cert_sha256, "/chat").await;
        let Err(e) = r else { panic!("second session must be refused") };
        assert_eq!(connect_status(&e), Some(429));

        // Garbage on the message stream: an unknown frame kind closes the session with 1002
        // after the `close` envelope.
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let mut c: WtClient = gw.wt("/chat").await.unwrap();
        assert_eq!(c.recv().await["type"], "welcome");
        c.send_raw(&[0x7f, 0, 0, 0, 1, 0]).await;
        let close = c.recv().await;
        assert_eq!((close["type"].as_str(), close["code"].as_u64()), (Some("close"), Some(1002)));
    })
    .await;
}

/// The real binary from a config file with `[auth]` `issuer`, `audience` and, when given,
/// `max_token_lifetime_secs`.
async fn claims_gateway(dir: &Path, max_lifetime: Option<u64>) -> RunningGateway {
    let config = dir.join("gateway.toml");
    let max = max_lifetime.map_or(String::new(), |m| {
        format!("max_token_lifetime_secs = {m}\n")
    });
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n{AUTH_SECTION}issuer = \"https://issuer\"\naudience = \"gateway\"\n{max}[[endpoint]]\npath = \"/chat\"\n"
        ),
    )
    .unwrap();
    RunningGateway::start(&config, dir).await
}

/// Issue 20, finding 6: a configured `audience` and `issuer` are required and exact, and
/// `max_token_lifetime_secs` bounds `exp`; the refusals are a 401 at the upgrade, through
/// the real binary and its config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_claims_are_required_and_the_lifetime_is_bounded_at_the_upgrade() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let gw = claims_gateway(dir.path(), Some(86400)).await;
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let good =
            json!({"sub":"u","exp":now()+300,"iat":now(),"iss":"https://issuer","aud":"gateway"});
        let with = |extra: Value| {
            let mut c = good.clone();
            for (k, v) in extra.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            sign(Algorithm::HS256, &key, c)
        };
        let cases = [
            ("no aud", with(json!({"aud": null}))),
            ("numeric aud", with(json!({"aud": 5}))),
            ("object aud", with(json!({"aud": {"x": 1}}))),
            ("no iss", with(json!({"iss": null}))),
            ("numeric iss", with(json!({"iss": 7}))),
            ("exp 2^62", with(json!({"exp": 1u64 << 62}))),
            (
                "exp 2^62 without iat",
                with(json!({"exp": 1u64 << 62, "iat": null})),
            ),
            (
                "exp 2 days after iat",
                with(json!({"exp": now() + 60, "iat": now() - 2 * 86400})),
            ),
        ];
        for (case, token) in cases {
            let err = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?token={token}"), &[])
                .await
                .err();
            assert_eq!(err.as_ref().and_then(http_status), Some(401), "{case}");
            let header = format!("Bearer {token}");
            let err = WsClient::connect(gw.addr, &gw.cert, "/chat", &[("authorization", &header)])
                .await
                .err();
            assert_eq!(
                err.as_ref().and_then(http_status),
                Some(401),
                "header: {case}"
            );
        }
        for (case, token) in [
            ("valid", with(json!({}))),
            (
                "aud array with the audience",
                with(json!({"aud": ["other", "gateway"]})),
            ),
            ("a day after iat", with(json!({"exp": now() + 86000}))),
        ] {
            let mut c = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?token={token}"), &[])
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(c.recv().await["type"], "welcome", "{case}");
        }
    })
    .await;
}

/// Without `max_token_lifetime_secs` a token with an enormous `exp` is admitted and its
/// session works: no overflow on the expiry deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_exp_without_a_maximum_lifetime_breaks_nothing() {
    within(120, async {
        let dir = tempfile::tempdir().unwrap();
        let gw = claims_gateway(dir.path(), None).await;
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        for exp in [1u64 << 62, u64::MAX] {
            let claims = json!({"sub":"u","exp":exp,"iss":"https://issuer","aud":"gateway"});
            let token = sign(Algorithm::HS256, &key, claims);
            let mut c = WsClient::connect(gw.addr, &gw.cert, &format!("/chat?token={token}"), &[])
                .await
                .unwrap();
            assert_eq!(c.recv().await["type"], "welcome", "exp {exp}");
            c.join("r").await;
            let pong = c.request(json!({"type":"ping","id":7})).await;
            assert_eq!(pong, json!({"type":"pong","id":7}), "exp {exp}");
        }
    })
    .await;
}
