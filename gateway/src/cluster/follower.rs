//! What the backplane does about its pub/sub connection, as a state machine with no I/O.
//!
//! Events go in ([`Event`]), actions come out ([`Action`]); the subscriber and keep-alive
//! tasks do the I/O and feed the outcomes back.
//!
//! After every (re)connection: subscribe every wanted channel, then catch each room with
//! members here up from the position it is at (messages published while the
//! subscription was down never reach this node), one room after the other, and only then
//! deliver what the channels carry. A room whose view fails [`VIEW_TRIES`] times is
//! resynced (its members get `resync` with its next message). Channel messages the
//! catch-up accounted for already are not delivered twice.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use gateway_core::{backplane::RoomView, protocol::RoomName};

use super::message::Message;

/// The first wait before connecting again.
///
/// It is doubled after each failure, up to the follower's longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Views tried for one room's catch-up before it is resynced.
pub(super) const VIEW_TRIES: u32 = 3;
/// The wait between two tries of a room's view.
const VIEW_RETRY: Duration = Duration::from_millis(200);
/// Channel messages held while a catch-up runs.
///
/// Beyond it the connection is treated as lost (a new one catches every room up again from
/// the hub's positions).
pub(super) const MAX_HELD: usize = 4096;

/// How the follower waits before connecting again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retry {
    /// The longest wait.
    pub(super) max: Duration,
    /// Whether a connection that connected and then failed also doubles the wait.
    ///
    /// It failed subscribing, or was lost later. A Redis Cluster does (a failover takes a
    /// few seconds); one Redis tries again after the first wait, and doubles only while
    /// connecting fails.
    pub(super) double_after_connecting: bool,
}

/// A room's position in the hub: its sequence number and epoch.
pub(super) type Position = (u64, Arc<str>);

/// What happened.
#[derive(Debug)]
pub(super) enum Event {
    /// A new pub/sub connection is up, subscribed to nothing yet.
    Connected,
    /// The connection failed or was lost.
    ///
    /// Connecting failed, subscribing on the new connection failed, or the connection was
    /// lost.
    Lost,
    /// Every wanted channel is subscribed on the new connection.
    Subscribed,
    /// Redis unsubscribed a channel (its slot moved).
    Unsubscribed(String),
    /// The hub's rooms with members here and their positions.
    Positions(Vec<(RoomName, u64, Arc<str>)>),
    /// The room being caught up has this view in Redis.
    Viewed(RoomView),
    /// Reading the view of the room being caught up failed.
    ViewFailed,
    /// The hub caught the room up.
    ///
    /// Its channel messages up to this sequence number are accounted for.
    CaughtUp(u64),
    /// A message on a channel.
    Message(Message),
    /// Redis answered the heartbeat.
    ///
    /// `expired`: this node's liveness had expired (other nodes may have swept what it
    /// listed).
    Heartbeat {
        /// This node's liveness had expired.
        expired: bool,
    },
}

/// What to do.
#[derive(Debug)]
pub(super) enum Action {
    /// Drop the pub/sub connection (if any), wait, and connect a new one.
    Connect {
        /// How long to wait first.
        after: Duration,
    },
    /// Subscribe every wanted channel on the new connection.
    SubscribeAll,
    /// Subscribe a channel Redis unsubscribed again, if it is still wanted.
    Resubscribe(String),
    /// Read a room's view in Redis after its position.
    ///
    /// Answered by `Viewed` or `ViewFailed`.
    View {
        room: RoomName,
        since: Position,
        /// How long to wait first.
        after: Duration,
    },
    /// Queue again the writes this node owes Redis; `everything`: all it holds.
    ReAnnounce {
        /// Owe everything first (this node may have been swept).
        everything: bool,
    },
    /// A call into the hub.
    Hub(HubCall),
}

/// A call into the hub.
#[derive(Debug)]
pub(super) enum HubCall {
    /// Its rooms' positions (answered by `Positions`).
    Positions,
    /// Catch a room up from its position with its view (answered by `CaughtUp`).
    CatchUp {
        room: RoomName,
        from: Position,
        view: RoomView,
    },
    /// What a room missed is unknown: its members get `resync` with its next message.
    ///
    /// Answered by `CaughtUp`.
    Resync { room: RoomName, from: Position },
    /// Hand a channel message to the hub.
    Deliver(Message),
}

/// Where the pub/sub connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// None, or connecting.
    Down,
    /// Connected, subscribing every wanted channel.
    Subscribing,
    /// Subscribed, catching rooms up.
    CatchingUp,
    /// Delivering.
    Up,
}

/// The room being caught up.
struct CatchingUp {
    room: RoomName,
    from: Position,
    failures: u32,
}

