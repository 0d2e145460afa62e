//! The subscriber task: the one loop that holds the pub/sub connection.
//!
//! It serves one Redis and a Redis Cluster alike, and does what the
//! [`Follower`](super::follower) calls for.
//!
//! On one Redis every channel is a classic subscription; on a cluster room and user
//! channels are sharded ones (`SSUBSCRIBE`, each on its slot's master), the control
//! channel a classic one. After a failover or a slot move the cluster library subscribes
//! again by itself, but it may have dropped node connections with their subscriptions and
//! does not say when its own subscribing fails, so this task does it: on a new connection
//! with every wanted channel when a (node) connection drops or the library subscribed
//! anything by itself (see `conn::Asked`), and a channel again when Redis unsubscribes it.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tracing::{info, warn};

use super::{
    conn::{Conn, Push, Pushes, Target},
    error::ClusterError,
    follower::{Action, Event, HubCall, Retry},
    hub, message,
    reconcile::{resubscribe, subscribe_all},
    scripts::Scripts,
    shared::Shared,
    wanted::Sink,
};

/// How the follower waits before connecting again.
///
/// On a cluster a failover takes a few seconds, so it retries often enough (at most 1 s
/// apart) to be back soon after it; one Redis waits up to 5 s while it cannot be reached.
pub(super) fn retry(target: &Target) -> Retry {
    Retry {
        max: if target.sharded() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        },
        double_after_connecting: target.sharded(),
    }
}

/// The subscriber task's I/O.
struct Subscriber {
    target: Target,
    shared: Arc<Shared>,
    scripts: Scripts,
    /// What the pub/sub connection hears, while it is up.
    pushes: Option<Pushes>,
    /// The connection catch-up views are read on (a new one for each catch-up).
    conn: Option<Conn>,
    /// Why the last view failed.
    view_error: Option<ClusterError>,
}

/// Holds the pub/sub connection for good and does the follower's actions in order.
///
/// The actions an outcome calls for come before any other, and the connection is read when
/// none is left, so every catch-up ends before the next message is handed over.
pub(super) async fn run(target: Target, shared: Arc<Shared>) {
    let start = shared
        .follower
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .start();
    let mut me = Subscriber {
        scripts: Scripts::new(target.sharded(), shared.policies.clone()),
        target,
        shared,
        pushes: None,
        conn: None,
        view_error: None,
    };
    let mut pending = VecDeque::from([start]);
    loop {
        while let Some(action) = pending.pop_front() {
            if let Some(event) = me.perform(action).await {
                for next in me.shared.follow(event).into_iter().rev() {
                    pending.push_front(next);
                }
            }
        }
        // Every catch-up is over: its connection is not kept while the channels are read.
        me.conn = None;
        let event = me.hear().await;
        pending.extend(me.shared.follow(event));
    }
}

impl Subscriber {
    /// The next event the pub/sub connection brings.
    async fn hear(&mut self) -> Event {
        loop {
            let Some(pushes) = self.pushes.as_mut() else {
                return Event::Lost;
            };
            match pushes.next().await {
                Push::Message(channel, payload) => {
                    // Anything malformed is ignored.
                    if let Some(m) = message::decode(&channel, payload) {
                        return Event::Message(m);
                    }
                }
                Push::Unsubscribed(channel) => return Event::Unsubscribed(channel),
                Push::Resubscribed(channel) => {
                    // It may have dropped node connections, and with them subscriptions
                    // it could not make again (see `conn::Asked`).
                    self.shared.count_error("pubsub");
                    warn!(channel, "the redis cluster client subscribed again by itself after reconnecting; connecting again");
                    return Event::Lost;
                }
                Push::Lost => {
                    self.shared.count_error("pubsub");
                    warn!("redis subscription lost; connecting again");
                    return Event::Lost;
                }
            }
        }
    }

    /// Does `action`; the event that answers it, if any.
    async fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Connect { after } => Some(self.connect(after).await),
            Action::SubscribeAll => Some(if subscribe_all(&self.shared).await {
                info!(sharded = self.target.sharded(), "redis subscription up");
                Event::Subscribed
            } else {
                Event::Lost
            }),
            Action::Resubscribe(channel) => {
                resubscribe(&self.shared, &channel).await;
                None
            }
            Action::View { room, since, after } => {
                tokio::time::sleep(after).await;
                Some(match self.view(&room, since).await {
                    Ok(view) => Event::Viewed(view),
                    Err(e) => {
                        self.view_error = Some(e);
                        Event::ViewFailed
                    }
                })
            }
            // The keep-alive's: only its heartbeat calls for it.
            Action::ReAnnounce { .. } => None,
            Action::Hub(call) => {
                match &call {
                    // Each catch-up reads its views on a connection of its own.
                    HubCall::Positions => self.conn = None,
                    HubCall::Resync { room, .. } => {
                        self.shared.count_error("view");
                        let error = self.view_error.take().unwrap_or(ClusterError::NoConnection);
                        warn!(error = %error, room = room.as_str(), "catching up a room failed; its members get resync with its next message");
                    }
                    _ => {}
                }
                hub::call(self.shared.hub().as_deref(), call)
            }
        }
    }

    /// Drops the pub/sub connection, waits `after`, and connects a new one.
    async fn connect(&mut self, after: Duration) -> Event {
        let shared = &self.shared;
        shared.subscribed.store(false, Ordering::Release);
        *shared.sink.lock().await = None;
        self.pushes = None;
        tokio::time::sleep(after).await;
        match self.target.subscriber().await {
            Ok((sub, pushes)) => {
                *shared.sink.lock().await = Some(Sink::new(sub));
                self.pushes = Some(pushes);
                Event::Connected
            }
            Err(e) => {
                shared.count_error("pubsub");
                warn!(error = %e, "redis subscription: connecting failed; retrying");
                Event::Lost
            }
        }
    }

    /// A room's view after `since`.
    ///
    /// Rooms with members here are never refused by the budget.
    async fn view(
        &mut self,
        room: &gateway_core::protocol::RoomName,
        since: (u64, Arc<str>),
    ) -> Result<gateway_core::backplane::RoomView, ClusterError> {
        if self.conn.is_none() {
            self.conn = self.target.command_connection().await;
        }
        let conn = self.conn.as_mut().ok_or(ClusterError::NoConnection)?;
        let since = Some((since.0, since.1.to_string()));
        let policies = &self.shared.policies;
        let (view, _) = self.scripts.view(conn, room, since, policies, true).await?;
        Ok(view)
    }
}
