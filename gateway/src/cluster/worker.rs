//! The worker: runs the hub's commands against Redis, never as everyone's queue.
//!
//! Each kind of operation ([`Kind`]) has a few ordered lanes, each a task with a bounded
//! queue. A command goes to the lane its key hashes to (a room's commands to one lane, a
//! user's to one lane), so what must stay in order does (one room's publishes and its
//! join's view, one session's enter and exit of a room, one user's counts), while a slow
//! command holds up only its lane. Each kind has its own connection of a small pool
//! (multiplexed: a lane's command does not wait for another lane's reply). A full queue
//! refuses the command at once ("cluster busy"); every command's deadline counts from
//! when it was enqueued, so one that waited too long fails without being sent; the
//! [`Breaker`](super::breaker::Breaker) fails everything at once while Redis does not
//! answer. Memory stays bounded however long Redis hangs: at most
//! [`Kind::capacity`] × [`Kind::lanes`] commands wait per kind.

use std::{
    hash::{Hash, Hasher},
    sync::Arc,
};

use futures_util::FutureExt;
use gateway_core::{
    backplane::{ClusterPublish, ClusterUnavailable, Completion, RoomView},
    protocol::{CloseReason, MemberInfo, Payload, RoomName},
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{error, info, warn};

use super::{
    breaker::{PROBE_EVERY, PROBE_TIMEOUT},
    conn::{Conn, Target, COMMAND_TIMEOUT},
    listen,
    wire::{self, Channel, CommandError},
    Shared,
};

/// A command for the worker.
pub(super) enum Command {
    Publish(
        ClusterPublish,
        Completion<Result<Option<u64>, ClusterUnavailable>>,
    ),
    OpenRoom(
        RoomName,
        Option<(u64, String)>,
        Completion<Result<RoomView, ClusterUnavailable>>,
    ),
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
    /// Makes Redis list (or unlist) a session in a room as this node's record says.
    SyncMember(RoomName, String),
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
    /// Makes Redis hold this node's session count of a user as its record says.
    SyncUser(String),
}

/// A kind of operation: its own lanes, queues and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Publishes, memberships (presence), and joins' subscriptions and views: one room's
    /// commands in one lane, so a member is listed before a later join's view counts it.
    Rooms,
    /// Presence listings (read-only, possibly large).
    Listing,
    /// Users: counts, direct messages, disconnects, user subscriptions.
    Users,
    /// One-time tickets.
    Tickets,
}

impl Kind {
    /// Every kind.
    pub(super) const ALL: [Kind; 4] = [Kind::Rooms, Kind::Listing, Kind::Users, Kind::Tickets];

    /// Its metric label.
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Rooms => "rooms",
            Kind::Listing => "listing",
            Kind::Users => "users",
            Kind::Tickets => "tickets",
        }
    }

    /// Ordered lanes (commands of one lane run one at a time).
    pub(super) fn lanes(self) -> usize {
        match self {
            Kind::Rooms => 8,
            Kind::Users => 4,
            Kind::Listing | Kind::Tickets => 2,
        }
    }

    /// Commands one lane's queue holds. A publish holds at most `max_message_bytes`
    /// (64 KiB by default): 8 × 256 × 64 KiB = 128 MiB at worst for the rooms' queues (with
    /// 1 KiB messages, 2 MiB). 256 absorbs a burst of one busy room's publishers: a lane
    /// runs a command per round trip (about 10,000/s on loopback), so a full queue drains
    /// in some 25 ms, far within the 2 s deadline.
    pub(super) fn capacity(self) -> usize {
        match self {
            Kind::Rooms => 256,
            // A listing can be large to answer: few wait.
            Kind::Listing => 8,
            Kind::Users => 128,
            Kind::Tickets => 64,
        }
    }
}

impl Command {
    fn kind(&self) -> Kind {
        match self {
            Command::Publish(..) | Command::OpenRoom(..) | Command::SyncMember(..) => Kind::Rooms,
            Command::Members(..) => Kind::Listing,
            Command::Disconnect(..)
            | Command::SendUser(..)
            | Command::AcquireUser(..)
            | Command::SyncUser(_) => Kind::Users,
            Command::IssueTicket(..) | Command::Ticket(..) => Kind::Tickets,
        }
    }

