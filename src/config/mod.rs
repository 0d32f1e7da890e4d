//! ringlink's configuration: every knob with its default and the reason for it.
//!
//! Owns: reading the TOML file, the `RINGLINK_<SECTION>_<KEY>` environment variables and the
//! command-line overrides, in that order over the defaults, then one validation pass that turns
//! them into a [`Config`] which is valid by construction: code that holds a `Config` never
//! re-checks a range. Every error names where the bad value came from (`ringlink.toml:7`,
//! `env RINGLINK_LISTENER_PORT`, `flag --listen`) and the key, and all errors are reported at
//! once rather than the first only.
//!
//! Also owns turning `[registry]` into a [`Registry`] ([`Config::build_registry`]), again
//! collecting every error of every thing model, CSV line and driver-config entry.
//!
//! Never: opens a socket or touches TLS key material (that is [`crate::tls`]).
//!
//! ```text
//! defaults ──▶ TOML file ──▶ RINGLINK_* env ──▶ flags ──▶ validate() ──▶ Config
//!   (driver config listener keys fill in what none of the three set)
//! ```

mod source;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::limits::{AdmissionSettings, FlapRule, Rate};
use crate::model::{ModelError, ThingModel};
use crate::registry::{demo_registry, Registry, RegistryError};
use crate::tls::TlsError;
use crate::{session, ws};

pub use source::KNOBS;

/// Everything `ringlink serve` needs, validated. Obtain it from [`Config::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listener: Listener,
    pub runtime: Runtime,
    pub limits: Limits,
    pub api: Api,
    /// Where the local uplink log and other state live (default `./ringlink-data`; flag
    /// `--data-dir`, top-level key `data_dir`). Relative to the working directory when given on
    /// the command line or in the environment, to the config file's folder when given there.
    pub data_dir: PathBuf,
    pub uplink: Uplink,
    /// Where products and devices come from; `None` (no `[registry]` anywhere) means the
    /// built-in demo registry.
    pub registry: Option<RegistrySources>,
    /// The configuration file this was loaded from, if any.
    pub file: Option<PathBuf>,
}

/// `[listener]`: where devices connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Address to listen on (default `0.0.0.0`: every IPv4 interface, because the official
    /// client dials IPv4 literals only; PROTOCOL.md section 1).
    pub ip: IpAddr,
    /// TCP port (default 17682, the Link IoT Edge WebSocket driver's port). 0 asks the OS for
    /// any free port; tests use that.
    pub port: u16,
    /// `wss://` when set: certificate chain and private key, PEM or DER whatever the extension.
    pub tls: Option<TlsFiles>,
    /// Accept queue length passed to `listen(2)` (default 1024, 1-65535). Large enough for a
    /// reconnect storm of thousands of devices after a gateway restart; the kernel caps it at
    /// `net.core.somaxconn` anyway.
    pub backlog: u32,
}

impl Listener {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// `[listener] tls = { cert = "...", key = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[runtime]`: shards and the IO driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    /// Shard threads (config default 0 = one per core, resolved here with
    /// `std::thread::available_parallelism`, so this is always at least 1; at most 1024).
    pub threads: usize,
    /// IO driver (default `auto`).
    pub io: IoMode,
}

/// Which IO driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring where the kernel allows it, else epoll (containers often refuse io_uring).
    #[default]
    Auto,
    /// io_uring only: fail at start when the kernel refuses it.
    Uring,
    /// epoll only.
    Epoll,
}

impl IoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        }
    }
}

