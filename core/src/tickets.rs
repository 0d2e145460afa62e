//! One-time tickets: short-lived, single-use credentials a client gets from
//! `POST /api/tickets` with its JWT and puts in a URL (`?ticket=`), where a JWT would leak
//! into logs and browser history.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::auth::Identity;

/// Why no ticket was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The store holds its maximum of unexpired tickets.
    #[error("too many outstanding tickets")]
    Full,
}

struct Entry {
    identity: Identity,
    expires: Instant,
}

/// A bounded store of unredeemed tickets.
pub struct TicketStore {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketStore")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl TicketStore {
    /// A store whose tickets live `ttl`, holding at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Lifetime of a ticket.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a ticket for `identity`, valid until `now + ttl`.
    pub fn issue(&self, identity: Identity, now: Instant) -> Result<String, TicketError> {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.capacity {
                return Err(TicketError::Full);
            }
        }
        let ticket = random_ticket();
        entries.insert(
            ticket.clone(),
            Entry {
                identity,
                expires: now + self.ttl,
            },
        );
        Ok(ticket)
    }

    /// The identity of a valid ticket, without redeeming it.
    pub fn peek(&self, ticket: &str, now: Instant) -> Option<Identity> {
        let entries = self.lock();
        entries
            .get(ticket)
            .filter(|e| e.expires > now)
            .map(|e| e.identity.clone())
    }

    /// Redeems a ticket: succeeds once, for the first caller, while it is valid.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<Identity> {
        let entry = self.lock().remove(ticket)?;
        (entry.expires > now).then_some(entry.identity)
    }

    /// Tickets currently held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn random_ticket() -> String {
    use base64::Engine;
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::anonymous("u".into())
    }

    #[test]
    fn a_ticket_is_redeemed_once_and_expires() {
        let t0 = Instant::now();
        let store = TicketStore::new(Duration::from_secs(30), 10);
        let t = store.issue(id(), t0).unwrap();
        assert!(store.peek(&t, t0).is_some());
        assert_eq!(&*store.redeem(&t, t0).unwrap().user, "u");
        assert!(store.redeem(&t, t0).is_none());
        let late = store.issue(id(), t0).unwrap();
        assert!(store.peek(&late, t0 + Duration::from_secs(30)).is_none());
        assert!(store.redeem(&late, t0 + Duration::from_secs(31)).is_none());
    }

    #[test]
    fn the_store_is_bounded_and_sweeps_expired_tickets() {
        let t0 = Instant::now();
        let store = TicketStore::new(Duration::from_secs(1), 2);
        store.issue(id(), t0).unwrap();
        store.issue(id(), t0).unwrap();
        assert_eq!(store.issue(id(), t0), Err(TicketError::Full));
        assert!(store.issue(id(), t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(store.len(), 1);
    }
}
