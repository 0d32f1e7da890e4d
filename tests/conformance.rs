//! PROTOCOL.md section 14 against the real server, on both IO drivers, with an independent
//! client (tokio-tungstenite) and raw TCP where a client library would hide the bytes.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;

use support::{Client, Gateway, DRIVERS, THERMO};

/// Runs an async test body once per driver, each against its own gateway.
macro_rules! on_both_drivers {
    ($name:ident, |$gw:ident| $body:block) => {
        #[test]
        fn $name() {
            for io in DRIVERS {
                let $gw = Gateway::start(io);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async { $body });
                drop($gw);
            }
        }
    };
}

/// Sends a raw upgrade request and returns the response head.
fn raw_upgrade(gw: &Gateway, extra_headers: &str, version: &str) -> String {
    let mut s = TcpStream::connect(gw.ws).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET // HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n{extra_headers}\r\n"
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

on_both_drivers!(c01_to_c05_handshake, |gw| {
    let r = raw_upgrade(
        &gw,
        "Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n",
        "13",
    );
    assert!(r.starts_with("http/1.1 101"), "{r}");
    assert!(
        r.contains("sec-websocket-protocol: alibaba-iot-linkedge-protocol\r\n"),
        "{r}"
    );
    assert!(
        r.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{r}"
    );
    let r = raw_upgrade(&gw, "", "13");
    assert!(
        r.starts_with("http/1.1 101") && !r.contains("sec-websocket-protocol"),
        "{r}"
    );
    let r = raw_upgrade(
        &gw,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        "13",
    );
    assert!(
        r.starts_with("http/1.1 101") && !r.contains("sec-websocket-extensions"),
        "{r}"
    );
    let r = raw_upgrade(&gw, "", "8");
    assert!(
        r.starts_with("http/1.1 426") && r.contains("sec-websocket-version: 13"),
        "{r}"
    );
});

on_both_drivers!(c06_to_c14_framing_and_envelopes, |gw| {
    let mut c = Client::connect(gw.ws).await;
    // One NUL (6), then two NULs, spaces and a newline (7).
    assert_eq!(c.online(THERMO, "thermo-00001").await, 0);
    c.send_text("{\"version\":\"1.0\",\"messageId\":5,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00001\"}}\0\0  \n").await;
    assert_eq!(
        c.recv().await,
        json!({"code":0,"message":"Success","messageId":5,"payload":{}})
    );
    // BINARY (8).
    c.send_binary(b"{\"messageId\":6,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00001\"}}\0".to_vec()).await;
    assert_eq!(c.recv().await["messageId"], 6);
    // Fragmented (9).
    let text = b"{\"version\":\"v0.2\",\"messageId\":7,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00001\"}}\0";
    let (a, b) = text.split_at(40);
    let first = Frame::from_payload(
        FrameHeader {
            is_final: false,
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        },
        a.to_vec().into(),
    );
    let rest = Frame::from_payload(
        FrameHeader {
            is_final: true,
            opcode: OpCode::Data(Data::Continue),
            ..FrameHeader::default()
        },
        b.to_vec().into(),
    );
    c.ws.send(Message::Frame(first)).await.expect("send");
    c.ws.send(Message::Frame(rest)).await.expect("send");
    assert_eq!(
        c.recv().await,
        json!({"code":0,"message":"Success","messageId":7,"payload":{}})
    );
    // Not JSON (12), v0.1 (13), unknown methods (14).
    c.send_text("hello\0").await;
    assert_eq!(
        c.recv().await,
        json!({"code":109007,"message":"JSON format error","messageId":0,"payload":{}})
    );
    c.send_text(r#"{"msgId":3,"deviceId":"thermo-00001","productKey":"a1ThermoPK0","method":"registerDevice"}"#).await;
    let r = c.recv().await;
    assert_eq!(
        (r["code"].clone(), r["messageId"].clone()),
        (json!(100_001), json!(0))
    );
    assert_eq!(
        c.call("registerDevice", THERMO, "thermo-00001", json!({}))
            .await,
        100_001
    );
    assert_eq!(
        c.call("getProperty", THERMO, "thermo-00001", json!({}))
            .await,
        100_001
    );
});

on_both_drivers!(c15_c17_c18_c20_c21_online_offline_and_ids, |gw| {
    let mut c = Client::connect(gw.ws).await;
    assert_eq!(c.online(THERMO, "nobody").await, 109_000);
    let power = json!([{"identifier":"power","type":"bool","value":1}]);
    assert_eq!(
        c.report(THERMO, "thermo-00002", power.clone()).await,
        109_001
    );
    // Ids that start high, repeat, or are 0 are echoed unchanged.
    for id in [4711u64, 4711, 0, 4_294_967_295] {
        c.send_text(format!("{{\"messageId\":{id},\"method\":\"onlineDevice\",\"payload\":{{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00002\"}}}}\0")).await;
        assert_eq!(
            c.recv().await,
            json!({"code":0,"message":"Success","messageId":id,"payload":{}})
        );
    }
    assert!(gw.is_online(THERMO, "thermo-00002"));
    assert_eq!(c.report(THERMO, "thermo-00002", power).await, 0);
    assert_eq!(
        c.call("offlineDevice", THERMO, "thermo-00002", json!({}))
            .await,
        0
    );
    assert!(!gw.is_online(THERMO, "thermo-00002"));
    assert_eq!(
        c.call("offlineDevice", THERMO, "thermo-00002", json!({}))
            .await,
        0
    );
});

on_both_drivers!(c23_to_c27_reports_reach_the_shadow_normalised, |gw| {
    let mut c = Client::connect(gw.ws).await;
    assert_eq!(c.online(THERMO, "thermo-00003").await, 0);
    let bad = [
        (
            json!([{"identifier":"nope","type":"int","value":1}]),
            109_002,
        ),
        (
            json!([{"identifier":"setpoint","type":"int","value":20}]),
            109_008,
        ),
        (
            json!([{"identifier":"setpoint","type":"float","value":99}]),
            100_007,
        ),
        (
            json!([{"identifier":"power","type":"bool","value":2}]),
            100_007,
        ),
    ];
    for (items, code) in bad {
        assert_eq!(
            c.report(THERMO, "thermo-00003", items.clone()).await,
            code,
            "{items}"
        );
    }
    let ok = json!([{"identifier":"setpoint","type":"float","value":21},
                    {"identifier":"power","type":"bool","value":true},
                    {"identifier":"mode","type":5,"value":1}]);
    assert_eq!(c.report(THERMO, "thermo-00003", ok).await, 0);
    let shadow = gw.device(THERMO, "thermo-00003");
    assert_eq!(shadow["properties"]["setpoint"]["value"], json!(21.0));
    assert_eq!(shadow["properties"]["power"]["value"], json!(1));
    assert_eq!(shadow["properties"]["mode"]["value"], json!(1));
    assert!(
        shadow["properties"]["roomTemp"].is_null(),
        "rejected reports forwarded nothing"
    );
    let event = |ev: &str| json!({"identifier": ev, "outputData": []});
    assert_eq!(
        c.call("reportEvent", THERMO, "thermo-00003", event("post"))
            .await,
        100_001
    );
    assert_eq!(
        c.call("reportEvent", THERMO, "thermo-00003", event("nope"))
            .await,
        100_001
    );
    assert_eq!(
        c.call("reportEvent", THERMO, "thermo-00003", event("overheat"))
            .await,
        0
    );
    assert_eq!(
        gw.device(THERMO, "thermo-00003")["events"][0]["identifier"],
        "overheat"
    );
});

on_both_drivers!(c19_c36_takeover_moves_downlinks_to_the_new_owner, |gw| {
    // Several connections: with two shards, some pairs are on different shards.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Client::connect(gw.ws).await);
    }
    for c in clients.iter_mut() {
        assert_eq!(c.online(THERMO, "thermo-00004").await, 0);
    }
    let power = json!([{"identifier":"power","type":"bool","value":1}]);
    for c in clients[..5].iter_mut() {
        assert_eq!(
            c.report(THERMO, "thermo-00004", power.clone()).await,
            109_001
        );
    }
    let last = clients.last_mut().expect("six clients");
    assert_eq!(last.report(THERMO, "thermo-00004", power).await, 0);
    // A downlink reaches only the owner.
    let api = gw.api;
    let get = tokio::task::spawn_blocking(move || {
        support::ApiClient(api).post(
            "/v1/devices/a1ThermoPK0/thermo-00004/properties/get",
            &json!({"properties":["power"]}),
        )
    });
    let req = last.recv().await;
    assert_eq!(req["method"], "getProperty");
    assert!(req["messageId"]
        .as_u64()
        .is_some_and(|id| (1..=0x7fff_ffff).contains(&id)));
    let reply = json!({"code":0,"messageId":req["messageId"],"payload":{"properties":[{"identifier":"power","type":"bool","value":1}]}});
    last.send_text(format!("{reply}\0\0")).await;
    let (status, body) = get.await.expect("join");
    assert_eq!(
        (status, body),
        (200, json!({"code":0,"properties":{"power":1}}))
    );
    for c in clients[..5].iter_mut() {
        assert!(
            c.try_recv(Duration::from_millis(100)).await.is_none(),
            "only the owner gets downlinks"
        );
    }
});

#[test]
fn c16_client_ip_is_checked_against_the_peer_address() {
    let dir = support::temp_dir("clientip");
    let config = dir.join("ringlink.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nproducts = [{:?}]\n[[registry.device]]\nproduct_key = \"a1ThermoPK0\"\ndevice_name = \"fixed\"\nclient_ip = \"127.0.0.2\"\n",
            support::demo_tsl("thermostat.json")
        ),
    )
    .expect("write config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for io in DRIVERS {
        let gw = Gateway::start_with(io, &["--config", config.to_str().expect("utf-8 path")], &[]);
        rt.block_on(async {
            let mut from_2 = Client::connect_from(gw.ws, Some("127.0.0.2")).await;
            let mut from_1 = Client::connect_from(gw.ws, Some("127.0.0.1")).await;
            assert_eq!(from_1.online(THERMO, "fixed").await, 109_000);
            assert_eq!(from_2.online(THERMO, "fixed").await, 0);
        });
    }
}

