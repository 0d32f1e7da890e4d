//! The io_uring driver: one hand-written completion loop per shard over [`Ring`], the shard's
//! [`ShardCore`] and its log partition.
//!
//! Owns: the shard's ring (its sockets, provided receive buffers and ops in flight), each
//! connection's few driver bits ([`UringConn`]), and the commit being written.
//!
//! One turn of the loop:
//!
//! ```text
//!   ring.wait(core.poll_timeout())          one io_uring_enter: submits the last turn's sends,
//!                                           recv re-arms and log write, waits for completions
//!   for each completion:                    Data -> core.input (in place, in the ring's buffer)
//!                                           Sent / Closed / Released / Accepted / Written / Woken
//!   core.on_timer(now) when due
//!   core.end_turn(now)                      the turn's records become one commit
//!   act: every action of the core, every connection it flagged
//!                                           -> ring.send / shutdown / pause_recv / write_at
//! ```
//!
//! Nothing here blocks but `wait`, and nothing on a report's path leaves the thread: the log
//! write (and its fdatasync under `fsync = "batch"`) are ops on the same ring, and the devices
//! are answered in the turn that sees the write complete.
//!
//! Connection lifecycle, in ring terms: `Accepted` -> `core.accept` -> `ring.start` (multishot
//! recv armed; an idle connection holds no buffer). The session ends -> its last bytes are sent
//! -> `ring.shutdown`. The peer's end or a failed send -> `Closed` -> `ring.release`. `Released`
//! -> `core.disconnect` (devices offline) and the slot is free for the next connection: the
//! core's slot numbers are the ring's, so a slot is reused only after both are done with it.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::logging::RateLimit;
use crate::shard::core::{Action, Commit, ShardCore, ShardMsg};
use crate::shard::mesh::Reply;
use crate::shard::partition::ShardLog;
use crate::shard::ring::{Completion, Ring, RingConfig};
use crate::shard::{unix_ms, ShardRun};
use crate::uplink::{Prepared, UplinkError};

/// Provided receive buffers per shard, and their size. The kernel takes them in ring order, so
/// over time every one is touched and resident: 4 MiB per shard, whatever the connection
/// count (1024 of them cost 880 B per connection at 19,000 idle connections). A buffer is
/// lent only until the end of the turn that received it, so 256 cover a turn's reads.
const BUFFERS: u16 = 256;
const BUFFER_SIZE: u32 = 16 * 1024;
/// Send buffers kept for reuse per shard (an idle connection keeps none).
const SPARE_SENDS: usize = 64;
/// A bound on how long the loop sleeps with nothing due, so a drained shard re-checks.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Completes a frame cut by the end of a receive buffer: appends the start of `fresh` to
/// `cut` (the unconsumed end of the buffer before) in doubling steps, from [`FIRST_STEP`]
/// bytes, until `input` consumes past the end of `cut`. Returns `Some(i)` when it did: `cut`
/// is empty and `fresh[i..]` is what `input` has not seen as new bytes, to be parsed in place.
/// Returns `None` when all of `fresh` went into `cut` (a frame longer than what came, or
/// `input` stopped wanting more).
///
/// `input` is [`ShardCore::input`] with [`ShardCore::wants_input`] after it: bytes it did not
/// consume are presented again with more appended, as its contract asks. Appending the whole
/// buffer instead would copy every byte received while frames straddle buffers, which under
/// sustained load is every buffer.
fn complete_cut(
    cut: &mut Vec<u8>,
    fresh: &[u8],
    mut input: impl FnMut(&mut [u8]) -> (usize, bool),
) -> Option<usize> {
    let mut old = cut.len();
    let mut taken = 0;
    let mut step = FIRST_STEP;
    while taken < fresh.len() {
        let more = step.min(fresh.len() - taken);
        cut.extend_from_slice(&fresh[taken..taken + more]);
        taken += more;
        let (n, wants_more) = input(cut);
        let n = n.min(cut.len());
        if n >= old {
            cut.clear();
            return Some(n - old);
        }
        cut.drain(..n);
        old -= n;
        if !wants_more {
            break;
        }
        step = step.saturating_mul(2);
    }
    cut.extend_from_slice(&fresh[taken..]);
    None
}

