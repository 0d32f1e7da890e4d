//! A small hand-written io_uring reactor: the mechanism under the io_uring shard driver, with no
//! protocol logic. One [`Ring`] per shard thread; the driver feeds it sockets and bytes and reads
//! [`Completion`]s back, in a loop of [`Ring::wait`] (one `io_uring_enter`) and [`Ring::poll`].
//!
//! # What a `Ring` owns
//!
//! - The io_uring instance (SQ and CQ), set up with `SINGLE_ISSUER | DEFER_TASKRUN` when the
//!   kernel accepts it (see [`Ring::setup_mode`]). With `DEFER_TASKRUN` the kernel runs the work
//!   that completes our requests (a socket became readable, so the recv copies into a buffer and
//!   posts a CQE) only when this thread enters the kernel to wait for completions, in one batch,
//!   instead of interrupting the thread with task work on every return to user space. A shard
//!   thread does nothing but this loop, so batching at the enter is exactly right, and it is why
//!   the ring must be created, used and dropped on one thread (`Ring` is `!Send`).
//! - One provided-buffer ring (`IORING_REGISTER_PBUF_RING`, buffer group [`BGID`]) with
//!   `buffers` buffers of `buffer_size` bytes, in two anonymous mappings (page aligned, and pages
//!   that were never written cost no memory).
//! - The sockets handed to [`Ring::start`] (by slot), the listeners given to [`Ring::listen`],
//!   the bytes of queued sends, the buffers and iovecs of file writes, and the eventfd of the
//!   [`Waker`] with the 8 bytes its read lands in.
//!
//! # user_data encoding
//!
//! `kind << 56 | (generation & 0xff_ffff) << 32 | index` where `kind` is one of the `K_*`
//! constants (never 0), `index` is the slot (recv, send, shutdown, slot cancels), the listener
//! (accepts) or the write's key (writev, fsync), and `generation` is the slot's generation
//! (0 for the other kinds). A slot's generation changes when it is released, so a completion
//! that names an older generation is stale and ignored (after handing its buffer back). By
//! construction none should arrive: a slot is released only once its in-flight count is zero.
//!
//! # Buffer lifecycle
//!
//! A buffer is either in the kernel's ring (the kernel may pick it for any recv of this ring and
//! write into it) or lent to the caller (a [`Buf`] in a [`Completion::Data`]). The kernel picks
//! one only when bytes arrive, so an idle connection, with its multishot recv armed, holds no
//! buffer: that is the point of the design. The caller reads the bytes in place
//! ([`Ring::bytes_mut`]) and hands the buffer back ([`Ring::give_back`]), which writes it at the
//! ring's tail and publishes the tail with a release store. When the ring is empty the kernel
//! ends a multishot recv with `ENOBUFS` (the bytes stay in the socket); the slot waits in a queue
//! and its recv is re-armed when buffers come back.
//!
//! # Wake-up protocol
//!
//! [`Waker::wake`] sets an atomic `pending` flag with a swap and writes the eventfd only if the
//! flag was clear. The ring keeps one read on the eventfd in flight; when it completes the ring
//! clears `pending` (again a swap) *before* it reports [`Completion::Woken`], and re-arms the
//! read. The caller drains its channels after `Woken`. No message is left behind: a sender that
//! pushes a message and then finds `pending` set knows that the ring's clearing swap comes later
//! in the flag's modification order, and that swap reads the sender's write (release/acquire), so
//! the message is visible to the drain that follows `Woken`. A sender that finds `pending` clear
//! writes the eventfd, so a read completes (now or on the re-armed read) and another `Woken`
//! follows. At most one eventfd write is outstanding per `Woken`.
//!
//! # Teardown
//!
//! Dropping a `Ring` cancels everything in flight and waits (bounded) for the final completions,
//! so no request can still write into our memory when it is freed. Should that wait time out,
//! the memory requests may still use is leaked rather than freed. As a second line, the fields
//! are ordered so that the io_uring instance is dropped (the ring fd closed) before the buffers,
//! the send queues and the write buffers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;

#[cfg(test)]
mod tests;

/// The buffer group id of the provided-buffer ring (one group per `Ring`).
const BGID: u16 = 0;
/// Longest single send submitted; longer buffers go out in several sends.
const MAX_SEND: usize = 1 << 30;
/// Most iovecs in one writev (`IOV_MAX`); the rest follow as a continuation.
const MAX_IOV: usize = 1024;
/// How long dropping a `Ring` waits for cancelled requests before leaking their memory.
const DROP_DRAIN: Duration = Duration::from_secs(2);
const PAGE: usize = 4096;

const K_ACCEPT: u8 = 1;
const K_RECV: u8 = 2;
const K_SEND: u8 = 3;
const K_SHUTDOWN: u8 = 4;
/// A cancel aimed at a slot's requests (pause_recv, release); counts as the slot's request.
const K_CANCEL: u8 = 5;
const K_WAKE: u8 = 6;
const K_WRITE: u8 = 7;
const K_SYNC: u8 = 8;
const K_ACCEPT_CANCEL: u8 = 9;
const K_DROP_CANCEL: u8 = 10;
const GEN_MASK: u32 = 0xff_ffff;

fn user_data(kind: u8, gen: u32, index: usize) -> u64 {
    debug_assert!(
        u32::try_from(index).is_ok(),
        "index {index} does not fit user_data"
    );
    u64::from(kind) << 56 | u64::from(gen & GEN_MASK) << 32 | (index as u64 & 0xffff_ffff)
}

fn decode(ud: u64) -> (u8, u32, usize) {
    (
        (ud >> 56) as u8,
        (ud >> 32) as u32 & GEN_MASK,
        (ud & 0xffff_ffff) as usize,
    )
}

