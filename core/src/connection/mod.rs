//! The per-session protocol driver shared by both transports.
//!
//! An adapter creates one [`Connection`] per admitted session, feeds it every inbound frame
//! ([`on_text`](Connection::on_text), [`on_binary`](Connection::on_binary),
//! [`on_datagram`](Connection::on_datagram)), calls [`poll`](Connection::poll) at the
//! deadline it returns, and writes what the session's outbox yields. Replies go to the
//! session's own outbox. Dropping the connection leaves its rooms and unregisters it.

mod auth;
mod error;
mod reply;
mod requests;
mod upstream;

pub use error::RequestError;
pub use upstream::{MAX_PARKED, MAX_RPCS_IN_FLIGHT};

use auth::PendingAuth;
use requests::{Outgoing, PublishReply};
use upstream::Calls;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    auth::{Identity, JwtVerifier},
    hub::Hub,
    limits::{ConnectionLimits, TokenBucket, UserSlot},
    liveness::{Liveness, LivenessAction},
    policy::EndpointPolicy,
    protocol::{
        codes::CloseCode, decode_binary, decode_json, CloseReason, InvalidRequest, Request,
        RoomName,
    },
    session::{OutboxReceiver, QueueLimits, SessionHandle, TransportKind},
    upstream::Welcome,
};

/// The window over which refused frames count towards closing a flooding session.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// Requests a session may send while its first `auth` waits for the cluster.
///
/// The cluster's per-user count decides the `auth`; the requests are handled in order once
/// it is decided. More get `error unauthorized`.
pub const MAX_QUEUED_DURING_AUTH: usize = 32;

/// Wakes a session's driver.
///
/// Something the connection waited for arrived: call [`Connection::on_wake`].
pub type WakeSignal = Arc<tokio::sync::Notify>;

/// The current time, as both a monotonic instant (deadlines, rates) and Unix seconds (JWT).
///
/// Core reads no clock: the adapter that drives a connection reads its own and passes it in.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Wall-clock seconds since the Unix epoch.
    pub unix_secs: u64,
}

/// How a session was admitted before it opened.
#[derive(Debug)]
pub enum Admitted {
    /// `auth = "none"`: the user id becomes `anon-<session id>`.
    Anonymous,
    /// A valid credential came with the request; the per-user slot is held.
    Authenticated(Identity, UserSlot),
    /// `auth = "first-message"` without credential: must send `auth` in time.
    Pending,
}

/// Services every connection uses.
#[derive(Debug, Clone)]
pub struct Services {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The JWT verifier, when `[auth]` is configured.
    pub verifier: Option<Arc<JwtVerifier>>,
    /// Connection counters.
    pub limits: Arc<ConnectionLimits>,
}

/// Counters of one session, for its access-log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InboundStats {
    /// Frames received (datagrams included).
    pub frames: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Publishes handed to the hub (allowed by the identity's rooms).
    pub publishes: u64,
    /// Frames refused by the rate limit.
    pub rate_limited: u64,
}

/// One session's protocol state.
#[derive(Debug)]
pub struct Connection {
    services: Services,
    policy: Arc<EndpointPolicy>,
    handle: SessionHandle,
    identity: Option<Identity>,
    anonymous: bool,
    user_slot: Option<UserSlot>,
    joined: HashSet<RoomName>,
    bucket: TokenBucket,
    /// Frames refused by the rate limit since `refused_since`.
    refused: u32,
    refused_since: Instant,
    liveness: Liveness,
    stats: InboundStats,
    /// Present on sessions that may authenticate with a first message.
    wake: Option<WakeSignal>,
    /// A first `auth` waiting for the per-user count.
    ///
    /// Boxed: rare, and idle sessions should not carry its size.
    pending_auth: Option<Box<PendingAuth>>,
    /// Calls to the application's backend; only on endpoints that make them.
    calls: Option<Box<Calls>>,
    /// What the `connect` upstream granted for `welcome`, until the session has a user.
    welcome: Option<Box<Welcome>>,
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Stream,
    Datagram,
}

