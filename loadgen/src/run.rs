//! One process's share of a run: its slice of the connections spread over its threads (one
//! current-thread tokio runtime each), ramp, churn, downlinks, and a progress snapshot each
//! second.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::sleep_until;

use crate::conn::{run_slot, Ctx, Gauges, OnlineSet, Slot};
use crate::device::Device;
use crate::downlink::Downlinks;
use crate::model::Model;
use crate::mqtt::{Subscriber, Tracker};
use crate::pace::{Pacer, Pacing};
use crate::profile::Profile;
use crate::schedule::Schedule;
use crate::stats::{Hist, Stats};

/// Which part of the connections this process runs: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub index: usize,
    pub count: usize,
}

impl Slice {
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// The connection indices of this slice: contiguous, sizes differ by at most one.
    pub fn range(self, connections: u64) -> std::ops::Range<u64> {
        let n = self.count as u64;
        let i = self.index as u64;
        connections * i / n..connections * (i + 1) / n
    }

    /// `"i/n"`, as passed to children.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (i, n) = s.split_once('/').context("slice is not i/n")?;
        let slice = Self {
            index: i.parse()?,
            count: n.parse()?,
        };
        anyhow::ensure!(slice.index < slice.count, "slice index out of range");
        Ok(slice)
    }
}

/// Live numbers, once a second.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub elapsed_s: f64,
    pub connected: u64,
    pub online: u64,
    pub reports_sent: u64,
    pub reports_ok: u64,
    pub errors: u64,
    /// Report p99 so far (corrected), microseconds.
    pub p99_us: u64,
}

impl Progress {
    /// Sums processes' snapshots; p99 is the worst of them (an upper bound of the merged p99).
    pub fn sum(all: &[Self]) -> Self {
        let mut t = Self::default();
        for p in all {
            t.elapsed_s = t.elapsed_s.max(p.elapsed_s);
            t.connected += p.connected;
            t.online += p.online;
            t.reports_sent += p.reports_sent;
            t.reports_ok += p.reports_ok;
            t.errors += p.errors;
            t.p99_us = t.p99_us.max(p.p99_us);
        }
        t
    }

    /// The progress line, with rates against the previous snapshot.
    pub fn line(&self, prev: &Self, connections: u32) -> String {
        let dt = (self.elapsed_s - prev.elapsed_s).max(1e-3);
        format!(
            "t={:>6.1}s  connected {:>6}/{}  online {:>7}  msgs/s {:>8.0} (sent {:>8.0})  p99 {:>8.2} ms  errors {}",
            self.elapsed_s,
            self.connected,
            connections,
            self.online,
            (self.reports_ok - prev.reports_ok.min(self.reports_ok)) as f64 / dt,
            (self.reports_sent - prev.reports_sent.min(self.reports_sent)) as f64 / dt,
            self.p99_us as f64 / 1000.0,
            self.errors
        )
    }
}