/// Sizes of a [`Ring`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingConfig {
    /// Submission queue entries (the completion queue gets four times as many).
    pub(crate) entries: u32,
    /// Provided buffers: a power of two, at most 32768.
    pub(crate) buffers: u16,
    /// Bytes per provided buffer.
    pub(crate) buffer_size: u32,
    /// After an accept error (e.g. EMFILE), accepting resumes this much later.
    pub(crate) accept_backoff: Duration,
    /// One accept op per connection, re-armed at the next [`Ring::wait`], instead of a
    /// multishot accept. A multishot accept takes every connection waiting in the backlog at
    /// once, before the loop sees the first: accept pacing ([`Ring::pause_accept`] after each
    /// one) needs the connections it holds back to stay in the kernel's backlog.
    pub(crate) accept_one_at_a_time: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            entries: 4096,
            buffers: 1024,
            buffer_size: 16384,
            accept_backoff: Duration::from_millis(100),
            accept_one_at_a_time: false,
        }
    }
}

/// One provided buffer lent to the caller: read it with [`Ring::bytes_mut`], return it with
/// [`Ring::give_back`]. Not `Clone`: a buffer goes back exactly once.
#[derive(Debug)]
pub(crate) struct Buf {
    id: u16,
    len: u32,
}

/// What [`Ring::poll`] reports.
#[derive(Debug)]
pub(crate) enum Completion {
    /// A new connection, `TCP_NODELAY` already set. Hand it to [`Ring::start`] or drop it.
    Accepted { stream: TcpStream, peer: SocketAddr },
    /// Accepting failed (e.g. EMFILE); the ring accepts again after `accept_backoff`.
    AcceptError(io::Error),
    /// Bytes received on `slot`: read them with [`Ring::bytes_mut`], then [`Ring::give_back`].
    Data { slot: usize, buf: Buf },
    /// The peer's end: EOF or a receive error. No more `Data` for `slot`.
    Closed { slot: usize },
    /// Every byte of `buf` was written (or the error); `buf` comes back for reuse.
    Sent {
        slot: usize,
        buf: Vec<u8>,
        result: io::Result<()>,
    },
    /// A [`Ring::write_at`] (and its fdatasync) finished.
    Written {
        token: u64,
        bufs: Vec<Vec<u8>>,
        result: io::Result<()>,
    },
    /// After [`Ring::release`]: nothing of `slot` is in flight and its fd is closed.
    Released { slot: usize },
    /// A [`Waker`] fired: drain the channels.
    Woken,
}

/// Counters since the ring was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingStats {
    /// `io_uring_enter` calls.
    pub(crate) enters: u64,
    /// CQEs reaped.
    pub(crate) completions: u64,
    /// Multishot recvs armed again after the kernel ended one (ENOBUFS, resume, limits).
    pub(crate) recv_rearms: u64,
    /// Multishot recvs ended by an empty buffer ring.
    pub(crate) enobufs: u64,
    /// Sends that wrote part of what was asked (the rest was submitted again).
    pub(crate) partial_sends: u64,
    /// Writevs that wrote part of what was asked.
    pub(crate) partial_writes: u64,
    /// Multishot accepts armed again.
    pub(crate) accept_rearms: u64,
    /// Accepted connections dropped because the peer's address was already gone.
    pub(crate) accept_dropped: u64,
    /// Completions that named a released slot's generation (should stay 0).
    pub(crate) stale: u64,
    /// Eventfd reads completed (`Woken`).
    pub(crate) wakes: u64,
    /// Times the SQ was full and was submitted without waiting to make room.
    pub(crate) sq_full: u64,
}

struct WakeInner {
    /// A blocking eventfd: the ring's read of it waits in the kernel until it is written.
    efd: File,
    pending: AtomicBool,
}

/// Wakes a [`Ring`] blocked in [`Ring::wait`] from any thread.
#[derive(Clone)]
pub(crate) struct Waker(Arc<WakeInner>);

impl Waker {
    /// Makes the ring report [`Completion::Woken`] soon (once for many calls). Push the message
    /// first, then wake.
    pub(crate) fn wake(&self) {
        if self.0.pending.swap(true, Ordering::AcqRel) {
            return; // a Woken is still to come, and the ring clears the flag before it
        }
        loop {
            match (&self.0.efd).write(&1u64.to_ne_bytes()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // cannot happen on a valid eventfd; never leave the flag set without a write
                Err(_) => self.0.pending.store(false, Ordering::Release),
                Ok(_) => {}
            }
            return;
        }
    }
}

/// An anonymous private mapping: page aligned, zero filled, unmapped on drop unless leaked.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
    leak: bool,
}

