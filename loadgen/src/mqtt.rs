//! End-to-end latency through the gateway's MQTT sink: every report a device sends should
//! reach the broker as an Alink post (`/sys/{pk}/{dn}/thing/event/{property|E}/post`), in the
//! order the gateway accepted it. One subscriber per process (QoS 1, a persistent session)
//! receives them and matches them to send times.
//!
//! Matching ([`Tracker`], sans-IO): per device a FIFO of (messageId, send instant), pushed when
//! the report is sent; a reply with a non-zero code removes its entry (that report is never
//! forwarded); a received post pops the front. A post whose Alink `id` is not after the last
//! one received for the device is a redelivery (the forwarder re-sends its in-flight window
//! after a broker reconnect; the broker may redeliver) and counts as a duplicate without
//! popping; a new post with an empty FIFO counts as unexpected. Entries left at the end are
//! lost.
//!
//! With `--procs N` each process runs its own subscriber on `/sys/#` and ignores posts of
//! devices outside its slice, so the processes' numbers add up like every other counter.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use ringlink::mqtt::{BrokerUrl, Connection, Event, Options, QoS, Step};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::stats::{Hist, Stats};

/// What the subscriber counted; added to [`crate::stats::Counters`] at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Posts matched to a sent report.
    pub received: u64,
    /// Of those, received before the run's deadline.
    pub received_in_time: u64,
    /// Posts repeating an Alink id already received for the device.
    pub duplicates: u64,
    /// New posts for a device with no report waiting.
    pub unexpected: u64,
    /// Reports still waiting for their post at the end.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Fifo {
    waiting: VecDeque<(u32, Instant)>,
    last_id: Option<u32>,
}

/// The matching state of one process: its devices' FIFOs, the e2e histogram and the counts.
#[derive(Debug)]
pub struct Tracker {
    product_key: String,
    devices: HashMap<String, Fifo>,
    deadline: Instant,
    measure_from: Instant,
    hist: Histogram<u64>,
    counts: Counts,
    /// When the last post of one of our devices arrived.
    last_post: Option<Instant>,
}

/// What [`Tracker::on_post`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    Matched,
    Duplicate,
    Unexpected,
    /// Not a device post of this process (another topic, product or slice).
    Ignored,
}

impl Tracker {
    /// A tracker for `devices` of `product_key`; posts received after `deadline` do not count
    /// towards the forwarding rate, reports sent before `measure_from` are not in the
    /// histogram (warm-up).
    pub fn new(
        product_key: &str,
        devices: impl IntoIterator<Item = String>,
        measure_from: Instant,
        deadline: Instant,
    ) -> Self {
        Self {
            product_key: product_key.to_owned(),
            devices: devices.into_iter().map(|d| (d, Fifo::default())).collect(),
            deadline,
            measure_from,
            hist: Stats::new().hists[Hist::MqttE2e as usize].clone(),
            counts: Counts::default(),
            last_post: None,
        }
    }

    /// Moves the time window (set once the load starts).
    pub fn set_window(&mut self, measure_from: Instant, deadline: Instant) {
        self.measure_from = measure_from;
        self.deadline = deadline;
    }

    /// Report `id` of `device` was sent at `at`.
    pub fn sent(&mut self, device: &str, id: u32, at: Instant) {
        if let Some(f) = self.devices.get_mut(device) {
            f.waiting.push_back((id, at));
        }
    }

    /// Report `id` of `device` was answered with a non-zero code: it will not be forwarded.
    pub fn refused(&mut self, device: &str, id: u32) {
        if let Some(f) = self.devices.get_mut(device) {
            if let Some(i) = f.waiting.iter().position(|&(x, _)| x == id) {
                f.waiting.remove(i);
            }
        }
    }

