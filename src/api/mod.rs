//! The northbound HTTP API (PRODUCT.md): health, readiness, metrics, devices and shadows,
//! downlinks, and a live stream of uplinks.
//!
//! Owns: one thread with a current-thread tokio runtime serving axum. It reads shared state
//! (registry, ownership table, shadows, metrics) and reaches connections only through the mesh:
//! a downlink is a message to the shard that owns the device, answered on a oneshot channel.
//! Never: touches a connection or a session directly.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot, Notify, Semaphore};
use tower::ServiceExt;

use crate::model::Access;
use crate::protocol::Code;
use crate::registry::DeviceId;
use crate::session::DownlinkRequest;
use crate::shard::Shared;
use crate::shard::{ReloadError, Server};
use crate::worker::Worker;

/// How the API serves: where, who may call it, and how much a client may hold.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub listen: SocketAddr,
    /// Bearer token every route but `/healthz`, `/readyz` and `/metrics` needs; `None`: no
    /// authentication (configuration allows that on loopback addresses only).
    pub token: Option<Arc<str>>,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request must be read whole (headers and body) within this long of its connection
    /// becoming idle (accepted, or its previous response sent); an idle connection is closed
    /// after this long.
    pub request_timeout: Duration,
}

impl ApiOptions {
    /// The defaults of `[api]` on `listen`: no token, 1024 connections, 10 s.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            token: None,
            max_connections: 1_024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The API's counters, shown by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ApiStats {
    open: AtomicU64,
    timed_out: AtomicU64,
    evicted: AtomicU64,
    unauthorized: AtomicU64,
}

/// The running API.
pub struct Api {
    pub addr: SocketAddr,
    worker: Worker,
}

impl Api {
    /// Binds `opts.listen` and serves on a thread of its own.
    pub fn start(server: &Server, opts: ApiOptions) -> io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(opts.listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::clone(&server.shared);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker::spawn("ringlink-api", rt, move |stopped| async move {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "API listener");
                    return;
                }
            };
            accept_loop(listener, state, opts, stopped).await;
        })?;
        Ok(Self { addr, worker })
    }

    /// Stops serving and waits for the thread; open API connections are closed.
    pub fn stop(self) {
        self.worker.stop();
    }
}

/// Accepts while a connection slot is free. At the cap, a newcomer takes the slot of the
/// connection idle the longest between requests (so that `/healthz` from a monitor is
/// answered even while idle clients hold every slot); when every connection is busy with a
/// request, the newcomer waits for a slot and later ones wait in the kernel's accept queue.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    opts: ApiOptions,
    mut stopped: oneshot::Receiver<()>,
) {
    let epoch = Instant::now();
    let app = router(Arc::clone(&shared));
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let token = opts.token.clone();
    let timeout = opts.request_timeout;
    // Every connection that may hold a slot; pruned of closed ones when looking for one to evict.
    let mut conns: Vec<Arc<ConnState>> = Vec::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and the like: the kernel keeps the connection queued; try again soon
                // rather than spin.
                tracing::warn!("API accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                conns.retain(|c| !c.closed.load(Ordering::Acquire));
                let now = ms_since(epoch);
                if let Some(victim) = conns
                    .iter()
                    .filter(|c| c.evictable())
                    .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire))
                {
                    tracing::debug!(
                        "API at {} connections: closing one idle for {} ms for a newcomer",
                        opts.max_connections,
                        now.saturating_sub(victim.idle_since_ms.load(Ordering::Acquire))
                    );
                    victim.evict();
                    shared.api_stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                let acquired = tokio::select! {
                    _ = &mut stopped => return,
                    s = Arc::clone(&slots).acquire_owned() => s,
                };
                // The semaphore is never closed.
                let Ok(slot) = acquired else { return };
                slot
            }
        };
        let conn = Arc::new(ConnState::new(ms_since(epoch)));
        conns.push(Arc::clone(&conn));
        let served = Served {
            app: app.clone(),
            shared: Arc::clone(&shared),
            token: token.clone(),
            conn,
            epoch,
            timeout,
        };
        tokio::spawn(async move {
            let _slot = slot;
            served.run(stream).await;
        });
    }
}

/// One API connection and what serving it needs.
struct Served {
    app: Router,
    shared: Arc<Shared>,
    token: Option<Arc<str>>,
    conn: Arc<ConnState>,
    epoch: Instant,
    timeout: Duration,
}

