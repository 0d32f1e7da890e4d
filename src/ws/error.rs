//! Errors of the `ws` layer, split by who is at fault.
//!
//! Owns [`WsError`] and its parts. Every peer fault maps once, here, to the close code that ends
//! the connection ([`WsError::close_code`]) or to the HTTP status that rejects the upgrade
//! ([`HandshakeError::status`]), and to a short label for metrics (`as_str`). No IO, no clock.
//!
//! `size_of::<WsError>()` is pinned small by a test: errors travel by value on the read path.

/// Why a connection failed. Returned by `Conn::read`; the matching close frame or HTTP error
/// response has already been queued when the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The peer broke a framing rule of RFC 6455 (close code 1002).
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolViolation),
    /// A data message (all its fragments together) is larger than `Limits::max_message_bytes`
    /// (close code 1009). `size` is what the peer declared so far, not what was buffered.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    Capacity {
        /// Bytes the message would have reached with the frame that crossed the limit.
        size: u64,
        /// The configured limit, saturated to `u32::MAX`.
        limit: u32,
    },
    /// A TEXT message or a close reason is not valid UTF-8 (close code 1007).
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    /// The opening handshake was refused (an HTTP error response was queued, no close code).
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
}

impl WsError {
    /// The close code sent to the peer for this error, `None` for a refused handshake (which
    /// gets an HTTP status instead, see [`HandshakeError::status`]).
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::Protocol(_) => Some(CloseCode::Protocol),
            Self::Capacity { .. } => Some(CloseCode::TooBig),
            Self::InvalidUtf8 => Some(CloseCode::InvalidPayload),
            Self::Handshake(_) => None,
        }
    }

    /// A stable, low-cardinality label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Protocol(v) => v.as_str(),
            Self::Capacity { .. } => "message_too_big",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::Handshake(h) => h.as_str(),
        }
    }
}

/// One RFC 6455 framing rule the peer broke. Each variant is named after the rule; all of them
/// close the connection with 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// A server received a frame without a masking key (RFC 6455 5.1).
    #[error("client frame is not masked")]
    UnmaskedFrameFromClient,
    /// A client received a masked frame (RFC 6455 5.1).
    #[error("server frame is masked")]
    MaskedFrameFromServer,
    /// RSV1, RSV2 or RSV3 is set although no extension was negotiated (RFC 6455 5.2).
    #[error("reserved bits set without a negotiated extension")]
    ReservedBitsSet,
    /// The opcode is one of the reserved values 0x3-0x7 or 0xB-0xF (RFC 6455 5.2).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// The most significant bit of a 64-bit payload length is set (RFC 6455 5.2).
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
    /// A control frame carries more than 125 bytes (RFC 6455 5.5).
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// A control frame has FIN clear (RFC 6455 5.5).
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A continuation frame arrived with no fragmented message in progress (RFC 6455 5.4).
    #[error("continuation frame without a message to continue")]
    ContinuationWithoutStart,
    /// A TEXT or BINARY frame arrived while a fragmented message was in progress (RFC 6455 5.4).
    #[error("new data frame inside a fragmented message")]
    DataFrameInsideFragmentedMessage,
    /// A Close frame carries a 1-byte payload (RFC 6455 5.5.1).
    #[error("close frame payload of 1 byte")]
    CloseFrameTooShort,
    /// A Close frame carries a status code that may not be sent on the wire (RFC 6455 7.4).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
}

impl ProtocolViolation {
    /// A stable, low-cardinality label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::UnmaskedFrameFromClient => "unmasked_frame_from_client",
            Self::MaskedFrameFromServer => "masked_frame_from_server",
            Self::ReservedBitsSet => "reserved_bits_set",
            Self::ReservedOpcode(_) => "reserved_opcode",
            Self::LengthMsbSet => "length_msb_set",
            Self::ControlFrameTooLong => "control_frame_too_long",
            Self::FragmentedControlFrame => "fragmented_control_frame",
            Self::ContinuationWithoutStart => "continuation_without_start",
            Self::DataFrameInsideFragmentedMessage => "data_frame_inside_fragmented_message",
            Self::CloseFrameTooShort => "close_frame_too_short",
            Self::InvalidCloseCode(_) => "invalid_close_code",
        }
    }
}

