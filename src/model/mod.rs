//! Thing models (TSL): loading Alibaba TSL JSON and validating values against it. Sans-IO.

mod kind;

pub use kind::DataKind;

/// A JSON value borrowed from a decoded message (simd-json tape).
pub type Json<'t, 'i> = simd_json::tape::Value<'t, 'i>;
