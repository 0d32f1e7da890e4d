//! [`ModelError`]: why a TSL document did not load, with the file and the JSON path to blame.
//!
//! Every load failure is a local configuration fault (PROTOCOL.md 11.4.5), never a peer's; a peer
//! sending a bad value gets a Link code from the checks instead, never a `ModelError`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A TSL document that failed to load.
///
/// Display: `<file>: at <json path>: <what>` for a document that is JSON but not a valid TSL,
/// `<file>:<line>:<col>: <syntax error>` for one that is not JSON, `<file>: <io error>` for one
/// that could not be read. The `<file>` part is left out (with its separator) when the document
/// did not come from a file.
#[derive(Debug, thiserror::Error)]
#[error("{}", Shown(self))]
pub struct ModelError {
    file: Option<Box<Path>>,
    /// Boxed: a `Result<ThingModel, ModelError>` stays small, and load errors are rare.
    kind: Box<ModelErrorKind>,
}

/// What went wrong, without the file name.
#[derive(Debug, thiserror::Error)]
pub enum ModelErrorKind {
    /// The file could not be read.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The document is not JSON. `line` and `column` are 1-based.
    #[error("{line}:{column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// The document is JSON but not a valid TSL; `path` is a JSON path like
    /// `$.properties[3].dataType.specs.min`.
    #[error("at {path}: {what}")]
    Invalid { path: String, what: Invalid },
}

/// Why a JSON value is not a valid part of a TSL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: &'static str,
    },
    #[error("unknown type `{0}`")]
    UnknownType(Box<str>),
    #[error("type `{kind}` is not allowed {place} (allowed: {allowed})")]
    TypeNotAllowed {
        kind: &'static str,
        place: &'static str,
        allowed: &'static str,
    },
    #[error("duplicate identifier `{identifier}` (first at {first})")]
    Duplicate {
        identifier: Box<str>,
        first: Box<str>,
    },
    #[error("identifier must not be empty")]
    EmptyIdentifier,
    #[error("not a decimal number: {0}")]
    BadNumber(Box<str>),
    #[error("not a non-negative integer: {0}")]
    BadCount(Box<str>),
    #[error("enum key is not an integer: `{0}`")]
    BadEnumKey(Box<str>),
    #[error("min {min} is greater than max {max}")]
    MinAboveMax { min: Box<str>, max: Box<str> },
    #[error("array size {0} is above the maximum of 512")]
    ArrayTooLarge(u64),
    #[error("unknown {field} `{value}` (expected {expected})")]
    UnknownValue {
        field: &'static str,
        value: Box<str>,
        expected: &'static str,
    },
}

impl ModelError {
    /// The file the document came from, if it came from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn kind(&self) -> &ModelErrorKind {
        &self.kind
    }

    /// The JSON path of an invalid part (`$.properties[3].dataType`), for
    /// [`ModelErrorKind::Invalid`] only.
    pub fn path(&self) -> Option<&str> {
        match &*self.kind {
            ModelErrorKind::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match *self.kind {
            ModelErrorKind::Io(_) => "io",
            ModelErrorKind::Syntax { .. } => "syntax",
            ModelErrorKind::Invalid { .. } => "invalid",
        }
    }

    pub(super) fn new(kind: ModelErrorKind) -> Self {
        Self {
            file: None,
            kind: Box::new(kind),
        }
    }

    pub(super) fn invalid(path: String, what: Invalid) -> Self {
        Self::new(ModelErrorKind::Invalid { path, what })
    }

    pub(super) fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(PathBuf::from(file).into_boxed_path());
        self
    }
}

struct Shown<'a>(&'a ModelError);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ModelError { file, kind } = self.0;
        match (file, &**kind) {
            (None, kind) => write!(f, "{kind}"),
            (Some(file), ModelErrorKind::Syntax { .. }) => write!(f, "{}:{kind}", file.display()),
            (Some(file), kind) => write!(f, "{}: {kind}", file.display()),
        }
    }
}
