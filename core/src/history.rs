//! A room's message history: its last messages, already encoded, kept for a bounded count
//! and time so that a client that dropped can recover what it missed (PROTOCOL.md section 7).
//! Pure data: callers pass `now`.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::session::Outbound;

/// One kept message.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    frame: Outbound,
    stored: Instant,
}

/// The last `capacity` non-volatile messages of a room, each kept at most `ttl`.
#[derive(Debug, Clone)]
pub struct History {
    entries: VecDeque<Entry>,
    capacity: usize,
    ttl: Duration,
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
    /// An empty history of at most `capacity` messages, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity,
            ttl,
        }
    }

    /// Keeps message `seq` (sequences only grow), dropping the oldest beyond the capacity.
    pub fn push(&mut self, seq: u64, frame: Outbound, now: Instant) {
        self.prune(now);
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            seq,
            frame,
            stored: now,
        });
    }

    /// Drops messages older than the lifetime.
    pub fn prune(&mut self, now: Instant) {
        while let Some(e) = self.entries.front() {
            if now.saturating_duration_since(e.stored) < self.ttl {
                break;
            }
            self.entries.pop_front();
        }
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

    /// The messages after `since` for a room whose latest sequence is `latest`: all of
    /// them if every one is still held, else [`Recovery::Gap`].
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
        let mut h = History::new(3, Duration::from_secs(60));
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
        let mut h = History::new(10, Duration::from_secs(5));
        h.push(1, frame(1), t0);
        h.push(2, frame(2), t0 + Duration::from_secs(3));
        h.prune(t0 + Duration::from_secs(5));
        assert_eq!(h.len(), 1);
        assert_eq!(seqs(h.after(0, 2)), None);
        assert_eq!(seqs(h.after(1, 2)), Some(vec!["2".into()]));
        h.prune(t0 + Duration::from_secs(8));
        assert!(h.is_empty());
    }
}
