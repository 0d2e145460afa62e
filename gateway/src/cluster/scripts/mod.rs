//! The Lua scripts the backplane runs in Redis, with their commands and typed replies.
//!
//! Each script is in its own `.lua` file.
//!
//! Scripts are loaded once (EVALSHA, falling back to EVAL after a Redis restart). On a
//! Redis Cluster each touches one slot: the keys it names share a hash tag.

mod node;
mod room;
mod user;

use gateway_core::policy::RoomPolicies;
use redis::Script;

pub(super) use user::{identity_of, TicketRequest};

/// The scripts, and how this backplane publishes.
pub(super) struct Scripts {
    publish: Script,
    view: Script,
    enter: Script,
    exit: Script,
    sweep: Script,
    sweep_list: Script,
    reserve_ticket: Script,
    uncount_ticket: Script,
    count_user: Script,
    release_dead: Script,
    /// A Redis Cluster: sharded pub/sub, single-slot steps, rooms tied to their master.
    cluster: bool,
    /// Room policies (a room state's lifetime once its last member left).
    policies: RoomPolicies,
}

/// The check of a room's budget both room-creating scripts start with (see the file).
const BUDGET: &str = include_str!("budget.lua");
/// The check of a room's master both room-creating scripts make next (see the file).
const SAME_MASTER: &str = include_str!("same_master.lua");

impl Scripts {
    /// The scripts for one Redis, or for a Redis Cluster (`cluster`).
    pub(super) fn new(cluster: bool, policies: RoomPolicies) -> Self {
        let room = |script: &str| Script::new(&format!("{BUDGET}{SAME_MASTER}{script}"));
        Self {
            publish: room(include_str!("publish.lua")),
            view: room(include_str!("view.lua")),
            enter: Script::new(include_str!("enter.lua")),
            exit: Script::new(include_str!("exit.lua")),
            sweep: Script::new(include_str!("sweep.lua")),
            sweep_list: Script::new(include_str!("sweep_list.lua")),
            reserve_ticket: Script::new(include_str!("reserve_ticket.lua")),
            uncount_ticket: Script::new(include_str!("uncount_ticket.lua")),
            count_user: Script::new(include_str!("count_user.lua")),
            release_dead: Script::new(include_str!("release_dead.lua")),
            cluster,
            policies,
        }
    }

    /// The command that publishes on room and user channels.
    fn publish_command(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The last argument of the publish and view scripts (see `same_master.lua`).
    fn same_master_flag(&self) -> &'static str {
        if self.cluster {
            "1"
        } else {
            "0"
        }
    }
}

/// A script's flag argument.
fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

/// A lifetime in milliseconds as the scripts take it (at least 1).
fn millis(d: std::time::Duration) -> u64 {
    d.as_millis().max(1) as u64
}
