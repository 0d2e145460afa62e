//! A WebTransport test client built on `web-transport-quinn`: an implementation independent
//! of the gateway's h3-webtransport server code.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use web_transport_quinn::{
    ClientBuilder, ClientError, ConnectError, RecvStream, SendStream, Session,
};

use crate::STEP;

/// A WebTransport session with its message stream open.
pub struct WtClient {
    /// The session (datagrams, extra streams).
    pub session: Session,
    /// Client-to-server half of the message stream.
    pub send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
}

/// A frame read from the message stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WtFrame {
    /// A JSON envelope.
    Json(Value),
    /// A binary envelope.
    Binary(Bytes),
}

/// Opens a WebTransport session to `https://127.0.0.1:PORT{path}`, trusting the certificate
/// by its SHA-256 (as browsers do with `serverCertificateHashes`).
pub async fn open_session(
    port: u16,
    cert_sha256_hex: &str,
    path: &str,
) -> Result<Session, ClientError> {
    let hash = hex::decode(cert_sha256_hex).expect("hex hash");
    let client = ClientBuilder::new().with_server_certificate_hashes(vec![hash])?;
    let url = url::Url::parse(&format!("https://127.0.0.1:{port}{path}")).expect("url");
    client.connect(url).await
}

/// As [`open_session`], sending extra request `headers` with the CONNECT.
pub async fn open_session_with_headers(
    port: u16,
    cert_sha256_hex: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Session, ClientError> {
    let hash = hex::decode(cert_sha256_hex).expect("hex hash");
    let client = ClientBuilder::new().with_server_certificate_hashes(vec![hash])?;
    let url = url::Url::parse(&format!("https://127.0.0.1:{port}{path}")).expect("url");
    let mut request = web_transport_quinn::proto::ConnectRequest::new(url);
    for (k, v) in headers {
        request = request.with_header(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    client.connect(request).await
}

/// The HTTP status of a refused CONNECT.
pub fn connect_status(e: &ClientError) -> Option<u16> {
    use web_transport_quinn::proto::ConnectError as Proto;
    match e {
        ClientError::HttpError(ConnectError::ErrorStatus(s))
        | ClientError::HttpError(ConnectError::ProtoError(Proto::WrongStatus(Some(s)))) => {
            Some(s.as_u16())
        }
        _ => None,
    }
}

/// Builds one message-stream frame.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    crate::load::wire::stream_frame(&mut out, kind, payload);
    out
}

impl WtClient {
    /// Opens a session and its message stream, sending `hello` as the first frame.
    pub async fn connect(
        port: u16,
        cert_sha256_hex: &str,
        path: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_with_headers(port, cert_sha256_hex, path, &[]).await
    }

    /// As [`connect`](Self::connect), sending extra request `headers` with the CONNECT.
    pub async fn connect_with_headers(
        port: u16,
        cert_sha256_hex: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, ClientError> {
        let session = open_session_with_headers(port, cert_sha256_hex, path, headers).await?;
        let (send, recv) = session.open_bi().await.expect("open message stream");
        let mut c = Self {
            session,
            send,
            recv,
            buf: BytesMut::new(),
        };
        c.send(serde_json::json!({"type": "hello"})).await;
        Ok(c)
    }

    /// Sends a JSON envelope on the message stream.
    pub async fn send(&mut self, v: Value) {
        self.send_raw(&frame(0, v.to_string().as_bytes())).await;
    }

    /// Writes raw bytes on the message stream.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send
            .write_all(bytes)
            .await
            .expect("write message stream");
    }

    /// Sends a binary envelope.
    pub async fn send_binary(&mut self, header: Value, payload: &[u8]) {
        self.send_raw(&frame(1, &crate::binary_envelope(&header, payload)))
            .await;
    }

    /// Next frame on the message stream, or `None` when the stream ends.
    pub async fn next_frame(&mut self) -> Option<WtFrame> {
        loop {
            if let Some((kind, payload)) = crate::load::wire::stream_take(&mut self.buf) {
                return Some(match kind {
                    0 => WtFrame::Json(serde_json::from_slice(&payload).expect("JSON frame")),
                    1 => WtFrame::Binary(payload.freeze()),
                    k => panic!("unknown frame kind {k}"),
                });
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(STEP, self.recv.read(&mut chunk)).await {
                Err(_) => panic!("timed out waiting for a WebTransport frame"),
                Ok(Ok(Some(n))) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
            }
        }
    }

    /// Next JSON envelope; panics on anything else.
    pub async fn recv(&mut self) -> Value {
        match self.next_frame().await {
            Some(WtFrame::Json(v)) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Sends `v` and returns the next envelope.
    pub async fn request(&mut self, v: Value) -> Value {
        self.send(v).await;
        self.recv().await
    }

    /// Joins `room`, checking the ack.
    pub async fn join(&mut self, room: &str) -> Value {
        let ack = self
            .request(serde_json::json!({"type":"join","room":room,"id":1}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        ack
    }

    /// The next datagram, parsed as JSON.
    pub async fn recv_datagram(&self) -> Value {
        let d = tokio::time::timeout(STEP, self.session.read_datagram())
            .await
            .expect("timed out waiting for a datagram")
            .expect("datagram");
        serde_json::from_slice(&d).expect("JSON datagram")
    }

    /// Asserts that no frame arrives on the message stream within `d`, then that the
    /// session is still served: a `ping` sent afterwards is answered by the next frame.
    pub async fn expect_silence(&mut self, d: Duration) {
        let mut chunk = [0u8; 1024];
        if !self.buf.is_empty() {
            panic!("expected silence, {} bytes are buffered", self.buf.len());
        }
        if let Ok(r) = tokio::time::timeout(d, self.recv.read(&mut chunk)).await {
            panic!("expected silence, got {r:?}");
        }
        let marker = self
            .request(json!({"type":"ping","id":crate::SILENCE_MARKER}))
            .await;
        assert_eq!(
            marker,
            json!({"type":"pong","id":crate::SILENCE_MARKER}),
            "after the silence"
        );
    }
}