    /// What picks its lane: commands with the same key keep their order.
    fn key(&self) -> &str {
        match self {
            Command::Publish(m, _) => m.room.as_str(),
            Command::OpenRoom(r, ..) | Command::SyncMember(r, _) | Command::Members(r, _) => {
                r.as_str()
            }
            Command::Disconnect(u, ..)
            | Command::SendUser(u, ..)
            | Command::AcquireUser(u, ..)
            | Command::SyncUser(u) => u,
            Command::IssueTicket(..) => "",
            Command::Ticket(t, ..) => t,
        }
    }

    /// Fails the command without running it: its caller gets `why`; a write this node
    /// owes Redis is marked to be made again at the next heartbeat.
    fn refuse(self, shared: &Shared, why: ClusterUnavailable) {
        match self {
            Command::Publish(_, done) => done(Err(why)),
            Command::OpenRoom(_, _, done) => done(Err(why)),
            Command::Disconnect(_, _, done) => done(Err(why)),
            Command::SendUser(.., done) => done(Err(why)),
            Command::Members(_, done) => done(Err(why)),
            Command::IssueTicket(_, done) => done(Err(why)),
            Command::Ticket(_, _, done) => done(Err(why)),
            Command::AcquireUser(_, _, done) => done(Err(why)),
            Command::SyncMember(room, session) => shared.owe_member(room, session),
            Command::SyncUser(user) => shared.owe_user(user),
        }
    }
}

/// `done`, answered "cluster unavailable" if it is dropped unanswered (its command
/// panicked in a lane, or the lane is gone): a caller always gets an answer.
fn answered_on_drop<T: 'static>(
    done: Completion<Result<T, ClusterUnavailable>>,
) -> Completion<Result<T, ClusterUnavailable>> {
    struct Guard<T>(Option<Completion<Result<T, ClusterUnavailable>>>);
    impl<T> Drop for Guard<T> {
        fn drop(&mut self) {
            if let Some(done) = self.0.take() {
                done(Err(ClusterUnavailable::Unavailable));
            }
        }
    }
    let mut guard = Guard(Some(done));
    Box::new(move |result| {
        if let Some(done) = guard.0.take() {
            done(result);
        }
    })
}

impl Command {
    /// The command with its completion answered even if it is dropped unanswered.
    fn guarded(self) -> Self {
        match self {
            Command::Publish(m, d) => Command::Publish(m, answered_on_drop(d)),
            Command::OpenRoom(r, s, d) => Command::OpenRoom(r, s, answered_on_drop(d)),
            Command::Disconnect(u, r, d) => Command::Disconnect(u, r, answered_on_drop(d)),
            Command::SendUser(u, f, p, d) => Command::SendUser(u, f, p, answered_on_drop(d)),
            Command::Members(r, d) => Command::Members(r, answered_on_drop(d)),
            Command::IssueTicket(t, d) => Command::IssueTicket(t, answered_on_drop(d)),
            Command::Ticket(t, r, d) => Command::Ticket(t, r, answered_on_drop(d)),
            Command::AcquireUser(u, m, d) => Command::AcquireUser(u, m, answered_on_drop(d)),
            other @ (Command::SyncMember(..) | Command::SyncUser(_)) => other,
        }
    }
}

/// A command and the instant its deadline passes (counted from when it was enqueued).
struct Job {
    command: Command,
    deadline: Instant,
}

/// The lanes of every kind.
pub(super) struct Lanes {
    senders: Vec<Vec<mpsc::Sender<Job>>>,
}

impl Lanes {
    /// Starts every lane's task, and the breaker's probe.
    pub(super) fn start(target: Target, shared: Arc<Shared>) -> Self {
        let worker = Arc::new(Worker {
            scripts: wire::Scripts::new(target.sharded(), shared.policies.clone()),
            pool: Kind::ALL
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            target,
            shared,
        });
        let senders = Kind::ALL
            .iter()
            .map(|kind| {
                (0..kind.lanes())
                    .map(|_| {
                        let (tx, rx) = mpsc::channel(kind.capacity());
                        tokio::spawn(lane(rx, worker.clone()));
                        tx
                    })
                    .collect()
            })
            .collect();
        tokio::spawn(probe(worker));
        Self { senders }
    }

    fn lane(&self, command: &Command) -> &mpsc::Sender<Job> {
        let lanes = &self.senders[command.kind() as usize];
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        command.key().hash(&mut hasher);
        &lanes[(hasher.finish() % lanes.len() as u64) as usize]
    }

