//! The backplane: how a hub tells other nodes about publishes and direct sends.
//!
//! The hub assigns sequence numbers and delivers to its own sessions itself; a backplane
//! carries the already-encoded frame to the other nodes of a cluster. The embedded default,
//! [`LocalBackplane`], is a single node: there is nobody else to tell.

use crate::{protocol::RoomName, session::Outbound};

/// Carries encoded frames to the other nodes of a cluster.
pub trait Backplane: Send + Sync + 'static {
    /// A short name for logs and `/healthz` details.
    fn name(&self) -> &'static str;

    /// A frame was published to `room` on this node.
    fn room_published(&self, room: &RoomName, frame: &Outbound);

    /// A frame was sent to every session of `user` from this node.
    /// Returns whether another node holds a session of that user.
    fn user_sent(&self, user: &str, frame: &Outbound) -> bool;
}

/// The in-process backplane of a single node.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBackplane;

impl Backplane for LocalBackplane {
    fn name(&self) -> &'static str {
        "local"
    }

    fn room_published(&self, _room: &RoomName, _frame: &Outbound) {}

    fn user_sent(&self, _user: &str, _frame: &Outbound) -> bool {
        false
    }
}
