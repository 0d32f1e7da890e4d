use super::*;
use crate::uplink::test_support::{batch, TestDir};
use crate::uplink::{decode_line, Fsync, LocalLog, LogOptions, OnFull, Outbox};

fn log(dir: &Path, on_full: OnFull, segment_bytes: u64, max_bytes: u64) -> (LocalLog, Arc<Marks>) {
    let marks = Arc::new(Marks::default());
    let opts = LogOptions {
        fsync: Fsync::Never,
        segment_bytes,
        max_bytes,
        outbox: Some(Outbox {
            marks: Arc::clone(&marks),
            on_full,
        }),
        ..LogOptions::new(dir)
    };
    (LocalLog::open(opts).expect("open").0, marks)
}

/// Every record the reader hands out, as (at_ms, position), consuming them.
fn drain(r: &mut Reader) -> Vec<(u64, Position)> {
    let mut out = Vec::new();
    while let Some(item) = r.peek().expect("peek") {
        let rec = decode_line(item.line).expect("decodes");
        out.push((rec.at_ms, item.pos));
        r.advance();
    }
    out
}

fn times(items: &[(u64, Position)]) -> Vec<u64> {
    items.iter().map(|(t, _)| *t).collect()
}

#[test]
fn reads_only_committed_frames_in_order() {
    let dir = TestDir::new("outbox-order");
    let (mut log, marks) = log(dir.path(), OnFull::DropOldest, 1 << 20, 1 << 30);
    let mut r = Reader::new(dir.path(), Arc::clone(&marks), Position::default());
    assert_eq!(r.peek().expect("peek"), None, "nothing committed yet");

    log.append(&[&batch(0, 3)]).expect("append");
    log.append(&[&batch(3, 2), &batch(5, 1)]).expect("append");
    let got = drain(&mut r);
    assert_eq!(times(&got), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(got[0].1, Position { frame: 0, line: 0 });
    assert_eq!(got[2].1, Position { frame: 0, line: 2 });
    assert_eq!(got[3].1, Position { frame: 1, line: 0 });
    assert_eq!(got[5].1, Position { frame: 2, line: 0 });

    // A prepared but not completed append is not visible.
    let b = batch(6, 2);
    let p = log.prepare(&[&b]).expect("prepare").expect("something");
    p.write(&[&b]).expect("write");
    assert_eq!(r.peek().expect("peek"), None, "written but not completed");
    log.complete(p, Ok(())).expect("complete");
    assert_eq!(times(&drain(&mut r)), vec![6, 7]);
}

#[test]
fn item_next_is_where_a_cursor_resumes() {
    let dir = TestDir::new("outbox-resume");
    let (mut log, marks) = log(dir.path(), OnFull::DropOldest, 1 << 20, 1 << 30);
    log.append(&[&batch(0, 3)]).expect("append");
    log.append(&[&batch(3, 3)]).expect("append");
    let mut r = Reader::new(dir.path(), Arc::clone(&marks), Position::default());
    // Acknowledge the first four records (the whole first frame and one line of the second).
    let mut cursor = Position::default();
    for _ in 0..4 {
        cursor = r.peek().expect("peek").expect("item").next;
        r.advance();
    }
    assert_eq!(cursor, Position { frame: 1, line: 1 });
    store_cursor(dir.path(), "mqtt", cursor, false).expect("store");
    let loaded = load_cursor(dir.path(), "mqtt").expect("load");
    assert_eq!(loaded, Some(cursor));

    let mut again = Reader::new(dir.path(), marks, cursor);
    assert_eq!(times(&drain(&mut again)), vec![4, 5]);
}

#[test]
fn follows_rolled_segments_and_resumes_in_a_later_one() {
    let dir = TestDir::new("outbox-roll");
    // About three frames per segment.
    let seg = 3 * (HEADER + batch(0, 4).len()) as u64;
    let (mut log, marks) = log(dir.path(), OnFull::DropOldest, seg, 1 << 30);
    for i in 0..10 {
        log.append(&[&batch(i * 4, 4)]).expect("append");
    }
    let segments = list_segments(dir.path()).expect("list").len();
    assert!(segments >= 3, "{segments} segments");
    let mut r = Reader::new(dir.path(), Arc::clone(&marks), Position::default());
    let all = drain(&mut r);
    assert_eq!(times(&all), (0..40).collect::<Vec<_>>());

    // A cursor in the middle of frame 7 (a later segment) skips exactly what is before it.
    let from = Position { frame: 7, line: 2 };
    let mut r = Reader::new(dir.path(), marks, from);
    assert_eq!(times(&drain(&mut r)), (30..40).collect::<Vec<_>>());
}

#[test]
fn drop_oldest_deletes_unforwarded_segments_and_counts_their_records() {
    let dir = TestDir::new("outbox-drop");
    let frame = (HEADER + batch(0, 4).len()) as u64;
    // Two frames per segment, at most three segments' worth on disk.
    let (mut log, marks) = log(dir.path(), OnFull::DropOldest, 2 * frame, 6 * frame);
    for i in 0..10 {
        log.append(&[&batch(i * 4, 4)])
            .expect("append never blocks");
    }
    assert!(log.bytes() <= 6 * frame, "{} bytes", log.bytes());
    let kept = (log.bytes() / frame) * 4;
    assert_eq!(
        marks.dropped(),
        40 - kept,
        "every deleted record is counted"
    );
    // The reader, which had opened nothing, skips the gap to the oldest segment left.
    let mut r = Reader::new(dir.path(), Arc::clone(&marks), Position::default());
    let got = times(&drain(&mut r));
    assert_eq!(got.len() as u64, kept);
    assert_eq!(got, (40 - kept..40).collect::<Vec<_>>());
}

#[test]
fn a_segment_open_in_the_reader_is_read_to_its_end_not_counted_dropped() {
    let dir = TestDir::new("outbox-open-deleted");
    let frame = (HEADER + batch(0, 4).len()) as u64;
    let (mut log, marks) = log(dir.path(), OnFull::DropOldest, 2 * frame, 4 * frame);
    log.append(&[&batch(0, 4)]).expect("append");
    log.append(&[&batch(4, 4)]).expect("append");
    let mut r = Reader::new(dir.path(), Arc::clone(&marks), Position::default());
    // The reader opens segment 0 and takes one record.
    assert_eq!(
        decode_line(r.peek().expect("peek").expect("item").line)
            .expect("decode")
            .at_ms,
        0
    );
    r.advance();
    // Now the caps delete segment 0 (and more) while the reader holds it.
    for i in 2..8 {
        log.append(&[&batch(i * 4, 4)]).expect("append");
    }
    let got = times(&drain(&mut r));
    // Segment 0 (records 1..8) is read from the open file; what followed it and was deleted
    // before the reader got there is counted, the rest is read.
    let read_after_zero: Vec<u64> = got.iter().copied().filter(|&t| t >= 8).collect();
    assert_eq!(&got[..7], &[1, 2, 3, 4, 5, 6, 7]);
    let missing = 32 - 8 - read_after_zero.len() as u64;
    assert_eq!(marks.dropped(), missing, "got {got:?}");
}

#[test]
fn block_refuses_appends_until_the_sink_acknowledges() {
    let dir = TestDir::new("outbox-block");
    let frame = (HEADER + batch(0, 4).len()) as u64;
    let (mut log, marks) = log(dir.path(), OnFull::Block, 2 * frame, 4 * frame);
    let mut appended = 0;
    let err = loop {
        match log.append(&[&batch(appended * 4, 4)]) {
            Ok(()) => appended += 1,
            Err(e) => break e,
        }
        assert!(appended < 100, "never refused");
    };
    assert!(matches!(err, UplinkError::SpoolFull { .. }), "{err}");
    assert!(marks.is_full());
    assert_eq!(marks.dropped(), 0);
    let bytes = log.bytes();
    assert!(bytes <= 4 * frame, "{bytes}");

    // The forwarder acknowledges the first segment: the next append fits again.
    marks.set_forwarded(2);
    log.append(&[&batch(appended * 4, 4)]).expect("room again");
    assert!(!marks.is_full());
    // And nothing unforwarded was lost.
    let mut r = Reader::new(dir.path(), marks, Position { frame: 2, line: 0 });
    let got = times(&drain(&mut r));
    assert_eq!(got, (8..(appended + 1) * 4).collect::<Vec<_>>());
}

#[test]
fn a_bad_cursor_file_is_an_error_naming_it() {
    let dir = TestDir::new("outbox-bad-cursor");
    assert_eq!(load_cursor(dir.path(), "mqtt").expect("none"), None);
    fs::write(cursor_path(dir.path(), "mqtt"), "12 x\n").expect("write");
    let e = load_cursor(dir.path(), "mqtt").expect_err("bad");
    assert!(e.to_string().contains("mqtt.cursor"), "{e}");
}
