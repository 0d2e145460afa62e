//! A session's calls to the application's backend (PROTOCOL.md section 10).
//!
//! The connection asks for a [`Call`] and parks its later joins and publishes until the
//! answer comes back through [`Connection::on_answer`]; `rpc` calls overlap, up to
//! [`MAX_RPCS_IN_FLIGHT`]. The gateway makes the calls; nothing here waits.

use std::collections::VecDeque;

use super::{
    requests::{Outgoing, PublishReply},
    Connection, Now, RequestError, Via,
};
use crate::{
    hub::Since,
    policy::AuthMode,
    protocol::{AckFields, Payload, Request, RequestId, RoomName},
    upstream::{Answer, Call, CallBody, CallEvent, CallId, Failure, Outcome, PublishVerdict},
};

/// `rpc` calls one session may have in flight; one more gets `limit_exceeded`.
pub const MAX_RPCS_IN_FLIGHT: usize = 8;

/// Requests one session may have waiting behind a call; more get `limit_exceeded`.
pub const MAX_PARKED: usize = 64;

/// A session's calls: the one its ordered requests wait for, its rpcs, and what to start.
#[derive(Debug, Default)]
pub(super) struct Calls {
    next_id: u64,
    /// The call the session's joins and publishes wait for.
    ordered: Option<(CallId, Ordered)>,
    /// Requests that arrived while `ordered` was in flight, in order.
    parked: VecDeque<(Request, Via)>,
    /// What `parked` holds, in bytes of payload.
    parked_bytes: usize,
    /// The rpc calls in flight and the request ids they answer.
    rpcs: Vec<(CallId, RequestId)>,
    /// The refresh in flight (one at a time).
    refresh: Option<(CallId, Refresh)>,
    /// Calls asked for and not yet taken by the gateway.
    to_start: Vec<Call>,
}

/// What an ordered call does when it is answered.
#[derive(Debug)]
enum Ordered {
    /// A `join` through the `join` upstream.
    Join {
        id: Option<RequestId>,
        room: RoomName,
        since: Option<(u64, String)>,
    },
    /// A `publish` through the `publish` upstream.
    Publish {
        reply: PublishReply,
        room: RoomName,
        data: Payload,
        echo: bool,
        volatile: bool,
    },
}

/// A refresh in flight: the `auth` (or `hello` with a token) it answers.
#[derive(Debug)]
struct Refresh {
    id: Option<RequestId>,
    with_ack: bool,
}

impl Calls {
    fn start(&mut self, body: CallBody) -> CallId {
        self.next_id += 1;
        let id = CallId(self.next_id);
        self.to_start.push(Call { id, body });
        id
    }
}

/// What one parked request is charged besides its payload (the request itself).
const PARKED_OVERHEAD: usize = 256;

/// Whether a request waits behind an ordered call: joins, publishes and leaves.
///
/// A leave waits so that it never overtakes the join it undoes.
fn is_ordered(request: &Request) -> bool {
    matches!(
        request,
        Request::Join { .. } | Request::Publish { .. } | Request::Leave { .. }
    )
}

fn payload_size(data: &Payload) -> usize {
    match data {
        Payload::Json(b) | Payload::Binary(b) => b.len(),
    }
}

/// The bytes a parked request is charged.
fn parked_len(request: &Request) -> usize {
    PARKED_OVERHEAD
        + match request {
            Request::Publish { data, .. } => payload_size(data),
            _ => 0,
        }
}

/// The request with its payload copied out of the frame it was sliced from.
///
/// A parked request then holds its payload only, not the whole frame.
fn detached(request: Request) -> Request {
    match request {
        Request::Publish {
            id,
            room,
            data,
            echo,
            volatile,
        } => Request::Publish {
            id,
            room,
            data: match data {
                Payload::Json(b) => Payload::Json(bytes::Bytes::copy_from_slice(&b)),
                Payload::Binary(b) => Payload::Binary(bytes::Bytes::copy_from_slice(&b)),
            },
            echo,
            volatile,
        },
        other => other,
    }
}

impl Connection {
    /// The calls the connection asked for since the last time; the gateway starts them.
    ///
    /// Each is answered with [`on_answer`](Self::on_answer), unless the session ends first.
    pub fn take_calls(&mut self) -> Vec<Call> {
        self.calls
            .as_mut()
            .map(|c| std::mem::take(&mut c.to_start))
            .unwrap_or_default()
    }

    /// Whether the endpoint calls its backend for `event` (for `room`, if given).
    pub(super) fn calls_upstream(&self, event: CallEvent, room: Option<&RoomName>) -> bool {
        self.policy.upstream.as_ref().is_some_and(|u| match room {
            Some(room) => u.calls_for_room(event, room.as_str()),
            None => u.calls(event),
        })
    }