    /// Enqueues `command`, or refuses it at once ("cluster busy") when its queue is full.
    pub(super) fn submit(&self, command: Command, shared: &Shared) {
        let job = Job {
            deadline: Instant::now() + COMMAND_TIMEOUT,
            command: command.guarded(),
        };
        let kind = job.command.kind();
        if let Err(e) = self.lane(&job.command).try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(job) => {
                    shared.count_refused(kind, "busy");
                    job
                }
                // Only at shutdown.
                mpsc::error::TrySendError::Closed(job) => job,
            };
            job.command.refuse(shared, ClusterUnavailable::Busy);
        }
    }

    /// Enqueues `command`, waiting for room in its queue (the heartbeat's re-announcements).
    pub(super) async fn submit_waiting(&self, command: Command) {
        let lane = self.lane(&command).clone();
        let _ = lane
            .send(Job {
                deadline: Instant::now() + COMMAND_TIMEOUT,
                command,
            })
            .await;
    }
}

/// What the lanes share: the scripts, the connection pool (one per kind), the shared state.
struct Worker {
    scripts: wire::Scripts,
    pool: Vec<tokio::sync::Mutex<Option<Conn>>>,
    target: Target,
    shared: Arc<Shared>,
}

/// One lane: its commands one after the other. A command that panics (a bug, say in a
/// hub completion) is logged and counted (`gateway_backplane_errors_total{op="lane_panic"}`);
/// its caller is answered "cluster unavailable" (see [`answered_on_drop`]) and the lane
/// goes on with the next command rather than die with its queue.
async fn lane(mut rx: mpsc::Receiver<Job>, worker: Arc<Worker>) {
    while let Some(job) = rx.recv().await {
        let run = std::panic::AssertUnwindSafe(worker.run(job));
        if run.catch_unwind().await.is_err() {
            worker.shared.count_error("lane_panic");
            error!("a cluster worker command panicked; its lane goes on");
        }
    }
}

/// While the breaker is open, `PING`s Redis every [`PROBE_EVERY`]; the first answer closes it.
async fn probe(worker: Arc<Worker>) {
    let breaker = &worker.shared.breaker;
    loop {
        breaker.wait_open().await;
        warn!("redis is not answering: the circuit breaker is open, operations fail at once");
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
                let mut conn = worker.connection(Kind::Rooms).await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            })
            .await;
            if let Ok(Some(_)) = answered {
                breaker.close();
                info!("redis answers again: the circuit breaker is closed");
                break;
            }
        }
    }
}

impl Worker {
    /// The connection of `kind`'s lanes (connecting it if there is none).
    async fn connection(&self, kind: Kind) -> Option<Conn> {
        let mut slot = self.pool[kind as usize].lock().await;
        if slot.is_none() {
            *slot = self.target.command_connection().await;
        }
        slot.clone()
    }

    /// Runs `op` on `kind`'s connection before `deadline`, unless the deadline passed in
    /// the queue or the breaker is open. Logs and counts a failure as `name`; clients get
    /// no detail of it. `delivery`: the operation delivers something (a publish, a direct
    /// message), so one sent without an answer may have taken effect.
    async fn bounded<T>(
        &self,
        kind: Kind,
        deadline: Instant,
        name: &'static str,
        delivery: bool,
        op: impl AsyncFnOnce(&mut Conn) -> Result<T, CommandError>,
    ) -> Result<T, ClusterUnavailable> {
        let shared = &self.shared;
        if Instant::now() >= deadline {
            shared.count_refused(kind, "expired");
            shared.count_error(name);
            return Err(ClusterUnavailable::Unavailable);
        }
        if shared.breaker.is_open() {
            shared.count_refused(kind, "open");
            shared.count_error(name);
            return Err(ClusterUnavailable::Unavailable);
        }
        let Ok(Some(mut conn)) = tokio::time::timeout_at(deadline, self.connection(kind)).await
        else {
            shared.breaker.unanswered();
            shared.count_error(name);
            warn!(op = name, "no connection to redis");
            return Err(ClusterUnavailable::Unavailable);
        };
        match tokio::time::timeout_at(deadline, op(&mut conn)).await {
            Ok(Ok(value)) => {
                shared.breaker.answered();
                Ok(value)
            }
            Ok(Err(CommandError::RoomBudget)) => {
                shared.breaker.answered();
                shared.count_refused(kind, "room_budget");
                Err(ClusterUnavailable::RoomBudget)
            }
            Ok(Err(e)) => {
                shared.count_error(name);
                warn!(op = name, error = %e, "redis operation failed");
                if e.unanswered() {
                    shared.breaker.unanswered();
                    let refused = matches!(&e, CommandError::Redis(r) if r.is_connection_refusal());
                    if delivery && !refused {
                        return Err(ClusterUnavailable::OutcomeUnknown);
                    }
                } else {
                    shared.breaker.answered();
                }
                Err(ClusterUnavailable::Unavailable)
            }
            Err(_) => {
                shared.breaker.unanswered();
                shared.count_error(name);
                warn!(op = name, "redis did not answer in time");
                Err(if delivery {
                    ClusterUnavailable::OutcomeUnknown
                } else {
                    ClusterUnavailable::Unavailable
                })
            }
        }
    }

