//! The device simulator: what one simulated device (or a sub-gateway's devices) says and how
//! it answers the server's requests (PROTOCOL.md sections 4 and 8), like the official client:
//! requests end with one NUL byte and replies with two.
//!
//! A device keeps the values of its properties: a `setProperty` changes what a later
//! `getProperty` returns, and reports repeat the kept value of writable properties (settings)
//! while read-only ones (measurements) get a fresh value each report. No IO, no clock.

use ringlink::protocol::json::write_str;
use ringlink::protocol::{
    finish_request, start_client_reply, start_client_request, strip_trailing,
};
use serde_json::Value;

use crate::model::{Model, Spec};

/// One simulated device.
#[derive(Debug)]
pub struct Device {
    pub name: String,
    /// Onlined on its connection (its `onlineDevice` got code 0) and not offlined since.
    pub online: bool,
    /// Kept values by model property index; filled on first use.
    values: Vec<Option<Value>>,
}

/// What [`serve`] did with one inbound message that is not a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Answered `method` with `code` (a reply is in `out`).
    Answered { method: DownMethod, code: u32 },
    /// A request for a device this connection does not carry; answered 109001.
    Foreign,
    /// Not a request the official client would answer (not JSON, no `messageId`, unknown
    /// method, missing list): no reply, like the official client.
    Unanswerable,
}

/// The three server methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownMethod {
    Get,
    Set,
    Call,
}

impl Device {
    pub fn new(name: String, model: &Model) -> Self {
        Self {
            name,
            online: false,
            values: vec![None; model.properties.len()],
        }
    }

    /// The kept value of property `index`, made up on first use.
    fn value(&mut self, model: &Model, index: usize, rng: &mut fastrand::Rng) -> &Value {
        self.values[index].get_or_insert_with(|| model.properties[index].spec.generate(rng))
    }

    /// Appends a `reportProperty` with `count` distinct random properties (ending with NUL).
    pub fn write_report(
        &mut self,
        model: &Model,
        id: u32,
        count: usize,
        rng: &mut fastrand::Rng,
        out: &mut Vec<u8>,
    ) {
        start_client_request(out, "reportProperty", id, &model.product_key, &self.name);
        out.extend_from_slice(b",\"properties\":[");
        let n = model.properties.len();
        let count = count.min(n);
        let start = rng.usize(..n);
        for k in 0..count {
            // `count` consecutive properties from a random start: distinct, cheap.
            let i = (start + k) % n;
            let prop = &model.properties[i];
            if !prop.writable {
                self.values[i] = Some(prop.spec.generate(rng));
            }
            if k > 0 {
                out.push(b',');
            }
            let value = self.value(model, i, rng).clone();
            write_item(
                out,
                &model.properties[i].id,
                &model.properties[i].spec,
                &value,
            );
        }
        out.push(b']');
        finish_request(out);
        out.push(0);
    }

    /// Appends a `reportEvent` of a random declared event (ending with NUL). Returns false
    /// (and writes nothing) when the model declares no events.
    pub fn write_event(
        &self,
        model: &Model,
        id: u32,
        rng: &mut fastrand::Rng,
        out: &mut Vec<u8>,
    ) -> bool {
        if model.events.is_empty() {
            return false;
        }
        let event = &model.events[rng.usize(..model.events.len())];
        start_client_request(out, "reportEvent", id, &model.product_key, &self.name);
        out.extend_from_slice(b",\"identifier\":");
        write_str(out, &event.id);
        out.extend_from_slice(b",\"outputData\":[");
        for (k, (pid, spec)) in event.params.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            write_item(out, pid, spec, &spec.generate(rng));
        }
        out.push(b']');
        finish_request(out);
        out.push(0);
        true
    }

    /// The kept value of a property, for tests and set-then-get checks.
    pub fn kept(&self, model: &Model, id: &str) -> Option<&Value> {
        let i = model.properties.iter().position(|p| p.id == id)?;
        self.values[i].as_ref()
    }
}

/// Appends `onlineDevice` or `offlineDevice` for `name` (ending with NUL).
pub fn write_presence(out: &mut Vec<u8>, method: &str, id: u32, product_key: &str, name: &str) {
    start_client_request(out, method, id, product_key, name);
    finish_request(out);
    out.push(0);
}

