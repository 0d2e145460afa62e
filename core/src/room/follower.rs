//! A room's order in cluster mode: the cluster assigns it, and this node follows.
//!
//! The cluster assigns sequence numbers and epochs. While a member's join waits for the
//! cluster its live frames are held; a member that joined (or was resynced) at some `seq`
//! has that `seq` as its floor, and messages the channel still brings up to it are not
//! delivered again; a message of another epoch, or a catch-up that cannot fill a gap, tells
//! the members (`resync`).

use std::{collections::HashMap, sync::Arc};

use super::{
    frames::cluster_frame,
    state::{Fanout, Members},
};
use crate::{
    backplane::{ClusterMessage, RoomView},
    protocol::{CloseCode, CloseReason, ResyncReason, RoomName, ServerFrame},
    session::{Outbound, SessionHandle, SessionId, SLOW_CONSUMER},
};

/// The epoch of a [`RoomView`] the cluster could not read.
///
/// A catch-up then knows neither what was missed nor where the room is, and tells the
/// members with the room's next message (`resync` with that message's epoch and the `seq`
/// before it).
pub const UNKNOWN_EPOCH: &str = "";

/// Most live frames held for one member whose join waits for the cluster.
///
/// Beyond, the member is a slow consumer (4008), as it would be with a full queue.
pub const MAX_HELD_FRAMES: usize = 1024;

/// A live frame held back for a member whose join waits for the cluster.
#[derive(Debug)]
pub struct Held {
    /// Its sequence number (room messages only).
    seq: Option<u64>,
    /// The epoch it came in (room messages only).
    epoch: Option<Arc<str>>,
    frame: Outbound,
}

/// A cluster node's view of one room's order.
#[derive(Debug)]
pub struct Follower {
    seq: u64,
    epoch: Arc<str>,
    /// Members whose join waits for the cluster, with the live frames held for them.
    ///
    /// The frames are those that arrived meanwhile, kept under the token of that join (a
    /// later join of the same session must not take an earlier answer).
    pending: HashMap<SessionId, (u64, Vec<Held>)>,
    /// Members that joined at this `seq` and have not had a newer message yet.
    ///
    /// Messages the channel still carries from before the join were replayed or reported
    /// already: they are not delivered to them again.
    floors: HashMap<SessionId, u64>,
}

impl Follower {
    /// A room this node has just started to hear, in a provisional `epoch`.
    ///
    /// The first join's view replaces the epoch.
    pub fn new(epoch: Arc<str>) -> Self {
        Self {
            seq: 0,
            epoch,
            pending: HashMap::new(),
            floors: HashMap::new(),
        }
    }

    /// The latest sequence number delivered, and its epoch.
    pub fn position(&self) -> (u64, Arc<str>) {
        (self.seq, self.epoch.clone())
    }

    /// The position, when some member's join has completed.
    ///
    /// Members still joining learn their position from their join's view.
    pub fn live_position(&self, members: &Members) -> Option<(u64, Arc<str>)> {
        self.established(members).next().map(|_| self.position())
    }

    /// A member's join waits for the cluster (join `token`): its live frames are held.
    pub fn hold(&mut self, id: SessionId, token: u64) {
        self.pending.insert(id, (token, Vec::new()));
    }

    /// Forgets what was kept for a member that left.
    pub fn forget(&mut self, id: SessionId) {
        self.pending.remove(&id);
        self.floors.remove(&id);
    }

    /// The members whose joins completed (not waiting for the cluster).
    fn established<'a>(&'a self, members: &'a Members) -> impl Iterator<Item = &'a SessionHandle> {
        members
            .iter()
            .filter(|(id, _)| !self.pending.contains_key(id))
            .map(|(_, member)| member)
    }

    /// The frames held for join `token` of member `id`, which stops waiting.
    ///
    /// `None` if it left meanwhile (and maybe joined again: that join gets its own answer).
    pub fn take_join(&mut self, id: SessionId, token: u64) -> Option<Vec<Held>> {
        if self.pending.get(&id).map(|(t, _)| *t) != Some(token) {
            return None;
        }
        self.pending.remove(&id).map(|(_, held)| held)
    }

