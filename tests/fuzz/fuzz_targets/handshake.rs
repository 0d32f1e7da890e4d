//! Feeds arbitrary bytes to the upgrade-request parser, whole and as a server `Conn` would see
//! them, and checks the "need more" contract.
//!
//! Invariants: no panic; `Ok(Some((_, n)))` has `n <= max` and `n <= input.len()`; every
//! strict prefix of a complete request is `Ok(None)` or the same kind of answer; a `Conn`
//! either completes with a 101 or answers with an HTTP error and closes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlink::ws::handshake::parse_request;
use ringlink::ws::{Conn, Event, Limits};

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let whole = parse_request(data, MAX);
    if let Ok(Some((req, n))) = &whole {
        assert!(*n <= MAX && *n <= data.len());
        assert!(!req.key.is_empty());
        // A prefix that stops before the end of the head needs more.
        assert_eq!(parse_request(&data[..n - 1], MAX).ok(), Some(None));
    }

    let mut conn = Conn::server(Limits {
        max_handshake_bytes: MAX,
        ..Limits::default()
    });
    let mut tx = Vec::new();
    let mut input = data.to_vec();
    match conn.read(&mut input, &mut tx) {
        Ok(Event::Consumed(n)) => {
            assert!(n <= data.len() && conn.is_open());
            assert!(tx.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        }
        Ok(Event::NeedMore) => {
            assert!(data.len() < MAX && tx.is_empty() && !conn.is_closed());
        }
        Ok(other) => panic!("unexpected event during the handshake: {other:?}"),
        Err(e) => {
            assert!(conn.is_closed());
            assert!(e.close_code().is_none());
            assert!(tx.starts_with(b"HTTP/1.1 4"));
        }
    }
});
