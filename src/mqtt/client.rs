//! The sans-IO MQTT 3.1.1 client: one session with one broker, across many transports.
//!
//! Owns: the connection state of the current transport (CONNECT sent, CONNACK received), the
//! input buffer (at most one partial packet), the queue of bytes to send, the QoS 1 in-flight
//! window (packet ids, the caller's tags, the encoded PUBLISH of each, kept across transports
//! and re-sent after every CONNACK), the remembered subscriptions, the keep-alive timers and the
//! counters. Never: sockets, the clock, channels, threads, retries of a failed dial (the driver
//! decides when to call [`Client::connect`] again).
//!
//! # Driving a client
//!
//! ```text
//!   new(opts)
//!   loop {                                        // one iteration per transport
//!     connect(now)                                // the transport is up: CONNECT is queued
//!     loop {
//!       handle_input(now, bytes)?                 // bytes read, split anywhere
//!       handle_timeout(now)                       // when poll_timeout() has passed
//!       publish(..) / subscribe(..)               // whenever the application wants
//!       while let Some(e) = poll_event() { .. }   // Event::Lost: drop the transport
//!       poll_transmit(now, &mut out)              // then write `out` to the transport
//!     } until the transport fails, handle_input errs, or Event::Lost
//!     disconnected()                              // keeps the in-flight window
//!   }
//! ```
//!
//! Delivery guarantee: a QoS 1 publish stays in the window, with its packet id, until the
//! broker's PUBACK for that id arrives on some transport; after each successful CONNACK every
//! publish still in the window is sent again in its original order (DUP set if it had been sent
//! before) before anything new. So every tag given to [`Client::publish`] comes back exactly
//! once as [`Event::Acked`], however often the transport or the broker restarts, unless the
//! client itself is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

use super::codec::{self, CodecError, Connect, Packet, QoS, ReturnCode};

/// Session and limit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Client identifier; must be stable for `clean_session: false` to mean anything.
    pub client_id: String,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password, if the broker wants one (sent with an empty user name if `username` is None).
    pub password: Option<Vec<u8>>,
    /// Keep-alive interval; `Duration::ZERO` turns it off. Sent in whole seconds (at least 1,
    /// at most 65535), and the timers use that rounded value.
    pub keep_alive: Duration,
    /// Ask the broker for a fresh session on every CONNECT.
    pub clean_session: bool,
    /// Largest incoming packet, fixed header included; a larger one is a protocol error.
    pub max_packet: usize,
    /// QoS 1 publishes that may await their PUBACK at once (1..=65535; clamped).
    pub inflight: u16,
    /// Time from [`Client::connect`] to CONNACK before [`Event::Lost`]; zero = no limit.
    pub connect_timeout: Duration,
}

impl Options {
    /// Defaults for a client id: keep-alive 30 s, clean session, 1 MiB packets, a window of
    /// 64, 10 s to CONNACK, no credentials.
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            max_packet: 1 << 20,
            inflight: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What the application learns from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// CONNACK accepted the connection; the window and subscriptions have been queued again.
    Connected {
        /// The broker kept our session (only possible with `clean_session: false`).
        session_present: bool,
    },
    /// CONNACK refused the connection; the broker closes the transport.
    Refused {
        /// The return code; its `Display` says what it means.
        code: ReturnCode,
    },
    /// The broker acknowledged the QoS 1 publish that was given this tag.
    Acked(u64),
    /// An application message from a subscription (a QoS 1 one has been acknowledged).
    Message {
        /// Topic name.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// QoS of the delivery.
        qos: QoS,
        /// Retained message.
        retain: bool,
    },
    /// SUBACK: the granted QoS per requested filter, `None` = refused.
    Subscribed {
        /// In the order of the SUBSCRIBE's filters.
        granted: Vec<Option<QoS>>,
    },
    /// The transport must be dropped (timeout); call [`Client::disconnected`] afterwards.
    Lost(&'static str),
}

/// The broker broke the protocol; the caller drops the transport and calls
/// [`Client::disconnected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Bytes that are not a valid packet (or one larger than `max_packet`).
    #[error("malformed packet from the broker: {0}")]
    Codec(#[from] CodecError),
    /// A valid packet at the wrong time or in the wrong direction.
    #[error("protocol violation by the broker: {0}")]
    Protocol(&'static str),
}

/// Why [`Client::publish`] refused a message; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The QoS 1 window is full: wait for an [`Event::Acked`].
    #[error("the QoS 1 in-flight window is full")]
    Full,
    /// QoS 0 needs an accepted connection.
    #[error("not connected (QoS 0 is never queued)")]
    NotConnected,
    /// The topic is not a valid topic name.
    #[error("invalid topic name: {0}")]
    Topic(CodecError),
    /// The packet would exceed the 256 MiB MQTT maximum.
    #[error("message too large for MQTT")]
    TooLarge,
}

/// Counters since [`Client::new`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Publishes accepted by [`Client::publish`] (QoS 0 and 1).
    pub published: u64,
    /// PUBACKs that completed a QoS 1 publish.
    pub acked: u64,
    /// QoS 1 publishes sent again (with DUP) after a reconnect.
    pub resent: u64,
    /// PUBACKs or SUBACKs for a packet id we did not have in flight (ignored).
    pub unknown_acks: u64,
    /// PUBLISH packets received.
    pub messages_in: u64,
    /// PINGREQs queued (keep-alive).
    pub pings: u64,
    /// PINGRESPs received.
    pub pongs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No transport, or it is condemned (error, timeout, refusal, DISCONNECT queued).
    Down,
    /// CONNECT queued at `since`, waiting for CONNACK.
    Connecting { since: Instant },
    /// CONNACK 0 received.
    Up,
}

