//! The embedded local log, the default sink: append-only, segmented, CRC-framed, crash-safe.
//!
//! Owns: the segment files of one directory, the active segment's file handle, the global frame
//! sequence number, and the size and age caps. Never: the record format beyond "lines ending in
//! `\n`" (records are opaque bytes here, except in [`LocalLog::read_dir`]), threads, the
//! network. One process writes a directory at a time; nothing enforces it (no lock file).
//!
//! # On disk
//!
//! ```text
//!   dir/00000000000000000000.log   frames 0..=41
//!   dir/00000000000000000042.log   frames 42.. (named by its first frame's sequence number,
//!                                   20 digits, so lexical order = log order)
//!
//!   frame = magic "rlu1" | len: u32 LE | crc: u32 LE | payload (len bytes)
//!           crc = CRC-32 (IEEE) of the 4 len bytes then the payload
//!           payload = one batch: record lines, each ending in '\n'; 1 <= len <= MAX_FRAME_PAYLOAD
//! ```
//!
//! What always holds, between calls:
//! - every segment is a whole number of valid frames, and `0 <= active.bytes`; the active
//!   segment is the last one, and one [`LocalLog::append`] is one positional write at its end;
//! - segment `i + 1` starts at the sequence number where segment `i` ends (no gaps);
//! - `total_bytes` = the sum of every segment's size.
//!
//! A crash can only leave a torn frame at the end of the last segment (a write that did not
//! finish); [`LocalLog::open`] truncates it. Anything invalid elsewhere is disk corruption (or
//! power loss under [`Fsync::Never`]) and is refused with the file and offset.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{decode_line, OwnedRecord, UplinkError};

/// When the log asks the kernel to put appended bytes on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Leave flushing to the OS: safe when the process crashes (the page cache survives), not
    /// when the machine loses power.
    Never,
    /// `fdatasync` after every append (one per group commit), and the directory after a new
    /// segment is created: a success reply survives power loss.
    Batch,
}

/// Where the log lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// The log directory (`--data-dir`/uplink); created if missing.
    pub dir: PathBuf,
    /// Default 64 MiB: a new segment past this size. Small enough that the caps free space in
    /// steps of under 10 % of `max_bytes`, big enough that a roll (create + directory fsync)
    /// happens once per ~500 000 typical records.
    pub segment_bytes: u64,
    /// Default 1 GiB: the oldest segments are deleted past it. An edge box shares its disk with
    /// everything else; a consumer that never reads must not fill it.
    pub max_bytes: u64,
    /// Default 7 days: segments whose last write is older are deleted. A week covers an outage
    /// over a long weekend; older telemetry is history nobody replays from a gateway.
    pub max_age: Duration,
    /// Default [`Fsync::Batch`]: a device's success reply promises the uplink is durable, and
    /// group commit pays one fsync for a whole batch of batches.
    pub fsync: Fsync,
    /// Default `None` (the log is the last stop). `Some` when a forwarder publishes the log to an
    /// external sink: the caps then respect what it has not acknowledged yet, per
    /// [`Outbox::on_full`].
    pub outbox: Option<Outbox>,
}

/// The log as the outbox of an external sink: the positions its writer and its forwarder
/// share, and what a full log does with records the sink has not acknowledged.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub marks: Arc<Marks>,
    pub on_full: OnFull,
}

/// What the caps do with records the sink has not acknowledged yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Delete the oldest segment anyway; its unforwarded records are counted in
    /// [`Marks::dropped`]. Devices keep being served.
    DropOldest,
    /// Keep it: an append that does not fit fails with [`UplinkError::SpoolFull`], so devices
    /// get an error until the sink catches up.
    Block,
}

