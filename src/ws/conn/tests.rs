use proptest::prelude::*;

use super::*;
use crate::ws::encode::write_frame;
use crate::ws::error::HandshakeError;

/// What the official C client SDK sends (PROTOCOL.md sections 2 and 10).
const OFFICIAL: &[u8] = b"GET // HTTP/1.1\r\n\
Host: 192.168.1.10\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://192.168.1.10\r\n\
Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, deflate_frame\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Msg(bool, Vec<u8>),
    Pong,
    Closed(Option<u16>),
}

fn open_server(limits: Limits) -> Conn {
    let mut conn = Conn::server(limits);
    let mut tx = Vec::new();
    let mut hs = OFFICIAL.to_vec();
    assert_eq!(
        conn.read(&mut hs, &mut tx),
        Ok(Event::Consumed(OFFICIAL.len()))
    );
    assert!(conn.is_open());
    conn
}

fn cframe(opcode: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, opcode, fin, Some(MASK), payload);
    out
}

/// A driver like the real ones: append each chunk, read until NeedMore, drop consumed bytes.
fn drive<'c>(
    conn: &mut Conn,
    chunks: impl IntoIterator<Item = &'c [u8]>,
    tx: &mut Vec<u8>,
) -> (Vec<Out>, Option<WsError>) {
    let mut buf = Vec::new();
    let mut outs = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let len = buf.len();
            let (n, out) = match conn.read(&mut buf, tx) {
                Err(e) => {
                    assert!(conn.is_closed() && !conn.is_open());
                    return (outs, Some(e));
                }
                Ok(Event::NeedMore) => break,
                Ok(Event::Consumed(n)) => (n, None),
                Ok(Event::Message {
                    consumed,
                    binary,
                    data,
                }) => (consumed, Some(Out::Msg(binary, data.to_vec()))),
                Ok(Event::Pong { consumed }) => (consumed, Some(Out::Pong)),
                Ok(Event::Closed { consumed, code }) => (consumed, Some(Out::Closed(code))),
            };
            assert!(n > 0 && n <= len, "consumed {n} of {len}");
            buf.drain(..n);
            outs.extend(out);
        }
    }
    (outs, None)
}

/// Every frame in `bytes` (unmasked), for checking what a Conn sent.
fn frames(mut bytes: &[u8]) -> Vec<(Opcode, bool, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let h = parse_header(bytes).unwrap().unwrap();
        let end = h.len + h.payload_len as usize;
        let mut payload = bytes[h.len..end].to_vec();
        if let Some(m) = h.mask {
            fastwebsockets::unmask(&mut payload, m);
        }
        out.push((h.opcode, h.mask.is_some(), payload));
        bytes = &bytes[end..];
    }
    out
}

