use super::*;
use crate::uplink::decode_line;

/// A record line, checked to be one.
fn rec(line: &str) -> &[u8] {
    decode_line(line.as_bytes()).expect("a record line");
    line.as_bytes()
}

fn body(v: &[u8]) -> Value {
    serde_json::from_slice(v).expect("JSON body")
}

#[test]
fn property_report_is_a_property_post_with_value_and_time() {
    let r = rec(
        r#"{"t":1732570000123,"pk":"a1ThermoPK0","dn":"thermo-01","kind":"property","values":{"roomTemp":21.0,"power":1}}"#,
    );
    let mut b = Vec::new();
    let topic = uplink("", None, r, 7, &mut b).expect("a record");
    assert_eq!(
        topic,
        "/sys/a1ThermoPK0/thermo-01/thing/event/property/post"
    );
    assert_eq!(
        body(&b),
        serde_json::json!({
            "id": "7", "version": "1.0", "method": "thing.event.property.post",
            "params": {
                "roomTemp": {"value": 21.0, "time": 1732570000123u64},
                "power": {"value": 1, "time": 1732570000123u64},
            }
        })
    );
    // Floats keep their decimal point on the wire (PROTOCOL.md section 13).
    let text = String::from_utf8(b).expect("utf8");
    assert!(text.contains(r#""value":21.0"#), "{text}");
}

#[test]
fn event_report_is_an_event_post_on_its_own_topic() {
    let r =
        rec(r#"{"t":5,"pk":"pk1","dn":"d 1","kind":"event","event":"alarm","values":{"level":2}}"#);
    let mut b = Vec::new();
    let topic = uplink("site-3", None, r, 4_294_967_295, &mut b).expect("a record");
    assert_eq!(topic, "site-3/sys/pk1/d 1/thing/event/alarm/post");
    assert_eq!(
        body(&b),
        serde_json::json!({
            "id": "4294967295", "version": "1.0", "method": "thing.event.alarm.post",
            "params": {"value": {"level": 2}, "time": 5}
        })
    );
}

#[test]
fn online_and_offline_go_to_the_status_topic() {
    let mut b = Vec::new();
    let on = rec(r#"{"t":9,"pk":"pk1","dn":"d1","kind":"online","peer":"10.0.0.7:40312"}"#);
    assert_eq!(
        uplink("", None, on, 1, &mut b).expect("a record"),
        "/as/mqtt/status/pk1/d1"
    );
    assert_eq!(
        body(&b),
        serde_json::json!({"status":"online","productKey":"pk1","deviceName":"d1","time":9,"clientIp":"10.0.0.7"})
    );
    let off = rec(r#"{"t":10,"pk":"pk1","dn":"d1","kind":"offline"}"#);
    assert_eq!(
        uplink("", None, off, 2, &mut b).expect("a record"),
        "/as/mqtt/status/pk1/d1"
    );
    assert_eq!(
        body(&b),
        serde_json::json!({"status":"offline","productKey":"pk1","deviceName":"d1","time":10})
    );
}

#[test]
fn subscriptions_are_wildcards_per_product() {
    let subs: Vec<String> = subscriptions("", ["pkA", "pkB"]).collect();
    assert_eq!(subs.len(), 8);
    assert!(subs.contains(&"/sys/pkA/+/thing/service/property/set".to_owned()));
    assert!(subs.contains(&"/sys/pkB/+/rrpc/request/+".to_owned()));
}

#[test]
fn set_get_and_service_requests_parse_with_their_reply_topics() {
    let set = parse_downlink(
        "",
        "/sys/pk/dn/thing/service/property/set",
        br#"{"id":"11","version":"1.0","params":{"power":1},"method":"thing.service.property.set"}"#,
    )
    .expect("valid")
    .expect("a downlink");
    assert_eq!(set.request, DownlinkRequest::SetProperty);
    assert_eq!(set.params, br#"{"power":1}"#);
    assert_eq!(set.id, "11");
    assert_eq!(
        set.reply_topic,
        "/sys/pk/dn/thing/service/property/set_reply"
    );
    assert_eq!(
        (set.product_key.as_str(), set.device_name.as_str()),
        ("pk", "dn")
    );

    let get = parse_downlink(
        "",
        "/sys/pk/dn/thing/service/property/get",
        br#"{"id":12,"params":["a","b"]}"#,
    )
    .expect("valid")
    .expect("a downlink");
    assert_eq!(get.request, DownlinkRequest::GetProperty);
    assert_eq!(get.params, br#"["a","b"]"#);
    assert_eq!(get.id, "12");

    let call = parse_downlink(
        "p",
        "p/sys/pk/dn/thing/service/reboot",
        br#"{"id":"13","params":{"delay":2}}"#,
    )
    .expect("valid")
    .expect("a downlink");
    assert_eq!(call.request, DownlinkRequest::CallService("reboot".into()));
    assert_eq!(call.reply_topic, "p/sys/pk/dn/thing/service/reboot_reply");

    let rrpc = parse_downlink(
        "",
        "/sys/pk/dn/rrpc/request/1234567",
        br#"{"id":"14","params":{},"method":"thing.service.reboot"}"#,
    )
    .expect("valid")
    .expect("a downlink");
    assert_eq!(rrpc.request, DownlinkRequest::CallService("reboot".into()));
    assert_eq!(rrpc.reply_topic, "/sys/pk/dn/rrpc/response/1234567");
    assert_eq!(rrpc.via, "rrpc");
}

#[test]
fn replies_and_foreign_topics_are_not_downlinks() {
    for topic in [
        "/sys/pk/dn/thing/service/reboot_reply",
        "/sys/pk/dn/thing/service/property/set_reply",
        "/sys/pk/dn/thing/event/property/post",
        "/other/pk/dn/thing/service/x",
        "/sys/pk/dn/rrpc/response/1",
    ] {
        assert_eq!(parse_downlink("", topic, b"{}"), Ok(None), "{topic}");
    }
}

#[test]
fn bad_bodies_are_rejected_with_a_reply() {
    let e =
        parse_downlink("", "/sys/pk/dn/thing/service/property/set", b"not json").expect_err("bad");
    assert_eq!((e.code, e.id.as_str()), (Code::JsonFormat, "0"));
    assert_eq!(e.reply_topic, "/sys/pk/dn/thing/service/property/set_reply");
    let e = parse_downlink(
        "",
        "/sys/pk/dn/thing/service/property/get",
        br#"{"id":"5","params":{"a":1}}"#,
    )
    .expect_err("bad");
    assert_eq!((e.code, e.id.as_str()), (Code::InvalidParameter, "5"));
    let e = parse_downlink(
        "",
        "/sys/pk/dn/rrpc/request/9",
        br#"{"id":"6","method":"thing.event.x.post"}"#,
    )
    .expect_err("bad");
    assert_eq!(e.reply_topic, "/sys/pk/dn/rrpc/response/9");
}

#[test]
fn reply_bodies_map_codes() {
    let mut out = Vec::new();
    reply("11", Code::Success, Some(r#"{"power":1}"#), &mut out);
    assert_eq!(
        body(&out),
        serde_json::json!({"id":"11","code":200,"data":{"power":1},"message":"success"})
    );
    reply("12", Code::Timeout, None, &mut out);
    assert_eq!(body(&out)["code"], 100006);
    assert_eq!(body(&out)["message"], Code::Timeout.message());
    reply("13", Code::ServiceUnreachable, None, &mut out);
    assert_eq!(body(&out)["code"], 100008);
    reply("14", Code::DeviceOffline, None, &mut out);
    assert_eq!(body(&out)["code"], 109001);
}

fn gateway() -> Gateway {
    let secrets =
        parse_secrets("productKey,deviceName,deviceSecret\npk1, dn1 ,secret123\n# none\n\n")
            .expect("valid");
    Gateway {
        product_key: "gwPK".into(),
        device_name: "gw-1".into(),
        secrets,
    }
}

#[test]
fn sign_is_hmac_sha256_of_the_alink_content() {
    // python3: hmac.new(b"secret123", b"clientIdpk1&dn1deviceNamedn1productKeypk1timestamp1700000000000", sha256)
    assert_eq!(
        sign("secret123", "pk1&dn1", "pk1", "dn1", "1700000000000"),
        "90b96ec185fafece5860ac59d0180e58b23c36c5f3a0171ad5e9ea8731f65ad7"
    );
}

#[test]
fn devices_with_a_secret_log_in_and_out_through_the_gateway_session() {
    let gw = gateway();
    let mut b = Vec::new();
    let on =
        rec(r#"{"t":1700000000000,"pk":"pk1","dn":"dn1","kind":"online","peer":"10.0.0.7:1"}"#);
    assert_eq!(
        uplink("", Some(&gw), on, 5, &mut b).expect("a record"),
        "/ext/session/gwPK/gw-1/combine/login"
    );
    assert_eq!(
        body(&b),
        serde_json::json!({"id": "5", "params": {
            "productKey": "pk1", "deviceName": "dn1", "clientId": "pk1&dn1",
            "timestamp": "1700000000000", "signMethod": "hmacsha256", "cleanSession": "true",
            "sign": "90b96ec185fafece5860ac59d0180e58b23c36c5f3a0171ad5e9ea8731f65ad7",
        }})
    );
    let off = rec(r#"{"t":1,"pk":"pk1","dn":"dn1","kind":"offline"}"#);
    assert_eq!(
        uplink("p", Some(&gw), off, 6, &mut b).expect("a record"),
        "p/ext/session/gwPK/gw-1/combine/logout"
    );
    assert_eq!(
        body(&b),
        serde_json::json!({"id": "6", "params": {"productKey": "pk1", "deviceName": "dn1"}})
    );
    // A device without a secret keeps the status topic.
    let other = rec(r#"{"t":1,"pk":"pk1","dn":"dn2","kind":"offline"}"#);
    assert_eq!(
        uplink("", Some(&gw), other, 7, &mut b).expect("a record"),
        "/as/mqtt/status/pk1/dn2"
    );

    let topic = topo_add(
        "",
        &gw,
        &[("pk1", "dn1", "secret123")],
        8,
        1_700_000_000_000,
        &mut b,
    );
    assert_eq!(topic, "/sys/gwPK/gw-1/thing/topo/add");
    let t = body(&b);
    assert_eq!(t["method"], "thing.topo.add");
    assert_eq!(
        t["params"][0]["sign"],
        "90b96ec185fafece5860ac59d0180e58b23c36c5f3a0171ad5e9ea8731f65ad7"
    );
}

#[test]
fn bad_secret_lines_are_reported_with_their_numbers() {
    let e = parse_secrets("pk,dn\npk,dn,s\npk,dn,t\n,x,y\n").expect_err("bad");
    assert_eq!(
        e,
        vec![
            (1, "expected productKey,deviceName,deviceSecret".to_owned()),
            (3, "pk/dn is listed twice".to_owned()),
            (4, "expected productKey,deviceName,deviceSecret".to_owned()),
        ]
    );
}

#[test]
fn the_borrowed_path_and_the_full_decode_give_the_same_message() {
    let lines = [
        r#"{"t":7,"pk":"pk","dn":"dn","kind":"property","values":{"a":1,"b":2.0,"s":"x\"y","o":{"lo":1}}}"#,
        r#"{"t":8,"pk":"pk","dn":"dn","kind":"event","event":"alarm","values":{"level":2}}"#,
        // An escaped key or name: not borrowable, decoded in full.
        r#"{"t":9,"pk":"pk","dn":"d\u0041","kind":"property","values":{"k\"":1}}"#,
    ];
    for line in lines {
        let mut fast = Vec::new();
        let t1 = uplink("", None, line.as_bytes(), 3, &mut fast).expect("record");
        let mut slow = Vec::new();
        let t2 = uplink_record(
            "",
            None,
            &decode_line(line.as_bytes()).expect("decodes"),
            3,
            &mut slow,
        );
        assert_eq!(t1, t2, "{line}");
        assert_eq!(body(&fast), body(&slow), "{line}");
    }
    assert!(uplink("", None, b"{\"t\":1}", 1, &mut Vec::new()).is_err());
}