/// Runs this process's slice; `tick` gets a progress snapshot each second. Returns the
/// merged stats of all threads.
pub fn run(
    profile: Arc<Profile>,
    slice: Slice,
    mut tick: impl FnMut(Progress),
) -> anyhow::Result<Stats> {
    let model = Arc::new(load_model(&profile)?);
    let targets = Arc::new(profile.target_addrs()?);
    let tls = match (&profile.ca_file, profile.tls) {
        (Some(ca), true) => Some(tokio_rustls::TlsConnector::from(crate::tls::client_config(
            ca,
        )?)),
        _ => None,
    };
    let apis = profile.api_addrs()?;
    let conns = slice.range(u64::from(profile.connections));
    let first_device = profile.devices_of(conns.start).0;
    let end_device = profile.devices_of(conns.end).0;
    let online = Arc::new(OnlineSet::new((end_device - first_device) as usize));
    let gauges = Arc::new(Gauges::default());
    let global = Arc::new(Mutex::new(Stats::new()));
    let threads = profile.threads_per_proc();
    // With `mqtt`, subscribe before any device starts, so that no post is missed.
    let mqtt = match &profile.mqtt {
        Some(url) => {
            let now = Instant::now();
            let tracker = Arc::new(Mutex::new(Tracker::new(
                &model.product_key,
                (first_device..end_device).map(|i| profile.device_name(i)),
                now,
                now + profile.duration(),
            )));
            let client_id = format!(
                "loadgen-{}-{}-{}",
                std::process::id(),
                slice.index,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            );
            let sub = Subscriber::start(url, client_id, tracker.clone(), SUBSCRIBE_WITHIN)?;
            Some((tracker, sub))
        }
        None => None,
    };
    let start = Instant::now();
    let deadline = start + profile.duration();
    let measure_from = start + Duration::from_secs_f64(profile.warmup_s);
    let tracker = mqtt.as_ref().map(|(t, _)| t.clone());
    if let Some(t) = &tracker {
        if let Ok(mut t) = t.lock() {
            t.set_window(measure_from, deadline);
        }
    }
    let lanes = (threads * slice.count) as f64;

    let mut handles = Vec::new();
    for t in 0..threads {
        let my: Vec<u64> = conns.clone().skip(t).step_by(threads).collect();
        let profile = profile.clone();
        let model = model.clone();
        let tls = tls.clone();
        let gauges = gauges.clone();
        let online = online.clone();
        let global = global.clone();
        let tracker = tracker.clone();
        let targets = targets.clone();
        let apis = apis.clone();
        let downlink_rate = profile.downlinks_per_second / slice.count as f64;
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let stats = Rc::new(RefCell::new(Stats::new()));
                    let ctx = Rc::new(Ctx {
                        profile: profile.clone(),
                        model: model.clone(),
                        tls,
                        stats: stats.clone(),
                        gauges,
                        online: online.clone(),
                        start,
                        measure_from,
                        deadline,
                        timeout: Duration::from_millis(profile.request_timeout_ms),
                        pacer: (profile.pacing == Pacing::Spin).then(Pacer::new),
                        mqtt: tracker,
                    });
                    let pacer = ctx.pacer.clone().map(|p| tokio::task::spawn_local(p.run()));
                    // Flush this thread's numbers into the process total a few times a second,
                    // at quarters of a second since the start, so that each flush covers a
                    // quarter of one second of the series.
                    let flushed = Rc::new(Cell::new(start));
                    let flusher = {
                        let stats = stats.clone();
                        let global = global.clone();
                        let flushed = flushed.clone();
                        tokio::task::spawn_local(async move {
                            let mut n = 1u32;
                            loop {
                                sleep_until((start + FLUSH_EVERY * n).into()).await;
                                flush(&global, &stats, start, &flushed);
                                n += 1;
                            }
                        })
                    };
                    let downlinks = if t == 0 && downlink_rate > 0.0 && !apis.is_empty() {
                        let d = Rc::new(Downlinks::new(
                            profile.clone(),
                            model.clone(),
                            apis,
                            online.clone(),
                            first_device,
                            stats.clone(),
                            downlink_rate,
                        ));
                        Some(tokio::task::spawn_local(d.run(start, deadline)))
                    } else {
                        None
                    };
                    let slots: Vec<Slot> = my
                        .iter()
                        .map(|&c| make_slot(&profile, &model, &targets, c, first_device))
                        .collect();
                    let notifies: Vec<Rc<Notify>> =
                        slots.iter().map(|s| s.reconnect.clone()).collect();
                    let churn = tokio::task::spawn_local(churn(
                        notifies,
                        profile.reconnects_per_second / lanes,
                        start,
                        deadline,
                    ));
                    let mut tasks = Vec::with_capacity(slots.len());
                    let mut ramp = Schedule::fixed(start, profile.ramp_per_second / lanes);
                    let mut rng = fastrand::Rng::new();
                    for slot in slots {
                        if let Some(r) = &mut ramp {
                            sleep_until(r.next().into()).await;
                            let _ = r.take_due(Instant::now().max(r.next()), &mut rng);
                        }
                        if Instant::now() >= deadline {
                            break;
                        }
                        tasks.push(tokio::task::spawn_local(run_slot(ctx.clone(), slot)));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                    if let Some(d) = downlinks {
                        let _ = d.await;
                    }
                    churn.abort();
                    flusher.abort();
                    if let Some(p) = pacer {
                        p.abort();
                    }
                    flush(&global, &stats, start, &flushed);
                });
                Ok(())
            })?;
        handles.push(handle);
    }

    // Progress from this (the calling) thread.
    let mut next = start + Duration::from_secs(1);
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next {
            let second = (next - start).as_secs() as u32 - 1;
            next += Duration::from_secs(1);
            let p = snapshot(&global, &gauges, start);
            if let Ok(mut g) = global.lock() {
                let s = g.series.at(second);
                s.connected = p.connected;
                s.online = p.online;
                // Threads flush at least every 250 ms: seconds before the last are done.
                g.series.pack_before(second.saturating_sub(1));
            }
            tick(p);
        }
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a loadgen thread panicked"))??;
    }
    tick(snapshot(&global, &gauges, start));
    let mut stats = global
        .lock()
        .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?
        .clone();
    if let Some((tracker, sub)) = mqtt {
        let quiet = Duration::from_secs_f64(profile.mqtt_quiet_s);
        let waiting_since = Instant::now();
        loop {
            let (waiting, last) = match tracker.lock() {
                Ok(t) => (t.waiting(), t.last_post()),
                Err(_) => break,
            };
            let since = last.map_or(waiting_since, |l| l.max(waiting_since));
            if waiting == 0 || since.elapsed() >= quiet {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let sub = sub.stop();
        let (hist, counts) = tracker
            .lock()
            .map_err(|_| anyhow::anyhow!("mqtt tracker lock poisoned"))?
            .finish();
        if sub.connections_lost > 0 {
            eprintln!(
                "loadgen: mqtt subscriber connected {} time(s), lost the broker {} time(s)",
                sub.connects, sub.connections_lost
            );
        }
        let _ = stats.hists[Hist::MqttE2e as usize].add(&hist);
        let c = &mut stats.counters;
        c.mqtt_received += counts.received;
        c.mqtt_received_in_time += counts.received_in_time;
        c.mqtt_duplicates += counts.duplicates;
        c.mqtt_unexpected += counts.unexpected;
        c.mqtt_lost += counts.lost;
        c.mqtt_subscriber_lost += sub.connections_lost;
        c.mqtt_sessions_not_kept += sub.sessions_not_kept;
    }
    Ok(stats)
}

/// How long the subscriber may take to connect and subscribe before the run is refused.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

fn load_model(profile: &Profile) -> anyhow::Result<Model> {
    match &profile.tsl {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
            Model::from_json(&bytes).with_context(|| format!("{}", path.display()))
        }
        None => Model::builtin(&profile.devices.product_key).with_context(|| {
            format!(
                "no built-in thing model for {}: give the profile a tsl file",
                profile.devices.product_key
            )
        })?,
    }
}

