//! The epoll driver: one tokio current-thread runtime per shard, for kernels or containers that
//! refuse io_uring (and for comparison with the io_uring driver).
//!
//! Owns: the shard's tasks (accept, timers, mesh inbox, one task per connection) and the
//! sockets. Reads are readiness-based into one receive buffer per shard: an idle connection
//! keeps no read buffer at all, only the few bytes of a frame that arrived incomplete.
//!
//! A connection task waits on "readable" (or "writable") and "flagged by the core" at once
//! in one small `poll_fn` ([`wait`]): tokio's per-socket readiness slot holds the waker for
//! the socket, the connection's [`EpollConn`] for the core; neither allocates.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use tokio::io::AsyncWriteExt as _;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::{spawn_local, LocalSet};

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::logging::RateLimit;
use crate::shard::core::{Action, Commit, ShardCore, ShardMsg};
use crate::shard::mesh::{Msg, Reply};
use crate::shard::partition::ShardLog;
use crate::shard::{unix_ms, ShardRun, Shared};

/// The driver's handle on one connection: its task's waker while the task waits in [`wait`],
/// taken when the core flags the connection (something to send, reading wanted again,
/// aborted). No allocation of its own; the flag itself is a bit in [`Flags`].
pub(crate) struct EpollConn {
    waker: Cell<Option<Waker>>,
}

/// One bit per connection slot: flagged since its task last looked, so that a flag raised
/// while the task runs is not lost (a permit, like `Notify`'s).
#[derive(Default)]
struct Flags(RefCell<Vec<u64>>);

impl Flags {
    fn set(&self, slot: usize) {
        let mut words = self.0.borrow_mut();
        if words.len() <= slot / 64 {
            words.resize(slot / 64 + 1, 0);
        }
        words[slot / 64] |= 1 << (slot % 64);
    }

    /// Whether `slot` was flagged; clears it.
    fn take(&self, slot: usize) -> bool {
        let mut words = self.0.borrow_mut();
        let Some(word) = words.get_mut(slot / 64) else {
            return false;
        };
        let bit = 1 << (slot % 64);
        std::mem::replace(word, *word & !bit) & bit != 0
    }
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
    /// Connections flagged by the core since their task last looked.
    flags: Flags,
    /// Accept errors come in floods (out of descriptors): a few lines, then a count.
    accept_warn: RefCell<RateLimit>,
}

impl Local {
    /// After any call into the core: act on the connections it flagged, perform its actions
    /// until there are none, then [`kick_tasks`](Self::kick_tasks).
    fn after_core_call(self: &Rc<Self>) {
        loop {
            self.act_on_ready();
            let Some(action) = self.core.borrow_mut().poll_action() else {
                break;
            };
            match action {
                Action::Send { shard, msg } => {
                    self.shared.mesh.send(shard, msg);
                }
                Action::Answer { reply, outcome } => {
                    let _ = reply.send(outcome);
                }
                Action::Append(commit) => append(self, commit),
            }
        }
        self.kick_tasks();
    }

    /// Wakes the timer task if the core now has a deadline earlier than the one it sleeps for
    /// (most calls into the core, a read or a commit, leave the earliest deadline where it was,
    /// and waking the task for those would cost a task switch and a timer re-arm each time),
    /// and the flusher if records wait for a commit.
    fn kick_tasks(&self) {
        let w = &self.wakers;
        let core = self.core.borrow();
        let next = core.poll_timeout();
        if next.is_some_and(|n| w.timer_armed.get().is_none_or(|armed| n < armed)) {
            w.timer_kick.notify_one();
        }
        if core.commit_wanted() {
            w.flush_kick.notify_one();
        }
    }

    /// Wakes every connection the core flagged.
    fn act_on_ready(&self) {
        let mut ready = self.ready.borrow_mut();
        let mut core = self.core.borrow_mut();
        core.take_ready(&mut ready);
        for slot in ready.drain(..) {
            self.flags.set(slot);
            if let Some(w) = core.io(slot).and_then(|c| c.waker.take()) {
                w.wake();
            }
        }
    }
}

