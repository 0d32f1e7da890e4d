//! `loadgen compare A.json B.json`: two runs' `--json` side by side, B's change against A in
//! percent, and a verdict on the two numbers that gate: report p99 (higher is worse) and
//! throughput (lower is worse), each allowed to get worse by at most `--max-regression` percent.
//!
//! The files are read as plain JSON (not as the current [`crate::stats::Summary`]), so older
//! files and files without the optional parts (server CPU, server RSS) compare too: a
//! number missing from either file is shown as `-` and never gates; throughput and report p99
//! must be in both.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::Value;

/// The default of `--max-regression`, percent.
pub const DEFAULT_MAX_REGRESSION_PCT: f64 = 10.0;

/// Which direction of a number is worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worse {
    Higher,
    Lower,
}

struct Metric {
    label: &'static str,
    pointer: &'static str,
    worse: Worse,
    /// Checked against the tolerance.
    gates: bool,
    /// Must be in both files.
    required: bool,
}

const METRICS: [Metric; 10] = [
    Metric {
        label: "throughput msgs/s",
        pointer: "/throughput_msgs_per_s",
        worse: Worse::Lower,
        gates: true,
        required: true,
    },
    Metric {
        label: "report p50 ms",
        pointer: "/latency_ms/report/p50",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "report p99 ms",
        pointer: "/latency_ms/report/p99",
        worse: Worse::Higher,
        gates: true,
        required: true,
    },
    Metric {
        label: "report p99.9 ms",
        pointer: "/latency_ms/report/p999",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "report max ms",
        pointer: "/latency_ms/report/max",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "downlink p99 ms",
        pointer: "/latency_ms/downlink/p99",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "connect p99 ms",
        pointer: "/latency_ms/connect/p99",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "errors",
        pointer: "/error_total",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "server CPU us/report",
        pointer: "/server_cpu/per_report_us",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
    Metric {
        label: "server KiB/conn",
        pointer: "/server_rss/per_connection_kib",
        worse: Worse::Higher,
        gates: false,
        required: false,
    },
];

/// One row of the comparison.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: &'static str,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// `(b - a) / a` in percent; None when a number is missing or a is 0 (and b is not).
    pub change_pct: Option<f64>,
    pub worse: Worse,
    pub gates: bool,
    /// Gated and worse than the tolerance allows.
    pub regression: bool,
}

/// Two runs compared.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub a_name: String,
    pub b_name: String,
    pub max_regression_pct: f64,
    pub rows: Vec<Row>,
}

impl Comparison {
    /// Compares run `b` against run `a` (the baseline). Errors when a file lacks a required
    /// number or the tolerance is not a finite, non-negative percentage.
    pub fn new(
        a_name: &str,
        a: &Value,
        b_name: &str,
        b: &Value,
        max_regression_pct: f64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            max_regression_pct.is_finite() && max_regression_pct >= 0.0,
            "--max-regression must be a percentage >= 0, not {max_regression_pct}"
        );
        let mut rows = Vec::new();
        for m in &METRICS {
            let va = number(a, m.pointer);
            let vb = number(b, m.pointer);
            if m.required {
                anyhow::ensure!(va.is_some(), "{a_name}: no number at {}", m.pointer);
                anyhow::ensure!(vb.is_some(), "{b_name}: no number at {}", m.pointer);
            }
            let change_pct = match (va, vb) {
                (Some(x), Some(y)) if x == y => Some(0.0),
                (Some(x), Some(y)) if x != 0.0 => Some((y - x) / x.abs() * 100.0),
                _ => None,
            };
            let worse_pct = change_pct.map(|c| match m.worse {
                Worse::Higher => c,
                Worse::Lower => -c,
            });
            rows.push(Row {
                label: m.label,
                a: va,
                b: vb,
                change_pct,
                worse: m.worse,
                gates: m.gates,
                regression: m.gates && worse_pct.is_some_and(|w| w > max_regression_pct),
            });
        }
        Ok(Self {
            a_name: a_name.to_owned(),
            b_name: b_name.to_owned(),
            max_regression_pct,
            rows,
        })
    }

    /// No gated number got worse past the tolerance.
    pub fn pass(&self) -> bool {
        !self.rows.iter().any(|r| r.regression)
    }

    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "A = {}\nB = {}", self.a_name, self.b_name);
        let _ = writeln!(
            o,
            "{:<22} {:>12} {:>12} {:>9}  {:<11} verdict",
            "metric", "A", "B", "change", "worse when"
        );
        for r in &self.rows {
            let num = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
            let change = match (r.change_pct, r.a, r.b) {
                (Some(c), _, _) => format!("{c:+.1} %"),
                (None, Some(_), Some(_)) => "n/a".to_owned(),
                _ => "-".to_owned(),
            };
            let verdict = if !r.gates {
                ""
            } else if r.regression {
                "REGRESSION"
            } else {
                "ok"
            };
            let _ = writeln!(
                o,
                "{:<22} {:>12} {:>12} {:>9}  {:<11} {verdict}",
                r.label,
                num(r.a),
                num(r.b),
                change,
                match r.worse {
                    Worse::Higher => "higher",
                    Worse::Lower => "lower",
                }
            );
        }
        let _ = writeln!(
            o,
            "tolerance: report p99 and throughput may get worse by {} %: {}",
            self.max_regression_pct,
            if self.pass() { "PASS" } else { "FAIL" }
        );
        o
    }
}

/// Reads a run's `--json` file.
pub fn load(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    anyhow::ensure!(v.is_object(), "{}: not a JSON object", path.display());
    Ok(v)
}

fn number(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer)?.as_f64().filter(|x| x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(throughput: f64, p99: f64) -> Value {
        json!({
            "throughput_msgs_per_s": throughput,
            "latency_ms": {"report": {"p50": 1.0, "p99": p99, "p999": 9.0, "max": 20.0}},
            "error_total": 0,
        })
    }

    #[test]
    fn directions_and_tolerance() {
        let base = run(1000.0, 10.0);
        let c = Comparison::new("a", &base, "b", &run(950.0, 10.9), 10.0).expect("ok");
        assert!(c.pass(), "{}", c.table());
        let c = Comparison::new("a", &base, "b", &run(1000.0, 11.5), 10.0).expect("ok");
        assert!(!c.pass(), "p99 +15 %");
        let c = Comparison::new("a", &base, "b", &run(850.0, 10.0), 10.0).expect("ok");
        assert!(!c.pass(), "throughput -15 %");
        assert!(c.table().contains("-15.0 %"), "{}", c.table());
        // Better in both directions passes, however much.
        let c = Comparison::new("a", &base, "b", &run(5000.0, 1.0), 0.0).expect("ok");
        assert!(c.pass(), "{}", c.table());
        // Optional numbers missing: shown as -, never gating.
        assert!(c.table().contains("server CPU us/report"));
        let missing = json!({"throughput_msgs_per_s": 1.0});
        assert!(Comparison::new("a", &base, "b", &missing, 10.0).is_err());
        assert!(Comparison::new("a", &base, "b", &base, -1.0).is_err());
        assert!(Comparison::new("a", &base, "b", &base, f64::NAN).is_err());
    }
}
