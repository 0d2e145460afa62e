//! A single node's rooms: this node orders each room and keeps its history.

use std::{sync::Arc, time::Instant};

use super::{ids::Ids, rooms::Rooms};
use crate::{
    history::{History, HistoryBudget},
    policy::RoomPolicies,
    presence::PresenceListing,
    protocol::{MemberInfo, PresenceEvent, RoomName},
    room::{Fanout, JoinOutcome, JoinRequest, Local, Publish, Room},
    session::SessionHandle,
};

/// A single node's rooms, with the budget their histories draw on.
pub(super) struct SingleNode {
    pub(super) rooms: Rooms<Local>,
    policies: RoomPolicies,
    budget: Arc<HistoryBudget>,
}

/// What a publish did on a single node.
pub(super) enum Published {
    /// Ordered (sequence number, `None` when volatile) and queued.
    Done(Option<u64>, Fanout),
    /// The room does not exist and would exist for its history only.
    ///
    /// The caller admits it (or refuses the publish), then publishes again with `admitted`.
    NewRoom,
}

impl SingleNode {
    /// No room yet, with these policies, drawing on `budget`.
    pub(super) fn new(policies: RoomPolicies, budget: Arc<HistoryBudget>) -> Self {
        Self {
            rooms: Rooms::new(),
            policies,
            budget,
        }
    }

    /// Whether one more room with history fits the budget.
    pub(super) fn fits_a_room(&self) -> bool {
        self.budget.fits_a_room()
    }

    /// `room`, created with a new epoch if it does not exist.
    ///
    /// Beyond the budget a room keeps no history.
    fn room(&self, room: &RoomName, ids: &Ids) -> Arc<Room<Local>> {
        self.rooms.get_or_create(room, || {
            let policy = self.policies.for_room(room.as_str());
            let history = (policy.history > 0 && self.budget.fits_a_room()).then(|| {
                let history = History::new(policy.history, policy.history_ttl, self.budget.clone());
                (history, self.budget.charge_room())
            });
            Room::new(policy.presence_events, Local::new(ids.epoch(), history))
        })
    }

    /// Joins the room (see [`RoomState::join`](crate::room::RoomState::join)).
    pub(super) fn join(&self, request: JoinRequest<'_>, now: Instant, ids: &Ids) -> JoinOutcome {
        loop {
            let room_ref = self.room(request.room, ids);
            let mut state = room_ref.lock();
            if !state.removed {
                return state.join(request, now);
            }
        }
    }

    /// Publishes to the room's members.
    ///
    /// See [`RoomState::publish`](crate::room::RoomState::publish). A room that does not
    /// exist is created for a message that its policy keeps, once `admitted`.
    pub(super) fn publish(
        &self,
        message: &Publish<'_>,
        now: Instant,
        ids: &Ids,
        mut admitted: bool,
    ) -> Published {
        loop {
            // A sweep may remove the room between this lookup and its lock: the `removed`
            // flag, set under the lock, sends the publish to the room that replaces it.
            let room_ref = match self.rooms.get(message.room) {
                Some(room_ref) => room_ref,
                None if !message.volatile
                    && self.policies.for_room(message.room.as_str()).history > 0 =>
                {
                    if !admitted {
                        return Published::NewRoom;
                    }
                    if !self.budget.fits_a_room() {
                        return Published::Done(Some(1), Fanout::default());
                    }
                    // Nobody is here, but the message is kept for those who recover.
                    self.room(message.room, ids)
                }
                // Nobody is here and nothing is kept: the message reaches no one (nothing
                // to encode).
                None => {
                    return Published::Done((!message.volatile).then_some(1), Fanout::default())
                }
            };
            let mut state = room_ref.lock();
            if !state.removed {
                let (seq, counted) = state.publish(message, now);
                return Published::Done(seq, counted);
            }
            // The room existed when this publish came: its successor is not a new room.
            admitted = true;
        }
    }

    /// Removes the session from `room`; returns whether it was a member.
    ///
    /// Announces the user's departure when this was their last session there.
    pub(super) fn leave(&self, handle: &SessionHandle, room: &RoomName) -> bool {
        self.rooms.leave(
            handle,
            room,
            |state, last| {
                if last {
                    state.members.announce(room, PresenceEvent::Leave, handle);
                }
            },
            || {},
        )
    }

    /// Drops expired history and forgets idle rooms.
    ///
    /// A room is forgotten once it has had neither members nor history for a history
    /// lifetime.
    pub(super) fn expire(&self, now: Instant) {
        // A room busy right now is not idle: skip it rather than wait for it.
        for room in self.rooms.find(|state| state.is_expired(now)) {
            self.rooms.remove_if(&room, |state| state.is_expired(now));
        }
    }

    /// The members of `room` on node `node`.
    pub(super) fn members(&self, room: &RoomName, node: &str) -> Vec<MemberInfo> {
        self.rooms
            .get(room)
            .map_or_else(Vec::new, |r| r.lock().members.infos(usize::MAX, node))
    }

    /// The presence listing of `room`, kept in the room until its members change.
    pub(super) fn listing(&self, room: &RoomName, max: usize, node: &str) -> Arc<PresenceListing> {
        self.rooms.get(room).map_or_else(
            || Arc::new(PresenceListing::empty()),
            |r| r.lock().members.listing(max, node),
        )
    }
}
