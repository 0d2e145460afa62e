//! The backplane: how a hub reaches the other nodes of a cluster.
//!
//! A single node needs none: [`LocalBackplane`] orders rooms in the hub itself (sequence,
//! history) and has nobody else to tell. A cluster backplane ([`Cluster`]) is the authority
//! instead: it assigns each room message its sequence number and keeps history, and every
//! node's hub delivers what the cluster hands it ([`Hub::deliver`](crate::hub::Hub::deliver))
//! in the cluster's order. Its operations complete later, through a [`Completion`]; core
//! never awaits.

use std::sync::Arc;

use crate::{
    protocol::{CloseReason, ErrorCode, MemberInfo, Payload, RoomName},
    session::SessionId,
};

/// Called once with the outcome of an operation that completes later.
pub type Completion<T> = Box<dyn FnOnce(T) + Send>;

/// A [`Completion`] and the receiver its outcome arrives on.
///
/// For async callers of the hub and the cluster. The receiver errs only if the completion
/// was dropped uncalled.
pub fn completion<T: Send + 'static>() -> (Completion<T>, tokio::sync::oneshot::Receiver<T>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (
        Box::new(move |outcome| {
            let _ = tx.send(outcome);
        }),
        rx,
    )
}

/// Why the cluster could not do something.
///
/// Each variant's text is the `message` of the client's `error` envelope, so it names no
/// internals of the store (the backplane logs those); [`code`](Self::code) is its `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterUnavailable {
    /// The store cannot be reached (or its circuit breaker is open).
    ///
    /// The operation was not carried out.
    #[error("cluster unavailable")]
    Unavailable,
    /// The operation's queue is full: it was refused at once, not carried out.
    #[error("cluster busy")]
    Busy,
    /// The operation was sent but no answer came, so it may or may not have taken effect.
    ///
    /// This includes the store failing while running it. A publish with this error may
    /// still be delivered to the room's members.
    #[error("cluster unavailable: outcome unknown")]
    OutcomeUnknown,
    /// The operation would create a room with history beyond the room budget.
    ///
    /// The budget is `[limits] room_budget_mb`; nothing was created.
    #[error("room budget exhausted")]
    RoomBudget,
}

impl ClusterUnavailable {
    /// The `code` of the `error` envelope (and of an API error).
    ///
    /// It is `limit_exceeded` for the room budget, `internal` otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClusterUnavailable::RoomBudget => ErrorCode::LimitExceeded,
            _ => ErrorCode::Internal,
        }
    }
}

/// A room message published through the cluster.
#[derive(Debug, Clone)]
pub struct ClusterPublish {
    /// The room.
    pub room: RoomName,
    /// The publisher's user id (`None` for the HTTP API).
    pub from: Option<Arc<str>>,
    /// The payload.
    pub data: Payload,
    /// Volatile: no sequence number, never kept.
    pub volatile: bool,
    /// The publishing session, which does not receive its own message (`echo: false`).
    pub origin: Option<SessionId>,
}

/// A message of a room as the cluster keeps it.
#[derive(Debug, Clone)]
pub struct ClusterMessage {
    /// Its sequence number (`None` when volatile).
    pub seq: Option<u64>,
    /// The publisher's user id.
    pub from: Option<Arc<str>>,
    /// The payload.
    pub data: Payload,
    /// The publishing session, excluded from delivery.
    pub origin: Option<SessionId>,
}

/// A room as the cluster sees it when a session joins it.
#[derive(Debug, Clone)]
pub struct RoomView {
    /// The latest sequence number.
    pub seq: u64,
    /// The epoch it belongs to.
    pub epoch: Arc<str>,
    /// With a recovery request: the messages after `since` when every one is still held.
    pub missed: Option<Vec<ClusterMessage>>,
    /// Sessions in the room on every node.
    pub members: usize,
}

/// A cluster backplane: the authority on room order and history.
///
/// It is also the way to the users and rooms of other nodes. Implementations run the work
/// on their own tasks and call each completion exactly once.
pub trait Cluster: Send + Sync + 'static {
    /// Assigns the message its sequence number, keeps it and publishes it.
    ///
    /// It is published to every node that hears the room (this one included, through
    /// [`Hub::deliver`](crate::hub::Hub::deliver)).
    fn publish(
        &self,
        message: ClusterPublish,
        done: Completion<Result<Option<u64>, ClusterUnavailable>>,
    );

    /// Makes this node hear `room` (before `done`), then reports it.
    ///
    /// The report holds its sequence, epoch and, with `since` and `epoch`, the missed
    /// messages.
    fn open_room(
        &self,
        room: &RoomName,
        since: Option<(u64, String)>,
        done: Completion<Result<RoomView, ClusterUnavailable>>,
    );

    /// This node has no member left in `room`: stop hearing it.
    fn close_room(&self, room: &RoomName);

    /// A session entered `room`: it is listed cluster-wide.
    ///
    /// When it is its user's first session there (cluster-wide) and `events` is on, a
    /// presence `join` goes to the room.
    fn enter(&self, room: &RoomName, member: MemberInfo, events: bool);

    /// A session left `room` (the mirror of [`enter`](Self::enter)).
    fn exit(&self, room: &RoomName, member: MemberInfo, events: bool);

    /// Closes every session of `user` on every node (each node closes its own on receipt).
    fn disconnect_user(
        &self,
        user: &str,
        reason: CloseReason,
        done: Completion<Result<(), ClusterUnavailable>>,
    );

    /// The members of `room` on every node.
    fn members(
        &self,
        room: &RoomName,
        done: Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    );

    /// Delivers a direct message to every session of `user` on every node.
    ///
    /// `done` says whether any node has one.
    fn send_user(
        &self,
        user: &str,
        from: Option<Arc<str>>,
        data: Payload,
        done: Completion<Result<bool, ClusterUnavailable>>,
    );

    /// This node has its first session of `user`: hear the user's direct messages.
    fn open_user(&self, user: &str);

    /// This node has no session of `user` left.
    fn close_user(&self, user: &str);

    /// Counts a new session of `user` cluster-wide unless the user is at `max` already.
    ///
    /// `max` is the user's sessions on all nodes together; `done` says whether it was
    /// counted. A failed operation leaves no count behind (the implementation's duty).
    fn acquire_user(
        &self,
        user: &str,
        max: usize,
        done: Completion<Result<bool, ClusterUnavailable>>,
    );

    /// A session counted by [`acquire_user`](Self::acquire_user) ended.
    fn release_user(&self, user: &str);
}

/// What a hub is connected to: nothing else (a single node), or a [`Cluster`].
pub trait Backplane: Send + Sync + 'static {
    /// The cluster this backplane is, when it is the authority on rooms.
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }

    /// Why the backplane cannot reach the rest of the cluster right now, if it cannot.
    ///
    /// `/healthz` then says `degraded`.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// The in-process backplane of a single node.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBackplane;

impl Backplane for LocalBackplane {}
