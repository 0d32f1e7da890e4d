//! The local log read as an outbox: a forwarder's view of one partition, from a durable cursor
//! up to what the log has committed.
//!
//! Owns: [`Reader`] (one partition, frame by frame, record line by record line), the
//! [`Position`] of a record, and the cursor file that makes a forwarder's progress survive a
//! restart ([`load_cursor`], [`store_cursor`]). Never: the sink, the network, the clock,
//! threads. It reads segment files with positional reads while the shard that owns the
//! partition appends to them; the two meet only through [`Marks`].
//!
//! # What a reader may read
//!
//! Frames below [`Marks::committed`]: the log stores it after an append completed (written, and
//! fsynced under `fsync = "batch"`), so those bytes are whole and final. A frame at or above
//! it may be half-written or cut off again by a failed write, and is never looked at.
//!
//! # Positions and the cursor
//!
//! A record is line `line` of frame `frame` (frames are numbered across segments, see the log's
//! module docs). The cursor is the position of the first record the sink has not acknowledged;
//! the forwarder stores it with [`store_cursor`] (write to a temporary file, rename; fsynced when
//! the log is) and reopens a [`Reader`] there after a restart. What was in flight when the
//! process died is read again: replays are bounded by the forwarder's window plus what was
//! acknowledged since the cursor was last stored.
//!
//! # Segments deleted under the reader
//!
//! The log's caps may delete segments the sink never acknowledged (`on_full = "drop_oldest"`).
//! The reader announces the segment it opens ([`Marks::set_reading`]) before opening it and keeps
//! reading an open segment to its end even after the file is unlinked, so every segment is
//! either read completely or counted in [`Marks::dropped`] by the log, never both. (One race
//! remains: a segment deleted between the announcement and the open is neither; the reader
//! then goes on with the next one.) Frames missing between the reader's position and the
//! oldest segment on disk were dropped: the reader skips to that segment.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::log::{list_segments, parse_frame, HEADER};
use super::{Marks, UplinkError};

/// Where a record is: line `line` (from 0) of frame `frame`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub frame: u64,
    pub line: u32,
}

/// One record handed out by [`Reader::peek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item<'a> {
    pub pos: Position,
    /// The position of the record after this one (where a cursor goes once this one is
    /// acknowledged).
    pub next: Position,
    /// The record line, without its `\n`.
    pub line: &'a [u8],
}

/// Reads one partition's committed records in log order; see the module docs.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    marks: Arc<Marks>,
    seg: Option<OpenSegment>,
    /// The frame at `seg.offset`: the next one to read.
    next_frame: u64,
    /// Frame bytes (header and payload) of the frame being handed out, `buf_frame`.
    buf: Vec<u8>,
    buf_frame: u64,
    /// Where the next line starts in `buf`'s payload, and its index; `None` when `buf` holds
    /// no frame (or all of it was handed out).
    at: Option<(usize, u32)>,
    /// Lines of the first frame read to skip: the cursor pointed into the middle of it.
    skip_lines: u32,
}

#[derive(Debug)]
struct OpenSegment {
    first: u64,
    file: File,
    path: PathBuf,
    offset: u64,
}

impl Reader {
    /// A reader of the partition in `dir` starting at `from` (a stored cursor, or the default
    /// position: the oldest record on disk). Nothing is read until [`Reader::peek`].
    pub fn new(dir: impl Into<PathBuf>, marks: Arc<Marks>, from: Position) -> Self {
        Self {
            dir: dir.into(),
            marks,
            seg: None,
            next_frame: from.frame,
            buf: Vec::new(),
            buf_frame: 0,
            at: None,
            skip_lines: from.line,
        }
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of the partition from the reader's position on (its segment's rest and every later
    /// segment on disk), for metrics.
    pub fn backlog_bytes(&self) -> Result<u64, UplinkError> {
        let found = list_segments(&self.dir)?;
        let (first, offset) = match &self.seg {
            Some(s) => (s.first, s.offset),
            None => {
                let first = found
                    .iter()
                    .rev()
                    .find(|(f, _)| *f <= self.next_frame)
                    .map_or(0, |(f, _)| *f);
                (first, 0)
            }
        };
        let mut bytes = 0u64;
        for (f, path) in found.iter().filter(|(f, _)| *f >= first) {
            let len = match fs::metadata(path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(UplinkError::io(path, e)),
            };
            bytes += if *f == first {
                len.saturating_sub(offset)
            } else {
                len
            };
        }
        Ok(bytes)
    }

    /// The next committed record, without consuming it; `None` when the reader has caught up
    /// with the log.
    pub fn peek(&mut self) -> Result<Option<Item<'_>>, UplinkError> {
        if self.at.is_none() && !self.read_frame()? {
            return Ok(None);
        }
        Ok(self.current())
    }

