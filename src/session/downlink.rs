//! Downlinks on one connection: validation against the thing model before anything is sent,
//! messageId allocation, correlation of replies in any order, timeouts (PROTOCOL.md section 8).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use simd_json::prelude::*;

use crate::model::{self, Json, ThingModel, ValueStyle};
use crate::protocol::{self, json, Code, Item, Reply, ServerMethod};
use crate::registry::DeviceId;
use crate::session::{check_rank, Core, Event, ShardState};

/// A request for a device, from the northbound API or an upstream sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    /// The caller's handle; it comes back in [`Event::DownlinkDone`].
    pub token: u64,
    pub device: DeviceId,
    pub request: DownlinkRequest,
    /// Alink-style params as JSON text: `["a","b"]` for getProperty, `{"a":1}` for setProperty,
    /// `{"x":1}` (or nothing, for no inputs) for callService. Parsed in place.
    pub params: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownlinkRequest {
    GetProperty,
    SetProperty,
    CallService(Box<str>),
}

impl DownlinkRequest {
    pub fn method(&self) -> ServerMethod {
        match self {
            Self::GetProperty => ServerMethod::GetProperty,
            Self::SetProperty => ServerMethod::SetProperty,
            Self::CallService(_) => ServerMethod::CallService,
        }
    }
}

/// How a downlink finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The device's code, or ringlink's (validation, 100006 timeout, 100008 connection lost).
    pub code: Code,
    /// On success of getProperty / callService: `{identifier: value}` of the reply's
    /// `properties` / `outputData` (a missing list reads as empty), values normalised like
    /// uplinks (bool 0/1, float and double with a decimal point) but not range-checked.
    pub data: Option<Box<str>>,
}

impl Outcome {
    pub fn failed(code: Code) -> Self {
        Self { code, data: None }
    }
}

/// A downlink sent and waiting for its reply.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) token: u64,
    pub(super) deadline: Instant,
    device: DeviceId,
    request: DownlinkRequest,
}

/// The downlinks in flight on one connection: allocated with the first, freed with the last
/// (see [`Core::free_idle_downlinks`]), so an idle connection keeps neither the map nor the
/// queue.
#[derive(Debug, Default)]
pub(super) struct Downlinks {
    pub(super) pending: HashMap<u32, Pending>,
    /// Deadlines in insertion order. Every downlink has the same timeout, so this is sorted by
    /// deadline; entries whose downlink has finished are skipped when popped.
    pub(super) deadlines: VecDeque<(Instant, u32)>,
}

/// The largest server messageId (2^31-1): the official client reads ids as signed 32-bit.
const MAX_ID: u32 = 0x7fff_ffff;
/// Downlinks one connection may have in flight; more are refused with 100000. Bounds the
/// pending map, and keeps a free messageId always at hand.
pub(super) const MAX_PENDING: usize = 4096;

impl Core {
    pub(super) fn send_downlink(&mut self, dl: Downlink, now: Instant, shard: &mut ShardState) {
        let Downlink {
            token,
            device,
            request,
            mut params,
        } = dl;
        if self.ended.is_some() || !self.owned.contains(device) {
            return self.downlink_failed(token, Code::DeviceOffline);
        }
        if self.pending_downlinks() >= MAX_PENDING {
            return self.downlink_failed(token, Code::Unknown);
        }
        let registry = Arc::clone(&self.ctx.registry);
        let model = registry.model(device);
        let id = self.next_free_id();
        let ShardState {
            decoder, scratch, ..
        } = shard;
        scratch.clear();
        protocol::start_request(
            scratch,
            request.method(),
            id,
            model.product_key(),
            registry.device_name(device),
        );
        let encoded = if params.iter().all(u8::is_ascii_whitespace) {
            match &request {
                DownlinkRequest::CallService(service) => encode_call(model, service, None, scratch),
                _ => Err(Code::InvalidParameter),
            }
        } else {
            decoder.parse_json(&mut params, |value| {
                let value = value.ok_or(Code::InvalidParameter)?;
                match &request {
                    DownlinkRequest::GetProperty => encode_get(model, value, scratch),
                    DownlinkRequest::SetProperty => encode_set(model, value, scratch),
                    DownlinkRequest::CallService(service) => {
                        encode_call(model, service, Some(value), scratch)
                    }
                }
            })
        };
        if let Err(code) = encoded {
            return self.downlink_failed(token, code);
        }
        protocol::finish_request(scratch);
        self.send_text(scratch);
        let deadline = now + self.ctx.config.downlink_timeout;
        let d = self.downlinks.get_or_insert_with(Box::default);
        d.pending.insert(
            id,
            Pending {
                token,
                deadline,
                device,
                request,
            },
        );
        d.deadlines.push_back((deadline, id));
    }

