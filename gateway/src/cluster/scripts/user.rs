//! A user's scripts and commands.
//!
//! They cover session counts, direct messages, disconnects and one-time tickets.

use gateway_core::{
    auth::Identity,
    pattern::Pattern,
    protocol::{CloseReason, Payload},
};
use serde::{Deserialize, Serialize};

use super::{node::alive, Scripts};
use crate::cluster::{
    channel::{node_users_key, ticket_count_key, ticket_key, user_sessions_key},
    conn::Conn,
    error::ClusterError,
    message::{Body, Message},
};

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
pub(in crate::cluster) fn identity_of(stored: &str) -> Option<Identity> {
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
pub(in crate::cluster) struct TicketRequest {
    ticket_key: String,
    count_key: String,
    identity: String,
    ttl_ms: u64,
    max_per_user: u32,
}

impl TicketRequest {
    pub(in crate::cluster) fn new(
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
            ttl_ms: super::millis(ttl),
            max_per_user,
        }
    }
}

impl Scripts {
    /// A ticket's stored identity.
    ///
    /// With `redeem`, it is consumed (`GETDEL`, once on any node) and no longer counted
    /// towards its user's cap.
    pub(in crate::cluster) async fn ticket(
        &self,
        conn: &mut Conn,
        ticket: &str,
        redeem: bool,
    ) -> Result<Option<String>, ClusterError> {
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

    /// Stores a ticket (after `reserve_ticket.lua`); `false` when the user is at the limit.
    pub(in crate::cluster) async fn issue_ticket(
        &self,
        conn: &mut Conn,
        request: &TicketRequest,
    ) -> Result<bool, ClusterError> {
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

    /// Sets this node's session count of `user` (see `count_user.lua`).
    ///
    /// With `max`, only when the user's count over all nodes stays within it. `false`:
    /// refused.
    pub(in crate::cluster) async fn count_user(
        &self,
        conn: &mut Conn,
        node: &str,
        user: &str,
        count: u32,
        max: Option<usize>,
    ) -> Result<bool, ClusterError> {
        let set: i64 = self
            .count_user
            .key(user_sessions_key(user))
            .arg(node)
            .arg(count)
            .arg(max.map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX)))
            .invoke_async(conn)
            .await?;
        if set != 1 {
            return Ok(false);
        }
        // The node's record, for the sweep after it died.
        let record = redis::cmd(if count > 0 { "SADD" } else { "SREM" })
            .arg(node_users_key(node))
            .arg(user)
            .exec_async(conn)
            .await;
        record?;
        if count > 0 {
            self.register(conn, node).await?;
        }
        Ok(true)
    }

    /// Releases the session counts of `user` held by nodes whose liveness expired.
    ///
    /// Such nodes are dead, or cut off from Redis for three heartbeats (such a node counts
    /// its users again when it is back); the counts are released without waiting for the
    /// next sweep. Returns how many were released. Each step is its own command (the keys
    /// are in different slots on a cluster); a node that beats again in between is counted
    /// again by itself.
    pub(in crate::cluster) async fn release_dead_counts(
        &self,
        conn: &mut Conn,
        node: &str,
        user: &str,
    ) -> Result<usize, ClusterError> {
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
            if !alive(conn, other).await? {
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

    /// Sends a direct message to `user`'s sessions on every node; whether a node heard it.
    pub(in crate::cluster) async fn send_user(
        &self,
        conn: &mut Conn,
        user: &str,
        from: Option<&str>,
        data: &Payload,
    ) -> Result<bool, ClusterError> {
        let (channel, bytes) = Message::Direct {
            user: user.to_owned(),
            body: Body {
                from: from.map(str::to_owned),
                data: data.clone(),
                origin: None,
            },
        }
        .encode();
        let receivers: i64 = redis::cmd(self.publish_command())
            .arg(channel)
            .arg(bytes)
            .query_async(conn)
            .await?;
        Ok(receivers > 0)
    }

    /// Closes every session of `user` on every node (the control channel).
    pub(in crate::cluster) async fn disconnect(
        &self,
        conn: &mut Conn,
        user: &str,
        reason: &CloseReason,
    ) -> Result<(), ClusterError> {
        let (channel, bytes) = Message::Disconnect {
            user: user.to_owned(),
            code: reason.code.code(),
            reason: reason.reason.clone(),
        }
        .encode();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(bytes)
            .query_async::<i64>(conn)
            .await?;
        Ok(())
    }
}
