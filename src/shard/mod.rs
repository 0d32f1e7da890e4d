//! Shards: one thread per core, each with its own runtime, its own `SO_REUSEPORT` listener and
//! its own connections. Two drivers run the same [`core::ShardCore`]: io_uring (tokio-uring)
//! and epoll (tokio current-thread), picked at start.
//!
//! Threads only meet at [`mesh`] (a channel into each shard), the ownership table
//! ([`crate::registry::Owners`]), the uplink writer thread and a few atomics. A connection never
//! moves between shards: the kernel spreads new connections over the listeners, and work that
//! belongs to a connection (a takeover notice, a downlink, an ack) is sent to its shard. We
//! chose not to steal work: a device connection's cost is tiny and steady, so the balance the
//! kernel's reuseport hashing gives is good enough, and every connection stays on one thread
//! with no locks on its path.

pub(crate) mod core;
mod epoll;
pub(crate) mod mesh;
// The hand-written io_uring reactor. Not used by a driver yet: the shard core being rewritten
// will plug it in as the io_uring driver; drop this `dead_code` allow then. Its own unsafe
// (buffer lifetimes until completion) is argued block by block inside.
#[allow(dead_code)]
#[allow(unsafe_code)]
pub(crate) mod ring;
mod uring;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::config::IoMode;
use crate::metrics::Metrics;
use crate::registry::{Owners, Registry};
use crate::session::{self, Context};
use crate::shadow::Shadows;
use crate::shard::core::{ShardCore, Shared};
use crate::shard::mesh::{AckRef, Mesh, ShardMsg};
use crate::uplink::{LocalLog, LogOptions, UplinkError, Writer};

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub registry: Arc<Registry>,
    pub session: session::Config,
    pub listen: SocketAddr,
    pub backlog: u32,
    /// Shards; at least 1.
    pub threads: usize,
    pub io: IoMode,
    pub max_connections: usize,
    pub log: LogOptions,
    pub batch_max: usize,
    pub flush_delay: Duration,
    /// Echo every message instead of speaking Link: a conformance endpoint for the Autobahn
    /// suite on the real drivers. Never for production.
    pub echo: bool,
    /// TLS for `wss://`; `None` serves `ws://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A running gateway (without its API; see [`crate::api`]).
pub struct Server {
    pub listen_addr: SocketAddr,
    /// The driver in use: `"uring"` or `"epoll"`.
    pub driver: &'static str,
    /// Why that driver (for the start-up line), e.g. "io_uring refused: Operation not permitted".
    pub driver_reason: String,
    pub(crate) shared: Arc<Shared>,
    shards: Vec<JoinHandle<io::Result<()>>>,
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("io_uring is not available: {0}")]
    UringRefused(io::Error),
    #[error("uplink log: {0}")]
    Log(#[from] UplinkError),
    #[error("cannot start shard thread: {0}")]
    Thread(io::Error),
}

impl Server {
    pub fn start(opts: ServerOptions) -> Result<Self, StartError> {
        if let Err(e) = raise_fd_limit() {
            eprintln!("ringlink: cannot raise the open-files limit: {e}");
        }
        let threads = opts.threads.max(1).min(usize::from(u8::MAX));
        let (driver, driver_reason) = pick_driver(opts.io)?;
        let listeners = bind_listeners(opts.listen, threads, opts.backlog)?;
        let listen_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: opts.listen,
                source,
            })?;
        let (log, _recovery) = LocalLog::open(opts.log.clone())?;
        let writer = Writer::spawn(Box::new(log), WRITER_QUEUE);
        let devices = opts.registry.len();
        let (mesh, inboxes) = Mesh::new(threads);
        let read_buf_bytes = opts.session.limits.max_message_bytes + 64;
        let shared = Arc::new(Shared {
            ctx: Arc::new(Context {
                registry: opts.registry,
                config: opts.session,
            }),
            owners: Arc::new(Owners::new(devices)),
            mesh,
            writer,
            metrics: Arc::new(Metrics::new(threads)),
            shadows: Arc::new(Shadows::new(devices)),
            uplink_feed: broadcast::channel(4096).0,
            draining: Default::default(),
            max_connections: opts.max_connections,
            echo: opts.echo,
            tls: opts.tls,
            batch_max: opts.batch_max,
            flush_delay: opts.flush_delay,
        });
        let mut shards = Vec::with_capacity(threads);
        for (i, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
            let shared = Arc::clone(&shared);
            let name = format!("ringlink-shard-{i}");
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || -> io::Result<()> {
                    let id = i as u8;
                    match driver {
                        "uring" => uring::run(ShardRun {
                            core: ShardCore::new(id, shared),
                            listener,
                            inbox,
                            read_buf_bytes,
                        }),
                        _ => epoll::run(ShardRun {
                            core: ShardCore::new(id, shared),
                            listener,
                            inbox,
                            read_buf_bytes,
                        }),
                    }
                })
                .map_err(StartError::Thread)?;
            shards.push(handle);
        }
        Ok(Self {
            listen_addr,
            driver,
            driver_reason,
            shared,
            shards,
        })
    }

    /// Stops accepting, closes every connection with 1001 and flushes uplinks; returns at once.
    /// [`Server::wait`] then returns when the shards are done.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        for shard in 0..self.shared.mesh.len() {
            self.shared.mesh.send(shard as u8, ShardMsg::Drain);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Waits for every shard to stop (after [`Server::drain`]), stops the API (which answers
    /// 503 on `/readyz` until then), then waits for the writer to write everything queued.
    pub fn wait(self, api: Option<crate::api::Api>) -> Result<(), UplinkError> {
        for handle in self.shards {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("ringlink: shard stopped with an error: {e}"),
                Err(_) => eprintln!("ringlink: a shard thread panicked"),
            }
        }
        if let Some(api) = api {
            api.stop();
        }
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared.writer.shutdown(),
            Err(_) => Err(UplinkError::Closed),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }
}

