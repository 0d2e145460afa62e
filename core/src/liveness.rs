//! Liveness rules as a clock-free state machine.
//!
//! The rules are heartbeat pings, the first-message auth deadline and token expiry.
//! Adapters call [`Liveness::poll`] at [`Liveness::next_deadline`].

use std::time::{Duration, Instant};

use crate::protocol::{CloseCode, CloseReason};

/// What the adapter must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a transport ping.
    SendPing,
    /// Close the session.
    Close(CloseReason),
}

/// Timing state of one session.
#[derive(Debug, Clone)]
pub struct Liveness {
    ping_interval: Option<Duration>,
    next_ping: Option<Instant>,
    awaiting_pong: bool,
    auth_deadline: Option<Instant>,
    token_deadline: Option<Instant>,
}

impl Liveness {
    /// Pings every `ping_interval` when given (WebSocket).
    ///
    /// QUIC sessions pass `None` and rely on keep-alive.
    pub fn new(now: Instant, ping_interval: Option<Duration>) -> Self {
        Self {
            ping_interval,
            next_ping: ping_interval.map(|i| now + i),
            awaiting_pong: false,
            auth_deadline: None,
            token_deadline: None,
        }
    }

    /// The session must authenticate by `deadline`.
    pub fn set_auth_deadline(&mut self, deadline: Option<Instant>) {
        self.auth_deadline = deadline;
    }

    /// The session's token expires at `deadline` (`None`: never).
    pub fn set_token_deadline(&mut self, deadline: Option<Instant>) {
        self.token_deadline = deadline;
    }

    /// The peer answered a ping.
    pub fn on_pong(&mut self) {
        self.awaiting_pong = false;
    }

    /// The earliest instant at which [`poll`](Self::poll) has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.next_ping, self.auth_deadline, self.token_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// Advances to `now` and returns what is due, most severe first.
    pub fn poll(&mut self, now: Instant) -> Option<LivenessAction> {
        if self.auth_deadline.is_some_and(|d| now >= d) {
            return Some(LivenessAction::Close(CloseReason::new(
                CloseCode::Unauthorized,
                "auth timeout",
            )));
        }
        if self.token_deadline.is_some_and(|d| now >= d) {
            return Some(LivenessAction::Close(CloseReason::new(
                CloseCode::Unauthorized,
                "token expired",
            )));
        }
        let (Some(at), Some(interval)) = (self.next_ping, self.ping_interval) else {
            return None;
        };
        if now < at {
            return None;
        }
        if self.awaiting_pong {
            return Some(LivenessAction::Close(CloseReason::new(
                CloseCode::HeartbeatTimeout,
                "heartbeat timeout",
            )));
        }
        self.awaiting_pong = true;
        self.next_ping = Some(now + interval);
        Some(LivenessAction::SendPing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn unanswered_ping_times_out_at_the_next_one() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Some(10 * S));
        assert_eq!(l.poll(t0 + 5 * S), None);
        assert_eq!(l.poll(t0 + 10 * S), Some(LivenessAction::SendPing));
        assert_eq!(l.next_deadline(), Some(t0 + 20 * S));
        match l.poll(t0 + 20 * S) {
            Some(LivenessAction::Close(r)) => assert_eq!(r.code, CloseCode::HeartbeatTimeout),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answered_ping_keeps_the_session() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Some(10 * S));
        assert_eq!(l.poll(t0 + 10 * S), Some(LivenessAction::SendPing));
        l.on_pong();
        assert_eq!(l.poll(t0 + 20 * S), Some(LivenessAction::SendPing));
    }

    #[test]
    fn auth_and_token_deadlines_close_with_4001() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, None);
        assert_eq!(l.next_deadline(), None);
        l.set_auth_deadline(Some(t0 + 5 * S));
        assert_eq!(l.poll(t0 + 4 * S), None);
        assert!(
            matches!(l.poll(t0 + 5 * S), Some(LivenessAction::Close(r)) if r.code == CloseCode::Unauthorized && r.reason == "auth timeout")
        );
        l.set_auth_deadline(None);
        l.set_token_deadline(Some(t0 + 7 * S));
        assert!(
            matches!(l.poll(t0 + 8 * S), Some(LivenessAction::Close(r)) if r.reason == "token expired")
        );
    }
}
