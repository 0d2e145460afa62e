//! Unauthenticated resource exhaustion, each attack at a scale that fits the suite: request
//! bodies before authentication, HTTP/3 requests, idle connections on both fronts, the ticket
//! store, frames that carry no request, and oversized request heads. Each test fails against
//! a gateway without the matching defence.

use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::SinkExt;
use gateway_tests::*;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    },
    Message,
};

const API: &str = "[api]\nkey = \"right-key\"\n";

/// Writes a request head (and part of a body) over a fresh TLS connection and returns the
/// status of the response that arrives within `wait`, if any, without finishing the body.
async fn status_without_finishing(
    gw: &TestGateway,
    head: &str,
    partial_body: usize,
    wait: Duration,
) -> Option<u16> {
    let mut tls = tls_connect(gw.addr, &gw.cert_path).await.unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    let mut sent = 0;
    while sent < partial_body {
        let n = chunk.len().min(partial_body - sent);
        if tls.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    let _ = tls.flush().await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, tls.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn post_head(path: &str, key: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_credentials_are_checked_before_the_body_and_bodies_are_bounded() {
    within(60, async {
        let toml = format!("{API}{AUTH_SECTION}[limits]\nhandshake_timeout_secs = 2\n[[endpoint]]\npath = \"/chat\"\n");
        let gw = TestGateway::start(&toml).await;
        let quick = Duration::from_millis(1500);
        // A wrong key with a 2 MB body, of which 64 KiB arrive: 401 at once, body unread.
        for path in ["/api/publish", "/api/send", "/api/disconnect"] {
            let status = status_without_finishing(&gw, &post_head(path, "wrong", 2_000_000), 64 * 1024, quick).await;
            assert_eq!(status, Some(401), "{path}");
        }
        let status = status_without_finishing(&gw, &post_head("/api/tickets", "not-a-jwt", 2_000_000), 64 * 1024, quick).await;
        assert_eq!(status, Some(401), "tickets");
        // The right key, a body larger than the route can use: 413 at once.
        let status = status_without_finishing(&gw, &post_head("/api/publish", "right-key", 2_000_000), 0, quick).await;
        assert_eq!(status, Some(413));
        let status = status_without_finishing(&gw, &post_head("/api/disconnect", "right-key", 5000), 0, quick).await;
        assert_eq!(status, Some(413));
        // Tickets read no body: a small one (a `{}` some clients always send) is ignored,
        // a large one refused.
        let jwt = token("u", 300, json!({}));
        let bearer = format!("Bearer {jwt}");
        let (status, body) = gw.https("POST", "/api/tickets", &[("Authorization", &bearer)], "{}").await;
        assert_eq!(status, 200, "{body}");
        let status = status_without_finishing(&gw, &post_head("/api/tickets", &jwt, 5000), 0, quick).await;
        assert_eq!(status, Some(413));
        // The right key and a body that stalls: 408 once the handshake timeout passes.
        let started = Instant::now();
        let status = status_without_finishing(&gw, &post_head("/api/publish", "right-key", 100), 10, Duration::from_secs(4)).await;
        assert_eq!(status, Some(408));
        assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
        // `data` is checked as a client publish's is.
        let auth = [("Authorization", "Bearer right-key")];
        let deep = format!(r#"{{"room":"r","data":{}{}}}"#, "[".repeat(100), "]".repeat(100));
        let (status, body) = gw.https("POST", "/api/publish", &auth, &deep).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("nested deeper than 64"), "{body}");
        let (status, body) = gw.https("POST", "/api/send", &auth, r#"{"user":"u","data":{"n":1e400}}"#).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = gw.https("POST", "/api/publish", &auth, r#"{"room":"r","data":{"n":1.5}}"#).await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_body_limit_follows_the_largest_message_size() {
    within(60, async {
        let toml = format!(
            "{API}[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nmax_message_bytes = 3000000\n"
        );
        let gw = TestGateway::start(&toml).await;
        let auth = [("Authorization", "Bearer right-key")];
        // Larger than axum's own 2 MiB default: the route's limit is what applies.
        let big = format!(r#"{{"room":"r","data":"{}"}}"#, "x".repeat(2_500_000));
        let (status, body) = gw.https("POST", "/api/publish", &auth, &big).await;
        assert_eq!(status, 200, "{body}");
        let head = post_head("/api/publish", "right-key", 3_100_000);
        let status = status_without_finishing(&gw, &head, 0, Duration::from_secs(2)).await;
        assert_eq!(status, Some(413));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_responses_is_disconnected() {
    within(60, async {
        let gw = TestGateway::start("[limits]\nhandshake_timeout_secs = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        // A fixed 64 KiB receive window: this machine's kernel would otherwise let the
        // client's buffer grow to 32 MiB (`tcp_rmem`), more than every response below.
        let tls = tls_connect_with_recv_buffer(gw.addr, &gw.cert_path, 64 * 1024)
            .await
            .unwrap();
        let (mut reader, mut writer) = tokio::io::split(tls);
        // Pipelined requests, far more responses than the socket buffers hold, none read.
        let writing = tokio::spawn(async move {
            let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(1000);
            for _ in 0..100 {
                if writer.write_all(&request).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
            }
            writer
        });
        // Long enough for a debug build to fill the socket buffers with responses (some 30,000
        // a second here) and then stall past the 1 s timeout.
        tokio::time::sleep(Duration::from_secs(6)).await;
        // The server gave up on the stalled writes: reading finds the end of the stream.
        let mut sink = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut sink)).await;
        assert!(ended.is_ok(), "the connection is still open after {} bytes", sink.len());
        writing.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_do_not_hold_memory() {
    within(90, async {
        // The real binary, so its resident memory can be read.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{API}[limits]\nhandshake_timeout_secs = 5\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n")).unwrap();
        let mut gateway = RunningGateway::start(&config, dir.path()).await;
        let baseline = gateway.rss_kib();
        // 100 connections each declare 2 MB and send 1 MB with a wrong key, then stall.
        let mut conns = Vec::new();
        for _ in 0..100 {
            let mut tls = tls_connect(gateway.addr, &gateway.cert).await.unwrap();
            tls.write_all(post_head("/api/publish", "wrong", 2_000_000).as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if tls.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = tls.flush().await;
            conns.push(tls);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = gateway.rss_kib();
        // Unread, the bodies would be 100 MB; refused at the head, they cost nothing.
        assert!(peak < baseline + 40 * 1024, "RSS {baseline} KiB -> {peak} KiB");
        drop(conns);
        gateway.stop();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_count_against_the_limits_and_idle_ones_close() {
    within(60, async {
        let gw = TestGateway::start("[limits]\nmax_connections_per_ip = 2\nhandshake_timeout_secs = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let mut idle = Vec::new();
        for _ in 0..2 {
            let mut tls = tls_connect(gw.addr, &gw.cert_path).await.unwrap();
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
            tls.flush().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = tls.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            idle.push(tls);
        }
        // Two kept-alive HTTP connections fill this address's quota.
        let e = gw.ws("/chat").await.err().expect("a third connection is over the limit");
        assert_eq!(http_status(&e), Some(429));
        // Over the limit, plain requests get the status too; an unknown path is still 404
        // (PROTOCOL.md checks the path first).
        let (status, _) = gw.https("GET", "/healthz", &[], "").await;
        assert_eq!(status, 429);
        let (status, _) = gw.https("GET", "/nowhere", &[], "").await;
        assert_eq!(status, 404);
        // Idle kept-alive connections are closed after the handshake timeout.
        for mut tls in idle {
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await;
            assert!(matches!(r, Ok(Ok(0) | Err(_))), "idle connection still open: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw.ws_welcomed("/chat").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_quic_connections_count_and_are_closed() {
    within(60, async {
        let gw = TestGateway::start("[limits]\nmax_connections_per_ip = 2\nhandshake_timeout_secs = 1\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let endpoint = quic_client(&gw.cert_path).unwrap();
        let server = format!("127.0.0.1:{}", gw.udp_port()).parse().unwrap();
        let mut idle = Vec::new();
        let opened = Instant::now();
        for _ in 0..2 {
            idle.push(endpoint.connect(server, "127.0.0.1").unwrap().await.unwrap());
        }
        // Two handshaken QUIC connections that do nothing fill the quota.
        let refused = gw.wt("/chat").await;
        assert!(refused.is_err(), "a session over the limit must be refused");
        if let Err(e) = &refused {
            assert_eq!(gateway_tests::wt::connect_status(e), Some(429), "{e}");
        }
        // Without a session or a request they are closed after the handshake timeout.
        for conn in idle {
            tokio::time::timeout(Duration::from_secs(4), conn.closed())
                .await
                .expect("an idle QUIC connection must be closed");
        }
        let lived = opened.elapsed();
        assert!(lived > Duration::from_millis(900) && lived < Duration::from_secs(3), "{lived:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw.wt_welcomed("/chat").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_requests_check_the_key_first_and_have_a_deadline() {
    within(60, async {
        let toml = format!("{API}[limits]\nhandshake_timeout_secs = 2\n[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n");
        let gw = TestGateway::start(&toml).await;
        let endpoint = quic_client(&gw.cert_path).unwrap();
        let port = gw.udp_port();
        let conn = endpoint
            .connect(format!("127.0.0.1:{port}").parse().unwrap(), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
        let drive = tokio::spawn(async move { futures_util::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let post = |key: &str| {
            http::Request::post(format!("https://127.0.0.1:{port}/api/publish"))
                .header("authorization", format!("Bearer {key}"))
                .body(())
                .unwrap()
        };
        // A wrong key with 127 KB of body and no FIN: 401 without waiting for the body.
        let mut stream = send.send_request(post("wrong")).await.unwrap();
        stream.send_data(Bytes::from(vec![b'x'; 127 * 1024])).await.unwrap();
        let response = tokio::time::timeout(Duration::from_millis(1500), stream.recv_response())
            .await
            .expect("the refusal must not wait for the body")
            .unwrap();
        assert_eq!(response.status(), 401);
        // The right key and a stalled body: 408 at the deadline.
        let started = Instant::now();
        let mut stream = send.send_request(post("right-key")).await.unwrap();
        stream.send_data(Bytes::from_static(b"{\"room\":")).await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), stream.recv_response())
            .await
            .expect("a stalled request must be answered")
            .unwrap();
        assert_eq!(response.status(), 408);
        assert!(started.elapsed() >= Duration::from_millis(1900));
        // A complete request on the same connection still works.
        let mut stream = send.send_request(post("right-key")).await.unwrap();
        stream.send_data(Bytes::from_static(br#"{"room":"r","data":1}"#)).await.unwrap();
        stream.finish().await.unwrap();
        let response = stream.recv_response().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["seq"], 1);
        drop(send);
        drive.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_fill_the_ticket_store() {
    within(60, async {
        let gw =
            TestGateway::start(&format!("{AUTH_SECTION}[[endpoint]]\npath = \"/chat\"\n")).await;
        let greedy = format!("Bearer {}", token("greedy", 300, json!({})));
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(
                gw.https("POST", "/api/tickets", &[("Authorization", &greedy)], "")
                    .await
                    .0,
            );
        }
        assert_eq!(&statuses[..16], &[200; 16]);
        assert_eq!(&statuses[16..], &[429; 4]);
        let other = format!("Bearer {}", token("other", 300, json!({})));
        let (status, body) = gw
            .https("POST", "/api/tickets", &[("Authorization", &other)], "")
            .await;
        assert_eq!(status, 200, "{body}");
        let ticket = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ticket"]
            .as_str()
            .unwrap()
            .to_owned();
        gw.ws_welcomed(&format!("/chat?ticket={ticket}")).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_empty_continuation_frames_count_against_the_rate_limit() {
    within(60, async {
        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\nrate_per_sec = 5\nrate_burst = 5\n",
        )
        .await;
        let (mut bystander, _) = gw.ws_welcomed("/chat").await;
        bystander.join("calm").await;

        let (mut pinger, _) = gw.ws_welcomed("/chat").await;
        for _ in 0..200 {
            if pinger.ws.send(Message::Ping(Bytes::new())).await.is_err() {
                break;
            }
        }
        let (ending, _) = pinger.ending().await;
        assert_eq!(ending, Ending::Close(4008, "rate limit exceeded".into()));

        let (mut fragmenter, _) = gw.ws_welcomed("/chat").await;
        let first = Frame::message(Bytes::from_static(b"{"), OpCode::Data(Data::Text), false);
        let _ = fragmenter.ws.send(Message::Frame(first)).await;
        for _ in 0..200 {
            let empty = Frame::message(Bytes::new(), OpCode::Data(Data::Continue), false);
            if fragmenter.ws.send(Message::Frame(empty)).await.is_err() {
                break;
            }
        }
        let (ending, _) = fragmenter.ending().await;
        assert_eq!(ending, Ending::Close(4008, "rate limit exceeded".into()));

        // The bystander is served throughout.
        let (mut publisher, _) = gw.ws_welcomed("/chat").await;
        let ack = publisher
            .request(json!({"type":"publish","room":"calm","data":"still here","id":1}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(bystander.recv().await["data"], "still here");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431_not_a_reset() {
    within(60, async {
        let gw = TestGateway::start("[[endpoint]]\npath = \"/chat\"\nauth = \"none\"\n").await;
        let long_line = format!(
            "GET /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let mut many_headers = String::from("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for i in 0..10_000 {
            many_headers.push_str(&format!("x-h{i}: v\r\n"));
        }
        many_headers.push_str("\r\n");
        for (n, request) in [long_line, many_headers].into_iter().enumerate() {
            let mut tls = tls_connect(gw.addr, &gw.cert_path).await.unwrap();
            // Sent as a simple client does, all of it before reading, in small pieces: the
            // server answers long before the end, and must not reset the connection under
            // the client's later writes (a client that sees its send fail never reads the 431).
            for (i, piece) in request.as_bytes().chunks(512).enumerate() {
                if let Err(e) = tls.write_all(piece).await {
                    panic!("request {n} write {i} failed: {e}");
                }
                tls.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let mut raw = Vec::new();
            let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut raw)).await;
            let text = String::from_utf8_lossy(&raw);
            assert!(
                text.starts_with("HTTP/1.1 431"),
                "got {:?}",
                &text[..text.len().min(80)]
            );
        }
    })
    .await;
}
