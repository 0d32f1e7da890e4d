//! Parsing a TSL document (PROTOCOL.md section 11) into a [`ThingModel`].
//!
//! Owns the TSL schema: which fields are read, which are required, what their values may be.
//! Unknown fields are ignored. Every rejection names the JSON path of the offending value. The
//! document is parsed with serde_json (for line and column on syntax errors); load time is not a
//! hot path, so this module allocates freely.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use super::error::Invalid;
use super::thing::{Index, Named};
use super::value::{FloatRange, IntRange, Spec};
use super::{
    Access, CallType, DataKind, DataType, Event, EventLevel, ModelError, ModelErrorKind, Param,
    Property, Service, ThingModel,
};

pub(super) fn parse(json: &[u8]) -> Result<ThingModel, ModelError> {
    // Editors on Windows like to start UTF-8 files with a byte-order mark; JSON forbids it.
    let json = json.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(json);
    let doc: Value = serde_json::from_slice(json).map_err(syntax)?;
    let root = At::Root;
    let top = object(&doc, &root)?;

    let profile_at = root.key("profile");
    let profile = object(required(top, "profile", &root)?, &profile_at)?;
    let product_key_at = profile_at.key("productKey");
    let product_key = string(
        required(profile, "productKey", &profile_at)?,
        &product_key_at,
    )?;
    if product_key.is_empty() {
        return Err(fail(
            &product_key_at,
            Invalid::Expected {
                expected: "a non-empty string",
                found: "an empty string",
            },
        ));
    }

    let properties = list(top, "properties", &root, property)?;
    let events = list(top, "events", &root, event)?;
    let services = list(top, "services", &root, service)?;
    Ok(ThingModel {
        product_key: product_key.into(),
        property_index: Index::new(&properties),
        event_index: Index::new(&events),
        service_index: Index::new(&services),
        properties,
        events,
        services,
    })
}

/// A JSON path, rendered only when an error needs it: `$`, `.key`, `[index]`.
#[derive(Clone, Copy)]
enum At<'a> {
    Root,
    Key(&'a Self, &'a str),
    Index(&'a Self, usize),
}

impl<'a> At<'a> {
    fn key(&'a self, key: &'a str) -> Self {
        Self::Key(self, key)
    }

    fn index(&'a self, index: usize) -> Self {
        Self::Index(self, index)
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Root => f.write_str("$"),
            Self::Key(parent, key) => write!(f, "{parent}.{key}"),
            Self::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// Where a `dataType` sits, which limits its type (PROTOCOL.md 11.1).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A property, event output or service parameter: any type.
    Top,
    /// A struct member: int, float, double, text, date, bool, enum.
    Member,
    /// An array item: int, float, double, text, struct.
    Item,
}

impl Place {
    fn allows(self, kind: DataKind) -> bool {
        match self {
            Self::Top => true,
            Self::Member => !matches!(kind, DataKind::Struct | DataKind::Array),
            Self::Item => matches!(
                kind,
                DataKind::Int
                    | DataKind::Float
                    | DataKind::Double
                    | DataKind::Text
                    | DataKind::Struct
            ),
        }
    }

    fn refusal(self, kind: DataKind) -> Invalid {
        let (place, allowed) = match self {
            Self::Top => ("here", "any"),
            Self::Member => (
                "in a struct member",
                "int, float, double, text, date, bool, enum",
            ),
            Self::Item => ("as an array item", "int, float, double, text, struct"),
        };
        Invalid::TypeNotAllowed {
            kind: kind.name(),
            place,
            allowed,
        }
    }
}

/// A decimal spec value: exact when it is an integer.
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            // Spec bounds are far inside 2^53 in practice; rounding here only matters beyond.
            #[allow(clippy::cast_precision_loss)]
            Self::Int(n) => n as f64,
            Self::Dec(x) => x,
        }
    }
}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Dec(x) => write!(f, "{x}"),
        }
    }
}

fn property(v: &Value, at: &At<'_>) -> Result<Option<Property>, ModelError> {
    let m = object(v, at)?;
    let identifier = identifier(m, at)?;
    let access_at = at.key("accessMode");
    let mode = string(required(m, "accessMode", at)?, &access_at)?;
    let access = Access::from_mode(mode).ok_or_else(|| {
        fail(
            &access_at,
            Invalid::UnknownValue {
                field: "accessMode",
                value: mode.into(),
                expected: "r, rw or w",
            },
        )
    })?;
    Ok(Some(Property {
        identifier: identifier.into(),
        name: name(m, at)?.into(),
        access,
        data_type: data_type(
            required(m, "dataType", at)?,
            &at.key("dataType"),
            Place::Top,
        )?,
    }))
}

