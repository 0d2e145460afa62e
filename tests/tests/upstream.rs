//! Upstream calls to the application's backend (PROTOCOL.md section 10, CONFIG.md
//! `[endpoint.upstream]`), against a real backend process the test starts and scripts
//! (`fixtures/upstream_backend.py`). Every case with client frames runs over WebSocket and
//! over WebTransport (`NAME::websocket`, `NAME::webtransport`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_tests::{
    backend::{down_url, Backend, Call},
    both::{Frame, Transport},
    *,
};
use serde_json::{json, Value};

/// Runs `NAME(transport)` as `NAME::websocket` and `NAME::webtransport`.
macro_rules! both_transports {
    ($name:ident, $secs:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn websocket() {
                within($secs, super::$name(Transport::Ws)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn webtransport() {
                within($secs, super::$name(Transport::Wt)).await;
            }
        }
    };
}

/// The upstream secret of `/up`.
const UPSTREAM_SECRET: &str = "upstream-s3cret";

/// The gateway's configuration around one backend:
/// - `/up`: `auth = "upstream"`, every event, upstream rooms `up.*`, the secret, cookie and
///   x-request-id forwarded;
/// - `/jwt`: `auth = "required"` (HS256 tokens) with a `connect` and `disconnect` upstream,
///   no secret;
/// - `/partial`: `auth = "none"` with only a `join` upstream (no rpc, no publish calls);
/// - `/plain`: `auth = "none"`, no upstream (observers: rooms are one namespace).
///
/// Rooms keep a history of 50.
struct Setup {
    timeout_ms: u64,
    max_in_flight: u32,
    breaker_failures: u32,
    breaker_secs: u64,
    /// Extra keys of the `/up` endpoint (before its `[endpoint.upstream]`).
    endpoint_extra: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            timeout_ms: 300,
            max_in_flight: 64,
            // High enough that the failure cases do not open the circuit by accident.
            breaker_failures: 1000,
            breaker_secs: 1,
            endpoint_extra: "",
        }
    }
}

impl Setup {
    fn toml(&self, url: &str) -> String {
        let Setup {
            timeout_ms,
            max_in_flight,
            breaker_failures,
            breaker_secs,
            endpoint_extra,
        } = self;
        format!(
            "{AUTH_SECTION}\
             [api]\nkey = \"api-key\"\n\
             [[endpoint]]\npath = \"/up\"\nauth = \"upstream\"\n{endpoint_extra}\n\
             [endpoint.upstream]\nurl = \"{url}\"\n\
             events = [\"connect\", \"join\", \"publish\", \"rpc\", \"disconnect\"]\n\
             rooms = [\"up.*\"]\ntimeout_ms = {timeout_ms}\nmax_in_flight = {max_in_flight}\n\
             forward_headers = [\"cookie\", \"x-request-id\"]\nsecret = \"{UPSTREAM_SECRET}\"\n\
             breaker_failures = {breaker_failures}\nbreaker_secs = {breaker_secs}\n\
             [[endpoint]]\npath = \"/jwt\"\n\
             [endpoint.upstream]\nurl = \"{url}\"\nevents = [\"connect\", \"disconnect\"]\n\
             timeout_ms = {timeout_ms}\n\
             [[endpoint]]\npath = \"/partial\"\nauth = \"none\"\n\
             [endpoint.upstream]\nurl = \"{url}\"\nevents = [\"join\"]\nrooms = [\"up.*\"]\n\
             timeout_ms = {timeout_ms}\n\
             [[endpoint]]\npath = \"/plain\"\nauth = \"none\"\n\
             [[room]]\npattern = \"*\"\nhistory = 50\nhistory_ttl_secs = 60\n"
        )
    }
}

/// A backend and a gateway calling it.
async fn start(setup: Setup) -> (Backend, TestGateway) {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&setup.toml(&backend.url())).await;
    (backend, gw)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Checks the fields every call body carries, and the call's request.
fn assert_common(call: &Call, event: &str, transport: Transport, endpoint: &str) {
    let body = &call.body;
    assert_eq!(call.path, format!("/gw/{event}"), "{call:?}");
    assert_eq!(body["endpoint"], endpoint, "{body}");
    assert_eq!(body["transport"], transport.name(), "{body}");
    assert_eq!(body["node"], "test-node", "{body}");
    let remote = body["remote_addr"].as_str().unwrap_or_default();
    assert!(remote.starts_with("127.0.0.1"), "remote_addr: {body}");
    assert!(
        call.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{call:?}"
    );
}

/// Checks a call of `/up`: the common fields, the secret, and `session` / `user`.
fn assert_up_call(call: &Call, event: &str, transport: Transport, welcome: &Value) {
    assert_common(call, event, transport, "/up");
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {UPSTREAM_SECRET}").as_str()),
        "{call:?}"
    );
    assert_eq!(call.body["session"], welcome["session"], "{}", call.body);
    assert_eq!(call.body["user"], welcome["user"], "{}", call.body);
}

fn error(id: u64, code: &str, reply: &Value) {
    assert_eq!(
        (
            reply["type"].as_str(),
            reply["id"].as_u64(),
            reply["code"].as_str()
        ),
        (Some("error"), Some(id), Some(code)),
        "{reply}"
    );
}

fn message_contains(reply: &Value, text: &str) {
    assert!(
        reply["message"].as_str().is_some_and(|m| m.contains(text)),
        "the backend's reason {text:?} in {reply}"
    );
}

/// The next `message` envelope of a WebSocket observer (presence events skipped).
async fn next_message(c: &mut WsClient) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == "message" {
            return m;
        }
        assert_eq!(m["type"], "presence", "{m}");
    }
}

fn publish(room: &str, id: u64, data: Value) -> Value {
    json!({"type":"publish","room":room,"id":id,"data":data})
}

fn rpc(id: u64, method: &str, data: Value) -> Value {
    json!({"type":"rpc","id":id,"method":method,"data":data})
}

// ---------------------------------------------------------------------------------------
// connect

both_transports!(
    connect_answer_admits_the_user_with_its_rooms_joins_and_data,
    30
);

