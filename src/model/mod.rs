//! Thing models (TSL): loading Alibaba TSL JSON and validating values against it. Sans-IO.
//!
//! Owns: the parsed form of one product's TSL ([`ThingModel`]), the lookup of properties, events
//! and services by identifier, the per-method checks of PROTOCOL.md sections 7, 8 and 11.4 that
//! map a value to a Link [`Code`](crate::protocol::Code), and the normalising writer that turns a
//! checked value back into compact JSON ([`DataType::write_value`]).
//!
//! Never: opens a socket, reads the clock or touches the registry. [`ThingModel::load`] is the one
//! function that reads a file; everything else works on bytes and on decoded values.
//!
//! Always holds:
//!
//! - Values are simd-json tape values ([`Json`]); checking one never allocates and never panics,
//!   whatever the value (also one that does not fit its type at all).
//! - A loaded model is valid by construction: identifiers are unique per list, spec numbers are
//!   parsed, struct members and array items have one of their allowed types, `size <= 512`.
//! - The console's built-ins (event `post`, services `set` and `get`) are skipped at load time, so
//!   [`ThingModel::event`] and [`ThingModel::service`] never return them.

mod error;
mod kind;
mod load;
mod thing;
mod value;

pub use error::{Invalid, ModelError, ModelErrorKind};
pub use kind::DataKind;
pub use thing::{Access, CallType, Event, EventLevel, Param, Property, Service, ThingModel};
pub use value::{out_of_range_number, write_json, DataType, ValueError, ValueStyle};

/// A JSON value as decoded by simd-json's zero-copy tape: `'t` is the tape, `'i` the input bytes.
pub type Json<'t, 'i> = simd_json::tape::Value<'t, 'i>;

#[cfg(test)]
mod test_support;
