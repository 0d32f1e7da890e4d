//! Hostile clients of the northbound API, against the real server on port 0: a slowloris is
//! closed after `api.request_timeout_ms`, a flood of idle connections beyond
//! `api.max_connections` neither stops devices from connecting nor `/healthz` from answering,
//! the Bearer token guards every route but the probes, and a non-loopback API without a token
//! refuses to start.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Client, Gateway, DRIVERS};

const THERMO: &str = "a1ThermoPK0";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One raw HTTP/1.1 request with `Connection: close` and extra header lines; the status, the
/// head and the body.
fn raw_request(api: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(api).expect("connect API");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read answer");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (status, head.to_owned(), body.to_owned())
}

/// Reads until the peer closes (Ok(true)) or `within` passes with the socket open (Ok(false)).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A request sent one byte every 200 ms is closed once `request_timeout_ms` (800) has passed
/// since the connection was accepted, though bytes keep coming; an idle keep-alive connection
/// is closed after the same time; a connection busy with a long answer (the uplink stream) is
/// not.
#[test]
fn slowloris_and_idle_keep_alive_are_closed_after_request_timeout() {
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &[("RINGLINK_API_REQUEST_TIMEOUT_MS", "800")]);

        // Slowloris: a valid request, a byte at a time.
        let mut s = TcpStream::connect(gw.api).expect("connect");
        let started = Instant::now();
        let request = b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut closed_at = None;
        for b in request {
            if s.write_all(&[*b]).is_err() {
                closed_at = Some(started.elapsed());
                break;
            }
            if closed_within(&mut s, Duration::from_millis(200)) {
                closed_at = Some(started.elapsed());
                break;
            }
        }
        let closed_at = closed_at.unwrap_or_else(|| panic!("{io}: slowloris never closed"));
        assert!(
            closed_at >= Duration::from_millis(750) && closed_at < Duration::from_millis(2_500),
            "{io}: slowloris closed after {closed_at:?}, want about 800 ms"
        );
        gw.eventually("the timeout is counted", || {
            gw.metric("ringlink_api_connections_timed_out_total") >= 1.0
        });

        // Idle keep-alive: one answered request, then silence.
        let mut s = TcpStream::connect(gw.api).expect("connect");
        write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200", "{io}");
        let idle_from = Instant::now();
        assert!(
            closed_within(&mut s, Duration::from_secs(3)),
            "{io}: idle keep-alive connection still open after 3 s"
        );
        let idle = idle_from.elapsed();
        assert!(
            idle >= Duration::from_millis(700),
            "{io}: idle connection closed after {idle:?}, before the timeout"
        );

        // A long answer is not a slow request: the uplink stream stays open past the timeout.
        let mut sse = TcpStream::connect(gw.api).expect("connect");
        write!(sse, "GET /v1/uplinks HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        sse.read_exact(&mut head).expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200", "{io}");
        assert!(
            !closed_within(&mut sse, Duration::from_millis(2_000)),
            "{io}: the uplink stream was closed by the request timeout"
        );
    }
}

/// 200 idle connections against `api.max_connections = 20` (and a request timeout too long to
/// help): devices still connect and go online, `/healthz` still answers, and the API never
/// holds more than 20 connections.
#[test]
fn idle_api_flood_beyond_max_connections_starves_neither_devices_nor_healthz() {
    for io in DRIVERS {
        let gw = Gateway::start_with(
            io,
            &[],
            &[
                ("RINGLINK_API_MAX_CONNECTIONS", "20"),
                ("RINGLINK_API_REQUEST_TIMEOUT_MS", "60000"),
            ],
        );
        let mut idle = Vec::new();
        for _ in 0..200 {
            let s = TcpStream::connect_timeout(&gw.api, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{io}: connect idle: {e}"));
            idle.push(s);
        }
        // Every slot is taken by the flood now (the last 20 of it).
        let rt = rt();
        let device = rt.block_on(async {
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(
                c.online(THERMO, "thermo-00400").await,
                0,
                "{io}: a device goes online during the flood"
            );
            c
        });
        let t = Instant::now();
        let (status, _, body) = raw_request(gw.api, "/healthz", "");
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{io}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{io}: /healthz took {:?}",
            t.elapsed()
        );
        assert!(gw.is_online(THERMO, "thermo-00400"), "{io}");
        let open = gw.metric("ringlink_api_connections_open");
        assert!(
            (1.0..=20.0).contains(&open),
            "{io}: {open} API connections open, cap 20"
        );
        let evicted = gw.metric("ringlink_api_connections_evicted_total");
        assert!(evicted >= 180.0, "{io}: {evicted} evicted");
        drop(idle);
        drop(device);
    }
}

