//! The hub driven without sockets: sessions' outboxes read back, time passed in.

use super::*;
use crate::{
    backplane::{Cluster, ClusterMessage, LocalBackplane},
    policy::RoomPolicies,
    room::{
        testing::{cluster_message, frames_and_close},
        Local,
    },
    session::{Batch, OutboxReceiver, TransportKind},
};
use bytes::Bytes;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::time::Duration;

/// What `verb` passed its completion, which a single node calls at once.
fn at_once<T: Send + 'static>(verb: impl FnOnce(Completion<T>)) -> T {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let filled = slot.clone();
    verb(Box::new(move |v| *filled.lock().unwrap() = Some(v)));
    let value = slot.lock().unwrap().take();
    value.expect("a single node completes at once")
}

/// The verbs of a single node, which complete at once, as plain calls.
impl Hub {
    fn publish_now(
        &self,
        room: &RoomName,
        from: Option<&str>,
        data: &Payload,
        volatile: bool,
        exclude: Option<SessionId>,
        now: Instant,
    ) -> Option<u64> {
        let from: Option<Arc<str>> = from.map(Arc::from);
        let message = Publish {
            room,
            from: from.as_ref(),
            data,
            volatile,
            exclude,
        };
        at_once(|done| self.publish(message, now, done).expect("admitted")).unwrap()
    }

    fn send_now(&self, user: &str, from: Option<&str>, data: &Payload) -> bool {
        let from: Option<Arc<str>> = from.map(Arc::from);
        at_once(|done| self.send_to_user(user, from.as_ref(), data, done)).unwrap()
    }

    fn members_now(&self, room: &RoomName) -> Vec<MemberInfo> {
        at_once(|done| self.members(room, done)).unwrap()
    }

    fn disconnect_now(&self, user: &str, reason: CloseReason) -> usize {
        at_once(|done| self.disconnect_user(user, reason, done)).unwrap()
    }

    fn local_rooms(&self) -> &rooms::Rooms<Local> {
        match &self.mode {
            Mode::Single(single) => &single.rooms,
            Mode::Cluster(_) => panic!("a single node's rooms"),
        }
    }
}

fn hub() -> Arc<Hub> {
    hub_with(RoomPolicies::default())
}

fn hub_with(rooms: RoomPolicies) -> Arc<Hub> {
    Hub::new(
        HubConfig {
            rooms_per_user_per_sec: 0,
            ..HubConfig::new("n1", rooms)
        },
        Arc::new(LocalBackplane),
        StdRng::seed_from_u64(1),
    )
}

/// A hub whose rooms keep `history` messages for 60 s.
fn hub_with_history(history: usize) -> Arc<Hub> {
    hub_with(RoomPolicies(vec![crate::policy::RoomPolicy {
        history,
        history_ttl: Duration::from_secs(60),
        ..crate::policy::RoomPolicy::fallback()
    }]))
}

fn ack_frame(outcome: Result<&JoinOutcome, &ClusterUnavailable>) -> Outbound {
    let outcome = outcome.expect("single node");
    let json =
        serde_json::json!({"type": "ack", "seq": outcome.seq, "recovered": outcome.recovered});
    Outbound::Text(Bytes::from(json.to_string()))
}

fn join(hub: &Hub, h: &SessionHandle, room: &RoomName) -> JoinOutcome {
    hub.join(h, room, None, Instant::now(), Box::new(ack_frame))
        .expect("within the rate of new rooms")
        .expect("a single node answers at once")
}

fn publish(hub: &Hub, room: &RoomName, data: &'static str) -> Option<u64> {
    hub.publish_now(room, None, &json_data(data), false, None, Instant::now())
}

fn session(hub: &Hub, user: &str) -> (SessionHandle, OutboxReceiver) {
    let (h, rx) = SessionHandle::new(
        hub.new_session_id(),
        TransportKind::WebSocket,
        "/chat".into(),
        crate::session::QueueLimits::frames(64),
    );
    h.set_user(user.into());
    hub.open_session(&h);
    hub.register_user(&h);
    (h, rx)
}

