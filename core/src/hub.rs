//! The hub: registry of sessions, rooms and users; join, leave, publish, send and presence.
//!
//! Rooms live in a sharded map; each room has its own lock, held only while a sequence number
//! is assigned, the already-encoded frame is kept in the room's history and queued to every
//! member (never across an await). There is no global lock on the publish path.
//!
//! A room whose policy keeps history outlives its last member for as long as its history
//! does, with its sequence and epoch; a recovering join replays the missed messages under the
//! same lock that orders publishes, so nothing published meanwhile is lost or doubled.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Instant,
};

use dashmap::DashMap;
use indexmap::IndexMap;
use rand::{rngs::StdRng, RngCore};

use crate::{
    backplane::{
        Backplane, ClusterMessage, ClusterPublish, ClusterUnavailable, Completion, RoomView,
    },
    history::{History, HistoryBudget, Recovery, RoomCharge},
    limits::TokenBucket,
    policy::RoomPolicies,
    presence::{ListingCache, ListingResult, Lookup, PresenceListing},
    protocol::{
        CloseReason, MemberInfo, MessageFrame, MessageKind, Payload, PresenceEvent, ResyncReason,
        RoomName, ServerFrame,
    },
    session::{Outbound, SessionHandle, SessionId, TransportKind},
};

/// Settings of a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's id, reported in `welcome` and the HTTP API.
    pub node_id: String,
    /// Room policies, first match wins.
    pub rooms: RoomPolicies,
    /// Bytes all rooms and their histories may hold together (`room_budget_mb`).
    pub room_budget: usize,
    /// Most members a presence listing names (`max_presence_members`).
    pub max_presence_members: usize,
    /// New rooms one user may bring into existence per second, burst twice as many
    /// (`rooms_per_user_per_sec`); 0: no limit.
    pub rooms_per_user_per_sec: u32,
}

impl HubConfig {
    /// A hub of node `node_id` with these room policies and the documented defaults.
    pub fn new(node_id: impl Into<String>, rooms: RoomPolicies) -> Self {
        Self {
            node_id: node_id.into(),
            rooms,
            room_budget: DEFAULT_ROOM_BUDGET,
            max_presence_members: crate::presence::DEFAULT_MAX_PRESENCE_MEMBERS,
            rooms_per_user_per_sec: DEFAULT_ROOMS_PER_USER_PER_SEC,
        }
    }
}

/// The epoch of a [`RoomView`] the cluster could not read: [`Hub::catch_up`] then knows
/// neither what was missed nor where the room is, and tells the members with the room's
/// next message (`resync` with that message's epoch and the `seq` before it).
pub const UNKNOWN_EPOCH: &str = "";

/// The default [`HubConfig::room_budget`]: 256 MiB.
pub const DEFAULT_ROOM_BUDGET: usize = 256 * 1024 * 1024;

/// The default [`HubConfig::rooms_per_user_per_sec`].
pub const DEFAULT_ROOMS_PER_USER_PER_SEC: u32 = 10;

/// Why the hub refused to bring a new room into existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomRefusal {
    /// The room budget is spent: no new room that would keep history.
    #[error("room budget exhausted: no new rooms with history for now")]
    BudgetSpent,
    /// The user brought too many new rooms into existence lately.
    #[error("too many new rooms: at most {0} per second")]
    TooManyNewRooms(u32),
}

/// A recovery request: the last sequence number a client saw, and its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since<'a> {
    /// The last `seq` received.
    pub seq: u64,
    /// The epoch it belongs to.
    pub epoch: &'a str,
}

/// Builds the reply to a `join` from its outcome (or the cluster's failure); it is queued
/// under the room's lock, before any replayed or live message of the room.
pub type JoinReply = Box<dyn FnOnce(Result<&JoinOutcome, &ClusterUnavailable>) -> Outbound + Send>;

/// What a successful join reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    /// The room's latest sequence number.
    pub seq: u64,
    /// The epoch the sequence belongs to.
    pub epoch: Arc<str>,
    /// Sessions in the room, this one included.
    pub members: usize,
    /// With a recovery request: whether every missed message was replayed.
    pub recovered: Option<bool>,
}

/// Live frames held back for a member whose join waits for the cluster, with their `seq`.
/// Each with the epoch it came in (room messages only).
type HeldFrames = Vec<(Option<u64>, Option<Arc<str>>, Outbound)>;

/// Live frames held for one member whose join waits for the cluster at most; beyond, the
/// member is a slow consumer (4008), as it would be with a full queue.
const MAX_HELD_FRAMES: usize = 1024;

struct RoomState {
    seq: u64,
    epoch: Arc<str>,
    presence_events: bool,
    /// `None` when the room's policy keeps no history.
    history: Option<History>,
    members: IndexMap<SessionId, SessionHandle>,
    /// Sessions per user in this room, for user-level presence events.
    users: HashMap<Arc<str>, u32>,
    /// When a sweep first found the room with neither members nor history.
    idle_since: Option<Instant>,
    /// Set under the lock when the room is removed from the map: a publish that looked it
    /// up just before must use the room that replaces it.
    removed: bool,
    /// Cluster mode: members whose join waits for the cluster, with the live frames that
    /// arrived for them meanwhile (and their sequence numbers), under the token of that
    /// join (a later join of the same session must not take an earlier answer).
    pending: HashMap<SessionId, (u64, HeldFrames)>,
    /// Cluster mode: members that joined at this `seq` and have not had a newer message
    /// yet. Messages the channel still carries from before the join were replayed or
    /// reported already: they are not delivered to them again.
    floors: HashMap<SessionId, u64>,
    /// The presence listing of the members, until they change.
    listing: Option<Arc<PresenceListing>>,
    /// The room's share of the room budget, when it keeps history.
    _charge: Option<RoomCharge>,
}