fn close_code_sent(tx: &[u8]) -> Option<u16> {
    let f = frames(tx);
    let (op, _, payload) = f.last().unwrap();
    assert_eq!(*op, Opcode::Close);
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Feeds `bytes` to an open server and expects it to fail with `err` and close `code`.
fn expect_failure(bytes: &[u8], err: WsError, code: u16) {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let (_, got) = drive(&mut conn, [bytes], &mut tx);
    assert_eq!(got, Some(err));
    assert_eq!(close_code_sent(&tx), Some(code));
    assert!(conn.is_closed());
}

#[test]
fn conn_stays_small() {
    assert!(size_of::<Conn>() <= 96, "{}", size_of::<Conn>());
    let conn = open_server(Limits::default());
    assert_eq!(conn.reassembly.capacity(), 0);
}

#[test]
fn official_client_handshake() {
    let mut conn = Conn::server(Limits::default());
    assert!(!conn.is_open() && !conn.is_closed());
    assert_eq!(conn.role(), Role::Server);
    let mut tx = Vec::new();
    let mut hs = OFFICIAL.to_vec();
    assert_eq!(
        conn.read(&mut hs, &mut tx),
        Ok(Event::Consumed(OFFICIAL.len()))
    );
    let text = String::from_utf8(tx).unwrap();
    assert!(text.starts_with("HTTP/1.1 101 "));
    assert!(text.contains("Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n"));
    assert!(!text.contains("Sec-WebSocket-Extensions"));
    assert!(conn.is_open());
}

#[test]
fn handshake_byte_by_byte_then_frames_in_the_same_buffer() {
    let mut conn = Conn::server(Limits::default());
    let mut tx = Vec::new();
    let mut stream = OFFICIAL.to_vec();
    stream.extend(cframe(Opcode::Binary, true, b"{\"id\":1}\0"));
    let chunks: Vec<&[u8]> = stream.chunks(1).collect();
    let (outs, err) = drive(&mut conn, chunks, &mut tx);
    assert_eq!(err, None);
    assert_eq!(outs, [Out::Msg(true, b"{\"id\":1}\0".to_vec())]);
    assert!(tx.starts_with(b"HTTP/1.1 101 "));
}

#[test]
fn version_8_gets_426_and_closes() {
    let req = String::from_utf8(OFFICIAL.to_vec())
        .unwrap()
        .replace("Version: 13", "Version: 8");
    let mut conn = Conn::server(Limits::default());
    let mut tx = Vec::new();
    let (_, err) = drive(&mut conn, [req.as_bytes()], &mut tx);
    assert_eq!(
        err,
        Some(WsError::Handshake(HandshakeError::UnsupportedVersion))
    );
    let text = String::from_utf8(tx).unwrap();
    assert!(text.starts_with("HTTP/1.1 426 "));
    assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
    assert!(conn.is_closed());
}

#[test]
fn non_upgrade_gets_400_and_oversize_gets_431() {
    let mut conn = Conn::server(Limits::default());
    let mut tx = Vec::new();
    let req = b"GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (_, err) = drive(&mut conn, [&req[..]], &mut tx);
    assert_eq!(err, Some(WsError::Handshake(HandshakeError::NotUpgrade)));
    assert!(tx.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));

    let limits = Limits {
        max_handshake_bytes: 512,
        ..Limits::default()
    };
    let mut conn = Conn::server(limits);
    let mut tx = Vec::new();
    let endless = [b'a'; 100];
    let mut chunks: Vec<&[u8]> = vec![b"GET / HTTP/1.1\r\nX: "];
    chunks.extend(std::iter::repeat_n(&endless[..], 10));
    let (_, err) = drive(&mut conn, chunks, &mut tx);
    assert_eq!(err, Some(WsError::Handshake(HandshakeError::TooLarge)));
    assert!(tx.starts_with(b"HTTP/1.1 431 "));
}

#[test]
fn text_binary_and_empty_messages() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let mut s = cframe(Opcode::Text, true, "héllo".as_bytes());
    s.extend(cframe(Opcode::Binary, true, &[0, 0xFF, 0x80]));
    s.extend(cframe(Opcode::Text, true, b""));
    let (outs, err) = drive(&mut conn, [&s[..]], &mut tx);
    assert_eq!(err, None);
    assert_eq!(
        outs,
        [
            Out::Msg(false, "héllo".as_bytes().to_vec()),
            Out::Msg(true, vec![0, 0xFF, 0x80]),
            Out::Msg(false, vec![]),
        ]
    );
    assert!(tx.is_empty());
}

