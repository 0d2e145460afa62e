//! Lingering close for TCP connections.
//!
//! When the server closes a connection while the client is still sending (a refused
//! oversized request head, a body the server will not read), closing at once makes the
//! kernel answer the client's next bytes with a reset: the client's send fails and a simple
//! client never reads the response. So when a connection that last wrote a response is
//! dropped, its write side is shut down and, on a task of its own, input is read and
//! discarded until the client closes, [`LINGER_TIME`] passes or [`LINGER_BYTES`] arrive
//! (RFC 9112 section 9.6). A connection that last read (a timed-out head, an abandoned
//! body) closes at once; a client that closes cleanly costs nothing more. The connection's
//! guard (its limit slot) is held until the socket is really gone.
//!
//! A write that makes no progress for the connection's write timeout fails with
//! `TimedOut`, so a client that stops reading what it asked for is disconnected rather
//! than holding the connection (and its responses) for ever.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::Sleep,
};

/// Longest time spent discarding input after the connection is dropped.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes discarded after the connection is dropped.
pub const LINGER_BYTES: usize = 1024 * 1024;

/// An I/O stream that lingers when dropped, holding `G` until it is closed.
///
/// See the module documentation.
#[derive(Debug)]
pub struct Lingering<T: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Send + Unpin + 'static>
{
    inner: Option<T>,
    guard: Option<G>,
    /// Whether the last thing that happened was a write, rather than a read.
    ///
    /// A write is a response the client may still have to read.
    wrote_last: bool,
    /// Seconds a write may make no progress.
    write_timeout_secs: u16,
    /// Armed while a write waits (boxed: only a stalled connection pays for it).
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Send + Unpin + 'static>
    Lingering<T, G>
{
    /// Wraps `inner`; `guard` is dropped when the connection is closed.
    ///
    /// A write that makes no progress for `write_timeout` (whole seconds, at least one)
    /// fails.
    pub fn new(inner: T, guard: G, write_timeout: Duration) -> Self {
        Self {
            inner: Some(inner),
            guard: Some(guard),
            wrote_last: false,
            write_timeout_secs: u16::try_from(write_timeout.as_secs().max(1)).unwrap_or(u16::MAX),
            stalled: None,
        }
    }

    fn inner(&mut self) -> Pin<&mut T> {
        Pin::new(self.inner.as_mut().expect("present until drop"))
    }

    /// What a write returned, with the stall timer.
    ///
    /// The timer is armed while writes wait and cleared by progress; a write waiting past
    /// the timeout fails.
    fn timed<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let secs = u64::from(self.write_timeout_secs);
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_secs(secs))));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read: write stalled",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Send + Unpin + 'static> Drop
    for Lingering<T, G>
{
    fn drop(&mut self) {
        if !self.wrote_last {
            return;
        }
        let (Some(mut io), guard, Ok(runtime)) = (
            self.inner.take(),
            self.guard.take(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        runtime.spawn(async move {
            let _guard = guard;
            let _ = tokio::time::timeout(LINGER_TIME, async move {
                let _ = io.shutdown().await;
                let mut scratch = [0u8; 4096];
                let mut left = LINGER_BYTES;
                while left > 0 {
                    match io.read(&mut scratch).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            })
            .await;
        });
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Send + Unpin + 'static> AsyncRead
    for Lingering<T, G>
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = self.inner().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.wrote_last = false;
        }
        result
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Send + Unpin + 'static> AsyncWrite
    for Lingering<T, G>
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !buf.is_empty() {
            self.wrote_last = true;
        }
        let result = self.inner().poll_write(cx, buf);
        self.timed(cx, result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = self.inner().poll_flush(cx);
        self.timed(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().any(|b| !b.is_empty()) {
            self.wrote_last = true;
        }
        let result = self.inner().poll_write_vectored(cx, bufs);
        self.timed(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
}
