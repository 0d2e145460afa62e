//! TLS over TCP on rustls's unbuffered connection API, with buffers the gateway owns.
//!
//! The buffers are held only while they hold data. rustls's buffered connection keeps a 4
//! KiB receive buffer for a connection's whole life; here an idle connection holds no
//! buffer at all: bytes are read only once the socket is readable, into a buffer that is
//! freed as soon as every whole record in it is decrypted (a partial record stays, and only
//! it). Decrypted bytes the reader has no room for, and encrypted bytes the socket has not
//! taken yet, are kept the same way.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll, Waker},
};

use rustls::{
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, WriteTraffic},
    ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Bytes asked of the socket per read: a whole TLS record and its overhead.
const READ_SIZE: usize = 16 * 1024 + 512;
/// Encrypted bytes a writer may leave queued before its writes wait for the socket.
const MAX_QUEUED: usize = 256 * 1024;

/// A server-side TLS connection over TCP (see the module documentation).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes not yet decrypted: at most a partial record between reads.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes the socket has not taken yet, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
    /// The peer closed its side (close_notify or end of stream).
    read_closed: bool,
    /// The reader waiting for the socket, woken when the write side decrypts records.
    read_waker: Option<Waker>,
    /// Our close_notify is queued.
    write_closed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &self.incoming.len())
            .field("plain", &(self.plain.len() - self.plain_at))
            .field("out", &(self.out.len() - self.out_at))
            .finish()
    }
}

