//! The wire protocol (PROTOCOL.md).
//!
//! It covers envelopes, their decoding with precise errors, their encoding, binary
//! envelopes, and the table of error and close codes.

pub mod codes;
mod decode;
mod encode;
mod frame;
mod raw_json;
mod room;
pub mod stream_frame;

pub use codes::{CloseCode, CloseReason, ErrorCode, HttpFailure, Rejection, TransportFault};
pub use decode::{
    check_data, decode_binary, decode_json, DataError, DecodeError, InvalidRequest, Payload,
    Request, RequestId, MAX_DATA_DEPTH, MAX_METHOD_LEN,
};
pub use encode::{
    AckFields, AckMembers, MemberInfo, MessageFrame, MessageKind, PresenceEvent, ResyncReason,
    ServerFrame,
};
pub use frame::{Outbound, TransportKind};
pub use raw_json::RawJson;
pub use room::{RoomName, RoomNameError, MAX_ROOM_NAME_LEN};
