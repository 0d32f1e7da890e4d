use std::path::Path;

use super::*;
use crate::uplink::{
    encode, partition_dir, Fsync, LocalLog, LogOptions, OnFull, Record, RecordBody,
};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ringlink-sink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two partitions of a log with an outbox, as the shards open them.
fn logs(dir: &Path) -> (Vec<LocalLog>, Vec<(PathBuf, Arc<Marks>)>) {
    let mut logs = Vec::new();
    let mut parts = Vec::new();
    for i in 0..2 {
        let marks = Arc::new(Marks::default());
        let opts = LogOptions {
            fsync: Fsync::Never,
            outbox: Some(crate::uplink::Outbox {
                marks: Arc::clone(&marks),
                on_full: OnFull::DropOldest,
            }),
            ..LogOptions::new(partition_dir(dir, i))
        };
        logs.push(LocalLog::open(opts).expect("open").0);
        parts.push((partition_dir(dir, i), marks));
    }
    (logs, parts)
}

/// One frame of property records of device `dn` at the given times.
fn frame(dn: &str, times: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &t in times {
        let values = format!("{{\"n\":{t}}}");
        encode(
            &Record {
                at_ms: t,
                product_key: "pk",
                device_name: dn,
                body: RecordBody::Property { values: &values },
            },
            &mut out,
        );
    }
    out
}

fn take_all(o: &mut Outbox) -> Vec<(Tag, u64)> {
    let mut out = Vec::new();
    while let Some(t) = o.take_next().expect("next") {
        let rec = crate::uplink::decode_line(t.line).expect("a record");
        out.push((t.tag, rec.at_ms));
    }
    out
}

#[test]
fn partitions_merge_by_time_and_cursors_follow_acks_in_order() {
    let dir = Dir::new("merge");
    let (mut logs, parts) = logs(&dir.0);
    logs[0].append(&[&frame("a", &[1, 4, 5])]).expect("append");
    logs[1]
        .append(&[&frame("b", &[2, 3]), &frame("b", &[6])])
        .expect("append");
    let mut o = Outbox::open("mqtt", &parts, false).expect("open");
    let got = take_all(&mut o);
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(o.inflight(), 6);
    assert_eq!(o.oldest_inflight_ms(), Some(1));

    // Acknowledge 4 (partition 0, line 1) first: partition 0's cursor waits for 1.
    let tag = |t: u64| got.iter().find(|g| g.1 == t).expect("tag").0;
    o.ack(tag(4));
    assert_eq!(o.cursors()[0], Position::default());
    o.ack(tag(1));
    assert_eq!(o.cursors()[0], Position { frame: 0, line: 2 });
    assert_eq!(
        parts[0].1.forwarded(),
        0,
        "frame 0 is not wholly forwarded yet"
    );
    o.ack(tag(5));
    assert_eq!(o.cursors()[0], Position { frame: 1, line: 0 });
    assert_eq!(parts[0].1.forwarded(), 1);
    // A repeated or unknown ack changes nothing.
    o.ack(tag(5));
    o.ack(u64::MAX);
    o.ack(tag(2));
    assert_eq!(
        o.cursors(),
        vec![
            Position { frame: 1, line: 0 },
            Position { frame: 0, line: 1 }
        ]
    );
    assert_eq!(o.inflight(), 2);
    assert_eq!(o.oldest_inflight_ms(), Some(3));
}

#[test]
fn reopening_resumes_at_the_stored_cursors_and_replays_only_the_unacknowledged() {
    let dir = Dir::new("resume");
    let (mut logs, parts) = logs(&dir.0);
    logs[0].append(&[&frame("a", &[1, 3])]).expect("append");
    logs[1].append(&[&frame("b", &[2, 4])]).expect("append");
    {
        let mut o = Outbox::open("mqtt", &parts, false).expect("open");
        let got = take_all(&mut o);
        // 1, 2 and 4 acknowledged; 3 is still in flight when the process dies.
        for (tag, t) in got {
            if t != 3 {
                o.ack(tag);
            }
        }
        o.store_cursors().expect("store");
    }
    logs[0].append(&[&frame("a", &[7])]).expect("append");
    let mut o = Outbox::open("mqtt", &parts, false).expect("reopen");
    let again: Vec<u64> = take_all(&mut o).into_iter().map(|g| g.1).collect();
    assert_eq!(again, vec![3, 7], "replays 3, then what came after");
    // A third sink name has its own cursor: it starts at the beginning.
    let mut other = Outbox::open("nats", &parts, false).expect("open");
    assert_eq!(take_all(&mut other).len(), 5);
}

#[test]
fn record_time_reads_the_leading_key_only() {
    assert_eq!(
        record_time(br#"{"t":1732570000123,"pk":"x"}"#),
        1_732_570_000_123
    );
    assert_eq!(record_time(br#"{"pk":"x","t":5}"#), 0);
    assert_eq!(
        record_time(br#"{"t":99999999999999999999999,"pk":"x"}"#),
        u64::MAX
    );
}
