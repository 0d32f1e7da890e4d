//! The one crossing point between threads: a channel into each shard.
//!
//! Everything that must reach a connection from elsewhere (a takeover notice from another shard,
//! a downlink from the API, the writer thread's "this batch is durable") is a [`ShardMsg`] sent
//! to the shard that owns the connection. Shards never touch each other's connections.
//!
//! The channels are unbounded on purpose: what flows through them is already bounded upstream
//! (commits by the writer's queue, takeovers by the number of devices, downlinks by the API's
//! concurrency limit), and a send must never block a shard or drop an acknowledgement.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::registry::{ConnRef, DeviceId};
use crate::session::{AckToken, Downlink, Outcome};
use crate::uplink::{Batch, UplinkError};

/// An uplink waiting for its batch to be durable, and the reply it unblocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AckRef {
    pub(crate) conn: ConnRef,
    pub(crate) token: AckToken,
}

/// A message to one shard.
pub(crate) enum ShardMsg {
    /// Another connection took `device` over from `conn`.
    TakenOver { conn: ConnRef, device: DeviceId },
    /// A downlink for the device owned by `conn`.
    Downlink {
        conn: ConnRef,
        downlink: Downlink,
        started: Instant,
        reply: oneshot::Sender<Outcome>,
    },
    /// The writer finished a batch this shard submitted.
    Committed {
        batch: Batch<AckRef>,
        result: Result<(), UplinkError>,
    },
    /// Stop accepting, close every connection with 1001, flush uplinks.
    Drain,
}

/// Senders into every shard, indexed by shard id.
#[derive(Clone)]
pub(crate) struct Mesh {
    shards: Vec<mpsc::UnboundedSender<ShardMsg>>,
}

impl Mesh {
    /// A mesh of `n` shards and the receiving end of each.
    pub(crate) fn new(n: usize) -> (Self, Vec<mpsc::UnboundedReceiver<ShardMsg>>) {
        let (shards, receivers) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        (Self { shards }, receivers)
    }

    /// Sends to shard `shard`; false when that shard has stopped.
    pub(crate) fn send(&self, shard: u8, msg: ShardMsg) -> bool {
        self.shards
            .get(usize::from(shard))
            .is_some_and(|tx| tx.send(msg).is_ok())
    }

    pub(crate) fn sender(&self, shard: u8) -> mpsc::UnboundedSender<ShardMsg> {
        self.shards[usize::from(shard)].clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }
}