fn event(v: &Value, at: &At<'_>) -> Result<Option<Event>, ModelError> {
    let m = object(v, at)?;
    let identifier = identifier(m, at)?;
    // The console's built-in property-post event (PROTOCOL.md 11.3): not a user event.
    if identifier == "post" {
        return Ok(None);
    }
    let level_at = at.key("type");
    let level = match m.get("type") {
        None | Some(Value::Null) => EventLevel::Info,
        Some(level) => {
            let level = string(level, &level_at)?;
            EventLevel::from_name(level).ok_or_else(|| {
                fail(
                    &level_at,
                    Invalid::UnknownValue {
                        field: "event type",
                        value: level.into(),
                        expected: "info, alert or error",
                    },
                )
            })?
        }
    };
    Ok(Some(Event {
        identifier: identifier.into(),
        name: name(m, at)?.into(),
        level,
        output: list(m, "outputData", at, param)?,
    }))
}

fn service(v: &Value, at: &At<'_>) -> Result<Option<Service>, ModelError> {
    let m = object(v, at)?;
    let identifier = identifier(m, at)?;
    // The console's built-in property set/get services (PROTOCOL.md 11.3); `get` lists its
    // inputs as bare identifier strings, so nothing past the identifier is read.
    if identifier == "set" || identifier == "get" {
        return Ok(None);
    }
    let call_at = at.key("callType");
    let call_type = match m.get("callType") {
        None | Some(Value::Null) => CallType::Async,
        Some(call) => {
            let call = string(call, &call_at)?;
            CallType::from_name(call).ok_or_else(|| {
                fail(
                    &call_at,
                    Invalid::UnknownValue {
                        field: "callType",
                        value: call.into(),
                        expected: "sync or async",
                    },
                )
            })?
        }
    };
    Ok(Some(Service {
        identifier: identifier.into(),
        name: name(m, at)?.into(),
        call_type,
        input: list(m, "inputData", at, param)?,
        output: list(m, "outputData", at, param)?,
    }))
}

fn param(v: &Value, at: &At<'_>) -> Result<Option<Param>, ModelError> {
    param_in(v, at, Place::Top).map(Some)
}

fn member(v: &Value, at: &At<'_>) -> Result<Option<Param>, ModelError> {
    param_in(v, at, Place::Member).map(Some)
}

fn param_in(v: &Value, at: &At<'_>, place: Place) -> Result<Param, ModelError> {
    let m = object(v, at)?;
    Ok(Param {
        identifier: identifier(m, at)?.into(),
        data_type: data_type(required(m, "dataType", at)?, &at.key("dataType"), place)?,
    })
}

