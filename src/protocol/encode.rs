//! Outbound message encoding: replies and server requests, written straight into the caller's
//! output buffer as compact UTF-8 JSON with no trailing NUL (PROTOCOL.md section 3).

use crate::protocol::json::{write_int, write_str};
use crate::protocol::Code;

/// Appends a reply: `{"code":C,"message":"...","messageId":ID,"payload":{}}`.
///
/// `payload` writes the members of the payload object (nothing for `{}`); a non-zero code always
/// has an empty payload.
pub fn write_reply(out: &mut Vec<u8>, id: u32, code: Code) {
    out.extend_from_slice(b"{\"code\":");
    write_int(out, code.as_u32());
    out.extend_from_slice(b",\"message\":");
    write_str(out, code.message());
    out.extend_from_slice(b",\"messageId\":");
    write_int(out, id);
    out.extend_from_slice(b",\"payload\":{}}");
}

/// The three methods ringlink sends to a client (PROTOCOL.md section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerMethod {
    GetProperty,
    SetProperty,
    CallService,
}

impl ServerMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::GetProperty => "getProperty",
            Self::SetProperty => "setProperty",
            Self::CallService => "callService",
        }
    }
}

/// Appends a server request up to and including the device fields of the payload:
/// `{"version":"1.0","method":M,"messageId":ID,"payload":{"productKey":..,"deviceName":..`.
/// The caller appends the remaining payload members (each starting with `,`) and then calls
/// [`finish_request`].
pub fn start_request(
    out: &mut Vec<u8>,
    method: ServerMethod,
    id: u32,
    product_key: &str,
    device_name: &str,
) {
    out.extend_from_slice(b"{\"version\":\"1.0\",\"method\":\"");
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b"\",\"messageId\":");
    write_int(out, id);
    out.extend_from_slice(b",\"payload\":{\"productKey\":");
    write_str(out, product_key);
    out.extend_from_slice(b",\"deviceName\":");
    write_str(out, device_name);
}

/// Closes the payload and the message opened by [`start_request`].
pub fn finish_request(out: &mut Vec<u8>) {
    out.extend_from_slice(b"}}");
}

/// Appends a client request (for loadgen and tests): `{"version":"1.0","messageId":ID,
/// "method":M,"payload":{"productKey":..,"deviceName":..` — the caller adds members and calls
/// [`finish_request`].
pub fn start_client_request(
    out: &mut Vec<u8>,
    method: &str,
    id: u32,
    product_key: &str,
    device_name: &str,
) {
    out.extend_from_slice(b"{\"version\":\"1.0\",\"messageId\":");
    write_int(out, id);
    out.extend_from_slice(b",\"method\":");
    write_str(out, method);
    out.extend_from_slice(b",\"payload\":{\"productKey\":");
    write_str(out, product_key);
    out.extend_from_slice(b",\"deviceName\":");
    write_str(out, device_name);
}

/// Appends a client reply (for loadgen and tests): `{"code":C,"messageId":ID,"payload":{` —
/// the caller adds payload members and closes with [`finish_request`].
pub fn start_client_reply(out: &mut Vec<u8>, id: u32, code: u32) {
    out.extend_from_slice(b"{\"code\":");
    write_int(out, code);
    out.extend_from_slice(b",\"messageId\":");
    write_int(out, id);
    out.extend_from_slice(b",\"payload\":{");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn success_reply_is_exactly_the_protocol_example() {
        assert_eq!(
            text(|o| write_reply(o, 12, Code::Success)),
            r#"{"code":0,"message":"Success","messageId":12,"payload":{}}"#
        );
        assert_eq!(
            text(|o| write_reply(o, 0, Code::JsonFormat)),
            r#"{"code":109007,"message":"JSON format error","messageId":0,"payload":{}}"#
        );
    }

    #[test]
    fn every_reply_parses_and_has_no_trailing_nul() {
        for code in Code::SENT {
            let t = text(|o| write_reply(o, 4_294_967_295, code));
            assert!(!t.ends_with('\0'));
            let v: serde_json::Value = serde_json::from_str(&t).expect("valid JSON");
            assert_eq!(v["code"], code.as_u32());
            assert_eq!(v["message"], code.message());
            assert_eq!(v["messageId"], 4_294_967_295u32);
            assert_eq!(v["payload"], serde_json::json!({}));
        }
    }

    #[test]
    fn server_request_matches_the_protocol_example() {
        let t = text(|o| {
            start_request(o, ServerMethod::SetProperty, 7, "a1ThermoPK0", "thermo-01");
            o.extend_from_slice(
                br#","properties":[{"identifier":"setpoint","type":"float","value":19.5}]"#,
            );
            finish_request(o);
        });
        assert_eq!(
            t,
            r#"{"version":"1.0","method":"setProperty","messageId":7,"payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-01","properties":[{"identifier":"setpoint","type":"float","value":19.5}]}}"#
        );
    }

    #[test]
    fn device_names_are_escaped() {
        let t = text(|o| {
            start_client_request(o, "onlineDevice", 1, "p\"k", "d\\n");
            finish_request(o);
        });
        let v: serde_json::Value = serde_json::from_str(&t).expect("valid JSON");
        assert_eq!(v["payload"]["productKey"], "p\"k");
        assert_eq!(v["payload"]["deviceName"], "d\\n");
    }
}
