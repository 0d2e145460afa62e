//! The connection driven as an adapter drives it, without sockets.
//!
//! Frames go in, the outbox is read back, and time is passed in.

use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Value};

use super::*;
use crate::{
    auth::{JwtAlgorithm, JwtConfig},
    backplane::{
        Backplane, Cluster, ClusterPublish, ClusterUnavailable, Completion, LocalBackplane,
        RoomView,
    },
    hub::HubConfig,
    pattern::Pattern,
    policy::{RoomPolicies, RoomPolicy},
    protocol::{MemberInfo, Payload, RoomName},
    session::{Batch, Outbound},
};

mod upstream;

/// Unix seconds at the start of every test.
const NOW: u64 = 1_800_000_000;
const SECRET: &[u8] = b"connection test secret";

/// A JWT for `user` that expires `ttl` seconds after [`NOW`].
fn token(user: &str, ttl: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": NOW + ttl}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

/// The services of one node, as the gateway wires them, and the start of time.
struct Node {
    services: Services,
    t0: Instant,
}

impl Node {
    fn new() -> Self {
        Self::with(Arc::new(LocalBackplane), RoomPolicies::default(), 10)
    }

    fn with(backplane: Arc<dyn Backplane>, rooms: RoomPolicies, per_user: usize) -> Self {
        let hub = Hub::new(
            HubConfig::new("n1", rooms),
            backplane,
            StdRng::seed_from_u64(1),
        );
        let verifier = JwtVerifier::new(&JwtConfig {
            algorithm: JwtAlgorithm::Hs256,
            key: SECRET.to_vec(),
            issuer: None,
            audience: None,
            leeway_secs: 0,
            max_lifetime_secs: None,
        })
        .unwrap();
        Self {
            services: Services {
                hub,
                verifier: Some(Arc::new(verifier)),
                limits: ConnectionLimits::new(100, 100, per_user),
            },
            t0: Instant::now(),
        }
    }

    /// `secs` seconds into the test, on both clocks.
    fn at(&self, secs: u64) -> Now {
        Now {
            instant: self.t0 + Duration::from_secs(secs),
            unix_secs: NOW + secs,
        }
    }

    fn open(&self, policy: EndpointPolicy, admitted: Admitted) -> Client {
        self.open_with(policy, admitted, None)
    }

    fn open_with(
        &self,
        policy: EndpointPolicy,
        admitted: Admitted,
        welcome: Option<Box<crate::upstream::Welcome>>,
    ) -> Client {
        let (conn, outbox) = Connection::open(
            self.services.clone(),
            Arc::new(policy),
            TransportKind::WebSocket,
            true,
            admitted,
            welcome,
            self.at(0),
        );
        Client {
            conn,
            outbox,
            now: self.at(0),
        }
    }

    /// A session of `user` admitted with its token; its `welcome` is taken.
    fn user(&self, user: &str) -> Client {
        self.user_on(EndpointPolicy::new("/chat"), user)
    }

    fn user_on(&self, policy: EndpointPolicy, user: &str) -> Client {
        let verifier = self.services.verifier.as_ref().unwrap();
        let identity = verifier.verify(&token(user, 3600), NOW).unwrap();
        let slot = self.services.limits.acquire_user(user.into()).unwrap();
        let client = self.open(policy, Admitted::Authenticated(identity, slot));
        let welcome = client.frames();
        assert_eq!(welcome.len(), 1, "{welcome:?}");
        assert_eq!(welcome[0]["type"], "welcome");
        client
    }

    /// A first-message session that has not authenticated yet.
    fn pending(&self) -> Client {
        let mut policy = EndpointPolicy::new("/chat");
        policy.auth = crate::policy::AuthMode::FirstMessage;
        let client = self.open(policy, Admitted::Pending);
        assert_eq!(client.frames(), Vec::<Value>::new(), "no welcome yet");
        client
    }
}

/// One session seen from its adapter.
struct Client {
    conn: Connection,
    outbox: OutboxReceiver,
    now: Now,
}

impl Client {
    fn text(&mut self, frame: &str) {
        self.conn
            .on_text(Bytes::copy_from_slice(frame.as_bytes()), self.now);
    }

    /// Sends a JSON envelope and returns every frame queued for this session after it.
    fn request(&mut self, frame: Value) -> Vec<Value> {
        self.text(&frame.to_string());
        self.frames()
    }

    /// Everything queued (frames, then the close if the session is closing).
    fn take(&self) -> (Vec<Outbound>, Option<CloseReason>) {
        let mut out = Vec::new();
        while let Some(batch) = self.outbox.try_batch(&mut out, usize::MAX) {
            if let Batch::Close(reason) = batch {
                return (out, Some(reason));
            }
        }
        (out, None)
    }

    /// The JSON frames queued for this open session.
    fn frames(&self) -> Vec<Value> {
        let (frames, close) = self.take();
        assert_eq!(close, None, "the session was closed");
        frames.into_iter().map(json_of).collect()
    }

    fn session(&self) -> String {
        self.conn.handle().id_str().to_owned()
    }
}

fn json_of(frame: Outbound) -> Value {
    match frame {
        Outbound::Text(b) | Outbound::Volatile(b) => serde_json::from_slice(&b).unwrap(),
        other => panic!("not a JSON frame: {other:?}"),
    }
}

/// The `error` envelope of a refused request.
fn error(id: Option<u64>, code: &str, message: &str) -> Value {
    let mut e = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        e["id"] = id.into();
    }
    e
}

