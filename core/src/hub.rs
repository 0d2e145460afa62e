//! The hub: the registry of rooms, sessions and users, with one verb per operation.
//!
//! Rooms live in a sharded map (module `rooms`); each room has its own lock, held only while a
//! frame is ordered and queued to the members (never across an await); there is no global
//! lock on the publish path.
//!
//! The mode is chosen once, in [`Hub::new`]: on a single node the hub orders each room
//! itself ([`Local`](crate::room::Local): sequence, history, replay); in a cluster the
//! backplane orders rooms and the hub follows ([`Follower`](crate::room::Follower)),
//! handed what the cluster delivers through [`deliver`](Hub::deliver),
//! [`deliver_user`](Hub::deliver_user) and [`catch_up`](Hub::catch_up). The verbs that may
//! need the cluster (`publish`, `send_to_user`, `members`, `presence`, `disconnect_user`)
//! take a [`Completion`], which a single node calls at once.

mod cluster;
mod config;
mod ids;
mod rooms;
mod single;
mod stats;

use std::{sync::Arc, time::Instant};

use dashmap::DashMap;
use rand::rngs::StdRng;

pub use crate::room::{Delivery, JoinOutcome, JoinReply, Publish, Since, UNKNOWN_EPOCH};
pub use config::{HubConfig, RoomRefusal, DEFAULT_ROOMS_PER_USER_PER_SEC, DEFAULT_ROOM_BUDGET};
pub use stats::HubStats;

use crate::{
    backplane::{Backplane, Cluster, ClusterPublish, ClusterUnavailable, Completion, RoomView},
    history::HistoryBudget,
    limits::TokenBucket,
    presence::{ListingResult, Lookup},
    protocol::{CloseReason, MemberInfo, Payload, RoomName},
    room::{frames::direct_frame, Fanout, JoinRequest, PendingJoin},
    session::{Outbound, SessionHandle, SessionId},
};
use cluster::ClusterNode;
use single::{Published, SingleNode};

/// What the cluster hands this node for the sessions of one user here.
#[derive(Debug, Clone)]
pub enum UserDelivery<'a> {
    /// A direct message.
    Direct {
        /// The sender's user id (`None` for the HTTP API).
        from: Option<&'a str>,
        /// The payload.
        data: &'a Payload,
    },
    /// Close every session of the user here with this reason.
    Disconnect(CloseReason),
}

/// How this hub orders rooms, chosen once when it is built.
enum Mode {
    /// A single node: the hub orders each room and keeps its history.
    Single(SingleNode),
    /// A cluster: the backplane orders rooms and the hub follows.
    Cluster(ClusterNode),
}

