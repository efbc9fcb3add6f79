//! Local rate limiting with governor: per route, one token bucket per key (client IP, a
//! header's value, or the whole route); and for filters, the buckets behind the
//! `weir_rate_limit` foreign function when a call carries its own quota ([`QuotaLimiters`]).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};
use weir_wasm_host::RateLimitQuota;

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
    /// Checks so far, to sweep full buckets every [`SWEEP_EVERY`].
    calls: AtomicU64,
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
            calls: AtomicU64::new(0),
            key,
            fingerprint,
        })
    }

    /// Take a token for `key`; on refusal, how long until one is available.
    pub fn check(&self, key: &[u8]) -> Result<(), Duration> {
        // Buckets of keys gone quiet (full again) are dropped now and then: memory follows the
        // keys in use, not every client ever seen.
        if self.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        // Allocation only for the lookup key; governor's map is sharded and lock-free for reads.
        match self.limiter.check_key(&key.to_vec()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(self.limiter.clock().now())),
        }
    }
}

/// Distinct quotas one [`QuotaLimiters`] keeps; calls with more answer [`TooManyQuotas`].
pub const MAX_QUOTAS: usize = 256;

/// Calls to one limiter between two sweeps of its full buckets.
const SWEEP_EVERY: u64 = 4096;

/// The answer to a [`QuotaLimiters::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// The permits were taken; `remaining` are left in the bucket.
    Allowed {
        /// Permits left.
        remaining: u32,
    },
    /// Refused: a retry may succeed after this long (`Duration::MAX`: never, the cost is
    /// larger than the bucket).
    Limited {
        /// How long until the permits are available.
        retry_after: Duration,
    },
}

/// A call named a quota past [`MAX_QUOTAS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_QUOTAS} distinct rate-limit quotas")]
pub struct TooManyQuotas;

/// One quota's buckets, by key.
struct QuotaLimiter {
    limiter: DefaultKeyedRateLimiter<Vec<u8>, StateInformationMiddleware>,
    calls: AtomicU64,
}

/// The buckets of `weir_rate_limit` calls that carry their own quota (as `builtin:ratelimit`
/// does): one keyed limiter per distinct quota, created on first use. Full buckets are swept
/// every few thousand calls, so memory follows the keys in use.
#[derive(Default)]
pub struct QuotaLimiters {
    by_quota: RwLock<HashMap<RateLimitQuota, Arc<QuotaLimiter>>>,
}

