//! A cluster node's rooms: the cluster orders them and this node follows.

use std::{sync::Arc, time::Instant};

use super::{ids::Ids, rooms::Rooms};
use crate::{
    backplane::{Cluster, ClusterUnavailable, RoomView},
    policy::RoomPolicies,
    presence::{ListingCache, PresenceListing},
    protocol::{MemberInfo, RoomName},
    room::{state::member_info, Delivery, Fanout, Follower, JoinRequest, PendingJoin, Room},
    session::SessionHandle,
};

/// A cluster node's rooms, and the presence listings looked up (or being looked up).
pub(super) struct ClusterNode {
    pub(super) rooms: Rooms<Follower>,
    pub(super) listings: ListingCache,
    policies: RoomPolicies,
}

impl ClusterNode {
    /// No room yet, with these policies.
    pub(super) fn new(policies: RoomPolicies) -> Self {
        Self {
            rooms: Rooms::new(),
            listings: ListingCache::default(),
            policies,
        }
    }

    /// `room`, created with a provisional epoch if it does not exist.
    fn room(&self, room: &RoomName, ids: &Ids) -> Arc<Room<Follower>> {
        self.rooms.get_or_create(room, || {
            let policy = self.policies.for_room(room.as_str());
            Room::new(policy.presence_events, Follower::new(ids.epoch()))
        })
    }

    /// Enters the member in the room, its live frames held, and tells `cluster`.
    ///
    /// The cluster, told as node `node`, lists the member cluster-wide and announces it.
    /// Returns the join, which waits for the cluster's view of the room; a session that was
    /// a member already is answered at once (nothing to replay) and `None` is returned.
    pub(super) fn enter(
        &self,
        request: JoinRequest<'_>,
        ids: &Ids,
        cluster: &dyn Cluster,
        node: &str,
    ) -> Option<PendingJoin> {
        let (handle, room, wants_recovery) =
            (request.handle, request.room, request.since.is_some());
        let token = ids.join_token();
        loop {
            let room_ref = self.room(room, ids);
            let mut state = room_ref.lock();
            if state.removed {
                continue;
            }
            if !state.enter(handle, token) {
                handle.send((request.reply)(Ok(&state.outcome(wants_recovery))));
                return None;
            }
            let events = state.members.presence_events();
            cluster.enter(room, member_info(node, handle), events);
            drop(state);
            self.listings.invalidate(room);
            return Some(PendingJoin {
                room: room.clone(),
                handle: handle.clone(),
                token,
                wants_recovery,
                reply: request.reply,
            });
        }
    }

    /// The cluster's answer to a pending join.
    ///
    /// See [`RoomState::finish_join`](crate::room::RoomState::finish_join).
    pub(super) fn finish_join(
        &self,
        join: PendingJoin,
        view: Result<RoomView, ClusterUnavailable>,
    ) -> Option<(PendingJoin, ClusterUnavailable)> {
        let room_ref = self.rooms.get(&join.room)?;
        let failed = room_ref.lock().finish_join(join, view);
        failed
    }

    /// Removes the session from `room` and tells `cluster`.
    ///
    /// Returns whether it was a member. The cluster is told as node `node`. An empty room
    /// is forgotten: history lives in the cluster.
    pub(super) fn leave(
        &self,
        handle: &SessionHandle,
        room: &RoomName,
        cluster: &dyn Cluster,
        node: &str,
    ) -> bool {
        self.rooms.leave(
            handle,
            room,
            |state, _| {
                self.listings.invalidate(room);
                let events = state.members.presence_events();
                cluster.exit(room, member_info(node, handle), events);
            },
            // Queued while the shard is held, so it precedes the opening of a room that
            // replaces this one.
            || cluster.close_room(room),
        )
    }

    /// Queues what the cluster delivered to the members of `room` here.
    pub(super) fn deliver(&self, room: &RoomName, delivery: Delivery<'_>) -> Fanout {
        let Some(room_ref) = self.rooms.get(room) else {
            return Fanout::default();
        };
        // Encoded before the room is locked.
        let frame = delivery.frame(room);
        let counted = room_ref.lock().deliver(room, delivery, &frame);
        counted
    }

    /// Every room whose members' joins completed, with its delivered position.
    ///
    /// The position is the sequence number and epoch the room has delivered up to.
    pub(super) fn positions(&self) -> Vec<(RoomName, u64, Arc<str>)> {
        self.rooms
            .all()
            .into_iter()
            .filter_map(|(name, room)| {
                let state = room.lock();
                let (seq, epoch) = state.order.live_position(&state.members)?;
                Some((name, seq, epoch))
            })
            .collect()
    }

    /// Catches `room` up from `from` with the cluster's `view`.
    ///
    /// See [`Follower::catch_up`]. Returns the sequence number accounted for and what was
    /// queued.
    pub(super) fn catch_up(
        &self,
        room: &RoomName,
        from: (u64, &str),
        view: &RoomView,
    ) -> (u64, Fanout) {
        let Some(room_ref) = self.rooms.get(room) else {
            return (view.seq, Fanout::default());
        };
        let mut state = room_ref.lock();
        let state = &mut *state;
        state.order.catch_up(room, &state.members, from, view)
    }

    /// Fills the listing of `room` looked up at `started` with the cluster's answer.
    pub(super) fn listed(
        &self,
        room: &RoomName,
        started: Instant,
        max: usize,
        members: Result<Vec<MemberInfo>, ClusterUnavailable>,
    ) {
        let listing = members.map(|m| Arc::new(PresenceListing::new(&m, m.len(), max)));
        self.listings.complete(room, started, listing);
    }
}
