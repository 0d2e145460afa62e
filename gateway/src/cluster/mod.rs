//! Cluster mode on Redis (`[cluster] redis`): the [`Cluster`] backplane that orders every
//! room's messages cluster-wide and carries direct messages between nodes. The design is
//! docs/cluster.md; what it covers today is the README's "Scaling out".
//!
//! One worker task runs the commands in the order the hub issued them (so one session's
//! publishes keep their order), over a reconnecting connection ([`conn`]: one Redis, or a
//! Redis Cluster where each script touches one slot); one subscriber task holds the
//! pub/sub connection (sharded on a cluster), re-subscribes every channel this node needs
//! after a reconnect or a topology change, and hands what it hears to the hub.

mod conn;
mod wire;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock, Weak,
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
use wire::Channel;

use crate::config::RedisTarget;

/// Longest wait between two attempts to reach Redis again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A URL is not a Redis URL.
    #[error("cluster: {0}")]
    Url(#[source] redis::RedisError),
}

/// A command for the worker, run in the order the hub issued it.
enum Command {
    Publish(
        ClusterPublish,
        Completion<Result<Option<u64>, ClusterUnavailable>>,
    ),
    OpenRoom(
        RoomName,
        Option<(u64, String)>,
        Completion<Result<RoomView, ClusterUnavailable>>,
    ),
    CloseRoom(RoomName),
    Disconnect(
        String,
        CloseReason,
        Completion<Result<(), ClusterUnavailable>>,
    ),
    SendUser(
        String,
        Option<Arc<str>>,
        Payload,
        Completion<Result<bool, ClusterUnavailable>>,
    ),
    OpenUser(String),
    CloseUser(String),
    Enter(RoomName, MemberInfo, bool),
    Exit(RoomName, MemberInfo, bool),
    Members(
        RoomName,
        Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    ),
    IssueTicket(
        wire::TicketRequest,
        Completion<Result<bool, ClusterUnavailable>>,
    ),
    Ticket(
        String,
        bool,
        Completion<Result<Option<String>, ClusterUnavailable>>,
    ),
    AcquireUser(String, usize, Completion<Result<bool, ClusterUnavailable>>),
    ReleaseUser(String),
    /// This node's liveness had expired: list its members and session counts again.
    Reannounce,
}

/// What this node has told Redis it holds, so that it can say it again after a sweep.
#[derive(Default)]
struct Announced {
    /// Room memberships: (room, session) to the member and its presence-events flag.
    members: HashMap<(RoomName, String), (MemberInfo, bool)>,
    /// Sessions per user counted towards the cluster-wide limit.
    users: HashMap<String, u32>,
}

/// State the worker and the subscriber share.
struct Shared {
    /// Where failed operations are counted, once the server has set it.
    errors: OnceLock<crate::metrics::BackplaneErrors>,
    /// Channels this node needs (rooms with local members, users with local sessions).
    wanted: Mutex<HashSet<String>>,
    /// The pub/sub connection's subscribing half, while it is up.
    sink: tokio::sync::Mutex<Option<Subscriber>>,
    /// Whether the pub/sub connection is up.
    subscribed: AtomicBool,
    hub: OnceLock<Weak<Hub>>,
    policies: RoomPolicies,
    node: String,
    /// This node's liveness expired and it has not been announced again since.
    announce_owed: AtomicBool,
    /// A [`Command::Reannounce`] waits in the worker's queue.
    announce_queued: AtomicBool,
}

