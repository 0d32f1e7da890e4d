//! loadgen as a library: the pieces behind the `loadgen` command, public so that tests (and
//! other tools) can drive them.
//!
//! - [`profile`]: the TOML load profile, defaults and validation.
//! - [`model`]: just enough of a thing model to make up valid values.
//! - [`device`]: the device simulator (reports, answers to get/set/call). Sans-IO.
//! - [`schedule`]: open-loop intended send times. Sans-IO.
//! - [`pace`]: waking senders at those times, by tokio timer or precisely (spinning).
//! - [`conn`]: one client connection's life over tokio (TCP, TLS, WebSocket, Link).
//! - [`mqtt`]: end-to-end latency through the server's MQTT sink (subscriber, matching).
//! - [`downlink`]: downlinks through the server's HTTP API; [`http`] is its small client.
//! - [`run`]: one process's share of a run: threads, ramp, churn, progress.
//! - [`stats`]: histograms, counters, merging across processes, the summary and thresholds.
//! - [`series`]: the run second by second (counts, gauges, errors, per-second latency).
//! - [`report`]: HTML and SVG plots of a run; [`compare`]: two runs side by side.
//! - [`tls`]: the client TLS configuration (trust one file, no host name check).

pub mod compare;
pub mod conn;
pub mod device;
pub mod downlink;
pub mod http;
pub mod model;
pub mod mqtt;
pub mod pace;
pub mod profile;
pub mod report;
pub mod run;
pub mod schedule;
pub mod series;
pub mod stats;
pub mod tls;
