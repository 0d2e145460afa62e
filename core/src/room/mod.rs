//! What a room is: its members and the order of its messages.
//!
//! The members are in [`state`]; the order is kept by this node on a single node
//! ([`local`]) or followed from the cluster ([`follower`]). The methods are pure apart from
//! queueing frames to members' sessions: no clock (callers pass `now`), no I/O, no lock
//! taken but the room's own, by the hub.
//!
//! A hub holds rooms of one kind only, chosen when it is built: `Room<Local>` on a single
//! node, `Room<Follower>` in a cluster.

pub mod follower;
pub mod frames;
pub mod local;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

pub use follower::{Follower, MAX_HELD_FRAMES, UNKNOWN_EPOCH};
pub use local::{Local, Since};
pub use state::{Fanout, Members};

use crate::{
    backplane::{ClusterMessage, ClusterUnavailable, RoomView},
    history::Recovery,
    protocol::{Payload, PresenceEvent, RoomName},
    session::{Outbound, SessionHandle, SessionId},
};

/// Builds the reply to a `join` from its outcome (or the cluster's failure).
///
/// The reply is queued under the room's lock, before any replayed or live message of the
/// room.
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

/// A session's request to join a room.
pub struct JoinRequest<'a> {
    /// The session.
    pub handle: &'a SessionHandle,
    /// The room.
    pub room: &'a RoomName,
    /// With a recovery request: where the client's sequence stopped.
    pub since: Option<Since<'a>>,
    /// Makes the reply.
    pub reply: JoinReply,
}

/// Cluster mode: a join waiting for the cluster's view of its room.
pub struct PendingJoin {
    /// The room.
    pub room: RoomName,
    /// The session.
    pub handle: SessionHandle,
    /// Which join of the session this is (a later join must not take this one's answer).
    pub token: u64,
    /// Whether the join asked to recover.
    pub wants_recovery: bool,
    /// Makes the reply.
    pub reply: JoinReply,
}

/// A room event the cluster hands a node, in the cluster's order.
#[derive(Debug, Clone, Copy)]
pub enum Delivery<'a> {
    /// A room message with its sequence number, in the epoch the cluster ordered it in.
    ///
    /// A message of another epoch than this node's members are in (the room restarted in
    /// the cluster) cannot continue their sequence: they get `resync` first, and stay.
    Message {
        /// The message.
        message: &'a ClusterMessage,
        /// Its epoch.
        epoch: &'a str,
    },
    /// A volatile message: no sequence number, no epoch.
    Volatile(&'a ClusterMessage),
    /// A presence event about `user`, for the members who are not that user's sessions.
    Presence {
        /// Joined or left.
        event: PresenceEvent,
        /// The user it is about.
        user: &'a str,
    },
}

impl Delivery<'_> {
    /// Its frame for `room`, encoded once for every member.
    pub fn frame(&self, room: &RoomName) -> Outbound {
        match *self {
            Delivery::Message { message, .. } => frames::cluster_frame(room, message, false),
            Delivery::Volatile(message) => frames::cluster_frame(room, message, true),
            Delivery::Presence { event, user } => frames::presence_frame(room, event, user),
        }
    }
}

/// A room message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    /// The room.
    pub room: &'a RoomName,
    /// The publisher's user id (`None` for the HTTP API).
    pub from: Option<&'a Arc<str>>,
    /// The payload.
    pub data: &'a Payload,
    /// Volatile: no sequence number, never kept.
    pub volatile: bool,
    /// A session that does not receive the message (the publisher, without `echo`).
    pub exclude: Option<SessionId>,
}

/// What the two kinds of room order have in common.
pub trait Order {
    /// Forgets what was kept for a member that left.
    fn forget(&mut self, id: SessionId);
    /// Whether the room is kept after its last member left (for its history).
    fn outlives_members(&self) -> bool;
}

impl Order for Local {
    fn forget(&mut self, _: SessionId) {}
    fn outlives_members(&self) -> bool {
        self.keeps_history()
    }
}

