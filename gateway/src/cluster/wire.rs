//! What the cluster keeps in Redis and sends through it: key and channel names, the two
//! scripts (publish, room view), and the format of channel messages.
//!
//! A room message on its channel is `SEQ EPOCH LEN META DATA` (`- LEN META DATA` for a
//! volatile message), a direct message on a user's channel `LEN META DATA`, where META is a small
//! JSON object of LEN bytes (`f`: from, `b`: binary payload, `o`: origin session) and DATA
//! the payload bytes. History entries carry META and DATA under the stream id `0-SEQ`.

use std::sync::Arc;

use gateway_core::{
    auth::Identity,
    backplane::{ClusterMessage, ClusterPublish, RoomView},
    hub::{Delivery, Hub, UserDelivery},
    pattern::Pattern,
    policy::RoomPolicies,
    protocol::{CloseCode, CloseReason, MemberInfo, Payload, PresenceEvent, RoomName},
    session::SessionId,
};
use redis::{Script, Value};

use super::conn::Conn;
use serde::{Deserialize, Serialize};

/// A channel this node can hear.
#[derive(Debug, Clone)]
pub(super) enum Channel {
    Room(RoomName),
    User(String),
    /// Requests for every node (API disconnects).
    Control,
}

impl Channel {
    /// Its Redis name; the braces are the hash tag its keys share.
    pub(super) fn name(&self) -> String {
        match self {
            Channel::Room(room) => format!("gw:{{room:{}}}", room.as_str()),
            Channel::User(user) => format!("gw:{{user:{user}}}"),
            Channel::Control => "gw:control".to_owned(),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        if name == "gw:control" {
            return Some(Channel::Control);
        }
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
    /// A hash with the room's `seq` and `epoch`: one key, so they expire (or are evicted)
    /// together and a restarted sequence always has a new epoch.
    state: String,
    stream: String,
    members: String,
    users: String,
}

impl Keys {
    pub(super) fn room(room: &str) -> Self {
        Self {
            state: format!("gw:{{room:{room}}}:state"),
            stream: format!("gw:{{room:{room}}}:stream"),
            members: format!("gw:{{room:{room}}}:members"),
            users: format!("gw:{{room:{room}}}:users"),
        }
    }
}

/// The set of every node's id.
const NODES: &str = "gw:{nodes}";

/// A node's liveness key. A node's keys share its hash tag (one slot on a cluster).
fn node_key(node: &str) -> String {
    format!("gw:{{node:{node}}}")
}

/// The set of a node's room memberships, for the sweep after it died.
fn node_members_key(node: &str) -> String {
    format!("gw:{{node:{node}}}:members")
}

/// The set of users with sessions on a node, for the sweep after it died.
fn node_users_key(node: &str) -> String {
    format!("gw:{{node:{node}}}:users")
}

/// Whether `channel` is a room's or a user's (sharded on a cluster) rather than the
/// control channel (broadcast to every node).
pub(super) fn is_sharded(channel: &str) -> bool {
    channel.starts_with("gw:{")
}

/// A user's sessions per node (field: node id, value: its count), for the cluster-wide
/// per-user connection limit.
fn user_sessions_key(user: &str) -> String {
    format!("gw:{{user:{user}}}:sessions")
}

/// One membership as a node's set holds it: events flag, room, session, user.
fn membership(room: &RoomName, member: &MemberInfo, events: bool) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        u8::from(events),
        room.as_str(),
        member.session,
        member.user
    )
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

/// The sequence number of a room message on its channel (`None` for presence events and
/// volatile messages).
pub(super) fn message_seq(payload: &[u8]) -> Option<u64> {
    let space = payload.iter().position(|&b| b == b' ')?;
    std::str::from_utf8(&payload[..space]).ok()?.parse().ok()
}

/// Hands a channel message to the hub; anything malformed is ignored.
pub(super) fn deliver(hub: &Hub, channel: &str, payload: &[u8]) {
    match Channel::parse(channel) {
        Some(Channel::Room(room)) if payload.starts_with(b"P ") => {
            let text = String::from_utf8_lossy(&payload[2..]);
            if let Some((event, user)) = text.split_once(' ') {
                if let Some(event) = PresenceEvent::parse(event) {
                    hub.deliver(&room, Delivery::Presence { event, user });
                }
            }
        }
        Some(Channel::Room(room)) => {
            // `SEQ EPOCH LEN META DATA`, or `- LEN META DATA` for a volatile message.
            let Some(space) = payload.iter().position(|&b| b == b' ') else {
                return;
            };
            let rest = &payload[space + 1..];
            let Ok(seq) = std::str::from_utf8(&payload[..space]).map(|s| s.parse::<u64>().ok())
            else {
                return;
            };
            match seq {
                None => {
                    if let Some((meta, data)) = split_meta(rest) {
                        if let Some(m) = message(meta, data, None) {
                            hub.deliver(&room, Delivery::Volatile(&m));
                        }
                    }
                }
                Some(seq) => {
                    let Some(epoch_end) = rest.iter().position(|&b| b == b' ') else {
                        return;
                    };
                    let Ok(epoch) = std::str::from_utf8(&rest[..epoch_end]) else {
                        return;
                    };
                    if let Some((meta, data)) = split_meta(&rest[epoch_end + 1..]) {
                        if let Some(m) = message(meta, data, Some(seq)) {
                            hub.deliver(&room, Delivery::Message { message: &m, epoch });
                        }
                    }
                }
            }
        }
        Some(Channel::User(user)) => {
            let Some((meta, data)) = split_meta(payload) else {
                return;
            };
            if let Some(m) = message(meta, data, None) {
                hub.deliver_user(
                    &user,
                    UserDelivery::Direct {
                        from: m.from.as_deref(),
                        data: &m.data,
                    },
                );
            }
        }
        Some(Channel::Control) => {
            if let Ok(d) = serde_json::from_slice::<Disconnect>(payload) {
                let code = CloseCode::from_code(d.code).unwrap_or(CloseCode::PolicyViolation);
                hub.deliver_user(
                    &d.user,
                    UserDelivery::Disconnect(CloseReason::new(code, d.reason)),
                );
            }
        }
        None => {}
    }
}

/// A ticket's key.
fn ticket_key(ticket: &str) -> String {
    format!("gw:{{ticket:{ticket}}}")
}

/// An identity as a ticket keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct StoredIdentity {
    user: String,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    expires_at: Option<u64>,
}

