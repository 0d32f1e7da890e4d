//! Device shadows: the last reported value and time of each property, the last events, and
//! where each device is online. Read by the API; written by shards as uplinks are batched.
//!
//! Owns: one small record per registered device behind its own mutex (writers are the shard
//! that owns the device, readers the API, so contention is nil). The records live in a
//! [`Segmented`] table: a registry reload that appends device ids grows it
//! ([`Shadows::grow`]) without moving a record; a removed device's record stays, unread.
//!
//! A property report's values arrive as one compact JSON object written by ringlink itself
//! (`{"a":1,"b":{"x":2}}`). The shadow finds its members with a scan, no JSON parse, and keeps
//! each property as its key and value text in one buffer of its own. A device reports the same
//! properties again and again, so an update overwrites buffers it already has: once a device's
//! properties were seen, recording a report allocates nothing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use crate::registry::segmented::Segmented;
use crate::registry::DeviceId;

/// How many events each shadow remembers.
const EVENTS_KEPT: usize = 8;

/// Every device's shadow, indexed by [`DeviceId`].
#[derive(Debug)]
pub struct Shadows {
    devices: Segmented<Mutex<Shadow>>,
}

/// One device's shadow.
#[derive(Debug, Default, Clone)]
pub struct Shadow {
    /// Peer address and epoch ms of the last online; kept after offline for "last seen".
    pub peer: Option<SocketAddr>,
    pub since_ms: u64,
    pub online: bool,
    properties: Vec<PropertyValue>,
    events: VecDeque<EventRecord>,
}

#[derive(Debug, Clone)]
struct PropertyValue {
    /// The key as a JSON string literal, then the value's JSON text.
    text: String,
    key_len: usize,
    at_ms: u64,
}

impl PropertyValue {
    fn key(&self) -> &str {
        &self.text[..self.key_len]
    }

    fn value(&self) -> &str {
        &self.text[self.key_len..]
    }
}

/// One remembered event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub identifier: Box<str>,
    /// `{param: value}` JSON text.
    pub values: Box<str>,
    pub at_ms: u64,
}

impl Shadows {
    pub fn new(devices: usize) -> Self {
        Self {
            devices: Segmented::new(devices, Mutex::default),
        }
    }

    /// Makes room for device ids `0..devices` (a reload added some); nothing moves.
    pub fn grow(&self, devices: usize) {
        self.devices.grow(devices);
    }

    pub fn online(&self, device: DeviceId, peer: SocketAddr, at_ms: u64) {
        let mut s = self.lock(device);
        s.online = true;
        s.peer = Some(peer);
        s.since_ms = at_ms;
    }

    pub fn offline(&self, device: DeviceId, at_ms: u64) {
        let mut s = self.lock(device);
        s.online = false;
        s.since_ms = at_ms;
    }

    /// Records a property report; `values` is ringlink's own compact JSON object.
    pub fn properties(&self, device: DeviceId, values: &str, at_ms: u64) {
        let mut s = self.lock(device);
        for (key, value) in top_level_fields(values) {
            let (key, value) = (&values[key], &values[value]);
            match s.properties.iter_mut().find(|p| p.key() == key) {
                Some(p) => {
                    p.text.truncate(p.key_len);
                    p.text.push_str(value);
                    p.at_ms = at_ms;
                }
                None => s.properties.push(PropertyValue {
                    text: [key, value].concat(),
                    key_len: key.len(),
                    at_ms,
                }),
            }
        }
    }

    pub fn event(&self, device: DeviceId, identifier: &str, values: &str, at_ms: u64) {
        let mut s = self.lock(device);
        if s.events.len() == EVENTS_KEPT {
            s.events.pop_front();
        }
        s.events.push_back(EventRecord {
            identifier: identifier.into(),
            values: values.into(),
            at_ms,
        });
    }

    /// A copy of one device's shadow.
    pub fn snapshot(&self, device: DeviceId) -> Shadow {
        if self.devices.get(device).is_none() {
            return Shadow::default();
        }
        self.lock(device).clone()
    }

    /// The record of `device`; a placeholder (written to, never read) for an id beyond the
    /// table, which a registry never hands out: the table grows before a registry is published.
    fn lock(&self, device: DeviceId) -> MutexGuard<'_, Shadow> {
        static NOWHERE: Mutex<Shadow> = Mutex::new(Shadow::EMPTY);
        // A panic while holding a shadow lock leaves a consistent value (every update is a
        // plain assignment), so a poisoned lock is still usable.
        self.devices
            .get(device)
            .unwrap_or(&NOWHERE)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Shadow {
    const EMPTY: Self = Self {
        peer: None,
        since_ms: 0,
        online: false,
        properties: Vec::new(),
        events: VecDeque::new(),
    };

    /// `(key as JSON string literal, value as JSON text, epoch ms)` of every property reported.
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.properties
            .iter()
            .map(|p| (p.key(), p.value(), p.at_ms))
    }

