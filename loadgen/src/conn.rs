//! One simulated client connection (a direct device or a sub-gateway) for the whole run:
//! connect (bound to a source address), TLS, WebSocket handshake on `//`, online its devices,
//! report on an open-loop schedule (or, with `closed_loop`, one report in flight at a time),
//! answer the server's requests, reconnect on churn, and at the end offline its devices and
//! close.
//!
//! ```text
//!  connect -> Onlining --all online replies--> Running --deadline or churn--> Grace
//!     ^                                                                        |
//!     |                         (stop: offlineDevice each device)              v
//!     `------------- churn: reconnect ---------------------------------- Closing --> done
//! ```
//!
//! Grace (no new reports, devices already marked offline for the downlink generator, still
//! answering downlinks) lets downlinks that were already on their way arrive before the
//! devices go away; Closing waits for every pending reply so that the server's count and
//! ours agree.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ringlink::protocol::{Decoder, Inbound};
use ringlink::ws::{self, handshake, Event};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::sleep_until;

use crate::device::{self, Device, Served};
use crate::model::Model;
use crate::mqtt::Tracker;
use crate::pace::{self, Pacer, Waiter};
use crate::profile::Profile;
use crate::schedule::Schedule;
use crate::stats::{Hist, Stats};

/// What every connection of one thread shares.
pub struct Ctx {
    pub profile: Arc<Profile>,
    pub model: Arc<Model>,
    pub tls: Option<tokio_rustls::TlsConnector>,
    pub stats: Rc<RefCell<Stats>>,
    pub gauges: Arc<Gauges>,
    pub online: Arc<OnlineSet>,
    pub start: Instant,
    /// Reports meant for before this are not in the latency histograms (`warmup_s`).
    pub measure_from: Instant,
    pub deadline: Instant,
    pub timeout: Duration,
    /// The thread's pacer when the profile asks for `pacing = "spin"`.
    pub pacer: Option<Rc<Pacer>>,
    /// With `mqtt`: the process's send times awaiting their Alink posts.
    pub mqtt: Option<Arc<Mutex<Tracker>>>,
}

/// Process-wide live numbers for the progress line.
#[derive(Default)]
pub struct Gauges {
    pub connected: AtomicU64,
    pub online: AtomicU64,
}

/// Which of this process's devices are online, and since when, by local index, for the
/// downlink generator.
pub struct OnlineSet {
    base: Instant,
    /// 0 = offline; else 1 + the milliseconds from `base` to its acknowledged online.
    since: Vec<AtomicU64>,
}

impl OnlineSet {
    pub fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            since: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.since.len()
    }

    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    pub fn is_online(&self, i: usize) -> bool {
        self.since
            .get(i)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    }

    /// Online, and since at least `settle` before `now`.
    pub fn online_for(&self, i: usize, settle: Duration, now: Instant) -> bool {
        let Some(since) = self.since.get(i).map(|f| f.load(Ordering::Relaxed)) else {
            return false;
        };
        since != 0 && self.base + Duration::from_millis(since - 1) + settle <= now.max(self.base)
    }

    fn set_at(&self, i: usize, on: bool, now: Instant) {
        if let Some(f) = self.since.get(i) {
            let ms = now.saturating_duration_since(self.base).as_millis() as u64;
            f.store(if on { ms + 1 } else { 0 }, Ordering::Relaxed);
        }
    }

    fn set(&self, i: usize, on: bool) {
        self.set_at(i, on, Instant::now());
    }
}

/// One connection's identity and devices; lives across reconnects.
pub struct Slot {
    /// Index among all connections of the run (all processes).
    pub index: u64,
    /// Local (this process) index of its first device in the [`OnlineSet`].
    pub first_local_device: usize,
    pub devices: Vec<Device>,
    /// The server this connection dials: `targets[index % n]`.
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
    /// Churn: asks the connection to close and reconnect.
    pub reconnect: Rc<Notify>,
}