fn patterns(p: &Option<Vec<Pattern>>) -> Option<Vec<String>> {
    p.as_ref()
        .map(|v| v.iter().map(|p| p.as_str().to_owned()).collect())
}

/// The identity a stored ticket holds.
pub(super) fn identity_of(stored: &str) -> Option<Identity> {
    let s: StoredIdentity = serde_json::from_str(stored).ok()?;
    let compile = |v: Option<Vec<String>>| v.map(|v| v.iter().map(|p| Pattern::new(p)).collect());
    Some(Identity {
        user: s.user.into(),
        rooms: compile(s.rooms),
        publish: compile(s.publish),
        expires_at: s.expires_at,
    })
}

/// What issuing a ticket needs.
pub(super) struct TicketRequest {
    ticket_key: String,
    count_key: String,
    identity: String,
    ttl_ms: u64,
    max_per_user: u32,
}

impl TicketRequest {
    pub(super) fn new(
        ticket: &str,
        identity: &Identity,
        ttl: std::time::Duration,
        max_per_user: u32,
    ) -> Self {
        let stored = StoredIdentity {
            user: identity.user.to_string(),
            rooms: patterns(&identity.rooms),
            publish: patterns(&identity.publish),
            expires_at: identity.expires_at,
        };
        Self {
            ticket_key: ticket_key(ticket),
            count_key: ticket_count_key(&identity.user),
            identity: serde_json::to_string(&stored).expect("plain struct"),
            ttl_ms: (ttl.as_millis() as u64).max(1),
            max_per_user,
        }
    }
}

/// Reserves one of a user's tickets (KEYS[1]: the user's count) unless the user issued
/// the most allowed (ARGV[2]) within one ticket lifetime (ARGV[1] ms). The ticket itself
/// is stored next, under its own key (another slot on a cluster).
const RESERVE_TICKET: &str = r#"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if n > tonumber(ARGV[2]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"#;

/// A redeemed ticket no longer counts towards its user's cap.
const UNCOUNT_TICKET: &str = r#"
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"#;

