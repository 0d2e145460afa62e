//! The connections of the backplane, to one Redis or to a Redis Cluster.
//!
//! Commands go through one [`Conn`] that either kind answers the same way, scripts routed
//! by their first key's slot. The subscriber has its [`Subscriber`]: classic pub/sub on one
//! Redis; sharded pub/sub for room and user channels on a cluster, so a message travels
//! only within its shard.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{
    aio::{ConnectionLike, ConnectionManager, PubSubSink, PubSubStream},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    Cmd, Pipeline, PushInfo, RedisFuture, Value,
};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::config::RedisTarget;

/// Longest a command may wait for Redis before its operation fails as unavailable.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the backplane's Redis is.
#[derive(Clone)]
pub(super) enum Target {
    /// One Redis.
    Single(redis::Client),
    /// A Redis Cluster, by its seed nodes.
    Cluster(Vec<String>),
}

impl Target {
    /// The target the configuration names.
    pub(super) fn new(config: &RedisTarget) -> Result<Self, redis::RedisError> {
        Ok(match config {
            RedisTarget::Single(url) => Target::Single(redis::Client::open(url.as_str())?),
            RedisTarget::Cluster(seeds) => {
                // Checked now, so a bad seed fails at start like a bad single URL.
                cluster_client(seeds, None)?;
                Target::Cluster(seeds.clone())
            }
        })
    }

    /// Whether room and user channels use sharded pub/sub (`SPUBLISH`): on a cluster.
    pub(super) fn sharded(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// A new pub/sub connection: its subscribing half and what it hears.
    pub(super) async fn subscriber(&self) -> redis::RedisResult<(Subscriber, Pushes)> {
        match self {
            Target::Single(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((Subscriber::Single(sink), Pushes::Single(stream)))
            }
            Target::Cluster(seeds) => {
                let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
                let connection = cluster_client(seeds, Some(tx))?
                    .get_async_connection()
                    .await?;
                let asked = Arc::new(Asked::default());
                Ok((
                    Subscriber::Cluster(connection, asked.clone()),
                    Pushes::Cluster(rx, asked),
                ))
            }
        }
    }

    /// A command connection that fails fast while Redis is unreachable.
    ///
    /// The libraries' defaults retry for minutes and would hold every queued operation.
    pub(super) async fn command_connection(&self) -> Option<Conn> {
        let connect = async {
            match self {
                Target::Single(client) => {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(COMMAND_TIMEOUT)
                        .set_response_timeout(COMMAND_TIMEOUT)
                        .set_number_of_retries(1)
                        .set_max_delay(500);
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .ok()
                        .map(Conn::Single)
                }
                Target::Cluster(seeds) => {
                    let client = cluster_client(seeds, None).ok()?;
                    let conn = client.get_async_connection().await.ok()?;
                    Some(Conn::Cluster(Box::new(ClusterConn {
                        client,
                        conn: Arc::new(Mutex::new(conn)),
                    })))
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, connect)
            .await
            .ok()
            .flatten()
    }
}

/// A client of the cluster at `seeds` that gives up quickly.
///
/// A failover is followed by the library's own retries within that budget. With `push`, it
/// is on RESP3 with pushes (pub/sub messages and disconnections) sent there.
pub(super) fn cluster_client(
    seeds: &[String],
    push: Option<tokio::sync::mpsc::UnboundedSender<PushInfo>>,
) -> Result<ClusterClient, redis::RedisError> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(COMMAND_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
        .retries(3)
        .min_retry_wait(100)
        .max_retry_wait(1000);
    if let Some(push) = push {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push);
    }
    builder.build()
}

/// A command connection to either kind of Redis (multiplexed: clones share it).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis, reconnecting.
    Single(ConnectionManager),
    /// A Redis Cluster: commands go to their slot's master, following MOVED and ASK.
    Cluster(Box<ClusterConn>),
}

/// A cluster connection that starts afresh after a connection failure.
///
/// The library's connection can keep failing on its stale view of the cluster after a
/// failover ("no connections found"), so the command that failed fails, and the next one
/// goes through a new connection that discovered the topology again. Clones share the
/// connection they use (the pool's slot and the lanes' clones of it): the fresh one
/// replaces it for all of them, not only for the clone whose command failed.
#[derive(Clone)]
pub(super) struct ClusterConn {
    client: ClusterClient,
    conn: Arc<Mutex<ClusterConnection>>,
}

impl ClusterConn {
    /// The connection in use now (a clone: multiplexed, it shares the library's task).
    fn current(&self) -> ClusterConnection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn after<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result {
            if is_connection_failure(e) {
                if let Ok(Ok(fresh)) =
                    tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection()).await
                {
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                }
            }
        }
        result
    }
}