/// The first step of [`complete_cut`]: most device frames are a few hundred bytes.
const FIRST_STEP: usize = 512;

/// The driver's bits of one connection.
#[derive(Debug, Default)]
pub(crate) struct UringConn {
    /// Bytes of a frame that arrived incomplete; none for an idle connection.
    // Boxed on purpose: 8 bytes in every connection's entry instead of 24, which keeps the
    // entry in a 384-byte allocation (`an_idle_connections_entry_fits_a_384_byte_allocation`);
    // only a connection with a partial frame pays the extra allocation.
    #[allow(clippy::box_collection)]
    leftover: Option<Box<Vec<u8>>>,
    /// Receiving is paused (backpressure).
    paused: bool,
    /// `ring.shutdown` was called.
    shut: bool,
    /// The peer's end was seen (`Closed`) and the slot is being released.
    released: bool,
}

/// Runs one shard on the io_uring driver until it has drained.
pub(crate) fn run(run: ShardRun) -> io::Result<()> {
    let core = run.core::<UringConn>();
    let ShardRun {
        id: _,
        log,
        shared,
        listener,
        inbox,
        read_buf_bytes: _,
        ready,
    } = run;
    let setup = || -> io::Result<Ring> {
        let mut ring = Ring::new(RingConfig {
            entries: 4096,
            buffers: BUFFERS,
            buffer_size: BUFFER_SIZE,
            accept_backoff: Duration::from_millis(100),
            accept_one_at_a_time: shared.env.admission.pacer.is_on(),
        })?;
        listener.set_nonblocking(true)?;
        ring.listen(listener);
        Ok(ring)
    };
    let ring = match setup() {
        Ok(ring) => ring,
        // The start fails with this error (see `Server::start`).
        Err(e) => return ready.send(Err(e)).map_err(io::Error::other),
    };
    let _ = ready.send(Ok(()));
    let waker = ring.waker();
    shared.mesh.on_send(core.id, Box::new(move || waker.wake()));
    let mut d = Driver {
        core,
        ring,
        log,
        shared,
        inbox,
        ready: Vec::new(),
        writing: None,
        spare_sends: Vec::new(),
        accept_warn: RateLimit::warnings(),
    };
    // Messages sent before the wake function was registered.
    d.drain_inbox(Instant::now());
    loop {
        let now = Instant::now();
        d.core.end_turn(now);
        d.act(now);
        if d.core.is_done() && d.writing.is_none() {
            return Ok(());
        }
        let deadline = d.core.poll_timeout().unwrap_or(now + IDLE_WAIT);
        if let Err(e) = d.ring.wait(Some(deadline)) {
            // `wait` already rides out the transient errors (EINTR, EAGAIN, EBUSY, ETIME):
            // what is left is about the ring as a whole, and the shard cannot go on.
            let stats = d.ring.stats();
            return Err(io::Error::new(
                e.kind(),
                format!("io_uring_enter: {e} (ring counters: {stats:?})"),
            ));
        }
        let now = Instant::now();
        d.core.set_wall_clock(now, unix_ms());
        while let Some(c) = d.ring.poll() {
            d.on_completion(c, now);
        }
        if d.core.poll_timeout().is_some_and(|t| t <= now) {
            d.core.on_timer(now);
        }
    }
}

struct Driver {
    core: ShardCore<UringConn, Reply>,
    ring: Ring,
    log: ShardLog,
    shared: std::sync::Arc<crate::shard::Shared>,
    inbox: tokio::sync::mpsc::UnboundedReceiver<crate::shard::mesh::Msg>,
    ready: Vec<usize>,
    /// The commit whose fdatasync is on the ring.
    writing: Option<(Prepared, Commit)>,
    spare_sends: Vec<Vec<u8>>,
    /// Accept errors come in floods (out of descriptors): a few lines, then a count.
    accept_warn: RateLimit,
}

