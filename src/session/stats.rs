//! Per-shard counters kept by sessions; the driver exports them as metrics.

use crate::protocol::{Code, Method};
use crate::session::CloseReason;

/// Slots per code: every code ringlink sends, plus one for codes from clients it does not know.
const CODES: usize = Code::SENT.len() + 1;

/// Counters of one shard. Plain integers: a shard is one thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered, by method and code; the last method row counts messages rejected
    /// before their method was known (not JSON, bad envelope).
    requests: [[u64; CODES]; Method::ALL.len() + 1],
    /// Client replies whose messageId matched no pending downlink (late, unknown or 0).
    pub replies_unmatched: u64,
    /// Connections closed for breaking RFC 6455.
    pub ws_errors: u64,
    /// Uplinks batched, by kind: property, event, online, offline (see [`Stats::UPLINK_KINDS`]).
    pub uplinks: [u64; 4],
    /// Link connections ended, by [`CloseReason::index`](crate::session::CloseReason::index).
    pub closes: [u64; CloseReason::NAMES.len()],
    /// Time from reading an uplink (report, event, online, offline) to its acknowledgement,
    /// by [`Stats::ACK_PARTS`]: in total, waiting for the log commit, and the rest (waiting
    /// for the batch to go, processing).
    pub ack_latency: [Latency; 3],
    /// Time from handing a group commit to the driver to its completion (write, and fsync
    /// with `fsync = "batch"`).
    pub commit_latency: Latency,
}

/// A latency histogram in plain integers (one shard's), with fixed buckets from 50 µs to
/// 10 s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// One count per bound of [`Latency::BOUNDS_US`] plus the +Inf bucket; not cumulative.
    pub counts: [u64; Self::BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl Latency {
    /// Bucket upper bounds in microseconds.
    pub const BOUNDS_US: [u64; 17] = [
        50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    ];

    pub fn observe(&mut self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = Self::BOUNDS_US.partition_point(|b| *b < us);
        self.counts[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    fn merge(&mut self, other: &Self) {
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            requests: [[0; CODES]; Method::ALL.len() + 1],
            replies_unmatched: 0,
            ws_errors: 0,
            uplinks: [0; 4],
            closes: [0; CloseReason::NAMES.len()],
            ack_latency: [Latency::default(); 3],
            commit_latency: Latency::default(),
        }
    }
}

impl Stats {
    /// The kinds counted in [`Stats::uplinks`], in order.
    pub const UPLINK_KINDS: [&'static str; 4] = ["property", "event", "online", "offline"];
    /// The parts of [`Stats::ack_latency`], in order.
    pub const ACK_PARTS: [&'static str; 3] = ["total", "log", "rest"];

    pub(crate) fn count_request(&mut self, method: Option<Method>, code: Code) {
        let row = method.map_or(Method::ALL.len(), |m| m as usize);
        self.requests[row][code_slot(code)] += 1;
    }

    /// Requests by method name (`"invalid"` for rejects before the method was known) and code.
    pub fn requests(&self) -> impl Iterator<Item = (&'static str, Code, u64)> + '_ {
        self.requests.iter().enumerate().flat_map(|(row, codes)| {
            let name = Method::ALL.get(row).map_or("invalid", |m| m.as_str());
            nonzero(codes).map(move |(code, n)| (name, code, n))
        })
    }

    /// Adds another shard's counters to these.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.requests.iter_mut().zip(&other.requests) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.replies_unmatched += other.replies_unmatched;
        self.ws_errors += other.ws_errors;
        for (a, b) in self.uplinks.iter_mut().zip(&other.uplinks) {
            *a += b;
        }
        for (a, b) in self.closes.iter_mut().zip(&other.closes) {
            *a += b;
        }
        for (a, b) in self.ack_latency.iter_mut().zip(&other.ack_latency) {
            a.merge(b);
        }
        self.commit_latency.merge(&other.commit_latency);
    }
}

fn code_slot(code: Code) -> usize {
    Code::SENT
        .iter()
        .position(|c| *c == code)
        .unwrap_or(CODES - 1)
}

fn nonzero(codes: &[u64; CODES]) -> impl Iterator<Item = (Code, u64)> + '_ {
    codes
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| {
            // The last slot collects unknown client codes; report them as 100000.
            (Code::SENT.get(i).copied().unwrap_or(Code::Unknown), *n)
        })
}
