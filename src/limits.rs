//! EMQX-style limits: what one peer, one host or one device may take of what every peer needs.
//!
//! Owns the arithmetic and the state of four limits:
//!
//! - [`Bucket`]: one connection's messages per second (a token bucket in its GCRA form: one
//!   instant per connection). Over it, the connection is not read until the bucket refills;
//!   nothing is dropped and nothing is closed. Per connection, so plain state in the session.
//! - [`AcceptPacer`]: new connections per second, **process-wide** (one atomic shared by every
//!   shard: `SO_REUSEPORT` spreads a flood over all of them). Over it, the shard stops
//!   accepting until the next token; connections wait in the kernel's backlog.
//! - [`PerIp`]: open connections per source IP, process-wide. Touched only at accept and close
//!   (a short striped lock), never on a report's path.
//! - [`Flapping`]: onlines per device within a window, process-wide (a device may reconnect to
//!   another shard). One word per registered device, touched only when it comes online (a
//!   compare-and-swap).
//!
//! Never: a clock, a socket, a thread. Time is an argument (`now`), so every rule is
//! unit-tested with a virtual clock. [`log_gate`] rate-limits the log line each limit writes
//! when it acts (every action is counted in metrics regardless).
//!
//! GCRA in one line: a "theoretical arrival time" `tat` moves `interval` into the future with
//! every event (from `max(tat, now)`); an event finds the limit reached when `tat - now`
//! exceeds `(burst - 1) * interval`. `burst` events pass at once, then one per `interval`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::logging::RateLimit;
use crate::registry::segmented::Segmented;
use crate::registry::DeviceId;

/// A rate with a burst: `burst` events at once, then one every `interval`.
///
/// Once the burst is used up, waiting resumes only when `chunk` events fit again (about 10 ms
/// worth, at least 1, at most half the burst), not after every single interval: at 5000/s a
/// paused connection is woken 100 times a second rather than 5000 times (each wake-up is a
/// timer, a loop turn and a recv re-arm or cancel in the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    interval: Duration,
    burst: u32,
    chunk: u32,
}

