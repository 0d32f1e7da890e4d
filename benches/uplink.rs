//! The uplink path without devices: encode + batcher push of a typical property record, the local
//! log's append of a full batch (Fsync::Never, so the page cache and not the disk is measured),
//! and a group commit end to end through the writer thread.
//!
//! Log data goes to a fresh directory under the system temp dir, removed at the end.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use ringlink::uplink::{
    encode, Batch, Batcher, Fsync, LocalLog, LogOptions, Record, RecordBody, Writer,
};

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

/// Eight shards' worth of full batches submitted at once, then waited for: how fast records go
/// from `submit` to their `done` through one group commit.
fn writer_group_commit(c: &mut Criterion) {
    const SHARDS: usize = 8;
    let dir = TempDir::new("writer");
    let (log, _) = LocalLog::open(log_options(&dir)).expect("open bench log");
    let writer: Writer<u64> = Writer::spawn(Box::new(log), 64);
    let (tx, rx) = mpsc::channel::<Batch<u64>>();
    let mut spare: Vec<Batch<u64>> = (0..SHARDS)
        .map(|_| Batch {
            bytes: full_batch(),
            records: BATCH,
            acks: Vec::new(),
        })
        .collect();
    let mut g = c.benchmark_group("uplink_writer");
    g.throughput(Throughput::Elements((SHARDS * BATCH) as u64));
    g.bench_function(format!("group_commit_{SHARDS}x{BATCH}_fsync_never"), |b| {
        b.iter(|| {
            for mut batch in spare.drain(..) {
                batch.acks.extend(0..BATCH as u64);
                let mut pending = Some(batch);
                while let Some(batch) = pending.take() {
                    let tx = tx.clone();
                    let done = Box::new(move |mut b: Batch<u64>, r: Result<(), _>| {
                        r.expect("write");
                        b.acks.clear();
                        let _ = tx.send(b);
                    });
                    if let Err(back) = writer.submit(batch, done) {
                        pending = Some(back);
                        std::thread::yield_now();
                    }
                }
            }
            for _ in 0..SHARDS {
                spare.push(rx.recv().expect("done"));
            }
        });
    });
    g.finish();
    drop(spare);
    writer.shutdown().expect("writer shutdown");
}

criterion_group!(benches, batcher_push, log_append, writer_group_commit);
criterion_main!(benches);
