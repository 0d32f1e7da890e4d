//! The draft configuration: raw values from the file, the environment and the flags, each with
//! its [`Origin`], and the one [`Draft::validate`] that turns them into a [`Config`].
//!
//! Values stay raw until `validate`, so that a TOML integer, an environment string and a flag go
//! through the same range checks and produce the same messages, prefixed with where they came
//! from. A later source replaces an earlier one's value and origin.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use toml::de::{DeTable, DeValue};

use crate::config::{
    Api, ApiToken, Config, ConfigError, Fsync, InlineDevice, IoMode, Limits, Listener, Mqtt, Nats,
    OnFull, Origin, Overrides, RegistrySources, Runtime, SinkKind, TlsFiles, Uplink, DEFAULT_API,
    DEFAULT_BACKLOG, DEFAULT_DATA_DIR, DEFAULT_IP, DEFAULT_PORT,
};
use crate::registry::DriverListener;

/// Every scalar setting as `section.key` (the TOML path); its environment variable is
/// `RINGLINK_` followed by the key in upper case with `.` as `_` (`RINGLINK_LISTENER_TLS_CERT`).
/// `[[registry.device]]` entries exist in the file only.
pub const KNOBS: &[&str] = &[
    "listener.ip",
    "listener.port",
    "listener.tls.cert",
    "listener.tls.key",
    "listener.backlog",
    "runtime.threads",
    "runtime.io",
    "limits.max_connections",
    "limits.max_frame_bytes",
    "limits.handshake_timeout_ms",
    "limits.ping_interval_ms",
    "limits.pong_timeout_ms",
    "limits.downlink_timeout_ms",
    "limits.message_timeout_ms",
    "limits.auto_online_on_report",
    "limits.max_messages_per_s",
    "limits.message_burst",
    "limits.max_new_connections_per_s",
    "limits.max_connections_per_ip",
    "limits.flapping_max",
    "limits.flapping_window_ms",
    "limits.flapping_ban_ms",
    "api.listen",
    "api.token_file",
    "api.max_connections",
    "api.request_timeout_ms",
    "data_dir",
    "uplink.sink",
    "uplink.batch_max",
    "uplink.flush_us",
    "uplink.fsync",
    "uplink.segment_bytes",
    "uplink.max_bytes",
    "uplink.max_age_s",
    "uplink.on_full",
    "uplink.mqtt.url",
    "uplink.mqtt.client_id",
    "uplink.mqtt.username",
    "uplink.mqtt.password",
    "uplink.mqtt.ca_file",
    "uplink.mqtt.cert",
    "uplink.mqtt.key",
    "uplink.mqtt.keep_alive_s",
    "uplink.mqtt.qos",
    "uplink.mqtt.topic_prefix",
    "uplink.mqtt.inflight",
    "uplink.mqtt.replay_per_s",
    "uplink.mqtt.gateway_product_key",
    "uplink.mqtt.gateway_device_name",
    "uplink.mqtt.device_secrets",
    "uplink.nats.url",
    "uplink.nats.urls",
    "uplink.nats.node",
    "uplink.nats.stream",
    "uplink.nats.subject_prefix",
    "uplink.nats.owners_bucket",
    "uplink.nats.node_timeout_ms",
    "uplink.nats.duplicate_window_ms",
    "uplink.nats.replicas",
    "uplink.nats.inflight",
    "uplink.nats.token",
    "uplink.nats.creds_file",
    "uplink.nats.ca_file",
    "registry.products",
    "registry.devices",
    "registry.driver_config",
];

/// The environment variable of a knob.
pub(super) fn env_name(knob: &str) -> String {
    format!("RINGLINK_{}", knob.replace('.', "_").to_ascii_uppercase())
}

#[derive(Debug, Default)]
pub(super) struct Draft {
    values: BTreeMap<&'static str, (Raw, Origin)>,
    inline: Vec<InlineDevice>,
    /// Where `[registry]` (or a `registry.*` variable) was first seen: no registry means demo.
    registry: Option<Origin>,
    file: Option<PathBuf>,
    errors: Vec<ConfigError>,
}

