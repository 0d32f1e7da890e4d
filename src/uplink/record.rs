//! One uplink as the edge core receives it: a compact JSON object on one line, ending in `\n`.
//!
//! ```text
//! {"t":1732570000000,"pk":"a1ThermoPK0","dn":"thermo-01","kind":"property","values":{"power":1}}
//! {"t":1732570000000,"pk":"a1ThermoPK0","dn":"thermo-01","kind":"event","event":"alarm","values":{"level":2}}
//! {"t":1732570000000,"pk":"a1ThermoPK0","dn":"thermo-01","kind":"online","peer":"10.0.0.7:40312"}
//! {"t":1732570000000,"pk":"a1ThermoPK0","dn":"thermo-01","kind":"offline"}
//! ```
//!
//! Owns: [`encode`] (borrowed [`Record`] -> bytes, no allocation beyond growing `out`) and its
//! strict inverse [`decode_line`] (bytes -> [`OwnedRecord`], for tests, replay and tools).
//! Never: IO, the clock. Always: the keys come in the order above, strings are escaped with
//! [`json::write_str`], `values` is inserted verbatim, and a line holds no raw `\n` but its last
//! byte.

use std::io::Write;
use std::net::SocketAddr;

use serde::Deserialize;

use super::UplinkError;
use crate::protocol::json;

/// One uplink, borrowed from the session event that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Wall-clock milliseconds since the Unix epoch when the gateway accepted it.
    pub at_ms: u64,
    pub product_key: &'a str,
    pub device_name: &'a str,
    pub body: RecordBody<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordBody<'a> {
    /// The device came online on a connection from `peer`.
    Online {
        peer: SocketAddr,
    },
    Offline,
    /// A JSON object text, already normalised by the session: inserted verbatim.
    Property {
        values: &'a str,
    },
    /// An event report: its identifier and its output values (a JSON object text, verbatim).
    Event {
        identifier: &'a str,
        values: &'a str,
    },
}

/// A decoded record line, owning its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedRecord {
    pub at_ms: u64,
    pub product_key: String,
    pub device_name: String,
    pub kind: RecordKind,
    /// `Some` exactly for [`RecordKind::Online`].
    pub peer: Option<SocketAddr>,
    /// The event identifier; `Some` exactly for [`RecordKind::Event`].
    pub event: Option<String>,
    /// A JSON object; `Some` exactly for [`RecordKind::Property`] and [`RecordKind::Event`].
    pub values: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Online,
    Offline,
    Property,
    Event,
}

impl RecordKind {
    /// The `"kind"` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Property => "property",
            Self::Event => "event",
        }
    }
}

impl RecordBody<'_> {
    pub fn kind(&self) -> RecordKind {
        match self {
            Self::Online { .. } => RecordKind::Online,
            Self::Offline => RecordKind::Offline,
            Self::Property { .. } => RecordKind::Property,
            Self::Event { .. } => RecordKind::Event,
        }
    }
}

/// Appends `rec` to `out` as one compact JSON line ending in `\n`.
///
/// `values` must be a compact JSON object (as the session produces it); it is not re-parsed
/// here. A malformed one still makes one line, which [`decode_line`] then rejects.
pub fn encode(rec: &Record<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"t\":");
    json::write_int(out, rec.at_ms);
    out.extend_from_slice(b",\"pk\":");
    json::write_str(out, rec.product_key);
    out.extend_from_slice(b",\"dn\":");
    json::write_str(out, rec.device_name);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(rec.body.kind().as_str().as_bytes());
    out.push(b'"');
    match rec.body {
        RecordBody::Online { peer } => {
            // A SocketAddr prints as `1.2.3.4:5` or `[::1]:5` (scope ids are numeric): nothing
            // in it needs escaping. Writing into a Vec cannot fail.
            out.extend_from_slice(b",\"peer\":\"");
            let _ = write!(out, "{peer}");
            out.push(b'"');
        }
        RecordBody::Offline => {}
        RecordBody::Property { values } => write_values(out, values),
        RecordBody::Event { identifier, values } => {
            out.extend_from_slice(b",\"event\":");
            json::write_str(out, identifier);
            write_values(out, values);
        }
    }
    out.extend_from_slice(b"}\n");
}