/// Joins `room` and returns the ack.
fn join(client: &mut Client, room: &str) -> Value {
    let frames = client.request(json!({"type": "join", "id": 1, "room": room}));
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    frames[0].clone()
}

#[test]
fn an_admitted_session_is_welcomed_with_its_identity() {
    let node = Node::new();
    let client = node.open(
        EndpointPolicy::new("/chat"),
        Admitted::Authenticated(
            node.services
                .verifier
                .as_ref()
                .unwrap()
                .verify(&token("alice", 60), NOW)
                .unwrap(),
            node.services.limits.acquire_user("alice".into()).unwrap(),
        ),
    );
    assert_eq!(
        client.frames(),
        [
            json!({"type": "welcome", "session": client.session(), "user": "alice",
            "endpoint": "/chat", "transport": "websocket", "heartbeat_ms": 25_000, "node": "n1"})
        ]
    );
}

#[test]
fn an_anonymous_session_is_named_after_its_id() {
    let node = Node::new();
    let mut policy = EndpointPolicy::new("/public");
    policy.auth = crate::policy::AuthMode::None;
    let mut client = node.open(policy, Admitted::Anonymous);
    let welcome = client.frames();
    assert_eq!(welcome[0]["user"], format!("anon-{}", client.session()));
    assert_eq!(
        client.request(json!({"type": "auth", "id": 2, "token": token("alice", 60)})),
        [error(
            Some(2),
            "bad_request",
            "this endpoint does not use authentication"
        )]
    );
}

#[test]
fn ping_is_answered_with_pong_echoing_the_id() {
    let node = Node::new();
    let mut a = node.user("alice");
    assert_eq!(
        a.request(json!({"type": "ping", "id": 8})),
        [json!({"type": "pong", "id": 8})]
    );
    assert_eq!(
        a.request(json!({"type": "ping"})),
        [json!({"type": "pong"})]
    );
    assert_eq!(a.request(json!({"type": "hello"})), Vec::<Value>::new());
}

#[test]
fn join_acks_with_the_rooms_state_and_announces_the_user() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    let ack = join(&mut a, "r");
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "room": "r", "seq": 0, "epoch": epoch, "members": 1})
    );
    assert_eq!(
        join(&mut b, "r"),
        json!({"type": "ack", "id": 1, "room": "r", "seq": 0, "epoch": epoch, "members": 2})
    );
    assert_eq!(
        a.frames(),
        [json!({"type": "presence", "room": "r", "event": "join", "user": "bob"})]
    );
}

