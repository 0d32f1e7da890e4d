//! Helpers shared by the model's unit tests.

use super::{DataType, Json, ThingModel};

/// Runs `f` on the tape value of `text`, parsed as the decoder parses device messages (numbers
/// beyond 64 bits included).
pub(super) fn json<R>(text: &str, f: impl FnOnce(Json<'_, '_>) -> R) -> R {
    let mut bytes = text.as_bytes().to_vec();
    crate::protocol::Decoder::new().parse_json(&mut bytes, |v| f(v.expect("test JSON parses")))
}

pub(super) fn thermostat() -> ThingModel {
    ThingModel::from_slice(include_bytes!("../registry/demo/thermostat.json"))
        .expect("thermostat.json loads")
}

pub(super) fn light() -> ThingModel {
    ThingModel::from_slice(include_bytes!("../registry/demo/light.json")).expect("light.json loads")
}

pub(super) fn export() -> ThingModel {
    ThingModel::from_slice(include_bytes!("../registry/demo/export_builtins.json"))
        .expect("export_builtins.json loads")
}

/// A TSL document with one rw property `x` of the given `dataType` JSON.
pub(super) fn doc_with(data_type: &str) -> String {
    format!(
        r#"{{"profile":{{"productKey":"p"}},"properties":[{{"identifier":"x","accessMode":"rw","dataType":{data_type}}}]}}"#
    )
}

/// Parses one `dataType` JSON.
pub(super) fn ty(data_type: &str) -> DataType {
    let model = ThingModel::from_slice(doc_with(data_type).as_bytes()).expect("test TSL loads");
    model.properties()[0].data_type.clone()
}
