//! The per-shard batcher: records go in one by one, batches come out by count, size or age.
//!
//! Owns: the bytes of the batch being filled (encoded record lines, back to back), the ack
//! handles of its records, and a few spare buffers so a steady state allocates nothing.
//! Never: IO or the clock. Time comes in as `now`; the driver calls [`Batcher::take`] when
//! [`Batcher::push`] says the batch is full or when [`Batcher::poll_timeout`] has passed.
//!
//! What always holds:
//! `acks.len() <= records <= max_records`, `bytes.len() < MAX_BATCH_BYTES + one record`,
//! `first_at.is_some() == (records > 0)`, and acks come out in the order they went in.
//!
//! ```text
//!   empty ──push──▶ filling ──push: full ─────────▶ take(now, _) = Some ─▶ empty
//!                      │ ──now >= poll_timeout()──▶ take(now, _) = Some ─▶ empty
//!                      └ ──drain──────────────────▶ take(now, true) = Some ─▶ empty
//! ```

use std::mem;
use std::time::{Duration, Instant};

/// A batch is also full at this many bytes, whatever its record count: device frames may be up
/// to 64 KiB, and 256 of them would make one 16 MiB write and pin that much per shard. 1 MiB
/// is still thousands of typical (~120 byte) records.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// Collects encoded records and the handles to ack once they are durable. `A` is opaque here.
#[derive(Debug)]
pub struct Batcher<A> {
    max_records: usize,
    max_delay: Duration,
    bytes: Vec<u8>,
    acks: Vec<A>,
    records: usize,
    /// When the first record of the current batch was pushed.
    first_at: Option<Instant>,
    /// Buffers given back by [`Batcher::recycle`], reused by the next batches.
    spare: Vec<(Vec<u8>, Vec<A>)>,
}

/// A batch taken from a [`Batcher`]: `records` record lines in `bytes`, and the acks of those
/// that have one, in push order.
#[derive(Debug)]
pub struct Batch<A> {
    pub bytes: Vec<u8>,
    pub records: usize,
    pub acks: Vec<A>,
}

impl<A> Batcher<A> {
    /// A batcher that fills batches up to `max_records` records (at least 1) or
    /// [`MAX_BATCH_BYTES`], and makes each due `max_delay` after its first record.
    /// The product defaults are 256 uplinks and 1 ms (`batch_max`, `flush_us`).
    pub fn new(max_records: usize, max_delay: Duration) -> Self {
        Self {
            max_records: max_records.max(1),
            max_delay,
            bytes: Vec::new(),
            acks: Vec::new(),
            records: 0,
            first_at: None,
            spare: Vec::new(),
        }
    }

    /// Appends one record written by `write` into the batch buffer, with its ack (None for
    /// records nobody waits on, e.g. an offline after a connection loss). Returns true when the
    /// batch is full (max_records, or [`MAX_BATCH_BYTES`]) and should be taken now.
    ///
    /// `write` must append exactly one record line ending in `\n` (see `record::encode`).
    pub fn push(&mut self, now: Instant, ack: Option<A>, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.records == 0 {
            self.first_at = Some(now);
        }
        let start = self.bytes.len();
        write(&mut self.bytes);
        debug_assert!(
            self.bytes.len() > start && self.bytes.last() == Some(&b'\n'),
            "a record is one line ending in a newline"
        );
        self.records += 1;
        if let Some(ack) = ack {
            self.acks.push(ack);
        }
        self.is_full()
    }

    /// Deadline of the current batch (time of its first record + max_delay), None when empty.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.max_delay)
    }

    /// Takes the batch when it is full, its deadline has passed, or `force` (drain); None when
    /// empty or not due.
    pub fn take(&mut self, now: Instant, force: bool) -> Option<Batch<A>> {
        let deadline = self.poll_timeout()?;
        if !(force || self.is_full() || now >= deadline) {
            return None;
        }
        let (bytes, acks) = self.spare.pop().unwrap_or_default();
        let batch = Batch {
            bytes: mem::replace(&mut self.bytes, bytes),
            records: mem::take(&mut self.records),
            acks: mem::replace(&mut self.acks, acks),
        };
        self.first_at = None;
        Some(batch)
    }

    /// Gives a written batch's buffers back so steady state allocates nothing. The caller has
    /// drained `acks` (acked every token); their Vec's capacity is kept.
    pub fn recycle(&mut self, mut batch: Batch<A>) {
        debug_assert!(batch.acks.is_empty(), "recycle after acking every record");
        if self.spare.len() >= MAX_SPARE {
            return;
        }
        batch.bytes.clear();
        batch.acks.clear();
        self.spare.push((batch.bytes, batch.acks));
    }

    /// Records in the current batch.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn is_full(&self) -> bool {
        self.records >= self.max_records || self.bytes.len() >= MAX_BATCH_BYTES
    }
}

