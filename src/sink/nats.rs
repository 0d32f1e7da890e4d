//! The NATS sink: several ringlink nodes and a NATS JetStream cluster form one gateway.
//!
//! Owns: one thread with a current-thread tokio runtime running, over one async-nats client,
//!
//! - the **forwarder**: the local log is the outbox ([`Outbox`], as for MQTT); every record is
//!   published to the JetStream stream on `{prefix}.up.{pk}.{dn}.{kind}` with the record line as
//!   its body and a message id `{node}.{shard}.{frame}.{line}.{t}`, so that a replay after a
//!   crash inside the stream's duplicate window is dropped by the server, not stored twice; the
//!   cursor moves on the publish acknowledgement; our own window, re-published on error;
//! - **ownership**: the online and offline records it forwards become puts and deletes in the
//!   key-value bucket `owners_bucket` (key `{pk}.{dn}`, value `{"node","since","peer"}`), in log
//!   order; a watch on the bucket keeps every node's view ([`Cluster`]) and takes a device
//!   away from a local connection when it came online on another node later;
//! - **liveness**: a heartbeat in `<owners_bucket>_nodes` (its value: the node's clock; entries
//!   expire after `node_timeout`) every quarter of the timeout, watched by every node; a node
//!   whose last heartbeat is older than three quarters of the timeout is dead, and its devices
//!   count as offline everywhere: at most `node_timeout` after it stopped;
//! - **downlinks**: requests on `{prefix}.down.{pk}.{dn}.{get|set|service.ID}` (bodies and
//!   answers as the HTTP API's) reach one node of the queue group, which serves a device it owns
//!   or forwards the request to the owner's `{prefix}.node.{node}.down...`, or answers 109001.
//!
//! Never: the report path (devices are acknowledged against the local log, whatever NATS does),
//! a device connection (downlinks go through [`Shared::downlink`], takeovers through the mesh).
//!
//! Subject tokens: a productKey or deviceName with a character NATS does not allow in a token
//! (`.`, `*`, `>`, whitespace) or `%` has those bytes written `%XX`; key-value keys the same way
//! with `=XX` (the key alphabet is `[-/_=.a-zA-Z0-9]`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{Future, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::logging::RateLimit;
use crate::protocol::Code;
use crate::registry::DeviceId;
use crate::session::{DownlinkRequest, Outcome};
use crate::shard::core::ShardMsg;
use crate::shard::{unix_ms, Shared};
use crate::sink::outbox::{Outbox, Tag};
use crate::sink::{Backlog, Spool};
use crate::uplink::{decode_line, RecordKind};
use crate::worker::Worker;

/// How long a stopping forwarder keeps publishing what is left.
const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How often cursors are stored and gauges updated.
const TICK: Duration = Duration::from_millis(200);
/// A failed publish is tried again after this long.
const RETRY: Duration = Duration::from_millis(500);
/// Queue group of the public downlink subjects.
const QUEUE: &str = "ringlink";

/// What the NATS sink needs, resolved from `[uplink.nats]`.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub urls: Vec<String>,
    pub node: String,
    pub stream: String,
    pub prefix: String,
    pub owners_bucket: String,
    pub node_timeout: Duration,
    /// The stream's duplicate window, when ringlink creates it.
    pub duplicate_window: Duration,
    pub replicas: usize,
    pub inflight: usize,
    pub token: Option<String>,
    pub creds_file: Option<std::path::PathBuf>,
    pub ca_file: Option<std::path::PathBuf>,
    /// fsync cursor files (the log's `fsync = "batch"`).
    pub sync_cursors: bool,
}

/// Who owns a device according to the ownership bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub since: u64,
    pub peer: Option<String>,
}

/// This node's view of the cluster, shared with the API: who owns which device, which nodes are
/// alive, and the client to reach the others.
#[derive(Debug)]
pub struct Cluster {
    pub node: String,
    prefix: String,
    node_timeout: Duration,
    client: Client,
    owners: Mutex<HashMap<DeviceId, Owner>>,
    /// Node name to its last heartbeat (its wall clock, ms).
    alive: Mutex<HashMap<String, u64>>,
    pub stats: NatsStats,
}

/// Counters of the NATS side, read by `/metrics`.
#[derive(Debug, Default)]
pub struct NatsStats {
    pub connected: AtomicBool,
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub unstored_duplicates: AtomicU64,
    pub publish_errors: AtomicU64,
    pub kv_errors: AtomicU64,
    pub takeovers: AtomicU64,
    pub downlinks_served: AtomicU64,
    pub downlinks_forwarded: AtomicU64,
    pub nodes_alive: AtomicU64,
}

