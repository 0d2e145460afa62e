//! The hub: registry of sessions, rooms and users; join, leave, publish, send and presence.
//!
//! Rooms live in a sharded map; each room has its own lock, held only while a sequence number
//! is assigned and the already-encoded frame is queued to every member (never across an
//! await). There is no global lock on the publish path.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use dashmap::DashMap;
use indexmap::IndexMap;

use crate::{
    backplane::Backplane,
    policy::RoomPolicies,
    protocol::{
        CloseReason, MemberInfo, MessageFrame, Payload, RoomName, ServerFrame, DIRECT, MESSAGE,
    },
    session::{Outbound, SessionHandle, SessionId},
};

/// Settings of a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's id, reported in `welcome` and the HTTP API.
    pub node_id: String,
    /// Room policies, first match wins.
    pub rooms: RoomPolicies,
}

/// What a successful join reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    /// The room's latest sequence number.
    pub seq: u64,
    /// The epoch the sequence belongs to.
    pub epoch: Arc<str>,
    /// Sessions in the room, this one included.
    pub members: usize,
}

struct RoomState {
    seq: u64,
    epoch: Arc<str>,
    presence_events: bool,
    members: IndexMap<SessionId, SessionHandle>,
    /// Sessions per user in this room, for user-level presence events.
    users: HashMap<Arc<str>, u32>,
}

struct Room(Mutex<RoomState>);

impl Room {
    fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The transport-neutral hub shared by every adapter on this node.
pub struct Hub {
    node: Arc<str>,
    policies: RoomPolicies,
    rooms: DashMap<RoomName, Arc<Room>>,
    users: DashMap<Arc<str>, Vec<SessionHandle>>,
    sessions: DashMap<SessionId, SessionHandle>,
    backplane: Arc<dyn Backplane>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node", &self.node)
            .field("rooms", &self.rooms.len())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Hub {
    /// A hub with this configuration and backplane.
    pub fn new(config: HubConfig, backplane: Arc<dyn Backplane>) -> Arc<Self> {
        Arc::new(Self {
            node: config.node_id.into(),
            policies: config.rooms,
            rooms: DashMap::new(),
            users: DashMap::new(),
            sessions: DashMap::new(),
            backplane,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// The backplane in use.
    pub fn backplane(&self) -> &dyn Backplane {
        &*self.backplane
    }

    /// Number of sessions open on this node (pending ones included).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of rooms with members on this node.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Records a newly opened session (authenticated or not).
    pub fn open_session(&self, handle: &SessionHandle) {
        self.sessions.insert(handle.id(), handle.clone());
    }

    /// Makes an authenticated session reachable by its user id.
    pub fn register_user(&self, handle: &SessionHandle) {
        if let Some(user) = handle.user() {
            self.users
                .entry(user.clone())
                .or_default()
                .push(handle.clone());
        }
    }

    /// Forgets a session that ended. The caller has left its rooms.
    pub fn close_session(&self, handle: &SessionHandle) {
        self.sessions.remove(&handle.id());
        if let Some(user) = handle.user() {
            self.users.remove_if_mut(user, |_, sessions| {
                sessions.retain(|s| !s.same_session(handle));
                sessions.is_empty()
            });
        }
    }

    /// Adds the session to `room` (idempotent) and emits a presence `join` to the other
    /// members when this is the user's first session there.
    pub fn join(&self, handle: &SessionHandle, room: &RoomName) -> JoinOutcome {
        let user = handle.user().cloned().unwrap_or_else(|| "".into());
        // The shard lock (the entry guard) is held until the member is in the room, so a
        // concurrent last `leave` cannot remove the room in between (lock order: shard, then
        // room, as in `leave`).
        let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            let policy = self.policies.for_room(room.as_str());
            Arc::new(Room(Mutex::new(RoomState {
                seq: 0,
                epoch: new_epoch(),
                presence_events: policy.presence_events,
                members: IndexMap::new(),
                users: HashMap::new(),
            })))
        });
        let room_ref = entry.value().clone();
        let mut state = room_ref.lock();
        let added = state.members.insert(handle.id(), handle.clone()).is_none();
        drop(entry);
        if added {
            let count = state.users.entry(user.clone()).or_insert(0);
            *count += 1;
            if *count == 1 && state.presence_events {
                let frame = presence_frame(room, "join", &user);
                for member in state.members.values() {
                    if member.user() != Some(&user) {
                        member.send(frame.clone());
                    }
                }
            }
        }
        JoinOutcome {
            seq: state.seq,
            epoch: state.epoch.clone(),
            members: state.members.len(),
        }
    }

    /// Removes the session from `room`; returns whether it was a member. Emits a presence
    /// `leave` when this was the user's last session there; an empty room is dropped.
    pub fn leave(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.clone()) else {
            return false;
        };
        let now_empty = {
            let mut state = room_ref.lock();
            if state.members.swap_remove(&handle.id()).is_none() {
                return false;
            }
            let user = handle.user().cloned().unwrap_or_else(|| "".into());
            let last = match state.users.get_mut(&user) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                _ => {
                    state.users.remove(&user);
                    true
                }
            };
            if last && state.presence_events {
                let frame = presence_frame(room, "leave", &user);
                for member in state.members.values() {
                    member.send(frame.clone());
                }
            }
            state.members.is_empty()
        };
        if now_empty {
            self.rooms
                .remove_if(room, |_, r| r.lock().members.is_empty());
        }
        true
    }

