//! The NATS sink with 3 ringlink nodes and a real 3-server NATS JetStream cluster: devices on
//! every node report and a JetStream consumer receives each acknowledged report exactly once
//! across a `kill -9` of a NATS server and of a ringlink node mid-forwarding; a downlink through
//! node 1's API reaches a device on node 3 and its answer comes back, as does one through NATS
//! itself; a device taken over from node 1 to node 2 stops being served on node 1; a killed
//! node's devices are offline everywhere within the configured time.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::nats::NatsCluster;
use support::{Client, Gateway, THERMO};

const NODE_TIMEOUT_MS: u64 = 3_000;
/// Long enough to drop node 3's replays after its restart, short enough that a record nats-server
/// 2.9 lost after staging its id (answered "duplicate, sequence 0") is stored within the wait.
const DUPLICATE_WINDOW_MS: &str = "20000";

fn node(nats: &NatsCluster, name: &str, data: Option<&std::path::Path>) -> Gateway {
    let urls = nats.urls().join(",");
    let timeout = NODE_TIMEOUT_MS.to_string();
    let env = [
        ("RINGLINK_UPLINK_SINK", "nats"),
        ("RINGLINK_UPLINK_NATS_URLS", urls.as_str()),
        ("RINGLINK_UPLINK_NATS_NODE", name),
        ("RINGLINK_UPLINK_NATS_REPLICAS", "3"),
        ("RINGLINK_UPLINK_NATS_NODE_TIMEOUT_MS", timeout.as_str()),
        (
            "RINGLINK_UPLINK_NATS_DUPLICATE_WINDOW_MS",
            DUPLICATE_WINDOW_MS,
        ),
    ];
    match data {
        Some(dir) => Gateway::start_in("uring", dir, &[], &env),
        None => Gateway::start_with("uring", &[], &env),
    }
}

fn dn(i: usize) -> String {
    format!("thermo-{i:05}")
}

fn label(l: &str) -> Value {
    json!([{"identifier": "label", "type": "text", "value": l}])
}

/// A device reporting numbered labels until `stop` or its connection is gone; returns the
/// labels it was answered 0 for.
async fn reporter(gw: std::net::SocketAddr, i: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut dev = Client::connect(gw).await;
    assert_eq!(dev.online(THERMO, &dn(i)).await, 0);
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let l = format!("{i}-{n}");
        let Some(id) = dev
            .try_request(
                "reportProperty",
                THERMO,
                &dn(i),
                json!({"properties": label(&l)}),
            )
            .await
        else {
            break;
        };
        let Some(reply) = dev.try_recv(Duration::from_secs(5)).await else {
            break;
        };
        if reply["messageId"] == json!(id) && reply["code"] == 0 {
            acked.push(l);
        }
        n += 1;
    }
    acked
}

/// Every uplink in the stream, by report label: how many times each is stored. Read with an
/// ordered consumer up to the stream's last sequence: it recreates itself at the next sequence
/// after any gap or error, so a message the server pushed during a NATS leader change is not
/// counted as missing (a fetch cut short by an error would lose the rest of its batch).
async fn stream_labels(urls: &[String]) -> HashMap<String, usize> {
    let client = async_nats::connect(urls).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream("RINGLINK_UP")
        .await
        .expect("the stream exists");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut counts = HashMap::new();
    let (mut seq, mut errors) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seq < last {
        let next = tokio::time::timeout_at(deadline, messages.next())
            .await
            .unwrap_or_else(|_| {
                panic!("read {seq} of {last} stored uplinks in 60 s ({errors} errors)")
            });
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                errors += 1;
                eprintln!("reading the stream: {e} (the consumer goes on)");
                continue;
            }
            None => panic!("the consumer ended at {seq} of {last}"),
        };
        seq = msg.info().expect("a JetStream message").stream_sequence;
        let rec: Value = serde_json::from_slice(&msg.payload).expect("a record line");
        if let Some(l) = rec["values"]["label"].as_str() {
            *counts.entry(l.to_owned()).or_default() += 1;
        }
    }
    counts
}

fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_gateway() {
    let mut nats = NatsCluster::start(3);
    let n1 = node(&nats, "n1", None);
    let n2 = node(&nats, "n2", None);
    let mut n3 = node(&nats, "n3", None);
    for gw in [&n1, &n2, &n3] {
        eventually(
            "every node sees three nodes",
            Duration::from_secs(15),
            || gw.metric("ringlink_nats_nodes_alive") == 3.0,
        );
    }

    // Devices on every node report; a NATS server and then ringlink node 3 are killed with
    // kill -9 meanwhile, and both come back.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, gw) in [&n1, &n2, &n3].iter().enumerate() {
        for d in 0..2 {
            let device = i * 10 + d;
            tasks.push((
                device,
                tokio::spawn(reporter(gw.ws, device, Arc::clone(&stop))),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.kill9(1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nats.restart(1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    n3.signal("KILL");
    n3.wait_exit();
    let n3_dir = n3.data_dir.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (device, t) in tasks {
        acked.insert(device, t.await.expect("reporter"));
    }
    let n3 = node(&nats, "n3", Some(&n3_dir));
    for gw in [&n1, &n2, &n3] {
        eventually(
            "each node forwarded everything",
            Duration::from_secs(30),
            || {
                gw.metric("ringlink_sink_backlog_records") == 0.0
                    && gw.metric("ringlink_sink_inflight") == 0.0
            },
        );
    }
    let counts = stream_labels(&nats.urls()).await;
    let total: usize = acked.values().map(Vec::len).sum();
    let lost = acked
        .values()
        .flatten()
        .filter(|l| !counts.contains_key(*l))
        .count();
    let twice = counts.values().filter(|&&n| n > 1).count();
    let sum = |metric: &str| -> f64 { [&n1, &n2, &n3].iter().map(|g| g.metric(metric)).sum() };
    let dups = sum("ringlink_nats_duplicates_total");
    let unstored = sum("ringlink_nats_unstored_duplicates_total");
    println!(
        "3 nodes: {total} reports acknowledged, {lost} missing from the stream, {twice} stored twice; \
         JetStream dropped {dups} re-published duplicates and called {unstored} publishes \
         duplicates of messages it had not stored"
    );
    assert!(total > 300, "the load ran: {total}");
    let missing: BTreeMap<usize, usize> = acked
        .iter()
        .map(|(d, ls)| (*d, ls.iter().filter(|l| !counts.contains_key(*l)).count()))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        lost, 0,
        "every acknowledged report is in the stream; missing by device: {missing:?}"
    );
    assert_eq!(twice, 0, "and none twice");

    // A downlink through node 1's API to a device on node 3, answered by the device.
    let mut dev3 = Client::connect(n3.ws).await;
    assert_eq!(dev3.online(THERMO, &dn(30)).await, 0);
    // Every node, not just node 1: the NATS request below may be served by any of them, and
    // a node learns the owner from the key-value watch a moment after the online.
    eventually(
        "nodes 1 and 2 see the device online on n3",
        Duration::from_secs(10),
        || {
            [&n1, &n2]
                .iter()
                .all(|gw| gw.device(THERMO, &dn(30))["online"] == json!(true))
        },
    );
    let api = n1.api;
    let call = tokio::task::spawn_blocking(move || {
        support::ApiClient(api).post(
            &format!("/v1/devices/{THERMO}/{}/properties/get", dn(30)),
            &json!({"properties": ["power"]}),
        )
    });
    let req = dev3.recv().await;
    assert_eq!(req["method"], "getProperty", "{req}");
    let reply = json!({"code": 0, "messageId": req["messageId"],
        "payload": {"properties": [{"identifier": "power", "type": "bool", "value": 1}]}});
    dev3.send_text(reply.to_string()).await;
    let (status, body) = call.await.expect("api call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"code": 0, "properties": {"power": 1}}));

    // The same through NATS itself, from outside ringlink.
    let client = async_nats::connect(nats.urls()).await.expect("connect");
    let subject = format!("ringlink.down.{THERMO}.{}.set", dn(30));
    let asked = tokio::spawn(async move {
        client
            .request(
                subject,
                json!({"properties": {"setpoint": 21.5}}).to_string().into(),
            )
            .await
    });
    let req = dev3.recv().await;
    assert_eq!(req["method"], "setProperty", "{req}");
    dev3.send_text(json!({"code": 0, "messageId": req["messageId"], "payload": {}}).to_string())
        .await;
    let answer = asked.await.expect("task").expect("a NATS answer");
    let answer: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(answer, json!({"code": 0}));

    // Takeover from node 1 to node 2: node 1's connection no longer serves the device.
    let mut on1 = Client::connect(n1.ws).await;
    assert_eq!(on1.online(THERMO, &dn(40)).await, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut on2 = Client::connect(n2.ws).await;
    assert_eq!(on2.online(THERMO, &dn(40)).await, 0);
    eventually("node 1 lets the device go", Duration::from_secs(10), || {
        n1.metric("ringlink_nats_takeovers_total") >= 1.0
    });
    assert_eq!(on1.report(THERMO, &dn(40), label("late")).await, 109_001);
    assert_eq!(on2.report(THERMO, &dn(40), label("new")).await, 0);
    let listed = n3.device(THERMO, &dn(40));
    assert_eq!(listed["online"], json!(true));

    // Node 2 dies: its devices are offline cluster-wide within the node timeout.
    let mut n2 = n2;
    n2.signal("KILL");
    n2.wait_exit();
    let killed = Instant::now();
    eventually(
        "node 1 shows node 2's device offline",
        Duration::from_millis(NODE_TIMEOUT_MS * 2),
        || n1.device(THERMO, &dn(40))["online"] == json!(false),
    );
    let after = killed.elapsed();
    println!("a killed node's devices were offline everywhere after {after:?}");
    // Within the configured time (and a little for this test's polling).
    assert!(
        after <= Duration::from_millis(NODE_TIMEOUT_MS + 200),
        "{after:?}"
    );
    let (_, list) = n3.http("GET", "/v1/devices?online=true", None);
    assert!(
        list.as_array()
            .expect("a list")
            .iter()
            .all(|d| d["deviceName"] != dn(40)),
        "the cluster-wide list agrees"
    );
}