impl Region {
    fn new(len: usize) -> io::Result<Self> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: an anonymous private mapping at an address the kernel chooses aliases no
        // memory we already use; the result is checked for MAP_FAILED before any use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            ptr,
            len,
            leak: false,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: ptr/len are exactly what mmap returned; `leak` is false only when no
            // request can still use the memory (see `Ring`'s drop), and no reference into it
            // outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// An entry of the buffer ring, per the kernel ABI (`struct io_uring_buf`); in entry 0, `resv`
/// is the ring's tail.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}
const _: () = assert!(size_of::<RawBuf>() == size_of::<BufRingEntry>());

/// The provided buffers and the ring through which the kernel takes them.
struct BufPool {
    entries: Region,
    data: Region,
    count: u16,
    size: u32,
    /// Our copy of the tail we last published.
    tail: u16,
    /// Which buffers are lent to the caller (never in the kernel's ring).
    lent: Vec<bool>,
    lent_count: usize,
}

impl BufPool {
    fn new(count: u16, size: u32) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffers must be a power of two up to 32768, buffer_size above 0",
            ));
        }
        let bytes = usize::from(count)
            .checked_mul(size as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        Ok(Self {
            entries: Region::new(usize::from(count) * size_of::<RawBuf>())?,
            data: Region::new(bytes)?,
            count,
            size,
            tail: 0,
            lent: vec![false; usize::from(count)],
            lent_count: 0,
        })
    }

    fn tail_atomic(&self) -> &AtomicU16 {
        let base = self.entries.ptr.as_ptr().cast::<RawBuf>();
        // SAFETY: `base` is the page-aligned first entry of the mapping, which lives as long as
        // `self`; its `resv` field is the ring's tail (kernel ABI), a 2-aligned u16 that only
        // this thread writes and the kernel only reads, so viewing it as an AtomicU16 (same size
        // and alignment) is sound. We never form a reference to the whole entry.
        unsafe { &*ptr::addr_of!((*base).resv).cast::<AtomicU16>() }
    }

    /// Puts buffer `bid` at the tail without publishing it.
    fn stage(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.data.ptr.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: index < count, so the entry is inside the mapping. The kernel owns only the
        // entries from its head up to the published tail; at most `count - 1` buffers are in
        // the ring now (`bid` is not), so this entry is not among them and the kernel does not
        // read it before the release store in `publish`. We write the three fields through raw
        // pointers and never touch `resv`, which for entry 0 is the tail.
        unsafe {
            let e = self.entries.ptr.as_ptr().cast::<RawBuf>().add(index);
            ptr::addr_of_mut!((*e).addr).write(addr);
            ptr::addr_of_mut!((*e).len).write(self.size);
            ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        self.tail_atomic().store(self.tail, Ordering::Release);
    }

    /// Returns a buffer that was never lent (a CQE we do not surface) to the ring.
    fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count, "the kernel named buffer {bid}");
        self.stage(bid);
        self.publish();
    }

    fn free(&self) -> usize {
        usize::from(self.count) - self.lent_count
    }
}