impl Order for Follower {
    fn forget(&mut self, id: SessionId) {
        Follower::forget(self, id);
    }
    /// In cluster mode history lives in the cluster: an empty room is forgotten.
    fn outlives_members(&self) -> bool {
        false
    }
}

/// The state of a room, under its lock.
#[derive(Debug)]
pub struct RoomState<O> {
    /// Its members.
    pub members: Members,
    /// The order of its messages.
    pub order: O,
    /// Set under the lock when the room is removed from the hub's map.
    ///
    /// A join or publish that looked it up just before must use the room that replaces it.
    pub removed: bool,
}

impl<O: Order> RoomState<O> {
    /// Removes a member: `None` if it was none, else whether it was its user's last session.
    pub fn leave(&mut self, handle: &SessionHandle) -> Option<bool> {
        let last = self.members.remove(handle)?;
        self.order.forget(handle.id());
        Some(last)
    }

    /// Whether the room may be forgotten now: no member, and nothing kept for later.
    pub fn is_forgettable(&self) -> bool {
        self.members.is_empty() && !self.order.outlives_members()
    }
}

impl RoomState<Local> {
    /// Adds the session (idempotent) and queues the reply and any missed messages.
    ///
    /// It tells the other members when this is its user's first session here, and queues
    /// the reply and then, with `since`, the missed messages: after them come live messages
    /// only, so none is lost or doubled at the seam. The missed messages are replayed only
    /// if they fit the session's queue and no other replay of the session is still queued;
    /// else the reply says `recovered: false`.
    pub fn join(&mut self, request: JoinRequest<'_>, now: Instant) -> JoinOutcome {
        let JoinRequest {
            handle,
            room,
            since,
            reply,
        } = request;
        let added = self.members.add(handle);
        self.order.touch();
        if added == Some(true) {
            self.members.announce(room, PresenceEvent::Join, handle);
        }
        let (seq, epoch) = self.order.position();
        let outcome = JoinOutcome {
            seq,
            epoch,
            members: self.members.len(),
            recovered: None,
        };
        let wants_recovery = since.is_some();
        match self.order.replay(since, added.is_some(), now) {
            Recovery::Complete(frames) if wants_recovery => {
                answer_join(handle, reply, outcome, true, Some(&frames))
            }
            _ => answer_join::<Outbound>(handle, reply, outcome, wants_recovery, None),
        }
    }

    /// Publishes to every member but `exclude`, encoding the message once.
    ///
    /// The message is kept in the history when the room's policy says so. Returns the
    /// assigned sequence number (`None` for volatile messages) and what was queued.
    pub fn publish(&mut self, message: &Publish<'_>, now: Instant) -> (Option<u64>, Fanout) {
        let from = message.from.map(|f| &**f);
        let (seq, frame) = self.order.order(message.volatile, now, |seq| {
            frames::room_frame(message.room, from, seq, message.volatile, message.data)
        });
        (seq, self.members.fan_out(&frame, message.exclude))
    }

    /// Whether the room can be forgotten at `now` (see [`Local::is_expired`]).
    pub fn is_expired(&mut self, now: Instant) -> bool {
        let has_members = !self.members.is_empty();
        self.order.is_expired(has_members, now)
    }
}

impl RoomState<Follower> {
    /// Enters a member whose join waits for the cluster, its live frames held.
    ///
    /// Returns `false` if it was a member already.
    pub fn enter(&mut self, handle: &SessionHandle, token: u64) -> bool {
        let added = self.members.add(handle).is_some();
        if added {
            self.order.hold(handle.id(), token);
        }
        added
    }

    /// The outcome of a join by a session that is a member already (and live).
    pub fn outcome(&self, wants_recovery: bool) -> JoinOutcome {
        let (seq, epoch) = self.order.position();
        JoinOutcome {
            seq,
            epoch,
            members: self.members.len(),
            recovered: wants_recovery.then_some(false),
        }
    }

