//! ringlink: a WebSocket device gateway for Link IoT Edge.
//!
//! Module map (see `README.md` for the architecture):
//!
//! - [`ws`]: RFC 6455 server and client framing. Sans-IO.
//! - [`protocol`]: the Link IoT Edge JSON codec (requests, replies, codes). Sans-IO.
//! - [`model`]: thing models (TSL): loading and value validation. Sans-IO.
//! - [`registry`]: the known products and devices.
//! - [`session`]: the per-connection state machine tying the above together. Sans-IO.
//! - [`config`]: the configuration: defaults, file, environment, flags, one validation.
//! - [`tls`]: the rustls server configuration from certificate and key files.
//!
//! Invariants that hold crate-wide:
//!
//! - Nothing in `ws`, `protocol`, `model` or `session` opens a socket or reads the clock; time is
//!   passed in as `now: Instant`, and bytes to send are returned to the caller.
//! - Input from a peer never panics: it becomes an error value, a Link error code or a close.

pub mod config;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod tls;
pub mod ws;
