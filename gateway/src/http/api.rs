//! The HTTP router served on both HTTPS and HTTP/3.
//!
//! It serves health, the server API, and endpoint paths (the `endpoints` fallback the
//! caller passes: WebSocket upgrades on HTTPS; anything else there is answered with the
//! admission status).
//!
//! Every request must complete within the handshake timeout; API routes check their
//! credential from the headers before any byte of the body is read, and each route reads
//! at most the body it can use.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, FromRequest, Path, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, MethodRouter},
    Extension, Json, Router,
};
use gateway_core::{
    auth::Identity,
    backplane::{completion, ClusterUnavailable},
    hub::Publish,
    protocol::{
        check_data, CloseCode, CloseReason, ErrorCode, HttpFailure, Payload, Rejection, RoomName,
    },
    tickets::TicketError,
};
use http::{
    header::{self, CONTENT_LENGTH},
    StatusCode,
};
use serde::Deserialize;
use serde_json::{json, value::RawValue};

use super::{
    admission::{self, bearer, ConnectionPermit},
    assets,
};
use crate::{clock, state::AppState};

/// Room or user name, JSON keys and punctuation of an API body around its `data`.
const API_ENVELOPE_BYTES: usize = 1024;
/// Largest `/api/disconnect` body: a user id, a code and a reason.
const DISCONNECT_BODY_BYTES: usize = 4096;
/// Largest body accepted (and ignored) by routes that take none.
///
/// Such as a `{}` that generic HTTP clients send with every POST.
const IGNORED_BODY_BYTES: usize = 1024;

/// The router of every plain HTTP request.
pub fn router<H, T>(app: Arc<AppState>, endpoints: H) -> Router
where
    H: axum::handler::Handler<T, Arc<AppState>>,
    T: 'static,
{
    // `data` may be as large as the largest message any endpoint accepts.
    let data_body = app
        .config
        .endpoints
        .iter()
        .map(|e| e.max_message_bytes)
        .max()
        .unwrap_or(0)
        + API_ENVELOPE_BYTES;
    let with_api_key = |route: MethodRouter<Arc<AppState>>, max_body: usize| {
        // Layers run outside in: the key is checked before the body limit and the body.
        route
            .layer(middleware::from_fn_with_state(max_body, limit_body))
            .layer(middleware::from_fn_with_state(app.clone(), require_api_key))
    };
    Router::new()
        .route("/", get(assets::demo_page))
        .route("/client.js", get(assets::client_js))
        .route("/client.d.ts", get(assets::client_dts))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/api/tickets",
            post(issue_ticket)
                .layer(middleware::from_fn_with_state(
                    IGNORED_BODY_BYTES,
                    limit_body,
                ))
                .layer(middleware::from_fn_with_state(
                    app.clone(),
                    require_user_jwt,
                )),
        )
        .route("/api/publish", with_api_key(post(api_publish), data_body))
        .route("/api/send", with_api_key(post(api_send), data_body))
        .route(
            "/api/rooms/{*room}",
            with_api_key(get(api_room), IGNORED_BODY_BYTES),
        )
        .route(
            "/api/drain",
            with_api_key(post(api_drain), IGNORED_BODY_BYTES),
        )
        .route(
            "/api/disconnect",
            with_api_key(post(api_disconnect), DISCONNECT_BODY_BYTES),
        )
        // Only matched routes: the fallback's admission answers 404 before any limit.
        .route_layer(middleware::from_fn(refuse_over_limit))
        .fallback(endpoints)
        // `limit_body` sets each route's limit; axum's own 2 MiB default must not cap it.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(app.clone(), deadline))
        .with_state(app)
}

/// Refuses a body declared larger than `max` at once (413).
///
/// It also stops reading one that grows past it.
async fn limit_body(State(max): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::new(
            ErrorCode::TooLarge,
            format!("this route reads at most {max} bytes of body"),
        )
        .into_response();
    }
    next.run(req.map(|b| Body::new(http_body_util::Limited::new(b, max))))
        .await
}

/// A request body read within its route's limit; failures are API errors.
struct ApiBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(|e| {
                // axum answers 413 for a body over the limit and 400 for any other failure.
                let code = match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
                    _ => ErrorCode::BadRequest,
                };
                ApiError::new(code, e.body_text())
            })
    }
}

