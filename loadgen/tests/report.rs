//! The report and compare commands on synthetic runs (no server needed): per-second series
//! from two "processes" merged like the parent merges its children's; the HTML report is one
//! file with inline SVGs and no network reference; `loadgen report RUN.json` draws the same
//! report as the live run; `loadgen compare` exits 0 within the tolerance, 1 on a p99 or a
//! throughput regression, 2 on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use loadgen::profile::Profile;
use loadgen::report;
use loadgen::stats::{Hist, Stats, Summary};

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadgen-report-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// One process's numbers of a 6-second run: latency growing over time, an error in second 4,
/// downlinks every other second. `scale` makes the processes differ.
fn process(seed: u64, scale: u64) -> Stats {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut total = Stats::new();
    for t in 0..6u32 {
        // What a thread flushes for second t.
        let mut local = Stats::new();
        for _ in 0..100 * scale {
            local.counters.reports_sent += 1;
            local.counters.properties_ok += 1;
            local.counters.reports_ok_in_time += 1;
            local.record(Hist::Report, rng.u64(500..2_000) * u64::from(t + 1));
        }
        if t % 2 == 0 {
            local.counters.downlinks_ok += 1;
            local.record(Hist::Downlink, 3_000 * scale);
        }
        if t == 4 {
            local.error("timeout_report");
        }
        total.absorb_at(&mut local, t);
        let s = total.series.at(t);
        s.connected = 10 * scale;
        s.online = 100 * scale;
    }
    total
}

fn summary() -> Summary {
    let profile = Profile::parse("name = \"synthetic\"\nduration_s = 6\nconnections = 20")
        .expect("parse")
        .validate()
        .expect("valid");
    // The parent: two children's final stats over the wire, merged.
    let mut merged = Stats::new();
    for (seed, scale) in [(1, 1), (2, 3)] {
        let wire = process(seed, scale).to_wire().expect("wire");
        merged.merge(&Stats::from_wire(&wire).expect("from wire"));
    }
    Summary::new(&profile, &mut merged, None, None)
}

#[test]
fn series_of_two_processes_merge_second_by_second() {
    let s = summary();
    assert_eq!(s.series.len(), 6);
    for (t, sec) in s.series.iter().enumerate() {
        assert_eq!(sec.t_s as usize, t);
        assert_eq!(sec.reports_sent, 400, "100 + 300 per second");
        assert_eq!(sec.reports_ok, 400);
        assert_eq!(sec.report_count, 400);
        assert_eq!((sec.connected, sec.online), (40, 400));
        assert_eq!(sec.downlinks_ok, if t % 2 == 0 { 2 } else { 0 });
        assert_eq!(
            sec.errors.get("timeout_report").copied(),
            (t == 4).then_some(2)
        );
    }
    // Latency grows with the second: 0.5..2 ms times (t + 1).
    let p50 = |t: usize| s.series[t].report_p50_ms.expect("has replies");
    assert!(p50(0) >= 0.5 && p50(0) <= 2.0, "{}", p50(0));
    assert!(p50(5) >= 3.0 * p50(0), "{} vs {}", p50(5), p50(0));
    for sec in &s.series {
        let (a, b, c) = (
            sec.report_p50_ms.expect("p50"),
            sec.report_p99_ms.expect("p99"),
            sec.report_p999_ms.expect("p99.9"),
        );
        assert!(a <= b && b <= c, "{a} {b} {c}");
    }
    assert_eq!(s.series[1].downlink_p99_ms, None, "no downlink in second 1");
    assert!(
        s.series[0].downlink_p99_ms.expect("downlinks") >= 8.9,
        "the worse child's 9 ms"
    );
    // The whole-run numbers agree with the series.
    let sum: u64 = s.series.iter().map(|x| x.report_count).sum();
    assert_eq!(s.latency_ms["report"].count, sum);
    assert_eq!(s.error_total, 2);
    assert!(!s.report_percentiles.is_empty());
    assert!(s.report_percentiles.windows(2).all(|w| w[0].ms <= w[1].ms));
}

fn assert_no_network(text: &str, what: &str) {
    const NAMESPACES: [&str; 2] = ["http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"];
    let mut rest = text;
    while let Some(i) = rest.find("http") {
        let at = &rest[i..];
        if at.starts_with("http://") || at.starts_with("https://") {
            assert!(
                NAMESPACES.iter().any(|n| at.starts_with(n)),
                "{what}: a network reference: {}",
                &at[..at.len().min(60)]
            );
        }
        rest = &at[4..];
    }
    assert!(!text.contains("<script"), "{what}: no script");
    assert!(!text.contains("<link"), "{what}: no linked resource");
}