fn data_type(v: &Value, at: &At<'_>, place: Place) -> Result<DataType, ModelError> {
    let m = object(v, at)?;
    let type_at = at.key("type");
    let name = string(required(m, "type", at)?, &type_at)?;
    let kind = DataKind::from_name(name)
        .ok_or_else(|| fail(&type_at, Invalid::UnknownType(name.into())))?;
    if !place.allows(kind) {
        return Err(fail(&type_at, place.refusal(kind)));
    }
    let specs_at = at.key("specs");
    let specs = m.get("specs");
    let spec = match kind {
        DataKind::Int => {
            let (min, max) = bounds(spec_map(specs, &specs_at)?, &specs_at)?;
            Spec::Int(IntRange {
                min: min.map_or(i64::MIN, |n| match n {
                    Num::Int(n) => n,
                    // Saturating casts: a bound beyond i64 is as good as none for i32 values.
                    #[allow(clippy::cast_possible_truncation)]
                    Num::Dec(x) => x.ceil() as i64,
                }),
                max: max.map_or(i64::MAX, |n| match n {
                    Num::Int(n) => n,
                    #[allow(clippy::cast_possible_truncation)]
                    Num::Dec(x) => x.floor() as i64,
                }),
            })
        }
        DataKind::Float | DataKind::Double => {
            let (min, max) = bounds(spec_map(specs, &specs_at)?, &specs_at)?;
            let range = FloatRange {
                min: min.map_or(f64::NEG_INFINITY, Num::as_f64),
                max: max.map_or(f64::INFINITY, Num::as_f64),
            };
            if kind == DataKind::Float {
                Spec::Float(range)
            } else {
                Spec::Double(range)
            }
        }
        // The specs only label 0 and 1.
        DataKind::Bool => Spec::Bool,
        DataKind::Enum => {
            let mut keys = Vec::new();
            if let Some(map) = spec_map(specs, &specs_at)? {
                for key in map.keys() {
                    let n = parse_integer(key).ok_or_else(|| {
                        fail(&specs_at.key(key), Invalid::BadEnumKey(key.as_str().into()))
                    })?;
                    keys.push(n);
                }
            }
            keys.sort_unstable();
            keys.dedup();
            Spec::Enum(keys.into_boxed_slice())
        }
        DataKind::Text => {
            let max_bytes = match spec_map(specs, &specs_at)?.and_then(|m| m.get("length")) {
                None | Some(Value::Null) => u64::MAX,
                Some(length) => count(length, &specs_at.key("length"))?,
            };
            Spec::Text { max_bytes }
        }
        // Date specs are empty, `{}` or `[]`; anything in them is ignored.
        DataKind::Date => Spec::Date,
        DataKind::Struct => {
            let members = match specs {
                Some(Value::Array(members)) => members,
                Some(other) => {
                    return Err(fail(
                        &specs_at,
                        Invalid::Expected {
                            expected: "an array of struct members",
                            found: json_kind(other),
                        },
                    ))
                }
                None => return Err(fail(at, Invalid::Missing("specs"))),
            };
            Spec::Struct(items(members, &specs_at, member)?.into_boxed_slice())
        }
        DataKind::Array => {
            let Some(map) = spec_map(specs, &specs_at)? else {
                return Err(fail(at, Invalid::Missing("specs")));
            };
            let size_at = specs_at.key("size");
            let size = count(required(map, "size", &specs_at)?, &size_at)?;
            let size = u16::try_from(size)
                .ok()
                .filter(|&s| s <= MAX_ARRAY_SIZE)
                .ok_or_else(|| fail(&size_at, Invalid::ArrayTooLarge(size)))?;
            let item = data_type(
                required(map, "item", &specs_at)?,
                &specs_at.key("item"),
                Place::Item,
            )?;
            Spec::Array {
                size,
                item: Box::new(item),
            }
        }
    };
    Ok(DataType { spec })
}

/// Parses a list of entries, rejecting duplicate identifiers; `entry` returns `None` for an
/// entry to skip (a built-in). A missing or `null` list is empty.
fn list<T: Named>(
    m: &Map<String, Value>,
    key: &'static str,
    at: &At<'_>,
    entry: fn(&Value, &At<'_>) -> Result<Option<T>, ModelError>,
) -> Result<Vec<T>, ModelError> {
    let list_at = at.key(key);
    match m.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(values)) => items(values, &list_at, entry),
        Some(other) => Err(fail(
            &list_at,
            Invalid::Expected {
                expected: "an array",
                found: json_kind(other),
            },
        )),
    }
}

fn items<T: Named>(
    values: &[Value],
    at: &At<'_>,
    entry: fn(&Value, &At<'_>) -> Result<Option<T>, ModelError>,
) -> Result<Vec<T>, ModelError> {
    let mut out = Vec::with_capacity(values.len());
    let mut seen: HashMap<Box<str>, usize> = HashMap::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let entry_at = at.index(i);
        let Some(item) = entry(value, &entry_at)? else {
            continue;
        };
        if let Some(&first) = seen.get(item.identifier()) {
            return Err(fail(
                &entry_at.key("identifier"),
                Invalid::Duplicate {
                    identifier: item.identifier().into(),
                    first: at.index(first).to_string().into(),
                },
            ));
        }
        seen.insert(item.identifier().into(), i);
        out.push(item);
    }
    Ok(out)
}

/// `min` and `max` of a numeric type; `step` is not enforced and not read (PROTOCOL.md 11.4.3).
fn bounds(
    map: Option<&Map<String, Value>>,
    at: &At<'_>,
) -> Result<(Option<Num>, Option<Num>), ModelError> {
    let Some(map) = map else {
        return Ok((None, None));
    };
    let bound = |key: &'static str| match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => number(v, &at.key(key)).map(Some),
    };
    let (min, max) = (bound("min")?, bound("max")?);
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo.as_f64() > hi.as_f64() {
            return Err(fail(
                &at.key("min"),
                Invalid::MinAboveMax {
                    min: lo.to_string().into(),
                    max: hi.to_string().into(),
                },
            ));
        }
    }
    Ok((min, max))
}

