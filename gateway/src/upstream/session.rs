//! Runs one session's calls and hands their outcomes back to its driver.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use gateway_core::{
    session::SessionHandle,
    upstream::{Call, CallId, CallRequest, CommonFields, Outcome},
};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use super::Upstream;

/// Outcomes waiting for the session's driver.
#[derive(Debug, Default)]
struct Mailbox {
    outcomes: Mutex<Vec<(CallId, Outcome)>>,
    arrived: Notify,
}

/// One session's calls: each runs on its own task, so the session (and every other one)
/// goes on while it waits.
///
/// A session that ends drops its mailbox: answers that arrive later are dropped, the calls
/// themselves run to their end.
#[derive(Debug)]
pub(crate) struct SessionCalls {
    upstream: Arc<Upstream>,
    node: Arc<str>,
    remote_addr: String,
    mailbox: Arc<Mailbox>,
    /// Shutdown waits for the calls too (within the drain window).
    tasks: TaskTracker,
}

impl SessionCalls {
    /// The calls of a session from `peer` to `upstream`, on node `node`, run on `tasks`.
    pub(crate) fn new(
        upstream: Arc<Upstream>,
        node: Arc<str>,
        peer: SocketAddr,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            upstream,
            node,
            remote_addr: peer.to_string(),
            mailbox: Arc::default(),
            tasks,
        }
    }

    /// Starts `call` for the session of `handle`.
    pub(crate) fn start(&self, call: Call, handle: &SessionHandle) {
        let user = handle.user().cloned();
        let request = CallRequest {
            common: CommonFields {
                endpoint: handle.endpoint(),
                transport: handle.transport().as_str(),
                node: &self.node,
                remote_addr: &self.remote_addr,
                session: Some(handle.id_str()),
                user: user.as_deref(),
            },
            body: &call.body,
        };
        let body = serde_json::to_vec(&request).expect("a call body serializes");
        let event = call.body.event();
        let upstream = self.upstream.clone();
        let mailbox = Arc::downgrade(&self.mailbox);
        self.tasks.spawn(async move {
            let outcome = upstream.call(event, body).await;
            if let Some(mailbox) = mailbox.upgrade() {
                mailbox
                    .outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((call.id, outcome));
                mailbox.arrived.notify_one();
            }
        });
    }

    /// Resolves when outcomes have arrived (cancel-safe).
    pub(crate) async fn arrived(&self) {
        self.mailbox.arrived.notified().await;
    }

    /// The outcomes that arrived, in arrival order.
    pub(crate) fn take(&self) -> Vec<(CallId, Outcome)> {
        std::mem::take(
            &mut *self
                .mailbox
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }
}
