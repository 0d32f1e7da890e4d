//! MQTT 3.1.1 packets: the subset the gateway speaks, encoded and decoded byte-exact.
//!
//! Owns: the fixed header (packet type, flags, remaining length), the variable headers and
//! payloads of CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP and
//! DISCONNECT, and the validity rules of the specification for them (reserved flags, UTF-8
//! strings, topic names, packet identifiers). Never: sessions, packet id allocation, time, IO.
//!
//! Decoding is incremental and strict: [`decode`] returns `Ok(None)` until a whole packet is in
//! the buffer, and an error for anything the specification calls malformed. A declared size
//! above the caller's limit is refused as soon as the fixed header is complete, so a peer can
//! never make the caller buffer toward a large declared size. QoS 2 is outside this subset: a
//! QoS 2 PUBLISH or a QoS 2 grant is an error (the gateway subscribes with QoS 1 at most).

use std::fmt;

/// Largest remaining length a 4-byte variable length integer can carry (spec 2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Quality of service levels of this subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0: fire and forget.
    AtMostOnce = 0,
    /// QoS 1: acknowledged with PUBACK, may be delivered more than once.
    AtLeastOnce = 1,
}

impl QoS {
    /// The QoS of a 2-bit field value; QoS 2 is not supported and 3 is malformed.
    pub fn from_bits(bits: u8) -> Result<Self, CodecError> {
        match bits {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Err(CodecError::Qos2Unsupported),
            q => Err(CodecError::InvalidQos(q)),
        }
    }
}

/// A CONNECT packet (no will message: the gateway does not use one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Client identifier (may be empty only with `clean_session`; the broker decides).
    pub client_id: String,
    /// Start a fresh session and discard it on disconnect.
    pub clean_session: bool,
    /// Keep-alive interval in seconds, 0 = off.
    pub keep_alive: u16,
    /// User name. Encoded as an empty user name when only a password is given, since MQTT
    /// 3.1.1 forbids a password without a user name (spec 3.1.2.9).
    pub username: Option<String>,
    /// Password (binary data).
    pub password: Option<Vec<u8>>,
}

/// A PUBLISH packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic name: UTF-8, not empty, no wildcards.
    pub topic: String,
    /// Application payload.
    pub payload: Vec<u8>,
    /// Delivery guarantee.
    pub qos: QoS,
    /// Packet identifier: nonzero for QoS 1, ignored (not encoded) for QoS 0.
    pub pkid: u16,
    /// Possibly a re-delivery (QoS 1 only).
    pub dup: bool,
    /// Retained message.
    pub retain: bool,
}

/// One MQTT control packet of the supported subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client to broker: open a session.
    Connect(Connect),
    /// Broker to client: the answer to CONNECT.
    ConnAck {
        /// The broker kept a session for this client id.
        session_present: bool,
        /// Return code: 0 accepted, 1..=5 refused (see [`ReturnCode`]).
        code: u8,
    },
    /// Either direction: an application message.
    Publish(Publish),
    /// Either direction: QoS 1 acknowledgement.
    PubAck {
        /// The acknowledged packet identifier (nonzero).
        pkid: u16,
    },
    /// Client to broker: subscribe to topic filters.
    Subscribe {
        /// Packet identifier (nonzero).
        pkid: u16,
        /// Topic filters with their requested maximum QoS; at least one.
        filters: Vec<(String, QoS)>,
    },
    /// Broker to client: the answer to SUBSCRIBE, one entry per filter, `None` = failure (0x80).
    SubAck {
        /// Packet identifier of the SUBSCRIBE (nonzero).
        pkid: u16,
        /// Granted QoS per filter, in order.
        granted: Vec<Option<QoS>>,
    },
    /// Client to broker: keep-alive probe.
    PingReq,
    /// Broker to client: keep-alive answer.
    PingResp,
    /// Client to broker: clean shutdown.
    Disconnect,
}