impl RoomState {
    /// Whether a room without history can be forgotten as its last member leaves.
    fn is_empty_without_history(&self) -> bool {
        self.members.is_empty() && self.history.is_none()
    }

    /// Whether a room can be forgotten at `now`: no member and nothing to recover, and for a
    /// room that keeps history, so for a whole history lifetime (a client that saw its
    /// sequence and epoch may still come back to it, even with nothing missed).
    fn is_expired(&mut self, now: Instant) -> bool {
        if !self.members.is_empty() {
            self.idle_since = None;
            return false;
        }
        let Some(history) = self.history.as_mut() else {
            return true;
        };
        history.prune(now);
        if !history.is_empty() {
            self.idle_since = None;
            return false;
        }
        let since = *self.idle_since.get_or_insert(now);
        now.saturating_duration_since(since) >= history.ttl()
    }
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
    budget: Arc<HistoryBudget>,
    max_presence_members: usize,
    rooms_per_user_per_sec: u32,
    /// Per user: the new rooms they may still bring into existence.
    room_creators: DashMap<Arc<str>, TokenBucket>,
    /// Cluster mode: presence listings looked up or being looked up.
    listings: ListingCache,
    users: DashMap<Arc<str>, Vec<SessionHandle>>,
    sessions: DashMap<SessionId, SessionHandle>,
    backplane: Arc<dyn Backplane>,
    /// What the hub has done, for metrics.
    stats: HubStats,
    /// Where session ids and epochs come from (the owner seeds it).
    rng: Mutex<StdRng>,
    /// Tells a member's successive joins of a room apart.
    join_tokens: AtomicU64,
    /// This hub, for completions that come back later.
    me: Weak<Hub>,
}

/// Running totals of the hub's work, read by the gateway's metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages queued for members and direct recipients, by transport (WebSocket,
    /// WebTransport).
    deliveries: [AtomicU64; 2],
    /// Joins with `since` that recovered exactly, and that did not.
    recovered: AtomicU64,
    not_recovered: AtomicU64,
}

