//! Minimal WebSocket and message-stream framing for the load generator: client frames are
//! masked; server frames are read without copying their payload out of the buffer.

use bytes::{Buf, BytesMut};

/// WebSocket opcodes used here.
pub mod opcode {
    /// Text.
    pub const TEXT: u8 = 0x1;
    /// Binary.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Appends a masked client frame.
pub fn ws_frame(out: &mut Vec<u8>, op: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | op);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// Parses one server frame at the front of `buf`: (opcode, payload start, payload end,
/// frame end), or `None` when incomplete.
pub fn ws_parse(buf: &[u8]) -> Option<(u8, usize, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0F;
    let len7 = (buf[1] & 0x7F) as usize;
    let (len, start) = match len7 {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
        }
        n => (n, 2),
    };
    if buf.len() < start + len {
        return None;
    }
    Some((op, start, start + len, start + len))
}

/// The data of a binary envelope (after its JSON header).
pub fn envelope_payload(envelope: &[u8]) -> Option<&[u8]> {
    if envelope.len() < 2 {
        return None;
    }
    let n = u16::from_be_bytes([envelope[0], envelope[1]]) as usize;
    envelope.get(2 + n..)
}

/// Builds a binary envelope: `u16` header length, the JSON `header`, `payload`.
pub fn envelope(header: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u16).to_be_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Builds a binary publish envelope for `room` carrying `payload`.
pub fn publish_envelope(room: &str, payload: &[u8]) -> Vec<u8> {
    envelope(&format!(r#"{{"type":"publish","room":"{room}"}}"#), payload)
}

/// Appends a message-stream frame (kind, u32 length, payload).
pub fn stream_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Takes one message-stream frame from `buf`: (kind, payload).
pub fn stream_take(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    let kind = buf[0];
    buf.advance(5);
    Some((kind, buf.split_to(len)))
}
