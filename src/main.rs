//! The `ringlink` command: `serve` (the default), `check`, and the `get`/`set`/`call` clients
//! of the northbound API. Thin: parsing, loading through `ringlink::config`, printing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ringlink::config::{self, Checked, Config, IoMode, Overrides, SinkKind};
use ringlink::logging::{self, LogFormat};
use ringlink::mqtt;
use ringlink::shard::{ReloadSource, Reloaded, ServerOptions, SinkOptions};
use ringlink::sink::mqtt::MqttOptions;
use ringlink::sink::nats::NatsOptions;
use ringlink::uplink::{self, LogOptions};
use serde_json::{Map, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ringlink",
    version,
    about = "WebSocket device gateway for Link IoT Edge",
    long_about = "WebSocket device gateway for Link IoT Edge.\n\n\
        Devices and sub-gateways connect over ws:// or wss:// and speak the Link IoT Edge \
        WebSocket device-access protocol. With no subcommand, ringlink serves (same as \
        `ringlink serve`); with no --config, it serves the built-in demo registry on \
        0.0.0.0:17682 with its HTTP API on 127.0.0.1:17690.\n\n\
        Settings come from defaults, then the --config TOML file (see ringlink.example.toml), \
        then RINGLINK_<SECTION>_<KEY> environment variables (e.g. RINGLINK_LISTENER_PORT=18000), \
        then flags.\n\n\
        SIGHUP (or POST /v1/registry/reload) re-reads the thing models, device lists and TLS \
        certificate with the checks of `ringlink check` and swaps them in while connections \
        stay up; with any error nothing changes.",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        ringlink                                   serve the demo registry\n  \
        ringlink check --config ringlink.toml      validate a configuration, print a summary\n  \
        ringlink serve --config ringlink.toml --listen 0.0.0.0:18000\n  \
        ringlink get a1ThermoPK0 thermo-00001 temperature\n  \
        ringlink set a1ThermoPK0 thermo-00001 setpoint=21.5\n  \
        ringlink set --token-file api.token a1ThermoPK0 thermo-00001 setpoint=21.5\n  \
        ringlink call a1ThermoPK0 thermo-00001 reboot delay=5"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate a configuration, its thing models, device lists and TLS files.
    ///
    /// Prints a summary and exits 0, or prints every error with its file and line (or JSON
    /// path) and exits 1. Environment variables are applied as `serve` would apply them.
    Check {
        /// The TOML configuration file; without it, the defaults (demo registry) are checked.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read properties of a device through the API (no PROP: all properties).
    ///
    /// Sends `{"properties":[...]}`; with no PROP the list is empty, which asks the server for
    /// every readable property of the device's thing model.
    Get {
        #[command(flatten)]
        device: DeviceArgs,
        /// Property identifiers to read.
        #[arg(value_name = "PROP")]
        properties: Vec<String>,
    },
    /// Write properties of a device through the API.
    ///
    /// Each VALUE is taken as JSON when it is valid JSON (21.5, true, [1,2], {"lo":1}, "text"),
    /// else as a string: `mode=eco` sends "eco".
    Set {
        #[command(flatten)]
        device: DeviceArgs,
        /// Properties to write.
        #[arg(value_name = "KEY=VALUE", required = true)]
        values: Vec<String>,
    },
    /// Call a service of a device through the API.
    ///
    /// Input parameters are KEY=VALUE pairs, VALUE parsed as for `set`.
    Call {
        #[command(flatten)]
        device: DeviceArgs,
        /// The service identifier.
        service: String,
        /// Input parameters.
        #[arg(value_name = "KEY=VALUE")]
        input: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML configuration file (see ringlink.example.toml); relative paths inside it are
    /// relative to its folder. Without it: the defaults and the built-in demo registry.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Device listener address, e.g. 0.0.0.0:17682 (port 0: any free port).
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// TLS certificate chain, PEM or DER whatever the extension (turns on wss://).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PKCS#8, PKCS#1 or SEC1), PEM or DER whatever the extension.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Shard threads; 0 = one per core.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// IO driver: auto (io_uring, else epoll), uring or epoll.
    #[arg(long, value_name = "auto|uring|epoll")]
    io: Option<IoMode>,
    /// Northbound HTTP API address (default 127.0.0.1:17690).
    #[arg(long, value_name = "IP:PORT")]
    api: Option<SocketAddr>,
    /// Folder for the local uplink log (default ./ringlink-data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Echo every WebSocket message instead of speaking Link: a conformance endpoint for the
    /// Autobahn test suite on the real drivers. Not for production.
    #[arg(long, hide = true)]
    echo: bool,
    /// Which log events to show on stderr, as a filter like RUST_LOG's: a level (error, warn,
    /// info, debug, trace) or per-module directives, e.g. `warn,ringlink::shard=debug`.
    /// Default: RUST_LOG, else info. `debug` adds a line per connection and device change.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log lines on stderr as `text` (for people) or `json` (one object per line, for a log
    /// collector). Default: RINGLINK_LOG_FORMAT, else text. The start line stays as it is,
    /// on stdout, in both.
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            threads: self.threads,
            io: self.io,
            api: self.api,
            data_dir: self.data_dir.clone(),
        }
    }
}

