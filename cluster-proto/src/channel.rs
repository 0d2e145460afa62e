//! The names of what the cluster keeps in Redis: channels, keys and their hash tags.
//!
//! A room's channel and keys share the hash tag `{room:NAME}`, a user's `{user:ID}`, a
//! node's `{node:ID}`: on a Redis Cluster each lives in one slot, so every script touches
//! one slot and a room's channel is a sharded one on the same master as its keys.

use gateway_core::protocol::{MemberInfo, RoomName};

/// A channel this node can hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A room's messages and presence events.
    Room(RoomName),
    /// A user's direct messages.
    User(String),
    /// Requests for every node (API disconnects).
    Control,
}

impl Channel {
    /// Its Redis name; the braces are the hash tag its keys share.
    pub fn name(&self) -> String {
        match self {
            Channel::Room(room) => format!("gw:{{room:{}}}", room.as_str()),
            Channel::User(user) => format!("gw:{{user:{user}}}"),
            Channel::Control => CONTROL.to_owned(),
        }
    }

    /// The channel a Redis name is, if any.
    pub fn parse(name: &str) -> Option<Self> {
        if name == CONTROL {
            return Some(Channel::Control);
        }
        let inner = name.strip_prefix("gw:{")?.strip_suffix('}')?;
        if let Some(room) = inner.strip_prefix("room:") {
            return RoomName::new(room).ok().map(Channel::Room);
        }
        inner
            .strip_prefix("user:")
            .map(|u| Channel::User(u.to_owned()))
    }
}

/// The control channel's name.
const CONTROL: &str = "gw:control";

/// Whether `channel` is a room's or a user's rather than the control channel.
///
/// Room and user channels are sharded on a cluster; the control channel is broadcast to
/// every node.
pub fn is_sharded(channel: &str) -> bool {
    channel.starts_with("gw:{")
}

/// The keys of one room.
pub struct Keys {
    /// A hash with the room's `seq` and `epoch`.
    ///
    /// It is one key, so they expire (or are evicted) together and a restarted sequence
    /// always has a new epoch.
    pub state: String,
    /// The room's history: a capped stream of its messages.
    pub stream: String,
    /// The room's members on every node.
    pub members: String,
    /// Per user, their sessions in the room.
    pub users: String,
}

impl Keys {
    /// The keys of `room`.
    pub fn room(room: &str) -> Self {
        Self {
            state: format!("gw:{{room:{room}}}:state"),
            stream: format!("gw:{{room:{room}}}:stream"),
            members: format!("gw:{{room:{room}}}:members"),
            users: format!("gw:{{room:{room}}}:users"),
        }
    }
}

/// The set of every node's id.
pub const NODES: &str = "gw:{nodes}";

/// A node's liveness key. A node's keys share its hash tag (one slot on a cluster).
pub fn node_key(node: &str) -> String {
    format!("gw:{{node:{node}}}")
}

/// The set of a node's room memberships, for the sweep after it died.
pub fn node_members_key(node: &str) -> String {
    format!("gw:{{node:{node}}}:members")
}

/// The set of users with sessions on a node, for the sweep after it died.
pub fn node_users_key(node: &str) -> String {
    format!("gw:{{node:{node}}}:users")
}

/// A user's sessions per node (field: node id, value: its count).
///
/// It serves the cluster-wide per-user connection limit.
pub fn user_sessions_key(user: &str) -> String {
    format!("gw:{{user:{user}}}:sessions")
}

/// A ticket's key.
pub fn ticket_key(ticket: &str) -> String {
    format!("gw:{{ticket:{ticket}}}")
}

/// The key counting a user's unredeemed tickets.
pub fn ticket_count_key(user: &str) -> String {
    format!("gw:{{user:{user}}}:tickets")
}

/// One membership as a node's set holds it: events flag, room, session, user.
pub fn membership(room: &RoomName, member: &MemberInfo, events: bool) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        u8::from(events),
        room.as_str(),
        member.session,
        member.user
    )
}

/// A membership as [`membership`] wrote it: events flag, room, session, user.
pub fn parse_membership(entry: &str) -> Option<(bool, RoomName, &str, &str)> {
    let mut parts = entry.splitn(4, '\n');
    let (Some(events), Some(room), Some(session), Some(user)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((events == "1", RoomName::new(room).ok()?, session, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_and_strangers_are_ignored() {
        let room = Channel::Room(RoomName::new("lobby:1").unwrap()).name();
        assert_eq!(room, "gw:{room:lobby:1}");
        assert!(matches!(Channel::parse(&room), Some(Channel::Room(r)) if r.as_str() == "lobby:1"));
        assert!(matches!(Channel::parse("gw:{user:ann}"), Some(Channel::User(u)) if u == "ann"));
        assert_eq!(Channel::parse("gw:control"), Some(Channel::Control));
        assert!(Channel::parse("other").is_none());
        assert!(Channel::parse("gw:{room:bad name}").is_none());
        assert!(is_sharded(&room) && !is_sharded(&Channel::Control.name()));
    }

    #[test]
    fn memberships_round_trip() {
        let room = RoomName::new("r:1").unwrap();
        let member = MemberInfo {
            user: "ann".into(),
            session: "s1".into(),
            transport: String::new(),
            node: None,
        };
        let entry = membership(&room, &member, true);
        assert_eq!(entry, "1\nr:1\ns1\nann");
        assert_eq!(parse_membership(&entry), Some((true, room, "s1", "ann")));
        assert_eq!(parse_membership("1\nbad room\ns\nu"), None);
        assert_eq!(parse_membership("1\nr"), None);
    }
}
