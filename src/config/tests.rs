use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A fresh folder under the system temp dir; files written by [`Dir::file`].
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ringlink-config-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load(
    text: &str,
    vars: &[(&str, &str)],
    flags: &Overrides,
) -> (Dir, Result<Config, Vec<String>>) {
    let dir = Dir::new();
    let file = dir.file("ringlink.toml", text);
    let r = Config::load(Some(&file), env(vars), flags)
        .map_err(|e| e.0.iter().map(|e| relative(&dir, e)).collect());
    (dir, r)
}

/// An error's text with the temp folder left out.
fn relative(dir: &Dir, e: &ConfigError) -> String {
    e.to_string().replace(&format!("{}/", dir.0.display()), "")
}

fn errors(text: &str) -> Vec<String> {
    load(text, &[], &Overrides::default())
        .1
        .expect_err("the config has errors")
}

const THERMO: &[u8] = include_bytes!("../registry/demo/thermostat.json");
const LIGHT: &[u8] = include_bytes!("../registry/demo/light.json");

#[test]
fn defaults_without_file_env_or_flags() {
    let c = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults are valid");
    assert_eq!(c.listener.addr(), "0.0.0.0:17682".parse().expect("addr"));
    assert_eq!(c.listener.tls, None);
    assert_eq!(c.listener.backlog, 1024);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(c.runtime.threads, cores);
    assert_eq!(c.runtime.io, IoMode::Auto);
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.api.listen, "127.0.0.1:17690".parse().expect("addr"));
    assert_eq!(c.data_dir, PathBuf::from("./ringlink-data"));
    assert_eq!(c.uplink, Uplink::default());
    assert_eq!(c.uplink.segment_bytes, 64 * 1024 * 1024);
    assert_eq!(c.uplink.max_bytes, 1024 * 1024 * 1024);
    assert_eq!(c.uplink.max_age_s, 604_800);
    assert_eq!(c.registry, None);
    let s = c.session_config();
    let d = session::Config::default();
    assert_eq!(s.limits, d.limits);
    assert_eq!(
        (s.handshake_timeout, s.ping_interval, s.pong_timeout),
        (d.handshake_timeout, d.ping_interval, d.pong_timeout)
    );
    assert_eq!(s.downlink_timeout, d.downlink_timeout);
    assert_eq!(s.message_timeout, d.message_timeout);
    assert_eq!(s.auto_online_on_report, d.auto_online_on_report);
    assert_eq!(c.build_registry().expect("demo").len(), 31_000);
}

