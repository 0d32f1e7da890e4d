//! A forwarder's view of the whole log: every partition's reader merged by record time, the
//! records handed to the sink and not yet acknowledged, and the cursors that follow the
//! acknowledgements.
//!
//! Owns: one [`Reader`] per partition, the in-flight records of each (in publish order), each
//! partition's cursor (the first record not acknowledged) and when it was last stored. Never:
//! the network, the clock, the record's upstream form. Sink-agnostic: the MQTT forwarder uses
//! it, a NATS one would too.
//!
//! What always holds: a partition's cursor only moves over records the sink acknowledged, in
//! log order (an acknowledgement out of order waits for the ones before it), so a restart
//! resumes at or before every record not yet acknowledged; [`Marks::set_forwarded`] tells the
//! log's caps the same. Records of one partition are handed out in log order; between
//! partitions the earliest record time goes first, so a device that moved between shards keeps
//! its order as long as its shards' clocks agree.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use crate::uplink::outbox::{load_cursor, store_cursor, Position, Reader};
use crate::uplink::{Marks, UplinkError};

/// Tags carry the partition in their top 16 bits and a per-partition counter below.
const PART_SHIFT: u32 = 48;
const COUNTER_MASK: u64 = (1 << PART_SHIFT) - 1;

/// The tag of a record handed out by [`Outbox::take_next`]; it comes back to [`Outbox::ack`].
pub type Tag = u64;

/// A record handed out by [`Outbox::take_next`].
#[derive(Debug, Clone, Copy)]
pub struct Taken<'a> {
    pub tag: Tag,
    /// Its partition (the shard that wrote it) and its place there: together a name for the
    /// record that stays the same when it is read again after a restart.
    pub part: usize,
    pub pos: Position,
    /// The record line, without its `\n`.
    pub line: &'a [u8],
}

/// See the module docs.
#[derive(Debug)]
pub struct Outbox {
    name: &'static str,
    sync: bool,
    parts: Vec<Part>,
}

#[derive(Debug)]
struct Part {
    reader: Reader,
    marks: Arc<Marks>,
    /// In publish order; `base` is the counter of the front one.
    inflight: VecDeque<Slot>,
    base: u64,
    cursor: Position,
    stored: Position,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    next: Position,
    at_ms: u64,
    acked: bool,
}

impl Outbox {
    /// Opens every partition at its stored cursor (sink `name`, e.g. `mqtt`; a partition without
    /// one starts at its oldest record). `sync`: fsync cursor files (the log's `fsync = batch`).
    pub fn open(
        name: &'static str,
        partitions: &[(PathBuf, Arc<Marks>)],
        sync: bool,
    ) -> Result<Self, UplinkError> {
        let mut parts = Vec::with_capacity(partitions.len());
        for (dir, marks) in partitions {
            let cursor = load_cursor(dir, name)?.unwrap_or_default();
            marks.set_forwarded(cursor.frame);
            parts.push(Part {
                reader: Reader::new(dir.clone(), Arc::clone(marks), cursor),
                marks: Arc::clone(marks),
                inflight: VecDeque::new(),
                base: 0,
                cursor,
                stored: cursor,
            });
        }
        Ok(Self { name, sync, parts })
    }

    /// The next record line to publish, the earliest of every partition's next one, with its
    /// tag; `None` when every committed record has been handed out. A line the caller cannot
    /// publish is [`Outbox::ack`]ed right away (skipped).
    pub fn take_next(&mut self) -> Result<Option<Taken<'_>>, UplinkError> {
        let mut best: Option<(u64, usize)> = None;
        for (i, part) in self.parts.iter_mut().enumerate() {
            if let Some(item) = part.reader.peek()? {
                let t = record_time(item.line);
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, i));
                }
            }
        }
        let Some((at_ms, i)) = best else {
            return Ok(None);
        };
        let part = &mut self.parts[i];
        let tag =
            ((i as u64) << PART_SHIFT) | ((part.base + part.inflight.len() as u64) & COUNTER_MASK);
        let Some(item) = part.reader.take()? else {
            return Ok(None);
        };
        part.inflight.push_back(Slot {
            next: item.next,
            at_ms,
            acked: false,
        });
        Ok(Some(Taken {
            tag,
            part: i,
            pos: item.pos,
            line: item.line,
        }))
    }

    /// The sink acknowledged the record `tag`. Unknown or repeated tags are ignored.
    pub fn ack(&mut self, tag: Tag) {
        let Some(part) = self.parts.get_mut((tag >> PART_SHIFT) as usize) else {
            return;
        };
        let counter = tag & COUNTER_MASK;
        let Some(slot) = counter
            .checked_sub(part.base)
            .and_then(|i| part.inflight.get_mut(i as usize))
        else {
            return;
        };
        slot.acked = true;
        let before = part.cursor;
        while part.inflight.front().is_some_and(|s| s.acked) {
            if let Some(s) = part.inflight.pop_front() {
                part.cursor = s.next;
                part.base += 1;
            }
        }
        if part.cursor != before {
            part.marks.set_forwarded(part.cursor.frame);
        }
    }

    /// Records handed out and not acknowledged.
    pub fn inflight(&self) -> usize {
        self.parts.iter().map(|p| p.inflight.len()).sum()
    }

    /// The time of the oldest record not acknowledged yet, if any is in flight.
    pub fn oldest_inflight_ms(&self) -> Option<u64> {
        self.parts
            .iter()
            .filter_map(|p| p.inflight.front().map(|s| s.at_ms))
            .min()
    }

    /// The time of the next record to hand out, if one is committed.
    pub fn peek_time(&mut self) -> Result<Option<u64>, UplinkError> {
        let mut best = None;
        for part in &mut self.parts {
            if let Some(item) = part.reader.peek()? {
                let t = record_time(item.line);
                best = Some(best.map_or(t, |b: u64| b.min(t)));
            }
        }
        Ok(best)
    }

    /// Stores every cursor that moved since it was last stored.
    pub fn store_cursors(&mut self) -> Result<(), UplinkError> {
        for part in &mut self.parts {
            if part.cursor != part.stored {
                store_cursor(part.reader.dir(), self.name, part.cursor, self.sync)?;
                part.stored = part.cursor;
            }
        }
        Ok(())
    }

    /// Committed records from the cursors on (a full read of the backlog: once, at start).
    pub fn count_unforwarded(&self) -> Result<u64, UplinkError> {
        let mut n = 0;
        for part in &self.parts {
            let marks = Arc::new(part.marks.detached());
            let mut r = Reader::new(part.reader.dir().to_owned(), marks, part.cursor);
            while r.peek()?.is_some() {
                r.advance();
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bytes of the log from the readers' positions on.
    pub fn backlog_bytes(&self) -> Result<u64, UplinkError> {
        self.parts.iter().map(|p| p.reader.backlog_bytes()).sum()
    }

    /// Each partition's cursor, for tests and tools.
    pub fn cursors(&self) -> Vec<Position> {
        self.parts.iter().map(|p| p.cursor).collect()
    }
}

/// The `"t"` of a record line (`{"t":<ms>,...`, see [`crate::uplink::record`]); 0 when the line
/// does not start that way (it then fails to decode and is skipped).
fn record_time(line: &[u8]) -> u64 {
    let Some(rest) = line.strip_prefix(b"{\"t\":") else {
        return 0;
    };
    rest.iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |t, b| {
            t.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        })
}

#[cfg(test)]
mod tests;
