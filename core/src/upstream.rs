//! Calls to the application's backend (PROTOCOL.md section 10), without I/O.
//!
//! A [`Connection`](crate::connection::Connection) asks for a [`Call`]; the gateway runs it
//! and feeds back the [`Outcome`] that [`read_answer`] makes of the backend's HTTP answer.

use std::sync::Arc;

use base64::Engine as _;
use serde::{ser::SerializeMap, Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::{
    auth::Identity,
    pattern::Pattern,
    protocol::{check_data, Payload, RawJson, RoomName},
};

/// Longest `reason` passed on from a refusal, in characters (the rest is cut).
pub const MAX_REASON_CHARS: usize = 256;

/// Most rooms a `connect` answer may name in `join`, `rooms` or `publish`.
pub const MAX_GRANT_ROOMS: usize = 1024;

/// The events an endpoint may call its backend for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallEvent {
    /// Before a session is admitted, and on a refresh.
    Connect,
    /// A `join`.
    Join,
    /// A `publish`.
    Publish,
    /// An `rpc` frame.
    Rpc,
    /// After a session ended.
    Disconnect,
}

impl CallEvent {
    /// Every event, in the order of PROTOCOL.md's table.
    pub const ALL: [CallEvent; 5] = [
        CallEvent::Connect,
        CallEvent::Join,
        CallEvent::Publish,
        CallEvent::Rpc,
        CallEvent::Disconnect,
    ];

    /// The event's name: the last segment of its URL and its metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CallEvent::Connect => "connect",
            CallEvent::Join => "join",
            CallEvent::Publish => "publish",
            CallEvent::Rpc => "rpc",
            CallEvent::Disconnect => "disconnect",
        }
    }

    /// The event named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// What core needs to know of an endpoint's `[endpoint.upstream]`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    events: u8,
    /// `join` and `publish` are called only for rooms matching these.
    pub rooms: Vec<Pattern>,
}

impl UpstreamPolicy {
    /// An upstream called for `events`, for joins and publishes in `rooms`.
    pub fn new(events: impl IntoIterator<Item = CallEvent>, rooms: Vec<Pattern>) -> Self {
        let events = events.into_iter().fold(0, |bits, e| bits | e.bit());
        Self { events, rooms }
    }

    /// Whether `event` is called.
    pub fn calls(&self, event: CallEvent) -> bool {
        self.events & event.bit() != 0
    }

    /// Whether `event` is called for `room` (a `join` or `publish`).
    pub fn calls_for_room(&self, event: CallEvent, room: &str) -> bool {
        self.calls(event) && self.rooms.iter().any(|p| p.matches(room))
    }
}

/// A connection's call, answered by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallId(pub u64);

/// A call a connection asks the gateway to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Answer it with this id.
    pub id: CallId,
    /// What is called, with the fields it adds to the body.
    pub body: CallBody,
}

/// The event of a call and the fields its body adds (PROTOCOL.md section 10's table).
///
/// The common fields (`endpoint`, `transport`, `node`, `remote_addr`, `session`, `user`)
/// are the caller's to add.
#[derive(Debug, Clone, PartialEq)]
pub enum CallBody {
    /// `connect` with `refresh: true`: an `auth` frame on an `auth = "upstream"` endpoint.
    Refresh {
        /// The frame's token.
        token: String,
    },
    /// `join`.
    Join {
        /// The room.
        room: RoomName,
    },
    /// `publish`.
    Publish {
        /// The room.
        room: RoomName,
        /// The message as sent.
        data: Payload,
    },
    /// `rpc`.
    Rpc {
        /// The method.
        method: String,
        /// The argument.
        data: Payload,
    },
    /// `disconnect`.
    Disconnect {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
        /// How long the session lasted.
        duration_ms: u64,
    },
}

impl CallBody {
    /// The event the body is for.
    pub fn event(&self) -> CallEvent {
        match self {
            CallBody::Refresh { .. } => CallEvent::Connect,
            CallBody::Join { .. } => CallEvent::Join,
            CallBody::Publish { .. } => CallEvent::Publish,
            CallBody::Rpc { .. } => CallEvent::Rpc,
            CallBody::Disconnect { .. } => CallEvent::Disconnect,
        }
    }

