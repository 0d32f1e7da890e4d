//! Logs: the `tracing` subscriber of `ringlink serve` (levels, a filter, text or JSON on
//! stderr) and [`RateLimit`], which keeps a repeated warning from flooding them.
//!
//! Owns: the choice of filter and format, made once at start ([`init`]); what the events say
//! is up to the modules that emit them. Never: the start line of `serve` (PRODUCT.md: scripts
//! and tests parse it, so `main` prints it as it always has), nor the output of the CLI
//! subcommands, which is program output, not logging.
//!
//! Levels: `error` for what stops the server or a sink for good, `warn` for what an operator
//! should look at (a sink down, the log failing, accept errors), `info` for the few lines of a
//! normal life (start, sink connected, drain), `debug` for one line per connection or device
//! change (accepted, closed with its reason, online, offline, taken over), each inside a `conn`
//! span with the connection's `shard`, `slot` and `peer`.
//!
//! A connection's span costs nothing when `debug` is off: no [`tracing::Span`] is kept per
//! connection; the core builds one only around an event it emits, after the level check.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, spans, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// `span` (the innermost) and `spans` (all of them, outermost first).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?}: expected text or json")),
        }
    }
}

/// What the log is set up from: the `--log` and `--log-format` flags, and the environment.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// `--log FILTER`: wins over `RUST_LOG`.
    pub filter: Option<String>,
    /// `--log-format`: wins over `RINGLINK_LOG_FORMAT`.
    pub format: Option<LogFormat>,
}

