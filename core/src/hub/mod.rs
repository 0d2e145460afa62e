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
    /// A hub with this configuration and backplane, drawing randomness from `rng`.
    ///
    /// Session ids and room epochs come from `rng` (seeded from the OS in production, from
    /// a constant in tests). A backplane that is a [`Cluster`] makes it a cluster node for
    /// good.
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

    /// Whether `user` may bring `room` into existence at `now`, if it is not on this node.
    ///
    /// `user` is `None` for the HTTP API. The room must be within the user's rate of new
    /// rooms, and, for a room that would exist only for its history (`for_history`, single
    /// node), within the room budget.
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

    /// Adds the session to `room` (idempotent) and queues the reply and missed messages.
    ///
    /// It announces the user's first session there to the other members. Under the room's
    /// lock, it queues `reply` (made from the outcome) and then, with `since`, the missed
    /// messages: after them come live messages only, so none is lost or doubled at the seam
    /// (see [`RoomState::join`]).
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

    /// Cluster mode: asks the cluster to make this node hear the room of `join`.
    ///
    /// The cluster then reports the room (with the messages missed since `since`), and the
    /// join completes.
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

    /// Cluster mode: the cluster reported the room of a pending join, or failed to.
    ///
    /// On a failure, the member leaves the room and gets the failure.
    fn finish_join(&self, join: PendingJoin, view: Result<RoomView, ClusterUnavailable>) {
        let Mode::Cluster(cluster) = &self.mode else {
            return;
        };
        if let Some((join, e)) = cluster.finish_join(join, view) {
            self.leave(&join.handle, &join.room);
            join.handle.send((join.reply)(Err(&e)));
        }
    }

    /// Removes the session from `room`; returns whether it was a member.
    ///
    /// Announces the user's departure when this was their last session there; a room with
    /// no member and nothing kept for later is dropped.
    pub fn leave(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        match &self.mode {
            Mode::Single(single) => single.leave(handle, room),
            Mode::Cluster(cluster) => cluster.leave(handle, room, self.cluster(), &self.node),
        }
    }

    /// Single node: drops expired history and forgets idle rooms.
    ///
    /// A room is forgotten once it has had neither members nor history for a history
    /// lifetime (its sequence restarts with a new epoch). Call periodically; a room is
    /// forgotten within one call's interval of that moment.
    pub fn expire_history(&self, now: Instant) {
        if let Mode::Single(single) = &self.mode {
            single.expire(now);
        }
    }

    /// Publishes a room message, then tells `done` how it went.
    ///
    /// On a single node, it orders the message (sequence number, history) and queues it to
    /// every member but `exclude`, encoded once, under the room's lock; in cluster mode it
    /// goes through the cluster, which orders it and delivers it to every node. Then `done`
    /// gets the sequence number (`None` when volatile) or why the cluster could not take
    /// it.
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

    /// Sends a direct message to every session of `user`.
    ///
    /// The sessions are on this node, or in cluster mode on every node; `done` gets whether
    /// any session got it.
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

    /// The presence listing of `room`, with at most `max_presence_members` named.
    ///
    /// On a single node it is built once per change of the room's members; in cluster mode,
    /// one lookup serves every session that asks while it runs and for [`LISTING_TTL`]
    /// after.
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

    /// Closes every session of `user`; `done` gets how many sessions were closed.
    ///
    /// The sessions are on this node, or in cluster mode on every node (the count is then
    /// this node's; the others close theirs when the request reaches them).
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

    /// Cluster mode: a room event the cluster ordered, for this node's members of `room`.
    ///
    /// It is encoded once; members still joining hold it until their join completes.
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

    /// Cluster mode: every room with completed joins on this node, with its position.
    ///
    /// The position is the sequence number and epoch the room has delivered up to. After
    /// this node's subscription was down (messages published meanwhile never reached it),
    /// each is checked against the cluster with [`catch_up`](Self::catch_up).
    pub fn positions(&self) -> Vec<(RoomName, u64, Arc<str>)> {
        match &self.mode {
            Mode::Single(_) => Vec::new(),
            Mode::Cluster(cluster) => cluster.positions(),
        }
    }

    /// Cluster mode: catches `room` up after this node's subscription was down.
    ///
    /// `view` is the cluster's view of `room` from the position
    /// [`positions`](Self::positions) gave. What was missed is delivered, or the members
    /// get `resync` (see [`Follower::catch_up`](crate::room::Follower::catch_up)). Returns
    /// the last sequence number accounted for (channel messages up to it are not delivered
    /// again).
    pub fn catch_up(&self, room: &RoomName, from: (u64, &str), view: RoomView) -> u64 {
        let Mode::Cluster(cluster) = &self.mode else {
            return view.seq;
        };
        let (upto, counted) = cluster.catch_up(room, from, &view);
        self.stats.add_deliveries(counted);
        upto
    }

    /// Offers each session a last frame, then closes every session on this node.
    ///
    /// Each session is offered the frame `last_frame` makes for it; a full queue skips it
    /// (the close must not turn into a 4008).
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
mod tests;
