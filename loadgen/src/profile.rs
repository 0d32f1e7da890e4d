//! The load profile: a TOML file that says what load to generate and what counts as a pass.
//!
//! Every key has a default (see [`Profile::default`]); a file holds only what differs. Loading
//! is defaults -> file -> command-line overrides -> [`Profile::validate`], so everything after
//! `load` works with a checked profile. Relative paths in the file are relative to its folder.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::pace::Pacing;

/// One load profile. Rates are per second; times are in seconds unless the name says `_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// A label for the output (default: the file name without extension).
    pub name: String,
    /// The WebSocket server, `ws://IP:PORT` or `wss://IP:PORT` (default `ws://127.0.0.1:17682`).
    /// `wss://` implies `tls = true`.
    pub target: String,
    /// Several servers, e.g. the nodes of one clustered gateway, instead of `target` (not
    /// both): connection `k` goes to `targets[k % n]` ([`Profile::target_index`]), so a
    /// device always lands on the same node for a given profile. After validation `targets`
    /// holds every server (just `target` when the file gave one) and `target` the first.
    pub targets: Vec<String>,
    /// The server's northbound API `HOST:PORT`, for downlinks, the `/metrics` cross-check and
    /// nothing else (default: none, so no downlinks and no cross-check).
    pub api: Option<String>,
    /// Several APIs instead of `api` (not both): each downlink goes to a random one of them
    /// (any node routes it to the device's node), and the cross-check sums the increase of
    /// every API's `/metrics`. After validation `apis` holds every API (just `api` when the
    /// file gave one) and `api` the first.
    pub apis: Vec<String>,
    /// File holding the API's Bearer token (the server's `api.token_file`), sent with every
    /// downlink (default: none, for a server without a token). Read by [`Profile::validate`].
    pub api_token_file: Option<PathBuf>,
    /// The token read from `api_token_file`, trimmed (not a profile key).
    #[serde(skip)]
    pub api_token: Option<String>,
    /// WebSocket connections (default 100).
    pub connections: u32,
    /// Devices onlined on each connection: 1 = direct devices, more = sub-gateways (default 1).
    pub devices_per_connection: u32,
    /// The first `subgateways` connections carry `subgateway_devices` devices each instead
    /// (default 0: none), so one profile can mix direct devices and sub-gateways.
    pub subgateways: u32,
    /// Devices per sub-gateway connection (default 10).
    pub subgateway_devices: u32,
    /// Where device names come from; connections take consecutive, disjoint parts of this
    /// range (see [`Profile::devices_of`]), so they never collide.
    pub devices: DeviceRange,
    /// A thing model (TSL JSON) for the product; default: the built-in demo model of
    /// `devices.product_key` (thermostat or light).
    pub tsl: Option<PathBuf>,
    /// New connections per second while ramping up (default 500; 0 = all at once).
    pub ramp_per_second: f64,
    /// Reports per second per device, open loop (default 1; 0 = no reports). Not used with
    /// `closed_loop`.
    pub report_rate_per_device: f64,
    /// Closed loop instead of the open-loop schedule (default false): each connection keeps
    /// exactly one report in flight and sends the next one as soon as the previous reply (or
    /// its timeout) arrived, round robin over its online devices. No schedule, no pacing, no
    /// jitter: throughput is what the server answers with that many outstanding requests, and
    /// latency is the round trip (the intended send time is the actual one). Onlines, churn
    /// and downlinks work as in open loop.
    pub closed_loop: bool,
    /// Spread of report intervals: each interval is `mean * (1 +- jitter)`, uniform (default
    /// 0.5, range 0..=1). The mean rate is exact whatever the jitter. Not used with
    /// `closed_loop`.
    pub jitter: f64,
    /// Fraction of reports that are `reportEvent` rather than `reportProperty` (default 0.1).
    pub event_ratio: f64,
    /// Properties in one `reportProperty` (default 3, at most the model's property count).
    pub properties_per_report: u32,
    /// Downlinks per second through the API, round robin over online devices (default 0).
    pub downlinks_per_second: f64,
    /// A device gets downlinks only once it has been online this long (default 0). A
    /// clustered gateway spreads who owns a device to its other nodes asynchronously, so a
    /// downlink through another node's API right after the online may find it offline there.
    pub downlink_settle_ms: u64,
    /// Relative weights of getProperty, setProperty and callService downlinks.
    pub downlink_mix: DownlinkMix,
    /// Connections closed and reopened per second (churn; default 0).
    pub reconnects_per_second: f64,
    /// How long the run lasts, ramp included (default 30).
    pub duration_s: f64,
    /// Reports meant to be sent in the first `warmup_s` seconds are not in the latency
    /// histograms (they still count everywhere else), so that percentiles describe the steady
    /// state after a ramp (default 0).
    pub warmup_s: f64,
    /// How senders wait for their intended send times: `"timer"` (tokio timers, 0-2 ms late,
    /// which the corrected latency includes) or `"spin"` (microseconds late, but each loadgen
    /// thread keeps its core busy); default `"timer"`. See [`crate::pace`].
    pub pacing: Pacing,
    /// Threads per process, each a current-thread runtime (default 0 = one per core, divided
    /// among `procs`).
    pub threads: usize,
    /// Processes to spread the connections over (default 1); `--procs` overrides. One
    /// process may have 20 000 open files here, so 10 000+ sockets want 2 or more.
    pub procs: usize,
    /// Speak TLS (`wss://`) (default false).
    pub tls: bool,
    /// The certificate (or CA) file the client trusts when `tls` is on, PEM or DER. Host names
    /// are not checked, like the official client.
    pub ca_file: Option<PathBuf>,
    /// Local addresses to bind connections to, round robin (default: none, the OS picks).
    /// Use 127.0.0.2, 127.0.0.3, ... to get past one address's ephemeral port range.
    pub source_addrs: Vec<IpAddr>,
    /// A request with no reply after this long counts as a `timeout` error (default 10000).
    pub request_timeout_ms: u64,
    /// A file holding the server's pid; when given, the server's RSS is sampled each second.
    pub server_pid_file: Option<PathBuf>,
    /// The broker the server's MQTT sink publishes to, `mqtt://HOST:PORT` (default: none).
    /// When set, loadgen subscribes to `/sys/#` there before the devices start and measures
    /// each report's way to its Alink post (see [`crate::mqtt`]).
    pub mqtt: Option<String>,
    /// With `mqtt`: after the load, how long the subscriber may stay quiet before the reports
    /// still waiting for their post count as lost (default 10).
    pub mqtt_quiet_s: f64,
    /// Pass/fail limits; a missed one makes loadgen exit 1.
    pub thresholds: Thresholds,
}

