//! The one admission decision both fronts make before a session exists.
//!
//! See PROTOCOL.md section 1: admit with an identity, or reject with a status. Checks run
//! in the documented order and the first failure decides.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::upstream::{Checked, Upstream};

use gateway_core::{
    auth::{AuthError, Identity, JwtVerifier},
    backplane::completion,
    connection::{Admitted, Now},
    limits::{ConnectionSlot, RefusalSlot, UserSlot},
    policy::{AuthMode, EndpointPolicy},
    protocol::Rejection,
    session::TransportKind,
    upstream::{CallEvent, Welcome},
};
use http::HeaderMap;

use crate::state::AppState;

/// The longest an upgrade or CONNECT with an unknown `kid` waits for the JWK Set's refetch.
const REFETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The connection-limit decision for the TCP or QUIC connection a request arrived on.
///
/// It is made once when the connection was accepted. Fronts put it in each request's
/// extensions.
#[derive(Debug, Clone)]
pub enum ConnectionPermit {
    /// Within the limits.
    ///
    /// The slot is released when the connection and every session on it have ended.
    Granted(Arc<ConnectionSlot>),
    /// Over a limit: every request on the connection gets this rejection.
    ///
    /// The rejection comes after the checks PROTOCOL.md puts before it; then the connection
    /// closes.
    Refused(Rejection, Arc<RefusalSlot>),
}

impl ConnectionPermit {
    /// Takes a slot for a new connection from `peer`.
    ///
    /// It is granted, or refused with a status while few refusals are in flight, or `None`
    /// when the connection should be dropped at once.
    pub fn acquire(app: &AppState, peer: IpAddr) -> Option<Self> {
        let limits = &app.services.limits;
        match limits.acquire(peer) {
            Ok(slot) => Some(Self::Granted(Arc::new(slot))),
            Err(rejection) => limits
                .refusal(peer)
                .map(|r| Self::Refused(rejection, Arc::new(r))),
        }
    }

    /// The rejection of a refused connection.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            Self::Granted(_) => None,
            Self::Refused(rejection, _) => Some(*rejection),
        }
    }
}

/// The parts of an upgrade or CONNECT request that admission looks at.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    /// Request path without query.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Client address.
    pub peer: SocketAddr,
    /// The transport the request would open a session on.
    pub transport: TransportKind,
    /// Whether the request is a well-formed WebSocket upgrade or WebTransport CONNECT.
    pub valid_upgrade: bool,
    /// The connection's limit decision; `None` counts as a full server.
    pub permit: Option<&'a ConnectionPermit>,
}

impl<'a> UpgradeRequest<'a> {
    /// The admission view of an HTTP request (either front's).
    ///
    /// It carries the connection permit its front put in the extensions.
    pub fn of<B>(
        req: &'a http::Request<B>,
        peer: SocketAddr,
        transport: TransportKind,
        valid_upgrade: bool,
    ) -> Self {
        Self {
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            peer,
            transport,
            valid_upgrade,
            permit: req.extensions().get::<ConnectionPermit>(),
        }
    }
}

/// An admitted request: what the adapter needs to open the session.
#[derive(Debug)]
pub struct Admission {
    /// The endpoint's policy.
    pub policy: Arc<EndpointPolicy>,
    /// The identity (or pending/anonymous state).
    pub admitted: Admitted,
    /// The connection's slot, shared with the connection it arrived on.
    pub slot: Arc<ConnectionSlot>,
    /// What the `connect` upstream granted for `welcome`, if it was called.
    pub welcome: Option<Box<Welcome>>,
}

/// Where a credential came from (PROTOCOL.md section 2 order).
#[derive(Debug, PartialEq, Eq)]
enum Credential {
    Bearer(String),
    Ticket(String),
    Token(String),
}

