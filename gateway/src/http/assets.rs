//! What the gateway serves to browsers: the demo page and the client library.
//!
//! The library (`/client.js`, `/client.d.ts`, from `clients/js/`) is embedded in the
//! binary. It is served with a content hash as its ETag: a browser revalidates and gets 304
//! until the binary changes, and other origins may import it (CORS).

use std::sync::{Arc, LazyLock};

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use crate::state::AppState;

/// An embedded file with its media type and ETag.
pub struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            body,
            content_type,
            etag: format!("\"{hex}\""),
        }
    }

    /// The file, or 304 when `If-None-Match` names its ETag.
    fn serve(&self, request: &HeaderMap) -> Response {
        let matches = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim() == self.etag || t.trim() == "*")
            });
        let headers = [
            (header::ETAG, self.etag.clone()),
            // Always revalidated (cheap with the ETag), so a new binary's client is used at once.
            (header::CACHE_CONTROL, "public, no-cache".to_owned()),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".to_owned()),
        ];
        if matches {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        let mut response = (headers, self.body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        response
    }
}

/// The browser client, an ES module.
pub static CLIENT_JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../../clients/js/client.js"),
        "text/javascript; charset=utf-8",
    )
});

/// Its TypeScript declarations.
pub static CLIENT_DTS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../../clients/js/client.d.ts"),
        "application/typescript; charset=utf-8",
    )
});

/// `GET /client.js`.
pub async fn client_js(request: HeaderMap) -> Response {
    CLIENT_JS.serve(&request)
}

/// `GET /client.d.ts`.
pub async fn client_dts(request: HeaderMap) -> Response {
    CLIENT_DTS.serve(&request)
}

/// The demo page; in dev mode it carries the dev certificate's hash for WebTransport.
pub async fn demo_page(State(app): State<Arc<AppState>>) -> Response {
    let page = include_str!("../../assets/index.html").replace(
        "__CERT_SHA256__",
        app.dev_cert_sha256.as_deref().unwrap_or(""),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}