impl Rate {
    /// `per_second` events a second with `burst` at once; `None` when `per_second` is 0 (off).
    /// A burst of 0 is taken as 1.
    pub fn per_second(per_second: u32, burst: u32) -> Option<Self> {
        let burst = burst.max(1);
        (per_second > 0).then(|| Self {
            interval: Duration::from_nanos(1_000_000_000 / u64::from(per_second)),
            burst,
            chunk: (per_second / 100).clamp(1, (burst / 2).max(1)),
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// How far ahead of `now` the theoretical arrival time may run before the limit is reached.
    fn slack(&self) -> Duration {
        self.interval * (self.burst - 1)
    }

    /// How far ahead of `now` it may run when waiting ends: `chunk` events fit then.
    fn resume_slack(&self) -> Duration {
        self.interval * (self.burst - self.chunk)
    }
}

/// One connection's message bucket (GCRA): 16 bytes, nothing when unused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    tat: Option<Instant>,
}

impl Bucket {
    /// A bucket whose theoretical arrival time is `tat` (`None`: full), for callers that keep
    /// the instant in a field of their own.
    pub fn at(tat: Option<Instant>) -> Self {
        Self { tat }
    }

    pub fn tat(&self) -> Option<Instant> {
        self.tat
    }

    /// Counts one message at `now`. Returns the instant until which the next message would be
    /// over `rate` (the caller stops reading until then), or `None` while there is room.
    /// Messages counted while paused (already read) push that instant further: a debt.
    pub fn take(&mut self, rate: &Rate, now: Instant) -> Option<Instant> {
        let tat = self.tat.map_or(now, |t| t.max(now)) + rate.interval;
        self.tat = Some(tat);
        let full = tat.checked_sub(rate.slack()).is_some_and(|t| t > now);
        full.then(|| self.refilled_at(rate)).flatten()
    }

    /// When reading may resume, if it may not now.
    pub fn resume_at(&self, rate: &Rate, now: Instant) -> Option<Instant> {
        self.refilled_at(rate).filter(|&until| until > now)
    }

    /// When the bucket has room for `chunk` more messages (`None`: it always had; may be
    /// past).
    pub fn refilled_at(&self, rate: &Rate) -> Option<Instant> {
        self.tat?.checked_sub(rate.resume_slack())
    }
}

/// New connections per second, shared by every shard of the process.
#[derive(Debug)]
pub struct AcceptPacer {
    rate: Option<Rate>,
    /// `tat` is kept as nanoseconds since this instant, in an atomic.
    epoch: Instant,
    tat_ns: AtomicU64,
}

impl AcceptPacer {
    /// `epoch` is any instant not after the first `now` passed in (the start of the server).
    pub fn new(rate: Option<Rate>, epoch: Instant) -> Self {
        Self {
            rate,
            epoch,
            tat_ns: AtomicU64::new(0),
        }
    }

    /// Whether there is a rate at all.
    pub fn is_on(&self) -> bool {
        self.rate.is_some()
    }

    /// Counts one connection taken from the kernel at `now` (it is served either way). Returns
    /// the instant until which the shard must not accept, when the next one would be over the
    /// rate.
    pub fn admit(&self, now: Instant) -> Option<Instant> {
        let rate = self.rate?;
        let now_ns = nanos(now.saturating_duration_since(self.epoch));
        let interval = nanos(rate.interval);
        let slack = nanos(rate.slack());
        let mut old = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let new = old.max(now_ns).saturating_add(interval);
            match self
                .tat_ns
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    if new.saturating_sub(slack) <= now_ns {
                        return None;
                    }
                    let until = new.saturating_sub(nanos(rate.resume_slack()));
                    return Some(self.epoch + Duration::from_nanos(until));
                }
                Err(seen) => old = seen,
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Open connections per source IP, shared by every shard of the process.
#[derive(Debug)]
pub struct PerIp {
    /// 0 = off: nothing is counted.
    max: u32,
    stripes: Striped<IpAddr, u32>,
}

impl PerIp {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            stripes: Striped::new(),
        }
    }

    /// Counts a new connection from `ip`; false (nothing counted) when `ip` already has the
    /// maximum open: the caller closes the new one.
    pub fn try_add(&self, ip: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let mut map = self.stripes.lock(&ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                map.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `ip` that [`try_add`](Self::try_add) counted has closed.
    pub fn remove(&self, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let mut map = self.stripes.lock(&ip);
        if let Some(n) = map.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Connections open from `ip` (0 when off).
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.stripes.lock(&ip).get(&ip).copied().unwrap_or(0)
    }
}

/// When a device that keeps coming online is banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapRule {
    /// More onlines than this within `window` start a ban.
    pub max: u32,
    pub window: Duration,
    pub ban: Duration,
}

/// What [`Flapping::online`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The device may come online.
    Admit,
    /// Refused: the device is banned until `until`; `started` when this online started the ban.
    Refused { until: Instant, started: bool },
}

/// A device's recent onlines in one word, so that a device costs 8 bytes whether or not it
/// ever came online, and an online is a compare-and-swap, not a lock.
///
/// Bit 63: banned. Bits 43..63: onlines in the current window (20 bits; `flapping_max` is at
/// most 1,000,000). Bits 0..43: a time in ms since the table's epoch (2^43 ms is 278 years):
/// the window's start, or while banned the ban's end. 0 is a device never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flap(u64);

impl Flap {
    const BANNED: u64 = 1 << 63;
    const COUNT_SHIFT: u32 = 43;
    const TIME: u64 = (1 << Self::COUNT_SHIFT) - 1;

    fn window(start: u64, count: u64) -> Self {
        Self((count << Self::COUNT_SHIFT) | start.min(Self::TIME))
    }

    fn banned_until(until: u64) -> Self {
        Self(Self::BANNED | until.min(Self::TIME))
    }

    fn is_banned(self) -> bool {
        self.0 & Self::BANNED != 0
    }

    fn time(self) -> u64 {
        self.0 & Self::TIME
    }

    fn count(self) -> u64 {
        (self.0 & !Self::BANNED) >> Self::COUNT_SHIFT
    }

