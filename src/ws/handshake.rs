//! The RFC 6455 opening handshake (section 4), both sides, as PROTOCOL.md section 2 profiles it.
//!
//! Server: [`parse_request`] ("need more" contract) then [`write_accept`] or [`write_reject`].
//! Client (loadgen): [`write_request`] then [`parse_response`]. Owns header matching, the
//! `Sec-WebSocket-Accept` computation and subprotocol selection. Never negotiates an extension,
//! never checks `Host` or `Origin`, accepts any path. No IO, no clock.
//!
//! Always: `Ok(Some((_, n)))` means the head is the first `n <= max` bytes of the buffer;
//! `Ok(None)` means fewer than `max` bytes and no complete head, nothing consumed.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::ws::error::HandshakeError;

/// A parsed upgrade request, borrowing from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request target, as sent (the official client sends `//`).
    pub path: &'a str,
    /// The `Sec-WebSocket-Key` value, trimmed; known to decode to 16 bytes.
    pub key: &'a str,
    /// The `Host` header, if any (not checked).
    pub host: Option<&'a str>,
    /// The `Origin` header, if any (not checked).
    pub origin: Option<&'a str>,
    /// Whether the client offered [`LINKEDGE_PROTOCOL`] in `Sec-WebSocket-Protocol`.
    pub offers_linkedge_protocol: bool,
}

impl Request<'_> {
    /// The subprotocol the response selects: [`LINKEDGE_PROTOCOL`] exactly when offered.
    pub fn protocol(&self) -> Option<&'static str> {
        self.offers_linkedge_protocol.then_some(LINKEDGE_PROTOCOL)
    }
}

/// Parses an upgrade request from the front of `buf`, which may hold at most `max` bytes of
/// request head.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((request, n)))`: a valid WebSocket upgrade whose
/// head is `buf[..n]`; bytes after it are already frames. `Err`: answer with
/// [`write_reject`] and close.
pub fn parse_request(
    buf: &[u8],
    max: usize,
) -> Result<Option<(Request<'_>, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max => n,
        Ok(httparse::Status::Partial) if buf.len() < max => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };

    // "The method of the request MUST be GET, and the HTTP version MUST be at least 1.1." (4.1)
    if req.method != Some("GET") {
        return Err(HandshakeError::NotGet);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::NotHttp11);
    }
    let headers = &*req.headers;

    // "If this version does not match a version understood by the server, the server MUST
    // abort the WebSocket handshake described in this section and instead send an appropriate
    // HTTP error code (such as 426 Upgrade Required)" (4.2.2). Checked first so that a version-8
    // client learns which version to use whatever else is wrong.
    let mut version_ok = false;
    for v in values(headers, "sec-websocket-version") {
        if v.trim_ascii() != b"13" {
            return Err(HandshakeError::UnsupportedVersion);
        }
        version_ok = true;
    }
    if !version_ok {
        return Err(HandshakeError::UnsupportedVersion);
    }

    // "An |Upgrade| header field containing the value "websocket", treated as an ASCII
    // case-insensitive value." (4.2.1)
    if !values(headers, "upgrade").any(|v| has_token(v, b"websocket")) {
        return Err(HandshakeError::NotUpgrade);
    }
    // "A |Connection| header field that includes the token "Upgrade", treated as an ASCII
    // case-insensitive value." (4.2.1)
    if !values(headers, "connection").any(|v| has_token(v, b"upgrade")) {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }

    // "A |Sec-WebSocket-Key| header field with a base64-encoded value that, when decoded, is 16
    // bytes in length." (4.2.1)
    let mut keys = values(headers, "sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => std::str::from_utf8(k.trim_ascii()).ok(),
        _ => None,
    };
    let Some(key) = key.filter(|k| decodes_to_16(k)) else {
        return Err(HandshakeError::InvalidKey);
    };

    let offers_linkedge_protocol = values(headers, "sec-websocket-protocol").any(|v| {
        v.split(|&b| b == b',')
            .any(|p| p.trim_ascii() == LINKEDGE_PROTOCOL.as_bytes())
    });
    let text = |name| {
        values(headers, name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    Ok(Some((
        Request {
            path: req.path.unwrap_or("/"),
            key,
            host: text("host"),
            origin: text("origin"),
            offers_linkedge_protocol,
        },
        n,
    )))
}

/// Appends the `101 Switching Protocols` response for a request with `key`, selecting
/// `protocol` if given. Never carries `Sec-WebSocket-Extensions`: every offered extension
/// (the official client offers `permessage-deflate`) is declined by omission.
pub fn write_accept(out: &mut Vec<u8>, key: &str, protocol: Option<&str>) {
    let mut accept = [0; ACCEPT_LEN];
    accept_key_into(key, &mut accept);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&accept);
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends the HTTP error response for `err` (`400`, `426` naming version 13, or `431`), with a
/// short plain-text body and `Connection: close`.
pub fn write_reject(out: &mut Vec<u8>, err: &HandshakeError) {
    let status = err.status();
    let reason = match status {
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let body = err.to_string();
    let version = if status == 426 {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\n{version}Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}\n",
            body.len() + 1
        )
        .as_bytes(),
    );
}