impl FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" => Ok(Self::Uring),
            "epoll" => Ok(Self::Epoll),
            _ => Err(format!("expected auto, uring or epoll, got {s:?}")),
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[limits]`: what one peer, or all of them, can make ringlink hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once (default 100000, 1-10000000). Beyond it new connections are
    /// closed at accept: a flood of idle sockets must not exhaust file descriptors and memory
    /// that the connected devices need.
    pub max_connections: u32,
    /// Largest WebSocket message, all fragments together (default 65536, 125-16777216). Device
    /// JSON is small; a huge message is a peer trying to pin memory and gets close code 1009.
    pub max_frame_bytes: u32,
    /// Time from TCP accept to a completed upgrade (default 5000, 100-600000). Drops slowloris
    /// peers that open sockets and never finish the handshake.
    pub handshake_timeout_ms: u64,
    /// How often ringlink pings each connection (default 30000, 1000-3600000). Finds dead
    /// peers behind NATs that never send a FIN; too short wastes battery and bandwidth.
    pub ping_interval_ms: u64,
    /// A connection silent (no pong) for this long is closed and its devices go offline
    /// (default 60000 = two missed pings; more than `ping_interval_ms`, at most 86400000).
    /// Keeps half-open sockets from holding devices "online" forever.
    pub pong_timeout_ms: u64,
    /// A downlink without a reply by then completes with 100006 (default 8000, 100-600000).
    /// Bounds how long an API caller waits and how many downlinks a mute device can pile up.
    pub downlink_timeout_ms: u64,
    /// A data message whose first bytes arrived must be complete by then (default 5000,
    /// 100-600000), else the connection is closed with 1008 (policy violation). Stops a peer
    /// that declares a large frame, or starts a fragmented message, and then sends nothing or
    /// dribbles it: what it can make ringlink hold is what it sent, and only for this long.
    pub message_timeout_ms: u64,
    /// Whether a report for a device that is online nowhere first brings it online on that
    /// connection (default false). Off, such reports get 109001, so a device cannot skip the
    /// `onlineDevice` checks (clientIp, takeover) by just reporting.
    pub auto_online_on_report: bool,
    /// Messages (requests and replies) per second one connection may send (default 5000,
    /// 0 = off, at most 10000000), a token bucket refilled at this rate and holding
    /// `message_burst`. Over it the connection is not read until the bucket refills: nothing
    /// is dropped and nothing is closed, the peer's TCP window fills and it slows down. Stops
    /// one peer (a runaway or hostile sub-gateway, a pipelined flood) from taking its whole
    /// shard's CPU from the thousands of other connections there. The default leaves a
    /// sub-gateway carrying 1000 devices room for 5 messages a second each, over 25 times the
    /// official client's pattern (a property report and an event every ~11 s per device,
    /// PROTOCOL.md section 10).
    pub max_messages_per_s: u32,
    /// Messages one connection may send at once before `max_messages_per_s` applies (default
    /// 5000, 1-10000000): a sub-gateway onlining 1000 devices after a reconnect is not slowed.
    pub message_burst: u32,
    /// New connections per second over the whole process, all shards together (default 5000,
    /// 0 = off, at most 10000000), with a burst of one second's worth. Over it ringlink stops
    /// accepting until the next token: connections wait in the kernel's backlog
    /// (`listener.backlog`) instead of being refused. Stops a connection flood or a reconnect
    /// storm from spending every core on handshakes while connected devices wait for
    /// their replies; 5000/s re-admits 100000 devices in 20 s.
    pub max_new_connections_per_s: u32,
    /// Open connections from one source IP address (default 10000, 0 = off, at most
    /// 10000000), counted over the whole process. Beyond it new connections from that address
    /// are closed at accept. Stops one host from taking the connection table
    /// (`max_connections`) and the file descriptors every other device needs; 10000 (a tenth
    /// of the default table) leaves room for many devices behind one NAT and for loadgen's
    /// profiles (at most ~4800 per source address).
    pub max_connections_per_ip: u32,
    /// A device that comes online more than this many times within `flapping_window_ms` is
    /// refused for `flapping_ban_ms` (default 15, 0 = off, at most 1000000): its
    /// `onlineDevice` gets 109000 and a warning is logged. Stops a device stuck in a
    /// connect-drop loop, or two clients fighting over one identity (takeover ping-pong),
    /// from flooding the edge core with online/offline uplinks.
    pub flapping_max: u32,
    /// The window of `flapping_max` (default 60000, 100-86400000 ms), opened by a device's
    /// first online after the last window or ban.
    pub flapping_window_ms: u64,
    /// How long a flapping device is refused (default 60000, 100-86400000 ms): long enough to
    /// break a takeover ping-pong, short enough that a device with a bad link is back within
    /// a minute.
    pub flapping_ban_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_frame_bytes: 65_536,
            handshake_timeout_ms: 5_000,
            ping_interval_ms: 30_000,
            pong_timeout_ms: 60_000,
            downlink_timeout_ms: 8_000,
            message_timeout_ms: 5_000,
            auto_online_on_report: false,
            max_messages_per_s: 5_000,
            message_burst: 5_000,
            max_new_connections_per_s: 5_000,
            max_connections_per_ip: 10_000,
            flapping_max: 15,
            flapping_window_ms: 60_000,
            flapping_ban_ms: 60_000,
        }
    }
}

impl Limits {
    /// The process-wide limits, as the shards enforce them.
    pub fn admission(&self) -> AdmissionSettings {
        AdmissionSettings {
            accept: Rate::per_second(
                self.max_new_connections_per_s,
                self.max_new_connections_per_s,
            ),
            max_connections_per_ip: self.max_connections_per_ip,
            flapping: (self.flapping_max > 0).then(|| FlapRule {
                max: self.flapping_max,
                window: Duration::from_millis(self.flapping_window_ms),
                ban: Duration::from_millis(self.flapping_ban_ms),
            }),
        }
    }
}

/// `[api]`: the northbound HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    /// Address of the API (default `127.0.0.1:17690`). Loopback by default because the API can
    /// drive every device; any other address needs `token_file`.
    pub listen: SocketAddr,
    /// The Bearer token read from `token_file` (default none; the file's contents trimmed of
    /// whitespace, must not be empty). Set, every route but `/healthz`, `/readyz` and
    /// `/metrics` needs `Authorization: Bearer <token>`; required when `listen` is not a
    /// loopback address, since whoever reaches the API can set properties and call services
    /// on every device.
    pub token: Option<ApiToken>,
    /// Where the token came from (`token_file`), for `ringlink check`.
    pub token_file: Option<PathBuf>,
    /// API connections served at once (default 1024, 1-65536); more wait in the kernel's accept
    /// queue. Bounds the file descriptors and memory a flood of idle HTTP clients can take from
    /// the devices; at the cap, the connection idle the longest between requests is closed for
    /// a newcomer so that `/healthz` keeps answering.
    pub max_connections: u32,
    /// A request not fully read (headers and body) this long after its connection became idle
    /// is closed, and so is a keep-alive connection idle this long (default 10000, 100-600000
    /// ms). Stops slowloris clients that trickle a request byte by byte to hold connections.
    pub request_timeout_ms: u64,
}

/// The API's Bearer token; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(pub Arc<str>);

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken(<{} bytes>)", self.0.len())
    }
}

/// `[uplink]`: how uplinks (online, offline, reports, events) leave for the edge core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// Where uplinks go (default `local`; `mqtt` forwards the local log to a broker; `nats` is
    /// not implemented yet).
    pub sink: SinkKind,
    /// Uplinks per batch (default 256, 1-65536). Bigger batches amortise each write; the cap
    /// bounds the memory and latency of one batch.
    pub batch_max: u32,
    /// Longest a batch waits before it is flushed, in microseconds (default 1000, 0-1000000).
    /// Devices wait for their acknowledgement until their batch is durable.
    pub flush_us: u64,
    /// When the local log calls fsync (default `never`: the OS flushes; `batch`: after every
    /// batch, which survives power loss at the cost of throughput).
    pub fsync: Fsync,
    /// Size of one log segment in bytes (default 64 MiB, 1 MiB-4 GiB). Old data is dropped a
    /// whole segment at a time.
    pub segment_bytes: u64,
    /// Cap on the whole local log in bytes (default 1 GiB; at least `segment_bytes`). Keeps a
    /// long sink outage or a chatty fleet from filling the disk: the oldest segments go first.
    pub max_bytes: u64,
    /// Age cap of the local log in seconds (default 604800 = 7 days, 60-315360000).
    pub max_age_s: u64,
    /// What a full log does with records an external sink has not acknowledged (default
    /// `drop_oldest`: devices keep being served and the oldest backlog goes, counted; `block`:
    /// nothing is lost, devices get 100000 until the sink drains).
    pub on_full: OnFull,
    /// `[uplink.mqtt]`, used when `sink = "mqtt"`.
    pub mqtt: Mqtt,
    /// `[uplink.nats]`, used when `sink = "nats"`.
    pub nats: Nats,
}

impl Default for Uplink {
    fn default() -> Self {
        Self {
            sink: SinkKind::Local,
            batch_max: 256,
            flush_us: 1_000,
            fsync: Fsync::Never,
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            max_age_s: 7 * 24 * 3600,
            on_full: OnFull::DropOldest,
            mqtt: Mqtt::default(),
            nats: Nats::default(),
        }
    }
}

/// `[uplink.nats]`: the NATS cluster of `sink = "nats"`, through which several ringlink nodes
/// form one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nats {
    /// Servers to connect to (`url`, or `urls` for several; `nats://host[:port]`, `tls://` for
    /// TLS). Default `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// This node's name, unique in the cluster (default `node-1`): it is the owner written into
    /// the ownership bucket and part of every uplink's message id.
    pub node: String,
    /// JetStream stream of the uplinks (default `RINGLINK_UP`), created if missing.
    pub stream: String,
    /// Subjects start with it (default `ringlink`): uplinks `ringlink.up.{pk}.{dn}.{kind}`,
    /// downlinks `ringlink.down.{pk}.{dn}.{get|set|service.ID}`.
    pub subject_prefix: String,
    /// JetStream key-value bucket of device ownership (default `ringlink_owners`); node
    /// heartbeats go to `<owners_bucket>_nodes`.
    pub owners_bucket: String,
    /// A node silent this long is dead: its devices are offline cluster-wide (default 10000,
    /// 1000-600000 ms). Heartbeats go every third of it.
    pub node_timeout_ms: u64,
    /// The stream's duplicate window when ringlink creates the stream (default 120000,
    /// 1000-86400000 ms): a record published again within it (after a crash, an outage or a
    /// NATS failover) is dropped by message id, not stored twice.
    pub duplicate_window_ms: u64,
    /// Replicas of the stream and buckets when ringlink creates them (default 1, 1-5; 3 for a
    /// 3-server cluster that must survive losing one).
    pub replicas: u8,
    /// Uplink publishes awaiting their JetStream acknowledgement or a retry at once (default
    /// 256): bounds what the forwarder holds and what a crash or an outage re-publishes
    /// (JetStream drops those repeats by message id).
    pub inflight: u16,
    /// Authentication: a token, or a `.creds` file; TLS roots for `tls://` from `ca_file`.
    pub token: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            node: "node-1".into(),
            stream: "RINGLINK_UP".into(),
            subject_prefix: "ringlink".into(),
            owners_bucket: "ringlink_owners".into(),
            node_timeout_ms: 10_000,
            duplicate_window_ms: 120_000,
            replicas: 1,
            inflight: 256,
            token: None,
            creds_file: None,
            ca_file: None,
        }
    }
}

