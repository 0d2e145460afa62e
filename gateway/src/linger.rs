//! Lingering close for HTTP/1.1 connections. When the server closes a connection while the
//! client is still sending (a refused oversized request head, a body the server will not
//! read), closing at once makes the kernel answer the unread bytes with a reset, which
//! destroys the response the client has not read yet. After shutting its side down the
//! server therefore reads and discards for a bounded time and amount (RFC 9112 section 9.6).

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// Longest time spent discarding input after shutdown.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes discarded after shutdown.
const LINGER_BYTES: usize = 1024 * 1024;

/// An I/O stream whose shutdown lingers: it shuts down the write side, then discards input
/// until the peer closes, [`LINGER_TIME`] passes or [`LINGER_BYTES`] are read.
#[derive(Debug)]
pub struct Lingering<T> {
    inner: T,
    drain: Option<Drain>,
}

#[derive(Debug)]
struct Drain {
    deadline: Pin<Box<Sleep>>,
    left: usize,
}

impl<T> Lingering<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self { inner, drain: None }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.drain = Some(Drain {
                deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
                left: LINGER_BYTES,
            });
        }
        let drain = this.drain.as_mut().expect("set above");
        let mut scratch = [0u8; 2048];
        loop {
            if drain.left == 0 || drain.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {
                    drain.left = drain.left.saturating_sub(buf.filled().len());
                }
                // The peer closed, or the connection is gone: nothing left to protect.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}