impl HubStats {
    /// Adds the deliveries of one fan-out, counted per transport by [`transport_index`].
    fn add_deliveries(&self, counted: [u64; 2]) {
        if !cfg!(feature = "stats") {
            return;
        }
        for (total, n) in self.deliveries.iter().zip(counted) {
            if n > 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Counts the outcome of a join with `since`.
    pub fn count_recovery(&self, recovered: bool) {
        if !cfg!(feature = "stats") {
            return;
        }
        let counter = if recovered {
            &self.recovered
        } else {
            &self.not_recovered
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages queued so far for sessions on `transport`.
    pub fn deliveries(&self, transport: TransportKind) -> u64 {
        self.deliveries[transport_index(transport)].load(Ordering::Relaxed)
    }

    /// Joins with `since` so far: (recovered, not recovered).
    pub fn recoveries(&self) -> (u64, u64) {
        (
            self.recovered.load(Ordering::Relaxed),
            self.not_recovered.load(Ordering::Relaxed),
        )
    }
}

/// The slot of `transport` in per-transport counts.
fn transport_index(transport: TransportKind) -> usize {
    match transport {
        TransportKind::WebSocket => 0,
        TransportKind::WebTransport => 1,
    }
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
    /// A hub with this configuration and backplane, drawing session ids and room epochs
    /// from `rng` (seeded from the OS in production, from a constant in tests).
    pub fn new(config: HubConfig, backplane: Arc<dyn Backplane>, rng: StdRng) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            node: config.node_id.into(),
            policies: config.rooms,
            rooms: DashMap::new(),
            budget: HistoryBudget::new(config.room_budget),
            max_presence_members: config.max_presence_members,
            rooms_per_user_per_sec: config.rooms_per_user_per_sec,
            room_creators: DashMap::new(),
            listings: ListingCache::default(),
            users: DashMap::new(),
            sessions: DashMap::new(),
            backplane,
            stats: HubStats::default(),
            rng: Mutex::new(rng),
            join_tokens: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// A fresh session id for a session about to open.
    pub fn new_session_id(&self) -> SessionId {
        SessionId(self.random_u64())
    }

    fn random_u64(&self) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_u64()
    }

    /// A new room epoch: the sequence restarts, clients must not take it for the old one.
    fn new_epoch(&self) -> Arc<str> {
        format!("{:016x}", self.random_u64()).into()
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
        self.rooms
            .get(room)
            .map(|r| r.value().clone())
            .is_some_and(|r| r.lock().members.contains_key(&handle.id()))
    }

    /// What the hub has done so far.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Number of rooms on this node: those with members, and those kept for their history.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
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
            if sessions.len() == 1 {
                if let Some(cluster) = self.backplane.cluster() {
                    cluster.open_user(user);
                }
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
                if let (true, Some(cluster)) = (gone, self.backplane.cluster()) {
                    // Queued while the entry is held, before any later `open_user`.
                    cluster.close_user(user);
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
    /// that would exist only for its history (`for_history`), within the room budget.
    fn admit_new_room(
        &self,
        user: Option<&Arc<str>>,
        room: &RoomName,
        for_history: bool,
        now: Instant,
    ) -> Result<(), RoomRefusal> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        if for_history && !self.budget.fits_a_room() {
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

    /// The state of `room`, created with a new epoch if it does not exist. The shard lock
    /// is held until the caller has locked the room (lock order: shard, then room), so a
    /// concurrent removal of an idle room cannot slip in between.
    fn room_entry(&self, room: &RoomName) -> dashmap::mapref::one::RefMut<'_, RoomName, Arc<Room>> {
        self.rooms.entry(room.clone()).or_insert_with(|| {
            let policy = self.policies.for_room(room.as_str());
            // Beyond the budget a room (created by a join) keeps no history.
            let keeps_history = policy.history > 0 && self.budget.fits_a_room();
            Arc::new(Room(Mutex::new(RoomState {
                seq: 0,
                epoch: self.new_epoch(),
                presence_events: policy.presence_events,
                history: keeps_history
                    .then(|| History::new(policy.history, policy.history_ttl, self.budget.clone())),
                members: IndexMap::new(),
                users: HashMap::new(),
                idle_since: None,
                removed: false,
                pending: HashMap::new(),
                floors: HashMap::new(),
                listing: None,
                _charge: keeps_history.then(|| self.budget.charge_room()),
            })))
        })
    }

    /// Adds the session to `room` (idempotent) and emits a presence `join` to the other
    /// members when this is the user's first session there. Under the room's lock, queues
    /// `ack` (made from the outcome) and then, with `since`, the missed messages: after them
    /// come live messages only, so none is lost or doubled at the seam.
    ///
    /// In cluster mode the member waits (its live frames are held back) until the cluster
    /// has made this node hear the room and reported it; then the reply, the missed
    /// messages and the held frames newer than them are queued, and `Ok(None)` is returned
    /// now.
    ///
    /// The missed messages are replayed only if they fit the session's queue and no other
    /// replay of the session is still queued; else the reply says `recovered: false`.
    /// A join that would bring the room into existence counts against the user's rate of
    /// new rooms; refused, nothing is queued and `reply` is not called.
    pub fn join(
        &self,
        handle: &SessionHandle,
        room: &RoomName,
        since: Option<Since<'_>>,
        now: Instant,
        reply: JoinReply,
    ) -> Result<Option<JoinOutcome>, RoomRefusal> {
        self.admit_new_room(handle.user(), room, false, now)?;
        let user = handle.user().cloned().unwrap_or_else(|| "".into());
        // The map's shard guard is released before waiting for the room's lock: a fan-out
        // holding this room must not stall every other room of the shard. A removal in
        // between sets `removed` under the room's lock: then join the room replacing it.
        loop {
            let room_ref = self.room_entry(room).value().clone();
            let state = room_ref.lock();
            if state.removed {
                continue;
            }
            return Ok(self.join_locked(room, &room_ref, state, handle, user, since, now, reply));
        }
    }

    /// [`join`](Self::join) with the room's lock held.
    #[allow(clippy::too_many_arguments)]
    fn join_locked(
        &self,
        room: &RoomName,
        room_ref: &Arc<Room>,
        mut state: MutexGuard<'_, RoomState>,
        handle: &SessionHandle,
        user: Arc<str>,
        since: Option<Since<'_>>,
        now: Instant,
        reply: JoinReply,
    ) -> Option<JoinOutcome> {
        let added = state.members.insert(handle.id(), handle.clone()).is_none();
        state.idle_since = None;
        if added {
            state.listing = None;
        }
        let cluster = self.backplane.cluster();
        let token = self.join_tokens.fetch_add(1, Ordering::Relaxed);
        if added && cluster.is_some() {
            state.pending.insert(handle.id(), (token, Vec::new()));
        }
        if added {
            let count = state.users.entry(user.clone()).or_insert(0);
            *count += 1;
            if let Some(cluster) = cluster {
                // Presence is cluster-wide: the cluster lists the member and announces it.
                cluster.enter(room, self.member_info(handle), state.presence_events);
            } else if *count == 1 && state.presence_events {
                let frame = presence_frame(room, PresenceEvent::Join, &user);
                for member in state.members.values() {
                    if member.user() != Some(&user) {
                        member.send(frame.clone());
                    }
                }
            }
        }
        if let Some(cluster) = cluster {
            drop(state);
            if added {
                self.listings.invalidate(room);
                let wants_recovery = since.is_some();
                // One recovery at a time, and only with room in the queue: the store is not
                // read for a replay that could not be taken.
                let since = since
                    .filter(|_| handle.begin_recovery())
                    .map(|s| (s.seq, s.epoch.to_owned()));
                let reserved = since.is_some();
                let (me, room2, member) = (self.me.clone(), room.clone(), handle.clone());
                cluster.open_room(
                    room,
                    since,
                    Box::new(move |view| {
                        if let Some(hub) = me.upgrade() {
                            hub.finish_join(&room2, &member, token, wants_recovery, reply, view);
                        }
                        if reserved {
                            // Queued the replay (which released it), or did not.
                            member.end_recovery();
                        }
                    }),
                );
            } else {
                // Already a member (and live): nothing to replay.
                let state = room_ref.lock();
                let outcome = JoinOutcome {
                    seq: state.seq,
                    epoch: state.epoch.clone(),
                    members: state.members.len(),
                    recovered: since.map(|_| false),
                };
                handle.send(reply(Ok(&outcome)));
            }
            return None;
        }
        let latest = state.seq;
        let epoch = state.epoch.clone();
        if let Some(history) = state.history.as_mut() {
            history.prune(now);
        }
        // A session already in the room got every message live: nothing to replay.
        let replay = match since {
            Some(since) if added && since.epoch == &*epoch => match &state.history {
                Some(history) => history.after(since.seq, latest),
                None if since.seq == latest => Recovery::Complete(Vec::new()),
                None => Recovery::Gap,
            },
            _ => Recovery::Gap,
        };
        let mut outcome = JoinOutcome {
            seq: latest,
            epoch,
            members: state.members.len(),
            recovered: None,
        };
        match (since, replay) {
            (Some(_), Recovery::Complete(frames)) => {
                let (_, replayed) = handle.send_with_replay(&frames, |fits| {
                    reply(Ok(&JoinOutcome {
                        recovered: Some(fits),
                        ..outcome.clone()
                    }))
                });
                outcome.recovered = Some(replayed);
            }
            (since, _) => {
                outcome.recovered = since.map(|_| false);
                handle.send(reply(Ok(&outcome)));
            }
        }
        Some(outcome)
    }

    /// Cluster mode: the cluster reported the room a member joined. Queues the reply, the
    /// missed messages, then the live frames held back that are newer than the report.
    #[allow(clippy::too_many_arguments)]
    fn finish_join(
        &self,
        room: &RoomName,
        handle: &SessionHandle,
        token: u64,
        wants_recovery: bool,
        reply: JoinReply,
        view: Result<RoomView, ClusterUnavailable>,
    ) {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return;
        };
        let mut state = room_ref.lock();
        if state.pending.get(&handle.id()).map(|(t, _)| *t) != Some(token) {
            return; // left meanwhile (and maybe joined again: that join gets its own answer)
        }
        let Some((_, held)) = state.pending.remove(&handle.id()) else {
            return;
        };
        match view {
            Ok(view) => {
                // Members whose joins completed are in the epoch they were told; a view in
                // another one means the room restarted in the cluster meanwhile: their
                // sequence cannot continue, they are told so (`resync`) and stay.
                if *state.epoch != *view.epoch {
                    let others: Vec<SessionHandle> = established(&state)
                        .filter(|m| m.id() != handle.id())
                        .cloned()
                        .collect();
                    resync(&mut state, room, &others, &view.epoch, view.seq);
                }
                // In another epoch the sequence restarted: the view's is the room's.
                state.seq = if *state.epoch == *view.epoch {
                    state.seq.max(view.seq)
                } else {
                    view.seq
                };
                state.epoch = view.epoch.clone();
                let outcome = JoinOutcome {
                    seq: view.seq,
                    epoch: view.epoch.clone(),
                    members: view.members.max(state.members.len()),
                    recovered: None,
                };
                match (wants_recovery, &view.missed) {
                    (true, Some(missed)) => {
                        let frames: Vec<Outbound> =
                            missed.iter().map(|m| self.encode(room, m, false)).collect();
                        handle.send_with_replay(&frames, |fits| {
                            reply(Ok(&JoinOutcome {
                                recovered: Some(fits),
                                ..outcome
                            }))
                        });
                    }
                    (wants_recovery, _) => {
                        handle.send(reply(Ok(&JoinOutcome {
                            recovered: wants_recovery.then_some(false),
                            ..outcome
                        })));
                    }
                }
                let mut newer = false;
                for (seq, epoch, frame) in held {
                    // A message of another epoch than the view's came from before it (the
                    // view moved the member past it) or from a later restart (whose next
                    // message brings the `resync`): not delivered after the ack.
                    if epoch.is_some_and(|e| *e != *view.epoch) {
                        continue;
                    }
                    if seq.is_none_or(|s| s > view.seq) {
                        newer |= seq.is_some();
                        handle.send(frame);
                    }
                }
                if !newer && view.seq > 0 {
                    state.floors.insert(handle.id(), view.seq);
                }
            }
            Err(e) => {
                drop(state);
                self.leave(handle, room);
                handle.send(reply(Err(&e)));
            }
        }
    }

    /// Cluster mode: every room with members on this node whose joins completed, with the
    /// sequence number and epoch it has delivered up to. After this node's subscription
    /// was down (messages published meanwhile never reached it), each is checked against
    /// the cluster with [`catch_up`](Self::catch_up).
    pub fn positions(&self) -> Vec<(RoomName, u64, Arc<str>)> {
        let rooms: Vec<(RoomName, Arc<Room>)> = self
            .rooms
            .iter()
            .map(|r| (r.key().clone(), r.value().clone()))
            .collect();
        rooms
            .into_iter()
            .filter_map(|(name, room)| {
                let state = room.lock();
                // Members still joining learn their position from their join's view.
                let any = established(&state).next().is_some();
                any.then(|| (name, state.seq, state.epoch.clone()))
            })
            .collect()
    }

    /// Cluster mode, after this node's subscription was down: `view` is the cluster's view
    /// of `room` from the position [`positions`](Self::positions) gave. The messages this
    /// node missed are delivered as live ones; when they cannot be (the room is in another
    /// epoch, or its history no longer holds them all) every member here gets `resync`
    /// (reason `continuity`, the room's epoch and latest sequence number) and stays: a
    /// member never silently skips messages. Returns the last sequence number accounted for
    /// (channel messages up to it are not delivered again).
    pub fn catch_up(&self, room: &RoomName, from: (u64, &str), view: RoomView) -> u64 {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return view.seq;
        };
        let (from_seq, from_epoch) = from;
        if *room_ref.lock().epoch != *from_epoch {
            // A join moved the room to another epoch meanwhile (and resynced the members
            // of the old one).
            return view.seq;
        }
        if *view.epoch == *UNKNOWN_EPOCH {
            // Whatever epoch the next message has differs: it brings the `resync`. Nothing
            // on the channel is skipped as accounted for.
            let mut state = room_ref.lock();
            state.epoch = UNKNOWN_EPOCH.into();
            state.floors.clear();
            return 0;
        }
        match view.missed {
            Some(missed) if *view.epoch == *from_epoch => {
                for m in missed
                    .iter()
                    .filter(|m| m.seq.is_some_and(|s| s > from_seq))
                {
                    self.deliver(room, m, false);
                }
            }
            _ => {
                let mut state = room_ref.lock();
                let members: Vec<SessionHandle> = established(&state).cloned().collect();
                resync(&mut state, room, &members, &view.epoch, view.seq);
                state.epoch = view.epoch.clone();
                state.seq = view.seq;
            }
        }
        view.seq
    }

    /// Cluster mode: as [`deliver`](Self::deliver), for a message of the room's `epoch`.
    /// A message of another epoch than this node's members are in (the room restarted in
    /// the cluster, e.g. after a Redis failover lost its state) cannot continue their
    /// sequence: they get `resync` (the new epoch, the sequence number before this
    /// message), stay members, and get the message. While every member's join waits for
    /// the cluster the epoch is not known yet and is not checked.
    pub fn deliver_in_epoch(&self, room: &RoomName, message: &ClusterMessage, epoch: &str) {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return;
        };
        {
            let mut state = room_ref.lock();
            if *state.epoch != *epoch && established(&state).next().is_some() {
                let before = message.seq.unwrap_or(1).saturating_sub(1);
                let epoch: Arc<str> = epoch.into();
                state.floors.clear();
                let members: Vec<SessionHandle> = established(&state).cloned().collect();
                resync(&mut state, room, &members, &epoch, before);
                state.epoch = epoch;
                state.seq = before;
            }
        }
        self.deliver_to(room, &room_ref, message, false, Some(epoch));
    }

    /// Cluster mode: a room message the cluster ordered, for this node's members of the
    /// room (encoded once; members still joining hold it until their join completes).
    pub fn deliver(&self, room: &RoomName, message: &ClusterMessage, volatile: bool) {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return;
        };
        self.deliver_to(room, &room_ref, message, volatile, None);
    }

    /// [`deliver`](Self::deliver) to a room already looked up.
    fn deliver_to(
        &self,
        room: &RoomName,
        room_ref: &Room,
        message: &ClusterMessage,
        volatile: bool,
        epoch: Option<&str>,
    ) {
        let frame = self.encode(room, message, volatile);
        let mut held_epoch: Option<Arc<str>> = None;
        let mut state = room_ref.lock();
        if let Some(seq) = message.seq {
            state.seq = state.seq.max(seq);
        }
        let RoomState {
            members,
            pending,
            floors,
            ..
        } = &mut *state;
        if let (Some(seq), false) = (message.seq, floors.is_empty()) {
            // Members whose join reported `seq` or later already have this message.
            floors.retain(|_, floor| seq <= *floor);
        }
        let mut counted = [0; 2];
        for (id, member) in members.iter() {
            if Some(*id) == message.origin {
                continue;
            }
            match pending.get_mut(id) {
                Some((_, held)) if held.len() >= MAX_HELD_FRAMES => {
                    member.close(CloseReason::new(
                        crate::protocol::CloseCode::TooSlowOrTooFast,
                        crate::session::SLOW_CONSUMER,
                    ));
                }
                Some((_, held)) => {
                    let epoch = epoch.map(|e| held_epoch.get_or_insert_with(|| e.into()).clone());
                    held.push((message.seq, epoch, frame.clone()));
                }
                None if message.seq.is_some() && floors.contains_key(id) => {}
                None => {
                    member.send(frame.clone());
                    counted[transport_index(member.transport())] += 1;
                }
            }
        }
        self.stats.add_deliveries(counted);
    }

    /// Cluster mode: a presence event the cluster announced, for this node's members of
    /// `room` other than the sessions of the user it is about.
    pub fn deliver_presence(&self, room: &RoomName, event: PresenceEvent, user: &str) {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return;
        };
        let frame = presence_frame(room, event, user);
        let mut state = room_ref.lock();
        let RoomState {
            members, pending, ..
        } = &mut *state;
        for (id, member) in members.iter() {
            if member.user().map(|u| &**u) == Some(user) {
                continue;
            }
            match pending.get_mut(id) {
                Some((_, held)) if held.len() < MAX_HELD_FRAMES => {
                    held.push((None, None, frame.clone()))
                }
                Some(_) => {}
                None => {
                    member.send(frame.clone());
                }
            }
        }
    }