/// Decides whether the request may open a session.
///
/// Only a ticket in cluster mode waits (for the cluster store).
pub async fn admit(
    app: &AppState,
    req: &UpgradeRequest<'_>,
    now: Now,
) -> Result<Admission, Rejection> {
    let policy = app
        .endpoint(req.path)
        .ok_or(Rejection::UnknownEndpoint)?
        .clone();
    if !req.valid_upgrade {
        return Err(Rejection::BadUpgrade);
    }
    if app.is_shutting_down() {
        return Err(Rejection::ShuttingDown);
    }
    let slot = match req.permit {
        Some(ConnectionPermit::Granted(slot)) => slot.clone(),
        Some(ConnectionPermit::Refused(rejection, _)) => return Err(*rejection),
        None => return Err(Rejection::ServerFull),
    };
    let origin = req
        .headers
        .get(http::header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    if !policy.origin_allowed(origin) {
        return Err(Rejection::ForbiddenOrigin);
    }
    let (admitted, welcome) = match app.upstream(&policy.path) {
        Some(upstream) if upstream_connects(&policy) => {
            admit_through_upstream(app, upstream, policy.auth, req, now).await?
        }
        _ => (authenticate(app, policy.auth, req, now).await?, None),
    };
    Ok(Admission {
        policy,
        admitted,
        slot,
        welcome,
    })
}

fn upstream_connects(policy: &EndpointPolicy) -> bool {
    policy
        .upstream
        .as_ref()
        .is_some_and(|u| u.calls(CallEvent::Connect))
}

/// Admission on an endpoint whose upstream lists `connect`.
///
/// On `auth = "upstream"` the call decides who the user is; otherwise it runs after the
/// credential check, and its `rooms` and `publish` replace the credential's when given.
async fn admit_through_upstream(
    app: &AppState,
    upstream: &Upstream,
    mode: AuthMode,
    req: &UpgradeRequest<'_>,
    now: Now,
) -> Result<(Admitted, Option<Box<Welcome>>), Rejection> {
    let node = app.services.hub.node_id();
    if mode == AuthMode::Upstream {
        let grant = crate::upstream::connect(upstream, node, req, None).await?;
        let identity = grant.identity();
        let slot = user_slot(app, &identity).await?;
        return Ok((Admitted::Authenticated(identity, slot), grant.welcome()));
    }
    let admitted = authenticate(app, mode, req, now).await?;
    let Admitted::Authenticated(mut identity, slot) = admitted else {
        // Configuration allows `connect` only with `auth = "required"` here.
        return Ok((admitted, None));
    };
    let token = match credential(req) {
        Some(Credential::Bearer(t) | Credential::Token(t)) => Some(t),
        _ => None,
    };
    let checked = Checked {
        identity: &identity,
        token: token.as_deref(),
    };
    let grant = crate::upstream::connect(upstream, node, req, Some(checked)).await?;
    let granted = grant.identity();
    if grant.rooms.is_some() {
        // The grant's patterns replace the credential's, `publish` with them.
        identity.rooms = granted.rooms;
        identity.publish = granted.publish;
    } else if grant.publish.is_some() {
        identity.publish = granted.publish;
    }
    identity.expires_at = match (identity.expires_at, grant.expires_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let admitted = Admitted::Authenticated(identity, slot);
    Ok((admitted, grant.welcome()))
}

/// What `req`'s credential (PROTOCOL.md section 2) makes of the session under `mode`.
///
/// The session is anonymous, pending its first message, or authenticated with a user slot.
async fn authenticate(
    app: &AppState,
    mode: AuthMode,
    req: &UpgradeRequest<'_>,
    now: Now,
) -> Result<Admitted, Rejection> {
    Ok(match mode {
        AuthMode::None => Admitted::Anonymous,
        mode => match credential(req) {
            None if mode == AuthMode::FirstMessage => Admitted::Pending,
            None => return Err(Rejection::MissingCredential),
            Some(Credential::Ticket(ticket)) if app.cluster.is_some() => {
                let cluster = app.cluster.as_ref().expect("checked");
                let unavailable = |_| Rejection::ClusterUnavailable;
                let identity = cluster
                    .ticket(&ticket, false)
                    .await
                    .map_err(unavailable)?
                    .ok_or(Rejection::InvalidCredential)?;
                let user_slot = user_slot(app, &identity).await?;
                // Consumed only now that the request is admitted, once, on any node.
                cluster
                    .ticket(&ticket, true)
                    .await
                    .map_err(unavailable)?
                    .ok_or(Rejection::InvalidCredential)?;
                Admitted::Authenticated(identity, user_slot)
            }
            Some(Credential::Ticket(ticket)) => {
                let identity = app
                    .tickets
                    .peek(&ticket, now.instant)
                    .ok_or(Rejection::InvalidCredential)?;
                let user_slot = user_slot(app, &identity).await?;
                // Consumed only now that the request is admitted; of two racing requests
                // only one redeems it.
                app.tickets
                    .redeem(&ticket, now.instant)
                    .ok_or(Rejection::InvalidCredential)?;
                Admitted::Authenticated(identity, user_slot)
            }
            Some(Credential::Bearer(token) | Credential::Token(token)) => {
                let verifier = app
                    .services
                    .verifier
                    .as_ref()
                    .ok_or(Rejection::InvalidCredential)?;
                let identity = verify_token(app, verifier, &token, now)
                    .await
                    .map_err(|_| Rejection::InvalidCredential)?;
                let user_slot = user_slot(app, &identity).await?;
                Admitted::Authenticated(identity, user_slot)
            }
        },
    })
}

/// Verifies a JWT; a `kid` the JWK Set lacks waits for one refetch, then is tried again.
///
/// The key server may have rotated (it is refetched at most every 10 s); one that hangs
/// holds the request at most [`REFETCH_WAIT`].
pub async fn verify_token(
    app: &AppState,
    verifier: &JwtVerifier,
    token: &str,
    now: Now,
) -> Result<Identity, AuthError> {
    match (verifier.verify(token, now.unix_secs), app.jwks()) {
        (Err(AuthError::UnknownKey), Some(jwks)) => {
            let _ = tokio::time::timeout(REFETCH_WAIT, jwks.refetch_for_unknown_kid()).await;
            verifier.verify(token, crate::clock::now().unix_secs)
        }
        (result, _) => result,
    }
}

/// The user's connection slot, counted cluster-wide in cluster mode.
async fn user_slot(app: &AppState, identity: &Identity) -> Result<UserSlot, Rejection> {
    let (done, rx) = completion();
    app.services.limits.acquire_user_then(
        app.services.hub.backplane(),
        identity.user.clone(),
        done,
    );
    rx.await.unwrap_or(Err(Rejection::ClusterUnavailable))
}

/// The token of an `Authorization: Bearer ...` header (scheme case-insensitive).
///
/// Other schemes are not ours and count as no credential.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn credential(req: &UpgradeRequest<'_>) -> Option<Credential> {
    if let Some(token) = bearer(req.headers) {
        return Some(Credential::Bearer(token.to_owned()));
    }
    let query = req.query?;
    let mut token = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "ticket" => return Some(Credential::Ticket(v.into_owned())),
            "token" if token.is_none() => token = Some(Credential::Token(v.into_owned())),
            _ => {}
        }
    }
    token
}

