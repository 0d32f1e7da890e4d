//! An MQTT 3.1.1 client for the northbound broker (Mosquitto, EMQX): uplinks go out as QoS 1
//! publishes, downlinks come in through subscriptions.
//!
//! - [`codec`]: the packets of the subset the gateway speaks (CONNECT, CONNACK, PUBLISH QoS 0/1,
//!   PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT). Sans-IO.
//! - [`Client`]: the session state machine. Owns the QoS 1 in-flight window (packet ids and
//!   the caller's tags), which survives transports and is re-sent after every CONNACK, the
//!   remembered subscriptions and the keep-alive timers. Sans-IO, like the rest of the crate:
//!   bytes and `now: Instant` in, bytes, events and deadlines out.
//! - [`io`]: the tokio driver ([`io::Connection`]): dialling (TCP or TLS), reading, writing,
//!   timers and reconnect backoff around one [`Client`]. The only part with sockets.
//!
//! Never: threads, channels or spawned tasks; the caller owns the task that drives a
//! [`io::Connection`]. Nothing here reads the clock except [`io`].

pub mod codec;
pub mod io;

mod client;

pub use client::{Client, ClientError, Event, Options, PublishError, Stats};
pub use codec::{CodecError, QoS, ReturnCode};
pub use io::{BrokerUrl, Connection, Step};