/// Answers one server request in `msg` for one of `devices`, appending the reply (ending with
/// two NULs) to `out`.
pub fn serve(
    devices: &mut [Device],
    model: &Model,
    msg: &[u8],
    rng: &mut fastrand::Rng,
    out: &mut Vec<u8>,
) -> Served {
    let Ok(doc) = serde_json::from_slice::<Value>(&msg[..strip_trailing(msg)]) else {
        return Served::Unanswerable;
    };
    // The official client parses ids as signed 32-bit and echoes larger ones as 2^31-1.
    let Some(id) = doc.get("messageId").and_then(Value::as_u64) else {
        return Served::Unanswerable;
    };
    let id = u32::try_from(id.min(0x7fff_ffff)).unwrap_or(0x7fff_ffff);
    let method = match doc.get("method").and_then(Value::as_str) {
        Some("getProperty") => DownMethod::Get,
        Some("setProperty") => DownMethod::Set,
        Some("callService") => DownMethod::Call,
        _ => return Served::Unanswerable,
    };
    let payload = doc.get("payload").unwrap_or(&Value::Null);
    let pk = payload.get("productKey").and_then(Value::as_str);
    let dn = payload.get("deviceName").and_then(Value::as_str);
    let device = match (pk, dn) {
        (Some(pk), Some(dn)) if pk == model.product_key => {
            devices.iter_mut().find(|d| d.online && d.name == dn)
        }
        _ => None,
    };
    let Some(device) = device else {
        reply(out, id, DEVICE_OFFLINE, |_| {});
        return Served::Foreign;
    };
    let code = match method {
        DownMethod::Get => {
            let Some(ids) = payload.get("properties").and_then(Value::as_array) else {
                return Served::Unanswerable;
            };
            let idx: Option<Vec<usize>> = ids
                .iter()
                .map(|v| {
                    let s = v.as_str()?;
                    model.properties.iter().position(|p| p.id == s)
                })
                .collect();
            let idx = idx.unwrap_or_default();
            if idx.is_empty() {
                PROPERTY_NOT_EXIST
            } else {
                let mut items = Vec::new();
                for (k, &i) in idx.iter().enumerate() {
                    if k > 0 {
                        items.push(b',');
                    }
                    let value = device.value(model, i, rng).clone();
                    let p = &model.properties[i];
                    write_item(&mut items, &p.id, &p.spec, &value);
                }
                reply(out, id, 0, |o| {
                    o.extend_from_slice(b"\"properties\":[");
                    o.extend_from_slice(&items);
                    o.push(b']');
                });
                return Served::Answered { method, code: 0 };
            }
        }
        DownMethod::Set => {
            let Some(items) = payload.get("properties").and_then(Value::as_array) else {
                return Served::Unanswerable;
            };
            let mut writes = Vec::with_capacity(items.len());
            for item in items {
                let id = item.get("identifier").and_then(Value::as_str);
                let index = id.and_then(|s| model.properties.iter().position(|p| p.id == s));
                match (index, item.get("value")) {
                    (Some(i), Some(v)) => writes.push((i, v.clone())),
                    _ => {
                        writes.clear();
                        break;
                    }
                }
            }
            if writes.is_empty() {
                // The official client answers an empty or failed set list with 100000.
                UNKNOWN_ERROR
            } else {
                for (i, v) in writes {
                    device.values[i] = Some(v);
                }
                0
            }
        }
        DownMethod::Call => {
            let service = payload
                .get("identifier")
                .and_then(Value::as_str)
                .and_then(|s| model.service(s));
            match service {
                None => SERVICE_NOT_EXIST,
                Some(service) => {
                    reply(out, id, 0, |o| {
                        o.extend_from_slice(b"\"outputData\":[");
                        for (k, (pid, spec)) in service.outputs.iter().enumerate() {
                            if k > 0 {
                                o.push(b',');
                            }
                            // A bool output says yes: `reboot` answers accepted = 1.
                            let v = match spec {
                                Spec::Bool => Value::from(1),
                                _ => spec.generate(rng),
                            };
                            write_item(o, pid, spec, &v);
                        }
                        o.push(b']');
                    });
                    return Served::Answered { method, code: 0 };
                }
            }
        }
    };
    reply(out, id, code, |_| {});
    Served::Answered { method, code }
}

