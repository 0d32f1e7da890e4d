//! The shard core: everything a shard does above its sockets, as a deterministic state machine.
//!
//! Owns: the shard's connection table (a session per connection, plus the driver's own per-
//! connection handle `D`), its uplink batcher and the commit in flight, the downlinks waiting
//! for an answer (each with the caller's opaque reply handle `R`), every connection's timer,
//! and the shard's counters. It applies session events to the shared world: ownership (the
//! atomic [`Owners`] table; takeover notices for other shards), uplink records into batches,
//! acks back to sessions after the commit, shadows, metrics.
//!
//! Never: a socket, a file, a channel, a thread or a clock. Like quinn-proto's `Endpoint`,
//! events and time come in and actions go out:
//!
//! ```text
//!   driver ──accept / input / disconnect / on_message / on_timer / end_turn / committed──▶ core
//!   driver ◀── take_ready: connections to write, shut or resume reading ─────────────────── core
//!   driver ◀── poll_action: Send(shard, msg) | Answer(reply, outcome) | Append(commit) ──── core
//! ```
//!
//! A driver reads bytes and calls [`ShardCore::input`], writes what [`ShardCore::transmit`]
//! gives it for every connection [`ShardCore::take_ready`] names, closes what
//! [`ShardCore::is_closed`] says is closed, drops what [`ShardCore::is_aborted`] says, and
//! calls [`ShardCore::disconnect`] when a socket is gone. It performs every [`Action`]: an
//! [`Action::Append`] is written to the shard's own log partition, after which the driver
//! calls [`ShardCore::committed`], and only then are the devices answered.
//!
//! Group commit: at most one commit is in flight. The driver calls [`ShardCore::end_turn`]
//! once it has fed in everything that was ready in one turn of its loop; with no commit in
//! flight, everything batched so far goes out as one. While one is in flight, records gather
//! and go out together as soon as it is committed: batching costs latency only when there is
//! load to batch.
//!
//! Time: `now: Instant` is passed into every call; uplink records carry wall-clock
//! milliseconds derived from the last [`ShardCore::set_wall_clock`] and `now`.
//!
//! Logs: the core emits `tracing` events (a side effect that changes none of its state), so
//! both drivers log alike. A connection's debug events (accepted, closed with its reason and
//! close code, device online, offline, taken over) are emitted inside a `conn` span with its
//! `shard`, `slot` and `peer` (and `device`, for a device's). No span is kept per connection:
//! one is built around an event only after the `debug` level check passed, so with debug off a
//! connection costs no byte and no time more (see [`crate::logging`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::Level;

use crate::limits::{self, Admission, Verdict};
use crate::logging::RateLimit;
use crate::metrics::{Limit, Metrics};
use crate::protocol::Code;
use crate::registry::{ConnRef, DeviceId, Owners, Registry};
use crate::session::{
    AckToken, CloseReason, Context, Downlink, Event, Outcome, Presence, Session, ShardState,
    UplinkKind,
};
use crate::shadow::Shadows;
use crate::uplink::{self, Batch, Batcher, Record, RecordBody, UplinkError};
use crate::ws;

/// What every shard (and the API) shares: read-mostly configuration and lock-free tables.
pub(crate) struct Env {
    /// The registry (with the session settings) and TLS configuration in force: replaced by a
    /// reload, read by the API and the forwarders ([`Env::ctx`]). A shard reads it once, at
    /// start; later ones reach it through [`ShardMsg::Reload`] and it keeps its own copy.
    pub(crate) live: RwLock<Live>,
    pub(crate) owners: Arc<Owners>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shadows: Arc<Shadows>,
    pub(crate) max_connections: usize,
    /// The process-wide limits: accept pacing, connections per IP, flapping.
    pub(crate) admission: Admission,
    /// Connections echo instead of speaking Link (`serve --echo`, for Autobahn).
    pub(crate) echo: bool,
    pub(crate) batch_max: usize,
    pub(crate) flush_delay: Duration,
}

/// The registry and TLS setup in force, swapped whole by a reload.
#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) ctx: Arc<Context>,
    /// Set for `wss://`.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl Env {
    /// The context in force now (registry and session settings).
    pub(crate) fn ctx(&self) -> Arc<Context> {
        Arc::clone(&self.live().ctx)
    }

    /// The registry in force now.
    pub(crate) fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.live().ctx.registry)
    }

    pub(crate) fn live(&self) -> Live {
        // Writers only assign a whole `Live`, so a poisoned lock still holds a consistent one.
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_live(&self, live: Live) {
        *self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = live;
    }
}

/// A new registry (and TLS setup) for a shard to swap in; see [`ShardMsg::Reload`].
pub(crate) struct Swap {
    pub(crate) live: Live,
    /// Devices the reload removed (retired ids): those online on this shard go offline.
    pub(crate) removed: Vec<DeviceId>,
}

/// An uplink waiting for its commit, and the reply it unblocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AckRef {
    pub(crate) conn: ConnRef,
    pub(crate) token: AckToken,
    /// When the message behind it was read (the turn's time): the start of its ack latency.
    pub(crate) arrived: Instant,
}

