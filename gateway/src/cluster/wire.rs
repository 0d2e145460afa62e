//! What the cluster keeps in Redis and sends through it: key and channel names, the two
//! scripts (publish, room view), and the format of channel messages.
//!
//! A room message on its channel is `SEQ LEN META DATA` (`-` for the sequence of a volatile
//! message), a direct message on a user's channel `LEN META DATA`, where META is a small
//! JSON object of LEN bytes (`f`: from, `b`: binary payload, `o`: origin session) and DATA
//! the payload bytes. History entries carry META and DATA under the stream id `0-SEQ`.

use std::sync::Arc;

use gateway_core::{
    backplane::{ClusterMessage, ClusterPublish, ClusterUnavailable, RoomView},
    hub::Hub,
    policy::RoomPolicies,
    protocol::{Payload, RoomName},
    session::SessionId,
};
use redis::{aio::ConnectionManager, Script, Value};
use serde::{Deserialize, Serialize};

/// A channel this node can hear.
#[derive(Debug, Clone)]
pub(super) enum Channel {
    Room(RoomName),
    User(String),
}

impl Channel {
    /// Its Redis name; the braces are the hash tag its keys share.
    pub(super) fn name(&self) -> String {
        match self {
            Channel::Room(room) => format!("gw:{{room:{}}}", room.as_str()),
            Channel::User(user) => format!("gw:{{user:{user}}}"),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        let inner = name.strip_prefix("gw:{")?.strip_suffix('}')?;
        if let Some(room) = inner.strip_prefix("room:") {
            return RoomName::new(room).ok().map(Channel::Room);
        }
        inner
            .strip_prefix("user:")
            .map(|u| Channel::User(u.to_owned()))
    }
}

/// The keys of one room.
pub(super) struct Keys {
    seq: String,
    epoch: String,
    stream: String,
}

impl Keys {
    pub(super) fn room(room: &str) -> Self {
        Self {
            seq: format!("gw:{{room:{room}}}:seq"),
            epoch: format!("gw:{{room:{room}}}:epoch"),
            stream: format!("gw:{{room:{room}}}:stream"),
        }
    }
}

/// The small header of a message on a channel or in a history entry.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(rename = "b", default)]
    binary: bool,
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    origin: Option<u64>,
}

fn meta(from: Option<&str>, data: &Payload, origin: Option<SessionId>) -> String {
    serde_json::to_string(&Meta {
        from: from.map(str::to_owned),
        binary: matches!(data, Payload::Binary(_)),
        origin: origin.map(|o| o.0),
    })
    .expect("plain struct")
}

fn payload_bytes(data: &Payload) -> &[u8] {
    match data {
        Payload::Json(b) | Payload::Binary(b) => b,
    }
}

fn message(meta: &[u8], data: &[u8], seq: Option<u64>) -> Option<ClusterMessage> {
    let meta: Meta = serde_json::from_slice(meta).ok()?;
    let bytes = bytes::Bytes::copy_from_slice(data);
    Some(ClusterMessage {
        seq,
        from: meta.from.map(Arc::from),
        data: if meta.binary {
            Payload::Binary(bytes)
        } else {
            Payload::Json(bytes)
        },
        origin: meta.origin.map(SessionId),
    })
}