/// The Redis backplane.
pub struct RedisCluster {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster").finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Starts the worker and subscriber tasks for `redis` (one Redis, or a Redis Cluster).
    /// Redis need not be up yet: until it is, operations fail with "cluster unavailable"
    /// and `/healthz` says `degraded`.
    pub fn start(
        redis: &RedisTarget,
        policies: RoomPolicies,
        node: &str,
        heartbeat: Duration,
    ) -> Result<Arc<Self>, ClusterError> {
        let target = Target::new(redis).map_err(ClusterError::Url)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            errors: OnceLock::new(),
            // Every node hears the control channel.
            wanted: Mutex::new(HashSet::from([Channel::Control.name()])),
            sink: tokio::sync::Mutex::new(None),
            subscribed: AtomicBool::new(false),
            hub: OnceLock::new(),
            policies,
            node: node.to_owned(),
            announce_owed: AtomicBool::new(false),
            announce_queued: AtomicBool::new(false),
        });
        tokio::spawn(work(target.clone(), rx, shared.clone()));
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
        tokio::spawn(keep_alive(
            target,
            shared.clone(),
            heartbeat,
            commands.clone(),
        ));
        Ok(Arc::new(Self { commands, shared }))
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
        let issued = rx
            .await
            .map_err(|_| unavailable("the cluster worker stopped"))??;
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
        let stored = rx
            .await
            .map_err(|_| unavailable("the cluster worker stopped"))??;
        Ok(stored.as_deref().and_then(wire::identity_of))
    }

    fn run(&self, command: Command) {
        // The worker lives as long as the process; a send can only fail during shutdown.
        let _ = self.commands.send(command);
    }
}

impl Backplane for RedisCluster {
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    fn unavailable(&self) -> Option<String> {
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
        self.run(Command::OpenRoom(room.clone(), since, done));
    }

    fn close_room(&self, room: &RoomName) {
        self.run(Command::CloseRoom(room.clone()));
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
        self.run(Command::OpenUser(user.to_owned()));
    }

    fn enter(&self, room: &RoomName, member: MemberInfo, events: bool) {
        self.run(Command::Enter(room.clone(), member, events));
    }

    fn exit(&self, room: &RoomName, member: MemberInfo, events: bool) {
        self.run(Command::Exit(room.clone(), member, events));
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
        self.run(Command::CloseUser(user.to_owned()));
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
        self.run(Command::ReleaseUser(user.to_owned()));
    }
}

/// The command connection, or why there is none.
fn connected(conn: &mut Option<Conn>) -> Result<&mut Conn, ClusterUnavailable> {
    conn.as_mut()
        .ok_or_else(|| unavailable("no connection to redis"))
}

fn unavailable(e: impl std::fmt::Display) -> ClusterUnavailable {
    ClusterUnavailable(e.to_string())
}

