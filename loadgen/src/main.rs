//! loadgen: drives a Link IoT Edge WebSocket server (ringlink or any other) with simulated
//! devices and sub-gateways, and measures it. See `profiles/` and the README.
//!
//! Process layout: the process started by the user owns the run. With `procs = 1` it runs
//! the connections itself; with more it re-executes itself once per slice (environment
//! variable `LOADGEN_SLICE=i/n`), reads each child's progress and final stats (one JSON line
//! each, histograms in HdrHistogram V2 + base64) from its stdout, and merges them. Either way
//! the owner scrapes the server's `/metrics` before and after for the cross-check.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use loadgen::compare::{self, Comparison};
use loadgen::http;
use loadgen::profile::{Overrides, Profile};
use loadgen::report;
use loadgen::run::{self, Progress, Slice};
use loadgen::stats::{CrossCheck, ServerCpu, ServerRss, Stats, Summary};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for ringlink and any Link IoT Edge WebSocket server",
    long_about = "Load generator for ringlink and any Link IoT Edge WebSocket server.\n\n\
        Runs the load profile PROFILE.toml (see profiles/): connects simulated devices and \
        sub-gateways, onlines their devices, reports on an open-loop schedule, answers the \
        server's getProperty/setProperty/callService, sends downlinks through the API, and \
        prints a progress line each second and a final table. Exits 1 when a threshold of the \
        profile is missed, 2 on a setup error.\n\n\
        `loadgen report RUN.json` draws the plots of a saved run, `loadgen compare A.json \
        B.json` compares two.",
    after_help = "Examples:\n  \
        loadgen profiles/smoke.toml --api 127.0.0.1:17690\n  \
        loadgen profiles/direct-10k.toml --procs 2 --json out.json --report out.html\n  \
        loadgen report out.json --svg plots/\n  \
        loadgen compare before.json after.json --max-regression 15",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Draws the report of a run saved with --json: an HTML page and/or one SVG per plot.
    Report {
        /// The run's --json file.
        json: PathBuf,
        /// Write the report as one self-contained HTML file.
        #[arg(long, value_name = "FILE", required_unless_present = "svg")]
        html: Option<PathBuf>,
        /// Write one SVG per plot into this directory.
        #[arg(long, value_name = "DIR")]
        svg: Option<PathBuf>,
        /// A note for the HTML page (e.g. what else ran on the machine).
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Compares two runs saved with --json, B against A. Exits 1 when B's report p99 is higher
    /// or its throughput lower than A's by more than --max-regression percent, 2 on bad input.
    Compare {
        /// The baseline run.
        a: PathBuf,
        /// The run to judge.
        b: PathBuf,
        /// How many percent report p99 and throughput may get worse.
        #[arg(long, value_name = "PCT", default_value_t = compare::DEFAULT_MAX_REGRESSION_PCT)]
        max_regression: f64,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The load profile (TOML).
    #[arg(required = true)]
    profile: Option<PathBuf>,
    /// Server to load, ws://IP:PORT or wss://IP:PORT (overrides the profile's `target` and
    /// `targets`). Repeat it for the nodes of a cluster: connection k goes to the (k mod n)th.
    #[arg(long, value_name = "URL")]
    target: Vec<String>,
    /// The server's API IP:PORT, for downlinks and the /metrics cross-check (overrides the
    /// profile's `api` and `apis`). Repeat it for the nodes of a cluster: each downlink goes to
    /// a random one, the cross-check sums them all.
    #[arg(long, value_name = "IP:PORT")]
    api: Vec<String>,
    /// Write the final numbers as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Processes to spread connections over (overrides the profile's `procs`).
    #[arg(long, value_name = "N")]
    procs: Option<usize>,
    /// Run length in seconds (overrides the profile's `duration_s`).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// The broker of the server's MQTT sink, mqtt://HOST:PORT (overrides the profile's
    /// `mqtt`): measure each report's way to its Alink post there.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// The server's pid: sample its RSS each second (like the profile's `server_pid_file`).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Write the run's report (summary table and plots over time) as one self-contained HTML
    /// file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Write the report's plots as one SVG file each into this directory.
    #[arg(long, value_name = "DIR")]
    svg: Option<PathBuf>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Report {
            json,
            html,
            svg,
            note,
        }) => {
            let text =
                std::fs::read_to_string(&json).with_context(|| format!("{}", json.display()))?;
            let summary: Summary = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a loadgen --json file", json.display()))?;
            write_report(&summary, html.as_deref(), svg.as_deref(), note.as_deref())?;
            Ok(true)
        }
        Some(Cmd::Compare {
            a,
            b,
            max_regression,
        }) => {
            let c = Comparison::new(
                &a.display().to_string(),
                &compare::load(&a)?,
                &b.display().to_string(),
                &compare::load(&b)?,
                max_regression,
            )?;
            print!("{}", c.table());
            Ok(c.pass())
        }
        None => load_test(cli.run),
    }
}