impl Cluster {
    /// The owner of `device` on another node that is alive, if any.
    pub fn remote_owner(&self, device: DeviceId) -> Option<Owner> {
        let owner = self.owners.lock().ok()?.get(&device).cloned()?;
        if owner.node == self.node {
            return None;
        }
        let alive = self.alive.lock().ok()?;
        self.is_alive(&owner.node, &alive).then_some(owner)
    }

    /// A node is alive while its last heartbeat is younger than three quarters of the timeout:
    /// heartbeats come every quarter, so a dead node is seen dead at most `node_timeout` after
    /// its last one.
    fn is_alive(&self, node: &str, beats: &HashMap<String, u64>) -> bool {
        if node == self.node {
            return true;
        }
        let horizon = self.node_timeout.as_millis() as u64 * 3 / 4;
        beats
            .get(node)
            .is_some_and(|beat| unix_ms().saturating_sub(*beat) <= horizon)
    }

    /// Sends a downlink to the device's node through the cluster (the public subject, so any
    /// node may route it) and waits for the answer; the body and answer are the HTTP API's.
    pub async fn downlink(
        &self,
        pk: &str,
        dn: &str,
        request: &DownlinkRequest,
        params: &[u8],
        timeout: Duration,
    ) -> Outcome {
        let subject = format!("{}.down.{}", self.prefix, down_tail(pk, dn, request));
        let body = request_body(request, params);
        let asked = self.client.request(subject, Bytes::from(body));
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(msg)) => outcome_of(&msg.payload),
            Ok(Err(_)) | Err(_) => Outcome::failed(Code::ServiceUnreachable),
        }
    }
}

/// Appends the NATS side's metrics (Prometheus text) to `out`.
pub fn render(cluster: &Cluster, out: &mut String) {
    let s = &cluster.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let rows = [
        (
            "ringlink_nats_connected",
            "gauge",
            "1 while connected to a NATS server.",
            f64::from(u8::from(s.connected.load(Ordering::Relaxed))),
        ),
        (
            "ringlink_nats_published_total",
            "counter",
            "Uplinks acknowledged by JetStream.",
            load(&s.published),
        ),
        (
            "ringlink_nats_duplicates_total",
            "counter",
            "Publishes JetStream acknowledged as duplicates (replays it had stored before).",
            load(&s.duplicates),
        ),
        (
            "ringlink_nats_unstored_duplicates_total",
            "counter",
            "Publishes JetStream called duplicates of a message it has not stored (sequence 0; \
             published again).",
            load(&s.unstored_duplicates),
        ),
        (
            "ringlink_nats_publish_errors_total",
            "counter",
            "Publishes that failed and were tried again.",
            load(&s.publish_errors),
        ),
        (
            "ringlink_nats_kv_errors_total",
            "counter",
            "Failed writes to the ownership or heartbeat bucket (retried).",
            load(&s.kv_errors),
        ),
        (
            "ringlink_nats_takeovers_total",
            "counter",
            "Devices taken away from a local connection because they came online on another node.",
            load(&s.takeovers),
        ),
        (
            "ringlink_nats_downlinks_served_total",
            "counter",
            "Downlinks from NATS served to a device on this node.",
            load(&s.downlinks_served),
        ),
        (
            "ringlink_nats_downlinks_forwarded_total",
            "counter",
            "Downlinks from NATS forwarded to the owning node.",
            load(&s.downlinks_forwarded),
        ),
        (
            "ringlink_nats_nodes_alive",
            "gauge",
            "Nodes whose heartbeat is in the bucket (this one included).",
            load(&s.nodes_alive),
        ),
    ];
    for (name, kind, help, value) in rows {
        crate::metrics::write_metric(out, name, kind, help, value);
    }
}

/// The running NATS side.
pub struct Forwarder(Worker);