/// The key counting a user's unredeemed tickets.
fn ticket_count_key(user: &str) -> String {
    format!("gw:{{user:{user}}}:tickets")
}

/// An API disconnect for every node.
#[derive(Debug, Serialize, Deserialize)]
struct Disconnect {
    user: String,
    code: u16,
    reason: String,
}

/// The control-channel message that closes every session of `user`.
pub(super) fn disconnect(user: &str, reason: &CloseReason) -> String {
    serde_json::to_string(&Disconnect {
        user: user.to_owned(),
        code: reason.code.code(),
        reason: reason.reason.clone(),
    })
    .expect("plain struct")
}

/// The scripts, loaded once (EVALSHA, falling back to EVAL after a Redis restart), and
/// how this backplane publishes.
pub(super) struct Scripts {
    publish: Script,
    view: Script,
    enter: Script,
    exit: Script,
    sweep: Script,
    sweep_list: Script,
    reserve_ticket: Script,
    uncount_ticket: Script,
    count_user: Script,
    release_dead: Script,
    /// A Redis Cluster: sharded pub/sub, single-slot steps, rooms tied to their master.
    cluster: bool,
    /// Room policies (a room state's lifetime once its last member left).
    policies: RoomPolicies,
}

/// A session enters a room (KEYS: the room's members, users and state): listed, counted
/// per user, the room's state kept without expiry while it has members; the user's first session there cluster-wide is announced (ARGV[6]: `PUBLISH` or
/// `SPUBLISH`). Entering again changes nothing (a node re-announces its members after it
/// was swept). The node's own record of the membership is written before, apart (its keys
/// are in another slot on a cluster).
const ENTER: &str = r#"
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
-- A room with members keeps its sequence and epoch however long it is quiet.
redis.call('PERSIST', KEYS[3])
if added == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if n == 1 and ARGV[5] == '1' then
  redis.call(ARGV[6], ARGV[4], 'P join ' .. ARGV[3])
end
return n
"#;

/// A session leaves a room; the user's last session there cluster-wide is announced, and
/// with the last member gone the room's state expires after a history lifetime (ARGV[7]
/// ms). Also
/// what a sweep runs for each membership of a dead node on a cluster.
const EXIT: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
-- The last member gone: the room's state lives on for one history lifetime.
if redis.call('HLEN', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[3])
  if ARGV[5] == '1' then redis.call(ARGV[6], ARGV[4], 'P leave ' .. ARGV[3]) end
end
return 1
"#;

/// Sets this node's session count of a user (KEYS[1], field ARGV[1]) to ARGV[2] unless
/// that takes the user's count over all nodes past ARGV[3] (`-1`: no check). Setting
/// rather than incrementing makes a retry, or a re-announcement, exact. The node's set of
/// users is updated apart (another slot on a cluster).
const COUNT_USER: &str = r#"
local count, max = tonumber(ARGV[2]), tonumber(ARGV[3])
if max >= 0 then
  local total = count - tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
  if total > max then return 0 end
end
if count > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], count)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"#;

/// On one Redis: releases a user's session counts (KEYS[1]) held by nodes other than
/// ARGV[1] whose liveness key has expired, in one atomic step (a node that came back
/// between the check and the removal keeps its count). Returns how many were released.
const RELEASE_DEAD: &str = r#"
local released = 0
for _, other in ipairs(redis.call('HKEYS', KEYS[1])) do
  if other ~= ARGV[1] and redis.call('EXISTS', 'gw:{node:' .. other .. '}') == 0 then
    released = released + redis.call('HDEL', KEYS[1], other)
  end
end
return released
"#;

