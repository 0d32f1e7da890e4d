use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use proptest::prelude::*;

use super::*;
use crate::uplink::test_support::{batch, TestDir};
use crate::uplink::{encode, Record, RecordBody};

fn opts(dir: &Path) -> LogOptions {
    LogOptions {
        fsync: Fsync::Never,
        ..LogOptions::new(dir)
    }
}

fn at_ms(recs: &[OwnedRecord]) -> Vec<u64> {
    recs.iter().map(|r| r.at_ms).collect()
}

fn read(dir: &Path) -> Vec<u64> {
    at_ms(&LocalLog::read_dir(dir).expect("read_dir"))
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

fn name(seq: u64) -> String {
    format!("{seq:020}.log")
}

fn disk_bytes(dir: &Path) -> u64 {
    files(dir)
        .iter()
        .map(|n| fs::metadata(dir.join(n)).expect("stat").len())
        .sum()
}

/// The size of the frame holding `batch(first, n)`.
fn frame_len(first: u64, n: u64) -> u64 {
    (HEADER + batch(first, n).len()) as u64
}

fn set_mtime(path: &Path, t: SystemTime) {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

#[test]
fn append_and_read_dir() {
    let d = TestDir::new("append");
    let (mut log, rec) = LocalLog::open(opts(d.path())).expect("open");
    assert_eq!(
        rec,
        Recovery {
            segments: 1,
            ..Recovery::default()
        }
    );
    log.append(&[&batch(0, 3)]).expect("append");
    log.append(&[&batch(3, 2), &[], &batch(5, 4)])
        .expect("append");
    log.append(&[]).expect("nothing to append");
    assert_eq!(read(d.path()), (0..9).collect::<Vec<_>>());
    assert_eq!(log.bytes(), disk_bytes(d.path()));
    assert_eq!(
        log.bytes(),
        frame_len(0, 3) + frame_len(3, 2) + frame_len(5, 4)
    );
    let bytes = log.bytes();
    drop(log);

    let (log, rec) = LocalLog::open(opts(d.path())).expect("reopen");
    assert_eq!(
        rec,
        Recovery {
            segments: 1,
            records: 9,
            bytes,
            truncated_bytes: 0
        }
    );
    assert_eq!(log.bytes(), bytes);
    assert_eq!(files(d.path()), [name(0)]);
}

#[test]
fn one_append_of_more_batches_than_one_writev_takes() {
    // 700 batches are 1400 slices (header + payload each): more than IOV_MAX (1024).
    let d = TestDir::new("append-many");
    let (mut log, _) = LocalLog::open(opts(d.path())).expect("open");
    let batches: Vec<Vec<u8>> = (0..700).map(|i| batch(i * 2, 2)).collect();
    let refs: Vec<&[u8]> = batches.iter().map(Vec::as_slice).collect();
    log.append(&refs).expect("append");
    log.append(&[&batch(1400, 1)]).expect("append after");
    assert_eq!(read(d.path()), (0..1401).collect::<Vec<_>>());
    assert_eq!(log.bytes(), disk_bytes(d.path()));
}

#[test]
fn refuses_batches_that_are_not_lines() {
    let d = TestDir::new("refuse");
    let (mut log, _) = LocalLog::open(opts(d.path())).expect("open");
    let e = log
        .append(&[&batch(0, 1), b"{\"no\":\"newline\"}"])
        .expect_err("refused");
    assert_eq!(e.as_str(), "bad_record");
    let huge = vec![b'\n'; MAX_FRAME_PAYLOAD + 1];
    assert_eq!(
        log.append(&[&huge]).expect_err("too big").as_str(),
        "bad_record"
    );
    assert_eq!(log.bytes(), 0, "nothing of a refused append is written");
    assert_eq!(disk_bytes(d.path()), 0);
}

#[test]
fn segments_roll_and_are_named_by_sequence() {
    let d = TestDir::new("roll");
    let frame = frame_len(0, 1);
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 2 * frame,
        ..opts(d.path())
    })
    .expect("open");
    for i in 0..7 {
        log.append(&[&batch(i, 1)]).expect("append");
    }
    assert_eq!(files(d.path()), [name(0), name(2), name(4), name(6)]);
    assert_eq!(read(d.path()), (0..7).collect::<Vec<_>>());
    assert_eq!(log.bytes(), 7 * frame);

    // One append bigger than a segment still goes in as one write, into a fresh segment.
    log.append(&[&batch(7, 1), &batch(8, 1), &batch(9, 1)])
        .expect("append");
    assert_eq!(files(d.path()).last(), Some(&name(7)));
    assert_eq!(
        fs::metadata(d.path().join(name(7))).expect("stat").len(),
        3 * frame
    );
    assert_eq!(read(d.path()), (0..10).collect::<Vec<_>>());
}