#[test]
fn file_sets_every_section_and_paths_are_relative_to_it() {
    let text = r#"
data_dir = "state"
[listener]
ip = "127.0.0.1"
port = 0
tls = { cert = "certs/server.cer", key = "certs/server.pvk" }
backlog = 4096
[runtime]
threads = 3
io = "epoll"
[limits]
max_connections = 50_000
max_frame_bytes = 0x1000
handshake_timeout_ms = 2000
ping_interval_ms = 10000
pong_timeout_ms = 25000
downlink_timeout_ms = 3000
message_timeout_ms = 1500
auto_online_on_report = true
max_messages_per_s = 200
message_burst = 20
max_new_connections_per_s = 0
max_connections_per_ip = 8
flapping_max = 3
flapping_window_ms = 1000
flapping_ban_ms = 2000
[api]
listen = "127.0.0.1:0"
[uplink]
sink = "local"
batch_max = 64
flush_us = 0
fsync = "batch"
segment_bytes = 1048576
max_bytes = 2097152
max_age_s = 3600
on_full = "block"
[uplink.mqtt]
url = "mqtts://broker.local:8884"
client_id = "gw-7"
username = "gw"
password = "s3cret"
ca_file = "certs/ca.pem"
cert = "certs/client.pem"
key = "certs/client.key"
keep_alive_s = 0
qos = 0
topic_prefix = "site-3"
inflight = 1000
replay_per_s = 200
gateway_product_key = "gwPK"
gateway_device_name = "gw-1"
device_secrets = "secrets.csv"
[uplink.nats]
urls = ["nats://10.0.0.1:4222", "tls://10.0.0.2"]
node = "edge-7"
stream = "UP"
subject_prefix = "site3.rl"
owners_bucket = "owners"
node_timeout_ms = 3000
duplicate_window_ms = 30000
replicas = 3
inflight = 64
token = "t0k"
ca_file = "certs/nats-ca.pem"
"#;
    let (dir, c) = load(text, &[], &Overrides::default());
    let c = c.expect("valid");
    assert_eq!(c.listener.addr(), "127.0.0.1:0".parse().expect("addr"));
    assert_eq!(
        c.listener.tls,
        Some(TlsFiles {
            cert: dir.0.join("certs/server.cer"),
            key: dir.0.join("certs/server.pvk"),
        })
    );
    assert_eq!(c.listener.backlog, 4096);
    assert_eq!(
        c.runtime,
        Runtime {
            threads: 3,
            io: IoMode::Epoll
        }
    );
    assert_eq!(
        c.limits,
        Limits {
            max_connections: 50_000,
            max_frame_bytes: 4096,
            handshake_timeout_ms: 2000,
            ping_interval_ms: 10_000,
            pong_timeout_ms: 25_000,
            downlink_timeout_ms: 3000,
            message_timeout_ms: 1500,
            auto_online_on_report: true,
            max_messages_per_s: 200,
            message_burst: 20,
            max_new_connections_per_s: 0,
            max_connections_per_ip: 8,
            flapping_max: 3,
            flapping_window_ms: 1000,
            flapping_ban_ms: 2000,
        }
    );
    assert_eq!(c.session_config().limits.max_message_bytes, 4096);
    assert_eq!(c.session_config().message_rate, Rate::per_second(200, 20));
    let admission = c.limits.admission();
    assert_eq!(admission.accept, None, "0 = off");
    assert_eq!(admission.max_connections_per_ip, 8);
    assert_eq!(
        admission.flapping,
        Some(FlapRule {
            max: 3,
            window: Duration::from_secs(1),
            ban: Duration::from_secs(2),
        })
    );
    assert_eq!(c.session_config().pong_timeout, Duration::from_secs(25));
    assert_eq!(c.data_dir, dir.0.join("state"));
    assert_eq!(
        c.uplink,
        Uplink {
            sink: SinkKind::Local,
            batch_max: 64,
            flush_us: 0,
            fsync: Fsync::Batch,
            segment_bytes: 1 << 20,
            max_bytes: 2 << 20,
            max_age_s: 3600,
            on_full: OnFull::Block,
            mqtt: Mqtt {
                url: "mqtts://broker.local:8884".into(),
                client_id: "gw-7".into(),
                username: Some("gw".into()),
                password: Some("s3cret".into()),
                ca_file: Some(dir.0.join("certs/ca.pem")),
                cert: Some(dir.0.join("certs/client.pem")),
                key: Some(dir.0.join("certs/client.key")),
                keep_alive_s: 0,
                qos: 0,
                topic_prefix: "site-3".into(),
                inflight: 1000,
                replay_per_s: 200,
                gateway: Some(("gwPK".into(), "gw-1".into())),
                device_secrets: Some(dir.0.join("secrets.csv")),
            },
            nats: Nats {
                urls: vec!["nats://10.0.0.1:4222".into(), "tls://10.0.0.2".into()],
                node: "edge-7".into(),
                stream: "UP".into(),
                subject_prefix: "site3.rl".into(),
                owners_bucket: "owners".into(),
                node_timeout_ms: 3000,
                duplicate_window_ms: 30_000,
                replicas: 3,
                inflight: 64,
                token: Some("t0k".into()),
                creds_file: None,
                ca_file: Some(dir.0.join("certs/nats-ca.pem")),
            },
        }
    );
    assert_eq!(c.file, Some(dir.0.join("ringlink.toml")));
}

