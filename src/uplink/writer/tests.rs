use std::io;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;
use crate::uplink::test_support::{batch, TestDir};
use crate::uplink::{Batcher, Fsync, LogOptions};

type Calls = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;
/// `(batch id, acks, result)` in the order the callbacks ran.
type Dones = Arc<Mutex<Vec<(u32, Vec<u32>, Result<(), String>)>>>;

/// Records every write; optionally waits at each write until the test lets it go, and
/// optionally fails.
struct TestSink {
    calls: Calls,
    gate: Option<(Sender<()>, Receiver<()>)>,
    fail: bool,
}

impl Sink for TestSink {
    fn write(&mut self, batches: &[&[u8]]) -> Result<(), UplinkError> {
        if let Some((entered, release)) = &self.gate {
            let _ = entered.send(());
            // Once the test drops its sender, writes no longer wait.
            let _ = release.recv();
        }
        self.calls
            .lock()
            .expect("calls")
            .push(batches.iter().map(|b| b.to_vec()).collect());
        if self.fail {
            return Err(UplinkError::io(
                "test-sink",
                io::Error::other("disk on fire"),
            ));
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        7
    }
}

struct Harness {
    writer: Writer<u32>,
    calls: Calls,
    /// Receives one message each time the sink enters `write`.
    entered: Receiver<()>,
    /// Send one message to let one gated write finish; drop to open the gate for good.
    release: Option<Sender<()>>,
    done: Dones,
}

impl Harness {
    fn new(queue: usize, gated: bool, fail: bool) -> Self {
        let calls = Calls::default();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let sink = TestSink {
            calls: calls.clone(),
            gate: gated.then_some((entered_tx, release_rx)),
            fail,
        };
        Self {
            writer: Writer::spawn(Box::new(sink), queue),
            calls,
            entered,
            release: Some(release),
            done: Arc::default(),
        }
    }

    /// A batch with id `id` (its bytes say so) and acks `[id * 10, id * 10 + 1]`.
    fn batch(id: u32) -> Batch<u32> {
        Batch {
            bytes: format!("{{\"id\":{id}}}\n").into_bytes(),
            records: 1,
            acks: vec![id * 10, id * 10 + 1],
        }
    }

    fn submit(&self, id: u32) -> Result<(), Batch<u32>> {
        let done = self.done.clone();
        self.writer.submit(
            Self::batch(id),
            Box::new(move |b: Batch<u32>, r: Result<(), UplinkError>| {
                done.lock()
                    .expect("done")
                    .push((id, b.acks, r.map_err(|e| e.to_string())));
            }),
        )
    }

    fn open_gate(&mut self) {
        self.release = None;
    }
}

fn bytes_of(ids: &[u32]) -> Vec<Vec<u8>> {
    ids.iter().map(|&id| Harness::batch(id).bytes).collect()
}

#[test]
fn a_writer_is_shared_between_shards() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Writer<crate::session::AckToken>>();
    send_sync::<WriterStats>();
}

#[test]
fn queued_batches_share_one_group_commit() {
    let mut h = Harness::new(8, true, false);
    h.submit(0).expect("queued");
    h.entered.recv().expect("the thread is writing batch 0");
    // While it is busy, three more queue up...
    for id in 1..4 {
        h.submit(id).expect("queued");
    }
    h.open_gate();
    let stats = h.writer.stats();
    h.writer.shutdown().expect("clean shutdown");
    // ...and go out together, in one sink.write.
    assert_eq!(
        h.calls.lock().expect("calls").clone(),
        [bytes_of(&[0]), bytes_of(&[1, 2, 3])]
    );
    let done = h.done.lock().expect("done").clone();
    assert_eq!(
        done,
        (0..4)
            .map(|id| (id, vec![id * 10, id * 10 + 1], Ok(())))
            .collect::<Vec<_>>(),
        "every done ran once, in order, with its acks and the result"
    );
    assert_eq!(stats.writes.load(Ordering::Relaxed), 2);
    assert_eq!(stats.batches.load(Ordering::Relaxed), 4);
    assert_eq!(stats.records.load(Ordering::Relaxed), 4);
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
    assert_eq!(stats.sink_bytes.load(Ordering::Relaxed), 7);
    let bytes: usize = bytes_of(&[0, 1, 2, 3]).iter().map(Vec::len).sum();
    assert_eq!(stats.bytes.load(Ordering::Relaxed), bytes as u64);
}

#[test]
fn a_full_queue_gives_the_batch_back() {
    let h = Harness::new(2, true, false);
    h.submit(0).expect("queued");
    h.entered.recv().expect("the thread is writing batch 0");
    h.submit(1).expect("queued");
    h.submit(2).expect("queued");
    let back = h.submit(3).expect_err("queue full");
    assert_eq!(back.bytes, Harness::batch(3).bytes, "nothing dropped");
    assert_eq!(back.acks, [30, 31]);
    assert_eq!(h.writer.stats().queue_full.load(Ordering::Relaxed), 1);
    // Let batch 0 go; the thread then takes 1 and 2 (and waits in their write).
    h.release.as_ref().expect("gate").send(()).expect("release");
    h.entered.recv().expect("writing 1 and 2");
    // The caller retries the batch it kept: now there is room.
    let done = h.done.clone();
    h.writer
        .submit(
            back,
            Box::new(move |b, r| {
                done.lock()
                    .expect("done")
                    .push((3, b.acks, r.map_err(|e| e.to_string())));
            }),
        )
        .expect("room again");
    let mut h = h;
    h.open_gate();
    let calls = Arc::clone(&h.calls);
    let done = Arc::clone(&h.done);
    h.writer.shutdown().expect("clean");
    assert_eq!(
        calls.lock().expect("calls").clone(),
        [bytes_of(&[0]), bytes_of(&[1, 2]), bytes_of(&[3])]
    );
    let ids: Vec<u32> = done.lock().expect("done").iter().map(|d| d.0).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
}

