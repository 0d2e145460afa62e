//! The HTTP router served on both HTTPS and HTTP/3: health, and endpoint paths (WebSocket
//! upgrades on HTTPS; anything else there is answered with the admission status).

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use gateway_core::protocol::Rejection;
use http::StatusCode;

use crate::{state::AppState, ws};

/// The router of every plain HTTP request.
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(demo_page))
        .route("/healthz", get(healthz))
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