    /// The next committed record, consumed; `None` when the reader has caught up. The line
    /// stays valid until the next call on the reader.
    pub fn take(&mut self) -> Result<Option<Item<'_>>, UplinkError> {
        if self.at.is_none() && !self.read_frame()? {
            return Ok(None);
        }
        let (Some((start, _)), Some(item)) = (self.at, self.current()) else {
            return Ok(None);
        };
        let (pos, next, len) = (item.pos, item.next, item.line.len());
        self.advance();
        Ok(Some(Item {
            pos,
            next,
            line: &self.payload()[start..start + len],
        }))
    }

    /// Consumes the record [`Reader::peek`] returned.
    pub fn advance(&mut self) {
        let Some(item) = self.current() else { return };
        let end = item.line.len() + 1;
        let Some((start, line)) = self.at else { return };
        let next = start + end;
        self.at = (next < self.payload().len()).then_some((next, line + 1));
    }

    /// Records of the frame in `buf` from `at` on.
    fn current(&self) -> Option<Item<'_>> {
        let (start, line) = self.at?;
        let payload = &self.payload()[start..];
        // Every payload ends in '\n' (checked by parse_frame).
        let len = payload.iter().position(|&b| b == b'\n')?;
        let pos = Position {
            frame: self.buf_frame,
            line,
        };
        let next = if start + len + 1 == self.payload().len() {
            Position {
                frame: self.buf_frame + 1,
                line: 0,
            }
        } else {
            Position {
                frame: self.buf_frame,
                line: line + 1,
            }
        };
        Some(Item {
            pos,
            next,
            line: &payload[..len],
        })
    }

    fn payload(&self) -> &[u8] {
        self.buf.get(HEADER..).unwrap_or_default()
    }

    /// Reads the next committed frame into `buf`; `false` when there is none yet.
    fn read_frame(&mut self) -> Result<bool, UplinkError> {
        loop {
            if self.next_frame >= self.marks.committed() {
                return Ok(false);
            }
            if self.seg.is_none() && !self.open_segment()? {
                return Ok(false);
            }
            let Some(seg) = self.seg.as_mut() else {
                return Ok(false);
            };
            self.buf.resize(HEADER, 0);
            let n = read_at(&seg.file, &mut self.buf, seg.offset)
                .map_err(|e| UplinkError::io(&seg.path, e))?;
            if n == 0 {
                // The end of this segment: the frame is in a later one.
                self.seg = None;
                continue;
            }
            if n < HEADER {
                return Err(corrupt(&seg.path, seg.offset, "committed frame cut short"));
            }
            let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
            let total = HEADER + len as usize;
            if len as usize > super::log::MAX_FRAME_PAYLOAD {
                return Err(corrupt(
                    &seg.path,
                    seg.offset,
                    "frame length over the limit",
                ));
            }
            self.buf.resize(total, 0);
            let n = read_at(
                &seg.file,
                &mut self.buf[HEADER..],
                seg.offset + HEADER as u64,
            )
            .map_err(|e| UplinkError::io(&seg.path, e))?;
            if n < total - HEADER {
                return Err(corrupt(&seg.path, seg.offset, "committed frame cut short"));
            }
            if let Err(what) = parse_frame(&self.buf) {
                return Err(corrupt(&seg.path, seg.offset, what));
            }
            seg.offset += total as u64;
            self.buf_frame = self.next_frame;
            self.next_frame += 1;
            self.at = Some((0, 0));
            // Resuming inside a frame: its first lines were acknowledged before.
            for _ in 0..std::mem::take(&mut self.skip_lines) {
                self.advance();
            }
            if self.at.is_some() {
                return Ok(true);
            }
        }
    }

    /// Opens the segment holding `next_frame` and seeks to it; skips to the oldest segment on
    /// disk when the frames before it were deleted. `false`: no segment holds it yet.
    fn open_segment(&mut self) -> Result<bool, UplinkError> {
        loop {
            let found = list_segments(&self.dir)?;
            let holding = found
                .iter()
                .rev()
                .find(|(first, _)| *first <= self.next_frame)
                .or_else(|| found.first());
            let Some((first, path)) = holding.cloned() else {
                return Ok(false);
            };
            if first > self.next_frame {
                // Dropped by the caps (counted by the log): go on from the oldest that is left.
                self.next_frame = first;
                self.skip_lines = 0;
            }
            self.marks.set_reading(first);
            let file = match File::open(&path) {
                Ok(f) => f,
                // Deleted since the listing: list again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(UplinkError::io(&path, e)),
            };
            let mut seg = OpenSegment {
                first,
                file,
                path,
                offset: 0,
            };
            // Skip the frames before ours, reading only their headers.
            let mut header = [0u8; HEADER];
            for _ in first..self.next_frame {
                let n = read_at(&seg.file, &mut header, seg.offset)
                    .map_err(|e| UplinkError::io(&seg.path, e))?;
                if n < HEADER {
                    // The cursor points past this segment's end (a cursor from another log):
                    // start over at its beginning.
                    self.next_frame = first;
                    self.skip_lines = 0;
                    seg.offset = 0;
                    break;
                }
                let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                seg.offset += (HEADER + len as usize) as u64;
            }
            self.seg = Some(seg);
            return Ok(true);
        }
    }
}

