//! The io_uring driver: one tokio-uring runtime (one ring) per shard.
//!
//! Owns: the shard's tasks (accept, timers, mesh inbox, a reader per connection, a writer per
//! connection while it has bytes to send) and the sockets.
//!
//! tokio-uring 0.5 rules this driver follows:
//! - An op owns its buffer until it completes; a dropped op is not cancelled. So a read is
//!   never raced against a timer or a notification with `select!`: each connection has one
//!   reader that only reads, timers run on the shard's timer task, and writes on a writer task.
//! - A socket with a read in flight is not closed by dropping it: to end a connection the
//!   driver calls `shutdown`, the pending read completes with 0, and the reader cleans up.
//! - Each connection reads into its own buffer, since 0.5 has no provided-buffer rings: 1 KiB
//!   for a quiet connection, up to 64 KiB while reads keep filling it ([`ReadSize`]), and as
//!   large as a large frame needs; given back when the connection is quiet again.
//! - The writer sends everything the session produced for one read in one `write_all`, and the
//!   reader submits its next read right away, so both ops go to the kernel in one submission.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use crate::shard::core::ShardCore;
use crate::shard::mesh::Reply;
use crate::shard::partition::ShardLog;
use crate::shard::{
    accept_backoff, flusher, inbox_loop, timers, ShardLocal, ShardRun, ShardWakers, Shared,
};
use std::sync::Arc;

/// Initial and resting size of a connection's read buffer.
const READ_BUF: usize = 1024;
/// Accept ops each shard keeps in flight.
const ACCEPTS_IN_FLIGHT: usize = 16;
/// The most a busy connection reads at once (a single large frame may still need more).
const MAX_READ_BUF: usize = 64 * 1024;

/// The driver's handle on one connection.
pub(crate) struct UringConn {
    stream: Rc<TcpStream>,
    /// A writer task is running for this connection.
    writing: Cell<bool>,
    /// `shutdown` was called (once is enough).
    shut: Cell<bool>,
    /// The reader waits for `resume` instead of reading (backpressure).
    paused: Cell<bool>,
    resume: Rc<Notify>,
}

impl UringConn {
    /// Lets a paused reader look again whether it may read.
    fn wake_reader(&self) {
        if self.paused.get() {
            self.resume.notify_one();
        }
    }
}

type Core = Rc<RefCell<ShardCore<UringConn, Reply>>>;

struct Local {
    core: Core,
    log: RefCell<ShardLog>,
    shared: Arc<Shared>,
    wakers: ShardWakers,
    ready: RefCell<Vec<usize>>,
}

impl ShardLocal<UringConn> for Local {
    fn core(&self) -> &RefCell<ShardCore<UringConn, Reply>> {
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

    /// Starts a writer for every flagged connection with bytes to send, shuts down closed
    /// ones, and wakes the timer task.
    fn act_on_ready(self: &Rc<Self>) {
        let mut ready = self.ready.borrow_mut();
        self.core.borrow_mut().take_ready(&mut ready);
        for slot in ready.drain(..) {
            self.kick_writer(slot);
        }
    }
}

impl Local {
    fn kick_writer(self: &Rc<Self>, slot: usize) {
        let core = self.core.borrow();
        let Some(conn) = core.io(slot) else { return };
        conn.wake_reader();
        if core.is_aborted(slot) && !conn.shut.replace(true) {
            // Ends a write stuck on a peer that does not read, and the read in flight.
            let _ = conn.stream.shutdown(Shutdown::Both);
            return;
        }
        if conn.writing.get() {
            return; // the running writer picks the new bytes up
        }
        conn.writing.set(true);
        let stream = Rc::clone(&conn.stream);
        drop(core);
        tokio_uring::spawn(writer(Rc::clone(self), slot, stream));
    }
}

/// Runs one shard on the io_uring driver until it has drained.
pub(crate) fn run(run: ShardRun<UringConn>) -> io::Result<()> {
    let ShardRun {
        core,
        log,
        shared,
        listener,
        inbox,
        read_buf_bytes: _,
    } = run;
    listener.set_nonblocking(false)?;
    tokio_uring::builder().entries(1024).start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        let local = Rc::new(Local {
            core: Rc::new(RefCell::new(core)),
            log: RefCell::new(log),
            shared,
            wakers: ShardWakers::default(),
            ready: RefCell::new(Vec::new()),
        });
        tokio_uring::spawn(timers(Rc::clone(&local)));
        tokio_uring::spawn(flusher(Rc::clone(&local)));
        // Several accepts in flight: under load each one waits its turn in the ring behind
        // every read completion, and one at a time held the connect rate under 1000/s.
        let listener = Rc::new(listener);
        let accepts: Vec<_> = (0..ACCEPTS_IN_FLIGHT)
            .map(|_| tokio_uring::spawn(accept(Rc::clone(&local), Rc::clone(&listener))))
            .collect();
        inbox_loop(Rc::clone(&local), inbox).await;
        for task in accepts {
            task.abort();
        }
        Ok(())
    })
}