/// Runs one shard on the epoll driver until it has drained.
pub(crate) fn run(run: ShardRun) -> io::Result<()> {
    let core = run.core();
    let ShardRun {
        id: _,
        log,
        shared,
        listener,
        inbox,
        read_buf_bytes,
        ready,
    } = run;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return setup_failed(&ready, e),
    };
    if let Err(e) = listener.set_nonblocking(true) {
        return setup_failed(&ready, e);
    }
    LocalSet::new().block_on(&rt, async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return setup_failed(&ready, e),
        };
        let _ = ready.send(Ok(()));
        let local = Rc::new(Local {
            core: Rc::new(RefCell::new(core)),
            log: RefCell::new(log),
            shared,
            wakers: ShardWakers::default(),
            read_buf: RefCell::new(vec![0; read_buf_bytes]),
            ready: RefCell::new(Vec::new()),
            flags: Flags::default(),
            accept_warn: RefCell::new(RateLimit::warnings()),
        });
        spawn_local(timers(Rc::clone(&local)));
        spawn_local(flusher(Rc::clone(&local)));
        spawn_local(accept(Rc::clone(&local), listener));
        inbox_loop(Rc::clone(&local), inbox).await;
        Ok(())
    })
}

/// Reports a setup error to `Server::start`, which fails the start with it.
fn setup_failed(
    ready: &std::sync::mpsc::SyncSender<io::Result<()>>,
    e: io::Error,
) -> io::Result<()> {
    ready.send(Err(e)).map_err(io::Error::other)
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
                let io = EpollConn {
                    waker: Cell::new(None),
                };
                let slot = local.core.borrow_mut().accept(peer, Instant::now(), io);
                if let Some(slot) = slot {
                    let task = connection(Rc::clone(&local), slot, stream);
                    // The task's allocation (header, scheduler handle, id, this future and
                    // trailer, 128-aligned) stays at 256 B with up to 144 B here.
                    debug_assert!(
                        size_of_val(&task) <= 144,
                        "the connection future grew to {} B",
                        size_of_val(&task)
                    );
                    spawn_local(task);
                }
                local.after_core_call();
                // Over the accept rate: not accepting until then; connections wait in the
                // backlog.
                let pause = local.core.borrow_mut().take_accept_pause();
                if let Some(until) = pause {
                    tokio::select! {
                        () = tokio::time::sleep_until(until.into()) => {}
                        () = local.wakers.draining.notified() => return,
                    }
                }
            }
            Err(e) => {
                accept_backoff(&local, &e).await;
            }
        }
    }
}

