//! The PROXY protocol header (v1 text, v2 binary) a load balancer sends.
//!
//! It comes at the start of a TCP connection, before TLS. Exactly the header's bytes are
//! read off the stream, never one more: what follows is the client's TLS ClientHello.
//! Parsing is `ppp`'s; this module only decides how many bytes to read, and bounds them.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// Longest v2 payload (addresses and TLVs) accepted after the 16-byte fixed part.
///
/// The addresses take at most 216 bytes (unix sockets); the rest leaves room for the TLVs
/// balancers send (AWS, GCP, HAProxy's SSL and unique-id TLVs). Longer headers are refused
/// without reading their payload.
pub const V2_MAX_PAYLOAD: usize = 2048;

/// The shortest header there is, `PROXY UNKNOWN\r\n` (a v2 header is longer): read at once.
const MIN_HEADER: usize = 15;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_FIXED: usize = 16;

/// The client address a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address, as the balancer saw it (IPv4-mapped IPv6 as IPv4).
    Client(SocketAddr),
    /// No client address: the socket's address stands.
    ///
    /// That is a v2 `LOCAL` connection (the balancer's health check), v1 `UNKNOWN`, or a v2
    /// `UNSPEC` or unix-socket family.
    Socket,
}

impl Source {
    /// The connection's client address: the carried one, else the socket's `peer`.
    pub fn or(self, peer: SocketAddr) -> SocketAddr {
        match self {
            Self::Client(addr) => addr,
            Self::Socket => peer,
        }
    }
}

/// Why a connection's PROXY header was refused (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The stream failed or ended inside the header.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// The connection does not start with a PROXY header (a direct TLS client, say).
    #[error("no PROXY protocol header (the connection starts with {0:02x?})")]
    Missing([u8; 4]),
    /// No CRLF within the v1 bound.
    #[error("PROXY v1 header without CRLF in its first {V1_MAX} bytes")]
    V1TooLong,
    /// A v1 line `ppp` refuses.
    #[error("malformed PROXY v1 header: {0}")]
    V1(#[source] ppp::v1::BinaryParseError),
    /// A v2 header announcing more than [`V2_MAX_PAYLOAD`] bytes.
    #[error("PROXY v2 header announces {0} bytes after its fixed part (at most {V2_MAX_PAYLOAD})")]
    V2TooLong(usize),
    /// A v2 header `ppp` refuses.
    #[error("malformed PROXY v2 header: {0}")]
    V2(#[source] ppp::v2::ParseError),
}

/// Reads one PROXY header (v1 or v2) from the start of `io` and returns its address.
///
/// Every byte after the header is left unread.
///
/// v1 is read two bytes at a time (one when the last byte read is CR): a line that has not
/// ended has at least its CRLF to come, so no read crosses the end of the header.
pub async fn read_proxy_header<R>(io: &mut R) -> Result<Source, ProxyHeaderError>
where
    R: AsyncRead + Unpin,
{
    // Small while waiting (a connection may wait here until the handshake timeout); a v2
    // payload gets its own buffer once its length is known.
    let mut buf = [0u8; V1_MAX];
    io.read_exact(&mut buf[..MIN_HEADER]).await?;
    if buf.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        io.read_exact(&mut buf[MIN_HEADER..V2_FIXED]).await?;
        let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if payload > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::V2TooLong(payload));
        }
        let mut header = vec![0u8; V2_FIXED + payload];
        header[..V2_FIXED].copy_from_slice(&buf[..V2_FIXED]);
        io.read_exact(&mut header[V2_FIXED..]).await?;
        let header = ppp::v2::Header::try_from(&header[..]).map_err(ProxyHeaderError::V2)?;
        return Ok(v2_source(&header));
    }
    if !buf.starts_with(V1_PREFIX) {
        return Err(ProxyHeaderError::Missing([buf[0], buf[1], buf[2], buf[3]]));
    }
    let mut len = MIN_HEADER;
    while !buf[..len].ends_with(b"\r\n") {
        let step = if buf[len - 1] == b'\r' { 1 } else { 2 };
        if len + step > V1_MAX {
            return Err(ProxyHeaderError::V1TooLong);
        }
        io.read_exact(&mut buf[len..len + step]).await?;
        len += step;
    }
    let header = ppp::v1::Header::try_from(&buf[..len]).map_err(ProxyHeaderError::V1)?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => client(a.source_address.into(), a.source_port),
        ppp::v1::Addresses::Tcp6(a) => client(a.source_address.into(), a.source_port),
        ppp::v1::Addresses::Unknown => Source::Socket,
    })
}