fn make_slot(
    profile: &Profile,
    model: &Model,
    targets: &[SocketAddr],
    conn: u64,
    first_device: u64,
) -> Slot {
    let (first, n) = profile.devices_of(conn);
    let devices = (first..first + n)
        .map(|i| Device::new(profile.device_name(i), model))
        .collect();
    let source = if profile.source_addrs.is_empty() {
        None
    } else {
        Some(profile.source_addrs[(conn % profile.source_addrs.len() as u64) as usize])
    };
    Slot {
        index: conn,
        first_local_device: (first - first_device) as usize,
        devices,
        target: targets[profile.target_index(conn)],
        source,
        reconnect: Rc::new(Notify::new()),
    }
}

/// Asks a random connection to reconnect at `rate` per second.
async fn churn(slots: Vec<Rc<Notify>>, rate: f64, start: Instant, deadline: Instant) {
    let mut rng = fastrand::Rng::new();
    if slots.is_empty() {
        return;
    }
    let Some(mut schedule) = Schedule::new(start, rate, 0.5, &mut rng) else {
        return;
    };
    while schedule.next() < deadline {
        sleep_until(schedule.next().into()).await;
        while schedule.take_due(Instant::now(), &mut rng).is_some() {
            slots[rng.usize(..slots.len())].notify_one();
        }
    }
}

/// How often a thread flushes its numbers into the process total (and the series).
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Adds a thread's numbers since its previous flush (at `flushed`) to the process total and to
/// the second of the series that the middle of that interval lies in.
fn flush(global: &Mutex<Stats>, local: &RefCell<Stats>, start: Instant, flushed: &Cell<Instant>) {
    let now = Instant::now();
    let from = flushed.replace(now);
    let middle = (from - start) + (now - from) / 2;
    let second = u32::try_from(middle.as_secs()).unwrap_or(u32::MAX);
    if let Ok(mut g) = global.lock() {
        g.absorb_at(&mut local.borrow_mut(), second);
    }
}

fn snapshot(global: &Mutex<Stats>, gauges: &Gauges, start: Instant) -> Progress {
    let (reports_sent, reports_ok, errors, p99_us) = match global.lock() {
        Ok(g) => (
            g.counters.reports_sent,
            g.counters.reports_ok(),
            g.error_total(),
            g.hists[Hist::Report as usize].value_at_quantile(0.99),
        ),
        Err(_) => (0, 0, 0, 0),
    };
    Progress {
        elapsed_s: start.elapsed().as_secs_f64(),
        connected: gauges.connected.load(Ordering::Relaxed),
        online: gauges.online.load(Ordering::Relaxed),
        reports_sent,
        reports_ok,
        errors,
        p99_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_connection_once() {
        for count in 1..=5 {
            let mut next = 0;
            for index in 0..count {
                let r = Slice { index, count }.range(10_001);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, 10_001);
        }
        assert_eq!(
            Slice::parse("1/3").expect("ok"),
            Slice { index: 1, count: 3 }
        );
        assert!(Slice::parse("3/3").is_err());
        assert!(Slice::parse("x").is_err());
    }

    #[test]
    fn progress_sums_and_rates() {
        let a = Progress {
            elapsed_s: 2.0,
            connected: 10,
            online: 10,
            reports_sent: 200,
            reports_ok: 190,
            errors: 1,
            p99_us: 3000,
        };
        let b = Progress { p99_us: 5000, ..a };
        let t = Progress::sum(&[a, b]);
        assert_eq!(
            (t.connected, t.reports_ok, t.errors, t.p99_us),
            (20, 380, 2, 5000)
        );
        let prev = Progress {
            elapsed_s: 1.0,
            reports_ok: 80,
            ..t
        };
        assert!(t.line(&prev, 20).contains("msgs/s      300"));
    }
}
