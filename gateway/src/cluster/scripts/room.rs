//! A room's scripts.
//!
//! They publish, make the view a joining member gets, enter and leave, and list the
//! members.

use std::sync::Arc;

use gateway_core::{
    backplane::{ClusterPublish, RoomView},
    policy::RoomPolicies,
    protocol::{MemberInfo, RoomName},
};
use redis::{Script, Value};

use super::{flag, millis, Scripts};
use crate::cluster::{
    channel::{membership, node_members_key, Channel, Keys},
    conn::Conn,
    error::ClusterError,
    message::{meta, payload_bytes, Body},
};

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::cluster) struct Published {
    /// Its sequence number (`None` when volatile).
    pub(in crate::cluster) seq: Option<u64>,
    /// Whether it created the room's state.
    pub(in crate::cluster) created: bool,
}

impl Published {
    /// The reply of `publish.lua`: `{seq, created}`, or `{-1}` when the budget refused.
    fn parse(reply: &[i64], volatile: bool) -> Result<Self, ClusterError> {
        match reply[..] {
            [-1, ..] => Err(ClusterError::RoomBudget),
            [seq, created] => Ok(Published {
                seq: (!volatile).then_some(seq.max(0) as u64),
                created: created == 1,
            }),
            _ => Err(ClusterError::Reply("a publish")),
        }
    }
}