/// One QoS 1 publish awaiting its PUBACK.
#[derive(Debug)]
struct Entry {
    pkid: u16,
    tag: u64,
    /// The encoded PUBLISH; DUP is set in `bytes[0]` once it has been sent.
    bytes: Vec<u8>,
    /// Sent on some transport (so a re-send is a possible duplicate).
    sent: bool,
}

const DUP: u8 = 0b1000;

/// The sans-IO MQTT client. See the module docs for the calling sequence.
#[derive(Debug)]
pub struct Client {
    opts: Options,
    keep_alive: Duration,
    state: State,
    /// At most one partial packet of the current transport.
    rx: Vec<u8>,
    /// Bytes for the current transport, not yet handed to the driver.
    tx: Vec<u8>,
    events: VecDeque<Event>,
    /// In-flight QoS 1 publishes by submission order.
    window: BTreeMap<u64, Entry>,
    by_pkid: FxHashMap<u16, u64>,
    next_seq: u64,
    next_pkid: u16,
    /// Every filter ever subscribed, with its QoS (the latest wins).
    subscriptions: Vec<(String, QoS)>,
    /// SUBSCRIBEs waiting for a free packet id (only with a window of ~65535).
    sub_unsent: VecDeque<Vec<(String, QoS)>>,
    /// Packet ids of SUBSCRIBEs awaiting their SUBACK on this transport.
    sub_pending: FxHashSet<u16>,
    /// When bytes were last handed to the driver.
    last_sent: Instant,
    /// When the outstanding PINGREQ was queued.
    ping_sent: Option<Instant>,
    stats: Stats,
}

