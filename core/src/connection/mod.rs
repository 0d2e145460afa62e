//! The per-session protocol driver shared by both transports.
//!
//! An adapter creates one [`Connection`] per admitted session, feeds it every inbound frame
//! ([`on_text`](Connection::on_text), [`on_binary`](Connection::on_binary),
//! [`on_datagram`](Connection::on_datagram)), calls [`poll`](Connection::poll) at the
//! deadline it returns, and writes what the session's outbox yields. Replies go to the
//! session's own outbox. Dropping the connection leaves its rooms and unregisters it.

mod error;

pub use error::RequestError;

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    auth::{Identity, JwtVerifier},
    backplane::ClusterUnavailable,
    hub::{Hub, JoinOutcome, JoinReply, Publish, Since},
    limits::{ConnectionLimits, TokenBucket, UserSlot},
    liveness::{Liveness, LivenessAction},
    policy::EndpointPolicy,
    protocol::{
        codes::CloseCode, decode_binary, decode_json, AckFields, AckMembers, CloseReason,
        InvalidRequest, Payload, Rejection, Request, RequestId, RoomName, ServerFrame,
    },
    session::{Outbound, OutboxReceiver, QueueLimits, SessionHandle, TransportKind},
};

/// The window over which refused frames count towards closing a flooding session.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// Requests a session may send while its first `auth` waits for the cluster's per-user
/// count; they are handled in order once it is decided. More get `error unauthorized`.
pub const MAX_QUEUED_DURING_AUTH: usize = 32;

/// Wakes a session's driver: something the connection waited for arrived, call
/// [`Connection::on_wake`].
pub type WakeSignal = Arc<tokio::sync::Notify>;

/// The current time, as both a monotonic instant (deadlines, rates) and Unix seconds (JWT).
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
    /// A first `auth` waiting for the per-user count (boxed: rare, and idle sessions
    /// should not carry its size).
    pending_auth: Option<Box<PendingAuth>>,
}

/// The slot an `auth` waits for, filled by the cluster's answer.
type SlotMailbox = Arc<Mutex<Option<Result<UserSlot, Rejection>>>>;

/// A first `auth` whose credential is valid, waiting for the (cluster-wide) per-user
/// count before the session becomes its user's.
#[derive(Debug)]
struct PendingAuth {
    slot: SlotMailbox,
    identity: Identity,
    id: Option<RequestId>,
    with_ack: bool,
    at: Now,
    queued: VecDeque<Request>,
}

enum Via {
    Stream,
    Datagram,
}