/// What a full uplink log does while an external sink is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    DropOldest,
    Block,
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DropOldest => "drop_oldest",
            Self::Block => "block",
        }
    }
}

/// `[uplink.mqtt]`: the broker of `sink = "mqtt"` (Alink topics, PROTOCOL.md section 13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mqtt {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883; the broker's
    /// certificate must chain to `ca_file`, else to the system's CA bundle). Default
    /// `mqtt://127.0.0.1:1883`: a broker on the edge box itself.
    pub url: String,
    /// MQTT client id (default `ringlink`). Unique per gateway: a broker disconnects the older of
    /// two sessions with the same id.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA certificate(s), PEM or DER, the broker's certificate must chain to (mqtts; default:
    /// the system's CA bundle).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require client authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// MQTT keep-alive in seconds (default 30, 0 = off, up to 65535): a dead broker connection
    /// is noticed within 1.5 times this.
    pub keep_alive_s: u16,
    /// QoS of uplink publishes (default 1: the cursor moves on the broker's PUBACK; 0: on
    /// handing the message to TCP, which a broker outage can lose).
    pub qos: u8,
    /// Put before every topic (default empty: the Alink topics as they are, `/sys/...`).
    pub topic_prefix: String,
    /// Publishes awaiting PUBACK at once (default 256, 1-65535). Bounds what a crash replays.
    pub inflight: u16,
    /// Backlog replay rate after an outage or a restart, publishes per second (default 5000,
    /// 1-10000000), so a returning broker is not flattened.
    pub replay_per_s: u64,
    /// The gateway's own `(productKey, deviceName)` (`gateway_product_key`,
    /// `gateway_device_name`): sub-devices log in through its session topics.
    pub gateway: Option<(String, String)>,
    /// CSV `productKey,deviceName,deviceSecret`: devices listed log in and out as sub-devices
    /// of `gateway` (signed with their secret); the others go to the status topic. Needs
    /// `gateway`.
    pub device_secrets: Option<PathBuf>,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "ringlink".into(),
            username: None,
            password: None,
            ca_file: None,
            cert: None,
            key: None,
            keep_alive_s: 30,
            qos: 1,
            topic_prefix: String::new(),
            inflight: 256,
            replay_per_s: 5_000,
            gateway: None,
            device_secrets: None,
        }
    }
}

