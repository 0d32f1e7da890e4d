//! A shard's own uplink log partition, as its driver writes it.
//!
//! Owns: the shard's [`LocalLog`] (under `<log dir>/shard-N`), the counters it publishes, and
//! the copy of committed records to the live feed (`GET /v1/uplinks`). Never: the decision
//! what to write or when (that is [`ShardCore`](super::core::ShardCore)'s), nor how the write
//! reaches the disk: a driver lays an append out with [`ShardLog::prepare`], writes it (a
//! blocking `pwritev` in this thread, or an io_uring op), fdatasyncs it when
//! [`Prepared::sync`] says so (off this thread, or on the ring), and ends it with
//! [`ShardLog::complete`], which gives the result the core acknowledges devices with.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::logging::RateLimit;
use crate::shard::core::Commit;
use crate::shard::Shared;
use crate::uplink::{LocalLog, Prepared, UplinkError};

pub(crate) struct ShardLog {
    log: LocalLog,
    shard: usize,
    shared: Arc<Shared>,
    /// The last commit was refused for a full spool (and that was said).
    spool_full: bool,
    /// Log errors repeat with every commit while a disk is full or failing.
    warn_limit: RateLimit,
}

impl ShardLog {
    pub(crate) fn new(log: LocalLog, shard: usize, shared: Arc<Shared>) -> Self {
        let s = Self {
            log,
            shard,
            shared,
            spool_full: false,
            warn_limit: RateLimit::warnings(),
        };
        s.publish_bytes();
        s
    }

    /// Lays out the append of `commit`; `Ok(None)` when it holds no bytes.
    pub(crate) fn prepare(&mut self, commit: &Commit) -> Result<Option<Prepared>, UplinkError> {
        let payloads: Vec<&[u8]> = commit.payloads().collect();
        self.log.prepare(&payloads)
    }

    /// Writes `commit` as laid out in `p`, blocking this thread for the write (not the fsync).
    pub(crate) fn write(p: &Prepared, commit: &Commit) -> io::Result<()> {
        let payloads: Vec<&[u8]> = commit.payloads().collect();
        p.write(&payloads)
    }

    /// Ends the append `p` of `commit` with the result of its write and fsync; counts it and,
    /// when it succeeded and someone listens, copies its records to the live feed.
    pub(crate) fn complete(
        &mut self,
        p: Prepared,
        commit: &Commit,
        result: io::Result<()>,
    ) -> Result<(), UplinkError> {
        let result = self.log.complete(p, result);
        self.count(commit, &result);
        match &result {
            Ok(()) => self.spool_full = false,
            Err(e) => self.warn(e),
        }
        if let (Ok(()), Some(spool)) = (&result, &self.shared.spool) {
            spool.commits.notify_one();
        }
        result
    }

    /// A commit that failed before it was written (prepare refused it): counted, and logged (a
    /// full spool once per episode, not once per refused commit, and episodes rate-limited).
    pub(crate) fn failed(&mut self, commit: &Commit, e: &UplinkError) {
        let full = matches!(e, UplinkError::SpoolFull { .. });
        if full {
            self.shared
                .log_stats
                .spool_full
                .fetch_add(1, Ordering::Relaxed);
        }
        if !(full && self.spool_full) {
            self.warn(e);
        }
        self.spool_full = full;
        self.count::<(), ()>(commit, &Err(()));
    }

    /// A failed commit, at most a few lines per interval (the clock is read here, in the
    /// driver's thread, only when there is an error to tell).
    fn warn(&mut self, e: &UplinkError) {
        if let Some(suppressed) = self.warn_limit.allow(Instant::now()) {
            tracing::warn!(shard = self.shard, error = %e, suppressed, "uplink log: commit failed");
        }
    }

    fn count<T, E>(&self, commit: &Commit, result: &Result<T, E>) {
        let stats = &self.shared.log_stats;
        stats.writes.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats
            .records
            .fetch_add(commit.records() as u64, Ordering::Relaxed);
        self.publish_bytes();
        let feed = &self.shared.uplink_feed;
        if feed.receiver_count() > 0 {
            for payload in commit.payloads() {
                for line in payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    if let Ok(line) = std::str::from_utf8(line) {
                        let _ = feed.send(Arc::from(line));
                    }
                }
            }
        }
    }

    fn publish_bytes(&self) {
        if let Some(b) = self.shared.log_stats.bytes.get(self.shard) {
            b.store(self.log.bytes(), Ordering::Relaxed);
        }
    }
}
