//! One TSL `dataType` with its parsed specs: the value check (kind, then range) and the
//! normalising JSON writer.
//!
//! Owns the value rules of PROTOCOL.md sections 4.2 and 11.4. Never allocates while checking and
//! never panics on any value. Recursion follows the *type* (at most struct-in-array, three levels)
//! when checking; when writing an untyped value it follows the value, whose depth the JSON parser
//! bounds (simd-json's `DEFAULT_MAX_DEPTH` is 1024).

use simd_json::prelude::*;
use simd_json::ValueType;

use super::{DataKind, Json, Param};

/// A parsed TSL `dataType`: its kind and its specs.
#[derive(Clone, Debug, PartialEq)]
pub struct DataType {
    pub(super) spec: Spec,
}

/// Why a value does not fit a [`DataType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value's JSON kind does not fit the type (a string for an int, `2.5` for an int, ...).
    /// Link code 109008 (109006 inside callService).
    #[error("value kind does not fit the type")]
    Kind,
    /// The kind fits, but the value is outside the specs (above `max`, not an enum key, text too
    /// long, an undeclared struct member, ...). Link code 100007 (109006 inside callService).
    #[error("value outside the specs")]
    Range,
}

/// How [`DataType::write_value`] writes numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueStyle {
    /// The WebSocket wire: numbers as given (`21` stays `21`, `2.5` stays `2.5`).
    Wire,
    /// Upstream Alink (PROTOCOL.md section 13): float and double always carry a decimal point
    /// (`21` is written `21.0`).
    Alink,
}

impl DataType {
    /// The TSL type.
    pub fn kind(&self) -> DataKind {
        match self.spec {
            Spec::Int(_) => DataKind::Int,
            Spec::Float(_) => DataKind::Float,
            Spec::Double(_) => DataKind::Double,
            Spec::Bool => DataKind::Bool,
            Spec::Enum(_) => DataKind::Enum,
            Spec::Text { .. } => DataKind::Text,
            Spec::Date => DataKind::Date,
            Spec::Struct(_) => DataKind::Struct,
            Spec::Array { .. } => DataKind::Array,
        }
    }

    /// The declared members of a struct type (empty for every other type).
    pub fn members(&self) -> &[Param] {
        match &self.spec {
            Spec::Struct(members) => members,
            _ => &[],
        }
    }

    /// The item type of an array type.
    pub fn item(&self) -> Option<&Self> {
        match &self.spec {
            Spec::Array { item, .. } => Some(item),
            _ => None,
        }
    }

    /// Checks a value: its kind first, then its range, recursively for struct members and array
    /// elements.
    ///
    /// A kind mismatch anywhere in the value wins over a range failure anywhere else, mirroring
    /// the per-method order of PROTOCOL.md section 7 (type 109008 before range 100007).
    pub fn check(&self, value: Json<'_, '_>) -> Result<(), ValueError> {
        let mut in_range = true;
        self.walk(value, &mut in_range)?;
        if in_range {
            Ok(())
        } else {
            Err(ValueError::Range)
        }
    }

    /// Appends the value as compact JSON, normalised: a bool `true`/`false` is written `1`/`0`,
    /// strings are escaped, and with [`ValueStyle::Alink`] float and double values always carry a
    /// decimal point; struct members and array items follow their declared types.
    ///
    /// Total: a value that failed [`check`](Self::check) is written as it is, still valid JSON.
    pub fn write_value(&self, value: Json<'_, '_>, style: ValueStyle, out: &mut Vec<u8>) {
        self.emit(value, style, out);
    }

    /// Length in bytes of the wire form of `value`, without allocating.
    pub(super) fn wire_len(&self, value: Json<'_, '_>) -> usize {
        let mut count = Count(0);
        self.emit(value, ValueStyle::Wire, &mut count);
        count.0
    }

