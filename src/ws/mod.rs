//! RFC 6455 WebSocket framing, server and client side. Sans-IO.
//!
//! Owns the opening handshake ([`handshake`]), the frame header ([`frame`]), frame writers
//! ([`encode`]) and the per-connection state machine [`Conn`] that applies the rules of RFC 6455
//! and PROTOCOL.md sections 2-3: masking, reserved bits and opcodes, control frame limits,
//! fragmentation and reassembly, the message size limit, UTF-8 of TEXT, and the close handshake.
//!
//! Never does IO, never reads the clock, never spawns. Bytes come in through [`Conn::read`] and
//! every byte the protocol obliges us to send (101, Pong, echoed Close, error Close, HTTP
//! 400/426/431) is appended to a caller-owned transmit buffer. Peer input never panics: it is an
//! [`Event`] or a [`WsError`].

pub mod encode;
pub mod frame;
pub mod handshake;

mod conn;
mod echo;
mod error;

pub use conn::{Conn, Event, Role};
pub use echo::Echo;
pub use error::{CloseCode, HandshakeError, ProtocolViolation, WsError};

/// Bytes a connection may have waiting to be sent before its driver stops reading from it (the
/// peer is not reading): the echo endpoint's and the Link session's limit.
pub const MAX_QUEUED_BYTES: usize = 256 * 1024;

/// Size limits of one connection. Both bound what a peer can make us hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest data message, all fragments together (default 65536 = `max_frame_bytes` of
    /// PROTOCOL.md section 3). Device JSON is small; a bigger message is a peer trying to pin
    /// memory and is closed with 1009 as soon as its header announces it.
    pub max_message_bytes: usize,
    /// Largest opening handshake request head (default 8192). Bounds the buffer a client can
    /// fill before it has proven it speaks WebSocket; longer heads get HTTP 431.
    pub max_handshake_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65_536,
            max_handshake_bytes: 8192,
        }
    }
}
