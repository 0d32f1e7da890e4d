//! Inbound message decoding: trailing-NUL stripping, zero-copy JSON, and the common checks of
//! PROTOCOL.md section 7 (steps 1-7), in that order.
//!
//! Owns: a reusable simd-json tape and parser buffers, so a decode allocates nothing once they
//! have grown to the largest message seen. Strings in the decoded message borrow the caller's
//! receive buffer (simd-json unescapes in place). No IO, no clock.

use simd_json::prelude::*;
use simd_json::{Buffers, ErrorType, Node, StaticNode, Tape};

use crate::model::{out_of_range_number, DataKind, Json};
use crate::protocol::Code;

/// Decodes inbound Link messages with buffers that are reused from one message to the next.
///
/// A shard keeps one `Decoder` and lends it to each session's `handle_input`; a connection does
/// not need its own, which keeps idle connections small.
pub struct Decoder {
    buffers: Buffers,
    /// Kept between calls only for its allocation; always empty when stored here.
    tape: Option<Tape<'static>>,
    /// The slow path's copy of a message (see [`Decoder::decode`]); empty between calls.
    scratch: Vec<u8>,
    /// The slow path's number values, in document order.
    numbers: Vec<StaticNode>,
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            buffers: Buffers::new(1024),
            tape: Some(Tape::null().reset()),
            scratch: Vec::new(),
            numbers: Vec::new(),
        }
    }

    /// Decodes one WebSocket message in place and hands the result to `f`.
    ///
    /// `Ok(None)` is a message that was empty after stripping trailing NULs and whitespace: it is
    /// ignored (PROTOCOL.md section 3). `Err(reject)` is a message that must be answered with
    /// `reject.code` and `reject.id` (a reply, never for another reply).
    pub fn decode<R>(
        &mut self,
        input: &mut [u8],
        f: impl FnOnce(Result<Option<Inbound<'_, '_>>, Reject>) -> R,
    ) -> R {
        let len = strip_trailing(input);
        if len == 0 {
            return f(Ok(None));
        }
        self.parse_json(&mut input[..len], |doc| match doc {
            Some(doc) => f(classify(doc).map(Some)),
            // 1. Not JSON -> 109007, messageId 0.
            None => f(Err(Reject::new(0, Code::JsonFormat))),
        })
    }

    /// Parses a JSON document in place with the reused buffers and hands it to `f`; `None`
    /// when it is not JSON. Also for documents that are not protocol messages (for example a
    /// downlink body from the northbound API).
    ///
    /// A number no 64-bit node holds is JSON all the same (RFC 8259 section 6 sets no limit),
    /// though the fast parser refuses it: such a document takes a slow path ([`fill_wide`])
    /// that reads the number as [`out_of_range_number`], which the checks after parsing reject
    /// (100001 as a messageId, 100007 as a property value; PROTOCOL.md sections 4.2 and 11.4).
    pub fn parse_json<R>(
        &mut self,
        input: &mut [u8],
        f: impl FnOnce(Option<Json<'_, '_>>) -> R,
    ) -> R {
        // simd-json unescapes strings in place, so after it refused a document the input may
        // no longer be the document: the slow path then needs a copy taken before. Only a
        // document with an escape can change, and device messages rarely have one.
        let escaped = memchr::memchr(b'\\', input).is_some();
        if escaped {
            self.scratch.clear();
            self.scratch.extend_from_slice(input);
        }
        let mut tape = self.tape.take().unwrap_or_else(Tape::null).reset();
        match simd_json::fill_tape(input, &mut self.buffers, &mut tape) {
            Ok(()) => {
                let r = f(Some(tape.as_value()));
                self.tape = Some(tape.reset());
                if escaped {
                    self.scratch.clear();
                }
                r
            }
            Err(e) => {
                let number = matches!(
                    e.error(),
                    ErrorType::InvalidNumber | ErrorType::InvalidExponent
                );
                self.tape = Some(tape.reset());
                self.parse_wide(input, escaped, number, f)
            }
        }
    }

    /// After the fast parser refused `input`: the slow path when it was over a number (the
    /// message as sent is in `scratch` when `escaped`, else still in `input`), else not JSON.
    #[cold]
    #[inline(never)]
    fn parse_wide<R>(
        &mut self,
        input: &[u8],
        escaped: bool,
        number: bool,
        f: impl FnOnce(Option<Json<'_, '_>>) -> R,
    ) -> R {
        if !number {
            self.scratch.clear();
            return f(None);
        }
        if !escaped {
            self.scratch.clear();
            self.scratch.extend_from_slice(input);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut tape = self.tape.take().unwrap_or_else(Tape::null).reset();
        let filled = fill_wide(
            &mut scratch,
            &mut self.numbers,
            &mut self.buffers,
            &mut tape,
        );
        let r = f(filled.then(|| tape.as_value()));
        self.tape = Some(tape.reset());
        scratch.clear();
        self.scratch = scratch;
        r
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// A decoded message that passed the common checks.
#[derive(Clone, Copy, Debug)]
pub enum Inbound<'t, 'i> {
    Request(Request<'t, 'i>),
    Reply(Reply<'t, 'i>),
}

/// A client request that passed common checks 4-7: id, method, payload and device are present.
#[derive(Clone, Copy, Debug)]
pub struct Request<'t, 'i> {
    pub id: u32,
    pub method: Method,
    pub product_key: &'i str,
    pub device_name: &'i str,
    /// The `payload` member; always a JSON object.
    pub payload: Json<'t, 'i>,
}

/// A client reply to one of ringlink's downlinks.
#[derive(Clone, Copy, Debug)]
pub struct Reply<'t, 'i> {
    pub id: u32,
    pub code: Code,
    /// `payload` when it is an object; a missing payload reads as empty.
    pub payload: Option<Json<'t, 'i>>,
}

/// The four methods a client may send (PROTOCOL.md section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    OnlineDevice,
    OfflineDevice,
    ReportProperty,
    ReportEvent,
}

impl Method {
    pub const ALL: [Self; 4] = [
        Self::OnlineDevice,
        Self::OfflineDevice,
        Self::ReportProperty,
        Self::ReportEvent,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OnlineDevice => "onlineDevice",
            Self::OfflineDevice => "offlineDevice",
            Self::ReportProperty => "reportProperty",
            Self::ReportEvent => "reportEvent",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// A message that must be answered with an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The request's `messageId`, or 0 when it had no usable one.
    pub id: u32,
    pub code: Code,
}

impl Reject {
    pub const fn new(id: u32, code: Code) -> Self {
        Self { id, code }
    }
}

/// One `{identifier, type, value}` entry of `properties`, `outputData` or `inputData`.
#[derive(Clone, Copy, Debug)]
pub struct Item<'t, 'i> {
    pub identifier: &'i str,
    pub kind: DataKind,
    pub value: Json<'t, 'i>,
}

impl<'t, 'i> Item<'t, 'i> {
    /// Reads an Item: an object with a string `identifier`, a `type` given as a name or as a
    /// numeric code 0-8, and a `value`. Anything else is not a well-formed Item (100001).
    pub fn parse(v: Json<'t, 'i>) -> Option<Self> {
        // One pass over the members: a tape lookup by key is a linear scan.
        let (mut identifier, mut ty, mut value) = (None, None, None);
        for (key, member) in v.as_object()?.iter() {
            match key {
                "identifier" => identifier = member.into_string(),
                "type" => ty = Some(member),
                "value" => value = Some(member),
                _ => {}
            }
        }
        let ty = ty?;
        let kind = match ty.as_str() {
            Some(name) => DataKind::from_name(name)?,
            None => DataKind::from_code(ty.as_u64()?)?,
        };
        Some(Self {
            identifier: identifier?,
            kind,
            value: value?,
        })
    }
}

/// The slow path of [`Decoder::decode`], for a message the fast parser refused over a number.
///
/// Every number token of `text` is parsed here (an integer that fits i64 or u64 as that, any
/// other finite number as f64, anything larger as [`out_of_range_number`]) and overwritten
/// with `0` and spaces; simd-json then parses the rest as usual and each number node of the
/// tape gets its value back, in document order. One pass over the text, one parse, and each
/// number is read once: linear in the message, whatever its numbers look like (a 60,000-digit
/// integer stops parsing as i64 at its 20th digit). False: not JSON after all.
fn fill_wide<'s>(
    text: &'s mut [u8],
    numbers: &mut Vec<StaticNode>,
    buffers: &mut Buffers,
    tape: &mut Tape<'s>,
) -> bool {
    numbers.clear();
    if !take_numbers(text, numbers) || simd_json::fill_tape(text, buffers, tape).is_err() {
        return false;
    }
    let mut values = numbers.iter();
    for node in &mut tape.0 {
        if let Node::Static(s) = node {
            if !matches!(s, StaticNode::Bool(_) | StaticNode::Null) {
                match values.next() {
                    Some(v) => *s = *v,
                    None => return false,
                }
            }
        }
    }
    values.next().is_none()
}

/// Reads every number token outside strings into `out` and blanks it to `0` (RFC 8259 section
/// 6: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, followed by a delimiter). False
/// for a token that is not a JSON number, so that nothing malformed turns into JSON here.
fn take_numbers(text: &mut [u8], out: &mut Vec<StaticNode>) -> bool {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let Some((end, integral)) = number_end(text, i) else {
                    return false;
                };
                if text.get(end).is_some_and(|b| {
                    !matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    return false;
                }
                // ASCII digits, signs, '.', 'e': always UTF-8.
                let Ok(token) = std::str::from_utf8(&text[i..end]) else {
                    return false;
                };
                out.push(number_value(token, integral));
                text[i] = b'0';
                text[i + 1..end].fill(b' ');
                i = end;
            }
            _ => i += 1,
        }
    }
    true
}

