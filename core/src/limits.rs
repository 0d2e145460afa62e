//! Limits: the per-session inbound token bucket and the connection counters.
//!
//! The counters are global, per IP and per user; their guards release a slot when a session
//! ends.

use std::{
    hash::Hash,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use dashmap::DashMap;

use crate::{
    backplane::{Backplane, Completion},
    protocol::Rejection,
};

/// A token bucket: `rate` tokens per second, at most `burst` banked.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most connections over a limit that are still answered with their HTTP status at once.
///
/// Each holds a TLS or QUIC handshake for at most the handshake timeout; beyond this,
/// further connections over a limit are dropped (TCP) or refused (QUIC) without a status.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// Most of those places one address may hold.
///
/// So one host over its quota cannot take them all from other over-limit clients.
pub const MAX_REFUSALS_PER_IP: usize = 16;

/// Connection counts with their maxima. Cheap to share.
///
/// A slot is taken per TCP or QUIC connection as soon as it is accepted (before TLS), so
/// plain HTTP connections, idle QUIC connections and sessions all count.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    max_per_user: usize,
    total: AtomicUsize,
    refusals: AtomicUsize,
    refusals_per_ip: DashMap<IpAddr, usize>,
    per_ip: DashMap<IpAddr, usize>,
    per_user: DashMap<Arc<str>, usize>,
}

/// A held connection slot (global and per IP); released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

/// A connection over a limit that is being answered with its status; released on drop.
#[derive(Debug)]
pub struct RefusalSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

/// A held per-user slot, released on drop.
///
/// It is held on this node and, in cluster mode, in the cluster's count.
pub struct UserSlot {
    limits: Arc<ConnectionLimits>,
    user: Arc<str>,
    /// The cluster that counted it too.
    cluster: Option<Arc<dyn Backplane>>,
}

impl std::fmt::Debug for UserSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSlot")
            .field("user", &self.user)
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

