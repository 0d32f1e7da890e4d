//! The tokio driver of the MQTT [`Client`]: one broker connection, redialled as needed.
//!
//! Owns: the broker address ([`BrokerUrl`]), the rustls client configuration for `mqtts://`
//! ([`tls_config`]), and in [`Connection`] the transport (TCP with `TCP_NODELAY`, or TLS over
//! it), its read and write buffers and the reconnect backoff (100 ms doubling to 5 s, reset by
//! a CONNACK). Never: protocol decisions (all in [`Client`]), threads, channels, spawning; the
//! caller drives a [`Connection`] by awaiting [`Connection::run_until`] on its own task.
//!
//! ```text
//!   let mut conn = Connection::new(url, Options::new("gw-1"), None)?;
//!   loop {
//!       match conn.run_until(uplinks.recv()).await {
//!           Step::Woken(Some(u)) => { conn.client().publish(..)?; }   // sent by the next call
//!           Step::Event(Event::Acked(tag)) => { /* durable at the broker */ }
//!           Step::Event(_) | Step::DialFailed(_) | Step::Woken(None) => {}
//!       }
//!   }
//! ```

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::{pin, Pin};
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{Client, Event, Options};
use crate::tls::{load_certs, load_key};

/// Where the broker is: `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
/// (default 8883). IPv6 hosts go in brackets: `mqtt://[::1]:1883`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS (`mqtts://`).
    pub tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a broker URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `mqtt://` or `mqtts://`.
    #[error("{0:?}: the broker URL must start with mqtt:// or mqtts://")]
    Scheme(String),
    /// Nothing between the scheme and the port.
    #[error("{0:?}: the broker URL has no host")]
    NoHost(String),
    /// The port is not a number in 1..=65535.
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    Port(String),
    /// A user, path, query or fragment, or an unclosed IPv6 bracket.
    #[error("{0:?}: only mqtt[s]://host[:port] is supported (no user, path or query)")]
    Unsupported(String),
}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(UrlError::Scheme(s.into()));
        };
        // One trailing slash is tolerated, nothing else after the authority.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(UrlError::Unsupported(s.into()));
        }
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (host, after) = r
                .split_once(']')
                .ok_or_else(|| UrlError::Unsupported(s.into()))?;
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(UrlError::Unsupported(s.into())),
                },
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost(s.into()));
        }
        if host.contains(['[', ']']) || (!rest.starts_with('[') && host.contains(':')) {
            return Err(UrlError::Unsupported(s.into()));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(UrlError::Port(s.into())),
            },
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Why the TLS client configuration cannot be built. Every error names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate or key file cannot be read or holds nothing usable.
    #[error(transparent)]
    File(#[from] crate::tls::TlsError),
    /// The CA file holds no certificate rustls can use as a root.
    #[error("{}: no CA certificate rustls can use", file.display())]
    NoUsableRoot {
        /// The file.
        file: PathBuf,
    },
    /// No CA file was given and no system CA bundle was found.
    #[error(
        "mqtts:// needs a CA file: none was given and no system CA bundle exists at {}",
        SYSTEM_CA_BUNDLES.join(", ")
    )]
    NoRoots,
    /// rustls refused the certificates or key.
    #[error("TLS configuration rejected: {0}")]
    Rejected(#[from] rustls::Error),
}