#[test]
fn unfragmented_message_points_into_input() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let mut input = cframe(Opcode::Text, true, b"abc");
    let base = input.as_ptr() as usize;
    match conn.read(&mut input, &mut tx) {
        Ok(Event::Message { data, .. }) => assert_eq!(data.as_ptr() as usize, base + 6),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unmasked_client_frame_is_1002() {
    let mut s = Vec::new();
    write_frame(&mut s, Opcode::Text, true, None, b"hi");
    expect_failure(&s, ProtocolViolation::UnmaskedFrameFromClient.into(), 1002);
}

#[test]
fn reserved_bits_and_opcodes_are_1002() {
    let mut s = cframe(Opcode::Text, true, b"hi");
    s[0] |= 0x40;
    expect_failure(&s, ProtocolViolation::ReservedBitsSet.into(), 1002);
    let mut s = cframe(Opcode::Text, true, b"hi");
    s[0] = 0x83;
    expect_failure(&s, ProtocolViolation::ReservedOpcode(3).into(), 1002);
    s[0] = 0x8B;
    expect_failure(&s, ProtocolViolation::ReservedOpcode(0xB).into(), 1002);
}

#[test]
fn control_frames_are_short_and_final() {
    let s = cframe(Opcode::Ping, true, &[0; 126]);
    expect_failure(&s, ProtocolViolation::ControlFrameTooLong.into(), 1002);
    let s = cframe(Opcode::Ping, false, b"x");
    expect_failure(&s, ProtocolViolation::FragmentedControlFrame.into(), 1002);
    let s = cframe(Opcode::Close, false, &[3, 0xE8]);
    expect_failure(&s, ProtocolViolation::FragmentedControlFrame.into(), 1002);
}

#[test]
fn fragmentation_order_is_1002() {
    let s = cframe(Opcode::Continuation, true, b"x");
    expect_failure(&s, ProtocolViolation::ContinuationWithoutStart.into(), 1002);
    let mut s = cframe(Opcode::Text, false, b"a");
    s.extend(cframe(Opcode::Text, true, b"b"));
    expect_failure(
        &s,
        ProtocolViolation::DataFrameInsideFragmentedMessage.into(),
        1002,
    );
    let mut s = cframe(Opcode::Binary, false, b"a");
    s.extend(cframe(Opcode::Binary, true, b"b"));
    expect_failure(
        &s,
        ProtocolViolation::DataFrameInsideFragmentedMessage.into(),
        1002,
    );
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let mut s = cframe(Opcode::Text, false, b"{\"a\":");
    s.extend(cframe(Opcode::Ping, true, b"p1"));
    s.extend(cframe(Opcode::Continuation, false, b""));
    s.extend(cframe(Opcode::Pong, true, b""));
    s.extend(cframe(Opcode::Continuation, true, b"1}"));
    let (outs, err) = drive(&mut conn, [&s[..]], &mut tx);
    assert_eq!(err, None);
    assert_eq!(outs, [Out::Pong, Out::Msg(false, b"{\"a\":1}".to_vec())]);
    assert_eq!(frames(&tx), [(Opcode::Pong, false, b"p1".to_vec())]);
}

#[test]
fn reassembly_buffer_is_released() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let big = vec![b'x'; 30_000];
    let mut s = cframe(Opcode::Binary, false, &big);
    s.extend(cframe(Opcode::Continuation, true, &big));
    let (outs, _) = drive(&mut conn, [&s[..]], &mut tx);
    assert_eq!(outs.len(), 1);
    // drive() called read once more (NeedMore) after the message: the buffer is gone.
    assert_eq!(conn.reassembly.capacity(), 0);
    assert_eq!(conn.wanted_bytes(), MAX_HEADER_LEN);
}

#[test]
fn too_big_is_1009_before_the_payload_arrives() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    // A header announcing 1 GiB and nothing else.
    let mut header = vec![0x82, 0xFF];
    header.extend((1_u64 << 30).to_be_bytes());
    header.extend(MASK);
    let (_, err) = drive(&mut conn, [&header[..]], &mut tx);
    assert_eq!(
        err,
        Some(WsError::Capacity {
            size: 1 << 30,
            limit: 65_536
        })
    );
    assert_eq!(close_code_sent(&tx), Some(1009));
    assert_eq!(conn.reassembly.capacity(), 0);

    // Exactly the limit is fine; the sum of fragments over it is not.
    let mut conn = open_server(Limits::default());
    let at_limit = cframe(Opcode::Binary, true, &vec![1; 65_536]);
    let (outs, err) = drive(&mut conn, [&at_limit[..]], &mut tx);
    assert_eq!((outs.len(), err), (1, None));
    let mut s = cframe(Opcode::Binary, false, &[0; 40_000]);
    s.extend(cframe(Opcode::Continuation, false, &[0; 25_536]));
    s.extend(cframe(Opcode::Continuation, true, &[0; 1]));
    expect_failure(
        &s,
        WsError::Capacity {
            size: 65_537,
            limit: 65_536,
        },
        1009,
    );
}