/// A message to a shard from another thread (another shard, or the API).
pub(crate) enum ShardMsg<R> {
    /// Another connection took `device` over from `conn`.
    TakenOver { conn: ConnRef, device: DeviceId },
    /// A downlink for the device owned by `conn`; its outcome goes to `reply`.
    Downlink {
        conn: ConnRef,
        downlink: Downlink,
        started: Instant,
        reply: R,
    },
    /// Stop accepting, close every connection with 1001, commit what is batched.
    Drain,
    /// Swap in a reloaded registry and TLS setup at this turn; answer `reply` (success) once
    /// swapped.
    Reload { swap: Arc<Swap>, reply: R },
}

/// What the core asks its driver to do.
pub(crate) enum Action<R> {
    /// Deliver `msg` to shard `shard` (never this one).
    Send { shard: u8, msg: ShardMsg<R> },
    /// A downlink is over: hand `outcome` to whoever waits on `reply`.
    Answer { reply: R, outcome: Outcome },
    /// Write these batches to the shard's log partition as one append, then call
    /// [`ShardCore::committed`] with the commit and the result.
    Append(Commit),
}

/// Batches on their way to the log, in order; handed back to [`ShardCore::committed`].
#[derive(Debug)]
pub(crate) struct Commit {
    pub(crate) batches: Vec<Batch<AckRef>>,
    /// When it was handed to the driver: the start of its records' wait for the log.
    pub(crate) started: Instant,
}

impl Commit {
    /// The encoded record lines of each batch, in order.
    pub(crate) fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.batches.iter().map(|b| b.bytes.as_slice())
    }

    pub(crate) fn records(&self) -> usize {
        self.batches.iter().map(|b| b.records).sum()
    }
}

/// The router's answers to a session: whether a device is online anywhere (auto-online), and
/// whether it may come online now (flapping, process-wide).
struct OwnersPresence(Arc<Env>);

impl Presence for OwnersPresence {
    fn is_online(&self, device: DeviceId) -> bool {
        self.0.owners.owner(device).is_some()
    }

    fn admit_online(&self, device: DeviceId, now: Instant) -> bool {
        let flapping = &self.0.admission.flapping;
        let Verdict::Refused { until, started } = flapping.online(device, now) else {
            return true;
        };
        self.0.metrics.limited(Limit::Flapping);
        if started {
            if let (Some(held), Some(rule)) = (flapping.log_gate(now), flapping.rule()) {
                let r = self.0.registry();
                tracing::warn!(
                    product_key = r.product_key(device),
                    device_name = r.device_name(device),
                    ban_ms = until.saturating_duration_since(now).as_millis() as u64,
                    "device flapping: more than {} onlines in {} ms, its onlineDevice is \
                     refused with 109000 until the ban ends ({held} more ban lines held back)",
                    rule.max,
                    rule.window.as_millis(),
                );
            }
        }
        false
    }
}

/// What runs on a connection: the Link protocol, or (for conformance testing) an echo.
// Link is every production connection; boxing it would cost an allocation and an indirection
// on the hot path to save memory only in the test-only echo mode.
#[allow(clippy::large_enum_variant)]
enum Machine {
    Link(Session),
    Echo(ws::Echo),
}

impl Machine {
    fn input(&mut self, input: &mut [u8], now: Instant, state: &mut ShardState) -> usize {
        match self {
            Self::Link(s) => s.handle_input(input, now, state),
            Self::Echo(e) => e.handle_input(input),
        }
    }

    fn transmit(&mut self, out: &mut Vec<u8>) -> bool {
        match self {
            Self::Link(s) => s.poll_transmit(out),
            Self::Echo(e) => e.poll_transmit(out),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::Link(s) => s.is_closed(),
            Self::Echo(e) => e.is_closed(),
        }
    }

    fn has_transmit(&self) -> bool {
        match self {
            Self::Link(s) => s.has_transmit(),
            Self::Echo(e) => e.has_transmit(),
        }
    }

    fn wants_input(&self) -> bool {
        match self {
            Self::Link(s) => s.wants_input(),
            Self::Echo(e) => e.wants_input(),
        }
    }

    fn wanted_bytes(&self) -> usize {
        match self {
            Self::Link(s) => s.wanted_bytes(),
            Self::Echo(e) => e.wanted_bytes(),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Link(s) => s.poll_timeout(),
            Self::Echo(_) => None,
        }
    }

    fn is_rate_paused(&self) -> bool {
        match self {
            Self::Link(s) => s.is_rate_paused(),
            Self::Echo(_) => false,
        }
    }

    fn shutdown(&mut self) {
        match self {
            Self::Link(s) => s.shutdown(),
            Self::Echo(e) => e.shutdown(),
        }
    }

    fn link(&mut self) -> Option<&mut Session> {
        match self {
            Self::Link(s) => Some(s),
            Self::Echo(_) => None,
        }
    }
}

/// A TLS connection's state between the socket and the machine.
struct Tls {
    conn: rustls::ServerConnection,
    /// Decrypted bytes the machine has not consumed yet (an incomplete frame).
    plain: Vec<u8>,
    /// A TLS error ended the connection (the alert is queued for sending).
    failed: bool,
}