/// Writes the HTML report and/or the SVGs, saying where.
fn write_report(
    summary: &Summary,
    html: Option<&std::path::Path>,
    svg: Option<&std::path::Path>,
    note: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(path) = html {
        std::fs::write(path, report::html(summary, note)?)
            .with_context(|| format!("{}", path.display()))?;
        eprintln!("loadgen: report written to {}", path.display());
    }
    if let Some(dir) = svg {
        let n = report::write_svgs(summary, dir)?.len();
        eprintln!("loadgen: {n} plots written to {}", dir.display());
    }
    Ok(())
}

/// `loadgen PROFILE.toml [flags]`: the load test itself.
fn load_test(cli: RunArgs) -> anyhow::Result<bool> {
    let profile_path = cli.profile.context("no profile given")?;
    let overrides = Overrides {
        target: cli.target.clone(),
        api: cli.api.clone(),
        procs: cli.procs,
        duration_s: cli.duration,
        mqtt: cli.mqtt.clone(),
    };
    let profile = Arc::new(Profile::load(&profile_path, &overrides)?);
    if let Ok(slice) = std::env::var(SLICE_ENV) {
        child(profile, Slice::parse(&slice)?)?;
        return Ok(true);
    }

    let apis = profile.api_addrs()?;
    let before = if apis.is_empty() {
        None
    } else {
        match scrape_all(&apis) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("loadgen: no cross-check, /metrics unreadable: {e:#}");
                None
            }
        }
    };
    let pid = match (cli.server_pid, &profile.server_pid_file) {
        (Some(pid), _) => Some(pid),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("{}", file.display()))?
                .trim()
                .parse()
                .with_context(|| format!("{}: not a pid", file.display()))?,
        ),
        (None, None) => None,
    };
    let mut rss = pid.map(RssSampler::new);
    eprintln!(
        "loadgen {}: {} connections, {} devices -> {}, {} s, {} proc(s)",
        profile.name,
        profile.connections,
        profile.total_devices(),
        profile.targets.join(" "),
        profile.duration_s,
        profile.procs
    );

    let mut stats = if profile.procs == 1 {
        let mut prev = Progress::default();
        run::run(profile.clone(), Slice::WHOLE, |p| {
            println!("{}", p.line(&prev, profile.connections));
            if let Some(r) = &mut rss {
                r.sample(p.connected);
            }
            prev = p;
        })?
    } else {
        parent(&profile, rss.as_mut())?
    };

    let cross_check = match before {
        Some(before) => {
            let loadgen = stats.counters.reports_ok();
            let server = settled_count(&apis, &before, loadgen)?;
            Some(CrossCheck {
                server,
                loadgen,
                equal: server == loadgen,
            })
        }
        None => None,
    };
    let server_cpu = rss
        .as_ref()
        .and_then(|r| r.cpu(stats.counters.reports_ok()));
    let mut summary = Summary::new(
        &profile,
        &mut stats,
        cross_check,
        rss.and_then(RssSampler::result),
    );
    summary.server_cpu = server_cpu;
    print!("{}", summary.table());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text + "\n").with_context(|| format!("{}", path.display()))?;
    }
    write_report(&summary, cli.report.as_deref(), cli.svg.as_deref(), None)?;
    Ok(summary.pass)
}

