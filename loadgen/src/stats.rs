//! What a run measured: HdrHistograms (microseconds), counters and errors by kind; merging
//! them across threads and processes; the final summary, its table, its JSON and the
//! threshold verdict.
//!
//! Between processes histograms travel in HdrHistogram's V2 serialization, base64 encoded, in
//! one JSON line (see [`Stats::to_wire`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::series::{SecondSummary, Series, WireSecond};

/// Every histogram of a run, by name.
pub const HISTOGRAMS: [&str; 6] = [
    "report",
    "report_service",
    "downlink",
    "connect",
    "online",
    "mqtt_e2e",
];

/// Measurements of one thread, one process or a whole run.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Report request -> reply, from the *intended* send time (corrected for coordinated
    /// omission), in the order of [`HISTOGRAMS`]: report, report service time (actual send ->
    /// reply, uncorrected), downlink (API round trip from its intended time), connect (TCP +
    /// TLS + WebSocket handshake), online (onlineDevice -> reply), mqtt e2e (report sent ->
    /// its Alink post received from the broker, see [`crate::mqtt`]).
    pub hists: [Histogram<u64>; 6],
    pub counters: Counters,
    /// Errors by kind, e.g. `timeout_report`, `connect`, `report_code_109001`, `lost`.
    pub errors: BTreeMap<String, u64>,
    /// The run second by second (see [`crate::series`]); filled by [`Stats::absorb_at`].
    pub series: Series,
}

/// Event counts; merged by adding (except `ramp_us` and `max_reports_in_flight`, the largest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub reports_sent: u64,
    /// `reportProperty` answered with code 0.
    pub properties_ok: u64,
    /// `reportEvent` answered with code 0.
    pub events_ok: u64,
    /// Reports answered with code 0 before the run's deadline: what throughput counts, so
    /// that a backlog answered after the deadline does not raise it.
    pub reports_ok_in_time: u64,
    pub downlinks_sent: u64,
    pub downlinks_ok: u64,
    /// Server requests (getProperty/setProperty/callService) the simulated devices answered.
    pub downlinks_served: u64,
    /// Successful connects, reconnects included.
    pub connects: u64,
    pub reconnects: u64,
    pub devices_onlined: u64,
    /// From process start until the last first-time connect was established.
    pub ramp_us: u64,
    /// The most reports one connection had sent and not yet seen answered (or timed out) at
    /// once: 1 in a closed loop.
    pub max_reports_in_flight: u64,
    /// Alink posts from the broker matched to a sent report (see [`crate::mqtt`]).
    pub mqtt_received: u64,
    /// Of those, received before the run's deadline.
    pub mqtt_received_in_time: u64,
    /// Posts repeating an Alink id already received for their device.
    pub mqtt_duplicates: u64,
    /// New posts for a device with no report waiting for one.
    pub mqtt_unexpected: u64,
    /// Reports whose post never arrived.
    pub mqtt_lost: u64,
    /// Times the subscriber lost its broker connection.
    pub mqtt_subscriber_lost: u64,
    /// Subscriber reconnects where the broker had not kept its session.
    pub mqtt_sessions_not_kept: u64,
}

