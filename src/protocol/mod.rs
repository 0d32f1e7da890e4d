//! The Link IoT Edge WebSocket JSON codec (PROTOCOL.md sections 3-8). Sans-IO.

mod code;

pub use code::Code;
