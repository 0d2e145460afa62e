//! The one table of failure codes: `error` codes, close codes and HTTP statuses.
//!
//! Both fronts and the HTTP API take their codes and statuses from here.

use std::fmt;

use super::stream_frame::FrameError;
use crate::tickets::TicketError;

/// Declares a code enum and its table in one place.
///
/// Each variant is one row, its columns a value of the row type. The enum gets `ALL` (every
/// row, in order) and a private `row()`; the accessors read their column from it.
macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $row:ident {
            $( $(#[$doc:meta])* $variant:ident => $value:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$doc])* $variant, )*
        }

        impl $name {
            /// Every code of the table, in the order it is declared.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            const fn row(self) -> $row {
                match self {
                    $( $name::$variant => $value, )*
                }
            }
        }
    };
}

/// A row of the [`ErrorCode`] table.
struct ErrorRow {
    wire: &'static str,
    status: u16,
}

const fn error(wire: &'static str, status: u16) -> ErrorRow {
    ErrorRow { wire, status }
}

codes! {
    /// The `code` of an `error` envelope (PROTOCOL.md section 5).
    pub enum ErrorCode: ErrorRow {
        /// Not valid JSON, unknown type, missing or ill-typed field.
        BadRequest => error("bad_request", 400),
        /// Missing, invalid or expired credential.
        Unauthorized => error("unauthorized", 401),
        /// The identity may not do this (room pattern, API key).
        Forbidden => error("forbidden", 403),
        /// The target does not exist.
        NotFound => error("not_found", 404),
        /// `leave` of a room the session is not in.
        NotMember => error("not_member", 404),
        /// A message over the size limit.
        TooLarge => error("too_large", 413),
        /// Inbound rate limit exceeded.
        RateLimited => error("rate_limited", 429),
        /// A configured count was reached (rooms per session, connections per user).
        LimitExceeded => error("limit_exceeded", 429),
        /// A server-side failure.
        Internal => error("internal", 500),
        /// The application's backend refused the request (PROTOCOL.md section 10).
        Rejected => error("rejected", 403),
        /// The application's backend failed, timed out, is over its limit or its circuit is open.
        Unavailable => error("unavailable", 503),
    }
}

impl ErrorCode {
    /// The wire string of this code.
    pub fn as_str(self) -> &'static str {
        self.row().wire
    }

    /// The HTTP status the HTTP API answers with for this code.
    pub fn http_status(self) -> u16 {
        self.row().status
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row of the [`CloseCode`] table: the number, and whether it is ever sent on the wire.
struct CloseRow {
    code: u16,
    sent: bool,
}

const fn close(code: u16) -> CloseRow {
    CloseRow { code, sent: true }
}

codes! {
    /// Why a session is closed, with its WebSocket / WebTransport close code.
    ///
    /// See PROTOCOL.md section 8.
    pub enum CloseCode: CloseRow {
        /// 1000: normal close.
        Normal => close(1000),
        /// 1001: the server is going away (shutdown, drain).
        GoingAway => close(1001),
        /// 1002: WebSocket protocol error.
        ProtocolError => close(1002),
        /// 1006: the connection was lost without a close.
        ///
        /// Never sent (the transport is gone): it is what logs and metrics record for such
        /// a session.
        Abnormal => CloseRow { code: 1006, sent: false },
        /// 1007: a text message that is not valid UTF-8 (RFC 6455).
        InvalidPayload => close(1007),
        /// 1008: policy violation.
        PolicyViolation => close(1008),
        /// 1009: message too large.
        TooLarge => close(1009),
        /// 1011: internal error.
        Internal => close(1011),
        /// 4001: auth timeout, invalid token, token expired without refresh.
        Unauthorized => close(4001),
        /// 4003: forbidden.
        Forbidden => close(4003),
        /// 4008: slow consumer (outbound queue overflow) or sustained rate-limit abuse.
        TooSlowOrTooFast => close(4008),
        /// 4009: heartbeat timeout.
        HeartbeatTimeout => close(4009),
    }
}

impl CloseCode {
    /// The numeric close code.
    pub fn code(self) -> u16 {
        self.row().code
    }

    /// Whether a close frame may carry this code.
    ///
    /// [`Abnormal`](Self::Abnormal) is only recorded, never sent.
    pub fn is_sent(self) -> bool {
        self.row().sent
    }

    /// The close code for a numeric value a caller chose (for example `/api/disconnect`).
    ///
    /// It accepts any code of the table that is sent on the wire.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.is_sent() && c.code() == code)
    }
}