/// A CONNACK return code, with the specification's meaning as its `Display`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnCode(pub u8);

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.0 {
            0 => "connection accepted",
            1 => "unacceptable protocol version",
            2 => "identifier rejected",
            3 => "server unavailable",
            4 => "bad user name or password",
            5 => "not authorized",
            _ => "unknown return code",
        };
        write!(f, "{} ({text})", self.0)
    }
}

/// Why bytes are not a valid packet of the subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The remaining length field has a fifth byte (spec 2.2.3).
    #[error("malformed remaining length: more than 4 bytes")]
    RemainingLength,
    /// The packet is larger than the receiver's limit (`size` includes the fixed header).
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared size of the whole packet.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A packet type outside the subset (QoS 2 flow, UNSUBSCRIBE, reserved types).
    #[error("unsupported packet type {0}")]
    UnsupportedType(u8),
    /// Fixed header flags that the specification reserves (spec 2.2.2).
    #[error("reserved flags {flags:#06b} set on packet type {packet_type}")]
    ReservedFlags {
        /// The packet type (high nibble of the first byte).
        packet_type: u8,
        /// The low nibble.
        flags: u8,
    },
    /// The packet ends before its fields do.
    #[error("{0} packet is truncated")]
    Truncated(&'static str),
    /// The packet has bytes after its last field.
    #[error("{0} packet has trailing bytes")]
    TrailingBytes(&'static str),
    /// A string is not valid UTF-8 or contains U+0000 (spec 1.5.3).
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// A topic name or filter is empty (spec 4.7.3).
    #[error("empty topic")]
    EmptyTopic,
    /// A PUBLISH topic name contains `+` or `#` (spec 3.3.2.1).
    #[error("wildcard in a PUBLISH topic name")]
    WildcardInTopic,
    /// QoS 3 (spec 3.3.1.2) or a requested QoS byte with reserved bits.
    #[error("invalid QoS {0}")]
    InvalidQos(u8),
    /// QoS 2, outside the subset.
    #[error("QoS 2 is not supported")]
    Qos2Unsupported,
    /// DUP set on a QoS 0 PUBLISH (spec 3.3.1.1).
    #[error("DUP flag on a QoS 0 PUBLISH")]
    DupOnQos0,
    /// Packet identifier 0 (spec 2.3.1).
    #[error("packet identifier 0")]
    PacketIdZero,
    /// CONNECT with another protocol name or level than "MQTT" 4.
    #[error("not MQTT 3.1.1 (protocol name or level)")]
    Protocol,
    /// CONNECT flags outside the subset (reserved bit, will, password without user name).
    #[error("invalid or unsupported CONNECT flags {0:#010b}")]
    ConnectFlags(u8),
    /// CONNACK with reserved bits, a reserved return code, or session present on a refusal.
    #[error("invalid CONNACK")]
    InvalidConnAck,
    /// SUBACK return code other than 0, 1, (2) or 0x80.
    #[error("invalid SUBACK return code {0:#04x}")]
    InvalidSubAck(u8),
    /// SUBSCRIBE or SUBACK without any entry.
    #[error("{0} packet without any topic filter")]
    NoFilters(&'static str),
    /// A string longer than 65535 bytes (encoding only).
    #[error("string longer than 65535 bytes")]
    StringTooLong,
}

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Checks a topic name for PUBLISH: not empty, at most 65535 bytes, no wildcard, no U+0000.
pub fn check_topic_name(topic: &str) -> Result<(), CodecError> {
    check_filter(topic)?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(CodecError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a topic filter for SUBSCRIBE: not empty, at most 65535 bytes, no U+0000. (Wildcard
/// placement is the broker's to judge.)
pub fn check_filter(filter: &str) -> Result<(), CodecError> {
    if filter.is_empty() {
        return Err(CodecError::EmptyTopic);
    }
    if filter.len() > usize::from(u16::MAX) {
        return Err(CodecError::StringTooLong);
    }
    if filter.contains('\0') {
        return Err(CodecError::InvalidUtf8);
    }
    Ok(())
}

/// Appends the variable length integer `len` (at most [`MAX_REMAINING_LENGTH`]).
fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    debug_assert!(len <= MAX_REMAINING_LENGTH);
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() <= usize::from(u16::MAX));
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// The size of the PUBLISH packet for these fields, fixed header included, or `None` above
/// [`MAX_REMAINING_LENGTH`].
pub fn publish_size(topic: &str, payload_len: usize, qos: QoS) -> Option<usize> {
    let id = if qos == QoS::AtLeastOnce { 2 } else { 0 };
    let remaining = (2 + topic.len() + id).checked_add(payload_len)?;
    if remaining > MAX_REMAINING_LENGTH {
        return None;
    }
    Some(1 + varint_len(remaining) + remaining)
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends one PUBLISH without building a [`Publish`] (the client's hot path). The caller has
/// checked the topic ([`check_topic_name`]) and the size ([`publish_size`]); `pkid` is
/// nonzero for QoS 1 and not written for QoS 0, where `dup` must be false.
pub fn encode_publish(
    out: &mut Vec<u8>,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
) {
    debug_assert!(qos == QoS::AtMostOnce || pkid != 0);
    debug_assert!(qos == QoS::AtLeastOnce || !dup);
    let flags = (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain);
    out.push(PUBLISH << 4 | flags);
    let id = if qos == QoS::AtLeastOnce { 2 } else { 0 };
    put_remaining_length(out, 2 + topic.len() + id + payload.len());
    put_str(out, topic.as_bytes());
    if qos == QoS::AtLeastOnce {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends the encoding of `packet`. Field contents are the caller's to keep valid (string
/// lengths, nonzero packet ids for QoS 1, at least one filter); the client checks them.
pub fn encode(packet: &Packet, out: &mut Vec<u8>) {
    match packet {
        Packet::Connect(c) => {
            let user = c
                .username
                .as_deref()
                .or(c.password.as_ref().map(|_| ""))
                .map(str::as_bytes);
            let mut len = 10 + 2 + c.client_id.len();
            if let Some(u) = user {
                len += 2 + u.len();
            }
            if let Some(p) = &c.password {
                len += 2 + p.len();
            }
            out.push(CONNECT << 4);
            put_remaining_length(out, len);
            put_str(out, b"MQTT");
            out.push(4);
            let flags = (u8::from(user.is_some()) << 7)
                | (u8::from(c.password.is_some()) << 6)
                | (u8::from(c.clean_session) << 1);
            out.push(flags);
            out.extend_from_slice(&c.keep_alive.to_be_bytes());
            put_str(out, c.client_id.as_bytes());
            if let Some(u) = user {
                put_str(out, u);
            }
            if let Some(p) = &c.password {
                put_str(out, p);
            }
        }
        Packet::ConnAck {
            session_present,
            code,
        } => out.extend_from_slice(&[CONNACK << 4, 2, u8::from(*session_present), *code]),
        Packet::Publish(p) => {
            encode_publish(out, &p.topic, &p.payload, p.qos, p.pkid, p.dup, p.retain)
        }
        Packet::PubAck { pkid } => {
            out.extend_from_slice(&[PUBACK << 4, 2]);
            out.extend_from_slice(&pkid.to_be_bytes());
        }
        Packet::Subscribe { pkid, filters } => {
            let len = 2 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
            out.push(SUBSCRIBE << 4 | 0b0010);
            put_remaining_length(out, len);
            out.extend_from_slice(&pkid.to_be_bytes());
            for (f, q) in filters {
                put_str(out, f.as_bytes());
                out.push(*q as u8);
            }
        }
        Packet::SubAck { pkid, granted } => {
            out.push(SUBACK << 4);
            put_remaining_length(out, 2 + granted.len());
            out.extend_from_slice(&pkid.to_be_bytes());
            out.extend(granted.iter().map(|g| g.map_or(0x80, |q| q as u8)));
        }
        Packet::PingReq => out.extend_from_slice(&[PINGREQ << 4, 0]),
        Packet::PingResp => out.extend_from_slice(&[PINGRESP << 4, 0]),
        Packet::Disconnect => out.extend_from_slice(&[DISCONNECT << 4, 0]),
    }
}

/// The total size (fixed header included) of the packet starting at `buf[0]`, as soon as its
/// fixed header is complete; `Ok(None)` before. Checks the remaining length encoding and
/// `max_packet`, not the flags.
pub fn packet_len(buf: &[u8], max_packet: usize) -> Result<Option<usize>, CodecError> {
    Ok(fixed_header(buf, max_packet)?.map(|(_, size)| size))
}

/// `(fixed header length, whole packet length)` once the fixed header is complete.
fn fixed_header(buf: &[u8], max_packet: usize) -> Result<Option<(usize, usize)>, CodecError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 2 + i;
            let size = header + len;
            if size > max_packet {
                return Err(CodecError::TooLarge {
                    size,
                    max: max_packet,
                });
            }
            return Ok(Some((header, size)));
        }
    }
    Err(CodecError::RemainingLength)
}

/// Decodes the packet at the start of `buf`: `Ok(Some((packet, consumed)))`, or `Ok(None)` when
/// more bytes are needed. `max_packet` caps the whole packet's size, fixed header included.
pub fn decode(buf: &[u8], max_packet: usize) -> Result<Option<(Packet, usize)>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // Refuse an unknown type before waiting for its body.
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    let expected_flags = match packet_type {
        PUBLISH => flags,
        SUBSCRIBE => 0b0010,
        CONNECT | CONNACK | PUBACK | SUBACK | PINGREQ | PINGRESP | DISCONNECT => 0,
        t => return Err(CodecError::UnsupportedType(t)),
    };
    if flags != expected_flags {
        return Err(CodecError::ReservedFlags { packet_type, flags });
    }
    let Some((header, size)) = fixed_header(buf, max_packet)? else {
        return Ok(None);
    };
    if buf.len() < size {
        return Ok(None);
    }
    let body = &buf[header..size];
    let packet = match packet_type {
        CONNECT => decode_connect(body)?,
        CONNACK => {
            let [ack_flags, code] = fixed::<2>(body, "CONNACK")?;
            if ack_flags & 0xfe != 0 || code > 5 || (code != 0 && ack_flags != 0) {
                return Err(CodecError::InvalidConnAck);
            }
            Packet::ConnAck {
                session_present: ack_flags == 1,
                code,
            }
        }
        PUBLISH => decode_publish(flags, body)?,
        PUBACK => Packet::PubAck {
            pkid: pkid(fixed::<2>(body, "PUBACK")?)?,
        },
        SUBSCRIBE => {
            let mut r = Reader::new(body, "SUBSCRIBE");
            let id = pkid(r.array()?)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                check_filter(&filter)?;
                let [q] = r.array()?;
                if q & 0xfc != 0 {
                    return Err(CodecError::InvalidQos(q));
                }
                filters.push((filter, QoS::from_bits(q)?));
            }
            if filters.is_empty() {
                return Err(CodecError::NoFilters("SUBSCRIBE"));
            }
            Packet::Subscribe { pkid: id, filters }
        }
        SUBACK => {
            let mut r = Reader::new(body, "SUBACK");
            let id = pkid(r.array()?)?;
            let granted = r
                .rest()
                .iter()
                .map(|&c| match c {
                    0x80 => Ok(None),
                    0 | 1 => QoS::from_bits(c).map(Some),
                    2 => Err(CodecError::Qos2Unsupported),
                    c => Err(CodecError::InvalidSubAck(c)),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if granted.is_empty() {
                return Err(CodecError::NoFilters("SUBACK"));
            }
            Packet::SubAck { pkid: id, granted }
        }
        PINGREQ => empty(body, "PINGREQ", Packet::PingReq)?,
        PINGRESP => empty(body, "PINGRESP", Packet::PingResp)?,
        _ => empty(body, "DISCONNECT", Packet::Disconnect)?,
    };
    Ok(Some((packet, size)))
}

fn empty(body: &[u8], name: &'static str, p: Packet) -> Result<Packet, CodecError> {
    if body.is_empty() {
        Ok(p)
    } else {
        Err(CodecError::TrailingBytes(name))
    }
}

fn fixed<const N: usize>(body: &[u8], name: &'static str) -> Result<[u8; N], CodecError> {
    match body.len().cmp(&N) {
        std::cmp::Ordering::Less => Err(CodecError::Truncated(name)),
        std::cmp::Ordering::Greater => Err(CodecError::TrailingBytes(name)),
        std::cmp::Ordering::Equal => Ok(body.try_into().expect("length checked")),
    }
}

fn pkid(bytes: [u8; 2]) -> Result<u16, CodecError> {
    match u16::from_be_bytes(bytes) {
        0 => Err(CodecError::PacketIdZero),
        id => Ok(id),
    }
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<Packet, CodecError> {
    let dup = flags & 0b1000 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0b11)?;
    let retain = flags & 1 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(CodecError::DupOnQos0);
    }
    let mut r = Reader::new(body, "PUBLISH");
    let topic = r.string()?;
    check_topic_name(&topic)?;
    let id = match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => pkid(r.array()?)?,
    };
    Ok(Packet::Publish(Publish {
        topic,
        payload: r.rest().to_vec(),
        qos,
        pkid: id,
        dup,
        retain,
    }))
}

fn decode_connect(body: &[u8]) -> Result<Packet, CodecError> {
    let mut r = Reader::new(body, "CONNECT");
    if r.bytes()? != b"MQTT" || r.array::<1>()? != [4] {
        return Err(CodecError::Protocol);
    }
    let [flags] = r.array()?;
    // Reserved bit, will flag (and will QoS / retain, which need it), password without user.
    if flags & 0b0011_1101 != 0 || (flags & 0x40 != 0 && flags & 0x80 == 0) {
        return Err(CodecError::ConnectFlags(flags));
    }
    let keep_alive = u16::from_be_bytes(r.array()?);
    let client_id = r.string()?;
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.bytes()?.to_vec())
    } else {
        None
    };
    if !r.is_empty() {
        return Err(CodecError::TrailingBytes("CONNECT"));
    }
    Ok(Packet::Connect(Connect {
        client_id,
        clean_session: flags & 0b10 != 0,
        keep_alive,
        username,
        password,
    }))
}

/// A cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
    name: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], name: &'static str) -> Self {
        Self { buf, name }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let Some((head, tail)) = self.buf.split_first_chunk::<N>() else {
            return Err(CodecError::Truncated(self.name));
        };
        self.buf = tail;
        Ok(*head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let len = usize::from(u16::from_be_bytes(self.array()?));
        if self.buf.len() < len {
            return Err(CodecError::Truncated(self.name));
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, CodecError> {
        let s = std::str::from_utf8(self.bytes()?).map_err(|_| CodecError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(CodecError::InvalidUtf8);
        }
        Ok(s.to_owned())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn enc(p: &Packet) -> Vec<u8> {
        let mut out = Vec::new();
        encode(p, &mut out);
        out
    }

    fn dec(bytes: &[u8]) -> Result<Option<(Packet, usize)>, CodecError> {
        decode(bytes, MAX)
    }

    fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
        Packet::Publish(Publish {
            topic: topic.into(),
            payload: b"hi".to_vec(),
            qos,
            pkid,
            dup: false,
            retain: false,
        })
    }

    #[test]
    fn remaining_length_vectors_of_the_spec() {
        // Spec table 2.4.
        for (n, bytes) in [
            (0usize, &[0x00u8][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, n);
            assert_eq!(out, bytes, "{n}");
            let mut head = vec![0x30];
            head.extend_from_slice(bytes);
            assert_eq!(packet_len(&head, usize::MAX), Ok(Some(head.len() + n)));
        }
        assert_eq!(
            packet_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(CodecError::RemainingLength)
        );
    }

    #[test]
    fn byte_exact_packets() {
        let connect = Packet::Connect(Connect {
            client_id: "test".into(),
            clean_session: true,
            keep_alive: 60,
            username: None,
            password: None,
        });
        let bytes = [
            0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 4, b't', b'e', b's', b't',
        ];
        assert_eq!(enc(&connect), bytes);
        assert_eq!(dec(&bytes), Ok(Some((connect, bytes.len()))));

        let with_auth = Packet::Connect(Connect {
            client_id: "c".into(),
            clean_session: false,
            keep_alive: 0,
            username: Some("u".into()),
            password: Some(vec![0xff]),
        });
        let bytes = [
            0x10, 19, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xc0, 0, 0, 0, 1, b'c', 0, 1, b'u', 0, 1,
            0xff,
        ];
        assert_eq!(enc(&with_auth), bytes);
        assert_eq!(dec(&bytes), Ok(Some((with_auth, bytes.len()))));

        // Spec 3.3.2.3: topic "a/b", packet identifier 10.
        let p = Packet::Publish(Publish {
            topic: "a/b".into(),
            payload: vec![],
            qos: QoS::AtLeastOnce,
            pkid: 10,
            dup: true,
            retain: true,
        });
        let bytes = [0x3b, 7, 0, 3, b'a', b'/', b'b', 0, 10];
        assert_eq!(enc(&p), bytes);
        assert_eq!(dec(&bytes), Ok(Some((p, bytes.len()))));

        let p = Packet::Subscribe {
            pkid: 10,
            filters: vec![("a/b".into(), QoS::AtLeastOnce)],
        };
        let bytes = [0x82, 8, 0, 10, 0, 3, b'a', b'/', b'b', 1];
        assert_eq!(enc(&p), bytes);
        assert_eq!(dec(&bytes), Ok(Some((p, bytes.len()))));

        let p = Packet::SubAck {
            pkid: 10,
            granted: vec![Some(QoS::AtMostOnce), Some(QoS::AtLeastOnce), None],
        };
        let bytes = [0x90, 5, 0, 10, 0, 1, 0x80];
        assert_eq!(enc(&p), bytes);
        assert_eq!(dec(&bytes), Ok(Some((p, bytes.len()))));

        for (p, bytes) in [
            (
                Packet::ConnAck {
                    session_present: true,
                    code: 0,
                },
                &[0x20, 2, 1, 0][..],
            ),
            (Packet::PubAck { pkid: 0x1234 }, &[0x40, 2, 0x12, 0x34]),
            (Packet::PingReq, &[0xc0, 0]),
            (Packet::PingResp, &[0xd0, 0]),
            (Packet::Disconnect, &[0xe0, 0]),
        ] {
            assert_eq!(enc(&p), bytes);
            assert_eq!(dec(bytes), Ok(Some((p, bytes.len()))));
        }
    }

    #[test]
    fn password_without_user_name_sends_an_empty_user_name() {
        let p = Packet::Connect(Connect {
            client_id: "c".into(),
            clean_session: true,
            keep_alive: 0,
            username: None,
            password: Some(b"pw".to_vec()),
        });
        let bytes = enc(&p);
        let Some((Packet::Connect(c), _)) = dec(&bytes).unwrap() else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.username.as_deref(), Some(""));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    }

    #[test]
    fn malformed_input_is_refused_with_a_reason() {
        use CodecError as E;
        let cases: &[(&[u8], CodecError)] = &[
            (&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], E::RemainingLength),
            (
                &[0x21, 2, 0, 0],
                E::ReservedFlags {
                    packet_type: 2,
                    flags: 1,
                },
            ),
            (
                &[0x80, 2, 0, 1, 0, 1, b'a', 0],
                E::ReservedFlags {
                    packet_type: 8,
                    flags: 0,
                },
            ),
            (
                &[0xc1, 0],
                E::ReservedFlags {
                    packet_type: 12,
                    flags: 1,
                },
            ),
            (&[0x50, 2, 0, 1], E::UnsupportedType(5)),
            (&[0x00, 0], E::UnsupportedType(0)),
            (&[0xf0, 0], E::UnsupportedType(15)),
            (&[0x36, 5, 0, 1, b'a', 0, 1], E::InvalidQos(3)),
            (&[0x34, 5, 0, 1, b'a', 0, 1], E::Qos2Unsupported),
            (&[0x38, 3, 0, 1, b'a'], E::DupOnQos0),
            (&[0x32, 5, 0, 1, b'a', 0, 0], E::PacketIdZero),
            (&[0x30, 3, 0, 1, 0xff], E::InvalidUtf8),
            (&[0x30, 3, 0, 1, 0x00], E::InvalidUtf8),
            (&[0x30, 5, 0, 3, b'a', b'/', b'+'], E::WildcardInTopic),
            (&[0x30, 3, 0, 1, b'#'], E::WildcardInTopic),
            (&[0x30, 2, 0, 0], E::EmptyTopic),
            (&[0x30, 2, 0, 5], E::Truncated("PUBLISH")),
            (&[0x40, 2, 0, 0], E::PacketIdZero),
            (&[0x40, 3, 0, 1, 0], E::TrailingBytes("PUBACK")),
            (&[0x40, 1, 0], E::Truncated("PUBACK")),
            (&[0x20, 2, 0, 6], E::InvalidConnAck),
            (&[0x20, 2, 1, 5], E::InvalidConnAck),
            (&[0x20, 2, 2, 0], E::InvalidConnAck),
            (&[0x90, 3, 0, 1, 2], E::Qos2Unsupported),
            (&[0x90, 3, 0, 1, 0x81], E::InvalidSubAck(0x81)),
            (&[0x90, 2, 0, 1], E::NoFilters("SUBACK")),
            (&[0x82, 2, 0, 1], E::NoFilters("SUBSCRIBE")),
            (&[0x82, 6, 0, 1, 0, 1, b'a', 4], E::InvalidQos(4)),
            (&[0xd0, 1, 0], E::TrailingBytes("PINGRESP")),
            (
                &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 0, 0, 0],
                E::Protocol,
            ),
            (
                &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x04, 0, 0, 0, 0],
                E::ConnectFlags(0x04),
            ),
            (
                &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x01, 0, 0, 0, 0],
                E::ConnectFlags(0x01),
            ),
            (
                &[
                    0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x40, 0, 0, 0, 0, 0, 1, b'p',
                ],
                E::ConnectFlags(0x40),
            ),
        ];
        for (bytes, err) in cases {
            assert_eq!(dec(bytes), Err(*err), "{bytes:02x?}");
        }
    }

    #[test]
    fn oversize_is_refused_from_the_fixed_header_alone() {
        // 3 bytes of a packet declaring 1 MiB: refused before the body arrives.
        assert_eq!(
            decode(&[0x30, 0x80, 0x80, 0x40], 1024),
            Err(CodecError::TooLarge {
                size: 4 + (0x40 << 14),
                max: 1024
            })
        );
        // Exactly at the limit is fine.
        let p = publish("t", QoS::AtMostOnce, 0);
        let bytes = enc(&p);
        assert!(decode(&bytes, bytes.len()).unwrap().is_some());
        assert!(decode(&bytes, bytes.len() - 1).is_err());
        // An unknown type is refused before its length is even complete.
        assert_eq!(decode(&[0x60], 1024), Err(CodecError::UnsupportedType(6)));
    }

    #[test]
    fn every_prefix_needs_more_bytes() {
        let bytes = enc(&publish("a/b", QoS::AtLeastOnce, 7));
        for i in 0..bytes.len() {
            assert_eq!(dec(&bytes[..i]), Ok(None), "prefix {i}");
        }
        let mut two = bytes.clone();
        two.extend_from_slice(&[0xd0, 0]);
        assert_eq!(dec(&two).unwrap().unwrap().1, bytes.len());
    }

    #[test]
    fn publish_size_matches_the_encoding() {
        for (topic, len, qos) in [("a", 0, QoS::AtMostOnce), ("a/b/c", 200, QoS::AtLeastOnce)] {
            let mut out = Vec::new();
            encode_publish(&mut out, topic, &vec![0; len], qos, 1, false, false);
            assert_eq!(publish_size(topic, len, qos), Some(out.len()));
        }
        assert_eq!(
            publish_size("a", MAX_REMAINING_LENGTH, QoS::AtMostOnce),
            None
        );
    }

    #[test]
    fn return_codes_have_texts() {
        assert_eq!(ReturnCode(5).to_string(), "5 (not authorized)");
        assert_eq!(ReturnCode(0).to_string(), "0 (connection accepted)");
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]
    }

    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9/é]{1,20}"
    }

    fn packet() -> impl Strategy<Value = Packet> {
        let connect = (
            ".{0,10}",
            any::<bool>(),
            any::<u16>(),
            proptest::option::of(".{0,8}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        )
            .prop_map(
                |(client_id, clean_session, keep_alive, username, password)| {
                    let client_id = client_id.replace('\0', "");
                    let username = username
                        .map(|u| u.replace('\0', ""))
                        .or(password.as_ref().map(|_| String::new()));
                    Packet::Connect(Connect {
                        client_id,
                        clean_session,
                        keep_alive,
                        username,
                        password,
                    })
                },
            );
        let publish = (
            topic(),
            proptest::collection::vec(any::<u8>(), 0..300),
            qos(),
            1..=u16::MAX,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(topic, payload, qos, pkid, dup, retain)| {
                let q1 = qos == QoS::AtLeastOnce;
                Packet::Publish(Publish {
                    topic,
                    payload,
                    qos,
                    pkid: if q1 { pkid } else { 0 },
                    dup: dup && q1,
                    retain,
                })
            });
        prop_oneof![
            connect,
            (any::<bool>(), 0u8..=5).prop_map(|(s, code)| Packet::ConnAck {
                session_present: s && code == 0,
                code
            }),
            publish,
            (1..=u16::MAX).prop_map(|pkid| Packet::PubAck { pkid }),
            (
                1..=u16::MAX,
                proptest::collection::vec(("[a-z+#/]{1,12}", qos()), 1..5)
            )
                .prop_map(|(pkid, filters)| Packet::Subscribe { pkid, filters }),
            (
                1..=u16::MAX,
                proptest::collection::vec(proptest::option::of(qos()), 1..5)
            )
                .prop_map(|(pkid, granted)| Packet::SubAck { pkid, granted }),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn roundtrip(p in packet(), cut in any::<prop::sample::Index>()) {
            let bytes = enc(&p);
            prop_assert_eq!(dec(&bytes), Ok(Some((p.clone(), bytes.len()))));
            let cut = cut.index(bytes.len());
            prop_assert_eq!(dec(&bytes[..cut]), Ok(None));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((p, n))) = decode(&bytes, 64) {
                prop_assert!(n <= bytes.len());
                prop_assert_eq!(enc(&p).len() <= n, true);
            }
        }
    }
}
