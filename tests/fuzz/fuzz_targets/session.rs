//! The whole server read path: a session past its handshake fed arbitrary bytes in arbitrary
//! chunks. Never panics; consumption is bounded; a closed session stays closed; every downlink
//! sent finishes exactly once when the connection ends.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ringlink::model::ThingModel;
use ringlink::registry::Registry;
use ringlink::protocol::Code;
use ringlink::session::{Alone, Config, Context, Event, Session, ShardState};
use ringlink::ws;

fn context() -> Arc<Context> {
    static CTX: OnceLock<Arc<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut b = Registry::builder();
        let tsl = include_bytes!("../../../src/registry/demo/thermostat.json");
        b.add_product(ThingModel::from_slice(tsl).expect("TSL loads")).expect("product");
        for name in ["thermo-01", "thermo-02"] {
            b.add_device("a1ThermoPK0", name, None).expect("device");
        }
        Arc::new(Context {
            registry: Arc::new(b.build()),
            config: Config {
                auto_online_on_report: true,
                ..Config::default()
            },
        })
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut s = Session::new(context(), IpAddr::V4(Ipv4Addr::LOCALHOST), now);
    let mut shard = ShardState::new(Arc::new(Alone));
    let mut hs = Vec::new();
    ws::handshake::write_request(&mut hs, "127.0.0.1", "//", "dGhlIHNhbXBsZSBub25jZQ==", None);
    assert_eq!(s.handle_input(&mut hs, now, &mut shard), hs.len());
    // First byte picks the chunk size, the rest is the stream.
    let (chunk, stream) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut t = now;
    let mut acks = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let n = s.handle_input(&mut buf, t, &mut shard);
        assert!(n <= buf.len());
        buf.drain(..n);
        while let Some(e) = s.poll_event() {
            match e {
                Event::Uplink { ack, .. } => acks.push(ack),
                Event::Online { ack: Some(a), .. } | Event::Offline { ack: Some(a), .. } => {
                    acks.push(a)
                }
                _ => {}
            }
        }
        for a in acks.drain(..) {
            s.ack(a, Code::Success);
        }
        let mut out = Vec::new();
        s.poll_transmit(&mut out);
        t += Duration::from_millis(100);
        s.handle_timeout(t);
        if s.is_closed() {
            break;
        }
    }
    s.handle_disconnect();
    assert!(s.is_closed());
    assert_eq!(s.devices().count(), 0);
    assert_eq!(s.pending_downlinks(), 0);
});