    /// Returns `Err` only for a kind mismatch; a range failure clears `in_range` and goes on, so
    /// that a later kind mismatch still wins.
    fn walk(&self, value: Json<'_, '_>, in_range: &mut bool) -> Result<(), ValueError> {
        let fits = match &self.spec {
            Spec::Int(range) => {
                let n = integer(value).ok_or(ValueError::Kind)?;
                (i128::from(i32::MIN)..=i128::from(i32::MAX)).contains(&n)
                    && (i128::from(range.min)..=i128::from(range.max)).contains(&n)
            }
            Spec::Float(range) | Spec::Double(range) => {
                let x = number(value).ok_or(ValueError::Kind)?;
                // Written so that NaN (which JSON cannot carry) would count as out of range.
                x >= range.min && x <= range.max
            }
            Spec::Bool => match value.value_type() {
                ValueType::Bool => true,
                _ => matches!(integer(value).ok_or(ValueError::Kind)?, 0 | 1),
            },
            Spec::Enum(keys) => {
                let n = integer(value).ok_or(ValueError::Kind)?;
                i64::try_from(n).is_ok_and(|n| keys.binary_search(&n).is_ok())
            }
            Spec::Text { max_bytes } => {
                let s = value.as_str().ok_or(ValueError::Kind)?;
                u64::try_from(s.len()).is_ok_and(|len| len <= *max_bytes)
            }
            Spec::Date => {
                let s = value.as_str().ok_or(ValueError::Kind)?;
                is_date(s)
            }
            Spec::Struct(members) => {
                let object = value.as_object().ok_or(ValueError::Kind)?;
                let mut fits = true;
                for (key, member_value) in object.iter() {
                    match members.iter().find(|m| &*m.identifier == key) {
                        Some(member) => member.data_type.walk(member_value, in_range)?,
                        // "struct members must be declared" is a range rule (11.4.3), so an
                        // undeclared member is Range, not Kind.
                        None => fits = false,
                    }
                }
                fits
            }
            Spec::Array { size, item } => {
                let array = value.as_array().ok_or(ValueError::Kind)?;
                for element in array.iter() {
                    item.walk(element, in_range)?;
                }
                array.len() <= usize::from(*size)
            }
        };
        if !fits {
            *in_range = false;
        }
        Ok(())
    }

    fn emit<O: Out>(&self, value: Json<'_, '_>, style: ValueStyle, out: &mut O) {
        match (&self.spec, value.value_type()) {
            (Spec::Bool, ValueType::Bool) => {
                out.put(if value.as_bool() == Some(true) {
                    b"1"
                } else {
                    b"0"
                });
            }
            (
                Spec::Float(_) | Spec::Double(_),
                ValueType::I64 | ValueType::U64 | ValueType::F64,
            ) if style == ValueStyle::Alink => match value.cast_f64() {
                Some(x) => put_alink_float(x, out),
                None => emit_json(value, out),
            },
            (Spec::Struct(members), ValueType::Object) => {
                let Some(object) = value.as_object() else {
                    return emit_json(value, out);
                };
                out.put(b"{");
                for (i, (key, member_value)) in object.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    put_str(key, out);
                    out.put(b":");
                    match members.iter().find(|m| &*m.identifier == key) {
                        Some(member) => member.data_type.emit(member_value, style, out),
                        None => emit_json(member_value, out),
                    }
                }
                out.put(b"}");
            }
            (Spec::Array { item, .. }, ValueType::Array) => {
                let Some(array) = value.as_array() else {
                    return emit_json(value, out);
                };
                out.put(b"[");
                for (i, element) in array.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    item.emit(element, style, out);
                }
                out.put(b"]");
            }
            _ => emit_json(value, out),
        }
    }
}

/// Writes any JSON value compactly, strings escaped, numbers and bools as given. For values with
/// no type information (an undeclared struct member, a reply item of an unknown property).
pub fn write_json(value: Json<'_, '_>, out: &mut Vec<u8>) {
    emit_json(value, out);
}

/// The parsed specs of one type. Bounds are inclusive; missing bounds are the widest possible.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Spec {
    Int(IntRange),
    Float(FloatRange),
    Double(FloatRange),
    Bool,
    /// The enum keys, sorted, without duplicates.
    Enum(Box<[i64]>),
    /// `length`: the maximum UTF-8 byte length; `u64::MAX` when the specs give none.
    Text {
        max_bytes: u64,
    },
    Date,
    Struct(Box<[Param]>),
    Array {
        size: u16,
        item: Box<DataType>,
    },
}

