//! The open-loop schedule: the intended send time of every request at a constant rate.
//!
//! Latency in an open-loop run is measured from a request's *intended* send time, not from the
//! moment a connection was free to send it. A server that stalls therefore pays for every request
//! that should have been sent during the stall (no coordinated omission, as in wrk2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Intended send times at a constant rate: request `i` is due at `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
    len: u64,
}

impl Schedule {
    /// A schedule of `rate` requests per second starting at `start` and lasting `length`.
    ///
    /// It holds `floor(rate × length)` requests. A rate that is not finite and positive gives an
    /// empty schedule.
    pub fn new(start: Instant, rate: f64, length: Duration) -> Self {
        if !(rate.is_finite() && rate > 0.0) {
            return Self {
                start,
                interval: Duration::MAX,
                len: 0,
            };
        }
        let len = (rate * length.as_secs_f64()).floor() as u64;
        Self {
            start,
            interval: Duration::from_secs_f64(1.0 / rate),
            len,
        }
    }

    /// How many requests the schedule holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the schedule holds no request.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The time between two consecutive requests.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many requests are due at `now` (intended time at or before it), at most [`Self::len`].
    pub fn due_by(&self, now: Instant) -> u64 {
        if self.len == 0 || now < self.start {
            return 0;
        }
        let elapsed = (now - self.start).as_nanos();
        let due = elapsed / self.interval.as_nanos().max(1) + 1;
        u64::try_from(due).unwrap_or(u64::MAX).min(self.len)
    }

    /// The intended send time of request `i`, or `None` past the end of the schedule.
    pub fn intended(&self, i: u64) -> Option<Instant> {
        if i >= self.len {
            return None;
        }
        // Computed from the start every time so that rounding does not accumulate.
        let offset = self.interval.as_nanos().checked_mul(u128::from(i))?;
        let offset = Duration::from_nanos(u64::try_from(offset).ok()?);
        self.start.checked_add(offset)
    }
}

/// Hands out the requests of a [`Schedule`] to the workers, in order, each exactly once.
///
/// A worker claims the next ticket when it is free and its time has come (the generator releases
/// tickets from a pacing thread, see [`pace`]). When every worker is busy, the next ticket is
/// claimed late, and its latency includes that wait.
#[derive(Debug)]
pub struct Tickets {
    schedule: Schedule,
    next: AtomicU64,
}

impl Tickets {
    /// Tickets over `schedule`, starting with the first request.
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            next: AtomicU64::new(0),
        }
    }

    /// Claims the next request: its index and intended send time, or `None` when all are taken.
    pub fn claim(&self) -> Option<(u64, Instant)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule.intended(i).map(|t| (i, t))
    }

    /// How many tickets were claimed so far (may exceed the schedule's length).
    pub fn claimed(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Whether every ticket has been claimed.
    pub fn exhausted(&self) -> bool {
        self.claimed() >= self.schedule.len()
    }

    /// The schedule the tickets come from.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
}

/// Releases the requests of `schedule` as they fall due, by adding one permit per request to
/// `permits` (from a plain thread, whose sleeps are far finer than tokio's 1 ms timer wheel).
/// Once all are released it adds `sentinels` more, so that every waiting worker wakes up, finds
/// no ticket left and stops.
pub fn pace(schedule: Schedule, permits: &tokio::sync::Semaphore, sentinels: usize) {
    let mut released = 0u64;
    while released < schedule.len() {
        let now = Instant::now();
        let due = schedule.due_by(now);
        if due > released {
            permits.add_permits(usize::try_from(due - released).unwrap_or(usize::MAX));
            released = due;
        }
        if let Some(next) = schedule.intended(released) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }
    permits.add_permits(sentinels);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_has_exact_times() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0, Duration::from_secs(1));
        assert_eq!(s.len(), 1000);
        assert_eq!(s.intended(0), Some(start));
        assert_eq!(s.intended(1), Some(start + Duration::from_millis(1)));
        assert_eq!(s.intended(999), Some(start + Duration::from_millis(999)));
        assert_eq!(s.intended(1000), None);
    }

    #[test]
    fn times_are_strictly_increasing_and_evenly_spaced() {
        let start = Instant::now();
        let s = Schedule::new(start, 3.0, Duration::from_secs(10));
        assert_eq!(s.len(), 30);
        let times: Vec<_> = (0..s.len()).map(|i| s.intended(i).unwrap()).collect();
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap > Duration::from_nanos(333_333_000) && gap < Duration::from_nanos(333_334_000),
                "{gap:?}"
            );
        }
        // No drift: the last time is computed from the start, not summed.
        let last = times[29] - start;
        assert!((last.as_secs_f64() - 29.0 / 3.0).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn due_counts_follow_the_intended_times() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0, Duration::from_millis(10));
        assert_eq!(s.due_by(start - Duration::from_millis(1)), 0);
        assert_eq!(s.due_by(start), 1);
        assert_eq!(s.due_by(start + Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(start + Duration::from_millis(1)), 2);
        assert_eq!(s.due_by(start + Duration::from_secs(5)), 10);
        for i in 0..10 {
            assert_eq!(s.due_by(s.intended(i).unwrap()), i + 1);
        }
    }

    #[test]
    fn fractional_counts_round_down() {
        let s = Schedule::new(Instant::now(), 2.5, Duration::from_millis(1900));
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn invalid_rates_give_empty_schedules() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = Schedule::new(Instant::now(), rate, Duration::from_secs(1));
            assert!(s.is_empty(), "{rate}");
            assert_eq!(s.intended(0), None);
        }
    }

    #[test]
    fn tickets_are_claimed_once_in_order() {
        let start = Instant::now();
        let t = Tickets::new(Schedule::new(start, 100.0, Duration::from_millis(50)));
        let claimed: Vec<_> = std::iter::from_fn(|| t.claim()).collect();
        assert_eq!(claimed.len(), 5);
        for (k, (i, at)) in claimed.iter().enumerate() {
            assert_eq!(*i, k as u64);
            assert_eq!(*at, start + Duration::from_millis(10 * k as u64));
        }
        assert!(t.claim().is_none());
        assert!(t.exhausted());
    }

    #[test]
    fn pacing_releases_every_request_on_time_then_the_sentinels() {
        let start = Instant::now();
        let s = Schedule::new(start, 2_000.0, Duration::from_millis(50));
        let permits = tokio::sync::Semaphore::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| pace(s, &permits, 3));
            // Half-way through, about half of the requests are released.
            std::thread::sleep(Duration::from_millis(25));
            let mid = permits.available_permits();
            assert!((30..=70).contains(&mid), "{mid}");
        });
        assert!(start.elapsed() >= Duration::from_millis(49));
        assert_eq!(permits.available_permits(), 100 + 3);
    }

    #[test]
    fn tickets_are_shared_between_threads_without_loss_or_duplicates() {
        let t = std::sync::Arc::new(Tickets::new(Schedule::new(
            Instant::now(),
            10_000.0,
            Duration::from_secs(1),
        )));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    std::iter::from_fn(|| t.claim().map(|(i, _)| i)).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }
}