/// Whether the command failed because writing it failed, so it is safe to send again.
///
/// A broken pipe means the connection broke while idle (say Redis restarted): Redis never
/// got the command, so it is safe to send again once, whatever it does (the connection
/// manager reconnects meanwhile).
fn never_sent(e: &redis::RedisError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Whether `e` says the connection is broken, rather than the command.
///
/// The connection here includes the cluster's view of it.
fn is_connection_failure(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
        )
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => Box::pin(async move {
                match c.req_packed_command(cmd).await {
                    // Its connection broke while idle (Redis restarted): it reconnects.
                    Err(e) if never_sent(&e) => c.req_packed_command(cmd).await,
                    other => other,
                }
            }),
            Conn::Cluster(c) => Box::pin(async move {
                let result = c.current().req_packed_command(cmd).await;
                c.after(result).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => Box::pin(async move {
                match c.req_packed_commands(cmd, offset, count).await {
                    Err(e) if never_sent(&e) => c.req_packed_commands(cmd, offset, count).await,
                    other => other,
                }
            }),
            Conn::Cluster(c) => Box::pin(async move {
                let result = c.current().req_packed_commands(cmd, offset, count).await;
                c.after(result).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.current().get_db(),
        }
    }
}

/// The subscribing half of the pub/sub connection.
pub(super) enum Subscriber {
    /// Classic pub/sub on one Redis.
    Single(PubSubSink),
    /// On a cluster: sharded subscriptions for room and user channels, classic for control.
    ///
    /// Each sharded subscription is on its slot's master; the control channel is broadcast
    /// to every node. The confirmations asked for are counted in [`Asked`].
    Cluster(ClusterConnection, Arc<Asked>),
}

impl Subscriber {
    /// Subscribes to `channel`; returns once Redis confirmed it.
    pub(super) async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Subscriber::Single(sink) => sink.subscribe(channel).await,
            Subscriber::Cluster(c, asked) => {
                // Counted before it is sent: its confirmation may be read before it returns.
                let confirmation = asked.expect(channel);
                if super::channel::is_sharded(channel) {
                    c.ssubscribe(channel).await?;
                } else {
                    c.subscribe(channel).await?;
                }
                confirmation.confirmed();
                Ok(())
            }
        }
    }

    /// Unsubscribes from `channel`.
    pub(super) async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Subscriber::Single(sink) => sink.unsubscribe(channel).await,
            Subscriber::Cluster(c, _) if super::channel::is_sharded(channel) => {
                c.sunsubscribe(channel).await
            }
            Subscriber::Cluster(c, _) => c.unsubscribe(channel).await,
        }
    }
}

/// What the pub/sub connection hears.
pub(super) enum Pushes {
    /// Messages of classic pub/sub on one Redis; the stream ends when the connection does.
    Single(PubSubStream),
    /// The pushes of a cluster connection (messages, (un)subscriptions, disconnections),
    /// and the subscription confirmations the gateway asked for.
    Cluster(mpsc::UnboundedReceiver<PushInfo>, Arc<Asked>),
}

/// The subscription confirmations asked for on a cluster connection and not heard yet.
///
/// The cluster client subscribes again by itself, every channel it was asked to, whenever
/// it re-read the topology or reconnected (a failover, a slot move). It may have replaced
/// node connections then, which drops what they had subscribed, and it reports no failure
/// of its own resubscription (say to a master that is down): the subscription can be gone
/// with nothing else said. Its confirmations are the one sign of it: one nobody asked for
/// ([`Push::Resubscribed`]) means the subscriber starts over on a new connection.
#[derive(Default)]
pub(super) struct Asked(Mutex<HashMap<String, u32>>);

impl Asked {
    /// One more confirmation of `channel` is expected; until
    /// [`confirmed`](Confirmation::confirmed), dropping the answer takes it back.
    fn expect<'a>(&'a self, channel: &'a str) -> Confirmation<'a> {
        let mut asked = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *asked.entry(channel.to_owned()).or_default() += 1;
        Confirmation {
            asked: self,
            channel,
            confirmed: false,
        }
    }

    /// Takes a confirmation of `channel`; whether one was expected.
    fn heard(&self, channel: &str) -> bool {
        let mut asked = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(count) = asked.get_mut(channel) else {
            return false;
        };
        *count -= 1;
        if *count == 0 {
            asked.remove(channel);
        }
        true
    }
}

/// A subscription asked for on a cluster connection, while it waits for Redis.
///
/// Failed or given up (a timeout), no confirmation is expected any more (should a late one
/// come, the connection starts over: conservative).
struct Confirmation<'a> {
    asked: &'a Asked,
    channel: &'a str,
    confirmed: bool,
}