impl QuotaLimiters {
    /// Take `cost` permits (at least 1) from bucket `key` of `quota`.
    pub fn check(
        &self,
        quota: RateLimitQuota,
        key: &str,
        cost: u32,
    ) -> Result<QuotaDecision, TooManyQuotas> {
        let limiter = self.limiter(quota)?;
        let key = key.as_bytes().to_vec();
        // The limiter's own clock: `DefaultClock::default()` calibrates a new clock (CPUID)
        // every time, a cost on every call.
        let now = limiter.limiter.clock().now();
        let outcome = match NonZeroU32::new(cost) {
            None | Some(NonZeroU32::MIN) => Ok(limiter.limiter.check_key(&key)),
            Some(n) => limiter.limiter.check_key_n(&key, n),
        };
        if limiter.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.limiter.retain_recent();
        }
        Ok(match outcome {
            Ok(Ok(state)) => QuotaDecision::Allowed {
                remaining: state.remaining_burst_capacity(),
            },
            Ok(Err(not_until)) => QuotaDecision::Limited {
                retry_after: not_until.wait_time_from(now),
            },
            Err(_) => QuotaDecision::Limited {
                retry_after: Duration::MAX,
            },
        })
    }

    /// The limiter of `quota`, created on first use.
    fn limiter(&self, quota: RateLimitQuota) -> Result<Arc<QuotaLimiter>, TooManyQuotas> {
        if let Some(l) = self
            .by_quota
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&quota)
        {
            return Ok(l.clone());
        }
        let mut by_quota = self.by_quota.write().unwrap_or_else(|e| e.into_inner());
        let len = by_quota.len();
        match by_quota.entry(quota) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.get().clone()),
            std::collections::hash_map::Entry::Vacant(_) if len >= MAX_QUOTAS => Err(TooManyQuotas),
            std::collections::hash_map::Entry::Vacant(e) => {
                let requests = NonZeroU32::new(quota.requests).unwrap_or(NonZeroU32::MIN);
                let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
                // Never zero, so `with_period` always answers.
                let interval = (quota.per / requests.get()).max(Duration::from_nanos(1));
                let period =
                    Quota::with_period(interval).unwrap_or_else(|| Quota::per_second(requests));
                let limiter = DefaultKeyedRateLimiter::keyed(period.allow_burst(burst))
                    .with_middleware::<StateInformationMiddleware>();
                Ok(e.insert(Arc::new(QuotaLimiter {
                    limiter,
                    calls: AtomicU64::new(0),
                }))
                .clone())
            }
        }
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

    #[test]
    fn buckets_of_quiet_keys_are_swept() {
        // 1,000 per second: a used bucket is full again after 1 ms.
        let l = RouteRateLimiter::new(
            NonZeroU32::new(1000).unwrap(),
            Duration::from_secs(1),
            NonZeroU32::new(1).unwrap(),
            Key::ClientIp,
            String::new(),
        )
        .unwrap();
        for i in 0..SWEEP_EVERY - 1 {
            assert!(l.check(&i.to_le_bytes()).is_ok());
        }
        assert_eq!(l.limiter.len(), (SWEEP_EVERY - 1) as usize);
        std::thread::sleep(Duration::from_millis(20));
        // This check sweeps first: every earlier bucket is full again and goes.
        assert!(l.check(b"new").is_ok());
        assert_eq!(l.limiter.len(), 1);
    }

    fn quota(requests: u32, per: Duration, burst: u32) -> RateLimitQuota {
        RateLimitQuota {
            requests,
            per,
            burst,
        }
    }

    #[test]
    fn quotas_from_calls_have_their_own_buckets() {
        let limiters = QuotaLimiters::default();
        let q = quota(3, Duration::from_secs(60), 3);
        let remaining: Vec<_> = (0..3).map(|_| limiters.check(q, "a", 1).unwrap()).collect();
        assert_eq!(
            remaining,
            [2, 1, 0].map(|remaining| QuotaDecision::Allowed { remaining })
        );
        match limiters.check(q, "a", 1).unwrap() {
            QuotaDecision::Limited { retry_after } => {
                assert!(retry_after > Duration::from_secs(19), "{retry_after:?}");
                assert!(retry_after <= Duration::from_secs(20), "{retry_after:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            limiters.check(q, "b", 1),
            Ok(QuotaDecision::Allowed { remaining: 2 })
        ));
        // Same key, another quota: another bucket.
        let other = quota(3, Duration::from_secs(60), 5);
        assert!(matches!(
            limiters.check(other, "a", 1),
            Ok(QuotaDecision::Allowed { remaining: 4 })
        ));
        // A cost larger than the bucket can never pass; a cost within it takes that many.
        assert_eq!(
            limiters.check(other, "c", 6),
            Ok(QuotaDecision::Limited {
                retry_after: Duration::MAX
            })
        );
        assert_eq!(
            limiters.check(other, "c", 2),
            Ok(QuotaDecision::Allowed { remaining: 3 })
        );
    }

    #[test]
    fn quotas_are_bounded() {
        let limiters = QuotaLimiters::default();
        for i in 0..MAX_QUOTAS as u32 {
            limiters
                .check(quota(i + 1, Duration::from_secs(1), 1), "k", 1)
                .unwrap();
        }
        let one_more = quota(MAX_QUOTAS as u32 + 1, Duration::from_secs(1), 1);
        assert_eq!(limiters.check(one_more, "k", 1), Err(TooManyQuotas));
        // Known quotas still work.
        assert!(
            limiters
                .check(quota(1, Duration::from_secs(1), 1), "other", 1)
                .is_ok()
        );
    }
}