/// A value before validation.
#[derive(Debug, Clone)]
enum Raw {
    Int(i128),
    Bool(bool),
    Str(String),
    List(Vec<String>),
    /// From the environment or a flag: parsed according to the knob.
    Text(String),
    /// A TOML value of a kind no knob takes (float, datetime, table, mixed array).
    Other(&'static str),
}

impl Raw {
    fn from_toml(v: &DeValue<'_>) -> Self {
        match v {
            DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
                .map_or(Self::Other("an integer out of range"), Self::Int),
            DeValue::Boolean(b) => Self::Bool(*b),
            DeValue::String(s) => Self::Str(s.to_string()),
            DeValue::Array(items) => items
                .iter()
                .map(|i| i.get_ref().as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map_or(Self::Other("an array of non-strings"), Self::List),
            DeValue::Float(_) => Self::Other("a float"),
            DeValue::Datetime(_) => Self::Other("a datetime"),
            DeValue::Table(_) => Self::Other("a table"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Int(_) => "an integer",
            Self::Bool(_) => "a boolean",
            Self::Str(_) | Self::Text(_) => "a string",
            Self::List(_) => "an array",
            Self::Other(kind) => kind,
        }
    }
}

impl Draft {
    /// Reads the TOML file: every known key with its line, an error for every unknown one.
    pub(super) fn read_file(&mut self, path: &Path) {
        self.file = Some(path.to_owned());
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                self.errors.push(ConfigError::Setting {
                    origin: at(path, None),
                    key: None,
                    message: format!("cannot read: {e}"),
                });
                return;
            }
        };
        let (doc, syntax) = DeTable::parse_recoverable(&text);
        for e in syntax {
            let line = e.span().map(|s| line_of(&text, s.start));
            self.errors.push(ConfigError::Setting {
                origin: at(path, line),
                key: None,
                message: e.message().trim().to_owned(),
            });
        }
        let file = File { path, text: &text };
        self.walk(&file, doc.get_ref(), "");
    }

    fn walk(&mut self, file: &File<'_>, table: &DeTable<'_>, prefix: &str) {
        for (key, value) in table.iter() {
            let name = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let origin = file.at(value.span().start);
            if name == "registry" && self.registry.is_none() {
                self.registry = Some(file.at(key.span().start));
            }
            if let Some(knob) = KNOBS.iter().find(|k| **k == name) {
                self.values
                    .insert(knob, (Raw::from_toml(value.get_ref()), origin));
            } else if name == "registry.device" {
                self.inline_devices(file, value.get_ref(), origin);
            } else if is_section(&name) {
                match value.get_ref() {
                    DeValue::Table(t) => self.walk(file, t, &name),
                    other => self.errors.push(ConfigError::setting(
                        origin,
                        name,
                        format!("expected a table, found {}", Raw::from_toml(other).kind()),
                    )),
                }
            } else {
                self.errors.push(ConfigError::setting(
                    file.at(key.span().start),
                    name,
                    format!("unknown key (known here: {})", known_under(prefix)),
                ));
            }
        }
    }