    async fn run(&self, job: Job) {
        let Job { command, deadline } = job;
        let shared = &*self.shared;
        let scripts = &self.scripts;
        let kind = command.kind();
        match command {
            Command::Publish(message, done) => {
                let policy = shared.policies.for_room(message.room.as_str());
                let may_create = shared.budget.may_create(policy.history);
                let result = self
                    .bounded(kind, deadline, "publish", true, async |c| {
                        scripts
                            .publish(c, &message, &shared.policies, may_create)
                            .await
                    })
                    .await;
                if let Ok(published) = &result {
                    let now = std::time::Instant::now();
                    if published.created {
                        let ttl = policy.history_ttl;
                        shared
                            .budget
                            .created(&message.room, policy.history, ttl, false, now);
                    }
                    if published.seq.is_some() && policy.history > 0 {
                        let bytes = match &message.data {
                            Payload::Json(b) | Payload::Binary(b) => b.len(),
                        };
                        shared.budget.appended(&message.room, bytes, now);
                    }
                }
                done(result.map(|p| p.seq));
            }
            Command::OpenRoom(room, since, done) => {
                let policy = shared.policies.for_room(room.as_str());
                let may_create = shared.budget.may_create(policy.history);
                let channel = Channel::Room(room.clone()).name();
                // Heard before the view: no message after the view's sequence is missed.
                let result = match self.hear(kind, deadline, &channel).await {
                    Ok(()) => {
                        self.bounded(kind, deadline, "view", false, async |c| {
                            scripts
                                .view(c, &room, since, &shared.policies, may_create)
                                .await
                        })
                        .await
                    }
                    Err(e) => Err(e),
                };
                let result = result.map(|(view, created)| {
                    shared.room_viewed(&room, created, &policy);
                    view
                });
                done(result);
            }
            Command::SyncMember(room, session) => {
                let key = (room, session);
                let (entered, left) = {
                    let announced = shared.announced();
                    (
                        announced.members.get(&key).cloned(),
                        announced.retract.get(&key).cloned(),
                    )
                };
                let (room, _) = &key;
                let node = &shared.node;
                let result = match (entered, left) {
                    (Some((member, events)), _) => {
                        self.bounded(kind, deadline, "enter", false, async |c| {
                            scripts.enter(c, node, room, &member, events).await
                        })
                        .await
                    }
                    (None, Some((member, events))) => {
                        let r = self
                            .bounded(kind, deadline, "exit", false, async |c| {
                                scripts.exit(c, node, room, &member, events).await
                            })
                            .await;
                        if r.is_ok() {
                            shared.announced().retract.remove(&key);
                        }
                        r
                    }
                    (None, None) => Ok(()),
                };
                if result.is_err() {
                    let (room, session) = key;
                    shared.owe_member(room, session);
                }
            }
            Command::SyncUser(user) => {
                let count = shared.announced().users.get(&user).copied().unwrap_or(0);
                let node = &shared.node;
                let result = self
                    .bounded(kind, deadline, "count_user", false, async |c| {
                        scripts.count_user(c, node, &user, count, None).await
                    })
                    .await;
                if result.is_err() {
                    shared.owe_user(user);
                }
            }
            Command::AcquireUser(user, max, done) => {
                let held = shared.announced().users.get(&user).copied().unwrap_or(0);
                let node = &shared.node;
                let result = self
                    .bounded(kind, deadline, "acquire_user", false, async |c| {
                        let counted = scripts
                            .count_user(c, node, &user, held + 1, Some(max))
                            .await?;
                        if counted || scripts.release_dead_counts(c, node, &user).await? == 0 {
                            return Ok(counted);
                        }
                        // Sessions of dead nodes were still counted: try again.
                        scripts
                            .count_user(c, node, &user, held + 1, Some(max))
                            .await
                    })
                    .await;
                match result {
                    Ok(true) => *shared.announced().users.entry(user).or_default() += 1,
                    Ok(false) => {}
                    // Whether Redis counted it is unknown: say again what this node holds.
                    Err(_) => shared.owe_user(user),
                }
                done(result);
            }
            Command::SendUser(user, from, data, done) => {
                let result = self
                    .bounded(kind, deadline, "send_user", true, async |c| {
                        scripts.send_user(c, &user, from.as_deref(), &data).await
                    })
                    .await;
                done(result);
            }
            Command::Disconnect(user, reason, done) => {
                let result = self
                    .bounded(kind, deadline, "disconnect", true, async |c| {
                        redis::cmd("PUBLISH")
                            .arg(Channel::Control.name())
                            .arg(wire::disconnect(&user, &reason))
                            .query_async::<i64>(c)
                            .await
                            .map(drop)
                            .map_err(CommandError::from)
                    })
                    .await;
                done(result);
            }
            Command::Members(room, done) => {
                let result = self
                    .bounded(kind, deadline, "members", false, async |c| {
                        scripts.members(c, &room).await
                    })
                    .await;
                done(result);
            }
            Command::IssueTicket(request, done) => {
                let result = self
                    .bounded(kind, deadline, "issue_ticket", false, async |c| {
                        scripts.issue_ticket(c, &request).await
                    })
                    .await;
                done(result);
            }
            Command::Ticket(ticket, redeem, done) => {
                let result = self
                    .bounded(kind, deadline, "ticket", false, async |c| {
                        scripts.ticket(c, &ticket, redeem).await
                    })
                    .await;
                done(result);
            }
        }
    }