/// The `Sec-WebSocket-Accept` value for `key`: base64(SHA-1(key + GUID)) (RFC 6455 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut accept = [0; ACCEPT_LEN];
    accept_key_into(key, &mut accept);
    // base64 output is ASCII.
    String::from_utf8_lossy(&accept).into_owned()
}

/// Client side: appends an upgrade request for `path` on `host` with `key_b64` (16 random bytes
/// in base64), offering `protocol` if given and no extension.
pub fn write_request(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key_b64: &str,
    protocol: Option<&str>,
) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(key_b64.as_bytes());
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Client side: parses the server's response from the front of `buf`.
///
/// `Ok(None)`: incomplete. `Ok(Some((protocol, n)))`: a valid 101 whose head is `buf[..n]`;
/// `protocol` is the selected subprotocol, if any. The head may be at most
/// [`MAX_RESPONSE_BYTES`].
pub fn parse_response(
    buf: &[u8],
    expected_accept: &str,
) -> Result<Option<(Option<String>, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let n = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_BYTES => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_BYTES => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    // "If the status code received from the server is not 101, the client handles the response
    // per HTTP [RFC2616] procedures." (4.1)
    let code = res.code.unwrap_or(0);
    if code != 101 {
        return Err(HandshakeError::UnexpectedStatus(code));
    }
    let headers = &*res.headers;
    // "If the response lacks an |Upgrade| header field or the |Upgrade| header field contains a
    // value that is not an ASCII case-insensitive match for the value "websocket", the client
    // MUST _Fail the WebSocket Connection_." (4.1)
    if !values(headers, "upgrade").any(|v| has_token(v, b"websocket")) {
        return Err(HandshakeError::NotUpgrade);
    }
    if !values(headers, "connection").any(|v| has_token(v, b"upgrade")) {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    // "If the response lacks a |Sec-WebSocket-Accept| header field or the
    // |Sec-WebSocket-Accept| contains a value other than the base64-encoded SHA-1 of the
    // concatenation of the |Sec-WebSocket-Key| [...] the client MUST _Fail the WebSocket
    // Connection_." (4.1)
    if !values(headers, "sec-websocket-accept")
        .any(|v| v.trim_ascii() == expected_accept.as_bytes())
    {
        return Err(HandshakeError::AcceptMismatch);
    }
    // "If the response includes a |Sec-WebSocket-Extensions| header field and this header field
    // indicates the use of an extension that was not present in the client's handshake [...]
    // the client MUST _Fail the WebSocket Connection_." (4.1) We offer none.
    if values(headers, "sec-websocket-extensions").any(|v| !v.trim_ascii().is_empty()) {
        return Err(HandshakeError::UnexpectedExtension);
    }
    let protocol = values(headers, "sec-websocket-protocol")
        .next()
        .map(|v| String::from_utf8_lossy(v.trim_ascii()).into_owned());
    Ok(Some((protocol, n)))
}

/// The subprotocol of Link IoT Edge device access (PROTOCOL.md section 2).
pub const LINKEDGE_PROTOCOL: &str = "alibaba-iot-linkedge-protocol";

/// The largest response head [`parse_response`] waits for.
pub const MAX_RESPONSE_BYTES: usize = 8192;

/// Values of every header called `name` (ASCII case-insensitive).
fn values<'h, 'b: 'h>(
    headers: &'h [httparse::Header<'b>],
    name: &'static str,
) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Whether the comma-separated `value` holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn decodes_to_16(key: &str) -> bool {
    let mut out = [0; 18];
    matches!(BASE64.decode_slice(key, &mut out), Ok(16))
}

fn accept_key_into(key: &str, out: &mut [u8; ACCEPT_LEN]) {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    let digest = sha.finalize();
    // 20 bytes always encode to exactly 28 base64 characters.
    let written = BASE64.encode_slice(digest, out);
    debug_assert_eq!(written, Ok(ACCEPT_LEN));
}