    /// The cluster reported the room member `id` joined; returns its held frames to queue.
    ///
    /// The room follows the view, and the frames `held` for the member that are newer than
    /// the view are returned, in order, to be queued after its reply. Members whose joins
    /// completed are in the epoch they were told; a view in another one means the room
    /// restarted in the cluster meanwhile: their sequence cannot continue, they get
    /// `resync` and stay.
    pub fn complete_join(
        &mut self,
        room: &RoomName,
        members: &Members,
        id: SessionId,
        held: Vec<Held>,
        view: &RoomView,
    ) -> Vec<Outbound> {
        let same_epoch = *self.epoch == *view.epoch;
        if !same_epoch {
            let others: Vec<SessionHandle> = self
                .established(members)
                .filter(|m| m.id() != id)
                .cloned()
                .collect();
            self.resync(room, &others, &view.epoch, view.seq);
        }
        // In another epoch the sequence restarted: the view's is the room's.
        self.seq = if same_epoch {
            self.seq.max(view.seq)
        } else {
            view.seq
        };
        self.epoch = view.epoch.clone();
        let mut newer = false;
        let frames = held
            .into_iter()
            // A message of another epoch than the view's came from before it (the view
            // moved the member past it) or from a later restart (whose next message brings
            // the `resync`): not delivered after the ack.
            .filter(|h| h.epoch.as_ref().is_none_or(|e| **e == *view.epoch))
            .filter(|h| h.seq.is_none_or(|s| s > view.seq))
            .map(|h| {
                newer |= h.seq.is_some();
                h.frame
            })
            .collect();
        if !newer && view.seq > 0 {
            self.floors.insert(id, view.seq);
        }
        frames
    }

    /// Before a message of `epoch` with `seq`, resyncs members in another epoch.
    ///
    /// If the members are in another epoch (the room restarted in the cluster, e.g. after a
    /// Redis failover lost its state), their sequence cannot continue: they get `resync`
    /// (the new epoch, the sequence number before this message) and stay. While every
    /// member's join waits for the cluster the epoch is not known yet and is not checked.
    pub fn follow_epoch(
        &mut self,
        room: &RoomName,
        members: &Members,
        epoch: &str,
        seq: Option<u64>,
    ) {
        if *self.epoch == *epoch || self.established(members).next().is_none() {
            return;
        }
        let before = seq.unwrap_or(1).saturating_sub(1);
        let epoch: Arc<str> = epoch.into();
        self.floors.clear();
        let established: Vec<SessionHandle> = self.established(members).cloned().collect();
        self.resync(room, &established, &epoch, before);
        self.epoch = epoch;
        self.seq = before;
    }

    /// Queues a room message's `frame` to the members but its origin.
    ///
    /// The frame is held for members still joining (with `epoch`, when the message has
    /// one), and skipped for members whose floor covers it. A member with
    /// [`MAX_HELD_FRAMES`] held is closed as a slow consumer.
    pub fn deliver(
        &mut self,
        members: &Members,
        message: &ClusterMessage,
        epoch: Option<&str>,
        frame: &Outbound,
    ) -> Fanout {
        if let Some(seq) = message.seq {
            self.seq = self.seq.max(seq);
            if !self.floors.is_empty() {
                // Members whose join reported `seq` or later already have this message.
                self.floors.retain(|_, floor| seq <= *floor);
            }
        }
        let mut held_epoch: Option<Arc<str>> = None;
        let mut counted = Fanout::default();
        for (id, member) in members.iter() {
            if Some(id) == message.origin {
                continue;
            }
            match self.pending.get_mut(&id) {
                Some((_, held)) if held.len() >= MAX_HELD_FRAMES => {
                    member.close(CloseReason::new(CloseCode::TooSlowOrTooFast, SLOW_CONSUMER));
                }
                Some((_, held)) => held.push(Held {
                    seq: message.seq,
                    epoch: epoch.map(|e| held_epoch.get_or_insert_with(|| e.into()).clone()),
                    frame: frame.clone(),
                }),
                None if message.seq.is_some() && self.floors.contains_key(&id) => {}
                None => {
                    member.send(frame.clone());
                    counted.add(member);
                }
            }
        }
        counted
    }

    /// Queues a presence `frame` about `user` to the other members.
    ///
    /// It is held for members still joining, within [`MAX_HELD_FRAMES`].
    pub fn deliver_presence(&mut self, members: &Members, user: &str, frame: &Outbound) {
        for (id, member) in members.others(user) {
            match self.pending.get_mut(&id) {
                Some((_, held)) if held.len() < MAX_HELD_FRAMES => held.push(Held {
                    seq: None,
                    epoch: None,
                    frame: frame.clone(),
                }),
                Some(_) => {}
                None => {
                    member.send(frame.clone());
                }
            }
        }
    }

