//! The gateway's one clock.
//!
//! Core reads none: every `now` it is given comes from here. Monotonic time is tokio's, so
//! tests that pause or advance tokio's time drive sessions, deadlines and rates alike; core
//! takes it as a std `Instant`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gateway_core::connection::Now;

/// The current time for core: the monotonic instant and the wall clock's Unix seconds.
///
/// The Unix seconds are for JWT expiry.
pub fn now() -> Now {
    Now {
        instant: instant(),
        unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// The current monotonic instant (tokio's clock).
pub fn instant() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    #[test]
    fn reads_the_monotonic_and_the_wall_clock() {
        let before = Instant::now();
        let now = super::now();
        assert!(before <= now.instant && now.instant <= Instant::now());
        // 2020-09-13: any clock this runs on is later.
        assert!(now.unix_secs > 1_600_000_000, "{}", now.unix_secs);
    }
}
