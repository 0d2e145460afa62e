//! Encoding server envelopes (PROTOCOL.md section 5).
//!
//! `message` and `direct` envelopes are written by hand, once per publish, around the
//! client's `data` bytes; the rest go through serde.

use bytes::Bytes;
use serde::Serialize;

use super::{
    decode::RequestId, raw_json::RawJson, CloseCode, ErrorCode, Outbound, Payload, RoomName,
    TransportKind,
};

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for CloseCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

impl Serialize for TransportKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The `event` of a `presence` envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    /// A user's first session joined the room.
    Join,
    /// A user's last session left the room.
    Leave,
}

impl PresenceEvent {
    /// The wire string: `join` or `leave`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Join => "join",
            PresenceEvent::Leave => "leave",
        }
    }

    /// The event a wire string names, if any.
    pub fn parse(s: &str) -> Option<Self> {
        [PresenceEvent::Join, PresenceEvent::Leave]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// The `reason` of a `resync` envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The room's sequence restarted in a new epoch.
    ///
    /// That happens when its backplane failed over or lost its data, or when this node lost
    /// its subscription for longer than the history covers.
    Continuity,
    /// Messages queued for this slow member were dropped under the room's overflow policy.
    Dropped,
}

/// One member of a room as listed by `presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MemberInfo {
    /// User id.
    pub user: String,
    /// Session id.
    pub session: String,
    /// `websocket` or `webtransport`.
    pub transport: String,
    /// The node the session is connected to (HTTP API only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
}

/// The `members` of an ack: a count for `join`, a list for `presence`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AckMembers {
    /// Number of sessions in the room.
    Count(usize),
    /// The members.
    List(Vec<MemberInfo>),
}

/// Per-request fields of an `ack`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AckFields {
    /// The room of a `join`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Latest sequence (`join`) or assigned sequence (`publish`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The room's epoch (`join`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Member count (`join`) or list (`presence`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<AckMembers>,
    /// Whether history recovery succeeded (`join` with `since`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// Whether a `send` reached at least one session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<bool>,
    /// All members of the room (`presence`), also those a cut listing leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// `Some(true)` when a `presence` listing was cut at the maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    /// What the application's backend answered (`rpc`, and `join` through an upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<RawJson>,
}

/// Server envelopes other than `message` and `direct`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// The session is authenticated.
    Welcome {
        /// Session id.
        session: &'a str,
        /// User id.
        user: &'a str,
        /// Endpoint path.
        endpoint: &'a str,
        /// The session's transport.
        transport: TransportKind,
        /// WebSocket ping interval.
        heartbeat_ms: u64,
        /// Node id.
        node: &'a str,
        /// What the `connect` upstream answered in `data`.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawJson>,
    },
    /// A request succeeded.
    Ack {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// Per-request fields.
        #[serde(flatten)]
        fields: &'a AckFields,
    },
    /// A request failed.
    Error {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// Error code.
        code: ErrorCode,
        /// Human-readable message.
        message: &'a str,
    },
    /// A user joined or left a room.
    Presence {
        /// The room.
        room: &'a str,
        /// Whether the user joined or left.
        event: PresenceEvent,
        /// The user.
        user: &'a str,
    },
    /// Answer to `ping`.
    Pong {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// The session stays a member of `room` but will not receive every message.
    ///
    /// Messages after `seq` in `epoch` follow.
    Resync {
        /// The room.
        room: &'a str,
        /// The room's epoch from now on.
        epoch: &'a str,
        /// The sequence number after which messages follow.
        seq: u64,
        /// Why.
        reason: ResyncReason,
    },
    /// The server is going away; reconnect later.
    Reconnect {
        /// Delay before reconnecting.
        after_ms: u64,
        /// Why.
        reason: &'a str,
        /// Where to reconnect.
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<&'a str>,
    },
    /// The server closes this WebTransport session.
    Close {
        /// Close code.
        code: CloseCode,
        /// Close reason.
        reason: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Encodes the envelope as JSON text.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("server frames always serialize"))
    }

    /// Encodes the envelope as a queued text frame.
    pub fn to_outbound(&self) -> Outbound {
        Outbound::Text(self.to_bytes())
    }
}