/// A new epoch, should the script start the room's sequence.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Scripts {
    /// Publishes `message` (see `publish.lua`).
    ///
    /// A new room is created only when `may_create` (else [`ClusterError::RoomBudget`], and
    /// nothing is kept or sent).
    pub(in crate::cluster) async fn publish(
        &self,
        conn: &mut Conn,
        message: &ClusterPublish,
        policies: &RoomPolicies,
        may_create: bool,
    ) -> Result<Published, ClusterError> {
        let policy = policies.for_room(message.room.as_str());
        let keys = Keys::room(message.room.as_str());
        let meta = meta(message.from.as_deref(), &message.data, message.origin);
        let reply: Vec<i64> = self
            .publish
            .key(&keys.state)
            .key(&keys.stream)
            .key(&keys.members)
            .arg(Channel::Room(message.room.clone()).name())
            .arg(policy.history)
            .arg(millis(policy.history_ttl))
            .arg(meta)
            .arg(payload_bytes(&message.data))
            .arg(flag(message.volatile))
            .arg(new_epoch())
            .arg(self.publish_command())
            // A volatile message neither reads nor creates the room's state.
            .arg(flag(message.volatile || may_create))
            .arg(if message.volatile {
                "0"
            } else {
                self.same_master_flag()
            })
            .invoke_async(conn)
            .await?;
        Published::parse(&reply, message.volatile)
    }

    /// The room as a joining member sees it (see `view.lua`), and whether this created it.
    ///
    /// A new room is created only when `may_create` (else [`ClusterError::RoomBudget`]).
    pub(in crate::cluster) async fn view(
        &self,
        conn: &mut Conn,
        room: &RoomName,
        since: Option<(u64, String)>,
        policies: &RoomPolicies,
        may_create: bool,
    ) -> Result<(RoomView, bool), ClusterError> {
        let policy = policies.for_room(room.as_str());
        let keys = Keys::room(room.as_str());
        let reply: Vec<Value> = self
            .view
            .key(&keys.state)
            .key(&keys.stream)
            .key(&keys.members)
            .arg(new_epoch())
            .arg(millis(policy.history_ttl))
            .arg(
                since
                    .as_ref()
                    .map_or(-1, |(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
            )
            .arg(flag(may_create))
            .arg(self.same_master_flag())
            .invoke_async(conn)
            .await?;
        parse_view(&reply, since)
    }

    /// Lists a session in a room (`entered`, see `enter.lua`), or unlists it.
    ///
    /// It is listed first in its node's record, so a sweep after the node died finds every
    /// membership it may have left. Unlisted (see `exit.lua`), it is then removed from its
    /// node's record.
    pub(in crate::cluster) async fn list(
        &self,
        conn: &mut Conn,
        node: &str,
        room: &RoomName,
        (member, events): (&MemberInfo, bool),
        entered: bool,
    ) -> Result<(), ClusterError> {
        let record = membership(room, member, events);
        if entered {
            redis::cmd("SADD")
                .arg(node_members_key(node))
                .arg(record)
                .exec_async(conn)
                .await?;
            self.register(conn, node).await?;
            return self
                .room_membership(&self.enter, conn, room, member, events)
                .await;
        }
        self.room_membership(&self.exit, conn, room, member, events)
            .await?;
        redis::cmd("SREM")
            .arg(node_members_key(node))
            .arg(record)
            .exec_async(conn)
            .await
            .map_err(ClusterError::from)
    }

    /// Runs `enter.lua` or `exit.lua` (the same keys and arguments) on the room's slot.
    pub(super) async fn room_membership(
        &self,
        script: &Script,
        conn: &mut Conn,
        room: &RoomName,
        member: &MemberInfo,
        events: bool,
    ) -> Result<(), ClusterError> {
        let keys = Keys::room(room.as_str());
        let info = serde_json::to_string(member).expect("plain struct");
        let ttl = self.policies.for_room(room.as_str()).history_ttl;
        let _: i64 = script
            .key(&keys.members)
            .key(&keys.users)
            .key(&keys.state)
            .arg(&member.session)
            .arg(info)
            .arg(&member.user)
            .arg(Channel::Room(room.clone()).name())
            .arg(flag(events))
            .arg(self.publish_command())
            .arg(millis(ttl))
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// The members of a room on every node.
    pub(in crate::cluster) async fn members(
        &self,
        conn: &mut Conn,
        room: &RoomName,
    ) -> Result<Vec<MemberInfo>, ClusterError> {
        let infos: Vec<String> = redis::cmd("HVALS")
            .arg(Keys::room(room.as_str()).members)
            .query_async(conn)
            .await?;
        Ok(infos
            .iter()
            .filter_map(|i| serde_json::from_str(i).ok())
            .collect())
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The reply of `view.lua`: the room view, and whether the view created the room.
///
/// The view has `missed` only when every message after `since` (in its epoch) came.
fn parse_view(
    reply: &[Value],
    since: Option<(u64, String)>,
) -> Result<(RoomView, bool), ClusterError> {
    if matches!(reply.first(), Some(Value::Int(-1))) {
        return Err(ClusterError::RoomBudget);
    }
    view_of(reply, since).ok_or(ClusterError::Reply("the room view"))
}

fn view_of(reply: &[Value], since: Option<(u64, String)>) -> Option<(RoomView, bool)> {
    let seq = match reply.first()? {
        Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let epoch: Arc<str> = std::str::from_utf8(bytes_of(reply.get(1)?)?).ok()?.into();
    let members = match reply.get(2)? {
        Value::Int(n) => usize::try_from(*n).ok()?,
        _ => return None,
    };
    let created = matches!(reply.get(3)?, Value::Int(1));
    let mut entries = Vec::new();
    for triple in reply[4..].chunks(3) {
        let [s, m, d] = triple else { return None };
        let s: u64 = std::str::from_utf8(bytes_of(s)?).ok()?.parse().ok()?;
        entries.push(
            Body::parse(bytes_of(m)?, bytes::Bytes::copy_from_slice(bytes_of(d)?))?
                .into_cluster(Some(s)),
        );
    }
    let missed = since.and_then(|(since, e)| {
        // A `since` at the top of u64 has nothing after it (and must not overflow).
        let first = since.checked_add(1)?;
        let consecutive = entries
            .iter()
            .zip(first..)
            .all(|(m, expected)| m.seq == Some(expected));
        let upto = since.checked_add(entries.len() as u64)?;
        (e == *epoch && consecutive && upto == seq).then_some(entries)
    });
    Some((
        RoomView {
            seq,
            epoch,
            missed,
            members,
        },
        created,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missed(reply: &[Value], since: Option<(u64, &str)>) -> Option<usize> {
        let since = since.map(|(s, e)| (s, e.to_owned()));
        parse_view(reply, since).unwrap().0.missed.map(|m| m.len())
    }

    #[test]
    fn a_view_recovers_only_a_complete_run_in_the_same_epoch() {
        let entry = |s: u64| {
            vec![
                Value::BulkString(s.to_string().into_bytes()),
                Value::BulkString(br#"{"b":false}"#.to_vec()),
                Value::BulkString(s.to_string().into_bytes()),
            ]
        };
        let reply = |entries: &[u64]| {
            let mut r = vec![
                Value::Int(5),
                Value::BulkString(b"e1".to_vec()),
                Value::Int(2),
                Value::Int(0),
            ];
            for s in entries {
                r.extend(entry(*s));
            }
            r
        };
        let (ok, created) = parse_view(&reply(&[4, 5]), Some((3, "e1".into()))).unwrap();
        assert!(!created);
        assert_eq!(ok.missed.map(|m| m.len()), Some(2));
        assert_eq!(missed(&reply(&[5]), Some((3, "e1"))), None, "gap");
        assert_eq!(missed(&reply(&[4, 5]), Some((3, "e0"))), None, "epoch");
        assert_eq!(missed(&reply(&[]), Some((5, "e1"))), Some(0));
        assert_eq!(missed(&reply(&[]), None), None);
        // A `since` at the top of u64 is ahead of the room, not an overflow.
        assert_eq!(missed(&reply(&[]), Some((u64::MAX, "e1"))), None);
    }

    #[test]
    fn a_refused_or_strange_reply_is_an_error() {
        assert!(matches!(
            parse_view(&[Value::Int(-1)], None),
            Err(ClusterError::RoomBudget)
        ));
        assert!(matches!(
            parse_view(&[Value::Int(1)], None),
            Err(ClusterError::Reply(_))
        ));
        assert!(matches!(
            Published::parse(&[-1], false),
            Err(ClusterError::RoomBudget)
        ));
        assert!(matches!(
            Published::parse(&[1, 2, 3], false),
            Err(ClusterError::Reply(_))
        ));
        assert_eq!(
            Published::parse(&[0, 0], true).unwrap(),
            Published {
                seq: None,
                created: false
            }
        );
        assert_eq!(
            Published::parse(&[9, 1], false).unwrap(),
            Published {
                seq: Some(9),
                created: true
            }
        );
    }
}
