//! Process-wide counters and histograms, rendered as Prometheus text for `GET /metrics`.
//!
//! Owns: atomics that any thread may bump, plus each shard's latest [`Stats`] snapshot (shards
//! count per message in plain integers and publish a copy now and then, so the hot path never
//! touches a shared cache line).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::{Code, ServerMethod};
use crate::session::{CloseReason, Latency, Stats};

/// A fixed-bucket histogram of atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the +Inf bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let counts = self.counts.iter().map(|c| c.load(Ordering::Relaxed));
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        write_histogram(out, name, labels, self.bounds.iter().copied(), counts, sum);
    }
}

/// Downlink latency buckets in seconds (0.5 ms .. 10 s; the default timeout is 8 s).
const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Uplink batch sizes in records.
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

const METHODS: [ServerMethod; 3] = [
    ServerMethod::GetProperty,
    ServerMethod::SetProperty,
    ServerMethod::CallService,
];

/// The limits of `[limits]` that act on peers, for `ringlink_limited_total{limit=..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A connection stopped being read: over `max_messages_per_s`.
    MessageRate,
    /// Accepting paused: over `max_new_connections_per_s`.
    AcceptRate,
    /// A connection closed at accept: over `max_connections_per_ip`.
    PerIp,
    /// An `onlineDevice` refused: the device is banned for flapping.
    Flapping,
}