    /// Writes the body's own fields into a JSON object being serialized.
    pub fn write_fields<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        match self {
            CallBody::Refresh { token } => {
                map.serialize_entry("refresh", &true)?;
                map.serialize_entry("token", token)
            }
            CallBody::Join { room } => map.serialize_entry("room", room.as_str()),
            CallBody::Publish { room, data } => {
                map.serialize_entry("room", room.as_str())?;
                write_payload(map, data)
            }
            CallBody::Rpc { method, data } => {
                map.serialize_entry("method", method)?;
                write_payload(map, data)
            }
            CallBody::Disconnect {
                code,
                reason,
                duration_ms,
            } => {
                map.serialize_entry("code", code)?;
                map.serialize_entry("reason", reason)?;
                map.serialize_entry("duration_ms", duration_ms)
            }
        }
    }
}

/// `data` as its JSON text, or a binary payload as base64 in `data_b64`.
fn write_payload<M: SerializeMap>(map: &mut M, data: &Payload) -> Result<(), M::Error> {
    match data {
        Payload::Json(text) => {
            let text = std::str::from_utf8(text).unwrap_or("null");
            let raw: &RawValue = serde_json::from_str(text).unwrap_or_else(|_| null());
            map.serialize_entry("data", raw)
        }
        Payload::Binary(bytes) => map.serialize_entry(
            "data_b64",
            &base64::engine::general_purpose::STANDARD.encode(bytes),
        ),
    }
}

fn null() -> &'static RawValue {
    serde_json::from_str("null").expect("null is JSON")
}

/// What became of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The backend answered 200 with what the event's row names.
    Answered(Answer),
    /// The backend refused (4xx).
    Refused(Refusal),
    /// No usable answer.
    Failed(Failure),
}

/// A 4xx answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status.
    pub status: u16,
    /// The body's `reason`, if it had one.
    pub reason: Option<String>,
}

impl Refusal {
    /// The reason to give the client: the backend's, or `default`.
    pub fn reason_or(&self, default: &str) -> String {
        self.reason.clone().unwrap_or_else(|| default.to_owned())
    }
}

/// Why a call has no usable answer.
///
/// The first three count towards the circuit breaker; the last two never reached the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No connection, or it broke.
    #[error("application backend unreachable")]
    Unreachable,
    /// No answer within the deadline.
    #[error("application backend timed out")]
    Timeout,
    /// A 5xx (or another status the event does not answer with).
    #[error("application backend failed with status {0}")]
    Status(u16),
    /// A 200 whose body is not the JSON the event's row names.
    #[error("application backend answered with an invalid body")]
    BadAnswer,
    /// `max_in_flight` calls of the endpoint were outstanding.
    #[error("application backend busy")]
    OverLimit,
    /// The circuit is open.
    #[error("application backend unavailable")]
    CircuitOpen,
}

impl Failure {
    /// The `result` label of the call metric.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::Timeout => "timeout",
            Failure::Status(_) => "error_status",
            Failure::BadAnswer => "bad_answer",
            Failure::OverLimit => "over_limit",
            Failure::CircuitOpen => "circuit_open",
        }
    }

    /// Whether the backend itself failed (counts towards opening the circuit).
    ///
    /// A bad answer does not: the backend answered, and what it answered may depend on
    /// what a client sent (a client must not be able to open everyone's circuit).
    pub fn is_backend_failure(self) -> bool {
        !matches!(
            self,
            Failure::OverLimit | Failure::CircuitOpen | Failure::BadAnswer
        )
    }
}

/// A 200 answer, read for its event.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `connect`.
    Connect(Box<ConnectGrant>),
    /// `join`.
    Join {
        /// `data` for the `ack`.
        data: Option<RawJson>,
    },
    /// `publish`.
    Publish(PublishVerdict),
    /// `rpc`.
    Rpc {
        /// `data` for the `ack` (`null` when absent).
        data: RawJson,
    },
    /// `disconnect`: whatever it answered.
    Ignored,
}

