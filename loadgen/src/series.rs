//! The run second by second: counts, gauges, errors by kind and per-second latency
//! histograms, for the time plots of a report (`--report`, `--svg`) and the `series` array of
//! `--json`.
//!
//! Collection costs little: the connections record into their thread's [`crate::stats::Stats`]
//! as before; each time a thread flushes its numbers into the process total (every 250 ms,
//! aligned to the run's start) what it flushes is exactly what it measured since the previous
//! flush, so that delta is added to the second the flushed interval lies in (by its midpoint).
//! One per-second histogram per kind (report, downlink) and process: the thread-local
//! histograms are added into it, 2 significant digits (1 % resolution) keep it at ~25 KiB.
//! Children of `--procs` send their series with their final stats; the parent adds the
//! seconds of the same index (each child counts from its own start: they start within
//! milliseconds of each other).
//!
//! Memory: an open second holds two histograms (~50 KiB); once a second is over (the run's
//! progress loop calls [`Series::pack_before`]) it is kept in its wire form, histograms V2
//! serialized and base64 encoded (a few KiB instead of ~50 KiB per second of the run).

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One second of one process (or of the run, once merged).
#[derive(Debug, Clone)]
pub struct Second {
    pub reports_sent: u64,
    /// Reports answered with code 0.
    pub reports_ok: u64,
    /// Downlink round trips answered with code 0.
    pub downlinks_ok: u64,
    /// Connections open at the end of the second.
    pub connected: u64,
    /// Devices online at the end of the second.
    pub online: u64,
    /// Errors by kind that happened in this second.
    pub errors: BTreeMap<String, u64>,
    /// Report latency (corrected for coordinated omission, like the run's `report`
    /// histogram: after the warm-up only) of the replies received in this second.
    pub report: Histogram<u64>,
    /// Downlink round trips (from their intended time) completed in this second.
    pub downlink: Histogram<u64>,
}

impl Second {
    pub fn new() -> Self {
        Self {
            reports_sent: 0,
            reports_ok: 0,
            downlinks_ok: 0,
            connected: 0,
            online: 0,
            errors: BTreeMap::new(),
            report: second_histogram(),
            downlink: second_histogram(),
        }
    }

    /// Adds `o` (another thread's or process's numbers of the same second).
    pub fn merge(&mut self, o: &Self) {
        self.reports_sent += o.reports_sent;
        self.reports_ok += o.reports_ok;
        self.downlinks_ok += o.downlinks_ok;
        self.connected += o.connected;
        self.online += o.online;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        // Same bounds (second_histogram) or finer ones with the same range: cannot fail.
        let _ = self.report.add(&o.report);
        let _ = self.downlink.add(&o.downlink);
    }

