//! The room budget in cluster mode (`[limits] room_budget_mb`), kept per node.
//!
//! The publish and view scripts say when they created a room's state in Redis. This node
//! keeps an estimate of what each room with history it created costs Redis while the room
//! lives: a fixed [`ROOM_BYTES`] for its keys, plus its history
//! as this node wrote it (entries × their average size, at most the policy's `history`
//! entries, each with [`ENTRY_OVERHEAD`]). A room counts until one history lifetime after this node last
//! wrote to it or its last local member left (the lifetime its keys get in Redis). Once
//! the estimate reaches the budget, a publish or join that would create a new room with
//! history is refused (`limit_exceeded`, "room budget exhausted") and the script keeps
//! nothing.
//!
//! Rooms without history are neither counted nor tracked: their one small state hash
//! expires in Redis by itself, and counting them let fresh room names published to (which
//! take no new-room token in cluster mode) refuse every new room with history. The
//! tracking map is bounded by the budget: each entry (about 150 B here) stands for at
//! least [`ROOM_BYTES`] counted, and rooms with history are refused once the budget is
//! spent (a few more may be created by lanes that checked at the same time).
//!
//! What it does not count: rooms other nodes created (each node counts its own: the
//! cluster's rooms are bounded by nodes × budget), messages other nodes append to rooms
//! this node created, and a room's life extended by other nodes' members.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use gateway_core::protocol::RoomName;

/// What a room with history costs Redis before its entries, rounded up.
///
/// It covers the state hash (seq, epoch) and the stream with its first listpack node
/// (docs/cluster.md, "The room budget in Redis", has the `MEMORY USAGE` figures).
pub(super) const ROOM_BYTES: usize = 5 * 1024;
/// What a history entry costs beyond its meta and payload.
///
/// It covers the stream id, field names, listpack and radix-tree overhead (docs/cluster.md,
/// "The room budget in Redis", has the measurement).
pub(super) const ENTRY_OVERHEAD: usize = 256;

/// One room this node created.
#[derive(Debug)]
struct Charge {
    /// Entries this node wrote, and their bytes.
    entries: u64,
    entry_bytes: u64,
    /// The policy's `history` and lifetime.
    history: usize,
    ttl: Duration,
    /// Local members keep the room alive.
    open: bool,
    /// When it lapses, without members.
    until: Instant,
    /// What it is counted as now.
    counted: usize,
}

impl Charge {
    fn estimate(&self) -> usize {
        let kept = self.entries.min(self.history as u64);
        let average = self.entry_bytes.checked_div(self.entries).unwrap_or(0);
        let entries = kept.saturating_mul(average.saturating_add(ENTRY_OVERHEAD as u64));
        ROOM_BYTES.saturating_add(usize::try_from(entries).unwrap_or(usize::MAX))
    }
}

#[derive(Debug, Default)]
struct Rooms {
    rooms: HashMap<RoomName, Charge>,
    total: usize,
}

/// The estimate of this node's rooms in Redis, against the budget.
#[derive(Debug)]
pub(super) struct RoomBudget {
    limit: usize,
    rooms: Mutex<Rooms>,
}

impl RoomBudget {
    /// A budget of `limit` bytes.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            rooms: Mutex::new(Rooms::default()),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new room with `history` may be created.
    ///
    /// Always without history (not counted), else while the estimate is under the budget.
    pub(super) fn may_create(&self, history: usize) -> bool {
        history == 0 || self.rooms().total < self.limit
    }

    /// The bytes counted now.
    #[cfg(test)]
    pub(super) fn used(&self) -> usize {
        self.rooms().total
    }