#[test]
fn reopen_continues_sequence_numbers() {
    let d = TestDir::new("reopen");
    let frame = frame_len(0, 1);
    let o = LogOptions {
        segment_bytes: 2 * frame,
        ..opts(d.path())
    };
    let (mut log, _) = LocalLog::open(o.clone()).expect("open");
    for i in 0..3 {
        log.append(&[&batch(i, 1)]).expect("append");
    }
    drop(log);
    let (mut log, rec) = LocalLog::open(o).expect("reopen");
    assert_eq!((rec.segments, rec.records), (2, 3));
    log.append(&[&batch(3, 1)]).expect("fills segment 2");
    log.append(&[&batch(4, 1)]).expect("rolls");
    assert_eq!(files(d.path()), [name(0), name(2), name(4)]);
    assert_eq!(read(d.path()), (0..5).collect::<Vec<_>>());
}

#[test]
fn max_bytes_deletes_oldest_but_never_the_active_segment() {
    let d = TestDir::new("maxbytes");
    let frame = frame_len(0, 1);
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 2 * frame,
        max_bytes: 3 * frame,
        ..opts(d.path())
    })
    .expect("open");
    for i in 0..10 {
        log.append(&[&batch(i, 1)]).expect("append");
        assert!(log.bytes() <= 3 * frame, "{} after {i}", log.bytes());
        assert_eq!(log.bytes(), disk_bytes(d.path()));
        let got = read(d.path());
        assert_eq!(got.last(), Some(&i), "the newest record is always kept");
        let first = got[0];
        assert_eq!(got, (first..=i).collect::<Vec<_>>(), "a contiguous tail");
    }
    assert_eq!(files(d.path()), [name(8)]);
    drop(log);

    // A cap below one frame: only the active segment survives, with all it holds.
    let d = TestDir::new("maxbytes-tiny");
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 2 * frame,
        max_bytes: 1,
        ..opts(d.path())
    })
    .expect("open");
    for i in 0..5 {
        log.append(&[&batch(i, 1)]).expect("append");
        assert_eq!(files(d.path()).len(), 1);
    }
    assert_eq!(read(d.path()), [4]);
    log.append(&[&batch(5, 1)]).expect("append");
    assert_eq!(read(d.path()), [4, 5], "the active segment is never cut");
}

