//! A node's scripts: its registry entry, its liveness, and the sweep.
//!
//! The sweep removes what a dead node (or this node's earlier life) left listed.

use gateway_core::protocol::MemberInfo;
use redis::Value;

use super::Scripts;
use crate::cluster::{
    channel::{
        node_key, node_members_key, node_users_key, parse_membership, user_sessions_key, NODES,
    },
    conn::Conn,
    error::ClusterError,
};

/// The reply of `sweep_list.lua`.
#[derive(Debug, PartialEq, Eq)]
enum Listed {
    /// The node is alive again: it is left alone.
    Alive,
    /// What it held: its memberships and its users.
    Held {
        entries: Vec<String>,
        users: Vec<String>,
    },
}

impl Listed {
    fn parse(reply: &Value) -> Result<Self, ClusterError> {
        if let Value::Int(-1) = reply {
            return Ok(Listed::Alive);
        }
        let (entries, users) = redis::from_redis_value(reply)?;
        Ok(Listed::Held { entries, users })
    }
}

/// Whether `node`'s liveness key is there.
pub(super) async fn alive(conn: &mut Conn, node: &str) -> Result<bool, ClusterError> {
    let alive: bool = redis::cmd("EXISTS")
        .arg(node_key(node))
        .query_async(conn)
        .await?;
    Ok(alive)
}

/// A sweep's mode argument.
fn mode(dead: bool) -> &'static str {
    if dead {
        "dead"
    } else {
        "keep"
    }
}

impl Scripts {
    /// Puts `node` in the registry the sweep reads.
    ///
    /// A node with members or sessions is always in it.
    pub(super) async fn register(&self, conn: &mut Conn, node: &str) -> Result<(), ClusterError> {
        redis::cmd("SADD")
            .arg(NODES)
            .arg(node)
            .exec_async(conn)
            .await
            .map_err(ClusterError::from)
    }

    /// Refreshes this node's liveness and sweeps nodes whose liveness expired.
    ///
    /// The liveness lasts three heartbeats; the sweep removes the memberships of those
    /// nodes. Returns whether this node's own liveness had expired (it may have been swept:
    /// its members must be announced again).
    pub(in crate::cluster) async fn heartbeat(
        &self,
        conn: &mut Conn,
        node: &str,
        heartbeat: std::time::Duration,
    ) -> Result<bool, ClusterError> {
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
            if !alive(conn, other).await? {
                self.sweep(conn, other, true).await?;
            }
        }
        Ok(previous.is_none())
    }

    /// Removes every membership and session count of `node` (see `sweep.lua`).
    ///
    /// A dead node also leaves the registry, a node sweeping its own earlier life stays in
    /// it. `-1`: the node is alive again and was left alone.
    pub(in crate::cluster) async fn sweep(
        &self,
        conn: &mut Conn,
        node: &str,
        dead: bool,
    ) -> Result<i64, ClusterError> {
        if self.cluster {
            return self.sweep_in_steps(conn, node, dead).await;
        }
        self.sweep
            .key(node_members_key(node))
            .key(NODES)
            .key(node_key(node))
            .key(node_users_key(node))
            .arg(node)
            .arg(mode(dead))
            .arg(self.longest_history_ttl_ms())
            .invoke_async(conn)
            .await
            .map_err(ClusterError::from)
    }

    /// The longest history lifetime of any room policy, for rooms a sweep leaves empty.
    fn longest_history_ttl_ms(&self) -> u64 {
        let longest = self.policies.0.iter().map(|p| p.history_ttl).max();
        super::millis(longest.unwrap_or(gateway_core::policy::RoomPolicy::fallback().history_ttl))
    }

    /// The sweep on a cluster, where a node's, its users' and its rooms' keys are apart.
    ///
    /// They are in different slots, so it goes in steps: list what the node held (unless it
    /// is alive again), remove its session counts, leave each room (with the `leave`
    /// events, as `exit.lua` does), then drop its record. Each step can be repeated: a
    /// sweep cut short is finished by the next heartbeat's.
    async fn sweep_in_steps(
        &self,
        conn: &mut Conn,
        node: &str,
        dead: bool,
    ) -> Result<i64, ClusterError> {
        let listed: Value = self
            .sweep_list
            .key(node_key(node))
            .key(node_members_key(node))
            .key(node_users_key(node))
            .arg(mode(dead))
            .invoke_async(conn)
            .await?;
        let Listed::Held { entries, users } = Listed::parse(&listed)? else {
            return Ok(-1);
        };
        for user in &users {
            redis::cmd("HDEL")
                .arg(user_sessions_key(user))
                .arg(node)
                .exec_async(conn)
                .await?;
        }
        for entry in &entries {
            let Some((events, room, session, user)) = parse_membership(entry) else {
                continue;
            };
            let member = MemberInfo {
                user: user.to_owned(),
                session: session.to_owned(),
                transport: String::new(),
                node: Some(node.to_owned()),
            };
            self.room_membership(&self.exit, conn, &room, &member, events)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_list_is_alive_or_what_the_node_held() {
        assert_eq!(Listed::parse(&Value::Int(-1)).unwrap(), Listed::Alive);
        let held = Value::Array(vec![
            Value::Array(vec![Value::BulkString(b"1\nr\ns\nu".to_vec())]),
            Value::Array(vec![]),
        ]);
        assert_eq!(
            Listed::parse(&held).unwrap(),
            Listed::Held {
                entries: vec!["1\nr\ns\nu".into()],
                users: vec![]
            }
        );
        assert!(Listed::parse(&Value::Int(3)).is_err());
    }
}
