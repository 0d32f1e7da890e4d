//! [`ThingModel`]: one product's properties, events and services, their lookup by identifier,
//! and the per-method checks of PROTOCOL.md sections 7, 8 and 11.4.
//!
//! Owns the mapping from a failed check to a Link [`Code`]. Never allocates in a lookup or a
//! check. Each check stops at its first failure; the codes of one item come out in the order of
//! the method's table (identifier, then access, then type and kind, then range).

use std::path::Path;

use simd_json::prelude::ValueAsScalar as _;

use crate::protocol::Code;

use super::{DataKind, DataType, Json, ModelError, ModelErrorKind, ValueError};

/// One product's thing model (TSL). Equal when loaded from equivalent TSL (a reload compares).
#[derive(Clone, Debug, PartialEq)]
pub struct ThingModel {
    pub(super) product_key: Box<str>,
    pub(super) properties: Vec<Property>,
    pub(super) events: Vec<Event>,
    pub(super) services: Vec<Service>,
    pub(super) property_index: Index,
    pub(super) event_index: Index,
    pub(super) service_index: Index,
}

/// A TSL property.
#[derive(Clone, Debug, PartialEq)]
pub struct Property {
    pub identifier: Box<str>,
    /// The display name (`""` when the TSL gives none).
    pub name: Box<str>,
    pub access: Access,
    pub data_type: DataType,
}

/// A property's `accessMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `"r"`: reported by the device, never set.
    Read,
    /// `"rw"`.
    ReadWrite,
    /// `"w"`: set, never read back.
    Write,
}

/// A TSL event (never the built-in `post`).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub identifier: Box<str>,
    pub name: Box<str>,
    pub level: EventLevel,
    pub output: Vec<Param>,
}

/// An event's `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventLevel {
    Info,
    Alert,
    Error,
}

/// A TSL service (never the built-ins `set` and `get`).
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub identifier: Box<str>,
    pub name: Box<str>,
    pub call_type: CallType,
    pub input: Vec<Param>,
    pub output: Vec<Param>,
}

/// A service's `callType`. It does not change the WebSocket exchange (always request/reply); it
/// tells an upstream sink whether the cloud calls it by RRPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallType {
    Sync,
    Async,
}

/// An event output, a service input or output, or a struct member.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub identifier: Box<str>,
    pub data_type: DataType,
}

impl ThingModel {
    /// Parses a TSL document. Errors name the JSON path (`$.properties[3].dataType.specs.min`) or
    /// the line and column of a syntax error.
    pub fn from_slice(json: &[u8]) -> Result<Self, ModelError> {
        super::load::parse(json)
    }

