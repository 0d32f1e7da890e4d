//! The one crossing point between threads: an inbox into each shard.
//!
//! Everything that must reach a connection from elsewhere (a takeover notice from another
//! shard, a downlink from the API, drain) is a [`Msg`] sent to the shard that owns the
//! connection. Shards never touch each other's connections, and nothing on a report's path
//! crosses here: a report is read, committed to the shard's own log partition and answered on
//! the shard's thread.
//!
//! The channels are unbounded on purpose: what flows through them is already bounded upstream
//! (takeovers by the number of devices, downlinks by the API's concurrency limit), and a send
//! must never block a shard.
//!
//! A driver whose loop does not wait on the channel itself (the io_uring loop waits in the
//! kernel) registers a wake function with [`Mesh::on_send`]; it runs after every send.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::session::Outcome;
use crate::shard::core::ShardMsg;

/// Where a downlink's outcome goes: the API request waiting for it.
pub(crate) type Reply = oneshot::Sender<Outcome>;

/// A message to one shard, as the mesh carries it.
pub(crate) type Msg = ShardMsg<Reply>;

type WakeFn = Box<dyn Fn() + Send + Sync>;

/// One shard's inbox.
struct Inbox {
    tx: mpsc::UnboundedSender<Msg>,
    wake: OnceLock<WakeFn>,
}

/// Senders into every shard, indexed by shard id.
#[derive(Clone)]
pub(crate) struct Mesh {
    shards: Arc<[Inbox]>,
}

impl Mesh {
    /// A mesh of `n` shards and the receiving end of each.
    pub(crate) fn new(n: usize) -> (Self, Vec<mpsc::UnboundedReceiver<Msg>>) {
        let (shards, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let inbox = Inbox {
                    tx,
                    wake: OnceLock::new(),
                };
                (inbox, rx)
            })
            .unzip();
        (
            Self {
                shards: shards.into(),
            },
            receivers,
        )
    }

    /// Sends to shard `shard`; false when that shard has stopped.
    pub(crate) fn send(&self, shard: u8, msg: Msg) -> bool {
        let Some(inbox) = self.shards.get(usize::from(shard)) else {
            return false;
        };
        if inbox.tx.send(msg).is_err() {
            return false;
        }
        if let Some(wake) = inbox.wake.get() {
            wake();
        }
        true
    }

    /// Makes every later send to `shard` call `wake` after queueing its message (once per
    /// shard; a second registration is ignored).
    pub(crate) fn on_send(&self, shard: u8, wake: WakeFn) {
        if let Some(inbox) = self.shards.get(usize::from(shard)) {
            let _ = inbox.wake.set(wake);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }
}