impl ConnectionLimits {
    /// Limits with these maxima.
    pub fn new(max_total: usize, max_per_ip: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            max_per_user,
            total: AtomicUsize::new(0),
            refusals: AtomicUsize::new(0),
            refusals_per_ip: DashMap::new(),
            per_ip: DashMap::new(),
            per_user: DashMap::new(),
        })
    }

    /// Takes a global and a per-IP slot, or says which limit is reached.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Rejection> {
        let previous = self.total.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::ServerFull);
        }
        if !increment(&self.per_ip, ip, self.max_per_ip) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::TooManyFromIp);
        }
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Takes a per-user slot, or `Err` when the user is at the limit.
    pub fn acquire_user(self: &Arc<Self>, user: Arc<str>) -> Result<UserSlot, Rejection> {
        if !increment(&self.per_user, user.clone(), self.max_per_user) {
            return Err(Rejection::TooManyForUser);
        }
        Ok(UserSlot {
            limits: self.clone(),
            user,
            cluster: None,
        })
    }

    /// Takes a per-user slot on this node and, in a cluster, in the cluster-wide count too.
    ///
    /// The cluster-wide count is taken when `backplane` is a cluster. `done` gets the slot
    /// or the refusal (at once on a single node, when the cluster has answered otherwise).
    pub fn acquire_user_then(
        self: &Arc<Self>,
        backplane: &Arc<dyn Backplane>,
        user: Arc<str>,
        done: Completion<Result<UserSlot, Rejection>>,
    ) {
        let mut slot = match self.acquire_user(user.clone()) {
            Ok(slot) => slot,
            Err(e) => return done(Err(e)),
        };
        let Some(cluster) = backplane.cluster() else {
            return done(Ok(slot));
        };
        let backplane = backplane.clone();
        cluster.acquire_user(
            &user,
            self.max_per_user,
            Box::new(move |counted| match counted {
                Ok(true) => {
                    slot.cluster = Some(backplane.clone());
                    done(Ok(slot));
                }
                Ok(false) => done(Err(Rejection::TooManyForUser)),
                Err(_) => done(Err(Rejection::ClusterUnavailable)),
            }),
        );
    }

    /// Whether connections from `ip`, or all, have reached a quarter of their limit.
    ///
    /// From then on a QUIC client must prove its address (Retry) before it is counted, so
    /// spoofed packets cannot fill another address's quota or the server's.
    pub fn is_busy(&self, ip: IpAddr) -> bool {
        let per_ip = self.per_ip.get(&ip).map(|c| *c).unwrap_or(0);
        per_ip >= self.max_per_ip.div_ceil(4) || self.total() >= self.max_total.div_ceil(4)
    }

    /// Takes a place for a connection over a limit that is answered with its status.
    ///
    /// It is one of the [`MAX_REFUSALS_IN_FLIGHT`] places (at most [`MAX_REFUSALS_PER_IP`]
    /// for `ip`); `None` when none is left (drop it instead).
    pub fn refusal(self: &Arc<Self>, ip: IpAddr) -> Option<RefusalSlot> {
        let previous = self.refusals.fetch_add(1, Ordering::AcqRel);
        if previous >= MAX_REFUSALS_IN_FLIGHT {
            self.refusals.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if !increment(&self.refusals_per_ip, ip, MAX_REFUSALS_PER_IP) {
            self.refusals.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RefusalSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections currently held.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

fn increment<K: Hash + Eq>(map: &DashMap<K, usize>, key: K, max: usize) -> bool {
    let mut count = map.entry(key).or_insert(0);
    if *count >= max {
        return false;
    }
    *count += 1;
    true
}

fn decrement<K: Hash + Eq>(map: &DashMap<K, usize>, key: &K) {
    map.remove_if_mut(key, |_, count| {
        *count = count.saturating_sub(1);
        *count == 0
    });
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        decrement(&self.limits.per_ip, &self.ip);
    }
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.limits.refusals.fetch_sub(1, Ordering::AcqRel);
        decrement(&self.limits.refusals_per_ip, &self.ip);
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.as_ref().and_then(|b| b.cluster()) {
            cluster.release_user(&self.user);
        }
        decrement(&self.limits.per_user, &self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn limits_are_checked_in_order_and_released() {
        let limits = ConnectionLimits::new(3, 2, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = limits.acquire(a).unwrap();
        let _s2 = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).unwrap_err(), Rejection::TooManyFromIp);
        let _s3 = limits.acquire(b).unwrap();
        assert_eq!(limits.acquire(b).unwrap_err(), Rejection::ServerFull);
        drop(s1);
        assert_eq!(limits.total(), 2);
        let _s4 = limits.acquire(a).unwrap();
        let u = limits.acquire_user("bob".into()).unwrap();
        assert_eq!(
            limits.acquire_user("bob".into()).unwrap_err(),
            Rejection::TooManyForUser
        );
        drop(u);
        assert!(limits.acquire_user("bob".into()).is_ok());
    }

    #[test]
    fn busy_from_a_quarter_of_either_limit() {
        let limits = ConnectionLimits::new(100, 8, 1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let _one = limits.acquire(a).unwrap();
        assert!(!limits.is_busy(a));
        let _two = limits.acquire(a).unwrap();
        assert!(limits.is_busy(a) && !limits.is_busy(b));
        let _many: Vec<_> = (0..23)
            .map(|i| limits.acquire(IpAddr::from([10, 1, 0, i])).unwrap())
            .collect();
        assert!(limits.is_busy(b), "25 of 100 in all");
    }

    #[test]
    fn refusals_in_flight_are_bounded_per_address_and_in_all_and_released() {
        let limits = ConnectionLimits::new(1, 1, 1);
        let ip = |i: usize| IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
        let one: Vec<_> = (0..MAX_REFUSALS_PER_IP)
            .map(|_| limits.refusal(ip(0)).expect("within the address's share"))
            .collect();
        assert!(
            limits.refusal(ip(0)).is_none(),
            "one address's share is spent"
        );
        let others: Vec<_> = (1..=MAX_REFUSALS_IN_FLIGHT - MAX_REFUSALS_PER_IP)
            .map(|i| limits.refusal(ip(i)).expect("within the bound"))
            .collect();
        assert!(limits.refusal(ip(9999)).is_none(), "all places are taken");
        drop(others);
        drop(one);
        assert!(limits.refusal(ip(0)).is_some());
    }
}
