//! The upstream Alink mapping of the MQTT sink (PROTOCOL.md section 13): uplink records to
//! Alink topics and request bodies, Alink downlink requests to ringlink downlinks, and their
//! replies.
//!
//! Owns: topic names (with the configured prefix), request and reply bodies, the code mapping
//! (Link 0 is Alink 200; every other code passes through with its section-6 text), and the
//! subscriptions that cover the registry's products. Never: IO, the clock, message ids (the
//! caller numbers requests), device state.
//!
//! ```text
//!   uplink record {"kind":"property","values":{"t":21.0}}  ─▶ /sys/{pk}/{dn}/thing/event/property/post
//!                                                              {"id":"7","version":"1.0","params":{"t":{"value":21.0,"time":..}},"method":"thing.event.property.post"}
//!   uplink record {"kind":"event","event":"alarm",..}      ─▶ /sys/{pk}/{dn}/thing/event/alarm/post
//!   uplink record {"kind":"online"|"offline"}              ─▶ /as/mqtt/status/{pk}/{dn}   {"status":"online",..}
//!
//!   /sys/{pk}/{dn}/thing/service/property/set {"id":"9","params":{"power":1},..}  ─▶ setProperty
//!       reply /sys/{pk}/{dn}/thing/service/property/set_reply {"id":"9","code":200,"data":{},"message":"success"}
//!   /sys/{pk}/{dn}/thing/service/property/get {"params":["power"]}                ─▶ getProperty
//!   /sys/{pk}/{dn}/thing/service/{S}          {"params":{..}}                     ─▶ callService S
//!   /sys/{pk}/{dn}/rrpc/request/{rrpcId}      {"method":"thing.service.S",..}     ─▶ the same, reply on rrpc/response/{rrpcId}
//! ```
//!
//! Online and offline are sub-device login and logout on the gateway's session topics
//! (`/ext/session/{gwPK}/{gwDN}/combine/login|logout`, after a `thing/topo/add` of every device
//! with a secret when the forwarder first connects) for devices whose secret is configured
//! ([`Gateway`]): a login is signed with the device's secret, which the WebSocket protocol never
//! carries. Devices without one go to the device status topic of Alibaba Cloud IoT's data
//! forwarding (`/as/mqtt/status/{pk}/{dn}`).
//!
//! Values are copied verbatim: the session already wrote them the Alink way (float and double
//! with a decimal point, bool as 0/1).

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::protocol::{json, Code};
use crate::session::DownlinkRequest;
use crate::uplink::{decode_line, OwnedRecord, RecordKind, UplinkError};

/// The Alink request `method` of an uplink record.
fn method(rec: &OwnedRecord) -> String {
    match (&rec.kind, &rec.event) {
        (RecordKind::Event, Some(event)) => format!("thing.event.{event}.post"),
        _ => "thing.event.property.post".to_owned(),
    }
}

/// `(productKey, deviceName)` to deviceSecret.
pub type Secrets = HashMap<(String, String), String>;

/// The gateway whose session sub-devices log in through, and the secrets of those that do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gateway {
    pub product_key: String,
    pub device_name: String,
    pub secrets: Secrets,
}

impl Gateway {
    fn secret(&self, pk: &str, dn: &str) -> Option<&str> {
        self.secrets
            .get(&(pk.to_owned(), dn.to_owned()))
            .map(String::as_str)
    }
}

