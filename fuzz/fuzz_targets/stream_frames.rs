//! Any bytes, split at any point, through the WebTransport message-stream frame decoder:
//! frames never exceed the limit, the buffer stays bounded, nothing panics.
#![no_main]
use bytes::BytesMut;
use gateway_core::protocol::stream_frame::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = data[0] as usize * 16;
    let split = (data[1] as usize).min(data.len() - 2);
    let body = &data[2..];
    let decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    for chunk in [&body[..split], &body[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some((_, payload))) => assert!(payload.len() <= max),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.wanted(&buf) <= max + 5);
    }
});
