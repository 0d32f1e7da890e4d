//! External sinks: forwarders that publish the local log to the edge core's broker.
//!
//! Owns: [`Spool`], what the shards and a forwarder share (each partition's [`Marks`], a
//! wake-up for new commits, the forwarder's counters), the merged, acknowledged reading of the
//! log ([`outbox`]), and the MQTT forwarder ([`mqtt`]). Never: the report path. A shard
//! acknowledges a device once its record is in the local log, exactly as with the local sink;
//! a forwarder reads committed records afterwards, on its own thread, and a broker outage only
//! makes the log (the spool) grow within its caps (`uplink.on_full` says what happens then).
//!
//! ```text
//!   shard N: commit ─▶ log partition shard-N ─(Marks::committed, Spool::commits)─▶ forwarder
//!   forwarder: Outbox::take_next ─▶ publish ─▶ broker PUBACK ─▶ Outbox::ack ─▶ cursor ─▶ <part>/mqtt.cursor
//! ```

pub mod mqtt;
pub mod nats;
pub mod outbox;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::logging::RateLimit;
use crate::uplink::Marks;

/// What the shards and the forwarder of an external sink share.
#[derive(Debug)]
pub struct Spool {
    /// Each partition's directory and marks, by shard.
    pub partitions: Vec<(PathBuf, Arc<Marks>)>,
    /// Notified after every commit, so that an idle forwarder picks new records up at once.
    pub commits: Notify,
    pub stats: SinkStats,
    /// Problems a forwarder has with the local log repeat at every turn while they last.
    log_warn: Mutex<RateLimit>,
}

impl Spool {
    pub fn new(partitions: Vec<(PathBuf, Arc<Marks>)>) -> Self {
        Self {
            partitions,
            commits: Notify::new(),
            stats: SinkStats::default(),
            log_warn: Mutex::new(RateLimit::warnings()),
        }
    }

    /// Logs a forwarder's problem with the local log (`what`: "cannot read the log", ...) as
    /// a warning, at most a few per interval.
    pub(crate) fn warn_log(&self, sink: &'static str, what: &str, error: &dyn std::fmt::Display) {
        let allowed = match self.log_warn.lock() {
            Ok(mut limit) => limit.allow(Instant::now()),
            Err(_) => Some(0),
        };
        if let Some(suppressed) = allowed {
            tracing::warn!(sink, error = %error, suppressed, "{what}");
        }
    }

    /// Whether some partition refused its last append (`on_full = "block"` and full).
    pub fn is_full(&self) -> bool {
        self.partitions.iter().any(|(_, m)| m.is_full())
    }

    /// Records the caps deleted before they were forwarded (`on_full = "drop_oldest"`).
    pub fn dropped(&self) -> u64 {
        self.partitions.iter().map(|(_, m)| m.dropped()).sum()
    }
}

/// Committed records a sink has not acknowledged: those unforwarded when its forwarder started
/// (counted once, from the cursors), plus every record committed since, minus those forwarded
/// or dropped by the caps since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backlog {
    at_start: u64,
    committed_at_start: u64,
}

impl Backlog {
    pub(crate) fn new(outbox: &outbox::Outbox, committed: u64) -> Self {
        Self {
            at_start: outbox.count_unforwarded().unwrap_or(0),
            committed_at_start: committed,
        }
    }

    /// The backlog now, given the log's record count now.
    pub(crate) fn records(&self, spool: &Spool, committed: u64) -> u64 {
        let done = spool.stats.forwarded.load(Ordering::Relaxed) + spool.dropped();
        (self.at_start + committed.saturating_sub(self.committed_at_start)).saturating_sub(done)
    }
}

