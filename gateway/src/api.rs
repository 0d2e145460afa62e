//! The HTTP router served on both HTTPS and HTTP/3: health, and endpoint paths (WebSocket
//! upgrades on HTTPS; anything else there is answered with the admission status).

use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use gateway_core::{
    connection::Now,
    protocol::{CloseCode, CloseReason, ErrorCode, Payload, Rejection, RoomName},
};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, value::RawValue};

use crate::{admission::bearer, state::AppState, ws};

/// The router of every plain HTTP request.
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(demo_page))
        .route("/healthz", get(healthz))
        .route("/api/tickets", post(issue_ticket))
        .route("/api/publish", post(api_publish))
        .route("/api/send", post(api_send))
        .route("/api/rooms/{*room}", get(api_room))
        .route("/api/disconnect", post(api_disconnect))
        .fallback(endpoint_or_not_found)
        .with_state(app)
}

async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    if app.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        (StatusCode::OK, "ok").into_response()
    }
}

/// The demo page; in dev mode it carries the dev certificate's hash for WebTransport.
async fn demo_page(State(app): State<Arc<AppState>>) -> Response {
    let page = include_str!("../assets/index.html").replace(
        "__CERT_SHA256__",
        app.dev_cert_sha256.as_deref().unwrap_or(""),
    );
    (
        [(http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

async fn endpoint_or_not_found(State(app): State<Arc<AppState>>, req: Request) -> Response {
    ws::upgrade(app, req).await
}

/// An API failure; it becomes the JSON error body with the status of its code.
#[derive(Debug)]
struct ApiError {
    code: ErrorCode,
    message: String,
    status: Option<StatusCode>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status()).expect("valid status")
        });
        error_response(status, self.code.as_str(), &self.message)
    }
}

type ApiResult = Result<Json<serde_json::Value>, ApiError>;

/// `POST /api/tickets`: a user JWT in, a one-time ticket out.
async fn issue_ticket(State(app): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    let verifier =
        app.services.verifier.as_ref().ok_or_else(|| {
            ApiError::new(ErrorCode::Forbidden, "authentication is not configured")
        })?;
    let token = bearer(&headers)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "a bearer JWT is required"))?;
    let now = Now::read();
    let identity = verifier
        .verify(token, now.unix_secs)
        .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))?;
    let ticket = app
        .tickets
        .issue(identity, now.instant)
        .map_err(|e| ApiError {
            status: Some(StatusCode::SERVICE_UNAVAILABLE),
            ..ApiError::new(ErrorCode::LimitExceeded, e.to_string())
        })?;
    Ok(Json(json!({
        "ticket": ticket,
        "expires_in": app.tickets.ttl().as_secs(),
    })))
}

/// Checks the server API key in constant time.
fn require_api_key(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(key) = &app.config.api_key else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the server API is disabled: set [api] key",
        ));
    };
    match bearer(headers) {
        Some(given) if bool::from(given.as_bytes().ct_eq(key.as_bytes())) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "a valid API key is required",
        )),
    }
}

/// Parses a JSON body; `data` fields stay the raw JSON text the caller sent.
fn parse_body<'a, T: Deserialize<'a>>(body: &'a Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid body: {e}")))
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
async fn api_publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_api_key(&app, &headers)?;
    let req: PublishBody<'_> = parse_body(&body)?;
    let room = room_name(&req.room)?;
    let data = Payload::Json(body.slice_ref(req.data.get().as_bytes()));
    let seq = app.services.hub.publish(&room, None, &data, false, None);
    Ok(Json(json!({ "seq": seq })))
}

#[derive(Deserialize)]
struct SendBody<'a> {
    user: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /api/send`: a direct message to every session of a user.
async fn api_send(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    require_api_key(&app, &headers)?;
    let req: SendBody<'_> = parse_body(&body)?;
    let data = Payload::Json(body.slice_ref(req.data.get().as_bytes()));
    let delivered = app.services.hub.send_to_user(&req.user, None, &data);
    Ok(Json(json!({ "delivered": delivered })))
}

/// `GET /api/rooms/ROOM`: the members of a room.
async fn api_room(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> ApiResult {
    require_api_key(&app, &headers)?;
    let members = app.services.hub.members(&room_name(&room)?);
    Ok(Json(json!({ "room": room, "members": members })))
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
    code: Option<u16>,
    reason: Option<String>,
}

/// `POST /api/disconnect`: closes every session of a user (default close code 1008).
async fn api_disconnect(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_api_key(&app, &headers)?;
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
    let n = app.services.hub.disconnect_user(&req.user, reason);
    Ok(Json(json!({ "disconnected": n })))
}

/// The JSON error body of the HTTP API and of rejected upgrades.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    (
        status,
        Json(serde_json::json!({ "error": code, "message": message })),
    )
        .into_response()
}

/// The response to a refused upgrade or CONNECT.
pub fn rejection_response(rejection: Rejection) -> Response<Body> {
    let status = StatusCode::from_u16(rejection.http_status()).expect("valid status");
    error_response(status, rejection.error_code().as_str(), rejection.message())
}