/// Every JSON frame queued for an open session (everything is queued synchronously).
///
/// Panics if the session was closed: an empty result always means "nothing queued".
fn drain_all(rx: &OutboxReceiver) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(batch) = rx.try_batch(&mut out, usize::MAX) {
        if let Batch::Close(reason) = batch {
            panic!("the session was closed: {reason:?}");
        }
    }
    out.into_iter()
        .map(|o| match o {
            Outbound::Text(b) | Outbound::Volatile(b) => serde_json::from_slice(&b).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Like [`drain_all`], without acks.
fn drain(rx: &OutboxReceiver) -> Vec<Value> {
    let mut frames = drain_all(rx);
    frames.retain(|v| v["type"] != "ack");
    frames
}

fn json_data(s: &'static str) -> Payload {
    Payload::Json(Bytes::from_static(s.as_bytes()))
}

#[test]
fn session_ids_and_epochs_come_from_the_given_source() {
    let (a, b) = (hub(), hub());
    let ids = |hub: &Hub| [hub.new_session_id(), hub.new_session_id()];
    let (ids_a, ids_b) = (ids(&a), ids(&b));
    assert_eq!(ids_a, ids_b, "same seed, same ids");
    assert_ne!(ids_a[0], ids_a[1]);
    let room = RoomName::new("r").unwrap();
    let (sa, _ra) = session(&a, "u");
    let (sb, _rb) = session(&b, "u");
    assert_eq!(join(&a, &sa, &room).epoch, join(&b, &sb, &room).epoch);
    let other = Hub::new(
        HubConfig::new("n1", RoomPolicies::default()),
        Arc::new(LocalBackplane),
        StdRng::seed_from_u64(2),
    );
    assert_ne!(ids(&other), ids_a, "another seed, other ids");
}

#[test]
fn publish_reaches_members_in_sequence_and_respects_exclude() {
    let hub = hub();
    let room = RoomName::new("r").unwrap();
    let (a, arx) = session(&hub, "alice");
    let (b, brx) = session(&hub, "bob");
    join(&hub, &a, &room);
    let outcome = join(&hub, &b, &room);
    assert_eq!(outcome.members, 2);
    assert_eq!(
        drain(&arx),
        vec![json!({"type":"presence","room":"r","event":"join","user":"bob"})]
    );
    assert_eq!(
        hub.publish_now(
            &room,
            Some("alice"),
            &json_data("1"),
            false,
            Some(a.id()),
            Instant::now()
        ),
        Some(1)
    );
    assert_eq!(
        hub.publish_now(
            &room,
            Some("alice"),
            &json_data("2"),
            false,
            None,
            Instant::now()
        ),
        Some(2)
    );
    assert_eq!(
        drain(&brx),
        vec![
            json!({"type":"message","room":"r","from":"alice","seq":1,"data":1}),
            json!({"type":"message","room":"r","from":"alice","seq":2,"data":2}),
        ]
    );
    assert_eq!(drain(&arx).len(), 1);
}

#[test]
fn presence_is_user_level() {
    let hub = hub();
    let room = RoomName::new("r").unwrap();
    let (watcher, wrx) = session(&hub, "w");
    join(&hub, &watcher, &room);
    let (t1, _r1) = session(&hub, "u");
    let (t2, _r2) = session(&hub, "u");
    join(&hub, &t1, &room);
    join(&hub, &t2, &room);
    assert_eq!(
        drain(&wrx),
        vec![json!({"type":"presence","room":"r","event":"join","user":"u"})],
        "second tab does not re-announce"
    );
    assert!(hub.leave(&t1, &room));
    assert!(drain(&wrx).is_empty(), "the user still has a tab there");
    assert!(hub.leave(&t2, &room));
    assert_eq!(
        drain(&wrx),
        vec![json!({"type":"presence","room":"r","event":"leave","user":"u"})]
    );
    assert!(!hub.leave(&t2, &room));
    assert_eq!(hub.members_now(&room).len(), 1);
    hub.leave(&watcher, &room);
    assert_eq!(hub.room_count(), 0, "empty rooms are dropped");
}

#[test]
fn direct_send_reaches_every_session_of_the_user_only() {
    let hub = hub();
    let (_a1, a1rx) = session(&hub, "alice");
    let (_a2, a2rx) = session(&hub, "alice");
    let (_b, brx) = session(&hub, "bob");
    assert!(hub.send_now("alice", Some("bob"), &json_data("\"hi\"")));
    assert!(!hub.send_now("nobody", None, &json_data("1")));
    let expected = vec![json!({"type":"direct","from":"bob","data":"hi"})];
    assert_eq!(drain(&a1rx), expected);
    assert_eq!(drain(&a2rx), expected);
    assert!(drain(&brx).is_empty());
    // Bob's session works: what reaches him is his own direct message, nothing before.
    assert!(hub.send_now("bob", None, &json_data("2")));
    assert_eq!(drain(&brx), vec![json!({"type":"direct","data":2})]);
}

#[test]
fn disconnect_closes_every_session_of_the_user_and_no_other() {
    let hub = hub();
    let (a1, _a1rx) = session(&hub, "alice");
    let (a2, _a2rx) = session(&hub, "alice");
    let (b, brx) = session(&hub, "bob");
    let reason = CloseReason::new(crate::protocol::CloseCode::PolicyViolation, "bye");
    assert_eq!(hub.disconnect_now("alice", reason.clone()), 2);
    assert_eq!(a1.close_reason(), Some(reason.clone()));
    assert_eq!(a2.close_reason(), Some(reason));
    assert!(!b.is_closed());
    assert!(drain(&brx).is_empty());
    assert_eq!(
        hub.disconnect_now(
            "nobody",
            CloseReason::new(crate::protocol::CloseCode::Normal, "")
        ),
        0
    );
}

#[test]
fn close_all_offers_the_last_frame_then_closes_every_session() {
    let hub = hub();
    let (a, arx) = session(&hub, "a");
    let (b, brx) = session(&hub, "b");
    let going = CloseReason::new(crate::protocol::CloseCode::GoingAway, "shutting down");
    hub.close_all(
        || {
            Some(Outbound::Text(Bytes::from_static(
                br#"{"type":"reconnect"}"#,
            )))
        },
        going.clone(),
    );
    for (handle, rx) in [(a, arx), (b, brx)] {
        assert_eq!(handle.close_reason(), Some(going.clone()));
        let mut out = Vec::new();
        assert_eq!(rx.try_batch(&mut out, 10), Some(Batch::Frames));
        assert_eq!(
            out,
            [Outbound::Text(Bytes::from_static(
                br#"{"type":"reconnect"}"#
            ))]
        );
        assert_eq!(
            rx.try_batch(&mut out, 10),
            Some(Batch::Close(going.clone()))
        );
    }
}

#[test]
fn rejoining_after_the_room_emptied_starts_a_new_epoch() {
    let hub = hub();
    let room = RoomName::new("r").unwrap();
    let (a, _rx) = session(&hub, "a");
    let first = join(&hub, &a, &room);
    publish(&hub, &room, "1");
    assert_eq!(join(&hub, &a, &room).seq, 1, "join is idempotent");
    hub.leave(&a, &room);
    let second = join(&hub, &a, &room);
    assert_eq!(second.seq, 0);
    assert_ne!(first.epoch, second.epoch);
}

fn recover(hub: &Hub, h: &SessionHandle, room: &RoomName, seq: u64, epoch: &str) -> JoinOutcome {
    hub.join(
        h,
        room,
        Some(Since { seq, epoch }),
        Instant::now(),
        Box::new(ack_frame),
    )
    .expect("within the rate of new rooms")
    .expect("a single node answers at once")
}

#[test]
fn a_recovering_join_gets_the_ack_then_exactly_the_missed_messages() {
    let hub = hub_with_history(10);
    let room = RoomName::new("r").unwrap();
    let (a, arx) = session(&hub, "a");
    let first = join(&hub, &a, &room);
    for n in ["1", "2", "3"] {
        publish(&hub, &room, n);
    }
    drain_all(&arx);
    hub.leave(&a, &room);
    for n in ["4", "5"] {
        publish(&hub, &room, n);
    }
    let outcome = recover(&hub, &a, &room, 3, &first.epoch);
    assert_eq!((outcome.seq, outcome.recovered), (5, Some(true)));
    let seen: Vec<Value> = drain_all(&arx);
    assert_eq!(seen[0]["type"], "ack");
    let data: Vec<&Value> = seen[1..].iter().map(|m| &m["data"]).collect();
    assert_eq!(data, [&json!(4), &json!(5)]);
    // Live messages follow.
    publish(&hub, &room, "6");
    assert_eq!(
        drain_all(&arx),
        [json!({"type":"message","room":"r","seq":6,"data":6})]
    );
}

#[test]
fn wrong_epochs_and_gaps_are_not_recovered_and_replay_nothing() {
    let hub = hub_with_history(2);
    let room = RoomName::new("r").unwrap();
    let (a, arx) = session(&hub, "a");
    let epoch = join(&hub, &a, &room).epoch;
    for n in ["1", "2", "3", "4"] {
        publish(&hub, &room, n);
    }
    hub.leave(&a, &room);
    drain_all(&arx);
    assert_eq!(recover(&hub, &a, &room, 3, "other").recovered, Some(false));
    assert_eq!(drain_all(&arx).len(), 1, "the ack only");
    hub.leave(&a, &room);
    // Only 3 and 4 are held: from 1 on there is a gap.
    assert_eq!(recover(&hub, &a, &room, 1, &epoch).recovered, Some(false));
    assert_eq!(drain_all(&arx).len(), 1);
    hub.leave(&a, &room);
    assert_eq!(recover(&hub, &a, &room, 2, &epoch).recovered, Some(true));
    assert_eq!(drain_all(&arx).len(), 3);
}

#[test]
fn history_keeps_seq_and_epoch_of_an_empty_room_until_it_expires() {
    let hub = hub_with_history(10);
    let room = RoomName::new("r").unwrap();
    // Publishing to a room nobody is in assigns real sequence numbers and keeps them.
    assert_eq!(publish(&hub, &room, "1"), Some(1));
    assert_eq!(publish(&hub, &room, "2"), Some(2));
    let (a, arx) = session(&hub, "a");
    let outcome = join(&hub, &a, &room);
    assert_eq!(outcome.seq, 2);
    hub.leave(&a, &room);
    assert_eq!(hub.room_count(), 1, "kept for its history");
    hub.expire_history(Instant::now());
    assert_eq!(hub.room_count(), 1, "kept while its history lives");
    let again = recover(&hub, &a, &room, 0, &outcome.epoch);
    assert_eq!((again.seq, again.recovered), (2, Some(true)));
    assert_eq!(again.epoch, outcome.epoch);
    assert_eq!(
        drain_all(&arx).len(),
        2 + 2,
        "two acks, two recovered messages"
    );
    hub.leave(&a, &room);
    let later = Instant::now() + Duration::from_secs(61);
    hub.expire_history(later);
    assert_eq!(hub.room_count(), 1, "seen empty: kept one more lifetime");
    hub.expire_history(later + Duration::from_secs(60));
    assert_eq!(
        hub.room_count(),
        0,
        "forgotten a lifetime after its history expired"
    );
    let fresh = join(&hub, &a, &room);
    assert_eq!(fresh.seq, 0);
    assert_ne!(
        fresh.epoch, outcome.epoch,
        "the sequence restarted: new epoch"
    );
}

#[test]
fn an_empty_room_with_a_history_policy_keeps_its_epoch_for_a_lifetime() {
    let hub = hub_with_history(10);
    let room = RoomName::new("r").unwrap();
    let (a, _rx) = session(&hub, "a");
    let first = join(&hub, &a, &room);
    hub.leave(&a, &room);
    hub.expire_history(Instant::now());
    publish(&hub, &room, "1");
    let back = recover(&hub, &a, &room, 0, &first.epoch);
    assert_eq!((back.recovered, back.seq), (Some(true), 1));
}

#[test]
fn a_visit_restarts_the_lifetime_of_an_empty_room() {
    let hub = hub_with_history(10);
    let room = RoomName::new("r").unwrap();
    let (a, _rx) = session(&hub, "a");
    let t0 = Instant::now();
    let first = join(&hub, &a, &room);
    hub.leave(&a, &room);
    hub.expire_history(t0); // seen empty from t0
                            // A visit between two sweeps: the client saw the epoch at t0 + 50 s.
    join(&hub, &a, &room);
    hub.leave(&a, &room);
    hub.expire_history(t0 + Duration::from_secs(61));
    assert_eq!(hub.room_count(), 1, "the visit restarted the lifetime");
    let back = recover(&hub, &a, &room, 0, &first.epoch);
    assert_eq!(back.recovered, Some(true));
}

#[test]
fn a_swept_room_is_marked_and_a_new_publish_starts_its_successor() {
    let hub = hub_with_history(10);
    let room = RoomName::new("r").unwrap();
    publish(&hub, &room, "1");
    let stale = hub.local_rooms().get(&room).unwrap();
    let later = Instant::now() + Duration::from_secs(200);
    hub.expire_history(later);
    hub.expire_history(later + Duration::from_secs(61));
    assert_eq!(hub.room_count(), 0);
    assert!(stale.lock().removed, "the swept room is marked");
    // A publish that looked the old room up gets the new one (here: looks up afresh).
    assert_eq!(
        publish(&hub, &room, "2"),
        Some(1),
        "a new sequence in a new room"
    );
    let (a, arx) = session(&hub, "a");
    let outcome = join(&hub, &a, &room);
    assert_eq!(outcome.seq, 1);
    drop(arx);
}

#[test]
fn a_replay_that_does_not_fit_the_queue_is_not_recovered_and_nothing_piles_up() {
    let hub = hub_with_history(200);
    let room = RoomName::new("r").unwrap();
    let (a, arx) = session(&hub, "a"); // queue of 64 frames
    let epoch = join(&hub, &a, &room).epoch;
    publish(&hub, &room, "0");
    hub.leave(&a, &room);
    drain_all(&arx);
    for _ in 0..150 {
        publish(&hub, &room, "0");
    }
    assert_eq!(recover(&hub, &a, &room, 1, &epoch).recovered, Some(false));
    assert!(!a.is_closed());
    assert_eq!(drain_all(&arx).len(), 1, "the ack alone");
    // Within the queue, the replay is taken...
    hub.leave(&a, &room);
    assert_eq!(recover(&hub, &a, &room, 140, &epoch).recovered, Some(true));
    // ...and while it is queued, another is not: joining and leaving in a loop
    // without reading piles up acks only, until the queue's bound closes the session.
    let mut replays = 0;
    for _ in 0..100 {
        hub.leave(&a, &room);
        if recover(&hub, &a, &room, 140, &epoch).recovered == Some(true) {
            replays += 1;
        }
    }
    assert_eq!(replays, 0, "one replay at a time");
    assert!(a.is_closed(), "acks count against the queue too");
    assert!(a.queued() <= 64);
    drop(arx);
}

type MembersDone = Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>;

/// A cluster whose room views the test hands out by hand.
#[derive(Default)]
struct ScriptedCluster {
    views: std::sync::Mutex<Vec<Completion<Result<RoomView, ClusterUnavailable>>>>,
    lookups: std::sync::Mutex<Vec<MembersDone>>,
}

impl Backplane for ScriptedCluster {
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }
}

impl Cluster for ScriptedCluster {
    fn publish(&self, _: ClusterPublish, _: Completion<Result<Option<u64>, ClusterUnavailable>>) {}
    fn open_room(
        &self,
        _: &RoomName,
        _: Option<(u64, String)>,
        done: Completion<Result<RoomView, ClusterUnavailable>>,
    ) {
        self.views.lock().unwrap().push(done);
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
    fn members(&self, _: &RoomName, done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>) {
        self.lookups.lock().unwrap().push(done);
    }
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
    fn acquire_user(&self, _: &str, _: usize, _: Completion<Result<bool, ClusterUnavailable>>) {}
    fn release_user(&self, _: &str) {}
}

#[test]
fn a_message_the_channel_brings_after_the_view_that_covered_it_is_not_delivered_twice() {
    let cluster = Arc::new(ScriptedCluster::default());
    let hub = Hub::new(
        HubConfig::new("n1", RoomPolicies::default()),
        cluster.clone(),
        StdRng::seed_from_u64(1),
    );
    let room = RoomName::new("r").unwrap();
    let (live, live_rx) = session(&hub, "live");
    let (late, late_rx) = session(&hub, "late");
    let reply: JoinReply = Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
    hub.join(&live, &room, None, Instant::now(), reply).unwrap();
    let view = |seq: u64, missed: Option<Vec<ClusterMessage>>| RoomView {
        seq,
        epoch: "e".into(),
        missed,
        members: 1,
    };
    let done = cluster.views.lock().unwrap().pop().unwrap();
    done(Ok(view(0, None)));
    // The second member recovers from 0: the view (taken when seq was 2) replays 1 and 2,
    // while the channel still carries 2 and then brings 3.
    deliver(&hub, &room, 1, "e");
    let reply: JoinReply = Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
    hub.join(
        &late,
        &room,
        Some(Since { seq: 0, epoch: "e" }),
        Instant::now(),
        reply,
    )
    .unwrap();
    let done = cluster.views.lock().unwrap().pop().unwrap();
    done(Ok(view(
        2,
        Some(vec![cluster_message(1), cluster_message(2)]),
    )));
    deliver(&hub, &room, 2, "e");
    deliver(&hub, &room, 3, "e");
    let seqs = |rx: &OutboxReceiver| -> Vec<u64> {
        drain(rx).iter().filter_map(|m| m["seq"].as_u64()).collect()
    };
    assert_eq!(seqs(&late_rx), vec![1, 2, 3], "replayed once, then live");
    assert_eq!(
        seqs(&live_rx),
        vec![1, 2, 3],
        "the live member misses nothing"
    );
    // Once past the floor, the member gets everything again.
    deliver(&hub, &room, 4, "e");
    assert_eq!(seqs(&late_rx), vec![4]);
}

/// Hands `hub` message `seq` of `epoch` of `room`, as the cluster does.
fn deliver(hub: &Hub, room: &RoomName, seq: u64, epoch: &str) {
    let message = &cluster_message(seq);
    hub.deliver(room, Delivery::Message { message, epoch });
}

/// A cluster hub with one member `live` in room `r`, joined at seq 2 of epoch `e`.
fn clustered_member() -> (
    Arc<Hub>,
    Arc<ScriptedCluster>,
    RoomName,
    SessionHandle,
    OutboxReceiver,
) {
    let cluster = Arc::new(ScriptedCluster::default());
    let hub = Hub::new(
        HubConfig::new("n1", RoomPolicies::default()),
        cluster.clone(),
        StdRng::seed_from_u64(1),
    );
    let room = RoomName::new("r").unwrap();
    let (live, rx) = session(&hub, "live");
    let reply: JoinReply = Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
    hub.join(&live, &room, None, Instant::now(), reply).unwrap();
    let done = cluster.views.lock().unwrap().pop().unwrap();
    done(Ok(RoomView {
        seq: 2,
        epoch: "e".into(),
        missed: None,
        members: 1,
    }));
    (hub, cluster, room, live, rx)
}

#[test]
fn a_message_of_another_epoch_resyncs_the_members_who_stay() {
    let (hub, _cluster, room, live, rx) = clustered_member();
    deliver(&hub, &room, 3, "e");
    deliver(&hub, &room, 5, "e2");
    deliver(&hub, &room, 6, "e2");
    let (frames, closed) = frames_and_close(&rx);
    assert_eq!(closed, None, "the session stays open");
    assert!(hub.is_member(&live, &room), "and a member");
    assert_eq!(
        &frames[1..],
        &[
            json!({"type": "message", "room": "r", "seq": 3, "data": 3}),
            json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 4, "reason": "continuity"}),
            json!({"type": "message", "room": "r", "seq": 5, "data": 5}),
            json!({"type": "message", "room": "r", "seq": 6, "data": 6}),
        ],
        "{frames:?}"
    );
    assert_eq!(hub.positions(), vec![(room.clone(), 6, Arc::from("e2"))]);
}

