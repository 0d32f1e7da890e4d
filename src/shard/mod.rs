//! Shards: one thread per core, each with its own loop, its own `SO_REUSEPORT` listener, its
//! own connections and its own uplink log partition. Two drivers run the same sans-IO
//! [`core::ShardCore`]: io_uring and epoll (tokio current-thread), picked at start.
//!
//! A report never leaves its shard's thread: it is read, batched, written to the shard's log
//! partition ([`partition`]) and answered there. Threads only meet at [`mesh`] (an inbox into
//! each shard, for takeovers across shards, downlinks and drain), the ownership table
//! ([`crate::registry::Owners`], lock-free), shadows and metrics. A connection never moves
//! between shards: the kernel spreads new connections over the listeners. We chose not to
//! steal work: a device connection's cost is tiny and steady, so the balance the kernel's
//! reuseport hashing gives is good enough, and every connection stays on one thread with no
//! locks on its path.

pub(crate) mod core;
mod epoll;
pub(crate) mod mesh;
mod partition;
mod reload;
// The io_uring reactor's own unsafe (buffer lifetimes until completion) is argued block by
// block inside.
#[allow(unsafe_code)]
mod ring;
mod uring;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::IoMode;
use crate::limits::{Admission, AdmissionSettings};
use crate::metrics::Metrics;
use crate::protocol::Code;
use crate::registry::{DeviceId, Owners, Registry};
use crate::session::{self, Context, Downlink, DownlinkRequest, Outcome};
use crate::shadow::Shadows;
use crate::shard::core::{Env, Live, ShardCore, ShardMsg};
use crate::shard::mesh::{Mesh, Msg, Reply};
use crate::shard::partition::ShardLog;
use crate::sink::mqtt::{Forwarder, MqttOptions};
use crate::sink::nats::{Cluster, Forwarder as NatsForwarder, NatsOptions};
use crate::sink::Spool;
use crate::uplink::{partition_dir, LocalLog, LogOptions, Marks, OnFull, Outbox, UplinkError};

pub use reload::{ReloadError, ReloadReport, ReloadSource, Reloaded};

/// What the shards' threads and the API share.
pub(crate) struct Shared {
    pub(crate) env: Arc<Env>,
    pub(crate) mesh: Mesh,
    /// Every committed uplink record line, for `GET /v1/uplinks`; sent only while someone
    /// listens.
    pub(crate) uplink_feed: broadcast::Sender<Arc<str>>,
    pub(crate) draining: AtomicBool,
    pub(crate) log_stats: LogStats,
    /// With an external sink: what the shards and its forwarder share.
    pub(crate) spool: Option<Arc<Spool>>,
    /// With the NATS sink: this node's view of the cluster (set once its forwarder started).
    pub(crate) cluster: OnceLock<Arc<Cluster>>,
    /// The northbound API's connection counters (for `/metrics`).
    pub(crate) api_stats: crate::api::ApiStats,
    /// Where a reload reads its registry and TLS setup from; `None`: no reloads.
    pub(crate) reload_source: Option<ReloadSource>,
    /// One reload at a time.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The registry in force now (a reload may replace it; hold the `Arc` for one request).
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.env.registry()
    }

    /// Sends a downlink to the shard whose connection owns `device` and waits for its outcome:
    /// 109001 when the device is online nowhere, else whatever the session ends it with (the
    /// device's reply, 100006 at the timeout, 100008 when the connection is lost).
    pub(crate) async fn downlink(
        &self,
        device: DeviceId,
        request: DownlinkRequest,
        params: Vec<u8>,
    ) -> Outcome {
        let Some(conn) = self.env.owners.owner(device) else {
            // Online on another node of the cluster?
            if let Some(cluster) = self.cluster.get() {
                if cluster.remote_owner(device).is_some() {
                    let registry = self.registry();
                    let (pk, dn) = (registry.product_key(device), registry.device_name(device));
                    let limit = self.env.ctx().config.downlink_timeout + Duration::from_secs(2);
                    return cluster.downlink(pk, dn, &request, &params, limit).await;
                }
            }
            return Outcome::failed(Code::DeviceOffline);
        };
        let (reply, answer) = oneshot::channel();
        let msg = ShardMsg::Downlink {
            conn,
            downlink: Downlink {
                token: 0,
                device,
                request,
                params,
            },
            started: Instant::now(),
            reply,
        };
        if !self.mesh.send(conn.shard(), msg) {
            return Outcome::failed(Code::ServiceUnreachable);
        }
        // The session always completes a downlink; the margin only covers a shard that stopped
        // meanwhile.
        let limit = self.env.ctx().config.downlink_timeout + Duration::from_secs(2);
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => Outcome::failed(Code::ServiceUnreachable),
        }
    }
}