    /// Delivers what was missed while this node's subscription was down, or resyncs.
    ///
    /// `view` is the cluster's view of the room from position `from`. The messages missed
    /// are delivered as live ones; when they cannot be (the room is in another epoch, or
    /// its history no longer holds them all) every member gets `resync` (the room's epoch
    /// and latest sequence number) and stays: a member never silently skips messages.
    /// Returns the last sequence number accounted for (channel messages up to it are not
    /// delivered again) and what was queued.
    pub fn catch_up(
        &mut self,
        room: &RoomName,
        members: &Members,
        from: (u64, &str),
        view: &RoomView,
    ) -> (u64, Fanout) {
        let (from_seq, from_epoch) = from;
        let mut counted = Fanout::default();
        if *self.epoch != *from_epoch {
            // A join moved the room to another epoch meanwhile (and resynced the members
            // of the old one).
            return (view.seq, counted);
        }
        if *view.epoch == *UNKNOWN_EPOCH {
            // Whatever epoch the next message has differs: it brings the `resync`. Nothing
            // on the channel is skipped as accounted for.
            self.epoch = UNKNOWN_EPOCH.into();
            self.floors.clear();
            return (0, counted);
        }
        match &view.missed {
            Some(missed) if *view.epoch == *from_epoch => {
                for m in missed
                    .iter()
                    .filter(|m| m.seq.is_some_and(|s| s > from_seq))
                {
                    let fanout = self.deliver(members, m, None, &cluster_frame(room, m, false));
                    counted.merge(fanout);
                }
            }
            _ => {
                let established: Vec<SessionHandle> = self.established(members).cloned().collect();
                self.resync(room, &established, &view.epoch, view.seq);
                self.epoch = view.epoch.clone();
                self.seq = view.seq;
            }
        }
        (view.seq, counted)
    }

