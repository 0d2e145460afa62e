//! Decoding client envelopes (PROTOCOL.md sections 4 and 6) with precise `bad_request` errors.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{ErrorCode, RoomName, RoomNameError};

/// A client-chosen request id, echoed back in the matching `ack`, `error` or `pong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub serde_json::Number);

/// The `data` of a `publish` or `send`: JSON text, or the raw payload of a binary envelope.
///
/// Both are shared, never copied per recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The JSON text of the `data` value, exactly as the client sent it.
    Json(Bytes),
    /// The payload bytes of a binary envelope.
    Binary(Bytes),
}

/// A decoded client request (PROTOCOL.md section 4).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// WebTransport stream opener; with a token, an `auth` without `ack`.
    Hello {
        /// Optional JWT.
        token: Option<String>,
    },
    /// Authenticate a pending session or refresh a token.
    Auth {
        /// Request id.
        id: Option<RequestId>,
        /// The JWT.
        token: String,
    },
    /// Join a room.
    Join {
        /// Request id.
        id: Option<RequestId>,
        /// The room.
        room: RoomName,
        /// Recover messages after this sequence number.
        since: Option<u64>,
        /// The epoch `since` belongs to.
        epoch: Option<String>,
    },
    /// Leave a room.
    Leave {
        /// Request id.
        id: Option<RequestId>,
        /// The room.
        room: RoomName,
    },
    /// Publish to a room.
    Publish {
        /// Request id.
        id: Option<RequestId>,
        /// The room.
        room: RoomName,
        /// The message.
        data: Payload,
        /// Deliver to the sender's own session too.
        echo: bool,
        /// Best effort: may be dropped, never stored, may travel as a datagram.
        volatile: bool,
    },
    /// Send to every session of a user.
    Send {
        /// Request id.
        id: Option<RequestId>,
        /// The recipient user id.
        to: String,
        /// The message.
        data: Payload,
    },
    /// List the members of a room.
    Presence {
        /// Request id.
        id: Option<RequestId>,
        /// The room.
        room: RoomName,
    },
    /// Application-level liveness probe.
    Ping {
        /// Request id.
        id: Option<RequestId>,
    },
    /// A call to the endpoint's `rpc` upstream (PROTOCOL.md section 10).
    Rpc {
        /// Request id (required: the answer is matched by it).
        id: RequestId,
        /// The method, 1 to [`MAX_METHOD_LEN`] characters.
        method: String,
        /// The argument; JSON `null` when absent.
        data: Payload,
    },
}

/// The longest `rpc` method name, in characters.
pub const MAX_METHOD_LEN: usize = 128;

impl Request {
    /// The request id, if the request carries one.
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            Request::Hello { .. } => None,
            Request::Auth { id, .. }
            | Request::Join { id, .. }
            | Request::Leave { id, .. }
            | Request::Publish { id, .. }
            | Request::Send { id, .. }
            | Request::Presence { id, .. }
            | Request::Ping { id } => id.as_ref(),
            Request::Rpc { id, .. } => Some(id),
        }
    }
}

/// What is wrong with a frame that is not a valid request.
///
/// The text is the `message` of the `error` envelope the client gets.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A JSON text frame that is not UTF-8.
    #[error("text frame is not valid UTF-8")]
    NotUtf8,
    /// A binary envelope without its header length.
    #[error("binary envelope shorter than its 2-byte header length")]
    BinaryTooShort,
    /// A binary envelope whose header length runs past the frame.
    #[error("binary envelope header length {0} exceeds the frame")]
    HeaderBeyondFrame(usize),
    /// A binary envelope header that is not UTF-8.
    #[error("binary envelope header is not valid UTF-8")]
    HeaderNotUtf8,
    /// A binary envelope header with a `data` field (the payload is the data).
    #[error("binary envelope header must not contain `data`")]
    DataInBinaryHeader,
    /// Not JSON at all.
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    /// A JSON object that is not an envelope (for example a duplicate field).
    #[error("invalid envelope: {0}")]
    Envelope(serde_json::Error),
    /// JSON, but not an object.
    #[error("envelope must be a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field of the wrong type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be ("a string", ...).
        expected: &'static str,
    },
    /// A `room` that is not a room name.
    #[error("field `room`: {0}")]
    Room(RoomNameError),
    /// A `send` to the empty user id.
    #[error("field `to` must not be empty")]
    EmptyRecipient,
    /// A `data` value unsafe to forward.
    #[error("field `data` {0}")]
    Data(DataError),
    /// An `rpc` `method` that is empty or longer than [`MAX_METHOD_LEN`] characters.
    #[error("field `method` must be 1 to {MAX_METHOD_LEN} characters")]
    MethodLength,
    /// A `type` that is no request (its first 32 characters).
    #[error("unknown type `{0}`")]
    UnknownType(String),
}