/// One connection of the shard.
pub(crate) struct Conn<D> {
    machine: Machine,
    /// Set for `wss://` connections.
    tls: Option<Box<Tls>>,
    me: ConnRef,
    peer: SocketAddr,
    /// The deadline registered in `ShardCore::timers` for this connection. Once the
    /// connection is closed (`lingering`), the only one: when the driver must stop trying to
    /// flush it (see [`ShardCore::is_aborted`]).
    timer: Option<Instant>,
    lingering: bool,
    aborted: bool,
    /// In `ShardCore::ready` already.
    flagged: bool,
    /// The driver's handle for this connection (a waker, the stream, ...).
    pub(crate) io: D,
}

impl<D> Conn<D> {
    /// The session ended, or TLS failed: the driver flushes what is left, then closes.
    fn is_closed(&self) -> bool {
        self.machine.is_closed() || self.tls.as_ref().is_some_and(|t| t.failed)
    }
}

/// A downlink waiting for the device.
struct Waiter<R> {
    reply: R,
    started: Instant,
    method: crate::protocol::ServerMethod,
}

pub(crate) struct ShardCore<D, R> {
    pub(crate) id: u8,
    env: Arc<Env>,
    /// The registry and settings this shard's sessions use; replaced by [`ShardMsg::Reload`].
    ctx: Arc<Context>,
    /// TLS for new `wss://` connections; replaced by [`ShardMsg::Reload`].
    tls: Option<Arc<rustls::ServerConfig>>,
    state: ShardState,
    /// Boxed: a slab doubles its capacity, and a few hundred bytes per empty slot would add
    /// up to more than the connections themselves at tens of thousands of sockets.
    conns: Slab<Box<Conn<D>>>,
    generation: u32,
    batcher: Batcher<AckRef>,
    /// A commit is with the driver and not acknowledged yet (at most one).
    committing: bool,
    /// Full batches taken while a commit was in flight; they go with the next commit.
    queued: Vec<Batch<AckRef>>,
    /// The last commit's vector, reused.
    spare_commit: Vec<Batch<AckRef>>,
    waiters: HashMap<u64, Waiter<R>>,
    next_token: u64,
    timers: BTreeSet<(Instant, usize)>,
    ready: Vec<usize>,
    actions: std::collections::VecDeque<Action<R>>,
    draining: bool,
    /// Drain has closed every connection.
    closed_all: bool,
    /// Plaintext of a TLS connection's transmit, before encryption; reused.
    tls_scratch: Vec<u8>,
    /// Wall-clock milliseconds at `wall_anchor.0` (see [`ShardCore::set_wall_clock`]).
    wall_anchor: (Instant, u64),
    /// When this shard publishes its counters next, if they changed.
    next_publish: Instant,
    stats_dirty: bool,
    /// Connections refused at `max_connections` come in floods.
    refused_warn: RateLimit,
    /// Set by `accept` when the process is over its accept rate: the driver stops accepting
    /// until then ([`ShardCore::take_accept_pause`]).
    accept_pause: Option<Instant>,
    /// One rate-limited log line per limit and shard: message rate, accept rate, per IP.
    log_gates: [RateLimit; 3],
}

impl<D, R> ShardCore<D, R> {
    /// A shard with no connections; `now` and `wall_ms` anchor the wall clock.
    pub(crate) fn new(id: u8, env: Arc<Env>, now: Instant, wall_ms: u64) -> Self {
        let presence = Arc::new(OwnersPresence(Arc::clone(&env)));
        let Live { ctx, tls } = env.live();
        Self {
            id,
            ctx,
            tls,
            batcher: Batcher::new(env.batch_max, env.flush_delay),
            env,
            state: ShardState::new(presence),
            conns: Slab::new(),
            generation: 0,
            committing: false,
            queued: Vec::new(),
            spare_commit: Vec::new(),
            waiters: HashMap::new(),
            next_token: 0,
            timers: BTreeSet::new(),
            ready: Vec::new(),
            actions: std::collections::VecDeque::new(),
            draining: false,
            closed_all: false,
            tls_scratch: Vec::new(),
            wall_anchor: (now, wall_ms),
            next_publish: now,
            stats_dirty: false,
            refused_warn: RateLimit::warnings(),
            accept_pause: None,
            log_gates: std::array::from_fn(|_| limits::log_gate()),
        }
    }

    /// The wall clock reads `wall_ms` at `now`. Records are stamped with the anchor plus the
    /// monotonic time since, so the driver re-anchors now and then (once per loop turn is
    /// plenty) and a stepped system clock is followed at the next anchor.
    pub(crate) fn set_wall_clock(&mut self, now: Instant, wall_ms: u64) {
        self.wall_anchor = (now, wall_ms);
    }

