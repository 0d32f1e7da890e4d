//! `ws` CPU costs, no sockets: parsing and unmasking client frames through `Conn::read`,
//! encoding a reply frame, and unmasking against fastwebsockets'.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringlink::ws::encode::write_frame;
use ringlink::ws::frame::{apply_mask, Opcode};
use ringlink::ws::{Conn, Event, Limits};

const HANDSHAKE: &[u8] = b"GET // HTTP/1.1\r\nHost: 10.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn open_server() -> Conn {
    let mut conn = Conn::server(Limits::default());
    let mut hs = HANDSHAKE.to_vec();
    let mut tx = Vec::new();
    assert_eq!(
        conn.read(&mut hs, &mut tx),
        Ok(Event::Consumed(HANDSHAKE.len()))
    );
    conn
}

/// A device request like the official client's, padded with JSON to `len` bytes, plus its NUL.
fn request(len: usize) -> Vec<u8> {
    let head = br#"{"id":"1","version":"1.0","method":"reportProperty","params":{"productKey":"a1b2c3","deviceName":"dev-0001","properties":{"temperature":21.5,"pad":""#;
    let mut p = head.to_vec();
    p.resize(len - 3, b'x');
    p.extend_from_slice(b"\"}\0");
    p
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_read");
    for size in [200, 4096] {
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            Opcode::Text,
            true,
            Some([0x37, 0xFA, 0x21, 0x3D]),
            &request(size),
        );
        let mut conn = open_server();
        let mut tx = Vec::new();
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(format!("text_{size}B_masked"), |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |input| match conn.read(input, &mut tx) {
                    Ok(Event::Message { data, .. }) => {
                        black_box(data);
                    }
                    other => panic!("{other:?}"),
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_encode");
    let reply = br#"{"code":0,"message":"Success","messageId":123456,"payload":{}}"#;
    let mut conn = open_server();
    let mut tx = Vec::with_capacity(4096);
    group.throughput(Throughput::Elements(1));
    group.bench_function("reply_text_with", |b| {
        b.iter(|| {
            tx.clear();
            conn.send_text_with(&mut tx, |out| out.extend_from_slice(black_box(reply)));
            black_box(&tx);
        });
    });
    let downlink = request(200);
    group.bench_function("downlink_200B_text", |b| {
        b.iter(|| {
            tx.clear();
            conn.send_text(&mut tx, black_box(&downlink));
            black_box(&tx);
        });
    });
    group.finish();
}

/// Unmasking, ours beside `fastwebsockets::unmask`, on a 298-byte report (the compare
/// profiles' size) and 4 KiB.
///
/// The other per-byte pass, UTF-8 validation, stays `std::str::from_utf8`: simdutf8 (measured
/// here on 2026-12-01) was no faster at 298 bytes (16.7 against 16.3 ns) and its run-time
/// dispatch made `ws_read/text_200B_masked` 22 % slower, though it halved 4 KiB (52 against
/// 107 ns). Device reports are a few hundred bytes.
fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_parts");
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    for size in [298, 4096] {
        let mut payload = request(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("unmask_{size}B/ringlink"), |b| {
            b.iter(|| apply_mask(black_box(&mut payload), mask));
        });
        group.bench_function(format!("unmask_{size}B/fastwebsockets"), |b| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut payload), mask));
        });
    }
    group.finish();
}

criterion_group!(benches, parse, encode, parts);
criterion_main!(benches);