/// The end of the JSON number starting at `start`, and whether it is an integer literal (no
/// fraction, no exponent); None when the bytes there are not a number.
fn number_end(text: &[u8], start: usize) -> Option<(usize, bool)> {
    let digits = |mut i: usize| {
        let from = i;
        while text.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > from).then_some(i)
    };
    let mut i = start;
    if text[i] == b'-' {
        i += 1;
    }
    i = match text.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(i)?,
        _ => return None,
    };
    let mut integral = true;
    if text.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
        integral = false;
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(text.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digits(i)?;
        integral = false;
    }
    Some((i, integral))
}

/// A number token's node, as simd-json would make it where it can: i64, else u64, for an
/// integer literal; f64 for any other; out of range beyond those.
fn number_value(token: &str, integral: bool) -> StaticNode {
    let negative = token.starts_with('-');
    if integral {
        if let Ok(n) = token.parse::<i64>() {
            return StaticNode::I64(n);
        }
        if let Ok(n) = token.parse::<u64>() {
            return StaticNode::U64(n);
        }
        return StaticNode::F64(out_of_range_number(true, negative));
    }
    match token.parse::<f64>() {
        Ok(x) if x.is_finite() => StaticNode::F64(x),
        _ => StaticNode::F64(out_of_range_number(false, negative)),
    }
}

