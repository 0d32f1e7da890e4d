//! Uplinks to the edge core: every accepted report, online and offline, made durable before the
//! device hears "success".
//!
//! Owns: the record format ([`record`]: one compact JSON line per uplink), the per-shard
//! [`Batcher`] (sans-IO: by count, size and age, time passed in), the embedded [`LocalLog`]
//! (append-only, segmented, CRC-framed, crash-safe), and the [`Writer`] thread that group-commits
//! batches from every shard to a [`Sink`].
//! Never: sockets or device state. The batcher never reads the clock and never does IO; only the
//! writer thread touches the sink.
//!
//! # The path of one uplink
//!
//! ```text
//!   shard:  session event ─ encode ─▶ Batcher::push(now, ack, ..)   (true = full: take now)
//!           poll_timeout() ─▶ Batcher::take(now, force) ─▶ Writer::submit(batch, done)
//!                                                              │ Err(batch): queue full, retry
//!   writer: block for one batch, take all queued (≤ 64, ≤ 1 MiB) ─▶ Sink::write(all) ─▶ done(batch, result) each, in order
//!   shard:  (batch back through the mesh) ─▶ session.ack(token, code) per ack ─▶ Batcher::recycle
//! ```
//!
//! What always holds: an ack leaves `done` with `Ok` only after the sink call that contained
//! its record returned, so a device's success reply implies its uplink is in the sink (for the
//! local log: written with one `write`, and fsynced when `Fsync::Batch`). Records of one shard
//! reach the sink in the order they were pushed.

mod batch;
mod error;
mod log;
pub mod record;
mod writer;

pub use batch::{Batch, Batcher, MAX_BATCH_BYTES};
pub use error::UplinkError;
pub use log::{Fsync, LocalLog, LogOptions, Recovery};
pub use record::{decode_line, encode, OwnedRecord, Record, RecordBody, RecordKind};
pub use writer::{Done, Sink, Writer, WriterStats};

#[cfg(test)]
mod test_support;
