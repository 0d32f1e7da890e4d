//! The epoll driver: one tokio current-thread runtime per shard, for kernels or containers that
//! refuse io_uring (and for comparison with the io_uring driver).
//!
//! Owns: the shard's tasks (accept, timers, mesh inbox, one task per connection) and the
//! sockets. Reads are readiness-based into one receive buffer per shard: an idle connection
//! keeps no read buffer at all, only the few bytes of a frame that arrived incomplete.
//!
//! Cancellation: tokio's readiness futures are cancel-safe, so a connection task can wait on
//! "readable" and "something to send" at once with `select!`.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::{spawn_local, LocalSet};

use crate::shard::core::ShardCore;
use crate::shard::mesh::Reply;
use crate::shard::partition::ShardLog;
use crate::shard::{
    accept_backoff, flusher, inbox_loop, timers, ShardLocal, ShardRun, ShardWakers, Shared,
};
use std::sync::Arc;

/// The driver's handle on one connection: how to wake its task.
pub(crate) struct EpollConn {
    wake: Rc<Notify>,
}

type Core = Rc<RefCell<ShardCore<EpollConn, Reply>>>;

/// What the tasks of one shard share besides the core.
struct Local {
    core: Core,
    log: RefCell<ShardLog>,
    shared: Arc<Shared>,
    wakers: ShardWakers,
    /// The shard's receive buffer; never borrowed across an await.
    read_buf: RefCell<Vec<u8>>,
    /// Scratch list of ready slots.
    ready: RefCell<Vec<usize>>,
}

impl ShardLocal<EpollConn> for Local {
    fn core(&self) -> &RefCell<ShardCore<EpollConn, Reply>> {
        &self.core
    }

    fn wakers(&self) -> &ShardWakers {
        &self.wakers
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn log(&self) -> &RefCell<ShardLog> {
        &self.log
    }

    /// Wakes every connection the core flagged, and the timer task.
    fn act_on_ready(self: &Rc<Self>) {
        let mut ready = self.ready.borrow_mut();
        let mut core = self.core.borrow_mut();
        core.take_ready(&mut ready);
        for slot in ready.drain(..) {
            if let Some(c) = core.io(slot) {
                c.wake.notify_one();
            }
        }
    }
}

/// Runs one shard on the epoll driver until it has drained.
pub(crate) fn run(run: ShardRun<EpollConn>) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ShardRun {
        core,
        log,
        shared,
        listener,
        inbox,
        read_buf_bytes,
    } = run;
    listener.set_nonblocking(true)?;
    LocalSet::new().block_on(&rt, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let local = Rc::new(Local {
            core: Rc::new(RefCell::new(core)),
            log: RefCell::new(log),
            shared,
            wakers: ShardWakers::default(),
            read_buf: RefCell::new(vec![0; read_buf_bytes]),
            ready: RefCell::new(Vec::new()),
        });
        spawn_local(timers(Rc::clone(&local)));
        spawn_local(flusher(Rc::clone(&local)));
        spawn_local(accept(Rc::clone(&local), listener));
        inbox_loop(Rc::clone(&local), inbox).await;
        Ok(())
    })
}

async fn accept(local: Rc<Local>, listener: tokio::net::TcpListener) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = local.wakers.draining.notified() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let wake = Rc::new(Notify::new());
                let io = EpollConn {
                    wake: Rc::clone(&wake),
                };
                let slot = local.core.borrow_mut().accept(peer, Instant::now(), io);
                if let Some(slot) = slot {
                    spawn_local(connection(Rc::clone(&local), slot, stream, wake));
                }
                local.after_core_call();
            }
            Err(e) => {
                accept_backoff(&local.shared, &e).await;
            }
        }
    }
}

async fn connection(local: Rc<Local>, slot: usize, stream: TcpStream, wake: Rc<Notify>) {
    let mut stream = stream;
    // Bytes of a frame that arrived incomplete; empty for an idle connection.
    let mut leftover: Vec<u8> = Vec::new();
    let mut paused = false;
    'conn: loop {
        // Everything the session has to send, in as few writes as it was produced. The buffer
        // is the session's own, handed over, and freed after the write: an idle connection
        // holds none.
        loop {
            let mut out = Vec::new();
            if !local.core.borrow_mut().transmit(slot, &mut out) {
                break;
            }
            if !write_all(&local, slot, &stream, &wake, &out).await {
                break 'conn;
            }
        }
        if local.core.borrow().is_closed(slot) {
            break;
        }
        // Backpressure: while the core does not want input, only a wake (replies released)
        // or the next write brings the task back here.
        let wants_input = local.core.borrow().wants_input(slot);
        if !wants_input && !paused {
            local.core.borrow().note_paused();
        }
        paused = !wants_input;
        tokio::select! {
            r = stream.readable(), if wants_input => {
                if r.is_err() || !read_once(&local, slot, &stream, &mut leftover) {
                    break 'conn;
                }
            }
            () = wake.notified() => {}
        }
    }
    let _ = stream.shutdown().await;
    local.core.borrow_mut().disconnect(slot, Instant::now());
    local.after_core_call();
}

/// Writes all of `out`; false on a socket error, or when the core aborts the connection while
/// the peer is not taking the bytes (a plain `write_all` would wait for it forever). While it
/// waits the connection is not read: backpressure, counted like a pause.
async fn write_all(
    local: &Local,
    slot: usize,
    stream: &TcpStream,
    wake: &Notify,
    mut out: &[u8],
) -> bool {
    let mut waited = false;
    while !out.is_empty() {
        match stream.try_write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The task reads nothing while it waits here: count it as a pause.
                if !std::mem::replace(&mut waited, true) {
                    local.core.borrow().note_paused();
                }
                tokio::select! {
                    r = stream.writable() => if r.is_err() { return false },
                    () = wake.notified() => if local.core.borrow().is_aborted(slot) {
                        return false;
                    },
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Reads what the socket has into the shard buffer and feeds it to the core; false at EOF or
/// on a socket error.
fn read_once(local: &Rc<Local>, slot: usize, stream: &TcpStream, leftover: &mut Vec<u8>) -> bool {
    let mut buf = local.read_buf.borrow_mut();
    let start = leftover.len();
    let wanted = local.core.borrow().wanted_bytes(slot);
    if buf.len() < start + wanted.max(1) + 1 {
        buf.resize(start + wanted.max(1) + 1, 0);
    }
    buf[..start].copy_from_slice(leftover);
    let n = match stream.try_read(&mut buf[start..]) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
        Err(_) => return false,
    };
    let len = start + n;
    let consumed = local
        .core
        .borrow_mut()
        .input(slot, &mut buf[..len], Instant::now());
    leftover.clear();
    leftover.extend_from_slice(&buf[consumed.min(len)..len]);
    if leftover.is_empty() && leftover.capacity() > 4096 {
        *leftover = Vec::new();
    }
    drop(buf);
    local.after_core_call();
    true
}