    /// The rooms tracked now.
    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.rooms().rooms.len()
    }

    /// A script created `room`; `open`: by a join (a local member keeps it alive).
    pub(super) fn created(
        &self,
        room: &RoomName,
        history: usize,
        ttl: Duration,
        open: bool,
        now: Instant,
    ) {
        // Rooms without history are not counted (see the module's doc).
        if history == 0 {
            return;
        }
        let mut rooms = self.rooms();
        let mut charge = Charge {
            entries: 0,
            entry_bytes: 0,
            history,
            ttl,
            open,
            until: now + ttl,
            counted: 0,
        };
        charge.counted = charge.estimate();
        rooms.total = rooms.total.saturating_add(charge.counted);
        if let Some(old) = rooms.rooms.insert(room.clone(), charge) {
            rooms.total = rooms.total.saturating_sub(old.counted);
        }
    }

    /// This node wrote an entry of `bytes` to `room`'s history.
    pub(super) fn appended(&self, room: &RoomName, bytes: usize, now: Instant) {
        let mut guard = self.rooms();
        let rooms = &mut *guard;
        let Some(charge) = rooms.rooms.get_mut(room) else {
            return;
        };
        charge.entries = charge.entries.saturating_add(1);
        charge.entry_bytes = charge.entry_bytes.saturating_add(bytes as u64);
        charge.until = now + charge.ttl;
        let estimate = charge.estimate();
        rooms.total = rooms
            .total
            .saturating_sub(charge.counted)
            .saturating_add(estimate);
        charge.counted = estimate;
    }

    /// `room` has members on this node again.
    pub(super) fn opened(&self, room: &RoomName) {
        if let Some(charge) = self.rooms().rooms.get_mut(room) {
            charge.open = true;
        }
    }

    /// `room`'s last local member left: it lapses one history lifetime from now.
    pub(super) fn closed(&self, room: &RoomName, now: Instant) {
        if let Some(charge) = self.rooms().rooms.get_mut(room) {
            charge.open = false;
            charge.until = now + charge.ttl;
        }
    }

    /// Forgets the rooms whose keys have expired in Redis by now.
    pub(super) fn lapse(&self, now: Instant) {
        let mut guard = self.rooms();
        let rooms = &mut *guard;
        let mut freed = 0;
        rooms.rooms.retain(|_, c| {
            let keep = c.open || c.until > now;
            if !keep {
                freed = c.counted.saturating_add(freed);
            }
            keep
        });
        rooms.total = rooms.total.saturating_sub(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: usize) -> RoomName {
        RoomName::new(&format!("r{n}")).unwrap()
    }

    #[test]
    fn rooms_with_history_are_refused_once_the_estimate_reaches_the_budget() {
        let budget = RoomBudget::new(3 * ROOM_BYTES);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for n in 0..3 {
            assert!(budget.may_create(10));
            budget.created(&room(n), 10, ttl, false, now);
        }
        assert!(!budget.may_create(10), "spent");
        assert!(
            budget.may_create(0),
            "a room without history is never refused"
        );
        budget.created(&room(99), 0, ttl, false, now);
        assert_eq!(budget.tracked(), 3, "nor tracked");
        // History counts: entries up to the policy's `history`.
        budget.lapse(now + ttl);
        assert_eq!(budget.used(), 0, "all lapsed");
        budget.created(&room(0), 2, ttl, false, now);
        for _ in 0..5 {
            budget.appended(&room(0), 100, now);
        }
        assert_eq!(budget.used(), ROOM_BYTES + 2 * (100 + ENTRY_OVERHEAD));
    }

    #[test]
    fn a_room_with_local_members_does_not_lapse() {
        let budget = RoomBudget::new(10 * ROOM_BYTES);
        let now = Instant::now();
        let ttl = Duration::from_secs(1);
        budget.created(&room(1), 10, ttl, true, now);
        budget.lapse(now + 10 * ttl);
        assert_eq!(budget.used(), ROOM_BYTES);
        budget.closed(&room(1), now + 10 * ttl);
        budget.lapse(now + 10 * ttl + ttl / 2);
        assert_eq!(
            budget.used(),
            ROOM_BYTES,
            "one lifetime after the last member left"
        );
        budget.lapse(now + 12 * ttl);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn rooms_without_history_do_not_spend_the_budget_of_rooms_with_history() {
        // Fresh room names published to (no history) must not count, else they would
        // refuse every new room with history and fill the map.
        let budget = RoomBudget::new(3 * ROOM_BYTES);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for n in 0..100_000 {
            assert!(budget.may_create(0));
            budget.created(&room(n), 0, ttl, false, now);
        }
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.tracked(), 0);
        assert!(
            budget.may_create(10),
            "rooms with history are still created"
        );
    }

    #[test]
    fn a_huge_budget_does_not_overflow() {
        // `room_budget_mb` saturates to usize::MAX.
        let budget = RoomBudget::new(usize::MAX);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        budget.created(&room(0), 0, ttl, false, now);
        budget.created(&room(1), usize::MAX, ttl, false, now);
        for _ in 0..3 {
            budget.appended(&room(1), usize::MAX, now);
        }
        assert!(budget.used() >= ROOM_BYTES);
        budget.lapse(now + 2 * ttl);
        assert_eq!(budget.used(), 0);
    }
}
