//! One-time tickets: short-lived, single-use credentials for a URL.
//!
//! A client gets one from `POST /api/tickets` with its JWT and puts it in a URL
//! (`?ticket=`), where a JWT would leak into logs and browser history.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, RngCore};

use crate::auth::Identity;

/// Most unredeemed tickets one user may hold at once.
pub const MAX_TICKETS_PER_USER: u32 = 16;

/// Most expired tickets one operation removes.
///
/// So no call holds the lock for more than a constant amount of work. Each issue adds one
/// ticket and removes up to this many, so a backlog of expired tickets drains quickly.
const SWEEP_PER_OPERATION: usize = 64;

/// Why no ticket was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The store holds its maximum of tickets issued within one lifetime.
    #[error("too many outstanding tickets")]
    Full,
    /// This user holds [`MAX_TICKETS_PER_USER`] unredeemed tickets.
    #[error("too many outstanding tickets for this user")]
    UserLimit,
}

struct Entry {
    identity: Identity,
    expires: Instant,
}

struct Tickets {
    /// Where ticket values come from.
    rng: StdRng,
    entries: HashMap<String, Entry>,
    /// Every ticket issued within the last `ttl`, in issue order.
    ///
    /// That is also expiry order because the lifetime is the same for all. Redeemed tickets
    /// stay here until they expire.
    expiry: VecDeque<(Instant, String)>,
    /// Unredeemed, unexpired tickets per user.
    per_user: HashMap<Arc<str>, u32>,
}

impl Tickets {
    /// Removes up to [`SWEEP_PER_OPERATION`] expired tickets.
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_PER_OPERATION {
            match self.expiry.front() {
                Some((expires, _)) if *expires <= now => {}
                _ => return,
            }
            let Some((_, ticket)) = self.expiry.pop_front() else {
                return;
            };
            if let Some(entry) = self.entries.remove(&ticket) {
                self.release_user(&entry.identity.user);
            }
        }
    }

    fn release_user(&mut self, user: &Arc<str>) {
        if let Some(count) = self.per_user.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

/// A bounded store of unredeemed tickets.
///
/// It holds at most `capacity` tickets issued within one lifetime, and at most
/// [`MAX_TICKETS_PER_USER`] unredeemed per user; every operation does a constant amount of
/// work under the lock.
pub struct TicketStore {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Tickets>,
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
    ///
    /// Ticket values are drawn from `rng`: it must be cryptographically secure and seeded
    /// from the OS in production (tickets are credentials); tests seed it with a constant.
    pub fn new(ttl: Duration, capacity: usize, rng: StdRng) -> Self {
        Self {
            ttl,
            capacity,
            inner: Mutex::new(Tickets {
                rng,
                entries: HashMap::new(),
                expiry: VecDeque::new(),
                per_user: HashMap::new(),
            }),
        }
    }

    /// Lifetime of a ticket.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a ticket for `identity`, valid until `now + ttl`.
    pub fn issue(&self, identity: Identity, now: Instant) -> Result<String, TicketError> {
        let mut t = self.lock();
        t.sweep(now);
        if t.per_user.get(&identity.user).copied().unwrap_or(0) >= MAX_TICKETS_PER_USER {
            return Err(TicketError::UserLimit);
        }
        if t.expiry.len() >= self.capacity {
            return Err(TicketError::Full);
        }
        let ticket = ticket_value(&mut t.rng);
        *t.per_user.entry(identity.user.clone()).or_insert(0) += 1;
        let expires = now + self.ttl;
        t.expiry.push_back((expires, ticket.clone()));
        t.entries
            .insert(ticket.clone(), Entry { identity, expires });
        Ok(ticket)
    }

    /// The identity of a valid ticket, without redeeming it.
    pub fn peek(&self, ticket: &str, now: Instant) -> Option<Identity> {
        let t = self.lock();
        t.entries
            .get(ticket)
            .filter(|e| e.expires > now)
            .map(|e| e.identity.clone())
    }

    /// Redeems a ticket: succeeds once, for the first caller, while it is valid.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<Identity> {
        let mut t = self.lock();
        t.sweep(now);
        let entry = t.entries.remove(ticket)?;
        t.release_user(&entry.identity.user);
        (entry.expires > now).then_some(entry.identity)
    }

    /// Unredeemed tickets currently held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fresh ticket value: 24 bytes from `rng`, base64url.
pub fn ticket_value<R: RngCore + ?Sized>(rng: &mut R) -> String {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    rng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> StdRng {
        rand::SeedableRng::seed_from_u64(7)
    }

    fn id() -> Identity {
        Identity::anonymous("u".into())
    }

    fn user(name: &str) -> Identity {
        Identity::anonymous(name.into())
    }

    #[test]
    fn ticket_values_come_from_the_given_source() {
        let t0 = Instant::now();
        let (a, b) = (
            TicketStore::new(Duration::from_secs(30), 10, rng()),
            TicketStore::new(Duration::from_secs(30), 10, rng()),
        );
        let first = a.issue(id(), t0).unwrap();
        assert_eq!(first, b.issue(id(), t0).unwrap(), "same seed, same tickets");
        assert_ne!(first, a.issue(id(), t0).unwrap());
        // 24 bytes, base64url without padding.
        assert_eq!(first.len(), 32);
        assert!(first
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn a_ticket_is_redeemed_once_and_expires() {
        let t0 = Instant::now();
        let store = TicketStore::new(Duration::from_secs(30), 10, rng());
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
        let store = TicketStore::new(Duration::from_secs(1), 2, rng());
        store.issue(user("a"), t0).unwrap();
        store.issue(user("b"), t0).unwrap();
        assert_eq!(store.issue(user("c"), t0), Err(TicketError::Full));
        assert!(store.issue(user("c"), t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn one_user_cannot_hold_more_than_the_per_user_cap() {
        let t0 = Instant::now();
        let store = TicketStore::new(Duration::from_secs(30), 1000, rng());
        let mut held: Vec<_> = (0..MAX_TICKETS_PER_USER)
            .map(|_| store.issue(user("greedy"), t0).unwrap())
            .collect();
        assert_eq!(store.issue(user("greedy"), t0), Err(TicketError::UserLimit));
        // Others are unaffected.
        assert!(store.issue(user("other"), t0).is_ok());
        // Redeeming one gives the user one back; so does expiry.
        assert!(store.redeem(&held.pop().unwrap(), t0).is_some());
        assert!(store.issue(user("greedy"), t0).is_ok());
        assert!(store
            .issue(user("greedy"), t0 + Duration::from_secs(31))
            .is_ok());
    }

    #[test]
    fn each_operation_sweeps_a_bounded_number_of_expired_tickets() {
        let t0 = Instant::now();
        let store = TicketStore::new(Duration::from_secs(1), 10_000, rng());
        for i in 0..1000 {
            store.issue(user(&format!("u{i}")), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(2);
        store.issue(user("late"), later).unwrap();
        assert_eq!(store.len(), 1000 + 1 - SWEEP_PER_OPERATION);
        // Further operations drain the rest.
        for _ in 0..1000 / SWEEP_PER_OPERATION {
            store.redeem("nope", later);
        }
        assert_eq!(store.len(), 1);
    }
}
