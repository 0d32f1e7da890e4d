//! Session tests in simulated time: a client-role `ws::Conn` talks to the session through
//! in-memory buffers; the clock only moves when a test moves it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::model::ThingModel;
use crate::registry::Registry;

/// A product with a write-only property, for 109004 (neither test TSL has one).
const WRITE_ONLY_TSL: &str = r#"{"profile":{"productKey":"a1WriteOnly"},
  "properties":[{"identifier":"secret","name":"s","accessMode":"w","dataType":{"type":"int","specs":{"min":"0","max":"9","step":"1"}}},
                {"identifier":"level","name":"l","accessMode":"rw","dataType":{"type":"int","specs":{"min":"0","max":"9","step":"1"}}},
                {"identifier":"blob","name":"b","accessMode":"rw","dataType":{"type":"text","specs":{"length":"4096"}}}],
  "events":[],"services":[]}"#;

fn registry() -> Registry {
    let mut b = Registry::builder();
    for m in crate::registry::tests::models() {
        b.add_product(m).expect("distinct products");
    }
    b.add_product(ThingModel::from_slice(WRITE_ONLY_TSL.as_bytes()).expect("loads"))
        .expect("distinct");
    b.add_device("a1ThermoPK0", "thermo-01", Some(ip("127.0.0.2")))
        .expect("new");
    for i in 2..=600 {
        b.add_device("a1ThermoPK0", &format!("thermo-{i:02}"), None)
            .expect("new");
    }
    b.add_device("a1LightPK00", "lamp-1", None).expect("new");
    b.add_device("a1WriteOnly", "w-1", None).expect("new");
    b.build()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn context(config: Config) -> Arc<Context> {
    Arc::new(Context {
        registry: Arc::new(registry()),
        config,
    })
}

/// A session and a client talking to it, with a virtual clock.
struct Harness {
    session: Session,
    shard: ShardState,
    client: ws::Conn,
    now: Instant,
    /// Bytes sent by the client and not yet consumed by the session.
    to_server: Vec<u8>,
    /// Bytes sent by the session and not yet consumed by the client.
    to_client: Vec<u8>,
    /// What the client received: text messages, and "ping" for pings answered.
    pings_seen: usize,
    closed_by_server: Option<Option<u16>>,
    events: Vec<Event>,
    auto_ack: bool,
    /// Ack tokens not acked yet, when `auto_ack` is off.
    held: Vec<AckToken>,
}

impl Harness {
    fn new() -> Self {
        Self::with(Config::default(), ip("127.0.0.1"))
    }

    fn with(config: Config, peer: IpAddr) -> Self {
        Self::on(context(config), peer, Arc::new(Alone))
    }

    fn on(ctx: Arc<Context>, peer: IpAddr, presence: Arc<dyn Presence>) -> Self {
        let now = Instant::now();
        let mut h = Self {
            session: Session::new(ctx, peer, now),
            shard: ShardState::new(presence),
            client: ws::Conn::client(ws::Limits::default()),
            now,
            to_server: Vec::new(),
            to_client: Vec::new(),
            pings_seen: 0,
            closed_by_server: None,
            events: Vec::new(),
            auto_ack: true,
            held: Vec::new(),
        };
        let mut req = Vec::new();
        ws::handshake::write_request(
            &mut req,
            "127.0.0.1",
            "//",
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("alibaba-iot-linkedge-protocol"),
        );
        h.feed(&req);
        let mut out = Vec::new();
        h.session.poll_transmit(&mut out);
        let text = String::from_utf8(out).expect("HTTP response is text");
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(h.session.is_open());
        h
    }

    /// Feeds raw bytes to the session, as a driver would, then drains what it produced.
    fn feed(&mut self, bytes: &[u8]) {
        self.to_server.extend_from_slice(bytes);
        let n = self
            .session
            .handle_input(&mut self.to_server, self.now, &mut self.shard);
        self.to_server.drain(..n);
        self.drain_events();
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.session.poll_event() {
            let ack = match &e {
                Event::Online { ack, .. } | Event::Offline { ack, .. } => *ack,
                Event::Uplink { ack, .. } => Some(*ack),
                Event::DownlinkDone { .. } => None,
            };
            self.events.push(e);
            match (self.auto_ack, ack) {
                (true, Some(token)) => self.session.ack(token, Code::Success),
                (false, Some(token)) => self.held.push(token),
                _ => {}
            }
        }
    }

    /// Sends one TEXT message from the client.
    fn send(&mut self, text: &str) {
        let mut frame = Vec::new();
        self.client.send_text(&mut frame, text.as_bytes());
        self.feed(&frame);
    }

    /// Every message the session sent since the last call, as text (asserting TEXT frames).
    fn recv(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.session.poll_transmit(&mut out);
        self.to_client.extend_from_slice(&out);
        let mut texts = Vec::new();
        let mut pong = Vec::new();
        loop {
            match self.client.read(&mut self.to_client, &mut pong) {
                Ok(ws::Event::NeedMore) => break,
                Ok(ws::Event::Message {
                    consumed,
                    binary,
                    data,
                }) => {
                    assert!(!binary, "ringlink sends TEXT frames only");
                    let text = String::from_utf8(data.to_vec()).expect("TEXT is UTF-8");
                    assert!(!text.ends_with('\0'), "no trailing NUL: {text:?}");
                    texts.push(text);
                    self.to_client.drain(..consumed);
                }
                Ok(ws::Event::Consumed(n)) => {
                    self.pings_seen += 1;
                    self.to_client.drain(..n);
                }
                Ok(ws::Event::Pong { consumed }) => {
                    self.to_client.drain(..consumed);
                }
                Ok(ws::Event::Closed { consumed, code }) => {
                    self.closed_by_server = Some(code);
                    self.to_client.drain(..consumed);
                    break;
                }
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
        }
        texts
    }

    /// Sends `text` and returns the single reply, parsed.
    fn request(&mut self, text: &str) -> Value {
        self.send(text);
        let replies = self.recv();
        assert_eq!(replies.len(), 1, "one reply expected, got {replies:?}");
        serde_json::from_str(&replies[0]).expect("reply is JSON")
    }

    fn code_of(&mut self, text: &str) -> u64 {
        self.request(text)["code"].as_u64().expect("numeric code")
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn device(&self, pk: &str, dn: &str) -> DeviceId {
        self.session
            .core
            .ctx
            .registry
            .lookup(pk, dn)
            .expect("registered")
    }

    /// Moves the clock forward by `d`, calling handle_timeout at every deadline on the way.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..10_000 {
            match self.session.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.session.handle_timeout(self.now);
                    self.drain_events();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("livelock: more than 10000 timeouts before the target time");
    }

    fn downlink(&mut self, token: u64, device: DeviceId, request: DownlinkRequest, params: &str) {
        self.session.send_downlink(
            Downlink {
                token,
                device,
                request,
                params: params.as_bytes().to_vec(),
            },
            self.now,
            &mut self.shard,
        );
        self.drain_events();
    }

    fn done(&mut self) -> Vec<(u64, Outcome)> {
        self.take_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::DownlinkDone { token, outcome } => Some((token, outcome)),
                _ => None,
            })
            .collect()
    }
}