on_both_drivers!(c29_to_c35_downlinks_through_the_api, |gw| {
    let mut c = Client::connect(gw.ws).await;
    assert_eq!(c.online(THERMO, "thermo-00005").await, 0);
    let api = support::ApiClient(gw.api);
    // Validation failures never reach the device.
    let path = "/v1/devices/a1ThermoPK0/thermo-00005";
    let cases = [
        (
            "properties/set",
            json!({"properties":{"setpoint":20,"mode":7}}),
            400,
            100_007,
        ),
        (
            "properties/set",
            json!({"properties":{"roomTemp":20}}),
            400,
            109_003,
        ),
        (
            "properties/get",
            json!({"properties":["nope"]}),
            400,
            109_002,
        ),
        ("services/set", json!({"inputData":{}}), 400, 109_005),
        (
            "services/reboot",
            json!({"inputData":{"delay":61}}),
            400,
            109_006,
        ),
    ];
    for (route, body, status, code) in cases {
        let (s, b) = tokio::task::spawn_blocking({
            let p = format!("{path}/{route}");
            move || api.post(&p, &body)
        })
        .await
        .expect("join");
        assert_eq!((s, b["code"].as_u64()), (status, Some(code)), "{route}");
    }
    assert!(
        c.try_recv(Duration::from_millis(100)).await.is_none(),
        "nothing was sent"
    );
    // Offline and unknown devices.
    let (s, b) = tokio::task::spawn_blocking({
        move || {
            api.post(
                "/v1/devices/a1ThermoPK0/thermo-00099/properties/get",
                &json!({"properties":["power"]}),
            )
        }
    })
    .await
    .expect("join");
    assert_eq!((s, b["code"].as_u64()), (409, Some(109_001)));
    let (s, b) = tokio::task::spawn_blocking({
        move || {
            api.post(
                "/v1/devices/a1ThermoPK0/nobody/properties/get",
                &json!({"properties":["power"]}),
            )
        }
    })
    .await
    .expect("join");
    assert_eq!((s, b["code"].as_u64()), (404, Some(109_000)));
    // Three concurrent downlinks answered in reverse order.
    let mut pending = Vec::new();
    for (route, body) in [
        ("properties/set", json!({"properties":{"setpoint":19.5}})),
        ("properties/get", json!({"properties":["mode"]})),
        ("services/reboot", json!({"inputData":{"delay":5}})),
    ] {
        let p = format!("{path}/{route}");
        pending.push(tokio::task::spawn_blocking(move || api.post(&p, &body)));
    }
    let mut requests = Vec::new();
    for _ in 0..3 {
        requests.push(c.recv().await);
    }
    let mut ids = std::collections::HashSet::new();
    for req in requests.iter().rev() {
        assert!(
            ids.insert(req["messageId"].as_u64().expect("id")),
            "ids are unique while pending"
        );
        let payload = match req["method"].as_str() {
            Some("getProperty") => {
                json!({"properties":[{"identifier":"mode","type":"enum","value":2}]})
            }
            Some("callService") => {
                json!({"outputData":[{"identifier":"accepted","type":"bool","value":1}]})
            }
            _ => json!({}),
        };
        let reply = json!({"code":0,"messageId":req["messageId"],"payload":payload});
        c.send_text(format!("{reply}\0\0")).await;
    }
    let results: Vec<(u16, Value)> = futures_util::future::join_all(pending)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .collect();
    assert_eq!(results[0], (200, json!({"code":0})));
    assert_eq!(results[1], (200, json!({"code":0,"properties":{"mode":2}})));
    assert_eq!(
        results[2],
        (200, json!({"code":0,"outputData":{"accepted":1}}))
    );
});