/// Integer bounds, exact: a decimal spec bound is rounded inwards (`min` up, `max` down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IntRange {
    pub(super) min: i64,
    pub(super) max: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct FloatRange {
    pub(super) min: f64,
    pub(super) max: f64,
}

/// A JSON integer node (I64 or U64; a float node such as `2.0` is not an integer).
fn integer(value: Json<'_, '_>) -> Option<i128> {
    match value.value_type() {
        ValueType::I64 => value.as_i64().map(i128::from),
        ValueType::U64 => value.as_u64().map(i128::from),
        _ => None,
    }
}

/// Any JSON number node.
fn number(value: Json<'_, '_>) -> Option<f64> {
    match value.value_type() {
        ValueType::I64 | ValueType::U64 | ValueType::F64 => value.cast_f64(),
        _ => None,
    }
}

/// Decimal digits only (no sign), at least one, and the number fits i64.
fn is_date(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<i64>().is_ok()
}

/// Where [`DataType::emit`] writes: a buffer, or a counter that only measures.
trait Out {
    fn put(&mut self, bytes: &[u8]);
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct Count(usize);

impl Out for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
}

fn emit_json<O: Out>(value: Json<'_, '_>, out: &mut O) {
    match value.value_type() {
        ValueType::Bool => out.put(if value.as_bool() == Some(true) {
            b"true"
        } else {
            b"false"
        }),
        ValueType::I64 | ValueType::U64 => {
            let mut buf = itoa::Buffer::new();
            match (value.as_i64(), value.as_u64()) {
                (Some(n), _) => out.put(buf.format(n).as_bytes()),
                (None, Some(n)) => out.put(buf.format(n).as_bytes()),
                (None, None) => out.put(b"null"),
            }
        }
        ValueType::F64 => match value.as_f64() {
            Some(x) if x.is_finite() => out.put(ryu::Buffer::new().format_finite(x).as_bytes()),
            // JSON cannot carry NaN or infinities; `null` keeps the output valid JSON.
            _ => out.put(b"null"),
        },
        ValueType::String => put_str(value.as_str().unwrap_or_default(), out),
        ValueType::Array => {
            out.put(b"[");
            if let Some(array) = value.as_array() {
                for (i, element) in array.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    emit_json(element, out);
                }
            }
            out.put(b"]");
        }
        ValueType::Object => {
            out.put(b"{");
            if let Some(object) = value.as_object() {
                for (i, (key, member)) in object.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    put_str(key, out);
                    out.put(b":");
                    emit_json(member, out);
                }
            }
            out.put(b"}");
        }
        // Null, and the 128-bit and extended node types this build of simd-json never produces.
        _ => out.put(b"null"),
    }
}

/// A float in Alink style: shortest round-trip digits (ryu) and always a decimal point, also
/// in exponent form (`1e16` becomes `1.0e16`), so that writing the re-parsed output again gives
/// the same bytes.
fn put_alink_float<O: Out>(x: f64, out: &mut O) {
    if !x.is_finite() {
        return out.put(b"null");
    }
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(x);
    if s.contains('.') {
        return out.put(s.as_bytes());
    }
    match s.find('e') {
        Some(e) => {
            out.put(&s.as_bytes()[..e]);
            out.put(b".0");
            out.put(&s.as_bytes()[e..]);
        }
        None => {
            out.put(s.as_bytes());
            out.put(b".0");
        }
    }
}

/// A JSON string literal. The input is already unescaped (tape strings are); `"`, `\` and the
/// control characters are escaped, everything else (also non-ASCII) is copied.
fn put_str<O: Out>(s: &str, out: &mut O) {
    out.put(b"\"");
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.put(&bytes[start..i]);
        out.put(escape);
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.put(b"\"");
}

const HEX: [u8; 16] = *b"0123456789abcdef";