impl DecodeError {
    /// The `error` code it is answered with: always `bad_request` (PROTOCOL.md section 5).
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadRequest
    }
}

/// A frame that is not a valid request, with its id when it could be read.
///
/// It is answered with an `error` envelope that echoes the id; the session stays open.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct InvalidRequest {
    /// The request id, when it could be read before the failure.
    pub id: Option<RequestId>,
    /// What is wrong.
    pub error: DecodeError,
}

impl InvalidRequest {
    fn new(id: Option<RequestId>, error: DecodeError) -> Self {
        Self { id, error }
    }
}

impl From<DecodeError> for InvalidRequest {
    fn from(error: DecodeError) -> Self {
        Self::new(None, error)
    }
}

/// The fields of any envelope, each kept raw until the `type` says which apply.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    epoch: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    echo: Option<&'a RawValue>,
    #[serde(borrow)]
    volatile: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
}

/// Keeps `"data": null` as a present value (plain `Option` would read it as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Decodes a JSON text envelope.
///
/// `text` must be the whole frame; `data` is sliced out of it without copying.
pub fn decode_json(text: &Bytes) -> Result<Request, InvalidRequest> {
    let s = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8)?;
    let raw = parse_envelope(s)?;
    if let Some(d) = raw.data {
        if let Err(problem) = check_data(d.get()) {
            let id = raw.id.and_then(|r| read_id(r).ok());
            return Err(InvalidRequest::new(id, DecodeError::Data(problem)));
        }
    }
    let data = raw
        .data
        .map(|d| Payload::Json(text.slice_ref(d.get().as_bytes())));
    build(raw, data)
}

/// Deepest nesting of arrays and objects accepted in `data`.
///
/// The gateway forwards `data` without building it, but recipients parse it: many JSON
/// parsers recurse per level.
pub const MAX_DATA_DEPTH: usize = 64;

/// What is wrong with a `data` value that is valid JSON but unsafe to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// Arrays and objects nest deeper than [`MAX_DATA_DEPTH`].
    #[error("is nested deeper than {MAX_DATA_DEPTH} levels")]
    TooDeep,
    /// A number outside the range of a 64-bit float.
    ///
    /// Most clients would read it as `Infinity`, which is not JSON.
    #[error("holds a number beyond the range of a 64-bit float")]
    NumberOutOfRange,
}

/// Checks a `data` value (valid JSON text) before it is forwarded.
///
/// Recipients parse it, many with parsers that recurse per level or turn huge numbers into
/// `Infinity`. One pass, no allocation; used for client publishes and the HTTP API alike.
pub fn check_data(json: &str) -> Result<(), DataError> {
    let bytes = json.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(DataError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < bytes.len()
                    && matches!(bytes[i + 1], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let number = &json[start..=i];
                // Short numbers always fit; only long ones or exponents can overflow.
                if (number.len() > 15 || number.contains(['e', 'E']))
                    && !number.parse::<f64>().is_ok_and(f64::is_finite)
                {
                    return Err(DataError::NumberOutOfRange);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Decodes a binary envelope: `u16` header length, JSON header without `data`, payload.
pub fn decode_binary(frame: &Bytes) -> Result<Request, InvalidRequest> {
    if frame.len() < 2 {
        return Err(DecodeError::BinaryTooShort.into());
    }
    let header_len = u16::from_be_bytes([frame[0], frame[1]]) as usize;
    let Some(header) = frame.get(2..2 + header_len) else {
        return Err(DecodeError::HeaderBeyondFrame(header_len).into());
    };
    let header = std::str::from_utf8(header).map_err(|_| DecodeError::HeaderNotUtf8)?;
    let raw = parse_envelope(header)?;
    if raw.data.is_some() {
        let id = raw.id.and_then(|r| read_id(r).ok());
        return Err(InvalidRequest::new(id, DecodeError::DataInBinaryHeader));
    }
    let payload = frame.slice(2 + header_len..);
    build(raw, Some(Payload::Binary(payload)))
}

fn parse_envelope(s: &str) -> Result<RawEnvelope<'_>, DecodeError> {
    serde_json::from_str::<RawEnvelope<'_>>(s).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            DecodeError::Json(e)
        } else if s.trim_start().starts_with('{') {
            DecodeError::Envelope(e)
        } else {
            DecodeError::NotAnObject
        }
    })
}

fn read_id(raw: &RawValue) -> Result<RequestId, DecodeError> {
    match serde_json::from_str::<serde_json::Number>(raw.get()) {
        Ok(n) if n.is_i64() || n.is_u64() => Ok(RequestId(n)),
        _ => Err(DecodeError::WrongType {
            field: "id",
            expected: "an integer",
        }),
    }
}