/// The uplink log's counters, over every partition; updated once per commit.
#[derive(Debug)]
pub(crate) struct LogStats {
    /// Bytes on disk, per partition.
    pub(crate) bytes: Box<[AtomicU64]>,
    /// Commits (one write, and one fsync under `fsync = "batch"`, each).
    pub(crate) writes: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Commits refused because the spool is full (`on_full = "block"`); also in `errors`.
    pub(crate) spool_full: AtomicU64,
}

impl LogStats {
    fn new(partitions: usize) -> Self {
        Self {
            bytes: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            writes: AtomicU64::new(0),
            records: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            spool_full: AtomicU64::new(0),
        }
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

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
    /// Device connections at once; lowered at start when the open-files limit cannot hold
    /// them next to the API's connections and the reserve (see [`fd_budget`]).
    pub max_connections: usize,
    /// The API's `max_connections`: file descriptors the device listener must leave to it.
    pub api_connections: usize,
    /// The process-wide limits: accept pacing, connections per IP, flapping.
    pub admission: AdmissionSettings,
    pub log: LogOptions,
    pub batch_max: usize,
    pub flush_delay: Duration,
    /// Echo every message instead of speaking Link: a conformance endpoint for the Autobahn
    /// suite on the real drivers. Never for production.
    pub echo: bool,
    /// TLS for `wss://`; `None` serves `ws://`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where uplinks go after the local log.
    pub sink: SinkOptions,
    /// Where `POST /v1/registry/reload` and SIGHUP read the registry and TLS setup again;
    /// `None` refuses reloads.
    pub reload: Option<ReloadSource>,
}

/// The external sink the local log is the outbox of, if any.
#[derive(Debug, Clone)]
pub enum SinkOptions {
    /// None: the log is the last stop.
    Local,
    /// An MQTT broker; `on_full` says what the log's caps do with what it has not acknowledged.
    Mqtt {
        mqtt: Box<MqttOptions>,
        on_full: OnFull,
    },
    /// A NATS JetStream cluster shared with other ringlink nodes.
    Nats {
        nats: Box<NatsOptions>,
        on_full: OnFull,
    },
}

/// The forwarder of the external sink, if any.
enum Forwarders {
    Mqtt(Forwarder),
    Nats(NatsForwarder),
}

/// A running gateway (without its API; see [`crate::api`]).
pub struct Server {
    pub listen_addr: SocketAddr,
    /// The driver in use: `"uring"` or `"epoll"`.
    pub driver: &'static str,
    /// Why that driver (for the start-up line), e.g. "io_uring refused: Operation not permitted".
    pub driver_reason: String,
    /// Device connections at once in effect: `max_connections`, or less when the open-files
    /// limit is lower (then `fd_note` says why).
    pub max_connections: usize,
    /// Set when the open-files limit lowered `max_connections`: the reason, for the start line.
    pub fd_note: Option<String>,
    pub(crate) shared: Arc<Shared>,
    shards: Vec<JoinHandle<io::Result<()>>>,
    forwarder: Option<Forwarders>,
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
    #[error("a shard could not set up its event loop: {0}")]
    Shard(io::Error),
    #[error("cannot start the uplink forwarder: {0}")]
    Forwarder(io::Error),
    #[error(
        "the open-files limit {limit} cannot hold api.max_connections = {api_connections} plus \
         {reserve} reserved descriptors and any device: raise `ulimit -n` or lower \
         api.max_connections"
    )]
    FdLimit {
        limit: usize,
        api_connections: usize,
        reserve: usize,
    },
}