/// Spare buffer pairs kept per batcher: one batch is being filled, one is in the writer's queue
/// and one is being written; more in flight than this means the writer is behind, and freeing
/// the extra buffers then costs nothing that matters.
const MAX_SPARE: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn line(n: u32) -> impl FnOnce(&mut Vec<u8>) {
        move |out: &mut Vec<u8>| out.extend_from_slice(format!("{{\"n\":{n}}}\n").as_bytes())
    }

    #[test]
    fn count_trigger() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, MS);
        assert!(!b.push(t0, Some(1), line(1)));
        assert!(!b.push(t0, Some(2), line(2)));
        assert_eq!(b.len(), 2);
        assert!(b.take(t0, false).is_none(), "neither full nor due");
        assert!(b.push(t0, Some(3), line(3)), "third record fills it");
        let batch = b.take(t0, false).expect("full batch");
        assert_eq!(batch.records, 3);
        assert_eq!(batch.acks, [1, 2, 3]);
        assert_eq!(batch.bytes, b"{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn byte_trigger() {
        let t0 = Instant::now();
        let mut b = Batcher::<()>::new(usize::MAX, MS);
        let big = |out: &mut Vec<u8>| {
            out.resize(out.len() + MAX_BATCH_BYTES / 2 - 1, b' ');
            out.push(b'\n');
        };
        assert!(!b.push(t0, None, big));
        assert!(b.push(t0, None, big));
        assert_eq!(b.take(t0, false).expect("full").records, 2);
    }

    #[test]
    fn deadline_trigger_and_exact_poll_timeout() {
        let t0 = Instant::now();
        let mut b = Batcher::new(256, 5 * MS);
        assert_eq!(b.poll_timeout(), None);
        b.push(t0, Some('a'), line(1));
        b.push(t0 + 3 * MS, Some('b'), line(2));
        // The deadline is fixed by the first record, later pushes do not move it.
        assert_eq!(b.poll_timeout(), Some(t0 + 5 * MS));
        assert!(b
            .take(t0 + 5 * MS - Duration::from_nanos(1), false)
            .is_none());
        let batch = b
            .take(t0 + 5 * MS, false)
            .expect("due exactly at the deadline");
        assert_eq!(batch.acks, ['a', 'b']);
        // The next batch's deadline starts from its own first record.
        b.push(t0 + 9 * MS, Some('c'), line(3));
        assert_eq!(b.poll_timeout(), Some(t0 + 14 * MS));
    }

    #[test]
    fn force_and_empty() {
        let t0 = Instant::now();
        let mut b = Batcher::<u8>::new(256, MS);
        assert!(
            b.take(t0, true).is_none(),
            "empty: nothing even when forced"
        );
        assert!(b.take(t0 + 10 * MS, false).is_none());
        b.push(t0, None, line(1));
        b.push(t0, Some(7), line(2));
        let batch = b.take(t0, true).expect("forced");
        assert_eq!(batch.records, 2);
        assert_eq!(batch.acks, [7], "records without an ack carry none");
        assert!(b.take(t0, true).is_none());
    }

    #[test]
    fn ack_order_kept_across_many() {
        let t0 = Instant::now();
        let mut b = Batcher::new(100, MS);
        let mut seen = Vec::new();
        for i in 0..1000u32 {
            let ack = (i % 3 != 0).then_some(i);
            if b.push(t0, ack, line(i)) {
                seen.extend(b.take(t0, false).expect("full").acks);
            }
        }
        let want: Vec<u32> = (0..1000).filter(|i| i % 3 != 0).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn recycle_reuses_capacity() {
        let t0 = Instant::now();
        let mut b = Batcher::new(2, MS);
        b.push(t0, Some(1u64), line(1));
        b.push(t0, Some(2), line(2));
        let mut batch = b.take(t0, false).expect("full");
        let (ptr, cap) = (batch.bytes.as_ptr(), batch.bytes.capacity());
        let acks_cap = batch.acks.capacity();
        batch.acks.clear(); // the caller acked them
        b.recycle(batch);
        // The buffer the current batch had was empty; fill it and take it, then the recycled
        // one is the one being filled.
        b.push(t0, Some(3), line(3));
        b.push(t0, Some(4), line(4));
        let second = b.take(t0, false).expect("full");
        b.push(t0, Some(5), line(5));
        b.push(t0, Some(6), line(6));
        let third = b.take(t0, false).expect("full");
        assert_eq!(third.bytes.as_ptr(), ptr, "recycled buffer reused");
        assert!(third.bytes.capacity() >= cap);
        assert!(third.acks.capacity() >= acks_cap);
        assert_eq!(third.acks, [5, 6]);
        assert_eq!(second.acks, [3, 4]);
    }

    #[test]
    fn steady_state_allocates_nothing_new() {
        // Push, take, recycle in a loop: after warm-up the same buffers go round.
        let t0 = Instant::now();
        let mut b = Batcher::new(4, MS);
        let mut ptrs = std::collections::HashSet::new();
        for round in 0..50u32 {
            for i in 0..4 {
                b.push(t0, Some(round * 4 + i), line(i));
            }
            let mut batch = b.take(t0, false).expect("full");
            if round > 2 {
                ptrs.insert(batch.bytes.as_ptr() as usize);
            }
            batch.acks.clear();
            b.recycle(batch);
        }
        assert!(ptrs.len() <= 2, "{} distinct buffers", ptrs.len());
    }
}