/// Positions in one partition, by frame sequence number, shared between the thread that writes
/// the partition and the forwarder that reads it (each only stores its own).
#[derive(Debug, Default)]
pub struct Marks {
    /// Written by the log: frames below this are complete (written, and synced under
    /// [`Fsync::Batch`]). The forwarder reads no further.
    committed: AtomicU64,
    /// Written by the forwarder: frames below this are acknowledged by the sink.
    forwarded: AtomicU64,
    /// Written by the forwarder: one more than the first frame of the segment it has open (it
    /// reads that segment to its end even if the caps delete the file meanwhile); 0 before it
    /// opened one.
    reading: AtomicU64,
    /// Written by the log: records deleted by the caps before the forwarder had read them.
    dropped: AtomicU64,
    /// Written by the log: the last append failed with [`UplinkError::SpoolFull`].
    full: AtomicBool,
}

impl Marks {
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Acquire)
    }

    /// Frames below `frame` are acknowledged by the sink.
    pub fn set_forwarded(&self, frame: u64) {
        self.forwarded.store(frame, Ordering::Release);
    }

    /// The forwarder is about to open the segment starting at frame `first`.
    pub fn set_reading(&self, first: u64) {
        self.reading.store(first + 1, Ordering::Release);
    }

    /// Marks with only this one's committed position: for a second reader (one that counts,
    /// say) whose reading must not be taken for the forwarder's.
    pub fn detached(&self) -> Self {
        let m = Self::default();
        m.committed.store(self.committed(), Ordering::Release);
        m
    }

    /// Records the caps deleted before the forwarder read them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether the last append was refused because the spool is full ([`OnFull::Block`]).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }
}

impl LogOptions {
    /// The defaults above, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            fsync: Fsync::Batch,
            outbox: None,
        }
    }
}

/// What [`LocalLog::open`] found, after truncating a torn tail and applying the caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files kept.
    pub segments: usize,
    /// Record lines in them.
    pub records: u64,
    /// Their total size.
    pub bytes: u64,
    /// Bytes cut from the end of the last segment (a torn or corrupt tail).
    pub truncated_bytes: u64,
}

/// An open log directory; see the module docs for the format.
#[derive(Debug)]
pub struct LocalLog {
    opts: LogOptions,
    /// Oldest first; never empty; the last one is active and open in `file`.
    segments: VecDeque<Segment>,
    /// Shared with an append in flight ([`Prepared::file`]), which may fsync it elsewhere.
    file: Arc<File>,
    /// The sequence number of the next frame.
    next_seq: u64,
    total_bytes: u64,
    /// Frame headers of the last append, kept for the next one's (no allocation per append).
    headers: Vec<u8>,
    /// A [`Prepared`] append has not been completed yet.
    pending: bool,
    /// Set when a failed write could not be undone: appending after unknown bytes would turn a
    /// torn tail into corruption in the middle, so every later append fails.
    broken: bool,
}