#[test]
fn a_recovering_join_gets_the_missed_messages_after_its_ack() {
    let rooms = RoomPolicies(vec![RoomPolicy {
        history: 10,
        ..RoomPolicy::fallback()
    }]);
    let node = Node::with(Arc::new(LocalBackplane), rooms, 10);
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    let epoch = join(&mut a, "r")["epoch"].clone();
    for n in 1..=3 {
        b.request(json!({"type": "publish", "room": "r", "data": n}));
    }
    a.request(json!({"type": "leave", "room": "r"}));
    let frames =
        a.request(json!({"type": "join", "id": 4, "room": "r", "since": 1, "epoch": epoch}));
    assert_eq!(
        frames,
        [
            json!({"type": "ack", "id": 4, "room": "r", "seq": 3, "epoch": epoch, "members": 1,
                "recovered": true}),
            json!({"type": "message", "room": "r", "from": "bob", "seq": 2, "data": 2}),
            json!({"type": "message", "room": "r", "from": "bob", "seq": 3, "data": 3}),
        ]
    );
    a.request(json!({"type": "leave", "room": "r"}));
    let frames =
        a.request(json!({"type": "join", "id": 5, "room": "r", "since": 1, "epoch": "other"}));
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["recovered"], false);
}

#[test]
fn leave_acks_announces_and_a_second_leave_is_not_member() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    join(&mut b, "r");
    a.frames();
    assert_eq!(
        b.request(json!({"type": "leave", "id": 7, "room": "r"})),
        [json!({"type": "ack", "id": 7})]
    );
    assert_eq!(
        a.frames(),
        [json!({"type": "presence", "room": "r", "event": "leave", "user": "bob"})]
    );
    assert_eq!(
        b.request(json!({"type": "leave", "id": 8, "room": "r"})),
        [error(Some(8), "not_member", "not a member of that room")]
    );
}

#[test]
fn publish_reaches_the_members_and_the_sender_only_with_echo() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    join(&mut b, "r");
    a.frames();
    assert_eq!(
        b.request(json!({"type": "publish", "id": 2, "room": "r", "data": {"x": 1}})),
        [json!({"type": "ack", "id": 2, "seq": 1})]
    );
    let message =
        json!({"type": "message", "room": "r", "from": "bob", "seq": 1, "data": {"x": 1}});
    assert_eq!(a.frames(), [message]);
    let echoed =
        b.request(json!({"type": "publish", "id": 3, "room": "r", "data": 2, "echo": true}));
    let message = json!({"type": "message", "room": "r", "from": "bob", "seq": 2, "data": 2});
    assert_eq!(
        echoed,
        [message.clone(), json!({"type": "ack", "id": 3, "seq": 2})]
    );
    assert_eq!(a.frames(), [message]);
    // The sender need not be a member.
    let mut c = node.user("carol");
    assert_eq!(
        c.request(json!({"type": "publish", "id": 4, "room": "r", "data": 3})),
        [json!({"type": "ack", "id": 4, "seq": 3})]
    );
    assert_eq!(a.frames().len(), 1);
}

#[test]
fn a_volatile_publish_has_no_seq_and_is_marked() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    join(&mut b, "r");
    a.frames();
    assert_eq!(
        b.request(json!({"type": "publish", "id": 2, "room": "r", "data": 1, "volatile": true})),
        [json!({"type": "ack", "id": 2})]
    );
    let (frames, _) = a.take();
    assert!(matches!(frames[..], [Outbound::Volatile(_)]), "{frames:?}");
    assert_eq!(
        json_of(frames[0].clone()),
        json!({"type": "message", "room": "r", "from": "bob", "volatile": true, "data": 1})
    );
}

