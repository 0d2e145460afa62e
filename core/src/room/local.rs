//! A room's order on a single node.
//!
//! It holds the room's sequence and epoch, its history ring, the replay of a recovering
//! join, and when an idle room may be forgotten.

use std::{sync::Arc, time::Instant};

use crate::{
    history::{History, Recovery, RoomCharge},
    session::Outbound,
};

/// A recovery request: the last sequence number a client saw, and its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since<'a> {
    /// The last `seq` received.
    pub seq: u64,
    /// The epoch it belongs to.
    pub epoch: &'a str,
}

/// A single node's room order: this node assigns sequence numbers and keeps history.
#[derive(Debug)]
pub struct Local {
    seq: u64,
    epoch: Arc<str>,
    /// `None` when the room's policy keeps no history (or the budget had no room).
    history: Option<History>,
    /// When a sweep first found the room with neither members nor history.
    idle_since: Option<Instant>,
    /// The room's share of the room budget, when it keeps history.
    _charge: Option<RoomCharge>,
}

impl Local {
    /// A room at sequence 0 of `epoch`, keeping `history` (with its budget charge) if any.
    pub fn new(epoch: Arc<str>, history: Option<(History, RoomCharge)>) -> Self {
        let (history, charge) = history.unzip();
        Self {
            seq: 0,
            epoch,
            history,
            idle_since: None,
            _charge: charge,
        }
    }

    /// The latest sequence number and its epoch.
    pub fn position(&self) -> (u64, Arc<str>) {
        (self.seq, self.epoch.clone())
    }

    /// Whether the room keeps history (and so outlives its last member).
    pub fn keeps_history(&self) -> bool {
        self.history.is_some()
    }

    /// The room is in use (a join or a publish): it is not idle.
    pub fn touch(&mut self) {
        self.idle_since = None;
    }

    /// Assigns the next sequence number and keeps the encoded message in the history.
    ///
    /// There is no sequence number when `volatile`. The message is encoded once with
    /// `encode`; returns both.
    pub fn order(
        &mut self,
        volatile: bool,
        now: Instant,
        encode: impl FnOnce(Option<u64>) -> Outbound,
    ) -> (Option<u64>, Outbound) {
        self.idle_since = None;
        let seq = (!volatile).then(|| {
            self.seq += 1;
            self.seq
        });
        let frame = encode(seq);
        if let (Some(seq), Some(history)) = (seq, self.history.as_mut()) {
            history.push(seq, frame.clone(), now);
        }
        (seq, frame)
    }

    /// What a join with `since` can replay at `now`.
    ///
    /// A session already in the room (`added` false) got every message live: nothing to
    /// replay.
    pub fn replay(&mut self, since: Option<Since<'_>>, added: bool, now: Instant) -> Recovery<'_> {
        if let Some(history) = self.history.as_mut() {
            history.prune(now);
        }
        match since {
            Some(since) if added && since.epoch == &*self.epoch => match &self.history {
                Some(history) => history.after(since.seq, self.seq),
                None if since.seq == self.seq => Recovery::Complete(Vec::new()),
                None => Recovery::Gap,
            },
            _ => Recovery::Gap,
        }
    }

    /// Whether a room can be forgotten at `now`.
    ///
    /// It can when it has no member and nothing to recover, and, for a room that keeps
    /// history, so for a whole history lifetime (a client that saw its sequence and epoch
    /// may still come back to it, even with nothing missed).
    pub fn is_expired(&mut self, has_members: bool, now: Instant) -> bool {
        if has_members {
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