    /// The cluster reported the room of a pending join: queues the reply and the rest.
    ///
    /// It queues the reply, the missed messages, then the live frames held back that are
    /// newer than the report. Nothing happens if the member left meanwhile; if the cluster
    /// failed, the join is handed back with the failure (the caller makes the member leave,
    /// then replies).
    pub fn finish_join(
        &mut self,
        join: PendingJoin,
        view: Result<RoomView, ClusterUnavailable>,
    ) -> Option<(PendingJoin, ClusterUnavailable)> {
        let held = self.order.take_join(join.handle.id(), join.token)?;
        let view = match view {
            Ok(view) => view,
            Err(e) => return Some((join, e)),
        };
        let PendingJoin {
            room,
            handle,
            wants_recovery,
            reply,
            ..
        } = join;
        let release = self
            .order
            .complete_join(&room, &self.members, handle.id(), held, &view);
        let outcome = JoinOutcome {
            seq: view.seq,
            epoch: view.epoch.clone(),
            members: view.members.max(self.members.len()),
            recovered: None,
        };
        let replay: Option<Vec<Outbound>> = match (wants_recovery, &view.missed) {
            (true, Some(missed)) => Some(
                missed
                    .iter()
                    .map(|m| frames::cluster_frame(&room, m, false))
                    .collect(),
            ),
            _ => None,
        };
        answer_join(&handle, reply, outcome, wants_recovery, replay.as_deref());
        for frame in release {
            handle.send(frame);
        }
        None
    }

    /// Queues what the cluster delivered to the members; counts the messages queued.
    ///
    /// What is queued is its `frame`, from [`Delivery::frame`].
    pub fn deliver(&mut self, room: &RoomName, delivery: Delivery<'_>, frame: &Outbound) -> Fanout {
        let Self { members, order, .. } = self;
        match delivery {
            Delivery::Message { message, epoch } => {
                order.follow_epoch(room, members, epoch, message.seq);
                order.deliver(members, message, Some(epoch), frame)
            }
            Delivery::Volatile(message) => order.deliver(members, message, None, frame),
            Delivery::Presence { user, .. } => {
                order.deliver_presence(members, user, frame);
                Fanout::default()
            }
        }
    }
}

/// Queues the reply to a join and then, when given, the `replay` of missed messages.
///
/// The replay is queued if it fits, which the reply says; without a replay, a join that
/// asked to recover (`wants_recovery`) is told `recovered: false`. Returns the outcome as
/// reported.
pub fn answer_join<F: std::borrow::Borrow<Outbound>>(
    handle: &SessionHandle,
    reply: JoinReply,
    mut outcome: JoinOutcome,
    wants_recovery: bool,
    replay: Option<&[F]>,
) -> JoinOutcome {
    match replay {
        Some(frames) => {
            let (_, replayed) = handle.send_with_replay(frames, |fits| {
                reply(Ok(&JoinOutcome {
                    recovered: Some(fits),
                    ..outcome.clone()
                }))
            });
            outcome.recovered = Some(replayed);
        }
        None => {
            outcome.recovered = wants_recovery.then_some(false);
            handle.send(reply(Ok(&outcome)));
        }
    }
    outcome
}

/// A room: its state behind its own lock.
///
/// The lock is held only while a frame is ordered and queued (never across an await).
#[derive(Debug)]
pub struct Room<O>(Mutex<RoomState<O>>);

impl<O> Room<O> {
    /// An empty room whose members hear presence events or not, with this `order`.
    pub fn new(presence_events: bool, order: O) -> Arc<Self> {
        Arc::new(Room(Mutex::new(RoomState {
            members: Members::new(presence_events),
            order,
            removed: false,
        })))
    }

    /// Locks the room (a panic elsewhere does not poison it for good).
    pub fn lock(&self) -> MutexGuard<'_, RoomState<O>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the room unless it is busy right now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, RoomState<O>>> {
        self.0.try_lock().ok()
    }
}