/// Where uplinks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// Append-only segmented log under `data_dir`, plus the in-memory shadow.
    Local,
    /// MQTT broker, Alink topics; the local log is its outbox.
    Mqtt,
    /// NATS JetStream. Not implemented yet: refused by validation.
    Nats,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Mqtt => "mqtt",
            Self::Nats => "nats",
        }
    }
}

/// When the local log calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Never,
    Batch,
}

impl Fsync {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Batch => "batch",
        }
    }
}

/// `[registry]`: thing models and device lists, paths already resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistrySources {
    /// Thing models (TSL JSON), one product each.
    pub products: Vec<PathBuf>,
    /// A CSV of `productKey,deviceName[,clientIp]`.
    pub devices: Option<PathBuf>,
    /// A Link IoT Edge driver config `{config, deviceList}` (PROTOCOL.md section 12).
    pub driver_config: Option<PathBuf>,
    /// `[[registry.device]]` entries.
    pub device: Vec<InlineDevice>,
}

/// One `[[registry.device]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineDevice {
    pub product_key: String,
    pub device_name: String,
    pub client_ip: Option<IpAddr>,
    /// Where it was written, for errors.
    pub origin: Origin,
}

/// Command-line overrides, applied after the file and the environment. Relative paths are
/// relative to the working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen IP:PORT`: `listener.ip` and `listener.port`.
    pub listen: Option<SocketAddr>,
    /// `--tls-cert FILE`; needs `--tls-key` (or a key from the file or environment).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key FILE`.
    pub tls_key: Option<PathBuf>,
    /// `--threads N`.
    pub threads: Option<usize>,
    /// `--io auto|uring|epoll`.
    pub io: Option<IoMode>,
    /// `--api IP:PORT`.
    pub api: Option<SocketAddr>,
    /// `--data-dir DIR`.
    pub data_dir: Option<PathBuf>,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A file: the ringlink config (with its 1-based line) or an imported driver config.
    File { path: PathBuf, line: Option<usize> },
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, e.g. `--listen`.
    Flag(&'static str),
    /// The built-in default.
    Default,
}