/// Why a connection ended.
enum End {
    Done,
    TimedOut,
    Evicted,
}

impl Served {
    async fn run(self, stream: TcpStream) {
        let shared = Arc::clone(&self.shared);
        let stats = &shared.api_stats;
        stats.open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let conn = Arc::clone(&self.conn);
        let (epoch, timeout) = (self.epoch, self.timeout);
        let this = Arc::new(self);
        let svc = {
            let this = Arc::clone(&this);
            hyper::service::service_fn(move |req| {
                let this = Arc::clone(&this);
                async move { Ok::<_, Infallible>(this.handle(req).await) }
            })
        };
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc);
        let end = tokio::select! {
            r = http => {
                if let Err(e) = r {
                    tracing::debug!("API connection: {e}");
                }
                End::Done
            }
            () = conn.expired(epoch, timeout) => End::TimedOut,
            () = conn.evicted.notified() => End::Evicted,
        };
        // Dropping the connection future above closed the socket. Evictions are counted by
        // the accept loop, which decides them.
        if let End::TimedOut = end {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        conn.closed.store(true, Ordering::Release);
        stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Checks the token, reads the body whole (still under the request deadline), then hands
    /// the request to the router; the connection counts as busy until the response has been
    /// sent.
    async fn handle(&self, req: Request<Incoming>) -> Response {
        if let Some(token) = &self.token {
            if !OPEN_ROUTES.contains(&req.uri().path()) && !authorized(req.headers(), token) {
                self.shared
                    .api_stats
                    .unauthorized
                    .fetch_add(1, Ordering::Relaxed);
                let busy = self.conn.busy(self.epoch);
                return with_guard(unauthorized(), busy);
            }
        }
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let busy = self.conn.busy(self.epoch);
                let msg =
                    format!("cannot read the request body (at most {MAX_BODY_BYTES} bytes): {e}");
                let mut resp = error(Code::InvalidParameter, &msg);
                *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                return with_guard(resp, busy);
            }
        };
        let busy = self.conn.busy(self.epoch);
        let req = Request::from_parts(parts, Body::from(body));
        let resp = match self.app.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        with_guard(resp, busy)
    }
}

/// A response whose body holds `busy` until hyper has taken all of it (or the connection
/// went): only then does the connection's idle time start.
fn with_guard(resp: Response, busy: Busy) -> Response {
    resp.map(|inner| Body::new(Guarded { inner, _busy: busy }))
}

/// A response body and the [`Busy`] guard it holds; its size hint is the inner body's, so
/// that hyper still sends `Content-Length` where it can.
struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the accept loop and a connection's task share about that connection.
///
/// ```text
///   accepted ──▶ idle (deadline = idle_since + timeout) ──request read──▶ busy
///                  ▲                                                       │
///                  └──────────────── response sent (idle_since = now) ◀────┘
/// ```
#[derive(Debug)]
struct ConnState {
    /// Milliseconds since the API's epoch at which the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Requests read whole whose response is not sent yet (0 or 1 with HTTP/1.1).
    busy: AtomicU32,
    /// Set once the accept loop chose to close it.
    evicting: AtomicBool,
    evicted: Notify,
    closed: AtomicBool,
}

impl ConnState {
    fn new(now_ms: u64) -> Self {
        Self {
            idle_since_ms: AtomicU64::new(now_ms),
            busy: AtomicU32::new(0),
            evicting: AtomicBool::new(false),
            evicted: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Between requests (or in the middle of reading one) and not already being closed.
    fn evictable(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
            && !self.evicting.load(Ordering::Acquire)
            && !self.closed.load(Ordering::Acquire)
    }

    fn evict(&self) {
        self.evicting.store(true, Ordering::Release);
        // Stores a permit if the task is not waiting yet.
        self.evicted.notify_one();
    }

    /// Marks a request read whole; the guard marks its response sent when dropped.
    fn busy(self: &Arc<Self>, epoch: Instant) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            conn: Arc::clone(self),
            epoch,
        }
    }

