//! A room's message history: its last messages, already encoded.
//!
//! They are kept for a bounded count and time so that a client that dropped can recover
//! what it missed (PROTOCOL.md section 7). Pure data: callers pass `now`.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::session::Outbound;

/// Bytes counted per kept message besides its frame's bytes.
///
/// They cover the entry and its queue slot, the frame's shared allocation and the
/// allocator's rounding (measured, README "Security").
const ENTRY_OVERHEAD: usize = 128;

/// Bytes counted per room besides its messages.
///
/// They cover its state, lock, map entry, epoch and name (measured, README "Security").
pub const ROOM_COST: usize = 1280;

/// The memory all rooms and their histories may hold together (`room_budget_mb`).
///
/// When it is spent, a room makes room from its own oldest messages, a room with none keeps
/// nothing more, and no new room that would keep history is created (the hub refuses it).
#[derive(Debug)]
pub struct HistoryBudget {
    used: AtomicUsize,
    max: usize,
}

impl HistoryBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether one more room fits.
    pub fn fits_a_room(&self) -> bool {
        self.fits(ROOM_COST)
    }

    /// Counts a room until the returned charge is dropped.
    ///
    /// It counts whether or not the room fits: a room with members is created anyway,
    /// without history (see the hub).
    pub fn charge_room(self: &Arc<Self>) -> RoomCharge {
        self.take(ROOM_COST);
        RoomCharge {
            budget: self.clone(),
        }
    }

    fn fits(&self, bytes: usize) -> bool {
        self.used() + bytes <= self.max
    }

    fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A room's share of the budget, given back when the room is forgotten.
#[derive(Debug)]
pub struct RoomCharge {
    budget: Arc<HistoryBudget>,
}

impl Drop for RoomCharge {
    fn drop(&mut self) {
        self.budget.give_back(ROOM_COST);
    }
}

/// One kept message.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    frame: Outbound,
    stored: Instant,
}

/// The last `capacity` non-volatile messages of a room, each kept at most `ttl`.
#[derive(Debug)]
pub struct History {
    entries: VecDeque<Entry>,
    capacity: usize,
    ttl: Duration,
    budget: Arc<HistoryBudget>,
}

/// What a recovery request finds in a history.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery<'a> {
    /// Every message after the client's `since` is held: these, in order (maybe none).
    Complete(Vec<&'a Outbound>),
    /// Some missed message is no longer held (or `since` is ahead of the room).
    Gap,
}