    /// A message from the subscription arrived at `now`.
    pub fn on_post(&mut self, topic: &str, payload: &[u8], now: Instant) -> Post {
        let Some(device) = post_device(topic, &self.product_key) else {
            return Post::Ignored;
        };
        let Some(f) = self.devices.get_mut(device) else {
            return Post::Ignored;
        };
        self.last_post = Some(now);
        let id = serde_json::from_slice::<AlinkId>(payload)
            .ok()
            .and_then(|a| a.id.parse::<u32>().ok());
        if let (Some(id), Some(last)) = (id, f.last_id) {
            // The forwarder's ids grow by one per publish and wrap.
            if (id.wrapping_sub(last) as i32) <= 0 {
                self.counts.duplicates += 1;
                return Post::Duplicate;
            }
        }
        if id.is_some() {
            f.last_id = id;
        }
        let Some((_, sent)) = f.waiting.pop_front() else {
            self.counts.unexpected += 1;
            return Post::Unexpected;
        };
        self.counts.received += 1;
        if now <= self.deadline {
            self.counts.received_in_time += 1;
        }
        if sent >= self.measure_from {
            let us =
                u64::try_from(now.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
            self.hist.saturating_record(us.max(1));
        }
        Post::Matched
    }

    /// Reports still waiting for their post.
    pub fn waiting(&self) -> u64 {
        self.devices.values().map(|f| f.waiting.len() as u64).sum()
    }

    pub fn last_post(&self) -> Option<Instant> {
        self.last_post
    }

    /// The final numbers: whatever still waits is lost.
    pub fn finish(&mut self) -> (Histogram<u64>, Counts) {
        let mut counts = self.counts;
        counts.lost = self.waiting();
        (self.hist.clone(), counts)
    }
}

#[derive(Deserialize)]
struct AlinkId {
    id: String,
}

/// The device name of an Alink device post `[prefix]/sys/{pk}/{dn}/thing/event/{E}/post` of
/// product `pk`.
fn post_device<'a>(topic: &'a str, product_key: &str) -> Option<&'a str> {
    let (_, rest) = topic.split_once("/sys/")?;
    let mut parts = rest.split('/');
    let pk = parts.next()?;
    let dn = parts.next()?;
    let tail: Vec<&str> = parts.collect();
    match tail.as_slice() {
        ["thing", "event", e, "post"] if pk == product_key && !e.is_empty() => Some(dn),
        _ => None,
    }
}

/// The subscriber: one connection on its own thread, running until [`Subscriber::stop`].
pub struct Subscriber {
    stop: Arc<Notify>,
    thread: std::thread::JoinHandle<SubCounts>,
}

/// The subscriber connection's own life.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubCounts {
    pub connects: u64,
    /// Connections to the broker lost (or refused) after the first.
    pub connections_lost: u64,
    /// Reconnects where the broker had not kept the session (`session_present` false):
    /// posts published while the subscriber was away were dropped by the broker.
    pub sessions_not_kept: u64,
}

impl Subscriber {
    /// Connects to `url` with a persistent session (`clean_session` false, id `client_id`),
    /// subscribes to `/sys/#` at QoS 1 and returns once the broker granted it (or fails after
    /// `within`). Posts go to `tracker`.
    pub fn start(
        url: &str,
        client_id: String,
        tracker: Arc<Mutex<Tracker>>,
        within: Duration,
    ) -> anyhow::Result<Self> {
        let url: BrokerUrl = url.parse().context("mqtt broker URL")?;
        let stop = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("loadgen-mqtt".to_owned())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return SubCounts::default();
                    }
                };
                rt.block_on(subscribe_loop(url, client_id, tracker, stop2, ready_tx))
            })?;
        match ready_rx.recv_timeout(within) {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(e)) => {
                stop.notify_one();
                let _ = thread.join();
                bail!("mqtt subscriber: {e}")
            }
            Err(_) => {
                stop.notify_one();
                let _ = thread.join();
                bail!("mqtt subscriber: not subscribed to /sys/# within {within:?}")
            }
        }
    }

    /// Disconnects, asking the broker to forget the session, and returns the counts.
    pub fn stop(self) -> SubCounts {
        self.stop.notify_one();
        self.thread.join().unwrap_or_default()
    }
}

