//! Authentication of a session: `auth` and `hello` with a token.
//!
//! It also covers the per-user slot a first `auth` waits for, and what becoming a user
//! sends (`welcome`).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{Connection, Now, RequestError, Via};
use crate::{
    auth::Identity,
    limits::UserSlot,
    protocol::{AckFields, Rejection, Request, RequestId, RoomName, ServerFrame},
};

/// The slot an `auth` waits for, filled by the cluster's answer.
type SlotMailbox = Arc<Mutex<Option<Result<UserSlot, Rejection>>>>;

/// A first `auth` whose credential is valid, waiting for the per-user count.
///
/// The (cluster-wide) count decides before the session becomes its user's.
#[derive(Debug)]
pub(super) struct PendingAuth {
    slot: SlotMailbox,
    identity: Identity,
    id: Option<RequestId>,
    with_ack: bool,
    at: Now,
    pub(super) queued: VecDeque<Request>,
}

impl Connection {
    /// The [`wake_signal`](Self::wake_signal) fired.
    ///
    /// Finishes a first `auth` the cluster has answered, then handles the requests that
    /// arrived meanwhile.
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

    pub(super) fn authenticate(
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

    /// Takes the user's slot for a valid first `auth`.
    ///
    /// In cluster mode the slot is in the cluster-wide count. The session becomes the
    /// user's when it is granted (at once on a single node, in [`on_wake`](Self::on_wake)
    /// in cluster mode). Refused, it stays pending.
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

    pub(super) fn become_authenticated(
        &mut self,
        identity: Identity,
        slot: Option<UserSlot>,
        now: Now,
    ) {
        self.set_token_deadline(&identity, now);
        let user = self.handle.set_user(identity.user.clone()).clone();
        self.identity = Some(identity);
        self.user_slot = slot;
        self.services.hub.register_user(&self.handle);
        let granted = self.welcome.take();
        let welcome = ServerFrame::Welcome {
            session: self.handle.id_str(),
            user: &user,
            endpoint: &self.policy.path,
            transport: self.handle.transport(),
            heartbeat_ms: self.policy.heartbeat.as_millis() as u64,
            node: self.services.hub.node_id(),
            data: granted.as_ref().and_then(|g| g.data.as_ref()),
        };
        self.handle.send(welcome.to_outbound());
        for room in granted.map(|g| g.join).unwrap_or_default() {
            self.join_granted(room, now);
        }
    }

    /// Joins a room the `connect` upstream named; its `ack` has no `id`.
    ///
    /// The endpoint's room patterns and `max_rooms` still apply: a room beyond them gets an
    /// `error` without `id`.
    fn join_granted(&mut self, room: RoomName, now: Now) {
        let refused = if !self.may_join(&room) {
            Some(RequestError::RoomNotAllowed)
        } else if !self.joined.contains(&room) && self.joined.len() >= self.policy.max_rooms {
            Some(RequestError::TooManyRooms(self.policy.max_rooms))
        } else {
            self.join_now(None, room, None, None, now).err()
        };
        if let Some(e) = refused {
            self.reply_error(None, e);
        }
    }

    pub(super) fn set_token_deadline(&mut self, identity: &Identity, now: Now) {
        // An `exp` too far ahead for the monotonic clock (up to u64::MAX seconds) has no
        // deadline rather than an overflow panic; `max_token_lifetime_secs` bounds it.
        let deadline = identity.expires_at.and_then(|exp| {
            now.instant
                .checked_add(Duration::from_secs(exp.saturating_sub(now.unix_secs)))
        });
        self.liveness.set_token_deadline(deadline);
    }
}
