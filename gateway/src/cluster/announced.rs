//! This node's record of what Redis should list for it, and what it still owes Redis.

use std::collections::{HashMap, HashSet};

use gateway_core::protocol::{MemberInfo, RoomName};

/// Ended memberships this node keeps to unlist from Redis (about 300 B each).
///
/// Past it, it forgets them and sweeps its own listings at the next heartbeat Redis
/// answers, then lists again what it holds: an outage of any length costs bounded memory.
const MAX_RETRACT: usize = 16_384;

/// What this node has told Redis it holds, and what it still owes Redis.
///
/// What it told is its record, the truth Redis is made to match. What it owes is writes
/// that failed or were refused, made again at the next heartbeat, and everything again
/// after its liveness expired (it may have been swept).
#[derive(Default)]
pub(super) struct Announced {
    /// Room memberships: (room, session) to the member and its presence-events flag.
    pub(super) members: HashMap<(RoomName, String), (MemberInfo, bool)>,
    /// Memberships that ended but may still be listed in Redis.
    pub(super) retract: HashMap<(RoomName, String), (MemberInfo, bool)>,
    /// Sessions per user counted towards the cluster-wide limit.
    pub(super) users: HashMap<String, u32>,
    /// Memberships whose listing Redis may not match.
    pub(super) owed_members: HashSet<(RoomName, String)>,
    /// Users whose count Redis may not match.
    pub(super) owed_users: HashSet<String>,
    /// Sweeps of this node's own listings asked for, and the one the keep-alive last made.
    ///
    /// A sweep is asked for when `retract` overflowed.
    pub(super) resweep_asked: u64,
    pub(super) resweep_done: u64,
}

impl Announced {
    /// Keeps `retract` within [`MAX_RETRACT`].
    ///
    /// `owed_members`, a subset of `members` and `retract`, is kept within it too: past it,
    /// a sweep of this node's own listings replaces them.
    pub(super) fn bound(&mut self) {
        if self.retract.len() <= MAX_RETRACT {
            return;
        }
        self.retract = HashMap::new();
        let members = &self.members;
        self.owed_members.retain(|k| members.contains_key(k));
        self.resweep_asked += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_memberships_kept_to_unlist_are_bounded() {
        let mut a = Announced::default();
        let member = |n: usize| MemberInfo {
            user: format!("u{n}"),
            session: format!("s{n}"),
            transport: String::new(),
            node: None,
        };
        let room = RoomName::new("r").unwrap();
        a.members
            .insert((room.clone(), "live".into()), (member(0), false));
        a.owed_members.insert((room.clone(), "live".into()));
        for n in 0..3 * MAX_RETRACT {
            let key = (room.clone(), format!("s{n}"));
            a.retract.insert(key.clone(), (member(n), false));
            a.owed_members.insert(key);
            a.bound();
            assert!(a.retract.len() <= MAX_RETRACT);
            assert!(a.owed_members.len() <= MAX_RETRACT + 1);
        }
        assert!(
            a.resweep_asked > 0,
            "a sweep of its own listings replaces them"
        );
        assert!(
            a.owed_members.contains(&(room, "live".into())),
            "a live membership stays owed"
        );
    }
}
