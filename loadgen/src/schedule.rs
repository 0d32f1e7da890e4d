//! Open-loop schedules: when each message is *meant* to be sent, independent of when replies
//! come back or when the sender gets to run.
//!
//! Latency is measured from the intended time, not the actual send time, so a stalled server
//! (or a stalled loadgen) shows up as latency instead of silently lowering the offered load:
//! the correction for coordinated omission. No clock is read here; callers pass `now`.

use std::time::{Duration, Instant};

/// A sequence of intended send times with a fixed mean rate.
#[derive(Debug, Clone)]
pub struct Schedule {
    next: Instant,
    /// Mean interval in nanoseconds (`1e9 / rate`).
    mean_ns: f64,
    jitter: f64,
}

impl Schedule {
    /// `rate` events per second starting at a random phase within the first interval after
    /// `start` (so that many connections started together do not fire together). Each
    /// interval is `mean * (1 + jitter * u)` with `u` uniform in -1..1: the mean is exact.
    /// `None` when `rate` is 0.
    pub fn new(start: Instant, rate: f64, jitter: f64, rng: &mut fastrand::Rng) -> Option<Self> {
        if !(rate > 0.0 && rate.is_finite()) {
            return None;
        }
        let mean_ns = 1e9 / rate;
        let phase = Duration::from_nanos((mean_ns * rng.f64()) as u64);
        Some(Self {
            next: start + phase,
            mean_ns,
            jitter: jitter.clamp(0.0, 1.0),
        })
    }

    /// Evenly spaced from `start` itself, no jitter (ramps).
    pub fn fixed(start: Instant, rate: f64) -> Option<Self> {
        if !(rate > 0.0 && rate.is_finite()) {
            return None;
        }
        Some(Self {
            next: start,
            mean_ns: 1e9 / rate,
            jitter: 0.0,
        })
    }

    /// The next intended time.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Takes the next intended time if it is due at `now`; the schedule moves on regardless of
    /// how late `now` is, so a caller that fell behind gets every missed time, in order.
    pub fn take_due(&mut self, now: Instant, rng: &mut fastrand::Rng) -> Option<Instant> {
        if self.next > now {
            return None;
        }
        let due = self.next;
        let factor = 1.0 + self.jitter * (2.0 * rng.f64() - 1.0);
        self.next += Duration::from_nanos((self.mean_ns * factor).max(0.0) as u64);
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_is_no_schedule() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert!(Schedule::new(Instant::now(), 0.0, 0.5, &mut rng).is_none());
        assert!(Schedule::fixed(Instant::now(), 0.0).is_none());
    }

    #[test]
    fn intended_times_do_not_depend_on_when_they_are_polled() {
        let start = Instant::now();
        let mut a =
            Schedule::new(start, 100.0, 0.5, &mut fastrand::Rng::with_seed(9)).expect("schedule");
        let mut b = a.clone();
        let (mut ra, mut rb) = (fastrand::Rng::with_seed(3), fastrand::Rng::with_seed(3));
        // `a` polled every millisecond, `b` once after 10 s (a stalled sender).
        let mut times_a = Vec::new();
        for ms in 0..=10_000 {
            let now = start + Duration::from_millis(ms);
            while let Some(t) = a.take_due(now, &mut ra) {
                times_a.push(t);
            }
        }
        let late = start + Duration::from_secs(10);
        let mut times_b = Vec::new();
        while let Some(t) = b.take_due(late, &mut rb) {
            times_b.push(t);
        }
        assert_eq!(
            times_a, times_b,
            "a late poll yields the same intended times"
        );
        // Open loop: about rate * time events, each within the schedule, none after `late`.
        assert!((960..=1040).contains(&times_a.len()), "{}", times_a.len());
        assert!(times_a.windows(2).all(|w| w[0] <= w[1]));
        assert!(times_a.iter().all(|t| *t <= late));
        // Intervals stay within mean * (1 +- jitter).
        for w in times_a.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= Duration::from_millis(5) && gap <= Duration::from_millis(15));
        }
    }

    #[test]
    fn fixed_schedule_is_even_and_starts_at_start() {
        let start = Instant::now();
        let mut s = Schedule::fixed(start, 4.0).expect("schedule");
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<_> =
            std::iter::from_fn(|| s.take_due(start + Duration::from_secs(1), &mut rng)).collect();
        assert_eq!(
            got,
            [0, 250, 500, 750, 1000].map(|ms| start + Duration::from_millis(ms))
        );
        assert_eq!(s.next(), start + Duration::from_millis(1250));
    }
}
