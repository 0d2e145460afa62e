//! The messages nodes send each other through Redis channels, typed.
//!
//! Each has its one encoding and decoding.
//!
//! A room message on its channel is `SEQ EPOCH LEN META DATA` (`- LEN META DATA` for a
//! volatile message), a presence event `P EVENT USER`, a direct message on a user's
//! channel `LEN META DATA`, and a request on the control channel a small JSON object. META
//! is a small JSON object of LEN bytes (`f`: from, `b`: binary payload, `o`: origin
//! session) and DATA the payload bytes. History entries carry META and DATA under the
//! stream id `0-SEQ`. The publish and membership scripts write room messages and presence
//! events in this format themselves (see `scripts/`); [`Message::encode`] writes the same
//! bytes.

use std::sync::Arc;

use bytes::Bytes;
use gateway_core::{
    backplane::ClusterMessage,
    protocol::{Payload, PresenceEvent, RoomName},
    session::SessionId,
};
use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// A message on a cluster channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A room message in the room's order: its sequence number and epoch.
    Room {
        /// Its room.
        room: RoomName,
        /// Its sequence number.
        seq: u64,
        /// The epoch of the room's sequence.
        epoch: String,
        /// What was published.
        body: Body,
    },
    /// A volatile room message: no sequence number, no history.
    Volatile {
        /// Its room.
        room: RoomName,
        /// What was published.
        body: Body,
    },
    /// A user's first session in a room joined it, or its last left.
    Presence {
        /// The room.
        room: RoomName,
        /// Joined or left.
        event: PresenceEvent,
        /// The user.
        user: String,
    },
    /// A direct message to a user's sessions.
    Direct {
        /// The user it is for.
        user: String,
        /// What was sent.
        body: Body,
    },
    /// Close every session of a user (an API disconnect), on every node.
    Disconnect {
        /// The user.
        user: String,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// What a room or direct message carries: its sender, its payload, its origin session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// The sender's user id.
    pub from: Option<String>,
    /// The payload.
    pub data: Payload,
    /// The publishing session, excluded from delivery.
    pub origin: Option<u64>,
}

impl Body {
    /// The body of a history entry or a channel message: META and DATA.
    pub fn parse(meta: &[u8], bytes: Bytes) -> Option<Self> {
        let meta: Meta = serde_json::from_slice(meta).ok()?;
        Some(Body {
            from: meta.from,
            data: if meta.binary {
                Payload::Binary(bytes)
            } else {
                Payload::Json(bytes)
            },
            origin: meta.origin,
        })
    }

    /// The message the hub takes, with its sequence number.
    pub fn into_cluster(self, seq: Option<u64>) -> ClusterMessage {
        ClusterMessage {
            seq,
            from: self.from.map(Arc::from),
            data: self.data,
            origin: self.origin.map(SessionId),
        }
    }

    /// `LEN META DATA`.
    fn framed(&self) -> Vec<u8> {
        let meta = meta(self.from.as_deref(), &self.data, self.origin.map(SessionId));
        let data = payload_bytes(&self.data);
        let mut framed = Vec::with_capacity(meta.len() + data.len() + 8);
        framed.extend_from_slice(format!("{} {meta}", meta.len()).as_bytes());
        framed.extend_from_slice(data);
        framed
    }
}

/// The small header of a message on a channel or in a history entry.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(rename = "b", default)]
    binary: bool,
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    origin: Option<u64>,
}

/// The META of a message (the publish script frames it).
pub fn meta(from: Option<&str>, data: &Payload, origin: Option<SessionId>) -> String {
    serde_json::to_string(&Meta {
        from: from.map(str::to_owned),
        binary: matches!(data, Payload::Binary(_)),
        origin: origin.map(|o| o.0),
    })
    .expect("plain struct")
}

/// The DATA of a message.
pub fn payload_bytes(data: &Payload) -> &[u8] {
    match data {
        Payload::Json(b) | Payload::Binary(b) => b,
    }
}

/// An API disconnect as the control channel carries it.
#[derive(Debug, Serialize, Deserialize)]
struct Disconnect {
    user: String,
    code: u16,
    reason: String,
}

impl Message {
    /// The channel it goes on and its bytes there.
    pub fn encode(&self) -> (String, Vec<u8>) {
        match self {
            Message::Room {
                room,
                seq,
                epoch,
                body,
            } => {
                let mut bytes = format!("{seq} {epoch} ").into_bytes();
                bytes.extend(body.framed());
                (Channel::Room(room.clone()).name(), bytes)
            }
            Message::Volatile { room, body } => {
                let mut bytes = b"- ".to_vec();
                bytes.extend(body.framed());
                (Channel::Room(room.clone()).name(), bytes)
            }
            Message::Presence { room, event, user } => (
                Channel::Room(room.clone()).name(),
                format!("P {} {user}", event.as_str()).into_bytes(),
            ),
            Message::Direct { user, body } => (Channel::User(user.clone()).name(), body.framed()),
            Message::Disconnect { user, code, reason } => {
                let json = serde_json::to_string(&Disconnect {
                    user: user.clone(),
                    code: *code,
                    reason: reason.clone(),
                })
                .expect("plain struct");
                (Channel::Control.name(), json.into_bytes())
            }
        }
    }
}

