//! The sharded map of a hub's rooms, of one kind (single node or cluster).
//!
//! Lock order: a shard of the map, then a room. A shard guard is released before a room is
//! locked (a fan-out holding one room must not stall every other room of its shard); a
//! room removed in between is marked `removed` under its lock, and the caller retries with
//! the room that replaces it.

use std::sync::Arc;

use dashmap::DashMap;

use crate::{
    protocol::RoomName,
    room::{Order, Room, RoomState},
    session::{SessionHandle, SessionId},
};

/// The rooms of a hub, each behind its own lock.
pub(super) struct Rooms<O>(DashMap<RoomName, Arc<Room<O>>>);

impl<O: Order> Rooms<O> {
    /// No room.
    pub(super) fn new() -> Self {
        Self(DashMap::new())
    }

    /// Number of rooms.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `room` exists.
    pub(super) fn contains(&self, room: &RoomName) -> bool {
        self.0.contains_key(room)
    }

    /// The room named `room`, if it exists.
    pub(super) fn get(&self, room: &RoomName) -> Option<Arc<Room<O>>> {
        self.0.get(room).map(|r| r.value().clone())
    }

    /// The room named `room`, made by `create` if it does not exist.
    pub(super) fn get_or_create(
        &self,
        room: &RoomName,
        create: impl FnOnce() -> Arc<Room<O>>,
    ) -> Arc<Room<O>> {
        self.0
            .entry(room.clone())
            .or_insert_with(create)
            .value()
            .clone()
    }

    /// Whether session `id` is a member of `room`.
    pub(super) fn is_member(&self, room: &RoomName, id: SessionId) -> bool {
        self.get(room)
            .is_some_and(|r| r.lock().members.contains(id))
    }

    /// Every room with its name, at one moment.
    pub(super) fn all(&self) -> Vec<(RoomName, Arc<Room<O>>)> {
        self.0
            .iter()
            .map(|r| (r.key().clone(), r.value().clone()))
            .collect()
    }

    /// The rooms for which `test` holds, skipping those busy right now.
    pub(super) fn find(&self, mut test: impl FnMut(&mut RoomState<O>) -> bool) -> Vec<RoomName> {
        self.0
            .iter()
            .filter_map(|entry| {
                let mut state = entry.value().try_lock()?;
                test(&mut state).then(|| entry.key().clone())
            })
            .collect()
    }

    /// Removes `room` if `test` holds for it under its lock (which marks it `removed`).
    pub(super) fn remove_if(&self, room: &RoomName, test: impl FnOnce(&mut RoomState<O>) -> bool) {
        self.0.remove_if(room, |_, r| {
            let mut state = r.lock();
            state.removed = test(&mut state);
            state.removed
        });
    }

    /// Removes `handle` from `room` and drops the room if nothing keeps it.
    ///
    /// It calls `left` under the room's lock (with whether it was its user's last session
    /// there); `removed` is called under the room's lock (and the shard's) as the room is
    /// dropped. Returns whether it was a member.
    pub(super) fn leave(
        &self,
        handle: &SessionHandle,
        room: &RoomName,
        left: impl FnOnce(&mut RoomState<O>, bool),
        removed: impl FnOnce(),
    ) -> bool {
        let Some(room_ref) = self.get(room) else {
            return false;
        };
        let now_empty = {
            let mut state = room_ref.lock();
            let Some(last) = state.leave(handle) else {
                return false;
            };
            left(&mut state, last);
            state.is_forgettable()
        };
        if now_empty {
            self.remove_if(room, |state| {
                let forget = state.is_forgettable();
                if forget {
                    removed();
                }
                forget
            });
        }
        true
    }
}