/// A range of device names: `{prefix}{index:0width$}` for `index` in `first..first + count`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceRange {
    /// Default `a1ThermoPK0` (the demo thermostats).
    pub product_key: String,
    /// Default `thermo-`.
    pub prefix: String,
    /// Zero-padded width of the index (default 5).
    pub width: usize,
    /// First index (default 0).
    pub first: u64,
    /// Devices available (default 20 000).
    pub count: u64,
}

/// Downlink weights; only their ratios matter.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DownlinkMix {
    pub get: f64,
    pub set: f64,
    pub call: f64,
}

/// Pass/fail limits. `None` = not checked.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Report latency p99 (corrected for coordinated omission) at most this (ms).
    pub p99_ms: Option<f64>,
    /// Downlink (HTTP API round trip) p99 at most this (ms).
    pub downlink_p99_ms: Option<f64>,
    /// Errors of all kinds at most this many (default 0).
    pub max_errors: Option<u64>,
    /// Answered reports per second at least this many.
    pub min_throughput: Option<f64>,
    /// With `mqtt`: report sent -> Alink post received p99 at most this (ms).
    pub mqtt_p99_ms: Option<f64>,
    /// With `mqtt`: reports whose post never arrived at most this many (default 0 when `mqtt`
    /// is set).
    pub max_mqtt_lost: Option<u64>,
    /// With `mqtt`: posts received per second over reports answered per second (both before
    /// the deadline) at least this, e.g. 0.95.
    pub min_mqtt_ratio: Option<f64>,
}

/// What the command line may override.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Repeated `--target`: replaces the profile's `target`/`targets` when not empty.
    pub target: Vec<String>,
    /// Repeated `--api`: replaces the profile's `api`/`apis` when not empty.
    pub api: Vec<String>,
    pub procs: Option<usize>,
    pub duration_s: Option<f64>,
    pub mqtt: Option<String>,
}