/// Reads a secrets file: `productKey,deviceName,deviceSecret` per line; a first line starting
/// with `productKey` is a header, blank lines and `#` lines are skipped, fields are trimmed.
/// Every bad line is returned with its 1-based number.
pub fn parse_secrets(text: &str) -> Result<Secrets, Vec<(usize, String)>> {
    let mut out = HashMap::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if i == 0 && fields[0].eq_ignore_ascii_case("productKey") {
            continue;
        }
        match fields[..] {
            [pk, dn, secret] if !pk.is_empty() && !dn.is_empty() && !secret.is_empty() => {
                let key = (pk.to_owned(), dn.to_owned());
                if out.insert(key, secret.to_owned()).is_some() {
                    errors.push((i + 1, format!("{pk}/{dn} is listed twice")));
                }
            }
            _ => errors.push((
                i + 1,
                "expected productKey,deviceName,deviceSecret".to_owned(),
            )),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The Alink sign of a sub-device: HMAC-SHA256 keyed with its secret over
/// `clientId{cid}deviceName{dn}productKey{pk}timestamp{ts}`, as lowercase hex.
pub fn sign(secret: &str, client_id: &str, pk: &str, dn: &str, timestamp: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let content = format!("clientId{client_id}deviceName{dn}productKey{pk}timestamp{timestamp}");
    let tag = ring::hmac::sign(&key, content.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in tag.as_ref() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The signed identity of a sub-device, as login and topo/add carry it.
fn signed(pk: &str, dn: &str, secret: &str, at_ms: u64) -> Map<String, Value> {
    let client_id = format!("{pk}&{dn}");
    let timestamp = at_ms.to_string();
    let mut p = Map::new();
    p.insert("productKey".into(), pk.into());
    p.insert("deviceName".into(), dn.into());
    p.insert(
        "sign".into(),
        sign(secret, &client_id, pk, dn, &timestamp).into(),
    );
    p.insert("signMethod".into(), "hmacsha256".into());
    p.insert("timestamp".into(), timestamp.into());
    p.insert("clientId".into(), client_id.into());
    p
}

/// `thing/topo/add` of the gateway for `devices` (productKey, deviceName, secret), at `at_ms`:
/// the one-time topology registration before sub-devices log in.
pub fn topo_add(
    prefix: &str,
    gw: &Gateway,
    devices: &[(&str, &str, &str)],
    id: u32,
    at_ms: u64,
    body: &mut Vec<u8>,
) -> String {
    body.clear();
    let params: Vec<Value> = devices
        .iter()
        .map(|(pk, dn, secret)| Value::Object(signed(pk, dn, secret, at_ms)))
        .collect();
    write(body, &request(id, Value::Array(params), "thing.topo.add"));
    format!(
        "{prefix}/sys/{}/{}/thing/topo/add",
        gw.product_key, gw.device_name
    )
}

/// The topic and body of the uplink record `line` (the log's format, see
/// [`crate::uplink::record`]) as an Alink message, request id `id`; online and offline of a
/// device with a secret in `gw` as its login and logout. Appends the body to `body` (cleared
/// first) and returns the topic; a line that is not a record is an error.
///
/// Reports and events, nearly every record, take a borrowed path: the line's strings and its
/// values are copied from the line into the body without building a JSON tree. Anything else
/// (online, offline, escaped strings) is decoded in full.
pub fn uplink(
    prefix: &str,
    gw: Option<&Gateway>,
    line: &[u8],
    id: u32,
    body: &mut Vec<u8>,
) -> Result<String, UplinkError> {
    if let Ok(rec) = serde_json::from_slice::<Line<'_>>(line) {
        if let Some(topic) = fast(prefix, &rec, id, body) {
            return Ok(topic);
        }
    }
    let rec = decode_line(line)?;
    Ok(uplink_record(prefix, gw, &rec, id, body))
}

/// A record line, borrowed: only lines whose strings have no escapes parse this way.
#[derive(Deserialize)]
struct Line<'a> {
    t: u64,
    pk: &'a str,
    dn: &'a str,
    kind: &'a str,
    #[serde(default)]
    event: Option<&'a str>,
    #[serde(default, borrow)]
    values: Option<&'a RawValue>,
}

/// Property and event posts straight from the borrowed line; `None` for any other record,
/// or values that are not an object of unescaped keys.
fn fast(prefix: &str, rec: &Line<'_>, id: u32, body: &mut Vec<u8>) -> Option<String> {
    body.clear();
    let values = rec.values?.get();
    body.extend_from_slice(b"{\"id\":\"");
    json::write_int(body, u64::from(id));
    body.extend_from_slice(b"\",\"version\":\"1.0\",\"params\":");
    let topic = match (rec.kind, rec.event) {
        ("property", None) => {
            let mut de = serde_json::Deserializer::from_str(values);
            de.deserialize_map(PropertyParams {
                out: body,
                time: rec.t,
            })
            .ok()?;
            body.extend_from_slice(b",\"method\":\"thing.event.property.post\"}");
            format!(
                "{prefix}/sys/{}/{}/thing/event/property/post",
                rec.pk, rec.dn
            )
        }
        ("event", Some(event)) => {
            body.extend_from_slice(b"{\"value\":");
            body.extend_from_slice(values.as_bytes());
            body.extend_from_slice(b",\"time\":");
            json::write_int(body, rec.t);
            body.extend_from_slice(b"},\"method\":");
            json::write_str(body, &format!("thing.event.{event}.post"));
            body.push(b'}');
            format!(
                "{prefix}/sys/{}/{}/thing/event/{event}/post",
                rec.pk, rec.dn
            )
        }
        _ => return None,
    };
    Some(topic)
}

/// Writes a record's `values` object as property-post params: each member `k: v` as
/// `k: {"value": v, "time": t}`, in the record's order, values copied verbatim.
struct PropertyParams<'o> {
    out: &'o mut Vec<u8>,
    time: u64,
}

impl<'de> Visitor<'de> for PropertyParams<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of property values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key::<&'de str>()? {
            let value: &'de RawValue = map.next_value()?;
            if !first {
                self.out.push(b',');
            }
            first = false;
            json::write_str(self.out, key);
            self.out.extend_from_slice(b":{\"value\":");
            self.out.extend_from_slice(value.get().as_bytes());
            self.out.extend_from_slice(b",\"time\":");
            json::write_int(self.out, self.time);
            self.out.push(b'}');
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// [`uplink`] for a decoded record.
fn uplink_record(
    prefix: &str,
    gw: Option<&Gateway>,
    rec: &OwnedRecord,
    id: u32,
    body: &mut Vec<u8>,
) -> String {
    body.clear();
    let (pk, dn) = (&rec.product_key, &rec.device_name);
    let time = Value::from(rec.at_ms);
    let session = gw.and_then(|g| g.secret(pk, dn).map(|secret| (g, secret)));
    match (rec.kind, session) {
        (RecordKind::Online, Some((gw, secret))) => {
            let mut params = signed(pk, dn, secret, rec.at_ms);
            params.insert("cleanSession".into(), "true".into());
            let mut req = Map::new();
            req.insert("id".into(), id.to_string().into());
            req.insert("params".into(), Value::Object(params));
            write(body, &Value::Object(req));
            return format!(
                "{prefix}/ext/session/{}/{}/combine/login",
                gw.product_key, gw.device_name
            );
        }
        (RecordKind::Offline, Some((gw, _))) => {
            let mut params = Map::new();
            params.insert("productKey".into(), pk.as_str().into());
            params.insert("deviceName".into(), dn.as_str().into());
            let mut req = Map::new();
            req.insert("id".into(), id.to_string().into());
            req.insert("params".into(), Value::Object(params));
            write(body, &Value::Object(req));
            return format!(
                "{prefix}/ext/session/{}/{}/combine/logout",
                gw.product_key, gw.device_name
            );
        }
        _ => {}
    }
    match rec.kind {
        RecordKind::Online | RecordKind::Offline => {
            let online = rec.kind == RecordKind::Online;
            let mut status = Map::new();
            status.insert(
                "status".into(),
                (if online { "online" } else { "offline" }).into(),
            );
            status.insert("productKey".into(), pk.as_str().into());
            status.insert("deviceName".into(), dn.as_str().into());
            status.insert("time".into(), time);
            if let Some(peer) = rec.peer {
                status.insert("clientIp".into(), peer.ip().to_string().into());
            }
            write(body, &Value::Object(status));
            format!("{prefix}/as/mqtt/status/{pk}/{dn}")
        }
        RecordKind::Property => {
            let mut params = Map::new();
            if let Some(Value::Object(values)) = &rec.values {
                for (key, value) in values {
                    let mut item = Map::new();
                    item.insert("value".into(), value.clone());
                    item.insert("time".into(), time.clone());
                    params.insert(key.clone(), Value::Object(item));
                }
            }
            write(body, &request(id, Value::Object(params), &method(rec)));
            format!("{prefix}/sys/{pk}/{dn}/thing/event/property/post")
        }
        RecordKind::Event => {
            let mut params = Map::new();
            let values = rec
                .values
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new()));
            params.insert("value".into(), values);
            params.insert("time".into(), time);
            write(body, &request(id, Value::Object(params), &method(rec)));
            let event = rec.event.as_deref().unwrap_or_default();
            format!("{prefix}/sys/{pk}/{dn}/thing/event/{event}/post")
        }
    }
}

