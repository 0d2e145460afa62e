//! Presence listings: the members of a room as a `presence` request lists them.
//!
//! They are bounded in size and shared between the sessions that ask.
//!
//! A listing names at most a configured number of members (then it says `truncated` and the
//! total `count`), and is encoded once: every session that asks gets the same bytes. In
//! cluster mode a listing costs a lookup in the store, so [`ListingCache`] makes the sessions
//! that ask about one room within a short time share one lookup.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    backplane::{ClusterUnavailable, Completion},
    protocol::{AckFields, MemberInfo, RequestId, RoomName, ServerFrame},
    session::Outbound,
};

/// The default most members a listing names (CONFIG.md `max_presence_members`).
pub const DEFAULT_MAX_PRESENCE_MEMBERS: usize = 1000;

/// How long a cluster-wide listing is served again to sessions that ask after it.
pub const LISTING_TTL: Duration = Duration::from_secs(1);

/// Rooms whose cluster-wide listings are kept at once; beyond, new listings are not kept.
const MAX_CACHED_ROOMS: usize = 256;

/// Rooms whose listings may be looked up at once; beyond, a request fails at once.
const MAX_LOOKUPS: usize = 1024;

/// A room's members as a `presence` ack lists them, encoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceListing {
    /// The listed members as a JSON array.
    members_json: Bytes,
    /// All members, also those left out.
    count: usize,
    /// Whether members were left out.
    truncated: bool,
}

impl PresenceListing {
    /// Lists at most `max` of `members` (`count` of them in all).
    ///
    /// The members' `node` is not listed (it is for the HTTP API).
    pub fn new<'a>(
        members: impl IntoIterator<Item = &'a MemberInfo>,
        count: usize,
        max: usize,
    ) -> Self {
        let listed: Vec<MemberRef<'a>> = members
            .into_iter()
            .take(max)
            .map(|m| MemberRef {
                user: &m.user,
                session: &m.session,
                transport: &m.transport,
            })
            .collect();
        let truncated = listed.len() < count;
        Self {
            members_json: Bytes::from(serde_json::to_vec(&listed).expect("members serialize")),
            count,
            truncated,
        }
    }

    /// The listing of a room without members.
    pub fn empty() -> Self {
        Self::new([], 0, 0)
    }

    /// All members of the room.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether the listing was cut.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The `presence` ack for request `id` about `room`.
    pub fn ack(&self, id: Option<&RequestId>, room: &str) -> Outbound {
        let fields = AckFields {
            room: Some(room.to_owned()),
            count: Some(self.count),
            truncated: self.truncated.then_some(true),
            ..Default::default()
        };
        let head = serde_json::to_vec(&ServerFrame::Ack {
            id,
            fields: &fields,
        })
        .expect("acks serialize");
        // `{...}` gets `,"members":[...]` before its closing brace.
        let mut frame = Vec::with_capacity(head.len() + 12 + self.members_json.len());
        frame.extend_from_slice(&head[..head.len() - 1]);
        frame.extend_from_slice(b",\"members\":");
        frame.extend_from_slice(&self.members_json);
        frame.push(b'}');
        Outbound::Text(Bytes::from(frame))
    }
}

/// A member as listed: without its node.
#[derive(serde::Serialize)]
struct MemberRef<'a> {
    user: &'a str,
    session: &'a str,
    transport: &'a str,
}

/// What asks for a listing gets.
pub type ListingResult = Result<Arc<PresenceListing>, ClusterUnavailable>;

/// What [`ListingCache::lookup`] decided.
pub enum Lookup {
    /// A fresh listing was at hand: the completion has been called.
    Served,
    /// A lookup of the room is under way: the completion waits for it.
    Joined,
    /// The caller must look the room up and hand the outcome to [`ListingCache::complete`].
    ///
    /// The completion waits for it.
    Start,
}

/// Cluster mode: listings being looked up and those looked up recently.
///
/// Listings being looked up are kept with the sessions waiting for them; recent ones are
/// those looked up within [`LISTING_TTL`].
#[derive(Default)]
pub struct ListingCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Per room being looked up: the sessions waiting, and whether membership changed.
    ///
    /// The flag says whether this node's membership changed since the lookup started (then
    /// its answer is not kept).
    in_flight: HashMap<RoomName, (Vec<Completion<ListingResult>>, bool)>,
    fresh: HashMap<RoomName, (Instant, Arc<PresenceListing>)>,
}

impl std::fmt::Debug for ListingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListingCache").finish_non_exhaustive()
    }
}

impl ListingCache {
    /// Serves `done` from a listing of `room` fresh at `now`, or makes it wait.
    ///
    /// It waits for the lookup under way, or for one the caller must start.
    pub fn lookup(&self, room: &RoomName, now: Instant, done: Completion<ListingResult>) -> Lookup {
        let mut state = self.lock();
        if let Some((at, listing)) = state.fresh.get(room) {
            if now.saturating_duration_since(*at) < LISTING_TTL {
                let listing = listing.clone();
                drop(state);
                done(Ok(listing));
                return Lookup::Served;
            }
        }
        let lookups = state.in_flight.len();
        match state.in_flight.get_mut(room) {
            Some((waiting, _)) => {
                waiting.push(done);
                Lookup::Joined
            }
            None if lookups >= MAX_LOOKUPS => {
                drop(state);
                done(Err(ClusterUnavailable::Busy));
                Lookup::Served
            }
            None => {
                state.in_flight.insert(room.clone(), (vec![done], false));
                Lookup::Start
            }
        }
    }