/// Specs that must be a map: missing, `null` and `[]` (some exports write empty specs as an
/// array) are no specs.
fn spec_map<'v>(
    specs: Option<&'v Value>,
    at: &At<'_>,
) -> Result<Option<&'v Map<String, Value>>, ModelError> {
    match specs {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(other) => Err(fail(
            at,
            Invalid::Expected {
                expected: "an object",
                found: json_kind(other),
            },
        )),
    }
}

/// A spec number: a JSON number, or a string holding a JSON-style decimal (`"5"`, `"-0.5"`).
fn number(v: &Value, at: &At<'_>) -> Result<Num, ModelError> {
    let parsed = match v {
        Value::String(s) => parse_decimal(s),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Some(Num::Int(i)),
            (None, Some(x)) if x.is_finite() => Some(Num::Dec(x)),
            _ => None,
        },
        other => {
            return Err(fail(
                at,
                Invalid::Expected {
                    expected: "a number or a numeric string",
                    found: json_kind(other),
                },
            ))
        }
    };
    parsed.ok_or_else(|| fail(at, Invalid::BadNumber(v.to_string().into())))
}

/// A non-negative integer (`length`, `size`), as a JSON number or a string of digits.
fn count(v: &Value, at: &At<'_>) -> Result<u64, ModelError> {
    let parsed = match v {
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    parsed.ok_or_else(|| fail(at, Invalid::BadCount(v.to_string().into())))
}

/// `-?digits`, fitting i64.
fn parse_integer(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The JSON number grammar (`-?digits(.digits)?([eE][+-]?digits)?`), finite.
fn parse_decimal(s: &str) -> Option<Num> {
    if let Some(n) = parse_integer(s) {
        return Some(Num::Int(n));
    }
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .map(Num::Dec)
}

fn identifier<'v>(m: &'v Map<String, Value>, at: &At<'_>) -> Result<&'v str, ModelError> {
    let id_at = at.key("identifier");
    let id = string(required(m, "identifier", at)?, &id_at)?;
    if id.is_empty() {
        return Err(fail(&id_at, Invalid::EmptyIdentifier));
    }
    Ok(id)
}

/// The optional display `name`.
fn name<'v>(m: &'v Map<String, Value>, at: &At<'_>) -> Result<&'v str, ModelError> {
    match m.get("name") {
        None | Some(Value::Null) => Ok(""),
        Some(v) => string(v, &at.key("name")),
    }
}

fn required<'v>(
    m: &'v Map<String, Value>,
    key: &'static str,
    at: &At<'_>,
) -> Result<&'v Value, ModelError> {
    m.get(key).ok_or_else(|| fail(at, Invalid::Missing(key)))
}

fn object<'v>(v: &'v Value, at: &At<'_>) -> Result<&'v Map<String, Value>, ModelError> {
    v.as_object().ok_or_else(|| {
        fail(
            at,
            Invalid::Expected {
                expected: "an object",
                found: json_kind(v),
            },
        )
    })
}