#[test]
fn catching_up_delivers_what_was_missed_or_resyncs() {
    let (hub, _cluster, room, live, rx) = clustered_member();
    assert_eq!(hub.positions(), vec![(room.clone(), 2, Arc::from("e"))]);
    // Missed 3 and 4 while the subscription was down; the history holds them.
    let upto = hub.catch_up(
        &room,
        (2, "e"),
        RoomView {
            seq: 4,
            epoch: "e".into(),
            missed: Some(vec![cluster_message(3), cluster_message(4)]),
            members: 1,
        },
    );
    assert_eq!(upto, 4);
    let (frames, closed) = frames_and_close(&rx);
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!((seqs, closed), (vec![3, 4], None), "{frames:?}");
    // Later the room restarted (another epoch): nothing can be delivered in order.
    let upto = hub.catch_up(
        &room,
        (4, "e"),
        RoomView {
            seq: 7,
            epoch: "e2".into(),
            missed: None,
            members: 1,
        },
    );
    assert_eq!(upto, 7);
    deliver(&hub, &room, 7, "e2");
    deliver(&hub, &room, 8, "e2");
    let (frames, closed) = frames_and_close(&rx);
    assert_eq!(closed, None);
    assert!(hub.is_member(&live, &room));
    assert_eq!(
        frames,
        [
            json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 7, "reason": "continuity"}),
            json!({"type": "message", "room": "r", "seq": 8, "data": 8}),
        ]
    );
}

