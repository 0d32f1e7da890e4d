//! Shard core tests in simulated time: two shards, clients speaking WebSocket through in-memory
//! buffers, and a test "driver" that performs the core's actions by hand. No socket, no
//! thread, no real clock: the clock only moves when a test moves it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::limits::{AdmissionSettings, FlapRule, Rate, LOG_EVERY};
use crate::metrics::Metrics;
use crate::model::ThingModel;
use crate::registry::{demo_registry, Owners, Registry};
use crate::session::{Config, Context, DownlinkRequest};
use crate::shadow::Shadows;
use crate::uplink::decode_line;

type Core = ShardCore<(), u32>;

fn env_with(config: Config, admission: &AdmissionSettings) -> Arc<Env> {
    warnings::install();
    let registry = Arc::new(demo_registry());
    let devices = registry.len();
    Arc::new(Env {
        live: RwLock::new(Live {
            ctx: Arc::new(Context { registry, config }),
            tls: None,
        }),
        owners: Arc::new(Owners::new(devices)),
        metrics: Arc::new(Metrics::new(2)),
        shadows: Arc::new(Shadows::new(devices)),
        max_connections: 100,
        admission: Admission::new(admission, devices, Instant::now()),
        echo: false,
        batch_max: 256,
        flush_delay: Duration::from_millis(1),
    })
}

/// A client connection: which shard and slot it is on, and its end of the WebSocket.
struct Client {
    shard: usize,
    slot: usize,
    ws: ws::Conn,
    /// Bytes the server sent that the client has not parsed yet.
    inbox: Vec<u8>,
    closed: Option<Option<u16>>,
}

/// Two shards and the test driver between them.
struct World {
    shards: Vec<Core>,
    now: Instant,
    /// Commits each shard asked for and the test has not completed yet.
    commits: Vec<VecDeque<Commit>>,
    /// Downlink outcomes by reply id.
    answers: Vec<(u32, Outcome)>,
    /// Every record line committed, in commit order.
    log: Vec<String>,
    /// Complete commits as soon as they are asked for.
    auto_commit: bool,
}

impl World {
    fn new() -> Self {
        Self::with(Config::default())
    }

    fn with(config: Config) -> Self {
        Self::with_admission(config, &AdmissionSettings::default())
    }

    fn with_admission(config: Config, admission: &AdmissionSettings) -> Self {
        let env = env_with(config, admission);
        let now = Instant::now();
        Self {
            shards: (0..2)
                .map(|i| Core::new(i, Arc::clone(&env), now, 1_700_000_000_000))
                .collect(),
            now,
            commits: vec![VecDeque::new(), VecDeque::new()],
            answers: Vec::new(),
            log: Vec::new(),
            auto_commit: true,
        }
    }