    /// Publishes `data` to every member of `room` but `exclude`, encoding it once. Returns
    /// the assigned sequence number (`None` for volatile messages).
    pub fn publish(
        &self,
        room: &RoomName,
        from: Option<&str>,
        data: &Payload,
        volatile: bool,
        exclude: Option<SessionId>,
    ) -> Option<u64> {
        let encode = |seq: Option<u64>| {
            MessageFrame {
                kind: MESSAGE,
                room: Some(room),
                from,
                seq,
                volatile,
            }
            .encode(data)
        };
        let room_ref = self.rooms.get(room).map(|r| r.clone());
        let (seq, frame) = match room_ref {
            // Nobody is here and nothing is kept: the message reaches no one on this node.
            None => {
                let seq = (!volatile).then_some(1);
                (seq, encode(seq))
            }
            Some(room_ref) => {
                let mut state = room_ref.lock();
                let seq = (!volatile).then(|| {
                    state.seq += 1;
                    state.seq
                });
                let frame = encode(seq);
                for (id, member) in &state.members {
                    if Some(*id) != exclude {
                        member.send(frame.clone());
                    }
                }
                (seq, frame)
            }
        };
        self.backplane.room_published(room, &frame);
        seq
    }

    /// Delivers `data` to every session of `user`; returns whether any session got it.
    pub fn send_to_user(&self, user: &str, from: Option<&str>, data: &Payload) -> bool {
        let frame = MessageFrame {
            kind: DIRECT,
            room: None,
            from,
            seq: None,
            volatile: false,
        }
        .encode(data);
        let mut delivered = false;
        if let Some(sessions) = self.users.get(user) {
            for s in sessions.iter() {
                delivered |= s.send(frame.clone()) == crate::session::Delivery::Queued;
            }
        }
        let remote = self.backplane.user_sent(user, &frame);
        delivered || remote
    }

    /// The members of `room` on this node.
    pub fn members(&self, room: &RoomName) -> Vec<MemberInfo> {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.clone()) else {
            return Vec::new();
        };
        let state = room_ref.lock();
        state
            .members
            .values()
            .map(|s| MemberInfo {
                user: s.user().map(|u| u.to_string()).unwrap_or_default(),
                session: s.id_str().to_owned(),
                transport: s.transport().as_str().to_owned(),
                node: Some(self.node.to_string()),
            })
            .collect()
    }

    /// Closes every session of `user` on this node; returns how many.
    pub fn disconnect_user(&self, user: &str, reason: CloseReason) -> usize {
        let sessions = self.users.get(user).map(|s| s.clone()).unwrap_or_default();
        for s in &sessions {
            s.close(reason.clone());
        }
        sessions.len()
    }

    /// Offers each session the frame `last_frame` makes for it (a full queue skips it: the
    /// close must not turn into a 4008), then closes every session on this node.
    pub fn close_all(&self, last_frame: impl Fn() -> Option<Outbound>, reason: CloseReason) {
        let sessions: Vec<SessionHandle> =
            self.sessions.iter().map(|e| e.value().clone()).collect();
        for s in sessions {
            if let Some(f) = last_frame() {
                s.offer(f);
            }
            s.close(reason.clone());
        }
    }
}

fn presence_frame(room: &RoomName, event: &str, user: &str) -> Outbound {
    ServerFrame::Presence {
        room: room.as_str(),
        event,
        user,
    }
    .to_outbound()
}

