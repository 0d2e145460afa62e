//! Property tests: any byte input to the decoders yields a value or a clean error.

use bytes::{Bytes, BytesMut};
use gateway_core::protocol::{
    decode_binary, decode_json,
    stream_frame::{encode_header, FrameDecoder, FrameKind},
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn json_decoder_total(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_json(&Bytes::from(input));
    }

    #[test]
    fn json_decoder_on_envelope_like_text(
        ty in prop::sample::select(vec!["hello", "auth", "join", "leave", "publish", "send", "presence", "ping", "x"]),
        fields in proptest::collection::vec(("[a-z]{1,8}", any::<i64>()), 0..6),
    ) {
        let mut s = format!(r#"{{"type":"{ty}""#);
        for (k, v) in fields {
            s.push_str(&format!(r#","{k}":{v}"#));
        }
        s.push('}');
        let _ = decode_json(&Bytes::from(s));
    }

    #[test]
    fn binary_decoder_total(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_binary(&Bytes::from(input));
    }

    #[test]
    fn frame_decoder_total_and_bounded(
        input in proptest::collection::vec(any::<u8>(), 0..1024),
        max in 0usize..256,
    ) {
        let decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::from(&input[..]);
        while let Ok(Some((_, payload))) = decoder.decode(&mut buf) {
            prop_assert!(payload.len() <= max);
        }
        prop_assert!(decoder.wanted(&buf) <= max + 5);
    }

    #[test]
    fn frame_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut wire = encode_header(FrameKind::Binary, payload.len()).to_vec();
        wire.extend_from_slice(&payload);
        let mut buf = BytesMut::from(&wire[..]);
        let (kind, got) = FrameDecoder::new(300).decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(kind, FrameKind::Binary);
        prop_assert_eq!(&got[..], &payload[..]);
    }
}
