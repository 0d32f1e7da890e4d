//! Just enough of a thing model (TSL, PROTOCOL.md section 11) to make up valid values:
//! property, event and service identifiers with their types and ranges.
//!
//! loadgen reads the TSL itself (with serde_json) instead of using the server's model, so it
//! checks the server rather than sharing its assumptions. Built-in events and services of
//! console exports (`post`, `set`, `get`) are skipped: a client never reports or serves them.

use anyhow::{bail, Context as _};
use serde_json::{json, Map, Value};

/// A product's thing model, reduced to what value generation needs.
#[derive(Debug, Clone)]
pub struct Model {
    pub product_key: String,
    pub properties: Vec<Prop>,
    pub events: Vec<Params>,
    pub services: Vec<Service>,
}

/// One property.
#[derive(Debug, Clone)]
pub struct Prop {
    pub id: String,
    pub spec: Spec,
    /// accessMode `rw` or `w`: it is a setting the device keeps (reports repeat it, a set
    /// changes it); `r` properties are measurements that change on every report.
    pub writable: bool,
}

/// An event or a service's output: an identifier and its parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub id: String,
    pub params: Vec<(String, Spec)>,
}

/// A service: its inputs and outputs.
#[derive(Debug, Clone)]
pub struct Service {
    pub id: String,
    pub inputs: Vec<(String, Spec)>,
    pub outputs: Vec<(String, Spec)>,
}

/// A data type with the range values are drawn from.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Int { min: i64, max: i64 },
    Float { min: f64, max: f64 },
    Double { min: f64, max: f64 },
    Bool,
    Enum(Vec<i64>),
    Text { length: usize },
    Date,
    Array { size: usize, item: Box<Self> },
    Struct(Vec<(String, Self)>),
}

impl Model {
    /// The built-in demo model of `product_key`, if there is one.
    pub fn builtin(product_key: &str) -> Option<anyhow::Result<Self>> {
        BUILTIN
            .iter()
            .find(|(pk, _)| *pk == product_key)
            .map(|(_, json)| Self::from_json(json.as_bytes()))
    }

    /// Reads a TSL JSON document.
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let doc: Value = serde_json::from_slice(bytes).context("TSL is not JSON")?;
        let product_key = doc
            .pointer("/profile/productKey")
            .and_then(Value::as_str)
            .context("TSL has no profile.productKey")?
            .to_owned();
        let mut properties = Vec::new();
        for p in array(&doc, "properties") {
            let id = ident(p)?;
            let spec = Spec::from_data_type(p.get("dataType").context("no dataType")?)
                .with_context(|| format!("property {id}"))?;
            let writable = p.get("accessMode").and_then(Value::as_str) != Some("r");
            properties.push(Prop { id, spec, writable });
        }
        let mut events = Vec::new();
        for e in array(&doc, "events") {
            let id = ident(e)?;
            if id == "post" {
                continue;
            }
            let params = params(e, "outputData").with_context(|| format!("event {id}"))?;
            events.push(Params { id, params });
        }
        let mut services = Vec::new();
        for s in array(&doc, "services") {
            let id = ident(s)?;
            if id == "set" || id == "get" {
                continue;
            }
            let inputs = params(s, "inputData").with_context(|| format!("service {id}"))?;
            let outputs = params(s, "outputData").with_context(|| format!("service {id}"))?;
            services.push(Service {
                id,
                inputs,
                outputs,
            });
        }
        if properties.is_empty() {
            bail!("TSL of {product_key} has no properties");
        }
        Ok(Self {
            product_key,
            properties,
            events,
            services,
        })
    }

    pub fn property(&self, id: &str) -> Option<&Prop> {
        self.properties.iter().find(|p| p.id == id)
    }

    pub fn service(&self, id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }
}

impl Spec {
    fn from_data_type(dt: &Value) -> anyhow::Result<Self> {
        let ty = dt
            .get("type")
            .and_then(Value::as_str)
            .context("no dataType.type")?;
        let specs = dt.get("specs").unwrap_or(&Value::Null);
        let num = |k: &str, d: f64| specs.get(k).and_then(number).unwrap_or(d);
        Ok(match ty {
            "int" => Self::Int {
                min: num("min", -1000.0) as i64,
                max: num("max", 1000.0) as i64,
            },
            "float" => Self::Float {
                min: num("min", -1000.0),
                max: num("max", 1000.0),
            },
            "double" => Self::Double {
                min: num("min", -1000.0),
                max: num("max", 1000.0),
            },
            "bool" => Self::Bool,
            "enum" => {
                let keys: Vec<i64> = specs
                    .as_object()
                    .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
                    .unwrap_or_default();
                if keys.is_empty() {
                    bail!("enum without keys");
                }
                Self::Enum(keys)
            }
            "text" => Self::Text {
                length: num("length", 32.0) as usize,
            },
            "date" => Self::Date,
            "array" => Self::Array {
                size: num("size", 4.0) as usize,
                item: Box::new(Self::from_data_type(
                    specs.get("item").context("array without item")?,
                )?),
            },
            "struct" => {
                let mut members = Vec::new();
                for m in specs.as_array().context("struct specs not an array")? {
                    members.push((
                        ident(m)?,
                        Self::from_data_type(m.get("dataType").context("no dataType")?)?,
                    ));
                }
                Self::Struct(members)
            }
            other => bail!("unknown type {other:?}"),
        })
    }

