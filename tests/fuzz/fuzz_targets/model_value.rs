//! Fuzzes the thing-model value checks and the normalising writer against the thermostat TSL
//! (PROTOCOL.md 11.2): the input is one JSON value.
//!
//! Asserts: no check panics; `write_value` (both styles) and `write_json` always produce JSON;
//! for a value that passes `check`, the written value re-parses, passes again, and writing it
//! again gives the same bytes.

#![no_main]

use std::sync::OnceLock;

use ringlink::model::{write_json, DataType, Json, ThingModel, ValueStyle};

static MODEL: OnceLock<ThingModel> = OnceLock::new();

fn model() -> &'static ThingModel {
    MODEL.get_or_init(|| {
        ThingModel::from_slice(include_bytes!("../../../src/registry/demo/thermostat.json"))
            .expect("thermostat.json loads")
    })
}

fn parses(bytes: &[u8]) -> bool {
    let mut copy = bytes.to_vec();
    simd_json::to_tape(&mut copy).is_ok()
}

fn write(t: &DataType, value: Json<'_, '_>, style: ValueStyle) -> Vec<u8> {
    let mut out = Vec::new();
    t.write_value(value, style, &mut out);
    out
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let model = model();
    let mut bytes = data.to_vec();
    let Ok(tape) = simd_json::to_tape(&mut bytes) else {
        return;
    };
    let value = tape.as_value();

    let mut untyped = Vec::new();
    write_json(value, &mut untyped);
    assert!(parses(&untyped), "write_json: {}", String::from_utf8_lossy(&untyped));

    for property in model.properties() {
        let id = &property.identifier;
        let _ = model.check_report_item(id, property.data_type.kind(), value);
        let _ = model.check_set(id, value);
        let accepted = property.data_type.check(value).is_ok();
        for style in [ValueStyle::Wire, ValueStyle::Alink] {
            let once = write(&property.data_type, value, style);
            let mut again = once.clone();
            let reparsed = simd_json::to_tape(&mut again);
            assert!(reparsed.is_ok(), "{id}: {}", String::from_utf8_lossy(&once));
            if accepted {
                if let Ok(tape) = reparsed {
                    let v = tape.as_value();
                    assert!(property.data_type.check(v).is_ok(), "{id}: recheck");
                    assert_eq!(once, write(&property.data_type, v, style), "{id}: idempotent");
                }
            }
        }
    }
    for event in model.events() {
        for param in &event.output {
            let _ = model.check_event_item(event, &param.identifier, param.data_type.kind(), value);
        }
    }
    let _ = model.check_report_item("nope", ringlink::model::DataKind::Int, value);
    for service in ["reboot", "set", "get", "nope"] {
        let _ = model.check_call(service, value.as_object());
    }
    let _ = model.check_call("reboot", None);
});