on_both_drivers!(
    c38_tcp_close_without_close_frame_takes_devices_offline,
    |gw| {
        let mut c = Client::connect(gw.ws).await;
        assert_eq!(c.online(THERMO, "thermo-00006").await, 0);
        assert!(gw.is_online(THERMO, "thermo-00006"));
        drop(c); // no close frame: the TCP connection just goes
        gw.eventually("thermo-00006 offline", || {
            !gw.is_online(THERMO, "thermo-00006")
        });
    }
);

on_both_drivers!(sub_gateway_with_500_devices_on_one_socket, |gw| {
    let mut c = Client::connect(gw.ws).await;
    for i in 0..500 {
        assert_eq!(
            c.online(THERMO, &format!("thermo-{:05}", 1000 + i)).await,
            0
        );
    }
    let power = json!([{"identifier":"power","type":"bool","value":0}]);
    for i in 0..500 {
        assert_eq!(
            c.report(THERMO, &format!("thermo-{:05}", 1000 + i), power.clone())
                .await,
            0
        );
    }
    let (_, online) = gw.http("GET", "/v1/devices?online=true", None);
    assert_eq!(online.as_array().map(Vec::len), Some(500));
    c.close().await;
    gw.eventually("all 500 offline", || {
        gw.http("GET", "/v1/devices?online=true", None)
            .1
            .as_array()
            .map(Vec::len)
            == Some(0)
    });
});