#[test]
fn wanted_bytes_follows_the_frame() {
    let mut conn = Conn::server(Limits::default());
    assert_eq!(conn.wanted_bytes(), 1024);
    let mut tx = Vec::new();
    let mut hs = OFFICIAL.to_vec();
    conn.read(&mut hs, &mut tx).unwrap();
    assert_eq!(conn.wanted_bytes(), MAX_HEADER_LEN);
    let frame = cframe(Opcode::Binary, true, &[7; 10_000]);
    let mut part = frame[..100].to_vec();
    assert_eq!(conn.read(&mut part, &mut tx), Ok(Event::NeedMore));
    assert_eq!(conn.wanted_bytes(), frame.len());
}

#[test]
fn invalid_utf8_is_1007() {
    expect_failure(
        &cframe(Opcode::Text, true, &[b'a', 0xFF]),
        WsError::InvalidUtf8,
        1007,
    );
    // Binary is not checked.
    let mut conn = open_server(Limits::default());
    let (outs, err) = drive(
        &mut conn,
        [&cframe(Opcode::Binary, true, &[0xFF])[..]],
        &mut Vec::new(),
    );
    assert_eq!((outs.len(), err), (1, None));
}

#[test]
fn utf8_is_checked_across_fragments_and_fails_fast() {
    // "é" = C3 A9 and "€" = E2 82 AC split across fragments are fine.
    let mut conn = open_server(Limits::default());
    let mut s = cframe(Opcode::Text, false, &[b'a', 0xC3]);
    s.extend(cframe(Opcode::Continuation, false, &[0xA9, 0xE2]));
    s.extend(cframe(Opcode::Continuation, false, &[0x82]));
    s.extend(cframe(Opcode::Continuation, true, &[0xAC]));
    let (outs, err) = drive(&mut conn, [&s[..]], &mut Vec::new());
    assert_eq!(err, None);
    assert_eq!(outs, [Out::Msg(false, "aé€".as_bytes().to_vec())]);

    // A bad first fragment fails before the rest of the message is sent.
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let first = cframe(Opcode::Text, false, &[b'a', 0xCE, 0xBA, 0xF4, 0x90]);
    let (_, err) = drive(&mut conn, [&first[..]], &mut tx);
    assert_eq!(err, Some(WsError::InvalidUtf8));
    assert_eq!(close_code_sent(&tx), Some(1007));

    // An incomplete character at the very end.
    let mut s = cframe(Opcode::Text, false, b"ok");
    s.extend(cframe(Opcode::Continuation, true, &[0xE2, 0x82]));
    expect_failure(&s, WsError::InvalidUtf8, 1007);
}

#[test]
fn utf8_fails_fast_inside_a_frame_still_arriving() {
    // One 1000-byte TEXT frame whose 600th byte is bad; only 700 bytes have arrived.
    let mut payload = "€".repeat(333).into_bytes();
    payload.push(b'.');
    payload[600] = 0xFF;
    let frame = cframe(Opcode::Text, true, &payload);
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let (_, err) = drive(
        &mut conn,
        frame[..300].chunks(7).chain([&frame[300..700]]),
        &mut tx,
    );
    assert_eq!(err, Some(WsError::InvalidUtf8));
    assert_eq!(close_code_sent(&tx), Some(1007));

    // The same inside a continuation, with a character split across the fragment boundary.
    let mut s = cframe(Opcode::Text, false, &[b'a', 0xE2]);
    let mut rest = vec![0x82, 0xAC];
    rest.extend_from_slice(&[b'b'; 100]);
    rest.push(0xC0);
    rest.extend_from_slice(&[b'c'; 100]);
    let cont = cframe(Opcode::Continuation, true, &rest);
    s.extend_from_slice(&cont[..cont.len() - 50]);
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    let (_, err) = drive(&mut conn, s.chunks(3), &mut tx);
    assert_eq!(err, Some(WsError::InvalidUtf8));

    // Valid text trickling in byte by byte is never refused early.
    let ok = cframe(Opcode::Text, true, "aé€😀".repeat(50).as_bytes());
    let mut conn = open_server(Limits::default());
    let (outs, err) = drive(&mut conn, ok.chunks(1), &mut Vec::new());
    assert_eq!((outs.len(), err), (1, None));
}