/// Index into [`Stats::hists`].
#[derive(Debug, Clone, Copy)]
pub enum Hist {
    Report = 0,
    ReportService = 1,
    Downlink = 2,
    Connect = 3,
    Online = 4,
    MqttE2e = 5,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            hists: std::array::from_fn(|_| new_histogram()),
            counters: Counters::default(),
            errors: BTreeMap::new(),
            series: Series::default(),
        }
    }

    /// Records `us` microseconds; values beyond the range (an hour) are clamped.
    pub fn record(&mut self, h: Hist, us: u64) {
        self.hists[h as usize].saturating_record(us.max(1));
    }

    pub fn error(&mut self, kind: &str) {
        self.error_n(kind, 1);
    }

    pub fn error_n(&mut self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        match self.errors.get_mut(kind) {
            Some(c) => *c += n,
            None => {
                self.errors.insert(kind.to_owned(), n);
            }
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds `other` into `self` and leaves `other` empty.
    pub fn absorb(&mut self, other: &mut Self) {
        self.merge(other);
        other.reset();
    }

    /// Like [`Stats::absorb`], and also adds `local` (a thread's numbers since its previous
    /// flush) to second `t` of the series.
    pub fn absorb_at(&mut self, local: &mut Self, t: u32) {
        let s = self.series.at(t);
        s.reports_sent += local.counters.reports_sent;
        s.reports_ok += local.counters.reports_ok();
        s.downlinks_ok += local.counters.downlinks_ok;
        for (k, v) in &local.errors {
            *s.errors.entry(k.clone()).or_default() += v;
        }
        // The per-second histograms have the same range, fewer digits: cannot fail.
        let _ = s.report.add(&local.hists[Hist::Report as usize]);
        let _ = s.downlink.add(&local.hists[Hist::Downlink as usize]);
        self.absorb(local);
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.hists.iter_mut().zip(&other.hists) {
            // Same bounds on both sides (new_histogram), so adding cannot fail; a failure would
            // only lose samples, never corrupt.
            let _ = a.add(b);
        }
        self.counters.add(&other.counters);
        for (k, v) in &other.errors {
            self.error_n(k, *v);
        }
        self.series.merge(&other.series);
    }

    fn reset(&mut self) {
        for h in &mut self.hists {
            h.reset();
        }
        self.counters = Counters::default();
        self.errors.clear();
        self.series.clear();
    }

    /// One JSON line carrying everything, histograms in V2 serialization + base64.
    pub fn to_wire(&self) -> anyhow::Result<String> {
        let mut hists = BTreeMap::new();
        for (name, h) in HISTOGRAMS.iter().zip(&self.hists) {
            let mut buf = Vec::new();
            V2Serializer::new()
                .serialize(h, &mut buf)
                .map_err(|e| anyhow::anyhow!("serialising histogram {name}: {e:?}"))?;
            hists.insert(
                (*name).to_owned(),
                base64::engine::general_purpose::STANDARD.encode(buf),
            );
        }
        let wire = Wire {
            counters: self.counters,
            errors: self.errors.clone(),
            hists,
            series: self.series.to_wire()?,
        };
        Ok(serde_json::to_string(&wire)?)
    }

    /// The inverse of [`Stats::to_wire`].
    pub fn from_wire(line: &str) -> anyhow::Result<Self> {
        let wire: Wire = serde_json::from_str(line).context("stats line is not JSON")?;
        let mut stats = Self::new();
        stats.counters = wire.counters;
        stats.errors = wire.errors;
        stats.series = Series::from_wire(&wire.series).context("series")?;
        for (i, name) in HISTOGRAMS.iter().enumerate() {
            let b64 = wire
                .hists
                .get(*name)
                .with_context(|| format!("histogram {name} missing"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .with_context(|| format!("histogram {name}: bad base64"))?;
            let h: Histogram<u64> = Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .map_err(|e| anyhow::anyhow!("histogram {name}: {e:?}"))?;
            stats.hists[i]
                .add(&h)
                .map_err(|e| anyhow::anyhow!("histogram {name}: {e:?}"))?;
        }
        Ok(stats)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    pub fn add(&mut self, o: &Self) {
        self.reports_sent += o.reports_sent;
        self.properties_ok += o.properties_ok;
        self.events_ok += o.events_ok;
        self.reports_ok_in_time += o.reports_ok_in_time;
        self.downlinks_sent += o.downlinks_sent;
        self.downlinks_ok += o.downlinks_ok;
        self.downlinks_served += o.downlinks_served;
        self.connects += o.connects;
        self.reconnects += o.reconnects;
        self.devices_onlined += o.devices_onlined;
        self.ramp_us = self.ramp_us.max(o.ramp_us);
        self.max_reports_in_flight = self.max_reports_in_flight.max(o.max_reports_in_flight);
        self.mqtt_received += o.mqtt_received;
        self.mqtt_received_in_time += o.mqtt_received_in_time;
        self.mqtt_duplicates += o.mqtt_duplicates;
        self.mqtt_unexpected += o.mqtt_unexpected;
        self.mqtt_lost += o.mqtt_lost;
        self.mqtt_subscriber_lost += o.mqtt_subscriber_lost;
        self.mqtt_sessions_not_kept += o.mqtt_sessions_not_kept;
    }

    pub fn reports_ok(&self) -> u64 {
        self.properties_ok + self.events_ok
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    counters: Counters,
    errors: BTreeMap<String, u64>,
    hists: BTreeMap<String, String>,
    #[serde(default)]
    series: Vec<WireSecond>,
}

/// Latency percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Server-side count of answered reports vs what loadgen saw answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrossCheck {
    /// Increase of `ringlink_requests_total{method="reportProperty"|"reportEvent",code="0"}`.
    pub server: u64,
    /// Reports loadgen saw answered with code 0.
    pub loadgen: u64,
    pub equal: bool,
}

/// The server's resident memory, sampled each second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRss {
    pub before_kib: u64,
    pub peak_kib: u64,
    /// RSS at the last sample with the most connections open.
    pub held_kib: u64,
    /// The most connections open at a sample.
    pub connections_held: u64,
    /// `(held - before) / connections_held`.
    pub per_connection_kib: f64,
}

/// The MQTT sink end to end: reports sent -> their Alink posts received from the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MqttSummary {
    pub broker: String,
    /// Report sent -> its post received by loadgen's subscriber.
    pub e2e_latency_ms: Latency,
    /// Posts matched to a sent report.
    pub received: u64,
    /// Reports answered with code 0 (each should reach the broker once).
    pub expected: u64,
    /// Reports still waiting for their post when the subscriber had gone quiet.
    pub lost: u64,
    /// Posts repeating an Alink id already received for their device (redeliveries).
    pub duplicates: u64,
    /// New posts for a device with no report waiting for one.
    pub unexpected: u64,
    /// Posts received before the deadline, per second of the run.
    pub forwarded_per_s: f64,
    /// Reports answered with code 0 before the deadline, per second of the run.
    pub reported_per_s: f64,
    /// `forwarded_per_s / reported_per_s` (0 when nothing was reported).
    pub ratio: f64,
    /// Times the subscriber lost its broker connection (it reconnects to its persistent
    /// session).
    pub subscriber_connections_lost: u64,
    /// Reconnects where the broker had not kept that session (a restart without
    /// persistence): what it received for loadgen meanwhile is gone.
    pub subscriber_sessions_not_kept: u64,
}

/// One threshold and whether it held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub limit: f64,
    pub value: f64,
    pub pass: bool,
}

/// The final result of a run; printed as a table and written by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub profile: String,
    pub target: String,
    pub procs: usize,
    pub threads_per_proc: usize,
    pub connections: u32,
    pub devices: u64,
    pub duration_s: f64,
    pub reports_sent: u64,
    pub reports_ok: u64,
    /// Reports answered with code 0 before the deadline, per second of the run (ramp
    /// included).
    pub throughput_msgs_per_s: f64,
    /// Corrected report latency, report service time, downlink, connect and online.
    pub latency_ms: BTreeMap<String, Latency>,
    pub connects: u64,
    pub reconnects: u64,
    /// First-time connects per second of ramp.
    pub connect_rate_per_s: f64,
    /// Closed (one report in flight per connection) or open (on a schedule).
    pub closed_loop: bool,
    /// The most reports one connection had in flight at once.
    pub max_reports_in_flight_per_connection: u64,
    pub downlinks_sent: u64,
    pub downlinks_ok: u64,
    pub downlinks_served: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub cross_check: Option<CrossCheck>,
    pub server_rss: Option<ServerRss>,
    /// With `mqtt`: the broker end of the run.
    pub mqtt: Option<MqttSummary>,
    pub thresholds: Vec<Check>,
    pub pass: bool,
    /// The server's CPU time over the run, with `--server-pid` (or `server_pid_file`).
    #[serde(default)]
    pub server_cpu: Option<ServerCpu>,
    /// The final report latency distribution (corrected): HdrHistogram's percentile
    /// iteration, 5 steps per halving of the remaining tail, for the percentile plot.
    #[serde(default)]
    pub report_percentiles: Vec<PercentilePoint>,
    /// The run second by second (see [`crate::series`]).
    #[serde(default)]
    pub series: Vec<SecondSummary>,
}