fn request(id: u32, params: Value, method: &str) -> Value {
    let mut req = Map::new();
    req.insert("id".into(), id.to_string().into());
    req.insert("version".into(), "1.0".into());
    req.insert("params".into(), params);
    req.insert("method".into(), method.into());
    Value::Object(req)
}

fn write(out: &mut Vec<u8>, v: &Value) {
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The topic filters that bring every downlink for `product_keys` (one wildcard set per
/// product, not one subscription per device).
pub fn subscriptions<'a>(
    prefix: &'a str,
    product_keys: impl IntoIterator<Item = &'a str> + 'a,
) -> impl Iterator<Item = String> + 'a {
    product_keys.into_iter().flat_map(move |pk| {
        [
            format!("{prefix}/sys/{pk}/+/thing/service/property/set"),
            format!("{prefix}/sys/{pk}/+/thing/service/property/get"),
            format!("{prefix}/sys/{pk}/+/thing/service/+"),
            format!("{prefix}/sys/{pk}/+/rrpc/request/+"),
        ]
    })
}

/// A downlink that arrived from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub product_key: String,
    pub device_name: String,
    /// The Alink request id, echoed in the reply (`"0"` when the body had none).
    pub id: String,
    pub request: DownlinkRequest,
    /// ringlink downlink params (JSON text): `["a"]` for get, `{"a":1}` for set, `{..}` or
    /// empty for a service.
    pub params: Vec<u8>,
    /// Where the reply goes.
    pub reply_topic: String,
    /// For metrics: `set`, `get`, `service` or `rrpc`.
    pub via: &'static str,
}

