//! Limits that protect the gateway: `max_connections`, accept surviving a process that has run
//! out of file descriptors, and the EMQX-style `[limits]`: messages per second per connection
//! (paused, not dropped), new connections per second (accept pacing), connections per source IP,
//! and flapping devices (banned, then let back in).

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
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
                // Long enough that the server's send buffer (autotuned on loopback to
                // megabytes) fills and the pause comes before the close, even when a busy
                // machine runs the debug server slowly: with 2.5 s, 2 runs in 27 closed the
                // connection before it was ever paused.
                ("RINGLINK_LIMITS_PONG_TIMEOUT_MS", "5000"),
                // The pause looked for here is the backpressure one, not the rate limit's.
                ("RINGLINK_LIMITS_MAX_MESSAGES_PER_S", "0"),
            ],
        );
        // A small receive buffer, so that the replies back up into ringlink quickly even on a
        // busy machine (loopback's autotuned buffers hold megabytes).
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        sock.connect(&gw.ws.into()).expect("connect");
        let mut s: TcpStream = sock.into();
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
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
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

/// A connection sending far faster than `max_messages_per_s` is not read while over it: every
/// message is answered, the answers come at about the limit, and the connection stays open.
#[test]
fn an_over_rate_connection_is_paused_not_dropped() {
    const RATE: f64 = 200.0;
    const BURST: usize = 20;
    const N: usize = 400;
    for io in DRIVERS {
        let gw = Gateway::start_with(
            io,
            &[],
            &[
                ("RINGLINK_LIMITS_MAX_MESSAGES_PER_S", "200"),
                ("RINGLINK_LIMITS_MESSAGE_BURST", "20"),
            ],
        );
        rt().block_on(async {
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(c.online(THERMO, "thermo-00400").await, 0);
            // Let the bucket fill again after the online.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let power = json!({"properties": [{"identifier":"power","type":"bool","value":1}]});
            let start = Instant::now();
            let mut ids = Vec::with_capacity(N);
            for _ in 0..N {
                ids.push(
                    c.request("reportProperty", THERMO, "thermo-00400", power.clone())
                        .await,
                );
            }
            for id in ids {
                let reply = c.recv().await;
                assert_eq!(reply["messageId"], json!(id), "{io}: in order, none lost");
                assert_eq!(reply["code"], json!(0), "{io}: {reply}");
            }
            let elapsed = start.elapsed().as_secs_f64();
            // BURST at once, then RATE a second.
            let expected = (N - BURST) as f64 / RATE;
            let observed = (N - BURST) as f64 / elapsed;
            eprintln!(
                "{io}: {N} pipelined reports answered in {elapsed:.2} s: {observed:.0}/s \
                 after the burst (limit {RATE}/s)"
            );
            assert!(
                elapsed > expected * 0.85 && elapsed < expected * 1.5 + 0.5,
                "{io}: {elapsed:.2} s, expected about {expected:.2} s"
            );
            // Still open, and served.
            assert_eq!(
                c.report(THERMO, "thermo-00400", power["properties"].clone())
                    .await,
                0,
                "{io}"
            );
            assert_eq!(gw.metric("ringlink_connections_open"), 1.0, "{io}");
        });
        assert!(
            gw.metric("ringlink_limited_total{limit=\"message_rate\"}") >= 1.0,
            "{io}: pauses are counted"
        );
    }
}

/// A TCP connection from `source` (a loopback address), or None when ringlink closes it at
/// accept: it reads EOF within a second where an accepted connection reads nothing.
async fn closed_at_accept(gw: &Gateway, source: &str) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind");
    let mut s = socket.connect(gw.ws).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::io::AsyncReadExt::read(&mut s, &mut buf);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), read).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn connections_per_ip_are_capped_and_other_addresses_are_unaffected() {
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &[("RINGLINK_LIMITS_MAX_CONNECTIONS_PER_IP", "3")]);
        rt().block_on(async {
            let mut held = Vec::new();
            for i in 0..3 {
                let mut c = Client::connect_from(gw.ws, Some("127.0.0.2")).await;
                let dn = format!("thermo-{:05}", 500 + i);
                assert_eq!(c.online(THERMO, &dn).await, 0, "{io}");
                held.push(c);
            }
            // The fourth from 127.0.0.2 is closed at accept (the shards share the count).
            assert!(
                closed_at_accept(&gw, "127.0.0.2").await,
                "{io}: over the cap"
            );
            assert!(
                gw.metric("ringlink_limited_total{limit=\"per_ip\"}") >= 1.0,
                "{io}: counted"
            );
            // Other addresses are not affected.
            for source in ["127.0.0.3", "127.0.0.1"] {
                let mut c = Client::connect_from(gw.ws, Some(source)).await;
                assert_eq!(
                    c.online(THERMO, "thermo-00510").await,
                    0,
                    "{io} from {source}"
                );
                c.close().await;
            }
            // The devices of the first three were not touched.
            for i in 0..3 {
                assert!(
                    gw.is_online(THERMO, &format!("thermo-{:05}", 500 + i)),
                    "{io}"
                );
            }
            // Room again once one of them goes.
            held.pop().expect("three").close().await;
            gw.eventually("the close is counted", || {
                gw.metric("ringlink_connections_open") <= 2.0
            });
            let mut c = Client::connect_from(gw.ws, Some("127.0.0.2")).await;
            assert_eq!(c.online(THERMO, "thermo-00502").await, 0, "{io}");
        });
    }
}