impl Client {
    /// A client with no transport yet.
    pub fn new(opts: Options) -> Self {
        let keep_alive = if opts.keep_alive.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs(opts.keep_alive.as_secs().clamp(1, u64::from(u16::MAX)))
        };
        Self {
            opts,
            keep_alive,
            state: State::Down,
            rx: Vec::new(),
            tx: Vec::new(),
            events: VecDeque::new(),
            window: BTreeMap::new(),
            by_pkid: FxHashMap::default(),
            next_seq: 0,
            next_pkid: 1,
            subscriptions: Vec::new(),
            sub_unsent: VecDeque::new(),
            sub_pending: FxHashSet::default(),
            last_sent: Instant::now(),
            ping_sent: None,
            stats: Stats::default(),
        }
    }

    /// The settings.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// A new transport is up: queues CONNECT. Whatever the previous transport left (partial
    /// input, unsent bytes, pending SUBSCRIBEs) is dropped; the QoS 1 window is kept and sent
    /// again after a successful CONNACK, followed by every remembered subscription.
    pub fn connect(&mut self, now: Instant) {
        self.reset_transport();
        self.state = State::Connecting { since: now };
        self.last_sent = now;
        let connect = Packet::Connect(Connect {
            client_id: self.opts.client_id.clone(),
            clean_session: self.opts.clean_session,
            keep_alive: self.keep_alive.as_secs() as u16,
            username: self.opts.username.clone(),
            password: self.opts.password.clone(),
        });
        codec::encode(&connect, &mut self.tx);
    }

    /// The transport is gone (EOF, error, a timeout, a refusal). Keeps the in-flight window
    /// and the subscriptions. Idempotent.
    pub fn disconnected(&mut self) {
        self.reset_transport();
    }

    fn reset_transport(&mut self) {
        self.state = State::Down;
        self.rx = Vec::new();
        self.tx.clear();
        self.sub_unsent.clear();
        self.sub_pending.clear();
        self.ping_sent = None;
    }

    /// Whether CONNACK with return code 0 arrived on the current transport.
    pub fn is_connected(&self) -> bool {
        self.state == State::Up
    }

    /// Bytes read from the transport, split anywhere. Queues PUBACKs for inbound QoS 1
    /// messages and yields events. An error is a protocol violation by the broker: drop the
    /// transport and call [`Client::disconnected`]. Input without a live transport is ignored.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), ClientError> {
        let _ = now;
        if self.state == State::Down {
            return Ok(());
        }
        let result = self.read(data);
        if result.is_err() {
            self.state = State::Down;
        }
        result
    }

    fn read(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        let max = self.opts.max_packet;
        // Complete the partial packet first, taking only the bytes it needs.
        while !self.rx.is_empty() && !data.is_empty() {
            let want = match codec::packet_len(&self.rx, max)? {
                Some(size) => size - self.rx.len(),
                None => 1,
            };
            let take = want.min(data.len());
            self.rx.reserve_exact(take);
            self.rx.extend_from_slice(&data[..take]);
            data = &data[take..];
            let rx = std::mem::take(&mut self.rx);
            match codec::decode(&rx, max)? {
                Some((packet, _)) => self.handle_packet(packet)?,
                None => self.rx = rx,
            }
            if self.state == State::Down {
                // Refused: the rest of this transport's bytes do not matter.
                self.rx.clear();
                return Ok(());
            }
        }
        while !data.is_empty() {
            match codec::decode(data, max)? {
                Some((packet, n)) => {
                    data = &data[n..];
                    self.handle_packet(packet)?;
                }
                None => {
                    self.rx.extend_from_slice(data);
                    break;
                }
            }
            if self.state == State::Down {
                self.rx.clear();
                break;
            }
        }
        Ok(())
    }

    fn handle_packet(&mut self, packet: Packet) -> Result<(), ClientError> {
        self.ping_sent = None;
        match (self.state, packet) {
            (State::Down, _) => {}
            (
                State::Connecting { .. },
                Packet::ConnAck {
                    session_present,
                    code,
                },
            ) => {
                if code != 0 {
                    self.state = State::Down;
                    self.events.push_back(Event::Refused {
                        code: ReturnCode(code),
                    });
                    return Ok(());
                }
                self.state = State::Up;
                self.events.push_back(Event::Connected { session_present });
                for entry in self.window.values_mut() {
                    if entry.sent {
                        entry.bytes[0] |= DUP;
                        self.stats.resent += 1;
                    }
                    entry.sent = true;
                    self.tx.extend_from_slice(&entry.bytes);
                }
                if !self.subscriptions.is_empty() {
                    self.sub_unsent.push_back(self.subscriptions.clone());
                    self.flush_subscribes();
                }
            }
            (State::Connecting { .. }, _) => {
                return Err(ClientError::Protocol("a packet before CONNACK"));
            }
            (State::Up, Packet::ConnAck { .. }) => {
                return Err(ClientError::Protocol("a second CONNACK"));
            }
            (State::Up, Packet::Publish(p)) => {
                self.stats.messages_in += 1;
                if p.qos == QoS::AtLeastOnce {
                    codec::encode(&Packet::PubAck { pkid: p.pkid }, &mut self.tx);
                }
                self.events.push_back(Event::Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                });
            }
            (State::Up, Packet::PubAck { pkid }) => {
                let sent = self
                    .by_pkid
                    .get(&pkid)
                    .is_some_and(|seq| self.window[seq].sent);
                if !sent {
                    self.stats.unknown_acks += 1;
                    return Ok(());
                }
                let seq = self.by_pkid.remove(&pkid).expect("checked");
                let entry = self.window.remove(&seq).expect("indexed");
                debug_assert_eq!(entry.pkid, pkid);
                self.stats.acked += 1;
                self.events.push_back(Event::Acked(entry.tag));
                if !self.sub_unsent.is_empty() {
                    self.flush_subscribes();
                }
            }
            (State::Up, Packet::SubAck { pkid, granted }) => {
                if self.sub_pending.remove(&pkid) {
                    self.events.push_back(Event::Subscribed { granted });
                } else {
                    self.stats.unknown_acks += 1;
                }
            }
            (State::Up, Packet::PingResp) => self.stats.pongs += 1,
            (
                State::Up,
                Packet::Connect(_)
                | Packet::Subscribe { .. }
                | Packet::PingReq
                | Packet::Disconnect,
            ) => {
                return Err(ClientError::Protocol(
                    "a client-to-broker packet from the broker",
                ))
            }
        }
        Ok(())
    }

    /// Publishes `payload` on `topic`. QoS 1 takes a slot of the window (else
    /// [`PublishError::Full`] and nothing changes) and `tag` comes back as [`Event::Acked`];
    /// it is accepted while disconnected and sent after the next CONNACK. QoS 0 is sent now or
    /// refused with [`PublishError::NotConnected`]. Never retained.
    pub fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        tag: u64,
    ) -> Result<(), PublishError> {
        codec::check_topic_name(topic).map_err(PublishError::Topic)?;
        let size = codec::publish_size(topic, payload.len(), qos).ok_or(PublishError::TooLarge)?;
        match qos {
            QoS::AtMostOnce => {
                if !self.is_connected() {
                    return Err(PublishError::NotConnected);
                }
                codec::encode_publish(&mut self.tx, topic, payload, qos, 0, false, false);
            }
            QoS::AtLeastOnce => {
                if self.window_free() == 0 {
                    return Err(PublishError::Full);
                }
                let pkid = self.alloc_pkid().ok_or(PublishError::Full)?;
                let mut bytes = Vec::with_capacity(size);
                codec::encode_publish(&mut bytes, topic, payload, qos, pkid, false, false);
                let sent = self.is_connected();
                if sent {
                    self.tx.extend_from_slice(&bytes);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.by_pkid.insert(pkid, seq);
                self.window.insert(
                    seq,
                    Entry {
                        pkid,
                        tag,
                        bytes,
                        sent,
                    },
                );
            }
        }
        self.stats.published += 1;
        Ok(())
    }

    /// A packet id in use neither by a publish in flight nor by a pending SUBSCRIBE.
    fn alloc_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_pkid;
            self.next_pkid = id.checked_add(1).unwrap_or(1);
            if !self.by_pkid.contains_key(&id) && !self.sub_pending.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// QoS 1 publishes awaiting their PUBACK (sent or not).
    pub fn inflight(&self) -> usize {
        self.window.len()
    }

    /// Free slots of the QoS 1 window.
    pub fn window_free(&self) -> usize {
        usize::from(self.opts.inflight.max(1)).saturating_sub(self.window.len())
    }

    /// Subscribes to topic filters: remembered for every later connection and sent now if
    /// connected. Each filter is checked (not empty, no U+0000, at most 65535 bytes); nothing is
    /// remembered if one is invalid. Subscribing to a filter again replaces its QoS.
    pub fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Result<(), CodecError> {
        if filters.is_empty() {
            return Err(CodecError::NoFilters("SUBSCRIBE"));
        }
        for (f, _) in filters {
            codec::check_filter(f)?;
        }
        for &(f, q) in filters {
            match self.subscriptions.iter_mut().find(|(s, _)| s == f) {
                Some(s) => s.1 = q,
                None => self.subscriptions.push((f.to_owned(), q)),
            }
        }
        if self.is_connected() {
            let request = filters.iter().map(|&(f, q)| (f.to_owned(), q)).collect();
            self.sub_unsent.push_back(request);
            self.flush_subscribes();
        }
        Ok(())
    }

    fn flush_subscribes(&mut self) {
        while !self.sub_unsent.is_empty() {
            let Some(pkid) = self.alloc_pkid() else {
                return;
            };
            let filters = self.sub_unsent.pop_front().expect("not empty");
            self.sub_pending.insert(pkid);
            codec::encode(&Packet::Subscribe { pkid, filters }, &mut self.tx);
        }
    }

    /// The next event, in the order they happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Moves every queued outgoing byte into `out` (appending) and notes `now` as the time of
    /// the last send for the keep-alive. Returns whether it appended anything.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        if self.tx.is_empty() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut self.tx);
        } else {
            out.append(&mut self.tx);
        }
        self.last_sent = now;
        true
    }

    /// When [`Client::handle_timeout`] must be called next: the CONNACK deadline, the next
    /// keep-alive PINGREQ, or the deadline of the outstanding PINGREQ's answer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Down => None,
            State::Connecting { since } => {
                (!self.opts.connect_timeout.is_zero()).then(|| since + self.opts.connect_timeout)
            }
            State::Up if self.keep_alive.is_zero() => None,
            State::Up => Some(match self.ping_sent {
                Some(at) => at + self.pong_wait(),
                None => self.last_sent + self.keep_alive,
            }),
        }
    }

    /// How long a PINGREQ may go unanswered: half the keep-alive, at least one second.
    fn pong_wait(&self) -> Duration {
        (self.keep_alive / 2).max(Duration::from_secs(1))
    }

    /// Time has passed: may queue a PINGREQ, or yield [`Event::Lost`] (no CONNACK in time, no
    /// answer to a PINGREQ in time), after which the caller drops the transport and calls
    /// [`Client::disconnected`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        match self.state {
            State::Down => {}
            State::Connecting { .. } => self.lose("no CONNACK within connect_timeout"),
            State::Up if self.ping_sent.is_some() => {
                self.lose("no answer to PINGREQ within the keep-alive");
            }
            State::Up => {
                codec::encode(&Packet::PingReq, &mut self.tx);
                self.ping_sent = Some(now);
                self.stats.pings += 1;
            }
        }
    }

    fn lose(&mut self, reason: &'static str) {
        self.state = State::Down;
        self.events.push_back(Event::Lost(reason));
    }

    /// Queues DISCONNECT (clean shutdown) if a transport is up; the caller writes it and closes
    /// the transport. The in-flight window is kept for a later [`Client::connect`].
    pub fn disconnect(&mut self) {
        if self.state != State::Down {
            codec::encode(&Packet::Disconnect, &mut self.tx);
        }
        self.state = State::Down;
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::Publish;

    fn opts() -> Options {
        Options {
            keep_alive: Duration::from_secs(10),
            inflight: 4,
            ..Options::new("c1")
        }
    }

    fn enc(packets: &[Packet]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            codec::encode(p, &mut out);
        }
        out
    }

    /// Every packet the client queued, decoded.
    fn sent(c: &mut Client, now: Instant) -> Vec<Packet> {
        let mut buf = Vec::new();
        c.poll_transmit(now, &mut buf);
        let mut packets = Vec::new();
        let mut rest = &buf[..];
        while let Some((p, n)) = codec::decode(rest, usize::MAX).expect("client sends valid MQTT") {
            packets.push(p);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        packets
    }

    fn events(c: &mut Client) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn connack(session_present: bool) -> Packet {
        Packet::ConnAck {
            session_present,
            code: 0,
        }
    }

    /// A connected client at `t0`, its CONNECT and the Connected event consumed.
    fn connected(o: Options, t0: Instant) -> Client {
        let mut c = Client::new(o);
        c.connect(t0);
        assert!(matches!(sent(&mut c, t0)[..], [Packet::Connect(_)]));
        c.handle_input(t0, &enc(&[connack(false)])).unwrap();
        assert_eq!(
            events(&mut c),
            [Event::Connected {
                session_present: false
            }]
        );
        c
    }

    fn publish_in(topic: &str, qos: QoS, pkid: u16) -> Packet {
        Packet::Publish(Publish {
            topic: topic.into(),
            payload: b"down".to_vec(),
            qos,
            pkid,
            dup: false,
            retain: false,
        })
    }

    /// `(pkid, dup)` of the PUBLISH packets among `packets`.
    fn publishes(packets: &[Packet]) -> Vec<(u16, bool)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.pkid, p.dup)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connect_sends_the_options_and_connack_connects() {
        let t0 = Instant::now();
        let mut c = Client::new(Options {
            username: Some("u".into()),
            password: Some(b"p".to_vec()),
            clean_session: false,
            ..opts()
        });
        assert!(!c.is_connected());
        c.connect(t0);
        assert_eq!(
            sent(&mut c, t0),
            [Packet::Connect(Connect {
                client_id: "c1".into(),
                clean_session: false,
                keep_alive: 10,
                username: Some("u".into()),
                password: Some(b"p".to_vec()),
            })]
        );
        assert!(!c.is_connected());
        c.handle_input(t0, &enc(&[connack(true)])).unwrap();
        assert!(c.is_connected());
        assert_eq!(
            events(&mut c),
            [Event::Connected {
                session_present: true
            }]
        );
    }

    #[test]
    fn refused_connack_is_an_event_with_a_text() {
        let t0 = Instant::now();
        let mut c = Client::new(opts());
        c.connect(t0);
        let refused = Packet::ConnAck {
            session_present: false,
            code: 5,
        };
        c.handle_input(t0, &enc(&[refused])).unwrap();
        assert!(!c.is_connected());
        let ev = events(&mut c);
        assert_eq!(
            ev,
            [Event::Refused {
                code: ReturnCode(5)
            }]
        );
        let Event::Refused { code } = &ev[0] else {
            unreachable!()
        };
        assert_eq!(code.to_string(), "5 (not authorized)");
    }

    #[test]
    fn publish_and_ack_return_tags_and_unknown_acks_are_counted() {
        let t0 = Instant::now();
        let mut c = connected(opts(), t0);
        for tag in [10, 11, 12] {
            c.publish("up/a", b"x", QoS::AtLeastOnce, tag).unwrap();
        }
        assert_eq!(
            publishes(&sent(&mut c, t0)),
            [(1, false), (2, false), (3, false)]
        );
        assert_eq!(c.inflight(), 3);
        c.handle_input(t0, &enc(&[Packet::PubAck { pkid: 2 }]))
            .unwrap();
        assert_eq!(events(&mut c), [Event::Acked(11)]);
        c.handle_input(
            t0,
            &enc(&[Packet::PubAck { pkid: 2 }, Packet::PubAck { pkid: 99 }]),
        )
        .unwrap();
        assert_eq!(events(&mut c), []);
        c.handle_input(
            t0,
            &enc(&[Packet::PubAck { pkid: 3 }, Packet::PubAck { pkid: 1 }]),
        )
        .unwrap();
        assert_eq!(events(&mut c), [Event::Acked(12), Event::Acked(10)]);
        let st = c.stats();
        assert_eq!((st.published, st.acked, st.unknown_acks), (3, 3, 2));
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn a_full_window_refuses_and_changes_nothing() {
        let t0 = Instant::now();
        let mut c = connected(opts(), t0);
        for tag in 0..4 {
            c.publish("t", b"", QoS::AtLeastOnce, tag).unwrap();
        }
        assert_eq!(c.window_free(), 0);
        assert_eq!(
            c.publish("t", b"", QoS::AtLeastOnce, 9),
            Err(PublishError::Full)
        );
        assert_eq!(publishes(&sent(&mut c, t0)).len(), 4);
        assert_eq!((c.inflight(), c.stats().published), (4, 4));
        // QoS 0 does not use the window.
        c.publish("t", b"", QoS::AtMostOnce, 0).unwrap();
        c.handle_input(t0, &enc(&[Packet::PubAck { pkid: 1 }]))
            .unwrap();
        assert_eq!(c.window_free(), 1);
        c.publish("t", b"", QoS::AtLeastOnce, 9).unwrap();
    }

    #[test]
    fn invalid_publishes_are_refused() {
        let t0 = Instant::now();
        let mut c = Client::new(opts());
        assert_eq!(
            c.publish("t", b"", QoS::AtMostOnce, 0),
            Err(PublishError::NotConnected)
        );
        assert_eq!(
            c.publish("a/+", b"", QoS::AtLeastOnce, 0),
            Err(PublishError::Topic(CodecError::WildcardInTopic))
        );
        assert_eq!(
            c.publish("", b"", QoS::AtLeastOnce, 0),
            Err(PublishError::Topic(CodecError::EmptyTopic))
        );
        assert_eq!(c.inflight(), 0);
        // QoS 1 while disconnected is queued, sent after CONNACK.
        c.publish("t", b"", QoS::AtLeastOnce, 5).unwrap();
        c.connect(t0);
        assert!(matches!(sent(&mut c, t0)[..], [Packet::Connect(_)]));
        c.handle_input(t0, &enc(&[connack(false)])).unwrap();
        assert_eq!(publishes(&sent(&mut c, t0)), [(1, false)]);
    }

    #[test]
    fn window_is_resent_in_order_with_dup_after_reconnect() {
        let t0 = Instant::now();
        let mut c = connected(
            Options {
                inflight: 8,
                ..opts()
            },
            t0,
        );
        for tag in 0..4 {
            c.publish("t", &[tag as u8], QoS::AtLeastOnce, tag).unwrap();
        }
        assert_eq!(publishes(&sent(&mut c, t0)).len(), 4);
        c.handle_input(t0, &enc(&[Packet::PubAck { pkid: 2 }]))
            .unwrap();
        // Transport dies mid-packet; one more publish while down.
        c.handle_input(t0, &[0x40]).unwrap();
        c.disconnected();
        assert!(!c.is_connected());
        c.publish("t", &[9], QoS::AtLeastOnce, 9).unwrap();
        assert!(sent(&mut c, t0).is_empty());
        c.connect(t0);
        // Nothing but CONNECT before CONNACK.
        assert!(matches!(sent(&mut c, t0)[..], [Packet::Connect(_)]));
        c.handle_input(t0, &enc(&[connack(false)])).unwrap();
        let again = sent(&mut c, t0);
        assert_eq!(
            publishes(&again),
            [(1, true), (3, true), (4, true), (5, false)]
        );
        let payloads: Vec<_> = again
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.payload[0],
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(payloads, [0, 2, 3, 9]);
        assert_eq!(c.stats().resent, 3);
        // The old partial PUBACK was dropped with the transport: a whole one acks.
        c.handle_input(t0, &enc(&[Packet::PubAck { pkid: 5 }]))
            .unwrap();
        assert_eq!(
            events(&mut c),
            [
                Event::Acked(1),
                Event::Connected {
                    session_present: false
                },
                Event::Acked(9)
            ]
        );
    }

    #[test]
    fn packet_ids_are_never_reused_while_in_flight() {
        let t0 = Instant::now();
        let mut c = connected(
            Options {
                inflight: 3,
                ..opts()
            },
            t0,
        );
        c.publish("t", b"", QoS::AtLeastOnce, 0).unwrap(); // pkid 1 stays in flight
        assert_eq!(publishes(&sent(&mut c, t0)), [(1, false)]);
        let mut seen_one = 0;
        for tag in 1..=70_000u64 {
            c.publish("t", b"", QoS::AtLeastOnce, tag).unwrap();
            let [(pkid, _)] = publishes(&sent(&mut c, t0))[..] else {
                panic!("one publish");
            };
            assert_ne!(pkid, 0);
            seen_one += usize::from(pkid == 1);
            c.handle_input(t0, &enc(&[Packet::PubAck { pkid }]))
                .unwrap();
        }
        assert_eq!(seen_one, 0);
        assert_eq!(c.inflight(), 1);
    }

    #[test]
    fn subscriptions_are_remembered_and_replayed() {
        let t0 = Instant::now();
        let mut c = Client::new(opts());
        c.subscribe(&[("down/#", QoS::AtLeastOnce)]).unwrap();
        assert_eq!(
            c.subscribe(&[("", QoS::AtMostOnce)]),
            Err(CodecError::EmptyTopic)
        );
        c.connect(t0);
        sent(&mut c, t0);
        c.handle_input(t0, &enc(&[connack(false)])).unwrap();
        assert_eq!(
            sent(&mut c, t0),
            [Packet::Subscribe {
                pkid: 1,
                filters: vec![("down/#".into(), QoS::AtLeastOnce)]
            }]
        );
        c.subscribe(&[("cmd/+", QoS::AtMostOnce)]).unwrap();
        assert_eq!(
            sent(&mut c, t0),
            [Packet::Subscribe {
                pkid: 2,
                filters: vec![("cmd/+".into(), QoS::AtMostOnce)]
            }]
        );
        let suback = Packet::SubAck {
            pkid: 1,
            granted: vec![Some(QoS::AtLeastOnce)],
        };
        c.handle_input(t0, &enc(&[suback.clone(), suback])).unwrap();
        assert_eq!(
            events(&mut c)[1..],
            [Event::Subscribed {
                granted: vec![Some(QoS::AtLeastOnce)]
            }]
        );
        assert_eq!(c.stats().unknown_acks, 1);
        // Reconnect (even with a session present): every filter again, in one SUBSCRIBE.
        c.disconnected();
        c.connect(t0);
        sent(&mut c, t0);
        c.handle_input(t0, &enc(&[connack(true)])).unwrap();
        assert_eq!(
            sent(&mut c, t0),
            [Packet::Subscribe {
                pkid: 3,
                filters: vec![
                    ("down/#".into(), QoS::AtLeastOnce),
                    ("cmd/+".into(), QoS::AtMostOnce)
                ]
            }]
        );
    }

    #[test]
    fn inbound_qos1_is_acknowledged_and_qos0_is_not() {
        let t0 = Instant::now();
        let mut c = connected(opts(), t0);
        c.handle_input(
            t0,
            &enc(&[
                publish_in("down/1", QoS::AtLeastOnce, 77),
                publish_in("down/0", QoS::AtMostOnce, 0),
            ]),
        )
        .unwrap();
        assert_eq!(sent(&mut c, t0), [Packet::PubAck { pkid: 77 }]);
        assert_eq!(
            events(&mut c),
            [
                Event::Message {
                    topic: "down/1".into(),
                    payload: b"down".to_vec(),
                    qos: QoS::AtLeastOnce,
                    retain: false
                },
                Event::Message {
                    topic: "down/0".into(),
                    payload: b"down".to_vec(),
                    qos: QoS::AtMostOnce,
                    retain: false
                }
            ]
        );
        assert_eq!(c.stats().messages_in, 2);
    }

    #[test]
    fn keep_alive_pings_when_idle_and_loses_without_answer() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = connected(opts(), t0);
        assert_eq!(c.poll_timeout(), Some(t0 + s(10)));
        // Traffic postpones the ping.
        c.publish("t", b"", QoS::AtMostOnce, 0).unwrap();
        sent(&mut c, t0 + s(4));
        assert_eq!(c.poll_timeout(), Some(t0 + s(14)));
        c.handle_timeout(t0 + s(13));
        assert!(sent(&mut c, t0 + s(13)).is_empty());
        c.handle_timeout(t0 + s(14));
        assert_eq!(sent(&mut c, t0 + s(14)), [Packet::PingReq]);
        // Answer within keep_alive / 2.
        assert_eq!(c.poll_timeout(), Some(t0 + s(19)));
        c.handle_input(t0 + s(15), &enc(&[Packet::PingResp]))
            .unwrap();
        assert_eq!(c.poll_timeout(), Some(t0 + s(24)));
        c.handle_timeout(t0 + s(24));
        assert_eq!(sent(&mut c, t0 + s(24)), [Packet::PingReq]);
        c.handle_timeout(t0 + s(28));
        assert_eq!(events(&mut c), []);
        c.handle_timeout(t0 + s(29));
        assert_eq!(
            events(&mut c),
            [Event::Lost("no answer to PINGREQ within the keep-alive")]
        );
        assert!(!c.is_connected());
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn short_keep_alive_waits_at_least_a_second_for_the_answer() {
        let t0 = Instant::now();
        let mut c = connected(
            Options {
                keep_alive: Duration::from_secs(1),
                ..opts()
            },
            t0,
        );
        c.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(sent(&mut c, t0), [Packet::PingReq]);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn no_connack_in_time_is_lost() {
        let t0 = Instant::now();
        let mut c = Client::new(opts());
        c.connect(t0);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        c.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(
            events(&mut c),
            [Event::Lost("no CONNACK within connect_timeout")]
        );
        // Late bytes of the condemned transport are ignored.
        c.handle_input(t0, &enc(&[connack(false)])).unwrap();
        assert!(!c.is_connected());
    }

    #[test]
    fn input_split_at_every_byte_gives_the_same_events() {
        let t0 = Instant::now();
        let stream = enc(&[
            connack(false),
            publish_in("down/x", QoS::AtLeastOnce, 5),
            Packet::PubAck { pkid: 1 },
            Packet::SubAck {
                pkid: 2,
                granted: vec![None],
            },
            Packet::PingResp,
            publish_in("down/y", QoS::AtMostOnce, 0),
        ]);
        let run = |chunks: &[&[u8]]| {
            let mut c = Client::new(opts());
            c.publish("up", b"1", QoS::AtLeastOnce, 42).unwrap();
            c.subscribe(&[("down/#", QoS::AtLeastOnce)]).unwrap();
            c.connect(t0);
            for chunk in chunks {
                c.handle_input(t0, chunk).unwrap();
                assert!(c.rx.len() < 64, "one partial packet at most");
            }
            assert!(c.rx.is_empty());
            (events(&mut c), sent(&mut c, t0))
        };
        let whole = run(&[&stream]);
        assert_eq!(whole.0.len(), 5);
        for i in 0..=stream.len() {
            assert_eq!(run(&[&stream[..i], &stream[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole);
    }

    #[test]
    fn oversize_packets_are_refused_from_their_header() {
        let t0 = Instant::now();
        let mut c = connected(
            Options {
                max_packet: 64,
                ..opts()
            },
            t0,
        );
        let big = enc(&[Packet::Publish(Publish {
            payload: vec![0; 100],
            ..match publish_in("d", QoS::AtMostOnce, 0) {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        })]);
        c.handle_input(t0, &big[..1]).unwrap();
        assert_eq!(
            c.handle_input(t0, &big[1..2]),
            Err(ClientError::Codec(CodecError::TooLarge {
                size: 105,
                max: 64
            }))
        );
        assert!(!c.is_connected());
    }

    #[test]
    fn broker_protocol_violations_are_errors() {
        let t0 = Instant::now();
        let mut c = Client::new(opts());
        c.connect(t0);
        assert_eq!(
            c.handle_input(t0, &enc(&[Packet::PingResp])),
            Err(ClientError::Protocol("a packet before CONNACK"))
        );
        let mut c = connected(opts(), t0);
        assert_eq!(
            c.handle_input(t0, &enc(&[connack(false)])),
            Err(ClientError::Protocol("a second CONNACK"))
        );
        let mut c = connected(opts(), t0);
        assert!(c.handle_input(t0, &enc(&[Packet::PingReq])).is_err());
        let mut c = connected(opts(), t0);
        assert!(matches!(
            c.handle_input(t0, &[0x34, 5, 0, 1, b'a', 0, 1]),
            Err(ClientError::Codec(CodecError::Qos2Unsupported))
        ));
    }

    #[test]
    fn disconnect_queues_disconnect_and_keeps_the_window() {
        let t0 = Instant::now();
        let mut c = connected(opts(), t0);
        c.publish("t", b"", QoS::AtLeastOnce, 1).unwrap();
        c.disconnect();
        let out = sent(&mut c, t0);
        assert_eq!(out.last(), Some(&Packet::Disconnect));
        assert!(!c.is_connected());
        assert_eq!(c.inflight(), 1);
    }
}