    fn wall_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.wall_anchor;
        ms + now.saturating_duration_since(at).as_millis() as u64
    }

    /// The next thing the driver must do, in the order the core decided it.
    pub(crate) fn poll_action(&mut self) -> Option<Action<R>> {
        self.actions.pop_front()
    }

    /// A new connection from `peer`; None when the process is at `max_connections`, `peer`'s
    /// address at `max_connections_per_ip`, or draining (the driver drops the socket). Every
    /// connection taken from the kernel counts against the accept rate, served or not; when
    /// the next would be over it, [`take_accept_pause`](Self::take_accept_pause) says until
    /// when the driver must stop accepting.
    pub(crate) fn accept(&mut self, peer: SocketAddr, now: Instant, io: D) -> Option<usize> {
        if self.draining {
            return None;
        }
        if let Some(until) = self.env.admission.pacer.admit(now) {
            self.env.metrics.limited(Limit::AcceptRate);
            self.accept_pause = Some(self.accept_pause.map_or(until, |t| t.max(until)));
            if let Some(held) = self.log_gates[1].allow(now) {
                tracing::warn!(
                    shard = self.id,
                    "over limits.max_new_connections_per_s: accepting paused for {} ms, new \
                     connections wait in the backlog ({held} more pauses not logged)",
                    until.saturating_duration_since(now).as_millis()
                );
            }
        }
        let m = &self.env.metrics;
        let open = m.connections_open.fetch_add(1, Ordering::Relaxed);
        if open as usize >= self.env.max_connections || self.conns.len() >= ConnRef::MAX_SLOT {
            m.connections_open.fetch_sub(1, Ordering::Relaxed);
            m.connections_rejected.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.refused_warn.allow(now) {
                tracing::warn!(
                    shard = self.id,
                    peer = %peer,
                    max_connections = self.env.max_connections,
                    suppressed,
                    "connection refused: at max_connections"
                );
            }
            return None;
        }
        if !self.env.admission.per_ip.try_add(peer.ip()) {
            m.connections_open.fetch_sub(1, Ordering::Relaxed);
            m.limited(Limit::PerIp);
            if let Some(held) = self.log_gates[2].allow(now) {
                tracing::warn!(
                    shard = self.id,
                    peer = %peer.ip(),
                    "over limits.max_connections_per_ip: connection closed at accept ({held} \
                     more not logged)"
                );
            }
            return None;
        }
        m.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let me = ConnRef::new(self.id, slot, self.generation);
        let machine = if self.env.echo {
            Machine::Echo(ws::Echo::new(self.ctx.config.limits))
        } else {
            Machine::Link(Session::new(Arc::clone(&self.ctx), peer.ip(), now))
        };
        let tls = match &self.tls {
            Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
                Ok(conn) => Some(Box::new(Tls {
                    conn,
                    plain: Vec::new(),
                    failed: false,
                })),
                Err(_) => {
                    m.connections_open.fetch_sub(1, Ordering::Relaxed);
                    self.env.admission.per_ip.remove(peer.ip());
                    return None;
                }
            },
            None => None,
        };
        entry.insert(Box::new(Conn {
            machine,
            tls,
            me,
            peer,
            timer: None,
            lingering: false,
            aborted: false,
            flagged: false,
            io,
        }));
        if tracing::enabled!(Level::DEBUG) {
            let _in = self.conn_span(slot, None).entered();
            tracing::debug!(tls = self.tls.is_some(), "connection accepted");
        }
        self.after(slot, now);
        Some(slot)
    }

    /// Bytes read from `slot`'s socket; returns how many were consumed. The rest must be
    /// presented again with more bytes appended (a TLS connection consumes everything), and
    /// also when [`wants_input`](Self::wants_input) turns true after it was false, with or
    /// without new bytes: a connection over its message rate stops consuming at a message
    /// boundary (a TLS one keeps the decrypted rest itself; present it an empty slice).
    pub(crate) fn input(&mut self, slot: usize, input: &mut [u8], now: Instant) -> usize {
        let Some(conn) = self.conns.get_mut(slot) else {
            return input.len();
        };
        let was_paused = conn.machine.is_rate_paused();
        let n = match conn.tls.as_deref_mut() {
            None => conn.machine.input(input, now, &mut self.state),
            Some(tls) => {
                if let Err(handshaking) = tls_input(tls, input) {
                    tls.failed = true;
                    if handshaking {
                        self.env
                            .metrics
                            .tls_handshake_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                let consumed = conn.machine.input(&mut tls.plain, now, &mut self.state);
                tls.plain.drain(..consumed.min(tls.plain.len()));
                if tls.plain.is_empty() && tls.plain.capacity() > 4096 {
                    tls.plain = Vec::new();
                }
                input.len()
            }
        };
        if !was_paused && conn.machine.is_rate_paused() {
            self.env.metrics.limited(Limit::MessageRate);
            if let Some(held) = self.log_gates[0].allow(now) {
                tracing::warn!(
                    shard = self.id,
                    peer = %conn.peer,
                    "over limits.max_messages_per_s: connection not read until its bucket \
                     refills ({held} more pauses not logged)"
                );
            }
        }
        self.stats_dirty = true;
        self.after(slot, now);
        n
    }

    /// Moves `slot`'s pending bytes (encrypted for TLS) into `out`; false when there are none.
    pub(crate) fn transmit(&mut self, slot: usize, out: &mut Vec<u8>) -> bool {
        let Some(c) = self.conns.get_mut(slot) else {
            return false;
        };
        let Some(tls) = c.tls.as_deref_mut() else {
            return c.machine.transmit(out);
        };
        let mut plain = std::mem::take(&mut self.tls_scratch);
        plain.clear();
        if c.machine.transmit(&mut plain) && !tls.failed {
            // rustls buffers what it cannot encrypt yet (before the handshake is done).
            let _ = std::io::Write::write_all(&mut tls.conn.writer(), &plain);
        }
        self.tls_scratch = plain;
        if c.machine.is_closed() && !tls.failed {
            tls.conn.send_close_notify();
        }
        let start = out.len();
        while tls.conn.wants_write() {
            if tls.conn.write_tls(out).is_err() {
                break;
            }
        }
        out.len() > start
    }

    /// Whether the connection is over: the driver writes what is left, then closes.
    pub(crate) fn is_closed(&self, slot: usize) -> bool {
        self.conns.get(slot).is_none_or(|c| c.is_closed())
    }

    /// Whether the driver must drop `slot` now without flushing it: the connection closed a
    /// pong timeout ago and its peer still has not taken what is left to send (it stopped
    /// reading). The driver shuts the socket down, which also ends a write stuck on it.
    pub(crate) fn is_aborted(&self, slot: usize) -> bool {
        self.conns.get(slot).is_some_and(|c| c.aborted)
    }

    /// Whether the driver should read from `slot` now; see [`Session::wants_input`]. A driver
    /// that finds it false does not read until the connection is flagged again (replies were
    /// released, see [`ShardCore::take_ready`]) or it has written what was queued. A closed
    /// connection always wants input, so that its reader sees the end of the stream.
    pub(crate) fn wants_input(&self, slot: usize) -> bool {
        self.conns
            .get(slot)
            .is_none_or(|c| c.is_closed() || c.machine.wants_input())
    }

    /// Until when the driver must stop accepting, once, after an [`accept`](Self::accept)
    /// found the process over `max_new_connections_per_s`. The driver accepts again at that
    /// instant; connections that arrive meanwhile wait in the kernel's backlog.
    pub(crate) fn take_accept_pause(&mut self) -> Option<Instant> {
        self.accept_pause.take()
    }

    /// Counts a connection whose driver stopped reading it (`ringlink_reads_paused_total`).
    pub(crate) fn note_paused(&self) {
        self.env
            .metrics
            .reads_paused
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn wanted_bytes(&self, slot: usize) -> usize {
        self.conns.get(slot).map_or(0, |c| {
            if c.tls.is_some() {
                // rustls keeps partial records itself; the plaintext buffer grows as needed.
                TLS_READ_BYTES
            } else {
                c.machine.wanted_bytes()
            }
        })
    }

    pub(crate) fn io(&self, slot: usize) -> Option<&D> {
        self.conns.get(slot).map(|c| &c.io)
    }

    pub(crate) fn io_mut(&mut self, slot: usize) -> Option<&mut D> {
        self.conns.get_mut(slot).map(|c| &mut c.io)
    }

    /// The socket is gone: devices go offline, downlinks fail, the slot is freed.
    pub(crate) fn disconnect(&mut self, slot: usize, now: Instant) -> Option<D> {
        let conn = self.conns.get_mut(slot)?;
        if let Some(session) = conn.machine.link() {
            session.handle_disconnect();
        }
        self.drain_events(slot, now);
        if tracing::enabled!(Level::DEBUG) {
            let c = &self.conns[slot];
            let (reason, code) = match &c.machine {
                _ if c.tls.as_ref().is_some_and(|t| t.failed) => ("tls_error", None),
                Machine::Link(s) => (
                    s.close_reason().map_or("disconnected", CloseReason::as_str),
                    s.close_code(),
                ),
                Machine::Echo(_) => ("echo_closed", None),
            };
            let _in = self.conn_span(slot, None).entered();
            tracing::debug!(reason, code, "connection closed");
        }
        let conn = self.conns.remove(slot);
        self.env.admission.per_ip.remove(conn.peer.ip());
        if let Some(t) = conn.timer {
            self.timers.remove(&(t, slot));
        }
        self.ready.retain(|s| *s != slot);
        self.env
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        Some(conn.io)
    }

    /// Connections with something to send or a changed state, since the last call.
    pub(crate) fn take_ready(&mut self, out: &mut Vec<usize>) {
        for &slot in &self.ready {
            if let Some(c) = self.conns.get_mut(slot) {
                c.flagged = false;
            }
        }
        out.append(&mut self.ready);
    }

    /// The earliest connection timer, batch deadline or counter publication.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let conn = self.timers.first().map(|t| t.0);
        let batch = self.batcher.poll_timeout();
        let publish = self.stats_dirty.then_some(self.next_publish);
        [conn, batch, publish].into_iter().flatten().min()
    }

    /// Runs every timer due at `now`: session timers, the batch deadline, metrics publishing.
    pub(crate) fn on_timer(&mut self, now: Instant) {
        while let Some(&(at, slot)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(c) = self.conns.get_mut(slot) {
                c.timer = None;
                let mut resumed = false;
                if c.lingering {
                    c.aborted = true;
                } else if let Some(session) = c.machine.link() {
                    let paused = session.is_rate_paused();
                    session.handle_timeout(now);
                    resumed = paused && !session.is_rate_paused();
                }
                self.after(slot, now);
                if resumed {
                    // Its rate pause is over: the driver reads it again.
                    self.flag(slot);
                }
            }
        }
        if self.batcher.poll_timeout().is_some_and(|t| t <= now) {
            self.end_turn(now);
        }
        if self.stats_dirty && now >= self.next_publish {
            self.next_publish = now + PUBLISH_EVERY;
            self.stats_dirty = false;
            self.env
                .metrics
                .publish(usize::from(self.id), &self.state.stats);
        }
    }

    /// Handles a message from another thread.
    pub(crate) fn on_message(&mut self, msg: ShardMsg<R>, now: Instant) {
        match msg {
            ShardMsg::TakenOver { conn, device } => {
                if let Some(slot) = self.live_slot(conn) {
                    self.debug_taken_over(slot, device);
                    if let Some(s) = self.conns[slot].machine.link() {
                        s.handle_taken_over(device);
                    }
                    self.after(slot, now);
                }
            }
            ShardMsg::Downlink {
                conn,
                mut downlink,
                started,
                reply,
            } => {
                let method = downlink.request.method();
                let waiter = Waiter {
                    reply,
                    started,
                    method,
                };
                let Some(slot) = self.live_slot(conn) else {
                    self.finish_waiter(waiter, Outcome::failed(Code::DeviceOffline), now);
                    return;
                };
                self.next_token += 1;
                downlink.token = self.next_token;
                self.waiters.insert(downlink.token, waiter);
                if let Some(s) = self.conns[slot].machine.link() {
                    s.send_downlink(downlink, now, &mut self.state);
                }
                self.after(slot, now);
            }
            ShardMsg::Drain => self.drain(now),
            ShardMsg::Reload { swap, reply } => {
                self.swap(&swap, now);
                self.actions.push_back(Action::Answer {
                    reply,
                    outcome: Outcome {
                        code: Code::Success,
                        data: None,
                    },
                });
            }
        }
    }

    /// Swaps in a reloaded registry between two events: every session of the shard checks its
    /// next message against it, new connections get the new TLS setup (handshakes done keep
    /// theirs), and each removed device online here goes offline with an offline record, like
    /// an offlineDevice (its names come from its retired id, which the new registry keeps).
    ///
    /// Which shard offlines a removed device: the one that owns it in [`Owners`] when it swaps.
    /// A shard can only claim a device before it swaps (after, its sessions no longer find
    /// it), so the last claim of a removed device is made by a shard that has yet to swap, and
    /// that shard then finds itself the owner and releases it: once every shard has swapped,
    /// every removed device is offline.
    fn swap(&mut self, swap: &Swap, now: Instant) {
        self.ctx = Arc::clone(&swap.live.ctx);
        self.tls.clone_from(&swap.live.tls);
        for (_, c) in &mut self.conns {
            if let Some(s) = c.machine.link() {
                s.set_context(Arc::clone(&self.ctx));
            }
        }
        for &device in &swap.removed {
            let Some(slot) = self
                .env
                .owners
                .owner(device)
                .and_then(|c| self.live_slot(c))
            else {
                continue;
            };
            if let Some(s) = self.conns[slot].machine.link() {
                s.handle_removed(device);
            }
            self.after(slot, now);
        }
    }

    /// Every connection fed in for this turn of the driver's loop has been read: with no
    /// commit in flight, what is batched goes to the log now, as one commit.
    pub(crate) fn end_turn(&mut self, now: Instant) {
        if self.committing {
            return;
        }
        if let Some(batch) = self.batcher.take(now, true) {
            self.queued.push(batch);
        }
        if self.queued.is_empty() {
            return;
        }
        let mut batches = std::mem::take(&mut self.spare_commit);
        batches.append(&mut self.queued);
        for b in &batches {
            self.env.metrics.batch_sizes.observe(b.records as f64);
        }
        self.committing = true;
        self.actions.push_back(Action::Append(Commit {
            batches,
            started: now,
        }));
    }

    /// The driver wrote `commit` to the log (`Ok`: durable per the fsync policy): the devices
    /// waiting on its records are answered (success, or 100000 when the write failed), and
    /// what gathered meanwhile goes out as the next commit.
    pub(crate) fn committed(
        &mut self,
        mut commit: Commit,
        result: Result<(), UplinkError>,
        now: Instant,
    ) {
        let code = if result.is_ok() {
            Code::Success
        } else {
            self.env
                .metrics
                .uplinks_failed
                .fetch_add(commit.records() as u64, Ordering::Relaxed);
            Code::Unknown
        };
        let log_wait = now.saturating_duration_since(commit.started);
        let stats = &mut self.state.stats;
        stats.commit_latency.observe(log_wait);
        for batch in &commit.batches {
            for ack in &batch.acks {
                let total = now.saturating_duration_since(ack.arrived);
                stats.ack_latency[0].observe(total);
                stats.ack_latency[1].observe(log_wait);
                stats.ack_latency[2].observe(total.saturating_sub(log_wait));
            }
        }
        self.stats_dirty = true;
        for mut batch in commit.batches.drain(..) {
            for ack in batch.acks.drain(..) {
                if let Some(slot) = self.live_slot(ack.conn) {
                    if let Some(s) = self.conns[slot].machine.link() {
                        s.ack(ack.token, code);
                    }
                    self.after(slot, now);
                }
            }
            self.batcher.recycle(batch);
        }
        self.spare_commit = commit.batches;
        self.committing = false;
        self.end_turn(now);
        self.close_all_when_committed(now);
    }

    /// Stops accepting, commits what is batched, and once that commit is acknowledged (its
    /// devices answered) closes every connection with 1001.
    pub(crate) fn drain(&mut self, now: Instant) {
        self.draining = true;
        self.end_turn(now);
        self.close_all_when_committed(now);
    }

    fn close_all_when_committed(&mut self, now: Instant) {
        if !self.draining || self.committing || self.closed_all {
            return;
        }
        self.closed_all = true;
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.conns[slot].machine.shutdown();
            self.after(slot, now);
        }
        // Offline records of the devices on them: one last commit.
        self.end_turn(now);
    }

    /// Whether the shard may stop: drained, every connection gone, nothing left to commit.
    pub(crate) fn is_done(&self) -> bool {
        self.draining
            && self.conns.is_empty()
            && !self.committing
            && self.queued.is_empty()
            && self.batcher.is_empty()
            && self.actions.is_empty()
    }

    /// After any call into a session: apply its events, re-arm its timer, and flag it for the
    /// driver when it has bytes to send or has just closed.
    fn after(&mut self, slot: usize, now: Instant) {
        if !self.conns.contains(slot) {
            return;
        }
        self.drain_events(slot, now);
        let linger = self.ctx.config.pong_timeout;
        let c = &mut self.conns[slot];
        let closed = c.is_closed();
        let next = if closed {
            // A closed connection's only timer: the end of its time to flush.
            if c.aborted {
                None
            } else if c.lingering {
                c.timer
            } else {
                c.lingering = true;
                if let Machine::Link(s) = &c.machine {
                    if let Some(reason) = s.close_reason() {
                        self.state.stats.closes[reason.index()] += 1;
                        self.stats_dirty = true;
                    }
                }
                Some(now + linger)
            }
        } else {
            c.machine.poll_timeout()
        };
        if next != c.timer {
            if let Some(t) = c.timer.take() {
                self.timers.remove(&(t, slot));
            }
            if let Some(t) = next {
                self.timers.insert((t, slot));
            }
            c.timer = next;
        }
        let tls_out = c
            .tls
            .as_ref()
            .is_some_and(|t| t.conn.wants_write() || t.failed);
        if c.machine.has_transmit() || closed || tls_out {
            self.flag(slot);
        }
    }

    /// Puts `slot` on the ready list for the driver, once.
    fn flag(&mut self, slot: usize) {
        if let Some(c) = self.conns.get_mut(slot) {
            if !c.flagged {
                c.flagged = true;
                self.ready.push(slot);
            }
        }
    }

    fn drain_events(&mut self, slot: usize, now: Instant) {
        let wall = self.wall_ms(now);
        while let Some(event) = self
            .conns
            .get_mut(slot)
            .and_then(|c| c.machine.link())
            .and_then(Session::poll_event)
        {
            let (me, peer) = {
                let c = &self.conns[slot];
                (c.me, c.peer)
            };
            match event {
                Event::Online { device, ack } => {
                    let previous = self.env.owners.claim(device, me);
                    if tracing::enabled!(Level::DEBUG) {
                        let _in = self.conn_span(slot, Some(device)).entered();
                        match previous {
                            Some(p) => tracing::debug!(
                                previous_shard = p.shard(),
                                previous_slot = p.slot(),
                                "device online, taken over from another connection"
                            ),
                            None => tracing::debug!("device online"),
                        }
                    }
                    if let Some(previous) = previous {
                        self.taken_over(previous, device);
                    }
                    self.env.shadows.online(device, peer, wall);
                    self.state.stats.uplinks[2] += 1;
                    let ack = ack.map(|token| AckRef {
                        conn: me,
                        token,
                        arrived: now,
                    });
                    self.push_record(device, wall, RecordBody::Online { peer }, ack, now);
                }
                Event::Offline { device, ack } => {
                    let released = self.env.owners.release(device, me);
                    if tracing::enabled!(Level::DEBUG) {
                        let _in = self.conn_span(slot, Some(device)).entered();
                        if released {
                            tracing::debug!("device offline");
                        } else {
                            tracing::debug!("device offline here, online on another connection");
                        }
                    }
                    if released {
                        self.env.shadows.offline(device, wall);
                        self.state.stats.uplinks[3] += 1;
                        let ack = ack.map(|token| AckRef {
                            conn: me,
                            token,
                            arrived: now,
                        });
                        self.push_record(device, wall, RecordBody::Offline, ack, now);
                    } else if let Some(token) = ack {
                        // Taken over meanwhile: no offline uplink is due, answer at once.
                        if let Some(s) = self.conns[slot].machine.link() {
                            s.ack(token, Code::Success);
                        }
                    }
                }
                Event::Uplink { uplink, ack } => {
                    let ack = Some(AckRef {
                        conn: me,
                        token: ack,
                        arrived: now,
                    });
                    let device = uplink.device;
                    let body = match &uplink.kind {
                        UplinkKind::Property => {
                            self.state.stats.uplinks[0] += 1;
                            self.env.shadows.properties(device, &uplink.values, wall);
                            RecordBody::Property {
                                values: &uplink.values,
                            }
                        }
                        UplinkKind::Event(id) => {
                            self.state.stats.uplinks[1] += 1;
                            self.env.shadows.event(device, id, &uplink.values, wall);
                            RecordBody::Event {
                                identifier: id,
                                values: &uplink.values,
                            }
                        }
                    };
                    self.push_record(device, wall, body, ack, now);
                }
                Event::DownlinkDone { token, outcome } => {
                    if let Some(w) = self.waiters.remove(&token) {
                        self.finish_waiter(w, outcome, now);
                    }
                }
            }
        }
    }

    /// `device` came online elsewhere: tell its previous connection, here or on its shard.
    fn taken_over(&mut self, previous: ConnRef, device: DeviceId) {
        if previous.shard() != self.id {
            let msg = ShardMsg::TakenOver {
                conn: previous,
                device,
            };
            self.actions.push_back(Action::Send {
                shard: previous.shard(),
                msg,
            });
        } else if let Some(old) = self.live_slot(previous) {
            self.debug_taken_over(old, device);
            if let Some(s) = self.conns[old].machine.link() {
                s.handle_taken_over(device);
            }
            // Not `after`: that would drain `old`'s events while this call drains another
            // connection's; the flag is enough, its events wait for its next call.
            self.flag(old);
        }
    }

    fn push_record(
        &mut self,
        device: DeviceId,
        at_ms: u64,
        body: RecordBody<'_>,
        ack: Option<AckRef>,
        now: Instant,
    ) {
        let registry = &self.ctx.registry;
        let record = Record {
            at_ms,
            product_key: registry.product_key(device),
            device_name: registry.device_name(device),
            body,
        };
        let full = self
            .batcher
            .push(now, ack, |out| uplink::encode(&record, out));
        if full {
            // A full batch waits for the next commit with the others; the driver's end of
            // turn (or the commit in flight) sends it.
            if let Some(batch) = self.batcher.take(now, true) {
                self.queued.push(batch);
            }
        }
    }

    /// Whether records wait for a commit the driver should start at the end of this turn.
    pub(crate) fn commit_wanted(&self) -> bool {
        let waiting = !self.batcher.is_empty() || !self.queued.is_empty();
        waiting && !self.committing
    }

    fn finish_waiter(&mut self, w: Waiter<R>, outcome: Outcome, now: Instant) {
        self.env.metrics.downlink_done(
            w.method,
            outcome.code,
            now.saturating_duration_since(w.started),
        );
        self.actions.push_back(Action::Answer {
            reply: w.reply,
            outcome,
        });
    }

    /// The `conn` span of `slot` (and `device`) for the events about to be emitted; built only
    /// after a `debug` level check, never kept (see the module docs).
    fn conn_span(&self, slot: usize, device: Option<DeviceId>) -> tracing::Span {
        let Some(c) = self.conns.get(slot) else {
            return tracing::Span::none();
        };
        let span = tracing::debug_span!(
            "conn",
            shard = self.id,
            slot,
            peer = %c.peer,
            device = tracing::field::Empty
        );
        if let Some(d) = device {
            let r = self.env.registry();
            let name = format!("{}/{}", r.product_key(d), r.device_name(d));
            span.record("device", tracing::field::display(&name));
        }
        span
    }

    /// On the connection that loses `device` to another one.
    fn debug_taken_over(&self, slot: usize, device: DeviceId) {
        if tracing::enabled!(Level::DEBUG) {
            let _in = self.conn_span(slot, Some(device)).entered();
            tracing::debug!("device taken over by another connection");
        }
    }

    /// The slot of `conn` if that connection is still open on this shard.
    fn live_slot(&self, conn: ConnRef) -> Option<usize> {
        let slot = conn.slot();
        (conn.shard() == self.id && self.conns.get(slot).is_some_and(|c| c.me == conn))
            .then_some(slot)
    }
}

/// Feeds ciphertext to rustls and moves every decrypted byte to `tls.plain`. On error the
/// alert is queued for sending; the error says whether the handshake was still going on.
fn tls_input(tls: &mut Tls, input: &[u8]) -> Result<(), bool> {
    let mut rest = input;
    while !rest.is_empty() {
        let handshaking = tls.conn.is_handshaking();
        match tls.conn.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Err(handshaking),
        }
        let state = tls.conn.process_new_packets().map_err(|_| handshaking)?;
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let start = tls.plain.len();
            tls.plain.resize(start + n, 0);
            let read =
                std::io::Read::read(&mut tls.conn.reader(), &mut tls.plain[start..]).unwrap_or(0);
            tls.plain.truncate(start + read);
        }
    }
    Ok(())
}

/// Read size for TLS connections: decrypted data is buffered separately, so reads need not
/// hold a whole frame.
const TLS_READ_BYTES: usize = 4096;

/// How often a shard copies its counters to the shared metrics, at most.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests;