impl Forwarder {
    /// Connects (in the background: NATS may come later), opens the outbox and starts every
    /// task on a thread of its own; returns the cluster view for the API.
    pub(crate) fn start(
        shared: Arc<Shared>,
        opts: NatsOptions,
    ) -> io::Result<(Self, Arc<Cluster>)> {
        let Some(spool) = shared.spool.clone() else {
            return Err(io::Error::other(
                "the server has no spool for an external sink",
            ));
        };
        let outbox = Outbox::open("nats", &spool.partitions, opts.sync_cursors)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cluster_stats = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cluster_stats);
        let mut connect = ConnectOptions::new()
            .name(format!("ringlink-{}", opts.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            // The other servers of the cluster are there: try them soon, not after the
            // client's default back-off of seconds.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(Duration::from_secs(10)))
            .event_callback(move |event| {
                let flag = Arc::clone(&flag);
                async move {
                    match event {
                        async_nats::Event::Connected => flag.store(true, Ordering::Relaxed),
                        async_nats::Event::Disconnected => flag.store(false, Ordering::Relaxed),
                        _ => {}
                    }
                }
            });
        if let Some(token) = &opts.token {
            connect = connect.token(token.clone());
        }
        if let Some(ca) = &opts.ca_file {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let Some(creds) = &opts.creds_file {
            connect = rt.block_on(connect.credentials_file(creds))?;
        }
        let urls = opts.urls.clone();
        let client = rt
            .block_on(connect.connect(urls))
            .map_err(|e| io::Error::other(format!("NATS: {e}")))?;
        let cluster = Arc::new(Cluster {
            node: opts.node.clone(),
            prefix: opts.prefix.clone(),
            node_timeout: opts.node_timeout,
            client: client.clone(),
            owners: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashMap::new()),
            stats: NatsStats::default(),
        });
        let view = Arc::clone(&cluster);
        let worker = Worker::spawn("ringlink-nats", rt, move |stopped| {
            run(
                shared,
                spool,
                view,
                opts,
                outbox,
                client,
                cluster_stats,
                stopped,
            )
        })?;
        Ok((Self(worker), cluster))
    }

    /// Publishes what is left for up to [`DRAIN_GRACE`], stores the cursors, and waits for the
    /// thread.
    pub fn stop(self) {
        self.0.stop();
    }
}

/// An ownership change to write, in log order.
enum OwnerOp {
    Online { key: String, value: Bytes },
    Offline { key: String },
}

/// A publish in flight: what to publish again if it fails.
struct InFlight {
    tag: Tag,
    subject: String,
    id: String,
    body: Bytes,
}

type AckFuture = Pin<Box<dyn Future<Output = (InFlight, Result<Stored, String>)> + Send>>;

/// What JetStream's acknowledgement says of a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Stored now.
    New,
    /// Stored before under the same message id: a replay, dropped.
    Before,
    /// Called a duplicate of an id whose message it has not stored (sequence 0).
    /// nats-server 2.9 (and later ones until nats-server#6415, 2025) records an id when it
    /// proposes the message, and a leader change can drop the proposal: every repeat is then
    /// answered this way, and nothing stored, until the duplicate window forgets the id. Not an
    /// acknowledgement: the record is published again until it is stored.
    Not,
}