async fn subscribe_loop(
    url: BrokerUrl,
    client_id: String,
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<Notify>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> SubCounts {
    let mut opts = Options::new(client_id.clone());
    opts.clean_session = false;
    opts.keep_alive = Duration::from_secs(5);
    opts.connect_timeout = Duration::from_secs(5);
    let mut counts = SubCounts::default();
    let mut conn = match Connection::new(url.clone(), opts, None) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return counts;
        }
    };
    if let Err(e) = conn.client().subscribe(&[(FILTER, QoS::AtLeastOnce)]) {
        let _ = ready.send(Err(e.to_string()));
        return counts;
    }
    let mut subscribed = false;
    loop {
        match conn.run_until(stop.notified()).await {
            Step::Event(Event::Message {
                topic,
                payload,
                retain: false,
                ..
            }) => {
                let now = Instant::now();
                if let Ok(mut t) = tracker.lock() {
                    t.on_post(&topic, &payload, now);
                }
            }
            Step::Event(Event::Message { .. } | Event::Acked(_)) => {}
            Step::Event(Event::Connected { session_present }) => {
                counts.connects += 1;
                if counts.connects > 1 && !session_present {
                    counts.sessions_not_kept += 1;
                }
                if counts.connects > 1 {
                    eprintln!(
                        "loadgen: mqtt subscriber reconnected (session_present={session_present})"
                    );
                }
            }
            Step::Event(Event::Subscribed { granted }) => {
                if !subscribed {
                    subscribed = true;
                    let r = if granted.first().is_some_and(Option::is_some) {
                        Ok(())
                    } else {
                        Err(format!("the broker refused the subscription to {FILTER}"))
                    };
                    let _ = ready.send(r);
                }
            }
            Step::Event(Event::Lost(why)) => {
                counts.connections_lost += 1;
                eprintln!(
                    "loadgen: mqtt subscriber lost the broker: {why} ({})",
                    conn.last_error().unwrap_or("-")
                );
            }
            Step::Event(Event::Refused { code }) => {
                if !subscribed {
                    let _ = ready.send(Err(format!("broker refused the connection: {code}")));
                    return counts;
                }
                eprintln!("loadgen: mqtt broker refused the subscriber: {code}");
            }
            Step::DialFailed(e) => {
                if subscribed {
                    eprintln!("loadgen: mqtt subscriber: dial failed: {e}");
                }
            }
            Step::Woken(()) => break,
        }
    }
    conn.shutdown(Duration::from_secs(1)).await;
    // Forget the persistent session, so the broker stops queueing for it.
    let mut opts = Options::new(client_id);
    opts.connect_timeout = Duration::from_secs(2);
    if let Ok(mut clean) = Connection::new(url, opts, None) {
        let until = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(until);
        loop {
            match clean.run_until(&mut until).await {
                Step::Event(Event::Connected { .. }) | Step::Woken(()) => break,
                _ => {}
            }
        }
        clean.shutdown(Duration::from_secs(1)).await;
    }
    counts
}