/// The `endpoint` label of a request for `path`: the configured path, or `unknown`.
///
/// `unknown` keeps a scan of random paths from growing the metrics.
fn endpoint_label<'a>(app: &'a AppState, path: &str) -> &'a str {
    app.endpoint(path).map_or("unknown", |p| p.path.as_str())
}

/// Logs (target `access`) and counts an upgrade or CONNECT refused with `rejection`.
pub fn rejected(
    app: &AppState,
    path: &str,
    transport: TransportKind,
    peer: SocketAddr,
    rejection: Rejection,
) {
    let status = rejection.http_status();
    let endpoint = endpoint_label(app, path);
    tracing::info!(target: "access", %peer, endpoint, transport = transport.as_str(), status,
        reason = ?rejection, "handshake rejected");
    app.metrics
        .handshake_rejected(endpoint, transport, &status.to_string());
}

/// Logs and counts a connection that did not finish its TLS or QUIC handshake in time.
pub fn timed_out(app: &AppState, transport: TransportKind, peer: SocketAddr) {
    tracing::info!(target: "access", %peer, transport = transport.as_str(), status = "timeout",
        "handshake rejected");
    app.metrics
        .handshake_rejected("unknown", transport, "timeout");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> UpgradeRequest<'a> {
        UpgradeRequest {
            path: "/chat",
            query,
            headers,
            peer: "127.0.0.1:1".parse().unwrap(),
            transport: TransportKind::WebSocket,
            valid_upgrade: true,
            permit: None,
        }
    }

    #[test]
    fn credentials_are_taken_in_protocol_order() {
        let mut h = HeaderMap::new();
        assert_eq!(
            credential(&req(&h, Some("token=b&ticket=a"))),
            Some(Credential::Ticket("a".into()))
        );
        assert_eq!(
            credential(&req(&h, Some("x=1&token=b%2Bc"))),
            Some(Credential::Token("b+c".into()))
        );
        assert_eq!(credential(&req(&h, Some("x=1"))), None);
        h.insert(
            http::header::AUTHORIZATION,
            "Basic dXNlcjpwdw==".parse().unwrap(),
        );
        assert_eq!(
            credential(&req(&h, Some("ticket=a"))),
            Some(Credential::Ticket("a".into()))
        );
        h.insert(http::header::AUTHORIZATION, "bearer hdr".parse().unwrap());
        assert_eq!(
            credential(&req(&h, Some("ticket=a"))),
            Some(Credential::Bearer("hdr".into()))
        );
    }
}