    /// The members of `room` on this node or, in cluster mode, on every node.
    pub fn members_then(
        &self,
        room: &RoomName,
        done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    ) {
        match self.backplane.cluster() {
            Some(cluster) => cluster.members(room, done),
            None => done(Ok(self.members(room))),
        }
    }

    /// The presence listing of `room` (at most `max_presence_members` named): built once
    /// per change of the room's members on a single node; in cluster mode, one lookup
    /// serves every session that asks while it runs and for [`LISTING_TTL`] after.
    ///
    /// [`LISTING_TTL`]: crate::presence::LISTING_TTL
    pub fn presence_then(&self, room: &RoomName, now: Instant, done: Completion<ListingResult>) {
        let max = self.max_presence_members;
        let Some(cluster) = self.backplane.cluster() else {
            done(Ok(self.local_listing(room)));
            return;
        };
        if let Lookup::Start = self.listings.lookup(room, now, done) {
            let (me, room2) = (self.me.clone(), room.clone());
            cluster.members(
                room,
                Box::new(move |members| {
                    let Some(hub) = me.upgrade() else { return };
                    let listing = members.map(|m| Arc::new(PresenceListing::new(&m, m.len(), max)));
                    hub.listings.complete(&room2, now, listing);
                }),
            );
        }
    }

