//! Plots of a run, from its [`Summary`] (live, or read back from a `--json` file): SVGs drawn
//! with `plotters` (SVG backend only: text is written as SVG `<text>`, so no font files are
//! read), and one self-contained HTML page with the summary table and every SVG inline (no
//! script, no style sheet, no network).
//!
//! Over time (the `series`): reports/s sent and answered, report latency p50/p99/p99.9 per
//! second (corrected), connections open and devices online, errors per second by kind,
//! downlink round trips per second and their p99. And the final report latency distribution:
//! x = percentile on a "number of nines" axis (0 = 0 %, 1 = 90 %, ... 5 = 99.999 %), y = ms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::series::SecondSummary;
use crate::stats::Summary;

/// At most this many points per line: longer runs are drawn in buckets of whole seconds (rates
/// averaged, latencies the worst of the bucket, gauges the last value).
pub const MAX_POINTS: usize = 300;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 320;
/// The distribution's x axis ends at five nines (99.999 %).
const NINES: f64 = 5.0;
/// The most error kinds drawn (the most frequent ones).
const MAX_ERROR_KINDS: usize = 8;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One plot as an SVG document.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File name stem for `--svg DIR` (`DIR/<name>.svg`).
    pub name: &'static str,
    pub title: String,
    pub svg: String,
}

/// How a bucket of seconds becomes one point.
#[derive(Clone, Copy)]
enum Agg {
    Mean,
    Max,
    Last,
}

struct Line {
    label: String,
    points: Vec<(f64, f64)>,
    /// Drawn against the right-hand axis.
    secondary: bool,
}

struct TimePlot {
    name: &'static str,
    title: String,
    y_desc: &'static str,
    y2_desc: Option<&'static str>,
    lines: Vec<Line>,
    /// Where the legend goes: where the lines usually are not.
    legend: SeriesLabelPosition,
}

/// Every figure of the report, in page order.
pub fn figures(s: &Summary) -> anyhow::Result<Vec<Figure>> {
    let series = &s.series;
    let k = bucket_size(series.len());
    let x_max = series.last().map_or(1.0, |l| f64::from(l.t_s) + 1.0);
    let line = |label: &str, agg: Agg, f: &dyn Fn(&SecondSummary) -> Option<f64>| Line {
        label: label.to_owned(),
        points: reduce(series, k, agg, f),
        secondary: false,
    };
    let per = if k > 1 {
        format!(" (buckets of {k} s)")
    } else {
        String::new()
    };
    let mut plots = vec![
        TimePlot {
            name: "throughput",
            title: format!("Reports per second{per}"),
            y_desc: "reports/s",
            y2_desc: None,
            legend: SeriesLabelPosition::LowerMiddle,
            lines: vec![
                line("sent", Agg::Mean, &|x| Some(x.reports_sent as f64)),
                line("answered 0", Agg::Mean, &|x| Some(x.reports_ok as f64)),
            ],
        },
        TimePlot {
            name: "latency",
            title: format!("Report latency per second, corrected for coordinated omission{per}"),
            y_desc: "ms",
            y2_desc: None,
            legend: SeriesLabelPosition::UpperRight,
            lines: vec![
                line("p50", Agg::Max, &|x| x.report_p50_ms),
                line("p99", Agg::Max, &|x| x.report_p99_ms),
                line("p99.9", Agg::Max, &|x| x.report_p999_ms),
            ],
        },
        TimePlot {
            name: "connections",
            title: format!("Connections open and devices online{per}"),
            y_desc: "connections",
            y2_desc: Some("devices"),
            legend: SeriesLabelPosition::LowerMiddle,
            lines: vec![
                line("connections", Agg::Last, &|x| Some(x.connected as f64)),
                Line {
                    secondary: true,
                    ..line("devices online", Agg::Last, &|x| Some(x.online as f64))
                },
            ],
        },
    ];
    // Errors: one line per kind, the most frequent kinds first.
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for x in series {
        for (kind, n) in &x.errors {
            *totals.entry(kind).or_default() += n;
        }
    }
    let mut kinds: Vec<(&str, u64)> = totals.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown = kinds.len().min(MAX_ERROR_KINDS);
    let more = if kinds.len() > shown {
        format!(", {} more kinds not drawn", kinds.len() - shown)
    } else {
        String::new()
    };
    plots.push(TimePlot {
        name: "errors",
        title: if kinds.is_empty() {
            format!("Errors per second by kind: none{per}")
        } else {
            format!("Errors per second by kind{per}{more}")
        },
        y_desc: "errors/s",
        y2_desc: None,
        legend: SeriesLabelPosition::UpperRight,
        lines: kinds[..shown]
            .iter()
            .map(|(kind, _)| {
                line(kind, Agg::Mean, &|x| {
                    Some(x.errors.get(*kind).copied().unwrap_or(0) as f64)
                })
            })
            .collect(),
    });
    plots.push(TimePlot {
        name: "downlinks",
        title: format!("Downlink round trips per second and their p99{per}"),
        y_desc: "round trips/s",
        y2_desc: Some("p99 ms"),
        legend: SeriesLabelPosition::UpperRight,
        lines: vec![
            line("round trips/s", Agg::Mean, &|x| Some(x.downlinks_ok as f64)),
            Line {
                secondary: true,
                ..line("p99 ms", Agg::Max, &|x| x.downlink_p99_ms)
            },
        ],
    });

    let mut out = Vec::new();
    for p in &plots {
        out.push(Figure {
            name: p.name,
            title: p.title.clone(),
            svg: draw_time(p, x_max).with_context(|| format!("plot {}", p.name))?,
        });
    }
    let title = "Report latency distribution (corrected), whole run".to_owned();
    out.push(Figure {
        name: "distribution",
        svg: draw_distribution(s, &title).context("plot distribution")?,
        title,
    });
    Ok(out)
}