/// Runs one connection until the run's deadline, reconnecting when asked or when it fails.
pub async fn run_slot(ctx: Rc<Ctx>, mut slot: Slot) {
    let mut rng = fastrand::Rng::new();
    // Like the official client: one counter, not reset on reconnect, starting anywhere.
    let mut ids = IdCounter(rng.u32(1..1_000_000));
    let mut first = true;
    loop {
        if Instant::now() >= ctx.deadline {
            return;
        }
        let t0 = Instant::now();
        let connected = tokio::time::timeout(ctx.timeout, connect(&ctx, &slot)).await;
        let (stream, leftover) = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(kind)) => {
                ctx.stats.borrow_mut().error(kind);
                retry_pause(&ctx).await;
                continue;
            }
            Err(_) => {
                ctx.stats.borrow_mut().error("timeout_connect");
                retry_pause(&ctx).await;
                continue;
            }
        };
        {
            let mut s = ctx.stats.borrow_mut();
            s.record(Hist::Connect, micros(t0.elapsed()));
            s.counters.connects += 1;
            if first {
                s.counters.ramp_us = s.counters.ramp_us.max(micros(ctx.start.elapsed()));
            } else {
                s.counters.reconnects += 1;
            }
        }
        first = false;
        ctx.gauges.connected.fetch_add(1, Ordering::Relaxed);
        let end = Session::new(&ctx, &mut slot, stream, leftover, &mut rng, &mut ids)
            .run()
            .await;
        ctx.gauges.connected.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stop => return,
            End::Reconnect => {}
            End::Failed => retry_pause(&ctx).await,
        }
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2+): a socket bound to an address with port 0
/// gets its port at connect time.
// loadgen's one libc call; neither tokio nor socket2 offers this option.
#[allow(unsafe_code)]
fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: the fd is open (owned by `socket`, which outlives the call), and the option value
    // is a c_int that lives across the call, with its exact size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The official client retries about once per second.
async fn retry_pause(ctx: &Ctx) {
    sleep_until(
        (Instant::now() + Duration::from_secs(1))
            .min(ctx.deadline)
            .into(),
    )
    .await;
}

/// TCP (bound to the slot's source address), TLS, WebSocket handshake. Errors are an error
/// kind.
async fn connect(ctx: &Ctx, slot: &Slot) -> Result<(Stream, Vec<u8>), &'static str> {
    let socket = if slot.target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|_| "socket")?;
    if let Some(src) = slot.source {
        // Without this, bind() picks the port by searching for one no socket holds, which
        // with thousands of sockets per address took most of loadgen's CPU and slowed the
        // ramp below 1000 connects/s; connect() picks it instead, by the whole 4-tuple.
        bind_address_no_port(&socket).map_err(|_| "bind")?;
        socket.bind(SocketAddr::new(src, 0)).map_err(|_| "bind")?;
    }
    let tcp = socket.connect(slot.target).await.map_err(|_| "connect")?;
    tcp.set_nodelay(true).map_err(|_| "connect")?;
    let mut stream = match &ctx.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let name = rustls_pki_types::ServerName::IpAddress(slot.target.ip().into());
            let s = tls.connect(name, tcp).await.map_err(|_| "tls")?;
            Stream::Tls(Box::new(s))
        }
    };
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
    let mut buf = Vec::with_capacity(256);
    // Like the official client: `Host: <ip>` without the port, path `//`.
    let host = slot.target.ip().to_string();
    handshake::write_request(
        &mut buf,
        &host,
        "//",
        &key,
        Some(handshake::LINKEDGE_PROTOCOL),
    );
    stream.write_all(&buf).await.map_err(|_| "handshake_io")?;
    let accept = handshake::accept_key(&key);
    buf.clear();
    loop {
        buf.reserve(1024);
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(|_| "handshake_io")?
            == 0
        {
            return Err("handshake_closed");
        }
        match handshake::parse_response(&buf, &accept) {
            Ok(None) => {}
            Ok(Some((protocol, n))) => {
                if protocol.as_deref() != Some(handshake::LINKEDGE_PROTOCOL) {
                    return Err("handshake_subprotocol");
                }
                return Ok((stream, buf.split_off(n)));
            }
            Err(_) => return Err("handshake"),
        }
    }
}

/// How a session ended.
enum End {
    /// The run is over: devices offlined, socket closed.
    Stop,
    /// Churn: closed on purpose, connect again now.
    Reconnect,
    /// The server closed or broke the connection (already counted as an error).
    Failed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Onlining,
    Running,
    Grace { until: Instant, stop: bool },
    Closing { until: Instant, stop: bool },
}

#[derive(Clone, Copy)]
enum Kind {
    Online(usize),
    Offline,
    Report { event: bool, device: usize },
}