/// Over `max_new_connections_per_s`, connections wait in the kernel's backlog: all of them are
/// served, at about the limit, none refused.
#[test]
fn accept_pacing_admits_at_the_limit_and_refuses_none() {
    const RATE: f64 = 20.0; // burst: one second's worth
    const N: usize = 80;
    for io in DRIVERS {
        let gw = Gateway::start_with(
            io,
            &[],
            &[("RINGLINK_LIMITS_MAX_NEW_CONNECTIONS_PER_S", "20")],
        );
        // The readiness check went to the API: the device listener has accepted nothing yet,
        // so the whole burst is there.
        rt().block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..N)
                .map(|_| {
                    let addr = gw.ws;
                    tokio::spawn(async move {
                        let c = Client::connect(addr).await;
                        let upgraded = start.elapsed().as_secs_f64();
                        (c, upgraded)
                    })
                })
                .collect();
            let mut done = Vec::with_capacity(N);
            for t in tasks {
                done.push(t.await.expect("every connection is served"));
            }
            let mut times: Vec<f64> = done.iter().map(|d| d.1).collect();
            times.sort_by(f64::total_cmp);
            let burst = RATE as usize;
            let paced = (N - burst) as f64 / (times[N - 1] - times[burst - 1]);
            eprintln!(
                "{io}: {N} connections upgraded in {:.2} s; {paced:.1}/s after the burst \
                 (limit {RATE}/s)",
                times[N - 1]
            );
            assert!(
                paced > RATE * 0.7 && paced < RATE * 1.3,
                "{io}: {paced:.1}/s, limit {RATE}/s"
            );
            // All of them are served: a device on the last one comes online.
            let (mut last, _) = done.pop().expect("N");
            assert_eq!(last.online(THERMO, "thermo-00600").await, 0, "{io}");
        });
        assert_eq!(
            gw.metric("ringlink_connections_rejected_total"),
            0.0,
            "{io}"
        );
        assert!(
            gw.metric("ringlink_limited_total{limit=\"accept_rate\"}") >= 1.0,
            "{io}: pauses are counted"
        );
        assert_eq!(
            gw.metric("ringlink_connections_accepted_total"),
            N as f64,
            "{io}"
        );
    }
}

/// A device that comes online more than `flapping_max` times within the window is refused
/// with 109000 until the ban ends; other devices are not affected.
#[test]
fn a_flapping_device_is_banned_and_the_ban_expires() {
    const BAN: Duration = Duration::from_millis(1500);
    for io in DRIVERS {
        let gw = Gateway::start_with(
            io,
            &[],
            &[
                ("RINGLINK_LIMITS_FLAPPING_MAX", "3"),
                ("RINGLINK_LIMITS_FLAPPING_WINDOW_MS", "10000"),
                ("RINGLINK_LIMITS_FLAPPING_BAN_MS", "1500"),
            ],
        );
        rt().block_on(async {
            let dn = "thermo-00700";
            // Three connect-online-drop cycles, as a device stuck in a reconnect loop does.
            for _ in 0..3 {
                let mut c = Client::connect(gw.ws).await;
                assert_eq!(c.online(THERMO, dn).await, 0, "{io}");
                c.close().await;
                gw.eventually("offline", || !gw.is_online(THERMO, dn));
            }
            let mut c = Client::connect(gw.ws).await;
            let banned_at = Instant::now();
            assert_eq!(
                c.online(THERMO, dn).await,
                109_000,
                "{io}: the fourth is refused"
            );
            assert!(!gw.is_online(THERMO, dn), "{io}");
            assert_eq!(
                c.online(THERMO, "thermo-00701").await,
                0,
                "{io}: others are not"
            );
            assert!(
                gw.metric("ringlink_limited_total{limit=\"flapping\"}") >= 1.0,
                "{io}: counted"
            );
            // Refused until the ban is over, then welcome.
            let code = loop {
                let code = c.online(THERMO, dn).await;
                if code == 0 || banned_at.elapsed() > BAN * 4 {
                    break code;
                }
                assert_eq!(code, 109_000, "{io}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(code, 0, "{io}: the ban expires");
            let after = banned_at.elapsed();
            assert!(
                after >= BAN - Duration::from_millis(100),
                "{io}: let back in after {after:?}, ban {BAN:?}"
            );
            assert!(gw.is_online(THERMO, dn), "{io}");
        });
    }
}
