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

/// A JSON integer node (I64 or U64; a float node such as `2.0` is not an integer). An integer
/// literal beyond u64 and i64 reads as `i128::MAX` or `i128::MIN`: an integer, out of every
/// range.
fn integer(value: Json<'_, '_>) -> Option<i128> {
    match value.value_type() {
        ValueType::I64 => value.as_i64().map(i128::from),
        ValueType::U64 => value.as_u64().map(i128::from),
        ValueType::F64 => {
            let bits = value.as_f64()?.to_bits();
            match bits & !SIGN_BIT {
                OUT_OF_RANGE_INTEGER if bits & SIGN_BIT == 0 => Some(i128::MAX),
                OUT_OF_RANGE_INTEGER => Some(i128::MIN),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The value the decoder gives a JSON number that no 64-bit node holds (PROTOCOL.md 4.2 and
/// 11.4): an integer literal beyond u64 or i64, or a number beyond f64 (`1e400`). It is a NaN,
/// which JSON itself cannot carry, so it is no real value: every float range check fails on it
/// (100007), and with `integer` true, int, enum and bool take it as an integer out of range
/// (100007) rather than as a float (109008); a messageId or a type code reads as no integer.
pub fn out_of_range_number(integer: bool, negative: bool) -> f64 {
    let tag = if integer {
        OUT_OF_RANGE_INTEGER
    } else {
        OUT_OF_RANGE_FLOAT
    };
    f64::from_bits(if negative { tag | SIGN_BIT } else { tag })
}

/// Quiet NaNs with payloads 1 and 2 (see [`out_of_range_number`]).
const OUT_OF_RANGE_INTEGER: u64 = 0x7ff8_0000_0000_0001;
const OUT_OF_RANGE_FLOAT: u64 = 0x7ff8_0000_0000_0002;
const SIGN_BIT: u64 = 1 << 63;

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

/// A JSON string literal. The input is already unescaped (tape strings are).
fn put_str<O: Out>(s: &str, out: &mut O) {
    crate::protocol::json::escape_str(s, |bytes| out.put(bytes));
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{json, light, thermostat, ty};
    use super::*;

    fn check(t: &DataType, value: &str) -> Result<(), ValueError> {
        json(value, |v| t.check(v))
    }

    fn write(t: &DataType, value: &str, style: ValueStyle) -> String {
        json(value, |v| {
            let mut out = Vec::new();
            t.write_value(v, style, &mut out);
            String::from_utf8(out).expect("UTF-8 output")
        })
    }

    const OK: Result<(), ValueError> = Ok(());

    #[test]
    fn numbers_beyond_64_bits_are_out_of_range_not_another_kind() {
        let two_pow_64 = "18446744073709551616";
        let huge = "9".repeat(60_000);
        let minus_huge = format!("-{huge}");
        // Without specs the bounds are the widest: still out of range (a NaN, not infinity).
        for t in [
            ty(r#"{"type":"int"}"#),
            ty(r#"{"type":"enum","specs":{"0":"a"}}"#),
        ] {
            for v in [two_pow_64, "-9223372036854775809", &huge, &minus_huge] {
                assert_eq!(
                    check(&t, v),
                    Err(ValueError::Range),
                    "{:?} {v:.30}",
                    t.kind()
                );
            }
            // A float literal stays a float: the wrong kind for int and enum, as 2.0 is.
            assert_eq!(check(&t, "1e400"), Err(ValueError::Kind));
            assert_eq!(check(&t, "1e30"), Err(ValueError::Kind));
        }
        assert_eq!(
            check(&ty(r#"{"type":"bool"}"#), two_pow_64),
            Err(ValueError::Range)
        );
        assert_eq!(
            check(&ty(r#"{"type":"bool"}"#), "1e400"),
            Err(ValueError::Kind)
        );
        for t in [ty(r#"{"type":"float"}"#), ty(r#"{"type":"double"}"#)] {
            for v in [
                "1e400",
                "-1e400",
                two_pow_64,
                &huge,
                &minus_huge,
                "1.5e99999",
            ] {
                // Also an integer literal beyond 64 bits where a double would hold it (2^64
                // without specs): the decoder keeps no value for it.
                assert_eq!(
                    check(&t, v),
                    Err(ValueError::Range),
                    "{:?} {v:.30}",
                    t.kind()
                );
            }
            assert_eq!(check(&t, "1e30"), OK);
        }
        // Text and date want strings: a number is the wrong kind however large.
        assert_eq!(
            check(&ty(r#"{"type":"date"}"#), "1e400"),
            Err(ValueError::Kind)
        );
        assert_eq!(
            check(&ty(r#"{"type":"text"}"#), &huge),
            Err(ValueError::Kind)
        );
        // Inside an array, a struct: the same, and the kind rule still wins over the range one.
        let week = ty(r#"{"type":"array","specs":{"size":"7","item":{"type":"int"}}}"#);
        assert_eq!(
            check(&week, &format!("[1,{two_pow_64}]")),
            Err(ValueError::Range)
        );
        assert_eq!(
            check(&week, &format!("[{two_pow_64},1.5]")),
            Err(ValueError::Kind)
        );
    }
    const KIND: Result<(), ValueError> = Err(ValueError::Kind);
    const RANGE: Result<(), ValueError> = Err(ValueError::Range);

    #[test]
    fn int_bounds_and_kind() {
        let t = ty(r#"{"type":"int","specs":{"min":"-5","max":"5","step":"1"}}"#);
        assert_eq!(t.kind(), DataKind::Int);
        for (value, want) in [
            ("-5", OK),
            ("5", OK),
            ("0", OK),
            ("-6", RANGE),
            ("6", RANGE),
            ("2.5", KIND),
            ("2.0", KIND),
            ("\"3\"", KIND),
            ("true", KIND),
            ("null", KIND),
            ("[1]", KIND),
            ("{}", KIND),
        ] {
            assert_eq!(check(&t, value), want, "{value}");
        }
    }

    #[test]
    fn int_must_fit_i32() {
        let t = ty(r#"{"type":"int","specs":{}}"#);
        for (value, want) in [
            ("2147483647", OK),
            ("-2147483648", OK),
            ("2147483648", RANGE),
            ("-2147483649", RANGE),
            ("9223372036854775807", RANGE),
            ("18446744073709551615", RANGE),
        ] {
            assert_eq!(check(&t, value), want, "{value}");
        }
        // Spec bounds beyond i32 do not widen it.
        let t = ty(r#"{"type":"int","specs":{"min":"-9999999999","max":"9999999999"}}"#);
        assert_eq!(check(&t, "2147483648"), RANGE);
    }

    #[test]
    fn int_decimal_bounds_round_inwards() {
        let t = ty(r#"{"type":"int","specs":{"min":"0.5","max":9.5}}"#);
        assert_eq!(check(&t, "0"), RANGE);
        assert_eq!(check(&t, "1"), OK);
        assert_eq!(check(&t, "9"), OK);
        assert_eq!(check(&t, "10"), RANGE);
    }

    #[test]
    fn float_and_double_accept_integers() {
        let m = thermostat();
        let setpoint = &m.property("setpoint").unwrap().data_type;
        assert_eq!(setpoint.kind(), DataKind::Float);
        for (value, want) in [
            ("21", OK),
            ("21.5", OK),
            ("5", OK),
            ("35.0", OK),
            ("4.99", RANGE),
            ("35.01", RANGE),
            ("-1e3", RANGE),
            ("\"21\"", KIND),
            ("true", KIND),
            ("null", KIND),
        ] {
            assert_eq!(check(setpoint, value), want, "{value}");
        }
        let room = &m.property("roomTemp").unwrap().data_type;
        assert_eq!(room.kind(), DataKind::Double);
        assert_eq!(check(room, "-40"), OK);
        assert_eq!(check(room, "125"), OK);
        assert_eq!(check(room, "125.001"), RANGE);
        assert_eq!(check(room, "-40.5"), RANGE);
        let open = ty(r#"{"type":"double"}"#);
        assert_eq!(check(&open, "18446744073709551615"), OK);
        assert_eq!(check(&open, "-1.5e300"), OK);
    }

    #[test]
    fn bool_values() {
        let t = ty(r#"{"type":"bool","specs":{"0":"off","1":"on"}}"#);
        for (value, want) in [
            ("0", OK),
            ("1", OK),
            ("true", OK),
            ("false", OK),
            ("2", RANGE),
            ("-1", RANGE),
            ("1.0", KIND),
            ("\"1\"", KIND),
            ("null", KIND),
        ] {
            assert_eq!(check(&t, value), want, "{value}");
        }
    }

    #[test]
    fn enum_keys() {
        let m = light();
        let scene = &m.property("scene").unwrap().data_type;
        assert_eq!(scene.kind(), DataKind::Enum);
        for (value, want) in [
            ("0", OK),
            ("2", OK),
            ("10", OK),
            ("3", RANGE),
            ("-1", RANGE),
            ("18446744073709551615", RANGE),
            ("1.5", KIND),
            ("\"1\"", KIND),
            ("true", KIND),
        ] {
            assert_eq!(check(scene, value), want, "{value}");
        }
        let negative = ty(r#"{"type":"enum","specs":{"-1":"none","5":"five"}}"#);
        assert_eq!(check(&negative, "-1"), OK);
        assert_eq!(check(&negative, "0"), RANGE);
    }

    #[test]
    fn text_length_counts_utf8_bytes() {
        let t = ty(r#"{"type":"text","specs":{"length":"4"}}"#);
        for (value, want) in [
            ("\"\"", OK),
            ("\"abcd\"", OK),
            ("\"abcde\"", RANGE),
            ("\"äö\"", OK),        // 2 chars, 4 bytes
            ("\"äöü\"", RANGE),    // 3 chars, 6 bytes
            ("\"a€\"", OK),        // 4 bytes
            ("\"a\\n\\\"b\"", OK), // 4 bytes once unescaped
            ("\"€€\"", RANGE),
            ("5", KIND),
            ("null", KIND),
        ] {
            assert_eq!(check(&t, value), want, "{value}");
        }
        assert_eq!(
            check(
                &ty(r#"{"type":"text"}"#),
                &format!("\"{}\"", "x".repeat(5000))
            ),
            OK
        );
    }

    #[test]
    fn date_is_digits_fitting_i64() {
        let t = ty(r#"{"type":"date","specs":{}}"#);
        for (value, want) in [
            ("\"1700000000000\"", OK),
            ("\"0\"", OK),
            ("\"9223372036854775807\"", OK),
            ("\"9223372036854775808\"", RANGE),
            ("\"\"", RANGE),
            ("\"-1\"", RANGE),
            ("\"+1\"", RANGE),
            ("\"12a\"", RANGE),
            ("\" 1\"", RANGE),
            ("\"1.5\"", RANGE),
            ("1700000000000", KIND),
            ("null", KIND),
        ] {
            assert_eq!(check(&t, value), want, "{value}");
        }
        assert_eq!(ty(r#"{"type":"date","specs":[]}"#).kind(), DataKind::Date);
    }

    #[test]
    fn struct_members() {
        let m = thermostat();
        let limits = &m.property("limits").unwrap().data_type;
        assert_eq!(limits.kind(), DataKind::Struct);
        assert_eq!(limits.members().len(), 2);
        for (value, want) in [
            (r#"{"lo":0,"hi":50}"#, OK),
            (r#"{"lo":1}"#, OK),
            ("{}", OK),
            (r#"{"lo":51}"#, RANGE),
            (r#"{"lo":1,"extra":1}"#, RANGE),
            (r#"{"lo":"1"}"#, KIND),
            (r#"{"lo":2.5}"#, KIND),
            // A kind mismatch anywhere wins over a range failure before it.
            (r#"{"lo":51,"hi":"x"}"#, KIND),
            (r#"{"extra":1,"hi":"x"}"#, KIND),
            ("[]", KIND),
            ("1", KIND),
        ] {
            assert_eq!(check(limits, value), want, "{value}");
        }
        let all = ty(r#"{"type":"struct","specs":[
            {"identifier":"i","dataType":{"type":"int","specs":{"min":"0","max":"9"}}},
            {"identifier":"f","dataType":{"type":"float","specs":{"min":"0","max":"1"}}},
            {"identifier":"d","dataType":{"type":"double"}},
            {"identifier":"t","dataType":{"type":"text","specs":{"length":"2"}}},
            {"identifier":"when","dataType":{"type":"date","specs":[]}},
            {"identifier":"on","dataType":{"type":"bool"}},
            {"identifier":"e","dataType":{"type":"enum","specs":{"1":"a"}}}]}"#);
        assert_eq!(
            check(
                &all,
                r#"{"i":9,"f":1,"d":-3.5,"t":"ab","when":"1","on":true,"e":1}"#
            ),
            OK
        );
        assert_eq!(check(&all, r#"{"t":"abc"}"#), RANGE);
        assert_eq!(check(&all, r#"{"on":2}"#), RANGE);
        assert_eq!(check(&all, r#"{"e":2}"#), RANGE);
        assert_eq!(check(&all, r#"{"when":"x"}"#), RANGE);
        assert_eq!(check(&all, r#"{"when":1}"#), KIND);
    }

    #[test]
    fn array_size_and_items() {
        let m = thermostat();
        let week = &m.property("week").unwrap().data_type;
        assert_eq!(week.kind(), DataKind::Array);
        assert_eq!(week.item().map(DataType::kind), Some(DataKind::Int));
        for (value, want) in [
            ("[]", OK),
            ("[1,2,3,4,5,6,7]", OK),
            ("[1,2,3,4,5,6,7,8]", RANGE),
            ("[2147483648]", RANGE),
            ("[1,\"2\"]", KIND),
            ("[1,2,3,4,5,6,7,8,\"9\"]", KIND),
            ("[1.5]", KIND),
            ("{}", KIND),
            ("\"[]\"", KIND),
        ] {
            assert_eq!(check(week, value), want, "{value}");
        }
        let structs = ty(
            r#"{"type":"array","specs":{"size":2,"item":{"type":"struct","specs":[
            {"identifier":"v","dataType":{"type":"float","specs":{"min":"0","max":"1"}}}]}}}"#,
        );
        assert_eq!(check(&structs, r#"[{"v":0},{"v":1.0}]"#), OK);
        assert_eq!(check(&structs, r#"[{"v":0},{"v":1.5}]"#), RANGE);
        assert_eq!(check(&structs, r#"[{"v":0},{"w":1}]"#), RANGE);
        assert_eq!(check(&structs, r#"[{"v":0},{"v":"1"}]"#), KIND);
        assert_eq!(check(&structs, r#"[{},{},{}]"#), RANGE);
        assert_eq!(check(&structs, r#"[1]"#), KIND);
        let max = ty(r#"{"type":"array","specs":{"size":"512","item":{"type":"text"}}}"#);
        let items = vec!["\"\""; 512].join(",");
        assert_eq!(check(&max, &format!("[{items}]")), OK);
        assert_eq!(check(&max, &format!("[{items},\"\"]")), RANGE);
    }

    #[test]
    fn alink_style_writes_floats_with_a_point() {
        let m = thermostat();
        let setpoint = &m.property("setpoint").unwrap().data_type;
        assert_eq!(write(setpoint, "21", ValueStyle::Alink), "21.0");
        assert_eq!(write(setpoint, "21", ValueStyle::Wire), "21");
        assert_eq!(write(setpoint, "21.5", ValueStyle::Alink), "21.5");
        assert_eq!(write(setpoint, "21.50", ValueStyle::Wire), "21.5");
        assert_eq!(write(setpoint, "-0.0", ValueStyle::Alink), "-0.0");
        assert_eq!(write(setpoint, "1e16", ValueStyle::Alink), "1.0e16");
        assert_eq!(write(setpoint, "1e-7", ValueStyle::Alink), "1.0e-7");
        assert_eq!(write(setpoint, "2.5e-7", ValueStyle::Alink), "2.5e-7");
        let room = &m.property("roomTemp").unwrap().data_type;
        assert_eq!(write(room, "-40", ValueStyle::Alink), "-40.0");
        // Integers of other types stay integers.
        let delay = &m.property("week").unwrap().data_type;
        assert_eq!(write(delay, "[1,2]", ValueStyle::Alink), "[1,2]");
    }

    #[test]
    fn bools_are_written_as_0_and_1() {
        let t = ty(r#"{"type":"bool"}"#);
        for style in [ValueStyle::Wire, ValueStyle::Alink] {
            assert_eq!(write(&t, "true", style), "1");
            assert_eq!(write(&t, "false", style), "0");
            assert_eq!(write(&t, "1", style), "1");
        }
    }

    #[test]
    fn strings_are_escaped() {
        let t = ty(r#"{"type":"text"}"#);
        assert_eq!(
            write(
                &t,
                r#""a\"b\\c\n\r\t\b\f\u0001\u001f/é€""#,
                ValueStyle::Wire
            ),
            r#""a\"b\\c\n\r\t\b\f\u0001\u001f/é€""#
        );
        assert_eq!(write(&t, r#""\u00e9""#, ValueStyle::Wire), "\"é\"");
    }

    #[test]
    fn structs_and_arrays_are_written_per_member_type() {
        let t = ty(r#"{"type":"struct","specs":[
            {"identifier":"f","dataType":{"type":"float"}},
            {"identifier":"on","dataType":{"type":"bool"}},
            {"identifier":"n","dataType":{"type":"int"}}]}"#);
        assert_eq!(
            write(&t, r#"{"f":2,"on":true,"n":3,"x":true}"#, ValueStyle::Alink),
            r#"{"f":2.0,"on":1,"n":3,"x":true}"#
        );
        assert_eq!(
            write(&t, r#"{ "f" : 2 , "on" : false }"#, ValueStyle::Wire),
            r#"{"f":2,"on":0}"#
        );
        let a = ty(r#"{"type":"array","specs":{"size":9,"item":{"type":"double"}}}"#);
        assert_eq!(
            write(&a, "[1, 2.5, -3]", ValueStyle::Alink),
            "[1.0,2.5,-3.0]"
        );
        assert_eq!(write(&a, "[1, 2.5, -3]", ValueStyle::Wire), "[1,2.5,-3]");
    }

    #[test]
    fn values_failing_the_check_are_written_as_they_are() {
        let int = ty(r#"{"type":"int"}"#);
        assert_eq!(write(&int, r#""x""#, ValueStyle::Alink), r#""x""#);
        assert_eq!(write(&int, "2.5", ValueStyle::Alink), "2.5");
        assert_eq!(write(&int, "null", ValueStyle::Alink), "null");
        let float = ty(r#"{"type":"float"}"#);
        assert_eq!(
            write(&float, "[1,{\"a\":true}]", ValueStyle::Alink),
            "[1,{\"a\":true}]"
        );
        let week = ty(r#"{"type":"array","specs":{"size":1,"item":{"type":"float"}}}"#);
        assert_eq!(write(&week, "{\"a\":1}", ValueStyle::Alink), "{\"a\":1}");
        assert_eq!(
            write(&week, "[1,\"a\",null]", ValueStyle::Alink),
            "[1.0,\"a\",null]"
        );
    }

    #[test]
    fn write_json_is_compact() {
        let text = r#" { "a" : [ 1 , -2 , 3.5 , true , false , null , "s\"" ] , "b" : { } , "c" : [ ] ,
            "u" : 18446744073709551615 } "#;
        let out = json(text, |v| {
            let mut out = Vec::new();
            write_json(v, &mut out);
            out
        });
        assert_eq!(
            out,
            br#"{"a":[1,-2,3.5,true,false,null,"s\""],"b":{},"c":[],"u":18446744073709551615}"#
        );
    }

    #[test]
    fn wire_len_counts_without_writing() {
        let t = ty(r#"{"type":"struct","specs":[{"identifier":"on","dataType":{"type":"bool"}}]}"#);
        json(r#"{"on":true,"x":"é"}"#, |v| {
            let mut out = Vec::new();
            t.write_value(v, ValueStyle::Wire, &mut out);
            assert_eq!(t.wire_len(v), out.len());
        });
    }

    mod prop {
        use proptest::prelude::*;

        use super::super::super::test_support::{light, thermostat};
        use super::super::*;

        /// JSON texts biased towards values that fit the thermostat and light properties.
        fn value_text() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                (-3i64..12).prop_map(|n| n.to_string()),
                (-20i64..300).prop_map(|n| n.to_string()),
                (2600i64..6600).prop_map(|n| n.to_string()),
                prop_oneof![
                    Just(i64::from(i32::MIN)),
                    Just(i64::from(i32::MAX)),
                    Just(i64::MAX)
                ]
                .prop_map(|n| n.to_string()),
                (-60.0f64..140.0).prop_map(|x| format!("{x:?}")),
                any::<f64>()
                    .prop_filter("finite", |x| x.is_finite())
                    .prop_map(|x| format!("{x:e}")),
                prop_oneof![Just("true"), Just("false"), Just("null")].prop_map(String::from),
                any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
                "[0-9]{1,20}".prop_map(|s| format!("\"{s}\"")),
            ];
            let nested = leaf.clone().prop_recursive(2, 16, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..9)
                        .prop_map(|items| format!("[{}]", items.join(","))),
                    proptest::collection::vec(
                        (
                            prop_oneof![
                                Just("r"),
                                Just("g"),
                                Just("b"),
                                Just("lo"),
                                Just("hi"),
                                Just("zz")
                            ],
                            inner
                        ),
                        0..4
                    )
                    .prop_map(|members| {
                        let members: Vec<String> = members
                            .iter()
                            .map(|(k, v)| format!("\"{k}\":{v}"))
                            .collect();
                        format!("{{{}}}", members.join(","))
                    }),
                ]
            });
            prop_oneof![2 => leaf, 1 => nested]
        }

        fn written(t: &DataType, text: &[u8], style: ValueStyle) -> Option<(bool, Vec<u8>)> {
            let mut bytes = text.to_vec();
            let tape = simd_json::to_tape(&mut bytes).ok()?;
            let v = tape.as_value();
            let mut out = Vec::new();
            t.write_value(v, style, &mut out);
            Some((t.check(v).is_ok(), out))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn normalisation_is_idempotent_and_keeps_values_valid(text in value_text()) {
                let models = [thermostat(), light()];
                for property in models.iter().flat_map(|m| m.properties()) {
                    let t = &property.data_type;
                    for style in [ValueStyle::Wire, ValueStyle::Alink] {
                        let (ok, once) = written(t, text.as_bytes(), style).expect("generated JSON parses");
                        // Total: whatever the value, the output is JSON.
                        let reparsed = written(t, &once, style);
                        prop_assert!(reparsed.is_some(), "{} not JSON: {}", property.identifier, String::from_utf8_lossy(&once));
                        if ok {
                            let (still_ok, twice) = reparsed.unwrap();
                            prop_assert!(still_ok, "{}: {} -> {}", property.identifier, text, String::from_utf8_lossy(&once));
                            prop_assert_eq!(&once, &twice, "{}: {}", property.identifier, text);
                        }
                    }
                }
            }
        }
    }
}