impl Origin {
    /// The folder that relative paths given here are relative to (`None`: the working
    /// directory).
    fn base(&self) -> Option<&Path> {
        match self {
            Self::File { path, .. } => path.parent(),
            _ => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line: None } => write!(f, "{}", path.display()),
            Self::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Flag(name) => write!(f, "flag {name}"),
            Self::Default => f.write_str("default"),
        }
    }
}

/// One configuration problem, with the place to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad or unknown setting, or a file that could not be read or parsed. Display:
    /// `<origin>: <key>: <message>` (`ringlink.toml:7: limits.max_frame_bytes: must be ...`).
    #[error("{origin}: {}{message}", key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Setting {
        origin: Origin,
        key: Option<String>,
        message: String,
    },
    /// A device list entry (CSV line or driver-config JSON path).
    #[error("{0}")]
    Registry(RegistryError),
    /// A thing model that did not load (file and JSON path, or line and column).
    #[error("{0}")]
    Model(ModelError),
    /// The TLS certificate or key file (named in the message).
    #[error("{0}")]
    Tls(TlsError),
    /// The MQTT sink's CA, client certificate or key file (named in the message).
    #[error("uplink.mqtt: {0}")]
    MqttTls(crate::mqtt::io::TlsConfigError),
    /// A line of the MQTT sink's device secrets file (`uplink.mqtt.device_secrets`).
    #[error("{}:{line}: {message}", file.display())]
    Secrets {
        file: PathBuf,
        line: usize,
        message: String,
    },
}

