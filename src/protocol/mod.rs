//! The Link IoT Edge WebSocket JSON codec (PROTOCOL.md sections 3-8). Sans-IO.
//!
//! Owns: turning one WebSocket message into a checked [`Inbound`] request or reply (or the
//! [`Reject`] that must be answered), and writing replies and server requests as compact JSON.
//! Never: model validation (see `model`), device state (see `session`), IO or the clock.

mod code;
mod decode;
mod encode;
pub mod json;

pub use code::Code;
pub use decode::{strip_trailing, Decoder, Inbound, Item, Method, Reject, Reply, Request};
pub use encode::{
    finish_request, start_client_reply, start_client_request, start_request, write_reply,
    ServerMethod,
};