/// A reason to close a session: a code plus a short human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The close code.
    pub code: CloseCode,
    /// The reason text (at most 123 bytes on WebSocket).
    pub reason: String,
}

impl CloseReason {
    /// A close reason with its text.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        // A WebSocket close frame carries at most 123 bytes of reason.
        if reason.len() > 123 {
            let mut end = 123;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self { code, reason }
    }
}

impl fmt::Display for CloseReason {
    /// `CODE reason`, as a WebTransport connection's close reason carries it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.reason)
    }
}

/// Why a transport cannot go on with a session, as either front detects it.
///
/// Each maps to the one close the protocol prescribes
/// ([`close_reason`](Self::close_reason)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportFault {
    /// A message (or its frame header) above `max_message_bytes`: 1009.
    TooLarge,
    /// The transport's framing was broken (what, for the reason): 1002.
    Malformed(String),
    /// A WebSocket text message that is not UTF-8: 1007.
    InvalidUtf8,
    /// Too many frames hidden inside one message: 4008.
    ///
    /// More frames (continuation frames) than the rate limit allows arrived within one
    /// message.
    Flood,
    /// The client ended the session's message stream: 1000.
    StreamClosed,
    /// The client closed the session: 1000.
    PeerClosed,
    /// The connection went away without a close: 1006 (recorded, never sent).
    ConnectionLost,
    /// Writing to the transport failed: 1011.
    WriteFailed,
}

impl TransportFault {
    /// The close this fault calls for.
    pub fn close_reason(self) -> CloseReason {
        match self {
            TransportFault::TooLarge => CloseReason::new(CloseCode::TooLarge, "message too large"),
            TransportFault::Malformed(what) => CloseReason::new(CloseCode::ProtocolError, what),
            TransportFault::InvalidUtf8 => {
                CloseReason::new(CloseCode::InvalidPayload, "invalid UTF-8")
            }
            TransportFault::Flood => {
                CloseReason::new(CloseCode::TooSlowOrTooFast, "rate limit exceeded")
            }
            TransportFault::StreamClosed => {
                CloseReason::new(CloseCode::Normal, "message stream closed by client")
            }
            TransportFault::PeerClosed => CloseReason::new(CloseCode::Normal, "closed by client"),
            TransportFault::ConnectionLost => {
                CloseReason::new(CloseCode::Abnormal, "connection lost")
            }
            TransportFault::WriteFailed => CloseReason::new(CloseCode::Internal, "write failed"),
        }
    }
}

impl From<FrameError> for TransportFault {
    /// Sorts a framing error by whether the frame was over the limit.
    ///
    /// A frame over the limit is [`TooLarge`](Self::TooLarge); any other framing error is
    /// [`Malformed`](Self::Malformed).
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => TransportFault::TooLarge,
            other => TransportFault::Malformed(other.to_string()),
        }
    }
}

/// A row of the [`Rejection`] table.
///
/// It holds the HTTP status, the `error` code of the body and its message.
struct RejectionRow {
    status: u16,
    code: ErrorCode,
    message: &'static str,
}

const fn reject(status: u16, code: ErrorCode, message: &'static str) -> RejectionRow {
    RejectionRow {
        status,
        code,
        message,
    }
}