    fn connect(&mut self, shard: usize) -> Client {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let slot = self.shards[shard]
            .accept(peer, self.now, ())
            .expect("accepted");
        let mut c = Client {
            shard,
            slot,
            ws: ws::Conn::client(ws::Limits::default()),
            inbox: Vec::new(),
            closed: None,
        };
        let mut req = Vec::new();
        ws::handshake::write_request(
            &mut req,
            "127.0.0.1",
            "/",
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("alibaba-iot-linkedge-protocol"),
        );
        self.input(&c, &mut req);
        self.settle();
        let mut out = Vec::new();
        self.shards[shard].transmit(slot, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 101"), "upgrade answered");
        c.inbox.clear();
        c
    }

    fn input(&mut self, c: &Client, bytes: &mut [u8]) {
        let n = self.shards[c.shard].input(c.slot, bytes, self.now);
        assert_eq!(n, bytes.len(), "whole frames are consumed");
    }

    fn send(&mut self, c: &mut Client, text: &str) {
        let mut frame = Vec::new();
        c.ws.send_text(&mut frame, text.as_bytes());
        self.input(c, &mut frame);
    }

    /// Performs every action of every shard until none is left, like a driver's turn: the end
    /// of the turn starts a commit, which completes at once with `auto_commit`.
    fn settle(&mut self) {
        loop {
            let mut acted = false;
            for i in 0..self.shards.len() {
                self.shards[i].end_turn(self.now);
                while let Some(a) = self.shards[i].poll_action() {
                    acted = true;
                    match a {
                        Action::Send { shard, msg } => {
                            assert_ne!(usize::from(shard), i, "never sent to itself");
                            self.shards[usize::from(shard)].on_message(msg, self.now);
                        }
                        Action::Answer { reply, outcome } => self.answers.push((reply, outcome)),
                        Action::Append(commit) => self.commits[i].push_back(commit),
                    }
                }
                if self.auto_commit {
                    while let Some(commit) = self.commits[i].pop_front() {
                        self.commit(i, commit, Ok(()));
                        acted = true;
                    }
                }
            }
            if !acted {
                break;
            }
        }
    }

    fn commit(&mut self, shard: usize, commit: Commit, result: Result<(), UplinkError>) {
        if result.is_ok() {
            for p in commit.payloads() {
                let text = std::str::from_utf8(p).expect("records are UTF-8");
                self.log.extend(text.lines().map(str::to_owned));
            }
        }
        self.shards[shard].committed(commit, result, self.now);
    }

    /// Every text message the server sent `c` since the last call.
    fn recv(&mut self, c: &mut Client) -> Vec<Value> {
        let mut out = Vec::new();
        let mut ready = Vec::new();
        self.shards[c.shard].take_ready(&mut ready);
        self.shards[c.shard].transmit(c.slot, &mut out);
        c.inbox.extend_from_slice(&out);
        let mut texts = Vec::new();
        let mut pong = Vec::new();
        loop {
            match c.ws.read(&mut c.inbox, &mut pong) {
                Ok(ws::Event::NeedMore) => break,
                Ok(ws::Event::Message { consumed, data, .. }) => {
                    texts.push(serde_json::from_slice(data).expect("JSON"));
                    c.inbox.drain(..consumed);
                }
                Ok(ws::Event::Consumed(n)) => {
                    c.inbox.drain(..n);
                }
                Ok(ws::Event::Pong { consumed }) => {
                    c.inbox.drain(..consumed);
                }
                Ok(ws::Event::Closed { consumed, code }) => {
                    c.closed = Some(code);
                    c.inbox.drain(..consumed);
                    break;
                }
                Err(e) => panic!("bad frame from the server: {e}"),
            }
        }
        texts
    }

    fn owner(&self, dn: &str) -> Option<ConnRef> {
        let env = &self.shards[0].env;
        let id = env.registry().lookup("a1ThermoPK0", dn).expect("known");
        env.owners.owner(id)
    }
}

/// What `ShardMsg::Reload` carries, built the way `Shared::reload` builds it: the demo
/// registry without `removed`, plus `added`, with the thermostat's setpoint max at 25.
fn reloaded(env: &Env, removed: &str, added: &str) -> Arc<Swap> {
    let old = env.registry();
    let mut tsl: Value =
        serde_json::from_slice(include_bytes!("../../registry/demo/thermostat.json"))
            .expect("JSON");
    tsl["properties"][1]["dataType"]["specs"]["max"] = Value::from("25");
    let thermostat = ThingModel::from_slice(tsl.to_string().as_bytes()).expect("TSL");
    let mut b = Registry::builder();
    for m in old.products() {
        let m = if m.product_key() == "a1ThermoPK0" {
            thermostat.clone()
        } else {
            m.clone()
        };
        b.add_product(m).expect("distinct");
    }
    for id in old.ids() {
        let (pk, dn) = (old.product_key(id), old.device_name(id));
        if dn != removed {
            b.add_device(pk, dn, None).expect("distinct");
        }
    }
    b.add_device("a1ThermoPK0", added, None).expect("new");
    let (registry, changes) = old.carry_over(b.build()).expect("fits");
    env.owners.grow(registry.id_bound());
    env.shadows.grow(registry.id_bound());
    env.admission.flapping.grow(registry.id_bound());
    let live = Live {
        ctx: Arc::new(Context {
            registry: Arc::new(registry),
            config: env.ctx().config.clone(),
        }),
        tls: None,
    };
    env.set_live(live.clone());
    Arc::new(Swap {
        live,
        removed: changes.removed,
    })
}

fn setpoint(id: u32, dn: &str, value: f64) -> String {
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"reportProperty","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}","properties":[{{"identifier":"setpoint","type":"float","value":{value:.1}}}]}}}}"#
    )
}

fn online(id: u32, dn: &str) -> String {
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"onlineDevice","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}"}}}}"#
    )
}

fn offline(id: u32, dn: &str) -> String {
    online(id, dn).replace("onlineDevice", "offlineDevice")
}

fn report(id: u32, dn: &str, power: u32) -> String {
    let power = power % 2;
    format!(
        r#"{{"version":"1.0","messageId":{id},"method":"reportProperty","payload":{{"productKey":"a1ThermoPK0","deviceName":"{dn}","properties":[{{"identifier":"power","type":"bool","value":{power}}}]}}}}"#
    )
}