#[test]
fn close_is_echoed_with_the_peer_code() {
    for (payload, code) in [
        (vec![], None),
        (vec![0x03, 0xE8], Some(1000)),
        (vec![0x0B, 0xB8, b'b', b'y', b'e'], Some(3000)),
        (vec![0x13, 0x87], Some(4999)),
    ] {
        let mut conn = open_server(Limits::default());
        let mut tx = Vec::new();
        let mut s = cframe(Opcode::Close, true, &payload);
        // Anything after the Close is ignored.
        s.extend(cframe(Opcode::Text, true, b"late"));
        let (outs, err) = drive(&mut conn, [&s[..]], &mut tx);
        assert_eq!(err, None);
        assert_eq!(outs, [Out::Closed(code)]);
        let sent = frames(&tx);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, Opcode::Close);
        assert_eq!(sent[0].2, payload.get(..2).unwrap_or(&[]).to_vec());
        assert!(conn.is_closed());
    }
}

#[test]
fn bad_close_frames() {
    expect_failure(
        &cframe(Opcode::Close, true, &[3]),
        ProtocolViolation::CloseFrameTooShort.into(),
        1002,
    );
    for code in [0_u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000] {
        expect_failure(
            &cframe(Opcode::Close, true, &code.to_be_bytes()),
            ProtocolViolation::InvalidCloseCode(code).into(),
            1002,
        );
    }
    expect_failure(
        &cframe(Opcode::Close, true, &[0x03, 0xE8, 0xFF]),
        WsError::InvalidUtf8,
        1007,
    );
}

#[test]
fn after_our_close_data_is_ignored_and_peer_close_finishes() {
    let mut conn = open_server(Limits::default());
    let mut tx = Vec::new();
    conn.close(&mut tx, CloseCode::GoingAway.into(), "shutdown");
    assert!(conn.is_closed() && !conn.is_open());
    assert_eq!(close_code_sent(&tx), Some(1001));
    tx.clear();
    conn.send_text(&mut tx, b"nope");
    conn.send_ping(&mut tx, b"nope");
    assert!(tx.is_empty());
    let mut s = cframe(Opcode::Text, true, b"late");
    s.extend(cframe(Opcode::Ping, true, b"p"));
    s.extend(cframe(Opcode::Binary, false, b"a"));
    s.extend(cframe(Opcode::Continuation, true, b"b"));
    s.extend(cframe(Opcode::Close, true, &[0x03, 0xE8]));
    let (outs, err) = drive(&mut conn, [&s[..]], &mut tx);
    assert_eq!(err, None);
    assert_eq!(outs, [Out::Closed(Some(1000))]);
    assert!(tx.is_empty(), "no pong, no second close");
}

#[test]
fn send_text_with_matches_send_text() {
    for n in [0, 10, 125, 126, 1000, 70_000] {
        let payload = vec![b'z'; n];
        let mut conn = open_server(Limits::default());
        let (mut a, mut b) = (vec![1, 2], vec![1, 2]);
        conn.send_text(&mut a, &payload);
        conn.send_text_with(&mut b, |out| out.extend_from_slice(&payload));
        assert_eq!(a, b);
        assert_eq!(frames(&a[2..]), [(Opcode::Text, false, payload.clone())]);

        let mut client = Conn::client(Limits::default());
        let mut c = Vec::new();
        client.send_text_with(&mut c, |out| out.extend_from_slice(&payload));
        assert_eq!(frames(&c), [(Opcode::Text, true, payload.clone())]);
    }
}

