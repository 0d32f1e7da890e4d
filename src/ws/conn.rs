//! The per-connection WebSocket state machine.
//!
//! Owns the handshake state, fragment reassembly, incremental UTF-8 validation of TEXT, the
//! message size limit and the close handshake. No IO, no clock: it reads from a caller's buffer
//! and appends what must be sent to a caller's transmit buffer.
//!
//! ```text
//!  Handshake --101 written--> Open --close() sent--> CloseSent --peer Close--> Closed
//!   (server only)              |  \                                            ^
//!       |                      |   `--peer Close (echoed) ---------------------|
//!       `--HTTP 4xx written----+--error (close frame written) -----------------'
//! ```
//!
//! Always: `0 <= consumed <= input.len()`; `Event::NeedMore` consumes nothing; the reassembly
//! buffer holds at most `max_message_bytes` of payload and is empty (no allocation) unless a
//! fragmented message is being received or was just delivered.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::ws::encode;
use crate::ws::error::{CloseCode, ProtocolViolation, WsError};
use crate::ws::frame::{apply_mask, parse_header, Opcode, MAX_HEADER_LEN};
use crate::ws::handshake;
use crate::ws::Limits;

/// Which end of the connection this is. It decides masking, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts the handshake, expects masked frames, sends unmasked ones.
    Server,
    /// Has done its own handshake, expects unmasked frames, masks what it sends.
    Client,
}

/// What one call to [`Conn::read`] found at the front of its input.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Bytes consumed with nothing for the caller: handshake completed (101 written to tx), a
    /// control frame handled (Ping -> Pong written to tx), a non-final fragment buffered, a data
    /// frame ignored because the close handshake has started.
    Consumed(usize),
    /// A complete data message (TEXT or BINARY, reassembled if fragmented; TEXT is valid UTF-8).
    /// `data` points into `input` for an unfragmented frame (unmasked in place) or into the
    /// Conn's reassembly buffer for a fragmented one.
    Message {
        /// Bytes of input to remove.
        consumed: usize,
        /// BINARY (true) or TEXT (false).
        binary: bool,
        /// The message payload, unmasked.
        data: &'a mut [u8],
    },
    /// A Pong arrived (the session uses it for its keepalive timer).
    Pong {
        /// Bytes of input to remove.
        consumed: usize,
    },
    /// The peer sent Close; the echoed Close has been written to tx (unless we had sent ours
    /// first); the conn is now closed.
    Closed {
        /// Bytes of input to remove.
        consumed: usize,
        /// The peer's status code, `None` for an empty Close.
        code: Option<u16>,
    },
    /// `input` holds no complete frame (or handshake) yet; nothing consumed.
    NeedMore,
}

/// One WebSocket connection, sans-IO.
///
/// Call order for a driver:
///
/// 1. Create it with [`Conn::server`] (starts in the handshake) or [`Conn::client`] (already
///    open, after the caller's own handshake, see `handshake::write_request`).
/// 2. After each socket read, call [`Conn::read`] on the unconsumed bytes, remove `consumed`
///    bytes from the front, and repeat until `Event::NeedMore`. Grow the read buffer to
///    [`Conn::wanted_bytes`] if it is smaller, shrink it back afterwards.
/// 3. Write out `tx` whenever it is not empty. On `Err` or once [`Conn::is_closed`], flush `tx`
///    and hang up.
/// 4. Send with [`Conn::send_text`], [`Conn::send_text_with`], [`Conn::send_binary`],
///    [`Conn::send_ping`]; start a close with [`Conn::close`].
///
/// An `Event::Message` borrows the Conn; to reply while holding its `data`, use the free
/// functions in [`crate::ws::encode`] (a server sends unmasked frames, so it needs no Conn).
///
/// A fragmented message is reassembled in a buffer that is allocated when its first fragment
/// arrives and freed on the next `read` after the message was handed out, so an idle Conn
/// owns no heap memory.
#[derive(Debug)]
pub struct Conn {
    limits: Limits,
    /// Payload of the fragmented message in progress (or just delivered).
    reassembly: Vec<u8>,
    /// `reassembly[..utf8_checked]` is known valid UTF-8 (TEXT only); the rest is at most an
    /// incomplete character.
    utf8_checked: usize,
    /// Payload bytes of the incomplete TEXT frame at the front of the input already known to
    /// be valid UTF-8 (a fail-fast hint only; complete frames are validated in full).
    partial_checked: usize,
    /// What the caller's read buffer should hold to make progress.
    wanted: usize,
    role: Role,
    state: State,
    fragment: Fragment,
    /// The reassembly buffer was handed out in an `Event::Message`; free it on the next read.
    delivered: bool,
    /// The code of the Close frame this side sent (by `close` or on an error), if any.
    close_sent: Option<u16>,
}

