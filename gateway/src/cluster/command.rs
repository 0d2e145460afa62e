//! The commands the worker runs for the hub, and the kinds of operation their lanes group.

use std::sync::Arc;

use gateway_core::{
    backplane::{ClusterPublish, ClusterUnavailable, Completion, RoomView},
    protocol::{CloseReason, MemberInfo, Payload, RoomName},
};

use super::{scripts::TicketRequest, shared::Shared};

/// A command for the worker.
pub(super) enum Command {
    Publish(
        ClusterPublish,
        Completion<Result<Option<u64>, ClusterUnavailable>>,
    ),
    OpenRoom(
        RoomName,
        Option<(u64, String)>,
        Completion<Result<RoomView, ClusterUnavailable>>,
    ),
    Disconnect(
        String,
        CloseReason,
        Completion<Result<(), ClusterUnavailable>>,
    ),
    SendUser(
        String,
        Option<Arc<str>>,
        Payload,
        Completion<Result<bool, ClusterUnavailable>>,
    ),
    /// Makes Redis list (or unlist) a session in a room as this node's record says.
    SyncMember(RoomName, String),
    Members(
        RoomName,
        Completion<Result<Vec<MemberInfo>, ClusterUnavailable>>,
    ),
    IssueTicket(TicketRequest, Completion<Result<bool, ClusterUnavailable>>),
    Ticket(
        String,
        bool,
        Completion<Result<Option<String>, ClusterUnavailable>>,
    ),
    AcquireUser(String, usize, Completion<Result<bool, ClusterUnavailable>>),
    /// Makes Redis hold this node's session count of a user as its record says.
    SyncUser(String),
}

/// A kind of operation: its own lanes, queues and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Publishes, memberships (presence), and joins' subscriptions and views.
    ///
    /// One room's commands run in one lane, so a member is listed before a later join's
    /// view counts it.
    Rooms,
    /// Presence listings (read-only, possibly large).
    Listing,
    /// Users: counts, direct messages, disconnects, user subscriptions.
    Users,
    /// One-time tickets.
    Tickets,
}

impl Kind {
    /// Every kind.
    pub(super) const ALL: [Kind; 4] = [Kind::Rooms, Kind::Listing, Kind::Users, Kind::Tickets];

    /// Its metric label.
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Rooms => "rooms",
            Kind::Listing => "listing",
            Kind::Users => "users",
            Kind::Tickets => "tickets",
        }
    }

    /// Ordered lanes (commands of one lane run one at a time).
    pub(super) fn lanes(self) -> usize {
        match self {
            Kind::Rooms => 8,
            Kind::Users => 4,
            Kind::Listing | Kind::Tickets => 2,
        }
    }

    /// Commands one lane's queue holds.
    ///
    /// A publish holds at most `max_message_bytes` (64 KiB by default): 8 × 256 × 64 KiB =
    /// 128 MiB at worst for the rooms' queues (with 1 KiB messages, 2 MiB). 256 absorbs a
    /// burst of one busy room's publishers: a lane runs a command per round trip (about
    /// 10,000/s on loopback), so a full queue drains in some 25 ms, far within the 2 s
    /// deadline.
    pub(super) fn capacity(self) -> usize {
        match self {
            Kind::Rooms => 256,
            // A listing can be large to answer: few wait.
            Kind::Listing => 8,
            Kind::Users => 128,
            Kind::Tickets => 64,
        }
    }
}

impl Command {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Command::Publish(..) | Command::OpenRoom(..) | Command::SyncMember(..) => Kind::Rooms,
            Command::Members(..) => Kind::Listing,
            Command::Disconnect(..)
            | Command::SendUser(..)
            | Command::AcquireUser(..)
            | Command::SyncUser(_) => Kind::Users,
            Command::IssueTicket(..) | Command::Ticket(..) => Kind::Tickets,
        }
    }

    /// What picks its lane: commands with the same key keep their order.
    pub(super) fn key(&self) -> &str {
        match self {
            Command::Publish(m, _) => m.room.as_str(),
            Command::OpenRoom(r, ..) | Command::SyncMember(r, _) | Command::Members(r, _) => {
                r.as_str()
            }
            Command::Disconnect(u, ..)
            | Command::SendUser(u, ..)
            | Command::AcquireUser(u, ..)
            | Command::SyncUser(u) => u,
            Command::IssueTicket(..) => "",
            Command::Ticket(t, ..) => t,
        }
    }

    /// Fails the command without running it: its caller gets `why`.
    ///
    /// A write this node owes Redis is marked to be made again at the next heartbeat.
    pub(super) fn refuse(self, shared: &Shared, why: ClusterUnavailable) {
        match self {
            Command::Publish(_, done) => done(Err(why)),
            Command::OpenRoom(_, _, done) => done(Err(why)),
            Command::Disconnect(_, _, done) => done(Err(why)),
            Command::SendUser(.., done) => done(Err(why)),
            Command::Members(_, done) => done(Err(why)),
            Command::IssueTicket(_, done) => done(Err(why)),
            Command::Ticket(_, _, done) => done(Err(why)),
            Command::AcquireUser(_, _, done) => done(Err(why)),
            Command::SyncMember(room, session) => shared.owe_member(room, session),
            Command::SyncUser(user) => shared.owe_user(user),
        }
    }
}

/// `done`, answered "cluster unavailable" if it is dropped unanswered.
///
/// It is dropped so when its command panicked in a lane, or the lane is gone: a caller
/// always gets an answer.
pub(super) fn answered_on_drop<T: 'static>(
    done: Completion<Result<T, ClusterUnavailable>>,
) -> Completion<Result<T, ClusterUnavailable>> {
    struct Guard<T>(Option<Completion<Result<T, ClusterUnavailable>>>);
    impl<T> Drop for Guard<T> {
        fn drop(&mut self) {
            if let Some(done) = self.0.take() {
                done(Err(ClusterUnavailable::Unavailable));
            }
        }
    }
    let mut guard = Guard(Some(done));
    Box::new(move |result| {
        if let Some(done) = guard.0.take() {
            done(result);
        }
    })
}

impl Command {
    /// The command with its completion answered even if it is dropped unanswered.
    pub(super) fn guarded(self) -> Self {
        match self {
            Command::Publish(m, d) => Command::Publish(m, answered_on_drop(d)),
            Command::OpenRoom(r, s, d) => Command::OpenRoom(r, s, answered_on_drop(d)),
            Command::Disconnect(u, r, d) => Command::Disconnect(u, r, answered_on_drop(d)),
            Command::SendUser(u, f, p, d) => Command::SendUser(u, f, p, answered_on_drop(d)),
            Command::Members(r, d) => Command::Members(r, answered_on_drop(d)),
            Command::IssueTicket(t, d) => Command::IssueTicket(t, answered_on_drop(d)),
            Command::Ticket(t, r, d) => Command::Ticket(t, r, answered_on_drop(d)),
            Command::AcquireUser(u, m, d) => Command::AcquireUser(u, m, answered_on_drop(d)),
            other @ (Command::SyncMember(..) | Command::SyncUser(_)) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_dropped_unanswered_is_answered_unavailable_and_one_answered_is_not_again() {
        let (done, mut rx) = gateway_core::backplane::completion::<Result<u8, _>>();
        drop(answered_on_drop(done));
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(ClusterUnavailable::Unavailable))
        ));
        let (done, mut rx) = gateway_core::backplane::completion::<Result<u8, _>>();
        answered_on_drop(done)(Ok(7));
        assert!(matches!(rx.try_recv(), Ok(Ok(7))));
    }
}