/// With `api.token_file`, every route but the probes needs `Authorization: Bearer <token>`.
#[test]
fn token_guards_every_route_but_the_probes() {
    let dir = support::temp_dir("api-token");
    let token_file = dir.join("api.token");
    std::fs::write(&token_file, "  t0ken-for-tests\n").expect("write token");
    let token_env = token_file.to_str().expect("utf-8 path");
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &[("RINGLINK_API_TOKEN_FILE", token_env)]);
        assert!(gw.start_line.contains("(token)"), "{}", gw.start_line);

        let (status, head, body) = raw_request(gw.api, "/v1/devices?online=true", "");
        assert_eq!(status, 401, "{io}: no token: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{io}: {head}"
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        assert!(
            json["code"].is_u64() && json["message"].is_string(),
            "{io}: {json}"
        );

        let (status, ..) = raw_request(
            gw.api,
            "/v1/devices?online=true",
            "Authorization: Bearer t0ken-for-test\r\n",
        );
        assert_eq!(status, 401, "{io}: wrong token");
        let (status, ..) = raw_request(
            gw.api,
            "/v1/devices/a1ThermoPK0/thermo-00001",
            "Authorization: Basic t0ken-for-tests\r\n",
        );
        assert_eq!(status, 401, "{io}: not a Bearer token");

        let (status, _, body) = raw_request(
            gw.api,
            "/v1/devices?online=true",
            "Authorization: Bearer t0ken-for-tests\r\n",
        );
        assert_eq!((status, body.as_str()), (200, "[]"), "{io}: right token");

        for probe in ["/healthz", "/readyz", "/metrics"] {
            let (status, ..) = raw_request(gw.api, probe, "");
            assert_eq!(status, 200, "{io}: {probe} needs no token");
        }
        assert_eq!(gw.metric("ringlink_api_unauthorized_total"), 3.0, "{io}");

        // The CLI client: without the token 401, with it the request goes through (the device
        // is offline: 409).
        let set = |extra: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_ringlink"))
                .args(["set", "--api", &gw.api.to_string()])
                .args(extra)
                .args([THERMO, "thermo-00001", "setpoint=21.5"])
                .env_remove("RINGLINK_API_TOKEN_FILE")
                .output()
                .expect("run ringlink set");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let err = set(&[]);
        assert!(err.contains("HTTP 401"), "{io}: {err}");
        let err = set(&["--token-file", token_env]);
        assert!(
            err.contains("HTTP 409") && err.contains("109001"),
            "{io}: {err}"
        );
    }
}

/// An API on a non-loopback address without a token is refused by `check` and by `serve`,
/// naming the key.
#[test]
fn non_loopback_api_without_token_refuses_to_start() {
    let bin = env!("CARGO_BIN_EXE_ringlink");
    let data = support::temp_dir("api-refuse");
    let out = Command::new(bin)
        .args(["check"])
        .env("RINGLINK_API_LISTEN", "0.0.0.0:17690")
        .env_remove("RINGLINK_API_TOKEN_FILE")
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("env RINGLINK_API_LISTEN: api.listen: 0.0.0.0:17690 is not a loopback")
            && err.contains("api.token_file"),
        "{err}"
    );
    let out = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--api", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(Path::new(&data))
        .env_remove("RINGLINK_API_TOKEN_FILE")
        .output()
        .expect("run serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must refuse: {err}");
    assert!(
        err.contains("flag --api: api.listen") && err.contains("api.token_file"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "it must not have served"
    );
}