#[test]
fn a_catch_up_the_cluster_could_not_answer_resyncs_with_the_next_message() {
    let (hub, _cluster, room, live, rx) = clustered_member();
    let view = RoomView {
        seq: 2,
        epoch: UNKNOWN_EPOCH.into(),
        missed: None,
        members: 0,
    };
    assert_eq!(hub.catch_up(&room, (2, "e"), view), 0, "nothing skipped");
    let (frames, closed) = frames_and_close(&rx);
    assert_eq!(
        (frames.len(), closed),
        (1, None),
        "only the join's ack: {frames:?}"
    );
    deliver(&hub, &room, 5, "e");
    let (frames, _) = frames_and_close(&rx);
    assert_eq!(
        frames,
        [
            json!({"type": "resync", "room": "r", "epoch": "e", "seq": 4, "reason": "continuity"}),
            json!({"type": "message", "room": "r", "seq": 5, "data": 5}),
        ]
    );
    assert!(hub.is_member(&live, &room));
}

#[test]
fn frames_of_another_epoch_held_during_a_join_are_not_delivered_after_its_ack() {
    let cluster = Arc::new(ScriptedCluster::default());
    let hub = Hub::new(
        HubConfig::new("n1", RoomPolicies::default()),
        cluster.clone(),
        StdRng::seed_from_u64(1),
    );
    let room = RoomName::new("r").unwrap();
    let (joiner, rx) = session(&hub, "joiner");
    hub.join(
        &joiner,
        &room,
        None,
        Instant::now(),
        Box::new(ack_frame_any),
    )
    .unwrap();
    // While the join waits, the channel still brings the old epoch's 501 and 502.
    deliver(&hub, &room, 501, "e1");
    deliver(&hub, &room, 502, "e1");
    let done = cluster.views.lock().unwrap().pop().unwrap();
    done(Ok(RoomView {
        seq: 3,
        epoch: "e2".into(),
        missed: None,
        members: 1,
    }));
    deliver(&hub, &room, 4, "e2");
    let (frames, closed) = frames_and_close(&rx);
    assert_eq!(closed, None);
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, [4], "{frames:?}");
}