#[test]
fn max_age_deletes_old_segments_but_never_the_active_one() {
    let d = TestDir::new("maxage");
    let frame = frame_len(0, 1);
    let o = LogOptions {
        segment_bytes: 2 * frame,
        ..opts(d.path())
    };
    let (mut log, _) = LocalLog::open(o.clone()).expect("open");
    for i in 0..6 {
        log.append(&[&batch(i, 1)]).expect("append");
    }
    drop(log);
    let old = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    set_mtime(&d.path().join(name(0)), old);
    set_mtime(&d.path().join(name(2)), old);
    let (mut log, rec) = LocalLog::open(o.clone()).expect("reopen");
    assert_eq!(
        rec,
        Recovery {
            segments: 1,
            records: 2,
            bytes: 2 * frame,
            truncated_bytes: 0
        }
    );
    assert_eq!(files(d.path()), [name(4)]);

    // Everything old, the active segment included: only the active one stays.
    log.append(&[&batch(6, 1)]).expect("rolls to 6");
    drop(log);
    for f in files(d.path()) {
        set_mtime(&d.path().join(f), old);
    }
    let (mut log, rec) = LocalLog::open(o).expect("reopen");
    assert_eq!(files(d.path()), [name(6)]);
    assert_eq!(rec.records, 1);

    // Time passing with no reopen: the caps run on append, against the segments' last writes.
    log.append(&[&batch(7, 1)]).expect("append");
    log.append(&[&batch(8, 1)]).expect("rolls to 8");
    let later = SystemTime::now() + Duration::from_secs(8 * 24 * 3600);
    assert_eq!(log.enforce_caps(later, 0).expect("caps"), 1);
    assert_eq!(files(d.path()), [name(8)]);
    assert_eq!(log.bytes(), disk_bytes(d.path()));
}

/// Two segments of two frames each, records 100..112 (three per frame, equal frame sizes).
/// Returns the segment size, the frame size and each file's bytes.
fn two_segments() -> (u64, Vec<u8>, Vec<u8>) {
    let d = TestDir::new("src");
    let frame = frame_len(100, 3);
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 2 * frame,
        ..opts(d.path())
    })
    .expect("open");
    for i in 0..4 {
        log.append(&[&batch(100 + 3 * i, 3)]).expect("append");
    }
    assert_eq!(files(d.path()), [name(0), name(2)]);
    let seg0 = fs::read(d.path().join(name(0))).expect("read");
    let seg1 = fs::read(d.path().join(name(2))).expect("read");
    assert_eq!(seg0.len() as u64, 2 * frame);
    assert_eq!(seg1.len() as u64, 2 * frame);
    (frame, seg0, seg1)
}

fn lay_out(name_: &str, seg0: &[u8], seg1: &[u8]) -> TestDir {
    let d = TestDir::new(name_);
    fs::write(d.path().join(name(0)), seg0).expect("write");
    fs::write(d.path().join(name(2)), seg1).expect("write");
    d
}

#[test]
fn torn_tail_at_every_offset_is_truncated() {
    let (frame, seg0, seg1) = two_segments();
    for cut in frame..2 * frame {
        let d = lay_out("torn", &seg0, &seg1[..cut as usize]);
        // A reader stops cleanly at the torn tail, and changes nothing.
        assert_eq!(read(d.path()), (100..109).collect::<Vec<_>>(), "cut {cut}");
        assert_eq!(disk_bytes(d.path()), 2 * frame + cut);

        let (mut log, rec) = LocalLog::open(opts(d.path())).expect("recovers");
        assert_eq!(
            rec,
            Recovery {
                segments: 2,
                records: 9,
                bytes: 3 * frame,
                truncated_bytes: cut - frame
            },
            "cut {cut}"
        );
        let len = fs::metadata(d.path().join(name(2))).expect("stat").len();
        assert_eq!(len, frame, "cut {cut}");
        // The log goes on from the last whole frame.
        log.append(&[&batch(109, 3)]).expect("append");
        assert_eq!(read(d.path()), (100..112).collect::<Vec<_>>(), "cut {cut}");
    }
}

#[test]
fn any_flipped_byte_in_the_last_frame_is_truncated() {
    let (frame, seg0, seg1) = two_segments();
    for at in frame..2 * frame {
        let mut bad = seg1.clone();
        bad[at as usize] ^= 0x20;
        let d = lay_out("flip", &seg0, &bad);
        assert_eq!(read(d.path()), (100..109).collect::<Vec<_>>(), "at {at}");
        let (_, rec) = LocalLog::open(opts(d.path())).expect("recovers");
        assert_eq!((rec.records, rec.truncated_bytes), (9, frame), "at {at}");
        assert_eq!(read(d.path()), (100..109).collect::<Vec<_>>(), "at {at}");
    }
}