    fn inline_devices(&mut self, file: &File<'_>, value: &DeValue<'_>, origin: Origin) {
        let key = "registry.device";
        self.registry.get_or_insert_with(|| origin.clone());
        let Some(entries) = value.as_array() else {
            self.errors.push(ConfigError::setting(
                origin,
                key,
                "expected [[registry.device]] tables (product_key, device_name, client_ip)",
            ));
            return;
        };
        for entry in entries {
            let origin = file.at(entry.span().start);
            let Some(table) = entry.get_ref().as_table() else {
                self.errors
                    .push(ConfigError::setting(origin, key, "expected a table"));
                continue;
            };
            let (mut pk, mut dn, mut ip, mut ok) = (None, None, None, true);
            for (k, v) in table.iter() {
                let here = file.at(v.span().start);
                let field = format!("{key}.{}", k.get_ref());
                let Some(s) = v.get_ref().as_str() else {
                    self.errors
                        .push(ConfigError::setting(here, field, "expected a string"));
                    ok = false;
                    continue;
                };
                match k.get_ref().as_ref() {
                    "product_key" => pk = Some(s.to_owned()),
                    "device_name" => dn = Some(s.to_owned()),
                    "client_ip" if s.is_empty() => {}
                    "client_ip" => match s.parse::<IpAddr>() {
                        Ok(addr) => ip = Some(addr),
                        Err(_) => {
                            self.errors.push(ConfigError::setting(
                                here,
                                field,
                                format!("expected an IP address, got {s:?}"),
                            ));
                            ok = false;
                        }
                    },
                    _ => {
                        self.errors.push(ConfigError::setting(
                            file.at(k.span().start),
                            field,
                            "unknown key (known here: product_key, device_name, client_ip)",
                        ));
                        ok = false;
                    }
                }
            }
            match (pk, dn) {
                (Some(product_key), Some(device_name)) if ok => {
                    self.inline.push(InlineDevice {
                        product_key,
                        device_name,
                        client_ip: ip,
                        origin,
                    });
                }
                (pk, dn) => {
                    for (name, v) in [("product_key", pk), ("device_name", dn)] {
                        if v.is_none() {
                            self.errors.push(ConfigError::setting(
                                origin.clone(),
                                key,
                                format!("missing {name}"),
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Takes `RINGLINK_<SECTION>_<KEY>` variables. A variable that starts like a section but
    /// names no setting is an error (a typo would otherwise be silently ignored); other
    /// `RINGLINK_*` variables are left alone for other uses.
    pub(super) fn read_env(&mut self, env: impl IntoIterator<Item = (String, String)>) {
        const SECTIONS: &[&str] = &[
            "LISTENER_",
            "RUNTIME_",
            "LIMITS_",
            "API_",
            "UPLINK_",
            "REGISTRY_",
        ];
        let mut unknown = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("RINGLINK_") else {
                continue;
            };
            if let Some(knob) = KNOBS.iter().find(|k| env_name(k) == name) {
                if knob.starts_with("registry.") && self.registry.is_none() {
                    self.registry = Some(Origin::Env(name.clone()));
                }
                let raw = Raw::Text(value.trim().to_owned());
                self.values.insert(knob, (raw, Origin::Env(name)));
            } else if SECTIONS.iter().any(|s| rest.starts_with(s)) {
                unknown.push(name);
            }
        }
        unknown.sort();
        for name in unknown {
            self.errors.push(ConfigError::Setting {
                origin: Origin::Env(name),
                key: None,
                message: "unknown setting; variables are RINGLINK_<SECTION>_<KEY>, \
                          e.g. RINGLINK_LISTENER_PORT (see ringlink.example.toml)"
                    .to_owned(),
            });
        }
    }

    pub(super) fn read_flags(&mut self, flags: &Overrides) {
        let mut set = |knob: &'static str, raw: Raw, flag: &'static str| {
            self.values.insert(knob, (raw, Origin::Flag(flag)));
        };
        let path = |p: &Path| Raw::Text(p.display().to_string());
        if let Some(addr) = flags.listen {
            set("listener.ip", Raw::Text(addr.ip().to_string()), "--listen");
            set("listener.port", Raw::Int(addr.port().into()), "--listen");
        }
        if let Some(p) = &flags.tls_cert {
            set("listener.tls.cert", path(p), "--tls-cert");
        }
        if let Some(p) = &flags.tls_key {
            set("listener.tls.key", path(p), "--tls-key");
        }
        if let Some(n) = flags.threads {
            set("runtime.threads", Raw::Int(n as i128), "--threads");
        }
        if let Some(io) = flags.io {
            set("runtime.io", Raw::Text(io.as_str().into()), "--io");
        }
        if let Some(addr) = flags.api {
            set("api.listen", Raw::Text(addr.to_string()), "--api");
        }
        if let Some(p) = &flags.data_dir {
            set("data_dir", path(p), "--data-dir");
        }
    }

    /// Checks every value and cross-field rule, collecting every error.
    ///
    /// On error, also returns the registry sources as far as they could be read, so that
    /// `ringlink check` can report the thing model and device list errors in the same run.
    pub(super) fn validate(
        mut self,
    ) -> Result<Config, (Vec<ConfigError>, Option<RegistrySources>)> {
        let driver_config = self.path("registry.driver_config");
        if let Some(path) = &driver_config {
            self.fill_from_driver_config(path);
        }

        let ip = self.parsed("listener.ip", DEFAULT_IP, "an IP address");
        let port = self.int("listener.port", DEFAULT_PORT.into(), 0, 65_535);
        let cert = self.path("listener.tls.cert");
        let key = self.path("listener.tls.key");
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                self.fail(
                    "listener.tls.cert",
                    "a certificate needs its key: set listener.tls.key too (flag --tls-key)",
                );
                None
            }
            (None, Some(_)) => {
                self.fail(
                    "listener.tls.key",
                    "a key needs its certificate: set listener.tls.cert too (flag --tls-cert)",
                );
                None
            }
        };
        let backlog = self.int("listener.backlog", DEFAULT_BACKLOG.into(), 1, 65_535);
        let listener = Listener {
            ip,
            port: port as u16,
            tls,
            backlog: backlog as u32,
        };

        let threads = self.int("runtime.threads", 0, 0, 1024) as usize;
        let runtime = Runtime {
            threads: match threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            io: self.parsed("runtime.io", IoMode::Auto, "auto, uring or epoll"),
        };

        let d = Limits::default();
        let limits = Limits {
            max_connections: self.int(
                "limits.max_connections",
                d.max_connections.into(),
                1,
                10_000_000,
            ) as u32,
            max_frame_bytes: self.int(
                "limits.max_frame_bytes",
                d.max_frame_bytes.into(),
                125,
                16_777_216,
            ) as u32,
            handshake_timeout_ms: self.int(
                "limits.handshake_timeout_ms",
                d.handshake_timeout_ms,
                100,
                600_000,
            ),
            ping_interval_ms: self.int(
                "limits.ping_interval_ms",
                d.ping_interval_ms,
                1_000,
                3_600_000,
            ),
            pong_timeout_ms: self.int(
                "limits.pong_timeout_ms",
                d.pong_timeout_ms,
                1_001,
                86_400_000,
            ),
            downlink_timeout_ms: self.int(
                "limits.downlink_timeout_ms",
                d.downlink_timeout_ms,
                100,
                600_000,
            ),
            message_timeout_ms: self.int(
                "limits.message_timeout_ms",
                d.message_timeout_ms,
                100,
                600_000,
            ),
            auto_online_on_report: self
                .boolean("limits.auto_online_on_report", d.auto_online_on_report),
            max_messages_per_s: self.int(
                "limits.max_messages_per_s",
                d.max_messages_per_s.into(),
                0,
                10_000_000,
            ) as u32,
            message_burst: self.int(
                "limits.message_burst",
                d.message_burst.into(),
                1,
                10_000_000,
            ) as u32,
            max_new_connections_per_s: self.int(
                "limits.max_new_connections_per_s",
                d.max_new_connections_per_s.into(),
                0,
                10_000_000,
            ) as u32,
            max_connections_per_ip: self.int(
                "limits.max_connections_per_ip",
                d.max_connections_per_ip.into(),
                0,
                10_000_000,
            ) as u32,
            flapping_max: self.int("limits.flapping_max", d.flapping_max.into(), 0, 1_000_000)
                as u32,
            flapping_window_ms: self.int(
                "limits.flapping_window_ms",
                d.flapping_window_ms,
                100,
                86_400_000,
            ),
            flapping_ban_ms: self.int("limits.flapping_ban_ms", d.flapping_ban_ms, 100, 86_400_000),
        };
        if limits.pong_timeout_ms <= limits.ping_interval_ms {
            let ping = self.origin("limits.ping_interval_ms");
            self.fail(
                "limits.pong_timeout_ms",
                format!(
                    "must be greater than limits.ping_interval_ms ({} from {ping}), got {}: \
                     a connection would be closed before its next ping",
                    limits.ping_interval_ms, limits.pong_timeout_ms
                ),
            );
        }

        let api = self.api();
        if api.listen.port() != 0 && api.listen.port() == listener.port {
            let (a, b) = (api.listen.ip(), listener.ip);
            if a == b || a.is_unspecified() || b.is_unspecified() {
                let other = self.origin("listener.port");
                self.fail(
                    "api.listen",
                    format!(
                        "{} overlaps the device listener {} (port from {other}); \
                         give the API its own port",
                        api.listen,
                        listener.addr()
                    ),
                );
            }
        }

        let data_dir = self
            .path("data_dir")
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));

        let d = Uplink::default();
        let sink = self.parsed("uplink.sink", Sink(SinkKind::Local), "local, mqtt or nats");
        let mqtt = self.mqtt();
        let nats = self.nats();
        let uplink = Uplink {
            sink: sink.0,
            batch_max: self.int("uplink.batch_max", d.batch_max.into(), 1, 65_536) as u32,
            flush_us: self.int("uplink.flush_us", d.flush_us, 0, 1_000_000),
            fsync: self
                .parsed("uplink.fsync", FsyncArg(d.fsync), "never or batch")
                .0,
            segment_bytes: self.int("uplink.segment_bytes", d.segment_bytes, 1 << 20, 4 << 30),
            max_bytes: self.int("uplink.max_bytes", d.max_bytes, 1 << 20, u64::MAX >> 1),
            max_age_s: self.int("uplink.max_age_s", d.max_age_s, 60, 315_360_000),
            on_full: self
                .parsed(
                    "uplink.on_full",
                    OnFullArg(d.on_full),
                    "drop_oldest or block",
                )
                .0,
            mqtt,
            nats,
        };
        if uplink.max_bytes < uplink.segment_bytes {
            self.fail(
                "uplink.max_bytes",
                format!(
                    "must be at least uplink.segment_bytes ({}), got {}",
                    uplink.segment_bytes, uplink.max_bytes
                ),
            );
        }

        let before = self.errors.len();
        let products = self.paths("registry.products");
        let products_bad = self.errors.len() > before;
        let devices = self.path("registry.devices");
        let registry = match self.registry.take() {
            None => None,
            Some(origin) => {
                if products.is_empty() && !products_bad {
                    let origin = match self.values.get("registry.products") {
                        Some((_, o)) => o.clone(),
                        None => origin,
                    };
                    self.errors.push(ConfigError::setting(
                        origin,
                        "registry.products",
                        "no thing models: list at least one TSL file, or remove [registry] \
                         to serve the built-in demo registry",
                    ));
                }
                Some(RegistrySources {
                    products,
                    devices,
                    driver_config,
                    device: std::mem::take(&mut self.inline),
                })
            }
        };

        if !self.errors.is_empty() {
            let mut errors = self.errors;
            errors.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
            return Err((errors, registry));
        }
        Ok(Config {
            listener,
            runtime,
            limits,
            api,
            data_dir,
            uplink,
            registry,
            file: self.file,
        })
    }

    /// Listener keys of an imported driver config fill in whatever no other source set. Its
    /// read and parse errors are left to [`Config::build_registry`], which reads the same file
    /// and reports them with the rest of the device list.
    fn fill_from_driver_config(&mut self, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let Ok(l) = DriverListener::from_driver_config(&text, path) else {
            return;
        };
        let origin = at(path, None);
        let mut fill = |knob: &'static str, raw: Option<Raw>| {
            if let Some(raw) = raw {
                self.values
                    .entry(knob)
                    .or_insert_with(|| (raw, origin.clone()));
            }
        };
        fill("listener.ip", l.ip.map(|ip| Raw::Text(ip.to_string())));
        fill("listener.port", l.port.map(|p| Raw::Int(p.into())));
        let tls_set = self.values.contains_key("listener.tls.cert")
            || self.values.contains_key("listener.tls.key");
        if tls_set || l.tls == Some(false) {
            return;
        }
        if l.tls == Some(true) && (l.cert.is_none() || l.key.is_none()) {
            self.errors.push(ConfigError::setting(
                origin,
                "listener.tls",
                "the driver config turns tls on but does not name both cert and key",
            ));
            return;
        }
        let text = |p: PathBuf| Raw::Text(p.display().to_string());
        let mut fill = |knob: &'static str, raw: Option<Raw>| {
            if let Some(raw) = raw {
                self.values.insert(knob, (raw, origin.clone()));
            }
        };
        fill("listener.tls.cert", l.cert.map(text));
        fill("listener.tls.key", l.key.map(text));
    }

    fn origin(&self, knob: &str) -> Origin {
        self.values
            .get(knob)
            .map_or(Origin::Default, |(_, o)| o.clone())
    }

    fn fail(&mut self, knob: &str, message: impl Into<String>) {
        let origin = self.origin(knob);
        self.errors
            .push(ConfigError::setting(origin, knob, message.into()));
    }

    /// An unsigned integer in `lo..=hi`; `default` when unset or wrong.
    fn int(&mut self, knob: &str, default: u64, lo: u64, hi: u64) -> u64 {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return default;
        };
        let value = match raw {
            Raw::Int(i) => i,
            Raw::Text(s) => match s.replace('_', "").parse::<i128>() {
                Ok(i) => i,
                Err(_) => {
                    self.errors.push(ConfigError::setting(
                        origin,
                        knob,
                        format!("expected an integer, got {s:?}"),
                    ));
                    return default;
                }
            },
            other => {
                self.errors.push(ConfigError::setting(
                    origin,
                    knob,
                    format!("expected an integer, found {}", other.kind()),
                ));
                return default;
            }
        };
        if value < i128::from(lo) || value > i128::from(hi) {
            self.errors.push(ConfigError::setting(
                origin,
                knob,
                format!("must be between {lo} and {hi}, got {value}"),
            ));
            return default;
        }
        // In lo..=hi, and hi is a u64.
        value as u64
    }