#[test]
fn client_role_masks_and_expects_unmasked() {
    let mut server = open_server(Limits::default());
    let mut client = Conn::client(Limits::default());
    assert_eq!(client.role(), Role::Client);
    let mut c2s = Vec::new();
    client.send_text(&mut c2s, b"up");
    client.send_binary(&mut c2s, b"bin");
    client.send_ping(&mut c2s, b"hb");
    let mut s2c = Vec::new();
    let (outs, err) = drive(&mut server, [&c2s[..]], &mut s2c);
    assert_eq!(err, None);
    assert_eq!(
        outs,
        [
            Out::Msg(false, b"up".to_vec()),
            Out::Msg(true, b"bin".to_vec())
        ]
    );
    server.send_text(&mut s2c, b"down");
    let mut back = Vec::new();
    let (outs, err) = drive(&mut client, [&s2c[..]], &mut back);
    assert_eq!(err, None);
    assert_eq!(outs, [Out::Pong, Out::Msg(false, b"down".to_vec())]);

    // A masked frame from the server fails the client, whose Close is masked.
    let mut client = Conn::client(Limits::default());
    let mut tx = Vec::new();
    let (_, err) = drive(
        &mut client,
        [&cframe(Opcode::Text, true, b"x")[..]],
        &mut tx,
    );
    assert_eq!(err, Some(ProtocolViolation::MaskedFrameFromServer.into()));
    let sent = frames(&tx);
    assert_eq!((sent[0].0, sent[0].1), (Opcode::Close, true));
    assert_eq!(sent[0].2[..2], 1002_u16.to_be_bytes());
}

#[test]
fn close_before_handshake_and_reads_after_close() {
    let mut conn = Conn::server(Limits::default());
    let mut tx = Vec::new();
    conn.close(&mut tx, 1001, "");
    assert!(tx.is_empty() && conn.is_closed());
    let mut junk = b"GET / HTTP/1.1\r\n".to_vec();
    assert_eq!(conn.read(&mut junk, &mut tx), Ok(Event::Consumed(16)));
    assert_eq!(conn.read(&mut [], &mut tx), Ok(Event::NeedMore));
}

// ---- property tests -------------------------------------------------------------------------

/// One item a peer sends: a data message cut into fragments (cut points as fractions), with a
/// ping possibly slipped in after each fragment, or a lone ping.
#[derive(Debug, Clone)]
enum Item {
    Message {
        binary: bool,
        data: Vec<u8>,
        cuts: Vec<usize>,
        pings: Vec<Option<Vec<u8>>>,
    },
    Ping(Vec<u8>),
}

fn item() -> impl Strategy<Value = Item> {
    let payload = prop_oneof![
        any::<String>().prop_map(|s| (false, s.into_bytes())),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|v| (true, v)),
        // Long enough for the 16-bit length form.
        (1_usize..3).prop_map(|n| (false, "ü€x".repeat(60 * n).into_bytes())),
    ];
    let ping = prop::option::weighted(0.3, prop::collection::vec(any::<u8>(), 0..=125));
    prop_oneof![
        4 => (payload, prop::collection::vec(any::<usize>(), 0..4), prop::collection::vec(ping, 4))
            .prop_map(|((binary, data), cuts, pings)| Item::Message { binary, data, cuts, pings }),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Item::Ping),
    ]
}

