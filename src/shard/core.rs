//! The part of a shard that both drivers share: its connections and what happens between them.
//!
//! Owns: the shard's connection table (a session per connection, plus the driver's own per-
//! connection handle `D`), the shard's uplink batcher, the downlinks waiting for an answer, and
//! the timer of every connection. It applies session events to the shared world: ownership
//! (takeover notices to other shards), uplink records into batches, acks back to sessions,
//! shadows, metrics.
//! Never: socket IO. A driver reads bytes and calls [`ShardCore::input`], writes what
//! [`ShardCore::transmit`] gives it, closes what [`ShardCore::is_closed`] says is closed, and
//! calls [`ShardCore::disconnect`] when a socket is gone. It reads the clock once per call and
//! passes `now` in.
//!
//! A driver learns which connections have something to send from [`ShardCore::take_ready`]
//! after each call.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use slab::Slab;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::metrics::Metrics;
use crate::protocol::Code;
use crate::registry::{ConnRef, DeviceId, Owners, Registry};
use crate::session::{Context, Event, Outcome, Presence, Session, ShardState, UplinkKind};
use crate::shadow::Shadows;
use crate::shard::mesh::{AckRef, Mesh, ShardMsg};
use crate::uplink::{self, Batch, Batcher, Record, RecordBody, Writer};
use crate::ws;

/// What all shards share: read-mostly, or atomics.
pub(crate) struct Shared {
    pub(crate) ctx: Arc<Context>,
    pub(crate) owners: Arc<Owners>,
    pub(crate) mesh: Mesh,
    pub(crate) writer: Writer<AckRef>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shadows: Arc<Shadows>,
    /// Every uplink record line, for `GET /v1/uplinks`; sent only while someone listens.
    pub(crate) uplink_feed: broadcast::Sender<Arc<str>>,
    pub(crate) draining: AtomicBool,
    pub(crate) max_connections: usize,
    /// Connections echo instead of speaking Link (`serve --echo`, for Autobahn).
    pub(crate) echo: bool,
    /// Set for `wss://`.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) batch_max: usize,
    pub(crate) flush_delay: Duration,
}

impl Shared {
    pub(crate) fn registry(&self) -> &Registry {
        &self.ctx.registry
    }
}

/// The router's answer to a session's auto-online question.
struct OwnersPresence(Arc<Owners>);

