//! The channels this node needs, and those its pub/sub connection has.

use std::collections::HashSet;

use super::{
    conn::{Subscriber, COMMAND_TIMEOUT},
    error::ClusterError,
};

/// Channels whose wish changed that the reconciler is told about one by one.
///
/// Beyond, it compares every wanted channel with every subscribed one instead (the memory
/// stays bounded whatever the churn of rooms and users while the subscriber is slow).
const MAX_DIRTY: usize = 4096;

/// The channels this node needs.
///
/// They are the desired state the reconciler brings the pub/sub connection to. Bounded by
/// the hub: rooms with local members (and joins under way), users with local sessions, the
/// control channel.
#[derive(Default)]
pub(super) struct Wanted {
    pub(super) channels: HashSet<String>,
    /// Channels whose wish changed since the reconciler last looked.
    ///
    /// At most [`MAX_DIRTY`]; beyond, `full`.
    pub(super) dirty: HashSet<String>,
    /// Compare every channel.
    ///
    /// Set when the pub/sub connection is new, a change failed, or more than [`MAX_DIRTY`]
    /// changed.
    pub(super) full: bool,
}

impl Wanted {
    /// Wants `channel` (or no longer): a change the reconciler is to make.
    pub(super) fn set(&mut self, channel: String, wanted: bool) {
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
pub(super) struct Sink {
    pub(super) sub: Subscriber,
    /// Channels Redis confirmed (and this node did not unsubscribe since).
    pub(super) channels: HashSet<String>,
}

impl Sink {
    pub(super) fn new(sub: Subscriber) -> Self {
        Self {
            sub,
            channels: HashSet::new(),
        }
    }

    /// Subscribes `channel` (`subscribe`) or unsubscribes it, within the command timeout.
    ///
    /// What Redis confirmed is recorded.
    pub(super) async fn change(
        &mut self,
        channel: &str,
        subscribe: bool,
    ) -> Result<(), ClusterError> {
        let change = async {
            if subscribe {
                self.sub.subscribe(channel).await
            } else {
                self.sub.unsubscribe(channel).await
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, change)
            .await
            .map_err(|_| ClusterError::Timeout)??;
        if subscribe {
            self.channels.insert(channel.to_owned());
        } else {
            self.channels.remove(channel);
        }
        Ok(())
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
}