/// Why an opening handshake failed, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request head did not end within `Limits::max_handshake_bytes` (HTTP 431).
    #[error("request head exceeds the handshake size limit")]
    TooLarge,
    /// The bytes are not a well-formed HTTP/1.x message head (HTTP 400).
    #[error("malformed HTTP message: {0}")]
    Malformed(httparse::Error),
    /// "The method of the request MUST be GET" (RFC 6455 4.1) (HTTP 400).
    #[error("method is not GET")]
    NotGet,
    /// "the HTTP version MUST be at least 1.1" (RFC 6455 4.1) (HTTP 400).
    #[error("HTTP version is not 1.1")]
    NotHttp11,
    /// No `Upgrade: websocket` header: this is not a WebSocket upgrade (HTTP 400).
    #[error("missing `Upgrade: websocket`")]
    NotUpgrade,
    /// No `upgrade` token in the `Connection` header (HTTP 400).
    #[error("missing `Connection: Upgrade`")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Key` is missing, repeated, or not 16 bytes in base64 (HTTP 400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    InvalidKey,
    /// `Sec-WebSocket-Version` is missing or not 13 (HTTP 426 naming version 13).
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    UnsupportedVersion,
    /// Client side: the server answered with a status other than 101.
    #[error("server answered with status {0} instead of 101")]
    UnexpectedStatus(u16),
    /// Client side: `Sec-WebSocket-Accept` is missing or does not match our key.
    #[error("missing or wrong Sec-WebSocket-Accept")]
    AcceptMismatch,
    /// Client side: the server selected an extension although we offered none.
    #[error("server selected an extension that was not offered")]
    UnexpectedExtension,
}

impl HandshakeError {
    /// The HTTP status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge => 431,
            Self::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// A stable, low-cardinality label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TooLarge => "handshake_too_large",
            Self::Malformed(_) => "handshake_malformed",
            Self::NotGet => "handshake_not_get",
            Self::NotHttp11 => "handshake_not_http11",
            Self::NotUpgrade => "handshake_not_upgrade",
            Self::MissingConnectionUpgrade => "handshake_missing_connection_upgrade",
            Self::InvalidKey => "handshake_invalid_key",
            Self::UnsupportedVersion => "handshake_unsupported_version",
            Self::UnexpectedStatus(_) => "handshake_unexpected_status",
            Self::AcceptMismatch => "handshake_accept_mismatch",
            Self::UnexpectedExtension => "handshake_unexpected_extension",
        }
    }
}

/// The close codes ringlink sends (RFC 6455 7.4.1). Use `u16::from(code)` where a raw code is
/// wanted (`Conn::close`, `Event::Closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    Normal = 1000,
    /// 1001: the endpoint is going away (server shutdown, drain).
    GoingAway = 1001,
    /// 1002: the peer broke the protocol.
    Protocol = 1002,
    /// 1003: a type of data the endpoint cannot accept.
    Unsupported = 1003,
    /// 1007: data inconsistent with the message type (bad UTF-8 in TEXT).
    InvalidPayload = 1007,
    /// 1008: a message that violates the endpoint's policy.
    Policy = 1008,
    /// 1009: a message too big to process.
    TooBig = 1009,
    /// 1011: an unexpected condition on the server.
    Internal = 1011,
}

impl CloseCode {
    /// Whether `code` may appear in a Close frame on the wire (RFC 6455 7.4): 1000-1003,
    /// 1007-1011 and the registered/private range 3000-4999. 1004-1006 and 1015 are reserved
    /// for local use, everything else below 3000 is unassigned.
    pub fn is_sendable(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code as Self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_small() {
        assert!(size_of::<WsError>() <= 16, "{}", size_of::<WsError>());
        assert!(size_of::<HandshakeError>() <= 4);
        assert!(size_of::<ProtocolViolation>() <= 4);
    }

    #[test]
    fn close_codes_by_cause() {
        let p = WsError::from(ProtocolViolation::ReservedBitsSet);
        assert_eq!(p.close_code(), Some(CloseCode::Protocol));
        assert_eq!(p.as_str(), "reserved_bits_set");
        let c = WsError::Capacity {
            size: 70_000,
            limit: 65_536,
        };
        assert_eq!(c.close_code().map(u16::from), Some(1009));
        assert_eq!(WsError::InvalidUtf8.close_code().map(u16::from), Some(1007));
        let h = WsError::from(HandshakeError::UnsupportedVersion);
        assert_eq!(h.close_code(), None);
        assert_eq!(h.as_str(), "handshake_unsupported_version");
    }

    #[test]
    fn sendable_close_codes() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert!(CloseCode::is_sendable(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2999, 5000, 65_535,
        ] {
            assert!(!CloseCode::is_sendable(bad), "{bad}");
        }
    }

    #[test]
    fn handshake_statuses() {
        assert_eq!(HandshakeError::TooLarge.status(), 431);
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert_eq!(HandshakeError::NotUpgrade.status(), 400);
    }
}
