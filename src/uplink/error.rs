//! Errors of the `uplink` layer.
//!
//! Owns [`UplinkError`]: local IO failures (with the file they hit), corruption found in the
//! local log (with file and byte offset), malformed records, and a stopped writer. Every variant
//! has a short label for metrics ([`UplinkError::as_str`]). No IO, no clock.

use std::io;
use std::path::PathBuf;

/// Why an uplink could not be encoded, decoded, written or recovered.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// A filesystem call on `path` failed (open, write, fsync, read, delete).
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The local log at `path` holds bytes at `offset` that are not a valid frame, in a place
    /// where recovery may not drop them (anywhere but the tail of the last segment).
    #[error("{}: corrupt at byte {offset}: {what}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    /// A record line does not decode, or a batch breaks a size limit of the log.
    #[error("bad record: {0}")]
    BadRecord(String),
    /// The log is at its size cap and the oldest segment holds records the external sink has
    /// not acknowledged (`on_full = "block"`): nothing was written.
    #[error("{}: spool full ({bytes} bytes, the sink has not acknowledged the oldest segment)", path.display())]
    SpoolFull { path: PathBuf, bytes: u64 },
    /// A shard stopped (with an error, or by a panic) before it had committed everything;
    /// what it had not committed is not in the log.
    #[error("a shard stopped before committing its uplinks")]
    Closed,
}

impl UplinkError {
    /// A stable, low-cardinality label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Corrupt { .. } => "corrupt",
            Self::BadRecord(_) => "bad_record",
            Self::SpoolFull { .. } => "spool_full",
            Self::Closed => "closed",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The writer hands one sink error to every batch of a failed group commit, so the error must
/// be copyable. `io::Error` is not `Clone`; its copy keeps the kind and the message, and loses
/// only the inner error's `source()` chain.
impl Clone for UplinkError {
    fn clone(&self) -> Self {
        match self {
            Self::Io { path, source } => Self::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Self::Corrupt { path, offset, what } => Self::Corrupt {
                path: path.clone(),
                offset: *offset,
                what,
            },
            Self::BadRecord(s) => Self::BadRecord(s.clone()),
            Self::SpoolFull { path, bytes } => Self::SpoolFull {
                path: path.clone(),
                bytes: *bytes,
            },
            Self::Closed => Self::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_labelled() {
        // Errors travel through the writer's callbacks by value; keep them a few words.
        assert!(
            size_of::<UplinkError>() <= 48,
            "{}",
            size_of::<UplinkError>()
        );
        let e = UplinkError::io("/x/1.log", io::Error::other("disk on fire"));
        assert_eq!(e.as_str(), "io");
        let c = e.clone();
        assert_eq!(c.to_string(), "/x/1.log: disk on fire");
        assert_eq!(UplinkError::Closed.as_str(), "closed");
        let k = UplinkError::Corrupt {
            path: "/x/2.log".into(),
            offset: 12,
            what: "bad crc",
        };
        assert_eq!(k.to_string(), "/x/2.log: corrupt at byte 12: bad crc");
    }
}