/// The state machine.
pub(super) struct Follower {
    link: Link,
    backoff: Duration,
    retry: Retry,
    /// Per room, the sequence number the catch-up accounted for.
    ///
    /// Channel messages up to it, which may still be on their way, are not delivered twice.
    caught: HashMap<RoomName, u64>,
    /// Rooms still to catch up after the current one.
    rooms: VecDeque<(RoomName, u64, Arc<str>)>,
    current: Option<CatchingUp>,
    /// Messages heard before the catch-up ended, delivered after it.
    held: Vec<Message>,
}

impl Follower {
    /// A follower not connected yet, waiting between attempts as `retry` says.
    pub(super) fn new(retry: Retry) -> Self {
        Self {
            link: Link::Down,
            backoff: FIRST_BACKOFF,
            retry,
            caught: HashMap::new(),
            rooms: VecDeque::new(),
            current: None,
            held: Vec::new(),
        }
    }

    /// The first action: connect.
    pub(super) fn start(&self) -> Action {
        Action::Connect {
            after: Duration::ZERO,
        }
    }

    /// Takes `event`; returns the actions it calls for, in order.
    pub(super) fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Connected => {
                self.link = Link::Subscribing;
                out.push(Action::SubscribeAll);
            }
            Event::Lost => self.lost(&mut out),
            Event::Subscribed => {
                self.link = Link::CatchingUp;
                self.backoff = FIRST_BACKOFF;
                self.caught.clear();
                out.push(Action::Hub(HubCall::Positions));
            }
            Event::Unsubscribed(channel) => out.push(Action::Resubscribe(channel)),
            Event::Positions(rooms) => {
                self.rooms = rooms.into();
                self.next_room(&mut out);
            }
            Event::Viewed(view) => {
                if let Some(c) = &self.current {
                    out.push(Action::Hub(HubCall::CatchUp {
                        room: c.room.clone(),
                        from: c.from.clone(),
                        view,
                    }));
                }
            }
            Event::ViewFailed => self.view_failed(&mut out),
            Event::CaughtUp(upto) => {
                if let Some(c) = self.current.take() {
                    self.caught.insert(c.room, upto);
                }
                self.next_room(&mut out);
            }
            Event::Message(_) if self.link != Link::Up && self.held.len() >= MAX_HELD => {
                self.lost(&mut out)
            }
            Event::Message(message) if self.link != Link::Up => self.held.push(message),
            Event::Message(message) => self.deliver(message, &mut out),
            Event::Heartbeat { expired } => out.push(Action::ReAnnounce {
                everything: expired,
            }),
        }
        out
    }

    /// The connection is gone (or never came).
    ///
    /// Forgets what it held, and connects again after the wait.
    fn lost(&mut self, out: &mut Vec<Action>) {
        let connected = self.link != Link::Down;
        self.link = Link::Down;
        self.caught.clear();
        self.rooms.clear();
        self.current = None;
        self.held.clear();
        out.push(Action::Connect {
            after: self.backoff,
        });
        if !connected || self.retry.double_after_connecting {
            self.backoff = (self.backoff * 2).min(self.retry.max);
        }
    }

    /// Starts the next room's catch-up, or ends the catch-up.
    ///
    /// When the catch-up ends, what was held is delivered.
    fn next_room(&mut self, out: &mut Vec<Action>) {
        if let Some((room, seq, epoch)) = self.rooms.pop_front() {
            out.push(Action::View {
                room: room.clone(),
                since: (seq, epoch.clone()),
                after: Duration::ZERO,
            });
            self.current = Some(CatchingUp {
                room,
                from: (seq, epoch),
                failures: 0,
            });
            return;
        }
        if self.link == Link::CatchingUp {
            self.link = Link::Up;
            for message in std::mem::take(&mut self.held) {
                self.deliver(message, out);
            }
        }
    }

    /// The current room's view failed.
    ///
    /// It is tried again a little later, or after [`VIEW_TRIES`] the room is resynced.
    fn view_failed(&mut self, out: &mut Vec<Action>) {
        let Some(c) = &mut self.current else { return };
        c.failures += 1;
        out.push(if c.failures < VIEW_TRIES {
            Action::View {
                room: c.room.clone(),
                since: c.from.clone(),
                after: VIEW_RETRY,
            }
        } else {
            Action::Hub(HubCall::Resync {
                room: c.room.clone(),
                from: c.from.clone(),
            })
        });
    }

    /// Delivers `message`, unless the catch-up accounted for it already.
    ///
    /// It was accounted for when its room's sequence number is up to the caught-up one; the
    /// first newer one ends the check.
    fn deliver(&mut self, message: Message, out: &mut Vec<Action>) {
        if let Message::Room { room, seq, .. } = &message {
            if let Some(&upto) = self.caught.get(room) {
                if *seq <= upto {
                    return;
                }
                self.caught.remove(room);
            }
        }
        out.push(Action::Hub(HubCall::Deliver(message)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::message::Body;
    use gateway_core::protocol::{Payload, PresenceEvent};

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn message(room_name: &str, seq: u64) -> Event {
        Event::Message(Message::Room {
            room: room(room_name),
            seq,
            epoch: "e1".into(),
            body: Body {
                from: None,
                data: Payload::Json(bytes::Bytes::from_static(b"1")),
                origin: None,
            },
        })
    }

    fn view(seq: u64) -> RoomView {
        RoomView {
            seq,
            epoch: "e1".into(),
            missed: Some(Vec::new()),
            members: 1,
        }
    }

    /// The sequence numbers of the room messages `actions` deliver, in order.
    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Hub(HubCall::Deliver(Message::Room { seq, .. })) => Some(*seq),
                _ => None,
            })
            .collect()
    }

    /// A Redis Cluster's retries.
    const CLUSTER: Retry = Retry {
        max: Duration::from_secs(1),
        double_after_connecting: true,
    };

    /// A follower delivering, with no room to catch up.
    fn up() -> Follower {
        let mut f = Follower::new(CLUSTER);
        assert!(matches!(f.start(), Action::Connect { after } if after.is_zero()));
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        assert!(f.handle(Event::Positions(Vec::new())).is_empty());
        f
    }

    #[test]
    fn after_a_failover_it_resubscribes_catches_up_and_delivers_nothing_twice() {
        let mut f = up();
        assert_eq!(delivered(&f.handle(message("r", 1))), [1]);
        let a = f.handle(Event::Lost);
        assert!(matches!(a[..], [Action::Connect { after }] if after == FIRST_BACKOFF));
        assert!(matches!(
            f.handle(Event::Connected)[..],
            [Action::SubscribeAll]
        ));
        assert!(matches!(
            f.handle(Event::Subscribed)[..],
            [Action::Hub(HubCall::Positions)]
        ));
        let a = f.handle(Event::Positions(vec![(room("r"), 1, "e1".into())]));
        assert!(
            matches!(&a[..], [Action::View { room: r, since: (1, _), after }]
            if r.as_str() == "r" && after.is_zero())
        );
        let a = f.handle(Event::Viewed(view(4)));
        assert!(
            matches!(&a[..], [Action::Hub(HubCall::CatchUp { room: r, from: (1, _), view })]
            if r.as_str() == "r" && view.seq == 4)
        );
        assert!(f.handle(Event::CaughtUp(4)).is_empty());
        for seq in [2, 3, 4] {
            assert!(
                f.handle(message("r", seq)).is_empty(),
                "{seq} was caught up"
            );
        }
        assert_eq!(delivered(&f.handle(message("r", 5))), [5]);
        assert_eq!(
            delivered(&f.handle(message("r", 3))),
            [3],
            "the first newer message ends the check"
        );
        assert_eq!(delivered(&f.handle(message("other", 1))), [1]);
    }

    #[test]
    fn connecting_again_backs_off_up_to_its_longest_and_starts_over_once_subscribed() {
        let mut f = Follower::new(CLUSTER);
        let mut waits = Vec::new();
        for _ in 0..6 {
            match f.handle(Event::Lost)[..] {
                [Action::Connect { after }] => waits.push(after.as_millis()),
                ref other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        f.handle(Event::Connected);
        assert!(
            matches!(f.handle(Event::Lost)[..], [Action::Connect { after }] if after.as_millis() == 1000),
            "subscribing failed: still backing off"
        );
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        assert!(
            matches!(f.handle(Event::Lost)[..], [Action::Connect { after }] if after == FIRST_BACKOFF)
        );
    }

    #[test]
    fn a_channel_unsubscribed_by_a_slot_move_is_subscribed_again_and_delivery_goes_on() {
        let mut f = up();
        let a = f.handle(Event::Unsubscribed("gw:{room:r}".into()));
        assert!(matches!(&a[..], [Action::Resubscribe(c)] if c == "gw:{room:r}"));
        assert_eq!(delivered(&f.handle(message("r", 9))), [9]);
    }

    #[test]
    fn a_catch_up_failing_three_times_resyncs_the_room_and_goes_on_with_the_next() {
        let mut f = Follower::new(CLUSTER);
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        let rooms = vec![(room("a"), 3, "e1".into()), (room("b"), 5, "e1".into())];
        let a = f.handle(Event::Positions(rooms));
        assert!(
            matches!(&a[..], [Action::View { room: r, after, .. }] if r.as_str() == "a" && after.is_zero())
        );
        for _ in 1..VIEW_TRIES {
            let a = f.handle(Event::ViewFailed);
            assert!(
                matches!(&a[..], [Action::View { room: r, since: (3, _), after }]
                if r.as_str() == "a" && *after == VIEW_RETRY)
            );
        }
        let a = f.handle(Event::ViewFailed);
        assert!(
            matches!(&a[..], [Action::Hub(HubCall::Resync { room: r, from: (3, _) })]
            if r.as_str() == "a")
        );
        let a = f.handle(Event::CaughtUp(0));
        assert!(
            matches!(&a[..], [Action::View { room: r, since: (5, _), .. }] if r.as_str() == "b")
        );
        assert!(matches!(
            f.handle(Event::Viewed(view(5)))[..],
            [Action::Hub(HubCall::CatchUp { .. })]
        ));
        assert!(f.handle(Event::CaughtUp(5)).is_empty());
        assert_eq!(
            delivered(&f.handle(message("a", 4))),
            [4],
            "the resynced room's next message goes to the hub (which sends resync)"
        );
    }

    #[test]
    fn messages_heard_during_the_catch_up_are_held_and_duplicates_at_the_seam_dropped() {
        let mut f = Follower::new(CLUSTER);
        f.handle(Event::Connected);
        assert!(
            f.handle(message("r", 5)).is_empty(),
            "held while subscribing"
        );
        f.handle(Event::Subscribed);
        assert!(
            f.handle(message("r", 6)).is_empty(),
            "held while catching up"
        );
        let presence = Event::Message(Message::Presence {
            room: room("r"),
            event: PresenceEvent::Join,
            user: "ann".into(),
        });
        assert!(f.handle(presence).is_empty());
        f.handle(Event::Positions(vec![(room("r"), 3, "e1".into())]));
        f.handle(Event::Viewed(view(5)));
        let a = f.handle(Event::CaughtUp(5));
        assert_eq!(delivered(&a), [6], "5 came with the catch-up");
        assert_eq!(a.len(), 2, "and the presence event");
        assert!(f.handle(message("r", 6)).len() == 1);
    }

    #[test]
    fn a_lost_connection_forgets_what_it_held_and_its_floors() {
        let mut f = up();
        f.handle(Event::Lost);
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        f.handle(message("r", 2));
        f.handle(Event::Lost);
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        assert!(
            f.handle(Event::Positions(Vec::new())).is_empty(),
            "nothing held survives"
        );
    }

    #[test]
    fn a_heartbeat_after_this_node_expired_re_announces_everything() {
        let mut f = Follower::new(CLUSTER);
        assert!(matches!(
            f.handle(Event::Heartbeat { expired: true })[..],
            [Action::ReAnnounce { everything: true }]
        ));
        assert!(matches!(
            f.handle(Event::Heartbeat { expired: false })[..],
            [Action::ReAnnounce { everything: false }]
        ));
    }

    #[test]
    fn one_redis_connects_again_at_once_after_a_connection_that_came_up() {
        let mut f = Follower::new(Retry {
            max: Duration::from_secs(5),
            double_after_connecting: false,
        });
        let mut waits = Vec::new();
        for _ in 0..3 {
            let [Action::Connect { after }] = f.handle(Event::Lost)[..] else {
                panic!("connect again")
            };
            waits.push(after.as_millis());
        }
        assert_eq!(waits, [100, 200, 400], "connecting fails: doubled");
        f.handle(Event::Connected);
        let [Action::Connect { after }] = f.handle(Event::Lost)[..] else {
            panic!("connect again")
        };
        assert_eq!(
            after.as_millis(),
            800,
            "subscribing failed: the wait it had"
        );
        f.handle(Event::Connected);
        let [Action::Connect { after }] = f.handle(Event::Lost)[..] else {
            panic!("connect again")
        };
        assert_eq!(
            after.as_millis(),
            800,
            "not doubled after a connection came up"
        );
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        let [Action::Connect { after }] = f.handle(Event::Lost)[..] else {
            panic!("connect again")
        };
        assert_eq!(after, FIRST_BACKOFF, "a lost subscription: the first wait");
    }

    #[test]
    fn more_messages_than_it_may_hold_during_a_catch_up_start_it_over() {
        let mut f = Follower::new(CLUSTER);
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        f.handle(Event::Positions(vec![(room("r"), 0, "e1".into())]));
        for seq in 1..=MAX_HELD as u64 {
            assert!(f.handle(message("r", seq)).is_empty(), "held");
        }
        assert!(
            matches!(f.handle(message("r", 0))[..], [Action::Connect { .. }]),
            "one more: connect again and catch up afresh"
        );
        f.handle(Event::Connected);
        f.handle(Event::Subscribed);
        assert!(
            f.handle(Event::Positions(Vec::new())).is_empty(),
            "nothing held survives"
        );
    }
}
