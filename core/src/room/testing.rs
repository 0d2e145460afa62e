//! Helpers for the tests of rooms and of the hub.

use bytes::Bytes;
use serde_json::Value;

use crate::{
    backplane::ClusterMessage,
    protocol::{CloseReason, Payload},
    session::{Batch, Outbound, OutboxReceiver},
};

/// Message `seq` of a room as the cluster hands it over (its data: the number).
pub(crate) fn cluster_message(seq: u64) -> ClusterMessage {
    ClusterMessage {
        seq: Some(seq),
        from: None,
        data: Payload::Json(Bytes::from(seq.to_string())),
        origin: None,
    }
}

/// Everything queued for `rx` (its JSON frames), and the close if it was closed.
pub(crate) fn frames_and_close(rx: &OutboxReceiver) -> (Vec<Value>, Option<CloseReason>) {
    let mut out = Vec::new();
    let mut closed = None;
    while let Some(batch) = rx.try_batch(&mut out, usize::MAX) {
        if let Batch::Close(reason) = batch {
            closed = Some(reason);
            break;
        }
    }
    let frames = out
        .into_iter()
        .filter_map(|o| match o {
            Outbound::Text(b) => serde_json::from_slice(&b).ok(),
            _ => None,
        })
        .collect();
    (frames, closed)
}