/// Runs the hub's commands one after the other.
async fn work(target: Target, mut rx: mpsc::UnboundedReceiver<Command>, shared: Arc<Shared>) {
    let scripts = wire::Scripts::new(target.sharded(), shared.policies.clone());
    let mut conn: Option<Conn> = None;
    let mut swept_own = false;
    let mut announced = Announced::default();
    while let Some(command) = rx.recv().await {
        if conn.is_none() {
            conn = target.command_connection().await;
        }
        if let (false, Some(c)) = (swept_own, conn.as_mut()) {
            // On the first connection, before any membership of this life: drop what an
            // earlier process with this node id left behind.
            swept_own = scripts.sweep(c, &shared.node, false).await.is_ok();
            if !swept_own {
                shared.count_error("sweep");
            }
        }
        match command {
            Command::Publish(message, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts.publish(c, &message, &shared.policies).await
                }
                .await;
                shared.count_failure("publish", &result);
                done(result);
            }
            Command::OpenRoom(room, since, done) => {
                let channel = Channel::Room(room.clone()).name();
                let result = async {
                    let c = connected(&mut conn)?;
                    listen(&shared, channel).await?;
                    scripts.view(c, &room, since, &shared.policies).await
                }
                .await;
                shared.count_failure("view", &result);
                done(result);
            }
            Command::CloseRoom(room) => stop_listening(&shared, Channel::Room(room).name()).await,
            Command::SendUser(user, from, data, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts.send_user(c, &user, from.as_deref(), &data).await
                }
                .await;
                shared.count_failure("send_user", &result);
                done(result);
            }
            Command::OpenUser(user) => {
                if let Err(e) = listen(&shared, Channel::User(user).name()).await {
                    shared.count_error("subscribe");
                    warn!(error = %e, "subscribing to a user channel failed; it is retried on reconnect");
                }
            }
            Command::CloseUser(user) => stop_listening(&shared, Channel::User(user).name()).await,
            Command::Enter(room, member, events) => {
                announced.members.insert(
                    (room.clone(), member.session.clone()),
                    (member.clone(), events),
                );
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = scripts.enter(c, &shared.node, &room, &member, events).await {
                        shared.count_error("enter");
                        warn!(error = %e, "listing a member in redis failed");
                    }
                }
            }
            Command::Exit(room, member, events) => {
                announced
                    .members
                    .remove(&(room.clone(), member.session.clone()));
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = scripts.exit(c, &shared.node, &room, &member, events).await {
                        shared.count_error("exit");
                        warn!(error = %e, "removing a member from redis failed");
                    }
                }
            }
            Command::Disconnect(user, reason, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    redis::cmd("PUBLISH")
                        .arg(Channel::Control.name())
                        .arg(wire::disconnect(&user, &reason))
                        .query_async::<i64>(c)
                        .await
                        .map(drop)
                        .map_err(unavailable)
                }
                .await;
                shared.count_failure("disconnect", &result);
                done(result);
            }
            Command::IssueTicket(request, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts.issue_ticket(c, &request).await
                }
                .await;
                shared.count_failure("issue_ticket", &result);
                done(result);
            }
            Command::Ticket(ticket, redeem, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts.ticket(c, &ticket, redeem).await
                }
                .await;
                shared.count_failure("ticket", &result);
                done(result);
            }
            Command::AcquireUser(user, max, done) => {
                let held = announced.users.get(&user).copied().unwrap_or(0);
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts
                        .count_user(c, &shared.node, &user, held + 1, Some(max))
                        .await
                }
                .await;
                if let Ok(true) = result {
                    announced.users.insert(user, held + 1);
                } else if let (Err(_), Some(c)) = (&result, conn.as_mut()) {
                    // Whether Redis counted it is unknown: say again what this node holds.
                    let _ = scripts.count_user(c, &shared.node, &user, held, None).await;
                }
                shared.count_failure("acquire_user", &result);
                done(result);
            }
            Command::ReleaseUser(user) => {
                let held = announced.users.get(&user).copied().unwrap_or(0);
                let left = held.saturating_sub(1);
                if left == 0 {
                    announced.users.remove(&user);
                } else {
                    announced.users.insert(user.clone(), left);
                }
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = scripts.count_user(c, &shared.node, &user, left, None).await {
                        shared.count_error("count_user");
                        warn!(error = %e, "uncounting a session in redis failed");
                    }
                }
            }
            Command::Reannounce => {
                shared.announce_queued.store(false, Ordering::Release);
                if let Some(c) = conn.as_mut() {
                    match reannounce(&scripts, c, &shared.node, &announced).await {
                        Ok(()) => {
                            shared.announce_owed.store(false, Ordering::Release);
                            info!(
                                members = announced.members.len(),
                                users = announced.users.len(),
                                "liveness had expired: members and session counts announced again"
                            );
                        }
                        Err(e) => {
                            shared.count_error("reannounce");
                            warn!(error = %e, "announcing members again failed; retried next heartbeat");
                        }
                    }
                }
            }
            Command::Members(room, done) => {
                let result = async {
                    let c = connected(&mut conn)?;
                    scripts.members(c, &room).await
                }
                .await;
                shared.count_failure("members", &result);
                done(result);
            }
        }
    }
}

/// Lists again every membership and session count this node holds.
async fn reannounce(
    scripts: &wire::Scripts,
    conn: &mut Conn,
    node: &str,
    announced: &Announced,
) -> Result<(), ClusterUnavailable> {
    for ((room, _), (member, events)) in &announced.members {
        scripts.enter(conn, node, room, member, *events).await?;
    }
    for (user, count) in &announced.users {
        scripts.count_user(conn, node, user, *count, None).await?;
    }
    Ok(())
}