impl Driver {
    fn on_completion(&mut self, c: Completion, now: Instant) {
        match c {
            Completion::Data { slot, buf } => {
                let Some(conn) = self.core.io_mut(slot) else {
                    self.ring.give_back(buf);
                    return;
                };
                let mut leftover = conn.leftover.take();
                let bytes = self.ring.bytes_mut(&buf);
                let core = &mut self.core;
                // The frame cut by the end of the last buffer is completed from this one.
                let start = match leftover.as_deref_mut() {
                    None => Some(0),
                    Some(lo) => complete_cut(lo, bytes, |b| {
                        let n = core.input(slot, b, now);
                        (n, core.wants_input(slot))
                    }),
                };
                if let Some(start) = start.filter(|&s| s < bytes.len()) {
                    // The common case: whole frames, parsed in place in the ring's buffer.
                    let rest = &mut bytes[start..];
                    let n = core.input(slot, rest, now).min(rest.len());
                    leftover = (n < rest.len()).then(|| Box::new(rest[n..].to_vec()));
                } else if start.is_some() {
                    leftover = None;
                }
                self.ring.give_back(buf);
                if let Some(conn) = self.core.io_mut(slot) {
                    conn.leftover = leftover;
                }
                self.ready.push(slot);
            }
            Completion::Sent { slot, buf, result } => {
                self.recycle_send(buf);
                if result.is_err() {
                    // The peer is gone: shut down, and its recv ends too.
                    self.shut(slot);
                }
                self.ready.push(slot);
            }
            Completion::Closed { slot } => {
                if let Some(conn) = self.core.io_mut(slot) {
                    if !std::mem::replace(&mut conn.released, true) {
                        self.ring.release(slot);
                    }
                }
            }
            Completion::Released { slot } => {
                self.core.disconnect(slot, now);
            }
            Completion::Accepted { stream, peer } => {
                match self.core.accept(peer, now, UringConn::default()) {
                    Some(slot) => {
                        self.ring.start(slot, stream);
                        self.ready.push(slot);
                    }
                    None => drop(stream),
                }
                // Over the accept rate: no accepts until then (the ring re-arms its accept at
                // the first wait after it); connections wait in the backlog.
                if let Some(until) = self.core.take_accept_pause() {
                    self.ring.pause_accept(until);
                }
            }
            Completion::AcceptError(e) => {
                let m = &self.shared.env.metrics;
                let n = m
                    .accept_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if let Some(suppressed) = self.accept_warn.allow(now) {
                    tracing::warn!(
                        shard = self.core.id,
                        error = %e,
                        total = n,
                        suppressed,
                        "accept failed"
                    );
                }
            }
            Completion::Written {
                token,
                bufs,
                result,
            } => {
                debug_assert!(
                    token == 0 && bufs.is_empty(),
                    "only fdatasyncs go to the ring"
                );
                self.synced(result, now);
            }
            Completion::Woken => self.drain_inbox(now),
        }
    }

    fn drain_inbox(&mut self, now: Instant) {
        while let Ok(msg) = self.inbox.try_recv() {
            let reload = matches!(msg, ShardMsg::Reload { .. }).then(Instant::now);
            self.core.on_message(msg, now);
            if let Some(started) = reload {
                let id = self.core.id;
                self.shared.env.metrics.swapped(id, started.elapsed());
            }
        }
    }