codes! {
    /// Why a WebSocket upgrade or WebTransport CONNECT is refused.
    ///
    /// It is refused before any session exists (PROTOCOL.md section 1). The variants are in
    /// the order the checks run.
    pub enum Rejection: RejectionRow {
        /// The path is not a configured endpoint (404).
        UnknownEndpoint => reject(404, ErrorCode::NotFound, "no such endpoint"),
        /// Not a valid upgrade or CONNECT request (400).
        BadUpgrade => reject(
            400,
            ErrorCode::BadRequest,
            "not a valid WebSocket upgrade or WebTransport CONNECT",
        ),
        /// The global connection limit is reached (503).
        ServerFull => reject(503, ErrorCode::LimitExceeded, "connection limit reached"),
        /// The per-IP connection limit is reached (429).
        TooManyFromIp => reject(
            429,
            ErrorCode::LimitExceeded,
            "too many connections from this address",
        ),
        /// The `Origin` is not in the endpoint's allow-list (403).
        ForbiddenOrigin => reject(403, ErrorCode::Forbidden, "origin not allowed"),
        /// A credential was presented and is invalid, expired or already used (401).
        InvalidCredential => reject(401, ErrorCode::Unauthorized, "invalid credential"),
        /// No credential on an endpoint with `auth = "required"` (401).
        MissingCredential => reject(401, ErrorCode::Unauthorized, "credential required"),
        /// The per-user connection limit is reached (429).
        TooManyForUser => reject(
            429,
            ErrorCode::LimitExceeded,
            "too many connections for this user",
        ),
        /// The server is shutting down (503).
        ShuttingDown => reject(503, ErrorCode::Internal, "shutting down"),
        /// The cluster store is unreachable, so a credential could not be checked (503).
        ///
        /// A ticket or the per-user count could not be checked.
        ClusterUnavailable => reject(
            503,
            ErrorCode::Internal,
            "cluster unavailable: the credential or the connection count cannot be checked",
        ),
        /// The `connect` upstream answered 401 (PROTOCOL.md section 10).
        UpstreamUnauthorized => reject(401, ErrorCode::Rejected, "refused by the application"),
        /// The `connect` upstream answered 403, or another 4xx than 401 and 429.
        UpstreamForbidden => reject(403, ErrorCode::Rejected, "refused by the application"),
        /// The `connect` upstream answered 429.
        UpstreamTooMany => reject(429, ErrorCode::Rejected, "refused by the application"),
        /// The `connect` call failed, timed out, or was refused by the limit or the circuit.
        UpstreamUnavailable => reject(
            503,
            ErrorCode::Unavailable,
            "application backend unavailable",
        ),
    }
}

impl Rejection {
    /// The HTTP status answered for this rejection.
    pub fn http_status(self) -> u16 {
        self.row().status
    }

    /// The `error` code of the JSON body sent with the status.
    pub fn error_code(self) -> ErrorCode {
        self.row().code
    }

    /// A short message for the response body; never includes the credential.
    pub fn message(self) -> &'static str {
        self.row().message
    }
}

/// A failed plain HTTP request: the status and the `error` code of its JSON body.
///
/// See PROTOCOL.md sections 1 and 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpFailure {
    /// An API failure, answered with its code's status ([`ErrorCode::http_status`]).
    Code(ErrorCode),
    /// A refused upgrade or CONNECT ([`Rejection::http_status`]).
    Rejected(Rejection),
    /// The request did not complete within the handshake timeout: 408, `bad_request`.
    Timeout,
    /// The one-time ticket store is full: 503, `limit_exceeded`.
    TicketsFull,
}

impl HttpFailure {
    /// The HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            HttpFailure::Code(code) => code.http_status(),
            HttpFailure::Rejected(rejection) => rejection.http_status(),
            HttpFailure::Timeout => 408,
            HttpFailure::TicketsFull => 503,
        }
    }

    /// The `error` code of the body.
    pub fn error_code(self) -> ErrorCode {
        match self {
            HttpFailure::Code(code) => code,
            HttpFailure::Rejected(rejection) => rejection.error_code(),
            HttpFailure::Timeout => ErrorCode::BadRequest,
            HttpFailure::TicketsFull => ErrorCode::LimitExceeded,
        }
    }
}

impl From<ErrorCode> for HttpFailure {
    fn from(code: ErrorCode) -> Self {
        HttpFailure::Code(code)
    }
}

impl From<Rejection> for HttpFailure {
    fn from(rejection: Rejection) -> Self {
        HttpFailure::Rejected(rejection)
    }
}