/// Strips trailing NUL bytes and ASCII whitespace; returns the remaining length.
///
/// The official client ends each request with one NUL and each reply with two.
pub fn strip_trailing(input: &[u8]) -> usize {
    input
        .iter()
        .rposition(|&b| !matches!(b, 0 | b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        .map_or(0, |i| i + 1)
}

/// Common checks 2-7 of PROTOCOL.md section 7 on a parsed document.
fn classify<'t, 'i>(doc: Json<'t, 'i>) -> Result<Inbound<'t, 'i>, Reject> {
    // 2. Not a JSON object -> 100001, messageId 0.
    let obj = doc
        .as_object()
        .ok_or(Reject::new(0, Code::InvalidParameter))?;
    // One pass over the members (a tape lookup by key is a linear scan); the checks below
    // still apply in the order of PROTOCOL.md.
    let (mut code, mut id, mut method, mut payload) = (None, None, None, None);
    for (key, value) in obj.iter() {
        match key {
            "code" => code = Some(value),
            "messageId" => id = Some(value),
            "method" => method = Some(value),
            "payload" => payload = Some(value),
            _ => {}
        }
    }
    // 3. Has `code` -> it is a reply.
    if let Some(code) = code {
        let id = message_id(id).ok_or(Reject::new(0, Code::InvalidParameter))?;
        let code = code
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .map_or(Code::Unknown, Code::from_u32);
        let payload = payload.filter(Json::is_object);
        return Ok(Inbound::Reply(Reply { id, code, payload }));
    }
    // 4. messageId missing, not an integer, or outside 0..4294967295 -> 100001, messageId 0.
    let id = message_id(id).ok_or(Reject::new(0, Code::InvalidParameter))?;
    let invalid = Reject::new(id, Code::InvalidParameter);
    // 5. `method` not a string or `payload` not an object -> 100001, echo the id.
    let method = method.and_then(|m| m.into_string()).ok_or(invalid)?;
    let payload = payload.filter(Json::is_object).ok_or(invalid)?;
    // 6. Not one of the four client methods -> 100001.
    let method = Method::from_str(method).ok_or(invalid)?;
    // 7. productKey / deviceName missing, empty or not strings -> 100001.
    let (mut product_key, mut device_name) = (None, None);
    for (key, value) in payload.as_object().ok_or(invalid)?.iter() {
        match key {
            "productKey" => product_key = Some(value),
            "deviceName" => device_name = Some(value),
            _ => {}
        }
    }
    let product_key = non_empty_str(product_key).ok_or(invalid)?;
    let device_name = non_empty_str(device_name).ok_or(invalid)?;
    Ok(Inbound::Request(Request {
        id,
        method,
        product_key,
        device_name,
        payload,
    }))
}

fn message_id(v: Option<Json<'_, '_>>) -> Option<u32> {
    v?.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn non_empty_str<'i>(v: Option<Json<'_, 'i>>) -> Option<&'i str> {
    v?.into_string().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `text` and returns a summary string, so tests compare plain values.
    fn summary(text: &[u8]) -> String {
        let mut buf = text.to_vec();
        Decoder::new().decode(&mut buf, |r| match r {
            Ok(None) => "ignored".to_owned(),
            Ok(Some(Inbound::Request(r))) => format!(
                "request {} {} {}/{}",
                r.id,
                r.method.as_str(),
                r.product_key,
                r.device_name
            ),
            Ok(Some(Inbound::Reply(r))) => format!(
                "reply {} {} payload={}",
                r.id,
                r.code.as_u32(),
                r.payload.is_some()
            ),
            Err(rej) => format!("reject {} {}", rej.id, rej.code.as_u32()),
        })
    }

    const ONLINE: &str = r#"{"version":"1.0","messageId":12,"method":"onlineDevice","payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-01"}}"#;

    #[test]
    fn request_with_one_nul_as_the_official_client_sends_it() {
        let mut frame = ONLINE.as_bytes().to_vec();
        frame.push(0);
        assert_eq!(
            summary(&frame),
            "request 12 onlineDevice a1ThermoPK0/thermo-01"
        );
    }

    #[test]
    fn any_mix_of_trailing_nuls_and_whitespace_is_stripped() {
        let mut frame = ONLINE.as_bytes().to_vec();
        frame.extend_from_slice(b"\0\0  \n\r\t\0");
        assert_eq!(
            summary(&frame),
            "request 12 onlineDevice a1ThermoPK0/thermo-01"
        );
        assert_eq!(summary(b"\0\0 \n"), "ignored");
        assert_eq!(summary(b""), "ignored");
    }

    #[test]
    fn reply_with_two_nuls() {
        assert_eq!(
            summary(b"{\"code\":0,\"messageId\":7,\"payload\":{}}\0\0"),
            "reply 7 0 payload=true"
        );
        assert_eq!(
            summary(br#"{"code":109002,"messageId":7}"#),
            "reply 7 109002 payload=false"
        );
    }

    #[test]
    fn versions_1_0_v0_2_and_missing_decode_identically() {
        for version in [
            r#""version":"1.0","#,
            r#""version":"v0.2","#,
            "",
            r#""version":"9","#,
        ] {
            let text = format!(
                r#"{{{version}"messageId":3,"method":"reportEvent","payload":{{"productKey":"p","deviceName":"d"}}}}"#
            );
            assert_eq!(
                summary(text.as_bytes()),
                "request 3 reportEvent p/d",
                "{text}"
            );
        }
    }

    const REPORT_HEAD: &str = r#"{"version":"1.0","method":"reportProperty","payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-01","properties":[{"identifier":"setpoint","type":"float","value":"#;

    /// A report whose value is `value` (and id 7): it decodes as a request whatever the number;
    /// the model's checks judge the value.
    fn report_with(value: &str) -> String {
        format!(r#"{REPORT_HEAD}{value}}}]}},"messageId":7}}"#)
    }

    /// The value the decoder gives the number in a report.
    fn decoded_value(value: &str) -> String {
        let mut buf = report_with(value).into_bytes();
        Decoder::new().decode(&mut buf, |r| match r {
            Ok(Some(Inbound::Request(req))) => {
                let props = req.payload.get("properties").and_then(|p| p.as_array());
                let item = props.and_then(|a| a.iter().next()).and_then(Item::parse);
                let v = item.expect("one item").value;
                match v.as_f64() {
                    Some(x) if x.is_nan() => format!("nan {:#x}", x.to_bits()),
                    _ => format!("{:?}", v.value_type()),
                }
            }
            other => panic!("{value:.30}: {:?}", other.map(|_| ())),
        })
    }

    #[test]
    fn numbers_beyond_64_bits_are_values_not_109007() {
        // The fast parser refuses each of these; they are JSON all the same.
        let huge = "9".repeat(60_000);
        let cases = [
            ("1e400", out_of_range_number(false, false)),
            ("-1e400", out_of_range_number(false, true)),
            ("18446744073709551616", out_of_range_number(true, false)),
            ("-9223372036854775809", out_of_range_number(true, true)),
            (huge.as_str(), out_of_range_number(true, false)),
        ];
        for (value, want) in cases {
            let mut fast = report_with(value).into_bytes();
            assert!(
                simd_json::to_tape(&mut fast).is_err(),
                "{value:.30}: the fast parser takes it, so this tests nothing"
            );
            assert_eq!(decoded_value(value), format!("nan {:#x}", want.to_bits()));
        }
        // What the fast parser takes keeps its node type.
        assert_eq!(decoded_value("18446744073709551615"), "U64");
        assert_eq!(decoded_value("1e30"), "F64");
    }

    #[test]
    fn a_message_id_beyond_64_bits_is_100001_not_109007() {
        for id in [
            "18446744073709551616",
            "1e400",
            "-9223372036854775809",
            &"7".repeat(60_000),
        ] {
            let msg = format!(
                r#"{{"version":"1.0","messageId":{id},"method":"onlineDevice","payload":{{"productKey":"a1ThermoPK0","deviceName":"thermo-01"}}}}"#
            );
            assert_eq!(summary(msg.as_bytes()), "reject 0 100001", "{id:.30}");
            // As the code of a reply it is no code: passed on as Unknown, like 2^32.
            let reply = format!(r#"{{"code":{id},"messageId":3,"payload":{{}}}}"#);
            assert_eq!(
                summary(reply.as_bytes()),
                "reply 3 100000 payload=true",
                "{id:.30}"
            );
        }
    }

    #[test]
    fn the_slow_path_keeps_every_other_value_and_escaped_strings() {
        // Escapes are unescaped in place by the fast parser before it meets the number: the
        // slow path must still see the message as sent.
        let msg = br#"{"version":"1.0","messageId":4294967295,"method":"reportProperty","payload":{"productKey":"a1\"PK\\0","deviceName":"d\u00e9v\n1","properties":[{"identifier":"setpoint","type":"float","value":1e400},{"identifier":"x","type":"int","value":-12},{"identifier":"y","type":2,"value":0.5e-3},{"identifier":"z","type":"bool","value":true}]}}"#;
        let mut buf = msg.to_vec();
        let got = Decoder::new().decode(&mut buf, |r| match r {
            Ok(Some(Inbound::Request(req))) => {
                let props = req.payload.get("properties").and_then(|p| p.as_array());
                let items: Vec<String> = props
                    .into_iter()
                    .flat_map(|a| a.iter())
                    .filter_map(Item::parse)
                    .map(|i| {
                        format!(
                            "{}:{}:{:?}",
                            i.identifier,
                            i.kind.name(),
                            i.value.cast_f64()
                        )
                    })
                    .collect();
                format!(
                    "{} {} {:?} {:?} {items:?}",
                    req.id,
                    req.method.as_str(),
                    req.product_key,
                    req.device_name
                )
            }
            other => panic!("{:?}", other.map(|_| ())),
        });
        assert_eq!(
            got,
            r#"4294967295 reportProperty "a1\"PK\\0" "dév\n1" ["setpoint:float:Some(NaN)", "x:int:Some(-12.0)", "y:float:Some(0.0005)", "z:bool:None"]"#
        );
    }

    #[test]
    fn malformed_numbers_and_json_stay_109007_on_the_slow_path() {
        // Each has a number the fast parser refuses and something else wrong.
        for bad in [
            r#"{"messageId":1e400,"a":01}"#,
            r#"{"messageId":1e400,"a":1.}"#,
            r#"{"messageId":1e400,"a":-}"#,
            r#"{"messageId":1e400,"a":1e}"#,
            r#"{"messageId":1e400,"a":.5}"#,
            r#"{"messageId":1e400,"a":+1}"#,
            r#"{"messageId":1e400,"a":1x}"#,
            r#"{"messageId":1e400,"a":1 2}"#,
            r#"{"messageId":1e400,"a":[1,]}"#,
            r#"{"messageId":1e400,"a":"x}"#,
            r#"{"messageId":1e400,1:2}"#,
            r#"{"messageId":1e400"#,
            r#"{"messageId":18446744073709551616,"a":tru}"#,
            r#"[1e400,NaN]"#,
            r#"[1e400,Infinity]"#,
            r#"[1e400,0x10]"#,
        ] {
            assert_eq!(summary(bad.as_bytes()), "reject 0 109007", "{bad}");
        }
        // A number inside a string is text, whatever it looks like.
        assert_eq!(
            summary(br#"{"messageId":1e400,"a":"01 1. -"}"#),
            "reject 0 100001"
        );
    }

    #[test]
    fn a_60000_digit_number_is_a_value_not_a_parse_error() {
        // 60,000 digits within a 64 KiB frame take the slow path; its cost (linear in the
        // message) is measured by `cargo bench --bench protocol` (decode_huge_number), not here.
        let mut decoder = Decoder::new();
        for digits in ["9", "1.", "0.0"] {
            let value = format!("{}{}", digits, "7".repeat(60_000));
            let mut buf = report_with(&value).into_bytes();
            let ok = decoder.decode(&mut buf, |r| matches!(r, Ok(Some(Inbound::Request(_)))));
            assert!(ok, "{digits}");
        }
    }

    #[test]
    fn not_json_is_109007_with_id_0() {
        assert_eq!(summary(b"hello"), "reject 0 109007");
        assert_eq!(summary(b"{\"messageId\":5,"), "reject 0 109007");
    }

    #[test]
    fn common_checks_in_order() {
        // 2. not an object
        assert_eq!(summary(b"[1,2]"), "reject 0 100001");
        assert_eq!(summary(b"42"), "reject 0 100001");
        // 4. messageId missing / not integer / out of range
        assert_eq!(
            summary(br#"{"method":"onlineDevice","payload":{}}"#),
            "reject 0 100001"
        );
        assert_eq!(
            summary(br#"{"messageId":"12","method":"x"}"#),
            "reject 0 100001"
        );
        assert_eq!(
            summary(br#"{"messageId":1.5,"method":"x"}"#),
            "reject 0 100001"
        );
        assert_eq!(
            summary(br#"{"messageId":-1,"method":"x"}"#),
            "reject 0 100001"
        );
        assert_eq!(
            summary(br#"{"messageId":4294967296,"method":"x"}"#),
            "reject 0 100001"
        );
        // 5. method not a string, payload not an object: echo the id
        assert_eq!(
            summary(br#"{"messageId":9,"method":1,"payload":{}}"#),
            "reject 9 100001"
        );
        assert_eq!(
            summary(br#"{"messageId":9,"method":"onlineDevice","payload":[]}"#),
            "reject 9 100001"
        );
        // 6. unknown methods, including the server's own and old names
        for m in [
            "registerDevice",
            "getProperty",
            "setProperty",
            "callService",
            "methodCall",
            "heartbeats",
        ] {
            let text = format!(
                r#"{{"messageId":9,"method":"{m}","payload":{{"productKey":"p","deviceName":"d"}}}}"#
            );
            assert_eq!(summary(text.as_bytes()), "reject 9 100001", "{m}");
        }
        // 7. productKey / deviceName missing, empty, not strings
        for p in [
            r#"{"deviceName":"d"}"#,
            r#"{"productKey":"","deviceName":"d"}"#,
            r#"{"productKey":"p","deviceName":7}"#,
        ] {
            let text = format!(r#"{{"messageId":9,"method":"onlineDevice","payload":{p}}}"#);
            assert_eq!(summary(text.as_bytes()), "reject 9 100001", "{p}");
        }
    }

    #[test]
    fn v0_1_frame_is_100001_with_id_0() {
        assert_eq!(
            summary(br#"{"msgId":3,"deviceId":"d","productKey":"p","method":"registerDevice"}"#),
            "reject 0 100001"
        );
    }

    #[test]
    fn ids_are_echoed_unchanged_across_the_whole_u32_range() {
        for id in [0u64, 1, 4711, 2_147_483_647, 2_147_483_648, 4_294_967_295] {
            let text = format!(
                r#"{{"messageId":{id},"method":"onlineDevice","payload":{{"productKey":"p","deviceName":"d"}}}}"#
            );
            assert_eq!(
                summary(text.as_bytes()),
                format!("request {id} onlineDevice p/d")
            );
        }
    }

    #[test]
    fn escaped_strings_are_unescaped_in_place() {
        let text = br#"{"messageId":1,"method":"onlineDevice","payload":{"productKey":"p\u0041","deviceName":"d\"q"}}"#;
        assert_eq!(summary(text), "request 1 onlineDevice pA/d\"q");
    }

    #[test]
    fn items_accept_names_and_numeric_codes() {
        let mut buf =
            br#"[{"identifier":"a","type":"int","value":1},{"identifier":"b","type":0,"value":2},{"identifier":"c","type":"integer","value":1},{"identifier":"d","type":9,"value":1},{"identifier":"e","type":"int"},{"identifier":5,"type":"int","value":1}]"#
                .to_vec();
        let kinds: Vec<Option<(String, DataKind)>> = Decoder::new().parse_json(&mut buf, |v| {
            let arr = v.and_then(|v| v.as_array()).expect("array");
            arr.iter()
                .map(|v| Item::parse(v).map(|i| (i.identifier.to_owned(), i.kind)))
                .collect()
        });
        assert_eq!(
            kinds,
            vec![
                Some(("a".into(), DataKind::Int)),
                Some(("b".into(), DataKind::Int)),
                None,
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn decoder_reuse_across_messages_of_different_sizes() {
        let mut dec = Decoder::new();
        let big = format!(
            r#"{{"messageId":1,"method":"reportProperty","payload":{{"productKey":"p","deviceName":"d","properties":[{}]}}}}"#,
            vec![r#"{"identifier":"x","type":"int","value":1}"#; 500].join(",")
        );
        for text in [ONLINE.to_owned(), big, ONLINE.to_owned()] {
            let mut buf = text.into_bytes();
            let ok = dec.decode(&mut buf, |r| matches!(r, Ok(Some(Inbound::Request(_)))));
            assert!(ok);
        }
    }
}