/// On one Redis: removes every membership and session count of a node (dead, or
/// restarting under the same id) atomically, with the `leave` events its users' last
/// sessions call for. A node whose liveness key (KEYS[3]) is back is not dead: it is left
/// alone. (On a cluster the same work is done step by step: [`Scripts::sweep`].)
const SWEEP: &str = r#"
if ARGV[2] == 'dead' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
for _, user in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('HDEL', 'gw:{user:' .. user .. '}:sessions', ARGV[1])
end
redis.call('DEL', KEYS[4])
local entries = redis.call('SMEMBERS', KEYS[1])
for _, e in ipairs(entries) do
  local events, room, session, user = string.match(e, '^(.-)\n(.-)\n(.-)\n(.*)$')
  if room then
    local prefix = 'gw:{room:' .. room .. '}'
    if redis.call('HDEL', prefix .. ':members', session) == 1 then
      if redis.call('HLEN', prefix .. ':members') == 0 then
        redis.call('PEXPIRE', prefix .. ':state', ARGV[3])
      end
      local n = redis.call('HINCRBY', prefix .. ':users', user, -1)
      if n <= 0 then
        redis.call('HDEL', prefix .. ':users', user)
        if events == '1' then redis.call('PUBLISH', prefix, 'P leave ' .. user) end
      end
    end
  end
end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= 'keep' then redis.call('SREM', KEYS[2], ARGV[1]) end
return #entries
"#;

/// On a cluster, the first step of a sweep (KEYS: the node's liveness, memberships and
/// users): `-1` when the node is alive again (ARGV[1] = `dead`), else what it held.
const SWEEP_LIST: &str = r#"
if ARGV[1] == 'dead' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
return {redis.call('SMEMBERS', KEYS[2]), redis.call('SMEMBERS', KEYS[3])}
"#;

/// On a cluster (the last argument `1`), a room's state remembers which master it was written on
/// (`rid`, the master's replication id): after a failover or a move of its slot the
/// promoted replica or new master has another id, and whatever it holds of the room may
/// lack the last writes, so the room starts over in a new epoch (clients then get
/// `recovered: false`, never a silent gap). KEYS[1]: state, KEYS[2]: stream.
const SAME_MASTER: &str = r#"
if ARGV[#ARGV] == '1' then
  local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
  local had = redis.call('HGET', KEYS[1], 'rid')
  if had ~= rid then
    if had then redis.call('DEL', KEYS[1], KEYS[2]) end
    redis.call('HSET', KEYS[1], 'rid', rid)
  end
end
"#;

/// Whether the room's state (KEYS[1]) is new, checked before anything else: a new room may
/// be created only when the next-to-last argument is `1` (the node's room budget allows
/// it, or the room keeps no history); otherwise the script returns `{-1}` and keeps
/// nothing. `created` tells the caller the room was created, for the node's accounting.
const BUDGET: &str = r#"
local fresh = redis.call('EXISTS', KEYS[1]) == 0
if fresh and ARGV[#ARGV - 1] ~= '1' then return {-1} end
local created = fresh and 1 or 0
"#;

/// One atomic step per publish: the next sequence number (a new epoch when the sequence
/// restarts), the history entry, the expiry of the room's keys, and the channel message.
const PUBLISH: &str = r#"
local history, ttl, volatile = tonumber(ARGV[2]), ARGV[3], ARGV[6]
local framed = #ARGV[4] .. ' ' .. ARGV[4] .. ARGV[5]
if volatile == '1' then
  redis.call(ARGV[8], ARGV[1], '- ' .. framed)
  return {0, 0}
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if seq == 1 then
  -- The sequence (re)starts: nothing older may stay in the stream. The epoch is the one a
  -- joining member already saw (the view creates it), or a new one when the state was lost.
  redis.call('DEL', KEYS[2])
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[7])
if history > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', history, '0-' .. seq, 'm', ARGV[4], 'd', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call(ARGV[8], ARGV[1], seq .. ' ' .. redis.call('HGET', KEYS[1], 'epoch') .. ' ' .. framed)
return {seq, created}
"#;

/// A room as a joining member sees it: its sequence number and epoch (created if the room
/// has none), its members, whether it was created, and with `since` the kept entries
/// after it, flattened as seq, meta, data.
const VIEW: &str = r#"
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local out = {seq, redis.call('HGET', KEYS[1], 'epoch'), redis.call('HLEN', KEYS[3]), created}
local since = tonumber(ARGV[3])
if since >= 0 and since < seq then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '0-' .. (since + 1), '+')) do
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

/// What a publish did.
#[derive(Debug, Clone, Copy)]
pub(super) struct Published {
    /// Its sequence number (`None` when volatile).
    pub(super) seq: Option<u64>,
    /// Whether it created the room's state.
    pub(super) created: bool,
}

