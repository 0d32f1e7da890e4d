//! The Grafana dashboard (`deploy/grafana/ringlink.json`) queries only metrics that ringlink
//! exports: every `ringlink_*` name in its queries is declared (`# TYPE`) by the `/metrics` of a
//! running server — one with the MQTT sink (real Mosquitto) and one with the NATS sink (a real
//! one-server JetStream), which between them export every metric there is.

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::broker::Mosquitto;
use support::nats::NatsCluster;
use support::{Client, Gateway, THERMO};

/// Every `ringlink_...` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ringlink_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every query of the dashboard: panel targets and templating variables.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(def) = var["definition"].as_str() {
            out.push(def.to_owned());
        }
    }
    out
}

/// The metrics `/metrics` declares with `# TYPE`, with `_bucket`, `_sum` and `_count` series
/// of every histogram.
fn declared(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// `/metrics` of `gw` after a device came online and reported on it.
fn metrics_with_traffic(gw: &Gateway) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = Client::connect(gw.ws).await;
        assert_eq!(c.online(THERMO, "thermo-00001").await, 0);
        let power = json!([{"identifier": "power", "type": "bool", "value": 1}]);
        assert_eq!(c.report(THERMO, "thermo-00001", power).await, 0);
        c.close().await;
    });
    let (status, text) = gw.try_http("GET", "/metrics", None).expect("metrics");
    assert_eq!(status, 200);
    text
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/ringlink.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("dashboard is JSON");
    let wanted: BTreeSet<String> = queries(&dashboard)
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    assert!(wanted.len() > 30, "the dashboard queries {wanted:?}");

    let broker = Mosquitto::start();
    let mqtt = Gateway::start_with(
        "uring",
        &[],
        &[
            ("RINGLINK_UPLINK_SINK", "mqtt"),
            ("RINGLINK_UPLINK_MQTT_URL", broker.url().as_str()),
        ],
    );
    let mut exported = declared(&metrics_with_traffic(&mqtt));
    drop(mqtt);

    let nats = NatsCluster::start(1);
    let url = nats.url(0);
    let node = Gateway::start_with(
        "epoll",
        &[],
        &[
            ("RINGLINK_UPLINK_SINK", "nats"),
            ("RINGLINK_UPLINK_NATS_URL", url.as_str()),
            ("RINGLINK_UPLINK_NATS_NODE", "dash-1"),
        ],
    );
    node.eventually("the NATS forwarder is up", || {
        node.metric("ringlink_nats_connected") == 1.0
    });
    exported.extend(declared(&metrics_with_traffic(&node)));

    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no server exports: {missing:?}"
    );
}