fn codes(replies: &[Value]) -> Vec<(u64, u64)> {
    replies
        .iter()
        .map(|r| {
            (
                r["messageId"].as_u64().unwrap(),
                r["code"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_reload_swaps_the_registry_at_a_turn_and_offlines_removed_devices() {
    let mut w = World::new();
    let mut c = w.connect(0);
    let mut d = w.connect(1);
    for (i, dn) in ["thermo-00001", "thermo-00002"].into_iter().enumerate() {
        w.send(&mut c, &online(i as u32 + 1, dn));
    }
    w.send(&mut d, &online(1, "thermo-00003"));
    w.send(&mut c, &setpoint(3, "thermo-00001", 30.0));
    w.settle();
    assert_eq!(codes(&w.recv(&mut c)), [(1, 0), (2, 0), (3, 0)]);
    assert_eq!(codes(&w.recv(&mut d)), [(1, 0)]);
    w.send(&mut c, &online(4, "thermo-new"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut c)), [(4, 109_000)], "not registered yet");
    let removed = w.shards[0]
        .env
        .registry()
        .lookup("a1ThermoPK0", "thermo-00002")
        .expect("registered");
    let logged = w.log.len();

    let swap = reloaded(&w.shards[0].env, "thermo-00002", "thermo-new");
    for (i, shard) in w.shards.iter_mut().enumerate() {
        let msg = ShardMsg::Reload {
            swap: Arc::clone(&swap),
            reply: 100 + i as u32,
        };
        shard.on_message(msg, w.now);
    }
    w.settle();
    let mut swapped: Vec<(u32, u32)> = w
        .answers
        .iter()
        .map(|(r, o)| (*r, o.code.as_u32()))
        .collect();
    swapped.sort_unstable();
    assert_eq!(
        swapped,
        [(100, 0), (101, 0)],
        "every shard answers once swapped"
    );

    // The removed device went offline, with an offline record; nothing else did.
    let new_records: Vec<_> = w.log[logged..]
        .iter()
        .map(|l| decode_line(format!("{l}\n").as_bytes()).expect("record"))
        .collect();
    assert_eq!(new_records.len(), 1, "{:?}", w.log[logged..].to_vec());
    assert_eq!(new_records[0].device_name, "thermo-00002");
    assert!(
        w.log[logged].contains("offline"),
        "an offline record: {}",
        w.log[logged]
    );
    assert_eq!(w.shards[0].env.owners.owner(removed), None);
    assert!(
        w.recv(&mut c).is_empty(),
        "no message to the connection itself"
    );
    assert_eq!(c.closed, None, "the connection stays up");

    // Further messages for it: 109000. The others on the same connection work, against the
    // new thermo model (setpoint max 25 now); the added device can come online at once.
    w.send(&mut c, &report(5, "thermo-00002", 1));
    w.send(&mut c, &report(6, "thermo-00001", 1));
    w.send(&mut c, &setpoint(7, "thermo-00001", 30.0));
    w.send(&mut c, &setpoint(8, "thermo-00001", 20.0));
    w.send(&mut c, &online(9, "thermo-new"));
    w.send(&mut d, &report(2, "thermo-00003", 1));
    w.settle();
    assert_eq!(
        codes(&w.recv(&mut c)),
        [(5, 109_000), (6, 0), (7, 100_007), (8, 0), (9, 0)]
    );
    assert_eq!(codes(&w.recv(&mut d)), [(2, 0)]);
    assert_eq!(w.owner("thermo-00001").map(|o| o.shard()), Some(0));
    assert_eq!(w.owner("thermo-00003").map(|o| o.shard()), Some(1));
    assert_eq!(w.owner("thermo-new").map(|o| o.shard()), Some(0));

    // A connection accepted after the swap uses the new registry too.
    let mut e = w.connect(1);
    w.send(&mut e, &online(1, "thermo-00002"));
    w.send(&mut e, &setpoint(2, "thermo-00003", 30.0));
    w.settle();
    assert_eq!(codes(&w.recv(&mut e)), [(1, 109_000), (2, 109_001)]);
}

#[test]
fn a_report_is_answered_only_after_its_commit() {
    let mut w = World::new();
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00001"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut c)), [(1, 0)]);

    w.auto_commit = false;
    w.send(&mut c, &report(2, "thermo-00001", 1));
    w.settle();
    let early = w.recv(&mut c);
    assert!(early.is_empty(), "no reply before the commit: {early:?}");
    let commit = w.commits[0].pop_front().expect("one commit asked for");
    assert_eq!(commit.records(), 1);
    w.commit(0, commit, Ok(()));
    assert_eq!(codes(&w.recv(&mut c)), [(2, 0)]);
    let rec = decode_line(format!("{}\n", w.log.last().unwrap()).as_bytes()).expect("record");
    assert_eq!(rec.device_name, "thermo-00001");
    assert_eq!(rec.at_ms, 1_700_000_000_000, "wall clock from the anchor");
}

#[test]
fn one_commit_in_flight_and_what_gathers_goes_next_in_order() {
    let mut w = World::new();
    w.auto_commit = false;
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00001"));
    w.settle();
    let first = w.commits[0].pop_front().expect("online commit");
    for i in 0..5 {
        w.send(&mut c, &report(10 + i, "thermo-00001", i));
        w.settle();
    }
    assert!(
        w.commits[0].is_empty(),
        "nothing more while one is in flight"
    );
    w.commit(0, first, Ok(()));
    w.settle();
    let second = w.commits[0].pop_front().expect("the gathered reports");
    assert_eq!(second.records(), 5, "all five in one commit");
    assert!(w.commits[0].is_empty());
    w.commit(0, second, Ok(()));
    let replies = codes(&w.recv(&mut c));
    assert_eq!(
        replies,
        [(1, 0), (10, 0), (11, 0), (12, 0), (13, 0), (14, 0)]
    );
}

#[test]
fn a_failed_commit_answers_100000_and_the_next_one_goes() {
    let mut w = World::new();
    w.auto_commit = false;
    let mut c = w.connect(1);
    w.send(&mut c, &online(1, "thermo-00002"));
    w.settle();
    let commit = w.commits[1].pop_front().expect("commit");
    w.commit(1, commit, Ok(()));
    assert_eq!(codes(&w.recv(&mut c)), [(1, 0)]);
    w.send(&mut c, &report(2, "thermo-00002", 1));
    w.settle();
    let commit = w.commits[1].pop_front().expect("commit");
    w.commit(1, commit, Err(UplinkError::Closed));
    assert_eq!(codes(&w.recv(&mut c)), [(2, 100000)]);
    assert!(w.log.is_empty() || !w.log.last().unwrap().contains("property"));
    w.send(&mut c, &report(3, "thermo-00002", 1));
    w.settle();
    assert_eq!(w.commits[1].len(), 1, "the shard commits again");
}

#[test]
fn takeover_across_shards_goes_through_a_send_action() {
    let mut w = World::new();
    let mut a = w.connect(0);
    let mut b = w.connect(1);
    w.send(&mut a, &online(1, "thermo-00003"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut a)), [(1, 0)]);
    assert_eq!(w.owner("thermo-00003").map(|o| o.shard()), Some(0));

    w.send(&mut b, &online(2, "thermo-00003"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut b)), [(2, 0)]);
    assert_eq!(w.owner("thermo-00003").map(|o| o.shard()), Some(1));
    // The old connection no longer speaks for the device: its report is refused, not logged.
    let before = w.log.len();
    w.send(&mut a, &report(3, "thermo-00003", 1));
    w.settle();
    let r = codes(&w.recv(&mut a));
    assert_eq!(r.len(), 1);
    assert_ne!(
        r[0].1, 0,
        "taken-over device refused on the old connection: {r:?}"
    );
    assert_eq!(w.log.len(), before);
}

#[test]
fn takeover_on_the_same_shard_needs_no_message() {
    let mut w = World::new();
    let mut a = w.connect(0);
    let mut b = w.connect(0);
    w.send(&mut a, &online(1, "thermo-00004"));
    w.send(&mut b, &online(2, "thermo-00004"));
    w.shards[0].end_turn(w.now);
    while let Some(action) = w.shards[0].poll_action() {
        assert!(
            !matches!(action, Action::Send { .. }),
            "no message for a takeover on the same shard"
        );
        if let Action::Append(c) = action {
            w.commit(0, c, Ok(()));
        }
    }
    w.settle();
    assert_eq!(codes(&w.recv(&mut a)), [(1, 0)]);
    assert_eq!(codes(&w.recv(&mut b)), [(2, 0)]);
    w.send(&mut a, &report(3, "thermo-00004", 1));
    w.settle();
    assert_ne!(codes(&w.recv(&mut a))[0].1, 0);
}

#[test]
fn downlink_is_answered_by_the_device_or_times_out() {
    let config = Config {
        downlink_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    let mut w = World::with(config);
    let mut c = w.connect(1);
    w.send(&mut c, &online(1, "thermo-00005"));
    w.settle();
    w.recv(&mut c);
    let owner = w.owner("thermo-00005").expect("online");
    let device = w.shards[1]
        .env
        .registry()
        .lookup("a1ThermoPK0", "thermo-00005")
        .unwrap();
    let started = w.now;
    let downlink = |token| ShardMsg::Downlink {
        conn: owner,
        downlink: Downlink {
            token: 0,
            device,
            request: DownlinkRequest::GetProperty,
            params: br#"["power"]"#.to_vec(),
        },
        started,
        reply: token,
    };
    // Answered by the device.
    let msg = downlink(7);
    w.shards[1].on_message(msg, w.now);
    w.settle();
    let sent = w.recv(&mut c);
    assert_eq!(sent.len(), 1, "the request reached the device");
    let id = sent[0]["messageId"].as_u64().unwrap();
    w.send(
        &mut c,
        &format!(r#"{{"code":0,"messageId":{id},"payload":{{"power":1}}}}"#),
    );
    w.settle();
    assert_eq!(w.answers.len(), 1);
    assert_eq!(w.answers[0].0, 7);
    assert!(w.answers[0].1.code.is_success());

    // Not answered: the timer ends it with 100006 at the timeout, not before.
    let msg = downlink(8);
    w.shards[1].on_message(msg, w.now);
    w.settle();
    w.recv(&mut c);
    w.now += Duration::from_secs(4);
    w.shards[1].on_timer(w.now);
    w.settle();
    assert_eq!(w.answers.len(), 1, "not before the timeout");
    w.now += Duration::from_secs(2);
    let due = w.shards[1].poll_timeout().expect("a deadline");
    assert!(due <= w.now);
    w.shards[1].on_timer(w.now);
    w.settle();
    assert_eq!(w.answers.len(), 2);
    assert_eq!(w.answers[1].0, 8);
    assert_eq!(w.answers[1].1.code, Code::Timeout);
}

#[test]
fn a_downlink_for_a_gone_connection_is_answered_offline() {
    let mut w = World::new();
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00006"));
    w.settle();
    let owner = w.owner("thermo-00006").expect("online");
    w.shards[0].disconnect(c.slot, w.now);
    w.settle();
    assert_eq!(w.owner("thermo-00006"), None, "offline with its connection");
    let device = w.shards[0]
        .env
        .registry()
        .lookup("a1ThermoPK0", "thermo-00006")
        .unwrap();
    let msg = ShardMsg::Downlink {
        conn: owner,
        downlink: Downlink {
            token: 0,
            device,
            request: DownlinkRequest::GetProperty,
            params: b"[]".to_vec(),
        },
        started: w.now,
        reply: 9,
    };
    w.shards[0].on_message(msg, w.now);
    w.settle();
    assert_eq!(w.answers.len(), 1);
    assert_eq!(w.answers[0].1.code, Code::DeviceOffline);
    assert!(w.log.last().unwrap().contains(r#""kind":"offline""#));
}

#[test]
fn backpressure_stops_reading_until_the_commit_releases_replies() {
    let mut w = World::new();
    w.auto_commit = false;
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00007"));
    w.settle();
    let mut held = vec![w.commits[0].pop_front().expect("commit")];
    let mut sent = 0;
    while w.shards[0].wants_input(c.slot) {
        w.send(&mut c, &report(100 + sent, "thermo-00007", sent % 2));
        sent += 1;
        assert!(sent < 5000, "a session must stop wanting input");
    }
    assert!(sent as usize >= crate::session::MAX_HELD_REPLIES - 1);
    // The commit in flight completes, then the gathered one: replies go out, reading resumes.
    while let Some(commit) = held.pop() {
        w.commit(0, commit, Ok(()));
        w.settle();
        held.extend(w.commits[0].pop_front());
    }
    assert!(w.shards[0].wants_input(c.slot));
    assert_eq!(w.log.len(), sent as usize + 1, "every report logged once");
}

#[test]
fn drain_closes_every_connection_commits_and_refuses_new_ones() {
    let mut w = World::new();
    w.auto_commit = false;
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00008"));
    w.settle();
    w.send(&mut c, &report(2, "thermo-00008", 1));
    w.shards[0].on_message(ShardMsg::Drain, w.now);
    w.settle();
    assert!(!w.shards[0].is_done(), "a commit is still in flight");
    while let Some(commit) = w.commits[0].pop_front() {
        w.commit(0, commit, Ok(()));
        w.settle();
    }
    let replies = w.recv(&mut c);
    assert_eq!(
        codes(&replies),
        [(1, 0), (2, 0)],
        "answered before the close"
    );
    assert_eq!(c.closed, Some(Some(1001)));
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert!(w.shards[0].accept(peer, w.now, ()).is_none());
    w.shards[0].disconnect(c.slot, w.now);
    w.settle();
    while let Some(commit) = w.commits[0].pop_front() {
        w.commit(0, commit, Ok(()));
        w.settle();
    }
    assert!(w.shards[0].is_done());
}

#[test]
fn a_peer_that_does_not_take_its_close_is_aborted_a_pong_timeout_later() {
    let mut w = World::new();
    let c = w.connect(0);
    w.shards[0].on_message(ShardMsg::Drain, w.now);
    w.settle();
    assert!(w.shards[0].is_closed(c.slot));
    assert!(!w.shards[0].is_aborted(c.slot));
    let linger = w.shards[0].env.ctx().config.pong_timeout;
    w.now += linger + Duration::from_millis(1);
    w.shards[0].on_timer(w.now);
    assert!(w.shards[0].is_aborted(c.slot));
}

#[test]
fn an_idle_connections_entry_fits_a_384_byte_allocation() {
    // The boxed entry is most of what an idle connection costs (README, Memory per idle
    // connection): mimalloc's size classes around it are 320, 384 and 448 bytes.
    let size = size_of::<Conn<crate::shard::uring::UringConn>>();
    assert!(size <= 384, "{size}");
    // The epoll driver's handle is the connection task's waker (its flag is a bit elsewhere).
    let size = size_of::<Conn<crate::shard::epoll::EpollConn>>();
    assert!(size <= 384, "{size}");
    assert!(size_of::<Session>() <= 296, "{}", size_of::<Session>());
}

#[test]
fn ack_latency_splits_the_wait_for_the_log_from_the_rest() {
    let mut w = World::new();
    w.auto_commit = false;
    let mut c = w.connect(0);
    w.send(&mut c, &online(1, "thermo-00001"));
    w.settle();
    // The online's commit takes 3 ms; a report read 1 ms into it waits for it to finish
    // before its own commit (5 ms) starts.
    let first = w.commits[0].pop_front().expect("online commit");
    w.now += Duration::from_millis(1);
    w.send(&mut c, &report(2, "thermo-00001", 1));
    w.settle();
    w.now += Duration::from_millis(2);
    w.commit(0, first, Ok(()));
    w.settle();
    let second = w.commits[0].pop_front().expect("the report's commit");
    w.now += Duration::from_millis(5);
    w.commit(0, second, Ok(()));
    assert_eq!(codes(&w.recv(&mut c)), [(1, 0), (2, 0)]);

    let stats = &w.shards[0].state.stats;
    let bucket = |ms: u64| crate::session::Latency::BOUNDS_US.partition_point(|b| *b < ms * 1000);
    let [total, log, rest] = &stats.ack_latency;
    // The online: 3 ms in all, all of it the log. The report: 7 ms, 5 of them the log.
    assert_eq!((total.counts[bucket(3)], total.counts[bucket(7)]), (1, 1));
    assert_eq!(total.sum_us, 3_000 + 7_000);
    assert_eq!(log.sum_us, 3_000 + 5_000);
    assert_eq!(
        log.counts[bucket(5)],
        2,
        "3 and 5 ms share the (2.5, 5] ms bucket"
    );
    assert_eq!(rest.sum_us, 2_000);
    assert_eq!(stats.commit_latency.sum_us, 3_000 + 5_000);
    assert_eq!(stats.commit_latency.counts.iter().sum::<u64>(), 2);
}

fn peer(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), 40_000)
}

#[test]
fn over_its_message_rate_a_connection_is_paused_then_flagged_when_the_bucket_refills() {
    let config = Config {
        message_rate: Rate::per_second(10, 3),
        ..Config::default()
    };
    let mut w = World::with(config);
    let mut c = w.connect(0);
    for id in 1..=3 {
        w.send(&mut c, &online(id, "nobody"));
    }
    w.settle();
    assert_eq!(w.recv(&mut c).len(), 3, "answered, not dropped");
    let core = &mut w.shards[0];
    assert!(!core.wants_input(c.slot), "the driver stops reading it");
    assert!(!core.is_closed(c.slot));
    let m = &core.env.metrics;
    assert_eq!(m.limited_count(Limit::MessageRate), 1);
    core.on_timer(w.now); // what is due now (counters), so the next deadline is the resume
    let resume = core.poll_timeout().expect("a resume deadline");
    assert_eq!(resume, w.now + Duration::from_millis(100));
    let mut ready = Vec::new();
    core.take_ready(&mut ready);
    core.on_timer(resume);
    ready.clear();
    core.take_ready(&mut ready);
    assert_eq!(ready, [c.slot], "flagged for the driver to read it again");
    assert!(core.wants_input(c.slot));
}

#[test]
fn the_accept_rate_is_process_wide_and_pauses_accepting_without_refusing() {
    let admission = AdmissionSettings {
        accept: Rate::per_second(10, 4),
        ..AdmissionSettings::default()
    };
    let mut w = World::with_admission(Config::default(), &admission);
    let now = w.now;
    // Three accepts over both shards leave room for one more.
    for shard in [0, 1, 0] {
        assert!(w.shards[shard].accept(peer("127.0.0.1"), now, ()).is_some());
        assert_eq!(w.shards[shard].take_accept_pause(), None);
    }
    // The fourth uses the burst up: this shard stops accepting for one interval.
    assert!(w.shards[1].accept(peer("127.0.0.1"), now, ()).is_some());
    assert_eq!(
        w.shards[1].take_accept_pause(),
        Some(now + Duration::from_millis(100))
    );
    assert_eq!(w.shards[1].take_accept_pause(), None, "said once");
    // A connection the kernel handed the other shard meanwhile is served, and paces it too.
    assert!(w.shards[0].accept(peer("127.0.0.1"), now, ()).is_some());
    assert_eq!(
        w.shards[0].take_accept_pause(),
        Some(now + Duration::from_millis(200))
    );
    let m = &w.shards[0].env.metrics;
    assert_eq!(m.limited_count(Limit::AcceptRate), 2);
    assert_eq!(
        m.connections_rejected.load(Ordering::Relaxed),
        0,
        "none refused"
    );
}

#[test]
fn connections_per_ip_are_counted_over_the_process_and_freed_at_close() {
    let admission = AdmissionSettings {
        max_connections_per_ip: 2,
        ..AdmissionSettings::default()
    };
    let mut w = World::with_admission(Config::default(), &admission);
    let now = w.now;
    let a = w.shards[0]
        .accept(peer("127.0.0.2"), now, ())
        .expect("first");
    assert!(w.shards[1].accept(peer("127.0.0.2"), now, ()).is_some());
    // The third from 127.0.0.2, on either shard, is closed at accept.
    assert_eq!(w.shards[0].accept(peer("127.0.0.2"), now, ()), None);
    assert_eq!(w.shards[1].accept(peer("127.0.0.2"), now, ()), None);
    // Another address is not affected.
    assert!(w.shards[0].accept(peer("127.0.0.3"), now, ()).is_some());
    let m = Arc::clone(&w.shards[0].env.metrics);
    assert_eq!(m.limited_count(Limit::PerIp), 2);
    assert_eq!(m.connections_open.load(Ordering::Relaxed), 3);
    // A close makes room again.
    w.shards[0].disconnect(a, now);
    assert!(w.shards[1].accept(peer("127.0.0.2"), now, ()).is_some());
}

#[test]
fn a_flapping_device_is_refused_on_every_shard_until_its_ban_ends() {
    let admission = AdmissionSettings {
        flapping: Some(FlapRule {
            max: 2,
            window: Duration::from_secs(1),
            ban: Duration::from_secs(5),
        }),
        ..AdmissionSettings::default()
    };
    let mut w = World::with_admission(Config::default(), &admission);
    let mut a = w.connect(0);
    let mut b = w.connect(1);
    // Online, then taken over on the other shard: two onlines in the window.
    w.send(&mut a, &online(1, "thermo-00001"));
    w.settle();
    w.send(&mut b, &online(2, "thermo-00001"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut a)), [(1, 0)]);
    assert_eq!(codes(&w.recv(&mut b)), [(2, 0)]);
    // The third is refused with 109000, and nothing changes: b still owns it.
    w.send(&mut a, &online(3, "thermo-00001"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut a)), [(3, 109_000)]);
    assert_eq!(w.owner("thermo-00001").map(|c| c.shard()), Some(1));
    let onlines = w
        .log
        .iter()
        .filter(|l| l.contains("\"kind\":\"online\""))
        .count();
    assert_eq!(
        onlines, 2,
        "no online uplink for the refused one: {:?}",
        w.log
    );
    // Banned on the other shard too, while other devices are not.
    w.now += Duration::from_millis(4_000);
    w.send(&mut b, &offline(4, "thermo-00001"));
    w.send(&mut b, &online(5, "thermo-00001"));
    w.send(&mut b, &online(6, "thermo-00002"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut b)), [(4, 0), (5, 109_000), (6, 0)]);
    assert_eq!(w.shards[0].env.metrics.limited_count(Limit::Flapping), 2);
    // The ban is over 5 s after it started.
    w.now += Duration::from_millis(1_000);
    w.send(&mut a, &online(7, "thermo-00001"));
    w.settle();
    assert_eq!(codes(&w.recv(&mut a)), [(7, 0)]);
}

/// Captures the warnings a thread logs, for the tests that check what the core logs.
///
/// One process-wide subscriber, installed before the first [`World`] exists, that answers
/// "sometimes" for every callsite and keeps an event only on a thread inside [`capture`].
/// A scoped subscriber (`with_default`) is not enough: a callsite registered by another test's
/// thread at the same moment can store "never" after the scoped subscriber was counted, and
/// its events are then lost for the rest of the process (this failed once in CI).
mod warnings {
    use std::cell::RefCell;
    use std::sync::Once;

    use tracing::level_filters::LevelFilter;
    use tracing::subscriber::Interest;
    use tracing::{Level, Metadata};

    thread_local! {
        static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    struct ThreadWarnings;

    impl tracing::Subscriber for ThreadWarnings {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            Interest::sometimes()
        }

        fn max_level_hint(&self) -> Option<LevelFilter> {
            Some(LevelFilter::WARN)
        }

        fn enabled(&self, meta: &Metadata<'_>) -> bool {
            *meta.level() == Level::WARN && CAPTURED.with(|c| c.borrow().is_some())
        }

        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }

        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

        fn event(&self, event: &tracing::Event<'_>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            CAPTURED.with(|c| {
                if let Some(lines) = c.borrow_mut().as_mut() {
                    lines.push(m.0);
                }
            });
        }

        fn enter(&self, _: &tracing::span::Id) {}

        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Installs the subscriber; every [`super::World`] calls this first.
    pub(super) fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            tracing::subscriber::set_global_default(ThreadWarnings)
                .expect("no other global subscriber in the unit tests");
        });
    }

    /// The warnings `f` logs on this thread.
    pub(super) fn capture(f: impl FnOnce()) -> Vec<String> {
        install();
        CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
        f();
        CAPTURED
            .with(|c| c.borrow_mut().take())
            .expect("still capturing")
    }
}

