//! What the `nats` uplink sink (issue 10) will rely on, shown against a real 3-server NATS
//! JetStream cluster (nats-server from Debian, 2.9.x) with the async-nats client:
//! - an R3 stream with a duplicate window takes 3,000 publishes, each with a `Nats-Msg-Id`, and
//!   every publish is acknowledged although the server the client is connected to is killed
//!   with SIGKILL mid-way and restarted (the client knows all 3 URLs and reconnects; a publish
//!   whose ack is lost is sent again with the same id); re-publishing acknowledged ids is
//!   answered `duplicate`, and a consumer then receives every id exactly once;
//! - KV buckets (R3, history 1) for device ownership: put/get/create/update/delete/keys/watch,
//!   and a bucket with `max_age` whose entries disappear after the age;
//! - core request/reply for downlinks, with two responders in one queue group: every request is
//!   answered exactly once; no responders and timeouts are told apart.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use async_nats::{Client, ConnectOptions, Event, Request, RequestErrorKind};
use futures_util::StreamExt;
use support::nats::NatsCluster;

const MESSAGES: usize = 3_000;
/// Publishes in flight at once (each awaiting its ack).
const WINDOW: usize = 64;

/// A client that knows every server of the cluster and reconnects for ever, quickly; counts
/// its disconnects.
async fn connect(urls: &[String], name: &str, disconnects: Arc<AtomicUsize>) -> Client {
    ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((50 * attempts as u64).min(500)))
        .event_callback(move |event| {
            let disconnects = disconnects.clone();
            async move {
                if matches!(event, Event::Disconnected) {
                    disconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .connect(urls)
        .await
        .expect("connect to the cluster")
}

fn msg_id(i: usize) -> String {
    format!("up-{i:05}")
}

/// What publishing one record took.
#[derive(Debug, Default, Clone)]
struct Outcome {
    sequence: u64,
    /// Sends after the first one (a publish or its ack failed or timed out).
    retries: u32,
    /// The ack of the send that succeeded said `duplicate` (an earlier send had been stored).
    duplicate: bool,
    errors: Vec<String>,
}

/// Publishes record `i` with its `Nats-Msg-Id` until a publish ack comes back, for at most 60 s.
async fn publish_until_acked(js: &async_nats::jetstream::Context, i: usize) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Outcome::default();
    loop {
        let publish = PublishMessage::build()
            .message_id(msg_id(i))
            .payload(format!("{{\"record\":{i}}}").into());
        let err = match js
            .send_publish(format!("ringlink.up.dev{}", i % 10), publish)
            .await
        {
            Ok(ack) => match ack.await {
                Ok(ack) => {
                    out.sequence = ack.sequence;
                    out.duplicate = ack.duplicate;
                    return out;
                }
                Err(e) => format!("ack: {:?}", e.kind()),
            },
            Err(e) => format!("publish: {:?}", e.kind()),
        };
        assert!(
            Instant::now() < deadline,
            "record {i} not acknowledged within 60 s: {:?} {err}",
            out.errors
        );
        out.errors.push(err);
        out.retries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_dedup_and_acks_across_kill9_of_a_server() {
    let cluster = Arc::new(Mutex::new(NatsCluster::start(3)));
    let urls = cluster.lock().unwrap().urls();
    let disconnects = Arc::new(AtomicUsize::new(0));
    let client = connect(&urls, "uplink", disconnects.clone()).await;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(client.clone());

    let t0 = Instant::now();
    let info = js
        .create_stream(stream::Config {
            name: "UPLINK".into(),
            subjects: vec!["ringlink.up.>".into()],
            num_replicas: 3,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create R3 stream")
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    eprintln!("stream created in {:?}", t0.elapsed());

    // Publish with WINDOW records in flight; once a third is acknowledged, kill -9 the server the
    // client is connected to and restart it a second later. Records from two thirds on wait
    // for the restart, so the kill and the restart both fall inside the run.
    let acked = Arc::new(AtomicUsize::new(0));
    let (restarted_tx, restarted_rx) = tokio::sync::watch::channel(false);
    let killer = {
        let cluster = cluster.clone();
        let client = client.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            while acked.load(Ordering::Relaxed) < MESSAGES / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let port = client.server_info().port;
            let victim = cluster
                .lock()
                .unwrap()
                .index_of_port(port)
                .expect("client is connected to a cluster server");
            let at = acked.load(Ordering::Relaxed);
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.lock().unwrap().kill9(victim))
                .await
                .unwrap();
            let killed = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.lock().unwrap().restart(victim))
                .await
                .unwrap();
            eprintln!(
                "killed n{} (the client's server) at {at} acks; back after {:?}",
                victim + 1,
                killed.elapsed()
            );
            restarted_tx.send(true).unwrap();
            victim
        })
    };

    let t0 = Instant::now();
    let outcomes: Vec<(usize, Outcome)> = futures_util::stream::iter(0..MESSAGES)
        .map(|i| {
            let js = js.clone();
            let acked = acked.clone();
            let mut restarted = restarted_rx.clone();
            async move {
                if i >= 2 * MESSAGES / 3 {
                    restarted.wait_for(|r| *r).await.unwrap();
                }
                let out = publish_until_acked(&js, i).await;
                acked.fetch_add(1, Ordering::Relaxed);
                (i, out)
            }
        })
        .buffer_unordered(WINDOW)
        .collect()
        .await;
    let publish_time = t0.elapsed();
    let victim = killer.await.expect("killer task");
    assert_eq!(outcomes.len(), MESSAGES);

    let retried: Vec<&(usize, Outcome)> = outcomes.iter().filter(|(_, o)| o.retries > 0).collect();
    let dup_on_retry = retried.iter().filter(|(_, o)| o.duplicate).count();
    let mut error_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, o) in &retried {
        for e in &o.errors {
            *error_kinds.entry(e.as_str()).or_default() += 1;
        }
    }
    eprintln!(
        "{MESSAGES} publishes acknowledged in {publish_time:?}; {} records needed a resend \
         ({dup_on_retry} of them acked as duplicate: stored before the failure), errors: \
         {error_kinds:?}; client disconnects: {}",
        retried.len(),
        disconnects.load(Ordering::Relaxed)
    );
    assert!(
        disconnects.load(Ordering::Relaxed) >= 1,
        "the client saw its server die"
    );
    // A first send is never a duplicate; a resend is one exactly when an earlier send was stored.
    for (i, o) in &outcomes {
        assert!(o.retries > 0 || !o.duplicate, "record {i}: {o:?}");
    }
    let sequences: HashSet<u64> = outcomes.iter().map(|(_, o)| o.sequence).collect();
    assert_eq!(sequences.len(), MESSAGES, "one stream sequence per record");

    // Replays of acknowledged records inside the duplicate window: acked `duplicate`, with the
    // sequence of the stored copy, and nothing new in the stream.
    let seq_of: HashMap<usize, u64> = outcomes.iter().map(|(i, o)| (*i, o.sequence)).collect();
    for i in 500..600 {
        let ack = js
            .send_publish(
                format!("ringlink.up.dev{}", i % 10),
                PublishMessage::build()
                    .message_id(msg_id(i))
                    .payload("replay".into()),
            )
            .await
            .expect("publish replay")
            .await
            .expect("ack of replay");
        assert!(ack.duplicate, "replay of record {i} acked as duplicate");
        assert_eq!(
            ack.sequence, seq_of[&i],
            "replay of {i} names the stored copy"
        );
        assert_eq!(ack.stream, "UPLINK");
    }
    let mut st = js.get_stream("UPLINK").await.expect("stream");
    let state = st.info().await.expect("stream info").state.clone();
    assert_eq!(state.messages, MESSAGES as u64, "no duplicates stored");

    // The restarted server catches up: /healthz says its replicas are current, and its own copy
    // of the stream holds every record.
    let t0 = Instant::now();
    let c = cluster.clone();
    let replicas = tokio::task::spawn_blocking(move || {
        let c = c.lock().unwrap();
        c.wait_healthy(victim, Duration::from_secs(30));
        (0..c.len())
            .map(|s| {
                let jsz = c.monitor(s, "/jsz?accounts=true&streams=true");
                let stream = jsz["account_details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
                    .find(|d| d["name"] == "UPLINK")
                    .cloned()
                    .unwrap_or_default();
                stream["state"]["messages"].as_u64().unwrap_or(0)
            })
            .collect::<Vec<u64>>()
    })
    .await
    .unwrap();
    eprintln!(
        "restarted server healthy {:?} later; messages per replica: {replicas:?}",
        t0.elapsed()
    );
    assert_eq!(
        replicas,
        vec![MESSAGES as u64; 3],
        "every replica has every record"
    );

    // A consumer receives each record exactly once.
    let t0 = Instant::now();
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some("check".into()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("create pull consumer");
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut total = 0usize;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            let msg = msg.expect("message");
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .expect("Nats-Msg-Id header kept")
                .as_str()
                .to_owned();
            *seen.entry(id).or_default() += 1;
            msg.ack().await.expect("ack");
            got += 1;
        }
        total += got;
        if got == 0 {
            break;
        }
    }
    eprintln!("consumer read {total} messages in {:?}", t0.elapsed());
    assert_eq!(total, MESSAGES);
    assert_eq!(seen.len(), MESSAGES);
    assert!(seen.values().all(|&n| n == 1), "each id exactly once");
    for i in 0..MESSAGES {
        assert_eq!(seen.get(&msg_id(i)), Some(&1), "record {i}");
    }
}

/// A KV bucket made the way `create_key_value` makes it, without its account query:
/// `Context::create_key_value` first asks `$JS.API.INFO`, and async-nats 0.51 cannot parse
/// nats-server 2.9's answer (it lacks `reserved_memory`/`reserved_storage`), so on 2.9 the
/// bucket's stream is created directly and opened with `get_key_value`.
async fn create_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    replicas: usize,
    max_age: Duration,
) -> kv::Store {
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create the stream of bucket {bucket}: {e}"));
    js.get_key_value(bucket)
        .await
        .unwrap_or_else(|e| panic!("open bucket {bucket}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_buckets_for_device_ownership() {
    let cluster = NatsCluster::start(3);
    let client = connect(&cluster.urls(), "kv", Arc::default()).await;
    let js = async_nats::jetstream::new(client);

    // On 2.9 the client's own bucket creation fails (see create_bucket).
    let err = js
        .create_key_value(kv::Config {
            bucket: "owners".into(),
            history: 1,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect_err("create_key_value on nats-server 2.9");
    assert_eq!(
        err.kind(),
        async_nats::jetstream::context::CreateKeyValueErrorKind::JetStream,
        "{err}"
    );
    let owners = create_bucket(&js, "owners", 3, Duration::ZERO).await;
    let info = owners.status().await.expect("bucket status");
    assert_eq!(info.info.config.num_replicas, 3);
    assert_eq!(info.history(), 1);

    let mut watch = owners.watch_all().await.expect("watch");
    let key = "a1ThermoPK0.thermo-1";

    // Claiming a device: `create` succeeds only while the key has no value.
    let r1 = owners
        .create(key, "node-1".into())
        .await
        .expect("first claim");
    let second = owners
        .create(key, "node-2".into())
        .await
        .expect_err("second claim fails");
    assert_eq!(second.kind(), kv::CreateErrorKind::AlreadyExists);
    // Handing over: compare-and-set on the revision; a stale revision loses.
    let r2 = owners
        .update(key, "node-2".into(), r1)
        .await
        .expect("update at the current revision");
    let stale = owners
        .update(key, "node-3".into(), r1)
        .await
        .expect_err("update at a stale revision");
    assert_eq!(stale.kind(), kv::UpdateErrorKind::WrongLastRevision);
    assert_eq!(
        owners.get(key).await.expect("get").as_deref(),
        Some(&b"node-2"[..])
    );
    owners
        .put("a1ThermoPK0.thermo-2", "node-1".into())
        .await
        .expect("put");
    let mut keys: Vec<String> = owners
        .keys()
        .await
        .expect("keys")
        .map(|k| k.expect("key"))
        .collect()
        .await;
    keys.sort();
    assert_eq!(keys, ["a1ThermoPK0.thermo-1", "a1ThermoPK0.thermo-2"]);
    owners.delete(key).await.expect("delete");
    assert_eq!(owners.get(key).await.expect("get"), None);
    let keys: Vec<String> = owners
        .keys()
        .await
        .expect("keys")
        .map(|k| k.expect("key"))
        .collect()
        .await;
    assert_eq!(keys, ["a1ThermoPK0.thermo-2"]);
    // A released device can be claimed again.
    owners
        .create(key, "node-3".into())
        .await
        .expect("claim after delete");

    // The watcher saw every change, in order.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let entry = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("watch entry within 5 s")
            .expect("watch open")
            .expect("entry");
        seen.push((
            entry.key.clone(),
            entry.operation,
            String::from_utf8_lossy(&entry.value).into_owned(),
        ));
    }
    let op = |k: &str, o, v: &str| (k.to_owned(), o, v.to_owned());
    assert_eq!(
        seen,
        [
            op(key, Operation::Put, "node-1"),
            op(key, Operation::Put, "node-2"),
            op("a1ThermoPK0.thermo-2", Operation::Put, "node-1"),
            op(key, Operation::Delete, ""),
            op(key, Operation::Put, "node-3"),
        ]
    );
    assert_eq!(r2, r1 + 1);

    // A bucket with max_age: an entry disappears once it is older.
    let sessions = create_bucket(&js, "sessions", 3, Duration::from_secs(3)).await;
    sessions
        .put("a1ThermoPK0.thermo-1", "node-1".into())
        .await
        .expect("put");
    let put_at = Instant::now();
    // `watch`/`watch_all` deliver only later changes; `watch_with_history` starts with the
    // current value of each key.
    let mut watch = sessions.watch_with_history(">").await.expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("initial value within 5 s")
        .expect("watch open")
        .expect("entry");
    assert_eq!(first.operation, Operation::Put);
    assert_eq!(
        sessions
            .get("a1ThermoPK0.thermo-1")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"node-1"[..])
    );
    let gone_after = loop {
        if sessions
            .get("a1ThermoPK0.thermo-1")
            .await
            .expect("get")
            .is_none()
        {
            break put_at.elapsed();
        }
        assert!(
            put_at.elapsed() < Duration::from_secs(15),
            "entry still there after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        gone_after >= Duration::from_millis(2_500),
        "expired early: {gone_after:?}"
    );
    let keys: Vec<String> = sessions
        .keys()
        .await
        .expect("keys")
        .map(|k| k.expect("key"))
        .collect()
        .await;
    assert!(keys.is_empty(), "{keys:?}");
    // nats-server 2.9 removes expired messages silently: the watcher gets no entry for it
    // (delete markers for max_age expiry came with 2.11's subject_delete_marker_ttl).
    let on_expiry = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
    eprintln!(
        "max_age 3 s entry gone after {gone_after:?}; watcher on expiry: {}",
        match &on_expiry {
            Err(_) => "nothing".to_owned(),
            Ok(e) => format!("{e:?}"),
        }
    );
    assert!(on_expiry.is_err(), "watcher saw {on_expiry:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_with_a_queue_group() {
    let cluster = NatsCluster::start(3);
    // Each responder and the requester on a different server: requests cross the routes.
    let mut handled = Vec::new();
    let mut responders = Vec::new();
    for (n, name) in [(1, "node-a"), (2, "node-b")] {
        let client = connect(&[cluster.url(n)], name, Arc::default()).await;
        let mut sub = client
            .queue_subscribe("ringlink.down.>", "ringlink".into())
            .await
            .expect("queue subscribe");
        client.flush().await.expect("flush");
        let count = Arc::new(Mutex::new(Vec::<String>::new()));
        handled.push(count.clone());
        responders.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(reply) = msg.reply else { continue };
                let body = format!("{name}:{}", String::from_utf8_lossy(&msg.payload));
                count
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&msg.payload).into_owned());
                client.publish(reply, body.into()).await.expect("reply");
            }
        }));
    }
    let client = connect(&[cluster.url(0)], "requester", Arc::default()).await;

    // Interest crosses the routes asynchronously: until it arrives, n1 answers "no responders".
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .send_request(
                "ringlink.down.warmup",
                Request::new()
                    .payload("warmup".into())
                    .timeout(Some(Duration::from_secs(2))),
            )
            .await
        {
            Ok(_) => break,
            Err(e) if e.kind() == RequestErrorKind::NoResponders && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("warm-up request: {e}"),
        }
    }
    for h in &handled {
        h.lock().unwrap().clear();
    }

    let t0 = Instant::now();
    const REQUESTS: usize = 200;
    let mut answered_by: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let reply = client
            .send_request(
                format!("ringlink.down.dev{}", i % 7),
                Request::new()
                    .payload(format!("req-{i}").into())
                    .timeout(Some(Duration::from_secs(2))),
            )
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let text = String::from_utf8_lossy(&reply.payload).into_owned();
        let (who, what) = text.split_once(':').expect("name:payload");
        assert_eq!(what, format!("req-{i}"));
        *answered_by.entry(who.to_owned()).or_default() += 1;
    }
    let elapsed = t0.elapsed();
    // Each request reached exactly one member of the group.
    let mut all: Vec<String> = handled
        .iter()
        .flat_map(|h| h.lock().unwrap().clone())
        .collect();
    all.sort();
    all.dedup();
    let total: usize = handled.iter().map(|h| h.lock().unwrap().len()).sum();
    assert_eq!(total, REQUESTS, "each request handled once");
    assert_eq!(all.len(), REQUESTS);
    eprintln!("{REQUESTS} requests answered in {elapsed:?}: {answered_by:?}");
    assert_eq!(answered_by.values().sum::<usize>(), REQUESTS);

    // Downlinks to a subject nobody serves fail fast with NoResponders; a responder that never
    // answers shows up as TimedOut after the request's own timeout.
    let t0 = Instant::now();
    let err = client
        .send_request(
            "ringlink.nobody.here",
            Request::new().timeout(Some(Duration::from_secs(2))),
        )
        .await
        .expect_err("no responders");
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let silent = client
        .subscribe("ringlink.silent")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let t0 = Instant::now();
    let err = client
        .send_request(
            "ringlink.silent",
            Request::new().timeout(Some(Duration::from_millis(300))),
        )
        .await
        .expect_err("timed out");
    assert_eq!(err.kind(), RequestErrorKind::TimedOut);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    drop(silent);
    for r in responders {
        r.abort();
    }
}