/// Decodes one line written by [`encode`], with or without its final `\n`.
///
/// Strict: every key of the record's kind must be there, no other key may be, `values` must be
/// an object and `peer` a socket address. Anything else is [`UplinkError::BadRecord`].
pub fn decode_line(line: &[u8]) -> Result<OwnedRecord, UplinkError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.contains(&b'\n') {
        return Err(bad("more than one line"));
    }
    let wire: Wire = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    let kind = match wire.kind.as_str() {
        "online" => RecordKind::Online,
        "offline" => RecordKind::Offline,
        "property" => RecordKind::Property,
        "event" => RecordKind::Event,
        _ => return Err(bad(format!("unknown kind {:?}", wire.kind))),
    };
    let want_peer = kind == RecordKind::Online;
    let want_event = kind == RecordKind::Event;
    let want_values = matches!(kind, RecordKind::Property | RecordKind::Event);
    if wire.peer.is_some() != want_peer {
        return Err(bad(format!("\"peer\" with kind {}", kind.as_str())));
    }
    if wire.event.is_some() != want_event {
        return Err(bad(format!("\"event\" with kind {}", kind.as_str())));
    }
    if wire.values.is_some() != want_values {
        return Err(bad(format!("\"values\" with kind {}", kind.as_str())));
    }
    if wire.values.as_ref().is_some_and(|v| !v.is_object()) {
        return Err(bad("\"values\" is not an object"));
    }
    let peer = match wire.peer {
        Some(p) => Some(
            p.parse::<SocketAddr>()
                .map_err(|_| bad(format!("bad peer {p:?}")))?,
        ),
        None => None,
    };
    Ok(OwnedRecord {
        at_ms: wire.t,
        product_key: wire.pk,
        device_name: wire.dn,
        kind,
        peer,
        event: wire.event,
        values: wire.values,
    })
}

/// The wire shape for [`decode_line`]: serde rejects unknown and duplicate keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    t: u64,
    pk: String,
    dn: String,
    kind: String,
    peer: Option<String>,
    event: Option<String>,
    values: Option<serde_json::Value>,
}

fn write_values(out: &mut Vec<u8>, values: &str) {
    debug_assert!(
        values.starts_with('{') && !values.contains('\n'),
        "values must be a compact JSON object: {values:?}"
    );
    out.extend_from_slice(b",\"values\":");
    out.extend_from_slice(values.as_bytes());
}