impl Connection {
    /// Opens a session: registers it with the hub and, if authenticated, queues `welcome`.
    /// With `pings`, liveness queues a transport ping ([`Outbound::Ping`]) every heartbeat
    /// and closes a session that did not answer the previous one (transports whose own
    /// keep-alive does this, like QUIC, pass `false`).
    pub fn open(
        services: Services,
        policy: Arc<EndpointPolicy>,
        transport: TransportKind,
        pings: bool,
        admitted: Admitted,
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

    /// What the driver awaits besides frames and the deadline, on sessions that have
    /// something to wait for (a first-message `auth` in cluster mode).
    pub fn wake_signal(&self) -> Option<WakeSignal> {
        self.wake.clone()
    }

    /// The [`wake_signal`](Self::wake_signal) fired: finishes a first `auth` the cluster
    /// has answered, then handles the requests that arrived meanwhile.
    pub fn on_wake(&mut self, now: Now) {
        let decided = self
            .pending_auth
            .as_ref()
            .and_then(|p| p.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        let Some(result) = decided else { return };
        let pending = self.pending_auth.take().expect("checked");
        match result {
            Ok(slot) => {
                self.liveness.set_auth_deadline(None);
                if pending.with_ack {
                    self.ack(pending.id.as_ref(), &AckFields::default());
                }
                self.become_authenticated(pending.identity, Some(slot), pending.at);
            }
            Err(rejection) => {
                self.reply_error(pending.id.as_ref(), RequestError::UserSlot(rejection))
            }
        }
        let mut queued = pending.queued;
        while let Some(request) = queued.pop_front() {
            if let Some(next) = self.pending_auth.as_mut() {
                // A queued `auth` started another wait: the rest waits for it.
                next.queued.push_back(request);
                continue;
            }
            self.dispatch(Ok(request), now, Via::Stream);
        }
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

    /// Frames that carry no request arrived: WebSocket control frames (ping, pong) and
    /// continuation frames, or WebTransport streams the protocol does not use. Each takes a
    /// token from the rate limit like any frame; returns whether all were within it.
    pub fn on_control(&mut self, frames: u32, now: Now) -> bool {
        (0..frames).fold(true, |ok, _| self.admit_rate(now).is_some() && ok)
    }

    /// The peer answered a transport ping.
    pub fn on_pong(&mut self) {
        self.liveness.on_pong();
    }

    /// Runs the timers due at `now` (pings, auth deadline, token expiry) and returns when to
    /// call again.
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

    /// Takes a token from the session's bucket. A refused frame is answered
    /// `rate_limited` (the 1st, 2nd, 4th, 8th... refusal of a window, so a flood does not
    /// get one error per frame); more than `rate_burst` refusals within
    /// [`ABUSE_WINDOW`] close the session with 4008, however many frames got through.
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
        if datagram {
            // Datagrams carry volatile publishes only, and get no reply.
            if let Request::Publish {
                room, data, echo, ..
            } = request
            {
                if self.identity.is_some()
                    && self
                        .publish(None, &room, &data, echo, true, now, false)
                        .is_ok()
                {
                    self.stats.publishes += 1;
                }
            }
            return;
        }
        let id = request.id().cloned();
        if let Err(e) = self.handle_request(request, now) {
            self.reply_error(id.as_ref(), e);
        }
    }

    /// Handles a request from the message stream. Refusals known at once are returned;
    /// the answers that come later are queued by the completions.
    fn handle_request(&mut self, request: Request, now: Now) -> Result<(), RequestError> {
        if self.identity.is_none() {
            return match request {
                Request::Auth { id, token } => self.authenticate(id.as_ref(), &token, now, true),
                Request::Hello { token: Some(token) } => {
                    self.authenticate(None, &token, now, false)
                }
                Request::Hello { token: None } => Ok(()),
                _ => Err(RequestError::NotAuthenticated),
            };
        }
        match request {
            Request::Hello { token: None } => Ok(()),
            Request::Hello { token: Some(token) } => self.authenticate(None, &token, now, false),
            Request::Auth { id, token } => self.authenticate(id.as_ref(), &token, now, true),
            Request::Join {
                id,
                room,
                since,
                epoch,
            } => {
                let since = since.map(|seq| Since {
                    seq,
                    // Without an epoch nothing can match: `recovered: false`.
                    epoch: epoch.as_deref().unwrap_or(""),
                });
                self.join(id, room, since, now)
            }
            Request::Leave { id, room } => {
                // A join the cluster refused left the room already: `not_member`.
                if !(self.joined.remove(&room) && self.services.hub.leave(&self.handle, &room)) {
                    return Err(RequestError::NotMember);
                }
                self.ack(id.as_ref(), &AckFields::default());
                Ok(())
            }
            Request::Publish {
                id,
                room,
                data,
                echo,
                volatile,
            } => {
                self.publish(id, &room, &data, echo, volatile, now, true)?;
                self.stats.publishes += 1;
                Ok(())
            }
            Request::Send { id, to, data } => {
                let from = self.handle.user().cloned();
                let handle = self.handle.clone();
                self.services.hub.send_to_user(
                    &to,
                    from.as_ref(),
                    &data,
                    Box::new(move |delivered| {
                        handle.send(match delivered {
                            Ok(delivered) => ack_frame(
                                id.as_ref(),
                                &AckFields {
                                    delivered: Some(delivered),
                                    ..Default::default()
                                },
                            ),
                            Err(e) => error_frame(id.as_ref(), &e.into()),
                        });
                    }),
                );
                Ok(())
            }
            Request::Presence { id, room } => {
                if !self.may_join(&room) {
                    return Err(RequestError::RoomNotAllowed);
                }
                let handle = self.handle.clone();
                let room_text = room.to_string();
                self.services.hub.presence(
                    &room,
                    now.instant,
                    Box::new(move |listing| {
                        handle.send(match listing {
                            Ok(listing) => listing.ack(id.as_ref(), &room_text),
                            Err(e) => error_frame(id.as_ref(), &e.into()),
                        });
                    }),
                );
                Ok(())
            }
            Request::Ping { id } => {
                self.handle
                    .send(ServerFrame::Pong { id: id.as_ref() }.to_outbound());
                Ok(())
            }
        }
    }

    fn may_join(&self, room: &RoomName) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|i| i.may_join(&self.policy.rooms, room.as_str()))
    }

