//! The whole in-memory path of a reportProperty: masked request frame in -> session (unmask,
//! decode, registry lookup, model checks, uplink) -> ack -> reply frame out. No sockets.
//!
//! `one_per_read` feeds one frame per call, as a driver does for a lone report; `batch_64`
//! feeds 64 frames in one buffer, as one read delivers them under load.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use ringlink::model::ThingModel;
use ringlink::protocol::Code;
use ringlink::registry::Registry;
use ringlink::session::{Alone, Config, Context, Event, Session, ShardState};
use ringlink::ws;

const THERMOSTAT: &[u8] = include_bytes!("../src/registry/demo/thermostat.json");

fn report(id: u32) -> String {
    format!(
        "{{\"version\":\"1.0\",\"messageId\":{id},\"method\":\"reportProperty\",\"payload\":{{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-0042\",\"properties\":[{{\"identifier\":\"power\",\"type\":\"bool\",\"value\":1}},{{\"identifier\":\"setpoint\",\"type\":\"float\",\"value\":21.5}},{{\"identifier\":\"mode\",\"type\":\"enum\",\"value\":2}},{{\"identifier\":\"roomTemp\",\"type\":\"double\",\"value\":19.87}}]}}}}\0"
    )
}

/// A session past the handshake with thermo-0042 online, and its shard state.
fn setup() -> (Session, ShardState, ws::Conn) {
    let mut b = Registry::builder();
    b.add_product(ThingModel::from_slice(THERMOSTAT).expect("TSL loads"))
        .expect("one product");
    for i in 0..10_000 {
        b.add_device("a1ThermoPK0", &format!("thermo-{i:04}"), None)
            .expect("new device");
    }
    let ctx = Arc::new(Context {
        registry: Arc::new(b.build()),
        config: Config::default(),
    });
    let now = Instant::now();
    let mut s = Session::new(ctx, IpAddr::V4(Ipv4Addr::LOCALHOST), now);
    let mut shard = ShardState::new(Arc::new(Alone));
    let mut client = ws::Conn::client(ws::Limits::default());
    let mut input = Vec::new();
    ws::handshake::write_request(
        &mut input,
        "127.0.0.1",
        "//",
        "dGhlIHNhbXBsZSBub25jZQ==",
        None,
    );
    let online = "{\"version\":\"1.0\",\"messageId\":1,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-0042\"}}\0";
    client.send_text(&mut input, online.as_bytes());
    let n = s.handle_input(&mut input, now, &mut shard);
    assert_eq!(n, input.len());
    drain(&mut s);
    let mut out = Vec::new();
    s.poll_transmit(&mut out);
    (s, shard, client)
}

/// Acks every uplink as a driver does once its batch is durable; returns how many.
fn drain(s: &mut Session) -> usize {
    let mut n = 0;
    while let Some(e) = s.poll_event() {
        match e {
            Event::Uplink { ack, uplink } => {
                black_box(uplink);
                s.ack(ack, Code::Success);
                n += 1;
            }
            Event::Online { ack: Some(ack), .. } => s.ack(ack, Code::Success),
            _ => {}
        }
    }
    n
}

fn whole_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("report_property_whole_path");
    for batch in [1usize, 64] {
        let (mut s, mut shard, mut client) = setup();
        let mut frames = Vec::new();
        for i in 0..batch {
            client.send_text(&mut frames, report(1000 + i as u32).as_bytes());
        }
        let now = Instant::now();
        let mut input = Vec::with_capacity(frames.len());
        let mut out = Vec::with_capacity(64 * batch + 1024);
        g.throughput(Throughput::Elements(batch as u64));
        let name = if batch == 1 {
            "one_per_read"
        } else {
            "batch_64"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                input.clear();
                input.extend_from_slice(&frames);
                let n = s.handle_input(&mut input, now, &mut shard);
                assert_eq!(n, input.len());
                assert_eq!(drain(&mut s), batch);
                out.clear();
                s.poll_transmit(&mut out);
                black_box(out.len())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, whole_path);
criterion_main!(benches);
