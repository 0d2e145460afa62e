//! The `connect` call, made before an upgrade or CONNECT is accepted.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
};

use base64::Engine as _;
use gateway_core::{
    auth::Identity,
    protocol::Rejection,
    upstream::{Answer, CommonFields, ConnectGrant, Outcome},
};
use serde::{ser::SerializeMap, Serialize, Serializer};
use serde_json::Value;

use super::Upstream;
use crate::http::admission::UpgradeRequest;

/// What a credential checked before the call says about the user.
#[derive(Debug)]
pub(crate) struct Checked<'a> {
    /// The identity it gave.
    pub(crate) identity: &'a Identity,
    /// The JWT it came in, if any (its claims are passed on).
    pub(crate) token: Option<&'a str>,
}

/// The `connect` body: the common fields, `headers`, `query`, then `user` and `claims`.
struct ConnectBody<'a> {
    common: CommonFields<'a>,
    headers: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    claims: Option<Value>,
}

impl Serialize for ConnectBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.common.write_fields(&mut map)?;
        map.serialize_entry("headers", &self.headers)?;
        map.serialize_entry("query", &self.query)?;
        if let Some(claims) = &self.claims {
            map.serialize_entry("claims", claims)?;
        }
        map.end()
    }
}

/// Calls `connect` for `req` and reads its grant.
///
/// Refusals become their HTTP status (401, 403, 429; another 4xx is 403) and failures 503.
pub(crate) async fn connect(
    upstream: &Upstream,
    node: &str,
    req: &UpgradeRequest<'_>,
    checked: Option<Checked<'_>>,
) -> Result<ConnectGrant, Rejection> {
    let remote_addr = req.peer.to_string();
    let body = ConnectBody {
        common: CommonFields {
            endpoint: req.path,
            transport: req.transport.as_str(),
            node,
            remote_addr: &remote_addr,
            session: None,
            user: checked.as_ref().map(|c| &*c.identity.user),
        },
        headers: forwarded_headers(upstream, req.headers),
        query: query(req.query),
        claims: checked.as_ref().map(claims),
    };
    let body = serde_json::to_vec(&body).expect("a connect body serializes");
    match upstream.connect_from(req.peer.ip(), body).await {
        Outcome::Answered(Answer::Connect(grant)) => Ok(*grant),
        Outcome::Refused(refusal) => Err(match refusal.status {
            401 => Rejection::UpstreamUnauthorized,
            429 => Rejection::UpstreamTooMany,
            _ => Rejection::UpstreamForbidden,
        }),
        Outcome::Answered(_) | Outcome::Failed(_) => Err(Rejection::UpstreamUnavailable),
    }
}

/// The headers named in `forward_headers`, lower-case names, repeated values joined.
fn forwarded_headers(upstream: &Upstream, headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in &upstream.config().forward_headers {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            // Cookie crumbs (HTTP/2, HTTP/3) join into one cookie header with "; ".
            let separator = if name == http::header::COOKIE {
                "; "
            } else {
                ", "
            };
            out.insert(name.as_str().to_owned(), values.join(separator));
        }
    }
    out
}

/// One of a client address's [`MAX_CONNECTS_PER_IP`](super::MAX_CONNECTS_PER_IP) `connect`
/// calls, given back on drop.
pub(super) struct ConnectSlot<'a> {
    counts: &'a Mutex<HashMap<IpAddr, u32>>,
    ip: IpAddr,
}

impl<'a> ConnectSlot<'a> {
    /// Takes a slot for `ip`, if it has one left.
    pub(super) fn take(counts: &'a Mutex<HashMap<IpAddr, u32>>, ip: IpAddr) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= super::MAX_CONNECTS_PER_IP {
            return None;
        }
        *n += 1;
        Some(Self { counts, ip })
    }
}

impl Drop for ConnectSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The query parameters (each one's first value), without `token` and `ticket`.
fn query(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k != "token" && k != "ticket" && !out.contains_key(&*k) {
            out.insert(k.into_owned(), v.into_owned());
        }
    }
    out
}

/// The claims of a checked credential: a JWT's payload, or what a ticket carries.
fn claims(checked: &Checked<'_>) -> Value {
    let from_token = checked.token.and_then(|token| {
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .filter(Value::is_object)
    });
    from_token.unwrap_or_else(|| {
        let identity = checked.identity;
        let patterns = |p: &Option<Vec<gateway_core::pattern::Pattern>>| {
            p.as_ref().map(|list| {
                list.iter()
                    .map(|p| p.as_str().to_owned())
                    .collect::<Vec<_>>()
            })
        };
        let mut claims = serde_json::json!({ "sub": &*identity.user });
        if let Some(exp) = identity.expires_at {
            claims["exp"] = exp.into();
        }
        if let Some(rooms) = patterns(&identity.rooms) {
            claims["rooms"] = rooms.into();
        }
        if let Some(publish) = patterns(&identity.publish) {
            claims["publish"] = publish.into();
        }
        claims
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_drops_credentials_and_keeps_first_values() {
        let q = query(Some("token=x&room=a&room=b&ticket=t&n=%20"));
        assert_eq!(q.len(), 2);
        assert_eq!(q["room"], "a");
        assert_eq!(q["n"], " ");
    }

    #[test]
    fn claims_come_from_the_token_payload_or_the_identity() {
        let identity = Identity {
            user: "alice".into(),
            rooms: Some(vec![gateway_core::pattern::Pattern::new("a:*")]),
            publish: None,
            expires_at: Some(5),
        };
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"alice","name":"Alice"}"#);
        let token = format!("h.{payload}.s");
        let from_token = claims(&Checked {
            identity: &identity,
            token: Some(&token),
        });
        assert_eq!(from_token["name"], "Alice");
        let from_ticket = claims(&Checked {
            identity: &identity,
            token: None,
        });
        assert_eq!(
            from_ticket,
            serde_json::json!({"sub": "alice", "exp": 5, "rooms": ["a:*"]})
        );
    }
}