/// "258EAFA5-E914-47DA-95CA-C5AB0DC85B11" (RFC 6455 1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const ACCEPT_LEN: usize = 28;
const MAX_HEADERS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// What the official C client SDK sends (PROTOCOL.md sections 2 and 10).
    pub(crate) const OFFICIAL: &[u8] = b"GET // HTTP/1.1\r\n\
Host: 192.168.1.10\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://192.168.1.10\r\n\
Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, deflate_frame\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

    fn request(extra: &str) -> Vec<u8> {
        format!(
            "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn rfc_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn official_client_request() {
        let (req, n) = parse_request(OFFICIAL, 8192).unwrap().unwrap();
        assert_eq!(n, OFFICIAL.len());
        assert_eq!(req.path, "//");
        assert_eq!(req.host, Some("192.168.1.10"));
        assert_eq!(req.origin, Some("http://192.168.1.10"));
        assert_eq!(req.protocol(), Some(LINKEDGE_PROTOCOL));
        let mut out = Vec::new();
        write_accept(&mut out, req.key, req.protocol());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n"));
        assert!(!text.to_ascii_lowercase().contains("extensions"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn every_prefix_needs_more() {
        for cut in 0..OFFICIAL.len() {
            assert_eq!(parse_request(&OFFICIAL[..cut], 8192), Ok(None), "cut {cut}");
        }
        // Frame bytes after the head are not part of it.
        let mut more = OFFICIAL.to_vec();
        more.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        assert_eq!(
            parse_request(&more, 8192).unwrap().unwrap().1,
            OFFICIAL.len()
        );
    }

    #[test]
    fn subprotocol_only_when_offered() {
        let none = request("Sec-WebSocket-Version: 13\r\n");
        assert_eq!(
            parse_request(&none, 8192).unwrap().unwrap().0.protocol(),
            None
        );
        for offer in [
            "chat,alibaba-iot-linkedge-protocol",
            "chat ,  alibaba-iot-linkedge-protocol\t, x",
            " alibaba-iot-linkedge-protocol ",
        ] {
            let r = request(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {offer}\r\n"
            ));
            assert_eq!(
                parse_request(&r, 8192).unwrap().unwrap().0.protocol(),
                Some(LINKEDGE_PROTOCOL),
                "{offer}"
            );
        }
        let other = request("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, mqtt\r\n");
        assert_eq!(
            parse_request(&other, 8192).unwrap().unwrap().0.protocol(),
            None
        );
        let mut out = Vec::new();
        write_accept(&mut out, "dGhlIHNhbXBsZSBub25jZQ==", None);
        assert!(!String::from_utf8(out)
            .unwrap()
            .contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn version_8_gets_426() {
        let r = request("Sec-WebSocket-Version: 8\r\n");
        let err = parse_request(&r, 8192).unwrap_err();
        assert_eq!(err, HandshakeError::UnsupportedVersion);
        let mut out = Vec::new();
        write_reject(&mut out, &err);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        // Missing version: same answer.
        assert_eq!(
            parse_request(&request(""), 8192),
            Err(HandshakeError::UnsupportedVersion)
        );
    }

    #[test]
    fn bad_requests_get_400() {
        let plain = b"GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(parse_request(plain, 8192), Err(HandshakeError::NotUpgrade));
        let post = b"POST / HTTP/1.1\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(parse_request(post, 8192), Err(HandshakeError::NotGet));
        let old = b"GET / HTTP/1.0\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(parse_request(old, 8192), Err(HandshakeError::NotHttp11));
        let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert!(matches!(
            parse_request(garbage, 8192),
            Err(HandshakeError::Malformed(_))
        ));
        let no_conn = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(
            parse_request(no_conn, 8192),
            Err(HandshakeError::MissingConnectionUpgrade)
        );
        for key in ["", "c2hvcnQ=", "not base64!!!!!!!!!!!!!=="] {
            let r = format!(
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
            );
            assert_eq!(
                parse_request(r.as_bytes(), 8192),
                Err(HandshakeError::InvalidKey)
            );
        }
        let mut out = Vec::new();
        write_reject(&mut out, &HandshakeError::NotUpgrade);
        assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    #[test]
    fn handshake_is_bounded() {
        let big = request(&format!(
            "Sec-WebSocket-Version: 13\r\nX-Pad: {}\r\n",
            "a".repeat(9000)
        ));
        assert_eq!(parse_request(&big, 8192), Err(HandshakeError::TooLarge));
        // An incomplete head that already fills the limit is refused, not waited for.
        assert_eq!(
            parse_request(&big[..8192], 8192),
            Err(HandshakeError::TooLarge)
        );
        assert_eq!(parse_request(&big[..8191], 8192), Ok(None));
        let mut out = Vec::new();
        write_reject(&mut out, &HandshakeError::TooLarge);
        assert!(out.starts_with(b"HTTP/1.1 431 "));
    }

    #[test]
    fn client_side_roundtrip() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut req = Vec::new();
        write_request(&mut req, "10.0.0.1", "//", key, Some(LINKEDGE_PROTOCOL));
        let (parsed, n) = parse_request(&req, 8192).unwrap().unwrap();
        assert_eq!(
            (parsed.path, parsed.host, n),
            ("//", Some("10.0.0.1"), req.len())
        );
        let mut res = Vec::new();
        write_accept(&mut res, parsed.key, parsed.protocol());
        for cut in 0..res.len() {
            assert_eq!(parse_response(&res[..cut], &accept_key(key)), Ok(None));
        }
        assert_eq!(
            parse_response(&res, &accept_key(key)),
            Ok(Some((Some(LINKEDGE_PROTOCOL.to_string()), res.len())))
        );
        assert_eq!(
            parse_response(&res, "wrong"),
            Err(HandshakeError::AcceptMismatch)
        );
        let mut reject = Vec::new();
        write_reject(&mut reject, &HandshakeError::UnsupportedVersion);
        assert_eq!(
            parse_response(&reject, &accept_key(key)),
            Err(HandshakeError::UnexpectedStatus(426))
        );
        let ext = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            accept_key(key)
        );
        assert_eq!(
            parse_response(ext.as_bytes(), &accept_key(key)),
            Err(HandshakeError::UnexpectedExtension)
        );
    }
}
