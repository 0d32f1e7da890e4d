#!/usr/bin/env python3
"""Writes deploy/grafana/ringlink.json, the Grafana dashboard for ringlink's /metrics.

The panels are listed below as (title, unit, [(legend, PromQL)]); edit them here and rerun
`python3 deploy/grafana/generate.py`. tests/dashboard.rs checks that every metric a query names
is exported by a running ringlink (local, MQTT and NATS sinks).
"""
import json
import os

SEL = '{instance=~"$instance"}'


def q(expr):
    """Puts the instance selector into every metric of `expr`: `M{}` becomes `M{instance=~...}`
    and `M{labels}` gets it in front of its labels."""
    return expr.replace("{}", SEL).replace('_bucket{part=', '_bucket{instance=~"$instance",part=') \
        .replace('{code!="0"}', '{instance=~"$instance",code!="0"}')


ROWS = [
    ("Connections and devices", [
        ("Connections open", "short", [("open", "sum(ringlink_connections_open{})")]),
        ("Devices", "short", [
            ("online", "sum(ringlink_devices_online{})"),
            ("registered", "sum(ringlink_devices_registered{})"),
        ]),
        ("Connects per second", "ops", [
            ("accepted", "sum(rate(ringlink_connections_accepted_total{}[1m]))"),
            ("rejected (max_connections)", "sum(rate(ringlink_connections_rejected_total{}[1m]))"),
            ("accept errors", "sum(rate(ringlink_accept_errors_total{}[1m]))"),
            ("TLS handshake errors", "sum(rate(ringlink_tls_handshake_errors_total{}[1m]))"),
        ]),
        ("Connections closed per second, by reason", "ops", [
            ("{{reason}}", "sum by (reason) (rate(ringlink_connections_closed_total{}[1m]))"),
        ]),
    ]),
    ("Device traffic", [
        ("Requests per second, by method", "ops", [
            ("{{method}}", "sum by (method) (rate(ringlink_requests_total{}[1m]))"),
        ]),
        ("Error answers per second, by code", "ops", [
            ("{{code}}", 'sum by (code) (rate(ringlink_requests_total{code!="0"}[1m]))'),
        ]),
        ("Uplinks per second, by kind", "ops", [
            ("{{kind}}", "sum by (kind) (rate(ringlink_uplinks_total{}[1m]))"),
        ]),
        ("Protocol trouble per second", "ops", [
            ("WebSocket errors", "sum(rate(ringlink_ws_errors_total{}[1m]))"),
            ("unmatched replies", "sum(rate(ringlink_replies_unmatched_total{}[1m]))"),
            ("reads paused (backpressure)", "sum(rate(ringlink_reads_paused_total{}[1m]))"),
        ]),
    ]),
    ("Downlinks", [
        ("Downlinks per second, by method and code", "ops", [
            ("{{method}} {{code}}", "sum by (method, code) (rate(ringlink_downlinks_total{}[1m]))"),
        ]),
        ("Downlink round trip", "s", [
            ("p50", "histogram_quantile(0.5, sum by (le) (rate(ringlink_downlink_latency_seconds_bucket{}[5m])))"),
            ("p99", "histogram_quantile(0.99, sum by (le) (rate(ringlink_downlink_latency_seconds_bucket{}[5m])))"),
        ]),
    ]),
    ("Uplink log", [
        ("Log size", "bytes", [
            ("log", "sum(ringlink_uplink_log_bytes{})"),
            ("not yet forwarded (spool)", "sum(ringlink_uplink_spool_bytes{})"),
        ]),
        ("Log writes per second", "ops", [
            ("records", "sum(rate(ringlink_uplink_log_records_total{}[1m]))"),
            ("group commits", "sum(rate(ringlink_uplink_log_writes_total{}[1m]))"),
        ]),
        ("Uplink read to acknowledgement (server side)", "s", [
            ("p50 total", 'histogram_quantile(0.5, sum by (le) (rate(ringlink_uplink_ack_seconds_bucket{part="total"}[5m])))'),
            ("p99 total", 'histogram_quantile(0.99, sum by (le) (rate(ringlink_uplink_ack_seconds_bucket{part="total"}[5m])))'),
            ("p99 waiting for the log", 'histogram_quantile(0.99, sum by (le) (rate(ringlink_uplink_ack_seconds_bucket{part="log"}[5m])))'),
            ("p99 the rest", 'histogram_quantile(0.99, sum by (le) (rate(ringlink_uplink_ack_seconds_bucket{part="rest"}[5m])))'),
        ]),
        ("Group commit latency", "s", [
            ("p50", "histogram_quantile(0.5, sum by (le) (rate(ringlink_uplink_commit_seconds_bucket{}[5m])))"),
            ("p99", "histogram_quantile(0.99, sum by (le) (rate(ringlink_uplink_commit_seconds_bucket{}[5m])))"),
        ]),
        ("Records per batch", "short", [
            ("p50", "histogram_quantile(0.5, sum by (le) (rate(ringlink_uplink_batch_records_bucket{}[5m])))"),
            ("p99", "histogram_quantile(0.99, sum by (le) (rate(ringlink_uplink_batch_records_bucket{}[5m])))"),
        ]),
        ("Uplink failures per second", "ops", [
            ("uplinks failed", "sum(rate(ringlink_uplink_failures_total{}[1m]))"),
            ("log write errors", "sum(rate(ringlink_uplink_log_errors_total{}[1m]))"),
            ("refused, spool full", "sum(rate(ringlink_uplink_spool_full_refusals_total{}[1m]))"),
        ]),
    ]),
    ("External sink (MQTT or NATS)", [
        ("Sink connected", "short", [("connected", "min(ringlink_sink_connected{})")]),
        ("Forwarded per second", "ops", [
            ("forwarded", "sum(rate(ringlink_sink_forwarded_total{}[1m]))"),
            ("replayed", "sum(rate(ringlink_sink_replayed_total{}[1m]))"),
            ("re-sent", "sum(rate(ringlink_sink_resent_total{}[1m]))"),
        ]),
        ("Backlog", "short", [
            ("records", "sum(ringlink_sink_backlog_records{})"),
            ("in flight", "sum(ringlink_sink_inflight{})"),
        ]),
        ("Oldest unforwarded record", "s", [("age", "max(ringlink_sink_oldest_unforwarded_seconds{})")]),
        ("Sink losses and refusals", "short", [
            ("dropped (drop_oldest)", "sum(increase(ringlink_sink_dropped_total{}[5m]))"),
            ("bad records", "sum(increase(ringlink_sink_bad_records_total{}[5m]))"),
            ("spool full", "max(ringlink_sink_spool_full{})"),
            ("broker disconnects", "sum(increase(ringlink_sink_disconnects_total{}[5m]))"),
        ]),
        ("Broker downlinks per second", "ops", [
            ("{{topic}} {{code}}", "sum by (topic, code) (rate(ringlink_sink_downlinks_total{}[1m]))"),
        ]),
    ]),
    ("NATS cluster", [
        ("Nodes alive", "short", [
            ("nodes", "max(ringlink_nats_nodes_alive{})"),
            ("connected", "min(ringlink_nats_connected{})"),
        ]),
        ("JetStream publishes per second", "ops", [
            ("published", "sum(rate(ringlink_nats_published_total{}[1m]))"),
            ("errors", "sum(rate(ringlink_nats_publish_errors_total{}[1m]))"),
            ("duplicates", "sum(rate(ringlink_nats_duplicates_total{}[1m]))"),
        ]),
        ("Ownership", "ops", [
            ("takeovers", "sum(rate(ringlink_nats_takeovers_total{}[1m]))"),
            ("KV errors", "sum(rate(ringlink_nats_kv_errors_total{}[1m]))"),
        ]),
        ("Cluster downlinks per second", "ops", [
            ("served here", "sum(rate(ringlink_nats_downlinks_served_total{}[1m]))"),
            ("forwarded to owner", "sum(rate(ringlink_nats_downlinks_forwarded_total{}[1m]))"),
        ]),
    ]),
]


def dashboard():
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row):
            panels.append({
                "type": "timeseries",
                "title": title,
                "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [
                    {"refId": chr(ord("A") + k), "expr": q(expr), "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for k, (legend, expr) in enumerate(targets)
                ],
            })
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "title": "ringlink",
        "uid": "ringlink",
        "description": "ringlink WebSocket device gateway: connections, device traffic, "
                       "downlinks, uplink log, external sink, NATS cluster.",
        "tags": ["ringlink", "iot"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus", "current": {}, "hide": 0},
            {"name": "instance", "type": "query", "label": "instance",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(ringlink_connections_open, instance)",
                       "refId": "instance"},
             "definition": "label_values(ringlink_connections_open, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ringlink.json")
    with open(out, "w") as f:
        json.dump(dashboard(), f, indent=2)
        f.write("\n")
    print("wrote", out)