fn ack_frame_any(_: Result<&JoinOutcome, &ClusterUnavailable>) -> Outbound {
    Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}"))
}

#[test]
fn sessions_asking_for_a_big_rooms_listing_together_cost_one_lookup() {
    let (hub, cluster, room, _live, _rx) = clustered_member();
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t0 = Instant::now();
    for _ in 0..24 {
        let answers = answers.clone();
        hub.presence(
            &room,
            t0,
            Box::new(move |l| answers.lock().unwrap().push(l.unwrap())),
        );
    }
    let lookups = std::mem::take(&mut *cluster.lookups.lock().unwrap());
    assert_eq!(lookups.len(), 1, "one lookup for 24 sessions");
    let members: Vec<MemberInfo> = (0..2000)
        .map(|i| MemberInfo {
            user: format!("user-{i}"),
            session: format!("{i:016x}"),
            transport: "websocket".into(),
            node: Some("n2".into()),
        })
        .collect();
    lookups.into_iter().next().unwrap()(Ok(members));
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len(), 24);
    assert!(
        answers.iter().all(|a| Arc::ptr_eq(a, &answers[0])),
        "shared"
    );
    let ack = match answers[0].ack(None, "r") {
        Outbound::Text(b) => serde_json::from_slice::<Value>(&b).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ack["count"], 2000);
    assert_eq!(ack["truncated"], true);
    assert_eq!(ack["members"].as_array().unwrap().len(), 1000);
    // Asked again within the listing's lifetime: no lookup.
    hub.presence(&room, t0, Box::new(|l| assert!(l.is_ok())));
    assert!(cluster.lookups.lock().unwrap().is_empty());
}