impl Connection {
    /// Opens a session: registers it with the hub and, if authenticated, queues `welcome`.
    ///
    /// With `pings`, liveness queues a transport ping
    /// ([`Outbound::Ping`](crate::session::Outbound::Ping)) every heartbeat and closes a
    /// session that did not answer the previous one (transports whose own keep-alive does
    /// this, like QUIC, pass `false`). `welcome` is what a `connect` upstream granted:
    /// `welcome.data` and the rooms joined right after `welcome`.
    pub fn open(
        services: Services,
        policy: Arc<EndpointPolicy>,
        transport: TransportKind,
        pings: bool,
        admitted: Admitted,
        welcome: Option<Box<Welcome>>,
        now: Now,
    ) -> (Connection, OutboxReceiver) {
        let (handle, outbox) = SessionHandle::new(
            services.hub.new_session_id(),
            transport,
            policy.path.as_str().into(),
            QueueLimits {
                frames: policy.queue_capacity,
                bytes: policy.queue_bytes,
            },
        );
        let ping = pings.then_some(policy.heartbeat);
        let mut conn = Connection {
            bucket: TokenBucket::new(policy.rate_per_sec, policy.rate_burst, now.instant),
            liveness: Liveness::new(now.instant, ping),
            services,
            handle,
            identity: None,
            anonymous: false,
            user_slot: None,
            joined: HashSet::new(),
            refused: 0,
            refused_since: now.instant,
            stats: InboundStats::default(),
            wake: matches!(admitted, Admitted::Pending).then(WakeSignal::default),
            pending_auth: None,
            calls: None,
            welcome,
            policy,
        };
        conn.services.hub.open_session(&conn.handle);
        match admitted {
            Admitted::Anonymous => {
                conn.anonymous = true;
                let user = format!("anon-{}", conn.handle.id());
                conn.become_authenticated(Identity::anonymous(user), None, now);
            }
            Admitted::Authenticated(identity, slot) => {
                conn.become_authenticated(identity, Some(slot), now);
            }
            Admitted::Pending => {
                conn.liveness
                    .set_auth_deadline(Some(now.instant + conn.policy.auth_timeout));
            }
        }
        (conn, outbox)
    }

    /// The session's handle.
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// The endpoint policy.
    pub fn policy(&self) -> &EndpointPolicy {
        &self.policy
    }

    /// Inbound counters.
    pub fn stats(&self) -> InboundStats {
        self.stats
    }

    /// What the driver awaits besides frames and the deadline, if anything.
    ///
    /// Only sessions that have something to wait for have it (a first-message `auth` in
    /// cluster mode).
    pub fn wake_signal(&self) -> Option<WakeSignal> {
        self.wake.clone()
    }

    /// A JSON text frame arrived.
    pub fn on_text(&mut self, frame: Bytes, now: Now) {
        self.count(frame.len());
        if self.admit_rate(now).is_some() {
            let request = decode_json(&frame);
            self.dispatch(request, now, Via::Stream);
        }
    }

    /// A binary envelope arrived.
    pub fn on_binary(&mut self, frame: Bytes, now: Now) {
        self.count(frame.len());
        if self.admit_rate(now).is_some() {
            let request = decode_binary(&frame);
            self.dispatch(request, now, Via::Stream);
        }
    }

    /// A WebTransport datagram arrived: a volatile `publish`; anything else is ignored.
    pub fn on_datagram(&mut self, frame: Bytes, now: Now) {
        self.count(frame.len());
        if self.admit_rate(now).is_some() {
            let request = decode_json(&frame);
            self.dispatch(request, now, Via::Datagram);
        }
    }