#[test]
fn corruption_in_an_earlier_segment_is_an_error_with_file_and_offset() {
    let (frame, seg0, seg1) = two_segments();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "crc",
            {
                let mut b = seg0.clone();
                b[(frame + HEADER as u64 + 5) as usize] ^= 1;
                b
            },
            "frame crc mismatch",
        ),
        (
            "magic",
            {
                let mut b = seg0.clone();
                b[frame as usize] = b'X';
                b
            },
            "bad frame magic",
        ),
        (
            "torn",
            seg0[..seg0.len() - 1].to_vec(),
            "torn frame at the end",
        ),
    ];
    for (label, bad0, want) in cases {
        let d = lay_out(label, &bad0, &seg1);
        let path0 = d.path().join(name(0));
        for e in [
            LocalLog::open(opts(d.path())).map(|_| ()).expect_err(label),
            LocalLog::read_dir(d.path()).map(|_| ()).expect_err(label),
        ] {
            match e {
                UplinkError::Corrupt { path, offset, what } => {
                    assert_eq!(path, path0, "{label}");
                    assert_eq!(offset, frame, "{label}");
                    assert_eq!(what, want, "{label}");
                }
                other => panic!("{label}: {other}"),
            }
        }
        // open changed nothing.
        assert_eq!(fs::read(&path0).expect("read"), bad0, "{label}");
        assert_eq!(fs::read(d.path().join(name(2))).expect("read"), seg1);
    }
}

#[test]
fn a_missing_segment_is_a_sequence_gap() {
    let d = TestDir::new("gap");
    let frame = frame_len(0, 1);
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 2 * frame,
        ..opts(d.path())
    })
    .expect("open");
    for i in 0..5 {
        log.append(&[&batch(i, 1)]).expect("append");
    }
    drop(log);
    fs::remove_file(d.path().join(name(2))).expect("rm");
    let e = LocalLog::open(opts(d.path())).map(|_| ()).expect_err("gap");
    let UplinkError::Corrupt { path, offset, .. } = e else {
        panic!("{e}");
    };
    assert_eq!((path, offset), (d.path().join(name(4)), 0));
}

#[test]
fn other_files_are_ignored() {
    let d = TestDir::new("ignore");
    fs::write(d.path().join("README"), "hi").expect("write");
    fs::write(d.path().join("42.log"), "not a segment name").expect("write");
    let (mut log, _) = LocalLog::open(opts(d.path())).expect("open");
    log.append(&[&batch(0, 2)]).expect("append");
    assert_eq!(read(d.path()), [0, 1]);
}

#[test]
fn fsync_batch_appends_and_rolls() {
    let d = TestDir::new("fsync");
    let frame = frame_len(0, 1);
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: frame,
        fsync: Fsync::Batch,
        ..LogOptions::new(d.path())
    })
    .expect("open");
    for i in 0..3 {
        log.append(&[&batch(i, 1)]).expect("append");
    }
    assert_eq!(files(d.path()), [name(0), name(1), name(2)]);
    assert_eq!(read(d.path()), [0, 1, 2]);
}

