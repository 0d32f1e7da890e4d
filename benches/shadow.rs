//! Recording a property report in the device shadow, as a shard does for every report.
//!
//! `ringlink` is `Shadows::properties`: a scan of the values text (no JSON parse), and each
//! property's key and value written over a buffer the device's shadow already has.
//! `conventional` is the usual way: parse the values with serde_json into borrowed raw values
//! and keep each property as a `String` in a `HashMap` per device, behind a mutex as well. Both
//! record the same reports into the same number of devices.

use std::collections::HashMap;
use std::sync::Mutex;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;

use ringlink::registry::DeviceId;
use ringlink::shadow::Shadows;

const DEVICES: usize = 64;

/// Values as a session writes them (compact, normalised), two properties each like loadgen's
/// profiles, and all eight of the thermostat model.
const REPORTS: [(&str, &str); 3] = [
    ("2_scalars", r#"{"power":1,"setpoint":21.5}"#),
    (
        "2_with_text",
        r#"{"label":"living room thermostat, north wall, next to the window \"B\"","roomTemp":19.87}"#,
    ),
    (
        "8_all",
        r#"{"power":1,"setpoint":21.5,"roomTemp":19.87,"mode":2,"label":"living room","serviced":"1732570000000","week":[1,2,3,4,5],"limits":{"lo":5.0,"hi":30.0}}"#,
    ),
];

/// The conventional shadow: one map per device from property name to its JSON text.
struct MapShadows(Vec<Mutex<HashMap<String, (String, u64)>>>);

impl MapShadows {
    fn properties(&self, device: usize, values: &str, at_ms: u64) {
        let fields: HashMap<&str, &RawValue> = serde_json::from_str(values).expect("an object");
        let mut map = self.0[device].lock().expect("not poisoned");
        for (k, v) in fields {
            match map.get_mut(k) {
                Some(slot) => {
                    slot.0.clear();
                    slot.0.push_str(v.get());
                    slot.1 = at_ms;
                }
                None => {
                    map.insert(k.to_owned(), (v.get().to_owned(), at_ms));
                }
            }
        }
    }
}

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow_record");
    g.throughput(Throughput::Elements(1));
    let ids: Vec<DeviceId> = {
        let registry = ringlink::registry::demo_registry();
        registry.ids().take(DEVICES).collect()
    };
    assert_eq!(ids.len(), DEVICES, "the demo registry has enough devices");
    for (name, values) in REPORTS {
        let shadows = Shadows::new(ringlink::registry::demo_registry().len());
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("ringlink", name), values, |b, v| {
            b.iter(|| {
                i = i.wrapping_add(1);
                shadows.properties(ids[i % DEVICES], black_box(v), i as u64);
            })
        });
        let maps = MapShadows((0..DEVICES).map(|_| Mutex::default()).collect());
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("conventional", name), values, |b, v| {
            b.iter(|| {
                i = i.wrapping_add(1);
                maps.properties(i % DEVICES, black_box(v), i as u64);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