    /// Reads and parses a TSL file; errors carry the file name.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ModelError::new(ModelErrorKind::Io(e)).in_file(path))?;
        Self::from_slice(&bytes).map_err(|e| e.in_file(path))
    }

    /// `profile.productKey`.
    pub fn product_key(&self) -> &str {
        &self.product_key
    }

    /// The properties in TSL order.
    pub fn properties(&self) -> &[Property] {
        &self.properties
    }

    /// The events in TSL order, without the built-in `post`.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The services in TSL order, without the built-ins `set` and `get`.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn property(&self, id: &str) -> Option<&Property> {
        self.property_index.find(&self.properties, id)
    }

    /// `None` also for the built-in `post`.
    pub fn event(&self, id: &str) -> Option<&Event> {
        self.event_index.find(&self.events, id)
    }

    /// `None` also for the built-ins `set` and `get`.
    pub fn service(&self, id: &str) -> Option<&Service> {
        self.service_index.find(&self.services, id)
    }

    /// Checks one reportProperty item: not a property → 109002; `kind` (the Item's `type`) is
    /// not the TSL type, or the value's JSON kind does not fit → 109008; out of specs → 100007.
    /// Access is not checked for reports.
    ///
    /// PROTOCOL.md section 7 checks a whole list identifier-first, then type, then range; a caller
    /// checking several items keeps the failure that comes first in that order
    /// (109002, then 109008, then 100007), not simply the first item's.
    pub fn check_report_item(
        &self,
        identifier: &str,
        kind: DataKind,
        value: Json<'_, '_>,
    ) -> Result<&Property, Code> {
        let property = self.property(identifier).ok_or(Code::PropertyNotExist)?;
        check_item(&property.data_type, kind, value)?;
        Ok(property)
    }

    /// Checks one reportEvent output item of `event`: not a declared output → 109002; type or
    /// kind → 109008; range → 100007. Declared outputs may be missing.
    pub fn check_event_item<'m>(
        &self,
        event: &'m Event,
        identifier: &str,
        kind: DataKind,
        value: Json<'_, '_>,
    ) -> Result<&'m Param, Code> {
        let param = find_param(&event.output, identifier).ok_or(Code::PropertyNotExist)?;
        check_item(&param.data_type, kind, value)?;
        Ok(param)
    }

    /// Checks one getProperty identifier: not a property → 109002; accessMode `w` → 109004.
    pub fn check_get(&self, identifier: &str) -> Result<&Property, Code> {
        let property = self.property(identifier).ok_or(Code::PropertyNotExist)?;
        if property.access == Access::Write {
            return Err(Code::PropertyWriteOnly);
        }
        Ok(property)
    }

    /// Checks one setProperty item (a plain value; the type comes from the TSL): not a property →
    /// 109002; accessMode `r` → 109003; kind → 109008; out of specs, identifier longer than 63
    /// bytes, or value longer than 2047 bytes (text, or the JSON of a struct or array) → 100007.
    pub fn check_set(&self, identifier: &str, value: Json<'_, '_>) -> Result<&Property, Code> {
        let property = self.property(identifier).ok_or(Code::PropertyNotExist)?;
        if property.access == Access::Read {
            return Err(Code::PropertyReadOnly);
        }
        property.data_type.check(value).map_err(value_code)?;
        // The client SDK keeps identifiers in 64-byte and values in 2048-byte buffers (both
        // NUL-terminated) and silently truncates anything longer (PROTOCOL.md 4.2).
        if identifier.len() > MAX_IDENTIFIER_BYTES
            || value_len(&property.data_type, value) > MAX_VALUE_BYTES
        {
            return Err(Code::OutOfRange);
        }
        Ok(property)
    }

    /// Checks a callService request, inputs given as a JSON object `{id: value}` (`None` when the
    /// request has none): undeclared service or a built-in (`set`, `get`) → 109005; any given
    /// input undeclared, any declared input missing, or any kind or range wrong → 109006.
    pub fn check_call(
        &self,
        service: &str,
        input: Option<simd_json::tape::Object<'_, '_>>,
    ) -> Result<&Service, Code> {
        let service = self.service(service).ok_or(Code::ServiceNotExist)?;
        let Some(input) = input else {
            return if service.input.is_empty() {
                Ok(service)
            } else {
                Err(Code::ServiceInputIncorrect)
            };
        };
        for (identifier, value) in input.iter() {
            let param =
                find_param(&service.input, identifier).ok_or(Code::ServiceInputIncorrect)?;
            param
                .data_type
                .check(value)
                .map_err(|_| Code::ServiceInputIncorrect)?;
            if value_len(&param.data_type, value) > MAX_VALUE_BYTES {
                return Err(Code::ServiceInputIncorrect);
            }
        }
        if service
            .input
            .iter()
            .any(|param| input.get(&*param.identifier).is_none())
        {
            return Err(Code::ServiceInputIncorrect);
        }
        Ok(service)
    }
}

impl Access {
    /// Parses an `accessMode`.
    pub fn from_mode(mode: &str) -> Option<Self> {
        match mode {
            "r" => Some(Self::Read),
            "rw" => Some(Self::ReadWrite),
            "w" => Some(Self::Write),
            _ => None,
        }
    }

    /// The `accessMode` text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "r",
            Self::ReadWrite => "rw",
            Self::Write => "w",
        }
    }
}