impl LocalLog {
    /// Creates the dir if needed, opens and recovers it: every segment's frames are validated;
    /// a torn or corrupt tail of the LAST segment is truncated (nothing before it is lost);
    /// corruption in an earlier segment, or a sequence gap between segments, is an error naming
    /// the file and offset. Then the caps are applied.
    pub fn open(opts: LogOptions) -> Result<(Self, Recovery), UplinkError> {
        fs::create_dir_all(&opts.dir).map_err(|e| UplinkError::io(&opts.dir, e))?;
        let found = list_segments(&opts.dir)?;

        // Validate everything before changing anything.
        let mut scans = Vec::with_capacity(found.len());
        for (i, (seq, path)) in found.iter().enumerate() {
            let scan = scan_segment(path, |_| Ok(()))?;
            let last = i + 1 == found.len();
            if let (Some((offset, what)), false) = (scan.bad, last) {
                return Err(corrupt(path, offset, what));
            }
            if let Some((prev_seq, prev)) = scans.last() {
                check_sequence(*prev_seq, prev, *seq, path)?;
            }
            scans.push((*seq, scan));
        }

        let mut truncated_bytes = 0;
        let mut segments = VecDeque::with_capacity(found.len() + 1);
        let mut records = Vec::with_capacity(found.len());
        for ((seq, path), (_, scan)) in found.into_iter().zip(&scans) {
            if scan.bad.is_some() {
                // Only the last segment gets here (checked above): cut its tail.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| UplinkError::io(&path, e))?;
                f.set_len(scan.valid_len)
                    .map_err(|e| UplinkError::io(&path, e))?;
                if opts.fsync == Fsync::Batch {
                    f.sync_all().map_err(|e| UplinkError::io(&path, e))?;
                }
                truncated_bytes += scan.file_len - scan.valid_len;
            }
            let modified = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(|e| UplinkError::io(&path, e))?;
            segments.push_back(Segment {
                first_seq: seq,
                frames: scan.frames,
                records: scan.records,
                bytes: scan.valid_len,
                modified,
                path,
            });
            records.push(scan.records);
        }

        let (file, next_seq) = match segments.back() {
            Some(last) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(|e| UplinkError::io(&last.path, e))?;
                (file, last.first_seq + last.frames)
            }
            None => {
                let seg = create_segment(&opts, 0)?;
                segments.push_back(seg.0);
                records.push(0);
                (seg.1, 0)
            }
        };
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut log = Self {
            opts,
            segments,
            file: Arc::new(file),
            next_seq,
            total_bytes,
            headers: Vec::new(),
            pending: false,
            broken: false,
        };
        if let Some(outbox) = &log.opts.outbox {
            outbox.marks.committed.store(next_seq, Ordering::Release);
        }
        let deleted = log.enforce_caps(SystemTime::now(), 0)?;
        let recovery = Recovery {
            segments: log.segments.len(),
            records: records[deleted..].iter().sum(),
            bytes: log.total_bytes,
            truncated_bytes,
        };
        Ok((log, recovery))
    }

    /// Appends one or more encoded batches as ONE write, one frame per batch (empty batches
    /// are skipped), then fsyncs per policy: [`LocalLog::prepare`], the write, the fsync and
    /// [`LocalLog::complete`] in one call, for callers that may block. On error nothing was
    /// appended.
    pub fn append(&mut self, batches: &[&[u8]]) -> Result<(), UplinkError> {
        let Some(p) = self.prepare(batches)? else {
            return Ok(());
        };
        let mut result = p.write(batches);
        if result.is_ok() && p.sync {
            result = p.file.sync_data();
        }
        self.complete(p, result)
    }

    /// Lays out an append without writing it, for a caller that writes on its own (an io_uring
    /// write, or a write here and the fsync elsewhere): checks the batches, rolls to a new
    /// segment first when the write would take the active one past `segment_bytes`, applies
    /// the caps (never to the active segment; a segment the caps cannot delete fails here,
    /// before anything is written), and computes the frame headers. `Ok(None)`: nothing to
    /// write. The caller writes [`Prepared::slices`] at [`Prepared::offset`] of
    /// [`Prepared::file`], fdatasyncs when [`Prepared::sync`], and then calls
    /// [`LocalLog::complete`] with the result, before the next `prepare`.
    pub fn prepare(&mut self, batches: &[&[u8]]) -> Result<Option<Prepared>, UplinkError> {
        if self.broken {
            let path = &self.active().path;
            return Err(UplinkError::io(
                path,
                io::Error::other("an earlier failed write could not be undone; reopen the log"),
            ));
        }
        if self.pending {
            return Err(UplinkError::BadRecord(
                "an append is still in flight: complete it before the next".into(),
            ));
        }
        let mut frames = 0u64;
        let mut len = 0u64;
        let mut records = 0u64;
        for b in batches.iter().filter(|b| !b.is_empty()) {
            if b.len() > MAX_FRAME_PAYLOAD {
                return Err(UplinkError::BadRecord(format!(
                    "batch of {} bytes exceeds the log's frame limit of {MAX_FRAME_PAYLOAD}",
                    b.len()
                )));
            }
            if b.last() != Some(&b'\n') {
                return Err(UplinkError::BadRecord(
                    "batch does not end with a newline".into(),
                ));
            }
            frames += 1;
            len += (HEADER + b.len()) as u64;
            records += count_lines(b);
        }
        if frames == 0 {
            return Ok(None);
        }

        if self.active().bytes > 0 && self.active().bytes + len > self.opts.segment_bytes {
            self.roll()?;
        }
        let capped = self.enforce_caps(SystemTime::now(), len);
        if let Some(outbox) = &self.opts.outbox {
            let full = matches!(capped, Err(UplinkError::SpoolFull { .. }));
            outbox.marks.full.store(full, Ordering::Relaxed);
        }
        capped?;

        let mut headers = std::mem::take(&mut self.headers);
        headers.clear();
        for b in batches.iter().filter(|b| !b.is_empty()) {
            headers.extend_from_slice(&frame_header(b));
        }
        self.pending = true;
        Ok(Some(Prepared {
            file: Arc::clone(&self.file),
            offset: self.active().bytes,
            sync: self.opts.fsync == Fsync::Batch,
            headers,
            len,
            frames,
            records,
        }))
    }

    /// Ends the append `p` with the result of its write (and fsync): on success the frames
    /// count as appended; on error whatever part of the write landed is cut off again, so the
    /// next append starts on a frame boundary (if even that fails, every later append fails,
    /// see `broken`), and the error names the segment.
    pub fn complete(&mut self, p: Prepared, result: io::Result<()>) -> Result<(), UplinkError> {
        self.pending = false;
        let Prepared {
            offset,
            headers,
            len,
            frames,
            records,
            ..
        } = p;
        self.headers = headers;
        if let Err(e) = result {
            if self.active_file().set_len(offset).is_err() {
                self.broken = true;
            }
            return Err(UplinkError::io(&self.active().path, e));
        }
        let now = SystemTime::now();
        let seg = self.active_mut();
        seg.bytes += len;
        seg.frames += frames;
        seg.records += records;
        seg.modified = now;
        self.next_seq += frames;
        self.total_bytes += len;
        if let Some(outbox) = &self.opts.outbox {
            outbox
                .marks
                .committed
                .store(self.next_seq, Ordering::Release);
        }
        Ok(())
    }

    /// Total size of the segments on disk, for metrics.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Reads every record of a log in order (tests, replay, tools), without changing it: the
    /// segments in `dir` itself and those of every partition under it (`shard-N`, see
    /// [`partition_dir`]), whatever shard count wrote them. Partitions are merged by record
    /// time; records of one partition keep their log order (even if the wall clock stepped
    /// back), and equal times go partition by partition. Stops cleanly at a torn tail of a
    /// partition's last segment; corruption anywhere else, or a line that does not decode, is
    /// an error.
    pub fn read_dir(dir: &Path) -> Result<Vec<OwnedRecord>, UplinkError> {
        let mut parts = vec![read_partition(dir)?];
        for sub in list_partitions(dir)? {
            parts.push(read_partition(&sub)?);
        }
        Ok(merge_by_time(parts))
    }

    fn active_file(&self) -> &File {
        &self.file
    }

    fn active(&self) -> &Segment {
        // `segments` is never empty: open creates one, and the caps keep the last one.
        self.segments.back().expect("the active segment exists")
    }

    fn active_mut(&mut self) -> &mut Segment {
        // As in `active`.
        self.segments.back_mut().expect("the active segment exists")
    }

    /// Closes the active segment and starts a new one at `next_seq`.
    fn roll(&mut self) -> Result<(), UplinkError> {
        let (seg, file) = create_segment(&self.opts, self.next_seq)?;
        self.segments.push_back(seg);
        self.file = Arc::new(file);
        Ok(())
    }

    /// Deletes the oldest closed segments while the log plus `incoming` bytes is over
    /// `max_bytes`, or the oldest segment's last write is older than `max_age` at `now`. The
    /// active segment is never deleted. With an [`Outbox`], a segment holding frames the sink
    /// has not acknowledged is deleted only under [`OnFull::DropOldest`] (its records count as
    /// dropped unless the forwarder already has it open, and then reads it to its end); under
    /// [`OnFull::Block`] it stays, and if it had to go to make room for `incoming` bytes the
    /// append fails with [`UplinkError::SpoolFull`]. Returns how many segments were deleted.
    fn enforce_caps(&mut self, now: SystemTime, incoming: u64) -> Result<usize, UplinkError> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let too_big = self.total_bytes + incoming > self.opts.max_bytes;
            let too_old = now
                .duration_since(oldest.modified)
                .is_ok_and(|age| age > self.opts.max_age);
            if !(too_big || too_old) {
                break;
            }
            if let Some(outbox) = &self.opts.outbox {
                let unforwarded = outbox.marks.forwarded() < oldest.first_seq + oldest.frames;
                match outbox.on_full {
                    _ if !unforwarded => {}
                    OnFull::Block if too_big && incoming > 0 => {
                        return Err(UplinkError::SpoolFull {
                            path: self.opts.dir.clone(),
                            bytes: self.total_bytes,
                        })
                    }
                    OnFull::Block => break,
                    OnFull::DropOldest => {
                        // Not the segment the forwarder has open, nor one after it.
                        let unread =
                            outbox.marks.reading.load(Ordering::Acquire) <= oldest.first_seq;
                        if unread {
                            outbox
                                .marks
                                .dropped
                                .fetch_add(oldest.records, Ordering::Relaxed);
                        }
                    }
                }
            }
            match fs::remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(UplinkError::io(&oldest.path, e)),
            }
            self.total_bytes -= oldest.bytes;
            self.segments.pop_front();
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// An append laid out by [`LocalLog::prepare`]: what the caller writes, where, and whether
/// it must fdatasync afterwards; handed back to [`LocalLog::complete`].
#[derive(Debug)]
pub struct Prepared {
    /// The active segment (kept open by this handle even if the log rolls meanwhile).
    pub file: Arc<File>,
    /// Where the frames go in `file`: its end.
    pub offset: u64,
    /// Fdatasync after the write ([`Fsync::Batch`]).
    pub sync: bool,
    /// The frame headers, [`FRAME_HEADER`] bytes each, one per non-empty batch, in order.
    pub headers: Vec<u8>,
    len: u64,
    frames: u64,
    records: u64,
}