/// Why a command failed. Its text is for the log only: clients get a
/// [`ClusterUnavailable`](gateway_core::backplane::ClusterUnavailable) without internals.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
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
    /// The room has no state and the room budget allows no new one.
    #[error("room budget exhausted")]
    RoomBudget,
}

impl CommandError {
    /// Whether Redis gave no answer (a timeout, a broken or refused connection), rather
    /// than an answer: what the circuit breaker counts.
    pub(super) fn unanswered(&self) -> bool {
        match self {
            CommandError::Redis(e) => {
                e.is_timeout()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::ClusterConnectionNotFound | redis::ErrorKind::ClusterDown
                    )
            }
            CommandError::NoConnection | CommandError::NoSubscription => true,
            CommandError::Reply(_) | CommandError::RoomBudget => false,
        }
    }
}

impl Scripts {
    /// The scripts for one Redis, or for a Redis Cluster (`cluster`).
    pub(super) fn new(cluster: bool, policies: RoomPolicies) -> Self {
        Self {
            publish: Script::new(&format!("{BUDGET}{SAME_MASTER}{PUBLISH}")),
            view: Script::new(&format!("{BUDGET}{SAME_MASTER}{VIEW}")),
            enter: Script::new(ENTER),
            exit: Script::new(EXIT),
            sweep: Script::new(SWEEP),
            sweep_list: Script::new(SWEEP_LIST),
            reserve_ticket: Script::new(RESERVE_TICKET),
            uncount_ticket: Script::new(UNCOUNT_TICKET),
            count_user: Script::new(COUNT_USER),
            release_dead: Script::new(RELEASE_DEAD),
            cluster,
            policies,
        }
    }

    /// The command that publishes on room and user channels.
    fn publish_command(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The last argument of the publish and view scripts (see [`SAME_MASTER`]).
    fn same_master_flag(&self) -> &'static str {
        if self.cluster {
            "1"
        } else {
            "0"
        }
    }

    /// A ticket's stored identity; with `redeem`, consumed (`GETDEL`, once on any node)
    /// and no longer counted towards its user's cap.
    pub(super) async fn ticket(
        &self,
        conn: &mut Conn,
        ticket: &str,
        redeem: bool,
    ) -> Result<Option<String>, CommandError> {
        let stored: Option<String> = redis::cmd(if redeem { "GETDEL" } else { "GET" })
            .arg(ticket_key(ticket))
            .query_async(conn)
            .await?;
        let redeemed_by = stored
            .as_deref()
            .filter(|_| redeem)
            .and_then(|s| serde_json::from_str::<StoredIdentity>(s).ok());
        if let Some(identity) = redeemed_by {
            // Best effort: the ticket is redeemed whether or not this succeeds.
            let _ = self
                .uncount_ticket
                .key(ticket_count_key(&identity.user))
                .invoke_async::<i64>(conn)
                .await;
        }
        Ok(stored)
    }

