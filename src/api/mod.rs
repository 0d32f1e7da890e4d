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
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::model::Access;
use crate::protocol::Code;
use crate::registry::DeviceId;
use crate::session::DownlinkRequest;
use crate::shard::Shared;
use crate::shard::{ReloadError, Server};
use crate::worker::Worker;

/// The running API.
pub struct Api {
    pub addr: SocketAddr,
    worker: Worker,
}

impl Api {
    /// Binds `listen` and serves on a thread of its own.
    pub fn start(server: &Server, listen: SocketAddr) -> io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::clone(&server.shared);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker::spawn("ringlink-api", rt, move |stopped| async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ringlink: API listener: {e}");
                    return;
                }
            };
            let app = router(state);
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                eprintln!("ringlink: API stopped: {e}");
            }
        })?;
        Ok(Self { addr, worker })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(self) {
        self.worker.stop();
    }
}

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
            "ringlink_uplink_log_writes",
            "Group commits written to the local log.",
            log.writes.load(Ordering::Relaxed) as f64,
        ),
        (
            "ringlink_uplink_log_records",
            "Records written to the local log.",
            log.records.load(Ordering::Relaxed) as f64,
        ),
        (
            "ringlink_uplink_log_errors",
            "Failed writes to the local log.",
            log.errors.load(Ordering::Relaxed) as f64,
        ),
        (
            "ringlink_uplink_spool_bytes",
            "Bytes of the local log the external sink has not acknowledged (0 without one).",
            s.spool.as_ref().map_or(0.0, |sp| {
                sp.stats.backlog_bytes.load(Ordering::Relaxed) as f64
            }),
        ),
        (
            "ringlink_uplink_spool_full_refusals",
            "Commits refused because the spool was full (uplink.on_full = block).",
            log.spool_full.load(Ordering::Relaxed) as f64,
        ),
    ];
    let mut text = s.env.metrics.render(&gauges);
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
