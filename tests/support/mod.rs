//! Integration-test support: start the real `ringlink` binary on port 0, learn its addresses
//! from its start line, wait until `/readyz` answers, and talk to it with an independent
//! WebSocket client (tokio-tungstenite) and a small HTTP client. No fixed ports, no sleeps to
//! wait for readiness.

#![allow(dead_code, unreachable_pub)]

pub mod broker;
pub mod nats;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Both IO drivers; every behaviour test runs on each.
pub const DRIVERS: [&str; 2] = ["uring", "epoll"];

/// A running gateway process.
pub struct Gateway {
    child: Option<Child>,
    pub ws: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    pub start_line: String,
}

/// A fresh directory under cargo's per-test temporary dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The demo thing models, for configs written by tests.
pub fn demo_tsl(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/registry/demo")
        .join(name)
}

impl Gateway {
    /// Starts `ringlink serve` with the demo registry on the given driver.
    pub fn start(io: &str) -> Self {
        Self::start_with(io, &[], &[])
    }

    /// Starts with extra flags and environment variables.
    pub fn start_with(io: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(io, args, env, None)
    }

    /// Starts with the process's open-files limit (soft and hard) set to `fd_limit`, and extra
    /// flags and environment variables.
    pub fn start_with_fd_limit(
        io: &str,
        fd_limit: u32,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_full(io, args, env, Some(fd_limit))
    }

    /// Starts on an existing data directory (a restart after a crash, say).
    pub fn start_in(io: &str, data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_dir(io, data_dir.to_owned(), args, env, None)
    }

    fn start_full(io: &str, args: &[&str], env: &[(&str, &str)], fd_limit: Option<u32>) -> Self {
        Self::start_dir(io, temp_dir(&format!("gw-{io}")), args, env, fd_limit)
    }

    fn start_dir(
        io: &str,
        data_dir: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
        fd_limit: Option<u32>,
    ) -> Self {
        let bin = env!("CARGO_BIN_EXE_ringlink");
        let mut cmd = match fd_limit {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--io",
            io,
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start ringlink");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let start_line = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break line,
                Some(Ok(_)) => continue,
                _ => {
                    let status = child.wait().expect("wait for ringlink");
                    panic!("ringlink exited before it was listening: {status}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let ws = address_after(&start_line, "ws://")
            .or_else(|| address_after(&start_line, "wss://"))
            .expect("start line names the WebSocket address");
        let api = address_after(&start_line, "http://").expect("start line names the API");
        let gw = Self {
            child: Some(child),
            ws,
            api,
            data_dir,
            start_line,
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.try_http("GET", "/readyz", None) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ringlink did not become ready");
    }

    /// `(status, body)` of an API call.
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        ApiClient(self.api).request(method, path, body)
    }

    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, String)> {
        ApiClient(self.api).try_request(method, path, body)
    }

    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, text) = self.try_http("GET", "/metrics", None).expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn device(&self, pk: &str, dn: &str) -> Value {
        self.http("GET", &format!("/v1/devices/{pk}/{dn}"), None).1
    }

    pub fn is_online(&self, pk: &str, dn: &str) -> bool {
        self.device(pk, dn)["online"] == json!(true)
    }

    /// Polls until `f` holds (state that another thread changes), failing after 10 s.
    pub fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting for: {what}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (after a signal), at most 20 s.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ringlink did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A blocking client of the northbound API (one request per connection).
#[derive(Clone, Copy, Debug)]
pub struct ApiClient(pub SocketAddr);

impl ApiClient {
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, Some(body))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (status, text) = self
            .try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(self.0)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.0,
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {text:?}")))?;
        let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let payload = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(payload)
        } else {
            payload.to_owned()
        };
        Ok((status, payload))
    }
}

fn address_after(line: &str, scheme: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(scheme)? + scheme.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A device-side client over tokio-tungstenite.
pub struct Client {
    pub ws: Ws,
    next_id: u32,
}

impl Client {
    /// Connects to `addr` on path `//` offering the Link subprotocol, like the official client.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_from(addr, None).await
    }

    /// Connects from a given source address (e.g. 127.0.0.2).
    pub async fn connect_from(addr: SocketAddr, source: Option<&str>) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(src) = source {
            socket
                .bind(format!("{src}:0").parse().expect("source address"))
                .expect("bind source address");
        }
        let stream = socket.connect(addr).await.expect("connect");
        let url = format!("ws://{}//", addr.ip());
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "alibaba-iot-linkedge-protocol".parse().expect("header"),
        );
        let (ws, resp) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
            .await
            .expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        Self { ws, next_id: 1000 }
    }

    pub fn from_ws(ws: Ws) -> Self {
        Self { ws, next_id: 1000 }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// The next JSON message (text frames only; answers pings on the way), within 10 s.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(10))
            .await
            .expect("a message within 10 s")
    }

    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg.ok()? {
                Message::Text(t) => {
                    assert!(!t.ends_with('\0'), "ringlink never sends a trailing NUL");
                    return Some(serde_json::from_str(&t).expect("server sends JSON"));
                }
                Message::Binary(_) => panic!("ringlink sends TEXT frames only"),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Sends a request with a fresh id (and the official client's trailing NUL); returns the id.
    pub async fn request(&mut self, method: &str, pk: &str, dn: &str, extra: Value) -> u32 {
        self.try_request(method, pk, dn, extra)
            .await
            .expect("send request")
    }

    /// Like [`Client::request`], but None when the connection is gone.
    pub async fn try_request(
        &mut self,
        method: &str,
        pk: &str,
        dn: &str,
        extra: Value,
    ) -> Option<u32> {
        self.next_id += 1;
        let id = self.next_id;
        let mut payload = json!({"productKey": pk, "deviceName": dn});
        if let (Value::Object(p), Value::Object(e)) = (&mut payload, extra) {
            p.extend(e);
        }
        let msg = json!({"version": "1.0", "messageId": id, "method": method, "payload": payload});
        let text = format!("{msg}\0");
        self.ws.send(Message::Text(text.into())).await.ok()?;
        Some(id)
    }

    /// Sends a request and returns the code of its reply (checking the echoed id).
    pub async fn call(&mut self, method: &str, pk: &str, dn: &str, extra: Value) -> u64 {
        let id = self.request(method, pk, dn, extra).await;
        let reply = self.recv().await;
        assert_eq!(
            reply["messageId"],
            json!(id),
            "reply to the right request: {reply}"
        );
        reply["code"].as_u64().expect("numeric code")
    }

    pub async fn online(&mut self, pk: &str, dn: &str) -> u64 {
        self.call("onlineDevice", pk, dn, json!({})).await
    }

    pub async fn report(&mut self, pk: &str, dn: &str, props: Value) -> u64 {
        self.call("reportProperty", pk, dn, json!({"properties": props}))
            .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub const THERMO: &str = "a1ThermoPK0";
