//! A room's members.
//!
//! It holds their sessions, how many each user has there, and the presence listing built
//! from them.

use std::{collections::HashMap, sync::Arc};

use indexmap::IndexMap;

use super::frames::presence_frame;
use crate::{
    presence::PresenceListing,
    protocol::{MemberInfo, PresenceEvent, RoomName},
    session::{Outbound, SessionHandle, SessionId, TransportKind},
};

/// Messages one fan-out queued, per transport (WebSocket, WebTransport).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout(pub [u64; 2]);

impl Fanout {
    /// Counts one message queued for `member`.
    pub fn add(&mut self, member: &SessionHandle) {
        self.0[transport_index(member.transport())] += 1;
    }

    /// Adds the counts of another fan-out.
    pub fn merge(&mut self, other: Fanout) {
        for (total, n) in self.0.iter_mut().zip(other.0) {
            *total += n;
        }
    }
}

/// The slot of `transport` in per-transport counts.
pub fn transport_index(transport: TransportKind) -> usize {
    match transport {
        TransportKind::WebSocket => 0,
        TransportKind::WebTransport => 1,
    }
}

/// The sessions in a room, in the order they joined.
#[derive(Debug)]
pub struct Members {
    sessions: IndexMap<SessionId, SessionHandle>,
    /// Sessions per user in this room, for user-level presence events.
    users: HashMap<Arc<str>, u32>,
    /// Whether members hear presence events (the room's policy).
    presence_events: bool,
    /// The presence listing of the members, until they change.
    listing: Option<Arc<PresenceListing>>,
}

/// The user key of a session: its user id, or `""` before it has one.
fn user_of(handle: &SessionHandle) -> Arc<str> {
    handle.user().cloned().unwrap_or_else(|| "".into())
}

impl Members {
    /// No member yet, in a room whose policy says whether it has `presence_events`.
    pub fn new(presence_events: bool) -> Self {
        Self {
            sessions: IndexMap::new(),
            users: HashMap::new(),
            presence_events,
            listing: None,
        }
    }

    /// Whether members hear presence events.
    pub fn presence_events(&self) -> bool {
        self.presence_events
    }

    /// Adds a session; returns whether it is its user's first session here.
    ///
    /// Returns `None` if it was a member already.
    pub fn add(&mut self, handle: &SessionHandle) -> Option<bool> {
        if self.sessions.insert(handle.id(), handle.clone()).is_some() {
            return None;
        }
        self.listing = None;
        let count = self.users.entry(user_of(handle)).or_insert(0);
        *count += 1;
        Some(*count == 1)
    }

    /// Removes a session; returns whether it was its user's last session here.
    ///
    /// Returns `None` if it was no member.
    pub fn remove(&mut self, handle: &SessionHandle) -> Option<bool> {
        self.sessions.swap_remove(&handle.id())?;
        self.listing = None;
        let user = user_of(handle);
        Some(match self.users.get_mut(&user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.users.remove(&user);
                true
            }
        })
    }

    /// Whether the session is a member.
    pub fn contains(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Number of member sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the room has no member.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The member sessions with their ids, in the order they joined.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &SessionHandle)> {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    /// The members who are not sessions of `user`: those told about that user's presence.
    pub fn others<'a>(
        &'a self,
        user: &'a str,
    ) -> impl Iterator<Item = (SessionId, &'a SessionHandle)> {
        self.iter()
            .filter(move |(_, m)| m.user().map(|u| &**u) != Some(user))
    }

    /// Single node: the presence `event` of `user` for the other members.
    ///
    /// Made only when the room's policy has presence events.
    pub fn announce(&self, room: &RoomName, event: PresenceEvent, user: &SessionHandle) {
        if !self.presence_events {
            return;
        }
        let user = user_of(user);
        let frame = presence_frame(room, event, &user);
        for (_, member) in self.others(&user) {
            member.send(frame.clone());
        }
    }

    /// Queues `frame` to every member but `exclude`; counts what was queued.
    pub fn fan_out(&self, frame: &Outbound, exclude: Option<SessionId>) -> Fanout {
        let mut counted = Fanout::default();
        for (id, member) in &self.sessions {
            if Some(*id) != exclude {
                member.send(frame.clone());
                counted.add(member);
            }
        }
        counted
    }

    /// At most `max` members, described as the API and presence listings do.
    ///
    /// They are described as on node `node`.
    pub fn infos(&self, max: usize, node: &str) -> Vec<MemberInfo> {
        self.sessions
            .values()
            .take(max)
            .map(|s| member_info(node, s))
            .collect()
    }

    /// The presence listing, with at most `max` members named.
    ///
    /// It is built once per change of the members.
    pub fn listing(&mut self, max: usize, node: &str) -> Arc<PresenceListing> {
        if let Some(listing) = &self.listing {
            return listing.clone();
        }
        let members = self.infos(max, node);
        let listing = Arc::new(PresenceListing::new(&members, self.len(), max));
        self.listing = Some(listing.clone());
        listing
    }
}

/// A session as the API and presence listings describe it, on node `node`.
pub fn member_info(node: &str, s: &SessionHandle) -> MemberInfo {
    MemberInfo {
        user: s.user().map(|u| u.to_string()).unwrap_or_default(),
        session: s.id_str().to_owned(),
        transport: s.transport().as_str().to_owned(),
        node: Some(node.to_owned()),
    }
}
