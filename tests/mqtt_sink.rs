//! The MQTT sink against a real Mosquitto: reports arrive as Alink JSON on the right topics in
//! order per device; set/get/service published on the broker reach the device and the reply
//! comes back on the reply topic; nothing acknowledged to a device is lost across `kill -9` of
//! the broker (twice, under load) or of ringlink itself mid-forwarding; a full spool does what
//! `uplink.on_full` says, counted, with the process's memory bounded.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringlink::mqtt::{Connection, Event, Options, QoS, Step};
use serde_json::{json, Value};
use support::broker::{Mosquitto, MosquittoConfig};
use support::{Client, Gateway, THERMO};

/// One message the subscriber received.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    body: Value,
}

/// A subscriber to everything ringlink publishes, on its own task: a persistent session (a
/// fixed client id, clean_session false) so that a restarted broker that saved it delivers
/// what was published while it was away.
struct Subscriber {
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
    publish: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>,
}

impl Subscriber {
    async fn start(broker: &Mosquitto, id: &str) -> Self {
        let mut opts = Options::new(id);
        opts.clean_session = false;
        opts.keep_alive = Duration::from_secs(5);
        let url = broker.url().parse().expect("url");
        let mut conn = Connection::new(url, opts, None).expect("connection");
        conn.client()
            .subscribe(&[
                ("/sys/#", QoS::AtLeastOnce),
                ("/as/#", QoS::AtLeastOnce),
                ("/ext/#", QoS::AtLeastOnce),
            ])
            .expect("filters");
        // Wait for the SUBACK before anything is published.
        loop {
            let wake = tokio::time::sleep(Duration::from_secs(10));
            match conn.run_until(wake).await {
                Step::Event(Event::Subscribed { granted }) => {
                    assert!(granted.iter().all(Option::is_some), "{granted:?}");
                    break;
                }
                Step::Event(_) | Step::DialFailed(_) => {}
                Step::Woken(()) => panic!("no SUBACK within 10 s"),
            }
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let (publish, mut outbox) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let task = tokio::spawn(async move {
            let mut tag = 0;
            loop {
                match conn.run_until(outbox.recv()).await {
                    Step::Event(Event::Message { topic, payload, .. }) => {
                        let body =
                            serde_json::from_slice(&payload).expect("ringlink publishes JSON");
                        sink.lock().expect("lock").push(Got { topic, body });
                    }
                    Step::Woken(Some((topic, payload))) => {
                        tag += 1;
                        conn.client()
                            .publish(&topic, &payload, QoS::AtLeastOnce, tag)
                            .expect("publish");
                    }
                    Step::Woken(None) => return,
                    Step::Event(_) | Step::DialFailed(_) => {}
                }
            }
        });
        Self { got, task, publish }
    }

    fn publish(&self, topic: &str, body: Value) {
        self.publish
            .send((topic.to_owned(), body.to_string().into_bytes()))
            .expect("subscriber task runs");
    }

    fn snapshot(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits until `f` holds for what was received, at most `within`.
    async fn wait(&self, within: Duration, what: &str, f: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.snapshot();
            if f(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; got {} messages",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sink_env(broker: &Mosquitto) -> Vec<(&'static str, String)> {
    vec![
        ("RINGLINK_UPLINK_SINK", "mqtt".to_owned()),
        ("RINGLINK_UPLINK_MQTT_URL", broker.url()),
        ("RINGLINK_UPLINK_MQTT_KEEP_ALIVE_S", "5".to_owned()),
    ]
}

fn start_gateway(
    io: &str,
    data_dir: Option<&Path>,
    args: &[&str],
    env: &[(&str, String)],
) -> Gateway {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    match data_dir {
        Some(dir) => Gateway::start_in(io, dir, args, &env),
        None => Gateway::start_with(io, args, &env),
    }
}

/// A `label` report (text, at most 32 bytes).
fn label(l: &str) -> Value {
    json!([{"identifier": "label", "type": "text", "value": l}])
}

fn dn(i: usize) -> String {
    format!("thermo-{i:05}")
}

/// The `label` values of the property posts of device `dn`, in arrival order.
fn labels_of(got: &[Got], dn: &str) -> Vec<String> {
    let topic = format!("/sys/{THERMO}/{dn}/thing/event/property/post");
    got.iter()
        .filter(|g| g.topic == topic)
        .filter_map(|g| {
            g.body["params"]["label"]["value"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn reports_arrive_as_alink_in_order_and_broker_downlinks_reach_the_device() {
    for io in support::DRIVERS {
        let broker = Mosquitto::start();
        let sub = Subscriber::start(&broker, &format!("sub-order-{io}")).await;
        let gw = start_gateway(io, None, &[], &sink_env(&broker));
        gw.eventually("the sink connects", || {
            gw.metric("ringlink_sink_connected") == 1.0
        });

        let mut dev = Client::connect(gw.ws).await;
        assert_eq!(dev.online(THERMO, &dn(1)).await, 0);
        for n in 0..50 {
            let props = json!([
                {"identifier": "label", "type": "text", "value": format!("n{n}")},
                {"identifier": "roomTemp", "type": "double", "value": 21},
                {"identifier": "power", "type": "bool", "value": 1},
            ]);
            assert_eq!(dev.report(THERMO, &dn(1), props).await, 0);
        }
        let event = json!({"identifier": "overheat", "outputData": [{"identifier": "roomTemp", "type": "double", "value": 81.5}]});
        let code = dev.call("reportEvent", THERMO, &dn(1), event).await;
        assert_eq!(code, 0, "{io}");

        let got = sub
            .wait(
                Duration::from_secs(10),
                "50 property posts and an event",
                |g| {
                    labels_of(g, &dn(1)).len() == 50
                        && g.iter()
                            .any(|m| m.topic.ends_with("/thing/event/overheat/post"))
                },
            )
            .await;
        let want: Vec<String> = (0..50).map(|n| format!("n{n}")).collect();
        assert_eq!(
            labels_of(&got, &dn(1)),
            want,
            "{io}: every report, in order"
        );
        let post = got
            .iter()
            .find(|g| g.topic.ends_with("/property/post"))
            .expect("a property post");
        assert_eq!(
            post.topic,
            format!("/sys/{THERMO}/{}/thing/event/property/post", dn(1))
        );
        let b = &post.body;
        assert_eq!(b["version"], "1.0");
        assert_eq!(b["method"], "thing.event.property.post");
        assert!(
            b["id"].as_str().is_some_and(|id| id.parse::<u32>().is_ok()),
            "{b}"
        );
        assert_eq!(b["params"]["roomTemp"]["value"], json!(21.0));
        assert_eq!(b["params"]["power"]["value"], json!(1));
        assert!(b["params"]["power"]["time"].as_u64().is_some(), "{b}");
        let online = got
            .iter()
            .find(|g| g.topic == format!("/as/mqtt/status/{THERMO}/{}", dn(1)))
            .expect("the online status");
        assert_eq!(online.body["status"], "online");
        assert_eq!(online.body["clientIp"], "127.0.0.1");

        // Downlinks published on the broker: set, get, a service and an RRPC call, each
        // answered by the device and replied on its reply topic.
        let base = format!("/sys/{THERMO}/{}", dn(1));
        sub.publish(
            &format!("{base}/thing/service/property/set"),
            json!({"id": "101", "version": "1.0", "params": {"setpoint": 22.5}, "method": "thing.service.property.set"}),
        );
        let req = dev.recv().await;
        assert_eq!(req["method"], "setProperty", "{req}");
        assert_eq!(
            req["payload"]["properties"][0]["identifier"], "setpoint",
            "{req}"
        );
        let reply = json!({"code": 0, "messageId": req["messageId"], "payload": {}});
        dev.send_text(reply.to_string()).await;

        sub.publish(
            &format!("{base}/thing/service/property/get"),
            json!({"id": "102", "params": ["power"]}),
        );
        let req = dev.recv().await;
        assert_eq!(req["method"], "getProperty", "{req}");
        let reply = json!({"code": 0, "messageId": req["messageId"], "payload": {"properties": [{"identifier": "power", "type": "bool", "value": 1}]}});
        dev.send_text(reply.to_string()).await;

        sub.publish(
            &format!("{base}/rrpc/request/777"),
            json!({"id": "103", "params": {"delay": 3}, "method": "thing.service.reboot"}),
        );
        let req = dev.recv().await;
        assert_eq!(req["method"], "callService", "{req}");
        assert_eq!(req["payload"]["identifier"], "reboot", "{req}");
        let reply = json!({"code": 0, "messageId": req["messageId"], "payload": {"outputData": [{"identifier": "accepted", "type": "bool", "value": 1}]}});
        dev.send_text(reply.to_string()).await;

        // A set the thing model refuses never reaches the device; unknown devices get 109000.
        sub.publish(
            &format!("{base}/thing/service/property/set"),
            json!({"id": "104", "params": {"roomTemp": 3.0}}),
        );
        sub.publish(
            &format!("/sys/{THERMO}/no-such-device/thing/service/property/get"),
            json!({"id": "105", "params": ["power"]}),
        );
        let replies = sub
            .wait(Duration::from_secs(10), "five replies", |g| {
                g.iter()
                    .filter(|m| m.topic.ends_with("_reply") || m.topic.contains("/rrpc/response/"))
                    .count()
                    >= 5
            })
            .await;
        let reply = |topic: &str, id: &str| -> Value {
            replies
                .iter()
                .find(|g| g.topic == topic && g.body["id"] == id)
                .unwrap_or_else(|| panic!("{io}: no reply {id} on {topic}"))
                .body
                .clone()
        };
        let set = reply(&format!("{base}/thing/service/property/set_reply"), "101");
        assert_eq!(
            set,
            json!({"id": "101", "code": 200, "data": {}, "message": "success"})
        );
        let get = reply(&format!("{base}/thing/service/property/get_reply"), "102");
        assert_eq!(get["code"], 200);
        assert_eq!(get["data"], json!({"power": 1}));
        let rrpc = reply(&format!("{base}/rrpc/response/777"), "103");
        assert_eq!(rrpc["code"], 200);
        assert_eq!(rrpc["data"], json!({"accepted": 1}));
        let ro = reply(&format!("{base}/thing/service/property/set_reply"), "104");
        assert_eq!(ro["code"], 109003, "roomTemp is read-only: {ro}");
        let unknown = reply(
            &format!("/sys/{THERMO}/no-such-device/thing/service/property/get_reply"),
            "105",
        );
        assert_eq!(unknown["code"], 109000);
        assert_eq!(
            gw.metric("ringlink_sink_downlinks_total{topic=\"set\",code=\"0\"}"),
            1.0,
            "{io}"
        );

        // Offline device: 109001.
        dev.close().await;
        gw.eventually("the device goes offline", || !gw.is_online(THERMO, &dn(1)));
        sub.publish(
            &format!("{base}/thing/service/property/get"),
            json!({"id": "106", "params": ["power"]}),
        );
        let is_reply = |m: &Got| m.topic.ends_with("/get_reply") && m.body["id"] == "106";
        let got = sub
            .wait(Duration::from_secs(10), "the offline reply", |g| {
                g.iter().any(is_reply)
            })
            .await;
        let offline = got.iter().find(|m| is_reply(m)).expect("reply");
        assert_eq!(offline.body["code"], 109001, "{io}");
    }
}

/// A product that a registry reload adds gets its downlink subscriptions while the forwarder
/// stays connected: a get published on the broker for one of its devices reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_added_by_a_reload_gets_broker_downlinks() {
    const LIGHT: &str = "a1LightPK00";
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "sub-reload").await;
    let dir = support::temp_dir("mqtt-reload");
    std::fs::copy(
        support::demo_tsl("thermostat.json"),
        dir.join("thermostat.json"),
    )
    .expect("copy");
    std::fs::copy(support::demo_tsl("light.json"), dir.join("light.json")).expect("copy");
    let write_config = |products: &str, devices: &str| {
        std::fs::write(
            dir.join("ringlink.toml"),
            format!("[registry]\nproducts = [{products}]\ndevices = \"devices.csv\"\n"),
        )
        .expect("write config");
        std::fs::write(
            dir.join("devices.csv"),
            format!("productKey,deviceName\n{devices}"),
        )
        .expect("write devices");
    };
    write_config("\"thermostat.json\"", &format!("{THERMO},t-1\n"));
    let config = dir.join("ringlink.toml");
    let gw = start_gateway(
        "uring",
        None,
        &["--config", config.to_str().expect("utf-8")],
        &sink_env(&broker),
    );
    gw.eventually("the sink connects", || {
        gw.metric("ringlink_sink_connected") == 1.0
    });

    write_config(
        "\"thermostat.json\", \"light.json\"",
        &format!("{THERMO},t-1\n{LIGHT},lamp-1\n"),
    );
    let (status, body) = gw.http("POST", "/v1/registry/reload", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["added"], json!(1), "{body}");
    let mut lamp = Client::connect(gw.ws).await;
    assert_eq!(lamp.online(LIGHT, "lamp-1").await, 0);

    // A downlink published before the SUBACK is lost, as with any MQTT subscriber: publish
    // one every 200 ms until the lamp sees one.
    let topic = format!("/sys/{LIGHT}/lamp-1/thing/service/property/get");
    let deadline = Instant::now() + Duration::from_secs(10);
    let req = loop {
        assert!(
            Instant::now() < deadline,
            "no broker downlink reached a device of the added product in 10 s"
        );
        sub.publish(&topic, json!({"id": "1", "params": ["power"]}));
        if let Some(req) = lamp.try_recv(Duration::from_millis(200)).await {
            break req;
        }
    };
    assert_eq!(req["method"], "getProperty", "{req}");
    let reply = json!({"code": 0, "messageId": req["messageId"], "payload": {"properties": [{"identifier": "power", "type": "bool", "value": 1}]}});
    lamp.send_text(reply.to_string()).await;
    let got = sub
        .wait(Duration::from_secs(10), "the get reply", |g| {
            g.iter().any(|m| m.topic == format!("{topic}_reply"))
        })
        .await;
    let answer = got
        .iter()
        .find(|m| m.topic == format!("{topic}_reply"))
        .expect("reply");
    assert_eq!(answer.body["data"], json!({"power": 1}), "{}", answer.body);
}

/// Waits until the forwarder has nothing left, saying where it stands if it does not.
fn drained(gw: &Gateway, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let backlog = gw.metric("ringlink_sink_backlog_records");
        let inflight = gw.metric("ringlink_sink_inflight");
        if backlog == 0.0 && inflight == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained after {within:?}: backlog {backlog}, in flight {inflight}, forwarded {}, log records {}, connected {}",
            gw.metric("ringlink_sink_forwarded_total"),
            gw.metric("ringlink_uplink_log_records_total"),
            gw.metric("ringlink_sink_connected"),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn devices_with_a_secret_log_in_and_out_as_signed_sub_devices() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "sub-login").await;
    let dir = support::temp_dir("secrets");
    let secrets = dir.join("secrets.csv");
    std::fs::write(
        &secrets,
        format!(
            "productKey,deviceName,deviceSecret\n{THERMO},{},s3cr3t\n",
            dn(7)
        ),
    )
    .expect("write secrets");
    let mut env = sink_env(&broker);
    env.push((
        "RINGLINK_UPLINK_MQTT_GATEWAY_PRODUCT_KEY",
        "gwPK".to_owned(),
    ));
    env.push((
        "RINGLINK_UPLINK_MQTT_GATEWAY_DEVICE_NAME",
        "gw-1".to_owned(),
    ));
    env.push((
        "RINGLINK_UPLINK_MQTT_DEVICE_SECRETS",
        secrets.display().to_string(),
    ));
    let gw = start_gateway("uring", None, &[], &env);

    let mut dev = Client::connect(gw.ws).await;
    assert_eq!(dev.online(THERMO, &dn(7)).await, 0);
    assert_eq!(dev.online(THERMO, &dn(8)).await, 0);
    dev.close().await;
    let got = sub
        .wait(
            Duration::from_secs(10),
            "topo/add, login, logout, status",
            |g| {
                g.iter()
                    .filter(|m| m.topic.starts_with("/ext/session/"))
                    .count()
                    == 2
                    && g.iter()
                        .filter(|m| m.topic.starts_with("/as/mqtt/status/"))
                        .count()
                        == 2
                    && g.iter().any(|m| m.topic.ends_with("/thing/topo/add"))
            },
        )
        .await;
    let topo = got
        .iter()
        .find(|m| m.topic == "/sys/gwPK/gw-1/thing/topo/add")
        .expect("topo/add");
    assert_eq!(topo.body["method"], "thing.topo.add");
    assert_eq!(topo.body["params"][0]["deviceName"], dn(7));
    let login = got
        .iter()
        .find(|m| m.topic == "/ext/session/gwPK/gw-1/combine/login")
        .expect("login");
    let p = &login.body["params"];
    assert_eq!(p["productKey"], THERMO);
    assert_eq!(p["deviceName"], dn(7));
    assert_eq!(p["signMethod"], "hmacsha256");
    // The sign, recomputed here: HMAC-SHA256(secret, clientId..deviceName..productKey..timestamp).
    let content = format!(
        "clientId{}deviceName{}productKey{}timestamp{}",
        p["clientId"].as_str().expect("clientId"),
        dn(7),
        THERMO,
        p["timestamp"].as_str().expect("timestamp")
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cr3t");
    let want: String = ring::hmac::sign(&key, content.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(p["sign"], want);
    let logout = got
        .iter()
        .find(|m| m.topic == "/ext/session/gwPK/gw-1/combine/logout")
        .expect("logout");
    assert_eq!(
        logout.body["params"],
        json!({"productKey": THERMO, "deviceName": dn(7)})
    );
    // The device without a secret: the status topic, online then offline.
    let status: Vec<&Value> = got
        .iter()
        .filter(|m| m.topic == format!("/as/mqtt/status/{THERMO}/{}", dn(8)))
        .map(|m| &m.body["status"])
        .collect();
    assert_eq!(status, [&json!("online"), &json!("offline")]);
}

/// Devices reporting numbered labels as fast as they are answered, until `stop`; returns the
/// labels each device was answered 0 for.
async fn load(
    ws: std::net::SocketAddr,
    devices: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> BTreeMap<String, Vec<String>> {
    let mut tasks = Vec::new();
    for i in 0..devices {
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let name = dn(i);
            let mut dev = Client::connect(ws).await;
            assert_eq!(dev.online(THERMO, &name).await, 0);
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let label = format!("{i}-{n}");
                let code = dev.report(THERMO, &name, self::label(&label)).await;
                if code == 0 {
                    acked.push(label);
                }
                n += 1;
            }
            (name, acked)
        }));
    }
    let mut out = BTreeMap::new();
    for t in tasks {
        let (name, acked) = t.await.expect("device task");
        out.insert(name, acked);
    }
    out
}

/// Lost = acknowledged labels the subscriber never got; duplicates = labels received more than
/// once. Also checks that first arrivals keep each device's order.
fn tally(acked: &BTreeMap<String, Vec<String>>, got: &[Got]) -> (usize, usize, usize) {
    let (mut lost, mut dups, mut total) = (0, 0, 0);
    for (name, labels) in acked {
        let arrived = labels_of(got, name);
        let mut seen = HashSet::new();
        let mut firsts = Vec::new();
        for l in &arrived {
            if seen.insert(l.clone()) {
                firsts.push(l.clone());
            } else {
                dups += 1;
            }
        }
        let acked_set: HashSet<&String> = labels.iter().collect();
        lost += labels.iter().filter(|l| !seen.contains(*l)).count();
        total += labels.len();
        let in_order: Vec<&String> = firsts.iter().filter(|l| acked_set.contains(l)).collect();
        let want: Vec<&String> = labels.iter().filter(|l| seen.contains(*l)).collect();
        assert_eq!(
            in_order, want,
            "{name}: first arrivals keep the device's order"
        );
    }
    (lost, dups, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_twice_under_load_loses_no_acknowledged_report() {
    let mut broker = Mosquitto::start_with(MosquittoConfig {
        persistence: true,
        ..MosquittoConfig::default()
    });
    let sub = Subscriber::start(&broker, "sub-kill").await;
    // The subscriber's session is on disk before the first kill.
    broker.save();
    let gw = start_gateway("uring", None, &[], &sink_env(&broker));
    gw.eventually("the sink connects", || {
        gw.metric("ringlink_sink_connected") == 1.0
    });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(load(gw.ws, 8, Arc::clone(&stop)));
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.save();
        broker.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.restart();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.await.expect("load");
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 1000, "the load ran: {total} reports acknowledged");

    drained(&gw, Duration::from_secs(30));
    let got = sub
        .wait(Duration::from_secs(20), "every acknowledged report", |g| {
            tally(&acked, g).0 == 0
        })
        .await;
    let (lost, dups, total) = tally(&acked, &got);
    println!(
        "broker kill -9 x2: {total} reports acknowledged, {lost} lost, {dups} duplicates, {} re-sent by ringlink, {} broker connects",
        gw.metric("ringlink_sink_resent_total"),
        gw.metric("ringlink_sink_connects_total"),
    );
    assert_eq!(lost, 0);
    assert!(gw.metric("ringlink_sink_connects_total") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringlink_killed_mid_forwarding_resumes_from_its_cursor() {
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "sub-crash").await;
    // The broker goes away: reports spool in the log meanwhile.
    broker.kill9();
    let mut env = sink_env(&broker);
    env.push(("RINGLINK_UPLINK_MQTT_REPLAY_PER_S", "1000".to_owned()));
    let mut gw = start_gateway("uring", None, &[], &env);
    let (code, _) = gw.http("GET", "/readyz", None);
    assert_eq!(code, 200, "devices are served while the sink is down");

    let mut dev = Client::connect(gw.ws).await;
    assert_eq!(dev.online(THERMO, &dn(2)).await, 0);
    let mut acked = Vec::new();
    for n in 0..3000 {
        let label = format!("c{n}");
        assert_eq!(dev.report(THERMO, &dn(2), self::label(&label)).await, 0);
        acked.push(label);
    }
    assert_eq!(gw.metric("ringlink_sink_connected"), 0.0);
    gw.eventually("the backlog counts every report", || {
        gw.metric("ringlink_sink_backlog_records") >= 3000.0
    });

    // The broker returns; at 1000/s the replay takes 3 s: kill ringlink in the middle of it.
    broker.restart();
    let sub = {
        // The subscriber's session died with the broker (no persistence): subscribe again
        // before anything is replayed.
        drop(sub);
        Subscriber::start(&broker, "sub-crash-2").await
    };
    gw.eventually("forwarding is under way", || {
        gw.metric("ringlink_sink_forwarded_total") >= 500.0
    });
    gw.signal("KILL");
    gw.wait_exit();
    let forwarded_before = sub.snapshot().len();
    assert!(
        forwarded_before < 3002,
        "killed mid-forwarding ({forwarded_before} arrived)"
    );

    let gw2 = start_gateway("uring", Some(&gw.data_dir), &[], &env);
    drained(&gw2, Duration::from_secs(30));
    let acked = BTreeMap::from([(dn(2), acked)]);
    let got = sub
        .wait(Duration::from_secs(20), "every report", |g| {
            tally(&acked, g).0 == 0
        })
        .await;
    let (lost, dups, total) = tally(&acked, &got);
    println!("ringlink kill -9 mid-forwarding: {total} acknowledged, {lost} lost, {dups} duplicates (replayed after the restart)");
    assert_eq!(lost, 0);
    // Replays are bounded by the in-flight window (256) plus what was acknowledged since the
    // cursor was last stored (every 200 ms; at 1000/s, with the turn's and this test's polling
    // slack, under 500), far below the 500+ records forwarded before the kill.
    assert!(dups <= 256 + 500, "{dups} duplicates");
}

/// Reports from one connection, pipelined `depth` deep, until `n` were answered; returns the
/// codes by value.
async fn flood(dev: &mut Client, name: &str, n: usize) -> HashMap<u64, usize> {
    let mut codes = HashMap::new();
    let depth = 32;
    let mut sent = 0;
    let mut answered = 0;
    let filler = "x".repeat(30);
    while answered < n {
        while sent < n && sent - answered < depth {
            let l = format!("{sent:0>2}{filler}");
            dev.request(
                "reportProperty",
                THERMO,
                name,
                json!({"properties": label(&l[..32])}),
            )
            .await;
            sent += 1;
        }
        let reply = dev.recv().await;
        *codes
            .entry(reply["code"].as_u64().expect("code"))
            .or_default() += 1;
        answered += 1;
    }
    codes
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_drops_oldest_or_blocks_as_configured() {
    // 1 MiB segments, a 3 MiB log, one shard, and a broker that is never there.
    let mut broker = Mosquitto::start();
    broker.kill9();
    let caps = [
        ("RINGLINK_UPLINK_SEGMENT_BYTES", "1048576".to_owned()),
        ("RINGLINK_UPLINK_MAX_BYTES", "3145728".to_owned()),
    ];

    // drop_oldest: devices keep getting 0, the oldest unforwarded records go, counted; memory
    // stays flat while 4 times the cap goes through.
    let mut env = sink_env(&broker);
    env.extend(caps.iter().cloned());
    let gw = start_gateway("uring", None, &["--threads", "1"], &env);
    let mut dev = Client::connect(gw.ws).await;
    assert_eq!(dev.online(THERMO, &dn(3)).await, 0);
    let warm = flood(&mut dev, &dn(3), 5_000).await;
    assert_eq!(warm.get(&0), Some(&5_000));
    let rss_before = rss_kib(gw.pid());
    let codes = flood(&mut dev, &dn(3), 60_000).await;
    let rss_after = rss_kib(gw.pid());
    assert_eq!(
        codes.get(&0),
        Some(&60_000),
        "drop_oldest never refuses a device: {codes:?}"
    );
    let dropped = gw.metric("ringlink_sink_dropped_total");
    let log_bytes = gw.metric("ringlink_uplink_log_bytes");
    println!("drop_oldest: 65000 reports, {dropped} dropped, log {log_bytes} bytes, RSS {rss_before} -> {rss_after} KiB");
    assert!(dropped > 20_000.0, "{dropped}");
    assert!(log_bytes <= 3_145_728.0, "{log_bytes}");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    let (code, _) = gw.http("GET", "/readyz", None);
    assert_eq!(code, 200);
    drop(dev);
    drop(gw);

    // block: once full, devices get 100000 and /readyz says 503; when the broker returns and
    // drains the spool, devices get 0 again and nothing acknowledged was dropped.
    let mut env = sink_env(&broker);
    env.extend(caps.iter().cloned());
    env.push(("RINGLINK_UPLINK_ON_FULL", "block".to_owned()));
    env.push(("RINGLINK_UPLINK_MQTT_REPLAY_PER_S", "100000".to_owned()));
    let gw = start_gateway("uring", None, &["--threads", "1"], &env);
    let mut dev = Client::connect(gw.ws).await;
    assert_eq!(dev.online(THERMO, &dn(4)).await, 0);
    let codes = flood(&mut dev, &dn(4), 30_000).await;
    let accepted = codes.get(&0).copied().unwrap_or(0);
    println!("block: {codes:?}");
    assert!(
        codes.get(&100_000).copied().unwrap_or(0) > 0,
        "refused once full: {codes:?}"
    );
    assert!(accepted > 5_000, "{codes:?}");
    assert!(gw.metric("ringlink_uplink_spool_full_refusals_total") > 0.0);
    assert_eq!(gw.metric("ringlink_sink_spool_full"), 1.0);
    assert_eq!(gw.metric("ringlink_sink_dropped_total"), 0.0);
    let (code, _) = gw.http("GET", "/readyz", None);
    assert_eq!(code, 503, "sink down and spool full");

    broker.restart();
    let sub = Subscriber::start(&broker, "sub-full").await;
    drained(&gw, Duration::from_secs(30));
    assert_eq!(dev.report(THERMO, &dn(4), label("after")).await, 0);
    let (code, _) = gw.http("GET", "/readyz", None);
    assert_eq!(code, 200);
    // Every accepted report, the online and the one after: nothing was dropped.
    let want = (accepted + 2) as f64;
    gw.eventually("everything is forwarded", || {
        gw.metric("ringlink_sink_forwarded_total") == want
    });
    drop(sub);
}
