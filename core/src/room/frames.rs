//! The frames a room sends, each encoded once for every recipient.

use crate::{
    backplane::ClusterMessage,
    protocol::{MessageFrame, MessageKind, Payload, PresenceEvent, RoomName, ServerFrame},
    session::Outbound,
};

/// The `message` frame of a room message.
pub fn room_frame(
    room: &RoomName,
    from: Option<&str>,
    seq: Option<u64>,
    volatile: bool,
    data: &Payload,
) -> Outbound {
    MessageFrame {
        kind: MessageKind::Message,
        room: Some(room),
        from,
        seq,
        volatile,
    }
    .encode(data)
}

/// The `message` frame of a room message the cluster ordered.
pub fn cluster_frame(room: &RoomName, message: &ClusterMessage, volatile: bool) -> Outbound {
    room_frame(
        room,
        message.from.as_deref(),
        message.seq,
        volatile,
        &message.data,
    )
}

/// The `direct` frame of a message to a user.
pub fn direct_frame(from: Option<&str>, data: &Payload) -> Outbound {
    MessageFrame {
        kind: MessageKind::Direct,
        room: None,
        from,
        seq: None,
        volatile: false,
    }
    .encode(data)
}

/// The `presence` frame of a user's arrival in or departure from `room`.
pub fn presence_frame(room: &RoomName, event: PresenceEvent, user: &str) -> Outbound {
    ServerFrame::Presence {
        room: room.as_str(),
        event,
        user,
    }
    .to_outbound()
}