    /// Tells `members` that `room` continues in `epoch` after `seq`.
    ///
    /// This is `resync`, reason `continuity`; messages up to `seq` the channel still brings
    /// are not delivered to them.
    fn resync(&mut self, room: &RoomName, members: &[SessionHandle], epoch: &str, seq: u64) {
        let frame = ServerFrame::Resync {
            room: room.as_str(),
            epoch,
            seq,
            reason: ResyncReason::Continuity,
        }
        .to_outbound();
        for member in members {
            member.send(frame.clone());
            self.floors.insert(member.id(), seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        room::testing::{cluster_message, frames_and_close},
        session::{OutboxReceiver, QueueLimits, TransportKind},
    };
    use serde_json::{json, Value};

    fn room() -> RoomName {
        RoomName::new("r").unwrap()
    }

    /// A member entering the room: its join waits for the cluster (token: its id).
    fn member(
        members: &mut Members,
        f: &mut Follower,
        id: u64,
        user: &str,
    ) -> (SessionHandle, OutboxReceiver) {
        let (h, rx) = SessionHandle::new(
            SessionId(id),
            TransportKind::WebSocket,
            "/chat".into(),
            QueueLimits::frames(4096),
        );
        h.set_user(user.into());
        members.add(&h);
        f.hold(h.id(), id);
        (h, rx)
    }

    fn view(seq: u64, epoch: &str, missed: Option<Vec<ClusterMessage>>) -> RoomView {
        RoomView {
            seq,
            epoch: epoch.into(),
            missed,
            members: 1,
        }
    }

    /// Delivers message `seq` of `epoch` as the hub does: the epoch is followed first.
    fn deliver(f: &mut Follower, members: &Members, seq: u64, epoch: &str) -> Fanout {
        let m = cluster_message(seq);
        f.follow_epoch(&room(), members, epoch, m.seq);
        f.deliver(members, &m, Some(epoch), &cluster_frame(&room(), &m, false))
    }

    /// Completes the join of member `h` with `view`; returns the frames released to it.
    fn join(
        f: &mut Follower,
        members: &Members,
        h: &SessionHandle,
        view: &RoomView,
    ) -> Vec<Outbound> {
        let held = f.take_join(h.id(), h.id().0).expect("still joining");
        f.complete_join(&room(), members, h.id(), held, view)
    }

    fn json_of(frame: &Outbound) -> Value {
        match frame {
            Outbound::Text(b) => serde_json::from_slice(b).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn seqs(frames: &[Value]) -> Vec<u64> {
        frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
    }

    #[test]
    fn an_epoch_change_resyncs_the_members_who_stay() {
        let mut members = Members::new(false);
        let mut f = Follower::new("provisional".into());
        let (a, arx) = member(&mut members, &mut f, 1, "a");
        let (b, brx) = member(&mut members, &mut f, 2, "b");
        join(&mut f, &members, &a, &view(2, "e", None));
        join(&mut f, &members, &b, &view(2, "e", None));
        deliver(&mut f, &members, 3, "e");
        deliver(&mut f, &members, 5, "e2");
        deliver(&mut f, &members, 6, "e2");
        for rx in [&arx, &brx] {
            let (frames, closed) = frames_and_close(rx);
            assert_eq!(closed, None, "the member stays");
            assert_eq!(
                frames,
                [
                    json!({"type": "message", "room": "r", "seq": 3, "data": 3}),
                    json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 4, "reason": "continuity"}),
                    json!({"type": "message", "room": "r", "seq": 5, "data": 5}),
                    json!({"type": "message", "room": "r", "seq": 6, "data": 6}),
                ]
            );
        }
        assert_eq!(f.position(), (6, "e2".into()));
        assert_eq!(f.live_position(&members), Some((6, "e2".into())));
    }

    #[test]
    fn catch_up_delivers_what_was_missed_and_advances_the_floor() {
        let mut members = Members::new(false);
        let mut f = Follower::new("provisional".into());
        let (a, arx) = member(&mut members, &mut f, 1, "a");
        join(&mut f, &members, &a, &view(2, "e", None));
        // Missed 3 and 4 while the subscription was down; the history holds them.
        let missed = view(
            4,
            "e",
            Some(vec![
                cluster_message(2),
                cluster_message(3),
                cluster_message(4),
            ]),
        );
        let (upto, counted) = f.catch_up(&room(), &members, (2, "e"), &missed);
        assert_eq!((upto, counted), (4, Fanout([2, 0])));
        assert_eq!(
            seqs(&frames_and_close(&arx).0),
            [3, 4],
            "only what was missed"
        );
        assert_eq!(f.position(), (4, "e".into()));
        // The room restarted meanwhile: the member is resynced at the view's `seq`, its
        // floor; the channel's copy of 7 is not delivered, 8 is.
        let (upto, _) = f.catch_up(&room(), &members, (4, "e"), &view(7, "e2", None));
        assert_eq!(upto, 7);
        deliver(&mut f, &members, 7, "e2");
        deliver(&mut f, &members, 8, "e2");
        let (frames, closed) = frames_and_close(&arx);
        assert_eq!(closed, None);
        assert_eq!(
            frames,
            [
                json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 7, "reason": "continuity"}),
                json!({"type": "message", "room": "r", "seq": 8, "data": 8}),
            ]
        );
        // A catch-up the cluster could not answer skips nothing and leaves the `resync` to
        // the next message.
        let unknown = view(8, UNKNOWN_EPOCH, None);
        assert_eq!(f.catch_up(&room(), &members, (8, "e2"), &unknown).0, 0);
        deliver(&mut f, &members, 9, "e2");
        assert_eq!(
            frames_and_close(&arx).0,
            [
                json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 8, "reason": "continuity"}),
                json!({"type": "message", "room": "r", "seq": 9, "data": 9}),
            ]
        );
    }

    #[test]
    fn a_frame_at_or_below_the_floor_is_not_delivered_twice() {
        let mut members = Members::new(false);
        let mut f = Follower::new("provisional".into());
        let (live, live_rx) = member(&mut members, &mut f, 1, "live");
        let (late, late_rx) = member(&mut members, &mut f, 2, "late");
        join(&mut f, &members, &live, &view(0, "e", None));
        deliver(&mut f, &members, 1, "e");
        // The late member's view (taken at 2) covered 1 and 2; the channel still brings 2.
        let held = f.take_join(late.id(), 2).unwrap();
        let released = f.complete_join(&room(), &members, late.id(), held, &view(2, "e", None));
        assert!(released.is_empty(), "1 is older than the view");
        for seq in [2, 2, 3, 4] {
            deliver(&mut f, &members, seq, "e");
        }
        assert_eq!(
            seqs(&frames_and_close(&late_rx).0),
            [3, 4],
            "2 came with the view"
        );
        assert_eq!(
            seqs(&frames_and_close(&live_rx).0),
            [1, 2, 2, 3, 4],
            "no floor for the live member"
        );
    }

    #[test]
    fn held_frames_are_released_after_the_join_in_order() {
        let mut members = Members::new(true);
        let mut f = Follower::new("provisional".into());
        let (joiner, rx) = member(&mut members, &mut f, 1, "joiner");
        let (_other, _orx) = member(&mut members, &mut f, 2, "other");
        deliver(&mut f, &members, 3, "e");
        deliver(&mut f, &members, 4, "e");
        let presence = super::super::frames::presence_frame(
            &room(),
            crate::protocol::PresenceEvent::Join,
            "other",
        );
        f.deliver_presence(&members, "other", &presence);
        deliver(&mut f, &members, 5, "e");
        assert!(
            frames_and_close(&rx).0.is_empty(),
            "held while the join waits"
        );
        assert!(
            f.take_join(joiner.id(), 0).is_none(),
            "another join's answer"
        );
        let held = f.take_join(joiner.id(), 1).unwrap();
        let released = f.complete_join(&room(), &members, joiner.id(), held, &view(3, "e", None));
        let released: Vec<Value> = released.iter().map(json_of).collect();
        assert_eq!(
            released,
            [
                json!({"type": "message", "room": "r", "seq": 4, "data": 4}),
                json!({"type": "presence", "room": "r", "event": "join", "user": "other"}),
                json!({"type": "message", "room": "r", "seq": 5, "data": 5}),
            ]
        );
        // Newer frames were released: no floor, the next message arrives.
        deliver(&mut f, &members, 6, "e");
        assert_eq!(seqs(&frames_and_close(&rx).0), [6]);
    }

    #[test]
    fn frames_of_another_epoch_held_during_a_join_are_dropped_and_the_others_resynced() {
        let mut members = Members::new(false);
        let mut f = Follower::new("provisional".into());
        let (old, old_rx) = member(&mut members, &mut f, 1, "old");
        let (joiner, joiner_rx) = member(&mut members, &mut f, 2, "joiner");
        join(&mut f, &members, &old, &view(500, "e1", None));
        // While the join waits, the channel still brings the old epoch's 501 and 502.
        deliver(&mut f, &members, 501, "e1");
        deliver(&mut f, &members, 502, "e1");
        let held = f.take_join(joiner.id(), 2).unwrap();
        let released = f.complete_join(&room(), &members, joiner.id(), held, &view(3, "e2", None));
        assert!(released.is_empty(), "{released:?}");
        deliver(&mut f, &members, 4, "e2");
        assert_eq!(seqs(&frames_and_close(&joiner_rx).0), [4]);
        assert_eq!(
            frames_and_close(&old_rx).0,
            [
                json!({"type": "message", "room": "r", "seq": 501, "data": 501}),
                json!({"type": "message", "room": "r", "seq": 502, "data": 502}),
                json!({"type": "resync", "room": "r", "epoch": "e2", "seq": 3, "reason": "continuity"}),
                json!({"type": "message", "room": "r", "seq": 4, "data": 4}),
            ]
        );
    }

    #[test]
    fn a_joining_member_holds_at_most_max_held_frames() {
        let mut members = Members::new(false);
        let mut f = Follower::new("provisional".into());
        let (joiner, rx) = member(&mut members, &mut f, 1, "joiner");
        let presence = super::super::frames::presence_frame(
            &room(),
            crate::protocol::PresenceEvent::Join,
            "x",
        );
        for seq in 1..=MAX_HELD_FRAMES as u64 {
            deliver(&mut f, &members, seq, "e");
        }
        // Presence beyond the bound is dropped; the member is not closed for it.
        f.deliver_presence(&members, "x", &presence);
        assert!(!joiner.is_closed());
        deliver(&mut f, &members, MAX_HELD_FRAMES as u64 + 1, "e");
        let (frames, closed) = frames_and_close(&rx);
        assert!(frames.is_empty());
        assert_eq!(
            closed,
            Some(CloseReason::new(CloseCode::TooSlowOrTooFast, SLOW_CONSUMER))
        );
        let held = f.take_join(joiner.id(), 1).unwrap();
        assert_eq!(held.len(), MAX_HELD_FRAMES);
    }
}