async fn connect_answer_admits_the_user_with_its_rooms_joins_and_data(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    let (mut observer, _) = gw.ws_welcomed("/plain").await;
    observer.join("up.j").await;
    backend
        .script(json!([{"event":"connect","json":{
            "user":"alice",
            "rooms":["up.a","up.b","up.j"],
            "publish":["up.a"],
            "join":["up.j"],
            "data":{"plan":"pro","n":[1,2]}
        }}]))
        .await;
    let (mut c, welcome) = gw
        .welcomed_with_headers(
            t,
            "/up?user=x&token=not-a-jwt&ticket=not-a-ticket&foo=bar&foo=baz",
            &[
                ("cookie", "sid=1"),
                ("X-Request-Id", "req-1"),
                ("x-other", "not forwarded"),
            ],
        )
        .await;
    assert_eq!(welcome["user"], "alice", "{welcome}");
    assert_eq!(
        welcome["data"],
        json!({"plan":"pro","n":[1,2]}),
        "{welcome}"
    );
    assert_eq!(welcome["transport"], t.name());
    assert_eq!(welcome["endpoint"], "/up");

    // The connect call: no credential was read on an upstream endpoint, so no user.
    let calls = backend.calls_of("connect").await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let call = &calls[0];
    assert_common(call, "connect", t, "/up");
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {UPSTREAM_SECRET}").as_str())
    );
    assert_eq!(
        call.body["headers"],
        json!({"cookie":"sid=1","x-request-id":"req-1"}),
        "only forward_headers, lower-case names: {}",
        call.body
    );
    assert_eq!(
        call.body["query"],
        json!({"user":"x","foo":"bar"}),
        "query minus token and ticket, first value of a repeated one: {}",
        call.body
    );
    assert!(call.body.get("user").is_none(), "{}", call.body);
    assert!(call.body.get("claims").is_none(), "{}", call.body);

    // Joined to each room of `join`: the observer sees alice arrive, and alice gets the
    // room's messages without having sent a join.
    let presence = observer.recv().await;
    assert_eq!(
        presence,
        json!({"type":"presence","room":"up.j","event":"join","user":"alice"})
    );
    observer
        .request(publish("up.j", 1, json!("to alice")))
        .await;
    let mut m = c.recv().await;
    if m["type"] == "ack" {
        // The contract does not say whether a join of `join` is acknowledged; if it is,
        // the ack names the room and has no id (the client sent no request).
        assert_eq!(m["room"], "up.j", "{m}");
        assert!(m.get("id").is_none(), "{m}");
        m = c.recv().await;
    }
    assert_eq!(
        (m["type"].as_str(), m["room"].as_str(), &m["data"]),
        (Some("message"), Some("up.j"), &json!("to alice")),
        "{m}"
    );

    // `rooms` and `publish` act as a JWT's claims would; refused frames are never called.
    let reply = c.request(json!({"type":"join","room":"up.c","id":2})).await;
    error(2, "forbidden", &reply);
    let ack = c.request(json!({"type":"join","room":"up.b","id":3})).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(3)),
        "{ack}"
    );
    assert_eq!(ack["room"], "up.b");
    let reply = c.request(publish("up.b", 4, json!(1))).await;
    error(4, "forbidden", &reply);
    let ack = c.request(publish("up.a", 5, json!({"ok":1}))).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(5)),
        "{ack}"
    );
    assert!(ack["seq"].is_u64(), "{ack}");

    let joins = backend.calls_of("join").await;
    assert!(
        joins.iter().all(|j| j.body["room"] != "up.c"),
        "a forbidden join is not called: {joins:#?}"
    );
    let join = joins
        .iter()
        .find(|j| j.body["room"] == "up.b")
        .expect("the join of up.b was called");
    assert_up_call(join, "join", t, &welcome);
    let publishes = backend.calls_of("publish").await;
    assert_eq!(
        publishes.len(),
        1,
        "a forbidden publish is not called: {publishes:#?}"
    );
    assert_up_call(&publishes[0], "publish", t, &welcome);
    assert_eq!(publishes[0].body["room"], "up.a");
    assert_eq!(publishes[0].body["data"], json!({"ok":1}));

    // A connect answer with only `user`: the endpoint's default rooms, no `welcome.data`.
    backend
        .script(json!([{"event":"connect","json":{"user":"bob"}}]))
        .await;
    let (mut bob, welcome) = gw.welcomed(t, "/up").await;
    assert_eq!(welcome["user"], "bob");
    assert!(welcome.get("data").is_none(), "{welcome}");
    let ack = bob
        .request(json!({"type":"join","room":"up.c","id":1}))
        .await;
    assert_eq!(ack["type"], "ack", "the endpoint's rooms: {ack}");
    let ack = bob.request(publish("anywhere", 2, json!(2))).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        backend.calls_of("publish").await.len(),
        1,
        "a room outside the upstream's rooms is not called"
    );
}

both_transports!(connect_refusals_are_their_status_and_no_session, 30);

async fn connect_refusals_are_their_status_and_no_session(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    for status in [401u16, 403, 429] {
        backend
            .script(json!([{"event":"connect","status":status,"json":{"reason":"not you"}}]))
            .await;
        let refused = gw.open(t, "/up?user=eve", &[]).await.err();
        assert_eq!(refused, Some(Some(status)), "connect answered {status}");
    }
    assert_eq!(backend.calls_of("connect").await.len(), 3);
    // The same endpoint admits once the backend does.
    backend.reset().await;
    let (_c, welcome) = gw.welcomed(t, "/up?user=eve").await;
    assert_eq!(welcome["user"], "eve");
    // Refused requests were never sessions: no disconnect call for them (only, later, for
    // the admitted one).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(backend.calls_of("disconnect").await.is_empty());
}

both_transports!(connect_failures_are_503, 30);

async fn connect_failures_are_503(t: Transport) {
    let (mut backend, gw) = start(Setup::default()).await;
    let failures = [
        json!({"event":"connect","status":500,"json":{"user":"x"}}),
        json!({"event":"connect","status":503,"raw":""}),
        json!({"event":"connect","raw":"<html>not json</html>","content_type":"text/html"}),
        json!({"event":"connect","raw":"{\"user\":","content_type":"application/json"}),
        json!({"event":"connect","json":{"not_a_user":1}}),
        // An array with the fields in order: still not the object the table names.
        json!({"event":"connect","json":["eve", null, null, null, null, null]}),
        json!({"event":"connect","delay_ms":800}),
        json!({"event":"connect","drop":true}),
    ];
    for (i, rule) in failures.iter().enumerate() {
        backend.script(json!([rule])).await;
        let started = tokio::time::Instant::now();
        let refused = gw.open(t, "/up?user=f", &[]).await.err();
        assert_eq!(refused, Some(Some(503)), "{rule}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{rule}: {:?}",
            started.elapsed()
        );
        backend.wait_for_calls("connect", i + 1).await;
    }
    // The backend down.
    backend.stop();
    let refused = gw.open(t, "/up?user=f", &[]).await.err();
    assert_eq!(refused, Some(Some(503)), "backend down");
}