/// Reads into all of `buf` at `offset` unless the file ends first; returns the bytes read.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn corrupt(path: &Path, offset: u64, what: &'static str) -> UplinkError {
    UplinkError::Corrupt {
        path: path.to_path_buf(),
        offset,
        what,
    }
}

/// The cursor file of sink `name` in partition `dir`.
pub fn cursor_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.cursor"))
}

/// The stored cursor of sink `name` in partition `dir`; `None` when there is none yet. A file
/// that does not parse is an error (it is never half-written: see [`store_cursor`]).
pub fn load_cursor(dir: &Path, name: &str) -> Result<Option<Position>, UplinkError> {
    let path = cursor_path(dir, name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(UplinkError::io(&path, e)),
    };
    let mut parts = text.split_ascii_whitespace();
    let frame = parts.next().and_then(|f| f.parse().ok());
    let line = parts.next().and_then(|l| l.parse().ok());
    match (frame, line, parts.next()) {
        (Some(frame), Some(line), None) => Ok(Some(Position { frame, line })),
        _ => Err(UplinkError::BadRecord(format!(
            "{}: not a cursor (\"<frame> <line>\")",
            path.display()
        ))),
    }
}

/// Stores `pos` as the cursor of sink `name` in partition `dir`, atomically (a temporary file
/// renamed over the old one); with `sync`, the file and the directory are fsynced first.
pub fn store_cursor(dir: &Path, name: &str, pos: Position, sync: bool) -> Result<(), UplinkError> {
    let path = cursor_path(dir, name);
    let tmp = dir.join(format!("{name}.cursor.tmp"));
    let text = format!("{} {}\n", pos.frame, pos.line);
    let write = || -> io::Result<()> {
        let f = File::create(&tmp)?;
        f.write_all_at(text.as_bytes(), 0)?;
        if sync {
            f.sync_data()?;
        }
        fs::rename(&tmp, &path)?;
        if sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| UplinkError::io(&path, e))
}

#[cfg(test)]
mod tests;