    /// The lookup of `room` started at `started` came back.
    ///
    /// Every waiting session gets it, and a listing is kept for those who ask within
    /// [`LISTING_TTL`] of `started`.
    pub fn complete(&self, room: &RoomName, started: Instant, outcome: ListingResult) {
        let waiting = {
            let mut state = self.lock();
            let (waiting, changed) = state.in_flight.remove(room).unwrap_or_default();
            if let (Ok(listing), false) = (&outcome, changed) {
                if state.fresh.len() >= MAX_CACHED_ROOMS {
                    state
                        .fresh
                        .retain(|_, (at, _)| started.saturating_duration_since(*at) < LISTING_TTL);
                }
                if state.fresh.len() < MAX_CACHED_ROOMS {
                    state.fresh.insert(room.clone(), (started, listing.clone()));
                }
            }
            waiting
        };
        for done in waiting {
            done(outcome.clone());
        }
    }

    /// This node's membership of `room` changed: a listing kept from before is not served.
    pub fn invalidate(&self, room: &RoomName) {
        let mut state = self.lock();
        state.fresh.remove(room);
        if let Some((_, changed)) = state.in_flight.get_mut(room) {
            *changed = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn member(n: usize) -> MemberInfo {
        MemberInfo {
            user: format!("u{n}"),
            session: format!("s{n}"),
            transport: "websocket".into(),
            node: Some("node".into()),
        }
    }

    fn json(frame: Outbound) -> Value {
        match frame {
            Outbound::Text(b) => serde_json::from_slice(&b).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listing_is_cut_at_the_maximum_and_says_so() {
        let members: Vec<MemberInfo> = (0..5).map(member).collect();
        let cut = PresenceListing::new(&members, 5, 2);
        let v = json(cut.ack(Some(&RequestId(7.into())), "r"));
        assert_eq!(v["type"], "ack");
        assert_eq!(v["id"], 7);
        assert_eq!(v["room"], "r");
        assert_eq!(v["count"], 5);
        assert_eq!(v["truncated"], true);
        assert_eq!(
            v["members"],
            serde_json::json!([
                {"user":"u0","session":"s0","transport":"websocket"},
                {"user":"u1","session":"s1","transport":"websocket"}
            ])
        );
        let whole = json(PresenceListing::new(&members, 5, 10).ack(None, "r"));
        assert_eq!(whole["members"].as_array().unwrap().len(), 5);
        assert_eq!(whole.get("truncated"), None);
        assert_eq!(whole["count"], 5);
    }

    #[test]
    fn sessions_asking_together_share_one_lookup_and_a_fresh_listing() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = ListingCache::default();
        let room = RoomName::new("big").unwrap();
        let t0 = Instant::now();
        let answered = Arc::new(AtomicUsize::new(0));
        let done = || {
            let answered = answered.clone();
            Box::new(move |r: ListingResult| {
                if let Ok(listing) = r {
                    assert_eq!(listing.count(), 3);
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }) as Completion<ListingResult>
        };
        assert!(matches!(cache.lookup(&room, t0, done()), Lookup::Start));
        for _ in 0..23 {
            assert!(matches!(cache.lookup(&room, t0, done()), Lookup::Joined));
        }
        let members: Vec<MemberInfo> = (0..3).map(member).collect();
        cache.complete(
            &room,
            t0,
            Ok(Arc::new(PresenceListing::new(&members, 3, 10))),
        );
        assert_eq!(
            answered.load(Ordering::SeqCst),
            24,
            "one lookup for 24 sessions"
        );
        let soon = t0 + LISTING_TTL / 2;
        assert!(matches!(cache.lookup(&room, soon, done()), Lookup::Served));
        // Stale, or invalidated by a membership change here: looked up again.
        assert!(matches!(
            cache.lookup(&room, t0 + LISTING_TTL, done()),
            Lookup::Start
        ));
        cache.complete(
            &room,
            t0 + LISTING_TTL,
            Ok(Arc::new(PresenceListing::new(&members, 3, 10))),
        );
        cache.invalidate(&room);
        assert!(matches!(cache.lookup(&room, soon, done()), Lookup::Start));
        // A change while the lookup runs: its answer serves the waiting, but is not kept.
        cache.invalidate(&room);
        cache.complete(
            &room,
            soon,
            Ok(Arc::new(PresenceListing::new(&members, 3, 10))),
        );
        assert!(matches!(cache.lookup(&room, soon, done()), Lookup::Start));
        cache.complete(&room, soon, Err(ClusterUnavailable::Unavailable));
        assert!(
            matches!(cache.lookup(&room, soon, done()), Lookup::Start),
            "a failure is not kept"
        );
    }
}
