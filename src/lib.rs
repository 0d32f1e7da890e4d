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
//! - [`shard`]: one thread per core: a sans-IO shard core (`shard::core`: connections, routing,
//!   group commit) under a driver (a hand-written io_uring loop, or epoll); the drivers are the
//!   only place with sockets, and `shard::mesh` the one crossing point between threads.
//! - [`api`]: the northbound HTTP API; [`shadow`] and [`metrics`] are what it shows.
//! - [`limits`]: message rate, accept pacing, connections per IP, flapping. Sans-IO.
//! - [`config`]: the configuration: defaults, file, environment, flags, one validation.
//! - [`logging`]: the `tracing` subscriber (filter, text or JSON) and the rate limit of
//!   repeated warnings.
//! - [`tls`]: the rustls server configuration from certificate and key files.
//! - [`mqtt`]: an MQTT 3.1.1 client: a sans-IO codec and client state machine, and a small
//!   tokio driver (the one place in it with sockets) for the forwarder, loadgen and tests.
//!
//! Invariants that hold crate-wide:
//!
//! - Nothing in `ws`, `protocol`, `model`, `session` or `shard::core` opens a socket or a file,
//!   holds a channel, or reads the clock; time is passed in as `now: Instant`, and bytes
//!   to send and actions to perform are returned to the caller.
//! - Input from a peer never panics: it becomes an error value, a Link error code or a close.

pub mod alink;
pub mod api;
pub mod config;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod shadow;
pub mod shard;
pub mod sink;
pub mod tls;
pub mod uplink;
pub mod worker;
pub mod ws;
