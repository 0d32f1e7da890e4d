//! An MQTT 3.1.1 client for the northbound broker (Mosquitto, EMQX).
//!
//! Owns: the packet codec ([`codec`]).
//! Never: anything else yet.

pub mod codec;
