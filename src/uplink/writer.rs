//! The one thread that writes uplinks: group commit of batches from every shard into a [`Sink`].
//!
//! Owns: the sink, the bounded queue in front of it, and the writer thread ("ringlink-uplink").
//! Never: encoding, batching, or acking sessions itself: each batch comes with a `done`
//! callback that gets the batch back with the result of the write that contained it.
//!
//! ```text
//!   shards ──submit(batch, done)──▶ [ bounded queue ] ──▶ writer thread:
//!     loop {
//!       block for one batch; take every batch already queued (≤ MAX_GROUP, ≤ MAX_GROUP_BYTES)
//!       sink.write(all of them)                  one call: one write, one fsync for the local log
//!       done(batch, result) for each, in queue order
//!     } until every Writer handle is gone and the queue is empty
//! ```
//!
//! What always holds: `done` runs exactly once per accepted batch, after the sink call that
//! contained it returned, and in submission order; a batch refused by `submit` is handed back,
//! never dropped. A `done` that panics is a bug that stops the thread: the batches still queued
//! are dropped with their callbacks unrun, later submits are refused (the batch comes back), and
//! [`Writer::shutdown`] reports [`UplinkError::Closed`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use super::{Batch, LocalLog, UplinkError};

/// Where batches go. Implemented by [`LocalLog`]; external sinks (mqtt, nats) spool into one.
pub trait Sink: Send + 'static {
    /// Durably takes these encoded batches (in this order) with one write where the sink
    /// allows it. `Ok` promises every one of them is taken; on `Err` none may be counted on.
    fn write(&mut self, batches: &[&[u8]]) -> Result<(), UplinkError>;

    /// Bytes the sink holds, for metrics.
    fn bytes(&self) -> u64 {
        0
    }
}

impl Sink for LocalLog {
    fn write(&mut self, batches: &[&[u8]]) -> Result<(), UplinkError> {
        self.append(batches)
    }

    fn bytes(&self) -> u64 {
        Self::bytes(self)
    }
}

/// Counters of one writer, shared with the metrics endpoint. All monotonic but `sink_bytes`.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches written (whatever the result).
    pub batches: AtomicU64,
    /// Records in them.
    pub records: AtomicU64,
    /// Group commits: `Sink::write` calls (for the local log, one write and one fsync each).
    pub writes: AtomicU64,
    /// Group commits that failed.
    pub errors: AtomicU64,
    /// Batch bytes written.
    pub bytes: AtomicU64,
    /// Submits refused because the queue was full (backpressure on the shards).
    pub queue_full: AtomicU64,
    /// `Sink::bytes` after the last write (a gauge).
    pub sink_bytes: AtomicU64,
}

/// The callback of one batch; runs on the writer thread.
pub type Done<A> = Box<dyn FnOnce(Batch<A>, Result<(), UplinkError>) + Send>;

/// A handle on the writer thread. Share it between shards behind an `Arc`; dropping it without
/// [`Writer::shutdown`] lets the thread write what is queued and stop, unobserved.
pub struct Writer<A: Send + 'static> {
    tx: SyncSender<Job<A>>,
    thread: JoinHandle<()>,
    stats: Arc<WriterStats>,
}

impl<A: Send + 'static> Writer<A> {
    /// Spawns the writer thread ("ringlink-uplink") with a bounded queue of `queue` batches
    /// (at least 1).
    pub fn spawn(sink: Box<dyn Sink>, queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("ringlink-uplink".into())
            .spawn(move || run(sink, &rx, &thread_stats))
            // Like `thread::spawn`: failing to start a thread at startup is fatal.
            .expect("spawn the uplink writer thread");
        Self { tx, thread, stats }
    }

    /// Queues a batch; `done` runs on the writer thread after the group commit that contained
    /// it, with the batch back (for its acks and buffer reuse) and the write's result. `Err`
    /// gives the batch back when the queue is full or the writer stopped; the caller keeps it
    /// and retries (backpressure: nothing is dropped). `done` is dropped with it, unrun.
    pub fn submit(&self, batch: Batch<A>, done: Done<A>) -> Result<(), Batch<A>> {
        match self.tx.try_send(Job { batch, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                Err(job.batch)
            }
            Err(TrySendError::Disconnected(job)) => Err(job.batch),
        }
    }

    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Writes everything queued, runs every `done`, stops the thread. `Err(Closed)` when the
    /// thread had already died (a `done` panicked).
    pub fn shutdown(self) -> Result<(), UplinkError> {
        drop(self.tx);
        self.thread.join().map_err(|_| UplinkError::Closed)
    }
}

struct Job<A> {
    batch: Batch<A>,
    done: Done<A>,
}

fn run<A>(mut sink: Box<dyn Sink>, rx: &Receiver<Job<A>>, stats: &WriterStats) {
    let mut group: Vec<Job<A>> = Vec::with_capacity(MAX_GROUP);
    // Ends when every sender is gone and the queue is drained.
    while let Ok(first) = rx.recv() {
        let mut bytes = first.batch.bytes.len();
        group.push(first);
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            let Ok(job) = rx.try_recv() else { break };
            bytes += job.batch.bytes.len();
            group.push(job);
        }

        let slices: Vec<&[u8]> = group.iter().map(|j| j.batch.bytes.as_slice()).collect();
        let result = sink.write(&slices);
        drop(slices);

        let records: usize = group.iter().map(|j| j.batch.records).sum();
        stats.writes.fetch_add(1, Ordering::Relaxed);
        stats
            .batches
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        stats.records.fetch_add(records as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        stats.sink_bytes.store(sink.bytes(), Ordering::Relaxed);

        for job in group.drain(..) {
            (job.done)(job.batch, result.clone());
        }
    }
}

/// At most this many batches per group commit: bounds the latency the last one waits for the
/// acks of the first, and the iovec of one write.
const MAX_GROUP: usize = 64;
/// Stop adding batches to a group past this many bytes (the same bound, by size).
const MAX_GROUP_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests;