    /// Downlinks sent and not yet finished.
    pub(super) fn pending_downlinks(&self) -> usize {
        self.downlinks.as_ref().map_or(0, |d| d.pending.len())
    }

    /// Frees the downlink state once nothing is pending (the deadlines left are all stale).
    fn free_idle_downlinks(&mut self) {
        if self
            .downlinks
            .as_ref()
            .is_some_and(|d| d.pending.is_empty())
        {
            self.downlinks = None;
        }
    }

    /// Completes the downlink a client reply answers; false when none is pending under its id.
    pub(super) fn complete_downlink(&mut self, reply: &Reply<'_, '_>) -> bool {
        let Some(p) = self
            .downlinks
            .as_mut()
            .and_then(|d| d.pending.remove(&reply.id))
        else {
            return false;
        };
        self.free_idle_downlinks();
        let data = if reply.code.is_success() {
            let model = self.ctx.registry.model(p.device);
            let list = |name| reply.payload.and_then(|pl| pl.get(name));
            match &p.request {
                DownlinkRequest::GetProperty => Some(reply_values(list("properties"), |id| {
                    model.property(id).map(|p| &p.data_type)
                })),
                DownlinkRequest::SetProperty => None,
                DownlinkRequest::CallService(service) => {
                    let outputs = model.service(service).map_or(&[][..], |s| &s.output[..]);
                    Some(reply_values(list("outputData"), |id| {
                        outputs
                            .iter()
                            .find(|o| &*o.identifier == id)
                            .map(|o| &o.data_type)
                    }))
                }
            }
        } else {
            None
        };
        self.events.push_back(Event::DownlinkDone {
            token: p.token,
            outcome: Outcome {
                code: reply.code,
                data,
            },
        });
        true
    }

    /// Times out every downlink whose deadline has passed (100006).
    pub(super) fn expire_downlinks(&mut self, now: Instant) {
        let Some(d) = self.downlinks.as_mut() else {
            return;
        };
        while let Some(&(deadline, id)) = d.deadlines.front() {
            if deadline > now {
                break;
            }
            d.deadlines.pop_front();
            // The id may have been answered already, and even reused by a later downlink.
            if d.pending.get(&id).is_some_and(|p| p.deadline == deadline) {
                if let Some(p) = d.pending.remove(&id) {
                    self.events.push_back(Event::DownlinkDone {
                        token: p.token,
                        outcome: Outcome::failed(Code::Timeout),
                    });
                }
            }
        }
        self.free_idle_downlinks();
    }

    /// The next server messageId: 1..=2^31-1, wrapping to 1, skipping ids still pending.
    /// Terminates because fewer than MAX_PENDING ids are pending.
    fn next_free_id(&mut self) -> u32 {
        loop {
            self.next_id = if self.next_id >= MAX_ID {
                1
            } else {
                self.next_id + 1
            };
            let taken = self
                .downlinks
                .as_ref()
                .is_some_and(|d| d.pending.contains_key(&self.next_id));
            if !taken {
                return self.next_id;
            }
        }
    }

    fn downlink_failed(&mut self, token: u64, code: Code) {
        self.events.push_back(Event::DownlinkDone {
            token,
            outcome: Outcome::failed(code),
        });
    }
}