impl Server {
    pub fn start(opts: ServerOptions) -> Result<Self, StartError> {
        let fd_limit = match raise_fd_limit() {
            Ok(limit) => limit,
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
                None
            }
        };
        let threads = opts.threads.max(1).min(usize::from(u8::MAX));
        let budget = fd_budget(
            opts.max_connections,
            opts.api_connections,
            threads,
            fd_limit,
        )?;
        if let Some(note) = &budget.note {
            tracing::warn!("{note}");
        }
        let max_connections = budget.max_connections;
        let (driver, driver_reason) = pick_driver(opts.io)?;
        let listeners = bind_listeners(opts.listen, threads, opts.backlog)?;
        let listen_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: opts.listen,
                source,
            })?;
        // Every partition opens (and recovers) before any shard starts; with an external sink,
        // each gets the marks it shares with the forwarder.
        let on_full = match &opts.sink {
            SinkOptions::Local => None,
            SinkOptions::Mqtt { on_full, .. } | SinkOptions::Nats { on_full, .. } => Some(*on_full),
        };
        let mut partitions = Vec::new();
        let logs = (0..threads)
            .map(|i| {
                let dir = partition_dir(&opts.log.dir, i);
                let outbox = on_full.map(|on_full| {
                    let marks = Arc::new(Marks::default());
                    partitions.push((dir.clone(), Arc::clone(&marks)));
                    Outbox { marks, on_full }
                });
                let part = LogOptions {
                    dir,
                    max_bytes: (opts.log.max_bytes / threads as u64).max(1),
                    outbox,
                    ..opts.log.clone()
                };
                LocalLog::open(part).map(|(log, _recovery)| log)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spool = on_full.map(|_| Arc::new(Spool::new(partitions)));
        let devices = opts.registry.id_bound();
        let (mesh, inboxes) = Mesh::new(threads);
        let read_buf_bytes = opts.session.limits.max_message_bytes + 64;
        let env = Arc::new(Env {
            live: std::sync::RwLock::new(Live {
                ctx: Arc::new(Context {
                    registry: opts.registry,
                    config: opts.session,
                }),
                tls: opts.tls,
            }),
            owners: Arc::new(Owners::new(devices)),
            metrics: Arc::new(Metrics::new(threads)),
            shadows: Arc::new(Shadows::new(devices)),
            max_connections,
            admission: Admission::new(&opts.admission, devices, Instant::now()),
            echo: opts.echo,
            batch_max: opts.batch_max,
            flush_delay: opts.flush_delay,
        });
        let shared = Arc::new(Shared {
            env,
            mesh,
            uplink_feed: broadcast::channel(4096).0,
            draining: AtomicBool::new(false),
            log_stats: LogStats::new(threads),
            spool,
            cluster: OnceLock::new(),
            api_stats: crate::api::ApiStats::default(),
            reload_source: opts.reload,
            reload_lock: tokio::sync::Mutex::new(()),
        });
        let mut shards = Vec::with_capacity(threads);
        let (ready, setups) = std::sync::mpsc::sync_channel(threads);
        let parts = listeners.into_iter().zip(inboxes).zip(logs).enumerate();
        for (i, ((listener, inbox), log)) in parts {
            let shared = Arc::clone(&shared);
            let ready = ready.clone();
            let name = format!("ringlink-shard-{i}");
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || -> io::Result<()> {
                    let run = ShardRun {
                        id: i as u8,
                        log: ShardLog::new(log, i, Arc::clone(&shared)),
                        shared,
                        listener,
                        inbox,
                        read_buf_bytes,
                        ready,
                    };
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match driver {
                            "uring" => uring::run(run),
                            _ => epoll::run(run),
                        }));
                    // A shard that cannot go on leaves its connections hanging: stop the process
                    // (what it acknowledged is in its log), so that a supervisor restarts it and
                    // devices reconnect, rather than serve on with a shard missing.
                    match result {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            tracing::error!(shard = i, error = %e, "shard stopped; exiting");
                            std::process::exit(70);
                        }
                        Err(_) => {
                            tracing::error!(shard = i, "shard panicked; exiting");
                            std::process::exit(70);
                        }
                    }
                })
                .map_err(StartError::Thread)?;
            shards.push(handle);
        }
        // Ready means ready: every shard has its ring or runtime (and their descriptors) before
        // the start line goes out, and a shard that cannot set up fails the start.
        drop(ready);
        for _ in 0..threads {
            match setups.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartError::Shard(e)),
                Err(_) => {
                    let gone = io::Error::other("a shard thread ended before it was set up");
                    return Err(StartError::Shard(gone));
                }
            }
        }
        let forwarder = match opts.sink {
            SinkOptions::Local => None,
            SinkOptions::Mqtt { mqtt, .. } => Some(Forwarders::Mqtt(
                Forwarder::start(Arc::clone(&shared), *mqtt).map_err(StartError::Forwarder)?,
            )),
            SinkOptions::Nats { nats, .. } => {
                let (forwarder, cluster) = NatsForwarder::start(Arc::clone(&shared), *nats)
                    .map_err(StartError::Forwarder)?;
                let _ = shared.cluster.set(cluster);
                Some(Forwarders::Nats(forwarder))
            }
        };
        Ok(Self {
            listen_addr,
            driver,
            driver_reason,
            max_connections,
            fd_note: budget.note,
            shared,
            shards,
            forwarder,
        })
    }

    /// Stops accepting, closes every connection with 1001 and commits what is batched; returns
    /// at once. [`Server::wait`] then returns when the shards are done.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        for shard in 0..self.shared.mesh.len() {
            self.shared.mesh.send(shard as u8, ShardMsg::Drain);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Waits for every shard to stop (after [`Server::drain`]; each commits everything it
    /// batched before it stops), then stops the API (which answers 503 on `/readyz` until
    /// then).
    pub fn wait(mut self, api: Option<crate::api::Api>) -> Result<(), UplinkError> {
        let mut result = Ok(());
        for handle in self.shards.drain(..) {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "shard stopped with an error");
                    result = Err(UplinkError::Closed);
                }
                Err(_) => {
                    tracing::error!("a shard thread panicked");
                    result = Err(UplinkError::Closed);
                }
            }
        }
        // Every record is committed now: the forwarder publishes what it can of the rest.
        match self.forwarder.take() {
            Some(Forwarders::Mqtt(f)) => f.stop(),
            Some(Forwarders::Nats(f)) => f.stop(),
            None => {}
        }
        if let Some(api) = api {
            api.stop();
        }
        result
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.env.metrics
    }
}