    /// Parks `request` if an ordered call is in flight and it must wait; returns it if not.
    pub(super) fn park(&mut self, request: Request, via: Via) -> Option<(Request, Via)> {
        let Some(calls) = self.calls.as_mut() else {
            return Some((request, via));
        };
        if calls.ordered.is_none() || !is_ordered(&request) {
            return Some((request, via));
        }
        let len = parked_len(&request);
        if calls.parked.len() >= MAX_PARKED
            || calls.parked_bytes + len > self.policy.queue_bytes.max(self.policy.max_message_bytes)
        {
            if matches!(via, Via::Stream) {
                self.reply_error(request.id(), RequestError::Backlog);
            }
            return None;
        }
        calls.parked_bytes += len;
        calls.parked.push_back((detached(request), via));
        None
    }

    /// The backend answered call `id` (or it failed).
    ///
    /// An answer to a call the connection no longer waits for is ignored.
    pub fn on_answer(&mut self, id: CallId, outcome: Outcome, now: Now) {
        let Some(calls) = self.calls.as_mut() else {
            return;
        };
        if let Some(i) = calls.rpcs.iter().position(|(c, _)| *c == id) {
            let (_, request) = calls.rpcs.swap_remove(i);
            self.answer_rpc(&request, outcome);
            return;
        }
        if calls.refresh.as_ref().is_some_and(|(c, _)| *c == id) {
            let (_, refresh) = calls.refresh.take().expect("checked");
            self.answer_refresh(refresh, outcome, now);
            return;
        }
        if !calls.ordered.as_ref().is_some_and(|(c, _)| *c == id) {
            return;
        }
        let (_, ordered) = calls.ordered.take().expect("checked");
        self.answer_ordered(ordered, outcome, now);
        self.release_parked(now);
    }

    /// Handles the parked requests in order until one starts another ordered call.
    fn release_parked(&mut self, now: Now) {
        loop {
            let Some(calls) = self.calls.as_mut() else {
                return;
            };
            if calls.ordered.is_some() {
                return;
            }
            let Some((request, via)) = calls.parked.pop_front() else {
                return;
            };
            calls.parked_bytes -= parked_len(&request);
            self.dispatch_now(request, now, via);
        }
    }

    /// Starts `body` as the call the session's later joins and publishes wait for.
    fn start_ordered(&mut self, body: CallBody, then: Ordered) {
        let calls = self.calls.get_or_insert_with(Default::default);
        let id = calls.start(body);
        calls.ordered = Some((id, then));
    }

    /// A `join` the endpoint's `join` upstream decides.
    pub(super) fn join_through_upstream(
        &mut self,
        id: Option<RequestId>,
        room: RoomName,
        since: Option<Since<'_>>,
    ) {
        let since = since.map(|s| (s.seq, s.epoch.to_owned()));
        let body = CallBody::Join { room: room.clone() };
        self.start_ordered(body, Ordered::Join { id, room, since });
    }

    /// A `publish` the endpoint's `publish` upstream checks first.
    pub(super) fn publish_through_upstream(&mut self, message: Outgoing<'_>, reply: PublishReply) {
        let body = CallBody::Publish {
            room: message.room.clone(),
            data: message.data.clone(),
        };
        let then = Ordered::Publish {
            reply,
            room: message.room.clone(),
            data: message.data.clone(),
            echo: message.echo,
            volatile: message.volatile,
        };
        self.start_ordered(body, then);
    }

    /// An `auth` on an `auth = "upstream"` endpoint: `connect` again, with `refresh`.
    pub(super) fn refresh_through_upstream(
        &mut self,
        id: Option<&RequestId>,
        token: &str,
        with_ack: bool,
    ) -> Result<(), RequestError> {
        if self.identity.is_none() {
            return Err(RequestError::NotAuthenticated);
        }
        let calls = self.calls.get_or_insert_with(Default::default);
        if calls.refresh.is_some() {
            return Err(RequestError::RefreshInFlight);
        }
        let call = calls.start(CallBody::Refresh {
            token: token.to_owned(),
        });
        let id = id.cloned();
        calls.refresh = Some((call, Refresh { id, with_ack }));
        Ok(())
    }

    /// An `rpc` frame: a call of the endpoint's `rpc` upstream, if it has one.
    pub(super) fn rpc(
        &mut self,
        id: RequestId,
        method: String,
        data: Payload,
    ) -> Result<(), RequestError> {
        if !self.calls_upstream(CallEvent::Rpc, None) {
            return Err(RequestError::NoRpc);
        }
        let calls = self.calls.get_or_insert_with(Default::default);
        if calls.rpcs.len() >= MAX_RPCS_IN_FLIGHT {
            return Err(RequestError::TooManyRpcs);
        }
        let call = calls.start(CallBody::Rpc { method, data });
        calls.rpcs.push((call, id));
        Ok(())
    }

