//! What a room is: its members ([`state`]) and the order of its messages, kept by this node
//! on a single node ([`local`]) or followed from the cluster ([`follower`]). The methods
//! are pure apart from queueing frames to members' sessions: no clock (callers pass `now`),
//! no I/O, no lock taken but the room's own, by the hub.
//!
//! A hub holds rooms of one kind only, chosen when it is built: `Room<Local>` on a single
//! node, `Room<Follower>` in a cluster.

pub mod follower;
pub mod frames;
pub mod local;
pub mod state;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

pub use follower::{Follower, MAX_HELD_FRAMES, UNKNOWN_EPOCH};
pub use local::{Local, Since};
pub use state::{Fanout, Members};

use crate::{
    backplane::ClusterUnavailable,
    history::Recovery,
    protocol::{Payload, PresenceEvent, RoomName},
    session::{Outbound, SessionHandle, SessionId},
};

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
    /// Set under the lock when the room is removed from the hub's map: a join or publish
    /// that looked it up just before must use the room that replaces it.
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
    /// Adds the session (idempotent), tells the other members when this is its user's first
    /// session here, and queues the reply and then, with `since`, the missed messages: after
    /// them come live messages only, so none is lost or doubled at the seam. The missed
    /// messages are replayed only if they fit the session's queue and no other replay of
    /// the session is still queued; else the reply says `recovered: false`.
    pub fn join(
        &mut self,
        room: &RoomName,
        handle: &SessionHandle,
        since: Option<Since<'_>>,
        now: Instant,
        reply: JoinReply,
    ) -> JoinOutcome {
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

    /// Publishes to every member but `exclude`, encoding the message once and keeping it in
    /// the history when the room's policy says so. Returns the assigned sequence number
    /// (`None` for volatile messages) and what was queued.
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

/// Queues the reply to a join and then, when given, the `replay` of missed messages (if it
/// fits, which the reply says); without a replay, a join that asked to recover
/// (`wants_recovery`) is told `recovered: false`. Returns the outcome as reported.
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

/// A room: its state behind its own lock, held only while a frame is ordered and queued
/// (never across an await).
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