#[test]
fn errors_name_file_line_and_key_and_all_are_reported() {
    let text = "[listener]\nport = 70000\nprot = 1\n\n[limits]\nmax_connections = 10\nmax_frame_bytes = 0\nauto_online_on_report = \"yes\"\n[runtime]\nio = \"kqueue\"\n[uplink]\nsink = \"kafka\"\n[nope]\n";
    assert_eq!(
        errors(text),
        [
            "ringlink.toml:2: listener.port: must be between 0 and 65535, got 70000",
            "ringlink.toml:3: listener.prot: unknown key (known here: ip, port, tls.cert, tls.key, backlog)",
            "ringlink.toml:7: limits.max_frame_bytes: must be between 125 and 16777216, got 0",
            "ringlink.toml:8: limits.auto_online_on_report: expected true or false, got a string",
            "ringlink.toml:10: runtime.io: expected auto, uring or epoll, got \"kqueue\"",
            "ringlink.toml:12: uplink.sink: expected local, mqtt or nats, got \"kafka\"",
            "ringlink.toml:13: nope: unknown key (known here: listener, runtime, limits, api, data_dir, uplink, registry)",
        ]
    );
}

#[test]
fn limit_settings_are_range_checked_with_file_line_and_env() {
    let text = "[limits]\nmax_messages_per_s = -1\nmessage_burst = 0\nmax_connections_per_ip = 1.5\nflapping_window_ms = 10\nflapping_ban_ms = 0\n";
    assert_eq!(
        errors(text),
        [
            "ringlink.toml:2: limits.max_messages_per_s: must be between 0 and 10000000, got -1",
            "ringlink.toml:3: limits.message_burst: must be between 1 and 10000000, got 0",
            "ringlink.toml:4: limits.max_connections_per_ip: expected an integer, found a float",
            "ringlink.toml:5: limits.flapping_window_ms: must be between 100 and 86400000, got 10",
            "ringlink.toml:6: limits.flapping_ban_ms: must be between 100 and 86400000, got 0",
        ]
    );
    let vars = [
        ("RINGLINK_LIMITS_MAX_NEW_CONNECTIONS_PER_S", "many"),
        ("RINGLINK_LIMITS_FLAPPING_MAX", "0"),
    ];
    let (_dir, r) = load("", &vars, &Overrides::default());
    assert_eq!(
        r.expect_err("bad env"),
        ["env RINGLINK_LIMITS_MAX_NEW_CONNECTIONS_PER_S: limits.max_new_connections_per_s: expected an integer, got \"many\""]
    );
    let vars = [("RINGLINK_LIMITS_FLAPPING_MAX", "0")];
    let (_dir, c) = load("", &vars, &Overrides::default());
    assert_eq!(
        c.expect("valid").limits.admission().flapping,
        None,
        "0 = off"
    );
}

#[test]
fn toml_syntax_errors_have_lines_and_do_not_hide_other_errors() {
    let e = errors("[listener]\nport = 1\nip = \n[limits]\nmax_frame_bytes = 1\n");
    assert!(e[0].starts_with("ringlink.toml:3: "), "{e:#?}");
    assert!(e
        .iter()
        .any(|e| e.starts_with("ringlink.toml:5: limits.max_frame_bytes:")));
}

#[test]
fn wrong_types_say_what_was_found() {
    let e = errors("[listener]\nport = \"17682\"\nip = 5\n[limits]\nping_interval_ms = 1.5\n[registry]\nproducts = \"a.json\"\n");
    assert_eq!(
        e,
        [
            "ringlink.toml:2: listener.port: expected an integer, found a string",
            "ringlink.toml:3: listener.ip: expected an IP address, got an integer",
            "ringlink.toml:5: limits.ping_interval_ms: expected an integer, found a float",
            "ringlink.toml:7: registry.products: expected an array of file paths, found a string",
        ]
    );
    let e = errors("[registry]\nproducts = []\n");
    assert_eq!(
        e,
        [
            "ringlink.toml:2: registry.products: no thing models: list at least one TSL file, \
          or remove [registry] to serve the built-in demo registry"
        ]
    );
}

