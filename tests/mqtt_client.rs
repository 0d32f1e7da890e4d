//! The MQTT client (`ringlink::mqtt`) against a real Mosquitto: QoS 1 throughput and ordering,
//! the in-flight window across `kill -9` restarts of the broker, mqtts:// with a generated CA,
//! and keep-alive pings on an idle connection.

mod support;

use std::collections::HashMap;
use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringlink::mqtt::io::tls_config;
use ringlink::mqtt::{BrokerUrl, Connection, Event, Options, QoS, Step};
use support::broker::{Mosquitto, MosquittoConfig};

fn url(broker: &Mosquitto) -> BrokerUrl {
    broker.url().parse().expect("broker url")
}

fn connection(broker: &Mosquitto, opts: Options) -> Connection {
    Connection::new(url(broker), opts, None).expect("connection")
}

/// The next event, skipping dial failures, within `within`.
async fn next_event(conn: &mut Connection, within: Duration) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match conn.run_until(tokio::time::sleep_until(deadline)).await {
            Step::Event(e) => return e,
            Step::DialFailed(_) => continue,
            Step::Woken(()) => panic!("no event within {within:?}"),
        }
    }
}

/// Drives `conn` until `f` accepts an event; every other event must be `Connected`.
async fn wait_for(conn: &mut Connection, what: &str, mut f: impl FnMut(&Event) -> bool) -> Event {
    loop {
        let e = next_event(conn, Duration::from_secs(10)).await;
        if f(&e) {
            return e;
        }
        assert!(
            matches!(e, Event::Connected { .. }),
            "waiting for {what}: unexpected {e:?} ({:?})",
            conn.last_error()
        );
    }
}

async fn subscribed(conn: &mut Connection, filter: &str) {
    conn.client()
        .subscribe(&[(filter, QoS::AtLeastOnce)])
        .expect("filter");
    let e = wait_for(conn, "SUBACK", |e| matches!(e, Event::Subscribed { .. })).await;
    assert_eq!(
        e,
        Event::Subscribed {
            granted: vec![Some(QoS::AtLeastOnce)]
        }
    );
}

fn tag_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload)
        .expect("utf-8")
        .parse()
        .expect("tag")
}

#[tokio::test]
async fn qos1_publishes_are_acked_once_and_delivered_in_order() {
    const N: u64 = 2_000;
    let broker = Mosquitto::start();
    let mut sub = connection(&broker, Options::new("sub-order"));
    subscribed(&mut sub, "up/order").await;
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N as usize {
            match next_event(&mut sub, Duration::from_secs(20)).await {
                Event::Message { topic, payload, .. } => {
                    assert_eq!(topic, "up/order");
                    got.push(tag_of(&payload));
                }
                e => panic!("subscriber: unexpected {e:?}"),
            }
        }
        got
    });

    let mut publisher = connection(&broker, Options::new("pub-order"));
    wait_for(&mut publisher, "CONNACK", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    let start = Instant::now();
    let mut acks = vec![0u32; N as usize];
    let (mut next, mut acked) = (0u64, 0u64);
    while acked < N {
        while next < N && publisher.client().window_free() > 0 {
            let payload = next.to_string();
            publisher
                .client()
                .publish("up/order", payload.as_bytes(), QoS::AtLeastOnce, next)
                .expect("window has room");
            next += 1;
        }
        match next_event(&mut publisher, Duration::from_secs(10)).await {
            Event::Acked(tag) => {
                acks[tag as usize] += 1;
                acked += 1;
            }
            e => panic!("publisher: unexpected {e:?}"),
        }
    }
    let elapsed = start.elapsed();
    assert!(acks.iter().all(|&n| n == 1), "every tag acked exactly once");
    let stats = publisher.client().stats();
    assert_eq!((stats.published, stats.acked, stats.resent), (N, N, 0));
    assert_eq!(stats.unknown_acks, 0);
    println!(
        "{N} QoS 1 publishes acked in {elapsed:?}: {:.0} msg/s (window 64, loopback, debug build)",
        N as f64 / elapsed.as_secs_f64()
    );

    let got = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .expect("subscriber done in time")
        .expect("subscriber task");
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "all delivered, in order");
}

