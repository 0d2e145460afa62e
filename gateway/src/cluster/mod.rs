//! Cluster mode on Redis (`[cluster] redis`): the [`Cluster`] backplane that orders every
//! room's messages cluster-wide and carries direct messages between nodes. The design is
//! docs/cluster.md; what it covers today is the README's "Scaling out".
//!
//! The [`worker`] runs the hub's commands in bounded, ordered lanes per kind of operation
//! (one room's commands in order, one user's in order) over a small pool of multiplexed
//! connections ([`conn`]: one Redis, or a Redis Cluster where each script touches one
//! slot), behind a circuit [`breaker`]; the room [`budget`] bounds the rooms this node
//! creates in Redis. One subscriber task holds the pub/sub connection (sharded on a
//! cluster), re-subscribes every channel this node needs after a reconnect or a topology
//! change, and hands what it hears to the hub. The keep-alive task refreshes this node's
//! liveness, sweeps dead nodes, and makes again the writes this node still owes Redis.

mod breaker;
mod budget;
mod conn;
mod wire;
mod worker;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, Weak,
    },
    time::Duration,
};

use futures_util::StreamExt;
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
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tracing::{info, warn};

use conn::{Conn, Subscriber, Target};
use wire::{Channel, CommandError};
use worker::{Command, Kind, Lanes};

use crate::config::RedisTarget;

/// Longest wait between two attempts to reach Redis again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the reconciler looks for subscriptions to change even when not woken (and
/// how long it waits after a failed one before trying again).
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Channels whose wish changed that the reconciler is told about one by one; beyond, it
/// compares every wanted channel with every subscribed one instead (the memory stays
/// bounded whatever the churn of rooms and users while the subscriber is slow).
const MAX_DIRTY: usize = 4096;
/// Ended memberships this node keeps to unlist from Redis (about 300 B each). Past it, it
/// forgets them and sweeps its own listings at the next heartbeat Redis answers, then
/// lists again what it holds: an outage of any length costs bounded memory.
const MAX_RETRACT: usize = 16_384;
/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A URL is not a Redis URL.
    #[error("cluster: {0}")]
    Url(#[source] redis::RedisError),
}

/// What this node has told Redis it holds (its record, the truth Redis is made to match),
/// and what it still owes Redis: writes that failed or were refused, made again at the
/// next heartbeat, and everything again after its liveness expired (it may have been
/// swept).
#[derive(Default)]
struct Announced {
    /// Room memberships: (room, session) to the member and its presence-events flag.
    members: HashMap<(RoomName, String), (MemberInfo, bool)>,
    /// Memberships that ended but may still be listed in Redis.
    retract: HashMap<(RoomName, String), (MemberInfo, bool)>,
    /// Sessions per user counted towards the cluster-wide limit.
    users: HashMap<String, u32>,
    /// Memberships whose listing Redis may not match.
    owed_members: HashSet<(RoomName, String)>,
    /// Users whose count Redis may not match.
    owed_users: HashSet<String>,
    /// Sweeps of this node's own listings asked for (`retract` overflowed), and the one
    /// the keep-alive last made.
    resweep_asked: u64,
    resweep_done: u64,
}

impl Announced {
    /// Keeps `retract` (and with it `owed_members`, a subset of `members` and `retract`)
    /// within [`MAX_RETRACT`]: past it, a sweep of this node's own listings replaces them.
    fn bound(&mut self) {
        if self.retract.len() <= MAX_RETRACT {
            return;
        }
        self.retract = HashMap::new();
        let members = &self.members;
        self.owed_members.retain(|k| members.contains_key(k));
        self.resweep_asked += 1;
    }
}

/// The channels this node needs: the desired state the reconciler brings the pub/sub
/// connection to. Bounded by the hub: rooms with local members (and joins under way),
/// users with local sessions, the control channel.
#[derive(Default)]
struct Wanted {
    channels: HashSet<String>,
    /// Channels whose wish changed since the reconciler last looked (at most
    /// [`MAX_DIRTY`]; beyond, `full`).
    dirty: HashSet<String>,
    /// Compare every channel: the pub/sub connection is new, a change failed, or more
    /// than [`MAX_DIRTY`] changed.
    full: bool,
}