#[derive(Debug, Clone)]
enum Op {
    /// One append call: its batches, each a list of device names (one record each).
    Append(Vec<Vec<String>>),
    Reopen {
        segment_bytes: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let name = "\\PC{0,12}";
    let batch = prop::collection::vec(name, 1..6);
    prop_oneof![
        5 => prop::collection::vec(batch, 0..4).prop_map(Op::Append),
        1 => (1u64..4096).prop_map(|segment_bytes| Op::Reopen { segment_bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever is appended, however the log is cut into segments and reopened in between,
    /// reads back identical and in order.
    #[test]
    fn appended_batches_read_back_in_order(
        first_segment_bytes in 1u64..4096,
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let d = TestDir::new("prop");
        let o = |segment_bytes| LogOptions { segment_bytes, ..opts(d.path()) };
        let (mut log, _) = LocalLog::open(o(first_segment_bytes)).expect("open");
        let mut want: Vec<(u64, String)> = Vec::new();
        for op in ops {
            match op {
                Op::Append(batches) => {
                    let bytes: Vec<Vec<u8>> = batches
                        .iter()
                        .map(|names| {
                            let mut out = Vec::new();
                            for dn in names {
                                let at_ms = want.len() as u64;
                                encode(
                                    &Record {
                                        at_ms,
                                        product_key: "pk",
                                        device_name: dn,
                                        body: RecordBody::Offline,
                                    },
                                    &mut out,
                                );
                                want.push((at_ms, dn.clone()));
                            }
                            out
                        })
                        .collect();
                    let slices: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
                    log.append(&slices).expect("append");
                }
                Op::Reopen { segment_bytes } => {
                    drop(log);
                    let (l, rec) = LocalLog::open(o(segment_bytes)).expect("reopen");
                    prop_assert_eq!(rec.records, want.len() as u64);
                    prop_assert_eq!(rec.truncated_bytes, 0);
                    log = l;
                }
            }
            prop_assert_eq!(log.bytes(), disk_bytes(d.path()));
        }
        let got: Vec<(u64, String)> = LocalLog::read_dir(d.path())
            .expect("read_dir")
            .into_iter()
            .map(|r| (r.at_ms, r.device_name))
            .collect();
        prop_assert_eq!(got, want);
    }
}

/// Set in the child process of [`sigkill_loses_nothing_that_was_reported`]: the log dir.
const CRASH_CHILD_DIR: &str = "RINGLINK_UPLINK_CRASH_CHILD_DIR";
const CRASH_BATCH: u64 = 8;

/// The child side of the crash test; passes at once when run normally.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_DIR) else {
        return;
    };
    let (mut log, _) = LocalLog::open(LogOptions {
        segment_bytes: 256 << 10,
        ..opts(Path::new(&dir))
    })
    .expect("child opens");
    let mut out = io::stdout().lock();
    // The parent kills us well before this; the bound only stops an orphan.
    let give_up = Instant::now() + Duration::from_secs(30);
    for n in 0u64.. {
        log.append(&[&batch(n * CRASH_BATCH, CRASH_BATCH)])
            .expect("child appends");
        // Reported only once append returned: the parent holds us to every report.
        writeln!(out, "appended {n}").expect("parent reads");
        out.flush().expect("parent reads");
        if Instant::now() > give_up {
            break;
        }
    }
}

/// "Nothing acknowledged is lost when the process dies", at the log level: a child appends as
/// fast as it can and reports each append; after SIGKILL every reported batch is in the log,
/// in order, and the log opens cleanly.
#[test]
fn sigkill_loses_nothing_that_was_reported() {
    let d = TestDir::new("crash");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "uplink::log::tests::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_DIR, d.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let (started, first) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Some(n) = line.strip_prefix("appended ") else {
                continue; // libtest's own lines
            };
            if last.is_none() {
                let _ = started.send(());
            }
            last = Some(n.parse::<u64>().expect("a count"));
        }
        last
    });
    let up = first.recv_timeout(Duration::from_secs(60));
    if up.is_ok() {
        thread::sleep(Duration::from_millis(200));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    up.expect("the child started appending");
    let last = reader.join().expect("reader").expect("reports");

    let got = read(d.path());
    let (_, rec) = LocalLog::open(opts(d.path())).expect("opens cleanly after SIGKILL");
    assert_eq!(read(d.path()), got, "open only cut a torn tail");
    let reported = (last + 1) * CRASH_BATCH;
    assert!(
        got.len() as u64 >= reported,
        "{} records in the log, {reported} reported ({rec:?})",
        got.len()
    );
    assert_eq!(got.len() as u64 % CRASH_BATCH, 0, "whole batches only");
    assert!(
        got.iter().enumerate().all(|(i, &t)| t == i as u64),
        "in order, no gaps"
    );
    eprintln!(
        "crash test: {reported} records reported, {} found, {rec:?}",
        got.len()
    );
}