/// What the subscriber of the restart test saw, shared with the publisher's task.
#[derive(Default)]
struct SubLog {
    /// When each SUBACK was seen; index = subscription generation (one per broker instance).
    subacks: Vec<Instant>,
    /// Tags received, with the generation they arrived in.
    received: Vec<(u64, usize)>,
    /// Transports lost.
    lost: usize,
}

/// The broker is killed with SIGKILL (no persistence: its sessions and queues die with it)
/// and restarted twice while 5,000 QoS 1 messages go through a window of 64.
///
/// What must hold, and why it is the strongest true statement:
/// - every tag is acked exactly once: the publisher's window survives the broker, is re-sent
///   after each CONNACK, and nothing is acked twice or dropped;
/// - per broker instance g, let A(g) be the messages whose PUBACK arrived from instance g and
///   whose last transmission started after the subscriber's SUBACK from instance g had been
///   seen (so the broker had the subscription when it accepted the message). The broker queues
///   a message to its subscribers before it sends the PUBACK, and delivers that queue in order,
///   so the subscriber receives a prefix of A(g) in ack order: only messages still queued or
///   in the sockets when the broker was killed can be missing, and they are the last ones. For
///   the last instance (never killed) nothing may be missing.
#[tokio::test]
async fn window_is_resent_across_broker_kill9_restarts() {
    const N: u64 = 5_000;
    const KILL_AT: [u64; 2] = [1_500, 3_200];
    let mut broker = Mosquitto::start();

    let log = Arc::new(Mutex::new(SubLog::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut sub = connection(
        &broker,
        Options {
            clean_session: false,
            ..Options::new("sub-restarts")
        },
    );
    subscribed(&mut sub, "up/restart").await;
    log.lock().unwrap().subacks.push(Instant::now());
    let subscriber = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                match sub.run_until(stop.notified()).await {
                    Step::Woken(()) => return sub.client().stats(),
                    Step::DialFailed(_) | Step::Event(Event::Connected { .. }) => {}
                    Step::Event(Event::Subscribed { granted }) => {
                        assert_eq!(granted, [Some(QoS::AtLeastOnce)]);
                        log.lock().unwrap().subacks.push(Instant::now());
                    }
                    Step::Event(Event::Message { payload, .. }) => {
                        let mut l = log.lock().unwrap();
                        let generation = l.subacks.len() - 1;
                        l.received.push((tag_of(&payload), generation));
                    }
                    Step::Event(Event::Lost(_)) => log.lock().unwrap().lost += 1,
                    Step::Event(e) => panic!("subscriber: unexpected {e:?}"),
                }
            }
        })
    };

    let mut publisher = connection(&broker, Options::new("pub-restarts"));
    let mut connected_at = Vec::new();
    let mut published_at = vec![None; N as usize];
    // Per tag: how often acked; per ack, in order: (tag, generation, lower bound of last send).
    let mut ack_count = vec![0u32; N as usize];
    let mut acks: Vec<(u64, usize, Instant)> = Vec::new();
    let mut next = 0u64;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (acks.len() as u64) < N {
        assert!(Instant::now() < deadline, "test took too long");
        if kills < KILL_AT.len() && acks.len() as u64 >= KILL_AT[kills] {
            kills += 1;
            broker.kill9();
            // Both clients see their transport die before the new instance exists, so every
            // event below belongs to one broker instance without doubt.
            loop {
                match next_event(&mut publisher, Duration::from_secs(10)).await {
                    Event::Lost(_) => break,
                    Event::Acked(tag) => {
                        let g = connected_at.len() - 1;
                        let sent = published_at[tag as usize]
                            .max(Some(connected_at[g]))
                            .unwrap();
                        ack_count[tag as usize] += 1;
                        acks.push((tag, g, sent));
                    }
                    e => panic!("publisher after kill: unexpected {e:?}"),
                }
            }
            while log.lock().unwrap().lost < kills {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            broker.restart();
            continue;
        }
        while next < N && publisher.client().window_free() > 0 {
            let payload = next.to_string();
            publisher
                .client()
                .publish("up/restart", payload.as_bytes(), QoS::AtLeastOnce, next)
                .expect("window has room");
            published_at[next as usize] = Some(Instant::now());
            next += 1;
        }
        match publisher.run_until(pending::<()>()).await {
            Step::DialFailed(_) => {}
            Step::Event(Event::Connected { .. }) => connected_at.push(Instant::now()),
            Step::Event(Event::Acked(tag)) => {
                let g = connected_at.len() - 1;
                let sent = published_at[tag as usize]
                    .max(Some(connected_at[g]))
                    .unwrap();
                ack_count[tag as usize] += 1;
                acks.push((tag, g, sent));
            }
            Step::Event(e) => panic!("publisher: unexpected {e:?} ({:?})", publisher.last_error()),
            Step::Woken(()) => unreachable!(),
        }
    }
    let stats = publisher.client().stats();
    assert!(
        ack_count.iter().all(|&n| n == 1),
        "every tag acked exactly once"
    );
    assert_eq!(connected_at.len(), 3, "one connection per broker instance");
    assert!(stats.resent > 0, "the window was re-sent: {stats:?}");

    // The subscriber must get everything of the last instance it is entitled to.
    let entitled = |log: &SubLog, g: usize| -> Vec<u64> {
        acks.iter()
            .filter(|&&(_, ag, sent)| ag == g && log.subacks.get(g).is_some_and(|&s| sent > s))
            .map(|&(tag, _, _)| tag)
            .collect()
    };
    let wait_until = Instant::now() + Duration::from_secs(20);
    loop {
        let caught_up = {
            let l = log.lock().unwrap();
            let got: std::collections::HashSet<u64> = l.received.iter().map(|r| r.0).collect();
            l.subacks.len() == 3 && entitled(&l, 2).iter().all(|t| got.contains(t))
        };
        if caught_up {
            break;
        }
        assert!(Instant::now() < wait_until, "subscriber did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_one();
    let sub_stats = subscriber.await.expect("subscriber task");
    let l = log.lock().unwrap();
    assert_eq!(l.subacks.len(), 3, "one subscription per broker instance");

    let mut times: HashMap<u64, u32> = HashMap::new();
    for &(tag, _) in &l.received {
        *times.entry(tag).or_default() += 1;
    }
    let duplicates = times.values().filter(|&&n| n > 1).count();
    println!(
        "publisher: {stats:?}; subscriber: {} messages, {} distinct, {duplicates} duplicated; \
         {sub_stats:?}",
        l.received.len(),
        times.len()
    );
    for g in 0..3 {
        let a = entitled(&l, g);
        let first_missing = a.iter().position(|t| !times.contains_key(t));
        let missing = first_missing.map_or(0, |i| a.len() - i);
        if let Some(i) = first_missing {
            assert!(
                a[i..].iter().all(|t| !times.contains_key(t)),
                "instance {g}: a message after a missing one was delivered (not a suffix)"
            );
        }
        let acked_here = acks.iter().filter(|a| a.1 == g).count();
        println!(
            "instance {g}: {acked_here} acked, {} after the subscriber's SUBACK, \
             {missing} of those lost at the kill",
            a.len()
        );
        if g == 2 {
            assert_eq!(missing, 0, "the last instance was never killed");
            assert!(!a.is_empty());
        }
        if g == 0 {
            assert!(a.len() >= 1_000, "the first instance's messages all count");
        }
    }
}

/// With `persistence true`, a `clean_session: false` subscriber's session (its subscription
/// and the QoS 1 messages queued while it was away) survives a kill -9 once the broker saved
/// it; the new client has no subscription of its own, so everything comes from the session.
#[tokio::test]
async fn persistent_session_survives_a_kill9_restart() {
    let mut broker = Mosquitto::start_with(MosquittoConfig {
        persistence: true,
        ..MosquittoConfig::default()
    });
    let opts = || Options {
        clean_session: false,
        ..Options::new("sub-persist")
    };
    let mut sub = connection(&broker, opts());
    subscribed(&mut sub, "up/persist").await;
    sub.shutdown(Duration::from_secs(1)).await;
    drop(sub);

    let mut publisher = connection(&broker, Options::new("pub-persist"));
    for tag in 0..10u64 {
        publisher
            .client()
            .publish(
                "up/persist",
                tag.to_string().as_bytes(),
                QoS::AtLeastOnce,
                tag,
            )
            .unwrap();
    }
    let mut acked = 0;
    while acked < 10 {
        if let Event::Acked(_) =
            wait_for(&mut publisher, "PUBACK", |e| matches!(e, Event::Acked(_))).await
        {
            acked += 1;
        }
    }
    broker.save();
    broker.restart();

    let mut sub = connection(&broker, opts());
    let e = wait_for(&mut sub, "CONNACK", |_| true).await;
    assert_eq!(
        e,
        Event::Connected {
            session_present: true
        }
    );
    let mut got = Vec::new();
    while got.len() < 10 {
        match next_event(&mut sub, Duration::from_secs(10)).await {
            Event::Message { payload, .. } => got.push(tag_of(&payload)),
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// mqtts:// with a CA and a server certificate generated here; a client trusting another CA
/// cannot connect.
#[tokio::test]
async fn mqtts_with_a_generated_ca() {
    let dir = support::temp_dir("mqtts");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ringlink test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("server params");
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, server_cert.pem()).unwrap();
    std::fs::write(&key, server_key.serialize_pem()).unwrap();

    let broker = Mosquitto::start_with(MosquittoConfig {
        tls: Some((ca.clone(), cert.clone(), key)),
        ..MosquittoConfig::default()
    });
    let url: BrokerUrl = broker.url().parse().unwrap();
    assert!(url.tls);
    let config = tls_config(Some(&ca), None).expect("client TLS config");
    let opts = Options {
        inflight: 100,
        ..Options::new("tls-1")
    };
    let mut conn = Connection::new(url.clone(), opts, Some(config)).unwrap();
    subscribed(&mut conn, "tls/echo").await;
    for tag in 0..100u64 {
        conn.client()
            .publish(
                "tls/echo",
                tag.to_string().as_bytes(),
                QoS::AtLeastOnce,
                tag,
            )
            .unwrap();
    }
    let (mut acked, mut echoed) = (Vec::new(), Vec::new());
    while acked.len() < 100 || echoed.len() < 100 {
        match next_event(&mut conn, Duration::from_secs(10)).await {
            Event::Acked(t) => acked.push(t),
            Event::Message { payload, .. } => echoed.push(tag_of(&payload)),
            e => panic!("unexpected {e:?}"),
        }
    }
    acked.sort_unstable();
    assert_eq!(acked, (0..100).collect::<Vec<_>>());
    assert_eq!(echoed, (0..100).collect::<Vec<_>>());

    // The server certificate as the only "CA": not a CA, so the chain does not verify.
    let wrong = tls_config(Some(&cert), None).expect("config");
    let mut bad = Connection::new(url, Options::new("tls-2"), Some(wrong)).unwrap();
    match bad
        .run_until(tokio::time::sleep(Duration::from_secs(10)))
        .await
    {
        Step::DialFailed(e) => assert!(e.to_string().contains("certificate"), "{e}"),
        other => panic!("expected a failed TLS handshake, got {other:?}"),
    }
}

/// keep_alive 1 s and 3 s without traffic: Mosquitto drops a client silent for 1.5 keep-alive
/// periods, and the client drops a broker that does not answer a PINGREQ within 1 s, so a
/// connection still up proves PINGREQ/PINGRESP were exchanged (and the counters show them).
#[tokio::test]
async fn keep_alive_pings_keep_an_idle_connection_up() {
    let broker = Mosquitto::start();
    let mut conn = connection(
        &broker,
        Options {
            keep_alive: Duration::from_secs(1),
            ..Options::new("idle")
        },
    );
    wait_for(&mut conn, "CONNACK", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    let idle_until = tokio::time::Instant::now() + Duration::from_millis(3_200);
    match conn.run_until(tokio::time::sleep_until(idle_until)).await {
        Step::Woken(()) => {}
        other => panic!("idle connection: {other:?} ({:?})", conn.last_error()),
    }
    assert!(conn.is_connected());
    let stats = conn.client().stats();
    assert!(stats.pings >= 2 && stats.pongs >= 2, "{stats:?}");
    conn.client()
        .publish("idle/after", b"x", QoS::AtLeastOnce, 7)
        .unwrap();
    let e = next_event(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(e, Event::Acked(7));
    println!("after 3.2 s idle: {stats:?}");
}
