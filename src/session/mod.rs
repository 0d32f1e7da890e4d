//! The per-connection state machine: one WebSocket connection of a device or sub-gateway.
//!
//! Owns: the connection's WebSocket state, the devices online on it, its pending downlinks (by
//! messageId, with deadlines), its keepalive timers, and the bytes it must send.
//! Never: sockets, the clock, or state shared with other connections. Ownership across
//! connections (takeover) is decided by the router, which the session talks to through
//! [`Event::Online`] / [`Event::Offline`] and [`Session::handle_taken_over`].
//!
//! # Driving a session
//!
//! ```text
//!   new(ctx, peer, now)
//!     loop {
//!       handle_input(buf, now, shard) -> consumed   // bytes read from the socket
//!       handle_timeout(now)                         // when poll_timeout() has passed
//!       send_downlink(dl, now, shard)               // commands from the router
//!       handle_taken_over(device)                   //
//!       ack(token, code)                            // an uplink's batch is durable
//!       while let Some(e) = poll_event() { .. }     // then, in any order:
//!       poll_transmit(&mut out)                     //   bytes to write
//!       poll_timeout()                              //   when to call handle_timeout next
//!     } until is_closed() and the transmit buffer is flushed
//!   handle_disconnect()                             // the transport went away (EOF, error)
//! ```
//!
//! `now` never goes backwards between calls. Success replies to requests that produce an uplink
//! (online, offline, reports) are held back until the driver calls [`Session::ack`] with the
//! uplink's [`AckToken`], so that nothing acknowledged to a device can be lost. Replies still
//! leave in the order the requests arrived: one that is ready waits behind one held back.

mod devices;
mod downlink;
mod stats;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simd_json::prelude::*;

use crate::limits::{Bucket, Rate};
use crate::model::{DataType, Json, ThingModel, ValueStyle};
use crate::protocol::{self, json, Code, Inbound, Item, Method, Request};
use crate::registry::{DeviceId, Registry};
use crate::ws;

pub use downlink::{Downlink, DownlinkRequest, Outcome};
pub use stats::{Latency, Stats};

use devices::Devices;
use downlink::Pending;

/// Connection-level settings, shared by every session of the process.
#[derive(Debug, Clone)]
pub struct Config {
    pub limits: ws::Limits,
    /// A connection that has not completed its upgrade by then is dropped (slowloris).
    pub handshake_timeout: Duration,
    /// How often ringlink pings each connection.
    pub ping_interval: Duration,
    /// A connection with no pong for this long is closed and its devices go offline.
    pub pong_timeout: Duration,
    /// A downlink with no reply by then completes with 100006.
    pub downlink_timeout: Duration,
    /// A data message whose first byte arrived must be complete by then, or the connection is
    /// closed with 1008 (a peer declaring a large frame and then sending nothing, or dribbling
    /// it, holds a read buffer for only this long).
    pub message_timeout: Duration,
    /// Whether a report for a device online nowhere first onlines it on this connection.
    pub auto_online_on_report: bool,
    /// Messages per second a connection may send (`None`: no limit). Over it the connection
    /// is not read until its bucket refills (see [`Session::wants_input`]).
    pub message_rate: Option<Rate>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: ws::Limits::default(),
            handshake_timeout: Duration::from_millis(5_000),
            ping_interval: Duration::from_millis(30_000),
            pong_timeout: Duration::from_millis(60_000),
            downlink_timeout: Duration::from_millis(8_000),
            message_timeout: Duration::from_millis(5_000),
            auto_online_on_report: false,
            message_rate: None,
        }
    }
}

/// What every session of the process shares: the registry and the settings.
#[derive(Debug)]
pub struct Context {
    pub registry: Arc<Registry>,
    pub config: Config,
}

/// What the router knows beyond this connection: whether a device is online anywhere
/// (auto-online only), and whether it may come online now (flapping).
pub trait Presence: Send + Sync {
    fn is_online(&self, device: DeviceId) -> bool;

    /// `device` is about to come online here at `now`; false refuses it (it is banned for
    /// flapping, see [`crate::limits::Flapping`]). Called only for an actual change: not for
    /// a device already online on this connection.
    fn admit_online(&self, _device: DeviceId, _now: Instant) -> bool {
        true
    }
}

/// A [`Presence`] for a single connection in isolation: nothing is online elsewhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct Alone;

impl Presence for Alone {
    fn is_online(&self, _: DeviceId) -> bool {
        false
    }
}

