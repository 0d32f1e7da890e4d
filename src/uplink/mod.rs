//! Uplinks to the edge core: every accepted report, online and offline, made durable before the
//! device hears "success".
//!
//! Owns: the record format ([`record`]: one compact JSON line per uplink), the per-shard
//! [`Batcher`] (sans-IO: by count, size and age, time passed in), and the embedded
//! [`LocalLog`] (append-only, segmented, CRC-framed, crash-safe), one partition per shard.
//! Never: sockets, threads or device state. The batcher never reads the clock and never does
//! IO.
//!
//! # The path of one uplink
//!
//! ```text
//!   shard core: session event ─ encode ─▶ Batcher::push(now, ack, ..)
//!               end of the driver's turn, no commit in flight ─▶ Action::Append(batches)
//!   driver:     LocalLog::prepare ─▶ write (and fdatasync per policy) ─▶ LocalLog::complete
//!   shard core: committed(result) ─▶ session.ack(token, code) per ack ─▶ Batcher::recycle
//! ```
//!
//! All of it on the shard's own thread, into the shard's own partition (`<dir>/shard-N`); only
//! an fdatasync may run elsewhere (the epoll driver's blocking pool) or in the kernel (an
//! io_uring op). What always holds: an ack leaves with success only after the append that
//! contained its record completed, so a device's success reply implies its uplink is in the
//! log (written, and fsynced under `Fsync::Batch`). Records of one shard reach its partition
//! in the order they were pushed; [`LocalLog::read_dir`] merges partitions by time.

mod batch;
mod error;
mod log;
pub mod outbox;
pub mod record;

pub use batch::{Batch, Batcher, MAX_BATCH_BYTES};
pub use error::UplinkError;
pub use log::{
    partition_dir, Fsync, LocalLog, LogOptions, Marks, OnFull, Outbox, Prepared, Recovery,
    FRAME_HEADER,
};
pub use record::{decode_line, encode, OwnedRecord, Record, RecordBody, RecordKind};

#[cfg(test)]
mod test_support;
