//! The uplink path without devices: encode + batcher push of a typical property record, the local
//! log's append of a full batch (Fsync::Never, so the page cache and not the disk is measured),
//! and a small commit appended in this thread against handed to a writer thread.
//!
//! Log data goes to a fresh directory under the system temp dir, removed at the end.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use ringlink::uplink::{encode, Batcher, Fsync, LocalLog, LogOptions, Record, RecordBody};

const VALUES: &str = r#"{"power":1,"setpoint":21.5,"mode":2}"#;
const BATCH: usize = 256;

fn record(at_ms: u64) -> Record<'static> {
    Record {
        at_ms,
        product_key: "a1ThermoPK0",
        device_name: "thermo-0042",
        body: RecordBody::Property { values: VALUES },
    }
}

/// A full batch of typical property records, as a shard hands it over.
fn full_batch() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..BATCH as u64 {
        encode(&record(1_732_570_000_000 + i), &mut out);
    }
    out
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ringlink-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn log_options(dir: &TempDir) -> LogOptions {
    LogOptions {
        fsync: Fsync::Never,
        // Keep the bench's disk footprint small: the caps delete as it goes.
        max_bytes: 256 << 20,
        ..LogOptions::new(&dir.0)
    }
}

fn batcher_push(c: &mut Criterion) {
    let mut one = Vec::new();
    encode(&record(1_732_570_000_000), &mut one);
    let mut g = c.benchmark_group("uplink_batcher");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("push_property_{}B", one.len()), |b| {
        let now = Instant::now();
        let mut batcher = Batcher::new(BATCH, Duration::from_millis(1));
        let mut at = 0u64;
        b.iter(|| {
            at += 1;
            let full = batcher.push(now, Some(at), |out| encode(&record(black_box(at)), out));
            if full {
                let mut batch = batcher.take(now, false).expect("full batch");
                batch.acks.clear();
                batcher.recycle(batch);
            }
        });
    });
    g.finish();
}

fn log_append(c: &mut Criterion) {
    let dir = TempDir::new("append");
    let (mut log, _) = LocalLog::open(log_options(&dir)).expect("open bench log");
    let batch = full_batch();
    let mut g = c.benchmark_group("uplink_log");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(
        format!("append_{BATCH}_records_{}B_fsync_never", batch.len()),
        |b| {
            b.iter(|| log.append(&[black_box(&batch)]).expect("append"));
        },
    );
    drop(log);

    // The same with an fdatasync per append: what the disk costs (the default policy).
    let dir = TempDir::new("append-fsync");
    let (mut log, _) = LocalLog::open(LogOptions {
        fsync: Fsync::Batch,
        ..log_options(&dir)
    })
    .expect("open bench log");
    g.sample_size(20);
    g.bench_function(
        format!("append_{BATCH}_records_{}B_fsync_batch", batch.len()),
        |b| {
            b.iter(|| log.append(&[black_box(&batch)]).expect("append"));
        },
    );
    g.finish();
}

/// One commit of a small batch (16 records, what a shard gathers in one turn at moderate
/// load), fsync never, side by side: appended by the shard's own thread (ringlink) against
/// handed to a writer thread over a channel and waited for (the conventional design, and
/// ringlink's before the per-shard log). The difference is the thread hop on a report's path.
fn commit_inline_vs_writer_thread(c: &mut Criterion) {
    const RECORDS: u64 = 16;
    let batch: Vec<u8> = (0..RECORDS)
        .flat_map(|i| {
            let mut out = Vec::new();
            encode(&record(i), &mut out);
            out
        })
        .collect();
    let mut g = c.benchmark_group("uplink_commit");
    g.throughput(Throughput::Elements(RECORDS));

    let dir = TempDir::new("inline");
    let (mut log, _) = LocalLog::open(log_options(&dir)).expect("open bench log");
    g.bench_function("inline_16", |b| {
        b.iter(|| log.append(&[black_box(&batch)]).expect("append"));
    });

    let dir = TempDir::new("thread");
    let (mut log, _) = LocalLog::open(log_options(&dir)).expect("open bench log");
    let (to_writer, requests) = mpsc::channel::<Vec<u8>>();
    let (to_shard, done) = mpsc::channel::<Vec<u8>>();
    let writer = std::thread::spawn(move || {
        for b in requests {
            log.append(&[&b]).expect("append");
            if to_shard.send(b).is_err() {
                break;
            }
        }
    });
    let mut spare = Some(batch.clone());
    g.bench_function("writer_thread_16", |b| {
        b.iter(|| {
            let out = spare.take().expect("batch back");
            to_writer.send(out).expect("writer alive");
            spare = Some(done.recv().expect("done"));
        });
    });
    g.finish();
    drop(to_writer);
    writer.join().expect("writer thread");
}

criterion_group!(
    benches,
    batcher_push,
    log_append,
    commit_inline_vs_writer_thread
);
criterion_main!(benches);