/// What a `publish` answer decides.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishVerdict {
    /// `{}`: publish as sent.
    AsSent,
    /// `{"data"}` (or `{"data_b64"}`): publish this instead.
    Replace(Payload),
    /// `{"skip": true}`: acknowledge without delivering.
    Skip,
}

/// What a `connect` answer grants.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectGrant {
    /// The user.
    pub user: String,
    /// Room patterns the user may join; `None`: the endpoint's.
    pub rooms: Option<Vec<String>>,
    /// Room patterns the user may publish to; `None`: as `rooms`.
    pub publish: Option<Vec<String>>,
    /// Rooms the session joins when it opens.
    pub join: Vec<RoomName>,
    /// `data` for `welcome`.
    pub data: Option<RawJson>,
    /// Unix seconds at which the session closes with 4001 unless refreshed.
    pub expires_at: Option<u64>,
}

impl ConnectGrant {
    /// The identity the grant makes.
    pub fn identity(&self) -> Identity {
        let patterns = |list: &Option<Vec<String>>| {
            list.as_ref()
                .map(|l| l.iter().map(|p| Pattern::new(p)).collect())
        };
        Identity {
            user: Arc::from(self.user.as_str()),
            rooms: patterns(&self.rooms),
            publish: patterns(&self.publish),
            expires_at: self.expires_at,
        }
    }

    /// What the session gets when it opens: `welcome.data` and the rooms it joins.
    pub fn welcome(&self) -> Option<Box<Welcome>> {
        (self.data.is_some() || !self.join.is_empty()).then(|| {
            Box::new(Welcome {
                data: self.data.clone(),
                join: self.join.clone(),
            })
        })
    }
}

/// The part of a grant a session uses when it becomes its user's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Welcome {
    /// `welcome.data`.
    pub data: Option<RawJson>,
    /// Rooms joined right after `welcome`.
    pub join: Vec<RoomName>,
}

#[derive(Deserialize)]
struct ConnectBody {
    user: String,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    join: Option<Vec<String>>,
    data: Option<RawJson>,
    expires_at: Option<u64>,
}

#[derive(Deserialize)]
struct DataBody {
    data: Option<RawJson>,
}

#[derive(Deserialize)]
struct PublishBody {
    data: Option<RawJson>,
    data_b64: Option<String>,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
struct RefusalBody {
    reason: Option<String>,
}

/// Reads the backend's answer to an `event` call: its status and body.
///
/// Only 200 answers (4xx refuses); `data` must pass [`check_data`]; room names, the user
/// and base64 must be valid. Anything else is a [`Failure`].
pub fn read_answer(event: CallEvent, status: u16, body: &[u8]) -> Outcome {
    match status {
        200 => {}
        400..=499 if event != CallEvent::Disconnect => {
            let reason = serde_json::from_slice::<RefusalBody>(body)
                .ok()
                .and_then(|b| b.reason)
                .map(|r| r.chars().take(MAX_REASON_CHARS).collect());
            return Outcome::Refused(Refusal { status, reason });
        }
        _ if event == CallEvent::Disconnect && status < 500 => {
            return Outcome::Answered(Answer::Ignored)
        }
        _ => return Outcome::Failed(Failure::Status(status)),
    }
    match read_body(event, body) {
        Some(answer) => Outcome::Answered(answer),
        None => Outcome::Failed(Failure::BadAnswer),
    }
}

fn read_body(event: CallEvent, body: &[u8]) -> Option<Answer> {
    // An object (serde would also fill a struct from an array).
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    let checked = |data: Option<RawJson>| match data {
        Some(d) if check_data(d.get()).is_err() => None,
        d => Some(d),
    };
    Some(match event {
        CallEvent::Connect => {
            let b: ConnectBody = serde_json::from_slice(body).ok()?;
            let too_many =
                |l: &Option<Vec<String>>| l.as_ref().is_some_and(|l| l.len() > MAX_GRANT_ROOMS);
            if b.user.is_empty()
                || b.user.len() > 256
                || too_many(&b.join)
                || too_many(&b.rooms)
                || too_many(&b.publish)
            {
                return None;
            }
            let join = b
                .join
                .unwrap_or_default()
                .iter()
                .map(|r| RoomName::new(r).ok())
                .collect::<Option<Vec<_>>>()?;
            Answer::Connect(Box::new(ConnectGrant {
                user: b.user,
                rooms: b.rooms,
                publish: b.publish,
                join,
                data: checked(b.data)?,
                expires_at: b.expires_at,
            }))
        }
        CallEvent::Join => Answer::Join {
            data: checked(serde_json::from_slice::<DataBody>(body).ok()?.data)?,
        },
        CallEvent::Rpc => Answer::Rpc {
            data: checked(serde_json::from_slice::<DataBody>(body).ok()?.data)?
                .unwrap_or_else(|| RawJson::parse("null").expect("null is JSON")),
        },
        CallEvent::Publish => {
            let b: PublishBody = serde_json::from_slice(body).ok()?;
            Answer::Publish(match (b.skip, checked(b.data)?, b.data_b64) {
                (true, _, _) => PublishVerdict::Skip,
                (false, Some(data), _) => {
                    PublishVerdict::Replace(Payload::Json(data.get().to_owned().into()))
                }
                (false, None, Some(b64)) => PublishVerdict::Replace(Payload::Binary(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .ok()?
                        .into(),
                )),
                (false, None, None) => PublishVerdict::AsSent,
            })
        }
        CallEvent::Disconnect => Answer::Ignored,
    })
}

/// The fields every call's body carries (PROTOCOL.md section 10).
#[derive(Debug, Clone, Copy)]
pub struct CommonFields<'a> {
    /// The endpoint's path.
    pub endpoint: &'a str,
    /// `websocket` or `webtransport`.
    pub transport: &'a str,
    /// The node's id.
    pub node: &'a str,
    /// The client's address.
    pub remote_addr: &'a str,
    /// The session's id, once it has one.
    pub session: Option<&'a str>,
    /// The user, once known.
    pub user: Option<&'a str>,
}