#[test]
fn a_binary_publish_is_delivered_as_a_binary_envelope_and_acked_in_json() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    join(&mut b, "r");
    a.frames();
    let header = br#"{"type":"publish","room":"r","id":5}"#;
    let mut frame = (header.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(header);
    frame.extend_from_slice(&[0, 255]);
    b.conn.on_binary(Bytes::from(frame), b.now);
    assert_eq!(b.frames(), [json!({"type": "ack", "id": 5, "seq": 1})]);
    let (frames, _) = a.take();
    let [Outbound::Binary(bin)] = &frames[..] else {
        panic!("{frames:?}");
    };
    let header_len = u16::from_be_bytes([bin[0], bin[1]]) as usize;
    let header: Value = serde_json::from_slice(&bin[2..2 + header_len]).unwrap();
    assert_eq!(
        header,
        json!({"type": "message", "room": "r", "from": "bob", "seq": 1})
    );
    assert_eq!(&bin[2 + header_len..], [0, 255]);
    // A broken binary envelope is answered in JSON.
    b.conn.on_binary(Bytes::from_static(&[0]), b.now);
    assert_eq!(
        b.frames(),
        [error(
            None,
            "bad_request",
            "binary envelope shorter than its 2-byte header length"
        )]
    );
}

#[test]
fn send_reaches_every_session_of_the_user_and_says_whether_any() {
    let node = Node::new();
    let (a1, a2, mut b) = (node.user("alice"), node.user("alice"), node.user("bob"));
    assert_eq!(
        b.request(json!({"type": "send", "id": 5, "to": "alice", "data": "hi"})),
        [json!({"type": "ack", "id": 5, "delivered": true})]
    );
    let direct = [json!({"type": "direct", "from": "bob", "data": "hi"})];
    assert_eq!(a1.frames(), direct);
    assert_eq!(a2.frames(), direct);
    assert_eq!(
        b.request(json!({"type": "send", "id": 6, "to": "nobody", "data": 1})),
        [json!({"type": "ack", "id": 6, "delivered": false})]
    );
}

#[test]
fn presence_lists_the_members_without_their_node() {
    let node = Node::new();
    let (mut a, mut b, mut c) = (node.user("alice"), node.user("bob"), node.user("carol"));
    join(&mut a, "r");
    join(&mut b, "r");
    assert_eq!(
        c.request(json!({"type": "presence", "id": 6, "room": "r"})),
        [
            json!({"type": "ack", "id": 6, "room": "r", "count": 2, "members": [
                {"user": "alice", "session": a.session(), "transport": "websocket"},
                {"user": "bob", "session": b.session(), "transport": "websocket"},
            ]})
        ]
    );
}

#[test]
fn rooms_outside_the_endpoints_patterns_are_forbidden() {
    let node = Node::new();
    let mut policy = EndpointPolicy::new("/chat");
    policy.rooms = vec![Pattern::new("chat:*")];
    let mut a = node.user_on(policy, "alice");
    assert_eq!(join(&mut a, "chat:1")["room"], "chat:1");
    for (request, message) in [
        (
            json!({"type": "join", "id": 1, "room": "other"}),
            "room not allowed",
        ),
        (
            json!({"type": "presence", "id": 1, "room": "other"}),
            "room not allowed",
        ),
        (
            json!({"type": "publish", "id": 1, "room": "other", "data": 1}),
            "publishing to that room is not allowed",
        ),
    ] {
        assert_eq!(a.request(request), [error(Some(1), "forbidden", message)]);
    }
}

#[test]
fn a_session_joins_at_most_max_rooms() {
    let node = Node::new();
    let mut policy = EndpointPolicy::new("/chat");
    policy.max_rooms = 1;
    let mut a = node.user_on(policy, "alice");
    join(&mut a, "a");
    assert_eq!(
        a.request(json!({"type": "join", "id": 2, "room": "b"})),
        [error(
            Some(2),
            "limit_exceeded",
            "at most 1 rooms per session"
        )]
    );
    assert_eq!(
        join(&mut a, "a")["members"],
        1,
        "joining again is no new room"
    );
    a.request(json!({"type": "leave", "room": "a"}));
    join(&mut a, "b");
}

