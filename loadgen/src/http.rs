//! The northbound API's client: hyper's HTTP/1.1 client connection over a tokio `TcpStream`,
//! kept alive between requests (JSON bodies and `/metrics`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One keep-alive connection to an HTTP server.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    /// Sent as `Authorization: Bearer <token>` with every request when set.
    token: Option<String>,
}

/// A response: status, body, and whether the connection may be reused.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 with {addr}"))?;
        // The connection's own task: it ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
            token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` from now on (the server's `api.token_file`).
    #[must_use]
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    /// Sends one request and reads its response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host);
        if let Some(token) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let body = Full::new(Bytes::copy_from_slice(body.unwrap_or_default()));
        let req = req.body(body).context("building the request")?;
        self.sender
            .ready()
            .await
            .context("the HTTP connection closed")?;
        let res = self.sender.send_request(req).await?;
        let status = res.status().as_u16();
        let close = res
            .headers()
            .get(CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = res
            .into_body()
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes()
            .to_vec();
        Ok(Response {
            status,
            body,
            keep_alive: !close && !self.sender.is_closed(),
        })
    }
}

/// `GET path` on a fresh connection, with a timeout.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, async {
        let mut c = HttpConn::connect(addr).await?;
        c.request("GET", path, None).await
    })
    .await
    .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// Reports the server has answered with code 0, from its `/metrics`:
/// `ringlink_requests_total{method="reportProperty"|"reportEvent",code="0"}` summed.
pub fn reports_answered(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("ringlink_requests_total{"))
        .filter(|l| l.contains("code=\"0\""))
        .filter(|l| l.contains("method=\"reportProperty\"") || l.contains("method=\"reportEvent\""))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The increase of several counters summed, `after[i] - before[i]` over every `i` (a counter
/// that went down, a restarted node, counts 0).
pub fn increase(before: &[u64], after: &[u64]) -> u64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b))
        .sum()
}

/// Scrapes `/metrics` once (blocking; for the process that owns the run).
pub fn scrape_reports_answered(api: SocketAddr) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(get(api, "/metrics", Duration::from_secs(10)))?;
    if res.status != 200 {
        bail!("GET /metrics answered {}", res.status);
    }
    Ok(reports_answered(&String::from_utf8_lossy(&res.body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn the_token_goes_in_an_authorization_header() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    n += s.read(&mut buf[n..]).await.expect("read");
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .expect("write");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            });
            let mut conn = HttpConn::connect(addr)
                .await
                .expect("connect")
                .with_token(Some("tok-1"));
            let res = conn
                .request("GET", "/v1/devices", None)
                .await
                .expect("request");
            assert_eq!((res.status, res.body.as_slice()), (200, &b"ok"[..]));
            let head = server.await.expect("server");
            assert!(
                // Header names are case-insensitive (hyper writes them in lower case).
                head.to_ascii_lowercase()
                    .contains("\r\nauthorization: bearer tok-1\r\n"),
                "{head}"
            );
        });
    }

    #[test]
    fn metrics_sum_code_0_reports_only() {
        let text = "# HELP ringlink_requests_total x\n\
            ringlink_requests_total{method=\"reportProperty\",code=\"0\"} 120\n\
            ringlink_requests_total{method=\"reportProperty\",code=\"109001\"} 7\n\
            ringlink_requests_total{method=\"reportEvent\",code=\"0\"} 30\n\
            ringlink_requests_total{method=\"onlineDevice\",code=\"0\"} 5\n\
            ringlink_uplinks_total{kind=\"property\"} 120\n";
        assert_eq!(reports_answered(text), 150);
        assert_eq!(reports_answered(""), 0);
    }

    #[test]
    fn increases_sum_over_every_node() {
        assert_eq!(increase(&[100, 0, 7], &[150, 20, 7]), 70);
        assert_eq!(increase(&[5], &[9]), 4);
        assert_eq!(increase(&[], &[]), 0);
        // A node whose counter went back (restarted) adds nothing, not a wrap-around.
        assert_eq!(increase(&[10, 50], &[30, 3]), 20);
        // Each node's /metrics counts its own reports; the cross-check adds them up.
        let node = |ok: u64| {
            format!("ringlink_requests_total{{method=\"reportProperty\",code=\"0\"}} {ok}\n")
        };
        let before: Vec<u64> = [0, 10, 20]
            .iter()
            .map(|&n| reports_answered(&node(n)))
            .collect();
        let after: Vec<u64> = [40, 30, 20]
            .iter()
            .map(|&n| reports_answered(&node(n)))
            .collect();
        assert_eq!(increase(&before, &after), 60);
    }

    #[test]
    fn chunked_and_keep_alive_responses_on_one_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                for answer in [
                    &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"[..],
                    &b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"[..],
                ] {
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        n += s.read(&mut buf[n..]).await.expect("read");
                    }
                    s.write_all(answer).await.expect("write");
                }
            });
            let mut conn = HttpConn::connect(addr).await.expect("connect");
            let first = conn.request("GET", "/a", None).await.expect("first");
            assert_eq!((first.status, first.body.as_slice()), (200, &b"hello world"[..]));
            assert!(first.keep_alive);
            let second = conn.request("POST", "/b", Some(b"{}")).await.expect("second");
            assert_eq!((second.status, second.body.as_slice()), (409, &b"{}"[..]));
            assert!(!second.keep_alive, "Connection: close");
            server.await.expect("server");
        });
    }
}