fn tls_error(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `encode` writes to `out`.
///
/// It writes first into `guess` bytes, then into as many as it asks for.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    insufficient: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    out.resize(start + guess, 0);
    loop {
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match insufficient(&e) {
                Some(required) if required > out.len() - start => out.resize(start + required, 0),
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

/// Removes the `discard` bytes rustls has processed from the front of `incoming`.
///
/// It frees `incoming` once empty (an idle connection holds no buffer).
fn drop_processed(incoming: &mut Vec<u8>, discard: usize) {
    incoming.drain(..discard);
    if incoming.is_empty() && incoming.capacity() > 0 {
        *incoming = Vec::new();
    }
}

/// Wakes the reader parked in `slot`, if any.
fn wake(slot: &mut Option<Waker>) {
    if let Some(waker) = slot.take() {
        waker.wake();
    }
}

/// Room for `len` bytes of application data once encrypted (TLS record overhead).
fn sealed_len(len: usize) -> usize {
    len + (len / (16 * 1024) + 1) * 64
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// What processing received records led to.
enum Step {
    /// Something changed: process again.
    Progress,
    /// The handshake needs more bytes from the peer, or there is nothing to decrypt.
    NeedBytes,
    /// The handshake is complete and nothing is left to process.
    Established,
}

impl TlsStream {
    /// Performs the server side of the TLS handshake on `tcp`.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = Self {
            tcp,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            out: Vec::new(),
            out_at: 0,
            read_closed: false,
            read_waker: None,
            write_closed: false,
        };
        loop {
            match stream.process(None)? {
                Step::Progress => continue,
                Step::Established => {
                    std::future::poll_fn(|cx| stream.poll_send(cx)).await?;
                    return Ok(stream);
                }
                Step::NeedBytes => {
                    std::future::poll_fn(|cx| stream.poll_send(cx)).await?;
                    if stream.read_closed {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    std::future::poll_fn(|cx| stream.poll_receive(cx)).await?;
                }
            }
        }
    }

    /// Processes the received bytes once.
    ///
    /// Decrypted data goes to `reader` (or, past its room, to `plain`), handshake and alert
    /// records to `out`.
    fn process(&mut self, mut reader: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        let Self {
            conn,
            incoming,
            plain,
            out,
            read_closed,
            ..
        } = self;
        let status = conn.process_tls_records(incoming);
        let discard = status.discard;
        let step = match status.state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut traffic) => {
                if reader.is_none() {
                    // Application data right behind the handshake: the reader takes it.
                    Step::Established
                } else {
                    while let Some(record) = traffic.next_record() {
                        let data = record.map_err(tls_error)?.payload;
                        let taken = match reader.as_deref_mut() {
                            Some(buf) if plain.is_empty() => {
                                let n = data.len().min(buf.remaining());
                                buf.put_slice(&data[..n]);
                                n
                            }
                            _ => 0,
                        };
                        plain.extend_from_slice(&data[taken..]);
                    }
                    Step::Progress
                }
            }
            ConnectionState::EncodeTlsData(mut data) => {
                append(out, 0, |buf| data.encode(buf), encode_needs).map_err(tls_error)?;
                Step::Progress
            }
            ConnectionState::TransmitTlsData(data) => {
                // `out` is sent in order before anything written later.
                data.done();
                Step::Progress
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                if *read_closed {
                    Step::NeedBytes
                } else {
                    *read_closed = true;
                    Step::Progress
                }
            }
            ConnectionState::BlockedHandshake => Step::NeedBytes,
            ConnectionState::WriteTraffic(_) if reader.is_none() => Step::Established,
            ConnectionState::WriteTraffic(_) => Step::NeedBytes,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected TLS state",
                ))
            }
        };
        drop_processed(incoming, discard);
        Ok(step)
    }

    /// Reads what the socket has into `incoming`, allocating only once it is readable.
    ///
    /// `Ready(Ok(()))` also at the end of the stream (then `read_closed` is set).
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming.reserve(READ_SIZE);
            let read = self.tcp.try_read_buf(&mut self.incoming);
            match read {
                Ok(0) => {
                    self.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `out` to the socket until it is empty (then frees a large one).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        // Freed once sent: an idle connection holds no buffer.
        self.out = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Brings the connection to its write state and runs `write` in it.
    ///
    /// What rustls must send first goes to `out`; records already decrypted go to `plain`
    /// (waking the reader). The received bytes are always passed whole: they may hold part
    /// of a handshake message rustls has started to take apart.
    fn in_write_state<T>(
        &mut self,
        write: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut write = Some(write);
        loop {
            let Self {
                conn,
                incoming,
                plain,
                out,
                read_closed,
                read_waker,
                ..
            } = self;
            let status = conn.process_tls_records(incoming);
            let discard = status.discard;
            let written = match status.state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let write = write.take().expect("the write state ends the loop");
                    Some(write(&mut traffic, out)?)
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(out, 0, |buf| data.encode(buf), encode_needs).map_err(tls_error)?;
                    None
                }
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        plain.extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                    wake(read_waker);
                    None
                }
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    wake(read_waker);
                    None
                }
                _ => return Err(io::ErrorKind::NotConnected.into()),
            };
            drop_processed(incoming, discard);
            if let Some(written) = written {
                return Ok(written);
            }
        }
    }

    /// Copies decrypted bytes the reader has not taken into `buf`; whether any were.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_at == self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_at).min(buf.remaining());
        buf.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        n > 0
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        loop {
            if this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            // Records may wait even with nothing received since: data that came right
            // behind the handshake is already decrypted.
            let step = this.process(Some(buf))?;
            // Handshake or alert records produced on the way (a key update, a close_notify
            // reply) leave without waiting for a write.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if matches!(step, Step::Progress) {
                continue;
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.poll_receive(cx)?.is_pending() {
                this.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() - this.out_at >= MAX_QUEUED {
            ready!(this.poll_send(cx))?;
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.in_write_state(|traffic, out| {
            append(
                out,
                sealed_len(data.len()),
                |buf| traffic.encrypt(data, buf),
                encrypt_needs,
            )
            .map_err(tls_error)
        })?;
        // Push it out now if the socket takes it; else it waits for the next flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            // Without a close_notify (the connection is already broken) the TCP close
            // still ends the stream.
            let _ = this.in_write_state(|traffic, out| {
                append(
                    out,
                    64,
                    |buf| traffic.queue_close_notify(buf),
                    encrypt_needs,
                )
                .map_err(tls_error)
            });
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gateway_certs::{DevCert, ReloadableResolver};
    use rustls::pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::TlsStream;

    impl TlsStream {
        /// Bytes of buffer capacity the connection holds.
        fn held(&self) -> usize {
            self.incoming.capacity() + self.plain.capacity() + self.out.capacity()
        }
    }

    /// A client that sent part of a handshake message in a record of its own.
    ///
    /// Here it is the first byte of a KeyUpdate, sealed with the client's extracted traffic
    /// keys.
    #[tokio::test]
    async fn a_partial_post_handshake_message_does_not_break_writing() {
        use rustls::{
            crypto::{
                cipher::{OutboundChunks, OutboundPlainMessage},
                ring::{cipher_suite::TLS13_AES_128_GCM_SHA256, default_provider},
                CryptoProvider,
            },
            ConnectionTrafficSecrets, ContentType, ProtocolVersion,
        };
        crate::tls::install_crypto_provider();
        let cert = DevCert::generate().unwrap();
        let resolver = ReloadableResolver::new(&cert.identity().unwrap()).unwrap();
        let config = crate::tls::tcp_config(resolver);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fragment_sent, fragment_arrived) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsStream::accept(tcp, config).await.unwrap();
            fragment_arrived.await.unwrap();
            // The reader takes the fragment in (nothing to deliver yet)...
            let mut buf = [0u8; 16];
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(300), tls.read(&mut buf))
                    .await;
            assert!(read.is_err(), "nothing readable was sent: {read:?}");
            // ...and a write afterwards must work.
            tls.write_all(b"still here").await.unwrap();
            tls.flush().await.unwrap();
        });
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert.identity().unwrap().chain[0].clone())
            .unwrap();
        let provider = CryptoProvider {
            cipher_suites: vec![TLS13_AES_128_GCM_SHA256],
            ..default_provider()
        };
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut tcp, conn) = tls.into_inner();
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (seq, ConnectionTrafficSecrets::Aes128Gcm { key, iv }) = secrets.tx else {
            panic!("AES-128-GCM was the only suite offered");
        };
        let suite = TLS13_AES_128_GCM_SHA256.tls13().unwrap();
        let mut sealer = suite.aead_alg.encrypter(key, iv);
        let fragment = OutboundPlainMessage {
            typ: ContentType::Handshake,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(&[24]), // KeyUpdate's type byte only
        };
        let record = sealer.encrypt(fragment, seq).unwrap().encode();
        tcp.write_all(&record).await.unwrap();
        fragment_sent.send(()).unwrap();
        server.await.expect("the server's write path survives");
    }

    #[tokio::test]
    async fn data_crosses_records_and_small_reads_and_an_idle_connection_holds_no_buffer() {
        crate::tls::install_crypto_provider();
        let cert = DevCert::generate().unwrap();
        let resolver = ReloadableResolver::new(&cert.identity().unwrap()).unwrap();
        let config = crate::tls::tcp_config(resolver);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // 40 KiB: more than two TLS records, read 100 bytes at a time by the server.
        let message: Vec<u8> = (0..40 * 1024).map(|i| (i % 251) as u8).collect();
        let len = message.len();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsStream::accept(tcp, config).await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 100];
            while got.len() < len {
                let n = tls.read(&mut chunk).await.unwrap();
                assert!(n > 0, "stream ended after {} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
            }
            tls.write_all(&got).await.unwrap();
            tls.flush().await.unwrap();
            let held = tls.held();
            // The client's close_notify ends the stream.
            let eof = tls.read(&mut chunk).await.unwrap();
            (got, held, eof)
        });
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert.identity().unwrap().chain[0].clone())
            .unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(&message).await.unwrap();
        tls.flush().await.unwrap();
        let mut echo = vec![0u8; len];
        tls.read_exact(&mut echo).await.unwrap();
        assert!(echo == message, "the echo differs");
        tls.shutdown().await.unwrap();
        let (got, held, eof) = server.await.unwrap();
        assert!(got == message, "the server read something else");
        assert_eq!(held, 0, "buffers held by an idle connection");
        assert_eq!(eof, 0);
    }
}