#[test]
fn malformed_frames_are_bad_requests_and_the_session_goes_on() {
    let node = Node::new();
    let mut a = node.user("alice");
    a.text("nope");
    let frames = a.frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["code"], "bad_request");
    assert!(
        frames[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON: "),
        "{frames:?}"
    );
    assert_eq!(
        a.request(json!({"type": "dance", "id": 9})),
        [error(Some(9), "bad_request", "unknown type `dance`")]
    );
    assert_eq!(
        a.request(json!({"type": "join", "id": 3})),
        [error(Some(3), "bad_request", "missing field `room`")]
    );
    let deep = format!(
        r#"{{"type":"publish","id":4,"room":"r","data":{}{}}}"#,
        "[".repeat(65),
        "]".repeat(65)
    );
    a.text(&deep);
    assert_eq!(
        a.frames(),
        [error(
            Some(4),
            "bad_request",
            "field `data` is nested deeper than 64 levels"
        )]
    );
    assert_eq!(
        a.request(json!({"type": "ping", "id": 10})),
        [json!({"type": "pong", "id": 10})]
    );
}

#[test]
fn before_authenticating_only_auth_and_hello_are_accepted() {
    let node = Node::new();
    let mut p = node.pending();
    for request in [
        json!({"type": "join", "id": 1, "room": "r"}),
        json!({"type": "ping", "id": 1}),
        json!({"type": "publish", "id": 1, "room": "r", "data": 1}),
        json!({"type": "send", "id": 1, "to": "bob", "data": 1}),
    ] {
        assert_eq!(
            p.request(request),
            [error(
                Some(1),
                "unauthorized",
                "authenticate first with an `auth` frame"
            )]
        );
    }
    assert_eq!(p.request(json!({"type": "hello"})), Vec::<Value>::new());
}

#[test]
fn a_first_auth_acks_then_welcomes_and_a_bad_one_can_be_retried() {
    let node = Node::new();
    let mut p = node.pending();
    assert_eq!(
        p.request(json!({"type": "auth", "id": 1, "token": "not a jwt"})),
        [error(Some(1), "unauthorized", "malformed token")]
    );
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": NOW - 1}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    assert_eq!(
        p.request(json!({"type": "auth", "id": 2, "token": expired})),
        [error(Some(2), "unauthorized", "token expired")]
    );
    let frames = p.request(json!({"type": "auth", "id": 3, "token": token("alice", 60)}));
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0], json!({"type": "ack", "id": 3}));
    assert_eq!(frames[1]["type"], "welcome");
    assert_eq!(frames[1]["user"], "alice");
    assert_eq!(join(&mut p, "r")["members"], 1);
}

#[test]
fn hello_with_a_token_authenticates_without_an_ack() {
    let node = Node::new();
    let mut p = node.pending();
    let frames = p.request(json!({"type": "hello", "token": token("alice", 60)}));
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "welcome");
    let mut q = node.pending();
    assert_eq!(
        q.request(json!({"type": "hello", "token": "x"})),
        [error(None, "unauthorized", "malformed token")]
    );
}

#[test]
fn auth_without_a_verifier_is_unauthorized() {
    let mut node = Node::new();
    node.services.verifier = None;
    let mut p = node.pending();
    assert_eq!(
        p.request(json!({"type": "auth", "id": 1, "token": token("alice", 60)})),
        [error(
            Some(1),
            "unauthorized",
            "no authentication configured"
        )]
    );
}

#[test]
fn a_first_auth_over_the_per_user_limit_stays_pending() {
    let node = Node::with(Arc::new(LocalBackplane), RoomPolicies::default(), 1);
    let _alice = node.user("alice");
    let mut p = node.pending();
    assert_eq!(
        p.request(json!({"type": "auth", "id": 1, "token": token("alice", 60)})),
        [error(
            Some(1),
            "limit_exceeded",
            "too many connections for this user"
        )]
    );
    assert_eq!(
        p.request(json!({"type": "ping", "id": 2})),
        [error(
            Some(2),
            "unauthorized",
            "authenticate first with an `auth` frame"
        )]
    );
    // Another user may.
    assert_eq!(
        p.request(json!({"type": "auth", "id": 3, "token": token("bob", 60)}))[0],
        json!({"type": "ack", "id": 3})
    );
}