/// The message `payload` on `channel` is; `None` for anything malformed (ignored).
///
/// The payload of a room or direct message is shared, not copied.
pub fn decode(channel: &str, payload: Bytes) -> Option<Message> {
    match Channel::parse(channel)? {
        Channel::Room(room) if payload.starts_with(b"P ") => {
            let text = String::from_utf8_lossy(&payload[2..]);
            let (event, user) = text.split_once(' ')?;
            Some(Message::Presence {
                room,
                event: PresenceEvent::parse(event)?,
                user: user.to_owned(),
            })
        }
        Channel::Room(room) => decode_room(room, payload),
        Channel::User(user) => Some(Message::Direct {
            user,
            body: body(&payload)?,
        }),
        Channel::Control => {
            let d: Disconnect = serde_json::from_slice(&payload).ok()?;
            Some(Message::Disconnect {
                user: d.user,
                code: d.code,
                reason: d.reason,
            })
        }
    }
}

/// Decodes `SEQ EPOCH LEN META DATA`, or a volatile `- LEN META DATA`.
///
/// A volatile message has any first word that is not a number.
fn decode_room(room: RoomName, payload: Bytes) -> Option<Message> {
    let (first, rest) = word(&payload)?;
    let Ok(seq) = std::str::from_utf8(&first).ok()?.parse::<u64>() else {
        return Some(Message::Volatile {
            room,
            body: body(&rest)?,
        });
    };
    let (epoch, rest) = word(&rest)?;
    Some(Message::Room {
        room,
        seq,
        epoch: std::str::from_utf8(&epoch).ok()?.to_owned(),
        body: body(&rest)?,
    })
}

/// The first word of `bytes` and what follows its space.
fn word(bytes: &Bytes) -> Option<(Bytes, Bytes)> {
    let space = bytes.iter().position(|&b| b == b' ')?;
    Some((bytes.slice(..space), bytes.slice(space + 1..)))
}

/// The body framed as `LEN META DATA`.
fn body(framed: &Bytes) -> Option<Body> {
    let (len, rest) = word(framed)?;
    let len: usize = std::str::from_utf8(&len).ok()?.parse().ok()?;
    (rest.len() >= len).then_some(())?;
    Body::parse(&rest[..len], rest.slice(len..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> RoomName {
        RoomName::new("lobby:1").unwrap()
    }

    fn body(binary: bool) -> Body {
        let bytes = Bytes::from_static(b"{\"x\":1}");
        Body {
            from: Some("ann".into()),
            data: if binary {
                Payload::Binary(bytes)
            } else {
                Payload::Json(bytes)
            },
            origin: Some(7),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let messages = [
            Message::Room {
                room: room(),
                seq: 12,
                epoch: "00000000deadbeef".into(),
                body: body(false),
            },
            Message::Volatile {
                room: room(),
                body: body(true),
            },
            Message::Presence {
                room: room(),
                event: PresenceEvent::Leave,
                user: "bob smith".into(),
            },
            Message::Direct {
                user: "bob".into(),
                body: Body {
                    from: None,
                    data: Payload::Json(Bytes::from_static(b"\"hi\"")),
                    origin: None,
                },
            },
            Message::Disconnect {
                user: "bob".into(),
                code: 4003,
                reason: "banned".into(),
            },
        ];
        for m in messages {
            let (channel, bytes) = m.encode();
            assert_eq!(decode(&channel, bytes.into()), Some(m));
        }
    }

    #[test]
    fn the_bytes_are_those_the_scripts_and_older_nodes_write() {
        let (channel, bytes) = Message::Room {
            room: room(),
            seq: 3,
            epoch: "e1".into(),
            body: body(false),
        }
        .encode();
        assert_eq!(channel, "gw:{room:lobby:1}");
        assert_eq!(bytes, br#"3 e1 27 {"f":"ann","b":false,"o":7}{"x":1}"#);
        let (_, bytes) = Message::Volatile {
            room: room(),
            body: body(true),
        }
        .encode();
        assert_eq!(bytes, br#"- 26 {"f":"ann","b":true,"o":7}{"x":1}"#);
        let (_, bytes) = Message::Presence {
            room: room(),
            event: PresenceEvent::Join,
            user: "ann".into(),
        }
        .encode();
        assert_eq!(bytes, b"P join ann");
        let (channel, bytes) = Message::Direct {
            user: "bob".into(),
            body: Body {
                from: Some("ann".into()),
                data: Payload::Json(Bytes::from_static(b"1")),
                origin: None,
            },
        }
        .encode();
        assert_eq!(channel, "gw:{user:bob}");
        assert_eq!(bytes, br#"21 {"f":"ann","b":false}1"#);
        let (channel, bytes) = Message::Disconnect {
            user: "bob".into(),
            code: 4003,
            reason: "x".into(),
        }
        .encode();
        assert_eq!(channel, "gw:control");
        assert_eq!(bytes, br#"{"user":"bob","code":4003,"reason":"x"}"#);
    }

    #[test]
    fn anything_malformed_is_ignored() {
        let r = "gw:{room:r}";
        for bad in [
            &b""[..],
            b"12",
            b"12 e1",
            b"12 e1 99 {}",
            b"- x {}",
            b"P dance ann",
            b"P join",
            b"12 e1 3 {\"b\":1}",
        ] {
            assert_eq!(
                decode(r, Bytes::from_static(bad)),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode("gw:{room:bad name}", Bytes::from_static(b"- 2 {}")),
            None
        );
        assert_eq!(decode("elsewhere", Bytes::from_static(b"- 2 {}")), None);
        assert_eq!(
            decode("gw:control", Bytes::from_static(b"{\"user\":1}")),
            None
        );
        assert_eq!(decode("gw:{user:u}", Bytes::from_static(b"3 {}")), None);
        assert!(
            matches!(
                decode(r, Bytes::from_static(b"- 2 {}")),
                Some(Message::Volatile { .. })
            ),
            "an empty payload is a payload"
        );
    }
}