fn online(id: u32, dn: &str) -> String {
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"onlineDevice","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}"}}}}"#
    )
}

fn offline(id: u32, dn: &str) -> String {
    online(id, dn).replace("onlineDevice", "offlineDevice")
}

fn report(id: u32, dn: &str, items: &str) -> String {
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"reportProperty","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}","properties":{items}}}}}"#
    )
}

fn event(id: u32, dn: &str, ev: &str, items: &str) -> String {
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"reportEvent","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}","identifier":"{ev}","outputData":{items}}}}}"#
    )
}

fn uplinks(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Uplink { uplink, .. } => Some((
                match &uplink.kind {
                    UplinkKind::Property => "property".to_owned(),
                    UplinkKind::Event(e) => format!("event:{e}"),
                },
                uplink.values.to_string(),
            )),
            _ => None,
        })
        .collect()
}

// ---- conformance checklist items decided by the session (PROTOCOL.md section 14) ----

#[test]
fn c06_c07_requests_with_trailing_nuls_and_whitespace_are_answered() {
    let mut h = Harness::new();
    let r = h.request(&format!("{}\0", online(12, "thermo-02")));
    assert_eq!(
        r,
        json!({"code":0,"message":"Success","messageId":12,"payload":{}})
    );
    let r = h.request(&format!("{}\0\0  \n", online(13, "thermo-02")));
    assert_eq!(r["code"], 0);
    assert_eq!(r["messageId"], 13);
}