/// What one shard thread runs.
pub(crate) struct ShardRun {
    pub(crate) id: u8,
    pub(crate) log: ShardLog,
    pub(crate) shared: Arc<Shared>,
    pub(crate) listener: TcpListener,
    pub(crate) inbox: mpsc::UnboundedReceiver<Msg>,
    /// Receive buffer size: the largest frame plus its header.
    pub(crate) read_buf_bytes: usize,
    /// Where the driver says whether it set up its event loop (before it serves anything).
    pub(crate) ready: std::sync::mpsc::SyncSender<io::Result<()>>,
}

impl ShardRun {
    /// The shard's core, its wall clock anchored now.
    pub(crate) fn core<D>(&self) -> ShardCore<D, Reply> {
        ShardCore::new(
            self.id,
            Arc::clone(&self.shared.env),
            Instant::now(),
            unix_ms(),
        )
    }
}

/// How many device connections the open-files limit leaves room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBudget {
    /// Device connections at once: the configured cap, or what the limit leaves of it.
    pub max_connections: usize,
    /// Why the cap was lowered, when it was.
    pub note: Option<String>,
}

/// File descriptors ringlink holds besides device and API connections, per process. Measured
/// with `ls /proc/PID/fd` on an idle gateway (no sink): 16 (stdio, the API listener, the main
/// and API threads' runtimes: epoll, eventfds, the signal pipe). The rest is room for what
/// comes and goes: an external sink's sockets and its forwarder's runtime (about 6), the
/// registry reload and a TLS certificate re-read (a file at a time), and one descriptor for
/// accepting a connection that is then refused at the cap.
pub const FD_RESERVE_BASE: usize = 32;
/// ... and per shard: measured 6 with epoll (listener, epoll, eventfds, the open log segment)
/// and 4 with io_uring; 8 leaves room for the next log segment while rotating.
pub const FD_RESERVE_PER_SHARD: usize = 8;

