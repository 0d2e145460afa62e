//! The one error of the Redis backplane, and its mapping to the hub's [`ClusterUnavailable`].

use gateway_core::backplane::ClusterUnavailable;

/// Why the backplane could not start or an operation failed.
///
/// Its text is for the log only: clients get a [`ClusterUnavailable`] without internals
/// (see `ClusterError::for_client`).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A URL is not a Redis URL.
    #[error("cluster: {0}")]
    Url(#[source] redis::RedisError),
    /// Redis answered with an error, or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis answered something the backplane does not expect.
    #[error("unexpected reply to {0}")]
    Reply(&'static str),
    /// There is no connection to Redis.
    #[error("no connection to redis")]
    NoConnection,
    /// The pub/sub connection is down.
    #[error("the redis subscription is down")]
    NoSubscription,
    /// Redis did not answer before the operation's deadline.
    #[error("redis did not answer in time")]
    Timeout,
    /// The operation was not sent.
    ///
    /// Its deadline passed in the queue, or the circuit breaker is open.
    #[error("not sent to redis")]
    NotSent,
    /// The room has no state and the room budget allows no new one.
    #[error("room budget exhausted")]
    RoomBudget,
}

impl ClusterError {
    /// Whether Redis gave no answer, rather than an answer.
    ///
    /// This is what the circuit breaker counts. No answer is a timeout, or a broken or
    /// refused connection.
    pub(super) fn unanswered(&self) -> bool {
        match self {
            ClusterError::Redis(e) => {
                e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::ClusterConnectionNotFound | redis::ErrorKind::ClusterDown
                    )
            }
            ClusterError::NoConnection | ClusterError::NoSubscription | ClusterError::Timeout => {
                true
            }
            ClusterError::Url(_)
            | ClusterError::Reply(_)
            | ClusterError::NotSent
            | ClusterError::RoomBudget => false,
        }
    }

    /// What the hub's caller is told.
    ///
    /// `delivery`: the operation delivers something (a publish, a direct message), so one
    /// sent that got no answer may have taken effect.
    pub(super) fn for_client(&self, delivery: bool) -> ClusterUnavailable {
        match self {
            ClusterError::RoomBudget => ClusterUnavailable::RoomBudget,
            ClusterError::Timeout if delivery => ClusterUnavailable::OutcomeUnknown,
            ClusterError::Redis(e) if delivery && self.unanswered() => {
                if e.is_connection_refusal() {
                    ClusterUnavailable::Unavailable
                } else {
                    ClusterUnavailable::OutcomeUnknown
                }
            }
            _ => ClusterUnavailable::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_delivery_sent_without_an_answer_has_an_unknown_outcome() {
        let timeout = ClusterError::Timeout;
        assert_eq!(timeout.for_client(true), ClusterUnavailable::OutcomeUnknown);
        assert_eq!(timeout.for_client(false), ClusterUnavailable::Unavailable);
        let io = ClusterError::Redis(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(io.unanswered());
        assert_eq!(io.for_client(true), ClusterUnavailable::OutcomeUnknown);
        let refused = ClusterError::Redis(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(refused.for_client(true), ClusterUnavailable::Unavailable);
        assert_eq!(
            ClusterError::NoConnection.for_client(true),
            ClusterUnavailable::Unavailable,
            "never sent"
        );
        assert_eq!(
            ClusterError::RoomBudget.for_client(false),
            ClusterUnavailable::RoomBudget
        );
        assert!(!ClusterError::Reply("x").unanswered());
    }
}