/// A connection's task.
///
/// Not an `async fn`: that lowering keeps its arguments twice in the task (once as captured
/// arguments, once as the body's locals), 48 bytes which, with tokio's `rt-multi-thread`
/// feature on (16-byte scheduler handles, a 32-byte `TcpStream`), pushed the task's
/// 128-aligned allocation from 256 to 384 bytes per connection.
#[allow(clippy::manual_async_fn)]
fn connection(local: Rc<Local>, slot: usize, mut stream: TcpStream) -> impl Future<Output = ()> {
    async move {
        // Bytes of a frame that arrived incomplete; empty for an idle connection.
        let mut leftover: Vec<u8> = Vec::new();
        let mut paused = false;
        'conn: loop {
            // Everything the session has to send, in as few writes as it was produced. The buffer
            // is the session's own, handed over, and freed after the write: an idle connection
            // holds none. Whatever flagged the connection until here is dealt with by this turn.
            loop {
                let mut out = Vec::new();
                local.flags.take(slot);
                if !local.core.borrow_mut().transmit(slot, &mut out) {
                    break;
                }
                // Most writes go out at once; only a write the socket cannot take whole waits,
                // in a boxed future, so that every idle connection's task stays small.
                let Ok(written) = write_now(&stream, &out) else {
                    break 'conn;
                };
                if written < out.len()
                    && !Box::pin(write_rest(&local, slot, &stream, &out[written..])).await
                {
                    break 'conn;
                }
            }
            if local.core.borrow().is_closed(slot) {
                break;
            }
            // Backpressure: while the core does not want input, only a flag (replies released)
            // or the next write brings the task back here.
            let wants_input = local.core.borrow().wants_input(slot);
            if wants_input && paused {
                // What was read before the pause goes in first: a connection over its message
                // rate stops consuming at a message boundary and waits for no new bytes.
                paused = false;
                feed_leftover(&local, slot, &mut leftover);
                continue;
            }
            if !wants_input && !paused {
                local.core.borrow().note_paused();
            }
            paused = !wants_input;
            let interest = wants_input.then_some(Interest::READABLE);
            match wait(&local, slot, &stream, interest).await {
                Woke::Flagged => {}
                Woke::Ready(r) => {
                    if r.is_err() || !read_once(&local, slot, &stream, &mut leftover) {
                        break 'conn;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
        local.core.borrow_mut().disconnect(slot, Instant::now());
        local.after_core_call();
        // The slot is free: the next connection in it starts without this one's flag.
        local.flags.take(slot);
    }
}

/// What ended a connection task's [`wait`].
enum Woke {
    /// The core flagged the connection (see [`EpollConn`]).
    Flagged,
    /// The socket is ready for the interest waited for.
    Ready(io::Result<()>),
}

/// Waits until the core flags `slot` or, with an interest, the socket is ready for it. The
/// task's waker sits in the connection's [`EpollConn`] only while it waits, and readiness is
/// tokio's own per-socket waker slot: the future is a few words, with no waiter node.
fn wait<'a>(
    local: &'a Local,
    slot: usize,
    stream: &'a TcpStream,
    interest: Option<Interest>,
) -> impl Future<Output = Woke> + 'a {
    std::future::poll_fn(move |cx| {
        let core = local.core.borrow();
        let Some(io) = core.io(slot) else {
            return Poll::Ready(Woke::Flagged);
        };
        if local.flags.take(slot) {
            io.waker.take();
            return Poll::Ready(Woke::Flagged);
        }
        let ready = match interest {
            Some(i) if i.is_readable() => stream.poll_read_ready(cx),
            Some(_) => stream.poll_write_ready(cx),
            None => Poll::Pending,
        };
        if let Poll::Ready(r) = ready {
            io.waker.take();
            return Poll::Ready(Woke::Ready(r));
        }
        let waker = match io.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => w,
            _ => cx.waker().clone(),
        };
        io.waker.set(Some(waker));
        Poll::Pending
    })
}