/// Per-shard scratch state lent to every session of the shard: reusable parser buffers, the
/// shard's counters and its view of presence. One per thread; never shared.
pub struct ShardState {
    pub decoder: protocol::Decoder,
    pub stats: Stats,
    presence: Arc<dyn Presence>,
    /// Scratch for one downlink body (parsed in place).
    scratch: Vec<u8>,
}

impl ShardState {
    pub fn new(presence: Arc<dyn Presence>) -> Self {
        Self {
            decoder: protocol::Decoder::new(),
            stats: Stats::default(),
            presence,
            scratch: Vec::new(),
        }
    }
}

/// What a session asks of its driver, in the order it happened.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A device came online on this connection: the router makes this connection its owner
    /// (taking it from any other connection) and emits an online uplink, then calls
    /// [`Session::ack`] with `ack` when it is durable.
    Online {
        device: DeviceId,
        ack: Option<AckToken>,
    },
    /// This connection gave a device up (offlineDevice, or the connection ended). The router
    /// emits an offline uplink only if this connection still owns it, then acks.
    Offline {
        device: DeviceId,
        ack: Option<AckToken>,
    },
    /// An accepted report to forward upstream; ack `ack` when it is durable.
    Uplink { uplink: Uplink, ack: AckToken },
    /// A downlink finished: answered, rejected before sending, timed out or lost.
    DownlinkDone { token: u64, outcome: Outcome },
}

/// Replies one connection may have waiting for their uplinks before the driver stops reading
/// from it (see [`Session::wants_input`]). A sub-gateway reporting for many devices at once
/// stays well under it; at ~250 bytes a report it is about four full reads.
pub const MAX_HELD_REPLIES: usize = 1024;

pub use crate::ws::MAX_QUEUED_BYTES;

/// Identifies a reply held back until its uplink is durable; see [`Session::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckToken(u64);

/// A property or event report, its values already checked and normalised (Alink style).
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    pub device: DeviceId,
    pub kind: UplinkKind,
    /// A JSON object `{identifier: value}` with normalised values: bool 0/1, float and double
    /// always with a decimal point. A `String`, not a `Box<str>`: an uplink lives for one
    /// turn, and shrinking it to its length would cost a reallocation per report.
    pub values: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkKind {
    Property,
    Event(Box<str>),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent a Close frame.
    PeerClosed(Option<u16>),
    /// The peer broke RFC 6455 (the error's label); the close frame with the code, if any
    /// (none for a refused upgrade: an HTTP error answers it), is in the transmit buffer.
    Protocol(&'static str),
    HandshakeTimeout,
    PongTimeout,
    /// A started data message did not complete within the message timeout (close code 1008).
    MessageTimeout,
    /// The transport went away (EOF, reset, write error).
    Disconnected,
    /// ringlink is shutting down (close code 1001 sent).
    Shutdown,
}

impl CloseReason {
    /// The reasons' names, in the order of [`CloseReason::index`] (metric labels).
    pub const NAMES: [&'static str; 7] = [
        "peer_closed",
        "protocol_error",
        "handshake_timeout",
        "pong_timeout",
        "message_timeout",
        "disconnected",
        "shutdown",
    ];

    /// This reason's position in [`CloseReason::NAMES`].
    pub fn index(&self) -> usize {
        match self {
            Self::PeerClosed(_) => 0,
            Self::Protocol(..) => 1,
            Self::HandshakeTimeout => 2,
            Self::PongTimeout => 3,
            Self::MessageTimeout => 4,
            Self::Disconnected => 5,
            Self::Shutdown => 6,
        }
    }

    /// A stable, low-cardinality label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PeerClosed(_) => "peer_closed",
            Self::Protocol(label) => label,
            Self::HandshakeTimeout => "handshake_timeout",
            Self::PongTimeout => "pong_timeout",
            Self::MessageTimeout => "message_timeout",
            Self::Disconnected => "disconnected",
            Self::Shutdown => "shutdown",
        }
    }
}

/// One WebSocket connection's Link protocol state.
pub struct Session {
    ws: ws::Conn,
    core: Core,
}

