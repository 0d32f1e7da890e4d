//! Helpers shared by the uplink's unit tests: a temporary directory and record lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::{encode, Record, RecordBody};

/// A fresh directory under the system temp dir, removed on drop.
pub(super) struct TestDir(PathBuf);

impl TestDir {
    pub(super) fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ringlink-uplink-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        Self(path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A batch of `n` property records numbered from `first` (`at_ms` = the number).
pub(super) fn batch(first: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..first + n {
        let values = format!("{{\"i\":{i},\"roomTemp\":19.87}}");
        encode(
            &Record {
                at_ms: i,
                product_key: "a1ThermoPK0",
                device_name: "thermo-0042",
                body: RecordBody::Property { values: &values },
            },
            &mut out,
        );
    }
    out
}