    /// Performs the core's actions and acts on every connection it (or a completion) flagged,
    /// until neither has anything left.
    fn act(&mut self, now: Instant) {
        loop {
            let mut flagged = std::mem::take(&mut self.ready);
            self.core.take_ready(&mut flagged);
            let had_ready = !flagged.is_empty();
            for slot in flagged.drain(..) {
                self.act_on(slot, now);
            }
            self.ready = flagged;
            let mut acted = false;
            while let Some(action) = self.core.poll_action() {
                acted = true;
                match action {
                    Action::Send { shard, msg } => {
                        self.shared.mesh.send(shard, msg);
                    }
                    Action::Answer { reply, outcome } => {
                        let _ = reply.send(outcome);
                    }
                    Action::Append(commit) => self.append(commit, now),
                }
            }
            if !acted && !had_ready && self.ready.is_empty() {
                return;
            }
        }
    }

    /// Sends what `slot` has (one send in flight at a time), shuts it down when its session
    /// ended and everything went out, drops it when the core aborted it, and pauses or
    /// resumes its receiving (feeding the core what it left unconsumed first).
    fn act_on(&mut self, slot: usize, now: Instant) {
        let aborted = self.core.is_aborted(slot);
        let closed = self.core.is_closed(slot);
        let wants_input = self.core.wants_input(slot);
        let Some(conn) = self.core.io_mut(slot) else {
            return;
        };
        if conn.released {
            return;
        }
        if aborted {
            // Closed a pong timeout ago and the peer still neither read nor closed: drop it.
            conn.released = true;
            self.ring.release(slot);
            return;
        }
        if conn.shut {
            return;
        }
        // One send in flight at a time: what waits stays with the session, whose queued-bytes
        // limit then applies to a peer that does not read.
        if !self.ring.sending(slot) {
            let mut out = self.spare_sends.pop().unwrap_or_default();
            if self.core.transmit(slot, &mut out) {
                self.ring.send(slot, out);
            } else {
                self.recycle_send(out);
            }
        }
        let sending = self.ring.sending(slot);
        let Some(conn) = self.core.io_mut(slot) else {
            return;
        };
        if closed && !sending {
            self.shut(slot);
            return;
        }
        if wants_input && conn.paused {
            // What was read before the pause goes in first: a connection over its message
            // rate stops consuming at a message boundary and waits for no new bytes.
            self.feed_leftover(slot, now);
            if !self.core.wants_input(slot) {
                return; // paused again: the rest waits for the next refill
            }
            if let Some(conn) = self.core.io_mut(slot) {
                conn.paused = false;
            }
            self.ring.resume_recv(slot);
        } else if !wants_input && !conn.paused {
            conn.paused = true;
            self.core.note_paused();
            self.ring.pause_recv(slot);
        }
    }

    /// Presents `slot`'s unconsumed bytes to the core again (an empty slice for none, which
    /// lets a TLS connection go on with what it decrypted).
    fn feed_leftover(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.core.io_mut(slot) else {
            return;
        };
        let mut leftover = conn.leftover.take();
        let n = match leftover.as_deref_mut() {
            Some(lo) => {
                let n = self.core.input(slot, lo, now);
                lo.drain(..n.min(lo.len()));
                lo.len()
            }
            None => {
                self.core.input(slot, &mut [], now);
                0
            }
        };
        if n == 0 {
            leftover = None;
        }
        if let Some(conn) = self.core.io_mut(slot) {
            conn.leftover = leftover;
        }
        self.ready.push(slot);
    }

    /// Everything went out (or the peer is gone): shut the socket down and keep receiving
    /// until the peer's end arrives as `Closed` (then the slot is released). A peer that never
    /// closes is aborted by the core's timer.
    fn shut(&mut self, slot: usize) {
        let Some(conn) = self.core.io_mut(slot) else {
            return;
        };
        if std::mem::replace(&mut conn.shut, true) {
            return;
        }
        self.ring.shutdown(slot);
        if std::mem::replace(&mut conn.paused, false) {
            self.ring.resume_recv(slot);
        }
    }

    fn recycle_send(&mut self, mut buf: Vec<u8>) {
        if self.spare_sends.len() < SPARE_SENDS && buf.capacity() <= 64 * 1024 {
            buf.clear();
            self.spare_sends.push(buf);
        }
    }