struct Pending {
    kind: Kind,
    intended: Instant,
    sent: Instant,
}

/// One socket's life, from a completed handshake to its close.
struct Session<'a> {
    ctx: &'a Ctx,
    slot: &'a mut Slot,
    stream: Stream,
    rng: &'a mut fastrand::Rng,
    ids: &'a mut IdCounter,
    ws: ws::Conn,
    rbuf: Vec<u8>,
    tx: Vec<u8>,
    msg: Vec<u8>,
    scratch: Vec<u8>,
    pending: HashMap<u32, Pending>,
    phase: Phase,
    onlining: usize,
    schedule: Option<Schedule>,
    /// Reports sent and neither answered nor timed out yet.
    reports_in_flight: u64,
    next_device: usize,
    /// Precise waits for report times (`pacing = "spin"`).
    pace: Option<Waiter>,
}

impl<'a> Session<'a> {
    fn new(
        ctx: &'a Ctx,
        slot: &'a mut Slot,
        stream: Stream,
        leftover: Vec<u8>,
        rng: &'a mut fastrand::Rng,
        ids: &'a mut IdCounter,
    ) -> Self {
        Self {
            ctx,
            slot,
            stream,
            rng,
            ids,
            ws: ws::Conn::client(ws::Limits::default()),
            rbuf: leftover,
            tx: Vec::new(),
            msg: Vec::new(),
            scratch: Vec::new(),
            pending: HashMap::new(),
            phase: Phase::Onlining,
            onlining: 0,
            schedule: None,
            reports_in_flight: 0,
            next_device: 0,
            pace: ctx.pacer.as_ref().map(Pacer::waiter),
        }
    }

