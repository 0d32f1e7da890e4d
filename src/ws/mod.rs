//! RFC 6455 WebSocket framing, server and client side. Sans-IO.