impl Profile {
    /// Reads `path`, applies `overrides`, validates.
    pub fn load(path: &Path, overrides: &Overrides) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let mut p = Self::parse(&text).with_context(|| format!("{}", path.display()))?;
        if p.name.is_empty() {
            p.name = path.file_stem().map_or_else(
                || "profile".to_owned(),
                |s| s.to_string_lossy().into_owned(),
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut p.tsl,
            &mut p.ca_file,
            &mut p.server_pid_file,
            &mut p.api_token_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        p.apply(overrides);
        p.validate()
            .with_context(|| format!("{}: invalid profile", path.display()))
    }

    /// Parses profile TOML (no validation, no path resolution).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        for (one, many) in [("target", "targets"), ("api", "apis")] {
            if table.contains_key(one) && table.contains_key(many) {
                bail!("give `{one}` or `{many}`, not both");
            }
        }
        Ok(Self::deserialize(table)?)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(first) = o.target.first() {
            self.target.clone_from(first);
            self.targets.clone_from(&o.target);
        }
        if let Some(first) = o.api.first() {
            self.api = Some(first.clone());
            self.apis.clone_from(&o.api);
        }
        if let Some(n) = o.procs {
            self.procs = n;
        }
        if let Some(d) = o.duration_s {
            self.duration_s = d;
        }
        if let Some(m) = &o.mqtt {
            self.mqtt = Some(m.clone());
        }
    }

    /// Checks every field; returns the profile with `tls` set from a `wss://` target.
    pub fn validate(mut self) -> anyhow::Result<Self> {
        match self.targets.first() {
            None => self.targets = vec![self.target.clone()],
            Some(first) => self.target.clone_from(first),
        }
        match (self.apis.first(), &self.api) {
            (None, Some(api)) => self.apis = vec![api.clone()],
            (Some(first), _) => self.api = Some(first.clone()),
            (None, None) => {}
        }
        if let Some(path) = &self.api_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("api_token_file {}", path.display()))?;
            if text.trim().is_empty() {
                bail!("api_token_file {} is empty", path.display());
            }
            self.api_token = Some(text.trim().to_owned());
        }
        let (tls, _) = parse_target(&self.target)?;
        for t in &self.targets {
            if parse_target(t)?.0 != tls {
                bail!("targets mix ws:// and wss://");
            }
        }
        self.tls |= tls;
        if self.connections == 0 {
            bail!("connections must be at least 1");
        }
        if self.devices_per_connection == 0 {
            bail!("devices_per_connection must be at least 1");
        }
        if self.subgateways > self.connections {
            bail!(
                "subgateways ({}) is more than connections",
                self.subgateways
            );
        }
        if self.subgateways > 0 && self.subgateway_devices == 0 {
            bail!("subgateway_devices must be at least 1");
        }
        let needed = self.total_devices();
        if needed > self.devices.count {
            bail!(
                "the connections carry {needed} devices but devices.count is {}",
                self.devices.count
            );
        }
        if self.devices.product_key.is_empty() {
            bail!("devices.product_key is empty");
        }
        for (name, v) in [
            ("ramp_per_second", self.ramp_per_second),
            ("report_rate_per_device", self.report_rate_per_device),
            ("downlinks_per_second", self.downlinks_per_second),
            ("reconnects_per_second", self.reconnects_per_second),
            ("downlink_mix.get", self.downlink_mix.get),
            ("downlink_mix.set", self.downlink_mix.set),
            ("downlink_mix.call", self.downlink_mix.call),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a finite number >= 0, not {v}");
            }
        }
        for (name, v) in [("jitter", self.jitter), ("event_ratio", self.event_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be between 0 and 1, not {v}");
            }
        }
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            bail!("duration_s must be > 0, not {}", self.duration_s);
        }
        if !(self.warmup_s >= 0.0 && self.warmup_s < self.duration_s) {
            bail!(
                "warmup_s must be >= 0 and less than duration_s, not {}",
                self.warmup_s
            );
        }
        if self.procs == 0 {
            bail!("procs must be at least 1");
        }
        if self.procs > self.connections as usize {
            bail!(
                "procs ({}) is more than connections ({})",
                self.procs,
                self.connections
            );
        }
        if self.properties_per_report == 0 {
            bail!("properties_per_report must be at least 1");
        }
        if self.request_timeout_ms == 0 {
            bail!("request_timeout_ms must be at least 1");
        }
        if self.downlinks_per_second > 0.0 {
            let m = self.downlink_mix;
            if m.get + m.set + m.call <= 0.0 {
                bail!("downlinks_per_second > 0 needs a downlink_mix with a positive weight");
            }
            if self.api.is_none() {
                bail!("downlinks_per_second > 0 needs the server's api (profile `api` or --api)");
            }
        }
        for api in &self.apis {
            api.parse::<SocketAddr>()
                .with_context(|| format!("api {api:?} is not IP:PORT"))?;
        }
        if self.tls && self.ca_file.is_none() {
            bail!("tls needs ca_file (the server's certificate or its CA, PEM or DER)");
        }
        if self.closed_loop && self.report_rate_per_device == 0.0 {
            bail!("closed_loop sends reports back to back: report_rate_per_device = 0 (no reports) contradicts it");
        }
        if self.closed_loop && self.pacing == Pacing::Spin {
            bail!(
                "pacing has no effect with closed_loop (no send times to wait for): leave it out"
            );
        }
        if let Some(p) = self.thresholds.p99_ms.filter(|v| v.is_nan() || *v <= 0.0) {
            bail!("thresholds.p99_ms must be > 0, not {p}");
        }
        match &self.mqtt {
            Some(url) => {
                url.parse::<ringlink::mqtt::BrokerUrl>()
                    .map_err(|e| anyhow::anyhow!("mqtt: {e}"))?;
            }
            None => {
                let t = &self.thresholds;
                if t.mqtt_p99_ms.is_some()
                    || t.max_mqtt_lost.is_some()
                    || t.min_mqtt_ratio.is_some()
                {
                    bail!("the mqtt thresholds need mqtt (profile `mqtt` or --mqtt)");
                }
            }
        }
        if !(self.mqtt_quiet_s.is_finite() && self.mqtt_quiet_s > 0.0) {
            bail!("mqtt_quiet_s must be > 0, not {}", self.mqtt_quiet_s);
        }
        if let Some(p) = self
            .thresholds
            .mqtt_p99_ms
            .filter(|v| v.is_nan() || *v <= 0.0)
        {
            bail!("thresholds.mqtt_p99_ms must be > 0, not {p}");
        }
        if let Some(r) = self
            .thresholds
            .min_mqtt_ratio
            .filter(|v| !(0.0..=1.0).contains(v))
        {
            bail!("thresholds.min_mqtt_ratio must be between 0 and 1, not {r}");
        }
        Ok(self)
    }

    /// The server addresses, in the order of `targets` (validated profiles only).
    pub fn target_addrs(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.targets
            .iter()
            .map(|t| Ok(parse_target(t)?.1))
            .collect()
    }

    /// Which of `targets` connection `conn` (an index among all connections of the run)
    /// goes to: round robin, the same for every run of the profile.
    pub fn target_index(&self, conn: u64) -> usize {
        (conn % self.targets.len().max(1) as u64) as usize
    }

    /// The API addresses, in the order of `apis` (validated profiles only; empty: no API).
    pub fn api_addrs(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.apis
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .with_context(|| format!("api {a:?} is not IP:PORT"))
            })
            .collect()
    }

    /// Connection `conn`'s devices: (index of its first device in the range, how many).
    pub fn devices_of(&self, conn: u64) -> (u64, u64) {
        let g = u64::from(self.subgateways);
        let dg = u64::from(self.subgateway_devices);
        let d = u64::from(self.devices_per_connection);
        if conn < g {
            (conn * dg, dg)
        } else {
            (g * dg + (conn - g) * d, d)
        }
    }

    /// Devices carried by all connections together.
    pub fn total_devices(&self) -> u64 {
        self.devices_of(u64::from(self.connections)).0
    }

    /// The name of device `index` of the range (0-based within the range).
    pub fn device_name(&self, index: u64) -> String {
        let d = &self.devices;
        format!("{}{:0w$}", d.prefix, d.first + index, w = d.width)
    }

    /// Threads per process: `threads`, or the cores shared among `procs`.
    pub fn threads_per_proc(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / self.procs).max(1)
    }

    /// The run length.
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.duration_s)
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            name: String::new(),
            target: "ws://127.0.0.1:17682".to_owned(),
            targets: Vec::new(),
            api: None,
            apis: Vec::new(),
            api_token_file: None,
            api_token: None,
            connections: 100,
            devices_per_connection: 1,
            subgateways: 0,
            subgateway_devices: 10,
            devices: DeviceRange::default(),
            tsl: None,
            ramp_per_second: 500.0,
            report_rate_per_device: 1.0,
            closed_loop: false,
            jitter: 0.5,
            event_ratio: 0.1,
            properties_per_report: 3,
            downlinks_per_second: 0.0,
            downlink_settle_ms: 0,
            downlink_mix: DownlinkMix::default(),
            reconnects_per_second: 0.0,
            duration_s: 30.0,
            warmup_s: 0.0,
            pacing: Pacing::Timer,
            threads: 0,
            procs: 1,
            tls: false,
            ca_file: None,
            source_addrs: Vec::new(),
            request_timeout_ms: 10_000,
            server_pid_file: None,
            mqtt: None,
            mqtt_quiet_s: 10.0,
            thresholds: Thresholds::default(),
        }
    }
}