impl EventLevel {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "info" => Some(Self::Info),
            "alert" => Some(Self::Alert),
            "error" => Some(Self::Error),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Alert => "alert",
            Self::Error => "error",
        }
    }
}

impl CallType {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sync" => Some(Self::Sync),
            "async" => Some(Self::Async),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
        }
    }
}

/// Something found by identifier.
pub(super) trait Named {
    fn identifier(&self) -> &str;
}

impl Named for Property {
    fn identifier(&self) -> &str {
        &self.identifier
    }
}

impl Named for Event {
    fn identifier(&self) -> &str {
        &self.identifier
    }
}

impl Named for Service {
    fn identifier(&self) -> &str {
        &self.identifier
    }
}

impl Named for Param {
    fn identifier(&self) -> &str {
        &self.identifier
    }
}

/// Lookup by identifier without allocating: positions sorted by identifier, searched by
/// bisection; lists of at most [`LINEAR_MAX`] entries are scanned instead.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Index(Box<[u32]>);

impl Index {
    /// Builds the index; identifiers are unique (the loader rejects duplicates first) and there
    /// are fewer than `u32::MAX` of them (the loader checks).
    pub(super) fn new<T: Named>(items: &[T]) -> Self {
        if items.len() <= LINEAR_MAX {
            return Self::default();
        }
        let mut order: Vec<u32> = (0..items.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        order.sort_unstable_by(|&a, &b| {
            items[a as usize]
                .identifier()
                .cmp(items[b as usize].identifier())
        });
        Self(order.into_boxed_slice())
    }

    pub(super) fn find<'a, T: Named>(&self, items: &'a [T], id: &str) -> Option<&'a T> {
        if self.0.is_empty() {
            return items.iter().find(|item| item.identifier() == id);
        }
        let at = self
            .0
            .binary_search_by(|&i| match items.get(i as usize) {
                Some(item) => item.identifier().cmp(id),
                None => std::cmp::Ordering::Less,
            })
            .ok()?;
        items.get(*self.0.get(at)? as usize)
    }
}

fn find_param<'a>(params: &'a [Param], id: &str) -> Option<&'a Param> {
    params.iter().find(|p| &*p.identifier == id)
}

/// Type and value of one report item: 109008 or 100007.
fn check_item(data_type: &DataType, kind: DataKind, value: Json<'_, '_>) -> Result<(), Code> {
    if data_type.kind() != kind {
        return Err(Code::ParameterType);
    }
    data_type.check(value).map_err(value_code)
}

fn value_code(e: ValueError) -> Code {
    match e {
        ValueError::Kind => Code::ParameterType,
        ValueError::Range => Code::OutOfRange,
    }
}

/// The length the client SDK's 2048-byte value buffer must hold: a text's bytes, the JSON of a
/// struct or array; other values are short.
fn value_len(data_type: &DataType, value: Json<'_, '_>) -> usize {
    match data_type.kind() {
        DataKind::Text => value.as_str().map_or(0, str::len),
        DataKind::Struct | DataKind::Array => data_type.wire_len(value),
        _ => 0,
    }
}

/// Client SDK limit: identifiers up to 63 bytes (PROTOCOL.md 4.2).
const MAX_IDENTIFIER_BYTES: usize = 63;
/// Client SDK limit: values up to 2047 bytes (PROTOCOL.md 4.2).
const MAX_VALUE_BYTES: usize = 2047;
/// Up to this many entries a linear scan is used instead of the index. `benches/model.rs`
/// `lookup/N` measured about 19 ns per lookup scanning 8 entries and 17 ns bisecting 9 (shared
/// 2-core machine, noisy): the two meet here.
const LINEAR_MAX: usize = 8;

#[cfg(test)]
mod tests {
    use super::super::test_support::{doc_with, export, json, light, thermostat};
    use super::*;

    fn report(m: &ThingModel, id: &str, kind: DataKind, value: &str) -> Result<(), Code> {
        json(value, |v| {
            m.check_report_item(id, kind, v)
                .map(|p| assert_eq!(&*p.identifier, id))
        })
    }

