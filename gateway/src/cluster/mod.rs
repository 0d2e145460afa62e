//! Cluster mode on Redis (`[cluster] redis`).
//!
//! The [`RedisCluster`] backplane orders every room's messages cluster-wide and carries
//! direct messages between nodes. The design is docs/cluster.md; what it covers today is
//! the README's "Scaling out".
//!
//! Split like quinn, I/O apart from the rules:
//! - `channel` (channel and key names, hash tags) and `message` (the typed channel
//!   message and its encoding) come from `gateway_cluster_proto`; `scripts`: the Lua
//!   scripts (`.lua` files) and their typed replies; `follower`: the pub/sub
//!   connection's state machine (subscribe, catch up, deliver, resync), with no I/O.
//! - The `worker` runs the hub's `command`s in bounded, ordered lanes per kind of
//!   operation (one room's commands in order, one user's in order) over a small pool of
//!   multiplexed connections (`conn`: one Redis, or a Redis Cluster where each script
//!   touches one slot), behind a circuit `breaker`; the room `budget` bounds the
//!   rooms this node creates in Redis.
//! - The `subscriber` task holds the pub/sub connection (sharded on a cluster) and does
//!   what the follower calls for, handing messages to the hub through `hub` (the one
//!   place the backplane calls the hub); the `reconcile`r brings its subscriptions to
//!   the channels `wanted`; the `keep_alive` task refreshes this node's liveness,
//!   sweeps dead nodes, and makes again the writes this node still owes Redis (its
//!   record: `announced`).
//! - Every failure is one [`ClusterError`], mapped to the hub's `ClusterUnavailable` in
//!   one place.

mod announced;
mod breaker;
mod budget;
mod command;
mod conn;
mod error;
mod follower;
mod hub;
mod keep_alive;
mod reconcile;
mod scripts;
mod shared;
mod subscriber;
mod wanted;
mod worker;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use gateway_core::{
    auth::Identity,
    backplane::{
        completion, Backplane, Cluster, ClusterPublish, ClusterUnavailable, Completion, RoomView,
    },
    hub::Hub,
    policy::RoomPolicies,
    protocol::{CloseReason, MemberInfo, Payload, RoomName},
    tickets::{ticket_value, MAX_TICKETS_PER_USER},
};

use announced::Announced;
use channel::Channel;
use command::Command;
use conn::Target;
pub use error::ClusterError;
use follower::Follower;
use gateway_cluster_proto::{channel, message};
use shared::Shared;
use wanted::Wanted;
use worker::Lanes;

use crate::config::RedisTarget;

/// The Redis backplane.
pub struct RedisCluster {
    lanes: Arc<Lanes>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster").finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Starts the worker, keep-alive and subscriber tasks for `redis`.
    ///
    /// `redis` is one Redis, or a Redis Cluster; rooms this node creates in Redis are held
    /// to `room_budget` bytes. Redis need not be up yet: until it is, operations fail with
    /// "cluster unavailable" and `/healthz` says `degraded`.
    pub fn start(
        redis: &RedisTarget,
        policies: RoomPolicies,
        node: &str,
        heartbeat: Duration,
        room_budget: usize,
    ) -> Result<Arc<Self>, ClusterError> {
        let target = Target::new(redis).map_err(ClusterError::Url)?;
        let shared = Arc::new(Shared {
            follower: Mutex::new(Follower::new(subscriber::retry(&target))),
            errors: OnceLock::new(),
            // Every node hears the control channel.
            wanted: Mutex::new(Wanted {
                channels: HashSet::from([Channel::Control.name()]),
                ..Wanted::default()
            }),
            reconcile: tokio::sync::Notify::new(),
            sink: tokio::sync::Mutex::new(None),
            subscribed: AtomicBool::new(false),
            hub: OnceLock::new(),
            policies,
            node: node.to_owned(),
            announced: Mutex::new(Announced::default()),
            breaker: breaker::Breaker::default(),
            budget: budget::RoomBudget::new(room_budget),
            resyncing: AtomicBool::new(false),
        });
        let lanes = Arc::new(Lanes::start(target.clone(), shared.clone()));
        tokio::spawn(subscriber::run(target.clone(), shared.clone()));
        tokio::spawn(reconcile::reconcile(shared.clone()));
        let keep_alive = keep_alive::keep_alive(target, shared.clone(), heartbeat, lanes.clone());
        tokio::spawn(keep_alive);
        Ok(Arc::new(Self { lanes, shared }))
    }

    /// Connects the hub the subscriber delivers to.
    pub fn attach(&self, hub: &Arc<Hub>) {
        let _ = self.shared.hub.set(Arc::downgrade(hub));
    }

    /// Counts failed backplane operations in `errors` from now on.
    pub fn count_errors_in(&self, errors: crate::metrics::BackplaneErrors) {
        let _ = self.shared.errors.set(errors);
    }

