//! Local rate limiting per route with governor: one token bucket per key (client IP, a header's
//! value, or the whole route).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// What a rate-limit bucket is kept for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client's IP address.
    ClientIp,
    /// A request header's value (requests without it share one bucket).
    Header(http::HeaderName),
    /// One bucket for the route.
    Route,
}

/// A route's rate limiter.
pub struct RouteRateLimiter {
    limiter: DefaultKeyedRateLimiter<Vec<u8>>,
    /// How buckets are keyed.
    pub key: Key,
    /// Fingerprint of the settings, to keep the limiter (and its buckets) across reloads.
    pub fingerprint: String,
}

impl std::fmt::Debug for RouteRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteRateLimiter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl RouteRateLimiter {
    /// `requests` per `per`, bursting to `burst`.
    pub fn new(
        requests: NonZeroU32,
        per: Duration,
        burst: NonZeroU32,
        key: Key,
        fingerprint: String,
    ) -> Option<RouteRateLimiter> {
        let quota = Quota::with_period(per / requests.get())?.allow_burst(burst);
        Some(RouteRateLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            key,
            fingerprint,
        })
    }

    /// Take a token for `key`; on refusal, how long until one is available.
    pub fn check(&self, key: &[u8]) -> Result<(), Duration> {
        // Allocation only for the lookup key; governor's map is sharded and lock-free for reads.
        match self.limiter.check_key(&key.to_vec()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// Drop buckets that are full again (bounded memory).
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key() {
        let l = RouteRateLimiter::new(
            NonZeroU32::new(2).unwrap(),
            Duration::from_secs(60),
            NonZeroU32::new(2).unwrap(),
            Key::ClientIp,
            String::new(),
        )
        .unwrap();
        assert!(l.check(b"a").is_ok());
        assert!(l.check(b"a").is_ok());
        let wait = l.check(b"a").unwrap_err();
        assert!(wait > Duration::from_secs(1));
        assert!(l.check(b"b").is_ok());
    }
}