/// Everything but the WebSocket framing state, so that a message borrowed from `ws` can be
/// handled while the rest of the session is mutated.
struct Core {
    ctx: Arc<Context>,
    peer: IpAddr,
    tx: Vec<u8>,
    owned: Devices,
    /// Downlinks in flight, if any (boxed: most connections have none most of the time).
    downlinks: Option<Box<downlink::Downlinks>>,
    /// The last server messageId handed out: 1 <= next_id <= 2^31-1.
    next_id: u32,
    events: VecDeque<Event>,
    /// Replies in request order from the oldest one held back for its uplink: `(messageId,
    /// code)`, the code `None` while held. Empty when nothing is held, which is the usual case.
    held: VecDeque<(u32, Option<Code>)>,
    /// The [`AckToken`] of `held[0]`; tokens count every reply ever held.
    held_front: u64,
    /// Before the upgrade (`next_ping` is `None`): its deadline. After it: the message
    /// bucket's theoretical arrival time ([`Bucket`]). One field for both keeps an idle
    /// connection's entry in its allocation class (see the shard core's size test).
    clock: Option<Instant>,
    /// While a data message is incomplete (after the upgrade): when it must be complete.
    message_deadline: Option<Instant>,
    /// Set once the upgrade completed.
    next_ping: Option<Instant>,
    last_pong: Instant,
    /// Why it ended, once it has. Boxed: allocated once per connection, at its end, it keeps
    /// 16 bytes out of every open connection's entry (see the shard core's size test).
    ended: Option<Box<CloseReason>>,
    /// Over the message rate: not read until the bucket refills.
    rate_paused: bool,
}

impl Session {
    /// A new server connection from `peer`, accepted at `now`.
    pub fn new(ctx: Arc<Context>, peer: IpAddr, now: Instant) -> Self {
        let ws = ws::Conn::server(ctx.config.limits);
        let handshake_deadline = Some(now + ctx.config.handshake_timeout);
        Self {
            ws,
            core: Core {
                ctx,
                peer,
                tx: Vec::new(),
                owned: Devices::default(),
                downlinks: None,
                next_id: 0,
                events: VecDeque::new(),
                held: VecDeque::new(),
                held_front: 0,
                clock: handshake_deadline,
                message_deadline: None,
                next_ping: None,
                last_pong: now,
                ended: None,
                rate_paused: false,
            },
        }
    }

    /// Handles bytes received from the socket; returns how many were consumed. The caller keeps
    /// the rest and presents it again, with more bytes appended, on the next call. Complete
    /// frames are unmasked and decoded in place, so `input` is modified.
    ///
    /// Over the message rate ([`Config::message_rate`]) it stops at the message boundary and
    /// consumes nothing more until the bucket has refilled: the caller keeps the rest and
    /// presents it again when [`wants_input`](Self::wants_input) turns true, even if no new
    /// bytes arrived.
    pub fn handle_input(
        &mut self,
        input: &mut [u8],
        now: Instant,
        shard: &mut ShardState,
    ) -> usize {
        let mut consumed = 0;
        let mut completed = false;
        while self.core.ended.is_none() && !self.core.rate_paused {
            let event = self.ws.read(&mut input[consumed..], &mut self.core.tx);
            match event {
                Ok(ws::Event::NeedMore) => break,
                Ok(ws::Event::Consumed(n)) => {
                    consumed += n;
                    if self.core.next_ping.is_none() && self.ws.is_open() {
                        self.core.opened(now);
                    }
                }
                Ok(ws::Event::Message {
                    consumed: n, data, ..
                }) => {
                    consumed += n;
                    completed = true;
                    // Counted, then handled; the one that uses the burst up pauses the
                    // connection: the bytes after it wait with the driver (and the socket).
                    if let Some(rate) = &self.core.ctx.config.message_rate {
                        let mut bucket = self.core.bucket();
                        if bucket.take(rate, now).is_some() {
                            self.core.rate_paused = true;
                        }
                        self.core.clock = bucket.tat();
                    }
                    self.core.handle_message(data, now, shard);
                }
                Ok(ws::Event::Pong { consumed: n }) => {
                    consumed += n;
                    self.core.last_pong = now;
                }
                Ok(ws::Event::Closed { consumed: n, code }) => {
                    consumed += n;
                    self.core.end(CloseReason::PeerClosed(code));
                }
                Err(e) => {
                    shard.stats.ws_errors += 1;
                    self.core.end(CloseReason::Protocol(e.as_str()));
                }
            }
        }
        self.track_message(consumed < input.len(), completed, now);
        consumed
    }