    fn answer_rpc(&self, id: &RequestId, outcome: Outcome) {
        match outcome {
            Outcome::Answered(Answer::Rpc { data }) => self.ack(
                Some(id),
                &AckFields {
                    data: Some(data),
                    ..Default::default()
                },
            ),
            other => self.reply_error(Some(id), refused(other, RequestError::Rejected)),
        }
    }

    fn answer_ordered(&mut self, ordered: Ordered, outcome: Outcome, now: Now) {
        match ordered {
            Ordered::Join { id, room, since } => {
                let data = match outcome {
                    Outcome::Answered(Answer::Join { data }) => data,
                    other => {
                        return self
                            .reply_error(id.as_ref(), refused(other, RequestError::JoinRefused))
                    }
                };
                let since = since
                    .as_ref()
                    .map(|(seq, epoch)| Since { seq: *seq, epoch });
                if let Err(e) = self.join_now(id.clone(), room, since, data, now) {
                    self.reply_error(id.as_ref(), e);
                }
            }
            Ordered::Publish {
                reply,
                room,
                data,
                echo,
                volatile,
            } => self.answer_publish(reply, (room, data, echo, volatile), outcome, now),
        }
    }

    /// A refresh's answer: the same user extends the session to the new `expires_at`.
    ///
    /// Only the expiry changes (an answer without one keeps the old); anything else is
    /// refused and the old expiry stands.
    fn answer_refresh(&mut self, refresh: Refresh, outcome: Outcome, now: Now) {
        let Refresh { id, with_ack } = refresh;
        let (grant, identity) = match (outcome, self.identity.as_mut()) {
            (Outcome::Answered(Answer::Connect(grant)), Some(identity))
                if *identity.user == grant.user =>
            {
                (grant, identity)
            }
            _ => return self.reply_error(id.as_ref(), RequestError::RefreshRefused),
        };
        if grant.expires_at.is_some() {
            identity.expires_at = grant.expires_at;
            let identity = identity.clone();
            self.set_token_deadline(&identity, now);
        }
        if with_ack {
            self.ack(id.as_ref(), &AckFields::default());
        }
    }

    fn answer_publish(
        &mut self,
        reply: PublishReply,
        (room, data, echo, volatile): (RoomName, Payload, bool, bool),
        outcome: Outcome,
        now: Now,
    ) {
        let data = match outcome {
            Outcome::Answered(Answer::Publish(PublishVerdict::AsSent)) => data,
            Outcome::Answered(Answer::Publish(PublishVerdict::Replace(data)))
                if payload_size(&data) <= self.policy.max_message_bytes =>
            {
                data
            }
            Outcome::Answered(Answer::Publish(PublishVerdict::Skip)) => {
                if let PublishReply::Ack(id) = reply {
                    self.ack(id.as_ref(), &AckFields::default());
                }
                return;
            }
            other => {
                if let PublishReply::Ack(id) = reply {
                    self.reply_error(id.as_ref(), refused(other, RequestError::Rejected));
                }
                return;
            }
        };
        let message = Outgoing {
            room: &room,
            data: &data,
            echo,
            volatile,
        };
        let id = match &reply {
            PublishReply::Ack(id) => id.clone(),
            PublishReply::Silent => None,
        };
        let silent = matches!(reply, PublishReply::Silent);
        match self.publish_now(message, reply, now) {
            Ok(()) => self.stats.publishes += 1,
            Err(e) if !silent => self.reply_error(id.as_ref(), e),
            Err(_) => {}
        }
    }

    /// Whether the session ended on an endpoint that calls `disconnect`; then its call.
    ///
    /// Only a session that became its user's is reported; call it once, at the end.
    pub fn disconnect_call(&mut self, duration_ms: u64) -> Option<Call> {
        if self.identity.is_none() || !self.calls_upstream(CallEvent::Disconnect, None) {
            return None;
        }
        let reason = self.handle.close_reason();
        let body = CallBody::Disconnect {
            code: reason.as_ref().map_or(1006, |r| r.code.code()),
            reason: reason.map(|r| r.reason.to_string()).unwrap_or_default(),
            duration_ms,
        };
        let calls = self.calls.get_or_insert_with(Default::default);
        let id = calls.start(body);
        calls.to_start.pop().filter(|c| c.id == id)
    }

    /// Whether an `auth` or `hello` token goes to the `connect` upstream.
    pub(super) fn refreshes_upstream(&self) -> bool {
        self.policy.auth == AuthMode::Upstream
    }
}

/// The error of a call that was not answered as its event asks.
fn refused(outcome: Outcome, refusal: fn(String) -> RequestError) -> RequestError {
    match outcome {
        Outcome::Refused(r) => refusal(r.reason_or("refused by the application")),
        Outcome::Failed(f) => RequestError::Unavailable(f),
        Outcome::Answered(_) => RequestError::Unavailable(Failure::BadAnswer),
    }
}