#[test]
fn a_refresh_must_keep_the_user_and_extends_the_session() {
    let node = Node::new();
    let mut a = node.user("alice");
    assert_eq!(
        a.request(json!({"type": "auth", "id": 1, "token": token("bob", 7200)})),
        [error(
            Some(1),
            "unauthorized",
            "token is for another user than this session"
        )]
    );
    assert_eq!(
        a.request(json!({"type": "auth", "id": 2, "token": "x"})),
        [error(Some(2), "unauthorized", "malformed token")]
    );
    assert_eq!(
        a.request(json!({"type": "auth", "id": 3, "token": token("alice", 7200)})),
        [json!({"type": "ack", "id": 3})]
    );
    // The first token expired at 3600 s; the refreshed one holds until 7200 s.
    a.conn.on_pong();
    assert!(a.conn.poll(node.at(3600).instant).is_some());
    assert_eq!(a.take().1, None);
    a.conn.poll(node.at(7200).instant);
    assert_eq!(
        a.take().1,
        Some(CloseReason::new(CloseCode::Unauthorized, "token expired"))
    );
}

#[test]
fn the_auth_deadline_closes_a_pending_session_4001() {
    let node = Node::new();
    let mut p = node.pending();
    let deadline = p.conn.poll(node.at(0).instant).unwrap();
    assert_eq!(deadline, node.at(5).instant, "auth_timeout_secs = 5");
    assert_eq!(p.take().1, None);
    assert_eq!(p.conn.poll(node.at(5).instant), None);
    assert_eq!(
        p.take(),
        (
            Vec::new(),
            Some(CloseReason::new(CloseCode::Unauthorized, "auth timeout"))
        )
    );
    // Authenticated in time, the deadline is gone.
    let mut q = node.pending();
    q.request(json!({"type": "auth", "token": token("alice", 60)}));
    q.conn.poll(node.at(5).instant);
    assert_eq!(q.take().1, None);
}

#[test]
fn heartbeats_ping_and_close_a_silent_peer_4009() {
    let node = Node::new();
    let mut a = node.user("alice");
    let first = a.conn.poll(node.at(0).instant).unwrap();
    assert_eq!(first, node.at(25).instant);
    a.conn.poll(node.at(25).instant);
    assert_eq!(a.take(), (vec![Outbound::Ping], None));
    a.conn.on_pong();
    a.conn.poll(node.at(50).instant);
    assert_eq!(
        a.take(),
        (vec![Outbound::Ping], None),
        "answered: pinged again"
    );
    a.conn.poll(node.at(75).instant);
    assert_eq!(
        a.take().1,
        Some(CloseReason::new(
            CloseCode::HeartbeatTimeout,
            "heartbeat timeout"
        ))
    );
}