fn build(raw: RawEnvelope<'_>, data: Option<Payload>) -> Result<Request, InvalidRequest> {
    let id = raw.id.map(read_id).transpose()?;
    fields(&raw, data, id.clone()).map_err(|error| InvalidRequest::new(id, error))
}

/// The request the envelope's `type` names, from its fields.
fn fields(
    raw: &RawEnvelope<'_>,
    data: Option<Payload>,
    id: Option<RequestId>,
) -> Result<Request, DecodeError> {
    let ty: String = field(
        raw.ty.ok_or(DecodeError::MissingField("type"))?,
        "type",
        "a string",
    )?;
    let data = || data.clone().ok_or(DecodeError::MissingField("data"));
    let request = match ty.as_str() {
        "hello" => Request::Hello {
            token: optional(raw.token, "token", "a string")?,
        },
        "auth" => Request::Auth {
            token: field(required(raw.token, "token")?, "token", "a string")?,
            id,
        },
        "join" => Request::Join {
            room: room(raw.room)?,
            since: optional(raw.since, "since", "a non-negative integer")?,
            epoch: optional(raw.epoch, "epoch", "a string")?,
            id,
        },
        "leave" => Request::Leave {
            room: room(raw.room)?,
            id,
        },
        "publish" => Request::Publish {
            room: room(raw.room)?,
            data: data()?,
            echo: flag(raw.echo, "echo")?,
            volatile: flag(raw.volatile, "volatile")?,
            id,
        },
        "send" => {
            let to: String = field(required(raw.to, "to")?, "to", "a string")?;
            if to.is_empty() {
                return Err(DecodeError::EmptyRecipient);
            }
            Request::Send {
                to,
                data: data()?,
                id,
            }
        }
        "presence" => Request::Presence {
            room: room(raw.room)?,
            id,
        },
        "ping" => Request::Ping { id },
        "rpc" => {
            let method: String = field(required(raw.method, "method")?, "method", "a string")?;
            if method.is_empty() || method.chars().count() > MAX_METHOD_LEN {
                return Err(DecodeError::MethodLength);
            }
            Request::Rpc {
                id: id.ok_or(DecodeError::MissingField("id"))?,
                method,
                data: data().unwrap_or_else(|_| Payload::Json(Bytes::from_static(b"null"))),
            }
        }
        other => return Err(DecodeError::UnknownType(other.chars().take(32).collect())),
    };
    Ok(request)
}

/// A field that must be present.
fn required<'a>(v: Option<&'a RawValue>, name: &'static str) -> Result<&'a RawValue, DecodeError> {
    v.ok_or(DecodeError::MissingField(name))
}

/// A field read as `T`, which it must be (`expected` says what that is).
fn field<T: DeserializeOwned>(
    raw: &RawValue,
    name: &'static str,
    expected: &'static str,
) -> Result<T, DecodeError> {
    serde_json::from_str(raw.get()).map_err(|_| DecodeError::WrongType {
        field: name,
        expected,
    })
}

