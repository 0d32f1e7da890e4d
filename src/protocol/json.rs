//! Small compact-JSON writers shared by every encoder: strings, integers, floats.
//!
//! Owns: byte-exact JSON output into a caller's `Vec<u8>`. Never allocates beyond growing `out`.

/// Appends `s` as a JSON string literal (RFC 8259 section 7), escaping `"`, `\` and controls.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    escape_str(s, |bytes| out.extend_from_slice(bytes));
}

/// Writes `s` as a JSON string literal through `put`: quotes, `"` and `\` escaped, control
/// characters as their short escapes or `\u00XX`, everything else (also non-ASCII) as is. The
/// one escaper of the crate; `put` lets callers write or merely count.
pub fn escape_str(s: &str, mut put: impl FnMut(&[u8])) {
    let bytes = s.as_bytes();
    // Almost every string (keys, identifiers, device names) needs no escape: one pass that
    // does not branch per byte (so it vectorises), then a single copy.
    let plain = !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        put(b"\"");
        put(bytes);
        put(b"\"");
        return;
    }
    put(b"\"");
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                put(&bytes[start..i]);
                put(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        put(&bytes[start..i]);
        put(short);
        start = i + 1;
    }
    put(&bytes[start..]);
    put(b"\"");
}

/// Appends an integer in decimal.
pub fn write_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a finite float in the shortest form that reads back the same. With `point`, an
/// integral value keeps a decimal point (`2.0`), as Alink wants for float and double; without it,
/// it is written like an integer (`2`) when it is one.
pub fn write_f64(out: &mut Vec<u8>, v: f64, point: bool) {
    if !v.is_finite() {
        // JSON has no NaN or infinity; nothing parsed from JSON can be one.
        out.extend_from_slice(b"null");
        return;
    }
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(v);
    let s = if point {
        s
    } else {
        s.strip_suffix(".0").unwrap_or(s)
    };
    out.extend_from_slice(s.as_bytes());
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).expect("writers produce UTF-8")
    }

    #[test]
    fn strings_are_escaped_and_parse_back() {
        for input in [
            "",
            "plain",
            "quo\"te",
            "back\\slash",
            "nl\nx",
            "\u{1}\u{1f}",
            "温度°C",
        ] {
            let text = s(|o| write_str(o, input));
            let back: String = serde_json::from_str(&text).expect("valid JSON string");
            assert_eq!(back, input, "{text}");
        }
        assert_eq!(s(|o| write_str(o, "a\u{1}")), r#""a\u0001""#);
    }

    #[test]
    fn floats_with_and_without_point() {
        assert_eq!(s(|o| write_f64(o, 2.0, true)), "2.0");
        assert_eq!(s(|o| write_f64(o, 2.0, false)), "2");
        assert_eq!(s(|o| write_f64(o, 21.5, false)), "21.5");
        assert_eq!(s(|o| write_f64(o, -0.25, true)), "-0.25");
        assert_eq!(s(|o| write_f64(o, 1e300, true)), "1e300");
        assert_eq!(s(|o| write_int(o, 4_294_967_295u32)), "4294967295");
    }
}
