//! Counting the WebSocket frames tungstenite never shows the session: continuation frames.
//!
//! A message split into many (even empty) continuation frames would otherwise cost the
//! server work per frame without touching the rate limit. The count is read by the session
//! driver, which charges each frame to the session's rate limit; a message still incomplete
//! after more uncharged frames than the limit's burst ends the read side.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Continuation frames read and not yet charged, shared by the reader and the driver.
#[derive(Debug, Default)]
pub struct FrameCount {
    pending: AtomicU32,
}

impl FrameCount {
    /// Takes the frames counted since the last call.
    pub fn take(&self) -> u32 {
        self.pending.swap(0, Ordering::AcqRel)
    }

    /// Frames counted and not yet taken.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }
}

/// A sans-IO scanner of client-to-server frame headers (RFC 6455 section 5.2).
///
/// It skips payloads by their length and counts continuation frames.
#[derive(Debug, Default, Clone)]
pub struct HeaderScanner {
    header: [u8; 14],
    have: usize,
    payload_left: u64,
}

impl HeaderScanner {
    /// Feeds bytes read from the client; returns the continuation frames they complete.
    pub fn feed(&mut self, mut data: &[u8]) -> u32 {
        let mut continuations = 0;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.payload_left -= skip as u64;
                data = &data[skip..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have < 2 || self.have < Self::header_len(self.header[1]) {
                continue;
            }
            let len7 = self.header[1] & 0x7f;
            self.payload_left = match len7 {
                126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
                n => u64::from(n),
            };
            if self.header[0] & 0x0f == 0 {
                continuations += 1;
            }
            self.have = 0;
        }
        continuations
    }

    /// Length of a header from its second byte: extended length and masking key.
    fn header_len(second: u8) -> usize {
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }
}

/// A client stream whose reads are scanned for continuation frames.
#[derive(Debug)]
pub struct CountingReader<T> {
    inner: T,
    scanner: HeaderScanner,
    count: Arc<FrameCount>,
    max_pending: u32,
}

impl<T> CountingReader<T> {
    /// Wraps `inner`; reads fail once more than `max_pending` frames wait to be charged.
    pub fn new(inner: T, count: Arc<FrameCount>, max_pending: u32) -> Self {
        Self {
            inner,
            scanner: HeaderScanner::default(),
            count,
            max_pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingReader<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.count.pending() > this.max_pending {
            return Poll::Ready(Err(io::Error::other("too many continuation frames")));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let n = this.scanner.feed(&buf.filled()[before..]);
            if n > 0 {
                this.count.pending.fetch_add(n, Ordering::AcqRel);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingReader<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_continuations_across_any_split_and_skips_payloads() {
        let mut stream = frame(0x01, b"first"); // text, not final
        for _ in 0..5 {
            stream.extend(frame(0x00, b"")); // empty continuation
        }
        stream.extend(frame(0x00, &[0u8; 300])); // 16-bit length
        stream.extend(frame(0x80, &[0x00; 70_000])); // final continuation, 64-bit length
        stream.extend(frame(0x89, b"\x00\x00")); // ping: not a continuation
        for chunk in [1, 3, 7, 1000, stream.len()] {
            let mut s = HeaderScanner::default();
            let n: u32 = stream.chunks(chunk).map(|c| s.feed(c)).sum();
            assert_eq!(n, 7, "chunk size {chunk}");
        }
    }

    #[test]
    fn random_frames_in_random_pieces_are_counted_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut stream = Vec::new();
            let mut expected = 0;
            for _ in 0..rng.random_range(1..40) {
                let opcode = [0x0u8, 0x1, 0x2, 0x9, 0xA][rng.random_range(0..5)];
                let fin = if rng.random_bool(0.5) { 0x80 } else { 0 };
                let len = [0usize, 1, 125, 126, 300, 65_535, 65_536][rng.random_range(0..7)];
                stream.extend(frame(fin | opcode, &vec![0xAB; len]));
                expected += u32::from(opcode == 0);
            }
            let mut scanner = HeaderScanner::default();
            let (mut counted, mut rest) = (0, &stream[..]);
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(5000));
                counted += scanner.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(counted, expected);
        }
    }
}
