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
    backplane::{ClusterPublish, ClusterUnavailable, RoomView},
    protocol::RoomName,
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{error, info, warn};

use super::{
    breaker::{PROBE_EVERY, PROBE_TIMEOUT},
    channel::Channel,
    command::{Command, Kind},
    conn::{Conn, Target, COMMAND_TIMEOUT},
    error::ClusterError,
    message::payload_bytes,
    reconcile::listen,
    scripts::Scripts,
    shared::Shared,
};

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
            scripts: Scripts::new(target.sharded(), shared.policies.clone()),
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
                    shared.count_refused(kind.name(), "busy");
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
    scripts: Scripts,
    pool: Vec<tokio::sync::Mutex<Option<Conn>>>,
    target: Target,
    shared: Arc<Shared>,
}

/// One lane: its commands one after the other.
///
/// A command that panics (a bug, say in a hub completion) is logged and counted
/// (`gateway_backplane_errors_total{op="lane_panic"}`); its caller is answered "cluster
/// unavailable" (see [`answered_on_drop`]) and the lane goes on with the next command
/// rather than die with its queue.
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

    /// Whether a command of `kind` may still be sent.
    ///
    /// Not if its deadline passed in the queue or the breaker is open (counted as refused).
    fn admit(&self, kind: Kind, deadline: Instant) -> Result<(), ClusterError> {
        let reason = if Instant::now() >= deadline {
            "expired"
        } else if self.shared.breaker.is_open() {
            "open"
        } else {
            return Ok(());
        };
        self.shared.count_refused(kind.name(), reason);
        Err(ClusterError::NotSent)
    }

    /// Runs `op` on `kind`'s connection before `deadline`, if admitted.
    ///
    /// See [`Self::admit`]. Logs and counts a failure as `name`, and tells the breaker
    /// whether Redis answered; clients get no detail of it. `delivery`: the operation
    /// delivers something (a publish, a direct message), so one sent without an answer may
    /// have taken effect.
    async fn bounded<T>(
        &self,
        kind: Kind,
        deadline: Instant,
        name: &'static str,
        delivery: bool,
        op: impl AsyncFnOnce(&mut Conn) -> Result<T, ClusterError>,
    ) -> Result<T, ClusterUnavailable> {
        let result = async {
            self.admit(kind, deadline)?;
            let connection = tokio::time::timeout_at(deadline, self.connection(kind)).await;
            let Ok(Some(mut conn)) = connection else {
                return Err(ClusterError::NoConnection);
            };
            let done = tokio::time::timeout_at(deadline, op(&mut conn)).await;
            done.map_err(|_| ClusterError::Timeout)?
        }
        .await;
        let shared = &self.shared;
        match &result {
            Ok(_) => shared.breaker.answered(),
            Err(ClusterError::RoomBudget) => {
                shared.breaker.answered();
                shared.count_refused(kind.name(), "room_budget");
            }
            Err(ClusterError::NotSent) => shared.count_error(name),
            Err(e) => {
                shared.count_error(name);
                warn!(op = name, error = %e, "redis operation failed");
                if e.unanswered() {
                    shared.breaker.unanswered();
                } else {
                    shared.breaker.answered();
                }
            }
        }
        result.map_err(|e| e.for_client(delivery))
    }

    async fn run(&self, job: Job) {
        let Job { command, deadline } = job;
        let scripts = &self.scripts;
        let kind = command.kind();
        match command {
            Command::Publish(message, done) => done(self.publish(deadline, &message).await),
            Command::OpenRoom(room, since, done) => {
                done(self.open_room(deadline, &room, since).await)
            }
            Command::SyncMember(room, session) => self.sync_member(deadline, room, session).await,
            Command::SyncUser(user) => self.sync_user(deadline, user).await,
            Command::AcquireUser(user, max, done) => {
                done(self.acquire_user(deadline, user, max).await)
            }
            Command::SendUser(user, from, data, done) => done(
                self.bounded(kind, deadline, "send_user", true, async |c| {
                    scripts.send_user(c, &user, from.as_deref(), &data).await
                })
                .await,
            ),
            Command::Disconnect(user, reason, done) => done(
                self.bounded(kind, deadline, "disconnect", true, async |c| {
                    scripts.disconnect(c, &user, &reason).await
                })
                .await,
            ),
            Command::Members(room, done) => done(
                self.bounded(kind, deadline, "members", false, async |c| {
                    scripts.members(c, &room).await
                })
                .await,
            ),
            Command::IssueTicket(request, done) => done(
                self.bounded(kind, deadline, "issue_ticket", false, async |c| {
                    scripts.issue_ticket(c, &request).await
                })
                .await,
            ),
            Command::Ticket(ticket, redeem, done) => done(
                self.bounded(kind, deadline, "ticket", false, async |c| {
                    scripts.ticket(c, &ticket, redeem).await
                })
                .await,
            ),
        }
    }

    /// Publishes `message`, and charges the room budget for what it kept.
    async fn publish(
        &self,
        deadline: Instant,
        message: &ClusterPublish,
    ) -> Result<Option<u64>, ClusterUnavailable> {
        let shared = &*self.shared;
        let policy = shared.policies.for_room(message.room.as_str());
        let may_create = shared.budget.may_create(policy.history);
        let result = self
            .bounded(Kind::Rooms, deadline, "publish", true, async |c| {
                let policies = &shared.policies;
                self.scripts.publish(c, message, policies, may_create).await
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
                let bytes = payload_bytes(&message.data).len();
                shared.budget.appended(&message.room, bytes, now);
            }
        }
        result.map(|p| p.seq)
    }

    /// Hears `room`'s channel, then reads its view.
    ///
    /// It is heard before the view so that no message after the view's sequence is missed.
    async fn open_room(
        &self,
        deadline: Instant,
        room: &RoomName,
        since: Option<(u64, String)>,
    ) -> Result<RoomView, ClusterUnavailable> {
        let shared = &*self.shared;
        let policy = shared.policies.for_room(room.as_str());
        let may_create = shared.budget.may_create(policy.history);
        let channel = Channel::Room(room.clone()).name();
        self.hear(Kind::Rooms, deadline, &channel).await?;
        let (view, created) = self
            .bounded(Kind::Rooms, deadline, "view", false, async |c| {
                let policies = &shared.policies;
                self.scripts
                    .view(c, room, since, policies, may_create)
                    .await
            })
            .await?;
        shared.room_viewed(room, created, &policy);
        Ok(view)
    }

    /// Makes Redis list (or unlist) a session in a room as this node's record says.
    ///
    /// Owed again if that fails.
    async fn sync_member(&self, deadline: Instant, room: RoomName, session: String) {
        let shared = &*self.shared;
        let key = (room, session);
        let (entered, left) = {
            let announced = shared.announced();
            (
                announced.members.get(&key).cloned(),
                announced.retract.get(&key).cloned(),
            )
        };
        let listing = match (entered, left) {
            (Some(member), _) => Some((member, true)),
            (None, Some(member)) => Some((member, false)),
            (None, None) => None,
        };
        let Some(((member, events), entered)) = listing else {
            return;
        };
        let (room, node, scripts) = (&key.0, &shared.node, &self.scripts);
        let name = if entered { "enter" } else { "exit" };
        let result = self
            .bounded(Kind::Rooms, deadline, name, false, async |c| {
                scripts
                    .list(c, node, room, (&member, events), entered)
                    .await
            })
            .await;
        match result {
            Ok(()) if !entered => {
                shared.announced().retract.remove(&key);
            }
            Ok(()) => {}
            Err(_) => {
                let (room, session) = key;
                shared.owe_member(room, session);
            }
        }
    }

    /// Makes Redis hold this node's session count of `user` as its record says.
    ///
    /// Owed again if that fails.
    async fn sync_user(&self, deadline: Instant, user: String) {
        let shared = &*self.shared;
        let count = shared.announced().users.get(&user).copied().unwrap_or(0);
        let (node, scripts) = (&shared.node, &self.scripts);
        let result = self
            .bounded(Kind::Users, deadline, "count_user", false, async |c| {
                scripts.count_user(c, node, &user, count, None).await
            })
            .await;
        if result.is_err() {
            shared.owe_user(user);
        }
    }

    /// Counts one more session of `user` here unless that takes it past `max` cluster-wide.
    ///
    /// `max` counts the user's sessions on all nodes. Returns whether it was counted.
    async fn acquire_user(
        &self,
        deadline: Instant,
        user: String,
        max: usize,
    ) -> Result<bool, ClusterUnavailable> {
        let shared = &*self.shared;
        let held = shared.announced().users.get(&user).copied().unwrap_or(0);
        let (node, scripts) = (&shared.node, &self.scripts);
        let result = self
            .bounded(Kind::Users, deadline, "acquire_user", false, async |c| {
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
        result
    }

    /// Makes the pub/sub connection hear `channel` before `deadline`, if admitted.
    ///
    /// See [`Self::admit`]. Not counted by the breaker: waiting for the subscriber
    /// (reconnecting, or busy with another channel) is not Redis failing to answer a
    /// command; the subscription is the reconciler's to retry.
    async fn hear(
        &self,
        kind: Kind,
        deadline: Instant,
        channel: &str,
    ) -> Result<(), ClusterUnavailable> {
        let shared = &*self.shared;
        if self.admit(kind, deadline).is_err() {
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
    use crate::cluster::command::answered_on_drop;

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