async fn accept(local: Rc<Local>, listener: Rc<tokio_uring::net::TcpListener>) {
    loop {
        // An accept op left in flight at drain is harmless: the task is aborted and the
        // listener closes with the runtime; a socket it still returns is dropped (closed).
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let stream = Rc::new(stream);
                let resume = Rc::new(Notify::new());
                let io = UringConn {
                    stream: Rc::clone(&stream),
                    writing: Cell::new(false),
                    shut: Cell::new(false),
                    paused: Cell::new(false),
                    resume: Rc::clone(&resume),
                };
                let slot = local.core.borrow_mut().accept(peer, Instant::now(), io);
                match slot {
                    Some(slot) => {
                        tokio_uring::spawn(reader(Rc::clone(&local), slot, stream, resume));
                    }
                    None => {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                local.after_core_call();
            }
            Err(e) => {
                accept_backoff(&local.shared, &e).await;
            }
        }
    }
}

/// Reads until EOF, an error, or the session ends (then the writer shuts the socket down,
/// which completes the read in flight).
async fn reader(local: Rc<Local>, slot: usize, stream: Rc<TcpStream>, resume: Rc<Notify>) {
    let mut size = ReadSize::default();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
    loop {
        wait_until_wanted(&local, slot, &resume).await;
        let wanted = local.core.borrow().wanted_bytes(slot).max(size.get());
        if buf.capacity() - buf.len() < wanted {
            buf.reserve(wanted);
        }
        let start = buf.len();
        let spare = buf.capacity() - start;
        let (res, slice) = stream.read(buf.slice(start..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => size.observe(n, spare),
        }
        let consumed = local
            .core
            .borrow_mut()
            .input(slot, &mut buf[..], Instant::now());
        buf.drain(..consumed.min(buf.len()));
        if buf.is_empty() && buf.capacity() > 2 * size.get() {
            buf = Vec::with_capacity(size.get());
        }
        local.after_core_call();
        if local.core.borrow().is_closed(slot) {
            // The writer flushes the close frame, then shuts the socket down; keep reading
            // until that makes the read return.
            shutdown_when_idle(&local, slot);
        }
    }
    local.core.borrow_mut().disconnect(slot, Instant::now());
    let _ = stream.shutdown(Shutdown::Both);
    local.after_core_call();
}

/// Backpressure: while the core does not want input from `slot`, no read is submitted (the
/// kernel's receive window fills and the peer slows down). Woken by [`UringConn::wake_reader`]
/// when the connection is flagged or a write completes.
async fn wait_until_wanted(local: &Rc<Local>, slot: usize, resume: &Notify) {
    if local.core.borrow().wants_input(slot) {
        return;
    }
    local.core.borrow().note_paused();
    set_paused(local, slot, true);
    loop {
        resume.notified().await;
        if local.core.borrow().wants_input(slot) {
            break;
        }
    }
    set_paused(local, slot, false);
}

fn set_paused(local: &Local, slot: usize, paused: bool) {
    if let Some(conn) = local.core.borrow().io(slot) {
        conn.paused.set(paused);
    }
}

/// How many bytes a connection's next read asks for. Reads are not multishot and there are no
/// provided buffers, so the buffer of every read in flight is the connection's own: small for
/// the many quiet connections, large for a busy one so that it gets many frames per read.
/// A read that filled its buffer doubles the size (more was waiting); one that did not sets it
/// back to what it got, so a connection that goes quiet waits with a small buffer again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        Self(READ_BUF)
    }
}

impl ReadSize {
    fn get(self) -> usize {
        self.0
    }

    /// A read of `n` bytes into `spare` bytes of room.
    fn observe(&mut self, n: usize, spare: usize) {
        self.0 = if n >= spare {
            (self.0 * 2).min(MAX_READ_BUF)
        } else {
            n.next_power_of_two().clamp(READ_BUF, MAX_READ_BUF)
        };
    }
}

/// Sends everything the session has, then shuts a closed connection down.
async fn writer(local: Rc<Local>, slot: usize, stream: Rc<TcpStream>) {
    loop {
        // The session's own buffer, handed over and freed after the write.
        let mut out = Vec::new();
        if !local.core.borrow_mut().transmit(slot, &mut out) {
            break;
        }
        let (res, _) = stream.write_all(out).await;
        if res.is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            break;
        }
        if let Some(conn) = local.core.borrow().io(slot) {
            conn.wake_reader();
        }
    }
    if let Some(conn) = local.core.borrow().io(slot) {
        conn.writing.set(false);
    }
    shutdown_when_idle(&local, slot);
}

/// Shuts a closed connection's socket down once no writer is running, so its reader ends.
fn shutdown_when_idle(local: &Rc<Local>, slot: usize) {
    let core = local.core.borrow();
    if !core.is_closed(slot) {
        return;
    }
    if let Some(conn) = core.io(slot) {
        if !conn.writing.get() && !conn.shut.replace(true) {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_grows_while_reads_fill_and_falls_back_when_quiet() {
        let mut s = ReadSize::default();
        assert_eq!(s.get(), READ_BUF);
        // Busy: every read fills its buffer.
        for _ in 0..20 {
            let room = s.get();
            s.observe(room, room);
        }
        assert_eq!(s.get(), MAX_READ_BUF, "capped");
        // A partial read: the next one asks for about what this one got.
        s.observe(5000, MAX_READ_BUF);
        assert_eq!(s.get(), 8192);
        // Quiet again: a single small frame brings it back to the resting size.
        s.observe(250, 8192);
        assert_eq!(s.get(), READ_BUF);
    }
}