#[test]
fn a_limit_logs_one_warning_per_period_however_often_it_acts() {
    let admission = AdmissionSettings {
        max_connections_per_ip: 1,
        flapping: Some(FlapRule {
            max: 1,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(60),
        }),
        ..AdmissionSettings::default()
    };
    let run = || {
        let mut w = World::with_admission(Config::default(), &admission);
        let mut c = w.connect(0);
        // 50 refused from the address of `c`: one line, 49 held back.
        for _ in 0..50 {
            assert_eq!(w.shards[0].accept(peer("127.0.0.1"), w.now, ()), None);
        }
        // Two devices start a ban each: one line, the second held back.
        w.send(&mut c, &online(1, "thermo-00001"));
        w.send(&mut c, &offline(2, "thermo-00001"));
        w.send(&mut c, &online(3, "thermo-00001"));
        w.send(&mut c, &online(4, "thermo-00002"));
        w.send(&mut c, &offline(5, "thermo-00002"));
        w.send(&mut c, &online(6, "thermo-00002"));
        w.settle();
        assert_eq!(
            codes(&w.recv(&mut c)),
            [(1, 0), (2, 0), (3, 109_000), (4, 0), (5, 0), (6, 109_000)]
        );
        // Ten seconds later the next one goes out and says how many were held back.
        w.now += LOG_EVERY;
        assert_eq!(w.shards[0].accept(peer("127.0.0.1"), w.now, ()), None);
        w.send(&mut c, &online(7, "thermo-00002"));
    };
    let lines = warnings::capture(run);
    let per_ip: Vec<_> = lines.iter().filter(|l| l.contains("per_ip")).collect();
    let flapping: Vec<_> = lines.iter().filter(|l| l.contains("flapping")).collect();
    assert_eq!(per_ip.len(), 2, "{lines:#?}");
    assert!(per_ip[1].contains("49 more"), "{}", per_ip[1]);
    assert_eq!(flapping.len(), 1, "bans only, once per period: {lines:#?}");
}
