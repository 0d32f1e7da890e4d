//! An MQTT 3.1.1 client for the northbound broker (Mosquitto, EMQX).
//!
//! Owns: the packet codec ([`codec`]) and the sans-IO client state machine ([`Client`]).
//! Never: anything else yet.

pub mod codec;

mod client;

pub use client::{Client, ClientError, Event, Options, PublishError, Stats};
pub use codec::{CodecError, QoS, ReturnCode};
