//! A small HTTP/1.1 client over a tokio `TcpStream` with keep-alive: enough for the
//! northbound API (JSON bodies with Content-Length or chunked) and `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One keep-alive connection to an HTTP server.
pub struct HttpConn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
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
        Ok(Self {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(1024),
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
        let mut req = Vec::with_capacity(160 + body.map_or(0, <[u8]>::len));
        req.extend_from_slice(method.as_bytes());
        req.push(b' ');
        req.extend_from_slice(path.as_bytes());
        req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        req.extend_from_slice(self.host.as_bytes());
        req.extend_from_slice(b"\r\n");
        if let Some(token) = &self.token {
            req.extend_from_slice(b"Authorization: Bearer ");
            req.extend_from_slice(token.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        if let Some(b) = body {
            req.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
            req.extend_from_slice(b.len().to_string().as_bytes());
            req.extend_from_slice(b"\r\n\r\n");
            req.extend_from_slice(b);
        } else {
            req.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&req).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> anyhow::Result<Response> {
        self.buf.clear();
        let (status, head, framing, keep_alive) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut res = httparse::Response::new(&mut headers);
            match res.parse(&self.buf).context("malformed HTTP response")? {
                httparse::Status::Complete(n) => {
                    let mut framing = Framing::UntilClose;
                    let mut keep_alive = res.version == Some(1);
                    for h in res.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                            framing = Framing::Length(v.parse().context("bad Content-Length")?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                            && h.value.eq_ignore_ascii_case(b"chunked")
                        {
                            framing = Framing::Chunked;
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            keep_alive = !h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    break (res.code.unwrap_or(0), n, framing, keep_alive);
                }
                httparse::Status::Partial => {
                    if self.buf.len() > 64 * 1024 {
                        bail!("HTTP response head too large");
                    }
                    self.fill().await?;
                }
            }
        };
        let body = match framing {
            Framing::Length(len) => {
                while self.buf.len() < head + len {
                    self.fill().await?;
                }
                self.buf[head..head + len].to_vec()
            }
            Framing::Chunked => loop {
                if let Some(body) = dechunk(&self.buf[head..])? {
                    break body;
                }
                self.fill().await?;
            },
            Framing::UntilClose => {
                while self.stream.read_buf(&mut self.buf).await? > 0 {}
                self.buf[head..].to_vec()
            }
        };
        Ok(Response {
            status,
            body,
            keep_alive: keep_alive && !matches!(framing, Framing::UntilClose),
        })
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            bail!("HTTP connection closed mid-response");
        }
        Ok(())
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Decodes a complete chunked body; `Ok(None)` while incomplete.
fn dechunk(mut b: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&b[..eol]).context("bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        let rest = &b[eol + 2..];
        if size == 0 {
            // Trailers end with an empty line; we accept none and need just the final CRLF.
            return Ok(rest.starts_with(b"\r\n").then_some(out));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&rest[..size]);
        b = &rest[size + 2..];
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
                head.contains("\r\nAuthorization: Bearer tok-1\r\n"),
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
    fn chunked_bodies() {
        assert_eq!(dechunk(b"5\r\nhello\r\n").expect("ok"), None);
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").expect("ok"),
            Some(b"hello world".to_vec())
        );
        assert!(dechunk(b"zz\r\n").is_err());
    }
}