#[test]
fn c08_binary_frame_is_answered_like_text() {
    let mut h = Harness::new();
    let mut frame = Vec::new();
    ws::encode::write_frame(
        &mut frame,
        ws::frame::Opcode::Binary,
        true,
        Some([1, 2, 3, 4]),
        online(5, "thermo-02").as_bytes(),
    );
    h.feed(&frame);
    let replies = h.recv();
    assert_eq!(
        replies,
        vec![r#"{"code":0,"message":"Success","messageId":5,"payload":{}}"#]
    );
}

#[test]
fn c09_fragmented_request_is_answered() {
    let mut h = Harness::new();
    let text = online(6, "thermo-02");
    let (a, b) = text.as_bytes().split_at(20);
    let mut frames = Vec::new();
    ws::encode::write_frame(
        &mut frames,
        ws::frame::Opcode::Text,
        false,
        Some([9, 8, 7, 6]),
        a,
    );
    ws::encode::write_frame(
        &mut frames,
        ws::frame::Opcode::Continuation,
        true,
        Some([5, 4, 3, 2]),
        b,
    );
    h.feed(&frames);
    assert_eq!(h.recv().len(), 1);
}

#[test]
fn c11_versions_get_identical_answers() {
    let mut h = Harness::new();
    let base = online(7, "thermo-02");
    let answers: Vec<Value> = [
        base.clone(),
        base.replace(r#""version":"1.0""#, r#""version":"v0.2""#),
        base.replace(r#""version":"1.0","#, ""),
    ]
    .iter()
    .map(|t| h.request(t))
    .collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
}

#[test]
fn c12_c13_c14_bad_envelopes() {
    let mut h = Harness::new();
    assert_eq!(
        h.request("not json\0"),
        json!({"code":109007,"message":"JSON format error","messageId":0,"payload":{}})
    );
    let v01 = r#"{"msgId":3,"deviceId":"thermo-02","productKey":"a1ThermoPK0","method":"registerDevice"}"#;
    let r = h.request(v01);
    assert_eq!(
        (r["code"].as_u64(), r["messageId"].as_u64()),
        (Some(100_001), Some(0))
    );
    for method in ["registerDevice", "getProperty"] {
        let r = h.request(&online(44, "thermo-02").replace("onlineDevice", method));
        assert_eq!(
            (r["code"].as_u64(), r["messageId"].as_u64()),
            (Some(100_001), Some(44))
        );
    }
}

#[test]
fn c15_c16_registry_and_client_ip() {
    let mut h = Harness::new();
    assert_eq!(h.code_of(&online(1, "nobody")), 109_000);
    // thermo-01 may only come online from 127.0.0.2.
    assert_eq!(h.code_of(&online(2, "thermo-01")), 109_000);
    let mut from_allowed = Harness::with(Config::default(), ip("127.0.0.2"));
    assert_eq!(from_allowed.code_of(&online(3, "thermo-01")), 0);
    let mut mapped = Harness::with(Config::default(), ip("::ffff:127.0.0.2"));
    assert_eq!(mapped.code_of(&online(3, "thermo-01")), 0);
}

#[test]
fn c17_c18_client_ids_echoed_unchanged() {
    let mut h = Harness::new();
    for id in [4711u32, 4711, 0, 2_147_483_648, u32::MAX] {
        let r = h.request(&online(id, "thermo-02"));
        assert_eq!(
            r,
            json!({"code":0,"message":"Success","messageId":id,"payload":{}})
        );
    }
}

#[test]
fn c19_takeover_moves_ownership_and_old_owner_gets_109001() {
    let ctx = context(Config::default());
    let mut a = Harness::on(Arc::clone(&ctx), ip("127.0.0.1"), Arc::new(Alone));
    let mut b = Harness::on(ctx, ip("127.0.0.1"), Arc::new(Alone));
    let dev = a.device("a1ThermoPK0", "thermo-02");
    assert_eq!(a.code_of(&online(1, "thermo-02")), 0);
    assert_eq!(b.code_of(&online(1, "thermo-02")), 0);
    // B's online is an ordinary online for the router, which takes the device from A.
    let events = b.take_events();
    assert!(matches!(events[..], [Event::Online { device, ack: Some(_) }] if device == dev));
    a.take_events();
    a.session.handle_taken_over(dev);
    assert_eq!(
        a.code_of(&report(
            2,
            "thermo-02",
            r#"[{"identifier":"power","type":"bool","value":1}]"#
        )),
        109_001
    );
    assert!(
        a.take_events().is_empty(),
        "no offline in between, nothing forwarded"
    );
    assert_eq!(
        b.code_of(&report(
            2,
            "thermo-02",
            r#"[{"identifier":"power","type":"bool","value":1}]"#
        )),
        0
    );
    // A downlink routed to A after the move fails there; B serves it.
    a.downlink(1, dev, DownlinkRequest::GetProperty, r#"["power"]"#);
    assert_eq!(a.done(), vec![(1, Outcome::failed(Code::DeviceOffline))]);
}

#[test]
fn c20_offline_is_idempotent() {
    let mut h = Harness::new();
    let dev = h.device("a1ThermoPK0", "thermo-02");
    assert_eq!(h.code_of(&offline(1, "thermo-02")), 0);
    assert!(h.take_events().is_empty());
    assert_eq!(h.code_of(&online(2, "thermo-02")), 0);
    assert_eq!(h.code_of(&online(3, "thermo-02")), 0);
    assert_eq!(h.take_events().len(), 1, "a second online changes nothing");
    assert_eq!(h.code_of(&offline(4, "thermo-02")), 0);
    let events = h.take_events();
    assert!(matches!(events[..], [Event::Offline { device, ack: Some(_) }] if device == dev));
    assert_eq!(h.code_of(&offline(5, "thermo-02")), 0);
    assert!(h.take_events().is_empty());
    assert_eq!(h.code_of(&offline(6, "nobody")), 109_000);
}

#[test]
fn c21_c22_report_needs_online_unless_auto_online() {
    let power = r#"[{"identifier":"power","type":"bool","value":1}]"#;
    let mut h = Harness::new();
    assert_eq!(h.code_of(&report(1, "thermo-02", power)), 109_001);
    assert!(h.take_events().is_empty());

    let config = Config {
        auto_online_on_report: true,
        ..Config::default()
    };
    let mut h = Harness::with(config.clone(), ip("127.0.0.1"));
    let dev = h.device("a1ThermoPK0", "thermo-02");
    assert_eq!(h.code_of(&report(1, "thermo-02", power)), 0);
    let events = h.take_events();
    assert_eq!(
        events[0],
        Event::Online {
            device: dev,
            ack: None
        }
    );
    assert_eq!(
        uplinks(&events),
        vec![("property".into(), r#"{"power":1}"#.into())]
    );
    assert_eq!(h.session.devices().collect::<Vec<_>>(), vec![dev]);
    // clientIp still applies: thermo-01 is only allowed from 127.0.0.2.
    assert_eq!(h.code_of(&report(2, "thermo-01", power)), 109_001);

    // A device online elsewhere is never taken over by a report.
    struct Everywhere;
    impl Presence for Everywhere {
        fn is_online(&self, _: DeviceId) -> bool {
            true
        }
    }
    let mut h = Harness::on(context(config), ip("127.0.0.1"), Arc::new(Everywhere));
    assert_eq!(h.code_of(&report(1, "thermo-02", power)), 109_001);
}

#[test]
fn c23_bad_reports_forward_nothing() {
    let mut h = Harness::new();
    h.code_of(&online(1, "thermo-02"));
    h.take_events();
    let cases = [
        (r#"[{"identifier":"nope","type":"int","value":1}]"#, 109_002),
        (
            r#"[{"identifier":"setpoint","type":"int","value":20}]"#,
            109_008,
        ),
        (
            r#"[{"identifier":"setpoint","type":"float","value":"20"}]"#,
            109_008,
        ),
        (
            r#"[{"identifier":"setpoint","type":"float","value":35.5}]"#,
            100_007,
        ),
        (r#"[]"#, 100_001),
        (r#"{}"#, 100_001),
        (r#"[{"identifier":"power","value":1}]"#, 100_001),
        // One bad item among good ones rejects the whole report.
        (
            r#"[{"identifier":"power","type":"bool","value":1},{"identifier":"setpoint","type":"float","value":99}]"#,
            100_007,
        ),
        // The earlier check of the table decides, whichever item fails it.
        (
            r#"[{"identifier":"setpoint","type":"float","value":99},{"identifier":"nope","type":"int","value":1}]"#,
            109_002,
        ),
    ];
    for (items, code) in cases {
        assert_eq!(h.code_of(&report(2, "thermo-02", items)), code, "{items}");
        assert!(h.take_events().is_empty(), "nothing forwarded for {items}");
    }
}

/// Numbers no 64-bit value holds are JSON (not 109007): the checks of PROTOCOL.md sections 7
/// and 11.4 decide. Out of an int, enum, bool, float or double range -> 100007; a float literal
/// where an integer is wanted -> 109008 (as 2.0 is); a messageId beyond u32 -> 100001, id 0.
#[test]
fn numbers_beyond_64_bits_get_the_value_codes_not_109007() {
    let mut h = Harness::new();
    h.code_of(&online(1, "thermo-02"));
    h.take_events();
    let huge = "9".repeat(60_000);
    let item = |id: &str, ty: &str, v: &str| {
        format!(r#"[{{"identifier":"{id}","type":"{ty}","value":{v}}}]"#)
    };
    let cases = [
        (item("setpoint", "float", "1e400"), 100_007),
        (item("setpoint", "float", "-1e400"), 100_007),
        (item("setpoint", "float", &huge), 100_007),
        (item("roomTemp", "double", "1e400"), 100_007),
        (item("roomTemp", "double", "18446744073709551616"), 100_007),
        (item("roomTemp", "double", &format!("-{huge}")), 100_007),
        (item("mode", "enum", "18446744073709551616"), 100_007),
        (item("power", "bool", "18446744073709551616"), 100_007),
        (item("week", "array", "[1,18446744073709551616]"), 100_007),
        (item("week", "array", &format!("[{huge}]")), 100_007),
        (item("week", "array", "[1e30]"), 109_008),
        (item("week", "array", "[1e400]"), 109_008),
        (
            item("limits", "struct", r#"{"lo":18446744073709551616}"#),
            100_007,
        ),
        (
            item("limits", "struct", r#"{"lo":-9223372036854775809}"#),
            100_007,
        ),
        (item("limits", "struct", r#"{"lo":1e30}"#), 109_008),
        (item("label", "text", "1e400"), 109_008),
        (item("serviced", "date", "18446744073709551616"), 109_008),
    ];
    for (items, code) in &cases {
        let reply = h.request(&report(2, "thermo-02", items));
        assert_eq!(reply["code"], *code, "{items:.80}");
        assert_eq!(reply["messageId"], 2, "{items:.80}");
        assert!(
            h.take_events().is_empty(),
            "nothing forwarded for {items:.80}"
        );
    }
    // A good report still goes through after the slow path ran.
    assert_eq!(
        h.code_of(&report(3, "thermo-02", &item("setpoint", "float", "21.5"))),
        0
    );
    // messageId beyond u32, beyond 64 bits: 100001 with id 0.
    for id in ["4294967296", "18446744073709551616", "1e400", huge.as_str()] {
        let reply = h.request(
            &online(0, "thermo-02").replace("\"messageId\":0", &format!("\"messageId\":{id}")),
        );
        assert_eq!(
            (reply["code"].as_u64(), reply["messageId"].as_u64()),
            (Some(100_001), Some(0)),
            "{id:.30}"
        );
    }
    // Malformed JSON stays 109007.
    for bad in [
        r#"{"messageId":1e400,"a":01}"#,
        r#"{"messageId":1,"a":1e400"#,
    ] {
        assert_eq!(h.code_of(bad), 109_007, "{bad}");
    }
}

#[test]
fn c24_c25_c26_value_leniency_and_normalisation() {
    let mut h = Harness::new();
    h.code_of(&online(1, "thermo-02"));
    h.take_events();
    let ok = r#"[{"identifier":"setpoint","type":"float","value":21},{"identifier":"power","type":"bool","value":true},{"identifier":"mode","type":5,"value":2},{"identifier":"limits","type":"struct","value":{"lo":1,"hi":30}}]"#;
    assert_eq!(h.code_of(&report(2, "thermo-02", ok)), 0);
    assert_eq!(
        uplinks(&h.take_events()),
        vec![(
            "property".into(),
            r#"{"setpoint":21.0,"power":1,"mode":2,"limits":{"lo":1,"hi":30}}"#.into()
        )]
    );
    let bool2 = r#"[{"identifier":"power","type":"bool","value":2}]"#;
    assert_eq!(h.code_of(&report(3, "thermo-02", bool2)), 100_007);
    let numeric = r#"[{"identifier":"week","type":7,"value":[1,2,3]}]"#;
    assert_eq!(h.code_of(&report(4, "thermo-02", numeric)), 0);
}

#[test]
fn c27_events() {
    let mut h = Harness::new();
    h.code_of(&online(1, "thermo-02"));
    h.take_events();
    assert_eq!(h.code_of(&event(2, "thermo-02", "post", "[]")), 100_001);
    assert_eq!(h.code_of(&event(3, "thermo-02", "nope", "[]")), 100_001);
    assert_eq!(h.code_of(&event(4, "thermo-02", "overheat", "[]")), 0);
    let temp = r#"[{"identifier":"roomTemp","type":"double","value":81}]"#;
    assert_eq!(h.code_of(&event(5, "thermo-02", "overheat", temp)), 0);
    assert_eq!(
        uplinks(&h.take_events()),
        vec![
            ("event:overheat".into(), "{}".into()),
            ("event:overheat".into(), r#"{"roomTemp":81.0}"#.into())
        ]
    );
    let unknown = r#"[{"identifier":"x","type":"double","value":81}]"#;
    assert_eq!(
        h.code_of(&event(6, "thermo-02", "overheat", unknown)),
        109_002
    );
    let hot = r#"[{"identifier":"roomTemp","type":"double","value":126}]"#;
    assert_eq!(h.code_of(&event(7, "thermo-02", "overheat", hot)), 100_007);
    let missing = online(8, "thermo-02").replace("onlineDevice", "reportEvent");
    assert_eq!(h.code_of(&missing), 100_001);
}

#[test]
fn success_replies_wait_for_the_ack_and_keep_arrival_order() {
    let mut h = Harness::new();
    h.auto_ack = false;
    h.send(&online(1, "thermo-02"));
    assert!(h.recv().is_empty(), "no reply before the online is durable");
    h.send(&report(
        2,
        "thermo-02",
        r#"[{"identifier":"power","type":"bool","value":0}]"#,
    ));
    h.send(&online(3, "nobody"));
    h.send(&report(
        4,
        "thermo-02",
        r#"[{"identifier":"power","type":"bool","value":1}]"#,
    ));
    // The error for 3 is ready but waits behind 1 and 2.
    assert!(h.recv().is_empty());
    let [t1, t2, t4] = <[AckToken; 3]>::try_from(std::mem::take(&mut h.held)).expect("three held");
    h.session.ack(t2, Code::Success);
    assert!(h.recv().is_empty(), "1 is still held");
    h.session.ack(t1, Code::Success);
    let ids = |texts: Vec<String>| -> Vec<(u64, u64)> {
        texts
            .iter()
            .map(|t| {
                let v: Value = serde_json::from_str(t).expect("json");
                (
                    v["messageId"].as_u64().expect("id"),
                    v["code"].as_u64().expect("code"),
                )
            })
            .collect()
    };
    assert_eq!(ids(h.recv()), vec![(1, 0), (2, 0), (3, 109_000)]);
    // An uplink that could not be kept is answered with the code given.
    h.session.ack(t4, Code::Unknown);
    assert_eq!(ids(h.recv()), vec![(4, 100_000)]);
    // With nothing held, replies go out at once.
    h.send(&online(5, "nobody"));
    assert_eq!(ids(h.recv()), vec![(5, 109_000)]);
}

// ---- downlinks ----

fn online_thermo(h: &mut Harness) -> DeviceId {
    assert_eq!(h.code_of(&online(1, "thermo-02")), 0);
    h.take_events();
    h.device("a1ThermoPK0", "thermo-02")
}

/// The request the client received, parsed.
fn sent(h: &mut Harness) -> Vec<Value> {
    h.recv()
        .iter()
        .map(|t| serde_json::from_str(t).expect("request is JSON"))
        .collect()
}

#[test]
fn downlink_wire_format_and_reply_data() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    h.downlink(
        1,
        dev,
        DownlinkRequest::SetProperty,
        r#"{"setpoint":19.5,"power":true}"#,
    );
    let req = sent(&mut h).remove(0);
    let id = req["messageId"].as_u64().expect("id");
    assert_eq!(
        req,
        json!({"version":"1.0","method":"setProperty","messageId":id,"payload":{
            "productKey":"a1ThermoPK0","deviceName":"thermo-02",
            "properties":[{"identifier":"setpoint","type":"float","value":19.5},
                          {"identifier":"power","type":"bool","value":1}]}})
    );
    h.send(&format!(
        "{{\"code\":0,\"messageId\":{id},\"payload\":{{}}}}\0\0"
    ));
    assert_eq!(
        h.done(),
        vec![(
            1,
            Outcome {
                code: Code::Success,
                data: None
            }
        )]
    );

    h.downlink(
        2,
        dev,
        DownlinkRequest::GetProperty,
        r#"["setpoint","power"]"#,
    );
    let req = sent(&mut h).remove(0);
    assert_eq!(req["payload"]["properties"], json!(["setpoint", "power"]));
    let id = req["messageId"].as_u64().expect("id");
    h.send(&format!(
        r#"{{"code":0,"messageId":{id},"payload":{{"properties":[{{"identifier":"setpoint","type":"float","value":20}},{{"identifier":"power","type":1,"value":true}}]}}}}"#
    ));
    assert_eq!(
        h.done(),
        vec![(
            2,
            Outcome {
                code: Code::Success,
                data: Some(r#"{"setpoint":20.0,"power":1}"#.into())
            }
        )]
    );

    h.downlink(
        3,
        dev,
        DownlinkRequest::CallService("reboot".into()),
        r#"{"delay":5}"#,
    );
    let req = sent(&mut h).remove(0);
    assert_eq!(req["payload"]["identifier"], "reboot");
    assert_eq!(
        req["payload"]["inputData"],
        json!([{"identifier":"delay","type":"int","value":5}])
    );
    let id = req["messageId"].as_u64().expect("id");
    h.send(&format!(
        r#"{{"code":0,"messageId":{id},"payload":{{"outputData":[{{"identifier":"accepted","type":"bool","value":1}}]}}}}"#
    ));
    assert_eq!(
        h.done(),
        vec![(
            3,
            Outcome {
                code: Code::Success,
                data: Some(r#"{"accepted":1}"#.into())
            }
        )]
    );

    // A client's error code is passed through; a missing list reads as empty.
    h.downlink(4, dev, DownlinkRequest::GetProperty, r#"["mode"]"#);
    let id = sent(&mut h)[0]["messageId"].as_u64().expect("id");
    h.send(&format!(r#"{{"code":109014,"messageId":{id}}}"#));
    assert_eq!(h.done(), vec![(4, Outcome::failed(Code::Other(109_014)))]);
    h.downlink(5, dev, DownlinkRequest::GetProperty, r#"["mode"]"#);
    let id = sent(&mut h)[0]["messageId"].as_u64().expect("id");
    h.send(&format!(r#"{{"code":0,"messageId":{id}}}"#));
    assert_eq!(
        h.done(),
        vec![(
            5,
            Outcome {
                code: Code::Success,
                data: Some("{}".into())
            }
        )]
    );
}

#[test]
fn c28_downlink_ids_stay_in_range_skip_pending_and_never_0() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    h.downlink(1, dev, DownlinkRequest::GetProperty, r#"["power"]"#);
    let first = sent(&mut h)[0]["messageId"].as_u64().expect("id");
    assert_eq!(first, 1);
    // Jump to the top of the range: the next ids wrap to 1, which is still pending, so 2.
    h.session.core.next_id = 0x7fff_fffe;
    let mut ids = Vec::new();
    for token in 2..5 {
        h.downlink(token, dev, DownlinkRequest::GetProperty, r#"["power"]"#);
        ids.push(sent(&mut h)[0]["messageId"].as_u64().expect("id"));
    }
    assert_eq!(ids, vec![0x7fff_ffff, 2, 3]);
}

#[test]
fn c29_out_of_order_replies_complete_the_right_requests() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    let mut ids = Vec::new();
    for (token, prop) in [(10, "power"), (11, "setpoint"), (12, "mode")] {
        h.downlink(
            token,
            dev,
            DownlinkRequest::GetProperty,
            &format!(r#"["{prop}"]"#),
        );
        ids.push((
            token,
            prop,
            sent(&mut h)[0]["messageId"].as_u64().expect("id"),
        ));
    }
    for (_, prop, id) in ids.into_iter().rev() {
        h.send(&format!(
            r#"{{"code":0,"messageId":{id},"payload":{{"properties":[{{"identifier":"{prop}","type":"int","value":1}}]}}}}"#
        ));
    }
    let done = h.done();
    let got: Vec<(u64, String)> = done
        .into_iter()
        .map(|(t, o)| (t, o.data.expect("data").to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (12, r#"{"mode":1}"#.to_owned()),
            (11, r#"{"setpoint":1.0}"#.to_owned()),
            (10, r#"{"power":1}"#.to_owned())
        ]
    );
}

#[test]
fn c30_timeout_after_8s_then_late_reply_dropped() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    h.downlink(1, dev, DownlinkRequest::GetProperty, r#"["power"]"#);
    let id = sent(&mut h)[0]["messageId"].as_u64().expect("id");
    h.advance(Duration::from_millis(7_999));
    assert!(h.done().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.done(), vec![(1, Outcome::failed(Code::Timeout))]);
    h.send(&format!(r#"{{"code":0,"messageId":{id},"payload":{{}}}}"#));
    assert!(h.done().is_empty());
    assert_eq!(h.shard.stats.replies_unmatched, 1);
}

#[test]
fn c31_c38_connection_lost_fails_pending_and_offlines_devices() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    assert_eq!(h.code_of(&online(2, "thermo-03")), 0);
    let dev3 = h.device("a1ThermoPK0", "thermo-03");
    h.take_events();
    h.downlink(1, dev, DownlinkRequest::GetProperty, r#"["power"]"#);
    h.downlink(2, dev3, DownlinkRequest::GetProperty, r#"["power"]"#);
    sent(&mut h);
    h.session.handle_disconnect();
    h.drain_events();
    let mut events = h.take_events();
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            Event::DownlinkDone {
                token: 1,
                outcome: Outcome::failed(Code::ServiceUnreachable)
            },
            Event::DownlinkDone {
                token: 2,
                outcome: Outcome::failed(Code::ServiceUnreachable)
            },
            Event::Offline {
                device: dev,
                ack: None
            },
            Event::Offline {
                device: dev3,
                ack: None
            },
        ]
    );
    assert!(h.session.is_closed());
    assert_eq!(h.session.close_reason(), Some(&CloseReason::Disconnected));
}

#[test]
fn close_frame_from_peer_ends_the_session() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    let mut frame = Vec::new();
    h.client.close(&mut frame, 1000, "bye");
    h.feed(&frame);
    assert_eq!(
        h.take_events(),
        vec![Event::Offline {
            device: dev,
            ack: None
        }]
    );
    assert_eq!(
        h.session.close_reason(),
        Some(&CloseReason::PeerClosed(Some(1000)))
    );
    h.recv();
    assert_eq!(h.closed_by_server, Some(Some(1000)), "the close is echoed");
}

#[test]
fn c32_c33_c34_c35_downlink_validation_sends_nothing() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    let call = |s: &str| DownlinkRequest::CallService(s.into());
    let cases: Vec<(DownlinkRequest, &str, Code)> = vec![
        (
            DownlinkRequest::SetProperty,
            r#"{"setpoint":20,"mode":7}"#,
            Code::OutOfRange,
        ),
        (
            DownlinkRequest::SetProperty,
            r#"{"roomTemp":20}"#,
            Code::PropertyReadOnly,
        ),
        (
            DownlinkRequest::SetProperty,
            r#"{"nope":1}"#,
            Code::PropertyNotExist,
        ),
        (
            DownlinkRequest::SetProperty,
            r#"{"setpoint":"x"}"#,
            Code::ParameterType,
        ),
        (
            DownlinkRequest::SetProperty,
            r#"{}"#,
            Code::InvalidParameter,
        ),
        (
            DownlinkRequest::SetProperty,
            r#"[1]"#,
            Code::InvalidParameter,
        ),
        (
            DownlinkRequest::SetProperty,
            "not json",
            Code::InvalidParameter,
        ),
        (
            DownlinkRequest::GetProperty,
            r#"[]"#,
            Code::InvalidParameter,
        ),
        (
            DownlinkRequest::GetProperty,
            r#"["nope"]"#,
            Code::PropertyNotExist,
        ),
        (
            DownlinkRequest::GetProperty,
            r#"[3]"#,
            Code::InvalidParameter,
        ),
        (call("set"), r#"{}"#, Code::ServiceNotExist),
        (call("get"), r#"{}"#, Code::ServiceNotExist),
        (call("nope"), r#"{}"#, Code::ServiceNotExist),
        (call("reboot"), r#"{}"#, Code::ServiceInputIncorrect),
        (call("reboot"), "", Code::ServiceInputIncorrect),
        (
            call("reboot"),
            r#"{"delay":5,"x":1}"#,
            Code::ServiceInputIncorrect,
        ),
        (
            call("reboot"),
            r#"{"delay":61}"#,
            Code::ServiceInputIncorrect,
        ),
    ];
    for (token, (request, params, code)) in cases.into_iter().enumerate() {
        let token = token as u64;
        h.downlink(token, dev, request.clone(), params);
        assert_eq!(
            h.done(),
            vec![(token, Outcome::failed(code))],
            "{request:?} {params}"
        );
        assert!(h.recv().is_empty(), "nothing sent for {request:?} {params}");
    }
    assert_eq!(h.session.pending_downlinks(), 0);
    // 109004 needs a write-only property.
    let mut w = Harness::new();
    assert_eq!(
        w.code_of(&online(1, "w-1").replace("a1ThermoPK0", "a1WriteOnly")),
        0
    );
    let wdev = w.device("a1WriteOnly", "w-1");
    w.take_events();
    w.downlink(
        1,
        wdev,
        DownlinkRequest::GetProperty,
        r#"["level","secret"]"#,
    );
    assert_eq!(
        w.done(),
        vec![(1, Outcome::failed(Code::PropertyWriteOnly))]
    );
    assert!(w.recv().is_empty());
    // Offline device (not owned here): 109001.
    let other = h.device("a1ThermoPK0", "thermo-09");
    h.downlink(99, other, DownlinkRequest::GetProperty, r#"["power"]"#);
    assert_eq!(h.done(), vec![(99, Outcome::failed(Code::DeviceOffline))]);
}

#[test]
fn set_value_longer_than_the_clients_2047_bytes_is_out_of_range() {
    let mut h = Harness::new();
    assert_eq!(
        h.code_of(&online(1, "w-1").replace("a1ThermoPK0", "a1WriteOnly")),
        0
    );
    let dev = h.device("a1WriteOnly", "w-1");
    h.take_events();
    // The model allows 4096 bytes, the official client only 2047.
    let at_limit = "x".repeat(2047);
    h.downlink(
        1,
        dev,
        DownlinkRequest::SetProperty,
        &format!(r#"{{"blob":"{at_limit}"}}"#),
    );
    assert_eq!(
        sent(&mut h)[0]["payload"]["properties"][0]["value"],
        at_limit
    );
    let over = "x".repeat(2048);
    h.downlink(
        2,
        dev,
        DownlinkRequest::SetProperty,
        &format!(r#"{{"blob":"{over}"}}"#),
    );
    assert_eq!(h.done(), vec![(2, Outcome::failed(Code::OutOfRange))]);
    assert!(h.recv().is_empty());
}

// ---- keepalive and handshake timers ----

#[test]
fn c37_pings_every_30s_and_closes_after_60s_without_pong() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    h.advance(Duration::from_secs(30));
    h.recv();
    assert_eq!(h.pings_seen, 1);
    // The client answers with a pong: the connection lives on.
    let mut pong = Vec::new();
    ws::encode::write_frame(
        &mut pong,
        ws::frame::Opcode::Pong,
        true,
        Some([1, 2, 3, 4]),
        b"",
    );
    h.feed(&pong);
    // Pings at 60 s; at 89 s the last pong (30 s) is 59 s old.
    h.advance(Duration::from_secs(59));
    assert!(!h.session.is_closed());
    h.recv();
    assert_eq!(h.pings_seen, 2);
    // No more pongs: 60 s after the last one the connection is closed.
    h.advance(Duration::from_secs(1));
    assert!(h.session.is_closed());
    assert_eq!(h.session.close_reason(), Some(&CloseReason::PongTimeout));
    assert_eq!(
        h.take_events(),
        vec![Event::Offline {
            device: dev,
            ack: None
        }]
    );
    assert_eq!(h.session.poll_timeout(), None);
}

#[test]
fn handshake_timeout_drops_a_silent_connection() {
    let ctx = context(Config::default());
    let now = Instant::now();
    let mut s = Session::new(ctx, ip("127.0.0.1"), now);
    let mut shard = ShardState::new(Arc::new(Alone));
    let mut partial = b"GET // HTTP/1.1\r\nHost: 1.2.3.4\r\n".to_vec();
    assert_eq!(s.handle_input(&mut partial, now, &mut shard), 0);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(5)));
    s.handle_timeout(now + Duration::from_millis(4_999));
    assert!(!s.is_closed());
    s.handle_timeout(now + Duration::from_secs(5));
    assert_eq!(s.close_reason(), Some(&CloseReason::HandshakeTimeout));
}

// ---- sub-gateway ----

#[test]
fn sub_gateway_carries_500_devices_on_one_connection() {
    let mut h = Harness::new();
    for i in 100..600u32 {
        assert_eq!(h.code_of(&online(i, &format!("thermo-{i:02}"))), 0);
    }
    assert_eq!(h.session.devices().count(), 500);
    let ups = h.take_events();
    assert_eq!(ups.len(), 500);
    for i in 100..600u32 {
        let r = report(
            i,
            &format!("thermo-{i:02}"),
            r#"[{"identifier":"power","type":"bool","value":1}]"#,
        );
        assert_eq!(h.code_of(&r), 0);
    }
    assert_eq!(uplinks(&h.take_events()).len(), 500);
    h.session.handle_disconnect();
    h.drain_events();
    assert_eq!(h.take_events().len(), 500, "one offline per device");
}

#[test]
fn idle_session_is_small() {
    // The product aims at <= 2 KiB of user-space memory per idle connection.
    assert!(size_of::<Session>() <= 512, "{}", size_of::<Session>());
}

// ---- property test: any split of the byte stream gives the same answers ----

fn split_and_feed(stream: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut h = Harness::new();
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    for cut in cuts.into_iter().chain([stream.len()]) {
        h.feed(&stream[start..cut.max(start)]);
        start = cut.max(start);
    }
    h.recv()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn messages_survive_any_split(
        ids in proptest::collection::vec(any::<u32>(), 1..6),
        nuls in proptest::collection::vec(0usize..3, 6),
        binary in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut client = ws::Conn::client(ws::Limits::default());
        let mut stream = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let mut text = if i % 2 == 0 { online(*id, "thermo-02") } else {
                report(*id, "thermo-02", r#"[{"identifier":"setpoint","type":"float","value":21}]"#)
            };
            text.push_str(&"\0".repeat(nuls[i]));
            if binary {
                ws::encode::write_frame(&mut stream, ws::frame::Opcode::Binary, true, Some([7, 7, 1, 3]), text.as_bytes());
            } else {
                client.send_text(&mut stream, text.as_bytes());
            }
        }
        let whole = split_and_feed(&stream, &[]);
        prop_assert_eq!(whole.len(), ids.len());
        let split = split_and_feed(&stream, &cuts);
        prop_assert_eq!(whole, split);
    }
}

#[test]
fn messages_survive_a_split_at_every_byte() {
    let mut client = ws::Conn::client(ws::Limits::default());
    let mut stream = Vec::new();
    client.send_text(
        &mut stream,
        format!("{}\0", online(1, "thermo-02")).as_bytes(),
    );
    client.send_text(
        &mut stream,
        format!(
            "{}\0",
            report(
                2,
                "thermo-02",
                r#"[{"identifier":"power","type":"bool","value":1}]"#
            )
        )
        .as_bytes(),
    );
    let whole = split_and_feed(&stream, &[]);
    assert_eq!(whole.len(), 2);
    for cut in 0..=stream.len() {
        assert_eq!(split_and_feed(&stream, &[cut]), whole, "split at {cut}");
    }
}

// ---- backpressure ----

#[test]
fn stops_wanting_input_while_too_many_replies_wait_for_their_uplinks() {
    let mut h = Harness::new();
    h.auto_ack = false;
    h.send(&online(1, "thermo-02"));
    let mut id = 2;
    while h.session.wants_input() {
        h.send(&report(
            id,
            "thermo-02",
            r#"[{"identifier":"power","type":"bool","value":1}]"#,
        ));
        id += 1;
        assert!(id < 100_000, "never paused");
    }
    assert_eq!(
        h.held.len(),
        MAX_HELD_REPLIES,
        "paused exactly at the limit"
    );
    // The writer catches up: acks release the replies, and the connection is read again.
    for token in std::mem::take(&mut h.held) {
        h.session.ack(token, Code::Success);
    }
    assert!(h.session.wants_input());
    assert_eq!(h.recv().len(), MAX_HELD_REPLIES);
}

#[test]
fn stops_wanting_input_while_the_peer_does_not_read_what_it_is_sent() {
    let mut h = Harness::new();
    assert_eq!(h.code_of(&online(1, "thermo-02")), 0);
    // Replies pile up unsent: the driver has not taken them (the peer is not reading).
    let mut id = 2;
    while h.session.wants_input() {
        h.send(&online(id, "nobody"));
        id += 1;
        assert!(id < 1_000_000, "never paused");
    }
    assert!(h.session.has_transmit());
    // Once the driver has written them, reading resumes.
    let mut out = Vec::new();
    assert!(h.session.poll_transmit(&mut out));
    assert!(out.len() >= MAX_QUEUED_BYTES);
    assert!(h.session.wants_input());
}

// ---- message timeout (a started message must complete in time) ----

/// A masked TEXT frame header announcing `len` payload bytes (`len` > 125, < 65536).
fn declared_header(len: u16, fin: bool) -> Vec<u8> {
    let mut h = vec![if fin { 0x81 } else { 0x01 }, 0x80 | 126];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

#[test]
fn a_declared_but_unsent_frame_is_closed_with_1008_after_the_message_timeout() {
    let mut h = Harness::new();
    let dev = online_thermo(&mut h);
    h.recv();
    h.feed(&declared_header(65_000, true));
    assert_eq!(h.to_server.len(), 8, "the header waits for its payload");
    let timeout = Config::default().message_timeout;
    h.advance(timeout - Duration::from_millis(1));
    assert!(!h.session.is_closed());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.session.close_reason(), Some(&CloseReason::MessageTimeout));
    h.recv();
    assert_eq!(h.closed_by_server, Some(Some(1008)));
    assert_eq!(
        h.take_events(),
        vec![Event::Offline {
            device: dev,
            ack: None
        }]
    );
}

#[test]
fn a_fragmented_message_must_complete_within_the_timeout_even_if_fragments_keep_coming() {
    let mut h = Harness::new();
    online_thermo(&mut h);
    h.recv();
    let timeout = Config::default().message_timeout;
    // A first fragment, then one-byte continuations every tenth of the timeout: each frame is
    // complete, the message never is.
    let mut first = vec![0x01, 0x81, 1, 2, 3, 4];
    first.push(b'{' ^ 1);
    h.feed(&first);
    for _ in 0..9 {
        h.advance(timeout / 10);
        h.feed(&[0x00, 0x81, 1, 2, 3, 4, b' ' ^ 1]);
        assert!(!h.session.is_closed());
    }
    h.advance(timeout / 10);
    assert_eq!(h.session.close_reason(), Some(&CloseReason::MessageTimeout));
}

#[test]
fn steady_pipelined_traffic_ending_mid_frame_is_not_a_timeout() {
    let mut h = Harness::new();
    online_thermo(&mut h);
    h.recv();
    let timeout = Config::default().message_timeout;
    let mut frame = Vec::new();
    let msg = report(
        7,
        "thermo-02",
        r#"[{"identifier":"power","type":"bool","value":1}]"#,
    );
    h.client.send_text(&mut frame, msg.as_bytes());
    // Every read ends in the middle of the next frame, for far longer than the timeout, yet
    // every message completes within it.
    let half = frame.len() / 2;
    h.feed(&frame[..half]);
    for _ in 0..40 {
        h.advance(timeout / 4);
        let mut next = frame[half..].to_vec();
        next.extend_from_slice(&frame[..half]);
        h.feed(&next);
        assert!(!h.session.is_closed());
    }
    assert_eq!(h.recv().len(), 40);
}

#[test]
fn over_its_message_rate_a_connection_is_paused_not_dropped_until_the_bucket_refills() {
    let config = Config {
        message_rate: Rate::per_second(10, 5),
        ..Config::default()
    };
    let mut h = Harness::with(config, ip("127.0.0.1"));
    assert!(h.session.wants_input());
    // Eight requests in one read: the five of the burst are handled, then the session stops
    // at the message boundary and leaves the other three with the driver.
    let mut frames = Vec::new();
    for id in 1..=8 {
        h.client
            .send_text(&mut frames, online(id, "nobody").as_bytes());
    }
    h.feed(&frames);
    assert_eq!(h.recv().len(), 5, "the burst is answered");
    assert!(!h.session.wants_input(), "the burst is used up");
    assert!(h.session.is_rate_paused());
    assert!(!h.to_server.is_empty(), "the rest waits, unconsumed");
    // Presented again while paused: nothing is consumed.
    h.feed(&[]);
    assert!(h.recv().is_empty());
    // One more message per 100 ms from then on; the driver presents the rest at each resume.
    let mut answered = 5;
    for step in 1..=3 {
        let resume = h.session.poll_timeout().expect("a resume deadline");
        assert_eq!(resume, h.now + Duration::from_millis(100), "step {step}");
        h.advance(Duration::from_millis(99));
        assert!(!h.session.wants_input(), "step {step}");
        h.advance(Duration::from_millis(1));
        assert!(
            h.session.wants_input(),
            "read again once the bucket refilled"
        );
        h.feed(&[]);
        answered += h.recv().len();
        assert_eq!(answered, 5 + step, "one per refill");
    }
    assert!(h.to_server.is_empty(), "all eight answered: none dropped");
    assert!(!h.session.is_closed(), "never closed for its rate");
}

#[test]
fn the_default_has_no_message_rate() {
    let mut h = Harness::new();
    for id in 1..=2000 {
        h.send(&online(id, "nobody"));
        let _ = h.recv();
    }
    assert!(h.session.wants_input());
}

/// Refuses every online of one device, like the router does for a device banned for flapping.
struct Banned(DeviceId);

impl Presence for Banned {
    fn is_online(&self, _: DeviceId) -> bool {
        false
    }

    fn admit_online(&self, device: DeviceId, _: Instant) -> bool {
        device != self.0
    }
}

#[test]
fn a_device_banned_for_flapping_gets_109000_and_is_not_onlined() {
    let ctx = context(Config {
        auto_online_on_report: true,
        ..Config::default()
    });
    let banned = ctx
        .registry
        .lookup("a1ThermoPK0", "thermo-02")
        .expect("registered");
    let mut h = Harness::on(ctx, ip("127.0.0.1"), Arc::new(Banned(banned)));
    let r = h.request(&online(1, "thermo-02"));
    assert_eq!(r["code"], json!(109_000), "{r}");
    assert!(h.take_events().is_empty(), "no online uplink");
    assert_eq!(h.session.devices().count(), 0);
    // Nor does a report bring it online through auto-online.
    let r = h.request(&report(
        2,
        "thermo-02",
        r#"[{"identifier":"temperature","type":"float","value":21.5}]"#,
    ));
    assert_eq!(r["code"], json!(109_001), "{r}");
    assert!(h.take_events().is_empty());
    // Other devices are not affected.
    assert_eq!(h.code_of(&online(3, "thermo-03")), 0);
}