/// Encodes `items` as `mask` (client: `Some`) would send them, and what the receiver should
/// report: messages in order, a Pong event for nothing (pings are answered in tx), and the
/// ping payloads in order.
fn encode_items(items: &[Item], mask: Option<[u8; 4]>) -> (Vec<u8>, Vec<Out>, Vec<Vec<u8>>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut pings = Vec::new();
    for item in items {
        match item {
            Item::Ping(p) => {
                write_frame(&mut stream, Opcode::Ping, true, mask, p);
                pings.push(p.clone());
            }
            Item::Message {
                binary,
                data,
                cuts,
                pings: inner,
            } => {
                let mut at: Vec<usize> = cuts
                    .iter()
                    .map(|c| c % (data.len() + 1))
                    .chain([0, data.len()])
                    .collect();
                at.sort_unstable();
                at.dedup();
                // at = [0, .., len]; with len == 0 that is one empty frame.
                let pieces: Vec<&[u8]> = if at.len() < 2 {
                    vec![&data[..]]
                } else {
                    at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
                };
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = match (i, binary) {
                        (0, true) => Opcode::Binary,
                        (0, false) => Opcode::Text,
                        _ => Opcode::Continuation,
                    };
                    let fin = i + 1 == pieces.len();
                    write_frame(&mut stream, opcode, fin, mask, piece);
                    if let Some(Some(p)) = inner.get(i).filter(|_| !fin) {
                        write_frame(&mut stream, Opcode::Ping, true, mask, p);
                        pings.push(p.clone());
                    }
                }
                expected.push(Out::Msg(*binary, data.clone()));
            }
        }
    }
    (stream, expected, pings)
}

fn pongs_in(tx: &[u8], masked: bool) -> Vec<Vec<u8>> {
    frames(tx)
        .into_iter()
        .map(|(op, m, p)| {
            assert_eq!((op, m), (Opcode::Pong, masked));
            p
        })
        .collect()
}

fn chunk_by<'s>(stream: &'s [u8], sizes: &[usize]) -> Vec<&'s [u8]> {
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i)
            .map_or(rest.len(), |s| 1 + s % 97)
            .min(rest.len());
        chunks.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    chunks
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn client_to_server_any_chunking(
        items in prop::collection::vec(item(), 1..6),
        sizes in prop::collection::vec(any::<usize>(), 0..64),
        mask in any::<[u8; 4]>(),
    ) {
        let (stream, expected, pings) = encode_items(&items, Some(mask));
        let mut conn = open_server(Limits::default());
        let mut tx = Vec::new();
        let (outs, err) = drive(&mut conn, chunk_by(&stream, &sizes), &mut tx);
        prop_assert_eq!(err, None);
        prop_assert_eq!(outs, expected.clone());
        prop_assert_eq!(pongs_in(&tx, false), pings.clone());

        // Split in two at every byte boundary.
        for cut in 0..=stream.len() {
            let mut conn = open_server(Limits::default());
            let mut tx = Vec::new();
            let (outs, err) = drive(&mut conn, [&stream[..cut], &stream[cut..]], &mut tx);
            prop_assert_eq!(err, None);
            prop_assert_eq!(&outs, &expected);
            prop_assert_eq!(pongs_in(&tx, false), pings.clone());
        }
    }

    #[test]
    fn server_to_client_any_chunking(
        items in prop::collection::vec(item(), 1..6),
        sizes in prop::collection::vec(any::<usize>(), 0..64),
    ) {
        let (stream, expected, pings) = encode_items(&items, None);
        for chunks in [chunk_by(&stream, &sizes), stream.chunks(1).collect()] {
            let mut conn = Conn::client(Limits::default());
            let mut tx = Vec::new();
            let (outs, err) = drive(&mut conn, chunks, &mut tx);
            prop_assert_eq!(err, None);
            prop_assert_eq!(&outs, &expected);
            prop_assert_eq!(pongs_in(&tx, true), pings.clone());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        sizes in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut conn = open_server(Limits { max_message_bytes: 256, ..Limits::default() });
        let mut tx = Vec::new();
        let (outs, _) = drive(&mut conn, chunk_by(&bytes, &sizes), &mut tx);
        for out in outs {
            if let Out::Msg(binary, data) = out {
                prop_assert!(data.len() <= 256);
                prop_assert!(binary || std::str::from_utf8(&data).is_ok());
            }
        }
    }
}