/// A field that may be absent.
fn optional<T: DeserializeOwned>(
    raw: Option<&RawValue>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, DecodeError> {
    raw.map(|r| field(r, name, expected)).transpose()
}

/// The `room` field: present, a string, and a room name.
fn room(raw: Option<&RawValue>) -> Result<RoomName, DecodeError> {
    let s: String = field(required(raw, "room")?, "room", "a string")?;
    RoomName::new(&s).map_err(DecodeError::Room)
}

/// A boolean flag, false when absent.
fn flag(raw: Option<&RawValue>, name: &'static str) -> Result<bool, DecodeError> {
    Ok(optional(raw, name, "a boolean")?.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Request, InvalidRequest> {
        decode_json(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn decodes_publish_and_keeps_data_verbatim() {
        let r =
            json(r#"{"type":"publish","id":7,"room":"lobby","data":{"a": [1, 2]},"echo":true}"#)
                .unwrap();
        match r {
            Request::Publish {
                id,
                room,
                data,
                echo,
                volatile,
            } => {
                assert_eq!(id, Some(RequestId(7.into())));
                assert_eq!(room.as_str(), "lobby");
                assert_eq!(data, Payload::Json(Bytes::from_static(br#"{"a": [1, 2]}"#)));
                assert!(echo);
                assert!(!volatile);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn null_data_is_present() {
        let r = json(r#"{"type":"send","to":"bob","data":null}"#).unwrap();
        assert!(matches!(r, Request::Send { data: Payload::Json(d), .. } if &d[..] == b"null"));
    }

    #[test]
    fn precise_errors_name_the_problem() {
        let cases = [
            ("not json", "invalid JSON"),
            ("[1,2]", "envelope must be a JSON object"),
            (r#"{"id":1}"#, "missing field `type`"),
            (r#"{"type":5}"#, "field `type` must be a string"),
            (r#"{"type":"dance"}"#, "unknown type `dance`"),
            (r#"{"type":"join"}"#, "missing field `room`"),
            (
                r#"{"type":"join","room":7}"#,
                "field `room` must be a string",
            ),
            (
                r#"{"type":"join","room":"a b"}"#,
                "field `room`: room name may only",
            ),
            (r#"{"type":"publish","room":"r"}"#, "missing field `data`"),
            (
                r#"{"type":"publish","room":"r","data":1,"echo":"yes"}"#,
                "field `echo` must be a boolean",
            ),
            (
                r#"{"type":"ping","id":"x"}"#,
                "field `id` must be an integer",
            ),
            (
                r#"{"type":"join","room":"r","since":-1}"#,
                "field `since` must be a non-negative integer",
            ),
            (r#"{"type":"send","data":1}"#, "missing field `to`"),
            (r#"{"type":"auth"}"#, "missing field `token`"),
        ];
        for (input, expected) in cases {
            let e = json(input).unwrap_err();
            assert_eq!(e.error.code(), ErrorCode::BadRequest);
            assert!(e.to_string().contains(expected), "{input}: got {e}");
        }
    }

    #[test]
    fn data_nesting_is_bounded_and_strings_do_not_count() {
        let deep = format!(
            r#"{{"type":"publish","room":"r","id":9,"data":{}{}}}"#,
            "[".repeat(65),
            "]".repeat(65)
        );
        let e = json(&deep).unwrap_err();
        assert_eq!(e.id, Some(RequestId(9.into())));
        assert!(
            matches!(e.error, DecodeError::Data(DataError::TooDeep)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "field `data` is nested deeper than 64 levels"
        );
        let ok = format!(
            r#"{{"type":"publish","room":"r","data":{}"[[[\"{{"{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        assert!(json(&ok).is_ok(), "{ok}");
    }

    #[test]
    fn numbers_beyond_f64_are_refused_and_others_pass() {
        for bad in ["1e400", "-1e309", "[1, {\"a\": 2E+999}]"] {
            assert_eq!(check_data(bad), Err(DataError::NumberOutOfRange), "{bad}");
        }
        for good in [
            "1e308",
            "-0.5",
            "12345678901234567890123",
            "\"1e400\"",
            "[0,1.5e-400,{\"n\":-3}]",
        ] {
            assert_eq!(check_data(good), Ok(()), "{good}");
        }
        let e = json(r#"{"type":"publish","room":"r","id":1,"data":1e999}"#).unwrap_err();
        assert!(
            matches!(e.error, DecodeError::Data(DataError::NumberOutOfRange)),
            "{e:?}"
        );
        assert!(e.to_string().contains("64-bit float"), "{e}");
    }

    #[test]
    fn errors_echo_the_id_when_readable() {
        let e = json(r#"{"type":"join","id":42}"#).unwrap_err();
        assert_eq!(e.id, Some(RequestId(42.into())));
    }

    #[test]
    fn binary_envelope_splits_header_and_payload() {
        let header = br#"{"type":"publish","room":"r","id":3}"#;
        let mut frame = (header.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(header);
        frame.extend_from_slice(&[0, 1, 2, 255]);
        let r = decode_binary(&Bytes::from(frame)).unwrap();
        assert!(
            matches!(r, Request::Publish { data: Payload::Binary(p), .. } if p[..] == [0, 1, 2, 255])
        );
    }

    #[test]
    fn binary_envelope_errors() {
        let short = decode_binary(&Bytes::from_static(&[0])).unwrap_err();
        assert!(
            matches!(short.error, DecodeError::BinaryTooShort),
            "{short:?}"
        );
        assert_eq!(
            short.to_string(),
            "binary envelope shorter than its 2-byte header length"
        );
        let cut = decode_binary(&Bytes::from_static(&[0, 9, b'{'])).unwrap_err();
        assert!(
            matches!(cut.error, DecodeError::HeaderBeyondFrame(9)),
            "{cut:?}"
        );
        assert_eq!(
            cut.to_string(),
            "binary envelope header length 9 exceeds the frame"
        );
        let bad_utf8 = decode_binary(&Bytes::from_static(&[0, 1, 0xff])).unwrap_err();
        assert!(matches!(bad_utf8.error, DecodeError::HeaderNotUtf8));
        let header = br#"{"type":"publish","room":"r","id":4,"data":1}"#;
        let mut frame = (header.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(header);
        let e = decode_binary(&Bytes::from(frame)).unwrap_err();
        assert!(matches!(e.error, DecodeError::DataInBinaryHeader), "{e:?}");
        assert_eq!(e.id, Some(RequestId(4.into())));
        assert_eq!(
            e.to_string(),
            "binary envelope header must not contain `data`"
        );
    }
}