    /// Writes a commit to the shard's partition and answers its devices; under
    /// `fsync = "batch"` the fdatasync is an op on the ring, and the devices are answered when
    /// it completes ([`Driver::synced`]).
    ///
    /// The write itself is a plain `pwritev` from this thread: a copy into the page cache of a
    /// few KiB, once per turn. As an io_uring op on ext4 it was punted to an io-wq worker
    /// thread (buffered file writes are not async there), which cost two thread switches and a
    /// second wake-up of this loop per commit: measured at 10,000 reports/s, 0.9 context
    /// switches per report on the shard thread plus 0.7 on the worker, against 0.35 in all
    /// with the write here.
    fn append(&mut self, commit: Commit, now: Instant) {
        let p = match self.log.prepare(&commit) {
            Ok(Some(p)) => p,
            Ok(None) => return self.core.committed(commit, Ok(()), now),
            Err(e) => {
                self.log.failed(&commit, &e);
                return self.core.committed(commit, Err(e), now);
            }
        };
        let written = ShardLog::write(&p, &commit);
        if written.is_ok() && p.sync {
            self.ring
                .write_at(p.file.as_raw_fd(), p.offset, Vec::new(), true, 0);
            self.writing = Some((p, commit));
            return;
        }
        // The write took time of its own: the commit's latency (a metric) ends after it.
        self.finish(p, commit, written, Instant::now());
    }

    fn synced(&mut self, result: io::Result<()>, now: Instant) {
        if let Some((p, commit)) = self.writing.take() {
            self.finish(p, commit, result, now);
        }
    }

    fn finish(&mut self, p: Prepared, commit: Commit, result: io::Result<()>, now: Instant) {
        // `complete` logs a failure (rate-limited).
        let result: Result<(), UplinkError> = self.log.complete(p, &commit, result);
        self.core.committed(commit, result, now);
    }
}

#[cfg(test)]
mod tests {
    use super::{complete_cut, FIRST_STEP};

    /// A stand-in for the core: frames are a 2-byte big-endian length and that many bytes;
    /// it consumes whole frames only, at most `budget` of them (then it stops wanting input),
    /// and flips every byte it consumes, as in-place parsing may.
    struct Framer {
        seen: Vec<Vec<u8>>,
        budget: usize,
    }

    impl Framer {
        fn input(&mut self, b: &mut [u8]) -> (usize, bool) {
            let mut at = 0;
            while self.budget > 0 && b.len() - at >= 2 {
                let len = usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
                if b.len() - at - 2 < len {
                    break;
                }
                self.seen.push(b[at + 2..at + 2 + len].to_vec());
                b[at..at + 2 + len].iter_mut().for_each(|x| *x = !*x);
                at += 2 + len;
                self.budget -= 1;
            }
            (at, self.budget > 0)
        }
    }

    /// What the driver does with one receive buffer: the cut frame first, the rest in place.
    fn receive(framer: &mut Framer, cut: &mut Vec<u8>, buf: &mut [u8]) {
        let start = if cut.is_empty() {
            Some(0)
        } else {
            complete_cut(cut, buf, |b| framer.input(b))
        };
        if let Some(start) = start {
            let rest = &mut buf[start..];
            let (n, _) = framer.input(rest);
            cut.extend_from_slice(&rest[n..]);
        }
    }