#[test]
fn frames_over_the_rate_get_rate_limited_then_4008() {
    let node = Node::new();
    let mut policy = EndpointPolicy::new("/chat");
    (policy.rate_per_sec, policy.rate_burst) = (1, 1);
    let mut a = node.user_on(policy, "alice");
    assert_eq!(
        a.request(json!({"type": "ping", "id": 1})),
        [json!({"type": "pong", "id": 1})]
    );
    assert_eq!(
        a.request(json!({"type": "ping", "id": 2})),
        [error(None, "rate_limited", "rate limit exceeded")]
    );
    a.text(r#"{"type":"ping","id":3}"#);
    assert_eq!(
        a.take(),
        (
            Vec::new(),
            Some(CloseReason::new(
                CloseCode::TooSlowOrTooFast,
                "rate limit exceeded"
            ))
        )
    );
}

#[test]
fn control_frames_take_tokens_too() {
    let node = Node::new();
    let mut policy = EndpointPolicy::new("/chat");
    (policy.rate_per_sec, policy.rate_burst) = (1, 2);
    let mut a = node.user_on(policy, "alice");
    assert!(a.conn.on_control(2, a.now));
    assert!(!a.conn.on_control(1, a.now));
    assert_eq!(
        a.frames(),
        [error(None, "rate_limited", "rate limit exceeded")]
    );
    assert!(a.conn.on_control(1, node.at(1)), "a token a second");
}

#[test]
fn sustained_double_rate_is_closed_4008_and_the_rate_itself_is_not() {
    let ping = Bytes::from_static(br#"{"type":"ping"}"#);
    for (interval_ms, expect_closed) in [(50, true), (100, false)] {
        let node = Node::new();
        let mut policy = EndpointPolicy::new("/chat");
        (policy.rate_per_sec, policy.rate_burst) = (10, 5);
        let mut a = node.user_on(policy, "alice");
        for i in 0..100u64 {
            let now = Now {
                instant: node.t0 + Duration::from_millis(i * interval_ms),
                unix_secs: NOW,
            };
            a.conn.on_text(ping.clone(), now);
        }
        let close = a.take().1;
        assert_eq!(close.is_some(), expect_closed, "every {interval_ms} ms");
        if expect_closed {
            assert_eq!(close.unwrap().code, CloseCode::TooSlowOrTooFast);
        }
    }
}

#[test]
fn datagrams_carry_volatile_publishes_without_replies() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    let datagram = |frame: Value| Bytes::from(frame.to_string());
    b.conn.on_datagram(
        datagram(json!({"type": "publish", "id": 1, "room": "r", "data": 1})),
        b.now,
    );
    assert_eq!(
        a.frames(),
        [json!({"type": "message", "room": "r", "from": "bob", "volatile": true, "data": 1})]
    );
    // No ack, no error for anything else: datagrams get no reply.
    b.conn
        .on_datagram(datagram(json!({"type": "ping", "id": 2})), b.now);
    b.conn.on_datagram(Bytes::from_static(b"nope"), b.now);
    b.conn.on_datagram(
        datagram(json!({"type": "publish", "room": "other:x", "data": 1})),
        b.now,
    );
    assert_eq!(b.frames(), Vec::<Value>::new());
    // Nor from a session that has not authenticated.
    let mut p = node.pending();
    p.conn.on_datagram(
        datagram(json!({"type": "publish", "room": "r", "data": 2})),
        p.now,
    );
    assert_eq!(a.frames(), Vec::<Value>::new());
    assert_eq!(b.conn.stats().frames, 4);
}

#[test]
fn dropping_the_connection_leaves_its_rooms_and_the_hub() {
    let node = Node::new();
    let (mut a, mut b) = (node.user("alice"), node.user("bob"));
    join(&mut a, "r");
    join(&mut b, "r");
    a.frames();
    let sessions = node.services.hub.session_count();
    drop(b);
    assert_eq!(
        a.frames(),
        [json!({"type": "presence", "room": "r", "event": "leave", "user": "bob"})]
    );
    assert_eq!(node.services.hub.session_count(), sessions - 1);
    assert_eq!(
        a.request(json!({"type": "send", "id": 1, "to": "bob", "data": 1})),
        [json!({"type": "ack", "id": 1, "delivered": false})]
    );
}

/// Completions a test answers by hand.
type Pending<T> = Mutex<Vec<Completion<Result<T, ClusterUnavailable>>>>;

/// A cluster whose answers the test gives by hand.
#[derive(Default)]
struct ManualCluster {
    acquires: Pending<bool>,
    publishes: Pending<Option<u64>>,
}

impl Backplane for ManualCluster {
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }
}

impl Cluster for ManualCluster {
    fn publish(
        &self,
        _: ClusterPublish,
        done: Completion<Result<Option<u64>, ClusterUnavailable>>,
    ) {
        self.publishes.lock().unwrap().push(done);
    }
    fn open_room(
        &self,
        _: &RoomName,
        _: Option<(u64, String)>,
        _: Completion<Result<RoomView, ClusterUnavailable>>,
    ) {
    }
    fn close_room(&self, _: &RoomName) {}
    fn enter(&self, _: &RoomName, _: MemberInfo, _: bool) {}
    fn exit(&self, _: &RoomName, _: MemberInfo, _: bool) {}
    fn disconnect_user(
        &self,
        _: &str,
        _: CloseReason,
        _: Completion<Result<(), ClusterUnavailable>>,
    ) {
    }
    fn members(&self, _: &RoomName, _: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>) {}
    fn send_user(
        &self,
        _: &str,
        _: Option<Arc<str>>,
        _: Payload,
        _: Completion<Result<bool, ClusterUnavailable>>,
    ) {
    }
    fn open_user(&self, _: &str) {}
    fn close_user(&self, _: &str) {}
    fn acquire_user(&self, _: &str, _: usize, done: Completion<Result<bool, ClusterUnavailable>>) {
        self.acquires.lock().unwrap().push(done);
    }
    fn release_user(&self, _: &str) {}
}