impl ConfigError {
    fn setting(origin: Origin, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting {
            origin,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

/// Every problem found, in file-then-line order; `Display` shows one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Defaults, then `file` (if any), then `RINGLINK_<SECTION>_<KEY>` variables from `env`,
    /// then `flags`; then one validation. Returns every error found, each with its place.
    ///
    /// `env` is usually `std::env::vars()`; variables not starting with `RINGLINK_` are ignored,
    /// and so are `RINGLINK_*` variables outside the config sections (`RINGLINK_LOG`, ...).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigErrors> {
        let mut draft = source::Draft::default();
        if let Some(file) = file {
            draft.read_file(file);
        }
        draft.read_env(env);
        draft.read_flags(flags);
        draft.validate().map_err(|(errors, _)| ConfigErrors(errors))
    }

    /// Everything `ringlink check` and `ringlink serve` look at before serving: the
    /// configuration as [`load`](Self::load) does, then the registry, then the TLS files.
    /// Thing model and device list errors are reported even when a setting is bad too.
    pub fn check(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Checked, ConfigErrors> {
        let mut draft = source::Draft::default();
        if let Some(file) = file {
            draft.read_file(file);
        }
        draft.read_env(env);
        draft.read_flags(flags);
        let (config, sources, mut errors) = match draft.validate() {
            Ok(config) => {
                let sources = config.registry.clone();
                (Some(config), sources, Vec::new())
            }
            Err((errors, sources)) => (None, sources, errors),
        };
        let registry = build_registry(sources.as_ref())
            .map_err(|e| errors.extend(e))
            .ok();
        let tls = match config.as_ref().and_then(|c| c.listener.tls.as_ref()) {
            None => None,
            Some(files) => crate::tls::server_config(&files.cert, &files.key)
                .map_err(|e| errors.push(ConfigError::Tls(e)))
                .ok(),
        };
        let mqtt_tls = match config.as_ref() {
            Some(c)
                if c.uplink.sink == SinkKind::Mqtt && c.uplink.mqtt.url.starts_with("mqtts:") =>
            {
                let m = &c.uplink.mqtt;
                let client = m.cert.as_deref().zip(m.key.as_deref());
                crate::mqtt::io::tls_config(m.ca_file.as_deref(), client)
                    .map_err(|e| errors.push(ConfigError::MqttTls(e)))
                    .ok()
            }
            _ => None,
        };
        let mqtt_gateway = match (&config, &registry) {
            (Some(c), Some(r)) if c.uplink.sink == SinkKind::Mqtt => {
                mqtt_gateway(&c.uplink.mqtt, r)
                    .map_err(|e| errors.extend(e))
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        match (config, registry) {
            (Some(config), Some(registry)) if errors.is_empty() => Ok(Checked {
                config,
                registry,
                tls,
                mqtt_tls,
                mqtt_gateway,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The per-connection settings every session shares.
    pub fn session_config(&self) -> session::Config {
        let l = &self.limits;
        session::Config {
            limits: ws::Limits {
                max_message_bytes: l.max_frame_bytes as usize,
                ..ws::Limits::default()
            },
            handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
            ping_interval: Duration::from_millis(l.ping_interval_ms),
            pong_timeout: Duration::from_millis(l.pong_timeout_ms),
            downlink_timeout: Duration::from_millis(l.downlink_timeout_ms),
            message_timeout: Duration::from_millis(l.message_timeout_ms),
            auto_online_on_report: l.auto_online_on_report,
            message_rate: Rate::per_second(l.max_messages_per_s, l.message_burst),
        }
    }

    /// Loads every thing model and device source of `[registry]` (or the demo registry when
    /// there is none), collecting every error of every file.
    pub fn build_registry(&self) -> Result<Registry, Vec<ConfigError>> {
        build_registry(self.registry.as_ref())
    }
}

/// A configuration with its registry and TLS setup: what `serve` runs with.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    pub registry: Registry,
    /// Present exactly when `config.listener.tls` is.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The MQTT sink's TLS client configuration: present exactly when the sink is `mqtt` with
    /// an `mqtts://` URL (CA from `ca_file`, else the system's CA bundle).
    pub mqtt_tls: Option<Arc<rustls::ClientConfig>>,
    /// The MQTT sink's gateway and device secrets: present when the sink is `mqtt` and
    /// `device_secrets` is set.
    pub mqtt_gateway: Option<crate::alink::Gateway>,
}

/// Reads `uplink.mqtt.device_secrets`: every line must parse and name a registered device.
fn mqtt_gateway(
    m: &Mqtt,
    registry: &Registry,
) -> Result<Option<crate::alink::Gateway>, Vec<ConfigError>> {
    let (Some(file), Some((pk, dn))) = (&m.device_secrets, &m.gateway) else {
        return Ok(None);
    };
    let text = read_text(file, "uplink.mqtt.device_secrets").map_err(|e| vec![e])?;
    let bad = |line, message| ConfigError::Secrets {
        file: file.clone(),
        line,
        message,
    };
    let secrets = crate::alink::parse_secrets(&text)
        .map_err(|e| e.into_iter().map(|(l, m)| bad(l, m)).collect::<Vec<_>>())?;
    let mut unknown: Vec<ConfigError> = secrets
        .keys()
        .filter(|(p, d)| registry.lookup(p, d).is_none())
        .map(|(p, d)| bad(0, format!("{p}/{d} is not in the registry")))
        .collect();
    if !unknown.is_empty() {
        unknown.sort_by_key(ToString::to_string);
        return Err(unknown);
    }
    Ok(Some(crate::alink::Gateway {
        product_key: pk.clone(),
        device_name: dn.clone(),
        secrets,
    }))
}

fn build_registry(sources: Option<&RegistrySources>) -> Result<Registry, Vec<ConfigError>> {
    let Some(sources) = sources else {
        return Ok(demo_registry());
    };
    let mut errors = Vec::new();
    let mut b = Registry::builder();
    for path in &sources.products {
        match ThingModel::load(path) {
            Ok(model) => {
                if let Err(message) = b.add_product(model) {
                    errors.push(ConfigError::Setting {
                        origin: Origin::File {
                            path: path.clone(),
                            line: None,
                        },
                        key: None,
                        message,
                    });
                }
            }
            Err(e) => errors.push(ConfigError::Model(e)),
        }
    }
    if let Some(path) = &sources.devices {
        match read_text(path, "registry.devices") {
            Ok(text) => {
                if let Err(e) = b.load_csv(&text, path) {
                    errors.extend(e.into_iter().map(ConfigError::Registry));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if let Some(path) = &sources.driver_config {
        match read_text(path, "registry.driver_config") {
            Ok(text) => {
                if let Err(e) = b.load_driver_config(&text, path) {
                    errors.extend(e.into_iter().map(ConfigError::Registry));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    for d in &sources.device {
        if let Err(message) = b.add_device(&d.product_key, &d.device_name, d.client_ip) {
            errors.push(ConfigError::setting(
                d.origin.clone(),
                "registry.device",
                message,
            ));
        }
    }
    if errors.is_empty() {
        Ok(b.build())
    } else {
        Err(errors)
    }
}

/// Reads a file named by a setting; the error names the file.
fn read_text(path: &Path, key: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::setting(
            Origin::File {
                path: path.to_owned(),
                line: None,
            },
            key,
            format!("cannot read: {e}"),
        )
    })
}

/// Defaults that are not a struct's `Default`.
const DEFAULT_IP: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const DEFAULT_PORT: u16 = 17_682;
const DEFAULT_BACKLOG: u32 = 1024;
const DEFAULT_API: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 17_690);
const DEFAULT_DATA_DIR: &str = "./ringlink-data";

#[cfg(test)]
mod tests;