impl Prepared {
    /// The bytes to write, in order: each non-empty batch of `batches` (the same slice given
    /// to `prepare`) behind its frame header. No copy of the payloads.
    pub fn slices<'a>(&'a self, batches: &[&'a [u8]]) -> Vec<IoSlice<'a>> {
        let mut out = Vec::with_capacity(2 * self.headers.len() / HEADER);
        for (h, b) in self
            .headers
            .chunks_exact(HEADER)
            .zip(batches.iter().filter(|b| !b.is_empty()))
        {
            out.push(IoSlice::new(h));
            out.push(IoSlice::new(b));
        }
        out
    }

    /// Writes the frames of `batches` (the slice given to `prepare`) with as few `pwritev`
    /// calls as the kernel allows, blocking; no fsync.
    pub fn write(&self, batches: &[&[u8]]) -> io::Result<()> {
        let mut slices = self.slices(batches);
        write_all_vectored_at(&self.file, &mut slices, self.offset)
    }

    /// Bytes the write adds to the segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is nothing to write (never, for an append `prepare` returned).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The header of the frame holding `payload`: magic, length, CRC-32 of length and payload.
fn frame_header(payload: &[u8]) -> [u8; HEADER] {
    // payload.len() <= MAX_FRAME_PAYLOAD < u32::MAX, checked by the caller.
    let n = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&n);
    crc.update(payload);
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&n);
    h[8..].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// The partition of shard `shard` under the log directory `dir`: each shard appends to its
/// own, in its own thread.
pub fn partition_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("{PARTITION_PREFIX}{shard}"))
}