/// Splits `LEN META DATA`.
fn split_meta(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = payload.iter().position(|&b| b == b' ')?;
    let len: usize = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    let rest = &payload[space + 1..];
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Hands a channel message to the hub; anything malformed is ignored.
pub(super) fn deliver(hub: &Hub, channel: &str, payload: &[u8]) {
    match Channel::parse(channel) {
        Some(Channel::Room(room)) => {
            let Some(space) = payload.iter().position(|&b| b == b' ') else {
                return;
            };
            let seq = std::str::from_utf8(&payload[..space])
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            let Some((meta, data)) = split_meta(&payload[space + 1..]) else {
                return;
            };
            if let Some(m) = message(meta, data, seq) {
                hub.deliver(&room, &m, seq.is_none());
            }
        }
        Some(Channel::User(user)) => {
            let Some((meta, data)) = split_meta(payload) else {
                return;
            };
            if let Some(m) = message(meta, data, None) {
                hub.deliver_user(&user, m.from.as_deref(), &m.data);
            }
        }
        None => {}
    }
}

/// The scripts, loaded once (EVALSHA, falling back to EVAL after a Redis restart).
pub(super) struct Scripts {
    publish: Script,
    view: Script,
}

/// One atomic step per publish: the next sequence number (a new epoch when the sequence
/// restarts), the history entry, the expiry of the room's keys, and the channel message.
const PUBLISH: &str = r#"
local history, ttl, volatile = tonumber(ARGV[2]), ARGV[3], ARGV[6]
local framed = #ARGV[4] .. ' ' .. ARGV[4] .. ARGV[5]
if volatile == '1' then
  redis.call('PUBLISH', ARGV[1], '- ' .. framed)
  return 0
end
local seq = redis.call('INCR', KEYS[1])
if seq == 1 then
  -- The sequence (re)starts: nothing older may stay in the stream. The epoch is kept when
  -- a member already saw it (a join creates it); when it expired with the sequence, or
  -- Redis lost it, a new one starts.
  redis.call('DEL', KEYS[3])
end
redis.call('SET', KEYS[2], ARGV[7], 'NX')
if history > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', history, '0-' .. seq, 'm', ARGV[4], 'd', ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. framed)
return seq
"#;

/// A room as a joining member sees it: its sequence number and epoch (created if the room
/// has none), and with `since` the kept entries after it, flattened as seq, meta, data.
const VIEW: &str = r#"
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {seq, redis.call('GET', KEYS[2])}
local since = tonumber(ARGV[3])
if since >= 0 and since < seq then
  for _, e in ipairs(redis.call('XRANGE', KEYS[3], '0-' .. (since + 1), '+')) do
    local f = e[2]
    local m, d
    for i = 1, #f, 2 do
      if f[i] == 'm' then m = f[i + 1] elseif f[i] == 'd' then d = f[i + 1] end
    end
    out[#out + 1] = string.sub(e[1], 3)
    out[#out + 1] = m
    out[#out + 1] = d
  end
end
return out
"#;

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn unavailable(e: impl std::fmt::Display) -> ClusterUnavailable {
    ClusterUnavailable(e.to_string())
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            publish: Script::new(PUBLISH),
            view: Script::new(VIEW),
        }
    }

    pub(super) async fn publish(
        &self,
        conn: &mut ConnectionManager,
        message: &ClusterPublish,
        policies: &RoomPolicies,
    ) -> Result<Option<u64>, ClusterUnavailable> {
        let policy = policies.for_room(message.room.as_str());
        let keys = Keys::room(message.room.as_str());
        let meta = meta(message.from.as_deref(), &message.data, message.origin);
        let seq: u64 = self
            .publish
            .key(&keys.seq)
            .key(&keys.epoch)
            .key(&keys.stream)
            .arg(Channel::Room(message.room.clone()).name())
            .arg(policy.history)
            .arg(policy.history_ttl.as_millis().max(1) as u64)
            .arg(meta)
            .arg(payload_bytes(&message.data))
            .arg(if message.volatile { "1" } else { "0" })
            .arg(new_epoch())
            .invoke_async(conn)
            .await
            .map_err(unavailable)?;
        Ok((!message.volatile).then_some(seq))
    }

    pub(super) async fn view(
        &self,
        conn: &mut ConnectionManager,
        room: &RoomName,
        since: Option<(u64, String)>,
        policies: &RoomPolicies,
    ) -> Result<RoomView, ClusterUnavailable> {
        let policy = policies.for_room(room.as_str());
        let keys = Keys::room(room.as_str());
        let reply: Vec<Value> = self
            .view
            .key(&keys.seq)
            .key(&keys.epoch)
            .key(&keys.stream)
            .arg(new_epoch())
            .arg(policy.history_ttl.as_millis().max(1) as u64)
            .arg(
                since
                    .as_ref()
                    .map_or(-1, |(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
            )
            .invoke_async(conn)
            .await
            .map_err(unavailable)?;
        parse_view(&reply, since).ok_or_else(|| unavailable("unexpected reply to the room view"))
    }

    pub(super) async fn send_user(
        &self,
        conn: &mut ConnectionManager,
        user: &str,
        from: Option<&str>,
        data: &Payload,
    ) -> Result<bool, ClusterUnavailable> {
        let meta = meta(from, data, None);
        let mut framed = format!("{} {meta}", meta.len()).into_bytes();
        framed.extend_from_slice(payload_bytes(data));
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(Channel::User(user.to_owned()).name())
            .arg(framed)
            .query_async(conn)
            .await
            .map_err(unavailable)?;
        Ok(receivers > 0)
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The room view, with `missed` only when every message after `since` (in its epoch) came.
fn parse_view(reply: &[Value], since: Option<(u64, String)>) -> Option<RoomView> {
    let seq = match reply.first()? {
        Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let epoch: Arc<str> = std::str::from_utf8(bytes_of(reply.get(1)?)?).ok()?.into();
    let mut entries = Vec::new();
    for triple in reply[2..].chunks(3) {
        let [s, m, d] = triple else { return None };
        let s: u64 = std::str::from_utf8(bytes_of(s)?).ok()?.parse().ok()?;
        entries.push(message(bytes_of(m)?, bytes_of(d)?, Some(s))?);
    }
    let missed = since.and_then(|(since, e)| {
        let consecutive = entries
            .iter()
            .zip(since + 1..)
            .all(|(m, expected)| m.seq == Some(expected));
        (e == *epoch && consecutive && since + entries.len() as u64 == seq).then_some(entries)
    });
    Some(RoomView { seq, epoch, missed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_and_strangers_are_ignored() {
        let room = Channel::Room(RoomName::new("lobby:1").unwrap()).name();
        assert_eq!(room, "gw:{room:lobby:1}");
        assert!(matches!(Channel::parse(&room), Some(Channel::Room(r)) if r.as_str() == "lobby:1"));
        assert!(matches!(Channel::parse("gw:{user:ann}"), Some(Channel::User(u)) if u == "ann"));
        assert!(Channel::parse("other").is_none());
        assert!(Channel::parse("gw:{room:bad name}").is_none());
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
            let mut r = vec![Value::Int(5), Value::BulkString(b"e1".to_vec())];
            for s in entries {
                r.extend(entry(*s));
            }
            r
        };
        let ok = parse_view(&reply(&[4, 5]), Some((3, "e1".into()))).unwrap();
        assert_eq!(ok.missed.map(|m| m.len()), Some(2));
        assert!(
            parse_view(&reply(&[5]), Some((3, "e1".into())))
                .unwrap()
                .missed
                .is_none(),
            "gap"
        );
        assert!(
            parse_view(&reply(&[4, 5]), Some((3, "e0".into())))
                .unwrap()
                .missed
                .is_none(),
            "epoch"
        );
        assert_eq!(
            parse_view(&reply(&[]), Some((5, "e1".into())))
                .unwrap()
                .missed
                .map(|m| m.len()),
            Some(0)
        );
        assert!(parse_view(&reply(&[]), None).unwrap().missed.is_none());
    }
}
