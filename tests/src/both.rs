//! One client over either transport, so a test of client frames can run over WebSocket and
//! WebTransport alike.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

use crate::{
    http_status,
    wt::{connect_status, WtClient, WtFrame},
    Ending, TestGateway, WsClient,
};

/// A transport a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket over TLS.
    Ws,
    /// WebTransport over HTTP/3.
    Wt,
}

impl Transport {
    /// The name the gateway gives it (`welcome.transport`, upstream bodies).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "websocket",
            Transport::Wt => "webtransport",
        }
    }
}

/// A frame a client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON envelope.
    Json(Value),
    /// A binary envelope (header length, header, payload).
    Binary(Vec<u8>),
}

/// A session over either transport.
#[allow(clippy::large_enum_variant)] // one per test session; boxing buys nothing here
pub enum Client {
    /// A WebSocket session.
    Ws(WsClient),
    /// A WebTransport session.
    Wt(WtClient),
}

impl TestGateway {
    /// Opens a session on `path` (may include a query) over `transport` with extra request
    /// headers; a refusal gives its HTTP status (`None` if it was not an HTTP refusal).
    pub async fn open(
        &self,
        transport: Transport,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, Option<u16>> {
        match transport {
            Transport::Ws => self
                .ws_with_headers(path, headers)
                .await
                .map(Client::Ws)
                .map_err(|e| http_status(&e)),
            Transport::Wt => {
                WtClient::connect_with_headers(self.udp_port(), &self.cert_sha256, path, headers)
                    .await
                    .map(Client::Wt)
                    .map_err(|e| connect_status(&e))
            }
        }
    }

    /// Opens a session on `path` over `transport` and reads its `welcome`.
    pub async fn welcomed(&self, transport: Transport, path: &str) -> (Client, Value) {
        self.welcomed_with_headers(transport, path, &[]).await
    }

    /// As [`welcomed`](Self::welcomed), with extra request headers.
    pub async fn welcomed_with_headers(
        &self,
        transport: Transport,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Client, Value) {
        let mut c = self
            .open(transport, path, headers)
            .await
            .unwrap_or_else(|s| panic!("{transport:?} session on {path} refused: {s:?}"));
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }
}

impl Client {
    /// Sends a JSON envelope.
    pub async fn send(&mut self, v: Value) {
        match self {
            Client::Ws(c) => c.send(v).await,
            Client::Wt(c) => c.send(v).await,
        }
    }

    /// Sends a binary envelope.
    pub async fn send_binary(&mut self, header: Value, payload: &[u8]) {
        match self {
            Client::Ws(c) => c.send_binary(header, payload).await,
            Client::Wt(c) => c.send_binary(header, payload).await,
        }
    }

    /// The next frame (panics if the session ends or nothing comes within `STEP`).
    pub async fn next_frame(&mut self) -> Frame {
        match self {
            Client::Ws(c) => match c.next_data().await {
                Message::Text(t) => Frame::Json(serde_json::from_str(&t).expect("JSON")),
                Message::Binary(b) => Frame::Binary(b.to_vec()),
                other => panic!("unexpected {other:?}"),
            },
            Client::Wt(c) => match c.next_frame().await {
                Some(WtFrame::Json(v)) => Frame::Json(v),
                Some(WtFrame::Binary(b)) => Frame::Binary(b.to_vec()),
                None => panic!("the message stream ended"),
            },
        }
    }

    /// The next frame within `d`, or `None` when the session ended or nothing came.
    pub async fn try_next(&mut self, d: Duration) -> Option<Frame> {
        match self {
            Client::Ws(c) => loop {
                match tokio::time::timeout(d, c.ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        return Some(Frame::Json(serde_json::from_str(&t).expect("JSON")))
                    }
                    Ok(Some(Ok(Message::Binary(b)))) => return Some(Frame::Binary(b.to_vec())),
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                    _ => return None,
                }
            },
            Client::Wt(c) => match tokio::time::timeout(d, c.next_frame()).await {
                Ok(Some(WtFrame::Json(v))) => Some(Frame::Json(v)),
                Ok(Some(WtFrame::Binary(b))) => Some(Frame::Binary(b.to_vec())),
                _ => None,
            },
        }
    }

    /// The next JSON envelope; panics on anything else.
    pub async fn recv(&mut self) -> Value {
        match self.next_frame().await {
            Frame::Json(v) => v,
            other => panic!("expected a JSON envelope, got {other:?}"),
        }
    }

    /// Sends `v` and returns the next envelope.
    pub async fn request(&mut self, v: Value) -> Value {
        self.send(v).await;
        self.recv().await
    }

    /// Asserts that nothing arrives within `d`, then that the session still answers a ping.
    pub async fn expect_silence(&mut self, d: Duration) {
        match self {
            Client::Ws(c) => c.expect_silence(d).await,
            Client::Wt(c) => c.expect_silence(d).await,
        }
    }

    /// Reads until the session ends: a WebSocket close frame, or the WebTransport `close`
    /// envelope; other frames before it are counted.
    pub async fn ending(&mut self) -> (Ending, usize) {
        match self {
            Client::Ws(c) => c.ending().await,
            Client::Wt(c) => {
                let mut skipped = 0;
                loop {
                    match c.next_frame().await {
                        None => return (Ending::Dropped, skipped),
                        Some(WtFrame::Json(v)) if v["type"] == "close" => {
                            return (
                                Ending::Close(
                                    v["code"].as_u64().unwrap_or_default() as u16,
                                    v["reason"].as_str().unwrap_or_default().to_owned(),
                                ),
                                skipped,
                            )
                        }
                        Some(_) => skipped += 1,
                    }
                }
            }
        }
    }

    /// Closes the session from the client side with `code` and `reason`.
    pub async fn close(&mut self, code: u16, reason: &str) {
        match self {
            Client::Ws(c) => {
                let _ =
                    c.ws.close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.to_owned().into(),
                    }))
                    .await;
                let _ = c.ending().await;
            }
            Client::Wt(c) => {
                c.session.close(u32::from(code), reason.as_bytes());
                let _ = tokio::time::timeout(Duration::from_secs(2), c.session.closed()).await;
            }
        }
    }

    /// Ends the session without a close handshake (the connection is just dropped).
    pub fn abort(self) {
        match self {
            Client::Ws(c) => drop(c),
            Client::Wt(c) => {
                // No CLOSE_WEBTRANSPORT_SESSION capsule: the QUIC connection just goes.
                quinn::Connection::close(&c.session, 0u32.into(), b"");
                drop(c)
            }
        }
    }
}