/// A listener and its multishot accept.
struct Listener {
    sock: TcpListener,
    armed: bool,
    cancelling: bool,
    /// Accept again once this passes (after an error or `pause_accept`).
    resume_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Free,
    Open,
    Releasing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Recv {
    /// No recv in flight.
    #[default]
    Off,
    Armed,
    /// A cancel of the armed recv is in flight.
    Cancelling,
    /// Ended on ENOBUFS; waits in `Ring::nobufs` for buffers.
    NoBufs,
    /// EOF or error reported (`Closed`); never re-armed.
    Done,
}

#[derive(Default)]
struct Slot {
    state: State,
    stream: Option<TcpStream>,
    gen: u32,
    /// SQEs of this slot whose final CQE has not been reaped.
    ops: u32,
    recv: Recv,
    want_recv: bool,
    send_q: VecDeque<Vec<u8>>,
    /// Bytes of the front of `send_q` already written.
    send_off: usize,
    /// A send of the front of `send_q` is in flight.
    send_busy: bool,
    /// Errno of a failed send (0: wrote nothing); every later send fails with it.
    send_err: Option<i32>,
}

impl Slot {
    fn fd(&self) -> Fd {
        Fd(self.stream.as_ref().map_or(-1, AsRawFd::as_raw_fd))
    }
}

struct WriteOp {
    fd: RawFd,
    offset: u64,
    bufs: Vec<Vec<u8>>,
    /// The iovecs of the writev in flight (rebuilt only when nothing is in flight).
    iov: Vec<libc::iovec>,
    total: usize,
    done: usize,
    datasync: bool,
    synced: bool,
    /// CQEs still to come for what was submitted last.
    pending: u8,
    /// Errno of the first failure (0: a write that wrote nothing).
    err: Option<i32>,
    token: u64,
}

fn sent(slot: usize, buf: Vec<u8>, result: io::Result<()>) -> Completion {
    Completion::Sent { slot, buf, result }
}

fn errno(code: i32) -> io::Error {
    if code == 0 {
        io::Error::from(io::ErrorKind::WriteZero)
    } else {
        io::Error::from_raw_os_error(code)
    }
}

/// The reactor. See the module docs.
pub(crate) struct Ring {
    // Drop order is declaration order: the io_uring instance (ring fd) goes first, before any
    // memory a request may point to (buffer pool, eventfd counter, send queues, write buffers,
    // listeners' and streams' fds). `Drop for Ring` drains first; this order is the second line.
    uring: IoUring,
    pool: BufPool,
    /// Where the eventfd read lands; from `Box::into_raw`, freed in drop once drained.
    wake_buf: NonNull<u64>,
    slots: Vec<Slot>,
    writes: Slab<WriteOp>,
    listeners: Vec<Listener>,
    wake: Arc<WakeInner>,
    /// SQE chains (an entry and the one linked to it) for the next submission, in order.
    queued: VecDeque<(squeue::Entry, Option<squeue::Entry>)>,
    /// Completions produced without a CQE of their own, reported before further CQEs.
    ready: VecDeque<Completion>,
    /// Slots whose recv ended on ENOBUFS, with their generation, oldest first.
    nobufs: VecDeque<(usize, u32)>,
    /// SQEs queued (or in the SQ, or submitted) whose final CQE has not been reaped.
    inflight: usize,
    mode: &'static str,
    accept_backoff: Duration,
    accept_one_at_a_time: bool,
    stats: RingStats,
    /// `SINGLE_ISSUER`/`DEFER_TASKRUN` tie the ring to the thread that made it.
    _not_send: PhantomData<*const ()>,
}

/// Adds setup flags to a builder.
type SetupFlags = fn(&mut io_uring::Builder);

fn build_uring(entries: u32) -> io::Result<(IoUring, &'static str)> {
    let cq = entries.saturating_mul(4);
    let attempts: [(&str, SetupFlags); 4] = [
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }),
        ("single_issuer+defer_taskrun (no taskrun flag)", |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("plain", |_| {}),
    ];
    let mut last = None;
    for (mode, flags) in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq).setup_clamp();
        flags(&mut b);
        match b.build(entries) {
            Ok(ring) => return Ok((ring, mode)),
            // an older kernel refuses flags it does not know with EINVAL: try fewer
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

impl Ring {
    pub(crate) fn new(cfg: RingConfig) -> io::Result<Self> {
        let pool = BufPool::new(cfg.buffers, cfg.buffer_size)?;
        let (uring, mode) = build_uring(cfg.entries)?;
        if !uring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without EXT_ARG (kernel before 5.11)",
            ));
        }
        // SAFETY: the entries live in `pool.entries`, a page-aligned mapping of `buffers`
        // entries that is unmapped only after the io_uring instance is gone (field order, and
        // `Ring`'s drop), which unregisters the group.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                pool.entries.ptr.as_ptr() as u64,
                pool.count,
                BGID,
                0,
            )?;
        }
        // SAFETY: eventfd(2) has no memory arguments; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a new descriptor that nothing else owns.
        let efd = File::from(unsafe { OwnedFd::from_raw_fd(efd) });
        let mut ring = Self {
            uring,
            pool,
            wake_buf: NonNull::from(Box::leak(Box::new(0u64))),
            slots: Vec::new(),
            writes: Slab::new(),
            listeners: Vec::new(),
            wake: Arc::new(WakeInner {
                efd,
                pending: AtomicBool::new(false),
            }),
            queued: VecDeque::new(),
            ready: VecDeque::new(),
            nobufs: VecDeque::new(),
            inflight: 0,
            mode,
            accept_backoff: cfg.accept_backoff,
            accept_one_at_a_time: cfg.accept_one_at_a_time,
            stats: RingStats::default(),
            _not_send: PhantomData,
        };
        for bid in 0..ring.pool.count {
            ring.pool.stage(bid);
        }
        ring.pool.publish();
        ring.arm_wake();
        Ok(ring)
    }

    /// The setup flags the kernel accepted, e.g. `"single_issuer+defer_taskrun"`.
    pub(crate) fn setup_mode(&self) -> &'static str {
        self.mode
    }

    pub(crate) fn waker(&self) -> Waker {
        Waker(Arc::clone(&self.wake))
    }

    pub(crate) fn stats(&self) -> RingStats {
        self.stats
    }

    /// Buffers not lent to the caller (in the kernel's ring, or picked by the kernel for a
    /// completion not reaped yet).
    #[cfg_attr(not(test), allow(dead_code))] // for the tests and diagnostics
    pub(crate) fn free_buffers(&self) -> usize {
        self.pool.free()
    }

    /// Buffers in the kernel's ring right now, as the kernel sees it (`PBUF_STATUS`, 6.8+).
    #[cfg_attr(not(test), allow(dead_code))] // for the tests and diagnostics
    pub(crate) fn kernel_free_buffers(&self) -> io::Result<usize> {
        #[repr(C)]
        struct BufStatus {
            buf_group: u32,
            head: u32,
            resv: [u32; 8],
        }
        const IORING_REGISTER_PBUF_STATUS: libc::c_long = 26;
        let mut st = BufStatus {
            buf_group: u32::from(BGID),
            head: 0,
            resv: [0; 8],
        };
        // SAFETY: the register call reads `buf_group` and writes `head` of `st`, which is
        // `struct io_uring_buf_status` of the kernel ABI, lives across the call, and is passed
        // with nr_args 1 as the ABI requires; the ring fd is open while `self` is.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.uring.as_raw_fd(),
                IORING_REGISTER_PBUF_STATUS,
                ptr::addr_of_mut!(st),
                1,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::from(self.pool.tail.wrapping_sub(st.head as u16)))
    }

    /// Queues an SQE chain (`first`, then `linked` if `first` carries `IO_LINK`) for the next
    /// [`Ring::wait`], in order. Never drops one.
    ///
    /// # Safety
    ///
    /// Every buffer, iovec and fd the entries point to must stay valid until the entries'
    /// final CQEs are reaped.
    unsafe fn queue(&mut self, first: squeue::Entry, linked: Option<squeue::Entry>) {
        self.inflight += 1 + usize::from(linked.is_some());
        self.queued.push_back((first, linked));
    }

    /// Moves the queued SQEs into the SQ, submitting without waiting whenever the SQ is full
    /// (a linked pair always goes into one submission, or the link would break).
    fn fill_sq(&mut self) -> io::Result<()> {
        while let Some((first, linked)) = self.queued.front() {
            let n = 1 + usize::from(linked.is_some());
            let mut sq = self.uring.submission();
            if sq.capacity() - sq.len() < n {
                drop(sq);
                self.stats.enters += 1;
                self.stats.sq_full += 1;
                match self.uring.submit() {
                    Ok(0) => return Ok(()), // the kernel took nothing: try at the next wait
                    Ok(_) => continue,
                    Err(e) if is_transient(&e) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            // SAFETY: there is room for the whole chain (checked above); `queue`'s callers
            // vouched that the memory each entry uses stays valid until its final CQE.
            unsafe {
                match linked {
                    Some(l) => sq.push_multiple(&[first.clone(), l.clone()]),
                    None => sq.push(first),
                }
                .expect("SQ has room");
            }
            drop(sq);
            self.queued.pop_front();
        }
        Ok(())
    }

    /// Submits everything queued since the last call and waits, in one `io_uring_enter`, for
    /// at least one completion or until `deadline`. Does not wait when completions are already
    /// there or the deadline has passed. May return early (a signal, or an accept pause ending).
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let now = Instant::now();
        self.resume_accepts(now);
        self.fill_sq()?;
        let have = !self.ready.is_empty() || !self.uring.completion().is_empty();
        let to_submit = !self.uring.submission().is_empty();
        if have && !to_submit {
            return Ok(());
        }
        let wake_at = self
            .listeners
            .iter()
            .filter(|l| !l.armed)
            .filter_map(|l| l.resume_at)
            .min();
        let deadline = match (deadline, wake_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.stats.enters += 1;
        let result = if have {
            self.uring.submit().map(drop)
        } else {
            let ts = deadline.map(|d| Timespec::from(d.saturating_duration_since(now)));
            let args = SubmitArgs::new();
            let args = match &ts {
                Some(ts) => args.timespec(ts),
                None => args,
            };
            self.uring.submitter().submit_with_args(1, &args).map(drop)
        };
        match result {
            Err(e) if is_transient(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            other => other,
        }
    }

    /// The next completion, if one is there; handles internal completions (re-arms, cancels,
    /// partial sends and writes, eventfd reads) itself.
    pub(crate) fn poll(&mut self) -> Option<Completion> {
        loop {
            if let Some(c) = self.ready.pop_front() {
                return Some(c);
            }
            let cqe = self.uring.completion().next()?;
            self.stats.completions += 1;
            if let Some(c) = self.handle(&cqe) {
                return Some(c);
            }
        }
    }

    fn handle(&mut self, cqe: &cqueue::Entry) -> Option<Completion> {
        let (res, flags) = (cqe.result(), cqe.flags());
        let more = cqueue::more(flags);
        if !more {
            self.inflight -= 1;
        }
        let (kind, gen, index) = decode(cqe.user_data());
        match kind {
            K_RECV | K_SEND | K_SHUTDOWN | K_CANCEL => {
                let live = self
                    .slots
                    .get(index)
                    .is_some_and(|s| s.state != State::Free && s.gen == gen);
                if !live {
                    self.stats.stale += 1;
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.pool.recycle(bid);
                    }
                    return None;
                }
                let out = match kind {
                    K_RECV => self.on_recv(index, res, flags, more),
                    K_SEND => self.on_send(index, res),
                    _ => None,
                };
                if !more {
                    let s = &mut self.slots[index];
                    s.ops -= 1;
                    if s.state == State::Releasing && s.ops == 0 {
                        self.finish_release(index);
                    }
                }
                out
            }
            K_ACCEPT => self.on_accept(index, res, more),
            K_WAKE => {
                self.stats.wakes += 1;
                // Clear `pending` before reporting Woken (see the module docs), and keep a read
                // in flight.
                self.wake.pending.swap(false, Ordering::AcqRel);
                self.arm_wake();
                Some(Completion::Woken)
            }
            K_WRITE | K_SYNC => self.on_write(kind, index, res),
            _ => None, // cancels of accepts: nothing to do
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            Fd(self.wake.efd.as_raw_fd()),
            self.wake_buf.as_ptr().cast(),
            8,
        )
        .build()
        .user_data(user_data(K_WAKE, 0, 0));
        // SAFETY: the read lands in `wake_buf`, a heap u64 freed only in drop after every
        // request has completed (else leaked); the eventfd is held by `self.wake` until the
        // ring is gone. Only one read is in flight: it is re-armed from its own completion.
        unsafe { self.queue(e, None) };
    }

    // ---- accept ----

    /// Accepts connections on `listener` with a multishot accept, re-armed when the kernel
    /// ends it. Blocking or not does not matter: io_uring polls sockets itself.
    pub(crate) fn listen(&mut self, listener: TcpListener) {
        self.listeners.push(Listener {
            sock: listener,
            armed: false,
            cancelling: false,
            resume_at: None,
        });
        self.arm_accept(self.listeners.len() - 1);
    }

    fn arm_accept(&mut self, index: usize) {
        let l = &mut self.listeners[index];
        l.armed = true;
        let fd = Fd(l.sock.as_raw_fd());
        let e = if self.accept_one_at_a_time {
            opcode::Accept::new(fd, ptr::null_mut(), ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        } else {
            opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build()
        };
        let e = e.user_data(user_data(K_ACCEPT, 0, index));
        // SAFETY: an accept without an address buffer points to no memory (null address and
        // length); the listener's fd is owned by `self.listeners`, dropped only after the ring.
        unsafe { self.queue(e, None) };
    }

    /// No accept completions until `until` (after EMFILE, say): cancels the armed accept and
    /// re-arms it at the first `wait` after `until`. Connections the kernel accepted before
    /// the cancel took effect are still reported.
    pub(crate) fn pause_accept(&mut self, until: Instant) {
        for index in 0..self.listeners.len() {
            let l = &mut self.listeners[index];
            l.resume_at = Some(l.resume_at.map_or(until, |t| t.max(until)));
            if l.armed && !l.cancelling {
                l.cancelling = true;
                let e = opcode::AsyncCancel::new(user_data(K_ACCEPT, 0, index))
                    .build()
                    .user_data(user_data(K_ACCEPT_CANCEL, 0, index));
                // SAFETY: a cancel points to no memory.
                unsafe { self.queue(e, None) };
            }
        }
    }

    fn resume_accepts(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            let l = &mut self.listeners[index];
            if !l.armed && l.resume_at.is_some_and(|t| t <= now) {
                l.resume_at = None;
                self.stats.accept_rearms += 1;
                self.arm_accept(index);
            }
        }
    }

    fn on_accept(&mut self, index: usize, res: i32, more: bool) -> Option<Completion> {
        let l = self.listeners.get_mut(index)?;
        if !more {
            l.armed = false;
            l.cancelling = false;
            if res >= 0 && l.resume_at.is_none() {
                if self.accept_one_at_a_time {
                    // Re-armed at the next `wait`, after the caller has seen this connection
                    // and perhaps paused accepting.
                    l.resume_at = Some(Instant::now());
                } else {
                    // the kernel ended the multishot without an error: keep accepting
                    self.stats.accept_rearms += 1;
                    self.arm_accept(index);
                }
            }
        }
        if res >= 0 {
            // SAFETY: a successful accept CQE carries a new descriptor that nothing else owns.
            let stream = unsafe { TcpStream::from_raw_fd(res) };
            let _ = stream.set_nodelay(true);
            return match stream.peer_addr() {
                Ok(peer) => Some(Completion::Accepted { stream, peer }),
                Err(_) => {
                    self.stats.accept_dropped += 1;
                    None // reset before we saw it; dropping it closes it
                }
            };
        }
        if res == -libc::ECANCELED {
            return None; // pause_accept
        }
        let l = &mut self.listeners[index];
        l.resume_at = Some(Instant::now() + self.accept_backoff);
        if more && !l.cancelling {
            // still armed after an error: stop it so the backoff holds
            l.cancelling = true;
            let e = opcode::AsyncCancel::new(user_data(K_ACCEPT, 0, index))
                .build()
                .user_data(user_data(K_ACCEPT_CANCEL, 0, index));
            // SAFETY: a cancel points to no memory.
            unsafe { self.queue(e, None) };
        }
        Some(Completion::AcceptError(io::Error::from_raw_os_error(-res)))
    }

    // ---- connections ----

    fn slot_mut(&mut self, slot: usize, what: &str) -> Option<&mut Slot> {
        let s = self.slots.get_mut(slot)?;
        debug_assert!(s.state != State::Free, "{what} on free slot {slot}");
        (s.state == State::Open).then_some(s)
    }

    /// Takes `stream` as connection `slot` and starts receiving into provided buffers. The
    /// slot must be free (never used, or `Released`). Blocking or not does not matter.
    pub(crate) fn start(&mut self, slot: usize, stream: TcpStream) {
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, Slot::default);
        }
        let s = &mut self.slots[slot];
        assert!(s.state == State::Free, "start on busy slot {slot}");
        debug_assert!(s.ops == 0 && s.send_q.is_empty());
        s.state = State::Open;
        s.stream = Some(stream);
        s.want_recv = true;
        s.recv = Recv::Off;
        s.send_err = None;
        self.arm_recv(slot);
    }

    fn arm_recv(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.recv = Recv::Armed;
        s.ops += 1;
        let e = opcode::RecvMulti::new(s.fd(), BGID)
            .build()
            .user_data(user_data(K_RECV, s.gen, slot));
        // SAFETY: the recv writes only into buffers it takes from our registered buffer ring,
        // which lives until the ring is gone; the socket is owned by the slot and closed only
        // once the slot's in-flight count is zero.
        unsafe { self.queue(e, None) };
    }

    fn on_recv(&mut self, slot: usize, res: i32, flags: u32, more: bool) -> Option<Completion> {
        let s = &mut self.slots[slot];
        let mut out = None;
        debug_assert!(res <= 0 || cqueue::buffer_select(flags).is_some());
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 && s.state == State::Open {
                assert!(!self.pool.lent[usize::from(bid)], "buffer {bid} lent twice");
                self.pool.lent[usize::from(bid)] = true;
                self.pool.lent_count += 1;
                let buf = Buf {
                    id: bid,
                    len: res as u32,
                };
                out = Some(Completion::Data { slot, buf });
            } else {
                self.pool.recycle(bid);
            }
        }
        if more {
            return out;
        }
        s.recv = Recv::Off;
        if s.state != State::Open {
            return out;
        }
        match res {
            r if r > 0 || r == -libc::ECANCELED => {
                if s.want_recv {
                    self.stats.recv_rearms += 1;
                    self.arm_recv(slot);
                }
            }
            r if r == -libc::ENOBUFS => {
                self.stats.enobufs += 1;
                s.recv = Recv::NoBufs;
                self.nobufs.push_back((slot, s.gen));
                self.rearm_nobufs();
            }
            _ => {
                // EOF or a receive error: the peer's end
                s.recv = Recv::Done;
                let closed = Completion::Closed { slot };
                if out.is_none() {
                    return Some(closed);
                }
                self.ready.push_back(closed);
            }
        }
        out
    }

    /// Re-arms recvs that ended on ENOBUFS, oldest first, at most one per free buffer.
    fn rearm_nobufs(&mut self) {
        let mut budget = self.pool.free();
        while budget > 0 {
            let Some((slot, gen)) = self.nobufs.pop_front() else {
                return;
            };
            let s = &mut self.slots[slot];
            if s.gen != gen || s.state != State::Open || s.recv != Recv::NoBufs {
                continue;
            }
            if s.want_recv {
                budget -= 1;
                self.stats.recv_rearms += 1;
                self.arm_recv(slot);
            } else {
                s.recv = Recv::Off; // paused meanwhile: resume_recv arms it
            }
        }
    }

    /// Backpressure: stops receiving on `slot` (cancels its recv). `Data` already on its way
    /// may still arrive until the cancel completes; none after.
    pub(crate) fn pause_recv(&mut self, slot: usize) {
        let Some(s) = self.slot_mut(slot, "pause_recv") else {
            return;
        };
        s.want_recv = false;
        if s.recv == Recv::Armed {
            s.recv = Recv::Cancelling;
            s.ops += 1;
            let e = opcode::AsyncCancel::new(user_data(K_RECV, s.gen, slot))
                .build()
                .user_data(user_data(K_CANCEL, s.gen, slot));
            // SAFETY: a cancel points to no memory.
            unsafe { self.queue(e, None) };
        }
    }

    /// Receives on `slot` again after [`Ring::pause_recv`].
    pub(crate) fn resume_recv(&mut self, slot: usize) {
        let Some(s) = self.slot_mut(slot, "resume_recv") else {
            return;
        };
        s.want_recv = true;
        if s.recv == Recv::Off {
            self.stats.recv_rearms += 1;
            self.arm_recv(slot);
        }
        // Cancelling: re-armed when the cancelled recv ends; NoBufs: when buffers come back
    }

    /// Queues `buf` for `slot`. Sends of a slot go out in order, one in flight at a time;
    /// partial sends are continued; [`Completion::Sent`] reports each buffer once.
    pub(crate) fn send(&mut self, slot: usize, buf: Vec<u8>) {
        let Some(s) = self.slot_mut(slot, "send") else {
            return; // released: the caller is done with it
        };
        if let Some(code) = s.send_err {
            let result = Err(errno(code));
            self.ready.push_back(Completion::Sent { slot, buf, result });
            return;
        }
        s.send_q.push_back(buf);
        self.kick_send(slot);
    }

    /// Whether a send of `slot` is queued or in flight.
    pub(crate) fn sending(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| !s.send_q.is_empty())
    }

    fn kick_send(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.send_busy || s.state != State::Open {
            return;
        }
        while s.send_q.front().is_some_and(Vec::is_empty) {
            let buf = s.send_q.pop_front().unwrap_or_default();
            self.ready.push_back(sent(slot, buf, Ok(())));
        }
        let Some(front) = s.send_q.front() else {
            // An idle connection keeps no queue memory (a VecDeque keeps its capacity).
            s.send_q = VecDeque::new();
            return;
        };
        let rest = &front[s.send_off..];
        let len = rest.len().min(MAX_SEND) as u32;
        let e = opcode::Send::new(s.fd(), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(K_SEND, s.gen, slot));
        s.send_busy = true;
        s.ops += 1;
        // SAFETY: the send reads `len` bytes from the heap buffer of the Vec at the front of
        // the slot's queue. While `send_busy` that Vec is neither popped, changed nor dropped
        // (only `on_send` pops it, after this CQE; a released slot's queue is cleared only when
        // its in-flight count is zero); moving the Vec does not move its heap buffer.
        unsafe { self.queue(e, None) };
    }

    fn on_send(&mut self, slot: usize, res: i32) -> Option<Completion> {
        let s = &mut self.slots[slot];
        s.send_busy = false;
        if s.state != State::Open {
            return None;
        }
        if res <= 0 {
            let code = -res;
            s.send_err = Some(code);
            s.send_off = 0;
            let mut failed = s.send_q.drain(..);
            let first = failed.next().map(|buf| sent(slot, buf, Err(errno(code))));
            for buf in failed {
                let result = Err(errno(code));
                self.ready.push_back(Completion::Sent { slot, buf, result });
            }
            return first;
        }
        let front_len = s.send_q.front().map_or(0, Vec::len);
        if (res as usize) < (front_len - s.send_off).min(MAX_SEND) {
            self.stats.partial_sends += 1;
        }
        s.send_off += res as usize;
        let out = if s.send_off >= front_len {
            s.send_off = 0;
            s.send_q.pop_front().map(|buf| sent(slot, buf, Ok(())))
        } else {
            None
        };
        self.kick_send(slot);
        out
    }

    /// `shutdown(SHUT_RDWR)` on `slot`: a pending recv then ends (`Closed`, unless recv is
    /// paused), a stuck send fails.
    pub(crate) fn shutdown(&mut self, slot: usize) {
        let Some(s) = self.slot_mut(slot, "shutdown") else {
            return;
        };
        s.ops += 1;
        let e = opcode::Shutdown::new(s.fd(), libc::SHUT_RDWR)
            .build()
            .user_data(user_data(K_SHUTDOWN, s.gen, slot));
        // SAFETY: a shutdown points to no memory; the socket is open while the slot has ops.
        unsafe { self.queue(e, None) };
    }

    /// The caller is done with `slot`: cancels what is in flight, closes the fd once nothing
    /// is, then reports [`Completion::Released`]. Until then nothing else is reported for the
    /// slot; queued sends are dropped.
    pub(crate) fn release(&mut self, slot: usize) {
        let Some(s) = self.slot_mut(slot, "release") else {
            return;
        };
        s.state = State::Releasing;
        if s.ops == 0 {
            self.finish_release(slot);
            return;
        }
        if matches!(s.recv, Recv::Armed | Recv::Cancelling) || s.send_busy {
            s.ops += 1;
            let e = opcode::AsyncCancel2::new(CancelBuilder::fd(s.fd()).all())
                .build()
                .user_data(user_data(K_CANCEL, s.gen, slot));
            // SAFETY: a cancel points to no memory.
            unsafe { self.queue(e, None) };
        }
    }

    fn finish_release(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        debug_assert!(s.ops == 0);
        s.stream = None; // close(2): no request of the slot is in flight
        s.state = State::Free;
        s.gen = s.gen.wrapping_add(1) & GEN_MASK;
        s.recv = Recv::Off;
        s.want_recv = false;
        s.send_q.clear();
        s.send_off = 0;
        s.send_busy = false;
        s.send_err = None;
        self.ready.push_back(Completion::Released { slot });
    }

    // ---- buffers ----

    /// The received bytes of `buf`, in place.
    pub(crate) fn bytes_mut(&mut self, buf: &Buf) -> &mut [u8] {
        let id = usize::from(buf.id);
        assert!(self.pool.lent[id], "buffer {id} is not lent");
        let len = (buf.len as usize).min(self.pool.size as usize);
        // SAFETY: the buffer is lent (checked), so it is not in the kernel's ring and no
        // request writes into it; it goes back only through `give_back(&mut self)`, which
        // cannot run while this borrow of `self` lives. The range is inside the mapping:
        // id < count and len <= size.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool
                    .data
                    .ptr
                    .as_ptr()
                    .add(id * self.pool.size as usize),
                len,
            )
        }
    }

    /// Returns `buf` to the kernel's buffer ring, and re-arms recvs that stopped on ENOBUFS.
    pub(crate) fn give_back(&mut self, buf: Buf) {
        let id = usize::from(buf.id);
        assert!(self.pool.lent[id], "buffer {id} given back twice");
        self.pool.lent[id] = false;
        self.pool.lent_count -= 1;
        self.pool.recycle(buf.id);
        if !self.nobufs.is_empty() {
            self.rearm_nobufs();
        }
    }

    // ---- file writes ----

    /// Writes `bufs` at `offset` of `fd` (continuing short writes), then, with `datasync`,
    /// fdatasyncs it (linked to the write). One [`Completion::Written`] when all is done. `fd`
    /// must stay open until then.
    pub(crate) fn write_at(
        &mut self,
        fd: RawFd,
        offset: u64,
        bufs: Vec<Vec<u8>>,
        datasync: bool,
        token: u64,
    ) {
        let total = bufs.iter().map(Vec::len).sum();
        if total == 0 && !datasync {
            let result = Ok(());
            self.ready.push_back(Completion::Written {
                token,
                bufs,
                result,
            });
            return;
        }
        let key = self.writes.insert(WriteOp {
            fd,
            offset,
            bufs,
            iov: Vec::new(),
            total,
            done: 0,
            datasync,
            synced: false,
            pending: 0,
            err: None,
            token,
        });
        self.submit_write(key);
    }

    fn submit_write(&mut self, key: usize) {
        let w = &mut self.writes[key];
        debug_assert_eq!(w.pending, 0);
        w.iov.clear();
        let mut skip = w.done;
        let mut covered = 0;
        for b in &w.bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let rest = &b[skip..];
            skip = 0;
            covered += rest.len();
            w.iov.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            });
            if w.iov.len() == MAX_IOV {
                break;
            }
        }
        let sync = w.datasync && w.done + covered == w.total;
        w.synced = false;
        let fsync = opcode::Fsync::new(Fd(w.fd))
            .flags(FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data(K_SYNC, 0, key));
        let (first, linked) = if w.iov.is_empty() {
            (fsync, None)
        } else {
            let writev = opcode::Writev::new(Fd(w.fd), w.iov.as_ptr(), w.iov.len() as u32)
                .offset(w.offset + w.done as u64)
                .build()
                .user_data(user_data(K_WRITE, 0, key));
            if sync {
                (writev.flags(squeue::Flags::IO_LINK), Some(fsync))
            } else {
                (writev, None)
            }
        };
        w.pending = 1 + u8::from(linked.is_some());
        // SAFETY: the writev reads the iovec array `w.iov` and the heap buffers of `w.bufs`.
        // Both belong to the WriteOp in `self.writes`, which is removed only when `pending`
        // drops to zero (every CQE reaped), and neither Vec is changed while `pending > 0`;
        // moving the WriteOp (slab growth) does not move their heap buffers. The fd is the
        // caller's, kept open until `Written` (documented on `write_at`).
        unsafe { self.queue(first, linked) };
    }

    fn on_write(&mut self, kind: u8, key: usize, res: i32) -> Option<Completion> {
        let w = self.writes.get_mut(key)?;
        w.pending -= 1;
        if kind == K_WRITE {
            match res {
                r if r < 0 => {
                    w.err.get_or_insert(-r);
                }
                0 => {
                    w.err.get_or_insert(0);
                }
                r => {
                    let asked: usize = w.iov.iter().map(|v| v.iov_len).sum();
                    if (r as usize) < asked {
                        self.stats.partial_writes += 1;
                    }
                    w.done += r as usize;
                }
            }
        } else if res == 0 {
            w.synced = true;
        } else if res != -libc::ECANCELED {
            // ECANCELED: the link broke on a short or failed write; handled above
            w.err.get_or_insert(-res);
        }
        if w.pending > 0 {
            return None;
        }
        if w.err.is_none() && (w.done < w.total || (w.datasync && !w.synced)) {
            self.submit_write(key);
            return None;
        }
        let w = self.writes.remove(key);
        let result = w.err.map_or(Ok(()), |code| Err(errno(code)));
        Some(Completion::Written {
            token: w.token,
            bufs: w.bufs,
            result,
        })
    }
}

