//! ringlink: a WebSocket device gateway for Link IoT Edge.
//!
//! Module map (see `README.md` for the architecture):
//!
//! - [`ws`]: RFC 6455 server and client framing. Sans-IO.
//! - [`protocol`]: the Link IoT Edge JSON codec (requests, replies, codes). Sans-IO.
//! - [`model`]: thing models (TSL): loading and value validation. Sans-IO.
//! - [`registry`]: the known products and devices.
//! - [`session`]: the per-connection state machine tying the above together. Sans-IO.
//! - [`uplink`]: record encoding, the batcher (sans-IO), the local log (one partition per shard).
//! - [`shard`]: one thread per core running a driver (io_uring or epoll) over sessions; the
//!   only place with sockets, and with the one crossing point between threads (`shard::mesh`).
//! - [`api`]: the northbound HTTP API; [`shadow`] and [`metrics`] are what it shows.
//! - [`config`]: the configuration: defaults, file, environment, flags, one validation.
//! - [`tls`]: the rustls server configuration from certificate and key files.
//!
//! Invariants that hold crate-wide:
//!
//! - Nothing in `ws`, `protocol`, `model` or `session` opens a socket or reads the clock; time is
//!   passed in as `now: Instant`, and bytes to send are returned to the caller.
//! - Input from a peer never panics: it becomes an error value, a Link error code or a close.

pub mod api;
pub mod config;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod shadow;
pub mod shard;
pub mod tls;
pub mod uplink;
pub mod ws;