    /// Completes when the connection has been idle for `timeout`: no request read whole and
    /// no response in flight since it became idle. Never completes while busy.
    async fn expired(&self, epoch: Instant, timeout: Duration) {
        loop {
            if self.busy.load(Ordering::Acquire) > 0 {
                // A deadline set while this sleeps is at least `timeout` away, so waking up
                // within `timeout` never misses it.
                tokio::time::sleep(timeout).await;
                continue;
            }
            let idle_since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            let due = epoch + idle_since + timeout;
            if Instant::now() >= due {
                if self.busy.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// A request in progress on a connection; see [`ConnState::busy`].
struct Busy {
    conn: Arc<ConnState>,
    epoch: Instant,
}

impl Drop for Busy {
    fn drop(&mut self) {
        // idle_since first, so that the watchdog never sees idle with a stale start.
        self.conn
            .idle_since_ms
            .store(ms_since(self.epoch), Ordering::Release);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// `Authorization: Bearer <token>` with the right token, compared in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && constant_time_eq(given, token.as_bytes())
}

/// Equal byte strings, in a time that depends on their lengths only, so that a caller cannot
/// find the token a byte at a time by timing answers.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        // Reads b at some index whatever the lengths, so the loop is the same for every guess.
        let y = if b.is_empty() { 0 } else { b[i % b.len()] };
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// 401 with the JSON error body and the challenge.
fn unauthorized() -> Response {
    let mut resp = error(
        Code::InvalidParameter,
        "missing or wrong API token: send Authorization: Bearer <token> (api.token_file)",
    );
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Routes that answer without the token: probes and scrapers carry no secrets.
const OPEN_ROUTES: &[&str] = &["/healthz", "/readyz", "/metrics"];
/// Largest request body read (downlink bodies are small JSON objects).
const MAX_BODY_BYTES: usize = 2 << 20;

fn router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{pk}/{dn}", get(device))
        .route("/v1/devices/{pk}/{dn}/properties/get", post(get_properties))
        .route("/v1/devices/{pk}/{dn}/properties/set", post(set_properties))
        .route("/v1/devices/{pk}/{dn}/services/{id}", post(call_service))
        .route("/v1/uplinks", get(uplinks))
        .route("/v1/registry/reload", post(reload))
        .with_state(state)
}

/// 200 while devices are served, also while an external sink is down and uplinks spool; 503
/// while draining, or while the sink is down and the spool refuses appends (`on_full = "block"`).
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let Some(spool) = &s.spool else {
        return (StatusCode::OK, "ready\n").into_response();
    };
    let up = spool.stats.connected.load(Ordering::Relaxed);
    match (up, spool.is_full()) {
        (true, _) => (StatusCode::OK, "ready\n").into_response(),
        (false, false) => (StatusCode::OK, "ready (sink down, spooling)\n").into_response(),
        (false, true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "sink down and spool full: devices get 100000\n",
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let log = &s.log_stats;
    let gauges = [
        (
            "ringlink_devices_online",
            "Devices online now.",
            s.env.owners.online() as f64,
        ),
        (
            "ringlink_devices_registered",
            "Devices in the registry.",
            s.registry().len() as f64,
        ),
        (
            "ringlink_uplink_log_bytes",
            "Bytes in the local uplink log.",
            log.total_bytes() as f64,
        ),
        (
            "ringlink_uplink_spool_bytes",
            "Bytes of the local log the external sink has not acknowledged (0 without one).",
            s.spool.as_ref().map_or(0.0, |sp| {
                sp.stats.backlog_bytes.load(Ordering::Relaxed) as f64
            }),
        ),
        (
            "ringlink_api_connections_open",
            "Northbound API connections open now.",
            s.api_stats.open.load(Ordering::Relaxed) as f64,
        ),
    ];
    let mut text = s.env.metrics.render(&gauges);
    let counters = [
        (
            "ringlink_uplink_log_writes_total",
            "Group commits written to the local log.",
            &log.writes,
        ),
        (
            "ringlink_uplink_log_records_total",
            "Records written to the local log.",
            &log.records,
        ),
        (
            "ringlink_uplink_log_errors_total",
            "Failed writes to the local log.",
            &log.errors,
        ),
        (
            "ringlink_uplink_spool_full_refusals_total",
            "Commits refused because the spool was full (uplink.on_full = block).",
            &log.spool_full,
        ),
        (
            "ringlink_api_connections_timed_out_total",
            "API connections closed because a request was not read whole, or the connection \
             stayed idle, for api.request_timeout_ms.",
            &s.api_stats.timed_out,
        ),
        (
            "ringlink_api_connections_evicted_total",
            "Idle API connections closed to make room for a newcomer at api.max_connections.",
            &s.api_stats.evicted,
        ),
        (
            "ringlink_api_unauthorized_total",
            "API requests answered 401 (no or wrong Bearer token).",
            &s.api_stats.unauthorized,
        ),
    ];
    for (name, help, n) in counters {
        let n = n.load(Ordering::Relaxed) as f64;
        crate::metrics::write_metric(&mut text, name, "counter", help, n);
    }
    if let Some(spool) = &s.spool {
        crate::sink::render(spool, crate::shard::unix_ms(), &mut text);
    }
    if let Some(cluster) = s.cluster.get() {
        crate::sink::nats::render(cluster, &mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Deserialize)]
struct DeviceFilter {
    online: Option<bool>,
}

async fn devices(
    State(s): State<Arc<Shared>>,
    Query(filter): Query<DeviceFilter>,
) -> Json<Vec<Value>> {
    let registry = s.registry();
    let cluster = s.cluster.get();
    let list = registry
        .ids()
        .filter_map(|id| {
            let local = s.env.owners.owner(id).is_some();
            // With a cluster: online on another node counts too (the list is cluster-wide).
            let remote = (!local)
                .then(|| cluster.and_then(|c| c.remote_owner(id)))
                .flatten();
            let online = local || remote.is_some();
            if filter.online.is_some_and(|want| want != online) {
                return None;
            }
            let mut entry = match remote {
                Some(owner) => json!({
                    "productKey": registry.product_key(id),
                    "deviceName": registry.device_name(id),
                    "online": true,
                    "peer": owner.peer,
                    "since": owner.since,
                    "node": owner.node,
                }),
                None => {
                    let shadow = s.env.shadows.snapshot(id);
                    json!({
                        "productKey": registry.product_key(id),
                        "deviceName": registry.device_name(id),
                        "online": online,
                        "peer": shadow.peer.map(|p| p.to_string()),
                        "since": shadow.since_ms,
                    })
                }
            };
            if let (Some(c), true) = (cluster, local) {
                entry["node"] = Value::from(c.node.as_str());
            }
            Some(entry)
        })
        .collect();
    Json(list)
}

async fn device(State(s): State<Arc<Shared>>, Path((pk, dn)): Path<(String, String)>) -> Response {
    let Some(id) = s.registry().lookup(&pk, &dn) else {
        return error(Code::DeviceNotRegistered, "no such device");
    };
    let shadow = s.env.shadows.snapshot(id);
    let mut properties = Map::new();
    for (key, value, at) in shadow.properties() {
        let key: String = serde_json::from_str(key).unwrap_or_default();
        let value: Value = serde_json::from_str(value).unwrap_or(Value::Null);
        properties.insert(key, json!({"value": value, "time": at}));
    }
    let events: Vec<Value> = shadow
        .events()
        .map(|e| {
            let values: Value = serde_json::from_str(&e.values).unwrap_or(Value::Null);
            json!({"identifier": &*e.identifier, "outputData": values, "time": e.at_ms})
        })
        .collect();
    Json(json!({
        "productKey": pk,
        "deviceName": dn,
        "online": s.env.owners.owner(id).is_some()
            || s.cluster.get().and_then(|c| c.remote_owner(id)).is_some(),
        "peer": shadow.peer.map(|p| p.to_string()),
        "since": shadow.since_ms,
        "properties": properties,
        "events": events,
    }))
    .into_response()
}

async fn get_properties(
    State(s): State<Arc<Shared>>,
    Path((pk, dn)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(id) = s.registry().lookup(&pk, &dn) else {
        return error(Code::DeviceNotRegistered, "no such device");
    };
    let mut list = match field(&body, "properties") {
        Ok(Value::Array(list)) => list,
        Ok(_) => {
            return error(
                Code::InvalidParameter,
                "properties must be an array of identifiers",
            )
        }
        Err(r) => return *r,
    };
    if list.is_empty() {
        // No identifiers: every property that can be read.
        list = s
            .registry()
            .model(id)
            .properties()
            .iter()
            .filter(|p| p.access != Access::Write)
            .map(|p| Value::from(&*p.identifier))
            .collect();
    }
    let params = Value::Array(list).to_string().into_bytes();
    downlink(&s, id, DownlinkRequest::GetProperty, params, "properties").await
}

async fn set_properties(
    State(s): State<Arc<Shared>>,
    Path((pk, dn)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(id) = s.registry().lookup(&pk, &dn) else {
        return error(Code::DeviceNotRegistered, "no such device");
    };
    let params = match field(&body, "properties") {
        Ok(v @ Value::Object(_)) => v.to_string().into_bytes(),
        Ok(_) => return error(Code::InvalidParameter, "properties must be an object"),
        Err(r) => return *r,
    };
    downlink(&s, id, DownlinkRequest::SetProperty, params, "").await
}

async fn call_service(
    State(s): State<Arc<Shared>>,
    Path((pk, dn, service)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(id) = s.registry().lookup(&pk, &dn) else {
        return error(Code::DeviceNotRegistered, "no such device");
    };
    let params = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        match field(&body, "inputData") {
            Ok(v @ Value::Object(_)) => v.to_string().into_bytes(),
            Ok(Value::Null) => Vec::new(),
            Ok(_) => return error(Code::ServiceInputIncorrect, "inputData must be an object"),
            Err(r) => return *r,
        }
    };
    let request = DownlinkRequest::CallService(service.into());
    downlink(&s, id, request, params, "outputData").await
}

/// Sends a downlink to the device's shard and waits for its outcome.
async fn downlink(
    s: &Shared,
    device: DeviceId,
    request: DownlinkRequest,
    params: Vec<u8>,
    data_field: &str,
) -> Response {
    let outcome = s.downlink(device, request, params).await;
    if !outcome.code.is_success() {
        return error(outcome.code, outcome.code.message());
    }
    let mut body = Map::new();
    body.insert("code".into(), Value::from(0));
    if !data_field.is_empty() {
        let data = outcome
            .data
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| Value::Object(Map::new()));
        body.insert(data_field.into(), data);
    }
    Json(Value::Object(body)).into_response()
}

async fn uplinks(
    State(s): State<Arc<Shared>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = s.uplink_feed.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(line) => SseEvent::default().data(&*line),
            // A slow reader skipped records: say how many rather than stall the shards.
            Err(broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(format!("{{\"skipped\":{n}}}")),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `POST /v1/registry/reload`: 200 with `{added, removed, changed, devices, models_changed,
/// took_ms}` (counts of devices, see [`crate::shard::ReloadReport`]) once every shard has
/// swapped; 422 with `{code: 100001, message, errors: [..]}`, every error with its file and
/// line, when a source is invalid (then nothing changed); 503 when the server cannot reload.
async fn reload(State(s): State<Arc<Shared>>) -> Response {
    match s.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(ReloadError::Invalid(errors)) => {
            let n = errors.len();
            let message = format!(
                "{n} error{} in the registry sources; nothing changed",
                if n == 1 { "" } else { "s" }
            );
            let body = json!({
                "code": Code::InvalidParameter.as_u32(),
                "message": message,
                "errors": errors,
            });
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
        Err(ReloadError::Unavailable(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"code": Code::Unknown.as_u32(), "message": why})),
        )
            .into_response(),
    }
}

/// The member `name` of a JSON object body; the error is a 400 with code 100001.
fn field(body: &[u8], name: &str) -> Result<Value, Box<Response>> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            Code::InvalidParameter,
            &format!("body is not JSON: {e}"),
        ))
    })?;
    match v.get_mut(name) {
        Some(f) => Ok(f.take()),
        None => Err(Box::new(error(
            Code::InvalidParameter,
            &format!("body has no \"{name}\""),
        ))),
    }
}

/// A Link error as an HTTP response: `{"code": .., "message": ..}` with a fitting status.
fn error(code: Code, message: &str) -> Response {
    let status = match code {
        Code::DeviceNotRegistered => StatusCode::NOT_FOUND,
        Code::DeviceOffline => StatusCode::CONFLICT,
        Code::InvalidParameter
        | Code::OutOfRange
        | Code::PropertyNotExist
        | Code::PropertyReadOnly
        | Code::PropertyWriteOnly
        | Code::ServiceNotExist
        | Code::ServiceInputIncorrect
        | Code::JsonFormat
        | Code::ParameterType => StatusCode::BAD_REQUEST,
        Code::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Code::ServiceUnreachable | Code::Other(_) => StatusCode::BAD_GATEWAY,
        Code::Unknown | Code::Success => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        Json(json!({"code": code.as_u32(), "message": message})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_header_is_required_with_the_right_token() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("header"));
            h
        };
        assert!(authorized(&with("Bearer tok-1"), "tok-1"));
        assert!(authorized(&with("bearer tok-1"), "tok-1"));
        assert!(!authorized(&with("Bearer tok-2"), "tok-1"));
        assert!(!authorized(&with("Basic tok-1"), "tok-1"));
        assert!(!authorized(&with("Bearer"), "tok-1"));
        assert!(!authorized(&HeaderMap::new(), "tok-1"));
    }
}