/// Every request, body included, must be done within the handshake timeout (408 after).
async fn deadline(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit: Duration = app.config.limits.handshake_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => failure_response(
            HttpFailure::Timeout,
            "the request did not complete within the handshake timeout",
        ),
    }
}

/// On a connection over a connection limit, answers route requests with the limit's status.
///
/// The routes are health and the API; endpoint and unknown paths go to admission, which
/// answers in PROTOCOL.md order (404 and 400 first).
async fn refuse_over_limit(req: Request, next: Next) -> Response {
    let rejection = req
        .extensions()
        .get::<ConnectionPermit>()
        .and_then(ConnectionPermit::rejection);
    match rejection {
        Some(rejection) => rejection_response(rejection),
        None => next.run(req).await,
    }
}

async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    if app.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if let Some(problem) = app.services.hub.backplane().unavailable() {
        (StatusCode::OK, format!("degraded: {problem}")).into_response()
    } else {
        (StatusCode::OK, "ok").into_response()
    }
}

/// The Prometheus text exposition (OpenMetrics).
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    app.metrics
        .rooms
        .set(app.services.hub.room_count().try_into().unwrap_or(i64::MAX));
    app.metrics.sync_hub(app.services.hub.stats());
    if let Some(jwks) = app.jwks() {
        let (fetches, failures) = jwks.counts();
        app.metrics.sync_jwks(fetches, failures);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// An API failure; it becomes the JSON error body with the failure's status and code.
#[derive(Debug)]
struct ApiError {
    failure: HttpFailure,
    message: String,
}

impl ApiError {
    fn new(failure: impl Into<HttpFailure>, message: impl Into<String>) -> Self {
        Self {
            failure: failure.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        failure_response(self.failure, &self.message)
    }
}

type ApiResult = Result<Json<serde_json::Value>, ApiError>;

/// Verifies the user JWT of `/api/tickets` from the headers and hands its identity on.
async fn require_user_jwt(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(verifier) = app.services.verifier.as_ref() else {
        return ApiError::new(ErrorCode::Forbidden, "authentication is not configured")
            .into_response();
    };
    let Some(token) = bearer(req.headers()) else {
        return ApiError::new(ErrorCode::Unauthorized, "a bearer JWT is required").into_response();
    };
    // An unknown `kid` waits for the JWK Set's refetch, as an upgrade does.
    match admission::verify_token(&app, verifier, token, clock::now()).await {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(e) => ApiError::new(ErrorCode::Unauthorized, e.to_string()).into_response(),
    }
}

/// `POST /api/tickets`: a user JWT in, a one-time ticket out.
async fn issue_ticket(
    State(app): State<Arc<AppState>>,
    Extension(identity): Extension<Identity>,
) -> ApiResult {
    if let Some(cluster) = &app.cluster {
        let ticket = cluster
            .issue_ticket(&identity, app.tickets.ttl())
            .await
            .map_err(|e| ApiError::new(e.code(), e.to_string()))?
            .ok_or_else(|| {
                ApiError::new(TicketError::UserLimit, TicketError::UserLimit.to_string())
            })?;
        return Ok(Json(json!({
            "ticket": ticket,
            "expires_in": app.tickets.ttl().as_secs(),
        })));
    }
    let ticket = app
        .tickets
        .issue(identity, clock::now().instant)
        .map_err(|e| ApiError::new(e.clone(), e.to_string()))?;
    Ok(Json(json!({
        "ticket": ticket,
        "expires_in": app.tickets.ttl().as_secs(),
    })))
}

/// Checks the server API key in constant time, from the headers, before the body is read.
async fn require_api_key(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    use subtle::ConstantTimeEq;
    let Some(key) = &app.config.api_key else {
        return ApiError::new(
            ErrorCode::Forbidden,
            "the server API is disabled: set [api] key",
        )
        .into_response();
    };
    match bearer(req.headers()) {
        Some(given) if bool::from(given.as_bytes().ct_eq(key.as_bytes())) => next.run(req).await,
        _ => ApiError::new(ErrorCode::Unauthorized, "a valid API key is required").into_response(),
    }
}

/// Parses a JSON body; `data` fields stay the raw JSON text the caller sent.
fn parse_body<'a, T: Deserialize<'a>>(body: &'a Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid body: {e}")))
}

/// The `data` of an API body, checked as a client publish's is.
fn data_payload(body: &Bytes, data: &RawValue) -> Result<Payload, ApiError> {
    check_data(data.get())
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("field `data` {e}")))?;
    Ok(Payload::Json(body.slice_ref(data.get().as_bytes())))
}