impl Confirmation<'_> {
    /// Redis confirmed it (its push is heard, or was).
    fn confirmed(mut self) {
        self.confirmed = true;
    }
}

impl Drop for Confirmation<'_> {
    fn drop(&mut self) {
        if !self.confirmed {
            self.asked.heard(self.channel);
        }
    }
}

/// One thing the pub/sub connection heard.
pub(super) enum Push {
    /// A message on a channel.
    Message(String, bytes::Bytes),
    /// Redis unsubscribed a channel (its slot moved).
    Unsubscribed(String),
    /// The cluster client subscribed a channel by itself (see [`Asked`]).
    Resubscribed(String),
    /// The connection, or one of a cluster's node connections, is lost.
    Lost,
}

impl Pushes {
    /// The next thing heard ([`Push::Lost`] once the connection is gone).
    pub(super) async fn next(&mut self) -> Push {
        loop {
            let push = match self {
                Pushes::Single(stream) => match stream.next().await {
                    Some(m) => Some(Push::Message(
                        m.get_channel_name().to_owned(),
                        bytes::Bytes::copy_from_slice(m.get_payload_bytes()),
                    )),
                    None => return Push::Lost,
                },
                Pushes::Cluster(rx, asked) => match rx.recv().await {
                    Some(push) => cluster_push(push, asked),
                    None => return Push::Lost,
                },
            };
            if let Some(push) = push {
                return push;
            }
        }
    }
}

/// What a cluster connection's push says, if it says anything the subscriber acts on.
///
/// A subscription's confirmation says nothing unless nobody asked for it (see [`Asked`]).
fn cluster_push(push: PushInfo, asked: &Asked) -> Option<Push> {
    let text = |v: Option<&Value>| v.and_then(|v| redis::from_redis_value::<String>(v).ok());
    match push.kind {
        redis::PushKind::Message | redis::PushKind::SMessage => {
            let channel = text(push.data.first())?;
            let payload = redis::from_redis_value::<Vec<u8>>(push.data.get(1)?).ok()?;
            Some(Push::Message(channel, payload.into()))
        }
        // A node's connection dropped (a failover, a restart): the subscriber starts a new
        // connection that learns the topology afresh (resubscribing on the old connection
        // can keep failing on its stale view of the cluster).
        redis::PushKind::Disconnection => Some(Push::Lost),
        redis::PushKind::SUnsubscribe => text(push.data.first()).map(Push::Unsubscribed),
        redis::PushKind::Subscribe | redis::PushKind::SSubscribe => {
            let channel = text(push.data.first())?;
            (!asked.heard(&channel)).then_some(Push::Resubscribed(channel))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::PushKind;

    /// A subscription's confirmation push, as Redis sends it.
    fn confirmation(kind: PushKind, channel: &str) -> PushInfo {
        PushInfo {
            kind,
            data: vec![Value::BulkString(channel.into()), Value::Int(1)],
        }
    }

    fn resubscribed(push: Option<Push>) -> Option<String> {
        match push {
            Some(Push::Resubscribed(channel)) => Some(channel),
            _ => None,
        }
    }

    #[test]
    fn a_confirmation_nobody_asked_for_says_the_cluster_client_subscribed_by_itself() {
        let asked = Asked::default();
        let (room, control) = ("gw:{room:r}", "gw:control");
        asked.expect(room).confirmed();
        let heard = |kind, channel| cluster_push(confirmation(kind, channel), &asked);
        assert!(heard(PushKind::SSubscribe, room).is_none(), "asked for");
        assert_eq!(
            resubscribed(heard(PushKind::SSubscribe, room)).as_deref(),
            Some(room),
            "asked for once, confirmed twice"
        );
        assert_eq!(
            resubscribed(heard(PushKind::Subscribe, control)).as_deref(),
            Some(control)
        );

        // Failed or given up: no confirmation is expected any more.
        drop(asked.expect(control));
        assert!(resubscribed(heard(PushKind::Subscribe, control)).is_some());

        // Its confirmation read before the subscribing returned.
        let pending = asked.expect(control);
        assert!(heard(PushKind::Subscribe, control).is_none());
        pending.confirmed();
        assert!(asked.0.lock().unwrap().is_empty());

        // Unsubscriptions and messages are not confirmations.
        assert!(matches!(
            heard(PushKind::SUnsubscribe, room),
            Some(Push::Unsubscribed(c)) if c == room
        ));
        assert!(matches!(
            heard(PushKind::Disconnection, room),
            Some(Push::Lost)
        ));
    }
}
