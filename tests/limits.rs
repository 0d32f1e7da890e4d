//! Limits that protect the gateway: `max_connections`, and accept surviving a process that has
//! run out of file descriptors.

mod support;

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

#[test]
fn accept_backs_off_on_emfile_and_recovers() {
    for io in DRIVERS {
        // 64 descriptors: the runtime, the log, listeners and the API take some; a flood of
        // connections exhausts the rest.
        let gw = Gateway::start_with_fd_limit(io, 64);
        let flood: Vec<TcpStream> = (0..120)
            .filter_map(|_| TcpStream::connect(gw.ws).ok())
            .collect();
        gw.eventually("accept errors are counted", || {
            gw.metric("ringlink_accept_errors_total") >= 1.0
        });
        drop(flood);
        gw.eventually("connections from the flood are gone", || {
            gw.metric("ringlink_connections_open") == 0.0
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