#[test]
fn cross_field_rules() {
    let e = errors("[limits]\nping_interval_ms = 60000\n[api]\nlisten = \"127.0.0.1:17682\"\n");
    assert_eq!(
        e,
        [
            "ringlink.toml:4: api.listen: 127.0.0.1:17682 overlaps the device listener 0.0.0.0:17682 (port from default); give the API its own port",
            "default: limits.pong_timeout_ms: must be greater than limits.ping_interval_ms (60000 from ringlink.toml:2), got 60000: a connection would be closed before its next ping",
        ]
    );
    let e = errors("[uplink]\nsegment_bytes = 4194304\nmax_bytes = 2097152\n[listener]\ntls = { cert = \"c.pem\" }\n");
    assert_eq!(
        e,
        [
            "ringlink.toml:3: uplink.max_bytes: must be at least uplink.segment_bytes (4194304), got 2097152",
            "ringlink.toml:5: listener.tls.cert: a certificate needs its key: set listener.tls.key too (flag --tls-key)",
        ]
    );
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let text = "[listener]\nport = 18000\n[limits]\nmax_frame_bytes = 1000\n";
    let vars = [
        ("RINGLINK_LISTENER_PORT", "18001"),
        ("RINGLINK_LIMITS_MAX_FRAME_BYTES", "2000"),
        ("RINGLINK_UPLINK_FSYNC", "batch"),
        ("RINGLINK_LIMITS_AUTO_ONLINE_ON_REPORT", "on"),
        ("RINGLINK_RUNTIME_IO", "uring"),
        ("RINGLINK_DATA_DIR", "/var/lib/ringlink"),
        ("RINGLINK_LOG", "debug"),
        ("PATH", "/usr/bin"),
    ];
    let (_dir, c) = load(text, &vars, &Overrides::default());
    let c = c.expect("valid");
    assert_eq!(c.listener.port, 18001);
    assert_eq!(c.limits.max_frame_bytes, 2000);
    assert_eq!(c.uplink.fsync, Fsync::Batch);
    assert!(c.limits.auto_online_on_report);
    assert_eq!(c.runtime.io, IoMode::Uring);
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/ringlink"));

    let flags = Overrides {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        io: Some(IoMode::Epoll),
        threads: Some(2),
        api: Some("127.0.0.1:0".parse().expect("addr")),
        data_dir: Some("here".into()),
        tls_cert: Some("c.pem".into()),
        tls_key: Some("k.pem".into()),
    };
    let (_dir, c) = load(text, &vars, &flags);
    let c = c.expect("valid");
    assert_eq!(c.listener.addr(), "127.0.0.1:0".parse().expect("addr"));
    assert_eq!(
        c.runtime,
        Runtime {
            threads: 2,
            io: IoMode::Epoll
        }
    );
    assert_eq!(c.api.listen.port(), 0);
    assert_eq!(c.data_dir, PathBuf::from("here"));
    assert_eq!(
        c.listener.tls,
        Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into()
        })
    );
}

#[test]
fn bad_env_values_name_the_variable() {
    let vars = [
        ("RINGLINK_LISTENER_PORT", "http"),
        ("RINGLINK_LIMITS_MAX_FRAME_BYTES", "0"),
        ("RINGLINK_UPLINK_FSYNC", "always"),
        ("RINGLINK_LIMITS_MAX_FRAMES", "1"),
    ];
    let (_dir, r) = load("", &vars, &Overrides::default());
    assert_eq!(
        r.expect_err("bad env"),
        [
            "env RINGLINK_LIMITS_MAX_FRAMES: unknown setting; variables are RINGLINK_<SECTION>_<KEY>, e.g. RINGLINK_LISTENER_PORT (see ringlink.example.toml)",
            "env RINGLINK_LIMITS_MAX_FRAME_BYTES: limits.max_frame_bytes: must be between 125 and 16777216, got 0",
            "env RINGLINK_LISTENER_PORT: listener.port: expected an integer, got \"http\"",
            "env RINGLINK_UPLINK_FSYNC: uplink.fsync: expected never or batch, got \"always\"",
        ]
    );
}