    /// Issues a one-time ticket for `identity` valid `ttl` on every node.
    ///
    /// `Ok(None)` when the user already holds the most unredeemed tickets allowed.
    pub async fn issue_ticket(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Option<String>, ClusterUnavailable> {
        // Ticket values are credentials: the thread's CSPRNG, seeded and reseeded by the OS.
        let ticket = ticket_value(&mut rand::rng());
        let request = scripts::TicketRequest::new(&ticket, identity, ttl, MAX_TICKETS_PER_USER);
        let (done, rx) = completion();
        self.run(Command::IssueTicket(request, done));
        let issued = rx.await.map_err(|_| ClusterUnavailable::Unavailable)??;
        Ok(issued.then_some(ticket))
    }

    /// The identity of a ticket, consuming it (once, on any node) with `redeem`.
    pub async fn ticket(
        &self,
        ticket: &str,
        redeem: bool,
    ) -> Result<Option<Identity>, ClusterUnavailable> {
        let (done, rx) = completion();
        self.run(Command::Ticket(ticket.to_owned(), redeem, done));
        let stored = rx.await.map_err(|_| ClusterUnavailable::Unavailable)??;
        Ok(stored.as_deref().and_then(scripts::identity_of))
    }

    fn run(&self, command: Command) {
        self.lanes.submit(command, &self.shared);
    }
}

impl Backplane for RedisCluster {
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    fn unavailable(&self) -> Option<String> {
        if self.shared.breaker.is_open() {
            return Some("cluster backplane (redis) not answering".to_owned());
        }
        (!self.shared.subscribed.load(Ordering::Acquire))
            .then(|| "cluster backplane (redis) unreachable".to_owned())
    }
}

impl Cluster for RedisCluster {
    fn publish(
        &self,
        message: ClusterPublish,
        done: Completion<Result<Option<u64>, ClusterUnavailable>>,
    ) {
        self.run(Command::Publish(message, done));
    }

    fn open_room(
        &self,
        room: &RoomName,
        since: Option<(u64, String)>,
        done: Completion<Result<RoomView, ClusterUnavailable>>,
    ) {
        // Wanted now, in the order of the hub's calls (a `close_room` after this one undoes
        // it whatever the lanes do); the lane subscribes it before the view.
        self.shared.want(Channel::Room(room.clone()).name());
        self.run(Command::OpenRoom(room.clone(), since, done));
    }

    fn close_room(&self, room: &RoomName) {
        // Not a command a full lane or an open breaker could refuse: the desired state,
        // which the reconciler brings the subscription to; the budget's charge lapses.
        self.shared.close_room(room);
    }

    fn send_user(
        &self,
        user: &str,
        from: Option<Arc<str>>,
        data: Payload,
        done: Completion<Result<bool, ClusterUnavailable>>,
    ) {
        self.run(Command::SendUser(user.to_owned(), from, data, done));
    }

    fn open_user(&self, user: &str) {
        self.shared.want(Channel::User(user.to_owned()).name());
    }

    fn enter(&self, room: &RoomName, member: MemberInfo, events: bool) {
        let key = (room.clone(), member.session.clone());
        {
            let mut announced = self.shared.announced();
            announced.retract.remove(&key);
            announced.members.insert(key.clone(), (member, events));
        }
        self.run(Command::SyncMember(key.0, key.1));
    }

    fn exit(&self, room: &RoomName, member: MemberInfo, events: bool) {
        let key = (room.clone(), member.session.clone());
        {
            let mut announced = self.shared.announced();
            announced.members.remove(&key);
            announced.retract.insert(key.clone(), (member, events));
            announced.bound();
        }
        self.run(Command::SyncMember(key.0, key.1));
    }

    fn members(
        &self,
        room: &RoomName,
        done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    ) {
        self.run(Command::Members(room.clone(), done));
    }

    fn disconnect_user(
        &self,
        user: &str,
        reason: CloseReason,
        done: Completion<Result<(), ClusterUnavailable>>,
    ) {
        self.run(Command::Disconnect(user.to_owned(), reason, done));
    }

    fn close_user(&self, user: &str) {
        self.shared.unwant(Channel::User(user.to_owned()).name());
    }

    fn acquire_user(
        &self,
        user: &str,
        max: usize,
        done: Completion<Result<bool, ClusterUnavailable>>,
    ) {
        self.run(Command::AcquireUser(user.to_owned(), max, done));
    }

    fn release_user(&self, user: &str) {
        {
            let mut announced = self.shared.announced();
            if let Some(held) = announced.users.get_mut(user) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    announced.users.remove(user);
                }
            }
        }
        self.run(Command::SyncUser(user.to_owned()));
    }
}
