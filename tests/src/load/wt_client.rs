//! A WebTransport load client on web-transport-quinn: one session per subscriber, frames
//! parsed from the message stream without copying payloads.

use std::{cell::RefCell, rc::Rc, time::Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use web_transport_quinn::{Client, RecvStream, SendStream, Session};

use super::{
    since,
    stats::{Observed, SeqTracker},
    wire::{stream_frame, stream_take},
};

/// A WebTransport session with its message stream.
pub struct WtConn {
    /// The session (kept alive while the connection is used).
    pub session: Session,
    /// Client-to-server half of the message stream.
    pub send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
}

/// A client trusting the certificate with this SHA-256.
pub fn client(cert_sha256: &[u8]) -> anyhow::Result<Client> {
    Ok(web_transport_quinn::ClientBuilder::new()
        .with_server_certificate_hashes(vec![cert_sha256.to_vec()])?)
}

/// Opens a session, its message stream, and sends `hello`.
pub async fn connect(client: &Client, url: &url::Url) -> anyhow::Result<WtConn> {
    let session = client.connect(url.clone()).await?;
    let (send, recv) = session.open_bi().await?;
    let mut c = WtConn {
        session,
        send,
        recv,
        buf: BytesMut::with_capacity(8 * 1024),
    };
    c.send_json(r#"{"type":"hello"}"#).await?;
    Ok(c)
}

impl WtConn {
    /// Sends one JSON frame.
    pub async fn send_json(&mut self, json: &str) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(json.len() + 5);
        stream_frame(&mut out, 0, json.as_bytes());
        self.send.write_all(&out).await?;
        Ok(())
    }

    /// Reads until a JSON frame containing `needle` arrives.
    pub async fn wait_text(&mut self, needle: &str) -> anyhow::Result<String> {
        loop {
            while let Some((kind, payload)) = stream_take(&mut self.buf) {
                if kind == 0 {
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    if text.contains(needle) {
                        return Ok(text);
                    }
                }
            }
            let chunk = self
                .recv
                .read_chunk(64 * 1024, true)
                .await
                .context("read")?;
            match chunk {
                Some(c) => self.buf.extend_from_slice(&c.bytes),
                None => bail!("message stream ended while waiting for {needle}"),
            }
        }
    }

    /// Subscriber loop (see the wss one).
    pub async fn subscribe(
        mut self,
        epoch: Instant,
        stop_ns: u64,
        observed: Rc<RefCell<Observed>>,
        mut seqs: SeqTracker,
    ) -> anyhow::Result<()> {
        loop {
            let now_ns = since(epoch);
            {
                let mut obs = observed.borrow_mut();
                while let Some((kind, payload)) = stream_take(&mut self.buf) {
                    if kind == 1 {
                        obs.record_envelope(&mut seqs, &payload, now_ns);
                    }
                }
            }
            if now_ns > stop_ns {
                return Ok(());
            }
            // No timer per read: the caller aborts the task once the run is over.
            match self.recv.read_chunk(256 * 1024, true).await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c.bytes),
                Ok(None) | Err(_) => return Ok(()),
            }
        }
    }
}