both_transports!(jwt_endpoints_call_connect_after_the_credential_check, 30);

async fn jwt_endpoints_call_connect_after_the_credential_check(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    // No credential, or a bad one: 401 before any call.
    assert_eq!(gw.open(t, "/jwt", &[]).await.err(), Some(Some(401)));
    assert_eq!(
        gw.open(t, "/jwt?token=garbage", &[]).await.err(),
        Some(Some(401))
    );
    let expired = token("carol", -10, json!({}));
    assert_eq!(
        gw.open(t, &format!("/jwt?token={expired}"), &[])
            .await
            .err(),
        Some(Some(401))
    );
    assert!(backend.calls_of("connect").await.is_empty());

    let jwt = token("carol", 300, json!({"rooms":["up.*"]}));
    backend
        .script(json!([
            {"event":"connect","match":{"user":"carol"},"times":1,"status":403,"json":{"reason":"banned"}},
            {"event":"connect","json":{"user":"carol","data":{"k":1}}}
        ]))
        .await;
    assert_eq!(
        gw.open(t, &format!("/jwt?token={jwt}&x=1"), &[])
            .await
            .err(),
        Some(Some(403))
    );
    let (_c, welcome) = gw.welcomed(t, &format!("/jwt?token={jwt}&x=1")).await;
    assert_eq!(welcome["user"], "carol");
    assert_eq!(welcome["data"], json!({"k":1}));
    let calls = backend.calls_of("connect").await;
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_common(call, "connect", t, "/jwt");
        assert_eq!(call.body["user"], "carol", "{}", call.body);
        assert_eq!(call.body["claims"]["sub"], "carol", "{}", call.body);
        assert_eq!(
            call.body["claims"]["rooms"],
            json!(["up.*"]),
            "{}",
            call.body
        );
        assert_eq!(call.body["query"], json!({"x":"1"}), "{}", call.body);
        assert_eq!(
            call.header("authorization"),
            None,
            "no secret, no Authorization"
        );
    }
}

// ---------------------------------------------------------------------------------------
// expires_at and refresh

both_transports!(expires_at_closes_4001_unless_refreshed_through_connect, 30);

async fn expires_at_closes_4001_unless_refreshed_through_connect(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    let expires_at = now_secs().ceil() as u64 + 2;
    let later = expires_at + 60;
    backend
        .script(json!([
            {"event":"connect","match":{"refresh":true,"token":"good"},"json":{"user":"alice","expires_at":later}},
            {"event":"connect","match":{"refresh":true,"token":"other-user"},"json":{"user":"mallory","expires_at":later}},
            {"event":"connect","match":{"refresh":true,"token":"refused"},"status":401,"json":{"reason":"no"}},
            {"event":"connect","json":{"user":"alice","expires_at":expires_at}}
        ]))
        .await;
    let (mut expiring, _) = gw.welcomed(t, "/up?user=alice").await;
    let (mut refreshed, welcome) = gw.welcomed(t, "/up?user=alice").await;

    // Refused refreshes: error unauthorized, the old expiry stands.
    let reply = expiring
        .request(json!({"type":"auth","id":1,"token":"refused"}))
        .await;
    error(1, "unauthorized", &reply);
    let reply = refreshed
        .request(json!({"type":"auth","id":2,"token":"other-user"}))
        .await;
    error(2, "unauthorized", &reply);
    let reply = refreshed
        .request(json!({"type":"auth","id":3,"token":"refused"}))
        .await;
    error(3, "unauthorized", &reply);
    // A 200 naming the same user moves the expiry.
    let ack = refreshed
        .request(json!({"type":"auth","id":4,"token":"good"}))
        .await;
    assert_eq!(ack, json!({"type":"ack","id":4}));
    let refresh = backend
        .wait_for_call("connect", "token", &json!("good"))
        .await;
    assert_up_call(&refresh, "connect", t, &welcome);
    assert_eq!(refresh.body["refresh"], true, "{}", refresh.body);

    // Closed at expires_at, without leeway.
    let (ending, _) = expiring.ending().await;
    let closed_at = now_secs();
    assert!(matches!(ending, Ending::Close(4001, _)), "{ending:?}");
    assert!(
        closed_at >= expires_at as f64 - 0.05 && closed_at < expires_at as f64 + 2.5,
        "closed at {closed_at}, expires_at {expires_at}"
    );
    refreshed.expect_silence(Duration::from_millis(700)).await;
}

// ---------------------------------------------------------------------------------------
// join

both_transports!(join_answers_refusals_and_failures, 30);