fn new_epoch() -> Arc<str> {
    format!("{:016x}", rand::random::<u64>()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backplane::LocalBackplane,
        session::{Batch, OutboxReceiver, TransportKind},
    };
    use bytes::Bytes;
    use serde_json::{json, Value};

    fn hub() -> Arc<Hub> {
        Hub::new(
            HubConfig {
                node_id: "n1".into(),
                rooms: RoomPolicies::default(),
            },
            Arc::new(LocalBackplane),
        )
    }

    fn session(hub: &Hub, user: &str) -> (SessionHandle, OutboxReceiver) {
        let (h, rx) = SessionHandle::new(TransportKind::WebSocket, "/chat".into(), 64);
        h.set_user(user.into());
        hub.open_session(&h);
        hub.register_user(&h);
        (h, rx)
    }

    fn drain(rx: &OutboxReceiver) -> Vec<Value> {
        let mut out = Vec::new();
        // Everything is queued synchronously, so one poll without waiting suffices.
        let ready = {
            let mut fut = std::pin::pin!(rx.recv_batch(&mut out, 1000));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            matches!(
                fut.as_mut().poll(&mut cx),
                std::task::Poll::Ready(Batch::Frames)
            )
        };
        if !ready {
            return Vec::new();
        }
        out.into_iter()
            .map(|o| match o {
                Outbound::Text(b) | Outbound::Volatile(b) => serde_json::from_slice(&b).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    use std::future::Future;

    fn json_data(s: &'static str) -> Payload {
        Payload::Json(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn publish_reaches_members_in_sequence_and_respects_exclude() {
        let hub = hub();
        let room = RoomName::new("r").unwrap();
        let (a, arx) = session(&hub, "alice");
        let (b, brx) = session(&hub, "bob");
        hub.join(&a, &room);
        let outcome = hub.join(&b, &room);
        assert_eq!(outcome.members, 2);
        assert_eq!(
            drain(&arx),
            vec![json!({"type":"presence","room":"r","event":"join","user":"bob"})]
        );
        assert_eq!(
            hub.publish(&room, Some("alice"), &json_data("1"), false, Some(a.id())),
            Some(1)
        );
        assert_eq!(
            hub.publish(&room, Some("alice"), &json_data("2"), false, None),
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
        hub.join(&watcher, &room);
        let (t1, _r1) = session(&hub, "u");
        let (t2, _r2) = session(&hub, "u");
        hub.join(&t1, &room);
        hub.join(&t2, &room);
        assert_eq!(drain(&wrx).len(), 1, "second tab does not re-announce");
        assert!(hub.leave(&t1, &room));
        assert!(drain(&wrx).is_empty());
        assert!(hub.leave(&t2, &room));
        assert_eq!(
            drain(&wrx),
            vec![json!({"type":"presence","room":"r","event":"leave","user":"u"})]
        );
        assert!(!hub.leave(&t2, &room));
        assert_eq!(hub.members(&room).len(), 1);
        hub.leave(&watcher, &room);
        assert_eq!(hub.room_count(), 0, "empty rooms are dropped");
    }

    #[test]
    fn direct_send_reaches_every_session_of_the_user_only() {
        let hub = hub();
        let (_a1, a1rx) = session(&hub, "alice");
        let (_a2, a2rx) = session(&hub, "alice");
        let (_b, brx) = session(&hub, "bob");
        assert!(hub.send_to_user("alice", Some("bob"), &json_data("\"hi\"")));
        assert!(!hub.send_to_user("nobody", None, &json_data("1")));
        let expected = vec![json!({"type":"direct","from":"bob","data":"hi"})];
        assert_eq!(drain(&a1rx), expected);
        assert_eq!(drain(&a2rx), expected);
        assert!(drain(&brx).is_empty());
    }

    #[test]
    fn rejoining_after_the_room_emptied_starts_a_new_epoch() {
        let hub = hub();
        let room = RoomName::new("r").unwrap();
        let (a, _rx) = session(&hub, "a");
        let first = hub.join(&a, &room);
        hub.publish(&room, None, &json_data("1"), false, None);
        assert_eq!(hub.join(&a, &room).seq, 1, "join is idempotent");
        hub.leave(&a, &room);
        let second = hub.join(&a, &room);
        assert_eq!(second.seq, 0);
        assert_ne!(first.epoch, second.epoch);
    }
}