    fn boolean(&mut self, knob: &str, default: bool) -> bool {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return default;
        };
        let found = match raw {
            Raw::Bool(b) => return b,
            Raw::Text(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "on" | "yes" => return true,
                "false" | "0" | "off" | "no" => return false,
                _ => format!("{s:?}"),
            },
            other => other.kind().to_owned(),
        };
        self.errors.push(ConfigError::setting(
            origin,
            knob,
            format!("expected true or false, got {found}"),
        ));
        default
    }

    /// A string setting parsed with `FromStr`; `what` says what is expected.
    fn parsed<T: FromStr>(&mut self, knob: &str, default: T, what: &str) -> T {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return default;
        };
        let found = match raw {
            Raw::Str(s) | Raw::Text(s) => match s.parse() {
                Ok(v) => return v,
                Err(_) => format!("{s:?}"),
            },
            other => other.kind().to_owned(),
        };
        self.errors.push(ConfigError::setting(
            origin,
            knob,
            format!("expected {what}, got {found}"),
        ));
        default
    }

    /// A string setting; `default` when unset, an error when set to something else.
    fn string(&mut self, knob: &str, default: &str) -> String {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return default.to_owned();
        };
        match raw {
            Raw::Str(s) | Raw::Text(s) => s,
            other => {
                self.errors.push(ConfigError::setting(
                    origin,
                    knob,
                    format!("expected a string, found {}", other.kind()),
                ));
                default.to_owned()
            }
        }
    }

    /// `[api]`: the token file is read here, so that `ringlink check` reports a missing or
    /// empty one, and a non-loopback `listen` without one is refused.
    fn api(&mut self) -> Api {
        let listen = self.parsed("api.listen", DEFAULT_API, "an IP:PORT address");
        let token_file = self.path("api.token_file");
        let token = token_file
            .as_ref()
            .and_then(|path| match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Some(ApiToken(text.trim().into())),
                Ok(_) => {
                    let msg = format!("{} is empty: the token must not be empty", path.display());
                    self.fail("api.token_file", msg);
                    None
                }
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", path.display());
                    self.fail("api.token_file", msg);
                    None
                }
            });
        if token_file.is_none() && !listen.ip().is_loopback() {
            self.fail(
                "api.listen",
                format!(
                    "{listen} is not a loopback address: set api.token_file too, or whoever \
                     reaches the API can drive every device"
                ),
            );
        }
        Api {
            listen,
            token,
            token_file,
            max_connections: self.int("api.max_connections", 1_024, 1, 65_536) as u32,
            request_timeout_ms: self.int("api.request_timeout_ms", 10_000, 100, 600_000),
        }
    }

    /// `[uplink.mqtt]`, checked whatever the sink (a typo shows before the switch to mqtt).
    fn mqtt(&mut self) -> Mqtt {
        let d = Mqtt::default();
        let url = self.string("uplink.mqtt.url", &d.url);
        if let Err(e) = crate::mqtt::BrokerUrl::from_str(&url) {
            self.fail("uplink.mqtt.url", e.to_string());
        }
        let client_id = self.string("uplink.mqtt.client_id", &d.client_id);
        if client_id.is_empty() || client_id.len() > 65_535 {
            self.fail("uplink.mqtt.client_id", "must be 1 to 65535 bytes");
        }
        let username = self
            .values
            .contains_key("uplink.mqtt.username")
            .then(|| self.string("uplink.mqtt.username", ""));
        let password = self
            .values
            .contains_key("uplink.mqtt.password")
            .then(|| self.string("uplink.mqtt.password", ""));
        if password.is_some() && username.is_none() {
            self.fail(
                "uplink.mqtt.password",
                "a password needs uplink.mqtt.username (MQTT 3.1.1)",
            );
        }
        let ca_file = self.path("uplink.mqtt.ca_file");
        let cert = self.path("uplink.mqtt.cert");
        let key = self.path("uplink.mqtt.key");
        if cert.is_some() != key.is_some() {
            self.fail(
                if cert.is_some() {
                    "uplink.mqtt.cert"
                } else {
                    "uplink.mqtt.key"
                },
                "a client certificate needs both uplink.mqtt.cert and uplink.mqtt.key",
            );
        }
        let gw_pk = self
            .values
            .contains_key("uplink.mqtt.gateway_product_key")
            .then(|| self.string("uplink.mqtt.gateway_product_key", ""));
        let gw_dn = self
            .values
            .contains_key("uplink.mqtt.gateway_device_name")
            .then(|| self.string("uplink.mqtt.gateway_device_name", ""));
        let gateway = match (gw_pk, gw_dn) {
            (Some(pk), Some(dn)) if !pk.is_empty() && !dn.is_empty() => Some((pk, dn)),
            (None, None) => None,
            (pk, _) => {
                let set = if pk.is_some() {
                    "uplink.mqtt.gateway_product_key"
                } else {
                    "uplink.mqtt.gateway_device_name"
                };
                self.fail(
                    set,
                    "the gateway needs both gateway_product_key and gateway_device_name",
                );
                None
            }
        };
        let device_secrets = self.path("uplink.mqtt.device_secrets");
        if device_secrets.is_some() && gateway.is_none() {
            self.fail(
                "uplink.mqtt.device_secrets",
                "sub-device logins need the gateway: set uplink.mqtt.gateway_product_key and \
                 gateway_device_name",
            );
        }
        Mqtt {
            gateway,
            device_secrets,
            url,
            client_id,
            username,
            password,
            ca_file,
            cert,
            key,
            keep_alive_s: self.int("uplink.mqtt.keep_alive_s", d.keep_alive_s.into(), 0, 65_535)
                as u16,
            qos: self.int("uplink.mqtt.qos", d.qos.into(), 0, 1) as u8,
            topic_prefix: self.string("uplink.mqtt.topic_prefix", &d.topic_prefix),
            inflight: self.int("uplink.mqtt.inflight", d.inflight.into(), 1, 65_535) as u16,
            replay_per_s: self.int("uplink.mqtt.replay_per_s", d.replay_per_s, 1, 10_000_000),
        }
    }

    /// `[uplink.nats]`, checked whatever the sink.
    fn nats(&mut self) -> Nats {
        let d = Nats::default();
        let mut urls = match (
            self.values.contains_key("uplink.nats.url"),
            self.values.contains_key("uplink.nats.urls"),
        ) {
            (true, true) => {
                self.fail(
                    "uplink.nats.urls",
                    "set uplink.nats.url or uplink.nats.urls, not both",
                );
                d.urls.clone()
            }
            (true, false) => vec![self.string("uplink.nats.url", "")],
            (false, true) => self.strings("uplink.nats.urls"),
            (false, false) => d.urls.clone(),
        };
        urls.retain(|u| !u.is_empty());
        let knob = if self.values.contains_key("uplink.nats.urls") {
            "uplink.nats.urls"
        } else {
            "uplink.nats.url"
        };
        if urls.is_empty() {
            self.fail(knob, "no NATS server");
        }
        for u in &urls {
            if let Err(e) = check_nats_url(u) {
                self.fail(knob, e);
            }
        }
        let token_word = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let node = self.string("uplink.nats.node", &d.node);
        if !token_word(&node) {
            self.fail(
                "uplink.nats.node",
                "letters, digits, - and _ only (it is a subject token)",
            );
        }
        let stream = self.string("uplink.nats.stream", &d.stream);
        if !token_word(&stream) {
            self.fail("uplink.nats.stream", "letters, digits, - and _ only");
        }
        let subject_prefix = self.string("uplink.nats.subject_prefix", &d.subject_prefix);
        if subject_prefix.is_empty()
            || subject_prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
        {
            self.fail(
                "uplink.nats.subject_prefix",
                "dot-separated tokens without spaces or wildcards",
            );
        }
        let owners_bucket = self.string("uplink.nats.owners_bucket", &d.owners_bucket);
        if !token_word(&owners_bucket) {
            self.fail("uplink.nats.owners_bucket", "letters, digits, - and _ only");
        }
        let token = self
            .values
            .contains_key("uplink.nats.token")
            .then(|| self.string("uplink.nats.token", ""));
        let creds_file = self.path("uplink.nats.creds_file");
        if token.is_some() && creds_file.is_some() {
            self.fail("uplink.nats.token", "set a token or a creds file, not both");
        }
        Nats {
            urls,
            node,
            stream,
            subject_prefix,
            owners_bucket,
            node_timeout_ms: self.int(
                "uplink.nats.node_timeout_ms",
                d.node_timeout_ms,
                1_000,
                600_000,
            ),
            duplicate_window_ms: self.int(
                "uplink.nats.duplicate_window_ms",
                d.duplicate_window_ms,
                1_000,
                86_400_000,
            ),
            replicas: self.int("uplink.nats.replicas", d.replicas.into(), 1, 5) as u8,
            inflight: self.int("uplink.nats.inflight", d.inflight.into(), 1, 65_535) as u16,
            token,
            creds_file,
            ca_file: self.path("uplink.nats.ca_file"),
        }
    }

    /// A list of strings: a TOML array, or comma-separated in the environment.
    fn strings(&mut self, knob: &str) -> Vec<String> {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return Vec::new();
        };
        match raw {
            Raw::List(items) => items,
            Raw::Text(s) | Raw::Str(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
            other => {
                self.errors.push(ConfigError::setting(
                    origin,
                    knob,
                    format!("expected an array of strings, found {}", other.kind()),
                ));
                Vec::new()
            }
        }
    }

    /// A path, relative to the folder of the file that named it (else the working directory).
    fn path(&mut self, knob: &str) -> Option<PathBuf> {
        let (raw, origin) = self.values.get(knob).cloned()?;
        match raw {
            Raw::Str(s) | Raw::Text(s) if !s.is_empty() => Some(resolve(&origin, &s)),
            other => {
                let found = match other {
                    Raw::Str(_) | Raw::Text(_) => "an empty string",
                    other => other.kind(),
                };
                self.errors.push(ConfigError::setting(
                    origin,
                    knob,
                    format!("expected a file path, found {found}"),
                ));
                None
            }
        }
    }

    /// A list of paths: a TOML array of strings, or comma-separated in the environment.
    fn paths(&mut self, knob: &str) -> Vec<PathBuf> {
        let Some((raw, origin)) = self.values.get(knob).cloned() else {
            return Vec::new();
        };
        let items: Vec<String> = match raw {
            Raw::List(items) => items,
            Raw::Text(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
            other => {
                self.errors.push(ConfigError::setting(
                    origin,
                    knob,
                    format!("expected an array of file paths, found {}", other.kind()),
                ));
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if item.is_empty() {
                self.errors.push(ConfigError::setting(
                    origin.clone(),
                    knob,
                    "an empty file path",
                ));
            } else {
                out.push(resolve(&origin, &item));
            }
        }
        out
    }
}

/// The config file being walked.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

impl File<'_> {
    fn at(&self, offset: usize) -> Origin {
        at(self.path, Some(line_of(self.text, offset)))
    }
}