/// Batches the writer thread may hold queued before shards keep them back.
const WRITER_QUEUE: usize = 1024;

/// What one shard thread runs.
pub(crate) struct ShardRun<D> {
    pub(crate) core: ShardCore<D>,
    pub(crate) listener: TcpListener,
    pub(crate) inbox: mpsc::UnboundedReceiver<ShardMsg>,
    /// Receive buffer size: the largest frame plus its header.
    pub(crate) read_buf_bytes: usize,
}

/// How the shard-wide tasks are woken; one per shard, the same for both drivers.
#[derive(Default)]
pub(crate) struct ShardWakers {
    /// Wakes the timer task when a deadline earlier than the one it sleeps for appears.
    timer_kick: Notify,
    /// The deadline the timer task sleeps for (`None`: it waits for a kick).
    timer_armed: Cell<Option<Instant>>,
    /// Wakes the flusher task (see [`flusher`]).
    flush_kick: Notify,
    /// Wakes the accept loop (and anything else that stops) at drain.
    pub(crate) draining: Notify,
}

/// What the shard-wide tasks need from a driver's per-shard state.
pub(crate) trait ShardLocal<D>: 'static {
    fn core(&self) -> &RefCell<ShardCore<D>>;
    fn wakers(&self) -> &ShardWakers;
    /// After any call into the core: act on the connections it flagged, then
    /// [`kick_tasks`](Self::kick_tasks).
    fn after_core_call(self: &Rc<Self>);

    /// Wakes the timer task if the core now has a deadline earlier than the one it sleeps for
    /// (most calls into the core, a read or a commit, leave the earliest deadline where it was,
    /// and waking the task for those would cost a task switch and a timer re-arm each time),
    /// and the flusher if records wait for it.
    fn kick_tasks(&self) {
        let w = self.wakers();
        let core = self.core().borrow();
        let next = core.next_deadline();
        if next.is_some_and(|n| w.timer_armed.get().is_none_or(|armed| n < armed)) {
            w.timer_kick.notify_one();
        }
        if core.flush_wanted() {
            w.flush_kick.notify_one();
        }
    }
}

