//! A hub's settings, and why it may refuse a new room.

use crate::policy::RoomPolicies;

/// Settings of a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's id, reported in `welcome` and the HTTP API.
    pub node_id: String,
    /// Room policies, first match wins.
    pub rooms: RoomPolicies,
    /// Bytes all rooms and their histories may hold together (`room_budget_mb`).
    pub room_budget: usize,
    /// Most members a presence listing names (`max_presence_members`).
    pub max_presence_members: usize,
    /// New rooms one user may bring into existence per second; 0: no limit.
    ///
    /// The burst is twice as many (`rooms_per_user_per_sec`).
    pub rooms_per_user_per_sec: u32,
}

impl HubConfig {
    /// A hub of node `node_id` with these room policies and the documented defaults.
    pub fn new(node_id: impl Into<String>, rooms: RoomPolicies) -> Self {
        Self {
            node_id: node_id.into(),
            rooms,
            room_budget: DEFAULT_ROOM_BUDGET,
            max_presence_members: crate::presence::DEFAULT_MAX_PRESENCE_MEMBERS,
            rooms_per_user_per_sec: DEFAULT_ROOMS_PER_USER_PER_SEC,
        }
    }
}

/// The default [`HubConfig::room_budget`]: 256 MiB.
pub const DEFAULT_ROOM_BUDGET: usize = 256 * 1024 * 1024;

/// The default [`HubConfig::rooms_per_user_per_sec`].
pub const DEFAULT_ROOMS_PER_USER_PER_SEC: u32 = 10;

/// Why the hub refused to bring a new room into existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomRefusal {
    /// The room budget is spent: no new room that would keep history.
    #[error("room budget exhausted: no new rooms with history for now")]
    BudgetSpent,
    /// The user brought too many new rooms into existence lately.
    #[error("too many new rooms: at most {0} per second")]
    TooManyNewRooms(u32),
}
