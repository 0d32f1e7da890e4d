//! The RFC 6455 base frame header: opcodes and a "need more" header parser.
//!
//! Owns the byte layout of section 5.2 and the checks that need nothing but the header itself
//! (reserved bits, reserved opcodes, control frame size and FIN, the 64-bit length MSB).
//! Role-dependent rules (masking) and message-level rules (fragmentation, size limits, UTF-8)
//! belong to `conn`. No IO, no clock, no allocation.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```
//!
//! Always: `2 <= Header::len <= MAX_HEADER_LEN`, and `parse_header` returning `Ok(None)` means
//! fewer than `Header::len` bytes were available; nothing is consumed.

use crate::ws::error::ProtocolViolation;

/// A frame opcode (RFC 6455 5.2). The reserved values are rejected by [`parse_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// 0x0: continues a fragmented message.
    Continuation = 0x0,
    /// 0x1: a UTF-8 text message (or its first fragment).
    Text = 0x1,
    /// 0x2: a binary message (or its first fragment).
    Binary = 0x2,
    /// 0x8: connection close.
    Close = 0x8,
    /// 0x9: ping.
    Ping = 0x9,
    /// 0xA: pong.
    Pong = 0xA,
}

impl Opcode {
    /// Whether this is a control opcode (Close, Ping, Pong).
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }

    /// The opcode for a 4-bit wire value, `None` for a reserved one.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    pub(crate) fn to_fastwebsockets(self) -> fastwebsockets::OpCode {
        match self {
            Self::Continuation => fastwebsockets::OpCode::Continuation,
            Self::Text => fastwebsockets::OpCode::Text,
            Self::Binary => fastwebsockets::OpCode::Binary,
            Self::Close => fastwebsockets::OpCode::Close,
            Self::Ping => fastwebsockets::OpCode::Ping,
            Self::Pong => fastwebsockets::OpCode::Pong,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN: this is the final fragment of a message.
    pub fin: bool,
    /// The opcode (never a reserved value).
    pub opcode: Opcode,
    /// The masking key, if the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// The declared payload length. Peer-controlled: check it against a limit before using it
    /// to size anything.
    pub payload_len: u64,
    /// The length of the header itself on the wire, `2..=MAX_HEADER_LEN`.
    pub len: usize,
}

/// Parses a frame header from the front of `buf`.
///
/// `Ok(None)`: `buf` does not hold the whole header yet; nothing is consumed. `Err`: the header
/// breaks a rule that needs no connection state. The payload is not looked at.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtocolViolation> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };

    // "MUST be 0 unless an extension is negotiated that defines meanings for non-zero values"
    // (5.2); ringlink negotiates no extension.
    if b0 & 0x70 != 0 {
        return Err(ProtocolViolation::ReservedBitsSet);
    }
    let fin = b0 & 0x80 != 0;
    let raw_opcode = b0 & 0x0F;
    // "If an unknown opcode is received, the receiving endpoint MUST _Fail the WebSocket
    // Connection_." (5.2)
    let Some(opcode) = Opcode::from_u8(raw_opcode) else {
        return Err(ProtocolViolation::ReservedOpcode(raw_opcode));
    };
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        // "All control frames MUST have a payload length of 125 bytes or less and MUST NOT be
        // fragmented." (5.5)
        if len7 > 125 {
            return Err(ProtocolViolation::ControlFrameTooLong);
        }
        if !fin {
            return Err(ProtocolViolation::FragmentedControlFrame);
        }
    }

    let ext_len = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let len = 2 + ext_len + if masked { 4 } else { 0 };
    if buf.len() < len {
        return Ok(None);
    }
    let payload_len = match len7 {
        126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        127 => {
            let mut b = [0; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            // "the most significant bit MUST be 0" (5.2)
            if n >> 63 != 0 {
                return Err(ProtocolViolation::LengthMsbSet);
            }
            n
        }
        n => u64::from(n),
    };
    let mask = if masked {
        let at = 2 + ext_len;
        Some([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        payload_len,
        len,
    }))
}

