//! The conventional baseline for `benches/compare.sh`: the Link IoT Edge device protocol served
//! the way most people would write it, so that ringlink can be measured against "the usual way"
//! in the same run.
//!
//! - `#[tokio::main]` with the multi-thread scheduler and one worker thread (the accept loop runs
//!   on the main thread, every connection is a spawned task on the worker);
//! - `tokio-tungstenite` for the WebSocket layer, with a 4 KiB read buffer;
//! - `serde_json` deserializing every message (after stripping the official client's trailing
//!   NUL bytes) into borrowed typed structs, and `serde_json` serializing every reply;
//! - one `send` (a write and a flush) per reply; no log, no persistence, no metrics.
//!
//! It answers what loadgen's device simulator sends (`onlineDevice`, `offlineDevice`,
//! `reportProperty`, `reportEvent`) with the replies ringlink sends on success
//! (`{"code":0,"message":"Success","messageId":ID,"payload":{}}`, PROTOCOL.md section 4), and
//! echoes the `alibaba-iot-linkedge-protocol` subprotocol in the handshake like ringlink.
//! It keeps **no device registry and checks no thing model**: a request that parses into the
//! typed structs is answered 0. It is the cost floor of the conventional stack (tokio +
//! tungstenite + serde_json) for this traffic, not a gateway. Errors are answered like ringlink
//! where parsing alone can tell (109007 not JSON, 100001 bad shape or unknown method); item
//! `type`s must be names (the numeric codes of the early draft are not accepted).
//!
//! `cargo run --release --example conventional -- [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on <addr>`. Not part of the product.

use std::borrow::Cow;
use std::net::SocketAddr;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const SUBPROTOCOL: &str = "alibaba-iot-linkedge-protocol";

/// A client message. A reply (it has `code`) is never answered; everything else is a request.
#[derive(Deserialize)]
struct Inbound<'a> {
    code: Option<u64>,
    #[serde(rename = "messageId")]
    message_id: Option<u32>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<Payload<'a>>,
}

/// The payload members of the four client methods.
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(rename = "productKey", borrow)]
    product_key: Option<Cow<'a, str>>,
    #[serde(rename = "deviceName", borrow)]
    device_name: Option<Cow<'a, str>>,
    /// reportProperty.
    #[serde(borrow)]
    properties: Option<Vec<Item<'a>>>,
    /// reportEvent: the event.
    #[serde(borrow)]
    identifier: Option<Cow<'a, str>>,
    /// reportEvent: its parameters.
    #[serde(rename = "outputData", borrow)]
    output_data: Option<Vec<Item<'a>>>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    identifier: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    value: serde_json::Value,
}

#[derive(Serialize)]
struct Reply {
    code: u32,
    message: &'static str,
    #[serde(rename = "messageId")]
    message_id: u32,
    payload: Empty,
}

#[derive(Serialize)]
struct Empty {}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(|e| std::io::Error::other(format!("address: {e}")))?;
    serve(addr)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(connection(stream));
    }
}

async fn connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, subprotocol, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match &msg {
            Message::Text(text) => answer(text.as_bytes()),
            Message::Binary(bytes) => answer(bytes),
            // tungstenite answers pings itself; a close ends the stream.
            _ => None,
        };
        if let Some(reply) = reply {
            if ws.send(Message::text(reply)).await.is_err() {
                return;
            }
        }
    }
}

/// Echoes the Link IoT Edge subprotocol when the client offers it.
// The signature is tungstenite's handshake callback.
#[allow(clippy::result_large_err)]
fn subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if offered {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    Ok(resp)
}

/// The reply to one message, `None` for a reply from the client or an empty message.
fn answer(msg: &[u8]) -> Option<String> {
    let end = msg
        .iter()
        .rposition(|&b| !(b == 0 || b.is_ascii_whitespace()))
        .map_or(0, |i| i + 1);
    if end == 0 {
        return None;
    }
    let (code, id) = match serde_json::from_slice::<Inbound<'_>>(&msg[..end]) {
        Err(e) if e.is_syntax() || e.is_eof() => (JSON_FORMAT_ERROR, 0),
        Err(_) => (INVALID_PARAMETER, 0),
        Ok(m) if m.code.is_some() => return None,
        Ok(m) => match m.message_id {
            None => (INVALID_PARAMETER, 0),
            Some(id) => (check(&m), id),
        },
    };
    let reply = Reply {
        code,
        message: if code == 0 {
            "Success"
        } else if code == JSON_FORMAT_ERROR {
            "JSON format error"
        } else {
            "Invalid parameter"
        },
        message_id: id,
        payload: Empty {},
    };
    // Invariant: the reply has string keys and no maps, so serializing cannot fail.
    Some(serde_json::to_string(&reply).expect("a reply serializes"))
}

/// The code for a request that parsed: what parsing alone can check.
fn check(m: &Inbound<'_>) -> u32 {
    let Some(p) = &m.payload else {
        return INVALID_PARAMETER;
    };
    let named = |s: &Option<Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
    if !named(&p.product_key) || !named(&p.device_name) {
        return INVALID_PARAMETER;
    }
    let well_formed = |items: &[Item<'_>]| {
        items
            .iter()
            .all(|i| !i.identifier.is_empty() && !i.ty.is_empty() && !i.value.is_null())
    };
    let ok = match m.method.as_deref() {
        Some("onlineDevice" | "offlineDevice") => true,
        Some("reportProperty") => p
            .properties
            .as_deref()
            .is_some_and(|items| !items.is_empty() && well_formed(items)),
        Some("reportEvent") => {
            named(&p.identifier) && p.output_data.as_deref().is_some_and(well_formed)
        }
        _ => false,
    };
    if ok {
        0
    } else {
        INVALID_PARAMETER
    }
}

const INVALID_PARAMETER: u32 = 100_001;
const JSON_FORMAT_ERROR: u32 = 109_007;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_ringlink() {
        let ok = |id: u32| {
            format!(r#"{{"code":0,"message":"Success","messageId":{id},"payload":{{}}}}"#)
        };
        let report = "{\"version\":\"1.0\",\"messageId\":13,\"method\":\"reportProperty\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-01\",\"properties\":[{\"identifier\":\"power\",\"type\":\"bool\",\"value\":1}]}}\0";
        assert_eq!(answer(report.as_bytes()), Some(ok(13)));
        let online = "{\"version\":\"1.0\",\"messageId\":12,\"method\":\"onlineDevice\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-01\"}}\0";
        assert_eq!(answer(online.as_bytes()), Some(ok(12)));
        let event = r#"{"messageId":14,"method":"reportEvent","payload":{"productKey":"a1ThermoPK0","deviceName":"thermo-01","identifier":"overheat","outputData":[]}}"#;
        assert_eq!(answer(event.as_bytes()), Some(ok(14)));
        assert!(answer(b"not json").is_some_and(|r| r.contains("109007")));
        let unknown = r#"{"messageId":15,"method":"registerDevice","payload":{"productKey":"a","deviceName":"b"}}"#;
        assert!(answer(unknown.as_bytes()).is_some_and(|r| r.contains("100001")));
        assert_eq!(answer(br#"{"code":0,"messageId":7,"payload":{}}"#), None);
        assert_eq!(answer(b"\0\0"), None);
    }
}