/// getProperty: a non-empty list of identifiers, each a property that is not write-only.
fn encode_get(model: &ThingModel, ids: Json<'_, '_>, out: &mut Vec<u8>) -> Result<(), Code> {
    let ids = ids
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or(Code::InvalidParameter)?;
    out.extend_from_slice(b",\"properties\":[");
    let mut failure = None;
    for (i, v) in ids.iter().enumerate() {
        let checked = v
            .into_string()
            .ok_or(Code::InvalidParameter)
            .and_then(|id| model.check_get(id).map(|_| id));
        match checked {
            Ok(id) => {
                if i > 0 {
                    out.push(b',');
                }
                json::write_str(out, id);
            }
            Err(code) => failure = Some(first_check(failure, code)),
        }
    }
    out.push(b']');
    failure.map_or(Ok(()), Err)
}

/// setProperty: a non-empty `{identifier: value}`; every item is checked before any is sent.
fn encode_set(model: &ThingModel, values: Json<'_, '_>, out: &mut Vec<u8>) -> Result<(), Code> {
    let values = values
        .as_object()
        .filter(|o| !o.is_empty())
        .ok_or(Code::InvalidParameter)?;
    out.extend_from_slice(b",\"properties\":[");
    let mut failure = None;
    for (i, (id, v)) in values.iter().enumerate() {
        match model.check_set(id, v) {
            Ok(p) => write_item(out, i, id, &p.data_type, v),
            Err(code) => failure = Some(first_check(failure, code)),
        }
    }
    out.push(b']');
    failure.map_or(Ok(()), Err)
}

/// callService: a declared, non-built-in service; inputs checked by the model.
fn encode_call(
    model: &ThingModel,
    service: &str,
    input: Option<Json<'_, '_>>,
    out: &mut Vec<u8>,
) -> Result<(), Code> {
    let object = match input {
        Some(v) => Some(v.as_object().ok_or(Code::ServiceInputIncorrect)?),
        None => None,
    };
    let svc = model.check_call(service, object)?;
    out.extend_from_slice(b",\"identifier\":");
    json::write_str(out, &svc.identifier);
    out.extend_from_slice(b",\"inputData\":[");
    if let Some(v) = input {
        if let Some(object) = v.as_object() {
            for (i, (id, v)) in object.iter().enumerate() {
                let param = svc
                    .input
                    .iter()
                    .find(|p| &*p.identifier == id)
                    .ok_or(Code::ServiceInputIncorrect)?;
                write_item(out, i, id, &param.data_type, v);
            }
        }
    }
    out.push(b']');
    Ok(())
}

/// Writes `{"identifier":..,"type":..,"value":..}` (with a leading comma after the first). The
/// model has checked the value, including the client's 2047-byte limit.
fn write_item(
    out: &mut Vec<u8>,
    index: usize,
    id: &str,
    data_type: &model::DataType,
    value: Json<'_, '_>,
) {
    if index > 0 {
        out.push(b',');
    }
    out.extend_from_slice(b"{\"identifier\":");
    json::write_str(out, id);
    out.extend_from_slice(b",\"type\":\"");
    out.extend_from_slice(data_type.kind().name().as_bytes());
    out.extend_from_slice(b"\",\"value\":");
    data_type.write_value(value, ValueStyle::Wire, out);
    out.push(b'}');
}

/// The earlier of two failures in PROTOCOL.md's check order.
pub(super) fn first_check(failure: Option<Code>, code: Code) -> Code {
    match failure {
        Some(f) if check_rank(f) <= check_rank(code) => f,
        _ => code,
    }
}

/// `{identifier: value}` of a reply's item list, values written by their declared type where
/// `type_of` knows it, else as they are. Malformed items are skipped.
fn reply_values<'m>(
    list: Option<Json<'_, '_>>,
    type_of: impl Fn(&str) -> Option<&'m model::DataType>,
) -> Box<str> {
    let mut out = Vec::with_capacity(64);
    out.push(b'{');
    let items = list.and_then(|l| l.as_array());
    for item in items.iter().flat_map(|a| a.iter()).filter_map(Item::parse) {
        if out.len() > 1 {
            out.push(b',');
        }
        json::write_str(&mut out, item.identifier);
        out.push(b':');
        match type_of(item.identifier) {
            Some(t) => t.write_value(item.value, ValueStyle::Alink, &mut out),
            None => model::write_json(item.value, &mut out),
        }
    }
    out.push(b'}');
    super::into_string(out).into_boxed_str()
}
