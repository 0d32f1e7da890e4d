//! Live registry reload against the real server on both drivers: `POST /v1/registry/reload` and
//! SIGHUP re-read the thing models, the device list and the TLS certificate while connections
//! stay up (PRODUCT.md, API table).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::Connector;

use support::{Client, Gateway, DRIVERS, THERMO};

/// A config dir: `ringlink.toml` naming `thermostat.json` (setpoint max `setpoint_max`),
/// `light.json` and `devices.csv`.
struct Sources {
    dir: PathBuf,
}

impl Sources {
    fn new(name: &str, devices: &[&str]) -> Self {
        let dir = support::temp_dir(name);
        std::fs::copy(support::demo_tsl("light.json"), dir.join("light.json")).expect("copy");
        std::fs::write(
            dir.join("ringlink.toml"),
            "[registry]\nproducts = [\"thermostat.json\", \"light.json\"]\ndevices = \"devices.csv\"\n",
        )
        .expect("write config");
        let s = Self { dir };
        s.thermostat(35);
        s.devices(devices);
        s
    }

    fn config(&self) -> PathBuf {
        self.dir.join("ringlink.toml")
    }

    fn thermostat(&self, setpoint_max: i32) {
        let text = std::fs::read(support::demo_tsl("thermostat.json")).expect("read TSL");
        let mut tsl: Value = serde_json::from_slice(&text).expect("JSON");
        tsl["properties"][1]["dataType"]["specs"]["max"] = Value::from(setpoint_max.to_string());
        let pretty = serde_json::to_string_pretty(&tsl).expect("JSON");
        std::fs::write(self.dir.join("thermostat.json"), pretty).expect("write TSL");
    }

    fn devices(&self, lines: &[&str]) {
        let mut csv = String::from("productKey,deviceName\n");
        for l in lines {
            csv.push_str(l);
            csv.push('\n');
        }
        std::fs::write(self.dir.join("devices.csv"), csv).expect("write CSV");
    }
}

fn thermo(dn: &str) -> String {
    format!("{THERMO},{dn}")
}

fn setpoint(v: f64) -> Value {
    json!([{"identifier": "setpoint", "type": "float", "value": v}])
}

fn power() -> Value {
    json!([{"identifier": "power", "type": "bool", "value": 1}])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn online_names(gw: &Gateway) -> Vec<String> {
    let (status, list) = gw.http("GET", "/v1/devices?online=true", None);
    assert_eq!(status, 200);
    list.as_array()
        .expect("a list")
        .iter()
        .map(|d| d["deviceName"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn reload_adds_removes_changes_and_refuses_broken_sources_on_both_drivers() {
    let rt = runtime();
    for io in DRIVERS {
        let src = Sources::new("reload", &[&thermo("t-a"), &thermo("t-b"), &thermo("t-c")]);
        let config = src.config();
        let gw = Gateway::start_with(io, &["--config", config.to_str().expect("utf-8")], &[]);
        rt.block_on(async {
            // One connection carrying two devices, and another one.
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(c.online(THERMO, "t-a").await, 0, "{io}");
            assert_eq!(c.online(THERMO, "t-b").await, 0, "{io}");
            assert_eq!(c.report(THERMO, "t-a", setpoint(30.0)).await, 0, "{io}");
            assert_eq!(c.online(THERMO, "t-d").await, 109_000, "{io}: not yet");
            let mut other = Client::connect(gw.ws).await;
            assert_eq!(other.online(THERMO, "t-c").await, 0, "{io}");

            // t-b removed, t-d added, setpoint max 35 -> 25.
            src.devices(&[&thermo("t-a"), &thermo("t-c"), &thermo("t-d")]);
            src.thermostat(25);
            let (status, body) = gw.http("POST", "/v1/registry/reload", None);
            assert_eq!(status, 200, "{io}: {body}");
            assert_eq!(
                (
                    &body["added"],
                    &body["removed"],
                    &body["changed"],
                    &body["devices"]
                ),
                (&json!(1), &json!(1), &json!(2), &json!(3)),
                "{io}: {body}"
            );
            assert_eq!(body["models_changed"], json!([THERMO]), "{io}");

            // The removed device is offline and unknown; its connection stays up and the other
            // device on it keeps working, against the new thermo model.
            let online = online_names(&gw);
            assert!(!online.contains(&"t-b".to_owned()), "{io}: {online:?}");
            assert!(online.contains(&"t-a".to_owned()), "{io}: {online:?}");
            assert_eq!(c.report(THERMO, "t-b", power()).await, 109_000, "{io}");
            assert_eq!(
                c.report(THERMO, "t-a", setpoint(30.0)).await,
                100_007,
                "{io}"
            );
            assert_eq!(c.report(THERMO, "t-a", setpoint(20.0)).await, 0, "{io}");
            // The added device can come online at once, on an existing connection too.
            assert_eq!(c.online(THERMO, "t-d").await, 0, "{io}");
            assert_eq!(other.report(THERMO, "t-c", power()).await, 0, "{io}");
            assert!(gw.is_online(THERMO, "t-d"), "{io}");
            assert_eq!(gw.metric("ringlink_devices_registered"), 3.0, "{io}");
            let swap = gw.metric("ringlink_registry_swap_max_seconds");
            assert!(swap > 0.0 && swap < 1.0, "{io}: swap took {swap} s");

            // Broken sources: a bad CSV line and a bad TSL. Every error, with file and line,
            // and nothing changes.
            src.devices(&[
                &thermo("t-a"),
                "only-one-field",
                &thermo("t-c"),
                &thermo("t-d"),
                &thermo("t-e"),
                "a1NoSuchPK0,x",
            ]);
            let tsl = src.dir.join("thermostat.json");
            let mut broken: Value =
                serde_json::from_slice(&std::fs::read(&tsl).expect("read")).expect("JSON");
            broken["properties"][1]["dataType"]["specs"]["min"] = Value::from("99");
            std::fs::write(&tsl, broken.to_string()).expect("write");
            let (status, body) = gw.http("POST", "/v1/registry/reload", None);
            assert_eq!(status, 422, "{io}: {body}");
            assert_eq!(body["code"], json!(100_001), "{io}");
            let errors: Vec<&str> = body["errors"]
                .as_array()
                .expect("errors")
                .iter()
                .map(|e| e.as_str().expect("text"))
                .collect();
            let csv = src.dir.join("devices.csv");
            let csv = csv.display();
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{csv}:3: "))),
                "{io}: {errors:#?}"
            );
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{csv}:7: "))),
                "{io}: {errors:#?}"
            );
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&tsl.display().to_string()) && e.contains("min")),
                "{io}: {errors:#?}"
            );
            assert_eq!(
                c.online(THERMO, "t-e").await,
                109_000,
                "{io}: nothing added"
            );
            assert_eq!(c.report(THERMO, "t-a", setpoint(24.0)).await, 0, "{io}");
            assert_eq!(
                c.report(THERMO, "t-a", setpoint(30.0)).await,
                100_007,
                "{io}"
            );
            assert_eq!(c.report(THERMO, "t-d", power()).await, 0, "{io}");
            let reloads = |result: &str| {
                gw.metric(&format!(
                    "ringlink_registry_reloads_total{{result=\"{result}\"}}"
                ))
            };
            assert_eq!((reloads("ok"), reloads("failed")), (1.0, 1.0), "{io}");

            // SIGHUP does the same reload: fixed sources, t-e added.
            src.devices(&[
                &thermo("t-a"),
                &thermo("t-c"),
                &thermo("t-d"),
                &thermo("t-e"),
            ]);
            src.thermostat(25);
            gw.signal("HUP");
            gw.eventually("SIGHUP reloaded", || reloads("ok") == 2.0);
            assert_eq!(c.online(THERMO, "t-e").await, 0, "{io}");
            assert_eq!(other.report(THERMO, "t-c", power()).await, 0, "{io}");
            assert_eq!(reloads("failed"), 1.0, "{io}");
            c.close().await;
            other.close().await;
        });
    }
}

