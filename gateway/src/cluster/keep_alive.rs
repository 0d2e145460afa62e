//! The keep-alive task.
//!
//! It keeps this node's liveness, sweeps dead nodes, and makes the writes this node still
//! owes Redis.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tracing::{info, warn};

use super::{
    command::Command,
    conn::{Conn, Target, COMMAND_TIMEOUT},
    error::ClusterError,
    follower::{Action, Event},
    scripts::Scripts,
    shared::Shared,
    worker::Lanes,
};

/// Refreshes this node's liveness every `heartbeat`, and more.
///
/// It sweeps dead nodes' memberships, lets lapsed rooms go from the room budget, and queues
/// again the writes this node owes Redis. When its own liveness had expired (Redis
/// unreachable for three heartbeats, or restarted without its data), other nodes may have
/// swept it: it owes everything.
pub(super) async fn keep_alive(
    target: Target,
    shared: Arc<Shared>,
    heartbeat: Duration,
    lanes: Arc<Lanes>,
) {
    let scripts = Scripts::new(target.sharded(), shared.policies.clone());
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept_own = false;
    loop {
        tick.tick().await;
        shared.budget.lapse(std::time::Instant::now());
        let beat = beat(
            &target,
            &shared,
            &scripts,
            &mut conn,
            &mut swept_own,
            heartbeat,
        );
        let beat = tokio::time::timeout(heartbeat.max(COMMAND_TIMEOUT), beat).await;
        match beat.unwrap_or(Err(ClusterError::Timeout)) {
            Ok(expired) => {
                for action in shared.follow(Event::Heartbeat { expired }) {
                    if let Action::ReAnnounce { everything } = action {
                        if everything {
                            shared.owe_everything();
                        }
                        requeue_owed(&shared, &lanes);
                    }
                }
            }
            Err(e) => {
                shared.count_error("heartbeat");
                warn!(error = %e, "cluster heartbeat failed")
            }
        }
    }
}

/// One heartbeat; whether this node's liveness had expired.
async fn beat(
    target: &Target,
    shared: &Shared,
    scripts: &Scripts,
    conn: &mut Option<Conn>,
    swept_own: &mut bool,
    heartbeat: Duration,
) -> Result<bool, ClusterError> {
    if conn.is_none() {
        *conn = target.command_connection().await;
    }
    let c = conn.as_mut().ok_or(ClusterError::NoConnection)?;
    let resweep = shared.announced().resweep_asked;
    if !*swept_own || resweep != shared.announced().resweep_done {
        // Before this life's first heartbeat: drop what an earlier process with this node
        // id left behind (its memberships and counts are owed again). Again when this
        // node forgot ended memberships to unlist (too many in an outage): its own
        // listings are swept, and what it holds listed again.
        scripts.sweep(c, &shared.node, false).await?;
        *swept_own = true;
        shared.announced().resweep_done = resweep;
        shared.owe_everything();
    }
    scripts.heartbeat(c, &shared.node, heartbeat).await
}

/// Queues a write for everything this node owes Redis.
///
/// One task at a time; it waits for room in the lanes' queues rather than being refused.
fn requeue_owed(shared: &Arc<Shared>, lanes: &Arc<Lanes>) {
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