    /// Makes the pub/sub connection hear `channel` before `deadline` (unless the deadline
    /// passed in the queue or the breaker is open). Not counted by the breaker: waiting
    /// for the subscriber (reconnecting, or busy with another channel) is not Redis
    /// failing to answer a command; the subscription is the reconciler's to retry.
    async fn hear(
        &self,
        kind: Kind,
        deadline: Instant,
        channel: &str,
    ) -> Result<(), ClusterUnavailable> {
        let shared = &*self.shared;
        if Instant::now() >= deadline {
            shared.count_refused(kind, "expired");
            shared.count_error("view");
            return Err(ClusterUnavailable::Unavailable);
        }
        if shared.breaker.is_open() {
            shared.count_refused(kind, "open");
            shared.count_error("view");
            return Err(ClusterUnavailable::Unavailable);
        }
        let heard = tokio::time::timeout_at(deadline, listen(shared, channel)).await;
        if heard.as_ref().is_ok_and(Result::is_ok) {
            return Ok(());
        }
        shared.count_error("subscribe");
        match heard {
            Ok(Err(e)) => warn!(error = %e, "subscribing to a room failed"),
            _ => warn!("subscribing to a room: no subscription in time"),
        }
        shared.reconcile_all();
        Err(ClusterUnavailable::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_dropped_unanswered_is_answered_unavailable_and_one_answered_is_not_again() {
        let (done, mut rx) = gateway_core::backplane::completion::<Result<u8, _>>();
        drop(answered_on_drop(done));
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(ClusterUnavailable::Unavailable))
        ));
        let (done, mut rx) = gateway_core::backplane::completion::<Result<u8, _>>();
        answered_on_drop(done)(Ok(7));
        assert!(matches!(rx.try_recv(), Ok(Ok(7))));
    }

    #[tokio::test]
    async fn a_panicking_command_does_not_stop_its_lane() {
        // What `lane` does with a command that panics: caught, its completion answered.
        let (done, rx) = gateway_core::backplane::completion::<Result<u8, _>>();
        let done = answered_on_drop(done);
        let run = std::panic::AssertUnwindSafe(async move {
            let _held = done;
            panic!("a bug");
        });
        assert!(run.catch_unwind().await.is_err());
        assert!(matches!(rx.await, Ok(Err(ClusterUnavailable::Unavailable))));
    }
}