/// Why a message on a downlink topic is not a valid request: the reply to send anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reply_topic: String,
    pub id: String,
    pub code: Code,
    pub message: String,
    pub via: &'static str,
}

/// Parses a message from the broker. `Ok(None)`: not a downlink (a reply topic, ours or
/// another gateway's, or a topic outside the mapping).
pub fn parse_downlink(
    prefix: &str,
    topic: &str,
    payload: &[u8],
) -> Result<Option<Request>, Box<Rejected>> {
    let Some(rest) = topic
        .strip_prefix(prefix)
        .and_then(|t| t.strip_prefix("/sys/"))
    else {
        return Ok(None);
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(pk), Some(dn), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    let base = format!("{prefix}/sys/{pk}/{dn}");
    // What the topic says, before the body is read.
    enum Kind<'t> {
        Set,
        Get,
        Service(&'t str),
        Rrpc(&'t str),
    }
    let kind = match tail {
        "thing/service/property/set" => Kind::Set,
        "thing/service/property/get" => Kind::Get,
        t => match t.strip_prefix("thing/service/") {
            Some(s) if !s.is_empty() && !s.contains('/') && !s.ends_with("_reply") => {
                Kind::Service(s)
            }
            Some(_) => return Ok(None),
            None => match t.strip_prefix("rrpc/request/") {
                Some(r) if !r.is_empty() && !r.contains('/') => Kind::Rrpc(r),
                _ => return Ok(None),
            },
        },
    };
    let (reply_topic, via) = match kind {
        Kind::Set => (format!("{base}/thing/service/property/set_reply"), "set"),
        Kind::Get => (format!("{base}/thing/service/property/get_reply"), "get"),
        Kind::Service(s) => (format!("{base}/thing/service/{s}_reply"), "service"),
        Kind::Rrpc(r) => (format!("{base}/rrpc/response/{r}"), "rrpc"),
    };
    let reject = |id: &str, code: Code, message: String| {
        Box::new(Rejected {
            reply_topic: reply_topic.clone(),
            id: id.to_owned(),
            code,
            message,
            via,
        })
    };
    let body: Value = serde_json::from_slice(payload)
        .map_err(|e| reject("0", Code::JsonFormat, format!("body is not JSON: {e}")))?;
    let id = match body.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(reject("0", Code::InvalidParameter, "no \"id\"".into())),
    };
    let params = body.get("params").cloned().unwrap_or(Value::Null);
    let method = body
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // An RRPC request names what it asks in its method.
    let kind = match kind {
        Kind::Rrpc(_) => match method.strip_prefix("thing.service.") {
            Some("property.set") => Kind::Set,
            Some("property.get") => Kind::Get,
            Some(s) if !s.is_empty() => Kind::Service(s),
            _ => {
                return Err(reject(
                    &id,
                    Code::InvalidParameter,
                    format!("rrpc method {method:?} is not thing.service.*"),
                ))
            }
        },
        k => k,
    };
    let (request, params) = match kind {
        Kind::Set => match params {
            p @ Value::Object(_) => (DownlinkRequest::SetProperty, p.to_string().into_bytes()),
            _ => {
                return Err(reject(
                    &id,
                    Code::InvalidParameter,
                    "params must be an object of properties".into(),
                ))
            }
        },
        Kind::Get => match params {
            p @ Value::Array(_) => (DownlinkRequest::GetProperty, p.to_string().into_bytes()),
            _ => {
                return Err(reject(
                    &id,
                    Code::InvalidParameter,
                    "params must be an array of property identifiers".into(),
                ))
            }
        },
        Kind::Service(s) | Kind::Rrpc(s) => {
            let params = match params {
                Value::Null => Vec::new(),
                p @ Value::Object(_) => p.to_string().into_bytes(),
                _ => {
                    return Err(reject(
                        &id,
                        Code::ServiceInputIncorrect,
                        "params must be an object of input parameters".into(),
                    ))
                }
            };
            (DownlinkRequest::CallService(s.into()), params)
        }
    };
    Ok(Some(Request {
        product_key: pk.to_owned(),
        device_name: dn.to_owned(),
        id,
        request,
        params,
        reply_topic,
        via,
    }))
}

/// An Alink reply body: code 200 and `data` (an object's JSON text; `{}` when `None`) on
/// success, else the Link code and its text.
pub fn reply(id: &str, code: Code, data: Option<&str>, out: &mut Vec<u8>) {
    reply_with(id, code, data, code.message(), out);
}

/// [`reply`] with a message of the caller's (a rejected request says what was wrong).
pub fn reply_with(id: &str, code: Code, data: Option<&str>, message: &str, out: &mut Vec<u8>) {
    out.clear();
    let mut r = Map::new();
    r.insert("id".into(), id.into());
    if code.is_success() {
        let data = data
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| Value::Object(Map::new()));
        r.insert("code".into(), 200.into());
        r.insert("data".into(), data);
        r.insert("message".into(), "success".into());
    } else {
        r.insert("code".into(), code.as_u32().into());
        r.insert("data".into(), Value::Object(Map::new()));
        r.insert("message".into(), message.into());
    }
    write(out, &Value::Object(r));
}

#[cfg(test)]
mod tests;