    /// Starts or ends the message deadline after an input: a message is started while bytes
    /// of a frame wait in the caller's buffer or a fragmented message is open. The clock
    /// restarts only when a message completed, so dribbling frames of one message (or a
    /// frame's bytes) does not extend it, while a steady stream of messages never trips it.
    /// While the connection is paused for its message rate, the bytes left over are ours to
    /// read, not the peer's to finish: no deadline then.
    fn track_message(&mut self, partial: bool, completed: bool, now: Instant) {
        let core = &mut self.core;
        if core.ended.is_some() || core.next_ping.is_none() {
            return;
        }
        if core.rate_paused {
            core.message_deadline = None;
        } else if partial || self.ws.in_message() {
            if completed || core.message_deadline.is_none() {
                core.message_deadline = Some(now + core.ctx.config.message_timeout);
            }
        } else {
            core.message_deadline = None;
        }
    }

    /// Handles the passage of time: handshake timeout, pings, pong timeout, downlink timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        let core = &mut self.core;
        if core.ended.is_some() {
            return;
        }
        if core.rate_paused {
            if let Some(rate) = &core.ctx.config.message_rate {
                core.rate_paused = core.bucket().resume_at(rate, now).is_some();
            }
        }
        if core.handshake_deadline().is_some_and(|d| now >= d) {
            core.end(CloseReason::HandshakeTimeout);
            return;
        }
        if core.message_deadline.is_some_and(|d| now >= d) {
            self.ws.close(&mut core.tx, 1008, "message timeout");
            core.end(CloseReason::MessageTimeout);
            return;
        }
        if core.next_ping.is_some() && now >= core.last_pong + core.ctx.config.pong_timeout {
            core.end(CloseReason::PongTimeout);
            return;
        }
        if let Some(at) = core.next_ping.filter(|&at| now >= at) {
            self.ws.send_ping(&mut core.tx, b"");
            let interval = core.ctx.config.ping_interval;
            // Skip the pings missed while the driver was late rather than sending a burst.
            let mut next = at + interval;
            while next <= now {
                next += interval;
            }
            core.next_ping = Some(next);
        }
        core.expire_downlinks(now);
    }

    /// The transport is gone (EOF, reset, error): devices go offline, downlinks fail (100008).
    pub fn handle_disconnect(&mut self) {
        self.core.end(CloseReason::Disconnected);
    }

    /// The registry was reloaded: `ctx` holds the new one, and the next message is checked
    /// against it (its devices and thing models). Device ids of the old registry keep their
    /// meaning in the new one (see [`crate::registry`]); devices it removed are handed to
    /// [`Session::handle_removed`] as well.
    pub fn set_context(&mut self, ctx: Arc<Context>) {
        self.core.ctx = ctx;
    }

    /// A reload removed `device` from the registry: if it is online here it goes offline
    /// ([`Event::Offline`], no reply held); its next message here gets 109000 like any unknown
    /// device's. Downlinks already pending for it finish or time out as usual.
    pub fn handle_removed(&mut self, device: DeviceId) {
        if self.core.ended.is_none() && self.core.owned.remove(device) {
            self.core
                .events
                .push_back(Event::Offline { device, ack: None });
        }
    }

    /// The router moved `device` to another connection: this one no longer owns it. Nothing is
    /// emitted; downlinks already pending for it here finish or time out here.
    pub fn handle_taken_over(&mut self, device: DeviceId) {
        self.core.owned.remove(device);
    }

    /// The uplink (or online/offline) behind `token` is durable (`Code::Success`) or could not
    /// be kept (an error code): its reply can go, after the replies to earlier requests.
    pub fn ack(&mut self, token: AckToken, code: Code) {
        if self.core.ended.is_none() {
            self.core.resolve(token, code);
        }
    }

    /// Sends a downlink to a device on this connection. It always completes with exactly one
    /// [`Event::DownlinkDone`]: at once when it fails validation (nothing is sent), else on the
    /// device's reply, on timeout or when the connection ends.
    pub fn send_downlink(&mut self, downlink: Downlink, now: Instant, shard: &mut ShardState) {
        self.core.send_downlink(downlink, now, shard);
    }

    /// Starts closing for shutdown: close code 1001, then every device goes offline.
    pub fn shutdown(&mut self) {
        if self.core.ended.is_none() {
            if self.ws.is_open() {
                self.ws.close(&mut self.core.tx, 1001, "going away");
            }
            self.core.end(CloseReason::Shutdown);
        }
    }

    /// The next thing the driver must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.core.events.pop_front();
        if self.core.events.is_empty() {
            // An idle connection keeps no queue memory (see `poll_transmit`).
            self.core.events = VecDeque::new();
        }
        event
    }

    /// Moves the bytes to send into `out`; returns whether there were any. When `out` has no
    /// buffer of its own the session's buffer is handed over, so no bytes are copied. Either
    /// way the session keeps no buffer afterwards: an idle connection holds no transmit memory.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.core.tx.is_empty() {
            return false;
        }
        if out.capacity() == 0 {
            *out = std::mem::take(&mut self.core.tx);
        } else {
            out.extend_from_slice(&self.core.tx);
            self.core.tx = Vec::new();
        }
        true
    }

    /// Whether the driver should read more from this connection. False while
    /// [`MAX_HELD_REPLIES`] replies wait for their uplinks to become durable (the uplink
    /// writer is behind) or [`MAX_QUEUED_BYTES`] wait to be sent (the peer is not reading):
    /// the driver stops reading, the socket's receive window fills and the peer slows down,
    /// instead of the gateway queueing without bound. Also false while the connection is over
    /// its message rate ([`Config::message_rate`]) until [`poll_timeout`](Self::poll_timeout)
    /// says the bucket has refilled. The driver asks again whenever the connection is flagged
    /// (replies released, the rate pause over) and after each write.
    pub fn wants_input(&self) -> bool {
        self.core.held.len() < MAX_HELD_REPLIES
            && self.core.tx.len() < MAX_QUEUED_BYTES
            && !self.core.rate_paused
    }

    /// Whether the connection is not read because it is over its message rate.
    pub fn is_rate_paused(&self) -> bool {
        self.core.rate_paused
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has bytes to give.
    pub fn has_transmit(&self) -> bool {
        !self.core.tx.is_empty()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = &self.core;
        if c.ended.is_some() {
            return None;
        }
        let pong = c.next_ping.map(|_| c.last_pong + c.ctx.config.pong_timeout);
        let resume = match (&c.ctx.config.message_rate, c.rate_paused) {
            (Some(rate), true) => c.bucket().refilled_at(rate),
            _ => None,
        };
        [
            resume,
            c.handshake_deadline(),
            c.message_deadline,
            c.next_ping,
            pong,
            c.downlinks
                .as_ref()
                .and_then(|d| d.deadlines.front())
                .map(|d| d.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the connection is over: after the transmit buffer is flushed, the driver shuts
    /// the socket down. [`Event`]s may still be waiting.
    pub fn is_closed(&self) -> bool {
        self.core.ended.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.core.ended.as_deref()
    }

    /// The code of the Close frame that ended the connection, the peer's or ours, when there
    /// was one with a code (kept by the WebSocket layer, so that the reason stays small).
    pub fn close_code(&self) -> Option<u16> {
        match self.core.ended.as_deref() {
            Some(CloseReason::PeerClosed(code)) => *code,
            Some(_) => self.ws.close_sent(),
            None => None,
        }
    }

    /// Whether the WebSocket upgrade is done and the connection not closing.
    pub fn is_open(&self) -> bool {
        self.ws.is_open() && self.core.ended.is_none()
    }

    /// The devices online on this connection.
    pub fn devices(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.core.owned.iter()
    }

    pub fn peer(&self) -> IpAddr {
        self.core.peer
    }

    /// How many bytes the read buffer should hold for the frame being received.
    pub fn wanted_bytes(&self) -> usize {
        self.ws.wanted_bytes()
    }

    /// Downlinks sent and not yet finished.
    pub fn pending_downlinks(&self) -> usize {
        self.core.pending_downlinks()
    }
}

impl Core {
    /// Until the upgrade completes.
    fn handshake_deadline(&self) -> Option<Instant> {
        self.next_ping.is_none().then_some(self.clock).flatten()
    }

    /// The message bucket (full until the upgrade completes).
    fn bucket(&self) -> Bucket {
        Bucket::at(self.next_ping.and(self.clock))
    }

    fn opened(&mut self, now: Instant) {
        self.clock = None; // from now on the message bucket: full
        self.last_pong = now;
        self.next_ping = Some(now + self.ctx.config.ping_interval);
    }

    fn handle_message(&mut self, data: &mut [u8], now: Instant, shard: &mut ShardState) {
        let ShardState {
            decoder,
            stats,
            presence,
            ..
        } = shard;
        decoder.decode(data, |decoded| match decoded {
            Ok(None) => {}
            Ok(Some(Inbound::Request(req))) => {
                let outcome = self.handle_request(&req, presence.as_ref(), now);
                stats.count_request(Some(req.method), outcome.unwrap_or(Code::Success));
                // `None`: answered by ack() once the uplink is durable.
                if let Some(code) = outcome {
                    self.reply(req.id, code);
                }
            }
            Ok(Some(Inbound::Reply(reply))) => {
                if !self.complete_downlink(&reply) {
                    stats.replies_unmatched += 1;
                }
            }
            Err(reject) => {
                stats.count_request(None, reject.code);
                self.reply(reject.id, reject.code);
            }
        });
    }

    /// The per-method checks of PROTOCOL.md section 7. `Some(code)` is the reply to send now;
    /// `None` means an uplink with an `ack` was emitted and the reply waits for it.
    fn handle_request(
        &mut self,
        req: &Request<'_, '_>,
        presence: &dyn Presence,
        now: Instant,
    ) -> Option<Code> {
        let registry = Arc::clone(&self.ctx.registry);
        let Some(device) = registry.lookup(req.product_key, req.device_name) else {
            return Some(Code::DeviceNotRegistered);
        };
        match req.method {
            Method::OnlineDevice => {
                if !registry.allows_peer(device, self.peer) {
                    return Some(Code::DeviceNotRegistered);
                }
                if self.owned.contains(device) {
                    return Some(Code::Success); // already online here: nothing changes
                }
                if !presence.admit_online(device, now) {
                    // Banned for flapping. 109000 is the code ringlink already answers when
                    // a registered device may not come online (clientIp mismatch); the SDK
                    // treats any non-zero code as "not online" and retries later.
                    return Some(Code::DeviceNotRegistered);
                }
                self.owned.insert(device);
                let ack = Some(self.hold_reply(req.id));
                self.events.push_back(Event::Online { device, ack });
                None
            }
            Method::OfflineDevice => {
                if !self.owned.remove(device) {
                    return Some(Code::Success); // not online here: idempotent
                }
                let ack = Some(self.hold_reply(req.id));
                self.events.push_back(Event::Offline { device, ack });
                None
            }
            Method::ReportProperty | Method::ReportEvent => {
                if !self.owned.contains(device) {
                    let auto = self.ctx.config.auto_online_on_report
                        && registry.allows_peer(device, self.peer)
                        && !presence.is_online(device)
                        && presence.admit_online(device, now);
                    if !auto {
                        return Some(Code::DeviceOffline);
                    }
                    self.owned.insert(device);
                    self.events.push_back(Event::Online { device, ack: None });
                }
                let model = registry.model(device);
                let checked = if req.method == Method::ReportProperty {
                    check_property_report(model, req.payload)
                } else {
                    check_event_report(model, req.payload)
                };
                match checked {
                    Ok((kind, values)) => {
                        let uplink = Uplink {
                            device,
                            kind,
                            values,
                        };
                        let ack = self.hold_reply(req.id);
                        self.events.push_back(Event::Uplink { uplink, ack });
                        None
                    }
                    Err(code) => Some(code),
                }
            }
        }
    }

    /// Sends a reply now, or queues it behind replies still held back.
    fn reply(&mut self, id: u32, code: Code) {
        if self.held.is_empty() {
            self.write_reply(id, code);
        } else {
            self.held.push_back((id, Some(code)));
        }
    }

    /// Holds a reply back until [`Self::resolve`]; returns the token that resolves it.
    fn hold_reply(&mut self, id: u32) -> AckToken {
        let token = AckToken(self.held_front + self.held.len() as u64);
        self.held.push_back((id, None));
        token
    }

    /// Sets the code of a held reply and sends every reply that is ready at the front.
    fn resolve(&mut self, token: AckToken, code: Code) {
        let Some(index) = token.0.checked_sub(self.held_front) else {
            return; // already sent
        };
        if let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| self.held.get_mut(i))
        {
            slot.1.get_or_insert(code);
        }
        while let Some(&(id, Some(code))) = self.held.front() {
            self.held.pop_front();
            self.held_front += 1;
            self.write_reply(id, code);
        }
        if self.held.is_empty() {
            self.held = VecDeque::new();
        }
    }

    fn write_reply(&mut self, id: u32, code: Code) {
        ws::encode::write_frame_with(&mut self.tx, ws::frame::Opcode::Text, None, |out| {
            protocol::write_reply(out, id, code);
        });
    }

    /// Appends one TEXT frame carrying `payload`.
    fn send_text(&mut self, payload: &[u8]) {
        ws::encode::write_frame(&mut self.tx, ws::frame::Opcode::Text, true, None, payload);
    }

    /// Ends the connection once: every owned device goes offline, every pending downlink fails
    /// with 100008.
    fn end(&mut self, reason: CloseReason) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(Box::new(reason));
        let owned = self.owned.take_sorted();
        self.events.extend(
            owned
                .into_iter()
                .map(|device| Event::Offline { device, ack: None }),
        );
        let mut pending: Vec<(u32, Pending)> = self
            .downlinks
            .take()
            .map(|d| d.pending.into_iter().collect())
            .unwrap_or_default();
        pending.sort_unstable_by_key(|(id, _)| *id);
        for (_, p) in pending {
            self.events.push_back(Event::DownlinkDone {
                token: p.token,
                outcome: Outcome::failed(Code::ServiceUnreachable),
            });
        }
    }
}

/// Checks a reportProperty payload; returns the normalised values to forward.
fn check_property_report(model: &ThingModel, payload: Json<'_, '_>) -> Result<Uplinked, Code> {
    let items = payload
        .get("properties")
        .and_then(|p| p.as_array())
        .filter(|a| !a.is_empty())
        .ok_or(Code::InvalidParameter)?;
    let values = collect_items(items.iter(), |item| {
        model
            .check_report_item(item.identifier, item.kind, item.value)
            .map(|p| &p.data_type)
    })?;
    Ok((UplinkKind::Property, values))
}

/// Checks a reportEvent payload; returns the event and the normalised values to forward.
fn check_event_report(model: &ThingModel, payload: Json<'_, '_>) -> Result<Uplinked, Code> {
    let identifier = payload
        .get("identifier")
        .and_then(|v| v.into_string())
        .ok_or(Code::InvalidParameter)?;
    let items = payload
        .get("outputData")
        .and_then(|v| v.as_array())
        .ok_or(Code::InvalidParameter)?;
    // The built-in `post` event is not a user event: `model.event` has no entry for it.
    let event = model.event(identifier).ok_or(Code::InvalidParameter)?;
    let values = collect_items(items.iter(), |item| {
        model
            .check_event_item(event, item.identifier, item.kind, item.value)
            .map(|p| &p.data_type)
    })?;
    Ok((UplinkKind::Event(identifier.into()), values))
}

type Uplinked = (UplinkKind, String);

/// Checks every item and writes `{identifier: value, ...}` with values normalised for upstream.
///
/// All items are checked before anything is forwarded. The checks go level by level
/// (well-formed, identifier, type, range): when several items fail, the failure that comes
/// first in PROTOCOL.md's table decides, whichever item it is.
fn collect_items<'t, 'i, 'm>(
    items: impl Iterator<Item = Json<'t, 'i>>,
    mut check: impl FnMut(&Item<'t, 'i>) -> Result<&'m DataType, Code>,
) -> Result<String, Code>
where
    'i: 't,
{
    let mut failure: Option<Code> = None;
    let mut values = Vec::with_capacity(64);
    values.push(b'{');
    for v in items {
        let checked = Item::parse(v)
            .ok_or(Code::InvalidParameter)
            .and_then(|item| check(&item).map(|ty| (item, ty)));
        match checked {
            Ok((item, ty)) if failure.is_none() => {
                if values.len() > 1 {
                    values.push(b',');
                }
                json::write_str(&mut values, item.identifier);
                values.push(b':');
                ty.write_value(item.value, ValueStyle::Alink, &mut values);
            }
            Ok(_) => {}
            Err(code) => {
                failure = Some(downlink::first_check(failure, code));
            }
        }
    }
    if let Some(code) = failure {
        return Err(code);
    }
    values.push(b'}');
    Ok(into_string(values))
}

/// The position of a report check in PROTOCOL.md's table: lower is checked first.
fn check_rank(code: Code) -> u8 {
    match code {
        Code::InvalidParameter => 0,
        Code::PropertyNotExist => 1,
        Code::PropertyReadOnly | Code::PropertyWriteOnly => 2,
        Code::ParameterType => 3,
        Code::OutOfRange => 4,
        _ => 5,
    }
}

/// The writers only ever produce UTF-8 (JSON text of UTF-8 strings).
fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests;