/// A forwarder's counters and gauges, written by its thread, read by `/metrics`.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Records the broker acknowledged (QoS 1) or that were handed to TCP (QoS 0).
    pub forwarded: AtomicU64,
    /// Records published while catching up a backlog (after an outage or a restart), at the
    /// replay rate.
    pub replayed: AtomicU64,
    /// Publishes re-sent after a reconnect because their PUBACK had not arrived.
    pub resent: AtomicU64,
    pub inflight: AtomicU64,
    /// Committed records not yet acknowledged by the broker.
    pub backlog_records: AtomicU64,
    pub backlog_bytes: AtomicU64,
    /// Wall-clock ms of the oldest record not yet acknowledged; 0 when there is none.
    pub oldest_unforwarded_ms: AtomicU64,
    /// Record lines that did not decode and were skipped (never expected).
    pub bad_records: AtomicU64,
    /// Downlinks from the broker, by (topic kind, code).
    pub downlinks: Mutex<BTreeMap<(&'static str, u32), u64>>,
}

impl SinkStats {
    pub fn count_downlink(&self, via: &'static str, code: u32) {
        if let Ok(mut map) = self.downlinks.lock() {
            *map.entry((via, code)).or_default() += 1;
        }
    }
}

/// Appends the sink's metrics (Prometheus text) to `out`.
pub fn render(spool: &Spool, now_ms: u64, out: &mut String) {
    let s = &spool.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let flag = |b: bool| f64::from(u8::from(b));
    let oldest = s.oldest_unforwarded_ms.load(Ordering::Relaxed);
    let age = if oldest == 0 {
        0.0
    } else {
        now_ms.saturating_sub(oldest) as f64 / 1000.0
    };
    let rows = [
        ("ringlink_sink_connected", "gauge", "1 while the forwarder is connected to its broker.", flag(s.connected.load(Ordering::Relaxed))),
        ("ringlink_sink_connects_total", "counter", "Broker connections established (CONNACK accepted).", load(&s.connects)),
        ("ringlink_sink_disconnects_total", "counter", "Broker connections lost or refused.", load(&s.disconnects)),
        ("ringlink_sink_forwarded_total", "counter", "Uplink records acknowledged by the broker.", load(&s.forwarded)),
        ("ringlink_sink_replayed_total", "counter", "Records published while catching up a backlog, at uplink.mqtt.replay_per_s.", load(&s.replayed)),
        ("ringlink_sink_resent_total", "counter", "Publishes re-sent after a reconnect (no PUBACK before the connection was lost).", load(&s.resent)),
        ("ringlink_sink_inflight", "gauge", "Publishes awaiting the broker's acknowledgement.", load(&s.inflight)),
        ("ringlink_sink_backlog_records", "gauge", "Committed uplink records the broker has not acknowledged yet.", load(&s.backlog_records)),
        ("ringlink_sink_backlog_bytes", "gauge", "Bytes of the local log from the forwarder's position on.", load(&s.backlog_bytes)),
        ("ringlink_sink_oldest_unforwarded_seconds", "gauge", "Age of the oldest record not yet acknowledged by the broker (0 when none).", age),
        ("ringlink_sink_dropped_total", "counter", "Unforwarded records deleted by the log's caps (uplink.on_full = drop_oldest).", spool.dropped() as f64),
        ("ringlink_sink_spool_full", "gauge", "1 while the log refuses appends because the broker is behind (uplink.on_full = block).", flag(spool.is_full())),
        ("ringlink_sink_bad_records_total", "counter", "Log records that did not decode and were skipped.", load(&s.bad_records)),
    ];
    for (name, kind, help, value) in rows {
        crate::metrics::write_metric(out, name, kind, help, value);
    }
    let _ = writeln!(
        out,
        "# HELP ringlink_sink_downlinks_total Downlinks from the broker, by topic kind and Link code.\n# TYPE ringlink_sink_downlinks_total counter"
    );
    if let Ok(map) = s.downlinks.lock() {
        for ((via, code), n) in map.iter() {
            let _ = writeln!(
                out,
                "ringlink_sink_downlinks_total{{topic=\"{via}\",code=\"{code}\"}} {n}"
            );
        }
    }
}