#[test]
fn a_failing_sink_reaches_every_done() {
    let mut h = Harness::new(8, true, true);
    h.submit(0).expect("queued");
    h.entered.recv().expect("writing 0");
    h.submit(1).expect("queued");
    h.submit(2).expect("queued");
    h.open_gate();
    let stats = h.writer.stats();
    h.writer.shutdown().expect("the thread itself is fine");
    let done = h.done.lock().expect("done").clone();
    assert_eq!(done.len(), 3);
    for (i, (id, acks, result)) in done.iter().enumerate() {
        assert_eq!(*id, i as u32);
        assert_eq!(acks.len(), 2, "the acks come back to be failed");
        assert_eq!(result, &Err("test-sink: disk on fire".to_string()));
    }
    assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
    assert_eq!(stats.writes.load(Ordering::Relaxed), 2);
}

#[test]
fn shutdown_flushes_everything_queued() {
    let h = Harness::new(1000, false, false);
    for id in 0..500 {
        h.submit(id).expect("room");
    }
    let calls = Arc::clone(&h.calls);
    let done = Arc::clone(&h.done);
    h.writer.shutdown().expect("clean");
    let written: Vec<Vec<u8>> = calls.lock().expect("calls").concat();
    assert_eq!(written, bytes_of(&(0..500).collect::<Vec<_>>()));
    let calls = calls.lock().expect("calls");
    assert!(calls.iter().all(|c| c.len() <= MAX_GROUP));
    let ids: Vec<u32> = done.lock().expect("done").iter().map(|d| d.0).collect();
    assert_eq!(ids, (0..500).collect::<Vec<_>>());
}

#[test]
fn group_is_bounded_by_bytes() {
    let mut h = Harness::new(64, true, false);
    let big = |id: u32| Batch {
        bytes: {
            let mut b = vec![b' '; 400 << 10];
            b.push(b'\n');
            b[0] = id as u8;
            b
        },
        records: 1,
        acks: vec![id],
    };
    h.writer.submit(big(0), Box::new(|_, _| {})).expect("room");
    h.entered.recv().expect("writing 0");
    for id in 1..6 {
        h.writer.submit(big(id), Box::new(|_, _| {})).expect("room");
    }
    h.open_gate();
    let calls = Arc::clone(&h.calls);
    h.writer.shutdown().expect("clean");
    let sizes: Vec<usize> = calls.lock().expect("calls").iter().map(Vec::len).collect();
    // 400 KiB each: a group stops once it holds 1 MiB or more.
    assert_eq!(sizes, [1, 3, 2]);
}

#[test]
fn a_panicking_done_stops_the_writer_and_submits_are_refused() {
    let h = Harness::new(4, false, false);
    h.writer
        .submit(Harness::batch(0), Box::new(|_, _| panic!("a buggy done")))
        .expect("room");
    let deadline = Instant::now() + Duration::from_secs(10);
    let back = loop {
        if let Err(b) = h.submit(1) {
            break b;
        }
        assert!(Instant::now() < deadline, "the thread did not stop");
        thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(back.acks, [10, 11], "the batch comes back");
    assert_eq!(h.writer.shutdown().expect_err("died").as_str(), "closed");
}

#[test]
fn end_to_end_through_the_local_log() {
    let d = TestDir::new("writer-log");
    let (log, _) = LocalLog::open(LogOptions {
        fsync: Fsync::Batch,
        ..LogOptions::new(d.path())
    })
    .expect("open");
    let writer: Writer<u64> = Writer::spawn(Box::new(log), 16);
    let t0 = Instant::now();
    let mut batcher = Batcher::new(10, Duration::from_millis(1));
    let (acked_tx, acked) = mpsc::channel::<(Vec<u64>, bool)>();
    let mut next = 0u64;
    for _ in 0..20 {
        for _ in 0..10 {
            let one = batch(next, 1);
            batcher.push(t0, Some(next), |out| out.extend_from_slice(&one));
            next += 1;
        }
        let mut b = batcher.take(t0, false).expect("full");
        loop {
            let tx = acked_tx.clone();
            match writer.submit(
                b,
                Box::new(move |b, r| {
                    let _ = tx.send((b.acks, r.is_ok()));
                }),
            ) {
                Ok(()) => break,
                Err(back) => {
                    b = back;
                    thread::yield_now();
                }
            }
        }
    }
    drop(acked_tx);
    let stats = writer.stats();
    writer.shutdown().expect("clean");
    let on_disk: u64 = std::fs::read_dir(d.path())
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert_eq!(stats.sink_bytes.load(Ordering::Relaxed), on_disk);
    let acks: Vec<u64> = acked
        .iter()
        .flat_map(|(acks, ok)| {
            assert!(ok);
            acks
        })
        .collect();
    assert_eq!(acks, (0..200).collect::<Vec<_>>());
    let got: Vec<u64> = LocalLog::read_dir(d.path())
        .expect("read")
        .iter()
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}