impl Conn {
    /// A server connection, waiting for the opening handshake.
    pub fn server(limits: Limits) -> Self {
        Self::new(limits, Role::Server, State::Handshake)
    }

    /// A client connection whose handshake the caller has already done: open, masks what it
    /// sends, expects unmasked frames.
    pub fn client(limits: Limits) -> Self {
        Self::new(limits, Role::Client, State::Open)
    }

    fn new(limits: Limits, role: Role, state: State) -> Self {
        let mut conn = Self {
            limits,
            reassembly: Vec::new(),
            utf8_checked: 0,
            partial_checked: 0,
            wanted: 0,
            role,
            state,
            fragment: Fragment::None,
            delivered: false,
            close_sent: None,
        };
        conn.wanted = conn.idle_wanted();
        conn
    }

    /// Parses at most one step from the front of `input`. The caller removes `consumed` bytes
    /// from its buffer and calls again until `NeedMore`. Anything the protocol obliges us to
    /// send (101 response, Pong, echoed Close, error Close, HTTP 400/426/431) is appended to
    /// `tx`. Payloads are unmasked in place in `input`.
    ///
    /// On `Err` the matching close frame (1002 protocol, 1007 bad UTF-8, 1009 too big) or HTTP
    /// error response has already been appended to `tx` and the conn is closed; the caller
    /// flushes `tx` and hangs up. Once closed, any further input is consumed and ignored.
    pub fn read<'a>(
        &'a mut self,
        input: &'a mut [u8],
        tx: &mut Vec<u8>,
    ) -> Result<Event<'a>, WsError> {
        if self.delivered {
            // Release, not clear: a large message must not stay pinned to an idle connection.
            self.reassembly = Vec::new();
            self.delivered = false;
        }
        let step = match self.state {
            State::Handshake => self.step_handshake(input, tx),
            State::Open | State::CloseSent => self.step_frame(input, tx),
            State::Closed if input.is_empty() => Ok(Step::NeedMore),
            State::Closed => Ok(Step::Consumed(input.len())),
        };
        let step = match step {
            Ok(step) => step,
            Err(e) => {
                self.fail(&e, tx);
                return Err(e);
            }
        };
        Ok(match step {
            Step::NeedMore => Event::NeedMore,
            Step::Consumed(n) => Event::Consumed(n),
            Step::Frame {
                consumed,
                binary,
                start,
            } => Event::Message {
                consumed,
                binary,
                data: &mut input[start..consumed],
            },
            Step::Reassembled { consumed, binary } => Event::Message {
                consumed,
                binary,
                data: &mut self.reassembly[..],
            },
            Step::Pong(consumed) => Event::Pong { consumed },
            Step::Closed { consumed, code } => Event::Closed { consumed, code },
        })
    }

    /// Handshake done and no Close sent or received.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Close sent or received, or an error: the caller flushes `tx` and stops reading. (A
    /// caller that wants to wait for the peer's Close after [`Conn::close`] may keep calling
    /// `read`; it reports `Event::Closed` when the Close arrives.)
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::CloseSent | State::Closed)
    }

    /// Server or client.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Appends one TEXT frame with `payload` to `tx` (masked for the client role). Does
    /// nothing unless the conn is open: "The endpoint MUST NOT send any more data frames after
    /// sending a Close frame." (RFC 6455 5.5.1)
    pub fn send_text(&mut self, tx: &mut Vec<u8>, payload: &[u8]) {
        if self.is_open() {
            encode::write_frame(tx, Opcode::Text, true, self.mask(), payload);
        }
    }

    /// Appends one BINARY frame with `payload` to `tx` (masked for the client role), if open.
    pub fn send_binary(&mut self, tx: &mut Vec<u8>, payload: &[u8]) {
        if self.is_open() {
            encode::write_frame(tx, Opcode::Binary, true, self.mask(), payload);
        }
    }

    /// Appends a TEXT frame whose payload `f` writes straight into `tx` (no extra copy of the
    /// payload beyond one small memmove to place a long header); masks for the client role.
    /// `f` is not called unless the conn is open.
    pub fn send_text_with(&mut self, tx: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) {
        if self.is_open() {
            encode::write_frame_with(tx, Opcode::Text, self.mask(), f);
        }
    }

    /// Appends a Ping (payload cut to 125 bytes), if open.
    pub fn send_ping(&mut self, tx: &mut Vec<u8>, payload: &[u8]) {
        if self.is_open() {
            encode::write_ping(tx, self.mask(), payload);
        }
    }

    /// Starts the close handshake (e.g. 1001 on shutdown): writes Close, the conn then only
    /// waits for the peer's Close. Before the handshake completed it just marks the conn
    /// closed; after a Close it does nothing.
    pub fn close(&mut self, tx: &mut Vec<u8>, code: u16, reason: &str) {
        match self.state {
            State::Handshake => self.state = State::Closed,
            State::Open => {
                encode::write_close(tx, self.mask(), code, reason);
                self.close_sent = Some(code);
                self.state = State::CloseSent;
            }
            State::CloseSent | State::Closed => {}
        }
    }

    /// The code of the Close frame this side sent, if it sent one: by [`Conn::close`], or
    /// because the peer broke the protocol (the peer's own Close is answered with its code).
    pub fn close_sent(&self) -> Option<u16> {
        self.close_sent
    }

    /// Whether a fragmented data message is in progress: its first fragment arrived, its final
    /// one has not.
    pub fn in_message(&self) -> bool {
        self.fragment != Fragment::None
    }

    /// How many bytes the caller's read buffer should be able to hold to make progress: the
    /// whole frame being received once its header is known (at most `max_message_bytes` plus a
    /// header), otherwise a header or a typical handshake.
    pub fn wanted_bytes(&self) -> usize {
        self.wanted
    }

    fn step_handshake(&mut self, input: &[u8], tx: &mut Vec<u8>) -> Result<Step, WsError> {
        let max = self.limits.max_handshake_bytes;
        match handshake::parse_request(input, max)? {
            None => {
                self.wanted = (input.len() + HANDSHAKE_WANTED).min(max);
                Ok(Step::NeedMore)
            }
            Some((request, n)) => {
                handshake::write_accept(tx, request.key, request.protocol());
                self.state = State::Open;
                self.wanted = self.idle_wanted();
                Ok(Step::Consumed(n))
            }
        }
    }

    fn step_frame(&mut self, input: &mut [u8], tx: &mut Vec<u8>) -> Result<Step, WsError> {
        let Some(header) = parse_header(input)? else {
            self.wanted = MAX_HEADER_LEN;
            return Ok(Step::NeedMore);
        };
        match (self.role, header.mask) {
            // "The server MUST close the connection upon receiving a frame that is not masked."
            // (5.1)
            (Role::Server, None) => return Err(ProtocolViolation::UnmaskedFrameFromClient.into()),
            // "A client MUST close a connection if it detects a masked frame." (5.1)
            (Role::Client, Some(_)) => return Err(ProtocolViolation::MaskedFrameFromServer.into()),
            _ => {}
        }
        match (header.opcode, self.fragment) {
            // "A fragmented message consists of a single frame with the FIN bit clear and an
            // opcode other than 0, followed by zero or more frames with the FIN bit clear and
            // the opcode set to 0" (5.4): a continuation needs a message to continue...
            (Opcode::Continuation, Fragment::None) => {
                return Err(ProtocolViolation::ContinuationWithoutStart.into())
            }
            // ...and "the fragments of one message MUST NOT be interleaved between the
            // fragments of another message" (5.4).
            (Opcode::Text | Opcode::Binary, Fragment::Text | Fragment::Binary) => {
                return Err(ProtocolViolation::DataFrameInsideFragmentedMessage.into())
            }
            _ => {}
        }

        let limit = self.limits.max_message_bytes;
        if !header.opcode.is_control() {
            // Checked on the declared length, before any payload is waited for or buffered:
            // "an endpoint MAY use [1009] when it has received a message that is too big for
            // it to process" (7.4.1).
            let size = (self.reassembly.len() as u64).saturating_add(header.payload_len);
            if size > limit as u64 {
                return Err(WsError::Capacity {
                    size,
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                });
            }
        }
        // Control payloads are <= 125 (checked by parse_header) and data payloads <= limit
        // (checked above), so the frame length fits in usize.
        let total = header.len + header.payload_len as usize;
        if input.len() < total {
            self.wanted = total;
            let text = header.opcode == Opcode::Text
                || (header.opcode == Opcode::Continuation && self.fragment == Fragment::Text);
            if text {
                self.check_partial_utf8(&input[header.len..], header.mask)?;
            }
            return Ok(Step::NeedMore);
        }
        self.wanted = self.idle_wanted();
        self.partial_checked = 0;
        let start = header.len;
        let payload = &mut input[start..total];
        if let Some(mask) = header.mask {
            apply_mask(payload, mask);
        }
        let closing = self.state == State::CloseSent;

        match header.opcode {
            Opcode::Text | Opcode::Binary if header.fin => {
                let binary = header.opcode == Opcode::Binary;
                // "When an endpoint is to interpret a byte stream as UTF-8 but finds that the
                // byte stream is not, in fact, a valid UTF-8 stream, that endpoint MUST _Fail
                // the WebSocket Connection_." (8.1)
                if !binary && std::str::from_utf8(payload).is_err() {
                    return Err(WsError::InvalidUtf8);
                }
                if closing {
                    // "The endpoint MUST NOT send any more data frames after sending a Close
                    // frame." (5.5.1) Its peer may still, and we have nothing to answer.
                    return Ok(Step::Consumed(total));
                }
                Ok(Step::Frame {
                    consumed: total,
                    binary,
                    start,
                })
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if header.opcode != Opcode::Continuation {
                    self.fragment = if header.opcode == Opcode::Binary {
                        Fragment::Binary
                    } else {
                        Fragment::Text
                    };
                    self.utf8_checked = 0;
                }
                self.reassembly.extend_from_slice(payload);
                if self.fragment == Fragment::Text {
                    self.check_utf8(header.fin)?;
                }
                if !header.fin {
                    return Ok(Step::Consumed(total));
                }
                let binary = self.fragment == Fragment::Binary;
                self.fragment = Fragment::None;
                self.delivered = true;
                if closing {
                    return Ok(Step::Consumed(total));
                }
                Ok(Step::Reassembled {
                    consumed: total,
                    binary,
                })
            }
            Opcode::Ping => {
                // "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in response,
                // unless it already received a Close frame." (5.5.2) After sending our Close we
                // send nothing more either.
                if !closing {
                    let mask = self.mask();
                    encode::write_frame(tx, Opcode::Pong, true, mask, payload);
                }
                Ok(Step::Consumed(total))
            }
            Opcode::Pong => Ok(Step::Pong(total)),
            Opcode::Close => {
                let code = match *payload {
                    [] => None,
                    // "If there is a body, the first two bytes of the body MUST be a 2-byte
                    // unsigned integer [...] representing a status code" (5.5.1)
                    [_] => return Err(ProtocolViolation::CloseFrameTooShort.into()),
                    [hi, lo, ref reason @ ..] => {
                        let code = u16::from_be_bytes([hi, lo]);
                        // Status codes 1004-1006, 1015, unassigned ones below 3000 and those
                        // from 5000 up are not to be sent on the wire (7.4.1, 7.4.2).
                        if !CloseCode::is_sendable(code) {
                            return Err(ProtocolViolation::InvalidCloseCode(code).into());
                        }
                        // "the body [...] MAY contain UTF-8-encoded data" (5.5.1); 8.1 applies.
                        if std::str::from_utf8(reason).is_err() {
                            return Err(WsError::InvalidUtf8);
                        }
                        Some(code)
                    }
                };
                // "If an endpoint receives a Close frame and did not previously send a Close
                // frame, the endpoint MUST send a Close frame in response. [...] it typically
                // echos the status code it received." (5.5.1)
                if !closing {
                    let mask = self.mask();
                    match code {
                        Some(code) => encode::write_close(tx, mask, code, ""),
                        None => encode::write_frame(tx, Opcode::Close, true, mask, &[]),
                    }
                }
                self.shut();
                Ok(Step::Closed {
                    consumed: total,
                    code,
                })
            }
        }
    }

    /// Validates what was appended to the reassembly buffer. A bad byte fails at once, before
    /// the rest of the message arrives; an incomplete character at the end waits for the next
    /// fragment unless this was the last one.
    fn check_utf8(&mut self, fin: bool) -> Result<(), WsError> {
        let rest = &self.reassembly[self.utf8_checked..];
        match std::str::from_utf8(rest) {
            Ok(_) => self.utf8_checked = self.reassembly.len(),
            Err(e) if e.error_len().is_none() && !fin => self.utf8_checked += e.valid_up_to(),
            Err(_) => return Err(WsError::InvalidUtf8),
        }
        Ok(())
    }

    /// Fails a TEXT frame whose payload has only partly arrived as soon as the part that did
    /// arrive is not UTF-8, instead of waiting for the whole frame. `available` is the payload
    /// present so far (still masked); `partial_checked` remembers how far earlier calls got so
    /// that a frame trickling in is scanned once. Unmasks into a stack copy: the input must
    /// stay untouched because nothing is consumed.
    fn check_partial_utf8(
        &mut self,
        available: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Result<(), WsError> {
        // The incomplete character a previous fragment ended with, at most 3 bytes.
        let carry: &[u8] = if self.fragment == Fragment::Text {
            &self.reassembly[self.utf8_checked..]
        } else {
            &[]
        };
        let mut pos = self.partial_checked;
        let mut scratch = [0_u8; 256];
        while pos < available.len() {
            let carried = if pos == 0 { carry.len() } else { 0 };
            scratch[..carried].copy_from_slice(&carry[..carried]);
            let n = (available.len() - pos).min(scratch.len() - carried);
            let chunk = &mut scratch[carried..carried + n];
            chunk.copy_from_slice(&available[pos..pos + n]);
            if let Some(mask) = mask {
                // Masking restarts at payload offset `pos`: rotate the key to line up.
                let m = [0, 1, 2, 3].map(|i| mask[(pos + i) % 4]);
                apply_mask(chunk, m);
            }
            let next = match std::str::from_utf8(&scratch[..carried + n]) {
                Ok(_) => pos + n,
                Err(e) if e.error_len().is_some() => return Err(WsError::InvalidUtf8),
                // An incomplete character at the end of this chunk: resume at its start.
                Err(e) => (pos + e.valid_up_to()).saturating_sub(carried).max(pos),
            };
            if next == pos {
                break;
            }
            pos = next;
        }
        self.partial_checked = pos;
        Ok(())
    }

    /// Queues what the peer must be told about `err` and closes.
    fn fail(&mut self, err: &WsError, tx: &mut Vec<u8>) {
        match (self.state, err) {
            (State::Handshake, WsError::Handshake(h)) => handshake::write_reject(tx, h),
            (State::Open, _) => {
                if let Some(code) = err.close_code() {
                    encode::write_close(tx, self.mask(), code.into(), err.as_str());
                    self.close_sent = Some(code.into());
                }
            }
            _ => {}
        }
        self.shut();
    }

    fn shut(&mut self) {
        self.state = State::Closed;
        self.fragment = Fragment::None;
        self.reassembly = Vec::new();
        self.delivered = false;
        self.partial_checked = 0;
        self.wanted = MAX_HEADER_LEN;
    }

    fn idle_wanted(&self) -> usize {
        match self.state {
            State::Handshake => HANDSHAKE_WANTED.min(self.limits.max_handshake_bytes),
            _ => MAX_HEADER_LEN,
        }
    }

    /// A fresh masking key for the client role, `None` for the server.
    ///
    /// "The masking key needs to be unpredictable" (10.3): each `RandomState` carries its own
    /// keys, seeded from the OS per thread, so hashing a constant with a new one gives an
    /// unpredictable value without keeping RNG state in every Conn.
    fn mask(&self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                let bits = RandomState::new().hash_one(0_u8);
                Some((bits as u32).to_ne_bytes())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    CloseSent,
    Closed,
}

/// The kind of the fragmented message in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    None,
    Text,
    Binary,
}

/// What a step decided, without borrowing `self` or the input (see `Conn::read`).
enum Step {
    NeedMore,
    Consumed(usize),
    Frame {
        consumed: usize,
        binary: bool,
        start: usize,
    },
    Reassembled {
        consumed: usize,
        binary: bool,
    },
    Pong(usize),
    Closed {
        consumed: usize,
        code: Option<u16>,
    },
}

/// Read buffer size hinted before and during the handshake; real requests are a few hundred
/// bytes.
const HANDSHAKE_WANTED: usize = 1024;

#[cfg(test)]
mod tests;