fn bad(msg: impl Into<String>) -> UplinkError {
    UplinkError::BadRecord(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(rec: &Record<'_>) -> String {
        let mut out = Vec::new();
        encode(rec, &mut out);
        String::from_utf8(out).expect("encode writes UTF-8")
    }

    fn rec(body: RecordBody<'_>) -> Record<'_> {
        Record {
            at_ms: 1_732_570_000_000,
            product_key: "a1ThermoPK0",
            device_name: "thermo-01",
            body,
        }
    }

    #[test]
    fn encodes_each_kind_exactly() {
        assert_eq!(
            line(&rec(RecordBody::Property {
                values: r#"{"power":1}"#
            })),
            "{\"t\":1732570000000,\"pk\":\"a1ThermoPK0\",\"dn\":\"thermo-01\",\"kind\":\"property\",\"values\":{\"power\":1}}\n"
        );
        assert_eq!(
            line(&rec(RecordBody::Event {
                identifier: "alarm",
                values: r#"{"level":2}"#
            })),
            "{\"t\":1732570000000,\"pk\":\"a1ThermoPK0\",\"dn\":\"thermo-01\",\"kind\":\"event\",\"event\":\"alarm\",\"values\":{\"level\":2}}\n"
        );
        assert_eq!(
            line(&rec(RecordBody::Online {
                peer: "10.0.0.7:40312".parse().expect("addr")
            })),
            "{\"t\":1732570000000,\"pk\":\"a1ThermoPK0\",\"dn\":\"thermo-01\",\"kind\":\"online\",\"peer\":\"10.0.0.7:40312\"}\n"
        );
        assert_eq!(
            line(&rec(RecordBody::Offline)),
            "{\"t\":1732570000000,\"pk\":\"a1ThermoPK0\",\"dn\":\"thermo-01\",\"kind\":\"offline\"}\n"
        );
    }

    #[test]
    fn round_trips_every_kind_with_escapes() {
        let pk = "pk\"quote\\back";
        let dn = "dev\nnew\tline\u{1}温度";
        let values = r#"{"s":"a\"b\\c\nd","f":21.5,"n":[1,2],"o":{"x":null}}"#;
        let bodies = [
            RecordBody::Online {
                peer: "[::1]:8080".parse().expect("addr"),
            },
            RecordBody::Online {
                peer: "192.168.1.2:1".parse().expect("addr"),
            },
            RecordBody::Online {
                peer: "[fe80::1%7]:443".parse().expect("addr with scope id"),
            },
            RecordBody::Offline,
            RecordBody::Property { values },
            RecordBody::Event {
                identifier: "ev\"il\\",
                values,
            },
        ];
        for body in bodies {
            let r = Record {
                at_ms: u64::MAX,
                product_key: pk,
                device_name: dn,
                body,
            };
            let text = line(&r);
            assert_eq!(text.matches('\n').count(), 1, "{text}");
            assert!(text.ends_with('\n'));
            let back = decode_line(text.as_bytes()).expect("decodes");
            assert_eq!(back.at_ms, u64::MAX);
            assert_eq!(back.product_key, pk);
            assert_eq!(back.device_name, dn);
            assert_eq!(back.kind, body.kind());
            match body {
                RecordBody::Online { peer } => {
                    assert_eq!(back.peer, Some(peer));
                    assert_eq!((back.event, back.values), (None, None));
                }
                RecordBody::Offline => {
                    assert_eq!((back.peer, back.event, back.values), (None, None, None));
                }
                RecordBody::Property { values } => {
                    let v: serde_json::Value = serde_json::from_str(values).expect("json");
                    assert_eq!(back.values, Some(v));
                    assert_eq!((back.peer, back.event), (None, None));
                }
                RecordBody::Event { identifier, values } => {
                    let v: serde_json::Value = serde_json::from_str(values).expect("json");
                    assert_eq!(back.values, Some(v));
                    assert_eq!(back.event.as_deref(), Some(identifier));
                    assert_eq!(back.peer, None);
                }
            }
            // Without the final newline too.
            let trimmed = &text.as_bytes()[..text.len() - 1];
            assert!(decode_line(trimmed).is_ok());
        }
    }

    #[test]
    fn decode_is_strict() {
        let bad_lines = [
            "",
            "{}",
            "not json",
            r#"{"t":1,"pk":"p","dn":"d","kind":"property"}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"property","values":[1]}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"offline","values":{}}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"online"}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"online","peer":"nope"}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"event","values":{}}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"property","event":"e","values":{}}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"reboot"}"#,
            r#"{"t":-1,"pk":"p","dn":"d","kind":"offline"}"#,
            r#"{"t":1,"pk":"p","dn":"d","kind":"offline","extra":1}"#,
            r#"{"t":1,"pk":"p","pk":"q","dn":"d","kind":"offline"}"#,
            "{\"t\":1,\"pk\":\"p\",\"dn\":\"d\",\"kind\":\"offline\"}\n{}",
        ];
        for l in bad_lines {
            let e = decode_line(l.as_bytes()).expect_err(l);
            assert_eq!(e.as_str(), "bad_record", "{l}");
        }
        let ok = decode_line(
            br#"{"t":1,"pk":"p","dn":"d","kind":"event","event":"e","values":{"a":1}}"#,
        )
        .expect("valid");
        assert_eq!(ok.values, Some(json!({"a": 1})));
    }
}