#[test]
fn every_knob_has_an_env_variable() {
    assert_eq!(
        source::env_name("listener.tls.cert"),
        "RINGLINK_LISTENER_TLS_CERT"
    );
    assert_eq!(source::env_name("data_dir"), "RINGLINK_DATA_DIR");
    // Each knob is accepted from the environment (here with a value of the wrong kind for most,
    // which must then fail with that variable named, never as an unknown setting).
    for knob in KNOBS {
        let var = source::env_name(knob);
        let r = Config::load(None, env(&[(&var, "!")]), &Overrides::default());
        if let Err(e) = r {
            let shown = e.to_string();
            assert!(shown.contains(&format!("env {var}: ")), "{shown}");
            assert!(!shown.contains("unknown setting"), "{knob}: {shown}");
        }
    }
}

#[test]
fn registry_from_files_inline_and_env() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.0.join("models")).expect("mkdir");
    dir.file(
        "models/thermostat.json",
        std::str::from_utf8(THERMO).expect("utf8"),
    );
    dir.file(
        "models/light.json",
        std::str::from_utf8(LIGHT).expect("utf8"),
    );
    dir.file(
        "devices.csv",
        "productKey,deviceName,clientIp\na1ThermoPK0,t1,10.0.0.1\na1LightPK00,l1\n",
    );
    let text = r#"
[registry]
products = ["models/thermostat.json", "models/light.json"]
devices = "devices.csv"

[[registry.device]]
product_key = "a1ThermoPK0"
device_name = "thermo-01"
client_ip = "192.168.1.50"

[[registry.device]]
product_key = "a1LightPK00"
device_name = "lamp-01"
"#;
    let file = dir.file("ringlink.toml", text);
    let c = Config::load(Some(&file), Vec::new(), &Overrides::default()).expect("valid");
    let sources = c.registry.as_ref().expect("configured");
    assert_eq!(sources.products[0], dir.0.join("models/thermostat.json"));
    assert_eq!(sources.device.len(), 2);
    let r = c.build_registry().expect("loads");
    assert_eq!(r.len(), 4);
    let id = r.lookup("a1ThermoPK0", "thermo-01").expect("inline");
    assert_eq!(
        r.device(id).client_ip,
        Some("192.168.1.50".parse().expect("ip"))
    );
    assert!(r.lookup("a1LightPK00", "l1").is_some());

    // The same from the environment only: comma-separated products, no file.
    let vars = [
        (
            "RINGLINK_REGISTRY_PRODUCTS",
            format!(
                "{}, {}",
                dir.0.join("models/thermostat.json").display(),
                dir.0.join("models/light.json").display()
            ),
        ),
        (
            "RINGLINK_REGISTRY_DEVICES",
            dir.0.join("devices.csv").display().to_string(),
        ),
    ];
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let c = Config::load(None, vars, &Overrides::default()).expect("valid");
    assert_eq!(c.build_registry().expect("loads").len(), 2);
}

#[test]
fn registry_errors_are_all_collected_with_their_places() {
    let dir = Dir::new();
    dir.file(
        "thermostat.json",
        std::str::from_utf8(THERMO).expect("utf8"),
    );
    dir.file(
        "broken.json",
        r#"{"profile":{"productKey":"a1Broken"},"properties":[{"identifier":"x"}]}"#,
    );
    dir.file("devices.csv", "a1ThermoPK0,t1\na1ThermoPK0,t1\nnope,t2\n");
    let text = "[registry]\nproducts = [\"thermostat.json\", \"broken.json\", \"missing.json\"]\ndevices = \"devices.csv\"\n\n[[registry.device]]\nproduct_key = \"a1ThermoPK0\"\ndevice_name = \"t1\"\n\n[[registry.device]]\nproduct_key = \"a1ThermoPK0\"\nclient_ip = \"300.1.1.1\"\n";
    let file = dir.file("ringlink.toml", text);
    let e = Config::load(Some(&file), Vec::new(), &Overrides::default())
        .expect_err("bad inline device");
    let shown: Vec<String> = e.0.iter().map(|e| relative(&dir, e)).collect();
    assert_eq!(
        shown,
        [
            "ringlink.toml:9: registry.device: missing device_name",
            "ringlink.toml:11: registry.device.client_ip: expected an IP address, got \"300.1.1.1\"",
        ]
    );

    let text = "[registry]\nproducts = [\"thermostat.json\", \"broken.json\", \"missing.json\"]\ndevices = \"devices.csv\"\n\n[[registry.device]]\nproduct_key = \"a1ThermoPK0\"\ndevice_name = \"t1\"\n";
    let file = dir.file("ringlink.toml", text);
    let c = Config::load(Some(&file), Vec::new(), &Overrides::default()).expect("valid");
    let e = c.build_registry().expect_err("bad sources");
    let shown: Vec<String> = e.iter().map(|e| relative(&dir, e)).collect();
    assert_eq!(shown.len(), 5, "{shown:#?}");
    assert!(
        shown[0].starts_with("broken.json: at $.properties[0]"),
        "{shown:#?}"
    );
    assert!(shown[1].starts_with("missing.json: "), "{shown:#?}");
    assert_eq!(
        shown[2],
        "devices.csv:2: device a1ThermoPK0/t1 is listed twice"
    );
    assert!(shown[3].starts_with("devices.csv:3: unknown productKey \"nope\""));
    assert_eq!(
        shown[4],
        "ringlink.toml:5: registry.device: device a1ThermoPK0/t1 is listed twice"
    );
}

