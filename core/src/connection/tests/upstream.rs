//! Calls to the application's backend, driven without sockets: the connection asks for a
//! call, the test answers it as the gateway would.

use super::*;
use crate::upstream::{
    Answer, Call, CallBody, CallEvent, ConnectGrant, Failure, Outcome, PublishVerdict, Refusal,
    UpstreamPolicy,
};

fn policy(events: &[CallEvent]) -> EndpointPolicy {
    let mut policy = EndpointPolicy::new("/chat");
    policy.upstream = Some(UpstreamPolicy::new(
        events.iter().copied(),
        vec![Pattern::new("*")],
    ));
    policy
}

fn rpc_answer(data: &str) -> Outcome {
    Outcome::Answered(Answer::Rpc {
        data: crate::protocol::RawJson::parse(data).unwrap(),
    })
}

fn refused(status: u16, reason: &str) -> Outcome {
    Outcome::Refused(Refusal {
        status,
        reason: Some(reason.into()),
    })
}

impl Client {
    /// The calls asked for since the last time.
    fn calls(&mut self) -> Vec<Call> {
        self.conn.take_calls()
    }

    fn answer(&mut self, call: &Call, outcome: Outcome) -> Vec<Value> {
        self.conn.on_answer(call.id, outcome, self.now);
        self.frames()
    }
}

