//! The `ringlink` binary's command line: `check` on good and bad configurations, environment
//! precedence, `--help`. Runs the built binary; binds no sockets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ringlink(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlink"));
    cmd.args(args).current_dir(root());
    // Only the variables a test sets: a developer's own RINGLINK_* must not change results.
    for (k, _) in std::env::vars() {
        if k.starts_with("RINGLINK_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run ringlink")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = "tests/data/config/good.toml";
const BAD: &str = "tests/data/config/bad.toml";

#[test]
fn check_good_config_prints_a_summary() {
    let out = ringlink(&["check", "--config", GOOD], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for needle in [
        "tests/data/config/good.toml: OK",
        "listen      0.0.0.0:18000 (TLS off)",
        "runtime     io epoll, 2 threads",
        "api         127.0.0.1:17690",
        "sink local",
        "max_frame_bytes 32768",
        "registry    from [registry]: 2 products, 4 devices (2 with clientIp)",
        "a1ThermoPK0      8 properties, 1 events, 1 services, 3 devices",
        "a1LightPK00      7 properties, 1 events, 1 services, 1 devices",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
}

#[test]
fn check_bad_config_prints_every_error_with_file_and_line() {
    let out = ringlink(&["check", "--config", BAD], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let dir = "tests/data/config";
    let expected = [
        format!("{dir}/bad.toml:3: listener.port: must be between 0 and 65535, got 70000"),
        format!("{dir}/bad.toml:4: listener.prot: unknown key"),
        format!(
            "{dir}/bad.toml:7: limits.max_frame_bytes: must be between 125 and 16777216, got 0"
        ),
        format!("{dir}/bad.toml:10: uplink.sink: expected local, mqtt or nats, got \"kafka\""),
        format!(
            "{dir}/bad-model.json: at $.properties[0].dataType.specs.min: min 10 is greater than max 1"
        ),
        format!("{dir}/bad-devices.csv:3: device a1ThermoPK0/thermo-01 is listed twice"),
        format!("{dir}/bad-devices.csv:4: unknown productKey \"a1NoSuchPK\""),
        format!("{dir}/bad-devices.csv:5: clientIp \"not-an-ip\" is not an IP address"),
        format!("{dir}/bad.toml: 8 errors"),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, want) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(want.as_str()),
            "{line:?} should start with {want:?}"
        );
    }
}

#[test]
fn env_overrides_the_file_and_flags_are_not_needed_for_check() {
    let out = ringlink(
        &["check", "--config", GOOD],
        &[
            ("RINGLINK_LISTENER_PORT", "18001"),
            ("RINGLINK_RUNTIME_IO", "uring"),
            ("RINGLINK_UPLINK_FSYNC", "batch"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("listen      0.0.0.0:18001"), "{stdout}");
    assert!(
        stdout.contains("runtime     io uring, 2 threads"),
        "{stdout}"
    );
    assert!(stdout.contains("fsync batch"), "{stdout}");

    let out = ringlink(
        &["check", "--config", GOOD],
        &[("RINGLINK_LIMITS_MAX_FRAME_BYTES", "12")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(
            "env RINGLINK_LIMITS_MAX_FRAME_BYTES: limits.max_frame_bytes: must be between 125 and 16777216, got 12"
        ),
        "{stderr}"
    );
}

#[test]
fn check_reads_the_mqtt_sinks_device_secrets() {
    let out = ringlink(
        &["check", "--config", "tests/data/config/mqtt-bad.toml"],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "tests/data/config/mqtt-bad-secrets.csv:2: expected productKey,deviceName,deviceSecret"
        ),
        "{stderr}"
    );
    // A good file: the summary says who logs in through the gateway.
    let dir = std::env::temp_dir().join(format!("ringlink-cli-mqtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secrets = dir.join("s.csv");
    std::fs::write(&secrets, "a1ThermoPK0,thermo-00001,abc\n").expect("write");
    let env = [
        ("RINGLINK_UPLINK_SINK", "mqtt"),
        ("RINGLINK_UPLINK_MQTT_GATEWAY_PRODUCT_KEY", "gwPK"),
        ("RINGLINK_UPLINK_MQTT_GATEWAY_DEVICE_NAME", "gw-1"),
        (
            "RINGLINK_UPLINK_MQTT_DEVICE_SECRETS",
            secrets.to_str().expect("utf8"),
        ),
    ];
    let out = ringlink(&["check"], &env);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("mqtt        mqtt://127.0.0.1:1883 as \"ringlink\""),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("1 devices log in through gateway gwPK/gw-1, the others on /as/mqtt/status"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_without_config_checks_the_demo_registry() {
    let out = ringlink(&["check"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("built-in demo: 3 products, 31000 devices (0 with clientIp)"));
    assert!(stdout.contains("listen      0.0.0.0:17682 (TLS off)"));
}

#[test]
fn help_mentions_every_subcommand_and_the_config_sources() {
    let out = ringlink(&["--help"], &[]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    for needle in [
        "serve",
        "check",
        "get",
        "set",
        "call",
        "RINGLINK_",
        "--config",
        "--listen",
        "--tls-cert",
        "--tls-key",
        "--threads",
        "--io",
        "--api",
        "--data-dir",
    ] {
        assert!(stdout.contains(needle), "--help lacks {needle}:\n{stdout}");
    }
    for sub in ["serve", "check", "get", "set", "call"] {
        let out = ringlink(&[sub, "--help"], &[]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
    }
}

#[test]
fn serve_validates_before_it_starts() {
    // A bad configuration stops serve with the same errors as check.
    let out = ringlink(&["serve", "--config", BAD], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("bad.toml:7: limits.max_frame_bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("bad-devices.csv:5"), "{stderr}");
}

#[test]
fn api_clients_report_an_unreachable_api() {
    // Port 9 (discard) on loopback: nothing listens there in a test environment.
    let out = ringlink(
        &[
            "set",
            "--api",
            "127.0.0.1:9",
            "a1ThermoPK0",
            "thermo-01",
            "setpoint=21.5",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("POST http://127.0.0.1:9/v1/devices/a1ThermoPK0/thermo-01/properties/set"),
        "{stderr}"
    );
    let out = ringlink(&["set", "a1ThermoPK0", "thermo-01", "novalue"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("expected KEY=VALUE"));
}

#[test]
fn the_example_config_is_valid_and_matches_the_defaults() {
    let example = root().join("ringlink.example.toml");
    let out = ringlink(&["check", "--config", path(&example)], &[]);
    let (commented, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let defaults = text(&ringlink(&["check"], &[])).0;
    let body = |s: &str| s.lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(body(&commented), body(&defaults));
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A one-shot HTTP server on 127.0.0.1:0 that answers `status` with `body` and hands back the
/// request it got (head and body).
fn fake_api(status: &'static str, body: &'static str) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr").to_string();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().expect("content-length");
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let mut request_body = vec![0; length];
        reader.read_exact(&mut request_body).expect("request body");
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        reader
            .get_mut()
            .write_all(answer.as_bytes())
            .expect("answer");
        format!("{head}\n{}", String::from_utf8_lossy(&request_body))
    });
    (addr, handle)
}

#[test]
fn set_sends_typed_values_and_prints_the_answer() {
    let (addr, server) = fake_api("200 OK", r#"{"code":0}"#);
    let out = ringlink(
        &[
            "set",
            "--api",
            &addr,
            "a1ThermoPK0",
            "thermo 01",
            "setpoint=21.5",
            "on=true",
            "mode=eco",
            "range={\"lo\":1}",
            "list=[1,2]",
            "quoted=\"21\"",
        ],
        &[],
    );
    let request = server.join().expect("fake api");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        request.starts_with("POST /v1/devices/a1ThermoPK0/thermo%2001/properties/set HTTP/1.1"),
        "{request}"
    );
    let body = request.split_once("\n\n").expect("body").1;
    let sent: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(
        sent,
        serde_json::json!({"properties": {"setpoint": 21.5, "on": true, "mode": "eco",
            "range": {"lo": 1}, "list": [1, 2], "quoted": "21"}})
    );
    assert!(stdout.contains("\"code\": 0"), "{stdout}");
}

#[test]
fn get_with_no_property_asks_for_all_and_errors_show_code_and_message() {
    let (addr, server) = fake_api(
        "409 Conflict",
        r#"{"code":109001,"message":"device is offline"}"#,
    );
    let out = ringlink(&["get", "--api", &addr, "a1ThermoPK0", "thermo-01"], &[]);
    let request = server.join().expect("fake api");
    assert!(request.starts_with("POST /v1/devices/a1ThermoPK0/thermo-01/properties/get "));
    assert!(request.ends_with("\n{\"properties\":[]}"), "{request}");
    assert_eq!(out.status.code(), Some(1));
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("HTTP 409 Conflict: code 109001: device is offline"),
        "{stderr}"
    );

    let (addr, server) = fake_api("200 OK", r#"{"code":0,"outputData":{"ok":1}}"#);
    let out = ringlink(
        &[
            "call",
            "--api",
            &addr,
            "a1ThermoPK0",
            "thermo-01",
            "reboot",
            "delay=5",
        ],
        &[],
    );
    let request = server.join().expect("fake api");
    assert_eq!(out.status.code(), Some(0));
    assert!(request.starts_with("POST /v1/devices/a1ThermoPK0/thermo-01/services/reboot "));
    assert!(
        request.ends_with("\n{\"inputData\":{\"delay\":5}}"),
        "{request}"
    );
    assert!(text(&out).0.contains("\"outputData\""));
}