    /// What the JSON and the plots show of this second.
    pub fn summary(&self, t_s: u32) -> SecondSummary {
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                None
            } else {
                Some(h.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        SecondSummary {
            t_s,
            reports_sent: self.reports_sent,
            reports_ok: self.reports_ok,
            report_count: self.report.len(),
            report_p50_ms: ms(&self.report, 0.5),
            report_p99_ms: ms(&self.report, 0.99),
            report_p999_ms: ms(&self.report, 0.999),
            report_max_ms: ms(&self.report, 1.0),
            connected: self.connected,
            online: self.online,
            errors: self.errors.clone(),
            downlinks_ok: self.downlinks_ok,
            downlink_p99_ms: ms(&self.downlink, 0.99),
        }
    }
}

impl Default for Second {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds of the run by index (second `t` is `[t, t + 1)` s after the process's start):
/// the open ones as histograms, the finished ones packed in their wire form.
#[derive(Debug, Clone, Default)]
pub struct Series {
    seconds: BTreeMap<u32, Second>,
    packed: BTreeMap<u32, WireSecond>,
}

impl Series {
    /// Second `t`, unpacked if it was packed (a late flush).
    pub fn at(&mut self, t: u32) -> &mut Second {
        if let Some(w) = self.packed.remove(&t) {
            // Our own encoding: cannot fail; if it did, the second would lose its histograms.
            let s = Second::from_wire(&w).unwrap_or_default();
            self.seconds.entry(t).or_default().merge(&s);
        }
        self.seconds.entry(t).or_default()
    }

    /// Packs every open second before `t`.
    pub fn pack_before(&mut self, t: u32) {
        let later = self.seconds.split_off(&t);
        let done = std::mem::replace(&mut self.seconds, later);
        for (t, s) in done {
            match s.to_wire(t) {
                Ok(w) => {
                    self.packed.insert(t, w);
                }
                Err(_) => {
                    self.seconds.insert(t, s);
                }
            }
        }
    }

    pub fn merge(&mut self, o: &Self) {
        for (t, s) in &o.seconds {
            self.at(*t).merge(s);
        }
        for (t, w) in &o.packed {
            if self.seconds.contains_key(t) || self.packed.contains_key(t) {
                if let Ok(s) = Second::from_wire(w) {
                    self.at(*t).merge(&s);
                }
            } else {
                self.packed.insert(*t, w.clone());
            }
        }
    }

    pub fn clear(&mut self) {
        self.seconds.clear();
        self.packed.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty() && self.packed.is_empty()
    }

    /// Every second from 0 to the last one recorded (missing ones as zeros), for `--json`.
    pub fn summaries(&self) -> Vec<SecondSummary> {
        let last = self
            .seconds
            .keys()
            .next_back()
            .max(self.packed.keys().next_back());
        let Some(&last) = last else {
            return Vec::new();
        };
        let empty = Second::new();
        (0..=last)
            .map(|t| match (self.seconds.get(&t), self.packed.get(&t)) {
                (Some(s), _) => s.summary(t),
                (None, Some(w)) => Second::from_wire(w).unwrap_or_default().summary(t),
                (None, None) => empty.summary(t),
            })
            .collect()
    }

    /// For the wire between processes: histograms in V2 serialization + base64.
    pub fn to_wire(&self) -> anyhow::Result<Vec<WireSecond>> {
        let mut all = self.packed.clone();
        for (t, s) in &self.seconds {
            all.insert(*t, s.to_wire(*t)?);
        }
        Ok(all.into_values().collect())
    }

    pub fn from_wire(wire: &[WireSecond]) -> anyhow::Result<Self> {
        let mut series = Self::default();
        for w in wire {
            // Check it decodes now: a bad child line is an error, not a hole later.
            let s = Second::from_wire(w)?;
            if let Some(earlier) = series.packed.insert(w.t, w.clone()) {
                // The same second twice: add them up, unpacked.
                series.packed.remove(&w.t);
                let sum = series.at(w.t);
                sum.merge(&Second::from_wire(&earlier)?);
                sum.merge(&s);
            }
        }
        Ok(series)
    }
}

impl Second {
    fn to_wire(&self, t: u32) -> anyhow::Result<WireSecond> {
        Ok(WireSecond {
            t,
            reports_sent: self.reports_sent,
            reports_ok: self.reports_ok,
            downlinks_ok: self.downlinks_ok,
            connected: self.connected,
            online: self.online,
            errors: self.errors.clone(),
            report: encode(&self.report)?,
            downlink: encode(&self.downlink)?,
        })
    }

    fn from_wire(w: &WireSecond) -> anyhow::Result<Self> {
        let t = w.t;
        let mut s = Self {
            reports_sent: w.reports_sent,
            reports_ok: w.reports_ok,
            downlinks_ok: w.downlinks_ok,
            connected: w.connected,
            online: w.online,
            errors: w.errors.clone(),
            ..Self::new()
        };
        s.report
            .add(decode(&w.report).with_context(|| format!("second {t}: report"))?)
            .map_err(|e| anyhow::anyhow!("second {t}: report: {e:?}"))?;
        s.downlink
            .add(decode(&w.downlink).with_context(|| format!("second {t}: downlink"))?)
            .map_err(|e| anyhow::anyhow!("second {t}: downlink: {e:?}"))?;
        Ok(s)
    }
}

/// One second as it travels from a child to the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSecond {
    pub t: u32,
    pub reports_sent: u64,
    pub reports_ok: u64,
    pub downlinks_ok: u64,
    pub connected: u64,
    pub online: u64,
    pub errors: BTreeMap<String, u64>,
    pub report: String,
    pub downlink: String,
}

/// One second in `--json`'s `series` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondSummary {
    /// Second `t_s` of the run: `[t_s, t_s + 1)` s after the start.
    pub t_s: u32,
    pub reports_sent: u64,
    /// Reports answered with code 0 in this second.
    pub reports_ok: u64,
    /// Replies in this second's latency histogram (those after the warm-up).
    pub report_count: u64,
    /// Corrected report latency of this second's replies; null without any.
    pub report_p50_ms: Option<f64>,
    pub report_p99_ms: Option<f64>,
    pub report_p999_ms: Option<f64>,
    pub report_max_ms: Option<f64>,
    /// Connections open at the end of the second.
    pub connected: u64,
    /// Devices online at the end of the second.
    pub online: u64,
    /// Errors by kind in this second.
    pub errors: BTreeMap<String, u64>,
    /// Downlink round trips answered 0 in this second.
    pub downlinks_ok: u64,
    pub downlink_p99_ms: Option<f64>,
}

/// Microseconds, up to an hour, 2 significant digits: ~25 KiB, 1 % resolution.
pub fn second_histogram() -> Histogram<u64> {
    // Invariant: constant bounds that satisfy 1 <= low, high >= 2 * low, sigfig <= 5.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant histogram bounds are valid")
}

pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("serialising a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

pub fn decode(b64: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("bad base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(seed: u64, n: u64) -> Second {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = Second::new();
        for _ in 0..n {
            s.report.record(rng.u64(100..100_000)).expect("in range");
        }
        s.downlink.record(seed * 1000).expect("in range");
        s.reports_sent = n + 1;
        s.reports_ok = n;
        s.downlinks_ok = 1;
        s.connected = 10 * seed;
        s.online = 100 * seed;
        s.errors.insert("timeout_report".into(), seed);
        s
    }

    #[test]
    fn packed_seconds_keep_their_numbers() {
        let mut open = Series::default();
        *open.at(0) = second(1, 100);
        *open.at(1) = second(2, 200);
        *open.at(2) = second(3, 300);
        let want = open.summaries();
        let mut packed = open.clone();
        packed.pack_before(2);
        assert_eq!(packed.seconds.len(), 1, "second 2 still open");
        assert_eq!(packed.packed.len(), 2);
        assert_eq!(packed.summaries(), want);
        // A late flush into a packed second unpacks it and adds.
        packed.at(0).reports_sent += 1;
        assert_eq!(packed.summaries()[0].reports_sent, want[0].reports_sent + 1);
        // Merging packed with open and packed with packed equals merging open ones.
        let mut a = open.clone();
        a.merge(&open);
        let mut b = packed.clone();
        b.at(0).reports_sent -= 1;
        let mut p2 = open.clone();
        p2.pack_before(3);
        b.merge(&p2);
        assert_eq!(b.summaries(), a.summaries());
        let mut c = p2.clone();
        c.merge(&p2);
        assert_eq!(c.summaries(), a.summaries());
        // One wire holding the same seconds twice adds them up.
        let mut twice = open.to_wire().expect("wire");
        twice.extend(open.to_wire().expect("wire"));
        let d = Series::from_wire(&twice).expect("decode");
        assert_eq!(d.summaries(), a.summaries());
    }

    #[test]
    fn seconds_of_the_same_index_merge_across_processes() {
        // Two "children": child A has seconds 0 and 1, child B seconds 1 and 3.
        let mut a = Series::default();
        *a.at(0) = second(1, 100);
        *a.at(1) = second(2, 200);
        let mut b = Series::default();
        *b.at(1) = second(3, 300);
        *b.at(3) = second(4, 400);

        let mut parent = Series::default();
        for child in [&a, &b] {
            let wire = serde_json::to_string(&child.to_wire().expect("wire")).expect("json");
            let back: Vec<WireSecond> = serde_json::from_str(&wire).expect("parse");
            parent.merge(&Series::from_wire(&back).expect("decode"));
        }
        let rows = parent.summaries();
        assert_eq!(rows.len(), 4, "0..=3, the gap at 2 filled");
        assert_eq!(rows[2].reports_sent, 0);
        assert_eq!(rows[2].report_p99_ms, None);
        let one = &rows[1];
        assert_eq!(one.reports_ok, 500);
        assert_eq!(one.report_count, 500);
        assert_eq!((one.connected, one.online), (50, 500));
        assert_eq!(one.errors["timeout_report"], 5);
        assert_eq!(one.downlinks_ok, 2);

        // The merged second's percentiles are those of the union of both histograms.
        let mut union = second_histogram();
        union.add(&a.at(1).report).expect("add");
        union.add(&b.at(1).report).expect("add");
        assert_eq!(
            one.report_p99_ms,
            Some(union.value_at_quantile(0.99) as f64 / 1000.0)
        );
        assert_eq!(rows[3].report_count, 400);
        assert_eq!(
            rows[0].report_p50_ms,
            Some(a.at(0).report.value_at_quantile(0.5) as f64 / 1000.0)
        );
        assert!(Series::from_wire(&[WireSecond {
            report: "!!".into(),
            ..serde_json::from_str::<Vec<WireSecond>>(
                &serde_json::to_string(&a.to_wire().expect("wire")).expect("json")
            )
            .expect("parse")[0]
                .clone()
        }])
        .is_err());
    }
}