#[test]
fn prepare_write_complete_is_an_append_and_a_failed_write_is_cut_off() {
    let d = TestDir::new("prepare");
    let (mut log, _) = LocalLog::open(opts(d.path())).expect("open");
    let b0 = batch(0, 3);
    let p = log
        .prepare(&[&b0])
        .expect("prepare")
        .expect("bytes to write");
    assert_eq!(p.offset, 0);
    assert_eq!(p.headers.len(), FRAME_HEADER);
    assert!(
        log.prepare(&[&b0]).is_err(),
        "one append in flight at a time"
    );
    p.write(&[&b0]).expect("write");
    log.complete(p, Ok(())).expect("complete");

    // A write that "failed" after landing half its bytes: complete cuts them off again.
    let b1 = batch(3, 2);
    let p = log.prepare(&[&b1]).expect("prepare").expect("bytes");
    let half = &b1[..b1.len() / 2];
    p.write(&[half]).expect("partial write");
    let err = log.complete(p, Err(io::Error::other("disk full")));
    assert!(err.is_err());
    let b2 = batch(5, 1);
    log.append(&[&b2]).expect("append after a failed one");
    assert_eq!(read(d.path()), vec![0, 1, 2, 5]);
    assert_eq!(log.bytes(), disk_bytes(d.path()));
}

#[test]
fn read_dir_merges_partitions_by_time_and_keeps_each_partitions_order() {
    let d = TestDir::new("partitions");
    // Written by a gateway with three shards, then by one with two: all of it reads back.
    let mut writes: Vec<(usize, Vec<u64>)> = vec![
        (0, vec![1, 4, 9]),
        (1, vec![2, 3, 10]),
        (2, vec![5, 6]),
        (0, vec![11]),
        (1, vec![12]),
    ];
    for (shard, times) in writes.drain(..) {
        let (mut log, _) = LocalLog::open(opts(&partition_dir(d.path(), shard))).expect("open");
        for t in times {
            log.append(&[&batch(t, 1)]).expect("append");
        }
    }
    assert_eq!(read(d.path()), vec![1, 2, 3, 4, 5, 6, 9, 10, 11, 12]);

    // A partition whose clock stepped back keeps its own order.
    let (mut log, _) = LocalLog::open(opts(&partition_dir(d.path(), 3))).expect("open");
    log.append(&[&batch(8, 1)]).expect("append");
    log.append(&[&batch(0, 1)]).expect("append");
    let all = read(d.path());
    let p3: Vec<u64> = all.iter().copied().filter(|t| [8, 0].contains(t)).collect();
    assert_eq!(p3, vec![8, 0], "partition order kept");
    assert_eq!(all.len(), 12);
}

#[test]
fn count_lines_agrees_with_a_byte_by_byte_count_at_every_block_edge() {
    // Lengths below, at and just over one 32-byte vector (the unaligned head and tail are
    // counted byte by byte) and long ones through memchr's unrolled loop; newline densities
    // from none to every byte.
    let mut seed = 0x9e37_79b9_u32;
    for len in [0, 1, 31, 32, 33, 8159, 8160, 8161, 16_320, 16_321, 40_000] {
        for every in [1, 2, 7, 300, usize::MAX] {
            let payload: Vec<u8> = (0..len)
                .map(|i| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    if every != usize::MAX && i % every == 0 {
                        b'\n'
                    } else {
                        // Any other byte: 0x0b is one bit away from a newline.
                        match seed as u8 {
                            b'\n' => 0x0b,
                            b => b,
                        }
                    }
                })
                .collect();
            let expected = payload.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(count_lines(&payload), expected, "len {len}, every {every}");
        }
    }
}