/// The partitions under `dir`, by shard number.
fn list_partitions(dir: &Path) -> Result<Vec<PathBuf>, UplinkError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(UplinkError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| UplinkError::io(dir, e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PARTITION_PREFIX))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((n, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(n, _)| *n);
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// Every record of the segments directly in `dir`, in log order.
fn read_partition(dir: &Path) -> Result<Vec<OwnedRecord>, UplinkError> {
    let found = match list_segments(dir) {
        Ok(found) => found,
        Err(UplinkError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let mut prev: Option<(u64, Scan)> = None;
    for (i, (seq, path)) in found.iter().enumerate() {
        let scan = scan_segment(path, |payload| {
            for line in payload.split_inclusive(|&b| b == b'\n') {
                out.push(decode_line(line)?);
            }
            Ok(())
        })?;
        if let (Some((offset, what)), false) = (scan.bad, i + 1 == found.len()) {
            return Err(corrupt(path, offset, what));
        }
        if let Some((prev_seq, prev)) = &prev {
            check_sequence(*prev_seq, prev, *seq, path)?;
        }
        prev = Some((*seq, scan));
    }
    Ok(out)
}

/// Merges partitions, each in log order, into one sequence: at every step the head with the
/// earliest time goes next (the lowest partition on a tie), so each partition's own order is
/// kept.
fn merge_by_time(parts: Vec<Vec<OwnedRecord>>) -> Vec<OwnedRecord> {
    let total = parts.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = parts
        .into_iter()
        .map(|p| p.into_iter().peekable())
        .collect();
    let mut out = Vec::with_capacity(total);
    loop {
        let next = iters
            .iter_mut()
            .enumerate()
            .filter_map(|(i, it)| it.peek().map(|r| (r.at_ms, i)))
            .min();
        let Some((_, i)) = next else { break };
        out.extend(iters[i].next());
    }
    out
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    frames: u64,
    /// Record lines in its frames.
    records: u64,
    bytes: u64,
    /// The time of its last write (the file's mtime when it was opened).
    modified: SystemTime,
    path: PathBuf,
}

/// The result of reading one segment file front to back.
#[derive(Debug)]
struct Scan {
    frames: u64,
    records: u64,
    /// Bytes of whole valid frames from the start: where a bad frame begins, or `file_len`.
    valid_len: u64,
    file_len: u64,
    /// The first invalid frame: its offset and why.
    bad: Option<(u64, &'static str)>,
}

/// Parses the frame at the start of `buf`: `Ok(None)` when `buf` ends before the frame does
/// (need more), `Err(what)` when the bytes are not a valid frame, else the payload and the
/// frame's total length.
pub(super) fn parse_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, &'static str> {
    let Some(magic) = buf.get(..4) else {
        return Ok(None);
    };
    if magic != MAGIC {
        return Err("bad frame magic");
    }
    let Some(header) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len_bytes = [header[4], header[5], header[6], header[7]];
    let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 {
        return Err("empty frame");
    }
    if len > MAX_FRAME_PAYLOAD {
        return Err("frame length over the limit");
    }
    let Some(payload) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(payload);
    if h.finalize() != crc {
        return Err("frame crc mismatch");
    }
    if payload.last() != Some(&b'\n') {
        return Err("frame payload does not end a line");
    }
    Ok(Some((payload, HEADER + len)))
}

/// Reads `path` frame by frame, handing each valid payload to `on_payload`, and stops at the
/// first invalid or incomplete frame.
fn scan_segment(
    path: &Path,
    mut on_payload: impl FnMut(&[u8]) -> Result<(), UplinkError>,
) -> Result<Scan, UplinkError> {
    let io_err = |e| UplinkError::io(path, e);
    let mut file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut scan = Scan {
        frames: 0,
        records: 0,
        valid_len: 0,
        file_len,
        bad: None,
    };
    // 0 <= pos <= filled <= buf.len()
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut pos, mut filled, mut eof) = (0, 0, false);
    loop {
        match parse_frame(&buf[pos..filled]) {
            Ok(Some((payload, used))) => {
                on_payload(payload)?;
                scan.frames += 1;
                scan.records += count_lines(payload);
                scan.valid_len += used as u64;
                pos += used;
            }
            Ok(None) if eof => {
                if pos < filled {
                    scan.bad = Some((scan.valid_len, "torn frame at the end"));
                }
                return Ok(scan);
            }
            Ok(None) => {
                buf.copy_within(pos..filled, 0);
                filled -= pos;
                pos = 0;
                if filled == buf.len() {
                    // A frame bigger than the buffer; parse_frame bounds it by
                    // MAX_FRAME_PAYLOAD, so this growth is bounded too.
                    buf.resize(buf.len() * 2, 0);
                }
                let n = read_some(&mut file, &mut buf[filled..]).map_err(io_err)?;
                eof = n == 0;
                filled += n;
            }
            Err(what) => {
                scan.bad = Some((scan.valid_len, what));
                return Ok(scan);
            }
        }
    }
}

/// The newlines in `payload`: the records of a batch, counted once per commit and once per
/// frame at recovery. memchr's SIMD search: records are tens to hundreds of bytes apart, and
/// over a 31 KB batch it took 0.9 µs where `iter().filter().count()` took 12 µs (that loop,
/// which the compiler did not vectorise, was 3.3 % of the samples at 64 saturating
/// connections).
pub(crate) fn count_lines(payload: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', payload).count() as u64
}

fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// The segment files of `dir`, by sequence number. Files not named like a segment are ignored.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, UplinkError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| UplinkError::io(dir, e))? {
        let entry = entry.map_err(|e| UplinkError::io(dir, e))?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(segment_seq) else {
            continue;
        };
        out.push((seq, entry.path()));
    }
    out.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(out)
}

