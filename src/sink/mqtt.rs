//! The MQTT forwarder: publishes the local log to a broker as Alink messages (QoS 1 by
//! default), moves the log's cursors on the broker's PUBACKs, and serves the Alink downlinks
//! the broker delivers.
//!
//! Owns: one thread with a current-thread tokio runtime, its MQTT [`Connection`] (our own
//! in-flight window: what the broker has not acknowledged is re-sent after every reconnect,
//! never trusted to a client library's queue), the [`Outbox`] (readers and cursors), the replay
//! rate limit and the queue of downlink replies. Never: a device connection (downlinks go to
//! the owning shard through [`Shared::downlink`], like the HTTP API's), the report path.
//!
//! # One turn
//!
//! ```text
//!   pump: queued replies, then Outbox::take_next ─▶ alink::uplink ─▶ Client::publish(tag)
//!         while the window has room (and, catching up, the replay bucket has tokens)
//!   wait (Connection::run_until): a broker event, a commit, a downlink's answer, the tick,
//!         or stop
//!   PUBACK(tag) ─▶ Outbox::ack ─▶ cursor; every tick: cursors stored, gauges updated
//! ```
//!
//! # Replay
//!
//! After a (re)connect with a backlog, and after a start with one, the forwarder is catching
//! up: it publishes the backlog at `replay_per_s` on top of the live rate (every record
//! committed meanwhile adds a token), so a returning broker is not flattened and the backlog
//! still shrinks at the configured rate whatever the live load. It is caught up when the
//! outbox runs dry.
//!
//! # Stop
//!
//! After the shards stopped (so every record that will ever be committed is), the forwarder
//! keeps publishing for up to [`DRAIN_GRACE`] until nothing is left or in flight, stores its
//! cursors and disconnects. What it could not publish stays in the log for the next start.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::alink;
use crate::logging::RateLimit;
use crate::mqtt::{self, BrokerUrl, Client, Connection, Event, PublishError, QoS, Step};
use crate::protocol::Code;
use crate::shard::{unix_ms, Shared};
use crate::sink::outbox::{Outbox, Tag};
use crate::sink::{Backlog, Spool};
use crate::worker::Worker;

/// How long a stopping forwarder keeps publishing what is left.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How often cursors are stored and gauges updated.
const TICK: Duration = Duration::from_millis(200);
/// The tag of downlink replies: acknowledged or not, they move no cursor.
const REPLY_TAG: Tag = u64::MAX;

/// What the MQTT forwarder needs, resolved from `[uplink.mqtt]`.
#[derive(Debug, Clone)]
pub struct MqttOptions {
    pub url: BrokerUrl,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client: mqtt::Options,
    pub qos: QoS,
    pub topic_prefix: String,
    pub replay_per_s: u64,
    /// fsync cursor files (the log's `fsync = "batch"`).
    pub sync_cursors: bool,
    /// Sub-devices with a secret log in through this gateway's session.
    pub gateway: Option<alink::Gateway>,
}

/// At most this many free window slots are waited for before a full window is refilled.
const REFILL_BATCH: usize = 64;
/// Devices per `thing/topo/add` message.
const TOPO_CHUNK: usize = 50;

/// The running forwarder.
pub struct Forwarder(Worker);

