//! Thing-model checks (PROTOCOL.md 11.4) on decoded values; no sockets, no IO in the loop.
//!
//! - `report/4_items`: one reportProperty item list against the thermostat TSL (bool, float,
//!   enum, struct); throughput is in items, so criterion prints the per-item rate too.
//! - `set/2_items_alink`: check_set and write_value(Alink) of two setProperty items.
//! - `lookup/N`: property lookup by identifier in a model of N properties (linear up to 8,
//!   bisection above), the measurement behind `LINEAR_MAX`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use simd_json::prelude::*;

use ringlink::model::{DataKind, ThingModel, ValueStyle};

const THERMOSTAT: &[u8] = include_bytes!("../src/registry/demo/thermostat.json");

const REPORT: &str = r#"[{"identifier":"power","type":"bool","value":1},{"identifier":"setpoint","type":"float","value":21.5},{"identifier":"mode","type":"enum","value":2},{"identifier":"limits","type":"struct","value":{"lo":10,"hi":40}}]"#;

const SET: &str = r#"{"setpoint":21,"limits":{"lo":10,"hi":40}}"#;

fn report(c: &mut Criterion) {
    let model = ThingModel::from_slice(THERMOSTAT).expect("thermostat loads");
    let mut bytes = REPORT.as_bytes().to_vec();
    let tape = simd_json::to_tape(&mut bytes).expect("bench JSON parses");
    let items = tape.as_value();
    let mut group = c.benchmark_group("report");
    group.throughput(Throughput::Elements(4));
    group.bench_function("4_items", |b| {
        b.iter(|| {
            let Some(items) = black_box(items).as_array() else {
                unreachable!()
            };
            for item in items.iter() {
                let (Some(id), Some(kind), Some(value)) =
                    (item.get("identifier"), item.get("type"), item.get("value"))
                else {
                    unreachable!()
                };
                let id = id.as_str().unwrap_or("");
                let kind = kind
                    .as_str()
                    .and_then(DataKind::from_name)
                    .unwrap_or(DataKind::Int);
                black_box(model.check_report_item(id, kind, value)).expect("valid item");
            }
        });
    });
    group.finish();
}

fn set(c: &mut Criterion) {
    let model = ThingModel::from_slice(THERMOSTAT).expect("thermostat loads");
    let mut bytes = SET.as_bytes().to_vec();
    let tape = simd_json::to_tape(&mut bytes).expect("bench JSON parses");
    let items = tape.as_value();
    let mut out = Vec::with_capacity(256);
    let mut group = c.benchmark_group("set");
    group.throughput(Throughput::Elements(2));
    group.bench_function("2_items_alink", |b| {
        b.iter(|| {
            out.clear();
            let Some(items) = black_box(items).as_object() else {
                unreachable!()
            };
            for (id, value) in items.iter() {
                let property = model.check_set(id, value).expect("valid item");
                property
                    .data_type
                    .write_value(value, ValueStyle::Alink, &mut out);
            }
            black_box(&out);
        });
    });
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in [4usize, 8, 9, 16, 64] {
        let props: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"identifier":"property{i}","accessMode":"rw","dataType":{{"type":"int"}}}}"#
                )
            })
            .collect();
        let doc = format!(
            r#"{{"profile":{{"productKey":"p"}},"properties":[{}]}}"#,
            props.join(",")
        );
        let model = ThingModel::from_slice(doc.as_bytes()).expect("generated TSL loads");
        let ids: Vec<String> = (0..n).map(|i| format!("property{i}")).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &ids, |b, ids| {
            b.iter(|| {
                for id in ids {
                    black_box(model.property(black_box(id)));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, report, set, lookup);
criterion_main!(benches);