    /// The state after an online at `now` (ms), and the ban's end (ms) when refused, with
    /// whether this online started the ban. The window is a fixed one, opened by the first
    /// online after the last window or ban ended (like EMQX's flapping detection).
    fn online(self, now: u64, rule: &FlapRule) -> (Self, Option<(u64, bool)>) {
        if self.is_banned() && now < self.time() {
            return (self, Some((self.time(), false)));
        }
        let window = rule.window.as_millis() as u64;
        let (start, count) = if self.is_banned() || now.saturating_sub(self.time()) >= window {
            (now, 0)
        } else {
            (self.time(), self.count())
        };
        if count + 1 > u64::from(rule.max) {
            let until = now.saturating_add(rule.ban.as_millis() as u64);
            return (Self::banned_until(until), Some((until, true)));
        }
        (Self::window(start, count + 1), None)
    }
}

/// Onlines per device within a window, shared by every shard of the process: one [`Flap`]
/// word per registered device in a table that grows with the registry and never moves.
#[derive(Debug)]
pub struct Flapping {
    rule: Option<FlapRule>,
    epoch: Instant,
    devices: Segmented<AtomicU64>,
    log: Mutex<RateLimit>,
}

impl Flapping {
    /// For device ids `0..devices`, times counted from `epoch`. `rule` `None`: off, nothing is
    /// kept.
    pub fn new(rule: Option<FlapRule>, devices: usize, epoch: Instant) -> Self {
        let devices = if rule.is_some() { devices } else { 0 };
        Self {
            rule,
            epoch,
            devices: Segmented::new(devices, || AtomicU64::new(0)),
            log: Mutex::new(log_gate()),
        }
    }

    /// Makes room for device ids `0..devices` (a registry reload added some).
    pub fn grow(&self, devices: usize) {
        if self.rule.is_some() {
            self.devices.grow(devices);
        }
    }

    pub fn rule(&self) -> Option<FlapRule> {
        self.rule
    }

    /// `device` is about to come online at `now` (a takeover counts too). The online that
    /// makes it more than `max` within the window is refused and starts the ban; every online
    /// during the ban is refused and does not extend it.
    pub fn online(&self, device: DeviceId, now: Instant) -> Verdict {
        let (Some(rule), Some(word)) = (self.rule, self.devices.get(device)) else {
            return Verdict::Admit;
        };
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let mut old = word.load(Ordering::Acquire);
        loop {
            let (new, refused) = Flap(old).online(now_ms, &rule);
            if new.0 != old {
                if let Err(seen) =
                    word.compare_exchange_weak(old, new.0, Ordering::AcqRel, Ordering::Acquire)
                {
                    old = seen;
                    continue;
                }
            }
            return match refused {
                None => Verdict::Admit,
                Some((until, started)) => Verdict::Refused {
                    until: self.epoch + Duration::from_millis(until),
                    started,
                },
            };
        }
    }

    /// Whether a ban's log line may go out now; see [`RateLimit::allow`].
    pub fn log_gate(&self, now: Instant) -> Option<u64> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(now)
    }
}

/// Everything the shards share to enforce the process-wide limits.
#[derive(Debug)]
pub struct Admission {
    pub pacer: AcceptPacer,
    pub per_ip: PerIp,
    pub flapping: Flapping,
}

impl Admission {
    /// For device ids `0..devices` (see [`Flapping::grow`] for more), times counted from
    /// `epoch`.
    pub fn new(settings: &AdmissionSettings, devices: usize, epoch: Instant) -> Self {
        Self {
            pacer: AcceptPacer::new(settings.accept, epoch),
            per_ip: PerIp::new(settings.max_connections_per_ip),
            flapping: Flapping::new(settings.flapping, devices, epoch),
        }
    }

    /// No limit at all (tests, benchmarks).
    pub fn off(epoch: Instant) -> Self {
        Self::new(&AdmissionSettings::default(), 0, epoch)
    }
}

/// The process-wide limits' settings (from `[limits]`); the default is every limit off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// New connections per second over the process, `None` = off.
    pub accept: Option<Rate>,
    /// Open connections per source IP, 0 = off.
    pub max_connections_per_ip: u32,
    pub flapping: Option<FlapRule>,
}

/// A hash map split over a few locks, for state touched only at accept, close or online.
#[derive(Debug)]
struct Striped<K, V> {
    hasher: std::collections::hash_map::RandomState,
    stripes: Box<[Mutex<HashMap<K, V>>]>,
}

