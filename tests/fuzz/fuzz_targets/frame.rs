//! Drives a server `Conn` after a fixed valid handshake with arbitrary bytes, cut into chunks
//! chosen by the first input byte, like a driver would feed it.
//!
//! Invariants: no panic; every step consumes `0 < n <= input.len()` (NeedMore consumes
//! nothing); messages are at most the limit and TEXT is UTF-8; on error the conn is closed and
//! a Close frame was queued; Pong replies are unmasked frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlink::ws::{Conn, Event, Limits};

const HANDSHAKE: &[u8] = b"GET // HTTP/1.1\r\nHost: 10.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\nSec-WebSocket-Version: 13\r\n\r\n";

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&chunking, bytes)) = data.split_first() else {
        return;
    };
    let mut conn = Conn::server(Limits {
        max_message_bytes: LIMIT,
        ..Limits::default()
    });
    let mut tx = Vec::new();
    let mut hs = HANDSHAKE.to_vec();
    assert_eq!(conn.read(&mut hs, &mut tx), Ok(Event::Consumed(HANDSHAKE.len())));
    assert!(conn.is_open());
    tx.clear();

    // Chunk sizes cycle through 1..=chunking (0 means all at once).
    let mut buf = Vec::new();
    let mut rest = bytes;
    let mut step = 0usize;
    while !rest.is_empty() {
        let n = if chunking == 0 {
            rest.len()
        } else {
            1 + step % usize::from(chunking)
        }
        .min(rest.len());
        step += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let len = buf.len();
            let closed_before = conn.is_closed();
            let consumed = match conn.read(&mut buf, &mut tx) {
                Err(e) => {
                    assert!(conn.is_closed() && !conn.is_open());
                    if !closed_before {
                        assert!(e.close_code().is_some());
                        assert!(!tx.is_empty(), "error close frame queued");
                    }
                    return;
                }
                Ok(Event::NeedMore) => break,
                Ok(Event::Consumed(n)) | Ok(Event::Pong { consumed: n }) => n,
                Ok(Event::Closed { consumed, code }) => {
                    if let Some(code) = code {
                        assert!(code >= 1000);
                    }
                    assert!(conn.is_closed());
                    consumed
                }
                Ok(Event::Message {
                    consumed,
                    binary,
                    data,
                }) => {
                    assert!(data.len() <= LIMIT);
                    assert!(binary || std::str::from_utf8(data).is_ok());
                    consumed
                }
            };
            assert!(consumed > 0 && consumed <= len, "consumed {consumed} of {len}");
            buf.drain(..consumed);
        }
    }
});