/// The longest header: 2 bytes, a 64-bit length and a masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// XORs `payload` with the masking key `mask` repeated from its first byte (RFC 6455 5.3);
/// masking and unmasking are the same operation.
///
/// Works 32 bytes at a time on fixed-size arrays, which the compiler turns into SSE2 loads,
/// XORs and stores on any x86-64 (and NEON on aarch64); `fastwebsockets::unmask` goes word by
/// word with a byte loop at each end. `benches/ws.rs` (`ws_parts`) runs both side by side.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    const WIDE: usize = 32;
    let mut key = [0_u8; WIDE];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[i % 4];
    }
    let mut blocks = payload.chunks_exact_mut(WIDE);
    for block in &mut blocks {
        for (b, k) in block.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    // The rest starts at a multiple of 32, so the key lines up from its first byte again.
    for (b, k) in blocks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_matches_the_rfc_byte_by_byte_at_every_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..200 {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut masked = data.clone();
            apply_mask(&mut masked, mask);
            // RFC 6455 5.3: transformed-octet-i = original-octet-i XOR masking-key-octet-(i MOD 4)
            let expected: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(masked, expected, "length {len}");
            apply_mask(&mut masked, mask);
            assert_eq!(masked, data, "twice is the identity, length {len}");
        }
    }

    #[test]
    fn short_header_needs_more() {
        assert_eq!(parse_header(&[]), Ok(None));
        assert_eq!(parse_header(&[0x81]), Ok(None));
        // 16-bit length, masked: 8 bytes needed.
        assert_eq!(parse_header(&[0x81, 0xFE, 0, 200, 1, 2, 3]), Ok(None));
        // 64-bit length, unmasked: 10 bytes needed.
        assert_eq!(parse_header(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0]), Ok(None));
    }

    #[test]
    fn parses_the_three_length_forms() {
        let h = parse_header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                fin: true,
                opcode: Opcode::Text,
                mask: Some([1, 2, 3, 4]),
                payload_len: 5,
                len: 6
            }
        );
        let h = parse_header(&[0x02, 0x7E, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, h.len),
            (false, Opcode::Binary, None, 256, 4)
        );
        let h = parse_header(&[0x80, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 9, 9, 9, 9])
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.opcode, h.payload_len, h.len),
            (Opcode::Continuation, 65_536, 14)
        );
        assert_eq!(h.mask, Some([9; 4]));
    }

    #[test]
    fn rejects_reserved_bits() {
        for rsv in [0x40, 0x20, 0x10] {
            assert_eq!(
                parse_header(&[0x81 | rsv, 0x80]),
                Err(ProtocolViolation::ReservedBitsSet)
            );
        }
    }

    #[test]
    fn rejects_reserved_opcodes() {
        for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                parse_header(&[0x80 | op, 0x80]),
                Err(ProtocolViolation::ReservedOpcode(op))
            );
        }
    }

    #[test]
    fn control_frames_are_short_and_final() {
        assert_eq!(
            parse_header(&[0x89, 0xFE, 0, 126]),
            Err(ProtocolViolation::ControlFrameTooLong)
        );
        assert_eq!(
            parse_header(&[0x09, 0x80]),
            Err(ProtocolViolation::FragmentedControlFrame)
        );
        assert!(parse_header(&[0x89, 0xFD]).unwrap().is_none());
        assert!(parse_header(&[0x89, 0x7D]).unwrap().is_some());
    }

    #[test]
    fn rejects_length_msb() {
        assert_eq!(
            parse_header(&[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolViolation::LengthMsbSet)
        );
    }

    #[test]
    fn control_opcodes() {
        assert!(
            Opcode::Close.is_control() && Opcode::Ping.is_control() && Opcode::Pong.is_control()
        );
        assert!(!Opcode::Text.is_control() && !Opcode::Continuation.is_control());
    }
}
