//! Frame writers: append one complete frame to a caller's transmit buffer.
//!
//! Owns the sending half of RFC 6455 5.2. Headers are produced by
//! `fastwebsockets::Frame::fmt_head`; payloads are masked in place in the output buffer with
//! [`apply_mask`] (XOR is its own inverse). The caller picks the mask: `Some` for a
//! client (a fresh one per frame), `None` for a server. No IO, no clock; only `out` grows.

use fastwebsockets::{Frame, Payload};

use crate::ws::frame::{apply_mask, Opcode, MAX_HEADER_LEN};

/// Appends one frame carrying `payload` to `out`.
pub fn write_frame(
    out: &mut Vec<u8>,
    opcode: Opcode,
    fin: bool,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    let mut head = [0; MAX_HEADER_LEN];
    let head_len = head_for(&mut head, opcode, fin, mask, payload);
    out.reserve(head_len + payload.len());
    out.extend_from_slice(&head[..head_len]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[start..], mask);
    }
}

/// Appends one final frame whose payload `f` writes straight into `out`.
///
/// Room for the shortest header is reserved before `f` runs; if the payload turns out to need
/// a longer header (126 bytes or more), the payload is moved right once to make room. `f` must
/// only append to the buffer it is given.
pub fn write_frame_with(
    out: &mut Vec<u8>,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    let reserved = 2 + if mask.is_some() { 4 } else { 0 };
    out.resize(start + reserved, 0);
    f(out);
    let payload_start = start + reserved;
    let mut head = [0; MAX_HEADER_LEN];
    let head_len = head_for(&mut head, opcode, true, mask, &out[payload_start..]);
    if head_len > reserved {
        let end = out.len();
        out.resize(end + head_len - reserved, 0);
        out.copy_within(payload_start..end, start + head_len);
    }
    out[start..start + head_len].copy_from_slice(&head[..head_len]);
    if let Some(mask) = mask {
        apply_mask(&mut out[start + head_len..], mask);
    }
}

/// Appends a Close frame with `code` and `reason`; the reason is cut (at a character boundary)
/// so that the payload fits the 125 bytes allowed for a control frame.
pub fn write_close(out: &mut Vec<u8>, mask: Option<[u8; 4]>, code: u16, reason: &str) {
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    write_frame(out, Opcode::Close, true, mask, &payload[..2 + cut]);
}

/// Appends a Ping frame; `payload` is cut to 125 bytes.
pub fn write_ping(out: &mut Vec<u8>, mask: Option<[u8; 4]>, payload: &[u8]) {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    write_frame(out, Opcode::Ping, true, mask, payload);
}

/// Writes the header for `payload` into `head` and returns its length.
fn head_for(
    head: &mut [u8; MAX_HEADER_LEN],
    opcode: Opcode,
    fin: bool,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) -> usize {
    Frame::new(
        fin,
        opcode.to_fastwebsockets(),
        mask,
        Payload::Borrowed(payload),
    )
    .fmt_head(head)
}

/// "All control frames MUST have a payload length of 125 bytes or less" (RFC 6455 5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::parse_header;

    fn roundtrip(opcode: Opcode, mask: Option<[u8; 4]>, n: usize, head_len: usize) {
        let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
        let mut out = vec![0xAA];
        write_frame(&mut out, opcode, true, mask, &payload);
        let h = parse_header(&out[1..]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.len),
            (true, opcode, mask, head_len)
        );
        assert_eq!(h.payload_len, n as u64);
        assert_eq!(out.len(), 1 + head_len + n);
        let mut body = out[1 + head_len..].to_vec();
        if let Some(m) = mask {
            // An independent unmasker as the oracle: `apply_mask` twice is the identity
            // even where it is wrong.
            fastwebsockets::unmask(&mut body, m);
        }
        assert_eq!(body, payload);

        // The same frame produced through write_frame_with is byte-identical.
        let mut with = vec![0xAA];
        write_frame_with(&mut with, opcode, mask, |b| b.extend_from_slice(&payload));
        assert_eq!(with, out);
    }

    #[test]
    fn frame_sizes() {
        for (n, head) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            roundtrip(Opcode::Text, None, n, head);
            roundtrip(Opcode::Binary, Some([1, 2, 3, 0xFF]), n, head + 4);
        }
    }

    #[test]
    fn close_frame_layout() {
        let mut out = Vec::new();
        write_close(&mut out, None, 1001, "bye");
        assert_eq!(out, [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
        let mut out = Vec::new();
        write_close(&mut out, None, 1000, &"é".repeat(100));
        // 2 + 122 bytes: 61 two-byte characters, cut at a boundary.
        assert_eq!(out[1], 124);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn ping_is_capped() {
        let mut out = Vec::new();
        write_ping(&mut out, None, &[7; 300]);
        assert_eq!(out.len(), 2 + 125);
        assert_eq!(out[0], 0x89);
    }
}