impl Limit {
    pub const ALL: [Self; 4] = [
        Self::MessageRate,
        Self::AcceptRate,
        Self::PerIp,
        Self::Flapping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageRate => "message_rate",
            Self::AcceptRate => "accept_rate",
            Self::PerIp => "per_ip",
            Self::Flapping => "flapping",
        }
    }
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Refused because `max_connections` was reached.
    pub connections_rejected: AtomicU64,
    /// accept() failures (EMFILE, ENFILE, ...): the listener backs off and keeps going.
    pub accept_errors: AtomicU64,
    pub tls_handshake_errors: AtomicU64,
    /// Times a connection stopped being read because its replies or uplinks were backed up.
    pub reads_paused: AtomicU64,
    /// Uplinks whose batch could not be written (answered 100000 to the device).
    pub uplinks_failed: AtomicU64,
    /// Times each `[limits]` limit acted, by [`Limit`].
    limited: [AtomicU64; Limit::ALL.len()],
    /// Registry reloads (API or SIGHUP) that swapped a new registry in.
    pub reloads_ok: AtomicU64,
    /// Registry reloads refused (invalid sources: nothing changed).
    pub reloads_failed: AtomicU64,
    /// The longest a shard spent swapping a reloaded registry in (its loop paused), in
    /// microseconds, over every reload.
    pub swap_max_us: AtomicU64,
    pub batch_sizes: Histogram,
    /// By method (get, set, call) and outcome code slot.
    downlinks: Box<[AtomicU64]>,
    pub downlink_latency: Histogram,
    shard_stats: Mutex<Vec<Stats>>,
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Self {
            connections_open: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            tls_handshake_errors: AtomicU64::new(0),
            reads_paused: AtomicU64::new(0),
            uplinks_failed: AtomicU64::new(0),
            limited: Default::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            swap_max_us: AtomicU64::new(0),
            batch_sizes: Histogram::new(BATCH_BOUNDS),
            downlinks: (0..METHODS.len() * (Code::SENT.len() + 1))
                .map(|_| AtomicU64::new(0))
                .collect(),
            downlink_latency: Histogram::new(LATENCY_BOUNDS),
            shard_stats: Mutex::new(vec![Stats::default(); shards]),
        }
    }

    /// A downlink finished with `code` after `latency`.
    pub fn downlink_done(&self, method: ServerMethod, code: Code, latency: Duration) {
        let m = METHODS.iter().position(|x| *x == method).unwrap_or(0);
        let c = Code::SENT
            .iter()
            .position(|x| *x == code)
            .unwrap_or(Code::SENT.len());
        self.downlinks[m * (Code::SENT.len() + 1) + c].fetch_add(1, Ordering::Relaxed);
        self.downlink_latency.observe(latency.as_secs_f64());
    }

    /// `limit` acted once (a pause, a refusal).
    pub fn limited(&self, limit: Limit) {
        self.limited[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many times `limit` acted.
    pub fn limited_count(&self, limit: Limit) -> u64 {
        self.limited[limit as usize].load(Ordering::Relaxed)
    }

    /// Shard `shard` swapped a reloaded registry in, which took `took` of its loop.
    pub fn swapped(&self, shard: u8, took: Duration) {
        let us = took.as_micros() as u64;
        self.swap_max_us.fetch_max(us, Ordering::Relaxed);
        tracing::debug!(shard, took_us = us, "registry swapped in");
    }

    /// A shard's latest counters.
    pub fn publish(&self, shard: usize, stats: &Stats) {
        if let Ok(mut all) = self.shard_stats.lock() {
            if let Some(slot) = all.get_mut(shard) {
                slot.clone_from(stats);
            }
        }
    }

    /// The sum of every shard's published counters.
    pub fn stats(&self) -> Stats {
        let mut total = Stats::default();
        if let Ok(all) = self.shard_stats.lock() {
            for s in all.iter() {
                total.merge(s);
            }
        }
        total
    }

    /// Prometheus text exposition; `gauges` are values read at render time.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP ringlink_connections_open WebSocket connections open now.\n# TYPE ringlink_connections_open gauge\nringlink_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "ringlink_connections_accepted_total",
            "TCP connections accepted.",
            &self.connections_accepted,
        );
        counter(
            &mut out,
            "ringlink_connections_rejected_total",
            "Connections refused at max_connections.",
            &self.connections_rejected,
        );
        counter(
            &mut out,
            "ringlink_accept_errors_total",
            "accept() failures (EMFILE, ENFILE, ...).",
            &self.accept_errors,
        );
        counter(
            &mut out,
            "ringlink_tls_handshake_errors_total",
            "TLS handshakes that failed.",
            &self.tls_handshake_errors,
        );
        let _ = writeln!(
            out,
            "# HELP ringlink_registry_reloads_total Registry reloads (POST /v1/registry/reload, SIGHUP) by result; failed ones changed nothing.\n# TYPE ringlink_registry_reloads_total counter\nringlink_registry_reloads_total{{result=\"ok\"}} {}\nringlink_registry_reloads_total{{result=\"failed\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringlink_registry_swap_max_seconds The longest a shard's loop spent swapping a reloaded registry in.\n# TYPE ringlink_registry_swap_max_seconds gauge\nringlink_registry_swap_max_seconds {}",
            self.swap_max_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        counter(
            &mut out,
            "ringlink_reads_paused_total",
            "Times a connection was not read because its replies waited for the uplink writer or the peer was not reading (backpressure).",
            &self.reads_paused,
        );
        counter(
            &mut out,
            "ringlink_uplink_failures_total",
            "Uplinks whose batch could not be written.",
            &self.uplinks_failed,
        );
        let _ = writeln!(out, "# HELP ringlink_limited_total Times a [limits] limit acted: message_rate (a connection paused), accept_rate (accepting paused), per_ip (a connection closed at accept), flapping (an onlineDevice refused).\n# TYPE ringlink_limited_total counter");
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "ringlink_limited_total{{limit=\"{}\"}} {}",
                limit.as_str(),
                self.limited_count(limit)
            );
        }
        let stats = self.stats();
        let _ = writeln!(out, "# HELP ringlink_uplinks_total Uplinks batched, by kind.\n# TYPE ringlink_uplinks_total counter");
        for (kind, v) in Stats::UPLINK_KINDS.iter().zip(stats.uplinks) {
            let _ = writeln!(out, "ringlink_uplinks_total{{kind=\"{kind}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP ringlink_requests_total Client requests answered, by method and code.\n# TYPE ringlink_requests_total counter");
        for (method, code, n) in stats.requests() {
            let _ = writeln!(
                out,
                "ringlink_requests_total{{method=\"{method}\",code=\"{}\"}} {n}",
                code.as_u32()
            );
        }
        let _ = writeln!(out, "# HELP ringlink_replies_unmatched_total Client replies matching no pending downlink.\n# TYPE ringlink_replies_unmatched_total counter\nringlink_replies_unmatched_total {}", stats.replies_unmatched);
        let _ = writeln!(out, "# HELP ringlink_ws_errors_total Connections closed for breaking RFC 6455.\n# TYPE ringlink_ws_errors_total counter\nringlink_ws_errors_total {}", stats.ws_errors);
        let _ = writeln!(out, "# HELP ringlink_connections_closed_total Device connections ended, by reason (the timeouts and protocol errors are limits acting).\n# TYPE ringlink_connections_closed_total counter");
        for (reason, n) in CloseReason::NAMES.iter().zip(stats.closes) {
            let _ = writeln!(
                out,
                "ringlink_connections_closed_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP ringlink_downlinks_total Downlinks finished, by method and code.\n# TYPE ringlink_downlinks_total counter");
        for (m, method) in METHODS.iter().enumerate() {
            for c in 0..=Code::SENT.len() {
                let n = self.downlinks[m * (Code::SENT.len() + 1) + c].load(Ordering::Relaxed);
                if n > 0 {
                    let code = Code::SENT.get(c).map_or(100_000, |c| c.as_u32());
                    let _ = writeln!(
                        out,
                        "ringlink_downlinks_total{{method=\"{}\",code=\"{code}\"}} {n}",
                        method.as_str()
                    );
                }
            }
        }
        let _ = writeln!(out, "# HELP ringlink_downlink_latency_seconds Downlink request to completion.\n# TYPE ringlink_downlink_latency_seconds histogram");
        self.downlink_latency
            .render(&mut out, "ringlink_downlink_latency_seconds", "");
        let _ = writeln!(out, "# HELP ringlink_uplink_ack_seconds Uplink read to its acknowledgement, by part: total, log (waiting for the group commit), rest (waiting for the batch to go, processing).\n# TYPE ringlink_uplink_ack_seconds histogram");
        for (part, h) in Stats::ACK_PARTS.iter().zip(&stats.ack_latency) {
            render_latency(
                &mut out,
                "ringlink_uplink_ack_seconds",
                &format!("part=\"{part}\""),
                h,
            );
        }
        let _ = writeln!(out, "# HELP ringlink_uplink_commit_seconds Group commit handed to the log to done (write, and fsync with fsync = batch).\n# TYPE ringlink_uplink_commit_seconds histogram");
        render_latency(
            &mut out,
            "ringlink_uplink_commit_seconds",
            "",
            &stats.commit_latency,
        );
        let _ = writeln!(out, "# HELP ringlink_uplink_batch_records Records per uplink batch.\n# TYPE ringlink_uplink_batch_records histogram");
        self.batch_sizes
            .render(&mut out, "ringlink_uplink_batch_records", "");
        out
    }
}

/// Appends the series of a shard-counted latency histogram (bounds in seconds).
fn render_latency(out: &mut String, name: &str, labels: &str, h: &Latency) {
    let bounds = Latency::BOUNDS_US.iter().map(|us| *us as f64 / 1e6);
    let sum = h.sum_us as f64 / 1e6;
    write_histogram(out, name, labels, bounds, h.counts.iter().copied(), sum);
}

/// Appends a histogram's series: cumulative `_bucket`s from per-bucket `counts` (one per bound
/// plus +Inf), `_sum` and `_count`.
fn write_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: impl Iterator<Item = f64>,
    counts: impl Iterator<Item = u64>,
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut bounds = bounds.map(|b| b.to_string());
    let mut cumulative = 0;
    for n in counts {
        cumulative += n;
        let le = bounds.next().unwrap_or_else(|| "+Inf".to_owned());
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// Appends one metric (Prometheus text: help, type, value) to `out`.
pub(crate) fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}