impl CommonFields<'_> {
    /// Writes the fields into a JSON object being serialized.
    pub fn write_fields<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_entry("endpoint", self.endpoint)?;
        map.serialize_entry("transport", self.transport)?;
        map.serialize_entry("node", self.node)?;
        map.serialize_entry("remote_addr", self.remote_addr)?;
        if let Some(session) = self.session {
            map.serialize_entry("session", session)?;
        }
        if let Some(user) = self.user {
            map.serialize_entry("user", user)?;
        }
        Ok(())
    }
}

/// A call's whole JSON body: the common fields, then the event's own.
#[derive(Debug, Clone, Copy)]
pub struct CallRequest<'a> {
    /// The common fields.
    pub common: CommonFields<'a>,
    /// The event's fields.
    pub body: &'a CallBody,
}

impl Serialize for CallRequest<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.common.write_fields(&mut map)?;
        self.body.write_fields(&mut map)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(event: CallEvent, status: u16, body: &str) -> Outcome {
        read_answer(event, status, body.as_bytes())
    }

    #[test]
    fn connect_answers_are_read_into_grants() {
        let Outcome::Answered(Answer::Connect(grant)) = answer(
            CallEvent::Connect,
            200,
            r#"{"user":"alice","rooms":["chat:*"],"join":["chat:1"],"data":{"n":1},"expires_at":99}"#,
        ) else {
            panic!("not a grant")
        };
        assert_eq!(grant.user, "alice");
        assert_eq!(grant.join, vec![RoomName::new("chat:1").unwrap()]);
        assert_eq!(grant.data.as_ref().unwrap().get(), r#"{"n":1}"#);
        let identity = grant.identity();
        assert!(identity.may_join(&[Pattern::new("*")], "chat:2"));
        assert!(!identity.may_join(&[Pattern::new("*")], "other"));
        assert_eq!(identity.expires_at, Some(99));
        for bad in [
            r#"{"rooms":[]}"#,
            r#"{"user":""}"#,
            r#"{"user":"a","join":["bad room"]}"#,
            "not json",
            r#"{"user":"a","expires_at":"soon"}"#,
            r#"["eve",null,null,null,null,null]"#,
        ] {
            assert_eq!(
                answer(CallEvent::Connect, 200, bad),
                Outcome::Failed(Failure::BadAnswer),
                "{bad}"
            );
        }
    }

    #[test]
    fn refusals_carry_the_reason_and_5xx_fails() {
        assert_eq!(
            answer(CallEvent::Publish, 403, r#"{"reason":"no swearing"}"#),
            Outcome::Refused(Refusal {
                status: 403,
                reason: Some("no swearing".into())
            })
        );
        assert_eq!(
            answer(CallEvent::Rpc, 404, "gone"),
            Outcome::Refused(Refusal {
                status: 404,
                reason: None
            })
        );
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(1000));
        let Outcome::Refused(r) = answer(CallEvent::Rpc, 400, &long) else {
            panic!()
        };
        assert_eq!(r.reason.unwrap().len(), MAX_REASON_CHARS);
        assert_eq!(
            answer(CallEvent::Rpc, 502, "{}"),
            Outcome::Failed(Failure::Status(502))
        );
        assert_eq!(
            answer(CallEvent::Rpc, 204, ""),
            Outcome::Failed(Failure::Status(204))
        );
        assert_eq!(
            answer(CallEvent::Disconnect, 404, ""),
            Outcome::Answered(Answer::Ignored)
        );
        assert_eq!(
            answer(CallEvent::Disconnect, 500, ""),
            Outcome::Failed(Failure::Status(500))
        );
    }

    #[test]
    fn publish_verdicts() {
        let verdict = |body| match answer(CallEvent::Publish, 200, body) {
            Outcome::Answered(Answer::Publish(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(verdict("{}"), PublishVerdict::AsSent);
        assert_eq!(verdict(r#"{"skip":true,"data":1}"#), PublishVerdict::Skip);
        assert_eq!(
            verdict(r#"{"data": [1, 2]}"#),
            PublishVerdict::Replace(Payload::Json("[1, 2]".into()))
        );
        assert_eq!(
            verdict(r#"{"data_b64":"AAE="}"#),
            PublishVerdict::Replace(Payload::Binary(vec![0, 1].into()))
        );
        let deep = format!(r#"{{"data":{}{}}}"#, "[".repeat(70), "]".repeat(70));
        assert_eq!(
            answer(CallEvent::Publish, 200, &deep),
            Outcome::Failed(Failure::BadAnswer)
        );
        assert_eq!(
            answer(CallEvent::Publish, 200, r#"{"data_b64":"!!"}"#),
            Outcome::Failed(Failure::BadAnswer)
        );
        assert_eq!(
            answer(CallEvent::Rpc, 200, "{}"),
            Outcome::Answered(Answer::Rpc {
                data: RawJson::parse("null").unwrap()
            })
        );
    }

    #[test]
    fn bodies_carry_the_common_fields_then_their_own() {
        let body = CallBody::Publish {
            room: RoomName::new("lobby").unwrap(),
            data: Payload::Binary(vec![1, 2, 3].into()),
        };
        let common = CommonFields {
            endpoint: "/chat",
            transport: "websocket",
            node: "n1",
            remote_addr: "127.0.0.1:5",
            session: None,
            user: Some("u"),
        };
        let text = serde_json::to_string(&CallRequest {
            common,
            body: &body,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"endpoint":"/chat","transport":"websocket","node":"n1",
                "remote_addr":"127.0.0.1:5","user":"u","room":"lobby","data_b64":"AQID"})
        );
        let rpc = CallBody::Rpc {
            method: "m".into(),
            data: Payload::Json(r#"{"a":1}"#.into()),
        };
        let mut map = serde_json::Map::new();
        let v = serde_json::to_value(CallRequest { common, body: &rpc }).unwrap();
        map.extend(v.as_object().unwrap().clone());
        assert_eq!(map["method"], "m");
        assert_eq!(map["data"], json!({"a":1}));
        let policy =
            UpstreamPolicy::new([CallEvent::Rpc, CallEvent::Join], vec![Pattern::new("a*")]);
        assert!(policy.calls(CallEvent::Rpc) && !policy.calls(CallEvent::Publish));
        assert!(policy.calls_for_room(CallEvent::Join, "ab"));
        assert!(!policy.calls_for_room(CallEvent::Join, "b"));
        assert_eq!(CallEvent::parse("disconnect"), Some(CallEvent::Disconnect));
    }
}