fn at(path: &Path, line: Option<usize>) -> Origin {
    Origin::File {
        path: path.to_owned(),
        line,
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn resolve(origin: &Origin, path: &str) -> PathBuf {
    match origin.base() {
        Some(base) => base.join(path),
        None => PathBuf::from(path),
    }
}

/// Whether `name` is a table that holds knobs (`listener`, `listener.tls`, `registry`).
fn is_section(name: &str) -> bool {
    KNOBS
        .iter()
        .any(|k| k.len() > name.len() && k.starts_with(name) && k.as_bytes()[name.len()] == b'.')
}

/// The keys directly settable under `prefix`, for "unknown key" hints.
fn known_under(prefix: &str) -> String {
    let mut keys: Vec<&str> = KNOBS
        .iter()
        .filter_map(|k| {
            if prefix.is_empty() {
                Some(k.split('.').next().unwrap_or(k))
            } else {
                k.strip_prefix(prefix)?.strip_prefix('.')
            }
        })
        .collect();
    if prefix == "registry" {
        keys.push("device");
    }
    keys.dedup();
    keys.join(", ")
}

/// File errors by file and line, then environment, flags, defaults; the rest keep their order.
fn sort_key(e: &ConfigError) -> Option<&Origin> {
    match e {
        ConfigError::Setting { origin, .. } => Some(origin),
        _ => None,
    }
}

/// `FromStr` wrappers for the enums whose names are config words only.
struct Sink(SinkKind);

impl FromStr for Sink {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "local" => Ok(Self(SinkKind::Local)),
            "mqtt" => Ok(Self(SinkKind::Mqtt)),
            "nats" => Ok(Self(SinkKind::Nats)),
            _ => Err(()),
        }
    }
}

/// `nats://host[:port]` or `tls://host[:port]` (what async-nats takes).
fn check_nats_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .ok_or_else(|| format!("{url:?}: expected nats://HOST[:PORT] or tls://HOST[:PORT]"))?;
    let host = rest
        .rsplit_once(':')
        .map_or(rest, |(h, p)| if p.parse::<u16>().is_ok() { h } else { "" });
    if host.is_empty() || rest.contains(['/', '?', ' ']) {
        return Err(format!(
            "{url:?}: expected nats://HOST[:PORT] or tls://HOST[:PORT]"
        ));
    }
    Ok(())
}

struct OnFullArg(OnFull);

impl FromStr for OnFullArg {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "drop_oldest" => Ok(Self(OnFull::DropOldest)),
            "block" => Ok(Self(OnFull::Block)),
            _ => Err(()),
        }
    }
}

struct FsyncArg(Fsync);

impl FromStr for FsyncArg {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "never" => Ok(Self(Fsync::Never)),
            "batch" => Ok(Self(Fsync::Batch)),
            _ => Err(()),
        }
    }
}