    /// A single node's listing of `room`, kept in the room until its members change.
    fn local_listing(&self, room: &RoomName) -> Arc<PresenceListing> {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.clone()) else {
            return Arc::new(PresenceListing::empty());
        };
        let mut state = room_ref.lock();
        if let Some(listing) = &state.listing {
            return listing.clone();
        }
        let members: Vec<MemberInfo> = state
            .members
            .values()
            .take(self.max_presence_members)
            .map(|s| self.member_info(s))
            .collect();
        let listing = Arc::new(PresenceListing::new(
            &members,
            state.members.len(),
            self.max_presence_members,
        ));
        state.listing = Some(listing.clone());
        listing
    }

    fn member_info(&self, s: &SessionHandle) -> MemberInfo {
        MemberInfo {
            user: s.user().map(|u| u.to_string()).unwrap_or_default(),
            session: s.id_str().to_owned(),
            transport: s.transport().as_str().to_owned(),
            node: Some(self.node.to_string()),
        }
    }

    /// Cluster mode: a direct message for every session of `user` on this node.
    pub fn deliver_user(&self, user: &str, from: Option<&str>, data: &Payload) {
        self.deliver_direct(user, direct_frame(from, data));
    }

    /// Queues `frame` to every session of `user` here; whether any took it.
    fn deliver_direct(&self, user: &str, frame: Outbound) -> bool {
        let mut delivered = false;
        let mut counted = [0; 2];
        if let Some(sessions) = self.users.get(user) {
            for s in sessions.iter() {
                delivered |= s.send(frame.clone()) == crate::session::Delivery::Queued;
                counted[transport_index(s.transport())] += 1;
            }
        }
        self.stats.add_deliveries(counted);
        delivered
    }

    fn encode(&self, room: &RoomName, message: &ClusterMessage, volatile: bool) -> Outbound {
        room_frame(
            room,
            message.from.as_deref(),
            message.seq,
            volatile,
            &message.data,
        )
    }

    /// Publishes as [`publish`](Self::publish) does on a single node, or through the
    /// cluster, which orders and delivers it; `done` gets the sequence number or why the
    /// cluster could not take it.
    ///
    /// On a single node, a publish that would bring a room into existence (a room that
    /// keeps history, for those who recover) counts against the user's rate of new rooms
    /// and needs room in the budget. Refused, `done` is not called.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_then(
        &self,
        room: &RoomName,
        from: Option<&Arc<str>>,
        data: &Payload,
        volatile: bool,
        exclude: Option<SessionId>,
        now: Instant,
        done: Completion<Result<Option<u64>, ClusterUnavailable>>,
    ) -> Result<(), RoomRefusal> {
        // In cluster mode the store keeps rooms (and bounds them: its room budget).
        if !volatile
            && self.backplane.cluster().is_none()
            && !self.rooms.contains_key(room)
            && self.policies.for_room(room.as_str()).history > 0
        {
            self.admit_new_room(from, room, true, now)?;
        }
        match self.backplane.cluster() {
            Some(cluster) => cluster.publish(
                ClusterPublish {
                    room: room.clone(),
                    from: from.cloned(),
                    data: data.clone(),
                    volatile,
                    origin: exclude,
                },
                done,
            ),
            None => done(Ok(self.publish(
                room,
                from.map(|f| &**f),
                data,
                volatile,
                exclude,
                now,
            ))),
        }
        Ok(())
    }

    /// Sends as [`send_to_user`](Self::send_to_user) does on a single node, or through the
    /// cluster to the user's sessions on every node.
    pub fn send_to_user_then(
        &self,
        user: &str,
        from: Option<&Arc<str>>,
        data: &Payload,
        done: Completion<Result<bool, ClusterUnavailable>>,
    ) {
        match self.backplane.cluster() {
            Some(cluster) => cluster.send_user(user, from.cloned(), data.clone(), done),
            None => done(Ok(self.send_to_user(user, from.map(|f| &**f), data))),
        }
    }

    /// Removes the session from `room`; returns whether it was a member. Emits a presence
    /// `leave` when this was the user's last session there; an empty room is dropped.
    pub fn leave(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.clone()) else {
            return false;
        };
        let cluster = self.backplane.cluster();
        let now_empty = {
            let mut state = room_ref.lock();
            if state.members.swap_remove(&handle.id()).is_none() {
                return false;
            }
            state.listing = None;
            state.pending.remove(&handle.id());
            state.floors.remove(&handle.id());
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
            if let Some(cluster) = cluster {
                self.listings.invalidate(room);
                cluster.exit(room, self.member_info(handle), state.presence_events);
            } else if last && state.presence_events {
                let frame = presence_frame(room, PresenceEvent::Leave, &user);
                for member in state.members.values() {
                    member.send(frame.clone());
                }
            }
            // In cluster mode history lives in the cluster: an empty room is forgotten.
            state.is_empty_without_history() || (cluster.is_some() && state.members.is_empty())
        };
        if now_empty {
            self.rooms.remove_if(room, |_, r| {
                let mut state = r.lock();
                state.removed = state.members.is_empty()
                    && (cluster.is_some() || state.is_empty_without_history());
                if let (true, Some(cluster)) = (state.removed, cluster) {
                    // Queued while the shard is held, so it precedes the opening of a room
                    // that replaces this one.
                    cluster.close_room(room);
                }
                state.removed
            });
        }
        true
    }

    /// Drops expired history and forgets rooms that have had neither members nor history
    /// for a history lifetime (their sequence restarts with a new epoch). Call
    /// periodically; a room is forgotten within one call's interval of that moment.
    pub fn expire_history(&self, now: Instant) {
        let expired: Vec<RoomName> = self
            .rooms
            .iter()
            .filter_map(|entry| {
                // A room busy right now is not idle: skip it rather than wait for it.
                let mut state = entry.value().0.try_lock().ok()?;
                state.is_expired(now).then(|| entry.key().clone())
            })
            .collect();
        for room in expired {
            self.rooms.remove_if(&room, |_, r| {
                let mut state = r.lock();
                state.removed = state.is_expired(now);
                state.removed
            });
        }
    }

    /// Publishes `data` to every member of `room` but `exclude`, encoding it once and
    /// keeping it in the room's history when its policy says so. Returns the assigned
    /// sequence number (`None` for volatile messages).
    pub fn publish(
        &self,
        room: &RoomName,
        from: Option<&str>,
        data: &Payload,
        volatile: bool,
        exclude: Option<SessionId>,
        now: Instant,
    ) -> Option<u64> {
        // A sweep may remove the room between this lookup and its lock: the `removed` flag,
        // set under the lock, sends the publish to the room that replaces it.
        let room_ref = match self.rooms.get(room) {
            Some(entry) => Some(entry.value().clone()),
            None if !volatile
                && self.policies.for_room(room.as_str()).history > 0
                && self.budget.fits_a_room() =>
            {
                // Nobody is here, but the message is kept for those who recover.
                Some(self.room_entry(room).value().clone())
            }
            None => None,
        };
        match room_ref {
            // Nobody is here and nothing is kept: the message reaches no one (nothing to
            // encode).
            None => (!volatile).then_some(1),
            Some(room_ref) => {
                let mut state = room_ref.lock();
                if state.removed {
                    // Swept in between: publish to the room that replaces it.
                    drop(state);
                    return self.publish(room, from, data, volatile, exclude, now);
                }
                state.idle_since = None;
                let seq = (!volatile).then(|| {
                    state.seq += 1;
                    state.seq
                });
                let frame = room_frame(room, from, seq, volatile, data);
                if let (Some(seq), Some(history)) = (seq, state.history.as_mut()) {
                    history.push(seq, frame.clone(), now);
                }
                let mut counted = [0; 2];
                for (id, member) in &state.members {
                    if Some(*id) != exclude {
                        member.send(frame.clone());
                        counted[transport_index(member.transport())] += 1;
                    }
                }
                self.stats.add_deliveries(counted);
                seq
            }
        }
    }

    /// Delivers `data` to every session of `user` here; returns whether any session got it.
    fn send_to_user(&self, user: &str, from: Option<&str>, data: &Payload) -> bool {
        self.deliver_direct(user, direct_frame(from, data))
    }

    /// The members of `room` on this node.
    fn members(&self, room: &RoomName) -> Vec<MemberInfo> {
        let Some(room_ref) = self.rooms.get(room).map(|r| r.clone()) else {
            return Vec::new();
        };
        let state = room_ref.lock();
        state
            .members
            .values()
            .map(|s| self.member_info(s))
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

    /// Closes every session of `user`: on this node, or in cluster mode on every node (the
    /// count is then this node's; the others close theirs when the request reaches them).
    pub fn disconnect_user_then(
        &self,
        user: &str,
        reason: CloseReason,
        done: Completion<Result<usize, ClusterUnavailable>>,
    ) {
        match self.backplane.cluster() {
            Some(cluster) => {
                let local = self.users.get(user).map_or(0, |s| s.len());
                cluster.disconnect_user(user, reason, Box::new(move |r| done(r.map(|()| local))));
            }
            None => done(Ok(self.disconnect_user(user, reason))),
        }
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

/// Tells `members` that `room` continues in `epoch` after `seq` (`resync`, reason
/// `continuity`); messages up to `seq` the channel still brings are not delivered to them.
fn resync(
    state: &mut RoomState,
    room: &RoomName,
    members: &[SessionHandle],
    epoch: &str,
    seq: u64,
) {
    let frame = ServerFrame::Resync {
        room: room.as_str(),
        epoch,
        seq,
        reason: ResyncReason::Continuity,
    }
    .to_outbound();
    for member in members {
        member.send(frame.clone());
        state.floors.insert(member.id(), seq);
    }
}

/// The members of a room whose joins completed (not waiting for the cluster).
fn established(state: &RoomState) -> impl Iterator<Item = &SessionHandle> {
    state
        .members
        .iter()
        .filter(|(id, _)| !state.pending.contains_key(*id))
        .map(|(_, member)| member)
}

/// The `message` frame of a room message, encoded once for every recipient.
fn room_frame(
    room: &RoomName,
    from: Option<&str>,
    seq: Option<u64>,
    volatile: bool,
    data: &Payload,
) -> Outbound {
    MessageFrame {
        kind: MessageKind::Message,
        room: Some(room),
        from,
        seq,
        volatile,
    }
    .encode(data)
}

/// The `direct` frame of a message to a user.
fn direct_frame(from: Option<&str>, data: &Payload) -> Outbound {
    MessageFrame {
        kind: MessageKind::Direct,
        room: None,
        from,
        seq: None,
        volatile: false,
    }
    .encode(data)
}

fn presence_frame(room: &RoomName, event: PresenceEvent, user: &str) -> Outbound {
    ServerFrame::Presence {
        room: room.as_str(),
        event,
        user,
    }
    .to_outbound()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backplane::{Cluster, LocalBackplane},
        session::{Batch, OutboxReceiver, TransportKind},
    };
    use bytes::Bytes;
    use rand::SeedableRng;
    use serde_json::{json, Value};
    use std::time::Duration;

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
        hub.publish(room, None, &json_data(data), false, None, Instant::now())
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
            hub.publish(
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
            hub.publish(
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
        assert_eq!(hub.members(&room).len(), 1);
        hub.leave(&watcher, &room);
        assert_eq!(hub.rooms.len(), 0, "empty rooms are dropped");
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
        // Bob's session works: what reaches him is his own direct message, nothing before.
        assert!(hub.send_to_user("bob", None, &json_data("2")));
        assert_eq!(drain(&brx), vec![json!({"type":"direct","data":2})]);
    }

    #[test]
    fn disconnect_closes_every_session_of_the_user_and_no_other() {
        let hub = hub();
        let (a1, _a1rx) = session(&hub, "alice");
        let (a2, _a2rx) = session(&hub, "alice");
        let (b, brx) = session(&hub, "bob");
        let reason = CloseReason::new(crate::protocol::CloseCode::PolicyViolation, "bye");
        assert_eq!(hub.disconnect_user("alice", reason.clone()), 2);
        assert_eq!(a1.close_reason(), Some(reason.clone()));
        assert_eq!(a2.close_reason(), Some(reason));
        assert!(!b.is_closed());
        assert!(drain(&brx).is_empty());
        assert_eq!(
            hub.disconnect_user(
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
        assert_eq!(hub.rooms.len(), 1, "kept for its history");
        hub.expire_history(Instant::now());
        assert_eq!(hub.rooms.len(), 1, "kept while its history lives");
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
        assert_eq!(hub.rooms.len(), 1, "seen empty: kept one more lifetime");
        hub.expire_history(later + Duration::from_secs(60));
        assert_eq!(
            hub.rooms.len(),
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
        assert_eq!(hub.rooms.len(), 1, "the visit restarted the lifetime");
        let back = recover(&hub, &a, &room, 0, &first.epoch);
        assert_eq!(back.recovered, Some(true));
    }

    #[test]
    fn a_swept_room_is_marked_and_a_new_publish_starts_its_successor() {
        let hub = hub_with_history(10);
        let room = RoomName::new("r").unwrap();
        publish(&hub, &room, "1");
        let stale = hub.rooms.get(&room).map(|r| r.value().clone()).unwrap();
        let later = Instant::now() + Duration::from_secs(200);
        hub.expire_history(later);
        hub.expire_history(later + Duration::from_secs(61));
        assert_eq!(hub.rooms.len(), 0);
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

    fn cluster_message(seq: u64) -> ClusterMessage {
        ClusterMessage {
            seq: Some(seq),
            from: None,
            data: Payload::Json(Bytes::from(seq.to_string())),
            origin: None,
        }
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
        hub.deliver(&room, &cluster_message(1), false);
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
        hub.deliver(&room, &cluster_message(2), false);
        hub.deliver(&room, &cluster_message(3), false);
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
        hub.deliver(&room, &cluster_message(4), false);
        assert_eq!(seqs(&late_rx), vec![4]);
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

    /// Everything queued for `rx`, and the close if it was closed.
    fn frames_and_close(rx: &OutboxReceiver) -> (Vec<Value>, Option<CloseReason>) {
        let mut out = Vec::new();
        let mut closed = None;
        while let Some(batch) = rx.try_batch(&mut out, usize::MAX) {
            if let Batch::Close(reason) = batch {
                closed = Some(reason);
                break;
            }
        }
        let frames = out
            .into_iter()
            .filter_map(|o| match o {
                Outbound::Text(b) => serde_json::from_slice(&b).ok(),
                _ => None,
            })
            .collect();
        (frames, closed)
    }

    #[test]
    fn a_message_of_another_epoch_resyncs_the_members_who_stay() {
        let (hub, _cluster, room, live, rx) = clustered_member();
        hub.deliver_in_epoch(&room, &cluster_message(3), "e");
        hub.deliver_in_epoch(&room, &cluster_message(5), "e2");
        hub.deliver_in_epoch(&room, &cluster_message(6), "e2");
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
        hub.deliver_in_epoch(&room, &cluster_message(7), "e2");
        hub.deliver_in_epoch(&room, &cluster_message(8), "e2");
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
        hub.deliver_in_epoch(&room, &cluster_message(5), "e");
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
        hub.deliver_in_epoch(&room, &cluster_message(501), "e1");
        hub.deliver_in_epoch(&room, &cluster_message(502), "e1");
        let done = cluster.views.lock().unwrap().pop().unwrap();
        done(Ok(RoomView {
            seq: 3,
            epoch: "e2".into(),
            missed: None,
            members: 1,
        }));
        hub.deliver_in_epoch(&room, &cluster_message(4), "e2");
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
            hub.presence_then(
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
        hub.presence_then(&room, t0, Box::new(|l| assert!(l.is_ok())));
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
            hub.presence_then(
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
            hub.publish_then(
                &RoomName::new(&format!("p{n}")).unwrap(),
                Some(&alice),
                &json_data("1"),
                false,
                None,
                at,
                Box::new(|r| assert!(r.is_ok())),
            )
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
        let spent = hub.publish_then(
            &RoomName::new("p-new").unwrap(),
            None,
            &json_data("1"),
            false,
            None,
            t1,
            Box::new(|_| panic!("not published")),
        );
        assert_eq!(spent, Err(RoomRefusal::BudgetSpent));
        assert_eq!(hub.room_count(), n, "no state kept for it");
        // A join still opens a room (its members are bounded by the sessions), without
        // history: recovery reports a gap.
        let late = t1 + Duration::from_secs(60);
        assert!(join_at(1, late).unwrap().is_some());
        let kept = hub.publish(
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
        let room_ref = hub.rooms.get(&busy).unwrap().value().clone();
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
