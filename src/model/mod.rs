//! Thing models (TSL): loading Alibaba TSL JSON and validating values against it. Sans-IO.

mod kind;

pub use kind::DataKind;