/// Appends `{"code":C,"messageId":ID,"payload":{..}}` and two NULs; `members` writes the
/// payload members of a success reply.
fn reply(out: &mut Vec<u8>, id: u32, code: u32, members: impl FnOnce(&mut Vec<u8>)) {
    start_client_reply(out, id, code);
    if code == 0 {
        members(out);
    }
    finish_request(out);
    out.extend_from_slice(&[0, 0]);
}

/// Appends `{"identifier":..,"type":..,"value":..}`.
fn write_item(out: &mut Vec<u8>, id: &str, spec: &Spec, value: &Value) {
    out.extend_from_slice(b"{\"identifier\":");
    write_str(out, id);
    out.extend_from_slice(b",\"type\":\"");
    out.extend_from_slice(spec.type_name().as_bytes());
    out.extend_from_slice(b"\",\"value\":");
    // Invariant: serialising a serde_json::Value into a Vec cannot fail (no IO error, no
    // non-string keys).
    serde_json::to_writer(&mut *out, value).expect("Value serialises into a Vec");
    out.push(b'}');
}

const UNKNOWN_ERROR: u32 = 100_000;
const DEVICE_OFFLINE: u32 = 109_001;
const PROPERTY_NOT_EXIST: u32 = 109_002;
const SERVICE_NOT_EXIST: u32 = 109_005;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn setup() -> (Model, Vec<Device>, fastrand::Rng) {
        let model = Model::builtin("a1ThermoPK0")
            .expect("known")
            .expect("loads");
        let mut d = Device::new("thermo-00001".to_owned(), &model);
        d.online = true;
        (model, vec![d], fastrand::Rng::with_seed(1))
    }

    /// Serves `req` and returns (what serve said, the reply parsed, the raw reply).
    fn ask(
        model: &Model,
        devices: &mut [Device],
        rng: &mut fastrand::Rng,
        req: &str,
    ) -> (Served, Value, Vec<u8>) {
        let mut out = Vec::new();
        let served = serve(devices, model, req.as_bytes(), rng, &mut out);
        let parsed = if out.is_empty() {
            Value::Null
        } else {
            assert!(out.ends_with(&[0, 0]), "two NULs");
            serde_json::from_slice(&out[..out.len() - 2]).expect("reply is JSON")
        };
        (served, parsed, out)
    }

    fn get(model: &Model, devices: &mut [Device], rng: &mut fastrand::Rng, id: u32) -> Value {
        let req = format!(
            r#"{{"version":"1.0","method":"getProperty","messageId":{id},"payload":{{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","properties":["setpoint","power"]}}}}"#
        );
        let (served, v, _) = ask(model, devices, rng, &req);
        assert_eq!(
            served,
            Served::Answered {
                method: DownMethod::Get,
                code: 0
            }
        );
        assert_eq!(v["messageId"], id);
        v
    }

    #[test]
    fn set_changes_what_get_returns() {
        let (model, mut devices, mut rng) = setup();
        let before = get(&model, &mut devices, &mut rng, 5);
        let items = before["payload"]["properties"].as_array().expect("items");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["identifier"], "setpoint");
        assert_eq!(items[0]["type"], "float");
        assert_eq!(items[1]["type"], "bool");
        // Stable until something changes it.
        assert_eq!(
            get(&model, &mut devices, &mut rng, 6)["payload"],
            before["payload"]
        );

        let set = r#"{"version":"1.0","method":"setProperty","messageId":7,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","properties":[{"identifier":"setpoint","type":"float","value":19.5}]}}"#;
        let (served, v, raw) = ask(&model, &mut devices, &mut rng, set);
        assert_eq!(
            served,
            Served::Answered {
                method: DownMethod::Set,
                code: 0
            }
        );
        assert_eq!(raw, b"{\"code\":0,\"messageId\":7,\"payload\":{}}\0\0");
        assert_eq!(v["code"], 0);
        let after = get(&model, &mut devices, &mut rng, 8);
        assert_eq!(after["payload"]["properties"][0]["value"], json!(19.5));
        assert_eq!(
            after["payload"]["properties"][1],
            before["payload"]["properties"][1]
        );
        assert_eq!(devices[0].kept(&model, "setpoint"), Some(&json!(19.5)));
    }

    #[test]
    fn reboot_is_accepted_exactly_like_the_protocol_example() {
        let (model, mut devices, mut rng) = setup();
        let call = r#"{"version":"1.0","method":"callService","messageId":8,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","identifier":"reboot","inputData":[{"identifier":"delay","type":"int","value":5}]}}"#;
        let (served, _, raw) = ask(&model, &mut devices, &mut rng, call);
        assert_eq!(
            served,
            Served::Answered {
                method: DownMethod::Call,
                code: 0
            }
        );
        assert_eq!(
            raw,
            b"{\"code\":0,\"messageId\":8,\"payload\":{\"outputData\":[{\"identifier\":\"accepted\",\"type\":\"bool\",\"value\":1}]}}\0\0"
        );
    }

    #[test]
    fn errors_and_unanswerable_requests() {
        let (model, mut devices, mut rng) = setup();
        let foreign = r#"{"method":"getProperty","messageId":3,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-09999","properties":["power"]}}"#;
        let (served, v, _) = ask(&model, &mut devices, &mut rng, foreign);
        assert_eq!(served, Served::Foreign);
        assert_eq!(v["code"], 109_001);
        assert_eq!(v["messageId"], 3);

        let unknown_prop = r#"{"method":"getProperty","messageId":4,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","properties":["nope"]}}"#;
        assert_eq!(
            ask(&model, &mut devices, &mut rng, unknown_prop).1["code"],
            109_002
        );
        let unknown_service = r#"{"method":"callService","messageId":4,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","identifier":"fly","inputData":[]}}"#;
        assert_eq!(
            ask(&model, &mut devices, &mut rng, unknown_service).1["code"],
            109_005
        );
        let empty_set = r#"{"method":"setProperty","messageId":4,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","properties":[]}}"#;
        assert_eq!(
            ask(&model, &mut devices, &mut rng, empty_set).1["code"],
            100_000
        );

        for junk in [
            "not json",
            r#"{"method":"getProperty","payload":{}}"#,
            r#"{"method":"reboot","messageId":1,"payload":{}}"#,
            r#"{"method":"setProperty","messageId":1,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001"}}"#,
        ] {
            let (served, _, raw) = ask(&model, &mut devices, &mut rng, junk);
            assert_eq!(served, Served::Unanswerable, "{junk}");
            assert!(raw.is_empty());
        }
        // Ids beyond i32 are echoed as 2^31-1, like the official client.
        let big = r#"{"method":"getProperty","messageId":4294967295,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-00001","properties":["power"]}}"#;
        assert_eq!(
            ask(&model, &mut devices, &mut rng, big).1["messageId"],
            2_147_483_647
        );
    }

    #[test]
    fn reports_repeat_settings_and_are_valid_requests() {
        let (model, mut devices, mut rng) = setup();
        let d = &mut devices[0];
        let mut out = Vec::new();
        d.write_report(&model, 42, model.properties.len(), &mut rng, &mut out);
        assert!(out.ends_with(&[b'}', 0]));
        let v: Value = serde_json::from_slice(&out[..out.len() - 1]).expect("JSON");
        assert_eq!(v["method"], "reportProperty");
        assert_eq!(v["messageId"], 42);
        assert_eq!(v["payload"]["deviceName"], "thermo-00001");
        let items = v["payload"]["properties"].as_array().expect("items");
        assert_eq!(items.len(), model.properties.len());
        let setpoint = items
            .iter()
            .find(|i| i["identifier"] == "setpoint")
            .expect("all properties reported");
        assert_eq!(Some(&setpoint["value"]), d.kept(&model, "setpoint"));
        // A second report repeats the setting.
        out.clear();
        let kept = d.kept(&model, "setpoint").cloned();
        d.write_report(&model, 43, model.properties.len(), &mut rng, &mut out);
        assert_eq!(d.kept(&model, "setpoint").cloned(), kept);

        out.clear();
        assert!(d.write_event(&model, 44, &mut rng, &mut out));
        let v: Value = serde_json::from_slice(&out[..out.len() - 1]).expect("JSON");
        assert_eq!(v["method"], "reportEvent");
        assert_eq!(v["payload"]["identifier"], "overheat");
        assert_eq!(v["payload"]["outputData"][0]["identifier"], "roomTemp");

        out.clear();
        write_presence(&mut out, "onlineDevice", 1, "a1ThermoPK0", "thermo-00001");
        assert_eq!(
            out,
            b"{\"version\":\"1.0\",\"messageId\":1,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00001\"}}\0"
        );
    }
}