impl Stored {
    fn of(ack: &jetstream::publish::PublishAck) -> Self {
        match (ack.duplicate, ack.sequence) {
            (false, _) => Self::New,
            (true, 0) => Self::Not,
            (true, _) => Self::Before,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    cluster: Arc<Cluster>,
    opts: NatsOptions,
    mut outbox: Outbox,
    client: Client,
    connected: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    let js = jetstream::new(client.clone());
    let backlog = Backlog::new(&outbox, shared.log_stats.records.load(Ordering::Relaxed));
    tick(&mut outbox, &shared, &spool, &backlog, 0);
    // The stream and buckets; NATS may not be there yet: retried until it is.
    let mut down = RateLimit::warnings();
    let (owners, nodes) = loop {
        match setup(&js, &opts).await {
            Ok(b) => break b,
            Err(e) => {
                if let Some(suppressed) = down.allow(Instant::now()) {
                    tracing::warn!(
                        sink = "nats",
                        error = %e,
                        suppressed,
                        "setting up stream and buckets failed (retrying)"
                    );
                }
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let ops_tx = Lanes::spawn(&owners, &cluster);
    tokio::spawn(watch_owners(
        owners,
        Arc::clone(&shared),
        Arc::clone(&cluster),
    ));
    tokio::spawn(heartbeat(nodes, Arc::clone(&cluster), opts.node_timeout));
    tokio::spawn(serve_downlinks(
        client.clone(),
        Arc::clone(&shared),
        Arc::clone(&cluster),
    ));

    let mut inflight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut retry: VecDeque<InFlight> = VecDeque::new();
    let mut next_retry = Instant::now();
    let mut stopping: Option<Instant> = None;
    let mut next_tick = Instant::now() + TICK;
    let mut dry = false;
    loop {
        cluster
            .stats
            .connected
            .store(connected.load(Ordering::Relaxed), Ordering::Relaxed);
        spool
            .stats
            .connected
            .store(connected.load(Ordering::Relaxed), Ordering::Relaxed);
        // Fill the window: failed publishes first (once their wait is over), then new
        // records. The window counts both those in flight and those waiting to be published
        // again, so what the forwarder holds in memory stays within `inflight` records
        // whatever NATS answers.
        while inflight.len() < opts.inflight {
            let due = match retry.front() {
                Some(_) if Instant::now() >= next_retry => retry.pop_front(),
                _ => None,
            };
            let item = if let Some(item) = due {
                item
            } else if inflight.len() + retry.len() < opts.inflight {
                match next_record(&mut outbox, &opts, &ops_tx, &spool) {
                    Some(i) => i,
                    None => {
                        dry = true;
                        break;
                    }
                }
            } else {
                break;
            };
            dry = false;
            inflight.push(publish(js.clone(), item));
        }
        let now = Instant::now();
        if let Some(deadline) = stopping {
            if (dry && inflight.is_empty() && retry.is_empty()) || now >= deadline {
                break;
            }
        }
        if now >= next_tick {
            tick(&mut outbox, &shared, &spool, &backlog, inflight.len());
            next_tick = now + TICK;
        }
        let wake_at = if retry.is_empty() {
            next_tick
        } else {
            next_tick.min(next_retry)
        };
        tokio::select! {
            _ = &mut stop, if stopping.is_none() => stopping = Some(Instant::now() + DRAIN_GRACE),
            Some((item, result)) = inflight.next(), if !inflight.is_empty() => match result {
                Ok(stored @ (Stored::New | Stored::Before)) => {
                    outbox.ack(item.tag);
                    spool.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                    if stored == Stored::Before {
                        cluster.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Stored::Not) => {
                    cluster.stats.unstored_duplicates.fetch_add(1, Ordering::Relaxed);
                    if retry.is_empty() {
                        tracing::warn!(
                            sink = "nats",
                            window_s = opts.duplicate_window.as_secs(),
                            "JetStream called a record a duplicate of a message it has not stored \
                             (sequence 0: nats-server 2.9 after a leader change); publishing it \
                             again until it is stored, at most one duplicate window"
                        );
                    }
                    retry.push_back(item);
                    next_retry = Instant::now() + RETRY;
                }
                Err(e) => {
                    // Once per outage (the retry queue empties when NATS is back).
                    if retry.is_empty() {
                        tracing::warn!(
                            sink = "nats",
                            error = %e,
                            "publish failed (spooling, retrying)"
                        );
                    }
                    cluster.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    retry.push_back(item);
                    next_retry = Instant::now() + RETRY;
                }
            },
            _ = spool.commits.notified(), if dry => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
    tick(&mut outbox, &shared, &spool, &backlog, inflight.len());
    let _ = client.flush().await;
}

/// Creates (or opens) the stream, the ownership bucket and the heartbeat bucket.
async fn setup(
    js: &jetstream::Context,
    opts: &NatsOptions,
) -> Result<(kv::Store, kv::Store), String> {
    js.get_or_create_stream(stream::Config {
        name: opts.stream.clone(),
        subjects: vec![format!("{}.up.>", opts.prefix)],
        num_replicas: opts.replicas,
        duplicate_window: opts.duplicate_window,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("stream {}: {e}", opts.stream))?;
    let owners = open_bucket(js, &opts.owners_bucket, opts.replicas, Duration::ZERO).await?;
    let nodes_name = format!("{}_nodes", opts.owners_bucket);
    let nodes = open_bucket(js, &nodes_name, opts.replicas, opts.node_timeout).await?;
    Ok((owners, nodes))
}

/// Opens key-value bucket `name`, creating it first if needed. It is created as the stream a
/// bucket is (`KV_<name>` on `$KV.<name>.>`, one message per key): the client's own
/// `create_key_value` first asks for the account's limits, and nats-server 2.9 answers without
/// fields async-nats 0.51 requires, so it always fails there (tests/nats_cluster.rs shows it).
async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
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
    .map_err(|e| format!("bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("bucket {name}: {e}"))
}

/// The next record as a publish; online and offline also queue their ownership change.
/// Records that do not decode are skipped (counted).
fn next_record(
    outbox: &mut Outbox,
    opts: &NatsOptions,
    ops: &Lanes,
    spool: &Spool,
) -> Option<InFlight> {
    loop {
        let taken = match outbox.take_next() {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(e) => {
                spool.warn_log("nats", "cannot read the log", &e);
                return None;
            }
        };
        let (tag, part, pos, line) = (taken.tag, taken.part, taken.pos, taken.line);
        let rec = match decode_line(line) {
            Ok(r) => r,
            Err(e) => {
                spool.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                spool.warn_log("nats", "skipped a log record", &e);
                outbox.ack(tag);
                continue;
            }
        };
        let key = kv_key(&rec.product_key, &rec.device_name);
        match rec.kind {
            RecordKind::Online => {
                let value = json!({
                    "node": opts.node,
                    "since": rec.at_ms,
                    "peer": rec.peer.map(|p| p.to_string()),
                });
                ops.send(OwnerOp::Online {
                    key,
                    value: Bytes::from(value.to_string()),
                });
            }
            RecordKind::Offline => {
                ops.send(OwnerOp::Offline { key });
            }
            RecordKind::Property | RecordKind::Event => {}
        }
        let subject = format!(
            "{}.up.{}.{}.{}",
            opts.prefix,
            subject_token(&rec.product_key),
            subject_token(&rec.device_name),
            rec.kind.as_str()
        );
        let id = format!(
            "{}.{part}.{}.{}.{}",
            opts.node, pos.frame, pos.line, rec.at_ms
        );
        return Some(InFlight {
            tag,
            subject,
            id,
            body: Bytes::copy_from_slice(line),
        });
    }
}

/// Publishes `item` and waits for its acknowledgement.
fn publish(js: jetstream::Context, item: InFlight) -> AckFuture {
    Box::pin(async move {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", item.id.as_str());
        let sent = js
            .publish_with_headers(item.subject.clone(), headers, item.body.clone())
            .await;
        let result = match sent {
            Ok(ack) => ack.await.map(|a| Stored::of(&a)).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        (item, result)
    })
}

/// Stores moved cursors and updates the gauges.
fn tick(outbox: &mut Outbox, shared: &Shared, spool: &Spool, backlog: &Backlog, inflight: usize) {
    if let Err(e) = outbox.store_cursors() {
        spool.warn_log("nats", "cannot store the forwarding cursor", &e);
    }
    let stats = &spool.stats;
    stats.inflight.store(inflight as u64, Ordering::Relaxed);
    let next = outbox.peek_time().ok().flatten();
    let oldest = match (outbox.oldest_inflight_ms(), next) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(0),
    };
    stats.oldest_unforwarded_ms.store(oldest, Ordering::Relaxed);
    if let Ok(bytes) = outbox.backlog_bytes() {
        stats.backlog_bytes.store(bytes, Ordering::Relaxed);
    }
    let committed = shared.log_stats.records.load(Ordering::Relaxed);
    stats
        .backlog_records
        .store(backlog.records(spool, committed), Ordering::Relaxed);
}

/// Ownership writers: a change goes to the lane of its key, so changes of one device keep the
/// log's order while different devices' writes (each a round trip to the JetStream leader) run
/// side by side: a reconnect storm of thousands of onlines is not written one at a time.
struct Lanes(Vec<tokio::sync::mpsc::UnboundedSender<OwnerOp>>);

/// Ownership writes in flight at once.
const LANES: usize = 32;

impl Lanes {
    fn spawn(store: &kv::Store, cluster: &Arc<Cluster>) -> Self {
        Self(
            (0..LANES)
                .map(|_| {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(write_owners(store.clone(), rx, Arc::clone(cluster)));
                    tx
                })
                .collect(),
        )
    }

    fn send(&self, op: OwnerOp) {
        let key = match &op {
            OwnerOp::Online { key, .. } | OwnerOp::Offline { key } => key,
        };
        let lane = key.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % self.0.len();
        let _ = self.0[lane].send(op);
    }
}

/// Applies one lane's ownership changes in the order the log has them. An offline deletes the
/// key only while this node's own put is still the latest (another node may own the device by
/// now).
async fn write_owners(
    store: kv::Store,
    mut ops: tokio::sync::mpsc::UnboundedReceiver<OwnerOp>,
    cluster: Arc<Cluster>,
) {
    let mut mine: HashMap<String, u64> = HashMap::new();
    let mut down = RateLimit::warnings();
    while let Some(op) = ops.recv().await {
        loop {
            let done = match &op {
                OwnerOp::Online { key, value } => match store.put(key, value.clone()).await {
                    Ok(revision) => {
                        mine.insert(key.clone(), revision);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                },
                OwnerOp::Offline { key } => match mine.remove(key) {
                    None => Ok(()),
                    Some(revision) => {
                        match store.delete_expect_revision(key, Some(revision)).await {
                            Ok(()) => Ok(()),
                            // Someone else's put came after ours: it is theirs now.
                            Err(e) if e.to_string().contains("wrong last sequence") => Ok(()),
                            Err(e) => {
                                mine.insert(key.clone(), revision);
                                Err(e.to_string())
                            }
                        }
                    }
                },
            };
            match done {
                Ok(()) => break,
                Err(e) => {
                    cluster.stats.kv_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = down.allow(Instant::now()) {
                        tracing::warn!(
                            sink = "nats",
                            error = %e,
                            suppressed,
                            "writing the ownership bucket failed (retrying)"
                        );
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

/// Keeps the cluster's view of ownership, and hands a device over when it came online on
/// another node after it came online here.
async fn watch_owners(store: kv::Store, shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let mut down = RateLimit::warnings();
    loop {
        // With history: the current owner of every device first, then changes.
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                if let Some(suppressed) = down.allow(Instant::now()) {
                    tracing::warn!(
                        sink = "nats",
                        error = %e,
                        suppressed,
                        "watching the ownership bucket failed (retrying)"
                    );
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            let Some((pk, dn)) = parse_kv_key(&entry.key) else {
                continue;
            };
            let Some(device) = shared.registry().lookup(&pk, &dn) else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                if let Ok(mut owners) = cluster.owners.lock() {
                    owners.remove(&device);
                }
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&entry.value) else {
                continue;
            };
            let owner = Owner {
                node: v["node"].as_str().unwrap_or_default().to_owned(),
                since: v["since"].as_u64().unwrap_or(0),
                peer: v["peer"].as_str().map(str::to_owned),
            };
            if owner.node != cluster.node {
                take_over_locally(&shared, &cluster, device, owner.since);
            }
            if let Ok(mut owners) = cluster.owners.lock() {
                owners.insert(device, owner);
            }
        }
    }
}

/// `device` came online on another node at `since`: if a local connection owns it since
/// earlier, it loses it, like a takeover between two shards.
fn take_over_locally(shared: &Shared, cluster: &Cluster, device: DeviceId, since: u64) {
    let Some(conn) = shared.env.owners.owner(device) else {
        return;
    };
    let local_since = shared.env.shadows.snapshot(device).since_ms;
    if local_since > since {
        return;
    }
    if shared.env.owners.release(device, conn) {
        shared
            .mesh
            .send(conn.shard(), ShardMsg::TakenOver { conn, device });
        cluster.stats.takeovers.fetch_add(1, Ordering::Relaxed);
    }
}

/// Says this node is alive every quarter of `timeout`, and learns from the bucket when every
/// other node last said so (the heartbeat's value is the node's clock at the time; nodes' clocks
/// are assumed to agree within a fraction of the timeout).
async fn heartbeat(store: kv::Store, cluster: Arc<Cluster>, timeout: Duration) {
    let watched = store.clone();
    let view = Arc::clone(&cluster);
    tokio::spawn(async move {
        loop {
            let Ok(mut watch) = watched.watch_with_history(">").await else {
                tokio::time::sleep(RETRY).await;
                continue;
            };
            while let Some(Ok(entry)) = watch.next().await {
                let beat = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                if let (Some(beat), Ok(mut alive)) = (beat, view.alive.lock()) {
                    alive.insert(entry.key.clone(), beat);
                }
            }
        }
    });
    let every = timeout / 4;
    let mut down = RateLimit::warnings();
    loop {
        let now = unix_ms();
        if let Err(e) = store.put(&cluster.node, Bytes::from(now.to_string())).await {
            cluster.stats.kv_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = down.allow(Instant::now()) {
                tracing::warn!(sink = "nats", error = %e, suppressed, "heartbeat failed");
            }
        }
        if let Ok(alive) = cluster.alive.lock() {
            let n = alive
                .keys()
                .filter(|node| cluster.is_alive(node.as_str(), &alive))
                .count();
            cluster.stats.nodes_alive.store(n as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(every).await;
    }
}

/// Serves downlink requests: the public subjects (queue group: one node per request) and this
/// node's own (requests another node forwarded).
async fn serve_downlinks(client: Client, shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let public = format!("{}.down.>", cluster.prefix);
    let own = format!("{}.node.{}.down.>", cluster.prefix, cluster.node);
    let mut down = RateLimit::warnings();
    let subs = loop {
        let a = client.queue_subscribe(public.clone(), QUEUE.into()).await;
        let b = client.subscribe(own.clone()).await;
        match (a, b) {
            (Ok(a), Ok(b)) => break futures_util::stream::select(a, b),
            (Err(e), _) | (_, Err(e)) => {
                if let Some(suppressed) = down.allow(Instant::now()) {
                    tracing::warn!(
                        sink = "nats",
                        error = %e,
                        suppressed,
                        "subscribing to downlinks failed (retrying)"
                    );
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    let mut subs = subs;
    while let Some(msg) = subs.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let shared = Arc::clone(&shared);
        let cluster = Arc::clone(&cluster);
        let client = client.clone();
        tokio::spawn(async move {
            let answer = serve_one(&client, &shared, &cluster, &msg.subject, &msg.payload).await;
            let _ = client.publish(reply, answer).await;
        });
    }
}

/// One downlink request from NATS: its answer (the HTTP API's JSON).
async fn serve_one(
    client: &Client,
    shared: &Shared,
    cluster: &Cluster,
    subject: &str,
    body: &[u8],
) -> Bytes {
    let own = format!("{}.node.{}.down.", cluster.prefix, cluster.node);
    let public = format!("{}.down.", cluster.prefix);
    let (tail, forwarded) = match subject.strip_prefix(&own) {
        Some(t) => (t, true),
        None => match subject.strip_prefix(&public) {
            Some(t) => (t, false),
            None => return answer_error(Code::InvalidParameter, "not a downlink subject"),
        },
    };
    let Some((pk, dn, op)) = parse_down_tail(tail) else {
        return answer_error(
            Code::InvalidParameter,
            "expected {prefix}.down.{pk}.{dn}.{get|set|service.ID}",
        );
    };
    let Some(device) = shared.registry().lookup(&pk, &dn) else {
        return answer_error(Code::DeviceNotRegistered, "no such device");
    };
    let (request, params) = match parse_request_body(shared, device, &op, body) {
        Ok(r) => r,
        Err((code, message)) => return answer_error(code, &message),
    };
    if shared.env.owners.owner(device).is_some() {
        cluster
            .stats
            .downlinks_served
            .fetch_add(1, Ordering::Relaxed);
        let outcome = shared.downlink(device, request.clone(), params).await;
        return answer(&outcome, data_field(&request));
    }
    if !forwarded {
        if let Some(owner) = cluster.remote_owner(device) {
            cluster
                .stats
                .downlinks_forwarded
                .fetch_add(1, Ordering::Relaxed);
            let subject = format!("{}.node.{}.down.{tail}", cluster.prefix, owner.node);
            let limit = shared.env.ctx().config.downlink_timeout + Duration::from_secs(2);
            let asked = client.request(subject, Bytes::copy_from_slice(body));
            return match tokio::time::timeout(limit, asked).await {
                Ok(Ok(msg)) => msg.payload,
                Ok(Err(_)) | Err(_) => {
                    answer_error(Code::ServiceUnreachable, "owner node did not answer")
                }
            };
        }
    }
    answer_error(Code::DeviceOffline, "device is offline")
}

/// What a downlink answer carries its data in: `properties` for get, `outputData` for a
/// service, nothing for set.
fn data_field(request: &DownlinkRequest) -> &'static str {
    match request {
        DownlinkRequest::GetProperty => "properties",
        DownlinkRequest::SetProperty => "",
        DownlinkRequest::CallService(_) => "outputData",
    }
}

/// `{"code":0, <field>: data}` or `{"code":X, "message": ..}`, as the HTTP API answers.
fn answer(outcome: &Outcome, field: &str) -> Bytes {
    if !outcome.code.is_success() {
        return answer_error(outcome.code, outcome.code.message());
    }
    let mut body = Map::new();
    body.insert("code".into(), Value::from(0));
    if !field.is_empty() {
        let data = outcome
            .data
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| Value::Object(Map::new()));
        body.insert(field.into(), data);
    }
    Bytes::from(Value::Object(body).to_string())
}

fn answer_error(code: Code, message: &str) -> Bytes {
    Bytes::from(json!({"code": code.as_u32(), "message": message}).to_string())
}

/// The outcome in an answer made by [`answer`] (on another node).
fn outcome_of(payload: &[u8]) -> Outcome {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return Outcome::failed(Code::ServiceUnreachable);
    };
    let code = Code::from_u32(v["code"].as_u64().unwrap_or(100_000) as u32);
    let data = v
        .get("properties")
        .or_else(|| v.get("outputData"))
        .map(|d| d.to_string().into_boxed_str());
    Outcome { code, data }
}

/// The HTTP API's request body for `request` with ringlink downlink `params`.
fn request_body(request: &DownlinkRequest, params: &[u8]) -> Vec<u8> {
    let params: Value = serde_json::from_slice(params).unwrap_or(Value::Null);
    let body = match request {
        DownlinkRequest::GetProperty | DownlinkRequest::SetProperty => {
            json!({"properties": params})
        }
        DownlinkRequest::CallService(_) => json!({"inputData": params}),
    };
    body.to_string().into_bytes()
}

/// Parses an HTTP-API-style request body for operation `op` (`get`, `set`, `service.ID`).
fn parse_request_body(
    shared: &Shared,
    device: DeviceId,
    op: &str,
    body: &[u8],
) -> Result<(DownlinkRequest, Vec<u8>), (Code, String)> {
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(body)
            .map_err(|e| (Code::InvalidParameter, format!("body is not JSON: {e}")))?
    };
    match op {
        "get" => {
            let mut list = match v.get("properties") {
                Some(Value::Array(l)) => l.clone(),
                None => Vec::new(),
                Some(_) => {
                    return Err((
                        Code::InvalidParameter,
                        "properties must be an array of identifiers".into(),
                    ))
                }
            };
            if list.is_empty() {
                list = shared
                    .registry()
                    .model(device)
                    .properties()
                    .iter()
                    .filter(|p| p.access != crate::model::Access::Write)
                    .map(|p| Value::from(&*p.identifier))
                    .collect();
            }
            Ok((
                DownlinkRequest::GetProperty,
                Value::Array(list).to_string().into_bytes(),
            ))
        }
        "set" => match v.get("properties") {
            Some(p @ Value::Object(_)) => {
                Ok((DownlinkRequest::SetProperty, p.to_string().into_bytes()))
            }
            _ => Err((
                Code::InvalidParameter,
                "properties must be an object".into(),
            )),
        },
        op => {
            let Some(service) = op.strip_prefix("service.").filter(|s| !s.is_empty()) else {
                return Err((Code::InvalidParameter, format!("unknown operation {op:?}")));
            };
            let params = match v.get("inputData") {
                Some(p @ Value::Object(_)) => p.to_string().into_bytes(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    return Err((
                        Code::ServiceInputIncorrect,
                        "inputData must be an object".into(),
                    ))
                }
            };
            Ok((DownlinkRequest::CallService(service.into()), params))
        }
    }
}

/// `{pk}.{dn}.{get|set|service.ID}` with the tokens encoded.
fn down_tail(pk: &str, dn: &str, request: &DownlinkRequest) -> String {
    let op = match request {
        DownlinkRequest::GetProperty => "get".to_owned(),
        DownlinkRequest::SetProperty => "set".to_owned(),
        DownlinkRequest::CallService(s) => format!("service.{}", subject_token(s)),
    };
    format!("{}.{}.{op}", subject_token(pk), subject_token(dn))
}

/// The inverse of [`down_tail`]: productKey, deviceName and the operation.
fn parse_down_tail(tail: &str) -> Option<(String, String, String)> {
    let mut parts = tail.splitn(3, '.');
    let pk = decode_token(parts.next()?, '%')?;
    let dn = decode_token(parts.next()?, '%')?;
    let op = parts.next()?;
    let op = match op.strip_prefix("service.") {
        Some(s) => format!("service.{}", decode_token(s, '%')?),
        None if op == "get" || op == "set" => op.to_owned(),
        None => return None,
    };
    Some((pk, dn, op))
}

/// A subject token for `s`: bytes NATS does not allow in a token, and `%`, as `%XX`.
pub fn subject_token(s: &str) -> String {
    encode_token(s, '%', |b| {
        b > b' ' && b < 0x7f && !matches!(b, b'.' | b'*' | b'>' | b'%')
    })
}

/// The key-value key of a device: `{pk}.{dn}`, each part with bytes outside the key alphabet
/// (and `=`, `.`) as `=XX`.
pub fn kv_key(pk: &str, dn: &str) -> String {
    let keep = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/');
    format!(
        "{}.{}",
        encode_token(pk, '=', keep),
        encode_token(dn, '=', keep)
    )
}

fn parse_kv_key(key: &str) -> Option<(String, String)> {
    let (pk, dn) = key.split_once('.')?;
    Some((decode_token(pk, '=')?, decode_token(dn, '=')?))
}

fn encode_token(s: &str, escape: char, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push(escape);
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

fn decode_token(s: &str, escape: char) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == escape as u8 {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_keys_round_trip_and_stay_in_their_alphabets() {
        for name in ["thermo-00001", "a.b c*>%", "日本", "x=y/z"] {
            let t = subject_token(name);
            assert!(!t.contains(['.', ' ', '*', '>']), "{t}");
            assert_eq!(decode_token(&t, '%').as_deref(), Some(name));
            let k = kv_key("pk1", name);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
                "{k}"
            );
            assert_eq!(parse_kv_key(&k), Some(("pk1".to_owned(), name.to_owned())));
        }
        let tail = down_tail("pk", "d.1", &DownlinkRequest::CallService("re.boot".into()));
        assert_eq!(tail, "pk.d%2E1.service.re%2Eboot");
        assert_eq!(
            parse_down_tail(&tail),
            Some(("pk".into(), "d.1".into(), "service.re.boot".into()))
        );
        assert_eq!(
            parse_down_tail("pk.dn.get"),
            Some(("pk".into(), "dn".into(), "get".into()))
        );
        assert_eq!(parse_down_tail("pk.dn.delete"), None);
    }

    #[test]
    fn a_duplicate_of_nothing_stored_is_not_an_acknowledgement() {
        let ack = |duplicate, sequence| jetstream::publish::PublishAck {
            stream: "RINGLINK_UP".into(),
            sequence,
            domain: String::new(),
            duplicate,
            value: None,
        };
        assert_eq!(Stored::of(&ack(false, 7)), Stored::New);
        assert_eq!(Stored::of(&ack(true, 7)), Stored::Before);
        // nats-server 2.9 answers a repeat of an id it staged and then lost this way.
        let wire: jetstream::publish::PublishAck =
            serde_json::from_str(r#"{"stream":"RINGLINK_UP","seq":0,"duplicate": true}"#)
                .expect("a 2.9 duplicate answer");
        assert_eq!(Stored::of(&wire), Stored::Not);
    }

    #[test]
    fn answers_round_trip_to_outcomes() {
        let ok = Outcome {
            code: Code::Success,
            data: Some(r#"{"power":1}"#.into()),
        };
        let a = answer(&ok, "properties");
        assert_eq!(&a[..], br#"{"code":0,"properties":{"power":1}}"#);
        assert_eq!(outcome_of(&a), ok);
        let e = answer(&Outcome::failed(Code::Timeout), "properties");
        assert_eq!(outcome_of(&e), Outcome::failed(Code::Timeout));
        assert_eq!(outcome_of(b"junk").code, Code::ServiceUnreachable);
    }
}
