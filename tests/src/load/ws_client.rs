//! A lean wss client: a hand-written upgrade and frame parser, so one core can read
//! hundreds of thousands of deliveries per second.

use std::{cell::RefCell, net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{
    since,
    stats::{Observed, SeqTracker},
    wire::{opcode, ws_frame, ws_parse},
};

type Tls = TlsStream<TcpStream>;

/// An upgraded connection with whatever the server sent after its 101.
pub struct WsConn {
    /// Read half.
    pub reader: ReadHalf<Tls>,
    /// Write half.
    pub writer: WriteHalf<Tls>,
    /// Bytes read past the HTTP response.
    pub buf: BytesMut,
    mask: [u8; 4],
}

/// Connects, performs TLS and the WebSocket upgrade.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> anyhow::Result<WsConn> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let mut stream = TlsConnector::from(tls).connect(name, tcp).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // tokio-rustls may keep encrypted records buffered until flushed.
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    let head_end = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during the upgrade");
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("oversized upgrade response");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
    }
    let _ = buf.split_to(head_end);
    let (reader, writer) = tokio::io::split(stream);
    let mask = rand_mask();
    Ok(WsConn {
        reader,
        writer,
        buf,
        mask,
    })
}

fn rand_mask() -> [u8; 4] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (n | 1).to_be_bytes()
}

impl WsConn {
    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(text.len() + 14);
        ws_frame(&mut out, opcode::TEXT, text.as_bytes(), self.mask);
        self.writer.write_all(&out).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Appends a masked frame to `out` (for batched writes).
    pub fn frame_into(&self, out: &mut Vec<u8>, op: u8, payload: &[u8]) {
        ws_frame(out, op, payload, self.mask);
    }

    /// Reads until a text frame containing `needle` arrives (answering pings).
    pub async fn wait_text(&mut self, needle: &str) -> anyhow::Result<String> {
        loop {
            while let Some((op, start, end, frame_end)) = ws_parse(&self.buf) {
                let payload = self.buf[start..end].to_vec();
                let _ = self.buf.split_to(frame_end);
                match op {
                    opcode::TEXT => {
                        let text = String::from_utf8_lossy(&payload).into_owned();
                        if text.contains(needle) {
                            return Ok(text);
                        }
                    }
                    opcode::PING => {
                        let mut out = Vec::new();
                        ws_frame(&mut out, opcode::PONG, &payload, self.mask);
                        self.writer.write_all(&out).await?;
                        self.writer.flush().await?;
                    }
                    opcode::CLOSE => bail!("closed by server while waiting for {needle}"),
                    _ => {}
                }
            }
            if self.reader.read_buf(&mut self.buf).await.context("read")? == 0 {
                bail!("connection ended while waiting for {needle}");
            }
        }
    }

    /// Subscriber loop: records every binary delivery until the connection ends, `stop`
    /// (ns since epoch) passes, or the task is aborted (reads have no timeout).
    pub async fn subscribe(
        mut self,
        epoch: Instant,
        stop_ns: u64,
        observed: Rc<RefCell<Observed>>,
        mut seqs: SeqTracker,
    ) -> anyhow::Result<()> {
        self.buf.reserve(64 * 1024);
        loop {
            let now_ns = since(epoch);
            let mut pongs = Vec::new();
            {
                let mut obs = observed.borrow_mut();
                while let Some((op, start, end, frame_end)) = ws_parse(&self.buf) {
                    match op {
                        opcode::BINARY => {
                            obs.record_envelope(&mut seqs, &self.buf[start..end], now_ns)
                        }
                        opcode::PING => {
                            ws_frame(&mut pongs, opcode::PONG, &self.buf[start..end], self.mask)
                        }
                        opcode::CLOSE => return Ok(()),
                        _ => {}
                    }
                    let _ = self.buf.split_to(frame_end);
                }
            }
            if !pongs.is_empty() {
                self.writer.write_all(&pongs).await?;
                self.writer.flush().await?;
            }
            if now_ns > stop_ns {
                return Ok(());
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            // No timer per read: the caller aborts the task once the run is over.
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    }
}