impl<K: Hash + Eq, V> Striped<K, V> {
    fn new() -> Self {
        Self {
            hasher: std::collections::hash_map::RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn lock(&self, key: &K) -> MutexGuard<'_, HashMap<K, V>> {
        let i = self.hasher.hash_one(key) as usize % self.stripes.len();
        // A panic while holding a stripe leaves its counts as they were: still usable.
        self.stripes[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// At most one log line per limit this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The log gate of one limit: one line per [`LOG_EVERY`], the next one saying how many were
/// held back.
pub fn log_gate() -> RateLimit {
    RateLimit::new(1, LOG_EVERY)
}

const STRIPES: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_passes_the_burst_then_one_per_interval() {
        let rate = Rate::per_second(10, 3).expect("on");
        let t0 = Instant::now();
        let mut b = Bucket::default();
        assert_eq!(b.take(&rate, t0), None);
        assert_eq!(b.take(&rate, t0), None);
        // The third fills the burst: the next would be over, pause until one interval is back.
        assert_eq!(b.take(&rate, t0), Some(t0 + ms(100)));
        assert_eq!(b.resume_at(&rate, t0 + ms(99)), Some(t0 + ms(100)));
        assert_eq!(b.resume_at(&rate, t0 + ms(100)), None);
        // From then on, one message per 100 ms.
        assert_eq!(b.take(&rate, t0 + ms(100)), Some(t0 + ms(200)));
        assert_eq!(b.take(&rate, t0 + ms(200)), Some(t0 + ms(300)));
        // Idle long enough, the whole burst is back.
        let later = t0 + ms(10_000);
        assert_eq!(b.take(&rate, later), None);
        assert_eq!(b.take(&rate, later), None);
        assert!(b.take(&rate, later).is_some());
    }

    #[test]
    fn messages_read_while_paused_are_a_debt_not_a_drop() {
        let rate = Rate::per_second(100, 1).expect("on");
        let t0 = Instant::now();
        let mut b = Bucket::default();
        // 50 messages in one read: all counted, reading resumes when they are paid for.
        let mut until = None;
        for _ in 0..50 {
            until = b.take(&rate, t0);
        }
        assert_eq!(until, Some(t0 + ms(500)));
    }

    #[test]
    fn over_a_virtual_second_the_rate_holds() {
        // A reader that reads one message whenever it is allowed to, for 10 virtual seconds.
        let rate = Rate::per_second(200, 20).expect("on");
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = Bucket::default();
        let mut n = 0u32;
        while now < t0 + Duration::from_secs(10) {
            n += 1;
            if let Some(until) = b.take(&rate, now) {
                now = until;
            }
        }
        // 20 at once, then 200 a second.
        assert!((2_015..=2_021).contains(&n), "{n}");
    }

    #[test]
    fn a_paused_reader_is_woken_about_every_10_ms_and_keeps_its_rate() {
        // 5000/s is 200 µs apart; the driver resumes 150 µs after each deadline (a loop turn,
        // a timer) and reads whatever arrived meanwhile: 10 virtual seconds.
        let rate = Rate::per_second(5_000, 5_000).expect("on");
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = Bucket::default();
        let (mut n, mut pauses) = (0u32, 0u32);
        while now < t0 + Duration::from_secs(10) {
            n += 1;
            if let Some(until) = b.take(&rate, now) {
                pauses += 1;
                now = until + Duration::from_micros(150);
            }
        }
        // The burst, then 50 000 at the rate (within 1 %), in chunks of 50.
        let paced = f64::from(n - 5_000);
        assert!((49_500.0..=50_050.0).contains(&paced), "{n}");
        assert!((990..=1_010).contains(&pauses), "{pauses}");
    }

    #[test]
    fn zero_is_off() {
        assert_eq!(Rate::per_second(0, 10), None);
        let p = AcceptPacer::new(None, Instant::now());
        assert_eq!(p.admit(Instant::now()), None);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let per_ip = PerIp::new(0);
        for _ in 0..10 {
            assert!(per_ip.try_add(ip));
        }
        let f = Flapping::new(None, 16, Instant::now());
        for _ in 0..100 {
            assert_eq!(
                f.online(DeviceId::for_tests(1), Instant::now()),
                Verdict::Admit
            );
        }
    }

    #[test]
    fn the_accept_pacer_pauses_the_process_after_its_burst() {
        let t0 = Instant::now();
        let p = AcceptPacer::new(Rate::per_second(50, 5), t0);
        for _ in 0..4 {
            assert_eq!(p.admit(t0), None);
        }
        assert_eq!(p.admit(t0), Some(t0 + ms(20)));
        // Another shard's accept, taken by the kernel before the pause: served, and the pause
        // grows.
        assert_eq!(p.admit(t0 + ms(1)), Some(t0 + ms(40)));
        // Accepting again when told: one more every 20 ms.
        assert_eq!(p.admit(t0 + ms(40)), Some(t0 + ms(60)));
        assert_eq!(p.admit(t0 + ms(60)), Some(t0 + ms(80)));
        // Paced at 50/s over a virtual second.
        let mut now = t0 + ms(80);
        let mut n = 0;
        while now < t0 + ms(1_080) {
            n += 1;
            now = p.admit(now).unwrap_or(now);
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn per_ip_counts_each_address_apart() {
        let per_ip = PerIp::new(2);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        assert!(per_ip.try_add(a));
        assert!(per_ip.try_add(a));
        assert!(!per_ip.try_add(a), "third from the same address");
        assert!(per_ip.try_add(b), "another address is not affected");
        assert_eq!(per_ip.count(a), 2);
        per_ip.remove(a);
        assert!(per_ip.try_add(a), "room again after a close");
        per_ip.remove(a);
        per_ip.remove(a);
        per_ip.remove(b);
        assert_eq!(per_ip.count(a), 0);
        assert_eq!(per_ip.count(b), 0);
    }

    #[test]
    fn a_flapping_device_is_banned_then_the_ban_expires() {
        let t0 = Instant::now();
        let rule = FlapRule {
            max: 3,
            window: ms(1_000),
            ban: ms(5_000),
        };
        let f = Flapping::new(Some(rule), 16, t0);
        let d = DeviceId::for_tests(7);
        let other = DeviceId::for_tests(8);
        for i in 0..3 {
            assert_eq!(f.online(d, t0 + ms(i * 100)), Verdict::Admit);
        }
        // The fourth within the second starts the ban.
        assert_eq!(
            f.online(d, t0 + ms(300)),
            Verdict::Refused {
                until: t0 + ms(5_300),
                started: true
            }
        );
        // Refused during the ban, which does not grow.
        assert_eq!(
            f.online(d, t0 + ms(5_000)),
            Verdict::Refused {
                until: t0 + ms(5_300),
                started: false
            }
        );
        // Other devices are not affected.
        assert_eq!(f.online(other, t0 + ms(400)), Verdict::Admit);
        // Over: a fresh window.
        for i in 0..3 {
            assert_eq!(f.online(d, t0 + ms(5_300 + i)), Verdict::Admit);
        }
    }

    #[test]
    fn onlines_spread_over_windows_are_not_flapping() {
        let t0 = Instant::now();
        let rule = FlapRule {
            max: 3,
            window: ms(1_000),
            ban: ms(5_000),
        };
        let f = Flapping::new(Some(rule), 16, t0);
        let d = DeviceId::for_tests(1);
        // One every 400 ms for 20 s: at most 3 per fixed window.
        for i in 0..50 {
            assert_eq!(f.online(d, t0 + ms(i * 400)), Verdict::Admit, "{i}");
        }
    }

    #[test]
    fn the_flapping_word_holds_the_largest_settings() {
        // The largest count the config allows, a window and a ban of years, a late start.
        let t0 = Instant::now();
        let rule = FlapRule {
            max: 1_000_000,
            window: Duration::from_secs(3 * 365 * 86_400),
            ban: Duration::from_secs(365 * 86_400),
        };
        let f = Flapping::new(Some(rule), 16, t0);
        let d = DeviceId::for_tests(3);
        let start = t0 + Duration::from_secs(10 * 365 * 86_400);
        for i in 0..1_000_000 {
            assert_eq!(f.online(d, start + ms(i % 1000)), Verdict::Admit, "{i}");
        }
        let late = start + ms(2_000);
        assert_eq!(
            f.online(d, late),
            Verdict::Refused {
                until: late + rule.ban,
                started: true
            }
        );
        // A device the table has no room for (added later by a reload) is not tracked until
        // the table grows; then it is.
        let new = DeviceId::for_tests(5_000);
        assert_eq!(f.online(new, late), Verdict::Admit);
        f.grow(5_001);
        assert_eq!(f.online(new, late), Verdict::Admit);
        let tight = Flapping::new(Some(FlapRule { max: 1, ..rule }), 16, t0);
        assert_eq!(tight.online(d, t0), Verdict::Admit);
        assert!(matches!(
            tight.online(d, t0),
            Verdict::Refused { started: true, .. }
        ));
    }
}