#[test]
fn a_single_nodes_listing_is_cut_and_built_once_per_change() {
    let hub = Hub::new(
        HubConfig {
            max_presence_members: 3,
            ..HubConfig::new("n1", RoomPolicies::default())
        },
        Arc::new(LocalBackplane),
        StdRng::seed_from_u64(1),
    );
    let room = RoomName::new("r").unwrap();
    let mut sessions = Vec::new();
    for i in 0..5 {
        let (h, rx) = session(&hub, &format!("u{i}"));
        join(&hub, &h, &room);
        sessions.push((h, rx));
    }
    let listing = |hub: &Hub| {
        let got = Arc::new(std::sync::Mutex::new(None));
        let slot = got.clone();
        hub.presence(
            &room,
            Instant::now(),
            Box::new(move |l| *slot.lock().unwrap() = Some(l.unwrap())),
        );
        let l = got.lock().unwrap().take().unwrap();
        l
    };
    let first = listing(&hub);
    assert_eq!((first.count(), first.truncated()), (5, true));
    assert!(
        Arc::ptr_eq(&first, &listing(&hub)),
        "kept until the members change"
    );
    hub.leave(&sessions[0].0, &room);
    let after = listing(&hub);
    assert_eq!(after.count(), 4);
    assert!(!Arc::ptr_eq(&first, &after));
}