/// Writes one SVG per figure into `dir` (created if missing); returns the paths.
pub fn write_svgs(s: &Summary, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut paths = Vec::new();
    for f in figures(s)? {
        let path = dir.join(format!("{}.svg", f.name));
        std::fs::write(&path, &f.svg).with_context(|| format!("{}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The whole report as one HTML page: the summary table, then every figure inline. `note`
/// (plain text, e.g. what else ran on the machine) goes under the heading.
pub fn html(s: &Summary, note: Option<&str>) -> anyhow::Result<String> {
    let mut o = String::new();
    let title = format!("loadgen {}: {}", s.profile, s.target);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{}</title>\n</head>\n<body style=\"font-family: sans-serif; max-width: 960px; margin: 1em auto\">\n\
         <h1>{}</h1>\n<p>Result: <b>{}</b>; {} s, {} connections, {} devices, {:.1} reports/s answered 0.</p>\n\
         <pre style=\"background: #f4f4f4; padding: 0.5em; overflow-x: auto\">{}</pre>\n",
        escape(&title),
        escape(&title),
        if s.pass { "PASS" } else { "FAIL" },
        s.duration_s,
        s.connections,
        s.devices,
        s.throughput_msgs_per_s,
        escape(s.table().trim())
    );
    if let Some(note) = note {
        let _ = writeln!(o, "<p><i>Note:</i> {}</p>", escape(note));
    }
    for f in figures(s)? {
        let _ = write!(
            o,
            "<h2>{}</h2>\n<figure style=\"margin: 0\">\n{}\n</figure>\n",
            escape(&f.title),
            f.svg.trim()
        );
    }
    o.push_str("</body>\n</html>\n");
    Ok(o)
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// Seconds per point so that a line has at most [`MAX_POINTS`] points.
fn bucket_size(seconds: usize) -> usize {
    seconds.div_ceil(MAX_POINTS).max(1)
}

/// One point per bucket of `k` seconds, at the middle of the bucket (second `t` is
/// `[t, t + 1)`), gauges (sampled at the end of each second) at its end; buckets where `f` has
/// no value are left out (the line joins its neighbours).
fn reduce(
    series: &[SecondSummary],
    k: usize,
    agg: Agg,
    f: &dyn Fn(&SecondSummary) -> Option<f64>,
) -> Vec<(f64, f64)> {
    series
        .chunks(k)
        .filter_map(|bucket| {
            let values: Vec<f64> = bucket.iter().filter_map(f).collect();
            let y = match agg {
                Agg::Mean => {
                    if values.is_empty() {
                        return None;
                    }
                    values.iter().sum::<f64>() / bucket.len() as f64
                }
                Agg::Max => values.iter().copied().reduce(f64::max)?,
                Agg::Last => *values.last()?,
            };
            let len = bucket.len() as f64;
            let x = f64::from(bucket[0].t_s)
                + match agg {
                    Agg::Last => len,
                    Agg::Mean | Agg::Max => len / 2.0,
                };
            Some((x, y))
        })
        .collect()
}

/// The top of a y axis for values up to `max`: a little headroom, never empty.
fn top(max: f64) -> f64 {
    if max > 0.0 {
        max * 1.08
    } else {
        1.0
    }
}

fn compact(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn draw_time(p: &TimePlot, x_max: f64) -> anyhow::Result<String> {
    let max_of = |secondary: bool| {
        p.lines
            .iter()
            .filter(|l| l.secondary == secondary)
            .flat_map(|l| l.points.iter().map(|pt| pt.1))
            .fold(0.0, f64::max)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&p.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .right_y_label_area_size(if p.y2_desc.is_some() { 60 } else { 0 })
            .build_cartesian_2d(0f64..x_max, 0f64..top(max_of(false)))?
            .set_secondary_coord(0f64..x_max, 0f64..top(max_of(true)));
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(p.y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| compact(*y))
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()?;
        if let Some(d) = p.y2_desc {
            chart
                .configure_secondary_axes()
                .y_desc(d)
                .y_label_formatter(&|y| compact(*y))
                .draw()?;
        }
        for (i, l) in p.lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = color.stroke_width(2);
            let legend = move |(x, y): (i32, i32)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            };
            let label = if l.secondary {
                format!("{} (right axis)", l.label)
            } else {
                l.label.clone()
            };
            if l.secondary {
                chart
                    .draw_secondary_series(LineSeries::new(l.points.iter().copied(), style))?
                    .label(label)
                    .legend(legend);
            } else {
                chart
                    .draw_series(LineSeries::new(l.points.iter().copied(), style))?
                    .label(label)
                    .legend(legend);
            }
        }
        if !p.lines.is_empty() {
            chart
                .configure_series_labels()
                .position(p.legend.clone())
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// x of a percentile on the "number of nines" axis: -log10(1 - p/100), capped at five nines.
pub fn nines(percentile: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 10f64.powf(-NINES) {
        NINES
    } else {
        -rest.log10()
    }
}

fn draw_distribution(s: &Summary, title: &str) -> anyhow::Result<String> {
    let points: Vec<(f64, f64)> = s
        .report_percentiles
        .iter()
        .map(|p| (nines(p.percentile), p.ms))
        .collect();
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .margin_right(30)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..NINES, 0f64..top(y_max))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .x_labels(NINES as usize + 1)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() > 1e-6 {
                    return String::new();
                }
                match x.round() as i32 {
                    0 => "0%".to_owned(),
                    n => format!("{}%", 100.0 - 100.0 * 10f64.powi(-n)),
                }
            })
            .y_label_formatter(&|y| compact(*y))
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()?;
        let color = COLORS[0];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!(
                "report latency, {} samples, max {:.3} ms",
                s.latency_ms.get("report").map_or(0, |l| l.count),
                s.latency_ms.get("report").map_or(0.0, |l| l.max)
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(t: u32, ok: u64, p99: Option<f64>) -> SecondSummary {
        SecondSummary {
            t_s: t,
            reports_sent: ok,
            reports_ok: ok,
            report_count: ok,
            report_p50_ms: p99.map(|v| v / 2.0),
            report_p99_ms: p99,
            report_p999_ms: p99.map(|v| v * 2.0),
            report_max_ms: p99,
            connected: u64::from(t),
            online: 0,
            errors: BTreeMap::new(),
            downlinks_ok: 0,
            downlink_p99_ms: None,
        }
    }

    #[test]
    fn buckets_average_rates_and_keep_the_worst_latency() {
        let series: Vec<SecondSummary> = (0..10)
            .map(|t| sec(t, 10 * u64::from(t), (t != 3).then_some(f64::from(t))))
            .collect();
        let rate = reduce(&series, 4, Agg::Mean, &|x| Some(x.reports_ok as f64));
        assert_eq!(rate, [(2.0, 15.0), (6.0, 55.0), (9.0, 85.0)]);
        let worst = reduce(&series, 4, Agg::Max, &|x| x.report_p99_ms);
        assert_eq!(worst, [(2.0, 2.0), (6.0, 7.0), (9.0, 9.0)]);
        let gauge = reduce(&series, 4, Agg::Last, &|x| Some(x.connected as f64));
        assert_eq!(gauge, [(4.0, 3.0), (8.0, 7.0), (10.0, 9.0)]);
        let gaps = reduce(&series, 1, Agg::Max, &|x| x.report_p99_ms);
        assert_eq!(gaps.len(), 9, "the second without replies is left out");
        assert_eq!(bucket_size(300), 1);
        assert_eq!(bucket_size(301), 2);
        assert_eq!(bucket_size(0), 1);
    }

    #[test]
    fn nines_axis() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), NINES);
        assert_eq!(nines(99.99999), NINES);
    }
}