/// A child: runs its slice, reports progress and the final stats on stdout.
fn child(profile: Arc<Profile>, slice: Slice) -> anyhow::Result<()> {
    let stats = run::run(profile, slice, |p| {
        if let Ok(line) = serde_json::to_string(&p) {
            println!("{PROGRESS_PREFIX}{line}");
        }
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{RESULT_PREFIX}{}", stats.to_wire()?)?;
    out.flush()?;
    Ok(())
}

/// Starts one child per slice, shows their summed progress, merges their stats.
fn parent(profile: &Profile, mut rss: Option<&mut RssSampler>) -> anyhow::Result<Stats> {
    let n = profile.procs;
    let exe = std::env::current_exe().context("locating loadgen's own executable")?;
    let progress = Arc::new(Mutex::new(vec![Progress::default(); n]));
    let results = Arc::new(Mutex::new(vec![None::<String>; n]));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for i in 0..n {
        let mut child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(SLICE_ENV, format!("{i}/{n}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting child {i}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let progress = progress.clone();
        let results = results.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(json) = line.strip_prefix(PROGRESS_PREFIX) {
                    if let (Ok(p), Ok(mut all)) =
                        (serde_json::from_str::<Progress>(json), progress.lock())
                    {
                        all[i] = p;
                    }
                } else if let Some(wire) = line.strip_prefix(RESULT_PREFIX) {
                    if let Ok(mut all) = results.lock() {
                        all[i] = Some(wire.to_owned());
                    }
                } else {
                    println!("[{i}] {line}");
                }
            }
        }));
        children.push(child);
    }
    let mut prev = Progress::default();
    let mut running = true;
    // Rates over the parent's own clock: the children's elapsed times (their max) can stand
    // still for a second when their lines arrive late, which made a rate over ~0 s.
    let started = std::time::Instant::now();
    while running {
        std::thread::sleep(Duration::from_secs(1));
        running = false;
        for c in &mut children {
            if c.try_wait()?.is_none() {
                running = true;
            }
        }
        let mut now = match progress.lock() {
            Ok(all) => Progress::sum(&all),
            Err(_) => prev,
        };
        now.elapsed_s = started.elapsed().as_secs_f64();
        println!("{}", now.line(&prev, profile.connections));
        if let Some(r) = rss.as_deref_mut() {
            r.sample(now.connected);
        }
        prev = now;
    }
    for r in readers {
        let _ = r.join();
    }
    let mut total = Stats::new();
    for (i, c) in children.iter_mut().enumerate() {
        let status = c.wait()?;
        if !status.success() {
            bail!("child {i} failed: {status}");
        }
    }
    let results = results
        .lock()
        .map_err(|_| anyhow::anyhow!("results lock poisoned"))?;
    for (i, r) in results.iter().enumerate() {
        let wire = r
            .as_deref()
            .with_context(|| format!("child {i} sent no result"))?;
        total.merge(&Stats::from_wire(wire).with_context(|| format!("child {i}"))?);
    }
    Ok(total)
}

/// Samples the server's VmRSS each second: the first sample, the peak, and the RSS while the
/// most connections were open (the last sample at that count). Also reads its CPU time at the
/// start and at the end.
struct RssSampler {
    pid: u32,
    /// CPU seconds (user + system, all threads) and when they were read.
    cpu_before: Option<(f64, std::time::Instant)>,
    before: Option<u64>,
    peak: u64,
    held: u64,
    max_connected: u64,
}

impl RssSampler {
    fn new(pid: u32) -> Self {
        let mut s = Self {
            pid,
            cpu_before: None,
            before: None,
            peak: 0,
            held: 0,
            max_connected: 0,
        };
        s.before = s.read();
        s.cpu_before = s.cpu_s().map(|c| (c, std::time::Instant::now()));
        s
    }

    /// The server's CPU time so far: utime + stime of /proc/PID/stat (exited threads
    /// included), seconds.
    fn cpu_s(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name (which may hold spaces), from field 3 (state) on.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        // In clock ticks of USER_HZ, which Linux fixes at 100 for /proc on the architectures
        // it runs on (what `getconf CLK_TCK` prints).
        Some((utime + stime) as f64 / USER_HZ)
    }

    /// CPU used since the start, per report answered 0.
    fn cpu(&self, reports_ok: u64) -> Option<ServerCpu> {
        let (before, at) = self.cpu_before?;
        let cpu_s = (self.cpu_s()? - before).max(0.0);
        Some(ServerCpu {
            cpu_s,
            wall_s: at.elapsed().as_secs_f64(),
            per_report_us: if reports_ok > 0 {
                cpu_s * 1e6 / reports_ok as f64
            } else {
                0.0
            },
        })
    }