    fn join(
        &mut self,
        id: Option<RequestId>,
        room: RoomName,
        since: Option<Since<'_>>,
        now: Now,
    ) -> Result<(), RequestError> {
        if !self.may_join(&room) {
            return Err(RequestError::RoomNotAllowed);
        }
        if !self.joined.contains(&room) && self.joined.len() >= self.policy.max_rooms {
            // Joins the cluster refused do not count.
            let (hub, handle) = (&self.services.hub, &self.handle);
            self.joined.retain(|r| hub.is_member(handle, r));
        }
        if !self.joined.contains(&room) && self.joined.len() >= self.policy.max_rooms {
            return Err(RequestError::TooManyRooms(self.policy.max_rooms));
        }
        // The reply is queued by the hub, before any replayed or live message of the room.
        let room_text = room.to_string();
        let hub = self.services.hub.clone();
        let reply: JoinReply = Box::new(
            move |outcome: Result<&JoinOutcome, &ClusterUnavailable>| match outcome {
                Ok(outcome) => {
                    if let Some(recovered) = outcome.recovered {
                        hub.stats().count_recovery(recovered);
                    }
                    ack_frame(
                        id.as_ref(),
                        &AckFields {
                            room: Some(room_text),
                            seq: Some(outcome.seq),
                            epoch: Some(outcome.epoch.to_string()),
                            members: Some(AckMembers::Count(outcome.members)),
                            recovered: outcome.recovered,
                            ..Default::default()
                        },
                    )
                }
                Err(e) => error_frame(id.as_ref(), &e.clone().into()),
            },
        );
        self.services
            .hub
            .join(&self.handle, &room, since, now.instant, reply)?;
        self.joined.insert(room);
        Ok(())
    }