struct Cert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn generate() -> Cert {
    let key = rcgen::KeyPair::generate().expect("key pair");
    let params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    Cert {
        der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A wss:// client trusting only `cert`; Err when the TLS handshake fails.
async fn connect_trusting(gw: &Gateway, cert: &Cert) -> Result<Client, String> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.der.clone()).expect("trust");
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut req = format!("wss://localhost:{}//", gw.ws.port())
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "alibaba-iot-linkedge-protocol".parse().expect("header"),
    );
    let tcp = tokio::net::TcpStream::connect(gw.ws)
        .await
        .expect("connect");
    let connector = Some(Connector::Rustls(Arc::new(config)));
    let handshake = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, connector);
    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok((ws, _))) => Ok(Client::from_ws(ws)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

fn write_cert(cert: &Cert, files: &(PathBuf, PathBuf)) {
    std::fs::write(&files.0, &cert.cert_pem).expect("write cert");
    std::fs::write(&files.1, &cert.key_pem).expect("write key");
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

#[test]
fn reload_serves_the_new_certificate_to_new_connections_on_both_drivers() {
    let rt = runtime();
    for io in DRIVERS {
        let dir = support::temp_dir("reload-tls");
        let files = (dir.join("server.cer"), dir.join("server.pvk"));
        let (first, second) = (generate(), generate());
        write_cert(&first, &files);
        let gw = Gateway::start_with(
            io,
            &["--tls-cert", arg(&files.0), "--tls-key", arg(&files.1)],
            &[],
        );
        rt.block_on(async {
            let mut old = connect_trusting(&gw, &first).await.expect("first cert");
            assert_eq!(old.online(THERMO, "thermo-00001").await, 0, "{io}");
            assert!(
                connect_trusting(&gw, &second).await.is_err(),
                "{io}: the second cert is not served yet"
            );

            write_cert(&second, &files);
            let (status, body) = gw.http("POST", "/v1/registry/reload", None);
            assert_eq!(status, 200, "{io}: {body}");
            assert_eq!((&body["added"], &body["removed"]), (&json!(0), &json!(0)));

            let mut new = connect_trusting(&gw, &second)
                .await
                .unwrap_or_else(|e| panic!("{io}: the new cert is served: {e}"));
            assert_eq!(new.online(THERMO, "thermo-00002").await, 0, "{io}");
            assert!(
                connect_trusting(&gw, &first).await.is_err(),
                "{io}: the old cert is not served to new connections"
            );
            // The session made with the old certificate goes on.
            assert_eq!(old.report(THERMO, "thermo-00001", power()).await, 0, "{io}");
            old.close().await;
            new.close().await;
        });
    }
}
