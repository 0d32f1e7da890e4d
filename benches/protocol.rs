//! Link message decoding: ringlink's decoder (simd-json tape, reused buffers, in place) beside
//! serde_json on the same bytes, so the gain is measured in one run.
//!
//! Each iteration copies the frame into a receive buffer first (the decoders parse in place, and
//! a real receive fills a buffer too); the copy is the same for every variant.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use serde::Deserialize;
use simd_json::prelude::*;

use ringlink::protocol::{strip_trailing, Decoder, Inbound, Item};

/// A typical sub-device report as the official client sends it (one trailing NUL).
const REPORT: &[u8] = b"{\"version\":\"1.0\",\"messageId\":4711,\"method\":\"reportProperty\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-0042\",\"properties\":[{\"identifier\":\"power\",\"type\":\"bool\",\"value\":1},{\"identifier\":\"setpoint\",\"type\":\"float\",\"value\":21.5},{\"identifier\":\"mode\",\"type\":\"enum\",\"value\":2},{\"identifier\":\"roomTemp\",\"type\":\"double\",\"value\":19.87}]}}\0";

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "messageId")]
    message_id: u32,
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow)]
    payload: Payload<'a>,
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(rename = "productKey", borrow)]
    product_key: &'a str,
    #[serde(rename = "deviceName", borrow)]
    device_name: &'a str,
    #[serde(borrow)]
    properties: Vec<TypedItem<'a>>,
}

#[derive(Deserialize)]
struct TypedItem<'a> {
    #[serde(borrow)]
    identifier: &'a str,
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    value: serde_json::Value,
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_report_property");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(1024);

    let mut decoder = Decoder::new();
    g.bench_function("ringlink_simd_json_tape", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(REPORT);
            decoder.decode(&mut buf, |r| match r {
                Ok(Some(Inbound::Request(req))) => {
                    let props = req.payload.get("properties").and_then(|p| p.as_array());
                    let n = props.map_or(0, |a| a.iter().filter_map(Item::parse).count());
                    black_box((
                        req.id,
                        req.method,
                        req.product_key.len(),
                        req.device_name.len(),
                        n,
                    ))
                }
                _ => unreachable!("valid report"),
            })
        });
    });

    g.bench_function("serde_json_value", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(REPORT);
            let len = strip_trailing(&buf);
            let v: serde_json::Value = serde_json::from_slice(&buf[..len]).expect("valid");
            let p = &v["payload"];
            let n = p["properties"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|i| i["identifier"].is_string() && i["type"].is_string())
                    .count()
            });
            black_box((
                v["messageId"].as_u64(),
                v["method"].as_str().map(str::len),
                p["productKey"].as_str().map(str::len),
                p["deviceName"].as_str().map(str::len),
                n,
            ))
        });
    });

    g.bench_function("serde_json_typed_borrowed", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(REPORT);
            let len = strip_trailing(&buf);
            let e: Envelope<'_> = serde_json::from_slice(&buf[..len]).expect("valid");
            let n = e
                .payload
                .properties
                .iter()
                .filter(|i| !i.identifier.is_empty() && !i.ty.is_empty() && !i.value.is_null())
                .count();
            black_box((
                e.message_id,
                e.method.len(),
                e.payload.product_key.len(),
                e.payload.device_name.len(),
                n,
            ))
        });
    });
    g.finish();
}

/// A report whose value is a number of `digits` digits (beyond any 64-bit type, so the fast
/// parser refuses it and the slow path keeps it as an out-of-range value): 6,000 and 60,000
/// digits side by side show the slow path's cost grows with the message, not its square.
fn decode_huge_number(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_huge_number");
    let mut decoder = Decoder::new();
    for digits in [6_000usize, 60_000] {
        let msg = format!(
            "{{\"version\":\"1.0\",\"messageId\":1,\"method\":\"reportProperty\",\"payload\":{{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-0042\",\"properties\":[{{\"identifier\":\"setpoint\",\"type\":\"float\",\"value\":9{}}}]}}}}",
            "7".repeat(digits)
        );
        g.throughput(Throughput::Bytes(msg.len() as u64));
        let mut buf = Vec::with_capacity(msg.len());
        g.bench_function(format!("{digits}_digits"), |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(msg.as_bytes());
                decoder.decode(&mut buf, |r| black_box(r.is_ok()))
            });
        });
    }
    g.finish();
}

criterion_group!(benches, decode, decode_huge_number);
criterion_main!(benches);