/// `00000000000000000042.log` -> 42.
fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.log"))
}

fn create_segment(opts: &LogOptions, seq: u64) -> Result<(Segment, File), UplinkError> {
    let path = segment_path(&opts.dir, seq);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| UplinkError::io(&path, e))?;
    if opts.fsync == Fsync::Batch {
        // Make the new name durable, or a power loss could keep its data and lose the file.
        File::open(&opts.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| UplinkError::io(&opts.dir, e))?;
    }
    let seg = Segment {
        first_seq: seq,
        frames: 0,
        records: 0,
        bytes: 0,
        modified: SystemTime::now(),
        path,
    };
    Ok((seg, file))
}

/// Segment `path` must start where the previous one (`prev_seq`, `prev`) ended.
fn check_sequence(prev_seq: u64, prev: &Scan, seq: u64, path: &Path) -> Result<(), UplinkError> {
    if prev_seq + prev.frames == seq {
        return Ok(());
    }
    Err(corrupt(
        path,
        0,
        "sequence gap: the previous segment does not end where this one starts",
    ))
}

fn corrupt(path: &Path, offset: u64, what: &'static str) -> UplinkError {
    UplinkError::Corrupt {
        path: path.to_path_buf(),
        offset,
        what,
    }
}

/// Writes every byte of `slices` at offset `at` of `file`, with as few `pwritev` calls as the
/// kernel allows (at most `IOV_MAX` = 1024 slices each): one syscall per commit, where a seek
/// and a `writev` were two. The file's own position is neither used nor moved.
// std's `FileExt::write_vectored_at` is unstable: `pwritev` itself, one call.
#[allow(unsafe_code)]
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [IoSlice<'_>],
    mut at: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const IOV_MAX: usize = 1024;
    while !slices.is_empty() {
        let count = slices.len().min(IOV_MAX);
        let offset = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix (std guarantees it),
        // the `count` slices are valid for reads for the duration of the call, and the fd is
        // open for as long as `file` is borrowed.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count as libc::c_int,
                offset,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                let n = n as usize;
                IoSlice::advance_slices(&mut slices, n);
                at += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// The first four bytes of every frame.
const MAGIC: [u8; 4] = *b"rlu1";
/// magic + len + crc.
pub(super) const HEADER: usize = 12;
/// The size of a frame header, for callers that write [`Prepared`] appends themselves.
pub const FRAME_HEADER: usize = HEADER;
/// 16 MiB: far above a batch (`MAX_BATCH_BYTES` plus one record), and low enough that a
/// garbage length in a torn header is refused instead of read up to 4 GiB.
pub(super) const MAX_FRAME_PAYLOAD: usize = 16 << 20;
/// Partition directories are `shard-0`, `shard-1`, ...
const PARTITION_PREFIX: &str = "shard-";
/// Recovery reads segments in chunks of this size.
const READ_CHUNK: usize = 256 << 10;

#[cfg(test)]
mod tests;
