//! The replies a session gets to its requests: `ack` and `error` envelopes.

use super::{Connection, RequestError};
use crate::{
    protocol::{AckFields, RequestId, ServerFrame},
    session::Outbound,
};

impl Connection {
    pub(super) fn ack(&self, id: Option<&RequestId>, fields: &AckFields) {
        self.handle.send(ack_frame(id, fields));
    }

    pub(super) fn reply_error(&self, id: Option<&RequestId>, error: RequestError) {
        self.handle.send(error_frame(id, &error));
    }
}

/// An `ack` envelope.
pub(super) fn ack_frame(id: Option<&RequestId>, fields: &AckFields) -> Outbound {
    ServerFrame::Ack { id, fields }.to_outbound()
}

/// The `error` envelope of a refused request.
pub(super) fn error_frame(id: Option<&RequestId>, error: &RequestError) -> Outbound {
    ServerFrame::Error {
        id,
        code: error.code(),
        message: &error.to_string(),
    }
    .to_outbound()
}
