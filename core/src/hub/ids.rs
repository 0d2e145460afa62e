//! Where the hub's session ids, room epochs and join tokens come from.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use rand::{rngs::StdRng, RngCore};

use crate::session::SessionId;

/// The hub's random source (the owner seeds it) and its counter of joins.
#[derive(Debug)]
pub(super) struct Ids {
    rng: Mutex<StdRng>,
    /// Tells a member's successive joins of a room apart.
    join_tokens: AtomicU64,
}

impl Ids {
    /// Ids drawn from `rng`.
    pub(super) fn new(rng: StdRng) -> Self {
        Self {
            rng: Mutex::new(rng),
            join_tokens: AtomicU64::new(0),
        }
    }

    fn random_u64(&self) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_u64()
    }

    /// A fresh session id.
    pub(super) fn session(&self) -> SessionId {
        SessionId(self.random_u64())
    }

    /// A new room epoch: the sequence restarts, clients must not take it for the old one.
    pub(super) fn epoch(&self) -> std::sync::Arc<str> {
        format!("{:016x}", self.random_u64()).into()
    }

    /// A token for a join that waits for the cluster.
    pub(super) fn join_token(&self) -> u64 {
        self.join_tokens.fetch_add(1, Ordering::Relaxed)
    }
}
