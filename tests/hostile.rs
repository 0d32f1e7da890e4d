//! Hostile peers: what a peer can make the gateway hold is bounded by what it actually sent, and
//! only for as long as the limits allow. (The API's side of this is in `hostile_api.rs`.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use support::{Client, Gateway, DRIVERS, THERMO};

const PEERS: usize = 2_000;
const MESSAGE_TIMEOUT_MS: u64 = 3_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn power() -> serde_json::Value {
    serde_json::json!([{"identifier": "power", "type": "bool", "value": 1}])
}

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

/// A TCP connection that completed the WebSocket upgrade by hand.
async fn upgraded(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read upgrade answer");
        assert_eq!(n, 1, "closed during the upgrade");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads to the end of the stream and returns the close code of the close frame among what
/// arrived (ringlink sends nothing else to a peer that never spoke Link).
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.ok()?;
    // Unmasked server frame: 0x88, length, two code bytes, reason.
    (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]))
}

#[test]
fn declared_but_unsent_frames_hold_only_what_was_sent_and_are_closed_after_the_message_timeout() {
    for io in DRIVERS {
        let timeout = MESSAGE_TIMEOUT_MS.to_string();
        let gw = Gateway::start_with(
            io,
            &[],
            &[("RINGLINK_LIMITS_MESSAGE_TIMEOUT_MS", timeout.as_str())],
        );
        rt().block_on(async {
            // A well-behaved device alongside, to show it is not disturbed.
            let mut probe = Client::connect(gw.ws).await;
            assert_eq!(probe.online(THERMO, "thermo-00001").await, 0);
            // A first wave that upgrades and leaves touches what the process keeps whatever
            // the number of peers (the provided receive buffers' first pages, the connection
            // table's slab, the allocator's pages): the second wave shows what each hostile
            // peer adds.
            let mut wave = Vec::with_capacity(PEERS);
            for _ in 0..PEERS {
                wave.push(upgraded(gw.ws).await);
            }
            drop(wave);
            gw.eventually("the first wave is gone", || {
                gw.metric("ringlink_connections_open ") == 1.0
            });
            let before = rss(gw.pid());

            let mut peers = Vec::with_capacity(PEERS);
            for _ in 0..PEERS {
                peers.push(upgraded(gw.ws).await);
            }
            // Each declares a 65,000-byte TEXT frame (under max_frame_bytes) and sends only
            // its 8-byte header.
            let mut header = vec![0x81, 0x80 | 126];
            header.extend_from_slice(&65_000u16.to_be_bytes());
            header.extend_from_slice(&[7, 7, 7, 7]);
            for p in &mut peers {
                p.write_all(&header).await.expect("send header");
            }
            let sent_at = Instant::now();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss(gw.pid());
            let per_peer = after.saturating_sub(before) / PEERS as u64;
            eprintln!(
                "{io}: RSS {} -> {} KiB, {per_peer} bytes per hostile peer",
                before / 1024,
                after / 1024
            );
            assert!(
                per_peer < 4096,
                "{io}: {per_peer} bytes of RSS per peer that sent 8 bytes"
            );
            // The probe still works while they wait.
            assert_eq!(probe.report(THERMO, "thermo-00001", power()).await, 0);

            // Every one of them is closed with 1008, not before the timeout.
            let mut codes = Vec::with_capacity(PEERS);
            for p in &mut peers {
                codes.push(close_code(p).await);
            }
            let took = sent_at.elapsed();
            assert!(
                codes.iter().all(|c| *c == Some(1008)),
                "{io}: close codes {:?}",
                codes
                    .iter()
                    .filter(|c| **c != Some(1008))
                    .take(5)
                    .collect::<Vec<_>>()
            );
            assert!(
                took >= Duration::from_millis(MESSAGE_TIMEOUT_MS - 100),
                "{io}: closed after {took:?}, before the message timeout"
            );
            assert!(
                took < Duration::from_millis(MESSAGE_TIMEOUT_MS + 5_000),
                "{io}: closed only after {took:?}"
            );
            // Counters reach /metrics at the shards' next publication.
            gw.eventually("every message timeout counted", || {
                gw.metric("ringlink_connections_closed_total{reason=\"message_timeout\"}")
                    == PEERS as f64
            });
            // The probe's connection is untouched.
            assert_eq!(probe.report(THERMO, "thermo-00001", power()).await, 0);
        });
    }
}
