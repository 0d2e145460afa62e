//! Framing of the WebTransport message stream (PROTOCOL.md section 3).
//!
//! A frame is `kind: u8` (0 = JSON, 1 = binary envelope), `len: u32` big-endian, payload.
//! Sans-IO: the adapter appends bytes to a buffer and takes whole frames out; a frame over
//! the limit is refused from its header, before its payload is buffered.

use bytes::{Buf, Bytes, BytesMut};

/// Length of a frame header.
pub const HEADER_LEN: usize = 5;

/// The kind of a framed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A JSON envelope.
    Json,
    /// A binary envelope.
    Binary,
}

impl FrameKind {
    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            FrameKind::Json => 0x00,
            FrameKind::Binary => 0x01,
        }
    }
}

/// A frame that cannot be accepted; the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The `kind` byte is neither 0 nor 1.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// `len` exceeds the endpoint's `max_message_bytes`.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// The header of a frame of `kind` with a payload of `len` bytes.
pub fn encode_header(kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
    let len = u32::try_from(len).expect("frames are far below 4 GiB");
    let l = len.to_be_bytes();
    [kind.byte(), l[0], l[1], l[2], l[3]]
}

/// Takes frames out of a receive buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads over `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// How many more bytes `buf` needs before [`decode`](Self::decode) can make progress.
    ///
    /// Never more than the current frame; lets the reader bound its buffer.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return HEADER_LEN - buf.len();
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        (HEADER_LEN + len.min(self.max_len))
            .saturating_sub(buf.len())
            .max(1)
    }

    /// Takes one whole frame from the front of `buf`, if there is one. An error is final.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<(FrameKind, Bytes)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = match buf[0] {
            0x00 => FrameKind::Json,
            0x01 => FrameKind::Binary,
            other => return Err(FrameError::UnknownKind(other)),
        };
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_len,
            });
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        Ok(Some((kind, buf.split_to(len).freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_header(FrameKind::Json, 2));
        wire.extend_from_slice(b"{}");
        wire.extend_from_slice(&encode_header(FrameKind::Binary, 3));
        wire.extend_from_slice(&[1, 2, 3]);
        let d = FrameDecoder::new(16);
        for split in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut frames = Vec::new();
            while let Some(f) = d.decode(&mut buf).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                frames.push(f);
            }
            assert_eq!(
                frames,
                vec![
                    (FrameKind::Json, Bytes::from_static(b"{}")),
                    (FrameKind::Binary, Bytes::from_static(&[1, 2, 3]))
                ]
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let d = FrameDecoder::new(10);
        let mut buf = BytesMut::from(&encode_header(FrameKind::Json, 11)[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let mut buf = BytesMut::from(&[7u8, 0, 0, 0, 0][..]);
        assert_eq!(d.decode(&mut buf), Err(FrameError::UnknownKind(7)));
    }

    #[test]
    fn wanted_never_exceeds_the_current_frame() {
        let d = FrameDecoder::new(100);
        assert_eq!(d.wanted(&[]), 5);
        assert_eq!(d.wanted(&encode_header(FrameKind::Json, 10)), 10);
        assert_eq!(
            d.wanted(&encode_header(FrameKind::Json, u32::MAX as usize)),
            100
        );
    }
}
