//! Structured logs of `ringlink serve` on both drivers: JSON lines on stderr, the filter from
//! `RUST_LOG` or `--log`, the `conn` span on a connection's debug events, and the start line
//! left as it was (stdout) for the scripts and tests that parse it.

mod support;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use support::{ApiClient, Client, DRIVERS, THERMO};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `ringlink serve` with its stderr captured line by line.
struct Logged {
    child: Option<Child>,
    ws: SocketAddr,
    start_line: String,
    lines: mpsc::Receiver<String>,
    /// Every stderr line received so far.
    seen: Vec<String>,
}

impl Logged {
    fn start(io: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let data = support::temp_dir(&format!("logs-{io}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlink"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .args(["--io", io, "--threads", "1", "--data-dir"])
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only what the test sets: a developer's RUST_LOG or RINGLINK_* must not change it.
        for (k, _) in std::env::vars() {
            if k == "RUST_LOG" || k.starts_with("RINGLINK_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start ringlink");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut out = BufReader::new(stdout).lines();
        let start_line = loop {
            match out.next() {
                Some(Ok(line)) if line.starts_with("ringlink: listening on ") => break line,
                Some(Ok(_)) => continue,
                _ => panic!("ringlink exited before its start line"),
            }
        };
        std::thread::spawn(move || for _ in out {});
        let after = |scheme: &str| -> SocketAddr {
            let rest = &start_line[start_line.find(scheme).expect(scheme) + scheme.len()..];
            let end = rest.find([' ', ',', ')']).unwrap_or(rest.len());
            rest[..end].parse().expect("address")
        };
        let ws = after("ws://");
        let api = ApiClient(after("api http://"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(api.try_request("GET", "/readyz", None), Ok((200, _))) {
            assert!(Instant::now() < deadline, "ringlink did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            ws,
            start_line,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (10 s at most) for a stderr line that `f` accepts.
    fn wait_for(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| f(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if f(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line {what}; got:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGTERM (drain), then every stderr line up to the exit.
    fn stop(mut self) -> Vec<String> {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ringlink did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

/// One device online, then the connection closed by the client with 1000.
fn connect_online_close(ws: SocketAddr, dn: &str) {
    rt().block_on(async {
        let mut c = Client::connect(ws).await;
        assert_eq!(c.online(THERMO, dn).await, 0);
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        let _ = c.ws.close(Some(close)).await;
    });
}

#[test]
fn json_lines_carry_level_target_fields_and_the_connection_span() {
    for io in DRIVERS {
        let mut gw = Logged::start(io, &["--log-format", "json", "--log", "debug"], &[]);
        // The start line contract holds in JSON mode too: same text, on stdout.
        assert!(
            gw.start_line
                .starts_with("ringlink: listening on ws://127.0.0.1:"),
            "{}",
            gw.start_line
        );
        let ws = gw.ws;
        connect_online_close(ws, "thermo-00007");
        gw.wait_for("connection closed", |l| l.contains("connection closed"));
        let lines = gw.stop();
        let events: Vec<Value> = lines.iter().map(|l| json(l)).collect();
        for (line, v) in lines.iter().zip(&events) {
            assert!(v["level"].is_string(), "{io}: no level: {line}");
            assert!(v["target"].is_string(), "{io}: no target: {line}");
            assert!(v["fields"].is_object(), "{io}: no fields: {line}");
            assert!(v["timestamp"].is_string(), "{io}: no timestamp: {line}");
        }
        let find = |msg: &str| {
            events
                .iter()
                .find(|v| message(v) == msg)
                .unwrap_or_else(|| panic!("{io}: no {msg:?} event in:\n{}", lines.join("\n")))
        };
        // The start as an event for collectors, with the same facts as the start line.
        let started = find("started");
        assert_eq!(started["level"], "INFO");
        assert_eq!(started["fields"]["io"], *io);
        assert_eq!(started["fields"]["threads"], 1);
        let listen = format!("ws://{ws}");
        assert_eq!(started["fields"]["listen"].as_str(), Some(listen.as_str()));
        // Accepted and closed: debug, inside the connection's span.
        for msg in ["connection accepted", "connection closed"] {
            let v = find(msg);
            assert_eq!(v["level"], "DEBUG", "{io}: {v}");
            assert_eq!(v["target"], "ringlink::shard::core", "{io}: {v}");
            let span = &v["span"];
            assert_eq!(span["name"], "conn", "{io}: {v}");
            assert_eq!(span["shard"], 0, "{io}: {v}");
            assert!(span["slot"].is_u64(), "{io}: {v}");
            let peer: SocketAddr = span["peer"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{io}: peer: {v}"));
            assert!(peer.ip().is_loopback(), "{io}: {v}");
        }
        let closed = find("connection closed");
        assert_eq!(closed["fields"]["reason"], "peer_closed", "{io}: {closed}");
        assert_eq!(closed["fields"]["code"], 1000, "{io}: {closed}");
        // Device events name the device in the span.
        for msg in ["device online", "device offline"] {
            let v = find(msg);
            assert_eq!(v["span"]["device"], "a1ThermoPK0/thermo-00007", "{io}: {v}");
            assert_eq!(v["span"]["slot"], closed["span"]["slot"], "{io}: {v}");
        }
        assert_eq!(
            message(events.last().expect("lines")),
            "drained, uplinks flushed, bye"
        );
    }
}

#[test]
fn rust_log_filters_and_the_log_flag_wins_over_it() {
    let io = DRIVERS[1];
    // Default: info, so the start and drain events show; no debug.
    let gw = Logged::start(io, &[], &[("RINGLINK_LOG_FORMAT", "json")]);
    connect_online_close(gw.ws, "thermo-00008");
    let lines = gw.stop();
    let levels: Vec<String> = lines
        .iter()
        .map(|l| json(l)["level"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(levels.iter().any(|l| l == "INFO"), "{lines:?}");
    assert!(!levels.iter().any(|l| l == "DEBUG"), "{lines:?}");

    // RUST_LOG=warn hides info.
    let gw = Logged::start(
        io,
        &[],
        &[("RINGLINK_LOG_FORMAT", "json"), ("RUST_LOG", "warn")],
    );
    connect_online_close(gw.ws, "thermo-00008");
    let lines = gw.stop();
    for line in &lines {
        let level = json(line)["level"].as_str().unwrap_or("").to_owned();
        assert!(level == "WARN" || level == "ERROR", "{line}");
    }

    // --log wins over RUST_LOG, and takes per-module directives.
    let mut gw = Logged::start(
        io,
        &[
            "--log",
            "warn,ringlink::shard=debug",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "error")],
    );
    connect_online_close(gw.ws, "thermo-00008");
    gw.wait_for("connection closed", |l| l.contains("connection closed"));
    let lines = gw.stop();
    assert!(
        !lines.iter().any(|l| l.contains("\"started\"")),
        "{lines:?}"
    );
}

#[test]
fn text_logs_show_the_span_and_keep_the_start_line() {
    for io in DRIVERS {
        let mut gw = Logged::start(io, &["--log", "debug"], &[]);
        assert!(
            gw.start_line.contains(&format!("io {io} (")),
            "{}",
            gw.start_line
        );
        connect_online_close(gw.ws, "thermo-00009");
        let accepted = gw.wait_for("connection accepted", |l| l.contains("connection accepted"));
        assert!(accepted.contains("DEBUG"), "{accepted}");
        assert!(
            accepted.contains("conn{shard=0 slot=") && accepted.contains(" peer=127.0.0.1:"),
            "{accepted}"
        );
        let online = gw.wait_for("device online", |l| l.contains("device online"));
        assert!(
            online.contains("device=a1ThermoPK0/thermo-00009"),
            "{online}"
        );
        let lines = gw.stop();
        // Text is for people: no JSON objects.
        assert!(!lines.iter().any(|l| l.starts_with('{')), "{lines:?}");
    }
}

#[test]
fn a_bad_log_option_stops_serve_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringlink"))
        .args(["serve", "--log-format", "xml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected text or json"));
    let out = Command::new(env!("CARGO_BIN_EXE_ringlink"))
        .args(["serve", "--log", "ringlink=loud", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log filter \"ringlink=loud\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