/// Splits the open-files limit (`None`: unknown, no cap) between the device connections, the
/// API's and the reserve. The API's share is never given to devices, so that a flood of
/// device sockets cannot starve `/healthz` and a flood of API sockets cannot refuse devices.
/// When the limit cannot hold `max_connections` the device cap is lowered to what it can hold
/// (a warning says so); when it cannot hold the API and the reserve, ringlink refuses to start.
pub fn fd_budget(
    max_connections: usize,
    api_connections: usize,
    shards: usize,
    fd_limit: Option<u64>,
) -> Result<FdBudget, StartError> {
    let reserve = FD_RESERVE_BASE + FD_RESERVE_PER_SHARD * shards;
    let Some(limit) = fd_limit else {
        return Ok(FdBudget {
            max_connections,
            note: None,
        });
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let room = limit.saturating_sub(api_connections + reserve);
    if room == 0 {
        return Err(StartError::FdLimit {
            limit,
            api_connections,
            reserve,
        });
    }
    if room >= max_connections {
        return Ok(FdBudget {
            max_connections,
            note: None,
        });
    }
    Ok(FdBudget {
        max_connections: room,
        note: Some(format!(
            "device connections capped at {room} (limits.max_connections = {max_connections}): \
             the open-files limit {limit} holds {room} devices + {api_connections} API \
             connections (api.max_connections) + {reserve} reserved; raise `ulimit -Hn` or \
             lower a max_connections"
        )),
    })
}

/// Raises the soft limit on open files to the hard limit: every device connection is a socket,
/// and many systems start processes at a soft limit of 1024. Returns the soft limit now in
/// effect (`None`: unlimited).
// The one libc call ringlink makes directly; no safe wrapper in the dependencies offers it.
#[allow(unsafe_code)]
fn raise_fd_limit() -> io::Result<Option<u64>> {
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
    Ok((lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur))
}

/// Chooses the driver; with `Auto`, probes io_uring by creating a small ring the way the
/// shards do, and says which setup the kernel accepted.
fn pick_driver(mode: IoMode) -> Result<(&'static str, String), StartError> {
    let probe = || {
        let cfg = ring::RingConfig {
            entries: 8,
            buffers: 1,
            buffer_size: 64,
            ..ring::RingConfig::default()
        };
        ring::Ring::new(cfg).map(|r| r.setup_mode())
    };
    match mode {
        IoMode::Epoll => Ok(("epoll", "chosen with --io epoll".into())),
        IoMode::Uring => match probe() {
            Ok(setup) => Ok(("uring", format!("chosen with --io uring; {setup}"))),
            Err(e) => Err(StartError::UringRefused(e)),
        },
        IoMode::Auto => match probe() {
            Ok(setup) => Ok(("uring", format!("io_uring available; {setup}"))),
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

/// Wall-clock milliseconds since the Unix epoch: what drivers anchor their core's clock with
/// (the core itself reads no clock).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The log directory under a data dir.
pub fn log_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("uplink")
}

/// Runs a gateway until SIGINT or SIGTERM: starts the shards and the API, calls `on_ready`
/// (which prints the start line), reloads the registry on each SIGHUP (see [`reload`]), then
/// on SIGINT or SIGTERM stops accepting, answers `/readyz` 503,
/// closes every connection with 1001, flushes and persists the uplink batches, and returns.
pub fn serve(
    opts: ServerOptions,
    api: crate::api::ApiOptions,
    on_ready: impl FnOnce(&Server, &crate::api::Api),
) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Signals are caught from before the start line on, so an early SIGTERM drains too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Signal)?;
    let (mut term, mut int, mut hup) = rt
        .block_on(async {
            Ok((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ))
        })
        .map_err(ServeError::Signal)?;
    let server = Server::start(opts)?;
    let api_listen = api.listen;
    let api = crate::api::Api::start(&server, api).map_err(|source| ServeError::Api {
        addr: api_listen,
        source,
    })?;
    on_ready(&server, &api);
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                // The same reload as POST /v1/registry/reload; its outcome is logged there.
                _ = hup.recv() => {
                    let _ = server.shared.reload().await;
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_budget_keeps_the_api_share_and_the_reserve_from_devices() {
        let reserve = FD_RESERVE_BASE + 2 * FD_RESERVE_PER_SHARD;
        // Room for everything: the cap stands, no note.
        let b = fd_budget(1_000, 1_024, 2, Some(100_000)).expect("fits");
        assert_eq!(
            b,
            FdBudget {
                max_connections: 1_000,
                note: None
            }
        );
        // Unknown (unlimited) limit: the cap stands.
        assert_eq!(fd_budget(7, 1, 1, None).expect("ok").max_connections, 7);
        // 20000 open files: devices get what the API and the reserve leave, and a note says so.
        let b = fd_budget(100_000, 1_024, 2, Some(20_000)).expect("lowered");
        assert_eq!(b.max_connections, 20_000 - 1_024 - reserve);
        let note = b.note.expect("note");
        assert!(
            note.contains("capped at") && note.contains("20000"),
            "{note}"
        );
        // Exactly full still starts with one device.
        let b = fd_budget(10, 4, 2, Some((4 + reserve + 1) as u64)).expect("one");
        assert_eq!(b.max_connections, 1);
        // No room for a single device: refuse.
        let e = fd_budget(10, 4, 2, Some((4 + reserve) as u64)).expect_err("refused");
        assert!(e.to_string().contains("api.max_connections"), "{e}");
    }
}