/// The transport-neutral hub shared by every adapter on this node.
pub struct Hub {
    node: Arc<str>,
    mode: Mode,
    max_presence_members: usize,
    rooms_per_user_per_sec: u32,
    /// Per user: the new rooms they may still bring into existence.
    room_creators: DashMap<Arc<str>, TokenBucket>,
    users: DashMap<Arc<str>, Vec<SessionHandle>>,
    sessions: DashMap<SessionId, SessionHandle>,
    backplane: Arc<dyn Backplane>,
    /// What the hub has done, for metrics.
    stats: HubStats,
    /// Where session ids, epochs and join tokens come from.
    ids: ids::Ids,
    /// This hub, for completions that come back later.
    me: std::sync::Weak<Hub>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node", &self.node)
            .field("rooms", &self.room_count())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Hub {
    /// A hub with this configuration and backplane, drawing session ids and room epochs
    /// from `rng` (seeded from the OS in production, from a constant in tests). A
    /// backplane that is a [`Cluster`] makes it a cluster node for good.
    pub fn new(config: HubConfig, backplane: Arc<dyn Backplane>, rng: StdRng) -> Arc<Self> {
        let mode = match backplane.cluster() {
            Some(_) => Mode::Cluster(ClusterNode::new(config.rooms)),
            None => Mode::Single(SingleNode::new(
                config.rooms,
                HistoryBudget::new(config.room_budget),
            )),
        };
        Arc::new_cyclic(|me| Self {
            node: config.node_id.into(),
            mode,
            max_presence_members: config.max_presence_members,
            rooms_per_user_per_sec: config.rooms_per_user_per_sec,
            room_creators: DashMap::new(),
            users: DashMap::new(),
            sessions: DashMap::new(),
            backplane,
            stats: HubStats::default(),
            ids: ids::Ids::new(rng),
            me: me.clone(),
        })
    }

    /// The cluster of a hub in cluster mode.
    fn cluster(&self) -> &dyn Cluster {
        self.backplane
            .cluster()
            .expect("a hub in cluster mode has a cluster backplane")
    }

    /// A fresh session id for a session about to open.
    pub fn new_session_id(&self) -> SessionId {
        self.ids.session()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// The backplane in use.
    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// Whether the session is in `room` (a member, or joining).
    pub fn is_member(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        match &self.mode {
            Mode::Single(single) => single.rooms.is_member(room, handle.id()),
            Mode::Cluster(cluster) => cluster.rooms.is_member(room, handle.id()),
        }
    }

    /// What the hub has done so far.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Number of rooms on this node: those with members, and those kept for their history.
    pub fn room_count(&self) -> usize {
        match &self.mode {
            Mode::Single(single) => single.rooms.len(),
            Mode::Cluster(cluster) => cluster.rooms.len(),
        }
    }

    /// Number of sessions open on this node (pending ones included).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Records a newly opened session (authenticated or not).
    pub fn open_session(&self, handle: &SessionHandle) {
        self.sessions.insert(handle.id(), handle.clone());
    }

    /// Makes an authenticated session reachable by its user id.
    pub fn register_user(&self, handle: &SessionHandle) {
        if let Some(user) = handle.user() {
            let mut sessions = self.users.entry(user.clone()).or_default();
            sessions.push(handle.clone());
            if let (1, Mode::Cluster(_)) = (sessions.len(), &self.mode) {
                self.cluster().open_user(user);
            }
        }
    }

    /// Forgets a session that ended. The caller has left its rooms.
    pub fn close_session(&self, handle: &SessionHandle) {
        self.sessions.remove(&handle.id());
        if let Some(user) = handle.user() {
            self.users.remove_if_mut(user, |_, sessions| {
                sessions.retain(|s| !s.same_session(handle));
                let gone = sessions.is_empty();
                if let (true, Mode::Cluster(_)) = (gone, &self.mode) {
                    // Queued while the entry is held, before any later `open_user`.
                    self.cluster().close_user(user);
                }
                gone
            });
            if !self.users.contains_key(user) {
                self.room_creators.remove(user);
            }
        }
    }

    /// Whether `user` (`None`: the HTTP API) may bring `room` into existence at `now`, if it
    /// does not exist on this node: within the user's rate of new rooms, and, for a room
    /// that would exist only for its history (`for_history`, single node), within the
    /// room budget.
    fn admit_new_room(
        &self,
        user: Option<&Arc<str>>,
        room: &RoomName,
        for_history: bool,
        now: Instant,
    ) -> Result<(), RoomRefusal> {
        let fits = match &self.mode {
            Mode::Single(single) if single.rooms.contains(room) => return Ok(()),
            Mode::Cluster(cluster) if cluster.rooms.contains(room) => return Ok(()),
            Mode::Single(single) => single.fits_a_room(),
            Mode::Cluster(_) => true,
        };
        if for_history && !fits {
            return Err(RoomRefusal::BudgetSpent);
        }
        let rate = self.rooms_per_user_per_sec;
        if let (Some(user), true) = (user, rate > 0) {
            let mut bucket = self
                .room_creators
                .entry(user.clone())
                .or_insert_with(|| TokenBucket::new(rate, rate.saturating_mul(2), now));
            if !bucket.try_take(now) {
                return Err(RoomRefusal::TooManyNewRooms(rate));
            }
        }
        Ok(())
    }

    /// Adds the session to `room` (idempotent) and announces the user's first session there
    /// to the other members. Under the room's lock, queues `reply` (made from the outcome)
    /// and then, with `since`, the missed messages: after them come live messages only, so
    /// none is lost or doubled at the seam (see [`RoomState::join`]).
    ///
    /// In cluster mode the member waits (its live frames are held back) until the cluster
    /// has made this node hear the room and reported it; then the reply, the missed
    /// messages and the held frames newer than them are queued, and `Ok(None)` is returned
    /// now.
    ///
    /// A join that would bring the room into existence counts against the user's rate of
    /// new rooms; refused, nothing is queued and `reply` is not called.
    ///
    /// [`RoomState::join`]: crate::room::RoomState::join
    pub fn join(
        &self,
        handle: &SessionHandle,
        room: &RoomName,
        since: Option<Since<'_>>,
        now: Instant,
        reply: JoinReply,
    ) -> Result<Option<JoinOutcome>, RoomRefusal> {
        self.admit_new_room(handle.user(), room, false, now)?;
        let request = JoinRequest {
            handle,
            room,
            since,
            reply,
        };
        match &self.mode {
            Mode::Single(single) => Ok(Some(single.join(request, now, &self.ids))),
            Mode::Cluster(cluster) => {
                let Some(join) = cluster.enter(request, &self.ids, self.cluster(), &self.node)
                else {
                    return Ok(None);
                };
                // One recovery at a time, and only with room in the queue: the store is not
                // read for a replay that could not be taken.
                let since = since
                    .filter(|_| handle.begin_recovery())
                    .map(|s| (s.seq, s.epoch.to_owned()));
                self.open_room(join, since);
                Ok(None)
            }
        }
    }

    /// Cluster mode: asks the cluster to make this node hear the room of `join` and report
    /// it (with the messages missed since `since`); the join then completes.
    fn open_room(&self, join: PendingJoin, since: Option<(u64, String)>) {
        let reserved = since.is_some();
        let (me, room, member) = (self.me.clone(), join.room.clone(), join.handle.clone());
        self.cluster().open_room(
            &room,
            since,
            Box::new(move |view| {
                if let Some(hub) = me.upgrade() {
                    hub.finish_join(join, view);
                }
                if reserved {
                    // Queued the replay (which released it), or did not.
                    member.end_recovery();
                }
            }),
        );
    }

    /// Cluster mode: the cluster reported the room of a pending join (or failed to: the
    /// member then leaves the room and gets the failure).
    fn finish_join(&self, join: PendingJoin, view: Result<RoomView, ClusterUnavailable>) {
        let Mode::Cluster(cluster) = &self.mode else {
            return;
        };
        if let Some((join, e)) = cluster.finish_join(join, view) {
            self.leave(&join.handle, &join.room);
            join.handle.send((join.reply)(Err(&e)));
        }
    }

    /// Removes the session from `room`; returns whether it was a member. Announces the
    /// user's departure when this was their last session there; a room with no member and
    /// nothing kept for later is dropped.
    pub fn leave(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        match &self.mode {
            Mode::Single(single) => single.leave(handle, room),
            Mode::Cluster(cluster) => cluster.leave(handle, room, self.cluster(), &self.node),
        }
    }

    /// Single node: drops expired history and forgets rooms that have had neither members
    /// nor history for a history lifetime (their sequence restarts with a new epoch). Call
    /// periodically; a room is forgotten within one call's interval of that moment.
    pub fn expire_history(&self, now: Instant) {
        if let Mode::Single(single) = &self.mode {
            single.expire(now);
        }
    }

    /// Publishes a room message: on a single node, orders it (sequence number, history) and
    /// queues it to every member but `exclude`, encoded once, under the room's lock; in
    /// cluster mode through the cluster, which orders it and delivers it to every node. Then
    /// `done` gets the sequence number (`None` when volatile) or why the cluster could not
    /// take it.
    ///
    /// On a single node, a publish that would bring a room into existence (a room that
    /// keeps history, for those who recover) counts against the user's rate of new rooms
    /// and needs room in the budget. Refused, `done` is not called.
    pub fn publish(
        &self,
        message: Publish<'_>,
        now: Instant,
        done: Completion<Result<Option<u64>, ClusterUnavailable>>,
    ) -> Result<(), RoomRefusal> {
        let single = match &self.mode {
            Mode::Single(single) => single,
            // The store keeps rooms (and bounds them: its room budget).
            Mode::Cluster(_) => {
                let message = ClusterPublish {
                    room: message.room.clone(),
                    from: message.from.cloned(),
                    data: message.data.clone(),
                    volatile: message.volatile,
                    origin: message.exclude,
                };
                self.cluster().publish(message, done);
                return Ok(());
            }
        };
        let mut published = single.publish(&message, now, &self.ids, false);
        if let Published::NewRoom = published {
            self.admit_new_room(message.from, message.room, true, now)?;
            published = single.publish(&message, now, &self.ids, true);
        }
        if let Published::Done(seq, counted) = published {
            self.stats.add_deliveries(counted);
            done(Ok(seq));
        }
        Ok(())
    }

    /// Sends a direct message to every session of `user`: on this node, or in cluster mode
    /// on every node; `done` gets whether any session got it.
    pub fn send_to_user(
        &self,
        user: &str,
        from: Option<&Arc<str>>,
        data: &Payload,
        done: Completion<Result<bool, ClusterUnavailable>>,
    ) {
        match &self.mode {
            Mode::Single(_) => {
                let frame = direct_frame(from.map(|f| &**f), data);
                done(Ok(self.send_here(user, frame)))
            }
            Mode::Cluster(_) => self
                .cluster()
                .send_user(user, from.cloned(), data.clone(), done),
        }
    }

    /// The members of `room` on this node or, in cluster mode, on every node.
    pub fn members(
        &self,
        room: &RoomName,
        done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    ) {
        match &self.mode {
            Mode::Single(single) => done(Ok(single.members(room, &self.node))),
            Mode::Cluster(_) => self.cluster().members(room, done),
        }
    }

    /// The presence listing of `room` (at most `max_presence_members` named): built once
    /// per change of the room's members on a single node; in cluster mode, one lookup
    /// serves every session that asks while it runs and for [`LISTING_TTL`] after.
    ///
    /// [`LISTING_TTL`]: crate::presence::LISTING_TTL
    pub fn presence(&self, room: &RoomName, now: Instant, done: Completion<ListingResult>) {
        let max = self.max_presence_members;
        let cluster = match &self.mode {
            Mode::Single(single) => return done(Ok(single.listing(room, max, &self.node))),
            Mode::Cluster(cluster) => cluster,
        };
        if let Lookup::Start = cluster.listings.lookup(room, now, done) {
            let (me, room2) = (self.me.clone(), room.clone());
            self.cluster().members(
                room,
                Box::new(move |members| {
                    if let Some(Mode::Cluster(cluster)) = me.upgrade().as_ref().map(|h| &h.mode) {
                        cluster.listed(&room2, now, max, members);
                    }
                }),
            );
        }
    }

    /// Closes every session of `user`: on this node, or in cluster mode on every node (the
    /// count is then this node's; the others close theirs when the request reaches them).
    /// `done` gets how many sessions were closed.
    pub fn disconnect_user(
        &self,
        user: &str,
        reason: CloseReason,
        done: Completion<Result<usize, ClusterUnavailable>>,
    ) {
        match &self.mode {
            Mode::Single(_) => done(Ok(self.close_here(user, reason))),
            Mode::Cluster(_) => {
                let local = self.users.get(user).map_or(0, |s| s.len());
                let done = Box::new(move |r: Result<(), _>| done(r.map(|()| local)));
                self.cluster().disconnect_user(user, reason, done);
            }
        }
    }

    /// Cluster mode: a room event the cluster ordered, for this node's members of `room`
    /// (encoded once; members still joining hold it until their join completes).
    pub fn deliver(&self, room: &RoomName, delivery: Delivery<'_>) {
        if let Mode::Cluster(cluster) = &self.mode {
            self.stats.add_deliveries(cluster.deliver(room, delivery));
        }
    }

    /// Cluster mode: what the cluster hands the sessions of `user` on this node.
    pub fn deliver_user(&self, user: &str, delivery: UserDelivery<'_>) {
        match delivery {
            UserDelivery::Direct { from, data } => {
                self.send_here(user, direct_frame(from, data));
            }
            UserDelivery::Disconnect(reason) => {
                self.close_here(user, reason);
            }
        }
    }

    /// Cluster mode: every room with members on this node whose joins completed, with the
    /// sequence number and epoch it has delivered up to. After this node's subscription
    /// was down (messages published meanwhile never reached it), each is checked against
    /// the cluster with [`catch_up`](Self::catch_up).
    pub fn positions(&self) -> Vec<(RoomName, u64, Arc<str>)> {
        match &self.mode {
            Mode::Single(_) => Vec::new(),
            Mode::Cluster(cluster) => cluster.positions(),
        }
    }

    /// Cluster mode, after this node's subscription was down: `view` is the cluster's view
    /// of `room` from the position [`positions`](Self::positions) gave. What was missed is
    /// delivered, or the members get `resync` (see
    /// [`Follower::catch_up`](crate::room::Follower::catch_up)). Returns the last sequence
    /// number accounted for (channel messages up to it are not delivered again).
    pub fn catch_up(&self, room: &RoomName, from: (u64, &str), view: RoomView) -> u64 {
        let Mode::Cluster(cluster) = &self.mode else {
            return view.seq;
        };
        let (upto, counted) = cluster.catch_up(room, from, &view);
        self.stats.add_deliveries(counted);
        upto
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

    /// Queues `frame` to every session of `user` here; whether any took it.
    fn send_here(&self, user: &str, frame: Outbound) -> bool {
        let mut delivered = false;
        let mut counted = Fanout::default();
        if let Some(sessions) = self.users.get(user) {
            for s in sessions.iter() {
                delivered |= s.send(frame.clone()) == crate::session::Delivery::Queued;
                counted.add(s);
            }
        }
        self.stats.add_deliveries(counted);
        delivered
    }

    /// Closes every session of `user` on this node; returns how many.
    fn close_here(&self, user: &str, reason: CloseReason) -> usize {
        let sessions = self.users.get(user).map(|s| s.clone()).unwrap_or_default();
        for s in &sessions {
            s.close(reason.clone());
        }
        sessions.len()
    }
}

#[cfg(test)]
mod tests {
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

    fn recover(
        hub: &Hub,
        h: &SessionHandle,
        room: &RoomName,
        seq: u64,
        epoch: &str,
    ) -> JoinOutcome {
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
        fn publish(
            &self,
            _: ClusterPublish,
            _: Completion<Result<Option<u64>, ClusterUnavailable>>,
        ) {
        }
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
        fn members(
            &self,
            _: &RoomName,
            done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
        ) {
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
        fn acquire_user(&self, _: &str, _: usize, _: Completion<Result<bool, ClusterUnavailable>>) {
        }
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
        let reply: JoinReply =
            Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
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
        let reply: JoinReply =
            Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
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
        let reply: JoinReply =
            Box::new(|_| Outbound::Text(Bytes::from_static(b"{\"type\":\"ack\"}")));
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
}