/// Refreshes this node's liveness every `heartbeat` and sweeps dead nodes' memberships.
/// When its own liveness had expired (Redis unreachable for three heartbeats, or restarted
/// without its data), other nodes may have swept it: the worker announces it again.
async fn keep_alive(
    target: Target,
    shared: Arc<Shared>,
    heartbeat: Duration,
    commands: mpsc::UnboundedSender<Command>,
) {
    let scripts = wire::Scripts::new(target.sharded(), shared.policies.clone());
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if conn.is_none() {
            conn = target.command_connection().await;
        }
        let Some(c) = conn.as_mut() else { continue };
        match scripts.heartbeat(c, &shared.node, heartbeat).await {
            Ok(expired) => {
                if expired {
                    shared.announce_owed.store(true, Ordering::Release);
                }
                if shared.announce_owed.load(Ordering::Acquire)
                    && !shared.announce_queued.swap(true, Ordering::AcqRel)
                {
                    let _ = commands.send(Command::Reannounce);
                }
            }
            Err(e) => {
                shared.count_error("heartbeat");
                warn!(error = %e, "cluster heartbeat failed")
            }
        }
    }
}

/// Adds `channel` to what this node needs and subscribes to it (confirmed by Redis).
async fn listen(shared: &Shared, channel: String) -> Result<(), ClusterUnavailable> {
    shared
        .wanted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(channel.clone());
    // The subscriber may be connecting again (on a cluster it does after every failover):
    // wait a little for it rather than fail the join at once.
    let deadline = tokio::time::Instant::now() + conn::COMMAND_TIMEOUT;
    loop {
        let mut sink = shared.sink.lock().await;
        if let Some(s) = sink.as_mut() {
            return s.subscribe(&channel).await.map_err(unavailable);
        }
        drop(sink);
        if tokio::time::Instant::now() >= deadline {
            return Err(unavailable("the redis subscription is down"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_listening(shared: &Shared, channel: String) {
    shared
        .wanted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&channel);
    if let Some(s) = shared.sink.lock().await.as_mut() {
        let _ = s.unsubscribe(&channel).await;
    }
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
        *shared.sink.lock().await = Some(Subscriber::Single(sink));
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
        *shared.sink.lock().await = Some(Subscriber::Cluster(connection));
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
                    let wanted = shared
                        .wanted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&channel);
                    if wanted {
                        if let Some(s) = shared.sink.lock().await.as_mut() {
                            if let Err(e) = s.subscribe(&channel).await {
                                shared.count_error("subscribe");
                                warn!(error = %e, "resubscribing a moved channel failed");
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
        let mut view = Err(unavailable("no connection to redis"));
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if conn.is_none() {
                conn = target.command_connection().await;
            }
            let since = Some((seq, epoch.to_string()));
            if let Some(c) = conn.as_mut() {
                view = scripts.view(c, &room, since, &shared.policies).await;
                if view.is_ok() {
                    break;
                }
            }
        }
        let view = view.unwrap_or_else(|e| {
            // Unknown what was missed: the members rejoin and recover from the history.
            shared.count_error("view");
            warn!(error = %e, room = room.as_str(), "catching up a room failed; its members rejoin");
            gateway_core::backplane::RoomView {
                seq,
                epoch: "unknown".into(),
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
    let wanted: Vec<String> = shared
        .wanted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    let mut sink = shared.sink.lock().await;
    let Some(s) = sink.as_mut() else { return false };
    for channel in &wanted {
        if let Err(e) = s.subscribe(channel).await {
            shared.count_error("subscribe");
            warn!(error = %e, channel, "redis subscription: subscribing failed; retrying");
            return false;
        }
    }
    shared.subscribed.store(true, Ordering::Release);
    true
}

impl Shared {
    /// Counts `op` as failed when `result` is an error.
    fn count_failure<T>(&self, op: &'static str, result: &Result<T, ClusterUnavailable>) {
        if result.is_err() {
            self.count_error(op);
        }
    }

    /// Counts a failed backplane operation.
    fn count_error(&self, op: &'static str) {
        if let Some(errors) = self.errors.get() {
            errors.count(op);
        }
    }
}
