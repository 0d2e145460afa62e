//! What the backplane's tasks share.
//!
//! That is the channels wanted, the pub/sub connection, this node's record, the follower,
//! the breaker and the room budget.

use std::sync::{atomic::AtomicBool, Mutex, MutexGuard, OnceLock, Weak};

use gateway_core::{
    hub::Hub,
    policy::{RoomPolicies, RoomPolicy},
    protocol::RoomName,
};

use super::{
    announced::Announced,
    breaker::Breaker,
    budget::RoomBudget,
    channel::Channel,
    follower::{Action, Event, Follower},
    wanted::{Sink, Wanted},
};

/// State the worker, the keep-alive and the subscriber share.
pub(super) struct Shared {
    /// Where failed operations are counted, once the server has set it.
    pub(super) errors: OnceLock<crate::metrics::BackplaneErrors>,
    /// Channels this node needs (rooms with local members, users with local sessions).
    pub(super) wanted: Mutex<Wanted>,
    /// Wakes the reconciler: `wanted` changed.
    pub(super) reconcile: tokio::sync::Notify,
    /// The pub/sub connection's subscribing half, while it is up.
    pub(super) sink: tokio::sync::Mutex<Option<Sink>>,
    /// Whether the pub/sub connection is up.
    pub(super) subscribed: AtomicBool,
    pub(super) hub: OnceLock<Weak<Hub>>,
    pub(super) policies: RoomPolicies,
    pub(super) node: String,
    /// This node's record of what Redis should hold.
    pub(super) announced: Mutex<Announced>,
    /// What the pub/sub connection calls for.
    pub(super) follower: Mutex<Follower>,
    /// Open while Redis does not answer.
    pub(super) breaker: Breaker,
    /// The rooms this node created in Redis, against `[limits] room_budget_mb`.
    pub(super) budget: RoomBudget,
    /// Owed writes are being queued again.
    pub(super) resyncing: AtomicBool,
}

/// Locks `mutex` (never held across an await), whatever a panic left in it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// This node's record.
    pub(super) fn announced(&self) -> MutexGuard<'_, Announced> {
        lock(&self.announced)
    }

    /// Feeds `event` to the follower; the actions it calls for.
    pub(super) fn follow(&self, event: Event) -> Vec<Action> {
        lock(&self.follower).handle(event)
    }

    /// Redis may not list (or unlist) this membership as the record says.
    pub(super) fn owe_member(&self, room: RoomName, session: String) {
        let mut announced = self.announced();
        let key = (room, session);
        // One forgotten by `bound` is the sweep's.
        if announced.members.contains_key(&key) || announced.retract.contains_key(&key) {
            announced.owed_members.insert(key);
        }
    }

    /// Redis may not hold this user's count as the record says.
    pub(super) fn owe_user(&self, user: String) {
        self.announced().owed_users.insert(user);
    }

    /// Everything the record holds is owed (this node may have been swept).
    pub(super) fn owe_everything(&self) {
        let mut guard = self.announced();
        let announced = &mut *guard;
        let members = announced.members.keys().chain(announced.retract.keys());
        announced
            .owed_members
            .extend(members.cloned().collect::<Vec<_>>());
        let users: Vec<String> = announced.users.keys().cloned().collect();
        announced.owed_users.extend(users);
    }

    /// The hub, if attached and alive.
    pub(super) fn hub(&self) -> Option<std::sync::Arc<Hub>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    /// The channels this node needs.
    pub(super) fn wanted(&self) -> MutexGuard<'_, Wanted> {
        lock(&self.wanted)
    }

    /// Adds `channel` to what this node needs (the reconciler subscribes it).
    pub(super) fn want(&self, channel: String) {
        self.wanted().set(channel, true);
        self.reconcile.notify_one();
    }

    /// Removes `channel` from what this node needs (the reconciler unsubscribes it).
    pub(super) fn unwant(&self, channel: String) {
        self.wanted().set(channel, false);
        self.reconcile.notify_one();
    }

    /// The reconciler is to compare every wanted channel with every subscribed one.
    pub(super) fn reconcile_all(&self) {
        self.wanted().full = true;
        self.reconcile.notify_one();
    }

    /// The hub closed `room` (no local member left).
    ///
    /// The room is no longer heard, and its budget charge lapses one history lifetime from
    /// now.
    pub(super) fn close_room(&self, room: &RoomName) {
        {
            // Under the wanted lock, so a join's view completing meanwhile sees it closed
            // or closes it after (see `room_viewed`).
            let mut wanted = self.wanted();
            wanted.set(Channel::Room(room.clone()).name(), false);
            self.budget.closed(room, std::time::Instant::now());
        }
        self.reconcile.notify_one();
    }

    /// A join's view of `room` succeeded.
    ///
    /// `created`: it created the room's state in Redis. The budget counts the room as open
    /// while the hub still has it.
    pub(super) fn room_viewed(&self, room: &RoomName, created: bool, policy: &RoomPolicy) {
        let wanted = self.wanted();
        let open = wanted
            .channels
            .contains(&Channel::Room(room.clone()).name());
        if created {
            let now = std::time::Instant::now();
            self.budget
                .created(room, policy.history, policy.history_ttl, open, now);
        } else if open {
            self.budget.opened(room);
        }
    }

    /// Counts a command of the kind named `kind` refused without being run.
    ///
    /// The `reason` is `busy` (its queue was full), `open` (the breaker), `expired` (its
    /// deadline passed in the queue) or `room_budget`.
    pub(super) fn count_refused(&self, kind: &'static str, reason: &'static str) {
        if let Some(errors) = self.errors.get() {
            errors.refused(kind, reason);
        }
    }

    /// Counts a failed backplane operation.
    pub(super) fn count_error(&self, op: &'static str) {
        if let Some(errors) = self.errors.get() {
            errors.count(op);
        }
    }
}