impl Wanted {
    /// Wants `channel` (or no longer): a change the reconciler is to make.
    fn set(&mut self, channel: String, wanted: bool) {
        let changed = if wanted {
            self.channels.insert(channel.clone())
        } else {
            self.channels.remove(&channel)
        };
        if !changed || self.full {
            return;
        }
        if self.dirty.len() >= MAX_DIRTY {
            self.dirty = HashSet::new();
            self.full = true;
        } else {
            self.dirty.insert(channel);
        }
    }
}

/// The pub/sub connection's subscribing half, and what it is subscribed to.
struct Sink {
    sub: Subscriber,
    /// Channels Redis confirmed (and this node did not unsubscribe since).
    channels: HashSet<String>,
}

impl Sink {
    fn new(sub: Subscriber) -> Self {
        Self {
            sub,
            channels: HashSet::new(),
        }
    }
}

/// State the worker, the keep-alive and the subscriber share.
struct Shared {
    /// Where failed operations are counted, once the server has set it.
    errors: OnceLock<crate::metrics::BackplaneErrors>,
    /// Channels this node needs (rooms with local members, users with local sessions).
    wanted: Mutex<Wanted>,
    /// Wakes the reconciler: `wanted` changed.
    reconcile: tokio::sync::Notify,
    /// The pub/sub connection's subscribing half, while it is up.
    sink: tokio::sync::Mutex<Option<Sink>>,
    /// Whether the pub/sub connection is up.
    subscribed: AtomicBool,
    hub: OnceLock<Weak<Hub>>,
    policies: RoomPolicies,
    node: String,
    /// This node's record of what Redis should hold.
    announced: Mutex<Announced>,
    /// Open while Redis does not answer.
    breaker: breaker::Breaker,
    /// The rooms this node created in Redis, against `[limits] room_budget_mb`.
    budget: budget::RoomBudget,
    /// Owed writes are being queued again.
    resyncing: AtomicBool,
}

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
    /// Starts the worker, keep-alive and subscriber tasks for `redis` (one Redis, or a
    /// Redis Cluster); rooms this node creates in Redis are held to `room_budget` bytes.
    /// Redis need not be up yet: until it is, operations fail with "cluster unavailable"
    /// and `/healthz` says `degraded`.
    pub fn start(
        redis: &RedisTarget,
        policies: RoomPolicies,
        node: &str,
        heartbeat: Duration,
        room_budget: usize,
    ) -> Result<Arc<Self>, ClusterError> {
        let target = Target::new(redis).map_err(ClusterError::Url)?;
        let shared = Arc::new(Shared {
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
        match &target {
            Target::Single(client) => {
                tokio::spawn(subscribe(client.clone(), target.clone(), shared.clone()))
            }
            Target::Cluster(seeds) => tokio::spawn(subscribe_sharded(
                seeds.clone(),
                target.clone(),
                shared.clone(),
            )),
        };
        tokio::spawn(reconcile(shared.clone()));
        tokio::spawn(keep_alive(target, shared.clone(), heartbeat, lanes.clone()));
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

    /// Issues a one-time ticket for `identity` valid `ttl` on every node; `Ok(None)` when
    /// the user already holds the most unredeemed tickets allowed.
    pub async fn issue_ticket(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Option<String>, ClusterUnavailable> {
        // Ticket values are credentials: the thread's CSPRNG, seeded and reseeded by the OS.
        let ticket = ticket_value(&mut rand::rng());
        let request = wire::TicketRequest::new(&ticket, identity, ttl, MAX_TICKETS_PER_USER);
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
        Ok(stored.as_deref().and_then(wire::identity_of))
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

/// Refreshes this node's liveness every `heartbeat`, sweeps dead nodes' memberships, lets
/// lapsed rooms go from the room budget, and queues again the writes this node owes
/// Redis. When its own liveness had expired (Redis unreachable for three heartbeats, or
/// restarted without its data), other nodes may have swept it: it owes everything.
async fn keep_alive(target: Target, shared: Arc<Shared>, heartbeat: Duration, lanes: Arc<Lanes>) {
    let scripts = wire::Scripts::new(target.sharded(), shared.policies.clone());
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept_own = false;
    loop {
        tick.tick().await;
        shared.budget.lapse(std::time::Instant::now());
        let beat = async {
            if conn.is_none() {
                conn = target.command_connection().await;
            }
            let c = conn.as_mut().ok_or(CommandError::NoConnection)?;
            let resweep = shared.announced().resweep_asked;
            if !swept_own || resweep != shared.announced().resweep_done {
                // Before this life's first heartbeat: drop what an earlier process with
                // this node id left behind (its memberships and counts are owed again).
                // Again when this node forgot ended memberships to unlist (too many in an
                // outage): its own listings are swept, and what it holds listed again.
                scripts.sweep(c, &shared.node, false).await?;
                swept_own = true;
                shared.announced().resweep_done = resweep;
                shared.owe_everything();
            }
            scripts.heartbeat(c, &shared.node, heartbeat).await
        };
        match tokio::time::timeout(heartbeat.max(conn::COMMAND_TIMEOUT), beat).await {
            Ok(Ok(expired)) => {
                if expired {
                    shared.owe_everything();
                }
                resync(&shared, &lanes);
            }
            Ok(Err(e)) => {
                shared.count_error("heartbeat");
                warn!(error = %e, "cluster heartbeat failed")
            }
            Err(_) => {
                shared.count_error("heartbeat");
                warn!("cluster heartbeat: redis did not answer in time")
            }
        }
    }
}

/// Queues a write for everything this node owes Redis (one task at a time; it waits for
/// room in the lanes' queues rather than being refused).
fn resync(shared: &Arc<Shared>, lanes: &Arc<Lanes>) {
    let (members, users) = {
        let mut announced = shared.announced();
        if announced.owed_members.is_empty() && announced.owed_users.is_empty() {
            return;
        }
        if shared.resyncing.swap(true, Ordering::AcqRel) {
            return;
        }
        (
            std::mem::take(&mut announced.owed_members),
            std::mem::take(&mut announced.owed_users),
        )
    };
    let (shared, lanes) = (shared.clone(), lanes.clone());
    tokio::spawn(async move {
        let (m, u) = (members.len(), users.len());
        for (room, session) in members {
            lanes
                .submit_waiting(Command::SyncMember(room, session))
                .await;
        }
        for user in users {
            lanes.submit_waiting(Command::SyncUser(user)).await;
        }
        shared.resyncing.store(false, Ordering::Release);
        info!(
            members = m,
            users = u,
            "memberships and session counts owed to redis queued again"
        );
    });
}

/// Makes the pub/sub connection hear `channel` if it is still wanted (confirmed by
/// Redis); a channel no longer wanted is left to the reconciler.
async fn listen(shared: &Shared, channel: &str) -> Result<(), CommandError> {
    // The subscriber may be connecting again (on a cluster it does after every failover):
    // wait a little for it rather than fail the join at once.
    let deadline = tokio::time::Instant::now() + conn::COMMAND_TIMEOUT;
    loop {
        let mut sink = shared.sink.lock().await;
        if let Some(s) = sink.as_mut() {
            let wanted = shared.wanted().channels.contains(channel);
            if !wanted || s.channels.contains(channel) {
                return Ok(());
            }
            s.sub.subscribe(channel).await?;
            s.channels.insert(channel.to_owned());
            return Ok(());
        }
        drop(sink);
        if tokio::time::Instant::now() >= deadline {
            return Err(CommandError::NoSubscription);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Brings the pub/sub connection's subscriptions to the wanted channels: woken when they
/// change, and every [`RECONCILE_EVERY`] (a failed change is tried again then). Changes
/// coalesce (a room closed and opened again meanwhile costs nothing); a new connection is
/// subscribed to every wanted channel by its task, then compared in full here.
async fn reconcile(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.reconcile.notified() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        if !reconcile_pass(&shared).await {
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    }
}

/// One pass of the reconciler; whether every change it tried succeeded.
async fn reconcile_pass(shared: &Shared) -> bool {
    let (dirty, full) = {
        let mut w = shared.wanted();
        if w.dirty.is_empty() && !w.full {
            return true;
        }
        (
            std::mem::take(&mut w.dirty),
            std::mem::replace(&mut w.full, false),
        )
    };
    let candidates: Vec<String> = if full {
        let sink = shared.sink.lock().await;
        // None: the next connection subscribes every wanted channel, then asks for this.
        let Some(s) = sink.as_ref() else { return true };
        let w = shared.wanted();
        let missing = w.channels.iter().filter(|c| !s.channels.contains(*c));
        let unwanted = s.channels.iter().filter(|c| !w.channels.contains(*c));
        missing.chain(unwanted).cloned().collect()
    } else {
        dirty.into_iter().collect()
    };
    for channel in candidates {
        // One change at a time: a join waiting for its subscription is not held up long.
        let mut sink = shared.sink.lock().await;
        let Some(s) = sink.as_mut() else { return true };
        let wanted = shared.wanted().channels.contains(&channel);
        let held = s.channels.contains(&channel);
        let change = match (wanted, held) {
            (true, false) => {
                tokio::time::timeout(conn::COMMAND_TIMEOUT, s.sub.subscribe(&channel)).await
            }
            (false, true) => {
                tokio::time::timeout(conn::COMMAND_TIMEOUT, s.sub.unsubscribe(&channel)).await
            }
            _ => continue,
        };
        match change {
            Ok(Ok(())) => {
                if wanted {
                    s.channels.insert(channel);
                } else {
                    s.channels.remove(&channel);
                }
            }
            failed => {
                drop(sink);
                shared.count_error("subscribe");
                match failed {
                    Ok(Err(e)) => warn!(error = %e, "changing a subscription failed; retrying"),
                    _ => warn!("changing a subscription: redis did not answer in time; retrying"),
                }
                shared.reconcile_all();
                return false;
            }
        }
    }
    true
}

/// Holds the pub/sub connection: (re)connects with capped backoff, re-subscribes every
/// wanted channel, and hands each message to the hub.
async fn subscribe(client: redis::Client, target: Target, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                shared.count_error("pubsub");
                warn!(error = %e, "redis subscription: connecting failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (sink, mut stream) = pubsub.split();
        *shared.sink.lock().await = Some(Sink::new(Subscriber::Single(sink)));
        if !resubscribe(&shared).await {
            *shared.sink.lock().await = None;
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        info!("redis subscription up");
        let mut caught = catch_up(&target, &shared).await;
        while let Some(message) = stream.next().await {
            hand_over(
                &shared,
                &mut caught,
                message.get_channel_name(),
                message.get_payload_bytes(),
            );
        }
        shared.subscribed.store(false, Ordering::Release);
        *shared.sink.lock().await = None;
        shared.count_error("pubsub");
        warn!("redis subscription lost; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}

/// Holds the sharded pub/sub of a Redis Cluster: room and user channels are subscribed
/// with `SSUBSCRIBE` on their slot's master (one connection per shard, through the
/// library's cluster connection), the control channel with `SUBSCRIBE`. The library
/// resubscribes only part of it after a failover or a slot move, so this task does it:
/// on a new connection with every wanted channel when a node connection drops, and a
/// channel again when Redis unsubscribes it (its slot moved). Messages go to the hub.
async fn subscribe_sharded(seeds: Vec<String>, target: Target, shared: Arc<Shared>) {
    // A failover takes a few seconds: retry often enough to be back soon after it.
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(100);
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
        let connection = match conn::cluster_client(&seeds, Some(tx)) {
            Ok(client) => client.get_async_connection().await,
            Err(e) => Err(e),
        };
        let connection = match connection {
            Ok(c) => c,
            Err(e) => {
                shared.count_error("pubsub");
                warn!(error = %e, "redis cluster subscription: connecting failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        *shared.sink.lock().await = Some(Sink::new(Subscriber::Cluster(connection)));
        if !resubscribe(&shared).await {
            *shared.sink.lock().await = None;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = Duration::from_millis(100);
        info!("redis cluster subscription up (sharded)");
        let mut caught = catch_up(&target, &shared).await;
        while let Some(push) = pushes.recv().await {
            match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1))
                    else {
                        continue;
                    };
                    let (Ok(channel), Ok(payload)) = (
                        redis::from_redis_value::<String>(channel),
                        redis::from_redis_value::<Vec<u8>>(payload),
                    ) else {
                        continue;
                    };
                    hand_over(&shared, &mut caught, &channel, &payload);
                }
                PushKind::Disconnection => {
                    // A node's connection dropped (a failover, a restart): a new connection
                    // that learns the topology afresh, and every channel again, each on
                    // its slot's master as the cluster now is. (Resubscribing on the old
                    // connection can keep failing on its stale view of the cluster.)
                    shared.count_error("pubsub");
                    warn!("a redis cluster node connection dropped; resubscribing on a new connection");
                    break;
                }
                PushKind::SUnsubscribe => {
                    // Redis unsubscribed a channel whose slot moved: again, if still wanted.
                    let Some(Ok(channel)) =
                        push.data.first().map(redis::from_redis_value::<String>)
                    else {
                        continue;
                    };
                    let mut sink = shared.sink.lock().await;
                    let Some(s) = sink.as_mut() else { continue };
                    s.channels.remove(&channel);
                    let wanted = shared.wanted().channels.contains(&channel);
                    if wanted {
                        match tokio::time::timeout(conn::COMMAND_TIMEOUT, s.sub.subscribe(&channel))
                            .await
                        {
                            Ok(Ok(())) => {
                                s.channels.insert(channel);
                            }
                            _ => {
                                drop(sink);
                                shared.count_error("subscribe");
                                warn!("resubscribing a moved channel failed; retrying");
                                shared.reconcile_all();
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        shared.subscribed.store(false, Ordering::Release);
        *shared.sink.lock().await = None;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Once the subscription is (again) up: messages published while it was down never reach
/// this node, so each room with members here is checked against the cluster and what was
/// missed is delivered, or the members are sent to rejoin (see `Hub::catch_up`). Returns
/// per room channel the sequence number accounted for: channel messages up to it, which
/// may still be on their way, are not delivered twice.
async fn catch_up(target: &Target, shared: &Shared) -> HashMap<String, u64> {
    let mut caught = HashMap::new();
    let Some(hub) = shared.hub.get().and_then(Weak::upgrade) else {
        return caught;
    };
    let positions = hub.positions();
    if positions.is_empty() {
        return caught;
    }
    let scripts = wire::Scripts::new(target.sharded(), shared.policies.clone());
    let mut conn = target.command_connection().await;
    for (room, seq, epoch) in positions {
        // A few tries: giving up sends the room's members to rejoin.
        let mut view = Err(CommandError::NoConnection);
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if conn.is_none() {
                conn = target.command_connection().await;
            }
            let since = Some((seq, epoch.to_string()));
            if let Some(c) = conn.as_mut() {
                // Rooms with members here are never refused by the budget.
                view = scripts
                    .view(c, &room, since, &shared.policies, true)
                    .await
                    .map(|(view, _)| view);
                if view.is_ok() {
                    break;
                }
            }
        }
        let view = view.unwrap_or_else(|e| {
            // Unknown what was missed: the room's next message tells its members (`resync`).
            shared.count_error("view");
            warn!(error = %e, room = room.as_str(), "catching up a room failed; its members get resync with its next message");
            gateway_core::backplane::RoomView {
                seq,
                epoch: gateway_core::hub::UNKNOWN_EPOCH.into(),
                missed: None,
                members: 0,
            }
        });
        let upto = hub.catch_up(&room, (seq, &epoch), view);
        caught.insert(Channel::Room(room).name(), upto);
    }
    caught
}

/// Hands a channel message to the hub, unless the catch-up accounted for it already.
fn hand_over(shared: &Shared, caught: &mut HashMap<String, u64>, channel: &str, payload: &[u8]) {
    if caught_up_already(caught, channel, payload) {
        return;
    }
    if let Some(hub) = shared.hub.get().and_then(Weak::upgrade) {
        wire::deliver(&hub, channel, payload);
    }
}

/// Whether a channel message is one the catch-up accounted for already (its room's
/// sequence number up to the caught-up one); the first newer one ends the check.
fn caught_up_already(caught: &mut HashMap<String, u64>, channel: &str, payload: &[u8]) -> bool {
    let Some(&upto) = caught.get(channel) else {
        return false;
    };
    match wire::message_seq(payload) {
        Some(seq) if seq <= upto => true,
        Some(_) => {
            caught.remove(channel);
            false
        }
        None => false,
    }
}

/// Subscribes every wanted channel, one at a time (each to its own slot); whether all
/// succeeded. The subscription counts as up only then.
async fn resubscribe(shared: &Shared) -> bool {
    let wanted: Vec<String> = shared.wanted().channels.iter().cloned().collect();
    let mut sink = shared.sink.lock().await;
    let Some(s) = sink.as_mut() else { return false };
    for channel in wanted {
        if s.channels.contains(&channel) {
            continue;
        }
        match tokio::time::timeout(conn::COMMAND_TIMEOUT, s.sub.subscribe(&channel)).await {
            Ok(Ok(())) => {
                s.channels.insert(channel);
            }
            Ok(Err(e)) => {
                shared.count_error("subscribe");
                warn!(error = %e, channel, "redis subscription: subscribing failed; retrying");
                return false;
            }
            Err(_) => {
                shared.count_error("subscribe");
                warn!(
                    channel,
                    "redis subscription: subscribing timed out; retrying"
                );
                return false;
            }
        }
    }
    drop(sink);
    // What changed meanwhile: the reconciler compares it all.
    shared.reconcile_all();
    shared.subscribed.store(true, Ordering::Release);
    true
}

impl Shared {
    /// This node's record (never held across an await).
    fn announced(&self) -> MutexGuard<'_, Announced> {
        self.announced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis may not list (or unlist) this membership as the record says.
    fn owe_member(&self, room: RoomName, session: String) {
        let mut announced = self.announced();
        let key = (room, session);
        // One forgotten by `bound` is the sweep's.
        if announced.members.contains_key(&key) || announced.retract.contains_key(&key) {
            announced.owed_members.insert(key);
        }
    }

    /// Redis may not hold this user's count as the record says.
    fn owe_user(&self, user: String) {
        self.announced().owed_users.insert(user);
    }

    /// Everything the record holds is owed (this node may have been swept).
    fn owe_everything(&self) {
        let mut guard = self.announced();
        let announced = &mut *guard;
        let members = announced.members.keys().chain(announced.retract.keys());
        announced
            .owed_members
            .extend(members.cloned().collect::<Vec<_>>());
        let users: Vec<String> = announced.users.keys().cloned().collect();
        announced.owed_users.extend(users);
    }

    /// The channels this node needs (never held across an await).
    fn wanted(&self) -> MutexGuard<'_, Wanted> {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `channel` to what this node needs (the reconciler subscribes it).
    fn want(&self, channel: String) {
        self.wanted().set(channel, true);
        self.reconcile.notify_one();
    }

    /// Removes `channel` from what this node needs (the reconciler unsubscribes it).
    fn unwant(&self, channel: String) {
        self.wanted().set(channel, false);
        self.reconcile.notify_one();
    }

    /// The reconciler is to compare every wanted channel with every subscribed one.
    fn reconcile_all(&self) {
        self.wanted().full = true;
        self.reconcile.notify_one();
    }

    /// The hub closed `room` (no local member left): no longer heard, and its budget
    /// charge lapses one history lifetime from now.
    fn close_room(&self, room: &RoomName) {
        {
            // Under the wanted lock, so a join's view completing meanwhile sees it closed
            // or closes it after (see `room_viewed`).
            let mut wanted = self.wanted();
            wanted.set(Channel::Room(room.clone()).name(), false);
            self.budget.closed(room, std::time::Instant::now());
        }
        self.reconcile.notify_one();
    }

    /// A join's view of `room` succeeded (`created`: it created the room's state in Redis):
    /// the budget counts the room as open while the hub still has it.
    fn room_viewed(
        &self,
        room: &RoomName,
        created: bool,
        policy: &gateway_core::policy::RoomPolicy,
    ) {
        let wanted = self.wanted();
        let open = wanted
            .channels
            .contains(&Channel::Room(room.clone()).name());
        if created {
            let now = std::time::Instant::now();
            self.budget
                .created(room, policy.history, policy.history_ttl, open, now);
        } else if open {
            self.budget.opened(room);
        }
    }

    /// Counts a command of `kind` refused without being run (`busy`: its queue was full;
    /// `open`: the breaker; `expired`: its deadline passed in the queue; `room_budget`).
    fn count_refused(&self, kind: Kind, reason: &'static str) {
        if let Some(errors) = self.errors.get() {
            errors.refused(kind.name(), reason);
        }
    }

    /// Counts a failed backplane operation.
    fn count_error(&self, op: &'static str) {
        if let Some(errors) = self.errors.get() {
            errors.count(op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_channels_coalesce_and_their_changes_are_bounded() {
        let mut w = Wanted::default();
        w.set("a".into(), true);
        w.set("a".into(), true);
        assert_eq!(w.dirty.len(), 1);
        w.set("a".into(), false);
        assert!(w.channels.is_empty());
        assert_eq!(
            w.dirty.len(),
            1,
            "one entry per channel, whatever its changes"
        );
        for n in 0..3 * MAX_DIRTY {
            w.set(format!("r{n}"), true);
            w.set(format!("r{n}"), false);
        }
        assert!(w.full, "past the bound, a full comparison instead");
        assert!(w.dirty.len() <= MAX_DIRTY);
        assert!(w.channels.is_empty());
    }

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
