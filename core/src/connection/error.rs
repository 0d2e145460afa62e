//! Why a request fails.
//!
//! Each variant is one `error` envelope: its code comes from [`RequestError::code`], its
//! message is the variant's text.

use crate::{
    auth::AuthError,
    backplane::ClusterUnavailable,
    hub::RoomRefusal,
    protocol::{DecodeError, ErrorCode, Rejection},
    upstream::Failure,
};

/// Why a request was refused; the session stays open.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The frame is not a valid request.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame over the session's rate limit.
    #[error("rate limit exceeded")]
    RateLimited,
    /// A request other than `auth` before the session authenticated.
    #[error("authenticate first with an `auth` frame")]
    NotAuthenticated,
    /// Too many requests while a first `auth` waits for the cluster.
    ///
    /// More than [`MAX_QUEUED_DURING_AUTH`](super::MAX_QUEUED_DURING_AUTH) arrived.
    #[error("authentication in progress")]
    AuthInProgress,
    /// An `auth` on an endpoint with `auth = "none"`.
    #[error("this endpoint does not use authentication")]
    AuthNotUsed,
    /// An `auth` while the gateway verifies no tokens (no `[auth]` section).
    #[error("no authentication configured")]
    NoVerifier,
    /// The token is not valid.
    #[error(transparent)]
    InvalidToken(#[from] AuthError),
    /// A refresh with the token of another user than the session's.
    #[error("token is for another user than this session")]
    OtherUser,
    /// The per-user connection count refused a first `auth`, or could not be checked.
    #[error("{}", .0.message())]
    UserSlot(Rejection),
    /// The identity may not join (or list the members of) the room.
    #[error("room not allowed")]
    RoomNotAllowed,
    /// The identity may not publish to the room.
    #[error("publishing to that room is not allowed")]
    PublishNotAllowed,
    /// A `join` beyond the endpoint's `max_rooms`.
    #[error("at most {0} rooms per session")]
    TooManyRooms(usize),
    /// A `leave` of a room the session is not in.
    #[error("not a member of that room")]
    NotMember,
    /// The cluster could not take the request.
    #[error(transparent)]
    Cluster(#[from] ClusterUnavailable),
    /// The request would bring a new room into existence, which the hub refused.
    #[error(transparent)]
    Room(#[from] RoomRefusal),
    /// The application's backend refused a `publish` or `rpc`; its reason.
    #[error("{0}")]
    Rejected(String),
    /// The application's `join` upstream refused the room; its reason.
    #[error("{0}")]
    JoinRefused(String),
    /// The `connect` upstream did not renew the session for its user.
    #[error("refresh refused")]
    RefreshRefused,
    /// An `auth` while the session's previous refresh is still with the backend.
    #[error("a refresh is already in flight")]
    RefreshInFlight,
    /// The call to the application's backend failed.
    #[error(transparent)]
    Unavailable(#[from] Failure),
    /// An `rpc` on an endpoint without an `rpc` upstream.
    #[error("this endpoint has no rpc upstream")]
    NoRpc,
    /// An `rpc` beyond [`MAX_RPCS_IN_FLIGHT`](super::MAX_RPCS_IN_FLIGHT) in flight.
    #[error("at most {} rpc calls in flight", super::MAX_RPCS_IN_FLIGHT)]
    TooManyRpcs,
    /// A request beyond [`MAX_PARKED`](super::MAX_PARKED) waiting behind a call.
    #[error("too many requests waiting for the application's backend")]
    Backlog,
}

impl RequestError {
    /// The `code` of the `error` envelope.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::Decode(e) => e.code(),
            RequestError::AuthNotUsed => ErrorCode::BadRequest,
            RequestError::RateLimited => ErrorCode::RateLimited,
            RequestError::NotAuthenticated
            | RequestError::AuthInProgress
            | RequestError::NoVerifier
            | RequestError::InvalidToken(_)
            | RequestError::OtherUser => ErrorCode::Unauthorized,
            RequestError::UserSlot(rejection) => rejection.error_code(),
            RequestError::RoomNotAllowed | RequestError::PublishNotAllowed => ErrorCode::Forbidden,
            RequestError::TooManyRooms(_) => ErrorCode::LimitExceeded,
            RequestError::NotMember => ErrorCode::NotMember,
            RequestError::Cluster(e) => e.code(),
            RequestError::Room(RoomRefusal::BudgetSpent) => ErrorCode::LimitExceeded,
            RequestError::Room(RoomRefusal::TooManyNewRooms(_)) => ErrorCode::RateLimited,
            RequestError::Rejected(_) => ErrorCode::Rejected,
            RequestError::JoinRefused(_) => ErrorCode::Forbidden,
            RequestError::RefreshRefused => ErrorCode::Unauthorized,
            RequestError::Unavailable(_) => ErrorCode::Unavailable,
            RequestError::NoRpc => ErrorCode::NotFound,
            RequestError::TooManyRpcs | RequestError::Backlog | RequestError::RefreshInFlight => {
                ErrorCode::LimitExceeded
            }
        }
    }
}