fn cluster_node() -> (Node, Arc<ManualCluster>) {
    let cluster = Arc::new(ManualCluster::default());
    let node = Node::with(cluster.clone(), RoomPolicies::default(), 10);
    (node, cluster)
}

/// Whether the session's wake signal fired (its permit is taken).
fn woken(client: &Client) -> bool {
    let signal = client
        .conn
        .wake_signal()
        .expect("a pending session has one");
    let mut notified = std::pin::pin!(signal.notified());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::future::Future::poll(notified.as_mut(), &mut cx).is_ready()
}

#[test]
fn requests_wait_in_order_while_the_cluster_counts_the_user() {
    let (node, cluster) = cluster_node();
    let mut p = node.pending();
    let auth = json!({"type": "auth", "id": 1, "token": token("alice", 60)});
    assert_eq!(
        p.request(auth),
        Vec::<Value>::new(),
        "waits for the cluster"
    );
    assert_eq!(
        p.request(json!({"type": "ping", "id": 2})),
        Vec::<Value>::new()
    );
    for _ in 1..MAX_QUEUED_DURING_AUTH {
        p.text(r#"{"type":"hello"}"#);
    }
    assert_eq!(
        p.request(json!({"type": "ping", "id": 3})),
        [error(Some(3), "unauthorized", "authentication in progress")]
    );
    assert!(!woken(&p));
    let done = cluster.acquires.lock().unwrap().pop().unwrap();
    done(Ok(true));
    assert!(woken(&p), "the cluster's answer wakes the driver");
    p.conn.on_wake(p.now);
    let frames = p.frames();
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[0], json!({"type": "ack", "id": 1}));
    assert_eq!(frames[1]["type"], "welcome");
    assert_eq!(frames[2], json!({"type": "pong", "id": 2}));
}

#[test]
fn a_cluster_that_refuses_or_fails_the_count_leaves_the_session_pending() {
    let (node, cluster) = cluster_node();
    let mut p = node.pending();
    for (answer, expected) in [
        (
            Ok(false),
            error(
                Some(1),
                "limit_exceeded",
                "too many connections for this user",
            ),
        ),
        (
            Err(ClusterUnavailable::Unavailable),
            error(
                Some(1),
                "internal",
                "cluster unavailable: the credential or the connection count cannot be checked",
            ),
        ),
    ] {
        p.request(json!({"type": "auth", "id": 1, "token": token("alice", 60)}));
        let done = cluster.acquires.lock().unwrap().pop().unwrap();
        done(answer);
        p.conn.on_wake(p.now);
        assert_eq!(p.frames(), [expected]);
        assert_eq!(
            p.request(json!({"type": "ping", "id": 2})),
            [error(
                Some(2),
                "unauthorized",
                "authenticate first with an `auth` frame"
            )]
        );
    }
}

#[test]
fn a_publish_the_cluster_cannot_take_is_an_internal_error() {
    let (node, cluster) = cluster_node();
    let mut a = node.user("alice");
    assert_eq!(
        a.request(json!({"type": "publish", "id": 4, "room": "r", "data": 1})),
        Vec::<Value>::new(),
        "answered when the cluster has the message"
    );
    let done = cluster.publishes.lock().unwrap().pop().unwrap();
    done(Err(ClusterUnavailable::OutcomeUnknown));
    assert_eq!(
        a.frames(),
        [error(
            Some(4),
            "internal",
            "cluster unavailable: outcome unknown"
        )]
    );
    // The room budget is a limit, not an internal failure.
    assert_eq!(
        a.request(json!({"type": "publish", "id": 5, "room": "new", "data": 1})),
        Vec::<Value>::new()
    );
    let done = cluster.publishes.lock().unwrap().pop().unwrap();
    done(Err(ClusterUnavailable::RoomBudget));
    assert_eq!(
        a.frames(),
        [error(Some(5), "limit_exceeded", "room budget exhausted")]
    );
}