/// The shard's inbox: messages from other threads, until drained and every connection closed.
pub(crate) async fn inbox_loop<D, L: ShardLocal<D>>(
    local: Rc<L>,
    mut inbox: mpsc::UnboundedReceiver<ShardMsg>,
) {
    let mut draining = false;
    loop {
        let msg = if draining {
            // Drained: wait for the last connections to flush their close frames and go.
            if local.core().borrow().len() == 0 {
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
        local.core().borrow_mut().on_message(msg, Instant::now());
        local.after_core_call();
        if drain {
            draining = true;
            local.wakers().draining.notify_waiters();
        }
    }
    local
        .core()
        .borrow_mut()
        .flush_uplinks(Instant::now(), true);
}

/// Hands the shard's uplink records to the writer when none of its batches is there. Woken
/// after a read produced records, it runs once the tasks that are ready now have run (they are
/// ahead of it in the runtime's queue), so one batch carries the records of every connection
/// read in this turn of the event loop, not one batch per read: at moderate load that is what
/// keeps the trips to the writer thread, and their context switches, few.
pub(crate) async fn flusher<D, L: ShardLocal<D>>(local: Rc<L>) {
    loop {
        local.wakers().flush_kick.notified().await;
        let flushed = {
            let mut core = local.core().borrow_mut();
            let wanted = core.flush_wanted();
            if wanted {
                core.flush_uplinks(Instant::now(), true);
            }
            wanted
        };
        if flushed {
            local.after_core_call();
        }
    }
}

/// The shard's timers: every connection's deadline and the uplink batch deadline.
pub(crate) async fn timers<D, L: ShardLocal<D>>(local: Rc<L>) {
    loop {
        let deadline = local.core().borrow().next_deadline();
        local.wakers().timer_armed.set(deadline);
        match deadline {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {
                        local.core().borrow_mut().on_timer(Instant::now());
                        local.after_core_call();
                    }
                    () = local.wakers().timer_kick.notified() => {}
                }
            }
            None => local.wakers().timer_kick.notified().await,
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every device connection is a socket,
/// and many systems start processes at a soft limit of 1024.
// The one libc call ringlink makes directly; no safe wrapper in the dependencies offers it.
#[allow(unsafe_code)]
fn raise_fd_limit() -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, which we own and which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads `lim`, which we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Chooses the driver; with `Auto`, probes io_uring by creating a small ring.
fn pick_driver(mode: IoMode) -> Result<(&'static str, String), StartError> {
    let probe = || io_uring::IoUring::new(8).map(drop);
    match mode {
        IoMode::Epoll => Ok(("epoll", "chosen with --io epoll".into())),
        IoMode::Uring => match probe() {
            Ok(()) => Ok(("uring", "chosen with --io uring".into())),
            Err(e) => Err(StartError::UringRefused(e)),
        },
        IoMode::Auto => match probe() {
            Ok(()) => Ok(("uring", "io_uring available".into())),
            Err(e) => Ok(("epoll", format!("io_uring refused ({e}), falling back"))),
        },
    }
}

/// One `SO_REUSEPORT` listener per shard on the same address; with port 0 the first picks the
/// port and the others join it.
fn bind_listeners(
    addr: SocketAddr,
    n: usize,
    backlog: u32,
) -> Result<Vec<TcpListener>, StartError> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let listener =
            bind_one(addr, backlog).map_err(|source| StartError::Listen { addr, source })?;
        if addr.port() == 0 {
            addr = listener
                .local_addr()
                .map_err(|source| StartError::Listen { addr, source })?;
        }
        out.push(listener);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// After a failed accept: count it, and back off when the process is out of descriptors (the
/// connection stays in the backlog; accepting again at once would spin).
pub(crate) async fn accept_backoff(shared: &Shared, e: &io::Error) {
    shared.metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    let pause = if out_of_fds {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(5)
    };
    let n = shared.metrics.accept_errors.load(Ordering::Relaxed);
    if n.is_power_of_two() {
        eprintln!("ringlink: accept failed ({e}); {n} accept errors so far, backing off {pause:?}");
    }
    tokio::time::sleep(pause).await;
}

/// The log directory under a data dir.
pub fn log_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("uplink")
}

/// `AckRef` must stay `Send` for the writer thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<AckRef>();
};

/// Runs a gateway until SIGINT or SIGTERM: starts the shards and the API, calls `on_ready`
/// (which prints the start line), then on the signal stops accepting, answers `/readyz` 503,
/// closes every connection with 1001, flushes and persists the uplink batches, and returns.
pub fn serve(
    opts: ServerOptions,
    api_listen: SocketAddr,
    on_ready: impl FnOnce(&Server, &crate::api::Api),
) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Signals are caught from before the start line on, so an early SIGTERM drains too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Signal)?;
    let (mut term, mut int) = rt
        .block_on(async {
            Ok((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(ServeError::Signal)?;
    let server = Server::start(opts)?;
    let api = crate::api::Api::start(&server, api_listen).map_err(|source| ServeError::Api {
        addr: api_listen,
        source,
    })?;
    on_ready(&server, &api);
    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    server.drain();
    server.wait(Some(api))?;
    Ok(())
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot serve the API on {addr}: {source}")]
    Api { addr: SocketAddr, source: io::Error },
    #[error("cannot wait for signals: {0}")]
    Signal(io::Error),
    #[error("uplink log at shutdown: {0}")]
    Flush(#[from] UplinkError),
}