async fn join_answers_refusals_and_failures(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    backend
        .script(json!([
            {"event":"join","match":{"room":"up.data"},"json":{"data":{"topic":"t"}}},
            {"event":"join","match":{"room":"up.empty"},"json":{}},
            {"event":"join","match":{"room":"up.no"},"status":403,"json":{"reason":"members only"}},
            {"event":"join","match":{"room":"up.500"},"status":500,"json":{}},
            {"event":"join","match":{"room":"up.slow"},"delay_ms":800,"json":{}},
            {"event":"join","match":{"room":"up.text"},"raw":"yes","content_type":"text/plain"},
            {"event":"join","match":{"room":"up.list"},"json":[1]}
        ]))
        .await;
    let (mut c, welcome) = gw.welcomed(t, "/up?user=jo").await;
    let join = |room: &str, id: u64| json!({"type":"join","room":room,"id":id});

    let ack = c.request(join("up.data", 11)).await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["id"].as_u64(),
            ack["room"].as_str()
        ),
        (Some("ack"), Some(11), Some("up.data")),
        "{ack}"
    );
    assert_eq!(ack["data"], json!({"topic":"t"}), "{ack}");
    assert!(ack["seq"].is_u64() && ack["members"].is_u64(), "{ack}");
    let ack = c.request(join("up.empty", 12)).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(12)),
        "{ack}"
    );
    assert!(ack.get("data").is_none(), "{ack}");

    let reply = c.request(join("up.no", 13)).await;
    error(13, "forbidden", &reply);
    message_contains(&reply, "members only");
    for (id, room) in [
        (14, "up.500"),
        (15, "up.slow"),
        (16, "up.text"),
        (17, "up.list"),
    ] {
        let reply = c.request(join(room, id)).await;
        error(id, "unavailable", &reply);
    }
    // A room outside the upstream's rooms is joined without a call.
    let ack = c.request(join("elsewhere", 18)).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let calls = backend.calls_of("join").await;
    let rooms: Vec<&str> = calls
        .iter()
        .map(|c| c.body["room"].as_str().unwrap())
        .collect();
    assert_eq!(
        rooms,
        ["up.data", "up.empty", "up.no", "up.500", "up.slow", "up.text", "up.list"]
    );
    for call in &calls {
        assert_up_call(call, "join", t, &welcome);
    }

    // Membership: only the rooms whose join succeeded deliver.
    let (mut observer, _) = gw.ws_welcomed("/plain").await;
    for room in [
        "up.no", "up.500", "up.slow", "up.text", "up.list", "up.empty", "up.data",
    ] {
        let ack = observer.request(publish(room, 1, json!(room))).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    for room in ["up.empty", "up.data"] {
        let m = c.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["room"].as_str()),
            (Some("message"), Some(room)),
            "{m}"
        );
    }
    c.expect_silence(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// publish

both_transports!(publish_as_sent_rewritten_skipped_rejected_or_failed, 30);

async fn publish_as_sent_rewritten_skipped_rejected_or_failed(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    backend
        .script(json!([
            {"event":"publish","match":{"data":{"n":2}},"json":{"data":{"n":2,"checked":true}}},
            {"event":"publish","match":{"data":{"n":3}},"json":{"skip":true}},
            {"event":"publish","match":{"data":{"n":4}},"status":400,"json":{"reason":"bad words"}},
            {"event":"publish","match":{"data":{"n":5}},"status":500,"json":{}},
            {"event":"publish","match":{"data":{"n":6}},"delay_ms":800,"json":{}},
            {"event":"publish","match":{"data":{"n":7}},"raw":"<html>","content_type":"text/html"},
            {"event":"publish","match":{"data":{"n":11}},"json":[{"forged":true}, null]},
            {"event":"publish","match":{"data":{"n":9}},"json":{"data":"nine"}}
        ]))
        .await;
    let (mut observer, _) = gw.ws_welcomed("/plain").await;
    let epoch = observer.join("up.p").await["epoch"].clone();
    let (mut c, welcome) = gw.welcomed(t, "/up?user=pub").await;
    let ack = c
        .request(json!({"type":"join","room":"up.p","id":100}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // {} : published as sent.
    let ack = c.request(publish("up.p", 1, json!({"n":1}))).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    let first = ack["seq"].as_u64().expect("seq");
    let m = next_message(&mut observer).await;
    assert_eq!(
        m,
        json!({"type":"message","room":"up.p","from":"pub","seq":first,"data":{"n":1}})
    );
    // {"data"}: this instead.
    let ack = c.request(publish("up.p", 2, json!({"n":2}))).await;
    assert_eq!(ack, json!({"type":"ack","id":2,"seq":first + 1}));
    let m = next_message(&mut observer).await;
    assert_eq!(m["data"], json!({"n":2,"checked":true}), "{m}");
    assert_eq!(m["seq"], first + 1);
    // {"skip": true}: acknowledged without seq, not delivered.
    let ack = c.request(publish("up.p", 3, json!({"n":3}))).await;
    assert_eq!(ack, json!({"type":"ack","id":3}));
    // 4xx: rejected with the reason.
    let reply = c.request(publish("up.p", 4, json!({"n":4}))).await;
    error(4, "rejected", &reply);
    message_contains(&reply, "bad words");
    // 5xx, timeout, not JSON, or JSON that is not an object: unavailable.
    for n in [5u64, 6, 7, 11] {
        let reply = c.request(publish("up.p", n, json!({"n":n}))).await;
        error(n, "unavailable", &reply);
    }
    // None of those was delivered, nor took a seq.
    let ack = c.request(publish("up.p", 8, json!({"n":8}))).await;
    assert_eq!(ack, json!({"type":"ack","id":8,"seq":first + 2}));
    let m = next_message(&mut observer).await;
    assert_eq!(
        (&m["data"], m["seq"].as_u64()),
        (&json!({"n":8}), Some(first + 2)),
        "{m}"
    );

    // The sender's own echo is the rewritten message too.
    c.send(json!({"type":"publish","room":"up.p","id":9,"data":{"n":9},"echo":true}))
        .await;
    let mut got = [c.recv().await, c.recv().await];
    got.sort_by_key(|v| v["type"].as_str().unwrap_or_default().to_owned());
    assert_eq!(got[0], json!({"type":"ack","id":9,"seq":first + 3}));
    assert_eq!(
        got[1],
        json!({"type":"message","room":"up.p","from":"pub","seq":first + 3,"data":"nine"})
    );
    assert_eq!(next_message(&mut observer).await["data"], "nine");

    // A binary payload is called as base64 in data_b64 and delivered unchanged.
    let payload = [0u8, 1, 2, 253, 254, 255];
    c.send_binary(json!({"type":"publish","room":"up.p","id":10}), &payload)
        .await;
    let ack = c.recv().await;
    assert_eq!(ack, json!({"type":"ack","id":10,"seq":first + 4}));
    match observer.next_data().await {
        tokio_tungstenite::tungstenite::Message::Binary(b) => {
            let (header, body) = split_binary(&b).unwrap();
            assert_eq!(header["seq"], first + 4, "{header}");
            assert_eq!(body, payload);
        }
        other => panic!("expected the binary message, got {other:?}"),
    }

    let calls = backend.calls_of("publish").await;
    assert_eq!(calls.len(), 11, "{calls:#?}");
    for call in &calls {
        assert_up_call(call, "publish", t, &welcome);
        assert_eq!(call.body["room"], "up.p");
    }
    assert_eq!(calls[0].body["data"], json!({"n":1}));
    let binary = &calls[10].body;
    assert_eq!(binary["data_b64"], "AAEC/f7/", "{binary}");
    assert!(binary.get("data").is_none(), "{binary}");

    // History keeps what was delivered: the rewritten messages, not the refused ones.
    let (mut late, _) = gw.ws_welcomed("/plain").await;
    let ack = late
        .request(json!({"type":"join","room":"up.p","id":1,"since":first - 1,"epoch":epoch}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    for expected in [
        json!({"n":1}),
        json!({"n":2,"checked":true}),
        json!({"n":8}),
        json!("nine"),
    ] {
        assert_eq!(late.recv().await["data"], expected);
    }
    match late.next_data().await {
        tokio_tungstenite::tungstenite::Message::Binary(b) => {
            assert_eq!(split_binary(&b).unwrap().1, payload);
        }
        other => panic!("expected the binary message, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// rpc

both_transports!(rpc_answers_refusals_failures_and_bad_methods, 30);

async fn rpc_answers_refusals_failures_and_bad_methods(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    backend
        .script(json!([
            {"event":"rpc","match":{"method":"sum"},"json":{"data":3}},
            {"event":"rpc","match":{"method":"deny"},"status":422,"json":{"reason":"not allowed"}},
            {"event":"rpc","match":{"method":"boom"},"status":500,"json":{"data":1}},
            {"event":"rpc","match":{"method":"slow"},"delay_ms":800,"json":{"data":1}},
            {"event":"rpc","match":{"method":"text"},"raw":"hello","content_type":"text/plain"},
            {"event":"rpc","match":{"method":"list"},"json":[5]}
        ]))
        .await;
    let (mut c, welcome) = gw.welcomed(t, "/up?user=r").await;

    assert_eq!(
        c.request(rpc(1, "sum", json!([1, 2]))).await,
        json!({"type":"ack","id":1,"data":3})
    );
    assert_eq!(
        c.request(rpc(2, "echo", json!({"x":[1, "y"]}))).await,
        json!({"type":"ack","id":2,"data":{"x":[1, "y"]}})
    );
    let reply = c.request(rpc(3, "deny", json!(null))).await;
    error(3, "rejected", &reply);
    message_contains(&reply, "not allowed");
    // A JSON array is not the object `{"data"}` either.
    for (id, method) in [(4, "boom"), (5, "slow"), (6, "text"), (10, "list")] {
        let reply = c.request(rpc(id, method, json!(null))).await;
        error(id, "unavailable", &reply);
    }
    // Method length: 1 to 128 characters.
    let reply = c.request(rpc(7, "", json!(1))).await;
    error(7, "bad_request", &reply);
    let reply = c.request(rpc(8, &"m".repeat(129), json!(1))).await;
    error(8, "bad_request", &reply);
    let longest = "m".repeat(128);
    assert_eq!(
        c.request(rpc(9, &longest, json!("max"))).await,
        json!({"type":"ack","id":9,"data":"max"})
    );

    let calls = backend.calls_of("rpc").await;
    let methods: Vec<&str> = calls
        .iter()
        .map(|c| c.body["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "sum",
            "echo",
            "deny",
            "boom",
            "slow",
            "text",
            "list",
            longest.as_str()
        ],
        "bad methods are not called"
    );
    for call in &calls {
        assert_up_call(call, "rpc", t, &welcome);
    }
    assert_eq!(calls[0].body["data"], json!([1, 2]));

    // Endpoints without an rpc upstream.
    for path in ["/plain", "/partial"] {
        let (mut other, _) = gw.welcomed(t, path).await;
        let reply = other.request(rpc(1, "sum", json!([1]))).await;
        error(1, "not_found", &reply);
    }
    // /partial calls only `join`: its publishes are not called.
    let (mut partial, welcome) = gw.welcomed(t, "/partial").await;
    let ack = partial.request(publish("up.q", 2, json!(1))).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = partial
        .request(json!({"type":"join","room":"up.q","id":3}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let join = backend.wait_for_calls("join", 1).await;
    assert_common(&join[0], "join", t, "/partial");
    assert_eq!(join[0].body["session"], welcome["session"]);
    assert_eq!(join[0].header("authorization"), None);
    assert!(backend.calls_of("publish").await.is_empty());
    assert_eq!(backend.calls_of("rpc").await.len(), 8);
}

both_transports!(
    rpc_runs_up_to_8_at_once_per_session_answered_as_they_complete,
    30
);

async fn rpc_runs_up_to_8_at_once_per_session_answered_as_they_complete(t: Transport) {
    let (backend, gw) = start(Setup {
        timeout_ms: 5000,
        ..Setup::default()
    })
    .await;
    backend
        .script(json!([
            {"event":"rpc","match":{"method":"held"},"hold":"g","json":{"data":"late"}},
            {"event":"rpc","match":{"method":"slow"},"hold":"h","json":{"data":"slow"}}
        ]))
        .await;
    let (mut c, _) = gw.welcomed(t, "/up?user=r8").await;
    for id in 1..=9 {
        c.send(rpc(id, "held", json!(id))).await;
    }
    // The ninth is refused at once, while eight wait at the backend.
    let reply = c.recv().await;
    error(9, "limit_exceeded", &reply);
    backend.wait_for_calls("rpc", 8).await;
    assert_eq!(backend.stats().await["in_flight"], 8);
    backend.release("g").await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        let ack = c.recv().await;
        assert_eq!(
            (ack["type"].as_str(), &ack["data"]),
            (Some("ack"), &json!("late")),
            "{ack}"
        );
        ids.push(ack["id"].as_u64().unwrap());
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    assert_eq!(
        backend.calls_of("rpc").await.len(),
        8,
        "the ninth was not called"
    );

    // Each is answered by its id as it completes: a quick one overtakes a slow one, and
    // the session answers pings meanwhile.
    c.send(rpc(20, "slow", json!(null))).await;
    backend.wait_for_call("rpc", "method", &json!("slow")).await;
    assert_eq!(
        c.request(rpc(21, "quick", json!("q"))).await,
        json!({"type":"ack","id":21,"data":"q"})
    );
    assert_eq!(
        c.request(json!({"type":"ping","id":22})).await,
        json!({"type":"pong","id":22})
    );
    backend.release("h").await;
    assert_eq!(c.recv().await, json!({"type":"ack","id":20,"data":"slow"}));
}

// ---------------------------------------------------------------------------------------
// order

both_transports!(
    a_session_keeps_its_order_while_others_and_deliveries_go_on,
    30
);

async fn a_session_keeps_its_order_while_others_and_deliveries_go_on(t: Transport) {
    let (backend, gw) = start(Setup {
        timeout_ms: 5000,
        ..Setup::default()
    })
    .await;
    backend
        .script(json!([
            {"event":"publish","match":{"data":{"n":1}},"hold":"g","json":{}}
        ]))
        .await;
    let (mut observer, _) = gw.ws_welcomed("/plain").await;
    observer.join("up.o").await;
    let (mut slow, slow_welcome) = gw.welcomed(t, "/up?user=s1").await;
    let (mut other, _) = gw.welcomed(t, "/up?user=s2").await;
    let ack = slow
        .request(json!({"type":"join","room":"up.feed","id":100}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // A publish held at the backend, then a join and a publish behind it.
    slow.send(publish("up.o", 1, json!({"n":1}))).await;
    slow.send(json!({"type":"join","room":"up.x","id":2})).await;
    slow.send(publish("up.o", 3, json!({"n":2}))).await;
    backend
        .wait_for_call("publish", "data", &json!({"n":1}))
        .await;

    // Another session's publish goes through and is delivered meanwhile.
    let ack = other.request(publish("up.o", 1, json!("other"))).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    assert_eq!(next_message(&mut observer).await["data"], "other");
    // Deliveries to the waiting session go on.
    observer
        .request(publish("up.feed", 7, json!({"live":1})))
        .await;
    let m = slow.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["room"].as_str(), &m["data"]),
        (Some("message"), Some("up.feed"), &json!({"live":1})),
        "{m}"
    );
    // The join and the second publish wait for the held publish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_hold: Vec<Call> = backend
        .calls()
        .await
        .into_iter()
        .filter(|c| c.body["session"] == slow_welcome["session"])
        .collect();
    assert!(
        !after_hold
            .iter()
            .any(|c| c.body["room"] == "up.x" || c.body["data"] == json!({"n":2})),
        "frames behind a call in flight were called early: {after_hold:#?}"
    );

    backend.release("g").await;
    let a1 = slow.recv().await;
    let a2 = slow.recv().await;
    let a3 = slow.recv().await;
    assert_eq!(
        (a1["type"].as_str(), a1["id"].as_u64()),
        (Some("ack"), Some(1)),
        "{a1}"
    );
    assert_eq!(
        (a2["type"].as_str(), a2["id"].as_u64(), a2["room"].as_str()),
        (Some("ack"), Some(2), Some("up.x")),
        "{a2}"
    );
    assert_eq!(
        (a3["type"].as_str(), a3["id"].as_u64()),
        (Some("ack"), Some(3)),
        "{a3}"
    );
    assert!(a3["seq"].as_u64() > a1["seq"].as_u64(), "{a1} {a3}");
    assert_eq!(next_message(&mut observer).await["data"], json!({"n":1}));
    assert_eq!(next_message(&mut observer).await["data"], json!({"n":2}));

    // The backend saw them in the order sent.
    let mine: Vec<Call> = backend
        .calls()
        .await
        .into_iter()
        .filter(|c| c.body["session"] == slow_welcome["session"] && c.event != "connect")
        .collect();
    let seen: Vec<(String, Value)> = mine
        .iter()
        .map(|c| (c.event.clone(), c.body["room"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("join".to_owned(), json!("up.feed")),
            ("publish".to_owned(), json!("up.o")),
            ("join".to_owned(), json!("up.x")),
            ("publish".to_owned(), json!("up.o")),
        ]
    );
    assert_eq!(mine[3].body["data"], json!({"n":2}));
}

// ---------------------------------------------------------------------------------------
// limits before calls

both_transports!(rate_and_size_limits_apply_before_calls, 30);

async fn rate_and_size_limits_apply_before_calls(t: Transport) {
    let (backend, gw) = start(Setup {
        endpoint_extra: "rate_per_sec = 1\nrate_burst = 4\nmax_message_bytes = 1024\n",
        ..Setup::default()
    })
    .await;
    // A flood of 16 publishes: the burst is called, the rest never reaches the backend.
    let (mut flood, welcome) = gw.welcomed(t, "/up?user=flood").await;
    for i in 0..16u64 {
        flood.send(publish("up.r", i, json!({"i":i}))).await;
    }
    let (mut acks, mut limited) = (0, 0);
    while let Some(frame) = flood.try_next(Duration::from_secs(2)).await {
        match frame {
            Frame::Json(v) if v["type"] == "ack" => acks += 1,
            Frame::Json(v) if v["code"] == "rate_limited" => limited += 1,
            Frame::Json(v) if v["type"] == "close" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls: Vec<Call> = backend
        .calls_of("publish")
        .await
        .into_iter()
        .filter(|c| c.body["session"] == welcome["session"])
        .collect();
    assert!(limited >= 1, "the flood was rate limited");
    assert!(
        (1..=5).contains(&calls.len()),
        "the burst (4, plus at most one refill) reached the backend, not the flood: {} calls",
        calls.len()
    );
    assert!(acks <= calls.len(), "{acks} acks for {} calls", calls.len());

    // A frame over max_message_bytes is refused before any call.
    let (mut big, welcome) = gw.welcomed(t, "/up?user=big").await;
    big.send(publish("up.r", 1, json!("x".repeat(2000)))).await;
    let _ = big.try_next(Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !backend
            .calls_of("publish")
            .await
            .iter()
            .any(|c| c.body["session"] == welcome["session"]),
        "an oversize publish reached the backend"
    );
}

// ---------------------------------------------------------------------------------------
// failures, circuit breaker, max_in_flight

both_transports!(a_backend_down_makes_calls_unavailable, 30);

async fn a_backend_down_makes_calls_unavailable(t: Transport) {
    let (mut backend, gw) = start(Setup::default()).await;
    let (mut c, _) = gw.welcomed(t, "/up?user=d").await;
    backend.stop();
    let reply = c.request(rpc(1, "m", json!(1))).await;
    error(1, "unavailable", &reply);
    let reply = c.request(publish("up.d", 2, json!(1))).await;
    error(2, "unavailable", &reply);
    let reply = c.request(json!({"type":"join","room":"up.d","id":3})).await;
    error(3, "unavailable", &reply);
    assert_eq!(gw.open(t, "/up?user=d", &[]).await.err(), Some(Some(503)));
    // Rooms outside the upstream's rooms do not need it.
    let ack = c.request(publish("free", 4, json!(1))).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // An upstream URL where nothing ever listened.
    let gw = TestGateway::start(&Setup::default().toml(&down_url())).await;
    assert_eq!(gw.open(t, "/up?user=d", &[]).await.err(), Some(Some(503)));
}

both_transports!(
    the_circuit_opens_after_failures_in_a_row_and_closes_after_a_trial,
    30
);

async fn the_circuit_opens_after_failures_in_a_row_and_closes_after_a_trial(t: Transport) {
    let (backend, gw) = start(Setup {
        timeout_ms: 2000,
        breaker_failures: 3,
        breaker_secs: 1,
        ..Setup::default()
    })
    .await;
    let (mut c, _) = gw.welcomed(t, "/up?user=cb").await;
    let rpc_calls = || async { backend.calls_of("rpc").await.len() };

    // Two failures, then refusals: refusals are answers, they do not open the circuit.
    backend
        .script(json!([
            {"event":"rpc","match":{"method":"fail"},"status":500,"json":{}},
            {"event":"rpc","match":{"method":"refuse"},"status":403,"json":{"reason":"no"}},
            {"event":"rpc","match":{"method":"trial"},"hold":"t","status":500,"json":{}}
        ]))
        .await;
    for id in 1..=2 {
        error(
            id,
            "unavailable",
            &c.request(rpc(id, "fail", json!(1))).await,
        );
    }
    for id in 3..=6 {
        error(
            id,
            "rejected",
            &c.request(rpc(id, "refuse", json!(1))).await,
        );
    }
    assert_eq!(
        c.request(rpc(7, "ok", json!("fine"))).await,
        json!({"type":"ack","id":7,"data":"fine"}),
        "the circuit is closed"
    );
    assert_eq!(rpc_calls().await, 7);

    // Three failures in a row open the rpc circuit: rpc calls fail at once, without
    // reaching the backend. Each event has its own circuit: publishes and new sessions
    // (connect) still reach the backend (an rpc that fails on a client's input must not
    // lock everyone out).
    for id in 8..=10 {
        error(
            id,
            "unavailable",
            &c.request(rpc(id, "fail", json!(1))).await,
        );
    }
    assert_eq!(rpc_calls().await, 10);
    let opened = tokio::time::Instant::now();
    let reply = c.request(rpc(11, "ok", json!(1))).await;
    error(11, "unavailable", &reply);
    assert!(
        opened.elapsed() < Duration::from_millis(900),
        "failed at once while open"
    );
    assert_eq!(rpc_calls().await, 10, "an open circuit does not call");
    let reply = c.request(publish("up.cb", 12, json!(1))).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(backend.calls_of("publish").await.len(), 1);
    let connects = backend.calls_of("connect").await.len();
    assert!(gw.open(t, "/up?user=cb2", &[]).await.is_ok());
    assert_eq!(backend.calls_of("connect").await.len(), connects + 1);

    // After breaker_secs one trial call goes through; others still fail at once while it
    // is out. It fails: the circuit opens again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.send(rpc(20, "trial", json!(1))).await;
    backend
        .wait_for_call("rpc", "method", &json!("trial"))
        .await;
    let reply = c.request(rpc(21, "ok", json!(1))).await;
    error(21, "unavailable", &reply);
    assert_eq!(rpc_calls().await, 11, "one trial call only");
    backend.release("t").await;
    error(20, "unavailable", &c.recv().await);
    let reply = c.request(rpc(22, "ok", json!(1))).await;
    error(22, "unavailable", &reply);
    assert_eq!(rpc_calls().await, 11, "open again after a failed trial");

    // The next trial succeeds: the circuit closes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        c.request(rpc(30, "ok", json!(30))).await,
        json!({"type":"ack","id":30,"data":30})
    );
    assert_eq!(
        c.request(rpc(31, "ok", json!(31))).await,
        json!({"type":"ack","id":31,"data":31})
    );
    assert_eq!(rpc_calls().await, 13);
    let (_c2, welcome) = gw.welcomed(t, "/up?user=cb2").await;
    assert_eq!(welcome["user"], "cb2");
}

both_transports!(beyond_max_in_flight_calls_fail_at_once, 30);

async fn beyond_max_in_flight_calls_fail_at_once(t: Transport) {
    let (backend, gw) = start(Setup {
        timeout_ms: 5000,
        max_in_flight: 2,
        breaker_failures: 2,
        ..Setup::default()
    })
    .await;
    backend
        .script(json!([
            {"event":"rpc","match":{"method":"held"},"hold":"g","json":{"data":"held"}}
        ]))
        .await;
    let (mut c, _) = gw.welcomed(t, "/up?user=m1").await;
    let (mut d, _) = gw.welcomed(t, "/up?user=m2").await;
    c.send(rpc(1, "held", json!(1))).await;
    c.send(rpc(2, "held", json!(2))).await;
    backend.wait_for_calls("rpc", 2).await;

    // The endpoint has two calls out: every other call fails at once, uncalled.
    let started = tokio::time::Instant::now();
    error(3, "unavailable", &c.request(rpc(3, "x", json!(1))).await);
    error(
        1,
        "unavailable",
        &d.request(publish("up.m", 1, json!(1))).await,
    );
    error(
        2,
        "unavailable",
        &d.request(json!({"type":"join","room":"up.m","id":2})).await,
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not queued: {:?}",
        started.elapsed()
    );
    assert_eq!(backend.calls_of("rpc").await.len(), 2);
    assert!(backend.calls_of("publish").await.is_empty());
    assert!(backend.calls_of("join").await.is_empty());
    // `connect` calls have their own `max_in_flight`: sessions' calls do not keep new
    // sessions out.
    gw.welcomed(t, "/up?user=m3").await;

    backend.release("g").await;
    let mut ids = [c.recv().await, c.recv().await].map(|a| {
        assert_eq!(
            (a["type"].as_str(), &a["data"]),
            (Some("ack"), &json!("held")),
            "{a}"
        );
        a["id"].as_u64().unwrap()
    });
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
    // Those refusals never reached the backend, so they did not open the circuit
    // (breaker_failures = 2).
    assert_eq!(
        c.request(rpc(4, "x", json!(4))).await,
        json!({"type":"ack","id":4,"data":4})
    );

    // Two held `connect` calls fill theirs: a third upgrade gets 503 at once.
    backend
        .script(json!([{"event":"connect","hold":"c","times":2,"json":{"user":"held"}}]))
        .await;
    let gw = std::sync::Arc::new(gw);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.open(t, "/up?user=h", &[]).await.is_ok() })
        })
        .collect();
    backend.wait_for_calls("connect", 5).await;
    let started = tokio::time::Instant::now();
    assert_eq!(gw.open(t, "/up?user=m4", &[]).await.err(), Some(Some(503)));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(backend.calls_of("connect").await.len(), 5, "not called");
    backend.release("c").await;
    for h in held {
        assert!(h.await.unwrap(), "the held upgrades are admitted");
    }
}

// ---------------------------------------------------------------------------------------
// disconnect

both_transports!(exactly_one_disconnect_call_per_session, 30);

async fn exactly_one_disconnect_call_per_session(t: Transport) {
    let (backend, gw) = start(Setup::default()).await;
    let (mut closing, w_closing) = gw.welcomed(t, "/up?user=closing").await;
    let (dropping, w_dropping) = gw.welcomed(t, "/up?user=dropping").await;
    let (mut kicked, w_kicked) = gw.welcomed(t, "/up?user=kicked").await;
    // Never admitted: not a session, no disconnect call.
    backend
        .script(json!([{"event":"connect","match":{"query":{"user":"refused"}},"status":401,"json":{}}]))
        .await;
    assert_eq!(
        gw.open(t, "/up?user=refused", &[]).await.err(),
        Some(Some(401))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    closing.close(1000, "bye").await;
    dropping.abort();
    let (status, body) = gw
        .https(
            "POST",
            "/api/disconnect",
            &[
                ("Authorization", "Bearer api-key"),
                ("Content-Type", "application/json"),
            ],
            r#"{"user":"kicked","code":4003,"reason":"kicked out"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (ending, _) = kicked.ending().await;
    assert_eq!(ending, Ending::Close(4003, "kicked out".into()));

    let calls = backend.wait_for_calls("disconnect", 3).await;
    // Nothing more comes: once per session.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let calls_after = backend.calls_of("disconnect").await;
    assert_eq!(calls_after.len(), 3, "{calls_after:#?}");
    let by_session = |w: &Value| -> Call {
        let mine: Vec<&Call> = calls
            .iter()
            .filter(|c| c.body["session"] == w["session"])
            .collect();
        assert_eq!(mine.len(), 1, "one disconnect for {w}: {calls:#?}");
        mine[0].clone()
    };
    for w in [&w_closing, &w_dropping, &w_kicked] {
        let call = by_session(w);
        assert_up_call(&call, "disconnect", t, w);
        assert!(call.body["code"].is_u64(), "{}", call.body);
        assert!(call.body["reason"].is_string(), "{}", call.body);
        let duration = call.body["duration_ms"].as_u64().expect("duration_ms");
        assert!(
            (250..20_000).contains(&duration),
            "duration_ms {duration}: {}",
            call.body
        );
    }
    // A WebSocket client that closed with a close frame ended normally (1000). The contract
    // does not say which code a WebTransport client's own close (the
    // CLOSE_WEBTRANSPORT_SESSION capsule, then the QUIC close) is reported with: the
    // gateway does not read that capsule and sees the connection go (1006).
    let closed = by_session(&w_closing);
    match t {
        Transport::Ws => assert_eq!(closed.body["code"], 1000, "{}", closed.body),
        Transport::Wt => assert!(
            closed.body["code"] == 1000 || closed.body["code"] == 1006,
            "{}",
            closed.body
        ),
    }
    let kicked = by_session(&w_kicked);
    assert_eq!(
        (&kicked.body["code"], &kicked.body["reason"]),
        (&json!(4003), &json!("kicked out")),
        "{}",
        kicked.body
    );
}

/// A `/jwt` session (credential checked by the gateway) also gets its one disconnect call,
/// and an expired `/up` session's call says 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_calls_carry_the_close_code_of_an_expiry() {
    within(30, async {
        let (backend, gw) = start(Setup::default()).await;
        let expires_at = now_secs().ceil() as u64 + 1;
        backend
            .script(json!([
                {"event":"connect","match":{"endpoint":"/up"},"json":{"user":"short","expires_at":expires_at}},
                {"event":"connect","json":{"user":"carol"}}
            ]))
            .await;
        let (mut short, welcome) = gw.welcomed(Transport::Ws, "/up").await;
        let jwt = token("carol", 300, json!({}));
        let (jwt_session, jwt_welcome) = gw
            .welcomed(Transport::Wt, &format!("/jwt?token={jwt}"))
            .await;
        let (ending, _) = short.ending().await;
        assert!(matches!(ending, Ending::Close(4001, _)), "{ending:?}");
        jwt_session.abort();
        let calls = backend.wait_for_calls("disconnect", 2).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(backend.calls_of("disconnect").await.len(), 2);
        let expired = calls
            .iter()
            .find(|c| c.body["session"] == welcome["session"])
            .expect("the expired session's call");
        assert_eq!(expired.body["code"], 4001, "{}", expired.body);
        let jwt_call = calls
            .iter()
            .find(|c| c.body["session"] == jwt_welcome["session"])
            .expect("the /jwt session's call");
        assert_common(jwt_call, "disconnect", Transport::Wt, "/jwt");
        assert_eq!(jwt_call.body["user"], "carol");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// the test backend itself

/// One keep-alive HTTP/1.1 connection to the test backend.
struct KeepAlive {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    async fn open(port: u16) -> Self {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        Self {
            tcp,
            buf: Vec::new(),
        }
    }

    /// POSTs `body` to `/gw/rpc`; the status and the answer, read by its length.
    async fn rpc(&mut self, body: Value) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = body.to_string();
        let request = format!(
            "POST /gw/rpc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.tcp.write_all(request.as_bytes()).await.unwrap();
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if rest.len() >= len {
                    let status = head.split_whitespace().nth(1).unwrap().to_owned();
                    let answer = rest[..len].to_owned();
                    self.buf.drain(..head.len() + 4 + len);
                    return (status, answer);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the backend closed a keep-alive connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The scripted backend answers and records as the tests above rely on (so a failure
/// there is the gateway's, not the fixture's): rules by event and body fields, `times`,
/// raw answers, holds, keep-alive, and a port nothing listens on once stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_backend_answers_and_records_as_scripted() {
    within(30, async {
        let mut backend = Backend::start().await;
        backend
            .script(json!([
                {"event":"rpc","match":{"method":"once"},"times":1,"status":422,"json":{"reason":"r"}},
                {"event":"rpc","match":{"method":"text"},"raw":"<p>","content_type":"text/html"},
                {"event":"rpc","match":{"method":"held"},"hold":"h","json":{"data":"late"}}
            ]))
            .await;
        let mut conn = KeepAlive::open(backend.port).await;
        let once = json!({"method":"once","data":1});
        assert_eq!(conn.rpc(once.clone()).await, ("422".into(), r#"{"reason": "r"}"#.into()));
        assert_eq!(conn.rpc(once).await, ("200".into(), r#"{"data": 1}"#.into()));
        assert_eq!(
            conn.rpc(json!({"method":"text"})).await,
            ("200".into(), "<p>".into())
        );
        let calls = backend.calls().await;
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].event, "rpc");
        assert_eq!(calls[0].path, "/gw/rpc");
        assert_eq!(calls[0].header("authorization"), Some("Bearer s"));
        assert_eq!(calls[2].body, json!({"method":"text"}));

        // A held call answers once released.
        let mut other = KeepAlive::open(backend.port).await;
        let held = tokio::spawn(async move { other.rpc(json!({"method":"held"})).await });
        backend.wait_for_call("rpc", "method", &json!("held")).await;
        assert_eq!(backend.stats().await["in_flight"], 1);
        assert!(!held.is_finished());
        backend.release("h").await;
        assert_eq!(held.await.unwrap(), ("200".into(), r#"{"data": "late"}"#.into()));

        backend.reset().await;
        assert!(backend.calls().await.is_empty());
        let port = backend.port;
        backend.stop();
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    })
    .await;
}