    /// Frames that carry no request arrived; returns whether all were within the limit.
    ///
    /// They are WebSocket control frames (ping, pong) and continuation frames, or
    /// WebTransport streams the protocol does not use. Each takes a token from the rate
    /// limit like any frame.
    pub fn on_control(&mut self, frames: u32, now: Now) -> bool {
        (0..frames).fold(true, |ok, _| self.admit_rate(now).is_some() && ok)
    }

    /// The peer answered a transport ping.
    pub fn on_pong(&mut self) {
        self.liveness.on_pong();
    }

    /// Runs the timers due at `now` and returns when to call again.
    ///
    /// The timers are pings, the auth deadline and token expiry.
    pub fn poll(&mut self, now: Instant) -> Option<Instant> {
        while let Some(action) = self.liveness.poll(now) {
            match action {
                LivenessAction::SendPing => {
                    self.handle.send(crate::session::Outbound::Ping);
                }
                LivenessAction::Close(reason) => {
                    self.handle.close(reason);
                    return None;
                }
            }
        }
        self.liveness.next_deadline()
    }

    /// Closes the session with `reason` (the adapter writes the close).
    pub fn close(&self, reason: CloseReason) {
        self.handle.close(reason);
    }

    fn count(&mut self, len: usize) {
        self.stats.frames += 1;
        self.stats.bytes += len as u64;
    }

    /// Takes a token from the session's bucket.
    ///
    /// A refused frame is answered `rate_limited` (the 1st, 2nd, 4th, 8th... refusal of a
    /// window, so a flood does not get one error per frame); more than `rate_burst`
    /// refusals within [`ABUSE_WINDOW`] close the session with 4008, however many frames
    /// got through.
    fn admit_rate(&mut self, now: Now) -> Option<()> {
        if self.bucket.try_take(now.instant) {
            return Some(());
        }
        if now.instant.saturating_duration_since(self.refused_since) > ABUSE_WINDOW {
            self.refused_since = now.instant;
            self.refused = 0;
        }
        self.refused += 1;
        self.stats.rate_limited += 1;
        if self.refused > self.policy.rate_burst.max(1) {
            self.handle.close(CloseReason::new(
                CloseCode::TooSlowOrTooFast,
                "rate limit exceeded",
            ));
        } else if self.refused.is_power_of_two() {
            self.reply_error(None, RequestError::RateLimited);
        }
        None
    }

    fn dispatch(&mut self, request: Result<Request, InvalidRequest>, now: Now, via: Via) {
        let datagram = matches!(via, Via::Datagram);
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                if !datagram {
                    self.reply_error(e.id.as_ref(), e.error.into());
                }
                return;
            }
        };
        if let (false, Some(pending)) = (datagram, self.pending_auth.as_mut()) {
            if pending.queued.len() < MAX_QUEUED_DURING_AUTH {
                pending.queued.push_back(request);
            } else {
                self.reply_error(request.id(), RequestError::AuthInProgress);
            }
            return;
        }
        if let Some((request, via)) = self.park(request, via) {
            self.dispatch_now(request, now, via);
        }
    }

    /// Handles a request that waits for nothing.
    fn dispatch_now(&mut self, request: Request, now: Now, via: Via) {
        if matches!(via, Via::Datagram) {
            // Datagrams carry volatile publishes only, and get no reply.
            if let Request::Publish {
                room, data, echo, ..
            } = request
            {
                let message = Outgoing {
                    room: &room,
                    data: &data,
                    echo,
                    volatile: true,
                };
                if self.identity.is_some() {
                    let _ = self.publish(message, PublishReply::Silent, now);
                }
            }
            return;
        }
        let id = request.id().cloned();
        if let Err(e) = self.handle_request(request, now) {
            self.reply_error(id.as_ref(), e);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for room in self.joined.drain() {
            self.services.hub.leave(&self.handle, &room);
        }
        self.services.hub.close_session(&self.handle);
    }
}

#[cfg(test)]
mod tests;