impl Forwarder {
    /// Opens the outbox at the stored cursors and starts forwarding on a thread of its own.
    pub(crate) fn start(shared: Arc<Shared>, opts: MqttOptions) -> io::Result<Self> {
        let Some(spool) = shared.spool.clone() else {
            return Err(io::Error::other(
                "the server has no spool for an external sink",
            ));
        };
        let outbox = Outbox::open("mqtt", &spool.partitions, opts.sync_cursors)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let conn = Connection::new(opts.url.clone(), opts.client.clone(), opts.tls.clone())
            .map_err(|e| io::Error::other(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker::spawn("ringlink-mqtt", rt, move |stopped| {
            Run::new(shared, spool, opts, outbox).run(conn, stopped)
        })?;
        Ok(Self(worker))
    }

    /// Publishes what is left for up to [`DRAIN_GRACE`], stores the cursors, disconnects, and
    /// waits for the thread.
    pub fn stop(self) {
        self.0.stop();
    }
}

/// What wakes a waiting forwarder besides its broker.
enum Wake {
    Stop,
    Reply(Option<Reply>),
    Commit,
    Tick,
}

/// A downlink reply ready to publish.
struct Reply {
    topic: String,
    body: Vec<u8>,
}

/// The forwarder's state between turns.
struct Run {
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    opts: MqttOptions,
    outbox: Outbox,
    /// A record taken from the outbox that the client could not take yet.
    held: Option<(Tag, String, Vec<u8>)>,
    replies: VecDeque<Reply>,
    reply_tx: mpsc::UnboundedSender<Reply>,
    reply_rx: mpsc::UnboundedReceiver<Reply>,
    next_id: u32,
    body: Vec<u8>,
    catching_up: bool,
    bucket: Bucket,
    /// Whether the outbox ran dry in the last pump (then a commit is worth waiting for).
    dry: bool,
    backlog: Backlog,
    resent_base: u64,
    dial_error: Option<String>,
    /// Refused connections and records that cannot be published repeat while they last.
    warn_limit: RateLimit,
    /// Product keys whose downlink topics the client subscribes to (on every connection).
    subscribed: HashSet<String>,
}

impl Run {
    fn new(shared: Arc<Shared>, spool: Arc<Spool>, opts: MqttOptions, outbox: Outbox) -> Self {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let rate = opts.replay_per_s as f64;
        let burst = f64::from(opts.client.inflight.max(1));
        let committed_base = shared.log_stats.records.load(Ordering::Relaxed);
        let backlog = Backlog::new(&outbox, committed_base);
        // Alink ids are unique per device per day: start from the second of the day, spread
        // over the u32 range, so that a restart does not reuse the ids of the hours before.
        let day_s = (unix_ms() / 1000 % 86_400) as u32;
        Self {
            shared,
            spool,
            outbox,
            held: None,
            replies: VecDeque::new(),
            reply_tx,
            reply_rx,
            next_id: day_s.wrapping_mul(49_710),
            body: Vec::new(),
            catching_up: true,
            bucket: Bucket::new(rate, burst, Instant::now(), committed_base),
            dry: false,
            backlog,
            resent_base: 0,
            dial_error: None,
            warn_limit: RateLimit::warnings(),
            subscribed: HashSet::new(),
            opts,
        }
    }

    /// Subscribes to the downlink topics of every product of the registry in force that has
    /// none yet: all of them at the start, and the ones a reload added (checked every tick).
    /// The client remembers them and subscribes again on every later connection. A product a
    /// reload removed keeps its filters: its downlinks are answered 109000 like any unknown
    /// device's.
    fn subscribe_new_products(&mut self, client: &mut Client) {
        let registry = self.shared.registry();
        let new: Vec<&str> = registry
            .products()
            .iter()
            .map(|m| m.product_key())
            .filter(|pk| !self.subscribed.contains(*pk))
            .collect();
        if new.is_empty() {
            return;
        }
        let filters: Vec<String> =
            alink::subscriptions(&self.opts.topic_prefix, new.iter().copied()).collect();
        let filters: Vec<(&str, QoS)> = filters
            .iter()
            .map(|f| (f.as_str(), QoS::AtLeastOnce))
            .collect();
        match client.subscribe(&filters) {
            Ok(()) if self.subscribed.is_empty() => {}
            Ok(()) => tracing::info!(
                sink = "mqtt",
                products = ?new,
                "subscribing to the downlink topics of products a reload added"
            ),
            // Not retried: the same filters would fail the same way.
            Err(e) => tracing::warn!(
                sink = "mqtt",
                products = ?new,
                error = %e,
                "cannot subscribe to the downlink topics"
            ),
        }
        self.subscribed
            .extend(new.iter().map(|pk| (*pk).to_owned()));
    }

    async fn run(mut self, mut conn: Connection, mut stop: oneshot::Receiver<()>) {
        self.subscribe_new_products(conn.client());
        let mut stopping: Option<Instant> = None;
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            let rate_wait = self.pump(conn.client(), now);
            if let Some(deadline) = stopping {
                let done = self.dry && self.held.is_none() && self.outbox.inflight() == 0;
                if done || now >= deadline {
                    break;
                }
            }
            if now >= next_tick {
                self.tick(conn.client());
                next_tick = now + TICK;
            }
            let wake_at = rate_wait.map_or(next_tick, |r| r.min(next_tick));
            let spool = Arc::clone(&self.spool);
            let dry = self.dry;
            let wake = async {
                tokio::select! {
                    biased;
                    _ = &mut stop, if stopping.is_none() => Wake::Stop,
                    r = self.reply_rx.recv() => Wake::Reply(r),
                    _ = spool.commits.notified(), if dry => Wake::Commit,
                    _ = tokio::time::sleep_until(wake_at.into()) => Wake::Tick,
                }
            };
            match conn.run_until(wake).await {
                Step::Woken(Wake::Stop) => stopping = Some(Instant::now() + DRAIN_GRACE),
                Step::Woken(Wake::Reply(Some(r))) => self.replies.push_back(r),
                Step::Woken(Wake::Reply(None) | Wake::Commit | Wake::Tick) => {}
                Step::Event(event) => self.on_event(event, conn.client()),
                Step::DialFailed(e) => {
                    let e = e.to_string();
                    if self.dial_error.as_ref() != Some(&e) {
                        // Once per distinct error while the broker stays unreachable.
                        tracing::warn!(
                            sink = "mqtt",
                            url = %self.opts.url,
                            error = %e,
                            "cannot reach the broker (spooling, retrying)"
                        );
                        self.dial_error = Some(e);
                    }
                }
            }
        }
        self.tick(conn.client());
        conn.shutdown(Duration::from_millis(200)).await;
        self.spool.stats.connected.store(false, Ordering::Relaxed);
    }

    /// Publishes queued replies, then records, while the client and the replay bucket allow.
    /// Returns when the bucket will have a token again, if it is what stopped the pump.
    fn pump(&mut self, client: &mut Client, now: Instant) -> Option<Instant> {
        let qos = self.opts.qos;
        while let Some(r) = self.replies.front() {
            match client.publish(&r.topic, &r.body, qos, REPLY_TAG) {
                Ok(()) => {}
                Err(PublishError::Full | PublishError::NotConnected) => break,
                Err(e) => {
                    if let Some(suppressed) = self.warn_limit.allow(now) {
                        tracing::warn!(
                            sink = "mqtt",
                            topic = %r.topic,
                            error = %e,
                            suppressed,
                            "reply dropped"
                        );
                    }
                }
            }
            self.replies.pop_front();
        }
        let committed = self.shared.log_stats.records.load(Ordering::Relaxed);
        self.bucket.refill(now, committed);
        // Under load the window is the limit: refill it in batches rather than one PUBACK at a
        // time, so that a turn's publishes share one send and the acks one read.
        let window = usize::from(self.opts.client.inflight.max(1));
        let batch = (window / 4).clamp(1, REFILL_BATCH);
        if qos == QoS::AtLeastOnce && client.window_free() < batch && client.inflight() > 0 {
            return None;
        }
        loop {
            if qos == QoS::AtMostOnce && !client.is_connected() {
                return None;
            }
            if qos == QoS::AtLeastOnce && client.window_free() == 0 {
                return None;
            }
            if self.catching_up && self.bucket.tokens < 1.0 {
                return Some(self.bucket.next_token(now));
            }
            let (tag, topic, body) = match self.held.take() {
                Some(held) => held,
                None => match self.outbox.take_next() {
                    Ok(Some(taken)) => {
                        let (tag, line) = (taken.tag, taken.line);
                        let id = self.next_id;
                        self.next_id = self.next_id.wrapping_add(1);
                        let prefix = &self.opts.topic_prefix;
                        let gw = self.opts.gateway.as_ref();
                        match alink::uplink(prefix, gw, line, id, &mut self.body) {
                            Ok(topic) => (tag, topic, std::mem::take(&mut self.body)),
                            Err(e) => {
                                // Never expected: the shards wrote the line.
                                self.spool.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                                self.spool.warn_log("mqtt", "skipped a log record", &e);
                                self.outbox.ack(tag);
                                continue;
                            }
                        }
                    }
                    Ok(None) => {
                        self.dry = true;
                        self.catching_up = false;
                        return None;
                    }
                    Err(e) => {
                        self.spool.warn_log("mqtt", "cannot read the log", &e);
                        self.dry = true;
                        return None;
                    }
                },
            };
            self.dry = false;
            match client.publish(&topic, &body, qos, tag) {
                Ok(()) => {
                    if qos == QoS::AtMostOnce {
                        self.outbox.ack(tag);
                        self.spool.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.catching_up {
                        self.bucket.tokens -= 1.0;
                        self.spool.stats.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.body = body;
                }
                Err(PublishError::Full | PublishError::NotConnected) => {
                    self.held = Some((tag, topic, body));
                    return None;
                }
                Err(e) => {
                    // A device name that cannot be a topic (a wildcard in it) or a record too
                    // big for MQTT: it can never be published; skip it rather than wedge.
                    if let Some(suppressed) = self.warn_limit.allow(Instant::now()) {
                        tracing::warn!(
                            sink = "mqtt",
                            topic = %topic,
                            error = %e,
                            suppressed,
                            "record skipped: it cannot be published"
                        );
                    }
                    self.spool.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                    self.outbox.ack(tag);
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, client: &mut Client) {
        let spool = Arc::clone(&self.spool);
        let stats = &spool.stats;
        match event {
            Event::Connected { .. } => {
                stats.connected.store(true, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                let first = stats.connects.load(Ordering::Relaxed) == 1;
                if self.dial_error.take().is_some() || first {
                    tracing::info!(sink = "mqtt", url = %self.opts.url, "connected");
                }
                if first {
                    self.topo_add();
                }
                // Whatever waited meanwhile is a backlog to replay at the replay rate.
                if self.outbox.inflight() > 0 || !self.dry {
                    self.catching_up = true;
                }
                self.dry = false;
            }
            Event::Refused { code } => {
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.warn_limit.allow(Instant::now()) {
                    tracing::warn!(
                        sink = "mqtt",
                        url = %self.opts.url,
                        code = %code,
                        suppressed,
                        "the broker refused the connection"
                    );
                }
            }
            Event::Lost(why) => {
                if stats.connected.swap(false, Ordering::Relaxed) {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        sink = "mqtt",
                        url = %self.opts.url,
                        error = %why,
                        "connection to the broker lost (spooling)"
                    );
                }
            }
            Event::Acked(REPLY_TAG) => {}
            Event::Acked(tag) => {
                self.outbox.ack(tag);
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Event::Subscribed { granted } => {
                let refused = granted.iter().filter(|g| g.is_none()).count();
                if refused > 0 {
                    tracing::warn!(
                        sink = "mqtt",
                        refused,
                        "the broker refused downlink subscriptions"
                    );
                }
            }
            Event::Message { topic, payload, .. } => self.on_downlink(&topic, &payload),
        }
        let resent = client.stats().resent;
        stats
            .resent
            .fetch_add(resent.saturating_sub(self.resent_base), Ordering::Relaxed);
        self.resent_base = resent;
    }

    /// Registers every device with a secret as a sub-device of the gateway (once per process,
    /// before anything else is published, since replies go first).
    fn topo_add(&mut self) {
        let Some(gw) = &self.opts.gateway else { return };
        let mut devices: Vec<(&str, &str, &str)> = gw
            .secrets
            .iter()
            .map(|((pk, dn), s)| (pk.as_str(), dn.as_str(), s.as_str()))
            .collect();
        devices.sort_unstable();
        let now = unix_ms();
        for chunk in devices.chunks(TOPO_CHUNK) {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let mut body = Vec::new();
            let topic = alink::topo_add(&self.opts.topic_prefix, gw, chunk, id, now, &mut body);
            self.replies.push_back(Reply { topic, body });
        }
    }

    /// A message on a downlink topic: parse, route to the device's shard, reply when it ends.
    fn on_downlink(&mut self, topic: &str, payload: &[u8]) {
        let spool = Arc::clone(&self.spool);
        let stats = &spool.stats;
        let req = match alink::parse_downlink(&self.opts.topic_prefix, topic, payload) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(rej) => {
                stats.count_downlink(rej.via, rej.code.as_u32());
                let mut body = Vec::new();
                alink::reply_with(&rej.id, rej.code, None, &rej.message, &mut body);
                self.replies.push_back(Reply {
                    topic: rej.reply_topic,
                    body,
                });
                return;
            }
        };
        let Some(device) = self
            .shared
            .registry()
            .lookup(&req.product_key, &req.device_name)
        else {
            stats.count_downlink(req.via, Code::DeviceNotRegistered.as_u32());
            let mut body = Vec::new();
            alink::reply(&req.id, Code::DeviceNotRegistered, None, &mut body);
            self.replies.push_back(Reply {
                topic: req.reply_topic,
                body,
            });
            return;
        };
        let shared = Arc::clone(&self.shared);
        let spool = Arc::clone(&self.spool);
        let tx = self.reply_tx.clone();
        tokio::spawn(async move {
            let outcome = shared.downlink(device, req.request, req.params).await;
            spool.stats.count_downlink(req.via, outcome.code.as_u32());
            let mut body = Vec::new();
            alink::reply(&req.id, outcome.code, outcome.data.as_deref(), &mut body);
            let _ = tx.send(Reply {
                topic: req.reply_topic,
                body,
            });
        });
    }

    /// Stores moved cursors, updates the gauges and subscribes to new products' topics.
    fn tick(&mut self, client: &mut Client) {
        self.subscribe_new_products(client);
        if let Err(e) = self.outbox.store_cursors() {
            self.spool
                .warn_log("mqtt", "cannot store the forwarding cursor", &e);
        }
        let stats = &self.spool.stats;
        stats
            .inflight
            .store(client.inflight() as u64, Ordering::Relaxed);
        let next = self.outbox.peek_time().ok().flatten();
        let oldest = match (self.outbox.oldest_inflight_ms(), next) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        };
        stats.oldest_unforwarded_ms.store(oldest, Ordering::Relaxed);
        let committed = self.shared.log_stats.records.load(Ordering::Relaxed);
        let backlog = self.backlog.records(&self.spool, committed);
        stats.backlog_records.store(backlog, Ordering::Relaxed);
        if let Ok(bytes) = self.outbox.backlog_bytes() {
            stats.backlog_bytes.store(bytes, Ordering::Relaxed);
        }
    }
}

/// The replay rate limit: `rate` tokens per second up to `burst`, plus one per record committed
/// since the last refill (the live load is never what is being limited).
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    committed: u64,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant, committed: u64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            last: now,
            committed,
        }
    }

    fn refill(&mut self, now: Instant, committed: u64) {
        let live = committed.saturating_sub(self.committed) as f64;
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate + live).min(self.burst + live);
        self.last = now;
        self.committed = committed;
    }

    fn next_token(&self, now: Instant) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1))
    }
}