impl Default for DeviceRange {
    fn default() -> Self {
        Self {
            product_key: "a1ThermoPK0".to_owned(),
            prefix: "thermo-".to_owned(),
            width: 5,
            first: 0,
            count: 20_000,
        }
    }
}

impl Default for DownlinkMix {
    fn default() -> Self {
        Self {
            get: 1.0,
            set: 1.0,
            call: 1.0,
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            p99_ms: None,
            downlink_p99_ms: None,
            max_errors: Some(0),
            min_throughput: None,
            mqtt_p99_ms: None,
            max_mqtt_lost: None,
            min_mqtt_ratio: None,
        }
    }
}

/// `ws://IP:PORT` or `wss://IP:PORT` -> (tls, address). The official client dials IPv4
/// literals only; loadgen takes any IP literal.
fn parse_target(target: &str) -> anyhow::Result<(bool, SocketAddr)> {
    let (tls, rest) = if let Some(r) = target.strip_prefix("ws://") {
        (false, r)
    } else if let Some(r) = target.strip_prefix("wss://") {
        (true, r)
    } else {
        bail!("target {target:?} must start with ws:// or wss://");
    };
    let hostport = rest.trim_end_matches('/');
    let addr = hostport
        .parse::<SocketAddr>()
        .with_context(|| format!("target {target:?}: expected ws://IP:PORT"))?;
    Ok((tls, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> anyhow::Result<Profile> {
        Profile::parse(text)?.validate()
    }

    fn err(text: &str) -> String {
        match check(text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn api_token_file_is_read_relative_to_the_profile() {
        let dir = std::env::temp_dir().join(format!("loadgen-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("api.token"), " tok-9\n").expect("token");
        std::fs::write(dir.join("empty.token"), "\n").expect("token");
        let profile = dir.join("p.toml");
        std::fs::write(&profile, "api_token_file = \"api.token\"\n").expect("profile");
        let p = Profile::load(&profile, &Overrides::default()).expect("valid");
        assert_eq!(p.api_token.as_deref(), Some("tok-9"));
        std::fs::write(&profile, "api_token_file = \"empty.token\"\n").expect("profile");
        let e = Profile::load(&profile, &Overrides::default()).expect_err("empty");
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(check("").expect("valid").api_token, None);
    }

    #[test]
    fn empty_profile_is_all_defaults() {
        let p = check("").expect("defaults are valid");
        assert_eq!(p.target, "ws://127.0.0.1:17682");
        assert_eq!(p.connections, 100);
        assert_eq!(p.devices_per_connection, 1);
        assert_eq!(p.devices, DeviceRange::default());
        assert_eq!(p.report_rate_per_device, 1.0);
        assert_eq!(p.thresholds.max_errors, Some(0));
        assert_eq!(p.thresholds.p99_ms, None);
        assert!(!p.tls);
        assert_eq!(p.procs, 1);
        assert_eq!(p.device_name(7), "thermo-00007");
        assert!(p.threads_per_proc() >= 1);
    }

    #[test]
    fn file_values_override_defaults() {
        let p = check(
            r#"
            connections = 10
            devices_per_connection = 100
            source_addrs = ["127.0.0.2", "127.0.0.3"]
            [devices]
            product_key = "a1LightPK00"
            prefix = "lamp-"
            count = 10000
            [thresholds]
            p99_ms = 50
            max_errors = 3
            "#,
        )
        .expect("valid");
        assert_eq!(p.connections, 10);
        assert_eq!(p.devices.prefix, "lamp-");
        assert_eq!(p.devices.width, 5, "unset nested keys keep their default");
        assert_eq!(p.source_addrs.len(), 2);
        assert_eq!(p.thresholds.p99_ms, Some(50.0));
        assert_eq!(p.thresholds.max_errors, Some(3));
        assert_eq!(p.device_name(42), "lamp-00042");
    }

    #[test]
    fn subgateways_and_direct_devices_get_disjoint_ranges() {
        let p = check("connections = 5\nsubgateways = 2\nsubgateway_devices = 10").expect("ok");
        let ranges: Vec<_> = (0..5).map(|c| p.devices_of(c)).collect();
        assert_eq!(ranges, [(0, 10), (10, 10), (20, 1), (21, 1), (22, 1)]);
        assert_eq!(p.total_devices(), 23);
        let p = check("connections = 3\ndevices_per_connection = 4").expect("ok");
        assert_eq!(p.devices_of(2), (8, 4));
        assert_eq!(p.total_devices(), 12);
    }

    #[test]
    fn wss_target_turns_tls_on() {
        let p = check("target = \"wss://127.0.0.1:1\"\nca_file = \"x.cer\"").expect("valid");
        assert!(p.tls);
        assert_eq!(p.target_addrs().expect("addr")[0].port(), 1);
    }

    #[test]
    fn validation_errors_name_the_field() {
        assert!(err("conections = 1").contains("unknown field"));
        assert!(err("connections = 0").contains("connections"));
        assert!(err("devices_per_connection = 0").contains("devices_per_connection"));
        assert!(err("connections = 300\ndevices_per_connection = 100").contains("devices.count"));
        assert!(err("connections = 2\nsubgateways = 3").contains("subgateways"));
        assert!(err("subgateways = 1\nsubgateway_devices = 0").contains("subgateway_devices"));
        assert!(err("jitter = 1.5").contains("jitter"));
        assert!(err("event_ratio = -0.1").contains("event_ratio"));
        assert!(err("duration_s = 0").contains("duration_s"));
        assert!(err("report_rate_per_device = -1").contains("report_rate_per_device"));
        assert!(err("target = \"http://127.0.0.1:1\"").contains("ws://"));
        assert!(err("target = \"ws://localhost:1\"").contains("IP:PORT"));
        assert!(err("tls = true").contains("ca_file"));
        assert!(err("downlinks_per_second = 5").contains("api"));
        assert!(err("procs = 0").contains("procs"));
        assert!(err("connections = 2\nprocs = 3").contains("procs"));
        assert!(err("api = \"nope\"").contains("IP:PORT"));
        assert!(err("closed_loop = true\nreport_rate_per_device = 0").contains("closed_loop"));
        assert!(err("closed_loop = true\npacing = \"spin\"").contains("closed_loop"));
        assert!(
            err("api = \"127.0.0.1:1\"\ndownlinks_per_second = 1\n[downlink_mix]\nget = 0\nset = 0\ncall = 0")
                .contains("downlink_mix")
        );
    }

    #[test]
    fn overrides_beat_the_file() {
        let mut p = Profile::parse("procs = 1").expect("parse");
        p.apply(&Overrides {
            target: vec!["ws://127.0.0.1:9".to_owned()],
            api: vec!["127.0.0.1:10".to_owned()],
            procs: Some(2),
            duration_s: Some(3.0),
            mqtt: Some("mqtt://127.0.0.1:1884".to_owned()),
        });
        let p = p.validate().expect("valid");
        assert_eq!(p.procs, 2);
        assert_eq!(p.api.as_deref(), Some("127.0.0.1:10"));
        assert_eq!(p.duration_s, 3.0);
        assert_eq!(p.mqtt.as_deref(), Some("mqtt://127.0.0.1:1884"));
    }

    #[test]
    fn one_target_is_a_list_of_one() {
        let p = check("target = \"ws://127.0.0.1:9\"\napi = \"127.0.0.1:10\"").expect("valid");
        assert_eq!(p.targets, ["ws://127.0.0.1:9"]);
        assert_eq!(p.apis, ["127.0.0.1:10"]);
        assert_eq!(p.target_index(0), 0);
        assert_eq!(p.target_index(12345), 0);
        let p = check("").expect("valid");
        assert_eq!(p.targets, ["ws://127.0.0.1:17682"]);
        assert!(p.apis.is_empty());
        assert_eq!(p.api, None);
    }

    #[test]
    fn connections_spread_round_robin_over_targets() {
        let p = check(
            "targets = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:2\", \"ws://127.0.0.1:3\"]\n\
             apis = [\"127.0.0.1:11\", \"127.0.0.1:12\", \"127.0.0.1:13\"]",
        )
        .expect("valid");
        assert_eq!(p.target, "ws://127.0.0.1:1");
        assert_eq!(p.api.as_deref(), Some("127.0.0.1:11"));
        let addrs = p.target_addrs().expect("addrs");
        let ports: Vec<u16> = (0..7).map(|k| addrs[p.target_index(k)].port()).collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3, 1]);
        // Every target gets its share, whatever slice of the run a process has.
        let mut per = [0u32; 3];
        for k in 0..100_000 {
            per[p.target_index(k)] += 1;
        }
        assert_eq!(per, [33_334, 33_333, 33_333]);
        let apis: Vec<u16> = p
            .api_addrs()
            .expect("apis")
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(apis, [11, 12, 13]);
    }

    #[test]
    fn repeated_flags_replace_the_lists() {
        let mut p = Profile::parse("targets = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:2\"]")
            .expect("parse");
        p.apply(&Overrides {
            target: vec!["ws://127.0.0.1:7".to_owned(), "ws://127.0.0.1:8".to_owned()],
            api: vec!["127.0.0.1:17".to_owned(), "127.0.0.1:18".to_owned()],
            ..Overrides::default()
        });
        let p = p.validate().expect("valid");
        assert_eq!(p.targets, ["ws://127.0.0.1:7", "ws://127.0.0.1:8"]);
        assert_eq!(p.target, "ws://127.0.0.1:7");
        assert_eq!(p.apis, ["127.0.0.1:17", "127.0.0.1:18"]);
        // No flags: the file's lists stay.
        let mut q = Profile::parse("targets = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:2\"]")
            .expect("parse");
        q.apply(&Overrides::default());
        assert_eq!(q.validate().expect("valid").targets.len(), 2);
    }

    #[test]
    fn target_lists_are_checked() {
        assert!(
            err("target = \"ws://127.0.0.1:1\"\ntargets = [\"ws://127.0.0.1:2\"]")
                .contains("not both")
        );
        assert!(err("api = \"127.0.0.1:1\"\napis = [\"127.0.0.1:2\"]").contains("not both"));
        assert!(err("targets = [\"ws://127.0.0.1:1\", \"wss://127.0.0.1:2\"]").contains("mix"));
        assert!(err("targets = [\"ws://127.0.0.1:1\", \"ws://nope:2\"]").contains("IP:PORT"));
        assert!(err("apis = [\"127.0.0.1:1\", \"nope\"]").contains("IP:PORT"));
    }

    #[test]
    fn mqtt_keys() {
        let p = check("mqtt = \"mqtt://127.0.0.1:1883\"\n[thresholds]\nmqtt_p99_ms = 100\nmin_mqtt_ratio = 0.95")
            .expect("valid");
        assert_eq!(p.thresholds.max_mqtt_lost, None);
        assert_eq!(p.mqtt_quiet_s, 10.0);
        assert!(err("mqtt = \"http://127.0.0.1:1\"").contains("mqtt://"));
        assert!(err("[thresholds]\nmax_mqtt_lost = 0").contains("need mqtt"));
        assert!(
            err("mqtt = \"mqtt://h\"\n[thresholds]\nmin_mqtt_ratio = 2").contains("min_mqtt_ratio")
        );
        assert!(err("mqtt = \"mqtt://h\"\nmqtt_quiet_s = 0").contains("mqtt_quiet_s"));
    }

    #[test]
    fn every_shipped_profile_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("profiles/ exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let o = Overrides {
                    api: vec!["127.0.0.1:17690".to_owned()],
                    ..Overrides::default()
                };
                Profile::load(&path, &o).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 8, "{n} profiles");
    }
}
