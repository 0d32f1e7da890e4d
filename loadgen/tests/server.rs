//! loadgen against the real ringlink binary: a 3-second mini profile with sub-gateways,
//! direct devices, downlinks and churn must finish with zero errors and a cross-check where
//! the server's count of answered reports equals loadgen's; once in one process and once
//! split over two. A closed-loop profile must keep one report in flight per connection and
//! still answer many.
//!
//! The server binary is looked up next to this test's executable (`target/<profile>/ringlink`,
//! built by `cargo test --workspace` or `cargo build`); without it the test is skipped with a
//! message.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Server {
    child: Child,
    ws: String,
    api: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ringlink_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/server-<hash> -> target/<profile>/ringlink
    let dir = exe.parent()?.parent()?;
    let bin = dir.join(format!("ringlink{}", std::env::consts::EXE_SUFFIX));
    bin.is_file().then_some(bin)
}

/// Starts ringlink with its data and the test's files in a folder of its own: `test` tells
/// apart the tests of this process, which run in parallel.
fn start_server(bin: &PathBuf, test: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("loadgen-it-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--threads", "1", "--data-dir"])
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ringlink");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ringlink: listening on") {
                let _ = tx.send(line);
            }
        }
    });
    let mut server = Server {
        child,
        ws: String::new(),
        api: String::new(),
        dir,
    };
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("ringlink prints its start line");
    let word_after = |marker: &str| {
        let rest = &line[line.find(marker).expect(marker) + marker.len()..];
        rest.split([' ', ',']).next().expect("address").to_owned()
    };
    server.ws = format!("ws://{}", word_after("ws://"));
    server.api = word_after("api http://");
    server
}

const MINI: &str = r#"
        connections = 24
        subgateways = 4
        subgateway_devices = 5
        ramp_per_second = 200
        report_rate_per_device = 5
        event_ratio = 0.2
        downlinks_per_second = 10
        reconnects_per_second = 2
        duration_s = 3
        [thresholds]
        max_errors = 0
        p99_ms = 2000
        "#;

/// Closed loop over sub-gateways and direct devices, with churn: the default open-loop rate
/// (1 report/s per device) would give about 3 reports per device, the closed loop hundreds.
const CLOSED: &str = r#"
        connections = 8
        subgateways = 2
        subgateway_devices = 3
        ramp_per_second = 0
        closed_loop = true
        event_ratio = 0.2
        reconnects_per_second = 1
        duration_s = 3
        [thresholds]
        max_errors = 0
        "#;

fn run_loadgen(server: &Server, name: &str, text: &str, procs: &str) -> serde_json::Value {
    let profile = server.dir.join(format!("{name}-{procs}.toml"));
    std::fs::write(&profile, text).expect("write profile");
    let json = server.dir.join(format!("{name}-{procs}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg(&profile)
        .args([
            "--target",
            &server.ws,
            "--api",
            &server.api,
            "--procs",
            procs,
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("result: PASS"), "{stdout}");
    assert!(stdout.contains("connected"), "progress lines: {stdout}");
    let text = std::fs::read_to_string(&json).expect("json written");
    serde_json::from_str(&text).expect("json parses")
}

#[test]
fn mini_profile_against_the_real_server() {
    let Some(bin) = ringlink_binary() else {
        eprintln!(
            "SKIPPED: no ringlink binary next to {:?}; build it first (cargo build --workspace)",
            std::env::current_exe().ok()
        );
        return;
    };
    let server = start_server(&bin, "mini");
    for procs in ["1", "2"] {
        let v = run_loadgen(&server, "mini", MINI, procs);
        assert_eq!(v["error_total"], 0, "{v:#}");
        assert_eq!(v["cross_check"]["equal"], true, "{v:#}");
        let ok = v["reports_ok"].as_u64().expect("reports_ok");
        assert!(ok > 100, "{v:#}");
        assert_eq!(v["cross_check"]["server"], ok, "{v:#}");
        assert!(
            v["downlinks_ok"].as_u64().expect("downlinks_ok") > 0,
            "{v:#}"
        );
        assert_eq!(v["devices"], 40);
        assert_eq!(v["pass"], true);
        assert!(v["latency_ms"]["report"]["count"].as_u64().expect("count") > 100);
        assert_eq!(v["closed_loop"], false);
        assert!(
            v["max_reports_in_flight_per_connection"]
                .as_u64()
                .expect("in flight")
                >= 1
        );
        // The series accounts for every reply, latency sample and downlink, second by second,
        // and its gauges add up the processes' connections.
        let series = v["series"].as_array().expect("series");
        assert!((3..=8).contains(&series.len()), "{} seconds", series.len());
        let sum =
            |key: &str| -> u64 { series.iter().map(|s| s[key].as_u64().expect("count")).sum() };
        assert_eq!(sum("reports_ok"), ok, "procs {procs}");
        assert_eq!(sum("reports_sent"), v["reports_sent"], "procs {procs}");
        assert_eq!(sum("report_count"), v["latency_ms"]["report"]["count"]);
        assert_eq!(sum("downlinks_ok"), v["downlinks_ok"], "procs {procs}");
        let most = series
            .iter()
            .map(|s| s["connected"].as_u64().expect("connected"))
            .max();
        assert!(
            most.is_some_and(|m| (20..=24).contains(&m)),
            "procs {procs}: {most:?}"
        );
        for (t, s) in series.iter().enumerate() {
            assert_eq!(s["t_s"], t as u64);
        }
    }
}

#[test]
fn closed_loop_keeps_one_report_in_flight_per_connection() {
    let Some(bin) = ringlink_binary() else {
        eprintln!(
            "SKIPPED: no ringlink binary next to {:?}; build it first (cargo build --workspace)",
            std::env::current_exe().ok()
        );
        return;
    };
    let server = start_server(&bin, "closed");
    let v = run_loadgen(&server, "closed", CLOSED, "1");
    assert_eq!(v["error_total"], 0, "{v:#}");
    assert_eq!(v["closed_loop"], true, "{v:#}");
    // The server's own count of answered reports equals loadgen's.
    assert_eq!(v["cross_check"]["equal"], true, "{v:#}");
    assert_eq!(v["max_reports_in_flight_per_connection"], 1, "{v:#}");
    let ok = v["reports_ok"].as_u64().expect("reports_ok");
    // Far beyond what the 12 devices would send open loop at the default rate (about 36).
    assert!(ok > 12 * 30, "{v:#}");
    assert_eq!(v["cross_check"]["server"], ok, "{v:#}");
    // One in flight and nothing else: every report sent was answered (none left at the end).
    assert_eq!(v["reports_sent"], ok, "{v:#}");
    // Round trips only: the corrected latency equals the service time.
    let lat = &v["latency_ms"];
    assert_eq!(lat["report"]["p99"], lat["report_service"]["p99"], "{v:#}");
}