impl Ring {
    /// Teardown: cancels every request and reaps CQEs (handling none) until nothing is in
    /// flight or `within` has passed. True when nothing is in flight.
    fn cancel_all_and_drain(&mut self, within: Duration) -> bool {
        if self.inflight == 0 {
            return true;
        }
        let e = opcode::AsyncCancel2::new(CancelBuilder::any().all())
            .build()
            .user_data(user_data(K_DROP_CANCEL, 0, 0));
        // SAFETY: a cancel points to no memory. It follows everything queued, so once
        // submitted it cancels all of it.
        unsafe { self.queue(e, None) };
        let deadline = Instant::now() + within;
        while self.inflight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = self.fill_sq();
            let ts = Timespec::from(deadline - now);
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.uring.submitter().submit_with_args(1, &args);
            while let Some(cqe) = self.uring.completion().next() {
                if !cqueue::more(cqe.flags()) {
                    self.inflight -= 1;
                }
                if decode(cqe.user_data()).0 == K_ACCEPT && cqe.result() >= 0 {
                    // SAFETY: a new descriptor from an accept, owned by nobody: close it.
                    drop(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
                }
            }
        }
        true
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.cancel_all_and_drain(DROP_DRAIN) {
            // Requests we could not reap may still use this memory: leak it, never free it.
            self.pool.entries.leak = true;
            self.pool.data.leak = true;
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::take(&mut self.writes));
        } else {
            // SAFETY: `wake_buf` came from `Box::leak` in `new` and nothing uses it any more:
            // every request, the eventfd read included, has completed.
            drop(unsafe { Box::from_raw(self.wake_buf.as_ptr()) });
        }
    }
}