impl History {
    /// An empty history drawing on `budget`.
    ///
    /// It holds at most `capacity` messages, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration, budget: Arc<HistoryBudget>) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity,
            ttl,
            budget,
        }
    }

    /// Keeps message `seq`, dropping the oldest beyond the capacity or the shared budget.
    ///
    /// Sequences only grow. Returns whether it was kept: when the budget is spent and this
    /// history has nothing left to give, it is not (its recovery will report a gap).
    pub fn push(&mut self, seq: u64, frame: Outbound, now: Instant) -> bool {
        self.prune(now);
        let size = Self::size(&frame);
        if self.capacity == 0 {
            return false;
        }
        if self.entries.len() == self.capacity {
            self.pop_oldest();
        }
        while !self.budget.fits(size) && !self.entries.is_empty() {
            self.pop_oldest();
        }
        if !self.budget.fits(size) {
            return false;
        }
        self.budget.take(size);
        self.entries.push_back(Entry {
            seq,
            frame,
            stored: now,
        });
        true
    }

    /// Drops messages older than the lifetime.
    pub fn prune(&mut self, now: Instant) {
        while let Some(e) = self.entries.front() {
            if now.saturating_duration_since(e.stored) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.budget.give_back(Self::size(&e.frame));
        }
    }

    fn size(frame: &Outbound) -> usize {
        let bytes = match frame {
            Outbound::Text(b) | Outbound::Binary(b) | Outbound::Volatile(b) => b.len(),
            Outbound::Ping => 0,
        };
        bytes + ENTRY_OVERHEAD
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How long a message is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The messages after `since` for a room whose latest sequence is `latest`.
    ///
    /// All of them if every one is still held, else [`Recovery::Gap`].
    pub fn after(&self, since: u64, latest: u64) -> Recovery<'_> {
        if since > latest {
            return Recovery::Gap;
        }
        if since == latest {
            return Recovery::Complete(Vec::new());
        }
        // Held messages are consecutive; the first missed one must be among them.
        match self.entries.front() {
            Some(first) if first.seq <= since + 1 => Recovery::Complete(
                self.entries
                    .iter()
                    .filter(|e| e.seq > since)
                    .map(|e| &e.frame)
                    .collect(),
            ),
            _ => Recovery::Gap,
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        while !self.entries.is_empty() {
            self.pop_oldest();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(n: u64) -> Outbound {
        Outbound::Text(Bytes::from(n.to_string()))
    }

    fn seqs(r: Recovery<'_>) -> Option<Vec<String>> {
        match r {
            Recovery::Complete(frames) => Some(
                frames
                    .into_iter()
                    .map(|f| match f {
                        Outbound::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
                        other => panic!("{other:?}"),
                    })
                    .collect(),
            ),
            Recovery::Gap => None,
        }
    }

    #[test]
    fn recovers_exactly_the_missed_messages_or_reports_a_gap() {
        let t0 = Instant::now();
        let mut h = History::new(3, Duration::from_secs(60), HistoryBudget::new(1 << 20));
        for seq in 1..=5 {
            h.push(seq, frame(seq), t0);
        }
        assert_eq!(h.len(), 3, "bounded by the capacity");
        assert_eq!(
            seqs(h.after(2, 5)),
            Some(vec!["3".into(), "4".into(), "5".into()])
        );
        assert_eq!(seqs(h.after(4, 5)), Some(vec!["5".into()]));
        assert_eq!(seqs(h.after(5, 5)), Some(vec![]));
        assert_eq!(seqs(h.after(1, 5)), None, "message 2 is no longer held");
        assert_eq!(seqs(h.after(6, 5)), None, "ahead of the room");
    }

    #[test]
    fn messages_expire_after_their_lifetime() {
        let t0 = Instant::now();
        let mut h = History::new(10, Duration::from_secs(5), HistoryBudget::new(1 << 20));
        h.push(1, frame(1), t0);
        h.push(2, frame(2), t0 + Duration::from_secs(3));
        h.prune(t0 + Duration::from_secs(5));
        assert_eq!(h.len(), 1);
        assert_eq!(seqs(h.after(0, 2)), None);
        assert_eq!(seqs(h.after(1, 2)), Some(vec!["2".into()]));
        h.prune(t0 + Duration::from_secs(8));
        assert!(h.is_empty());
    }

    #[test]
    fn all_histories_share_one_memory_budget() {
        let t0 = Instant::now();
        let entry = History::size(&frame(1));
        let budget = HistoryBudget::new(3 * entry);
        let mut a = History::new(10, Duration::from_secs(60), budget.clone());
        let mut b = History::new(10, Duration::from_secs(60), budget.clone());
        assert!(a.push(1, frame(1), t0) && a.push(2, frame(2), t0) && a.push(3, frame(3), t0));
        // The budget is spent: a room with nothing to give keeps nothing...
        assert!(!b.push(1, frame(1), t0));
        assert!(b.is_empty());
        // ...and a room with messages makes room from its own oldest.
        assert!(a.push(4, frame(4), t0));
        assert_eq!(
            seqs(a.after(1, 4)),
            Some(vec!["2".into(), "3".into(), "4".into()])
        );
        assert_eq!(budget.used(), 3 * entry);
        drop(a);
        assert_eq!(budget.used(), 0, "a forgotten room gives its memory back");
        assert!(b.push(1, frame(1), t0));
    }
}