#[test]
fn driver_config_fills_the_listener_unless_set_elsewhere() {
    let dir = Dir::new();
    std::fs::create_dir_all(dir.0.join("edge")).expect("mkdir");
    dir.file(
        "thermostat.json",
        std::str::from_utf8(THERMO).expect("utf8"),
    );
    dir.file(
        "edge/gw.json",
        r#"{ "config": { "json": { "ip": "10.1.2.3", "port": 17999, "tls": true, "cert": "server.cer", "key": "server.pvk" } },
             "deviceList": [ { "productKey": "a1ThermoPK0", "deviceName": "thermo-01", "custom": "{\"clientIp\":\"192.168.1.50\"}" } ] }"#,
    );
    let text = "[registry]\nproducts = [\"thermostat.json\"]\ndriver_config = \"edge/gw.json\"\n";
    let file = dir.file("ringlink.toml", text);
    let c = Config::load(Some(&file), Vec::new(), &Overrides::default()).expect("valid");
    assert_eq!(c.listener.addr(), "10.1.2.3:17999".parse().expect("addr"));
    assert_eq!(
        c.listener.tls,
        Some(TlsFiles {
            cert: dir.0.join("edge/server.cer"),
            key: dir.0.join("edge/server.pvk"),
        })
    );
    let r = c.build_registry().expect("loads");
    let id = r.lookup("a1ThermoPK0", "thermo-01").expect("imported");
    assert_eq!(
        r.device(id).client_ip,
        Some("192.168.1.50".parse().expect("ip"))
    );

    // The ringlink file wins for what it sets; env too.
    let text =
        format!("[listener]\nport = 18000\ntls = {{ cert = \"a.pem\", key = \"b.pem\" }}\n{text}");
    let file = dir.file("ringlink.toml", &text);
    let vars = env(&[("RINGLINK_LISTENER_IP", "127.0.0.1")]);
    let c = Config::load(Some(&file), vars, &Overrides::default()).expect("valid");
    assert_eq!(c.listener.addr(), "127.0.0.1:18000".parse().expect("addr"));
    assert_eq!(c.listener.tls.expect("tls").cert, dir.0.join("a.pem"));
}

#[test]
fn check_reports_settings_and_registry_errors_together() {
    let dir = Dir::new();
    dir.file("devices.csv", "a1Nope,x\n");
    dir.file(
        "thermostat.json",
        std::str::from_utf8(THERMO).expect("utf8"),
    );
    let text = "[limits]\nmax_frame_bytes = 0\n[registry]\nproducts = [\"thermostat.json\"]\ndevices = \"devices.csv\"\n";
    let file = dir.file("ringlink.toml", text);
    let e = Config::check(Some(&file), Vec::new(), &Overrides::default()).expect_err("errors");
    let shown: Vec<String> = e.0.iter().map(|e| relative(&dir, e)).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].starts_with("ringlink.toml:2: limits.max_frame_bytes"));
    assert!(shown[1].starts_with("devices.csv:1: unknown productKey \"a1Nope\""));

    let ok = Config::check(None, Vec::new(), &Overrides::default()).expect("demo");
    assert_eq!(ok.registry.len(), 31_000);
    assert!(ok.tls.is_none());
}