/// Which envelope carries a message: a room's or a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// `message`: a publish to a room.
    Message,
    /// `direct`: a `send` to a user.
    Direct,
}

impl MessageKind {
    /// The wire `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Message => "message",
            MessageKind::Direct => "direct",
        }
    }
}

/// A `message` or `direct` envelope, encoded once per publish and shared by all recipients.
#[derive(Debug, Clone, Copy)]
pub struct MessageFrame<'a> {
    /// `message` or `direct`.
    pub kind: MessageKind,
    /// The room (`message` only).
    pub room: Option<&'a RoomName>,
    /// The sender's user id, absent for the HTTP API.
    pub from: Option<&'a str>,
    /// Sequence number, absent when volatile.
    pub seq: Option<u64>,
    /// Whether the message is volatile.
    pub volatile: bool,
}

impl MessageFrame<'_> {
    /// Encodes the envelope around `data`.
    ///
    /// JSON data gives a text frame, binary data a binary envelope whose header is this
    /// envelope without `data`.
    pub fn encode(&self, data: &Payload) -> Outbound {
        match data {
            Payload::Json(json) => {
                let mut buf = Vec::with_capacity(64 + json.len());
                self.write_fields(&mut buf);
                buf.extend_from_slice(b",\"data\":");
                buf.extend_from_slice(json);
                buf.push(b'}');
                if self.volatile {
                    Outbound::Volatile(Bytes::from(buf))
                } else {
                    Outbound::Text(Bytes::from(buf))
                }
            }
            Payload::Binary(payload) => {
                let mut buf = Vec::with_capacity(66 + payload.len());
                buf.extend_from_slice(&[0, 0]);
                self.write_fields(&mut buf);
                buf.push(b'}');
                let header_len = u16::try_from(buf.len() - 2).unwrap_or(u16::MAX);
                buf[..2].copy_from_slice(&header_len.to_be_bytes());
                buf.extend_from_slice(payload);
                Outbound::Binary(Bytes::from(buf))
            }
        }
    }

    /// Writes `{"type":..,"room":..,"from":..,"seq":..,"volatile":..` (no closing brace).
    fn write_fields(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"{\"type\":\"");
        buf.extend_from_slice(self.kind.as_str().as_bytes());
        buf.push(b'"');
        if let Some(room) = self.room {
            // Room names are restricted to characters that need no escaping.
            buf.extend_from_slice(b",\"room\":\"");
            buf.extend_from_slice(room.as_str().as_bytes());
            buf.push(b'"');
        }
        if let Some(from) = self.from {
            buf.extend_from_slice(b",\"from\":");
            serde_json::to_writer(&mut *buf, from).expect("strings always serialize");
        }
        if let Some(seq) = self.seq {
            buf.extend_from_slice(b",\"seq\":");
            buf.extend_from_slice(seq.to_string().as_bytes());
        }
        if self.volatile {
            buf.extend_from_slice(b",\"volatile\":true");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_binary, DecodeError};
    use serde_json::{json, Value};

    fn text(o: Outbound) -> Value {
        match o {
            Outbound::Text(b) | Outbound::Volatile(b) => serde_json::from_slice(&b).unwrap(),
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn message_envelope_is_valid_json_with_raw_data() {
        let room = RoomName::new("lobby").unwrap();
        let frame = MessageFrame {
            kind: MessageKind::Message,
            room: Some(&room),
            from: Some("al\"ice"),
            seq: Some(9),
            volatile: false,
        };
        let v = text(frame.encode(&Payload::Json(Bytes::from_static(b"{\"x\": 1}"))));
        assert_eq!(
            v,
            json!({"type":"message","room":"lobby","from":"al\"ice","seq":9,"data":{"x":1}})
        );
    }

    #[test]
    fn volatile_direct_without_sender() {
        let frame = MessageFrame {
            kind: MessageKind::Direct,
            room: None,
            from: None,
            seq: None,
            volatile: true,
        };
        let o = frame.encode(&Payload::Json(Bytes::from_static(b"[1]")));
        assert!(matches!(o, Outbound::Volatile(_)));
        assert_eq!(text(o), json!({"type":"direct","volatile":true,"data":[1]}));
    }

    #[test]
    fn binary_message_round_trips_through_the_decoder_shape() {
        let room = RoomName::new("r").unwrap();
        let frame = MessageFrame {
            kind: MessageKind::Message,
            room: Some(&room),
            from: Some("u"),
            seq: Some(1),
            volatile: false,
        };
        let Outbound::Binary(b) = frame.encode(&Payload::Binary(Bytes::from_static(&[1, 2, 3])))
        else {
            panic!("expected binary");
        };
        let header_len = u16::from_be_bytes([b[0], b[1]]) as usize;
        let header: Value = serde_json::from_slice(&b[2..2 + header_len]).unwrap();
        assert_eq!(
            header,
            json!({"type":"message","room":"r","from":"u","seq":1})
        );
        assert_eq!(&b[2 + header_len..], &[1, 2, 3]);
        // The decoder reads the same layout: it gets as far as the header's type, which is
        // not a request.
        let e = decode_binary(&b).unwrap_err();
        assert!(
            matches!(&e.error, DecodeError::UnknownType(t) if t == "message"),
            "{e:?}"
        );
    }

    fn frame(f: ServerFrame<'_>) -> Value {
        serde_json::from_slice(&f.to_bytes()).unwrap()
    }

    #[test]
    fn codes_events_and_kinds_go_out_as_the_protocols_strings() {
        let id = RequestId(3.into());
        let codes = [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::Unauthorized, "unauthorized"),
            (ErrorCode::Forbidden, "forbidden"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::NotMember, "not_member"),
            (ErrorCode::TooLarge, "too_large"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::LimitExceeded, "limit_exceeded"),
            (ErrorCode::Internal, "internal"),
        ];
        for (code, text) in codes {
            assert_eq!(
                frame(ServerFrame::Error {
                    id: Some(&id),
                    code,
                    message: "m"
                }),
                json!({"type":"error","id":3,"code":text,"message":"m"})
            );
        }
        for (event, text) in [
            (PresenceEvent::Join, "join"),
            (PresenceEvent::Leave, "leave"),
        ] {
            assert_eq!(PresenceEvent::parse(text), Some(event));
            assert_eq!(
                frame(ServerFrame::Presence {
                    room: "r",
                    event,
                    user: "u"
                }),
                json!({"type":"presence","room":"r","event":text,"user":"u"})
            );
        }
        assert_eq!(PresenceEvent::parse("Join"), None);
        assert_eq!(
            frame(ServerFrame::Welcome {
                session: "s",
                user: "u",
                endpoint: "/chat",
                transport: TransportKind::WebTransport,
                heartbeat_ms: 25_000,
                node: "n",
                data: None,
            }),
            json!({"type":"welcome","session":"s","user":"u","endpoint":"/chat",
                "transport":"webtransport","heartbeat_ms":25000,"node":"n"})
        );
        assert_eq!(
            frame(ServerFrame::Close {
                code: CloseCode::HeartbeatTimeout,
                reason: "heartbeat timeout"
            }),
            json!({"type":"close","code":4009,"reason":"heartbeat timeout"})
        );
        assert_eq!(MessageKind::Message.as_str(), "message");
        assert_eq!(MessageKind::Direct.as_str(), "direct");
    }

    #[test]
    fn ack_flattens_its_fields() {
        let id = RequestId(5.into());
        let fields = AckFields {
            room: Some("r".into()),
            seq: Some(0),
            epoch: Some("e".into()),
            members: Some(AckMembers::Count(2)),
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(
            &ServerFrame::Ack {
                id: Some(&id),
                fields: &fields,
            }
            .to_bytes(),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"type":"ack","id":5,"room":"r","seq":0,"epoch":"e","members":2})
        );
    }
}