/// The filter and format in force: the flag, else the environment variable, else the default
/// (`info`, text).
pub fn resolve(
    opts: &LogOptions,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(String, LogFormat), String> {
    let filter = opts
        .filter
        .clone()
        .or_else(|| env(FILTER_ENV).filter(|f| !f.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let format = match opts.format {
        Some(f) => f,
        None => match env(FORMAT_ENV) {
            Some(v) if !v.trim().is_empty() => {
                v.parse().map_err(|e| format!("{FORMAT_ENV}: {e}"))?
            }
            _ => LogFormat::Text,
        },
    };
    Ok((filter, format))
}

/// Installs the process's subscriber: events at or above the filter go to stderr, one line
/// each, as text or JSON. Fails on a filter that does not parse (`--log`/`RUST_LOG`), an
/// unknown `RINGLINK_LOG_FORMAT`, or when a subscriber is installed already.
pub fn init(opts: &LogOptions) -> Result<LogFormat, String> {
    let (filter, format) = resolve(opts, |k| std::env::var(k).ok())?;
    let filter = EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    installed.map_err(|e| format!("installing the logger: {e}"))?;
    let _ = INSTALLED.set(format);
    Ok(format)
}

/// The format of the logger [`init`] installed, if it did.
pub fn installed() -> Option<LogFormat> {
    INSTALLED.get().copied()
}

static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// At most `burst` lines per `interval` for one kind of repeated warning, and then, with the
/// first line let through after a quiet stretch, how many were held back.
///
/// Sans-IO like the rest of the core: the caller passes `now`, which never goes backwards.
/// Windows are fixed: the first event opens one, `interval` long; the events after the first
/// `burst` in it are suppressed and counted, and the first event of a later window is let
/// through carrying that count, so a flood costs `burst` lines per interval plus the count.
///
/// ```
/// # use std::time::{Duration, Instant};
/// # use ringlink::logging::RateLimit;
/// let mut accept_errors = RateLimit::new(2, Duration::from_secs(10));
/// let now = Instant::now();
/// assert_eq!(accept_errors.allow(now), Some(0));
/// assert_eq!(accept_errors.allow(now), Some(0));
/// assert_eq!(accept_errors.allow(now), None); // the third within 10 s: held back
/// let later = now + Duration::from_secs(10);
/// assert_eq!(accept_errors.allow(later), Some(1)); // "... (1 suppressed)"
/// ```
#[derive(Debug, Clone)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    /// Start of the current window; `None` before the first event.
    window: Option<Instant>,
    /// Lines let through in the current window: `0 <= emitted <= burst`.
    emitted: u32,
    /// Events held back since the last line let through.
    suppressed: u64,
}

impl RateLimit {
    /// `burst` lines per `interval` (`burst` 0 is taken as 1).
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: if burst == 0 { 1 } else { burst },
            interval,
            window: None,
            emitted: 0,
            suppressed: 0,
        }
    }

    /// The default for repeated warnings: 5 lines per 10 seconds.
    pub const fn warnings() -> Self {
        Self::new(5, Duration::from_secs(10))
    }

    /// One more occurrence at `now`: `Some(k)` to log it, saying that `k` were suppressed
    /// since the last line (0: none), or `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            self.window = Some(now);
            self.emitted = 0;
        }
        if self.emitted >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.emitted += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Events held back since the last line let through (for a summary at shutdown).
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// The environment variable read when `--log` is not given.
pub const FILTER_ENV: &str = "RUST_LOG";
/// The environment variable read when `--log-format` is not given.
pub const FORMAT_ENV: &str = "RINGLINK_LOG_FORMAT";
/// With neither `--log` nor `RUST_LOG`.
pub const DEFAULT_FILTER: &str = "info";

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn flag_wins_over_env_which_wins_over_default() {
        let none = LogOptions::default();
        assert_eq!(
            resolve(&none, env(&[])).unwrap(),
            ("info".to_owned(), LogFormat::Text)
        );
        let vars = [("RUST_LOG", "warn"), ("RINGLINK_LOG_FORMAT", "JSON")];
        assert_eq!(
            resolve(&none, env(&vars)).unwrap(),
            ("warn".to_owned(), LogFormat::Json)
        );
        let flags = LogOptions {
            filter: Some("ringlink=debug".to_owned()),
            format: Some(LogFormat::Text),
        };
        assert_eq!(
            resolve(&flags, env(&vars)).unwrap(),
            ("ringlink=debug".to_owned(), LogFormat::Text)
        );
        // An empty variable is as good as none.
        let empty = [("RUST_LOG", " "), ("RINGLINK_LOG_FORMAT", "")];
        assert_eq!(
            resolve(&none, env(&empty)).unwrap(),
            ("info".to_owned(), LogFormat::Text)
        );
    }

    #[test]
    fn unknown_format_in_env_is_an_error_naming_it() {
        let err = resolve(
            &LogOptions::default(),
            env(&[("RINGLINK_LOG_FORMAT", "xml")]),
        )
        .unwrap_err();
        assert!(
            err.contains("RINGLINK_LOG_FORMAT") && err.contains("xml"),
            "{err}"
        );
        assert!("yaml".parse::<LogFormat>().is_err());
        assert_eq!(" Text ".parse::<LogFormat>(), Ok(LogFormat::Text));
    }

    #[test]
    fn rate_limit_lets_burst_through_then_counts_until_the_next_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = RateLimit::new(3, s(10));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + s(1)), Some(0));
        assert_eq!(r.allow(t0 + s(2)), Some(0));
        for i in 0..100 {
            assert_eq!(r.allow(t0 + s(3) + Duration::from_millis(i)), None);
        }
        assert_eq!(r.suppressed(), 100);
        // Still the first window at 9.999 s.
        assert_eq!(r.allow(t0 + Duration::from_millis(9_999)), None);
        // The next window: one line carrying the count, then the count starts again.
        assert_eq!(r.allow(t0 + s(10)), Some(101));
        assert_eq!(r.suppressed(), 0);
        assert_eq!(r.allow(t0 + s(11)), Some(0));
        assert_eq!(r.allow(t0 + s(12)), Some(0));
        assert_eq!(r.allow(t0 + s(13)), None);
        // A long quiet stretch: the window opens at the next event, not on a fixed grid.
        assert_eq!(r.allow(t0 + s(100)), Some(1));
        assert_eq!(r.allow(t0 + s(109)), Some(0));
        assert_eq!(r.allow(t0 + s(109)), Some(0));
        assert_eq!(r.allow(t0 + s(109)), None);
        assert_eq!(r.allow(t0 + s(110)), Some(1));
    }

    #[test]
    fn rate_limit_of_zero_burst_still_lets_one_through() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(0, Duration::from_secs(1));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), Some(1));
    }

    #[test]
    fn rate_limit_bounds_lines_under_a_flood() {
        // 10,000 events over 60 s, one every 6 ms: 5 per 10 s window let through.
        let t0 = Instant::now();
        let mut r = RateLimit::warnings();
        let mut lines = 0;
        let mut reported = 0;
        for i in 0..10_000u64 {
            if let Some(k) = r.allow(t0 + Duration::from_millis(i * 6)) {
                lines += 1;
                reported += k;
            }
        }
        assert_eq!(lines, 6 * 5);
        // Every event is either a line or counted in a later line, but for the last window's.
        assert_eq!(lines + reported + r.suppressed(), 10_000);
    }
}