    async fn run(mut self) -> End {
        let now = Instant::now();
        for k in 0..self.slot.devices.len() {
            self.send_presence("onlineDevice", Kind::Online(k), k, now);
            self.onlining += 1;
        }
        let mut next_sweep = now + Duration::from_secs(1);
        loop {
            if !self.tx.is_empty() {
                if let Err(kind) = self.flush_tx().await {
                    return self.fail(kind);
                }
            }
            let now = Instant::now();
            match self.phase {
                Phase::Grace { until, stop } if now >= until => {
                    for k in 0..self.slot.devices.len() {
                        if self.slot.devices[k].online {
                            self.slot.devices[k].online = false;
                            self.ctx.gauges.online.fetch_sub(1, Ordering::Relaxed);
                            // At the end every device says goodbye; under churn it just
                            // drops, like a real one, and the server offlines it.
                            if stop {
                                self.send_presence("offlineDevice", Kind::Offline, k, now);
                            }
                        }
                    }
                    self.phase = Phase::Closing {
                        until: now + self.ctx.timeout,
                        stop,
                    };
                    continue;
                }
                Phase::Closing { until, stop } if self.pending.is_empty() || now >= until => {
                    self.expire(None);
                    let _ = self.stream.shutdown().await;
                    return if stop { End::Stop } else { End::Reconnect };
                }
                // Checked here, not only in the `select!` below: under saturation the read is
                // always ready and the biased select would never get to the timers.
                Phase::Onlining | Phase::Running if now >= self.ctx.deadline => {
                    self.begin_grace(true);
                    continue;
                }
                Phase::Running if self.schedule.as_ref().is_some_and(|s| s.next() <= now) => {
                    self.send_reports();
                    continue;
                }
                _ => {}
            }
            let report_at = match (&self.schedule, self.phase) {
                (Some(s), Phase::Running) => Some(s.next()),
                _ => None,
            };
            let phase_at = match self.phase {
                Phase::Onlining | Phase::Running => self.ctx.deadline,
                Phase::Grace { until, .. } | Phase::Closing { until, .. } => until,
            };
            let running = matches!(self.phase, Phase::Onlining | Phase::Running);
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                let want = self.ws.wanted_bytes().max(2048);
                self.rbuf.reserve(want);
            }
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.rbuf) => match r {
                    Ok(0) => return self.fail("closed_by_server"),
                    Err(_) => return self.fail("io_read"),
                    Ok(_) => {
                        if let Err(kind) = self.on_input() {
                            let _ = self.stream.write_all(&self.tx).await;
                            return self.fail(kind);
                        }
                    }
                },
                () = pace::wait_until(self.pace.as_ref(), report_at.unwrap_or(now)), if report_at.is_some() => {
                    self.send_reports();
                }
                () = sleep_until(phase_at.into()) => {
                    if running {
                        self.begin_grace(true);
                    }
                }
                () = self.slot.reconnect.notified(), if self.phase == Phase::Running => {
                    self.begin_grace(false);
                }
                () = sleep_until(next_sweep.into()) => {
                    next_sweep = Instant::now() + Duration::from_secs(1);
                    self.expire(Some(self.ctx.timeout));
                }
            }
        }
    }

    /// Writes all of `tx`, reading (and answering) what the server sends meanwhile. A server
    /// that stops reading a connection until its replies are taken (backpressure) would
    /// otherwise wait for this writer while this writer waits for it: both sides stuck with
    /// full socket buffers until the run's deadline.
    async fn flush_tx(&mut self) -> Result<(), &'static str> {
        let mut written = 0;
        while written < self.tx.len() {
            let step = std::future::poll_fn(|cx| {
                match Pin::new(&mut self.stream).poll_write(cx, &self.tx[written..]) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err("io_write")),
                    Poll::Ready(Ok(n)) => return Poll::Ready(Ok(Some(n))),
                    Poll::Pending => {}
                }
                let len = self.rbuf.len();
                self.rbuf.resize(len + 4096, 0);
                let mut rb = ReadBuf::new(&mut self.rbuf[len..]);
                let read = Pin::new(&mut self.stream).poll_read(cx, &mut rb);
                let n = rb.filled().len();
                self.rbuf.truncate(len + n);
                match read {
                    Poll::Ready(Err(_)) => Poll::Ready(Err("io_read")),
                    Poll::Ready(Ok(())) if n == 0 => Poll::Ready(Err("closed_by_server")),
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(None)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            match step {
                Some(n) => written += n,
                None => self.on_input()?,
            }
        }
        self.tx.clear();
        Ok(())
    }

    fn next_id(&mut self) -> u32 {
        self.ids.next()
    }

    fn send_presence(&mut self, method: &str, kind: Kind, k: usize, now: Instant) {
        let id = self.next_id();
        self.scratch.clear();
        device::write_presence(
            &mut self.scratch,
            method,
            id,
            &self.ctx.model.product_key,
            &self.slot.devices[k].name,
        );
        self.ws.send_text(&mut self.tx, &self.scratch);
        self.pending.insert(
            id,
            Pending {
                kind,
                intended: now,
                sent: now,
            },
        );
    }

    /// Stops reporting and hides the devices from the downlink generator; they still answer
    /// what arrives until the grace period ends.
    fn begin_grace(&mut self, stop: bool) {
        for k in 0..self.slot.devices.len() {
            if self.slot.devices[k].online {
                self.ctx.online.set(self.slot.first_local_device + k, false);
            }
        }
        self.phase = Phase::Grace {
            until: Instant::now() + GRACE,
            stop,
        };
    }

    /// Everything due on the report schedule.
    fn send_reports(&mut self) {
        let now = Instant::now();
        let Some(mut schedule) = self.schedule.take() else {
            return;
        };
        for _ in 0..MAX_BURST {
            let Some(intended) = schedule.take_due(now, self.rng) else {
                break;
            };
            if !self.send_report(intended, now) {
                break;
            }
        }
        self.schedule = Some(schedule);
    }

    /// The onlines are done: start the open-loop schedule, or send the first report of the
    /// closed loop.
    fn start_reporting(&mut self, now: Instant) {
        self.phase = Phase::Running;
        if self.ctx.profile.closed_loop {
            self.send_report(now, now);
        } else {
            let online = self.slot.devices.iter().filter(|d| d.online).count();
            let rate = self.ctx.profile.report_rate_per_device * online as f64;
            self.schedule = Schedule::new(now, rate, self.ctx.profile.jitter, self.rng);
        }
    }

    /// Closed loop: the next report as soon as none is in flight, while the run goes on.
    fn next_closed_loop_report(&mut self, now: Instant) {
        if self.ctx.profile.closed_loop
            && self.phase == Phase::Running
            && self.reports_in_flight == 0
            && now < self.ctx.deadline
        {
            self.send_report(now, now);
        }
    }

    /// Sends one report (an event with probability `event_ratio`) for the next online device,
    /// round robin; false when no device is online.
    fn send_report(&mut self, intended: Instant, now: Instant) -> bool {
        let n = self.slot.devices.len();
        let Some(k) = (0..n)
            .map(|i| (self.next_device + i) % n)
            .find(|&k| self.slot.devices[k].online)
        else {
            return false;
        };
        self.next_device = (k + 1) % n;
        let id = self.next_id();
        self.scratch.clear();
        let model = &*self.ctx.model;
        let count = self.ctx.profile.properties_per_report as usize;
        let device = &mut self.slot.devices[k];
        let event = self.rng.f64() < self.ctx.profile.event_ratio
            && device.write_event(model, id, self.rng, &mut self.scratch);
        if !event {
            device.write_report(model, id, count, self.rng, &mut self.scratch);
        }
        self.ws.send_text(&mut self.tx, &self.scratch);
        if let Some(t) = &self.ctx.mqtt {
            if let Ok(mut t) = t.lock() {
                t.sent(&self.slot.devices[k].name, id, now);
            }
        }
        self.pending.insert(
            id,
            Pending {
                kind: Kind::Report { event, device: k },
                intended,
                sent: now,
            },
        );
        self.reports_in_flight += 1;
        let mut stats = self.ctx.stats.borrow_mut();
        stats.counters.reports_sent += 1;
        let max = &mut stats.counters.max_reports_in_flight;
        *max = (*max).max(self.reports_in_flight);
        true
    }

    /// Handles every complete frame in the read buffer.
    fn on_input(&mut self) -> Result<(), &'static str> {
        let mut pos = 0;
        let result = loop {
            let step = match self.ws.read(&mut self.rbuf[pos..], &mut self.tx) {
                Ok(Event::Message { consumed, data, .. }) => {
                    self.msg.clear();
                    self.msg.extend_from_slice(data);
                    pos += consumed;
                    true
                }
                Ok(Event::Consumed(n) | Event::Pong { consumed: n }) => {
                    pos += n;
                    false
                }
                Ok(Event::Closed { consumed, .. }) => {
                    pos += consumed;
                    break Err("closed_by_server");
                }
                Ok(Event::NeedMore) => break Ok(()),
                Err(_) => break Err("ws_protocol"),
            };
            if step {
                self.on_message();
            }
        };
        self.rbuf.drain(..pos);
        result
    }

    fn on_message(&mut self) {
        let now = Instant::now();
        let msg = std::mem::take(&mut self.msg);
        if contains(&msg, b"\"method\"") {
            self.scratch.clear();
            let served = device::serve(
                &mut self.slot.devices,
                &self.ctx.model,
                &msg,
                self.rng,
                &mut self.scratch,
            );
            let mut stats = self.ctx.stats.borrow_mut();
            match served {
                Served::Answered { code, .. } => {
                    stats.counters.downlinks_served += 1;
                    if code != 0 {
                        stats.error("server_request_invalid");
                    }
                }
                Served::Foreign => stats.error("server_request_foreign_device"),
                Served::Unanswerable => stats.error("server_request_unanswerable"),
            }
            drop(stats);
            if !self.scratch.is_empty() {
                self.ws.send_text(&mut self.tx, &self.scratch);
            }
        } else {
            let mut buf = msg;
            let reply = DECODER.with(|d| {
                d.borrow_mut().decode(&mut buf, |r| match r {
                    Ok(Some(Inbound::Reply(rep))) => Some((rep.id, rep.code.as_u32())),
                    _ => None,
                })
            });
            self.msg = buf;
            match reply {
                Some((id, code)) => self.on_reply(id, code, now),
                None => self.ctx.stats.borrow_mut().error("bad_message"),
            }
            return;
        }
        self.msg = msg;
    }

    fn on_reply(&mut self, id: u32, code: u32, now: Instant) {
        let Some(p) = self.pending.remove(&id) else {
            self.ctx.stats.borrow_mut().error("unexpected_reply");
            return;
        };
        if matches!(p.kind, Kind::Report { .. }) {
            self.reports_in_flight -= 1;
        }
        let mut stats = self.ctx.stats.borrow_mut();
        match p.kind {
            Kind::Online(k) => {
                stats.record(Hist::Online, micros(now - p.sent));
                if code == 0 {
                    self.slot.devices[k].online = true;
                    stats.counters.devices_onlined += 1;
                    self.ctx.online.set(self.slot.first_local_device + k, true);
                    self.ctx.gauges.online.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.error(&format!("online_code_{code}"));
                }
                self.onlining = self.onlining.saturating_sub(1);
                if self.onlining == 0 && self.phase == Phase::Onlining {
                    drop(stats);
                    self.start_reporting(now);
                }
            }
            Kind::Offline => {
                if code != 0 {
                    stats.error(&format!("offline_code_{code}"));
                }
            }
            Kind::Report { event, device } => {
                if code == 0 {
                    if event {
                        stats.counters.events_ok += 1;
                    } else {
                        stats.counters.properties_ok += 1;
                    }
                    if now <= self.ctx.deadline {
                        stats.counters.reports_ok_in_time += 1;
                    }
                    if p.intended >= self.ctx.measure_from {
                        stats.record(Hist::Report, micros(now - p.intended));
                        stats.record(Hist::ReportService, micros(now - p.sent));
                    }
                } else {
                    stats.error(&format!("report_code_{code}"));
                    if let Some(Ok(mut t)) = self.ctx.mqtt.as_ref().map(|t| t.lock()) {
                        t.refused(&self.slot.devices[device].name, id);
                    }
                }
                drop(stats);
                self.next_closed_loop_report(now);
            }
        }
    }

    /// Counts pending requests older than `age` (all with `None`) as timeouts.
    fn expire(&mut self, age: Option<Duration>) {
        let now = Instant::now();
        let mut stats = self.ctx.stats.borrow_mut();
        let mut reports = 0;
        self.pending.retain(|_, p| {
            let expired = age.is_none_or(|a| now - p.sent >= a);
            if expired {
                stats.error(match p.kind {
                    Kind::Online(_) => "timeout_online",
                    Kind::Offline => "timeout_offline",
                    Kind::Report { .. } => {
                        reports += 1;
                        "timeout_report"
                    }
                });
            }
            !expired
        });
        drop(stats);
        self.reports_in_flight -= reports;
        self.next_closed_loop_report(now);
        if let Phase::Onlining = self.phase {
            // An online that timed out leaves its device offline; report with the rest.
            let waiting = self
                .pending
                .values()
                .filter(|p| matches!(p.kind, Kind::Online(_)))
                .count();
            if waiting == 0 && self.onlining > 0 {
                self.onlining = 0;
                self.start_reporting(now);
            }
        }
    }

    /// The connection broke: count the error and what was pending, take devices offline.
    fn fail(&mut self, kind: &'static str) -> End {
        let mut stats = self.ctx.stats.borrow_mut();
        stats.error(kind);
        stats.error_n("pending_at_failure", self.pending.len() as u64);
        for k in 0..self.slot.devices.len() {
            if self.slot.devices[k].online {
                self.slot.devices[k].online = false;
                self.ctx.online.set(self.slot.first_local_device + k, false);
                self.ctx.gauges.online.fetch_sub(1, Ordering::Relaxed);
            }
        }
        End::Failed
    }
}