#[test]
fn new_rooms_are_rate_limited_per_user_and_bounded_by_the_budget() {
    let policies = RoomPolicies(vec![crate::policy::RoomPolicy {
        history: 10,
        ..crate::policy::RoomPolicy::fallback()
    }]);
    let hub = Hub::new(
        HubConfig {
            rooms_per_user_per_sec: 2,
            room_budget: 10 * crate::history::ROOM_COST,
            ..HubConfig::new("n1", policies)
        },
        Arc::new(LocalBackplane),
        StdRng::seed_from_u64(1),
    );
    let t0 = Instant::now();
    let alice: Arc<str> = "alice".into();
    let (a, _arx) = session(&hub, "alice");
    let publish_new = |n: usize, at: Instant| {
        let room = RoomName::new(&format!("p{n}")).unwrap();
        let message = Publish {
            room: &room,
            from: Some(&alice),
            data: &json_data("1"),
            volatile: false,
            exclude: None,
        };
        hub.publish(message, at, Box::new(|r| assert!(r.is_ok())))
    };
    // A burst of twice the rate, then one per half second.
    assert!((0..4).all(|n| publish_new(n, t0).is_ok()));
    assert_eq!(publish_new(4, t0), Err(RoomRefusal::TooManyNewRooms(2)));
    assert_eq!(hub.room_count(), 4, "the refused room was not created");
    // An existing room costs nothing.
    assert!(publish_new(0, t0).is_ok());
    let later = t0 + Duration::from_millis(500);
    assert!(publish_new(4, later).is_ok());
    let join_at = |n: usize, at: Instant| {
        hub.join(
            &a,
            &RoomName::new(&format!("j{n}")).unwrap(),
            None,
            at,
            Box::new(ack_frame),
        )
    };
    assert_eq!(
        join_at(0, later).unwrap_err(),
        RoomRefusal::TooManyNewRooms(2),
        "joins count too"
    );
    // Other users have rates of their own; the API (no user) has none, but the budget
    // bounds everyone: 10 rooms.
    let t1 = t0 + Duration::from_secs(60);
    let mut n = 5;
    while publish_new(n, t1 + Duration::from_secs(n as u64)).is_ok() {
        n += 1;
        assert!(n < 20, "the budget ends it");
    }
    // Each room costs ROOM_COST and its message what it holds.
    assert!((8..10).contains(&n), "{n} rooms fit the budget");
    assert_eq!(
        publish_new(n, t1 + Duration::from_secs(n as u64)),
        Err(RoomRefusal::BudgetSpent)
    );
    assert_eq!(hub.room_count(), n);
    let message = Publish {
        room: &RoomName::new("p-new").unwrap(),
        from: None,
        data: &json_data("1"),
        volatile: false,
        exclude: None,
    };
    let spent = hub.publish(message, t1, Box::new(|_| panic!("not published")));
    assert_eq!(spent, Err(RoomRefusal::BudgetSpent));
    assert_eq!(hub.room_count(), n, "no state kept for it");
    // A join still opens a room (its members are bounded by the sessions), without
    // history: recovery reports a gap.
    let late = t1 + Duration::from_secs(60);
    assert!(join_at(1, late).unwrap().is_some());
    let kept = hub.publish_now(
        &RoomName::new("j1").unwrap(),
        None,
        &json_data("1"),
        false,
        None,
        late,
    );
    assert_eq!(kept, Some(1));
    hub.leave(&a, &RoomName::new("j1").unwrap());
    assert_eq!(
        hub.room_count(),
        n,
        "a room without history goes with its last member"
    );
}