/// Writes what the socket takes now: how many bytes of `out`.
fn write_now(stream: &TcpStream, out: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < out.len() {
        match stream.try_write(&out[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes the rest of `out` as the socket takes it; false on a socket error, or when the core
/// aborts the connection while the peer is not taking the bytes (a plain `write_all` would wait
/// for it forever). While it waits the connection is not read: backpressure, counted like a
/// pause.
async fn write_rest(local: &Local, slot: usize, stream: &TcpStream, mut out: &[u8]) -> bool {
    // An abort flagged before the loop's turn began was taken there: look before waiting.
    if local.core.borrow().is_aborted(slot) {
        return false;
    }
    // The task reads nothing while it waits here: count it as a pause.
    local.core.borrow().note_paused();
    while !out.is_empty() {
        match stream.try_write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match wait(local, slot, stream, Some(Interest::WRITABLE)).await {
                    Woke::Ready(r) => {
                        if r.is_err() {
                            return false;
                        }
                    }
                    Woke::Flagged => {
                        if local.core.borrow().is_aborted(slot) {
                            return false;
                        }
                    }
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Presents the bytes the core left unconsumed again (an empty slice for none, which lets a
/// TLS connection go on with what it decrypted).
fn feed_leftover(local: &Rc<Local>, slot: usize, leftover: &mut Vec<u8>) {
    let consumed = local
        .core
        .borrow_mut()
        .input(slot, leftover, Instant::now());
    leftover.drain(..consumed.min(leftover.len()));
    if leftover.is_empty() && leftover.capacity() > 4096 {
        *leftover = Vec::new();
    }
    local.after_core_call();
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

/// How the shard-wide tasks are woken.
#[derive(Default)]
struct ShardWakers {
    /// Wakes the timer task when a deadline earlier than the one it sleeps for appears.
    timer_kick: Notify,
    /// The deadline the timer task sleeps for (`None`: it waits for a kick).
    timer_armed: Cell<Option<Instant>>,
    /// Wakes the flusher task (see [`flusher`]).
    flush_kick: Notify,
    /// Wakes the accept loop (and anything else that stops) at drain.
    draining: Notify,
}

/// Writes a commit to the shard's partition from this thread (a write to the page cache);
/// under `fsync = "batch"` only the fdatasync goes to a blocking thread, and the commit is
/// acknowledged when it returns. Meanwhile the shard serves its connections, and what they
/// report gathers for the next commit.
fn append(local: &Rc<Local>, commit: Commit) {
    let prepared = local.log.borrow_mut().prepare(&commit);
    let p = match prepared {
        Ok(Some(p)) => p,
        Ok(None) => {
            let mut core = local.core.borrow_mut();
            return core.committed(commit, Ok(()), Instant::now());
        }
        Err(e) => {
            local.log.borrow_mut().failed(&commit, &e);
            let mut core = local.core.borrow_mut();
            return core.committed(commit, Err(e), Instant::now());
        }
    };
    let written = ShardLog::write(&p, &commit);
    if written.is_err() || !p.sync {
        // `complete` logs a failure (rate-limited).
        let result = local.log.borrow_mut().complete(p, &commit, written);
        let mut core = local.core.borrow_mut();
        return core.committed(commit, result, Instant::now());
    }
    let local = Rc::clone(local);
    spawn_local(async move {
        let file = Arc::clone(&p.file);
        let synced = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        let result = local.log.borrow_mut().complete(p, &commit, synced);
        local
            .core
            .borrow_mut()
            .committed(commit, result, Instant::now());
        local.after_core_call();
    });
}

/// The shard's inbox: messages from other threads, until drained, every connection closed and
/// everything committed.
async fn inbox_loop(local: Rc<Local>, mut inbox: mpsc::UnboundedReceiver<Msg>) {
    let mut draining = false;
    loop {
        let msg = if draining {
            // Drained: wait for the last connections to flush their close frames and go, and
            // for the last commit.
            if local.core.borrow().is_done() {
                break;
            }
            tokio::select! {
                m = inbox.recv() => m,
                () = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        } else {
            inbox.recv().await
        };
        let Some(msg) = msg else { break };
        let drain = matches!(msg, ShardMsg::Drain);
        let reload = matches!(msg, ShardMsg::Reload { .. });
        let now = Instant::now();
        local.core.borrow_mut().on_message(msg, now);
        local.after_core_call();
        if reload {
            let id = local.core.borrow().id;
            local.shared.env.metrics.swapped(id, now.elapsed());
        }
        if drain {
            draining = true;
            local.wakers.draining.notify_waiters();
        }
    }
}

/// Starts a commit once this turn of the event loop has read every ready connection. Woken
/// after a read produced records, it runs once the tasks that are ready now have run (they are
/// ahead of it in the runtime's queue), so one commit carries the records of every connection
/// read in this turn, not one commit per read.
async fn flusher(local: Rc<Local>) {
    loop {
        local.wakers.flush_kick.notified().await;
        let now = Instant::now();
        {
            let mut core = local.core.borrow_mut();
            core.set_wall_clock(now, unix_ms());
            core.end_turn(now);
        }
        local.after_core_call();
    }
}

/// The shard's timers: every connection's deadline, the batch deadline, metrics publishing.
async fn timers(local: Rc<Local>) {
    loop {
        let deadline = local.core.borrow().poll_timeout();
        local.wakers.timer_armed.set(deadline);
        match deadline {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        let now = Instant::now();
                        {
                            let mut core = local.core.borrow_mut();
                            core.set_wall_clock(now, unix_ms());
                            core.on_timer(now);
                        }
                        local.after_core_call();
                    }
                    () = local.wakers.timer_kick.notified() => {}
                }
            }
            None => local.wakers.timer_kick.notified().await,
        }
    }
}

/// After a failed accept: count it, and back off when the process is out of descriptors (the
/// connection stays in the backlog; accepting again at once would spin).
async fn accept_backoff(local: &Local, e: &io::Error) {
    let metrics = &local.shared.env.metrics;
    metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    let pause = if out_of_fds {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(5)
    };
    let n = metrics.accept_errors.load(Ordering::Relaxed);
    let allowed = local.accept_warn.borrow_mut().allow(Instant::now());
    if let Some(suppressed) = allowed {
        let shard = local.core.borrow().id;
        tracing::warn!(
            shard,
            error = %e,
            total = n,
            suppressed,
            backoff_ms = pause.as_millis() as u64,
            "accept failed"
        );
    }
    tokio::time::sleep(pause).await;
}