    fn set(m: &ThingModel, id: &str, value: &str) -> Result<(), Code> {
        json(value, |v| m.check_set(id, v).map(|_| ()))
    }

    fn call(m: &ThingModel, service: &str, input: Option<&str>) -> Result<(), Code> {
        match input {
            None => m.check_call(service, None).map(|_| ()),
            Some(text) => json(text, |v| {
                m.check_call(service, v.as_object())
                    .map(|s| assert_eq!(&*s.identifier, service))
            }),
        }
    }

    #[test]
    fn report_item_codes() {
        let m = thermostat();
        assert_eq!(report(&m, "power", DataKind::Bool, "1"), Ok(()));
        assert_eq!(report(&m, "power", DataKind::Bool, "true"), Ok(()));
        assert_eq!(report(&m, "setpoint", DataKind::Float, "21"), Ok(()));
        // Access is not checked for reports: roomTemp is r, but so is every report.
        assert_eq!(report(&m, "roomTemp", DataKind::Double, "81.5"), Ok(()));
        assert_eq!(
            report(&m, "nope", DataKind::Bool, "1"),
            Err(Code::PropertyNotExist)
        );
        assert_eq!(
            report(&m, "Power", DataKind::Bool, "1"),
            Err(Code::PropertyNotExist)
        );
        // Item type differs from the TSL, even when the value would fit.
        assert_eq!(
            report(&m, "power", DataKind::Int, "1"),
            Err(Code::ParameterType)
        );
        assert_eq!(
            report(&m, "setpoint", DataKind::Double, "21"),
            Err(Code::ParameterType)
        );
        assert_eq!(
            report(&m, "setpoint", DataKind::Float, "\"21\""),
            Err(Code::ParameterType)
        );
        assert_eq!(
            report(&m, "mode", DataKind::Enum, "1.5"),
            Err(Code::ParameterType)
        );
        assert_eq!(
            report(&m, "setpoint", DataKind::Float, "36"),
            Err(Code::OutOfRange)
        );
        assert_eq!(
            report(&m, "power", DataKind::Bool, "2"),
            Err(Code::OutOfRange)
        );
        assert_eq!(
            report(&m, "mode", DataKind::Enum, "3"),
            Err(Code::OutOfRange)
        );
        assert_eq!(
            report(
                &m,
                "label",
                DataKind::Text,
                &format!("\"{}\"", "x".repeat(33))
            ),
            Err(Code::OutOfRange)
        );
        assert_eq!(
            report(&m, "limits", DataKind::Struct, r#"{"lo":1,"hi":99}"#),
            Err(Code::OutOfRange)
        );
        assert_eq!(
            report(&m, "limits", DataKind::Struct, r#"{"lo":99,"hi":"1"}"#),
            Err(Code::ParameterType)
        );
    }

    #[test]
    fn event_item_codes() {
        let m = thermostat();
        assert!(m.event("overheat").is_some());
        let overheat = m.event("overheat").unwrap();
        let check = |id: &str, kind: DataKind, value: &str| {
            json(value, |v| {
                m.check_event_item(overheat, id, kind, v)
                    .map(|p| &*p.identifier == id)
            })
        };
        assert_eq!(check("roomTemp", DataKind::Double, "81.5"), Ok(true));
        assert_eq!(check("roomTemp", DataKind::Double, "81"), Ok(true));
        assert_eq!(
            check("power", DataKind::Bool, "1"),
            Err(Code::PropertyNotExist)
        );
        assert_eq!(
            check("roomTemp", DataKind::Float, "81.5"),
            Err(Code::ParameterType)
        );
        assert_eq!(
            check("roomTemp", DataKind::Double, "\"81.5\""),
            Err(Code::ParameterType)
        );
        assert_eq!(
            check("roomTemp", DataKind::Double, "125.5"),
            Err(Code::OutOfRange)
        );
        let l = light();
        let fault = l.event("fault").unwrap();
        assert_eq!(fault.level, EventLevel::Error);
        json("65536", |v| {
            assert_eq!(
                l.check_event_item(fault, "errCode", DataKind::Int, v).err(),
                Some(Code::OutOfRange)
            );
        });
    }

    #[test]
    fn get_codes() {
        let m = export();
        assert_eq!(m.check_get("humidity").map(|p| p.access), Ok(Access::Read));
        assert_eq!(
            m.check_get("interval").map(|p| p.access),
            Ok(Access::ReadWrite)
        );
        assert_eq!(m.check_get("pin").err(), Some(Code::PropertyWriteOnly));
        assert_eq!(m.check_get("nope").err(), Some(Code::PropertyNotExist));
    }

    #[test]
    fn set_codes() {
        let m = thermostat();
        assert_eq!(set(&m, "setpoint", "19.5"), Ok(()));
        assert_eq!(set(&m, "power", "false"), Ok(()));
        assert_eq!(set(&m, "nope", "1"), Err(Code::PropertyNotExist));
        assert_eq!(set(&m, "roomTemp", "20"), Err(Code::PropertyReadOnly));
        assert_eq!(set(&m, "serviced", "\"x\""), Err(Code::PropertyReadOnly));
        assert_eq!(set(&m, "setpoint", "\"19.5\""), Err(Code::ParameterType));
        assert_eq!(set(&m, "week", "[1,2.5]"), Err(Code::ParameterType));
        assert_eq!(set(&m, "setpoint", "40"), Err(Code::OutOfRange));
        assert_eq!(set(&m, "week", "[1,2,3,4,5,6,7,8]"), Err(Code::OutOfRange));
        let e = export();
        assert_eq!(set(&e, "pin", "\"1234\""), Ok(()));
    }

    #[test]
    fn set_enforces_client_buffer_limits() {
        let long = "x".repeat(64);
        let doc = doc_with(r#"{"type":"text"}"#).replace(
            "\"identifier\":\"x\"",
            &format!("\"identifier\":\"{long}\""),
        );
        let m = ThingModel::from_slice(doc.as_bytes()).unwrap();
        assert_eq!(set(&m, &long, "\"v\""), Err(Code::OutOfRange));
        let fits = doc_with(r#"{"type":"text"}"#).replace(
            "\"identifier\":\"x\"",
            &format!("\"identifier\":\"{}\"", &long[..63]),
        );
        let m = ThingModel::from_slice(fits.as_bytes()).unwrap();
        assert_eq!(set(&m, &long[..63], "\"v\""), Ok(()));

        let m = ThingModel::from_slice(doc_with(r#"{"type":"text"}"#).as_bytes()).unwrap();
        assert_eq!(set(&m, "x", &format!("\"{}\"", "é".repeat(1023))), Ok(())); // 2046 bytes
        assert_eq!(set(&m, "x", &format!("\"{}\"", "v".repeat(2047))), Ok(()));
        assert_eq!(
            set(&m, "x", &format!("\"{}\"", "v".repeat(2048))),
            Err(Code::OutOfRange)
        );

        let m = ThingModel::from_slice(
            doc_with(r#"{"type":"array","specs":{"size":512,"item":{"type":"text"}}}"#).as_bytes(),
        )
        .unwrap();
        // 64 items of `"` + 29 bytes + `"` and 63 commas: 64 * 31 + 63 + 2 = 2049 bytes.
        let items = vec![format!("\"{}\"", "y".repeat(29)); 64].join(",");
        assert_eq!(set(&m, "x", &format!("[{items}]")), Err(Code::OutOfRange));
        let items = vec![format!("\"{}\"", "y".repeat(29)); 63].join(",");
        assert_eq!(set(&m, "x", &format!("[{items}]")), Ok(()));
    }

    #[test]
    fn call_codes() {
        let m = thermostat();
        assert_eq!(call(&m, "reboot", Some(r#"{"delay":5}"#)), Ok(()));
        assert_eq!(call(&m, "reboot", Some(r#"{"delay":0}"#)), Ok(()));
        assert_eq!(call(&m, "nope", Some("{}")), Err(Code::ServiceNotExist));
        assert_eq!(
            call(&m, "reboot", Some("{}")),
            Err(Code::ServiceInputIncorrect)
        );
        assert_eq!(call(&m, "reboot", None), Err(Code::ServiceInputIncorrect));
        assert_eq!(
            call(&m, "reboot", Some(r#"{"delay":5,"x":1}"#)),
            Err(Code::ServiceInputIncorrect)
        );
        assert_eq!(
            call(&m, "reboot", Some(r#"{"delay":"5"}"#)),
            Err(Code::ServiceInputIncorrect)
        );
        assert_eq!(
            call(&m, "reboot", Some(r#"{"delay":61}"#)),
            Err(Code::ServiceInputIncorrect)
        );
        assert_eq!(
            call(&m, "reboot", Some(r#"{"Delay":5}"#)),
            Err(Code::ServiceInputIncorrect)
        );

        let e = export();
        assert_eq!(call(&e, "set", Some("{}")), Err(Code::ServiceNotExist));
        assert_eq!(call(&e, "get", None), Err(Code::ServiceNotExist));
        assert_eq!(call(&e, "calibrate", Some(r#"{"offset":-5.5}"#)), Ok(()));
        assert_eq!(
            call(&e, "calibrate", Some(r#"{"offset":5.51}"#)),
            Err(Code::ServiceInputIncorrect)
        );

        let none = ThingModel::from_slice(
            br#"{"profile":{"productKey":"p"},"services":[{"identifier":"ping","outputData":[]}]}"#,
        )
        .unwrap();
        assert_eq!(call(&none, "ping", None), Ok(()));
        assert_eq!(call(&none, "ping", Some("{}")), Ok(()));
        assert_eq!(
            call(&none, "ping", Some(r#"{"a":1}"#)),
            Err(Code::ServiceInputIncorrect)
        );
        assert_eq!(
            none.service("ping").map(|s| s.call_type),
            Some(CallType::Async)
        );
    }

    #[test]
    fn builtins_are_not_user_events_or_services() {
        let e = export();
        assert!(e.event("post").is_none());
        assert!(e.service("set").is_none());
        assert!(e.service("get").is_none());
        assert_eq!(e.events().len(), 1);
        assert_eq!(e.services().len(), 1);
        assert_eq!(e.services()[0].call_type, CallType::Sync);
    }

    #[test]
    fn lookups_use_the_index_above_eight_entries() {
        for n in [0, 1, 8, 9, 40] {
            let props: Vec<String> = (0..n)
                .rev()
                .map(|i| {
                    format!(
                        r#"{{"identifier":"p{i}","accessMode":"rw","dataType":{{"type":"int"}}}}"#
                    )
                })
                .collect();
            let doc = format!(
                r#"{{"profile":{{"productKey":"p"}},"properties":[{}]}}"#,
                props.join(",")
            );
            let m = ThingModel::from_slice(doc.as_bytes()).unwrap();
            for i in 0..n {
                let id = format!("p{i}");
                assert_eq!(m.property(&id).map(|p| &*p.identifier), Some(id.as_str()));
            }
            assert!(m.property("p").is_none());
            assert!(m.property("zzz").is_none());
            assert!(m.property("").is_none());
        }
    }

    #[test]
    fn access_and_names_round_trip() {
        for a in [Access::Read, Access::ReadWrite, Access::Write] {
            assert_eq!(Access::from_mode(a.as_str()), Some(a));
        }
        for l in [EventLevel::Info, EventLevel::Alert, EventLevel::Error] {
            assert_eq!(EventLevel::from_name(l.as_str()), Some(l));
        }
        for c in [CallType::Sync, CallType::Async] {
            assert_eq!(CallType::from_name(c.as_str()), Some(c));
        }
        assert_eq!(Access::from_mode("R"), None);
    }
}
