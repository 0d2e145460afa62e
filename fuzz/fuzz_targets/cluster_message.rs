//! Any bytes as a cluster channel message (the channel name, a newline, the payload): a
//! message or nothing, never a panic; a decoded message encodes to bytes that decode to
//! it again.
#![no_main]
use bytes::Bytes;
use gateway_cluster_proto::message::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(channel) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let payload = Bytes::copy_from_slice(data.get(split + 1..).unwrap_or_default());
    if let Some(message) = decode(channel, payload) {
        let (channel, bytes) = message.encode();
        assert_eq!(decode(&channel, bytes.into()), Some(message));
    }
});