#[test]
fn a_missing_config_file_is_an_error() {
    let e = Config::load(
        Some(Path::new("/nonexistent/ringlink.toml")),
        Vec::new(),
        &Overrides::default(),
    )
    .expect_err("missing");
    assert!(e
        .to_string()
        .starts_with("/nonexistent/ringlink.toml: cannot read:"));
}

#[test]
fn the_example_file_uncommented_gives_the_defaults() {
    let example = include_str!("../../ringlink.example.toml");
    let (settings, registry) = example
        .split_once("# Without a [registry]")
        .expect("example has a registry part");
    // Every `# key = value` line becomes a setting, except tls (it would turn TLS on).
    let is_setting = |l: &str| {
        l.strip_prefix("# ").is_some_and(|rest| {
            let key = rest.split(" = ").next().unwrap_or("");
            rest.contains(" = ") && !key.contains(' ') && key != "tls"
        })
    };
    let uncommented: String = settings
        .lines()
        .map(|l| if is_setting(l) { &l[2..] } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let set = uncommented
        .lines()
        .filter(|l| l.contains(" = ") && !l.starts_with('#'))
        .count();
    assert_eq!(
        set,
        KNOBS.len() - 18,
        "every knob but tls.*, registry.*, api.token_file and the optional uplink.mqtt \
         credentials is set"
    );
    let (_dir, c) = load(&uncommented, &[], &Overrides::default());
    let mut c = c.expect("the example is valid");
    let mut d = Config::load(None, Vec::new(), &Overrides::default()).expect("defaults");
    c.file = None;
    // data_dir given in a file is relative to the file's folder.
    assert!(c.data_dir.ends_with("ringlink-data"), "{:?}", c.data_dir);
    c.data_dir = d.data_dir.clone();
    d.file = None;
    assert_eq!(c, d);

    // The registry part, uncommented, names products and an inline device.
    let registry: String = registry
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .collect::<Vec<_>>()
        .join("\n");
    let (_dir, c) = load(&registry, &[], &Overrides::default());
    let c = c.expect("valid");
    let r = c.registry.expect("registry");
    assert_eq!(r.products.len(), 2);
    assert_eq!(r.device.len(), 1);
    assert_eq!(
        r.device[0].client_ip,
        Some("192.168.1.50".parse().expect("ip"))
    );
}

#[test]
fn mqtt_sink_settings_are_checked_when_the_sink_is_mqtt() {
    let e = errors(
        "[uplink]\nsink = \"mqtt\"\non_full = \"later\"\n[uplink.mqtt]\nurl = \"mqtts://b:8883\"\n\
         password = \"p\"\nqos = 2\ninflight = 0\ncert = \"c.pem\"\n",
    );
    assert_eq!(
        e,
        vec![
            "ringlink.toml:3: uplink.on_full: expected drop_oldest or block, got \"later\"",
            "ringlink.toml:6: uplink.mqtt.password: a password needs uplink.mqtt.username (MQTT 3.1.1)",
            "ringlink.toml:7: uplink.mqtt.qos: must be between 0 and 1, got 2",
            "ringlink.toml:8: uplink.mqtt.inflight: must be between 1 and 65535, got 0",
            "ringlink.toml:9: uplink.mqtt.cert: a client certificate needs both uplink.mqtt.cert and uplink.mqtt.key",
        ]
    );
    let e = errors("[uplink.mqtt]\ndevice_secrets = \"s.csv\"\ngateway_product_key = \"gw\"\n");
    assert_eq!(
        e,
        vec![
            "ringlink.toml:2: uplink.mqtt.device_secrets: sub-device logins need the gateway: set uplink.mqtt.gateway_product_key and gateway_device_name",
            "ringlink.toml:3: uplink.mqtt.gateway_product_key: the gateway needs both gateway_product_key and gateway_device_name",
        ]
    );
    let e = errors("[uplink.mqtt]\nurl = \"tcp://b\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("ringlink.toml:2: uplink.mqtt.url: "),
        "{e:?}"
    );
}

#[test]
fn api_token_file_is_read_and_trimmed() {
    let dir = Dir::new();
    dir.file("api.token", "  s3cret-token\n\n");
    let file = dir.file(
        "ringlink.toml",
        "[api]\nlisten = \"0.0.0.0:17690\"\ntoken_file = \"api.token\"\nmax_connections = 20\nrequest_timeout_ms = 500\n",
    );
    let c = Config::load(Some(&file), env(&[]), &Overrides::default()).expect("valid");
    assert_eq!(c.api.token, Some(ApiToken("s3cret-token".into())));
    assert_eq!(c.api.token_file, Some(dir.0.join("api.token")));
    assert_eq!(c.api.max_connections, 20);
    assert_eq!(c.api.request_timeout_ms, 500);
    // Debug never shows the token.
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn api_defaults_have_no_token_and_bounded_connections() {
    let (_dir, c) = load("", &[], &Overrides::default());
    let c = c.expect("valid");
    assert_eq!(c.api.token, None);
    assert_eq!(c.api.max_connections, 1_024);
    assert_eq!(c.api.request_timeout_ms, 10_000);
}

#[test]
fn api_token_file_empty_or_missing_is_an_error_naming_the_key() {
    let dir = Dir::new();
    dir.file("empty.token", " \n\t\n");
    let file = dir.file("ringlink.toml", "[api]\ntoken_file = \"empty.token\"\n");
    let e = Config::load(Some(&file), env(&[]), &Overrides::default()).expect_err("empty");
    let msgs: Vec<String> = e.0.iter().map(|e| relative(&dir, e)).collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("ringlink.toml:2: api.token_file:") && msgs[0].contains("empty"),
        "{msgs:?}"
    );
    let errs = errors("[api]\ntoken_file = \"no-such.token\"\n");
    assert!(
        errs[0].starts_with("ringlink.toml:2: api.token_file: cannot read"),
        "{errs:?}"
    );
}

#[test]
fn api_on_a_non_loopback_address_needs_a_token() {
    let errs = errors("[api]\nlisten = \"0.0.0.0:17690\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("ringlink.toml:2: api.listen: 0.0.0.0:17690 is not a loopback")
            && errs[0].contains("api.token_file"),
        "{errs:?}"
    );
    // Also when the address comes from a flag; loopback v4 and v6 need none.
    let flags = Overrides {
        api: Some("192.168.1.5:0".parse().expect("addr")),
        ..Overrides::default()
    };
    let (_dir, r) = load("", &[], &flags);
    let errs = r.expect_err("non-loopback flag");
    assert!(errs[0].starts_with("flag --api: api.listen:"), "{errs:?}");
    for listen in ["127.0.0.1:0", "[::1]:0", "127.0.0.9:1234"] {
        let (_dir, r) = load(
            &format!("[api]\nlisten = \"{listen}\"\n"),
            &[],
            &Overrides::default(),
        );
        r.unwrap_or_else(|e| panic!("{listen}: {e:?}"));
    }
}

#[test]
fn api_limits_are_range_checked() {
    let errs = errors("[api]\nmax_connections = 0\nrequest_timeout_ms = 10\n");
    assert_eq!(
        errs,
        [
            "ringlink.toml:2: api.max_connections: must be between 1 and 65536, got 0",
            "ringlink.toml:3: api.request_timeout_ms: must be between 100 and 600000, got 10",
        ]
    );
    let (_dir, r) = load(
        "",
        &[
            ("RINGLINK_API_MAX_CONNECTIONS", "7"),
            ("RINGLINK_API_REQUEST_TIMEOUT_MS", "250"),
        ],
        &Overrides::default(),
    );
    let c = r.expect("valid");
    assert_eq!((c.api.max_connections, c.api.request_timeout_ms), (7, 250));
}