fn string<'v>(v: &'v Value, at: &At<'_>) -> Result<&'v str, ModelError> {
    v.as_str().ok_or_else(|| {
        fail(
            at,
            Invalid::Expected {
                expected: "a string",
                found: json_kind(v),
            },
        )
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn fail(at: &At<'_>, what: Invalid) -> ModelError {
    ModelError::invalid(at.to_string(), what)
}

fn syntax(e: serde_json::Error) -> ModelError {
    let (line, column) = (e.line(), e.column());
    // serde_json appends " at line L column C" to its message; the position is reported apart.
    let full = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    ModelError::new(ModelErrorKind::Syntax {
        line,
        column,
        message,
    })
}

/// PROTOCOL.md 11.1: an array holds at most 512 elements.
const MAX_ARRAY_SIZE: u16 = 512;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::test_support::{export, light, thermostat};
    use super::*;

    /// Loads `doc` and returns the error's JSON path and what.
    fn invalid(doc: &str) -> (String, Invalid) {
        let e = ThingModel::from_slice(doc.as_bytes()).expect_err("document must not load");
        match e.kind() {
            ModelErrorKind::Invalid { path, what } => (path.clone(), what.clone()),
            other => panic!("not an Invalid error: {other}"),
        }
    }

    /// A document whose properties are `props` (JSON array elements).
    fn props(props: &str) -> String {
        format!(r#"{{"profile":{{"productKey":"p"}},"properties":[{props}]}}"#)
    }

    fn prop(data_type: &str) -> String {
        format!(r#"{{"identifier":"x","accessMode":"rw","dataType":{data_type}}}"#)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ringlink-model-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn the_three_test_models_load() {
        let t = thermostat();
        assert_eq!(t.product_key(), "a1ThermoPK0");
        let kinds: Vec<_> = t.properties().iter().map(|p| p.data_type.kind()).collect();
        assert_eq!(
            kinds,
            [
                DataKind::Bool,
                DataKind::Float,
                DataKind::Double,
                DataKind::Enum,
                DataKind::Text,
                DataKind::Date,
                DataKind::Array,
                DataKind::Struct
            ]
        );
        assert_eq!(t.properties()[2].access, Access::Read);
        assert_eq!(t.properties()[0].name.as_ref(), "Power");
        assert_eq!(t.events().len(), 1);
        assert_eq!(t.events()[0].level, EventLevel::Alert);
        assert_eq!(t.services()[0].input[0].identifier.as_ref(), "delay");
        assert_eq!(t.services()[0].output[0].data_type.kind(), DataKind::Bool);

        let l = light();
        assert_eq!(l.product_key(), "a1LightPK00");
        assert_eq!(l.properties().len(), 7);
        assert_eq!(
            l.property("color").map(|p| p.data_type.members().len()),
            Some(3)
        );
        assert_eq!(l.property("fw").map(|p| p.access), Some(Access::Read));
        assert_eq!(
            l.service("blink").map(|s| s.call_type),
            Some(CallType::Sync)
        );

        let e = export();
        assert_eq!(e.product_key(), "a1ExportPK0");
        assert_eq!(e.properties().len(), 4);
        assert_eq!(
            e.property("stamp").map(|p| p.data_type.kind()),
            Some(DataKind::Date)
        );
        assert_eq!(e.events().len(), 1);
        assert_eq!(e.services().len(), 1);
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_errors() {
        let good = temp_file("good.json", &props(&prop(r#"{"type":"int"}"#)));
        assert_eq!(ThingModel::load(&good).unwrap().product_key(), "p");

        let bad = temp_file("syntax.json", "{\n  \"profile\": }\n");
        let e = ThingModel::load(&bad).unwrap_err();
        assert_eq!(e.as_str(), "syntax");
        assert_eq!(e.file(), Some(bad.as_path()));
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}:2:14: ", bad.display())),
            "{shown}"
        );
        assert!(!shown.contains("at line"), "{shown}");

        let invalid = temp_file("invalid.json", &props(&prop(r#"{"type":"integer"}"#)));
        let e = ThingModel::load(&invalid).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: at $.properties[0].dataType.type: unknown type `integer`",
                invalid.display()
            )
        );
        assert_eq!(e.path(), Some("$.properties[0].dataType.type"));

        let missing = good.with_extension("missing");
        let e = ThingModel::load(&missing).unwrap_err();
        assert_eq!(e.as_str(), "io");
        assert!(e
            .to_string()
            .starts_with(&format!("{}: ", missing.display())));

        for path in [good, bad, invalid] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn errors_without_a_file() {
        let e = ThingModel::from_slice(b"[1,").unwrap_err();
        assert!(matches!(e.kind(), ModelErrorKind::Syntax { line: 1, .. }));
        assert!(e.to_string().starts_with("1:"), "{e}");
        let e = ThingModel::from_slice(b"{}").unwrap_err();
        assert_eq!(e.to_string(), "at $: missing field `profile`");
        assert_eq!(e.file(), None);
    }

    #[test]
    fn load_errors_name_the_json_path() {
        let int = prop(r#"{"type":"int","specs":{"min":"0","max":"9"}}"#);
        let bad_min = prop(r#"{"type":"int","specs":{"min":"abc","max":"9"}}"#);
        let cases: Vec<(String, &str, Invalid)> = vec![
            (
                r#"{"profile":{}}"#.into(),
                "$.profile",
                Invalid::Missing("productKey"),
            ),
            (
                r#"{"profile":{"productKey":""}}"#.into(),
                "$.profile.productKey",
                Invalid::Expected { expected: "a non-empty string", found: "an empty string" },
            ),
            (
                r#"{"profile":{"productKey":7}}"#.into(),
                "$.profile.productKey",
                Invalid::Expected { expected: "a string", found: "a number" },
            ),
            (
                props(&format!("{int},{int},{int},{bad_min}")).replace("\"x\"", "\"y\"").replacen("\"y\"", "\"a\"", 1).replacen("\"y\"", "\"b\"", 1).replacen("\"y\"", "\"c\"", 1),
                "$.properties[3].dataType.specs.min",
                Invalid::BadNumber("\"abc\"".into()),
            ),
            (
                props(&format!("{int},{int}")),
                "$.properties[1].identifier",
                Invalid::Duplicate { identifier: "x".into(), first: "$.properties[0]".into() },
            ),
            (
                props(&prop(r#"{"type":"struct","specs":{"a":1}}"#)),
                "$.properties[0].dataType.specs",
                Invalid::Expected { expected: "an array of struct members", found: "an object" },
            ),
            (
                props(&prop(r#"{"type":"struct"}"#)),
                "$.properties[0].dataType",
                Invalid::Missing("specs"),
            ),
            (
                props(&prop(r#"{"type":"array","specs":{"size":"513","item":{"type":"int"}}}"#)),
                "$.properties[0].dataType.specs.size",
                Invalid::ArrayTooLarge(513),
            ),
            (
                props(&prop(r#"{"type":"array","specs":{"size":"-1","item":{"type":"int"}}}"#)),
                "$.properties[0].dataType.specs.size",
                Invalid::BadCount("\"-1\"".into()),
            ),
            (
                props(&prop(r#"{"type":"array","specs":{"size":3}}"#)),
                "$.properties[0].dataType.specs",
                Invalid::Missing("item"),
            ),
            (
                props(&prop(r#"{"type":"array","specs":{"size":3,"item":{"type":"bool"}}}"#)),
                "$.properties[0].dataType.specs.item.type",
                Invalid::TypeNotAllowed { kind: "bool", place: "as an array item", allowed: "int, float, double, text, struct" },
            ),
            (
                props(&prop(r#"{"type":"struct","specs":[{"identifier":"a","dataType":{"type":"array","specs":{"size":1,"item":{"type":"int"}}}}]}"#)),
                "$.properties[0].dataType.specs[0].dataType.type",
                Invalid::TypeNotAllowed { kind: "array", place: "in a struct member", allowed: "int, float, double, text, date, bool, enum" },
            ),
            (
                props(&prop(r#"{"type":"struct","specs":[{"identifier":"a","dataType":{"type":"int"}},{"identifier":"a","dataType":{"type":"int"}}]}"#)),
                "$.properties[0].dataType.specs[1].identifier",
                Invalid::Duplicate { identifier: "a".into(), first: "$.properties[0].dataType.specs[0]".into() },
            ),
            (
                props(&prop(r#"{"type":"float","specs":{"min":"10","max":"1.5"}}"#)),
                "$.properties[0].dataType.specs.min",
                Invalid::MinAboveMax { min: "10".into(), max: "1.5".into() },
            ),
            (
                props(&prop(r#"{"type":"float","specs":{"max":"1e999"}}"#)),
                "$.properties[0].dataType.specs.max",
                Invalid::BadNumber("\"1e999\"".into()),
            ),
            (
                props(&prop(r#"{"type":"int","specs":{"max":" 5"}}"#)),
                "$.properties[0].dataType.specs.max",
                Invalid::BadNumber("\" 5\"".into()),
            ),
            (
                props(&prop(r#"{"type":"int","specs":{"max":true}}"#)),
                "$.properties[0].dataType.specs.max",
                Invalid::Expected { expected: "a number or a numeric string", found: "a bool" },
            ),
            (
                props(&prop(r#"{"type":"enum","specs":{"0":"a","one":"b"}}"#)),
                "$.properties[0].dataType.specs.one",
                Invalid::BadEnumKey("one".into()),
            ),
            (
                props(&prop(r#"{"type":"text","specs":{"length":"2.5"}}"#)),
                "$.properties[0].dataType.specs.length",
                Invalid::BadCount("\"2.5\"".into()),
            ),
            (
                props(&prop(r#"{"type":"int","specs":[1]}"#)),
                "$.properties[0].dataType.specs",
                Invalid::Expected { expected: "an object", found: "an array" },
            ),
            (
                props(r#"{"identifier":"x","accessMode":"x","dataType":{"type":"int"}}"#),
                "$.properties[0].accessMode",
                Invalid::UnknownValue { field: "accessMode", value: "x".into(), expected: "r, rw or w" },
            ),
            (
                props(r#"{"identifier":"","accessMode":"r","dataType":{"type":"int"}}"#),
                "$.properties[0].identifier",
                Invalid::EmptyIdentifier,
            ),
            (
                props(r#"{"identifier":"x","accessMode":"r"}"#),
                "$.properties[0]",
                Invalid::Missing("dataType"),
            ),
            (
                r#"{"profile":{"productKey":"p"},"properties":{}}"#.into(),
                "$.properties",
                Invalid::Expected { expected: "an array", found: "an object" },
            ),
            (
                r#"{"profile":{"productKey":"p"},"events":[{"identifier":"e","type":"fatal"}]}"#.into(),
                "$.events[0].type",
                Invalid::UnknownValue { field: "event type", value: "fatal".into(), expected: "info, alert or error" },
            ),
            (
                r#"{"profile":{"productKey":"p"},"events":[{"identifier":"e","outputData":[{"identifier":"o","dataType":{"type":"x"}}]}]}"#.into(),
                "$.events[0].outputData[0].dataType.type",
                Invalid::UnknownType("x".into()),
            ),
            (
                r#"{"profile":{"productKey":"p"},"services":[{"identifier":"s","inputData":["a"]}]}"#.into(),
                "$.services[0].inputData[0]",
                Invalid::Expected { expected: "an object", found: "a string" },
            ),
            (
                r#"{"profile":{"productKey":"p"},"services":[{"identifier":"s","callType":"later"}]}"#.into(),
                "$.services[0].callType",
                Invalid::UnknownValue { field: "callType", value: "later".into(), expected: "sync or async" },
            ),
            (
                r#"{"profile":{"productKey":"p"},"services":[{"identifier":"s"},{"identifier":"s"}]}"#.into(),
                "$.services[1].identifier",
                Invalid::Duplicate { identifier: "s".into(), first: "$.services[0]".into() },
            ),
        ];
        for (doc, path, what) in cases {
            assert_eq!(invalid(&doc), (path.to_owned(), what), "{doc}");
        }
    }

    #[test]
    fn specs_accept_numbers_strings_and_lenient_shapes() {
        let doc = props(&[
            r#"{"identifier":"a","accessMode":"rw","dataType":{"type":"int","specs":{"min":0,"max":10.5,"step":"whatever"}}}"#,
            r#"{"identifier":"b","accessMode":"rw","dataType":{"type":"double","specs":{"min":"-1.5e2","max":"2E+2"}}}"#,
            r#"{"identifier":"c","accessMode":"rw","dataType":{"type":"text","specs":{"length":16}}}"#,
            r#"{"identifier":"d","accessMode":"rw","dataType":{"type":"bool","specs":[]}}"#,
            r#"{"identifier":"e","accessMode":"rw","dataType":{"type":"float"},"unknownField":[1,2]}"#,
            r#"{"identifier":"f","accessMode":"rw","dataType":{"type":"array","specs":{"size":0,"item":{"type":"struct","specs":[]}}}}"#,
        ]
        .join(","));
        let m = ThingModel::from_slice(doc.as_bytes()).unwrap();
        assert_eq!(m.properties().len(), 6);
        assert_eq!(
            m.property("a").map(|p| &p.data_type.spec),
            Some(&Spec::Int(IntRange { min: 0, max: 10 }))
        );
        assert_eq!(
            m.property("b").map(|p| &p.data_type.spec),
            Some(&Spec::Double(FloatRange {
                min: -150.0,
                max: 200.0
            }))
        );
        assert_eq!(
            m.property("c").map(|p| &p.data_type.spec),
            Some(&Spec::Text { max_bytes: 16 })
        );
        // A byte-order mark is skipped.
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(doc.as_bytes());
        assert!(ThingModel::from_slice(&bom).is_ok());
    }

    #[test]
    fn error_size_is_pinned() {
        assert_eq!(size_of::<ModelError>(), 24);
    }
}
