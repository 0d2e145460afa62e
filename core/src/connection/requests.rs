//! The requests of an authenticated session: join, leave, publish, send, presence, ping.

use super::{
    reply::{ack_frame, error_frame},
    Connection, Now, RequestError,
};
use crate::{
    backplane::ClusterUnavailable,
    hub::{JoinOutcome, JoinReply, Publish, Since},
    protocol::{
        AckFields, AckMembers, Payload, RawJson, Request, RequestId, RoomName, ServerFrame,
    },
    upstream::CallEvent,
};

impl Connection {
    /// Handles a request from the message stream.
    ///
    /// Refusals known at once are returned; the answers that come later are queued by the
    /// completions.
    pub(super) fn handle_request(
        &mut self,
        request: Request,
        now: Now,
    ) -> Result<(), RequestError> {
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
            Request::Hello { token: Some(token) } if self.refreshes_upstream() => {
                self.refresh_through_upstream(None, &token, false)
            }
            Request::Auth { id, token } if self.refreshes_upstream() => {
                self.refresh_through_upstream(id.as_ref(), &token, true)
            }
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
                let message = Outgoing {
                    room: &room,
                    data: &data,
                    echo,
                    volatile,
                };
                self.publish(message, PublishReply::Ack(id), now)
            }
            Request::Send { id, to, data } => {
                self.send_direct(id, &to, &data);
                Ok(())
            }
            Request::Presence { id, room } => self.presence(id, &room, now),
            Request::Ping { id } => {
                self.handle
                    .send(ServerFrame::Pong { id: id.as_ref() }.to_outbound());
                Ok(())
            }
            Request::Rpc { id, method, data } => self.rpc(id, method, data),
        }
    }

    pub(super) fn may_join(&self, room: &RoomName) -> bool {
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
        if self.calls_upstream(CallEvent::Join, Some(&room)) {
            self.join_through_upstream(id, room, since);
            return Ok(());
        }
        self.join_now(id, room, since, None, now)
    }

    /// Joins the room; the `ack` carries `data` (what a `join` upstream answered).
    pub(super) fn join_now(
        &mut self,
        id: Option<RequestId>,
        room: RoomName,
        since: Option<Since<'_>>,
        data: Option<RawJson>,
        now: Now,
    ) -> Result<(), RequestError> {
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
                            data,
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

    /// Publishes to its room if the identity may (after the `publish` upstream, if any).
    pub(super) fn publish(
        &mut self,
        message: Outgoing<'_>,
        reply: PublishReply,
        now: Now,
    ) -> Result<(), RequestError> {
        let identity = self.identity.as_ref().expect("authenticated");
        if !identity.may_publish(&self.policy.rooms, message.room.as_str()) {
            return Err(RequestError::PublishNotAllowed);
        }
        if self.calls_upstream(CallEvent::Publish, Some(message.room)) {
            self.publish_through_upstream(message, reply);
            return Ok(());
        }
        self.publish_now(message, reply, now)
    }

    /// Hands the message to the hub.
    ///
    /// With [`PublishReply::Ack`], answers with the ack (its `seq`) or the cluster's
    /// failure when the cluster has taken the message.
    pub(super) fn publish_now(
        &mut self,
        message: Outgoing<'_>,
        reply: PublishReply,
        now: Now,
    ) -> Result<(), RequestError> {
        let Outgoing {
            room,
            data,
            echo,
            volatile,
        } = message;
        let identity = self.identity.as_ref().expect("authenticated");
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
                let PublishReply::Ack(id) = reply else {
                    return;
                };
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
        self.stats.publishes += 1;
        Ok(())
    }

    /// A direct message to every session of `to`; the ack says whether any got it.
    fn send_direct(&self, id: Option<RequestId>, to: &str, data: &Payload) {
        let from = self.handle.user().cloned();
        let handle = self.handle.clone();
        self.services.hub.send_to_user(
            to,
            from.as_ref(),
            data,
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
    }

    /// The room's presence listing, if the identity may join the room.
    fn presence(
        &self,
        id: Option<RequestId>,
        room: &RoomName,
        now: Now,
    ) -> Result<(), RequestError> {
        if !self.may_join(room) {
            return Err(RequestError::RoomNotAllowed);
        }
        let handle = self.handle.clone();
        let room_text = room.to_string();
        self.services.hub.presence(
            room,
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
}

/// A room message a session publishes.
pub(super) struct Outgoing<'a> {
    pub(super) room: &'a RoomName,
    pub(super) data: &'a Payload,
    /// Whether the publisher gets its own message.
    pub(super) echo: bool,
    /// Volatile: no sequence number, never kept.
    pub(super) volatile: bool,
}

/// Whether a publish is answered.
#[derive(Debug)]
pub(super) enum PublishReply {
    /// No answer (a datagram).
    Silent,
    /// An `ack` with the `seq`, or an `error`, for the request with this id.
    Ack(Option<RequestId>),
}