    pub fn events(&self) -> impl Iterator<Item = &EventRecord> {
        self.events.iter()
    }
}

/// The `(key, value)` ranges of a compact JSON object's top-level members. The key range
/// includes its quotes. Input that is not a compact object yields what could be read.
/// An iterator, not a list: this runs for every report and allocates nothing.
fn top_level_fields(text: &str) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
    let b = text.as_bytes();
    // Where the next member starts; `None` once the object, or what could be read of it, ended.
    let mut next = (b.first() == Some(&b'{')).then_some(1);
    std::iter::from_fn(move || {
        let key_start = next.take()?;
        if b.get(key_start) != Some(&b'"') {
            return None;
        }
        let mut i = skip_string(b, key_start);
        let key = key_start..i;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        let value_start = i;
        let mut depth = 0usize;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    i = skip_string(b, i);
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b'}' if depth == 0 => break,
                _ => {}
            }
            i += 1;
        }
        if b.get(i) == Some(&b',') {
            next = Some(i + 1);
        }
        Some((key, value_start..i))
    })
}

/// The index just past the string literal starting at `b[start] == b'"'`.
fn skip_string(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_device() -> DeviceId {
        crate::registry::tests::registry()
            .ids()
            .next()
            .expect("a device")
    }

    fn props(s: &Shadow) -> Vec<(String, String, u64)> {
        s.properties()
            .map(|(k, v, t)| (k.to_owned(), v.to_owned(), t))
            .collect()
    }

    #[test]
    fn later_reports_overwrite_only_their_own_properties() {
        let shadows = Shadows::new(2);
        let d = first_device();
        shadows.properties(d, r#"{"power":1,"setpoint":21.0}"#, 10);
        shadows.properties(
            d,
            r#"{"setpoint":19.5,"limits":{"lo":1,"hi":"a,}\"b"}}"#,
            20,
        );
        assert_eq!(
            props(&shadows.snapshot(d)),
            vec![
                ("\"power\"".into(), "1".into(), 10),
                ("\"setpoint\"".into(), "19.5".into(), 20),
                ("\"limits\"".into(), r#"{"lo":1,"hi":"a,}\"b"}"#.into(), 20),
            ]
        );
    }

    #[test]
    fn a_repeated_report_reuses_the_buffers_it_has() {
        let shadows = Shadows::new(1);
        let d = first_device();
        shadows.properties(d, r#"{"label":"a long first label","power":1}"#, 1);
        let buffers = |s: &Shadows| -> Vec<*const u8> {
            s.lock(d)
                .properties
                .iter()
                .map(|p| p.text.as_ptr())
                .collect()
        };
        let before = buffers(&shadows);
        // Shorter, then as long again: written over in place.
        shadows.properties(d, r#"{"label":"short","power":0}"#, 2);
        assert_eq!(
            props(&shadows.snapshot(d)),
            vec![
                ("\"label\"".into(), "\"short\"".into(), 2),
                ("\"power\"".into(), "0".into(), 2),
            ]
        );
        shadows.properties(d, r#"{"label":"a long later label","power":1}"#, 3);
        assert_eq!(buffers(&shadows), before);
        assert_eq!(
            props(&shadows.snapshot(d))[0],
            ("\"label\"".into(), "\"a long later label\"".into(), 3)
        );
    }

    #[test]
    fn fields_of_nested_and_escaped_values() {
        let t = r#"{"a":[1,{"x":"]"}],"b\"q":"s,","c":2.5}"#;
        let f: Vec<(&str, &str)> = top_level_fields(t).map(|(k, v)| (&t[k], &t[v])).collect();
        assert_eq!(
            f,
            vec![
                ("\"a\"", r#"[1,{"x":"]"}]"#),
                ("\"b\\\"q\"", "\"s,\""),
                ("\"c\"", "2.5")
            ]
        );
        assert_eq!(top_level_fields("{}").next(), None);
        assert_eq!(top_level_fields("[1]").next(), None);
    }

    #[test]
    fn events_keep_the_last_eight() {
        let shadows = Shadows::new(1);
        let d = first_device();
        for i in 0..10 {
            shadows.event(d, "overheat", "{}", i);
        }
        let times: Vec<u64> = shadows.snapshot(d).events().map(|e| e.at_ms).collect();
        assert_eq!(times, (2..10).collect::<Vec<_>>());
    }
}
