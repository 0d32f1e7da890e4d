//! Limits that protect the gateway: `max_connections`, and accept surviving a process that has
//! run out of file descriptors.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use support::{Client, Gateway, DRIVERS, THERMO};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn max_connections_refuses_the_next_connection() {
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &[("RINGLINK_LIMITS_MAX_CONNECTIONS", "3")]);
        rt().block_on(async {
            let mut held = Vec::new();
            for i in 0..3 {
                let mut c = Client::connect(gw.ws).await;
                assert_eq!(c.online(THERMO, &format!("thermo-{:05}", 100 + i)).await, 0);
                held.push(c);
            }
            // The fourth is accepted by the kernel and closed by ringlink at once.
            let mut s = TcpStream::connect(gw.ws).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 16];
            let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
            assert_eq!(n, 0, "{io}: the connection over the limit is closed");
            assert!(
                gw.metric("ringlink_connections_rejected_total") >= 1.0,
                "{io}"
            );
            // Room again once one goes.
            held.pop().expect("three").close().await;
            gw.eventually("a slot frees", || {
                gw.metric("ringlink_connections_open") < 3.0
            });
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(c.online(THERMO, "thermo-00200").await, 0, "{io}");
        });
    }
}

/// At a low open-files limit the device cap is lowered so that a flood of device connections
/// does not exhaust the descriptors (no EMFILE at accept with epoll): 64 files hold 4 API connections, the
/// reserve (32 + 8 per shard, 2 shards) and 64 - 4 - 48 = 12 devices. The flood beyond 12 is
/// refused at accept, `/healthz` answers meanwhile, and devices connect again afterwards.
#[test]
fn a_device_flood_at_a_low_open_files_limit_is_capped_not_emfile() {
    for io in DRIVERS {
        let gw = Gateway::start_with_fd_limit(
            io,
            64,
            &["--threads", "2"],
            &[("RINGLINK_API_MAX_CONNECTIONS", "4")],
        );
        assert!(
            gw.start_line.contains("max 12 connections")
                && gw.start_line.contains("device connections capped at 12"),
            "{io}: {}",
            gw.start_line
        );
        let flood: Vec<TcpStream> = (0..120)
            .filter_map(|_| TcpStream::connect(gw.ws).ok())
            .collect();
        gw.eventually("the flood beyond the cap is refused", || {
            gw.metric("ringlink_connections_rejected_total") >= 1.0
        });
        assert!(gw.metric("ringlink_connections_open") <= 12.0, "{io}");
        assert_eq!(
            gw.try_http("GET", "/healthz", None).expect("healthz").0,
            200
        );
        // epoll accepts one connection at a time and refuses it at once. io_uring's multishot
        // accept lets the kernel accept a burst (each a descriptor) before the shard sees and
        // closes them, so there a burst may still meet EMFILE briefly: the shard counts it,
        // backs off and (below) accepts again.
        if io == "epoll" {
            assert_eq!(
                gw.metric("ringlink_accept_errors_total"),
                0.0,
                "{io}: no EMFILE"
            );
        }
        let n = flood.len() as f64;
        drop(flood);
        // Every connection of the flood went through accept (held, then closed, or refused),
        // none is left in the backlog to take the slot of the next device.
        gw.eventually("the flood is through accept and gone", || {
            gw.metric("ringlink_connections_accepted_total")
                + gw.metric("ringlink_connections_rejected_total")
                >= n
                && gw.metric("ringlink_connections_open") == 0.0
        });
        rt().block_on(async {
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(
                c.online(THERMO, "thermo-00300").await,
                0,
                "{io}: accepting again"
            );
        });
    }
}

/// A peer that sends and never reads: ringlink stops reading it once its replies back up
/// (backpressure), closes it at the pong timeout, and, since the close frame cannot be
/// flushed to a peer that takes nothing, drops the socket a pong timeout later instead of
/// holding it (and its memory) forever.
#[test]
fn a_peer_that_never_reads_is_paused_then_dropped() {
    for io in DRIVERS {
        let gw = Gateway::start_with(
            io,
            &[],
            &[
                ("RINGLINK_LIMITS_PING_INTERVAL_MS", "1000"),
                ("RINGLINK_LIMITS_PONG_TIMEOUT_MS", "2500"),
            ],
        );
        let mut s = TcpStream::connect(gw.ws).expect("connect");
        let mut req = Vec::new();
        ringlink::ws::handshake::write_request(
            &mut req,
            "127.0.0.1",
            "//",
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("alibaba-iot-linkedge-protocol"),
        );
        s.write_all(&req).expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("response");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{io}");
        // Requests that are answered at once (an unknown device: 109000); the replies back up.
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut client = ringlink::ws::Conn::client(ringlink::ws::Limits::default());
        let mut frames = Vec::new();
        for id in 1..=2000 {
            let text = format!(
                r#"{{"version":"1.0","method":"onlineDevice","messageId":{id},"payload":{{"productKey":"{THERMO}","deviceName":"nobody"}}}}"#
            );
            client.send_text(&mut frames, text.as_bytes());
        }
        // Write for up to 15 s; once ringlink drops the socket, a write fails.
        let until = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < until {
            match s.write(&frames) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        assert!(
            gw.metric("ringlink_reads_paused_total") >= 1.0,
            "{io}: never paused"
        );
        gw.eventually("the connection is dropped", || {
            gw.metric("ringlink_connections_open") == 0.0
        });
    }
}