const FILTER: &str = "/sys/#";

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "a1ThermoPK0";

    fn tracker(t0: Instant) -> Tracker {
        Tracker::new(
            PK,
            ["d1".to_owned(), "d2".to_owned()],
            t0,
            t0 + Duration::from_secs(10),
        )
    }

    fn prop(dn: &str) -> String {
        format!("/sys/{PK}/{dn}/thing/event/property/post")
    }

    fn body(id: u32) -> Vec<u8> {
        format!(
            r#"{{"id":"{id}","version":"1.0","params":{{}},"method":"thing.event.property.post"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn topics() {
        assert_eq!(post_device(&prop("d1"), PK), Some("d1"));
        assert_eq!(
            post_device(&format!("/pre/sys/{PK}/d1/thing/event/overheat/post"), PK),
            Some("d1")
        );
        assert_eq!(
            post_device("/sys/other/d1/thing/event/property/post", PK),
            None
        );
        assert_eq!(
            post_device(
                &format!("/sys/{PK}/d1/thing/service/property/set_reply"),
                PK
            ),
            None
        );
        assert_eq!(post_device(&format!("/as/mqtt/status/{PK}/d1"), PK), None);
    }

    #[test]
    fn fifo_matches_in_order_and_measures_from_send() {
        let t0 = Instant::now();
        let mut t = tracker(t0);
        t.sent("d1", 5, t0);
        t.sent("d1", 6, t0 + Duration::from_millis(10));
        t.sent("d2", 7, t0 + Duration::from_millis(20));
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(t.on_post(&prop("d1"), &body(100), at(3)), Post::Matched);
        assert_eq!(t.on_post(&prop("d2"), &body(101), at(25)), Post::Matched);
        assert_eq!(t.on_post(&prop("d1"), &body(102), at(18)), Post::Matched);
        assert_eq!(t.waiting(), 0);
        let (h, c) = t.finish();
        assert_eq!((c.received, c.received_in_time, c.lost), (3, 3, 0));
        assert_eq!(h.len(), 3);
        assert!(h.max() >= 7_900 && h.max() <= 8_100, "{}", h.max());
        assert!(h.min() >= 2_900 && h.min() <= 3_100, "{}", h.min());
    }

    #[test]
    fn refused_reports_are_removed_not_expected() {
        let t0 = Instant::now();
        let mut t = tracker(t0);
        t.sent("d1", 1, t0);
        t.sent("d1", 2, t0);
        t.sent("d1", 3, t0);
        t.refused("d1", 2);
        t.refused("d1", 99);
        assert_eq!(t.waiting(), 2);
        assert_eq!(t.on_post(&prop("d1"), &body(10), t0), Post::Matched);
        assert_eq!(t.on_post(&prop("d1"), &body(11), t0), Post::Matched);
        assert_eq!(t.finish().1.lost, 0);
    }

    #[test]
    fn duplicates_unexpected_and_lost() {
        let t0 = Instant::now();
        let mut t = tracker(t0);
        t.sent("d1", 1, t0);
        t.sent("d1", 2, t0);
        t.sent("d2", 3, t0);
        assert_eq!(t.on_post(&prop("d1"), &body(50), t0), Post::Matched);
        // Redelivered: same Alink id, does not eat report 2's entry.
        assert_eq!(t.on_post(&prop("d1"), &body(50), t0), Post::Duplicate);
        assert_eq!(t.on_post(&prop("d1"), &body(49), t0), Post::Duplicate);
        assert_eq!(t.on_post(&prop("d1"), &body(51), t0), Post::Matched);
        // Nothing waits for d1 any more.
        assert_eq!(t.on_post(&prop("d1"), &body(52), t0), Post::Unexpected);
        // Not ours.
        assert_eq!(t.on_post(&prop("d9"), &body(1), t0), Post::Ignored);
        assert_eq!(
            t.on_post(&format!("/sys/{PK}/d2/thing/service/x"), &body(1), t0),
            Post::Ignored
        );
        // After the deadline: matched but not in time.
        let late = t0 + Duration::from_secs(11);
        t.sent("d2", 4, t0);
        assert_eq!(t.on_post(&prop("d2"), b"not json", late), Post::Matched);
        let (_, c) = t.finish();
        assert_eq!(
            c,
            Counts {
                received: 3,
                received_in_time: 2,
                duplicates: 2,
                unexpected: 1,
                lost: 1,
            }
        );
    }

    #[test]
    fn ids_wrap() {
        let t0 = Instant::now();
        let mut t = tracker(t0);
        t.sent("d1", 1, t0);
        t.sent("d1", 2, t0);
        assert_eq!(t.on_post(&prop("d1"), &body(u32::MAX), t0), Post::Matched);
        assert_eq!(t.on_post(&prop("d1"), &body(0), t0), Post::Matched);
        assert_eq!(t.on_post(&prop("d1"), &body(u32::MAX), t0), Post::Duplicate);
    }

    #[test]
    fn warmup_reports_are_counted_not_measured() {
        let t0 = Instant::now();
        let mut t = tracker(t0 + Duration::from_secs(1));
        t.sent("d1", 1, t0);
        assert_eq!(t.on_post(&prop("d1"), &body(1), t0), Post::Matched);
        let (h, c) = t.finish();
        assert_eq!((h.len(), c.received), (0, 1));
    }
}