fn room_name(room: &str) -> Result<RoomName, ApiError> {
    RoomName::new(room).map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("room: {e}")))
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    room: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /api/publish`: publish to a room as the server (no `from`).
async fn api_publish(State(app): State<Arc<AppState>>, ApiBody(body): ApiBody) -> ApiResult {
    let req: PublishBody<'_> = parse_body(&body)?;
    let room = room_name(&req.room)?;
    let data = data_payload(&body, req.data)?;
    let (done, rx) = completion();
    app.services
        .hub
        .publish(
            Publish {
                room: &room,
                from: None,
                data: &data,
                volatile: false,
                exclude: None,
            },
            clock::now().instant,
            done,
        )
        .map_err(|refused| {
            let code = gateway_core::connection::RequestError::from(refused).code();
            ApiError::new(code, refused.to_string())
        })?;
    let seq = cluster_result(rx.await)?;
    app.metrics.api_published();
    Ok(Json(json!({ "seq": seq })))
}

#[derive(Deserialize)]
struct SendBody<'a> {
    user: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /api/send`: a direct message to every session of a user.
async fn api_send(State(app): State<Arc<AppState>>, ApiBody(body): ApiBody) -> ApiResult {
    let req: SendBody<'_> = parse_body(&body)?;
    let data = data_payload(&body, req.data)?;
    let (done, rx) = completion();
    app.services.hub.send_to_user(&req.user, None, &data, done);
    let delivered = cluster_result(rx.await)?;
    Ok(Json(json!({ "delivered": delivered })))
}

/// The outcome of a cluster operation as an API result.
///
/// It is `internal` when the cluster is unavailable or dropped the operation.
fn cluster_result<T>(
    outcome: Result<Result<T, ClusterUnavailable>, tokio::sync::oneshot::error::RecvError>,
) -> Result<T, ApiError> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::new(e.code(), e.to_string())),
        Err(_) => Err(ApiError::new(
            ErrorCode::Internal,
            "the operation was dropped",
        )),
    }
}

/// `GET /api/rooms/ROOM`: the members of a room.
async fn api_room(State(app): State<Arc<AppState>>, Path(room): Path<String>) -> ApiResult {
    let (done, rx) = completion();
    app.services.hub.members(&room_name(&room)?, done);
    let members = cluster_result(rx.await)?;
    Ok(Json(json!({ "room": room, "members": members })))
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
    code: Option<u16>,
    reason: Option<String>,
}

/// `POST /api/disconnect`: closes every session of a user (default close code 1008).
async fn api_disconnect(State(app): State<Arc<AppState>>, ApiBody(body): ApiBody) -> ApiResult {
    let req: DisconnectBody = parse_body(&body)?;
    let code = match req.code {
        None => CloseCode::PolicyViolation,
        Some(c) => CloseCode::from_code(c).ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                "code: not a close code of the protocol",
            )
        })?,
    };
    let reason = CloseReason::new(
        code,
        req.reason
            .unwrap_or_else(|| "disconnected by the server".into()),
    );
    let (done, rx) = completion();
    app.services.hub.disconnect_user(&req.user, reason, done);
    let n = cluster_result(rx.await)?;
    Ok(Json(json!({ "disconnected": n })))
}

/// `POST /api/drain`: drains this node without exiting (rolling deploys).
///
/// Every session gets `reconnect` then 1001, `/healthz` says 503, and new sessions are
/// refused.
async fn api_drain(State(app): State<Arc<AppState>>, ApiBody(_): ApiBody) -> ApiResult {
    let sessions = app.drain();
    Ok(Json(json!({ "draining": true, "sessions": sessions })))
}

/// The JSON error body of the HTTP API and of rejected upgrades.
///
/// It has the status core's code table gives the failure.
pub fn failure_response(failure: HttpFailure, message: &str) -> Response<Body> {
    let status =
        StatusCode::from_u16(failure.http_status()).expect("the table's statuses are valid");
    (
        status,
        Json(serde_json::json!({ "error": failure.error_code(), "message": message })),
    )
        .into_response()
}

/// The response to a refused upgrade or CONNECT.
pub fn rejection_response(rejection: Rejection) -> Response<Body> {
    failure_response(rejection.into(), rejection.message())
}
