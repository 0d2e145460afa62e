//! Any bytes as a binary envelope: a request or a clean error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gateway_core::protocol::decode_binary(&bytes::Bytes::copy_from_slice(data));
});