/// One point of a percentile distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PercentilePoint {
    /// 0..100.
    pub percentile: f64,
    pub ms: f64,
}

/// The server's CPU time (user + system, all threads) over the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerCpu {
    pub cpu_s: f64,
    pub wall_s: f64,
    /// Server CPU microseconds per report answered 0.
    pub per_report_us: f64,
}

impl PercentilePoint {
    /// The distribution of `h` (microseconds) in milliseconds; empty for an empty histogram.
    pub fn of(h: &Histogram<u64>) -> Vec<Self> {
        if h.is_empty() {
            return Vec::new();
        }
        h.iter_quantiles(5)
            .map(|v| Self {
                percentile: v.quantile_iterated_to() * 100.0,
                ms: h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            })
            .collect()
    }
}

impl Summary {
    /// Builds the summary; a cross-check mismatch is added to `stats` as error kind `lost`
    /// before thresholds are judged.
    pub fn new(
        p: &Profile,
        stats: &mut Stats,
        cross_check: Option<CrossCheck>,
        server_rss: Option<ServerRss>,
    ) -> Self {
        if let Some(cc) = &cross_check {
            stats.error_n("lost", cc.server.abs_diff(cc.loadgen));
        }
        let c = stats.counters;
        let latency_ms = HISTOGRAMS
            .iter()
            .zip(&stats.hists)
            .filter(|(n, _)| **n != "mqtt_e2e")
            .map(|(n, h)| ((*n).to_owned(), Latency::of(h)))
            .collect::<BTreeMap<_, _>>();
        let throughput = c.reports_ok_in_time as f64 / p.duration_s;
        let mqtt = p.mqtt.as_ref().map(|broker| {
            let forwarded = c.mqtt_received_in_time as f64 / p.duration_s;
            MqttSummary {
                broker: broker.clone(),
                e2e_latency_ms: Latency::of(&stats.hists[Hist::MqttE2e as usize]),
                received: c.mqtt_received,
                expected: c.reports_ok(),
                lost: c.mqtt_lost,
                duplicates: c.mqtt_duplicates,
                unexpected: c.mqtt_unexpected,
                forwarded_per_s: forwarded,
                reported_per_s: throughput,
                ratio: if throughput > 0.0 {
                    forwarded / throughput
                } else {
                    0.0
                },
                subscriber_connections_lost: c.mqtt_subscriber_lost,
                subscriber_sessions_not_kept: c.mqtt_sessions_not_kept,
            }
        });
        let initial = c.connects - c.reconnects.min(c.connects);
        let connect_rate = if c.ramp_us > 0 {
            initial as f64 / (c.ramp_us as f64 / 1e6)
        } else {
            0.0
        };
        let mut checks = Vec::new();
        let t = &p.thresholds;
        if let Some(limit) = t.p99_ms {
            let v = latency_ms["report"].p99;
            checks.push(Check::max("report p99 ms", limit, v));
        }
        if let Some(limit) = t.downlink_p99_ms {
            let v = latency_ms["downlink"].p99;
            checks.push(Check::max("downlink p99 ms", limit, v));
        }
        if let Some(limit) = t.max_errors {
            checks.push(Check::max(
                "errors",
                limit as f64,
                stats.error_total() as f64,
            ));
        }
        if let Some(limit) = t.min_throughput {
            checks.push(Check {
                name: "throughput msgs/s".to_owned(),
                limit,
                value: throughput,
                pass: throughput >= limit,
            });
        }
        if let Some(m) = &mqtt {
            if let Some(limit) = t.mqtt_p99_ms {
                checks.push(Check::max("mqtt e2e p99 ms", limit, m.e2e_latency_ms.p99));
            }
            // Default 0: every report answered 0 must reach the broker.
            let limit = t.max_mqtt_lost.unwrap_or(0);
            checks.push(Check::max("mqtt lost", limit as f64, m.lost as f64));
            if let Some(limit) = t.min_mqtt_ratio {
                checks.push(Check {
                    name: "mqtt fwd/report".to_owned(),
                    limit,
                    value: m.ratio,
                    pass: m.ratio >= limit,
                });
            }
        }
        let pass = checks.iter().all(|c| c.pass);
        Self {
            profile: p.name.clone(),
            target: p.targets.join(" "),
            procs: p.procs,
            threads_per_proc: p.threads_per_proc(),
            connections: p.connections,
            devices: p.total_devices(),
            duration_s: p.duration_s,
            reports_sent: c.reports_sent,
            reports_ok: c.reports_ok(),
            throughput_msgs_per_s: throughput,
            latency_ms,
            connects: c.connects,
            reconnects: c.reconnects,
            connect_rate_per_s: connect_rate,
            closed_loop: p.closed_loop,
            max_reports_in_flight_per_connection: c.max_reports_in_flight,
            downlinks_sent: c.downlinks_sent,
            downlinks_ok: c.downlinks_ok,
            downlinks_served: c.downlinks_served,
            errors: stats.errors.clone(),
            error_total: stats.error_total(),
            cross_check,
            server_rss,
            mqtt,
            thresholds: checks,
            pass,
            server_cpu: None,
            report_percentiles: PercentilePoint::of(&stats.hists[Hist::Report as usize]),
            series: stats.series.summaries(),
        }
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nloadgen {}: {} connections, {} devices, {} s, {} proc(s) x {} thread(s), {}",
            self.profile,
            self.connections,
            self.devices,
            self.duration_s,
            self.procs,
            self.threads_per_proc,
            self.target
        );
        let _ = writeln!(
            o,
            "throughput {:.1} msgs/s ({} reports sent, {} answered 0); connects {} ({:.0}/s during ramp), reconnects {}",
            self.throughput_msgs_per_s,
            self.reports_sent,
            self.reports_ok,
            self.connects,
            self.connect_rate_per_s,
            self.reconnects
        );
        let _ = writeln!(
            o,
            "{} loop; at most {} report(s) in flight on one connection",
            if self.closed_loop { "closed" } else { "open" },
            self.max_reports_in_flight_per_connection
        );
        let _ = writeln!(
            o,
            "downlinks {} sent, {} ok; {} server requests answered by devices",
            self.downlinks_sent, self.downlinks_ok, self.downlinks_served
        );
        let _ = writeln!(
            o,
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency ms", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        let rows = HISTOGRAMS
            .iter()
            .filter_map(|name| {
                let label = match *name {
                    "report" => "report (CO-corr)",
                    other => other,
                };
                Some((label, self.latency_ms.get(*name)?))
            })
            .chain(self.mqtt.as_ref().map(|m| ("mqtt e2e", &m.e2e_latency_ms)));
        for (label, l) in rows {
            let _ = writeln!(
                o,
                "{label:<16} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(o, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(o, "errors: {} ({})", self.error_total, list.join(", "));
        }
        match &self.cross_check {
            Some(cc) => {
                let _ = writeln!(
                    o,
                    "cross-check: server answered {} reports with code 0, loadgen saw {}: {}",
                    cc.server,
                    cc.loadgen,
                    if cc.equal { "equal" } else { "MISMATCH (lost)" }
                );
            }
            None => {
                let _ = writeln!(o, "cross-check: skipped (no api)");
            }
        }
        if let Some(r) = &self.server_rss {
            let _ = writeln!(
                o,
                "server RSS: {} KiB before, {} KiB with {} connections open ({:.1} KiB per connection), {} KiB peak",
                r.before_kib, r.held_kib, r.connections_held, r.per_connection_kib, r.peak_kib
            );
        }
        if let Some(c) = &self.server_cpu {
            let _ =
                writeln!(
                o,
                "server CPU: {:.2} s in {:.1} s ({:.0}% of a core), {:.1} us per report answered 0",
                c.cpu_s,
                c.wall_s,
                if c.wall_s > 0.0 { c.cpu_s / c.wall_s * 100.0 } else { 0.0 },
                c.per_report_us
            );
        }
        if let Some(m) = &self.mqtt {
            let _ = writeln!(
                o,
                "mqtt {}: received {} of {} expected, lost {}, duplicates {}, unexpected {}",
                m.broker, m.received, m.expected, m.lost, m.duplicates, m.unexpected
            );
            let _ = writeln!(
                o,
                "mqtt forwarded {:.1}/s vs reported {:.1}/s: ratio {:.4}",
                m.forwarded_per_s, m.reported_per_s, m.ratio
            );
            if m.subscriber_connections_lost > 0 {
                let _ = writeln!(
                    o,
                    "mqtt subscriber lost the broker {} time(s); {} reconnect(s) found the session gone",
                    m.subscriber_connections_lost, m.subscriber_sessions_not_kept
                );
            }
        }
        for c in &self.thresholds {
            let _ = writeln!(
                o,
                "threshold {:<18} limit {:>10.3} value {:>10.3}  {}",
                c.name,
                c.limit,
                c.value,
                if c.pass { "ok" } else { "MISSED" }
            );
        }
        let _ = writeln!(o, "result: {}", if self.pass { "PASS" } else { "FAIL" });
        o
    }
}

impl Check {
    fn max(name: &str, limit: f64, value: f64) -> Self {
        Self {
            name: name.to_owned(),
            limit,
            value,
            pass: value <= limit,
        }
    }
}

/// Microseconds, up to an hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    // Invariant: the bounds are constants that satisfy 1 <= low, high >= 2 * low, sigfig <= 5.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64, n: u64) -> Stats {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = Stats::new();
        for _ in 0..n {
            s.record(Hist::Report, rng.u64(100..50_000));
            s.record(Hist::Connect, rng.u64(100..5_000));
        }
        s.counters.properties_ok = n;
        s.counters.ramp_us = seed * 1000;
        s.counters.max_reports_in_flight = seed;
        s.error_n("timeout_report", seed);
        s
    }

    #[test]
    fn wire_round_trip_and_merge_equals_direct_merge() {
        let a = sample(1, 1000);
        let b = sample(2, 3000);
        let mut direct = Stats::new();
        direct.merge(&a);
        direct.merge(&b);

        let mut via_wire = Stats::new();
        for s in [&a, &b] {
            let line = s.to_wire().expect("serialise");
            assert!(!line.contains('\n'), "one line");
            via_wire.merge(&Stats::from_wire(&line).expect("deserialise"));
        }
        for (x, y) in direct.hists.iter().zip(&via_wire.hists) {
            assert_eq!(x.len(), y.len());
            for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
                assert_eq!(x.value_at_quantile(q), y.value_at_quantile(q));
            }
        }
        assert_eq!(via_wire.hists[Hist::Report as usize].len(), 4000);
        assert_eq!(via_wire.counters.properties_ok, 4000);
        assert_eq!(
            via_wire.counters.ramp_us, 2000,
            "ramp is the longest, not the sum"
        );
        assert_eq!(via_wire.counters.max_reports_in_flight, 2, "the largest");
        assert_eq!(via_wire.errors["timeout_report"], 3);
        assert!(Stats::from_wire("{").is_err());
    }

    #[test]
    fn absorb_empties_the_source() {
        let mut total = Stats::new();
        let mut part = sample(3, 10);
        total.absorb(&mut part);
        assert_eq!(total.hists[0].len(), 10);
        assert_eq!(part.hists[0].len(), 0);
        assert!(part.errors.is_empty());
        assert_eq!(part.counters, Counters::default());
    }

    #[test]
    fn thresholds_and_lost() {
        let p = Profile::parse("duration_s = 10\n[thresholds]\np99_ms = 10\nmin_throughput = 50")
            .expect("parse")
            .validate()
            .expect("valid");
        let mut s = Stats::new();
        for _ in 0..1000 {
            s.record(Hist::Report, 2_000);
        }
        s.counters.properties_ok = 1000;
        s.counters.reports_ok_in_time = 1000;
        let cc = CrossCheck {
            server: 1000,
            loadgen: 1000,
            equal: true,
        };
        let sum = Summary::new(&p, &mut s.clone(), Some(cc), None);
        assert!(sum.pass, "{}", sum.table());
        assert_eq!(sum.throughput_msgs_per_s, 100.0);
        assert!(sum.table().contains("result: PASS"));

        let cc = CrossCheck {
            server: 1003,
            loadgen: 1000,
            equal: false,
        };
        let sum = Summary::new(&p, &mut s.clone(), Some(cc), None);
        assert!(!sum.pass);
        assert_eq!(sum.errors["lost"], 3);

        s.record(Hist::Report, 900_000);
        for _ in 0..20 {
            s.record(Hist::Report, 900_000);
        }
        let sum = Summary::new(&p, &mut s, None, None);
        assert!(!sum.pass, "p99 over the limit");
        assert!(sum.table().contains("MISSED"));
    }
}
