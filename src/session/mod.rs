//! The per-connection state machine. Sans-IO.