/// Where Linux distributions keep the system CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// OpenSUSE/others).
const SYSTEM_CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The rustls client configuration for `mqtts://`: TLS 1.3 and 1.2 with the crate's ring
/// provider ([`crate::tls::crypto_provider`]), trusting the certificates of `ca_file` (PEM or
/// DER), or the system CA bundle when `ca_file` is None; with a client certificate chain and
/// key (`(cert, key)`, PEM or DER) when the broker wants one.
pub fn tls_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let ca_file = match ca_file {
        Some(f) => f.to_owned(),
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or(TlsConfigError::NoRoots)?,
    };
    let (added, _) = roots.add_parsable_certificates(load_certs(&ca_file)?);
    if added == 0 {
        return Err(TlsConfigError::NoUsableRoot { file: ca_file });
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(crate::tls::crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    Ok(Arc::new(config))
}

/// What [`Connection::run_until`] stopped for.
#[derive(Debug)]
pub enum Step<T> {
    /// The client has an event. After [`Event::Lost`] or [`Event::Refused`] the transport has
    /// already been dropped and [`Client::disconnected`] called.
    Event(Event),
    /// The caller's `wake` future completed first.
    Woken(T),
    /// Dialling the broker (TCP, TLS) failed; the next dial waits for the backoff.
    DialFailed(io::Error),
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const READ_BUF: usize = 16 * 1024;

/// TCP or TLS over TCP.
#[derive(Debug)]
enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What one round of IO produced.
enum Io<T> {
    Woken(T),
    Read(usize),
    Timeout,
    Failed(&'static str, io::Error),
}

/// One broker connection: a [`Client`] and the transport under it, redialled with backoff.
#[derive(Debug)]
pub struct Connection {
    client: Client,
    url: BrokerUrl,
    tls: Option<Arc<ClientConfig>>,
    transport: Option<Transport>,
    rbuf: Box<[u8]>,
    /// Bytes taken from the client, `wbuf[wpos..]` not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Bytes were written since the last flush (TLS buffers records).
    need_flush: bool,
    backoff: Duration,
    next_dial: Option<tokio::time::Instant>,
    last_error: Option<String>,
}

impl Connection {
    /// A connection to `url` that dials on the first [`Connection::run_until`]. For
    /// `mqtts://`, `tls` is the client configuration; None means [`tls_config`]`(None, None)`
    /// (the system CA bundle). `tls` is ignored for `mqtt://`.
    pub fn new(
        url: BrokerUrl,
        opts: Options,
        tls: Option<Arc<ClientConfig>>,
    ) -> Result<Self, TlsConfigError> {
        let tls = match (url.tls, tls) {
            (false, _) => None,
            (true, Some(c)) => Some(c),
            (true, None) => Some(tls_config(None, None)?),
        };
        Ok(Self {
            client: Client::new(opts),
            url,
            tls,
            transport: None,
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            wbuf: Vec::new(),
            wpos: 0,
            need_flush: false,
            backoff: BACKOFF_MIN,
            next_dial: None,
            last_error: None,
        })
    }

    /// The client, to publish, subscribe and read counters. Bytes it queues are written by
    /// the next [`Connection::run_until`].
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The broker.
    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    /// Whether a transport is up and the broker accepted the connection.
    pub fn is_connected(&self) -> bool {
        self.transport.is_some() && self.client.is_connected()
    }

    /// The IO error behind the last [`Event::Lost`] or protocol error, for logs.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Drives IO (dial when there is no transport and the backoff allows, write pending bytes,
    /// read, timeouts) until the client yields an event ([`Step::Event`]), a dial fails
    /// ([`Step::DialFailed`]), or `wake` completes ([`Step::Woken`]). Events already queued are
    /// returned before any IO. Cancel-safe: dropping the future loses no byte read or written
    /// (an interrupted dial is simply retried). Pending writes make progress before `wake` is
    /// looked at, so `run_until(std::future::ready(()))` flushes what it can without waiting.
    pub async fn run_until<F: Future>(&mut self, wake: F) -> Step<F::Output> {
        let mut wake = pin!(wake);
        loop {
            if let Some(event) = self.client.poll_event() {
                match event {
                    Event::Connected { .. } => self.backoff = BACKOFF_MIN,
                    Event::Lost(_) | Event::Refused { .. } => self.drop_transport(),
                    _ => {}
                }
                return Step::Event(event);
            }
            if self.transport.is_none() {
                if let Some(at) = self.next_dial {
                    tokio::select! {
                        biased;
                        out = wake.as_mut() => return Step::Woken(out),
                        () = tokio::time::sleep_until(at) => self.next_dial = None,
                    }
                }
                let timeout = self.client.options().connect_timeout;
                let dial = dial(&self.url, self.tls.clone(), timeout);
                let result = tokio::select! {
                    biased;
                    out = wake.as_mut() => return Step::Woken(out),
                    r = dial => r,
                };
                match result {
                    Ok(t) => {
                        self.transport = Some(t);
                        self.wbuf.clear();
                        self.wpos = 0;
                        self.need_flush = false;
                        self.client.connect(Instant::now());
                    }
                    Err(e) => {
                        self.schedule_dial();
                        return Step::DialFailed(e);
                    }
                }
                continue;
            }
            self.client.poll_transmit(Instant::now(), &mut self.wbuf);
            let deadline = self.client.poll_timeout();
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
            let mut sleep = pin!(tokio::time::sleep_until(
                deadline.map_or(far, tokio::time::Instant::from_std)
            ));
            let io = poll_fn(|cx| self.poll_io(cx, wake.as_mut(), sleep.as_mut())).await;
            match io {
                Io::Woken(out) => return Step::Woken(out),
                Io::Read(n) => {
                    let now = Instant::now();
                    if let Err(e) = self.client.handle_input(now, &self.rbuf[..n]) {
                        self.last_error = Some(e.to_string());
                        self.drop_transport();
                        return Step::Event(Event::Lost("protocol violation by the broker"));
                    }
                }
                Io::Timeout => self.client.handle_timeout(Instant::now()),
                Io::Failed(what, e) => {
                    self.last_error = Some(format!("{what}: {e}"));
                    self.drop_transport();
                    return Step::Event(Event::Lost(what));
                }
            }
        }
    }

    /// One poll of the transport: write what is pending (never returns for progress alone),
    /// then `wake`, then read, then the client's timer.
    fn poll_io<F: Future>(
        &mut self,
        cx: &mut Context<'_>,
        wake: Pin<&mut F>,
        sleep: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Io<F::Output>> {
        let t = self.transport.as_mut().expect("transport is up");
        while self.wpos < self.wbuf.len() {
            match t.poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes");
                    return Poll::Ready(Io::Failed("write failed", e));
                }
                Poll::Ready(Ok(n)) => {
                    self.wpos += n;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed("write failed", e)),
                Poll::Pending => break,
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.need_flush {
                match t.poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.need_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed("write failed", e)),
                    Poll::Pending => {}
                }
            }
        }
        if let Poll::Ready(out) = wake.poll(cx) {
            return Poll::Ready(Io::Woken(out));
        }
        let mut buf = ReadBuf::new(&mut self.rbuf);
        match t.poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream");
                return Poll::Ready(Io::Failed("connection closed by the broker", e));
            }
            Poll::Ready(Ok(())) => return Poll::Ready(Io::Read(buf.filled().len())),
            Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed("read failed", e)),
            Poll::Pending => {}
        }
        if sleep.poll(cx).is_ready() {
            return Poll::Ready(Io::Timeout);
        }
        Poll::Pending
    }

    fn drop_transport(&mut self) {
        self.transport = None;
        self.wbuf.clear();
        self.wpos = 0;
        self.need_flush = false;
        self.client.disconnected();
        self.schedule_dial();
    }

    fn schedule_dial(&mut self) {
        self.next_dial = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Clean shutdown: queues DISCONNECT, writes everything pending (at most `within`), and
    /// closes the transport. The in-flight window stays in the client; a later
    /// [`Connection::run_until`] dials again.
    pub async fn shutdown(&mut self, within: Duration) {
        self.client.disconnect();
        self.client.poll_transmit(Instant::now(), &mut self.wbuf);
        if self.transport.is_some() {
            let flush = poll_fn(|cx| {
                let t = self.transport.as_mut().expect("transport is up");
                while self.wpos < self.wbuf.len() {
                    match t.poll_write(cx, &self.wbuf[self.wpos..]) {
                        Poll::Ready(Ok(n)) if n > 0 => self.wpos += n,
                        Poll::Ready(_) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                t.poll_shutdown(cx).map(|_| ())
            });
            let _ = tokio::time::timeout(within, flush).await;
        }
        self.transport = None;
        self.wbuf.clear();
        self.wpos = 0;
        self.need_flush = false;
        self.client.disconnected();
        self.next_dial = None;
    }
}

/// TCP (with `TCP_NODELAY`), then TLS for `mqtts://`, within `timeout` (zero = none).
async fn dial(
    url: &BrokerUrl,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
) -> io::Result<Transport> {
    let connect = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
        tcp.set_nodelay(true)?;
        let Some(config) = tls else {
            return Ok(Transport::Tcp(tcp));
        };
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(Transport::Tls(Box::new(stream)))
    };
    if timeout.is_zero() {
        return connect.await;
    }
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection to {url} within {timeout:?}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let ok = |s: &str, tls: bool, host: &str, port: u16| {
            let u: BrokerUrl = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                u,
                BrokerUrl {
                    tls,
                    host: host.into(),
                    port
                },
                "{s}"
            );
            assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
        };
        ok("mqtt://broker", false, "broker", 1883);
        ok("mqtts://broker", true, "broker", 8883);
        ok("mqtt://127.0.0.1:1884", false, "127.0.0.1", 1884);
        ok(
            "mqtts://emqx.example.com:443/",
            true,
            "emqx.example.com",
            443,
        );
        ok("mqtt://[::1]", false, "::1", 1883);
        ok("mqtts://[::1]:9000", true, "::1", 9000);
        assert_eq!(
            "mqtt://127.0.0.1:1883"
                .parse::<BrokerUrl>()
                .unwrap()
                .to_string(),
            "mqtt://127.0.0.1:1883"
        );
        let err = |s: &str| s.parse::<BrokerUrl>().unwrap_err();
        assert!(matches!(err("tcp://broker"), UrlError::Scheme(_)));
        assert!(matches!(err("broker:1883"), UrlError::Scheme(_)));
        assert!(matches!(err("ws://broker"), UrlError::Scheme(_)));
        assert!(matches!(err("mqtt://"), UrlError::NoHost(_)));
        assert!(matches!(err("mqtt://:1883"), UrlError::NoHost(_)));
        assert!(matches!(err("mqtt://b:0"), UrlError::Port(_)));
        assert!(matches!(err("mqtt://b:65536"), UrlError::Port(_)));
        assert!(matches!(err("mqtt://b:x"), UrlError::Port(_)));
        assert!(matches!(err("mqtt://b:+1"), UrlError::Port(_)));
        assert!(matches!(err("mqtt://b:"), UrlError::Port(_)));
        assert!(matches!(err("mqtt://u:p@b"), UrlError::Unsupported(_)));
        assert!(matches!(err("mqtt://b/path"), UrlError::Unsupported(_)));
        assert!(matches!(err("mqtt://b?x=1"), UrlError::Unsupported(_)));
        assert!(matches!(err("mqtt://[::1"), UrlError::Unsupported(_)));
        assert!(matches!(err("mqtt://::1"), UrlError::Unsupported(_)));
        assert!(err("http://x").to_string().contains("mqtt:// or mqtts://"));
    }

    #[test]
    fn tls_config_errors_name_the_file() {
        let missing = Path::new("/nonexistent/ca.pem");
        let e = tls_config(Some(missing), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/ca.pem: cannot read"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("ringlink-mqtt-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = tls_config(Some(&junk), None).unwrap_err();
        assert!(matches!(e, TlsConfigError::File(_)), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
