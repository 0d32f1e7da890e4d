//! Fuzzes the Alink downlink parser with what a broker may deliver: the input's first line is
//! the topic, the rest the payload.
//!
//! Asserts: nothing panics; a parsed request's params are JSON of the right shape; every
//! rejection has a reply topic and its reply body is JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlink::alink::{parse_downlink, reply_with};
use ringlink::session::DownlinkRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (topic, payload) = text.split_once('\n').unwrap_or((text, ""));
    match parse_downlink("", topic, payload.as_bytes()) {
        Ok(None) => {}
        Ok(Some(req)) => {
            let params: serde_json::Value = if req.params.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&req.params).expect("params are JSON")
            };
            match req.request {
                DownlinkRequest::GetProperty => assert!(params.is_array()),
                DownlinkRequest::SetProperty => assert!(params.is_object()),
                DownlinkRequest::CallService(_) => assert!(params.is_object() || params.is_null()),
            }
            assert!(!req.reply_topic.is_empty());
        }
        Err(rej) => {
            assert!(!rej.reply_topic.is_empty());
            let mut body = Vec::new();
            reply_with(&rej.id, rej.code, None, &rej.message, &mut body);
            let _: serde_json::Value = serde_json::from_slice(&body).expect("reply is JSON");
        }
    }
});
