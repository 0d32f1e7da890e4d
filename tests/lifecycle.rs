//! Timers, connection loss, crash recovery and drain, against the real server on both drivers.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use ringlink::uplink::{LocalLog, RecordKind};
use support::{ApiClient, Client, Gateway, DRIVERS, THERMO};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn c30_c31_downlink_timeout_then_connection_loss() {
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &[("RINGLINK_LIMITS_DOWNLINK_TIMEOUT_MS", "300")]);
        let api = ApiClient(gw.api);
        rt().block_on(async {
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(c.online(THERMO, "thermo-00010").await, 0);
            let path = "/v1/devices/a1ThermoPK0/thermo-00010/properties/get";
            // The device never answers: 100006 / 504 after the timeout.
            let started = Instant::now();
            let get = tokio::task::spawn_blocking(move || {
                api.post(path, &json!({"properties":["power"]}))
            });
            let req = c.recv().await;
            let (status, body) = get.await.expect("join");
            assert_eq!(
                (status, body["code"].as_u64()),
                (504, Some(100_006)),
                "{io}"
            );
            assert!(started.elapsed() >= Duration::from_millis(300));
            // A late reply is dropped (and counted).
            c.send_text(format!(
                "{}\0\0",
                json!({"code":0,"messageId":req["messageId"],"payload":{}})
            ))
            .await;
            gw.eventually("unmatched reply counted", || {
                gw.metric("ringlink_replies_unmatched_total") >= 1.0
            });
            // Connection lost with a downlink pending: 100008 / 502 at once, device offline.
            let get = tokio::task::spawn_blocking(move || {
                api.post(path, &json!({"properties":["power"]}))
            });
            let _ = c.recv().await;
            drop(c);
            let (status, body) = get.await.expect("join");
            assert_eq!(
                (status, body["code"].as_u64()),
                (502, Some(100_008)),
                "{io}"
            );
            assert!(!gw.is_online(THERMO, "thermo-00010"));
        });
    }
}

#[test]
fn c37_silent_peer_is_closed_after_the_pong_timeout() {
    let env = [
        ("RINGLINK_LIMITS_PING_INTERVAL_MS", "1000"),
        ("RINGLINK_LIMITS_PONG_TIMEOUT_MS", "2500"),
    ];
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &[], &env);
        rt().block_on(async {
            let mut lively = Client::connect(gw.ws).await;
            let mut silent = Client::connect(gw.ws).await;
            assert_eq!(lively.online(THERMO, "thermo-00011").await, 0);
            assert_eq!(silent.online(THERMO, "thermo-00012").await, 0);
            // `lively` reads (tungstenite answers pings while reading); `silent` does not.
            let until = Instant::now() + Duration::from_millis(3500);
            let mut pings = 0;
            while Instant::now() < until {
                if let Ok(Some(Ok(Message::Ping(_)))) =
                    tokio::time::timeout(Duration::from_millis(50), lively.ws.next()).await
                {
                    pings += 1;
                }
            }
            assert!(pings >= 3, "pings every second, saw {pings}");
            assert!(
                gw.is_online(THERMO, "thermo-00011"),
                "{io}: a ponging peer stays"
            );
            assert!(
                !gw.is_online(THERMO, "thermo-00012"),
                "{io}: a silent peer is dropped"
            );
        });
    }
}

