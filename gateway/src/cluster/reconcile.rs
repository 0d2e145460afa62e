//! Bringing the pub/sub connection's subscriptions to the channels this node wants.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tracing::warn;

use super::{conn::COMMAND_TIMEOUT, error::ClusterError, shared::Shared};

/// How often the reconciler looks for subscriptions to change even when not woken.
///
/// It is also how long it waits after a failed one before trying again.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Brings the pub/sub connection's subscriptions to the wanted channels.
///
/// It is woken when they change, and runs every [`RECONCILE_EVERY`] (a failed change is
/// tried again then). Changes coalesce (a room closed and opened again meanwhile costs
/// nothing); a new connection is subscribed to every wanted channel by the subscriber, then
/// compared in full here.
pub(super) async fn reconcile(shared: Arc<Shared>) {
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
        if wanted == s.channels.contains(&channel) {
            continue;
        }
        if let Err(e) = s.change(&channel, wanted).await {
            drop(sink);
            failed(shared, &e, "changing a subscription failed; retrying");
            return false;
        }
    }
    true
}

/// A subscription change failed: counted, logged, and every channel compared again.
fn failed(shared: &Shared, e: &ClusterError, what: &'static str) {
    shared.count_error("subscribe");
    warn!(error = %e, "{what}");
    shared.reconcile_all();
}

/// Subscribes every wanted channel on a new connection; whether all succeeded.
///
/// One at a time, each to its own slot. The subscription counts as up only then.
pub(super) async fn subscribe_all(shared: &Shared) -> bool {
    let wanted: Vec<String> = shared.wanted().channels.iter().cloned().collect();
    let mut sink = shared.sink.lock().await;
    let Some(s) = sink.as_mut() else { return false };
    for channel in wanted {
        if s.channels.contains(&channel) {
            continue;
        }
        if let Err(e) = s.change(&channel, true).await {
            shared.count_error("subscribe");
            warn!(error = %e, channel, "redis subscription: subscribing failed; retrying");
            return false;
        }
    }
    drop(sink);
    // What changed meanwhile: the reconciler compares it all.
    shared.reconcile_all();
    shared.subscribed.store(true, Ordering::Release);
    true
}

/// Subscribes again a channel Redis unsubscribed (its slot moved), if still wanted.
pub(super) async fn resubscribe(shared: &Shared, channel: &str) {
    let mut sink = shared.sink.lock().await;
    let Some(s) = sink.as_mut() else { return };
    s.channels.remove(channel);
    if !shared.wanted().channels.contains(channel) {
        return;
    }
    if let Err(e) = s.change(channel, true).await {
        drop(sink);
        failed(shared, &e, "resubscribing a moved channel failed; retrying");
    }
}

/// Makes the pub/sub connection hear `channel` if it is still wanted.
///
/// Redis confirms it; a channel no longer wanted is left to the reconciler.
pub(super) async fn listen(shared: &Shared, channel: &str) -> Result<(), ClusterError> {
    // The subscriber may be connecting again (on a cluster it does after every failover):
    // wait a little for it rather than fail the join at once.
    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
    loop {
        let mut sink = shared.sink.lock().await;
        if let Some(s) = sink.as_mut() {
            let wanted = shared.wanted().channels.contains(channel);
            if !wanted || s.channels.contains(channel) {
                return Ok(());
            }
            return s.change(channel, true).await;
        }
        drop(sink);
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::NoSubscription);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