    /// The type name on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Int { .. } => "int",
            Self::Float { .. } => "float",
            Self::Double { .. } => "double",
            Self::Bool => "bool",
            Self::Enum(_) => "enum",
            Self::Text { .. } => "text",
            Self::Date => "date",
            Self::Array { .. } => "array",
            Self::Struct(_) => "struct",
        }
    }

    /// Scalars compare as one value; arrays and structs are not used to check set-then-get.
    pub fn is_scalar(&self) -> bool {
        !matches!(self, Self::Array { .. } | Self::Struct(_))
    }

    /// A random value within the spec.
    pub fn generate(&self, rng: &mut fastrand::Rng) -> Value {
        match self {
            Self::Int { min, max } => json!(rng.i64(*min..=(*max).max(*min))),
            Self::Float { min, max } | Self::Double { min, max } => {
                // Two decimals, inside the range after rounding.
                let lo = (min * 100.0).ceil() as i64;
                let hi = ((max * 100.0).floor() as i64).max(lo);
                json!(rng.i64(lo..=hi) as f64 / 100.0)
            }
            Self::Bool => json!(rng.u8(0..2)),
            Self::Enum(keys) => json!(keys[rng.usize(..keys.len())]),
            Self::Text { length } => {
                let n = (*length).min(12);
                json!((0..n).map(|_| rng.alphanumeric()).collect::<String>())
            }
            Self::Date => json!((1_700_000_000_000_u64 + rng.u64(..100_000_000_000)).to_string()),
            Self::Array { size, item } => {
                let n = rng.usize(0..=(*size).min(8));
                Value::Array((0..n).map(|_| item.generate(rng)).collect())
            }
            Self::Struct(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, s)| (k.clone(), s.generate(rng)))
                    .collect::<Map<_, _>>(),
            ),
        }
    }
}

/// Demo thing models compiled in, by productKey.
const BUILTIN: [(&str, &str); 3] = [
    (
        "a1ThermoPK0",
        include_str!("../../src/registry/demo/thermostat.json"),
    ),
    (
        "a1LightPK00",
        include_str!("../../src/registry/demo/light.json"),
    ),
    (
        "a1ExportPK0",
        include_str!("../../src/registry/demo/export_builtins.json"),
    ),
];

fn array<'a>(doc: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    doc.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn ident(v: &Value) -> anyhow::Result<String> {
    Ok(v.get("identifier")
        .and_then(Value::as_str)
        .context("entry without identifier")?
        .to_owned())
}

fn params(v: &Value, key: &str) -> anyhow::Result<Vec<(String, Spec)>> {
    let mut out = Vec::new();
    for p in array(v, key) {
        // The built-in `get` service lists identifier strings; those are skipped above, but be
        // lenient with any other non-object entry too.
        if !p.is_object() {
            continue;
        }
        let dt = p.get("dataType").context("parameter without dataType")?;
        out.push((ident(p)?, Spec::from_data_type(dt)?));
    }
    Ok(out)
}

/// Spec values are strings in exported TSLs ("5") and sometimes numbers.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_models_load() {
        for (pk, _) in BUILTIN {
            let m = Model::builtin(pk).expect("known").expect("loads");
            assert_eq!(m.product_key, pk);
            assert!(!m.properties.is_empty());
            assert!(m.events.iter().all(|e| e.id != "post"));
            assert!(m.services.iter().all(|s| s.id != "set" && s.id != "get"));
        }
        let t = Model::builtin("a1ThermoPK0")
            .expect("thermostat")
            .expect("loads");
        assert_eq!(
            t.property("setpoint").map(|p| &p.spec),
            Some(&Spec::Float {
                min: 5.0,
                max: 35.0
            })
        );
        assert!(!t.property("roomTemp").expect("roomTemp").writable);
        assert_eq!(
            t.service("reboot").expect("reboot").outputs[0].0,
            "accepted"
        );
        assert!(Model::builtin("nope").is_none());
    }

    #[test]
    fn generated_values_are_in_range() {
        let t = Model::builtin("a1ThermoPK0")
            .expect("thermostat")
            .expect("loads");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            for p in &t.properties {
                let v = p.spec.generate(&mut rng);
                match &p.spec {
                    Spec::Float { min, max } | Spec::Double { min, max } => {
                        let x = v.as_f64().expect("number");
                        assert!(*min <= x && x <= *max, "{} {x}", p.id);
                    }
                    Spec::Bool => assert!(v == json!(0) || v == json!(1)),
                    Spec::Enum(keys) => assert!(keys.contains(&v.as_i64().expect("int"))),
                    Spec::Text { length } => {
                        assert!(v.as_str().expect("str").len() <= *length)
                    }
                    Spec::Date => {
                        assert!(v.as_str().expect("str").bytes().all(|b| b.is_ascii_digit()))
                    }
                    Spec::Array { size, .. } => {
                        assert!(v.as_array().expect("array").len() <= *size)
                    }
                    Spec::Struct(_) => {
                        let o = v.as_object().expect("object");
                        for k in ["lo", "hi"] {
                            let x = o[k].as_i64().expect("int");
                            assert!((0..=50).contains(&x));
                        }
                    }
                    Spec::Int { min, max } => {
                        let x = v.as_i64().expect("int");
                        assert!(*min <= x && x <= *max);
                    }
                }
            }
        }
    }

    #[test]
    fn bad_tsl_is_an_error() {
        assert!(Model::from_json(b"{").is_err());
        assert!(Model::from_json(br#"{"profile":{}}"#).is_err());
        let unknown = br#"{"profile":{"productKey":"p"},"properties":[
            {"identifier":"x","accessMode":"rw","dataType":{"type":"complex"}}]}"#;
        assert!(format!("{:#}", Model::from_json(unknown).expect_err("bad")).contains("complex"));
    }
}