#[derive(Debug, Args)]
struct DeviceArgs {
    /// The northbound API of a running ringlink.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:17690")]
    api: String,
    /// File holding the API's Bearer token (the server's api.token_file; whitespace around it
    /// is ignored). Default: the file named by RINGLINK_API_TOKEN_FILE, if set; else no token,
    /// which a server without api.token_file accepts.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The device's productKey.
    #[arg(value_name = "PK")]
    product_key: String,
    /// The device's deviceName.
    #[arg(value_name = "DN")]
    device_name: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_serve(&cli.serve),
        Some(Command::Serve(args)) => run_serve(&args),
        Some(Command::Check { config }) => return run_check(config),
        Some(Command::Get { device, properties }) => {
            let body = serde_json::json!({ "properties": properties });
            api_call(&device, "properties/get", &body)
        }
        Some(Command::Set { device, values }) => pairs(&values)
            .and_then(|p| api_call(&device, "properties/set", &json_obj("properties", p))),
        Some(Command::Call {
            device,
            service,
            input,
        }) => pairs(&input).and_then(|p| {
            let path = format!("services/{}", segment(&service));
            api_call(&device, &path, &json_obj("inputData", p))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // With JSON logs, `serve` fails through its log (every stderr line is JSON);
            // otherwise the error is printed as the subcommands print theirs.
            if logging::installed() == Some(LogFormat::Json) {
                tracing::error!(error = %format_args!("{e:#}"), "stopped");
            } else {
                eprintln!("ringlink: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let log = logging::LogOptions {
        filter: args.log.clone(),
        format: args.log_format,
    };
    let format = logging::init(&log).map_err(anyhow::Error::msg)?;
    let checked = Config::check(args.config.as_deref(), std::env::vars(), &args.overrides())
        .context("configuration")?;
    // A reload reads the configuration again as at start, with the same code `ringlink check`
    // runs, and keeps only its registry and TLS setup.
    let (file, overrides) = (args.config.clone(), args.overrides());
    let reload = ReloadSource::new(move || {
        Config::check(file.as_deref(), std::env::vars(), &overrides)
            .map(|c| Reloaded {
                registry: c.registry,
                tls: c.tls,
            })
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect())
    });
    serve(checked, args.echo, format, reload)
}

/// Runs the gateway until SIGINT/SIGTERM, then drains (see `ringlink::shard::serve`).
fn serve(
    checked: Checked,
    echo: bool,
    log_format: LogFormat,
    reload: ReloadSource,
) -> anyhow::Result<()> {
    let Checked {
        config,
        registry,
        tls,
        mqtt_tls,
        mqtt_gateway,
    } = checked;
    let devices = registry.len();
    let tls_on = tls.is_some();
    let threads = config.runtime.threads;
    let uplink = &config.uplink;
    let mut log = LogOptions::new(ringlink::shard::log_dir(&config.data_dir));
    log.segment_bytes = uplink.segment_bytes;
    log.max_bytes = uplink.max_bytes;
    log.max_age = Duration::from_secs(uplink.max_age_s);
    log.fsync = match uplink.fsync {
        config::Fsync::Never => uplink::Fsync::Never,
        config::Fsync::Batch => uplink::Fsync::Batch,
    };
    let opts = ServerOptions {
        registry: Arc::new(registry),
        session: config.session_config(),
        listen: config.listener.addr(),
        backlog: config.listener.backlog,
        threads,
        io: config.runtime.io,
        max_connections: config.limits.max_connections as usize,
        api_connections: config.api.max_connections as usize,
        admission: config.limits.admission(),
        log,
        batch_max: uplink.batch_max as usize,
        flush_delay: Duration::from_micros(uplink.flush_us),
        echo,
        tls,
        sink: sink_options(&config, mqtt_tls, mqtt_gateway)?,
        reload: Some(reload),
    };
    let api = ringlink::api::ApiOptions {
        listen: config.api.listen,
        token: config.api.token.as_ref().map(|t| Arc::clone(&t.0)),
        max_connections: config.api.max_connections as usize,
        request_timeout: Duration::from_millis(config.api.request_timeout_ms),
    };
    let auth = if api.token.is_some() {
        "token"
    } else {
        "no token"
    };
    ringlink::shard::serve(opts, api, |server, api| {
        let scheme = if tls_on { "wss" } else { "ws" };
        let mode = if echo {
            ", ECHO MODE (conformance testing only)"
        } else {
            ""
        };
        // The start line contract (PRODUCT.md): tests/support, loadgen's tests and the
        // scripts (tests/run.sh, tests/autobahn/run.sh, benches/*.sh) read this exact text from
        // stdout, so it is printed, not logged, whatever the log format.
        // The open-files limit may have lowered the device cap: say so where it is seen.
        let capped = match &server.fd_note {
            Some(note) => format!("; WARNING: {note}"),
            None => String::new(),
        };
        println!(
            "ringlink: listening on {scheme}://{} (tls {}), io {} ({}), {threads} threads, {devices} devices, max {} connections, api http://{} ({auth}){mode}{capped}",
            server.listen_addr,
            if tls_on { "on" } else { "off" },
            server.driver,
            server.driver_reason,
            server.max_connections,
            api.addr,
        );
        // A log collector reading the JSON lines gets the same facts as an event.
        if log_format == LogFormat::Json {
            tracing::info!(
                listen = %format_args!("{scheme}://{}", server.listen_addr),
                tls = tls_on,
                io = %server.driver,
                io_reason = %server.driver_reason,
                threads,
                devices,
                api = %format_args!("http://{}", api.addr),
                echo,
                "started"
            );
        }
    })?;
    tracing::info!("drained, uplinks flushed, bye");
    Ok(())
}

/// The external sink of `[uplink]`, if any, ready to start.
fn sink_options(
    config: &Config,
    mqtt_tls: Option<Arc<rustls::ClientConfig>>,
    gateway: Option<ringlink::alink::Gateway>,
) -> anyhow::Result<SinkOptions> {
    let u = &config.uplink;
    let on_full = match u.on_full {
        config::OnFull::DropOldest => uplink::OnFull::DropOldest,
        config::OnFull::Block => uplink::OnFull::Block,
    };
    match u.sink {
        SinkKind::Local => Ok(SinkOptions::Local),
        SinkKind::Nats => {
            let n = &u.nats;
            let opts = NatsOptions {
                urls: n.urls.clone(),
                node: n.node.clone(),
                stream: n.stream.clone(),
                prefix: n.subject_prefix.clone(),
                owners_bucket: n.owners_bucket.clone(),
                node_timeout: Duration::from_millis(n.node_timeout_ms),
                duplicate_window: Duration::from_millis(n.duplicate_window_ms),
                replicas: n.replicas.into(),
                inflight: n.inflight.into(),
                token: n.token.clone(),
                creds_file: n.creds_file.clone(),
                ca_file: n.ca_file.clone(),
                sync_cursors: u.fsync == config::Fsync::Batch,
            };
            Ok(SinkOptions::Nats {
                nats: Box::new(opts),
                on_full,
            })
        }
        SinkKind::Mqtt => {
            let m = &u.mqtt;
            let mut client = mqtt::Options::new(m.client_id.clone());
            client.username = m.username.clone();
            client.password = m.password.clone().map(String::into_bytes);
            client.keep_alive = Duration::from_secs(m.keep_alive_s.into());
            client.inflight = m.inflight;
            let opts = MqttOptions {
                url: m.url.parse().context("uplink.mqtt.url")?,
                tls: mqtt_tls,
                client,
                qos: if m.qos == 0 {
                    mqtt::QoS::AtMostOnce
                } else {
                    mqtt::QoS::AtLeastOnce
                },
                topic_prefix: m.topic_prefix.clone(),
                replay_per_s: m.replay_per_s,
                sync_cursors: u.fsync == config::Fsync::Batch,
                gateway,
            };
            Ok(SinkOptions::Mqtt {
                mqtt: Box::new(opts),
                on_full,
            })
        }
    }
}

fn run_check(file: Option<PathBuf>) -> ExitCode {
    let shown = file
        .as_ref()
        .map_or_else(|| "defaults".to_owned(), |f| f.display().to_string());
    match Config::check(file.as_deref(), std::env::vars(), &Overrides::default()) {
        Ok(checked) => {
            print!("{}", summary(&shown, &checked));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            let n = errors.0.len();
            eprintln!("{shown}: {n} error{}", if n == 1 { "" } else { "s" });
            ExitCode::FAILURE
        }
    }
}

fn summary(shown: &str, checked: &Checked) -> String {
    use std::fmt::Write as _;
    let Checked {
        config: c,
        registry: r,
        ..
    } = checked;
    let mut out = format!("{shown}: OK\n");
    let tls = match &c.listener.tls {
        Some(t) => format!(
            "TLS on (cert {}, key {})",
            t.cert.display(),
            t.key.display()
        ),
        None => "TLS off".to_owned(),
    };
    let w = &mut out;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "listen      {} ({tls})", c.listener.addr());
    let _ = writeln!(
        w,
        "runtime     io {}, {} threads",
        c.runtime.io, c.runtime.threads
    );
    let auth = match &c.api.token_file {
        Some(f) => format!("token from {}", f.display()),
        None => "no token (loopback only)".to_owned(),
    };
    let _ = writeln!(
        w,
        "api         {} ({auth}), max_connections {}, request_timeout_ms {}",
        c.api.listen, c.api.max_connections, c.api.request_timeout_ms
    );
    let _ = writeln!(w, "data_dir    {}", c.data_dir.display());
    let u = &c.uplink;
    let _ = writeln!(
        w,
        "uplink      sink {}, batch_max {}, flush_us {}, fsync {}, on_full {}",
        u.sink.as_str(),
        u.batch_max,
        u.flush_us,
        u.fsync.as_str(),
        u.on_full.as_str()
    );
    if u.sink == SinkKind::Nats {
        let n = &u.nats;
        let _ = writeln!(
            w,
            "nats        {} as node {:?}, stream {}, subjects {}.*, owners {}, node_timeout_ms {}, duplicate_window_ms {}, replicas {}",
            n.urls.join(","), n.node, n.stream, n.subject_prefix, n.owners_bucket, n.node_timeout_ms,
            n.duplicate_window_ms, n.replicas
        );
    }
    if u.sink == SinkKind::Mqtt {
        let m = &u.mqtt;
        let _ = writeln!(
            w,
            "mqtt        {} as {:?}, qos {}, inflight {}, replay_per_s {}, keep_alive_s {}, topic_prefix {:?}",
            m.url, m.client_id, m.qos, m.inflight, m.replay_per_s, m.keep_alive_s, m.topic_prefix
        );
        let logins = match &checked.mqtt_gateway {
            Some(g) => format!(
                "{} devices log in through gateway {}/{}, the others",
                g.secrets.len(),
                g.product_key,
                g.device_name
            ),
            None => "all devices".to_owned(),
        };
        let _ = writeln!(w, "            online/offline: {logins} on /as/mqtt/status");
    }
    let l = &c.limits;
    let _ = writeln!(
        w,
        "limits      max_connections {}, max_frame_bytes {}, auto_online_on_report {}",
        l.max_connections, l.max_frame_bytes, l.auto_online_on_report
    );
    let off = |n: u32, on: String| if n == 0 { "off".to_owned() } else { on };
    let _ = writeln!(
        w,
        "            messages per connection {} (over it: not read until the bucket refills; \
         stops one peer taking its shard's CPU)",
        off(
            l.max_messages_per_s,
            format!("{}/s, burst {}", l.max_messages_per_s, l.message_burst)
        )
    );
    let _ = writeln!(
        w,
        "            new connections {} (over it: accepting pauses, connections wait in the \
         backlog; stops connection floods and reconnect storms starving devices)",
        off(
            l.max_new_connections_per_s,
            format!("{}/s over the process", l.max_new_connections_per_s)
        )
    );
    let _ = writeln!(
        w,
        "            connections per source IP {} (over it: closed at accept; stops one host \
         taking the connection table)",
        off(
            l.max_connections_per_ip,
            l.max_connections_per_ip.to_string()
        )
    );
    let _ = writeln!(
        w,
        "            flapping {} (stops connect-drop loops and takeover ping-pong flooding \
         the edge core)",
        off(
            l.flapping_max,
            format!(
                "more than {} onlines in {} ms: onlineDevice refused with 109000 for {} ms",
                l.flapping_max, l.flapping_window_ms, l.flapping_ban_ms
            )
        )
    );
    let source = if c.registry.is_some() {
        "from [registry]"
    } else {
        "built-in demo"
    };
    let with_ip = r
        .ids()
        .filter(|&id| r.device(id).client_ip.is_some())
        .count();
    let _ = writeln!(
        w,
        "registry    {source}: {} products, {} devices ({with_ip} with clientIp)",
        r.products().len(),
        r.len()
    );
    let mut per_product = vec![0usize; r.products().len()];
    for id in r.ids() {
        let pk = r.product_key(id);
        if let Some(i) = r.products().iter().position(|m| m.product_key() == pk) {
            per_product[i] += 1;
        }
    }
    for (m, devices) in r.products().iter().zip(per_product) {
        let _ = writeln!(
            w,
            "  {:<16} {} properties, {} events, {} services, {devices} devices",
            m.product_key(),
            m.properties().len(),
            m.events().len(),
            m.services().len()
        );
    }
    out
}

/// `k=v` pairs as a JSON object; `v` is JSON when it parses as JSON, else a string.
fn pairs(args: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for arg in args {
        let Some((k, v)) = arg.split_once('=') else {
            anyhow::bail!("{arg:?}: expected KEY=VALUE");
        };
        if k.is_empty() {
            anyhow::bail!("{arg:?}: the key is empty");
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        map.insert(k.to_owned(), value);
    }
    Ok(map)
}

fn json_obj(key: &str, map: Map<String, Value>) -> Value {
    let mut outer = Map::new();
    outer.insert(key.to_owned(), Value::Object(map));
    Value::Object(outer)
}

/// POSTs `body` to `/v1/devices/{pk}/{dn}/{path}` and prints the JSON answer; a non-2xx answer
/// is an error showing the body's code and message.
fn api_call(device: &DeviceArgs, path: &str, body: &Value) -> anyhow::Result<()> {
    let url = format!(
        "http://{}/v1/devices/{}/{}/{path}",
        device.api,
        segment(&device.product_key),
        segment(&device.device_name)
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(API_TIMEOUT))
        .build()
        .into();
    let mut request = agent.post(&url).header("content-type", "application/json");
    if let Some(token) = api_token(device)? {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = request
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of POST {url}"))?;
    let json = serde_json::from_str::<Value>(&text).ok();
    if status.is_success() {
        match json {
            Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            None => println!("{text}"),
        }
        return Ok(());
    }
    match json {
        Some(v) if v.get("code").is_some() => {
            let code = &v["code"];
            let message = v.get("message").and_then(Value::as_str).unwrap_or("");
            anyhow::bail!("HTTP {status}: code {code}: {message}")
        }
        _ => anyhow::bail!("HTTP {status}: {}", text.trim()),
    }
}

/// The token of `--token-file`, else of the file in `RINGLINK_API_TOKEN_FILE` (the variable
/// the server reads too), trimmed; `None` when neither is given.
fn api_token(device: &DeviceArgs) -> anyhow::Result<Option<String>> {
    let path = match &device.token_file {
        Some(p) => p.clone(),
        None => match std::env::var_os("RINGLINK_API_TOKEN_FILE") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the API token file {} is empty", path.display());
    }
    Ok(Some(token.to_owned()))
}

/// Percent-encodes a URL path segment (productKeys and deviceNames may hold `@`, `.`, `-`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Longer than the server's downlink timeout (8 s default), so its 504 arrives first.
const API_TIMEOUT: Duration = Duration::from_secs(30);