#[test]
fn an_rpc_is_a_call_and_its_answer_or_refusal_or_failure_is_the_reply() {
    let node = Node::new();
    let mut a = node.user_on(policy(&[CallEvent::Rpc]), "alice");
    assert_eq!(
        a.request(json!({"type": "rpc", "id": 1, "method": "sum", "data": [1, 2]})),
        Vec::<Value>::new(),
        "nothing before the answer"
    );
    let calls = a.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].body,
        CallBody::Rpc {
            method: "sum".into(),
            data: Payload::Json("[1,2]".into())
        }
    );
    assert_eq!(
        a.answer(&calls[0], rpc_answer(r#"{"total":3}"#)),
        [json!({"type": "ack", "id": 1, "data": {"total": 3}})]
    );
    a.request(json!({"type": "rpc", "id": 2, "method": "sum"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, refused(403, "not yours")),
        [error(Some(2), "rejected", "not yours")]
    );
    a.request(json!({"type": "rpc", "id": 3, "method": "sum"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, Outcome::Failed(Failure::Timeout)),
        [error(
            Some(3),
            "unavailable",
            "application backend timed out"
        )]
    );
    assert_eq!(
        a.answer(&call, rpc_answer("1")),
        Vec::<Value>::new(),
        "an answer to a call already answered is ignored"
    );
}

#[test]
fn rpcs_overlap_up_to_eight_and_the_ninth_is_refused() {
    let node = Node::new();
    let mut a = node.user_on(policy(&[CallEvent::Rpc]), "alice");
    for id in 1..=MAX_RPCS_IN_FLIGHT as u64 {
        assert_eq!(
            a.request(json!({"type": "rpc", "id": id, "method": "slow"})),
            Vec::<Value>::new()
        );
    }
    let calls = a.calls();
    assert_eq!(calls.len(), MAX_RPCS_IN_FLIGHT);
    assert_eq!(
        a.request(json!({"type": "rpc", "id": 9, "method": "slow"})),
        [error(
            Some(9),
            "limit_exceeded",
            "at most 8 rpc calls in flight"
        )]
    );
    assert!(a.calls().is_empty(), "the ninth was not called");
    // Answered out of order, each by its id; then there is room again.
    assert_eq!(
        a.answer(&calls[5], rpc_answer("6")),
        [json!({"type": "ack", "id": 6, "data": 6})]
    );
    assert_eq!(
        a.answer(&calls[0], rpc_answer("1")),
        [json!({"type": "ack", "id": 1, "data": 1})]
    );
    a.request(json!({"type": "rpc", "id": 10, "method": "slow"}));
    assert_eq!(a.calls().len(), 1);
    // Rpcs do not hold back publishes (no publish upstream here).
    let mut b = node.user("bob");
    join(&mut b, "lobby");
    let acks = a.request(json!({"type": "publish", "id": 11, "room": "lobby", "data": 1}));
    assert_eq!(acks[0]["id"], 11);
    assert_eq!(b.frames()[0]["data"], 1);
}

#[test]
fn an_rpc_without_an_rpc_upstream_or_with_a_bad_method_is_refused_at_once() {
    let node = Node::new();
    let mut a = node.user_on(policy(&[CallEvent::Publish]), "alice");
    assert_eq!(
        a.request(json!({"type": "rpc", "id": 1, "method": "m"})),
        [error(
            Some(1),
            "not_found",
            "this endpoint has no rpc upstream"
        )]
    );
    let mut b = node.user_on(policy(&[CallEvent::Rpc]), "bob");
    let long = "m".repeat(129);
    for method in ["", long.as_str()] {
        assert_eq!(
            b.request(json!({"type": "rpc", "id": 2, "method": method}))[0]["code"],
            "bad_request"
        );
    }
    assert_eq!(
        b.request(json!({"type": "rpc", "method": "m"}))[0]["message"],
        "missing field `id`"
    );
    assert!(b.calls().is_empty());
}

#[test]
fn a_publish_waits_for_its_call_and_later_joins_and_publishes_keep_their_order() {
    let node = Node::new();
    let mut bob = node.user("bob");
    join(&mut bob, "lobby");
    let mut a = node.user_on(policy(&[CallEvent::Publish, CallEvent::Join]), "alice");
    a.request(json!({"type": "publish", "id": 1, "room": "lobby", "data": "first"}));
    a.request(json!({"type": "publish", "id": 2, "room": "lobby", "data": "second"}));
    a.request(json!({"type": "join", "id": 3, "room": "lobby"}));
    // Requests other than joins, publishes and leaves are answered at once.
    assert_eq!(
        a.request(json!({"type": "ping", "id": 4})),
        [json!({"type": "pong", "id": 4})]
    );
    assert_eq!(
        a.request(json!({"type": "send", "id": 5, "to": "nobody", "data": 1})),
        [json!({"type": "ack", "id": 5, "delivered": false})]
    );
    let calls = a.calls();
    assert_eq!(calls.len(), 1, "the second waits for the first's answer");
    assert!(matches!(&calls[0].body, CallBody::Publish { data, .. }
        if *data == Payload::Json("\"first\"".into())));
    // Another session's publish is delivered meanwhile.
    let mut carol = node.user("carol");
    carol.request(json!({"type": "publish", "room": "lobby", "data": "carol"}));
    assert_eq!(bob.frames()[0]["data"], "carol");

    let rewritten = Outcome::Answered(Answer::Publish(PublishVerdict::Replace(Payload::Json(
        "\"FIRST\"".into(),
    ))));
    let ack = a.answer(&calls[0], rewritten);
    assert_eq!((&ack[0]["type"], &ack[0]["id"]), (&json!("ack"), &json!(1)));
    assert!(ack[0]["seq"].is_u64(), "{ack:?}");
    assert_eq!(bob.frames()[0]["data"], "FIRST", "the rewritten message");
    let calls = a.calls();
    assert_eq!(calls.len(), 1, "now the second is called");
    assert_eq!(
        a.answer(
            &calls[0],
            Outcome::Answered(Answer::Publish(PublishVerdict::Skip))
        ),
        [json!({"type": "ack", "id": 2})],
        "skipped: acknowledged without seq"
    );
    assert!(bob.frames().is_empty(), "and not delivered");
    let calls = a.calls();
    assert!(matches!(&calls[0].body, CallBody::Join { room } if room.as_str() == "lobby"));
    let data = crate::protocol::RawJson::parse(r#"{"topic":"x"}"#).unwrap();
    let ack = a.answer(
        &calls[0],
        Outcome::Answered(Answer::Join { data: Some(data) }),
    );
    assert_eq!(ack[0]["room"], "lobby");
    assert_eq!(ack[0]["data"], json!({"topic": "x"}));
    assert_eq!(bob.frames()[0]["event"], "join", "alice joined");
}

#[test]
fn refused_and_failed_publishes_and_joins_deliver_nothing() {
    let node = Node::new();
    let mut bob = node.user("bob");
    join(&mut bob, "lobby");
    let mut a = node.user_on(policy(&[CallEvent::Publish, CallEvent::Join]), "alice");
    a.request(json!({"type": "publish", "id": 1, "room": "lobby", "data": "bad"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, refused(422, "no swearing")),
        [error(Some(1), "rejected", "no swearing")]
    );
    a.request(json!({"type": "publish", "id": 2, "room": "lobby", "data": "x"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, Outcome::Failed(Failure::CircuitOpen)),
        [error(
            Some(2),
            "unavailable",
            "application backend unavailable"
        )]
    );
    a.request(json!({"type": "join", "id": 3, "room": "secret"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, refused(403, "members only")),
        [error(Some(3), "forbidden", "members only")]
    );
    assert_eq!(
        a.request(json!({"type": "leave", "id": 4, "room": "secret"})),
        [error(Some(4), "not_member", "not a member of that room")]
    );
    assert!(bob.frames().is_empty());
    // Permission checks come before the call: a room the identity may not publish to is
    // refused at once, and not called.
    let mut narrow = policy(&[CallEvent::Publish]);
    narrow.rooms = vec![Pattern::new("open:*")];
    let mut c = node.user_on(narrow, "carol");
    assert_eq!(
        c.request(json!({"type": "publish", "id": 5, "room": "lobby", "data": 1}))[0]["code"],
        "forbidden"
    );
    assert!(c.calls().is_empty());
}

#[test]
fn requests_waiting_behind_a_call_are_bounded() {
    let node = Node::new();
    let mut a = node.user_on(policy(&[CallEvent::Publish]), "alice");
    a.request(json!({"type": "publish", "id": 0, "room": "lobby", "data": 0}));
    for id in 1..=MAX_PARKED as u64 {
        a.request(json!({"type": "publish", "id": id, "room": "lobby", "data": id}));
    }
    assert_eq!(
        a.request(json!({"type": "publish", "id": 99, "room": "lobby", "data": 1})),
        [error(
            Some(99),
            "limit_exceeded",
            "too many requests waiting for the application's backend"
        )]
    );
    let mut answered = 0;
    while let Some(call) = a.calls().pop() {
        let frames = a.answer(
            &call,
            Outcome::Answered(Answer::Publish(PublishVerdict::AsSent)),
        );
        assert_eq!(frames[0]["id"], answered, "in order");
        answered += 1;
    }
    assert_eq!(answered, MAX_PARKED as u64 + 1);
}

#[test]
fn a_session_closing_mid_call_drops_the_answer_and_reports_its_end_once() {
    let node = Node::new();
    let mut a = node.user_on(policy(&[CallEvent::Rpc, CallEvent::Disconnect]), "alice");
    a.request(json!({"type": "rpc", "id": 1, "method": "slow"}));
    let call = a.calls().remove(0);
    a.conn.close(CloseReason::new(CloseCode::Normal, "bye"));
    let disconnect = a.conn.disconnect_call(1234).expect("a disconnect call");
    assert_eq!(
        disconnect.body,
        CallBody::Disconnect {
            code: 1000,
            reason: "bye".into(),
            duration_ms: 1234
        }
    );
    assert!(
        a.calls().is_empty(),
        "the disconnect call is handed over directly"
    );
    a.conn.on_answer(call.id, rpc_answer("1"), a.now);
    let (frames, close) = a.take();
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(close.unwrap().code, CloseCode::Normal);
    // A pending session that never became a user is not reported.
    let mut pending_policy = policy(&[CallEvent::Disconnect]);
    pending_policy.auth = crate::policy::AuthMode::FirstMessage;
    let mut p = node.open(pending_policy, Admitted::Pending);
    assert_eq!(p.conn.disconnect_call(1), None);
    // Nor a session on an endpoint that does not call `disconnect`.
    let mut b = node.user_on(policy(&[CallEvent::Rpc]), "bob");
    assert_eq!(b.conn.disconnect_call(1), None);
}

#[test]
fn the_connect_grant_gives_welcome_data_and_joins_its_rooms() {
    let node = Node::new();
    let mut bob = node.user("bob");
    join(&mut bob, "lobby");
    let grant = ConnectGrant {
        user: "alice".into(),
        rooms: Some(vec!["lobby".into(), "news".into()]),
        publish: None,
        join: vec![
            RoomName::new("lobby").unwrap(),
            RoomName::new("elsewhere").unwrap(),
        ],
        data: Some(crate::protocol::RawJson::parse(r#"{"name":"Alice"}"#).unwrap()),
        expires_at: Some(NOW + 60),
    };
    let slot = node.services.limits.acquire_user("alice".into()).unwrap();
    let mut a = node.open_with(
        policy(&[CallEvent::Connect]),
        Admitted::Authenticated(grant.identity(), slot),
        grant.welcome(),
    );
    let frames = a.frames();
    assert_eq!(frames[0]["type"], "welcome");
    assert_eq!(frames[0]["data"], json!({"name": "Alice"}));
    assert_eq!(frames[1]["type"], "ack");
    assert_eq!(frames[1]["room"], "lobby");
    assert_eq!(frames[1].get("id"), None);
    assert_eq!(
        frames[2],
        error(None, "forbidden", "room not allowed"),
        "a granted room the grant's own patterns exclude"
    );
    assert_eq!(bob.frames()[0]["event"], "join");
    // `expires_at` closes the session with 4001, without leeway.
    assert_eq!(a.conn.poll(node.at(59).instant), Some(node.at(60).instant));
    a.conn.poll(node.at(60).instant);
    assert_eq!(a.take().1.unwrap().code, CloseCode::Unauthorized);
}

#[test]
fn a_refresh_on_an_upstream_endpoint_calls_connect_and_keeps_the_user() {
    let node = Node::new();
    let mut upstream = policy(&[CallEvent::Connect]);
    upstream.auth = crate::policy::AuthMode::Upstream;
    upstream.heartbeat = Duration::from_secs(1000);
    let grant_rooms = |user: &str, expires_at, rooms: Option<Vec<String>>| {
        Outcome::Answered(Answer::Connect(Box::new(ConnectGrant {
            user: user.into(),
            rooms,
            publish: None,
            join: vec![],
            data: None,
            expires_at,
        })))
    };
    let grant = |user: &str, expires_at| grant_rooms(user, Some(expires_at), None);
    let first = match grant_rooms("alice", Some(NOW + 10), Some(vec!["lobby".into()])) {
        Outcome::Answered(Answer::Connect(g)) => g.identity(),
        _ => unreachable!(),
    };
    let slot = node.services.limits.acquire_user("alice".into()).unwrap();
    let mut a = node.open(upstream, Admitted::Authenticated(first, slot));
    a.frames();
    a.request(json!({"type": "auth", "id": 1, "token": "opaque"}));
    let call = a.calls().remove(0);
    assert_eq!(
        call.body,
        CallBody::Refresh {
            token: "opaque".into()
        }
    );
    assert_eq!(
        a.request(json!({"type": "auth", "id": 9, "token": "again"})),
        [error(
            Some(9),
            "limit_exceeded",
            "a refresh is already in flight"
        )]
    );
    // A publish does not wait for a refresh.
    let acks = a.request(json!({"type": "publish", "id": 10, "room": "lobby", "data": 1}));
    assert_eq!(acks[0]["id"], 10);
    assert_eq!(
        a.answer(&call, grant("alice", NOW + 100)),
        [json!({"type": "ack", "id": 1})]
    );
    assert_eq!(a.conn.poll(node.at(50).instant), Some(node.at(100).instant));
    a.request(json!({"type": "auth", "id": 2, "token": "other"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, grant("mallory", NOW + 1000)),
        [error(Some(2), "unauthorized", "refresh refused")]
    );
    a.request(json!({"type": "auth", "id": 3, "token": "t"}));
    let call = a.calls().remove(0);
    assert_eq!(
        a.answer(&call, Outcome::Failed(Failure::Unreachable)),
        [error(Some(3), "unauthorized", "refresh refused")]
    );
    assert_eq!(
        a.conn.poll(node.at(50).instant),
        Some(node.at(100).instant),
        "the old expiry stands"
    );
    // Only the expiry changes: an answer without `rooms` does not widen the session's, and
    // one without `expires_at` keeps the old expiry.
    a.request(json!({"type": "auth", "id": 4, "token": "t"}));
    let call = a.calls().remove(0);
    a.answer(&call, grant_rooms("alice", None, None));
    assert_eq!(a.conn.poll(node.at(50).instant), Some(node.at(100).instant));
    assert_eq!(
        a.request(json!({"type": "join", "id": 5, "room": "secret"})),
        [error(Some(5), "forbidden", "room not allowed")]
    );
}
