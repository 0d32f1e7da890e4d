//! An echo endpoint on [`Conn`]: every message goes back with its own opcode. It exists to run
//! the Autobahn|Testsuite fuzzing client against the `ws` module and the real drivers (`ringlink
//! serve --echo`), and is not part of the gateway's protocol.

use crate::ws::encode::write_frame;
use crate::ws::frame::Opcode;
use crate::ws::{Conn, Event, Limits, MAX_QUEUED_BYTES};

/// A server connection that echoes. Sans-IO, like [`Conn`].
#[derive(Debug)]
pub struct Echo {
    conn: Conn,
    tx: Vec<u8>,
    failed: bool,
}

impl Echo {
    pub fn new(limits: Limits) -> Self {
        Self {
            conn: Conn::server(limits),
            tx: Vec::new(),
            failed: false,
        }
    }

    /// Handles received bytes; returns how many were consumed (see [`Conn::read`]).
    pub fn handle_input(&mut self, input: &mut [u8]) -> usize {
        let mut consumed = 0;
        while !self.is_closed() {
            let Ok(event) = self.conn.read(&mut input[consumed..], &mut self.tx) else {
                // The close frame or HTTP error is already in `tx`.
                self.failed = true;
                break;
            };
            consumed += match event {
                Event::NeedMore => break,
                Event::Consumed(n)
                | Event::Pong { consumed: n }
                | Event::Closed { consumed: n, .. } => n,
                Event::Message {
                    consumed,
                    binary,
                    data,
                } => {
                    // A server frame has no mask, so the free encoder can write while `data`
                    // still borrows the Conn.
                    let opcode = if binary { Opcode::Binary } else { Opcode::Text };
                    write_frame(&mut self.tx, opcode, true, None, data);
                    consumed
                }
            };
        }
        consumed
    }

    /// Moves the bytes to send into `out`; false when there are none.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.tx.is_empty() {
            return false;
        }
        out.append(&mut self.tx);
        true
    }

    pub fn has_transmit(&self) -> bool {
        !self.tx.is_empty()
    }

    /// False while [`MAX_QUEUED_BYTES`] bytes wait to be sent: the driver stops reading
    /// until they are written, so a peer that sends without reading cannot pin memory.
    pub fn wants_input(&self) -> bool {
        self.tx.len() < MAX_QUEUED_BYTES
    }

    pub fn is_closed(&self) -> bool {
        self.failed || self.conn.is_closed()
    }

    pub fn wanted_bytes(&self) -> usize {
        self.conn.wanted_bytes()
    }

    /// Starts the close handshake (1001, shutdown).
    pub fn shutdown(&mut self) {
        if self.conn.is_open() {
            self.conn.close(&mut self.tx, 1001, "going away");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake;

    #[test]
    fn echoes_text_and_binary_with_their_opcodes() {
        let mut echo = Echo::new(Limits::default());
        let mut client = Conn::client(Limits::default());
        let mut input = Vec::new();
        handshake::write_request(&mut input, "h", "/", "dGhlIHNhbXBsZSBub25jZQ==", None);
        let hs = input.len();
        client.send_text(&mut input, "héllo".as_bytes());
        client.send_binary(&mut input, &[0, 1, 2]);
        assert_eq!(echo.handle_input(&mut input), input.len());
        let mut out = Vec::new();
        assert!(echo.poll_transmit(&mut out));
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("101 head")
            + 4;
        let mut frames = out.split_off(head_end);
        let mut control = Vec::new();
        let mut got = Vec::new();
        while let Ok(Event::Message {
            consumed,
            binary,
            data,
        }) = client.read(&mut frames, &mut control)
        {
            got.push((binary, data.to_vec()));
            frames.drain(..consumed);
        }
        assert!(hs > 0);
        assert_eq!(
            got,
            vec![(false, "héllo".as_bytes().to_vec()), (true, vec![0, 1, 2])]
        );
    }
}