    /// Publishes to `room` if the identity may; with `reply`, answers with the ack (its
    /// `seq`) or the cluster's failure when the cluster has taken the message.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        id: Option<RequestId>,
        room: &RoomName,
        data: &Payload,
        echo: bool,
        volatile: bool,
        now: Now,
        reply: bool,
    ) -> Result<(), RequestError> {
        let identity = self.identity.as_ref().expect("authenticated");
        if !identity.may_publish(&self.policy.rooms, room.as_str()) {
            return Err(RequestError::PublishNotAllowed);
        }
        let exclude = (!echo).then(|| self.handle.id());
        let handle = self.handle.clone();
        let message = Publish {
            room,
            from: Some(&identity.user),
            data,
            volatile,
            exclude,
        };
        self.services.hub.publish(
            message,
            now.instant,
            Box::new(move |seq| {
                if !reply {
                    return;
                }
                handle.send(match seq {
                    Ok(seq) => ack_frame(
                        id.as_ref(),
                        &AckFields {
                            seq,
                            ..Default::default()
                        },
                    ),
                    Err(e) => error_frame(id.as_ref(), &e.into()),
                });
            }),
        )?;
        Ok(())
    }

    fn authenticate(
        &mut self,
        id: Option<&RequestId>,
        token: &str,
        now: Now,
        with_ack: bool,
    ) -> Result<(), RequestError> {
        if self.anonymous {
            return Err(RequestError::AuthNotUsed);
        }
        let verifier = self
            .services
            .verifier
            .clone()
            .ok_or(RequestError::NoVerifier)?;
        let identity = verifier.verify(token, now.unix_secs)?;
        match &self.identity {
            Some(current) if current.user != identity.user => return Err(RequestError::OtherUser),
            Some(_) => {
                self.set_token_deadline(&identity, now);
                self.identity = Some(identity);
                if with_ack {
                    self.ack(id, &AckFields::default());
                }
            }
            None => self.claim_user_slot(id, identity, now, with_ack),
        }
        Ok(())
    }

    /// Takes the user's slot (in cluster mode, in the cluster-wide count) for a valid first
    /// `auth`; the session becomes the user's when it is granted (at once on a single node,
    /// in [`on_wake`](Self::on_wake) in cluster mode). Refused, it stays pending.
    fn claim_user_slot(
        &mut self,
        id: Option<&RequestId>,
        identity: Identity,
        now: Now,
        with_ack: bool,
    ) {
        let slot = SlotMailbox::default();
        let user = identity.user.clone();
        self.pending_auth = Some(Box::new(PendingAuth {
            slot: slot.clone(),
            identity,
            id: id.cloned(),
            with_ack,
            at: now,
            queued: VecDeque::new(),
        }));
        let wake = self.wake.clone();
        self.services.limits.acquire_user_then(
            self.services.hub.backplane(),
            user,
            Box::new(move |result| {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                if let Some(wake) = wake {
                    wake.notify_one();
                }
            }),
        );
        // A single node answers at once.
        self.on_wake(now);
    }

    fn become_authenticated(&mut self, identity: Identity, slot: Option<UserSlot>, now: Now) {
        self.set_token_deadline(&identity, now);
        let user = self.handle.set_user(identity.user.clone()).clone();
        self.identity = Some(identity);
        self.user_slot = slot;
        self.services.hub.register_user(&self.handle);
        let welcome = ServerFrame::Welcome {
            session: self.handle.id_str(),
            user: &user,
            endpoint: &self.policy.path,
            transport: self.handle.transport(),
            heartbeat_ms: self.policy.heartbeat.as_millis() as u64,
            node: self.services.hub.node_id(),
        };
        self.handle.send(welcome.to_outbound());
    }

    fn set_token_deadline(&mut self, identity: &Identity, now: Now) {
        // An `exp` too far ahead for the monotonic clock (up to u64::MAX seconds) has no
        // deadline rather than an overflow panic; `max_token_lifetime_secs` bounds it.
        let deadline = identity.expires_at.and_then(|exp| {
            now.instant
                .checked_add(Duration::from_secs(exp.saturating_sub(now.unix_secs)))
        });
        self.liveness.set_token_deadline(deadline);
    }

    fn ack(&self, id: Option<&RequestId>, fields: &AckFields) {
        self.handle.send(ack_frame(id, fields));
    }

    fn reply_error(&self, id: Option<&RequestId>, error: RequestError) {
        self.handle.send(error_frame(id, &error));
    }
}

/// An `ack` envelope.
fn ack_frame(id: Option<&RequestId>, fields: &AckFields) -> Outbound {
    ServerFrame::Ack { id, fields }.to_outbound()
}

/// The `error` envelope of a refused request.
fn error_frame(id: Option<&RequestId>, error: &RequestError) -> Outbound {
    ServerFrame::Error {
        id,
        code: error.code(),
        message: &error.to_string(),
    }
    .to_outbound()
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