/// Per-connection request ids: 1..=u32::MAX, never 0, wrapping.
struct IdCounter(u32);

impl IdCounter {
    fn next(&mut self) -> u32 {
        self.0 = self.0.checked_add(1).unwrap_or(1);
        self.0
    }
}

/// Plain TCP or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

thread_local! {
    /// One reply decoder per thread: its buffers are reused, connections stay small.
    static DECODER: RefCell<Decoder> = RefCell::new(Decoder::new());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reports sent in one go at most before the socket is written (the rest follow at once).
const MAX_BURST: usize = 256;
/// How long a closing connection keeps answering downlinks before it offlines and closes.
const GRACE: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_set_knows_since_when() {
        let set = OnlineSet::new(3);
        let t0 = set.base;
        assert!(!set.is_online(0) && !set.online_for(0, Duration::ZERO, t0));
        set.set_at(1, true, t0 + Duration::from_millis(100));
        assert!(set.is_online(1));
        let settle = Duration::from_millis(500);
        assert!(!set.online_for(1, settle, t0 + Duration::from_millis(599)));
        assert!(set.online_for(1, settle, t0 + Duration::from_millis(600)));
        assert!(set.online_for(1, Duration::ZERO, t0 + Duration::from_millis(100)));
        set.set_at(1, false, t0 + Duration::from_millis(700));
        assert!(!set.online_for(1, settle, t0 + Duration::from_secs(10)));
        assert!(!set.online_for(7, Duration::ZERO, t0));
    }
}