impl From<TicketError> for HttpFailure {
    fn from(e: TicketError) -> Self {
        match e {
            TicketError::Full => HttpFailure::TicketsFull,
            TicketError::UserLimit => HttpFailure::Code(ErrorCode::LimitExceeded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statuses of PROTOCOL.md sections 1 and 9, row by row.
    #[test]
    fn http_statuses_are_the_protocols() {
        let rejections = [
            (Rejection::UnknownEndpoint, 404, "not_found"),
            (Rejection::BadUpgrade, 400, "bad_request"),
            (Rejection::ServerFull, 503, "limit_exceeded"),
            (Rejection::TooManyFromIp, 429, "limit_exceeded"),
            (Rejection::ForbiddenOrigin, 403, "forbidden"),
            (Rejection::InvalidCredential, 401, "unauthorized"),
            (Rejection::MissingCredential, 401, "unauthorized"),
            (Rejection::TooManyForUser, 429, "limit_exceeded"),
            (Rejection::ShuttingDown, 503, "internal"),
            (Rejection::ClusterUnavailable, 503, "internal"),
        ];
        for (rejection, status, code) in rejections {
            let failure = HttpFailure::from(rejection);
            assert_eq!(failure.http_status(), status, "{rejection:?}");
            assert_eq!(failure.error_code().as_str(), code, "{rejection:?}");
        }
        let api = [
            (HttpFailure::Code(ErrorCode::BadRequest), 400),
            (HttpFailure::Code(ErrorCode::Unauthorized), 401),
            (HttpFailure::Code(ErrorCode::Forbidden), 403),
            (HttpFailure::Code(ErrorCode::NotFound), 404),
            (HttpFailure::Code(ErrorCode::NotMember), 404),
            (HttpFailure::Code(ErrorCode::TooLarge), 413),
            (HttpFailure::Code(ErrorCode::RateLimited), 429),
            (HttpFailure::Code(ErrorCode::LimitExceeded), 429),
            (HttpFailure::Code(ErrorCode::Internal), 500),
            (HttpFailure::Timeout, 408),
            (TicketError::Full.into(), 503),
            (TicketError::UserLimit.into(), 429),
        ];
        for (failure, status) in api {
            assert_eq!(failure.http_status(), status, "{failure:?}");
        }
        assert_eq!(
            HttpFailure::from(TicketError::Full).error_code(),
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn every_transport_fault_has_its_close_code() {
        let faults = [
            (TransportFault::TooLarge, 1009),
            (TransportFault::Malformed("x".into()), 1002),
            (TransportFault::InvalidUtf8, 1007),
            (TransportFault::Flood, 4008),
            (TransportFault::StreamClosed, 1000),
            (TransportFault::PeerClosed, 1000),
            (TransportFault::WriteFailed, 1011),
        ];
        for (fault, code) in faults {
            assert_eq!(fault.clone().close_reason().code.code(), code, "{fault:?}");
        }
        let too_large = FrameError::TooLarge { len: 9, max: 8 };
        assert_eq!(TransportFault::from(too_large), TransportFault::TooLarge);
        assert_eq!(
            TransportFault::from(FrameError::UnknownKind(7)),
            TransportFault::Malformed("unknown frame kind 0x07".into())
        );
    }

    #[test]
    fn close_codes_round_trip_and_reasons_fit_a_close_frame() {
        for code in [
            1000, 1001, 1002, 1007, 1008, 1009, 1011, 4001, 4003, 4008, 4009,
        ] {
            assert_eq!(CloseCode::from_code(code).map(CloseCode::code), Some(code));
        }
        assert_eq!(CloseCode::from_code(1005), None);
        // 1006 is recorded for a lost connection but never sent, so no caller may choose it.
        assert_eq!(CloseCode::Abnormal.code(), 1006);
        assert_eq!(CloseCode::from_code(1006), None);
        assert_eq!(CloseCode::ALL.len(), 12);
        let long = CloseReason::new(CloseCode::Normal, "é".repeat(100));
        assert!(long.reason.len() <= 123 && long.reason.is_char_boundary(long.reason.len()));
        assert_eq!(
            CloseReason::new(CloseCode::GoingAway, "bye").to_string(),
            "1001 bye"
        );
    }
}
