//! The one place the backplane calls into the hub: the follower's [`HubCall`]s.

use gateway_core::{
    backplane::RoomView,
    hub::{Delivery, Hub, UserDelivery, UNKNOWN_EPOCH},
    protocol::{CloseCode, CloseReason},
};

use super::{
    follower::{Event, HubCall},
    message::{Body, Message},
};

/// Makes `call` on `hub`; returns the event that answers it, if any.
///
/// `hub` is `None` when the hub is gone, or not attached yet.
pub(super) fn call(hub: Option<&Hub>, call: HubCall) -> Option<Event> {
    let Some(hub) = hub else {
        // No rooms to catch up, nobody to deliver to.
        return match call {
            HubCall::Positions => Some(Event::Positions(Vec::new())),
            HubCall::CatchUp { .. } | HubCall::Resync { .. } => Some(Event::CaughtUp(0)),
            HubCall::Deliver(_) => None,
        };
    };
    match call {
        HubCall::Positions => Some(Event::Positions(hub.positions())),
        HubCall::CatchUp { room, from, view } => Some(Event::CaughtUp(hub.catch_up(
            &room,
            (from.0, &from.1),
            view,
        ))),
        HubCall::Resync { room, from } => {
            // Whatever epoch the room's next message has differs: it brings the `resync`.
            let unknown = RoomView {
                seq: from.0,
                epoch: UNKNOWN_EPOCH.into(),
                missed: None,
                members: 0,
            };
            Some(Event::CaughtUp(hub.catch_up(
                &room,
                (from.0, &from.1),
                unknown,
            )))
        }
        HubCall::Deliver(message) => {
            deliver(hub, message);
            None
        }
    }
}

/// Hands a channel message to the hub.
fn deliver(hub: &Hub, message: Message) {
    match message {
        Message::Room {
            room,
            seq,
            epoch,
            body,
        } => {
            let message = body.into_cluster(Some(seq));
            hub.deliver(
                &room,
                Delivery::Message {
                    message: &message,
                    epoch: &epoch,
                },
            );
        }
        Message::Volatile { room, body } => {
            hub.deliver(&room, Delivery::Volatile(&body.into_cluster(None)));
        }
        Message::Presence { room, event, user } => {
            hub.deliver(&room, Delivery::Presence { event, user: &user });
        }
        Message::Direct {
            user,
            body: Body { from, data, .. },
        } => hub.deliver_user(
            &user,
            UserDelivery::Direct {
                from: from.as_deref(),
                data: &data,
            },
        ),
        Message::Disconnect { user, code, reason } => {
            let code = CloseCode::from_code(code).unwrap_or(CloseCode::PolicyViolation);
            // Delivered here only: `Hub::disconnect_user` would publish it to the cluster again.
            let reason = CloseReason::new(code, reason);
            hub.deliver_user(&user, UserDelivery::Disconnect(reason));
        }
    }
}