    /// Sets this node's session count of `user` (see [`COUNT_USER`]); with `max`, only
    /// when the user's count over all nodes stays within it. `false`: refused.
    pub(super) async fn count_user(
        &self,
        conn: &mut Conn,
        node: &str,
        user: &str,
        count: u32,
        max: Option<usize>,
    ) -> Result<bool, CommandError> {
        let set: i64 = self
            .count_user
            .key(user_sessions_key(user))
            .arg(node)
            .arg(count)
            .arg(max.map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX)))
            .invoke_async(conn)
            .await?;
        if set == 1 {
            // The node's record, for the sweep after it died.
            if count > 0 {
                redis::cmd("SADD")
                    .arg(node_users_key(node))
                    .arg(user)
                    .exec_async(conn)
                    .await?;
                self.register(conn, node).await?;
            } else {
                redis::cmd("SREM")
                    .arg(node_users_key(node))
                    .arg(user)
                    .exec_async(conn)
                    .await?;
            }
        }
        Ok(set == 1)
    }

    /// Releases the session counts of `user` held by nodes whose liveness expired (dead,
    /// or cut off from Redis for three heartbeats: such a node counts its users again
    /// when it is back), without waiting for the next sweep. Returns how many were
    /// released. Each step is its own command (the keys are in different slots on a
    /// cluster); a node that beats again in between is counted again by itself.
    pub(super) async fn release_dead_counts(
        &self,
        conn: &mut Conn,
        node: &str,
        user: &str,
    ) -> Result<usize, CommandError> {
        if !self.cluster {
            let released: i64 = self
                .release_dead
                .key(user_sessions_key(user))
                .arg(node)
                .invoke_async(conn)
                .await?;
            return Ok(released.max(0) as usize);
        }
        // On a cluster the user's and the nodes' keys are in different slots: separate
        // steps, so a node that comes back between its check and the removal can still
        // lose its count there (not atomic).
        let holders: Vec<String> = redis::cmd("HKEYS")
            .arg(user_sessions_key(user))
            .query_async(conn)
            .await?;
        let mut released = 0;
        for other in holders.iter().filter(|n| n.as_str() != node) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(node_key(other))
                .query_async(conn)
                .await?;
            if !alive {
                let n: i64 = redis::cmd("HDEL")
                    .arg(user_sessions_key(user))
                    .arg(other)
                    .query_async(conn)
                    .await?;
                released += n as usize;
            }
        }
        Ok(released)
    }

    /// Stores a ticket (see [`ISSUE_TICKET`]); `false` when the user is at the limit.
    pub(super) async fn issue_ticket(
        &self,
        conn: &mut Conn,
        request: &TicketRequest,
    ) -> Result<bool, CommandError> {
        let reserved: i64 = self
            .reserve_ticket
            .key(&request.count_key)
            .arg(request.ttl_ms)
            .arg(request.max_per_user)
            .invoke_async(conn)
            .await?;
        if reserved != 1 {
            return Ok(false);
        }
        let stored = redis::cmd("SET")
            .arg(&request.ticket_key)
            .arg(&request.identity)
            .arg("PX")
            .arg(request.ttl_ms)
            .exec_async(conn)
            .await;
        if let Err(e) = stored {
            // Best effort: give the reservation back.
            let _ = self
                .uncount_ticket
                .key(&request.count_key)
                .invoke_async::<i64>(conn)
                .await;
            return Err(e.into());
        }
        Ok(true)
    }

    /// Puts `node` in the registry the sweep reads (a node with members or sessions is
    /// always in it).
    async fn register(&self, conn: &mut Conn, node: &str) -> Result<(), CommandError> {
        redis::cmd("SADD")
            .arg(NODES)
            .arg(node)
            .exec_async(conn)
            .await
            .map_err(CommandError::from)
    }

    /// Lists a session in a room (see [`ENTER`]): first in its node's record, so a sweep
    /// after the node died finds every membership it may have left.
    pub(super) async fn enter(
        &self,
        conn: &mut Conn,
        node: &str,
        room: &RoomName,
        member: &MemberInfo,
        events: bool,
    ) -> Result<(), CommandError> {
        redis::cmd("SADD")
            .arg(node_members_key(node))
            .arg(membership(room, member, events))
            .exec_async(conn)
            .await?;
        self.register(conn, node).await?;
        self.room_membership(&self.enter, conn, room, member, events)
            .await
    }

    /// Removes a session from a room (see [`EXIT`]), then from its node's record.
    pub(super) async fn exit(
        &self,
        conn: &mut Conn,
        node: &str,
        room: &RoomName,
        member: &MemberInfo,
        events: bool,
    ) -> Result<(), CommandError> {
        self.room_membership(&self.exit, conn, room, member, events)
            .await?;
        redis::cmd("SREM")
            .arg(node_members_key(node))
            .arg(membership(room, member, events))
            .exec_async(conn)
            .await
            .map_err(CommandError::from)
    }

    /// Runs [`ENTER`] or [`EXIT`] (the same keys and arguments) on the room's slot.
    async fn room_membership(
        &self,
        script: &Script,
        conn: &mut Conn,
        room: &RoomName,
        member: &MemberInfo,
        events: bool,
    ) -> Result<(), CommandError> {
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
            .arg(if events { "1" } else { "0" })
            .arg(self.publish_command())
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// The members of a room on every node.
    pub(super) async fn members(
        &self,
        conn: &mut Conn,
        room: &RoomName,
    ) -> Result<Vec<MemberInfo>, CommandError> {
        let infos: Vec<String> = redis::cmd("HVALS")
            .arg(Keys::room(room.as_str()).members)
            .query_async(conn)
            .await?;
        Ok(infos
            .iter()
            .filter_map(|i| serde_json::from_str(i).ok())
            .collect())
    }

    /// Refreshes this node's liveness (for three heartbeats) and sweeps the memberships
    /// of nodes whose liveness expired. Returns whether this node's own liveness had
    /// expired (it may have been swept: its members must be announced again).
    pub(super) async fn heartbeat(
        &self,
        conn: &mut Conn,
        node: &str,
        heartbeat: std::time::Duration,
    ) -> Result<bool, CommandError> {
        let ttl = (heartbeat.as_millis() as u64 * 3).max(1);
        let previous: Option<String> = redis::cmd("SET")
            .arg(node_key(node))
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .arg("GET")
            .query_async(conn)
            .await?;
        self.register(conn, node).await?;
        let nodes: Vec<String> = redis::cmd("SMEMBERS").arg(NODES).query_async(conn).await?;
        for other in nodes.iter().filter(|n| n.as_str() != node) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(node_key(other))
                .query_async(conn)
                .await?;
            if !alive {
                self.sweep(conn, other, true).await?;
            }
        }
        Ok(previous.is_none())
    }

    /// Removes every membership and session count of `node` (see [`SWEEP`]); a dead
    /// node also leaves the registry, a node sweeping its own earlier life stays in it.
    /// `-1`: the node is alive again and was left alone.
    pub(super) async fn sweep(
        &self,
        conn: &mut Conn,
        node: &str,
        dead: bool,
    ) -> Result<i64, CommandError> {
        if self.cluster {
            return self.sweep_in_steps(conn, node, dead).await;
        }
        self.sweep
            .key(node_members_key(node))
            .key(NODES)
            .key(node_key(node))
            .key(node_users_key(node))
            .arg(node)
            .arg(if dead { "dead" } else { "keep" })
            .arg(self.longest_history_ttl_ms())
            .invoke_async(conn)
            .await
            .map_err(CommandError::from)
    }

    /// The longest history lifetime of any room policy, for rooms a sweep leaves empty.
    fn longest_history_ttl_ms(&self) -> u64 {
        self.policies
            .0
            .iter()
            .map(|p| p.history_ttl)
            .max()
            .unwrap_or(gateway_core::policy::RoomPolicy::fallback().history_ttl)
            .as_millis()
            .max(1) as u64
    }

    /// The sweep on a cluster, where a node's, its users' and its rooms' keys are in
    /// different slots: list what the node held (unless it is alive again), remove its
    /// session counts, leave each room (with the `leave` events, as [`EXIT`] does), then
    /// drop its record. Each step can be repeated: a sweep cut short is finished by the
    /// next heartbeat's.
    async fn sweep_in_steps(
        &self,
        conn: &mut Conn,
        node: &str,
        dead: bool,
    ) -> Result<i64, CommandError> {
        let listed: Value = self
            .sweep_list
            .key(node_key(node))
            .key(node_members_key(node))
            .key(node_users_key(node))
            .arg(if dead { "dead" } else { "keep" })
            .invoke_async(conn)
            .await?;
        let (entries, users): (Vec<String>, Vec<String>) = match listed {
            Value::Int(-1) => return Ok(-1),
            other => redis::from_redis_value(&other)?,
        };
        for user in &users {
            redis::cmd("HDEL")
                .arg(user_sessions_key(user))
                .arg(node)
                .exec_async(conn)
                .await?;
        }
        for entry in &entries {
            let mut parts = entry.splitn(4, '\n');
            let (Some(events), Some(room), Some(session), Some(user)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(room) = RoomName::new(room) else {
                continue;
            };
            let member = MemberInfo {
                user: user.to_owned(),
                session: session.to_owned(),
                transport: String::new(),
                node: Some(node.to_owned()),
            };
            self.room_membership(&self.exit, conn, &room, &member, events == "1")
                .await?;
        }
        let mut done = redis::pipe();
        done.cmd("DEL").arg(node_members_key(node)).ignore();
        done.cmd("DEL").arg(node_users_key(node)).ignore();
        done.exec_async(conn).await?;
        if dead {
            redis::cmd("SREM")
                .arg(NODES)
                .arg(node)
                .exec_async(conn)
                .await?;
        }
        Ok(entries.len() as i64)
    }

    /// Publishes `message` (see [`PUBLISH`]); a new room is created only when
    /// `may_create` (else [`CommandError::RoomBudget`], and nothing is kept or sent).
    pub(super) async fn publish(
        &self,
        conn: &mut Conn,
        message: &ClusterPublish,
        policies: &RoomPolicies,
        may_create: bool,
    ) -> Result<Published, CommandError> {
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
            .arg(policy.history_ttl.as_millis().max(1) as u64)
            .arg(meta)
            .arg(payload_bytes(&message.data))
            .arg(if message.volatile { "1" } else { "0" })
            .arg(new_epoch())
            .arg(self.publish_command())
            // A volatile message neither reads nor creates the room's state.
            .arg(if message.volatile || may_create {
                "1"
            } else {
                "0"
            })
            .arg(if message.volatile {
                "0"
            } else {
                self.same_master_flag()
            })
            .invoke_async(conn)
            .await?;
        match reply[..] {
            [-1, ..] => Err(CommandError::RoomBudget),
            [seq, created] => Ok(Published {
                seq: (!message.volatile).then_some(seq.max(0) as u64),
                created: created == 1,
            }),
            _ => Err(CommandError::Reply("a publish")),
        }
    }

    /// The room as a joining member sees it (see [`VIEW`]), and whether this created it;
    /// a new room is created only when `may_create` (else [`CommandError::RoomBudget`]).
    pub(super) async fn view(
        &self,
        conn: &mut Conn,
        room: &RoomName,
        since: Option<(u64, String)>,
        policies: &RoomPolicies,
        may_create: bool,
    ) -> Result<(RoomView, bool), CommandError> {
        let policy = policies.for_room(room.as_str());
        let keys = Keys::room(room.as_str());
        let reply: Vec<Value> = self
            .view
            .key(&keys.state)
            .key(&keys.stream)
            .key(&keys.members)
            .arg(new_epoch())
            .arg(policy.history_ttl.as_millis().max(1) as u64)
            .arg(
                since
                    .as_ref()
                    .map_or(-1, |(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)),
            )
            .arg(if may_create { "1" } else { "0" })
            .arg(self.same_master_flag())
            .invoke_async(conn)
            .await?;
        if matches!(reply.first(), Some(Value::Int(-1))) {
            return Err(CommandError::RoomBudget);
        }
        parse_view(&reply, since).ok_or(CommandError::Reply("the room view"))
    }

    pub(super) async fn send_user(
        &self,
        conn: &mut Conn,
        user: &str,
        from: Option<&str>,
        data: &Payload,
    ) -> Result<bool, CommandError> {
        let meta = meta(from, data, None);
        let mut framed = format!("{} {meta}", meta.len()).into_bytes();
        framed.extend_from_slice(payload_bytes(data));
        let receivers: i64 = redis::cmd(self.publish_command())
            .arg(Channel::User(user.to_owned()).name())
            .arg(framed)
            .query_async(conn)
            .await?;
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

/// The room view, with `missed` only when every message after `since` (in its epoch)
/// came, and whether the view created the room.
fn parse_view(reply: &[Value], since: Option<(u64, String)>) -> Option<(RoomView, bool)> {
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
        entries.push(message(bytes_of(m)?, bytes_of(d)?, Some(s))?);
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
        assert!(
            parse_view(&reply(&[5]), Some((3, "e1".into())))
                .unwrap()
                .0
                .missed
                .is_none(),
            "gap"
        );
        assert!(
            parse_view(&reply(&[4, 5]), Some((3, "e0".into())))
                .unwrap()
                .0
                .missed
                .is_none(),
            "epoch"
        );
        assert_eq!(
            parse_view(&reply(&[]), Some((5, "e1".into())))
                .unwrap()
                .0
                .missed
                .map(|m| m.len()),
            Some(0)
        );
        assert!(parse_view(&reply(&[]), None).unwrap().0.missed.is_none());
        // A `since` at the top of u64 is ahead of the room, not an overflow.
        assert!(parse_view(&reply(&[]), Some((u64::MAX, "e1".into())))
            .unwrap()
            .0
            .missed
            .is_none());
    }
}