fn v2_source(header: &ppp::v2::Header<'_>) -> Source {
    use ppp::v2::{Addresses, Command};
    match (header.command, header.addresses) {
        (Command::Local, _) => Source::Socket,
        (Command::Proxy, Addresses::IPv4(a)) => client(a.source_address.into(), a.source_port),
        (Command::Proxy, Addresses::IPv6(a)) => client(a.source_address.into(), a.source_port),
        (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => Source::Socket,
    }
}

fn client(ip: std::net::IpAddr, port: u16) -> Source {
    // An IPv4 client behind a dual-stack balancer counts as the same address either way.
    Source::Client(SocketAddr::new(ip.to_canonical(), port))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const TRAILER: &[u8] = b"\x16\x03\x01 the ClientHello";

    /// Sends `bytes` followed by [`TRAILER`] and reads the header.
    ///
    /// `bytes` is sent in `chunk`-sized writes. Returns the header's result and the bytes
    /// left unread.
    async fn parse(bytes: &[u8], chunk: usize) -> (Result<Source, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let sent = [bytes, TRAILER].concat();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(chunk) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let result = read_proxy_header(&mut server).await;
        writer.await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    fn addr(s: &str) -> Source {
        Source::Client(s.parse().unwrap())
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
        h.extend([0x20 | command, family]);
        h.extend((payload.len() as u16).to_be_bytes());
        h.extend(payload);
        h
    }

    fn v2_ipv4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut p = src.to_vec();
        p.extend([10, 0, 0, 1]);
        p.extend(port.to_be_bytes());
        p.extend(443u16.to_be_bytes());
        p
    }

    #[tokio::test]
    async fn v1_carries_the_client_and_leaves_the_rest_unread() {
        for chunk in [1, 3, 1000] {
            let (r, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", chunk).await;
            assert_eq!(r.unwrap(), addr("203.0.113.7:51000"), "chunk {chunk}");
            assert_eq!(rest, TRAILER);
        }
        let (r, rest) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", 7).await;
        assert_eq!(r.unwrap(), addr("[2001:db8::7]:51000"));
        assert_eq!(rest, TRAILER);
        // The shortest header, read in one go.
        let (r, rest) = parse(b"PROXY UNKNOWN\r\n", 1000).await;
        assert_eq!(r.unwrap(), Source::Socket);
        assert_eq!(rest, TRAILER);
        // UNKNOWN may carry addresses; they are ignored.
        let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), V1_MAX);
        let (r, rest) = parse(line, 1000).await;
        assert_eq!(r.unwrap(), Source::Socket);
        assert_eq!(rest, TRAILER);
    }

    #[tokio::test]
    async fn v2_carries_the_client_and_leaves_the_rest_unread() {
        let mut payload = v2_ipv4([198, 51, 100, 9], 40000);
        // A TLV (PP2_TYPE_AWS-like) after the addresses is skipped.
        payload.extend([0xEA, 0, 3, 1, 2, 3]);
        for chunk in [1, 5, 1000] {
            let (r, rest) = parse(&v2(1, 0x11, &payload), chunk).await;
            assert_eq!(r.unwrap(), addr("198.51.100.9:40000"), "chunk {chunk}");
            assert_eq!(rest, TRAILER);
        }
        let mut v6 = "::ffff:192.0.2.5"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        v6.extend([0; 16]);
        v6.extend([0x1F, 0x90, 0x01, 0xBB]);
        let (r, rest) = parse(&v2(1, 0x21, &v6), 1000).await;
        assert_eq!(r.unwrap(), addr("192.0.2.5:8080"), "IPv4-mapped is IPv4");
        assert_eq!(rest, TRAILER);
    }

    #[tokio::test]
    async fn v2_local_unspec_and_unix_keep_the_socket_address() {
        let cases = [
            v2(0, 0x11, &v2_ipv4([198, 51, 100, 9], 1)),
            v2(0, 0x00, &[]),
            v2(1, 0x00, &[]),
            v2(1, 0x31, &[0; 216]),
        ];
        for header in cases {
            let (r, rest) = parse(&header, 1000).await;
            assert_eq!(r.unwrap(), Source::Socket, "{header:02x?}");
            assert_eq!(rest, TRAILER);
        }
        let peer = "127.0.0.1:5".parse().unwrap();
        assert_eq!(Source::Socket.or(peer), peer);
        assert_eq!(addr("192.0.2.1:1").or(peer), "192.0.2.1:1".parse().unwrap());
    }

    #[tokio::test]
    async fn what_is_not_a_header_is_refused() {
        let client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 random bytes";
        let (r, _) = parse(client_hello, 1000).await;
        assert!(
            matches!(r, Err(ProxyHeaderError::Missing([0x16, 3, 1, 2]))),
            "{r:?}"
        );
        let (r, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1000).await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing(_))), "{r:?}");
        for bad in [
            &b"PROXY TCP4 203.0.113.7\r\n"[..],
            b"PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n",
            b"PROXY TCP5 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\r\n",
        ] {
            let (r, _) = parse(bad, 1000).await;
            assert!(matches!(r, Err(ProxyHeaderError::V1(_))), "{bad:?}: {r:?}");
        }
        let mut bad_version = v2(1, 0x11, &v2_ipv4([1, 2, 3, 4], 1));
        bad_version[12] = 0x11;
        let (r, _) = parse(&bad_version, 1000).await;
        assert!(matches!(r, Err(ProxyHeaderError::V2(_))), "{r:?}");
        // Shorter than the family's addresses.
        let (r, _) = parse(&v2(1, 0x11, &[1, 2, 3, 4]), 1000).await;
        assert!(matches!(r, Err(ProxyHeaderError::V2(_))), "{r:?}");
    }

    #[tokio::test]
    async fn reads_are_bounded() {
        // A v1 line without CRLF: refused after exactly V1_MAX bytes, the rest unread.
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 300]].concat();
        let (r, rest) = parse(&endless, 1000).await;
        assert!(matches!(r, Err(ProxyHeaderError::V1TooLong)), "{r:?}");
        assert_eq!(rest.len(), endless.len() + TRAILER.len() - V1_MAX);
        // A v2 header announcing 65535 bytes: refused from its fixed part.
        let mut huge = v2(1, 0x11, &v2_ipv4([1, 2, 3, 4], 1));
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        let (r, rest) = parse(&huge, 1000).await;
        assert!(
            matches!(r, Err(ProxyHeaderError::V2TooLong(65535))),
            "{r:?}"
        );
        assert_eq!(rest.len(), huge.len() + TRAILER.len() - V2_FIXED);
        // The largest accepted payload is read.
        let mut largest = v2_ipv4([192, 0, 2, 1], 7);
        largest.resize(V2_MAX_PAYLOAD, 0);
        // Pad with one NOOP TLV so the payload stays well-formed.
        let tlv_len = (V2_MAX_PAYLOAD - 12 - 3) as u16;
        largest[12] = 0x04;
        largest[13..15].copy_from_slice(&tlv_len.to_be_bytes());
        let (r, rest) = parse(&v2(1, 0x11, &largest), 1000).await;
        assert_eq!(r.unwrap(), addr("192.0.2.1:7"));
        assert_eq!(rest, TRAILER);
    }

    #[tokio::test]
    async fn a_stream_ending_inside_the_header_is_an_error() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PROXY TCP4 203.0.113.7 ").await.unwrap();
        drop(client);
        let r = read_proxy_header(&mut server).await;
        assert!(matches!(r, Err(ProxyHeaderError::Io(_))), "{r:?}");
    }
}