#[test]
fn report_subcommand_draws_the_live_report_from_json() {
    let dir = temp_dir("roundtrip");
    let s = summary();
    let json = dir.join("run.json");
    std::fs::write(&json, serde_json::to_string_pretty(&s).expect("json")).expect("write");
    let html = dir.join("run.html");
    let svgs = dir.join("svg");
    let out = loadgen()
        .arg("report")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .arg("--svg")
        .arg(&svgs)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let page = std::fs::read_to_string(&html).expect("html written");
    assert_eq!(
        page,
        report::html(&s, None).expect("html"),
        "the report from the JSON equals the live one"
    );
    assert!(page.starts_with("<!DOCTYPE html>"));
    let figures = report::figures(&s).expect("figures");
    assert_eq!(page.matches("<svg").count(), figures.len());
    assert!(
        figures.len() >= 6,
        "throughput, latency, connections, errors, downlinks, distribution"
    );
    assert!(
        page.contains("result: PASS") || page.contains("result: FAIL"),
        "the summary table"
    );
    assert!(
        page.contains("timeout_report"),
        "the error kind's line is labelled"
    );
    assert_no_network(&page, "html");

    let mut names: Vec<String> = std::fs::read_dir(&svgs)
        .expect("svg dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = figures.iter().map(|f| format!("{}.svg", f.name)).collect();
    want.sort();
    assert_eq!(names, want);
    for f in &figures {
        let text = std::fs::read_to_string(svgs.join(format!("{}.svg", f.name))).expect("svg");
        assert!(text.trim_start().starts_with("<svg"), "{}", f.name);
        assert!(text.contains("<text"), "{}: labels are SVG text", f.name);
        assert_no_network(&text, f.name);
    }

    // A note goes on the page, escaped.
    let noted = dir.join("noted.html");
    let out = loadgen()
        .arg("report")
        .arg(&json)
        .arg("--html")
        .arg(&noted)
        .args(["--note", "2 cores <shared>"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&noted).expect("html written");
    assert!(page.contains("2 cores &lt;shared&gt;"));
    assert_no_network(&page, "noted html");

    // A file that is not a run: exit 2.
    std::fs::write(dir.join("bad.json"), "{\"x\": 1}").expect("write");
    let out = loadgen()
        .args(["report"])
        .arg(dir.join("bad.json"))
        .arg("--html")
        .arg(dir.join("bad.html"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_json(dir: &Path, name: &str, throughput: f64, p99: f64) -> PathBuf {
    let mut v = serde_json::to_value(summary()).expect("value");
    v["throughput_msgs_per_s"] = throughput.into();
    v["latency_ms"]["report"]["p99"] = p99.into();
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write");
    path
}

fn compare(a: &Path, b: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = loadgen()
        .arg("compare")
        .arg(a)
        .arg(b)
        .args(extra)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn compare_exit_codes() {
    let dir = temp_dir("compare");
    let base = run_json(&dir, "base.json", 1000.0, 10.0);
    let within = run_json(&dir, "within.json", 960.0, 10.4);
    let slower = run_json(&dir, "slower.json", 1000.0, 20.0);
    let fewer = run_json(&dir, "fewer.json", 800.0, 10.0);

    let (code, out) = compare(&base, &within, &["--max-regression", "5"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("report p99 ms") && out.contains("PASS"),
        "{out}"
    );

    let (code, out) = compare(&base, &slower, &["--max-regression", "5"]);
    assert_eq!(code, Some(1), "p99 doubled: {out}");
    assert!(
        out.contains("+100.0 %") && out.contains("REGRESSION"),
        "{out}"
    );

    let (code, out) = compare(&base, &fewer, &[]);
    assert_eq!(
        code,
        Some(1),
        "throughput -20 % past the default 10 %: {out}"
    );
    assert!(out.contains("-20.0 %"), "{out}");

    // Within a wider tolerance, and the other way round an improvement.
    assert_eq!(
        compare(&base, &fewer, &["--max-regression", "25"]).0,
        Some(0)
    );
    assert_eq!(
        compare(&slower, &base, &["--max-regression", "0"]).0,
        Some(0)
    );

    // Bad input: missing file, not JSON, no p99, bad tolerance.
    assert_eq!(compare(&base, &dir.join("none.json"), &[]).0, Some(2));
    std::fs::write(dir.join("text.json"), "not json").expect("write");
    assert_eq!(compare(&base, &dir.join("text.json"), &[]).0, Some(2));
    std::fs::write(dir.join("empty.json"), "{\"throughput_msgs_per_s\": 5}").expect("write");
    assert_eq!(compare(&dir.join("empty.json"), &base, &[]).0, Some(2));
    assert_eq!(
        compare(&base, &within, &["--max-regression", "-3"]).0,
        Some(2)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