    fn frames(lens: &[usize]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut wire = Vec::new();
        let mut payloads = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let p: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            wire.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            wire.extend_from_slice(&p);
            payloads.push(p);
        }
        (payloads, wire)
    }

    #[test]
    fn frames_cut_anywhere_arrive_whole_and_in_order() {
        let mut seed = 0x2545_f491_u32;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize % m
        };
        for _ in 0..200 {
            let lens: Vec<usize> = (0..40).map(|_| next(3000)).collect();
            let (payloads, wire) = frames(&lens);
            let mut framer = Framer {
                seen: Vec::new(),
                budget: usize::MAX,
            };
            let mut cut = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let n = (1 + next(4096)).min(wire.len() - at);
                let mut buf = wire[at..at + n].to_vec();
                receive(&mut framer, &mut cut, &mut buf);
                at += n;
            }
            assert!(cut.is_empty(), "{} bytes never consumed", cut.len());
            assert_eq!(framer.seen, payloads);
        }
    }

    #[test]
    fn only_the_cut_frame_is_copied_not_the_next_buffer() {
        // 300-byte frames in 16 KiB buffers, as under sustained load: every buffer ends in
        // the middle of a frame.
        let (payloads, wire) = frames(&[298; 200]);
        let mut framer = Framer {
            seen: Vec::new(),
            budget: usize::MAX,
        };
        let mut cut = Vec::new();
        for chunk in wire.chunks(16 * 1024) {
            let mut buf = chunk.to_vec();
            let held = cut.len();
            let start = if held == 0 {
                Some(0)
            } else {
                complete_cut(&mut cut, &buf, |b| {
                    assert!(
                        b.len() <= held + FIRST_STEP,
                        "copied {} bytes",
                        b.len() - held
                    );
                    framer.input(b)
                })
            };
            let start = start.expect("a 300-byte frame completes within the first step");
            // What was copied: one step at most, not the 16 KiB buffer.
            assert!(
                start <= FIRST_STEP,
                "{start} bytes of the buffer consumed from the copy"
            );
            let rest = &mut buf[start..];
            let (n, _) = framer.input(rest);
            cut = rest[n..].to_vec();
            assert!(cut.len() < 300);
        }
        assert_eq!(framer.seen, payloads);
    }

    #[test]
    fn a_frame_longer_than_a_buffer_grows_in_steps_and_arrives_whole() {
        let (payloads, wire) = frames(&[100, 40_000, 100]);
        let mut framer = Framer {
            seen: Vec::new(),
            budget: usize::MAX,
        };
        let mut cut = Vec::new();
        let mut calls = 0;
        for chunk in wire.chunks(16 * 1024) {
            let mut buf = chunk.to_vec();
            let start = if cut.is_empty() {
                Some(0)
            } else {
                complete_cut(&mut cut, &buf, |b| {
                    calls += 1;
                    framer.input(b)
                })
            };
            if let Some(start) = start {
                let rest = &mut buf[start..];
                let (n, _) = framer.input(rest);
                cut.extend_from_slice(&rest[n..]);
            }
        }
        assert!(cut.is_empty());
        assert_eq!(framer.seen, payloads);
        // 512, 1 KiB, ... 16 KiB for each of the two buffers after the first: logarithmic.
        assert!(calls <= 12, "{calls} attempts");
        const { assert!(FIRST_STEP == 512) };
    }

    #[test]
    fn a_paused_input_keeps_every_byte_for_later() {
        let (payloads, wire) = frames(&[200; 10]);
        // The first buffer ends inside frame 3; the core takes two frames, then pauses.
        let (first, second) = wire.split_at(2 * 202 + 50);
        let mut framer = Framer {
            seen: Vec::new(),
            budget: 2,
        };
        let mut cut = Vec::new();
        receive(&mut framer, &mut cut, &mut first.to_vec());
        assert_eq!(framer.seen.len(), 2);
        assert_eq!(cut.len(), 50);
        framer.budget = 0;
        let start = complete_cut(&mut cut, second, |b| framer.input(b));
        assert_eq!(start, None, "paused: nothing consumed, everything kept");
        assert_eq!(cut.len(), wire.len() - 2 * 202);
        // Resumed: what was kept is presented again, as the driver's `feed_leftover` does.
        framer.budget = usize::MAX;
        let (n, _) = framer.input(&mut cut);
        assert_eq!(n, cut.len());
        assert_eq!(framer.seen, payloads);
    }
}