/// kill -9 while clients report as fast as they can, with `fsync = "never"` and `"batch"`:
/// every report that got its success reply is in the log afterwards, the log (a partition per
/// shard) opens cleanly, and each device's reports read back in the order they were sent.
#[test]
fn crash_loses_nothing_acknowledged() {
    for (io, fsync) in DRIVERS
        .into_iter()
        .flat_map(|io| ["never", "batch"].map(|f| (io, f)))
    {
        let mut gw = Gateway::start_with(io, &[], &[("RINGLINK_UPLINK_FSYNC", fsync)]);
        let log_dir = gw.data_dir.join("uplink");
        let acked = rt().block_on(async {
            let mut tasks = Vec::new();
            for conn in 0..4 {
                let addr = gw.ws;
                tasks.push(tokio::spawn(async move {
                    let mut c = Client::connect(addr).await;
                    let dn = format!("thermo-{:05}", 2000 + conn);
                    assert_eq!(c.online(THERMO, &dn).await, 0);
                    let mut acked = Vec::new();
                    // Pipelined: many requests in flight, like a busy sub-gateway.
                    let mut sent = std::collections::HashMap::new();
                    for seq in 0u32.. {
                        let label = format!("c{conn}-{seq}");
                        let report = json!({"properties":[{"identifier":"label","type":"text","value":label}]});
                        let Some(id) = c.try_request("reportProperty", THERMO, &dn, report).await else {
                            return acked; // the server is gone
                        };
                        sent.insert(id, label);
                        if seq % 8 == 7 {
                            for _ in 0..8 {
                                let Some(reply) = c.try_recv(Duration::from_secs(5)).await else {
                                    return acked;
                                };
                                if reply["code"] == 0 {
                                    let id = reply["messageId"].as_u64().expect("id") as u32;
                                    acked.extend(sent.remove(&id));
                                }
                            }
                        }
                    }
                    acked
                }));
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            gw.signal("KILL");
            let mut acked = Vec::new();
            for t in tasks {
                acked.extend(t.await.expect("client task"));
            }
            acked
        });
        let _ = gw.wait_exit();
        assert!(
            acked.len() > 100,
            "{io} fsync {fsync}: the load ran ({} acked)",
            acked.len()
        );
        let records = LocalLog::read_dir(&log_dir).expect("log reads after a crash");
        let logged: HashSet<String> = records
            .iter()
            .filter(|r| r.kind == RecordKind::Property)
            .filter_map(|r| r.values.as_ref()?.get("label")?.as_str().map(str::to_owned))
            .collect();
        let missing: Vec<&String> = acked.iter().filter(|l| !logged.contains(*l)).collect();
        assert!(
            missing.is_empty(),
            "{io} fsync {fsync}: acknowledged but not in the log: {missing:?}"
        );
        // Per device, log order is send order ("c{conn}-{seq}").
        let mut last: std::collections::HashMap<String, u32> = Default::default();
        for r in records.iter().filter(|r| r.kind == RecordKind::Property) {
            let Some(label) = r.values.as_ref().and_then(|v| v.get("label")?.as_str()) else {
                continue;
            };
            let (conn, seq) = label.split_once('-').expect("label");
            let seq: u32 = seq.parse().expect("seq");
            if let Some(prev) = last.insert(conn.to_owned(), seq) {
                assert!(
                    seq > prev,
                    "{io} fsync {fsync}: {label} after {conn}-{prev}"
                );
            }
        }
    }
}

#[test]
fn sigterm_drains_closes_with_1001_and_exits_0() {
    for io in DRIVERS {
        let mut gw = Gateway::start(io);
        let log_dir = gw.data_dir.join("uplink");
        rt().block_on(async {
            let mut c = Client::connect(gw.ws).await;
            assert_eq!(c.online(THERMO, "thermo-00020").await, 0);
            gw.signal("TERM");
            let close = loop {
                match tokio::time::timeout(Duration::from_secs(10), c.ws.next()).await {
                    Ok(Some(Ok(Message::Close(frame)))) => break frame,
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("{io}: expected a close frame, got {other:?}"),
                }
            };
            let code: u16 = close.expect("close frame has a code").code.into();
            assert_eq!(code, 1001, "{io}");
        });
        // Readiness is never 200 again once draining.
        if let Ok((status, _)) = gw.try_http("GET", "/readyz", None) {
            assert_eq!(status, 503, "{io}");
        }
        let status = gw.wait_exit();
        assert!(status.success(), "{io}: exit status {status}");
        let records = LocalLog::read_dir(&log_dir).expect("log");
        let kinds: Vec<RecordKind> = records
            .iter()
            .filter(|r| r.device_name == "thermo-00020")
            .map(|r| r.kind)
            .collect();
        assert_eq!(kinds, vec![RecordKind::Online, RecordKind::Offline], "{io}");
    }
}