    fn read(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn sample(&mut self, connected: u64) {
        if let Some(kib) = self.read() {
            self.peak = self.peak.max(kib);
            if connected > 0 && connected >= self.max_connected {
                self.max_connected = connected;
                self.held = kib;
            }
        }
    }

    fn result(self) -> Option<ServerRss> {
        let before = self.before?;
        Some(ServerRss {
            before_kib: before,
            peak_kib: self.peak,
            held_kib: self.held,
            connections_held: self.max_connected,
            per_connection_kib: if self.max_connected > 0 {
                self.held.saturating_sub(before) as f64 / self.max_connected as f64
            } else {
                0.0
            },
        })
    }
}

/// /proc's clock ticks per second.
const USER_HZ: f64 = 100.0;

/// Set in children: which slice of the connections they run.
const SLICE_ENV: &str = "LOADGEN_SLICE";
const PROGRESS_PREFIX: &str = "LOADGEN-PROGRESS ";
const RESULT_PREFIX: &str = "LOADGEN-RESULT ";

/// Every API's count of reports answered 0, in the order of `apis`.
fn scrape_all(apis: &[SocketAddr]) -> anyhow::Result<Vec<u64>> {
    apis.iter()
        .map(|&a| http::scrape_reports_answered(a).with_context(|| format!("api {a}")))
        .collect()
}

/// The servers' count of reports answered since `before` (one count per API, summed over all
/// of them: each node counts the reports of its own connections). Shards publish their
/// counters a few times a second, so the last replies of a run may not be in `/metrics` yet:
/// scrape again until the sum equals ours or stops moving.
fn settled_count(apis: &[SocketAddr], before: &[u64], expected: u64) -> anyhow::Result<u64> {
    let mut last = None;
    for _ in 0..SETTLE_TRIES {
        let count = http::increase(before, &scrape_all(apis)?);
        if count == expected || last == Some(count) {
            return Ok(count);
        }
        last = Some(count);
        std::thread::sleep(SETTLE_PAUSE);
    }
    Ok(last.unwrap_or(0))
}

/// Longer than the server's publishing interval (250 ms), so that an unchanged count is final.
const SETTLE_PAUSE: Duration = Duration::from_millis(400);
const SETTLE_TRIES: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_flags_are_lists() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "p.toml",
            "--target",
            "ws://127.0.0.1:1",
            "--api",
            "127.0.0.1:11",
            "--target",
            "ws://127.0.0.1:2",
            "--api",
            "127.0.0.1:12",
        ])
        .expect("parses");
        assert!(cli.command.is_none());
        let cli = cli.run;
        assert_eq!(cli.target, ["ws://127.0.0.1:1", "ws://127.0.0.1:2"]);
        assert_eq!(cli.api, ["127.0.0.1:11", "127.0.0.1:12"]);
        let cli = Cli::try_parse_from(["loadgen", "p.toml"]).expect("parses");
        assert!(cli.run.target.is_empty() && cli.run.api.is_empty());
        assert_eq!(cli.run.profile, Some(PathBuf::from("p.toml")));
    }

    #[test]
    fn subcommands_next_to_the_profile_form() {
        let cli = Cli::try_parse_from(["loadgen", "compare", "a.json", "b.json"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Cmd::Compare { max_regression, .. }) if max_regression == compare::DEFAULT_MAX_REGRESSION_PCT
        ));
        let cli =
            Cli::try_parse_from(["loadgen", "report", "r.json", "--svg", "d"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Cmd::Report {
                html: None,
                svg: Some(_),
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["loadgen", "report", "r.json"]).is_err(),
            "report needs --html or --svg"
        );
        let cli = Cli::try_parse_from([
            "loadgen",
            "profiles/smoke.toml",
            "--report",
            "r.html",
            "--svg",
            "d",
            "--json",
            "r.json",
        ])
        .expect("parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.run.report, Some(PathBuf::from("r.html")));
        assert!(
            Cli::try_parse_from(["loadgen"]).is_err(),
            "a profile is required"
        );
    }
}