impl Presence for OwnersPresence {
    fn is_online(&self, device: DeviceId) -> bool {
        self.0.owner(device).is_some()
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
    /// The deadline registered in `ShardCore::timers` for this connection.
    timer: Option<Instant>,
    /// Once the connection is closed: when the driver must stop trying to flush it (see
    /// [`ShardCore::is_aborted`]).
    abort_at: Option<Instant>,
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

/// A downlink from the API waiting for the device.
struct Waiter {
    reply: oneshot::Sender<Outcome>,
    started: Instant,
    method: crate::protocol::ServerMethod,
}

pub(crate) struct ShardCore<D> {
    pub(crate) id: u8,
    pub(crate) shared: Arc<Shared>,
    state: ShardState,
    /// Boxed: a slab doubles its capacity, and a few hundred bytes per empty slot would add
    /// up to more than the connections themselves at tens of thousands of sockets.
    conns: Slab<Box<Conn<D>>>,
    generation: u32,
    batcher: Batcher<AckRef>,
    /// Batches the writer's queue refused; retried first.
    backlog: Vec<Batch<AckRef>>,
    /// Batches handed to the writer and not committed yet. With none in flight a record is
    /// written at once; while one is, records gather into the next batch (group commit), so
    /// batching costs latency only when there is load to batch.
    inflight: usize,
    waiters: HashMap<u64, Waiter>,
    next_token: u64,
    timers: BTreeSet<(Instant, usize)>,
    ready: Vec<usize>,
    /// This shard's own mesh sender, for the writer's completion callbacks.
    inbox: mpsc::UnboundedSender<ShardMsg>,
    record_buf: Vec<u8>,
    /// When this shard last published its counters, and whether they changed since.
    last_publish: Option<Instant>,
    stats_dirty: bool,
}

impl<D> ShardCore<D> {
    pub(crate) fn new(id: u8, shared: Arc<Shared>) -> Self {
        let presence = Arc::new(OwnersPresence(Arc::clone(&shared.owners)));
        let inbox = shared.mesh.sender(id);
        Self {
            id,
            batcher: Batcher::new(shared.batch_max, shared.flush_delay),
            shared,
            state: ShardState::new(presence),
            conns: Slab::new(),
            generation: 0,
            backlog: Vec::new(),
            inflight: 0,
            waiters: HashMap::new(),
            next_token: 0,
            timers: BTreeSet::new(),
            ready: Vec::new(),
            inbox,
            record_buf: Vec::new(),
            last_publish: None,
            stats_dirty: false,
        }
    }

    /// A new connection from `peer`; None when the process is at `max_connections` or
    /// draining (the driver drops the socket).
    pub(crate) fn accept(&mut self, peer: SocketAddr, now: Instant, io: D) -> Option<usize> {
        let m = &self.shared.metrics;
        if self.shared.draining.load(Ordering::Relaxed) {
            return None;
        }
        let open = m.connections_open.fetch_add(1, Ordering::Relaxed);
        if open as usize >= self.shared.max_connections || self.conns.len() >= ConnRef::MAX_SLOT {
            m.connections_open.fetch_sub(1, Ordering::Relaxed);
            m.connections_rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        m.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let me = ConnRef::new(self.id, slot, self.generation);
        let machine = if self.shared.echo {
            Machine::Echo(ws::Echo::new(self.shared.ctx.config.limits))
        } else {
            Machine::Link(Session::new(Arc::clone(&self.shared.ctx), peer.ip(), now))
        };
        let tls = match &self.shared.tls {
            Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
                Ok(conn) => Some(Box::new(Tls {
                    conn,
                    plain: Vec::new(),
                    failed: false,
                })),
                Err(_) => return None,
            },
            None => None,
        };
        entry.insert(Box::new(Conn {
            machine,
            tls,
            me,
            peer,
            timer: None,
            abort_at: None,
            aborted: false,
            flagged: false,
            io,
        }));
        self.after(slot, now);
        Some(slot)
    }

    /// Bytes read from `slot`'s socket; returns how many were consumed. The rest must be
    /// presented again with more bytes appended (a TLS connection consumes everything).
    pub(crate) fn input(&mut self, slot: usize, input: &mut [u8], now: Instant) -> usize {
        let Some(conn) = self.conns.get_mut(slot) else {
            return input.len();
        };
        let n = match conn.tls.as_deref_mut() {
            None => conn.machine.input(input, now, &mut self.state),
            Some(tls) => {
                if let Err(handshaking) = tls_input(tls, input) {
                    tls.failed = true;
                    if handshaking {
                        self.shared
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
        self.stats_dirty = true;
        self.after(slot, now);
        self.flush_if_due(now);
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
        let mut plain = std::mem::take(&mut self.record_buf);
        plain.clear();
        if c.machine.transmit(&mut plain) && !tls.failed {
            // rustls buffers what it cannot encrypt yet (before the handshake is done).
            let _ = std::io::Write::write_all(&mut tls.conn.writer(), &plain);
        }
        self.record_buf = plain;
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

    /// Counts a connection whose driver stopped reading it (`ringlink_reads_paused_total`).
    pub(crate) fn note_paused(&self) {
        self.shared
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

    /// The socket is gone: devices go offline, downlinks fail, the slot is freed.
    pub(crate) fn disconnect(&mut self, slot: usize, now: Instant) -> Option<D> {
        let conn = self.conns.get_mut(slot)?;
        if let Some(session) = conn.machine.link() {
            session.handle_disconnect();
        }
        self.drain_events(slot, now);
        let conn = self.conns.remove(slot);
        if let Some(t) = conn.timer {
            self.timers.remove(&(t, slot));
        }
        self.ready.retain(|s| *s != slot);
        self.shared
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

    /// The earliest connection timer or batch deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let conn = self.timers.first().map(|t| t.0);
        let batch = self.batcher.poll_timeout();
        let retry = (!self.backlog.is_empty()).then(|| Instant::now() + Duration::from_millis(1));
        let publish = self.stats_dirty.then(|| {
            self.last_publish
                .map_or_else(Instant::now, |t| t + PUBLISH_EVERY)
        });
        [conn, batch, retry, publish].into_iter().flatten().min()
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
                if c.abort_at.is_some_and(|t| t <= now) {
                    c.aborted = true;
                } else if let Some(session) = c.machine.link() {
                    session.handle_timeout(now);
                }
                self.after(slot, now);
            }
        }
        self.flush_if_due(now);
        if self.stats_dirty
            && self
                .last_publish
                .is_none_or(|t| now.duration_since(t) >= PUBLISH_EVERY)
        {
            self.last_publish = Some(now);
            self.stats_dirty = false;
            self.shared
                .metrics
                .publish(usize::from(self.id), &self.state.stats);
        }
    }

    /// Handles a message from another thread.
    pub(crate) fn on_message(&mut self, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::TakenOver { conn, device } => {
                if let Some(s) = self
                    .live_slot(conn)
                    .and_then(|k| self.conns[k].machine.link())
                {
                    s.handle_taken_over(device);
                }
            }
            ShardMsg::Downlink {
                conn,
                mut downlink,
                started,
                reply,
            } => {
                let Some(slot) = self.live_slot(conn) else {
                    let method = downlink.request.method();
                    self.finish_waiter(
                        Waiter {
                            reply,
                            started,
                            method,
                        },
                        Outcome::failed(Code::DeviceOffline),
                        now,
                    );
                    return;
                };
                self.next_token += 1;
                downlink.token = self.next_token;
                let method = downlink.request.method();
                self.waiters.insert(
                    downlink.token,
                    Waiter {
                        reply,
                        started,
                        method,
                    },
                );
                if let Some(s) = self.conns[slot].machine.link() {
                    s.send_downlink(downlink, now, &mut self.state);
                }
                self.after(slot, now);
                self.drain_events(slot, now);
            }
            ShardMsg::Committed { mut batch, result } => {
                let code = match &result {
                    Ok(()) => Code::Success,
                    Err(_) => {
                        self.shared
                            .metrics
                            .uplinks_failed
                            .fetch_add(batch.records as u64, Ordering::Relaxed);
                        Code::Unknown
                    }
                };
                for ack in batch.acks.drain(..) {
                    if let Some(slot) = self.live_slot(ack.conn) {
                        if let Some(s) = self.conns[slot].machine.link() {
                            s.ack(ack.token, code);
                        }
                        self.after(slot, now);
                    }
                }
                self.batcher.recycle(batch);
                self.inflight = self.inflight.saturating_sub(1);
                if self.inflight == 0 && !self.batcher.is_empty() {
                    // What gathered while the writer was busy goes now, as one batch.
                    self.flush_uplinks(now, true);
                }
            }
            ShardMsg::Drain => self.drain(now),
        }
    }

    /// Closes every connection with 1001 and flushes the uplink batch.
    pub(crate) fn drain(&mut self, now: Instant) {
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.conns[slot].machine.shutdown();
            self.after(slot, now);
            self.drain_events(slot, now);
        }
        self.flush_uplinks(now, true);
    }

    /// Number of connections on this shard.
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Hands the current batch to the writer when it is due (or `force`).
    pub(crate) fn flush_uplinks(&mut self, now: Instant, force: bool) {
        let mut pending = std::mem::take(&mut self.backlog);
        if let Some(batch) = self.batcher.take(now, force) {
            pending.push(batch);
        }
        for batch in pending {
            self.shared
                .metrics
                .batch_sizes
                .observe(batch.records as f64);
            let inbox = self.inbox.clone();
            let done = Box::new(move |batch, result| {
                // The shard is gone only at shutdown, after its last batch: nothing to ack.
                let _ = inbox.send(ShardMsg::Committed { batch, result });
            });
            match self.shared.writer.submit(batch, done) {
                Ok(()) => self.inflight += 1,
                Err(batch) => self.backlog.push(batch),
            }
        }
    }

    fn flush_if_due(&mut self, now: Instant) {
        if self.batcher.poll_timeout().is_some_and(|t| t <= now) || !self.backlog.is_empty() {
            self.flush_uplinks(now, false);
        }
    }

    /// After any call into a session: apply its events, re-arm its timer, and flag it for the
    /// driver when it has bytes to send or has just closed.
    fn after(&mut self, slot: usize, now: Instant) {
        if !self.conns.contains(slot) {
            return;
        }
        self.drain_events(slot, now);
        let linger = self.shared.ctx.config.pong_timeout;
        let c = &mut self.conns[slot];
        let closed = c.is_closed();
        let next = if closed {
            // A closed connection's only timer: the end of its time to flush.
            if c.aborted {
                None
            } else {
                Some(*c.abort_at.get_or_insert(now + linger))
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
        let act = c.machine.has_transmit() || closed || tls_out;
        if act && !c.flagged {
            c.flagged = true;
            self.ready.push(slot);
        }
    }

    fn drain_events(&mut self, slot: usize, now: Instant) {
        // Read once, and only when there is an event: most calls (an ack) have none.
        let mut wall_ms = None;
        let mut wall = || *wall_ms.get_or_insert_with(unix_ms);
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
                    if let Some(previous) = self.shared.owners.claim(device, me) {
                        if previous.shard() == self.id {
                            let old = self.live_slot(previous);
                            if let Some(s) = old.and_then(|k| self.conns[k].machine.link()) {
                                s.handle_taken_over(device);
                            }
                        } else {
                            self.shared.mesh.send(
                                previous.shard(),
                                ShardMsg::TakenOver {
                                    conn: previous,
                                    device,
                                },
                            );
                        }
                    }
                    self.shared.shadows.online(device, peer, wall());
                    self.shared
                        .metrics
                        .uplinks_online
                        .fetch_add(1, Ordering::Relaxed);
                    let ack = ack.map(|token| AckRef { conn: me, token });
                    self.push_record(device, wall(), RecordBody::Online { peer }, ack, now);
                }
                Event::Offline { device, ack } => {
                    if self.shared.owners.release(device, me) {
                        self.shared.shadows.offline(device, wall());
                        self.shared
                            .metrics
                            .uplinks_offline
                            .fetch_add(1, Ordering::Relaxed);
                        let ack = ack.map(|token| AckRef { conn: me, token });
                        self.push_record(device, wall(), RecordBody::Offline, ack, now);
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
                    });
                    let device = uplink.device;
                    match &uplink.kind {
                        UplinkKind::Property => {
                            self.shared
                                .metrics
                                .uplinks_property
                                .fetch_add(1, Ordering::Relaxed);
                            self.shared
                                .shadows
                                .properties(device, &uplink.values, wall());
                            let body = RecordBody::Property {
                                values: &uplink.values,
                            };
                            self.push_record(device, wall(), body, ack, now);
                        }
                        UplinkKind::Event(id) => {
                            self.shared
                                .metrics
                                .uplinks_event
                                .fetch_add(1, Ordering::Relaxed);
                            self.shared
                                .shadows
                                .event(device, id, &uplink.values, wall());
                            let body = RecordBody::Event {
                                identifier: id,
                                values: &uplink.values,
                            };
                            self.push_record(device, wall(), body, ack, now);
                        }
                    }
                }
                Event::DownlinkDone { token, outcome } => {
                    if let Some(w) = self.waiters.remove(&token) {
                        self.finish_waiter(w, outcome, now);
                    }
                }
            }
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
        let registry = self.shared.registry();
        let record = Record {
            at_ms,
            product_key: registry.product_key(device),
            device_name: registry.device_name(device),
            body,
        };
        let feed = &self.shared.uplink_feed;
        let record_buf = &mut self.record_buf;
        let full = self.batcher.push(now, ack, |out| {
            let start = out.len();
            uplink::encode(&record, out);
            if feed.receiver_count() > 0 {
                record_buf.clear();
                record_buf.extend_from_slice(&out[start..]);
                if let Ok(line) = std::str::from_utf8(record_buf) {
                    let _ = feed.send(Arc::from(line.trim_end()));
                }
            }
        });
        if full {
            self.flush_uplinks(now, false);
        }
        // Otherwise the driver's flusher hands the batch over once this turn of its event loop
        // has read every ready connection (see `flush_wanted`), or the batch deadline does.
    }

    /// Whether records wait while none of this shard's batches is at the writer: the driver
    /// should flush soon, after reading what else is ready now, so that one batch carries it.
    pub(crate) fn flush_wanted(&self) -> bool {
        self.inflight == 0 && !self.batcher.is_empty()
    }

    fn finish_waiter(&self, w: Waiter, outcome: Outcome, now: Instant) {
        self.shared.metrics.downlink_done(
            w.method,
            outcome.code,
            now.saturating_duration_since(w.started),
        );
        let _ = w.reply.send(outcome);
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

/// Wall-clock milliseconds since the Unix epoch (uplink timestamps).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