#[test]
fn a_join_waiting_for_a_busy_room_does_not_stall_the_other_rooms_of_its_shard() {
    let hub = hub();
    let busy = RoomName::new("busy").unwrap();
    let (a, _a_rx) = session(&hub, "a");
    join(&hub, &a, &busy);
    // Enough other rooms that some share the busy room's shard (dashmap has a few
    // shards per core), whichever hash the names get.
    let others: Vec<RoomName> = (0..64)
        .map(|i| RoomName::new(&format!("other-{i}")).unwrap())
        .collect();
    // A fan-out in progress holds the busy room's lock.
    let room_ref = hub.local_rooms().get(&busy).unwrap();
    let held = room_ref.lock();
    let waiting = std::thread::spawn({
        let hub = hub.clone();
        move || {
            let (b, _b_rx) = session(&hub, "b");
            join(&hub, &b, &RoomName::new("busy").unwrap());
        }
    });
    // Let the join reach the busy room's lock.
    std::thread::sleep(Duration::from_millis(100));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn({
        let hub = hub.clone();
        move || {
            let (c, _c_rx) = session(&hub, "c");
            for other in &others {
                join(&hub, &c, other);
            }
            let _ = done_tx.send(());
        }
    });
    let other_joined = done_rx.recv_timeout(Duration::from_secs(5)).is_ok();
    drop(held);
    waiting.join().unwrap();
    assert!(
        other_joined,
        "joins to other rooms waited for the busy room"
    );
}
