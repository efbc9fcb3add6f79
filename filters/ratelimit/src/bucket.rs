//! The token bucket (GCRA, as governor in the gateway implements it) and the wire formats of
//! the `weir_rate_limit` foreign function and of a bucket kept in shared data.
//!
//! A bucket holds up to `burst` tokens and gains one every `per / requests`, continuously: a
//! request takes one token or is refused. The state is one number, the "theoretical arrival
//! time" (TAT, Unix nanoseconds): the bucket is full when TAT ≤ now, and holds
//! `(now + burst·T − TAT) / T` tokens otherwise (`T` = `per / requests`).

/// A token bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Tokens gained per `per_ns` (at least 1).
    pub requests: u32,
    /// The fill interval in nanoseconds (not zero).
    pub per_ns: u64,
    /// Bucket size (at least 1).
    pub burst: u32,
}

impl Quota {
    /// Nanoseconds per token (at least 1).
    fn interval_ns(&self) -> u64 {
        (self.per_ns / u64::from(self.requests.max(1))).max(1)
    }

    /// Nanoseconds a full bucket stands for.
    fn capacity_ns(&self) -> u64 {
        self.interval_ns().saturating_mul(u64::from(self.burst))
    }

    /// Seconds until a bucket holding `remaining` tokens is full again, rounded up.
    pub fn reset_secs(&self, remaining: u32) -> u64 {
        let missing = u64::from(self.burst.saturating_sub(remaining));
        secs_ceil(missing.saturating_mul(self.interval_ns()))
    }
}

/// Nanoseconds as whole seconds, rounded up.
pub fn secs_ceil(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Let through; the tokens left when known.
    Allowed {
        /// Tokens left in the bucket (`None`: the limiter did not say).
        remaining: Option<u32>,
    },
    /// Refused; a retry may succeed after this many nanoseconds.
    Limited {
        /// Nanoseconds until a token is available.
        retry_after_ns: u64,
    },
}

/// Take one token from a bucket whose state is `tat` (`None`: never used) at time `now` (Unix
/// ns). Returns the outcome and, when a token was taken, the new state to store.
///
/// A TAT further ahead than a full bucket allows (the clock went back) counts as a full bucket.
pub fn take(tat: Option<u64>, now: u64, quota: &Quota) -> (Outcome, Option<u64>) {
    let interval = quota.interval_ns();
    let capacity = quota.capacity_ns();
    let tat = match tat {
        Some(t) if t > now && t - now <= capacity => t,
        _ => now,
    };
    let next = tat.saturating_add(interval);
    let used = next - now;
    if used <= capacity {
        let remaining = u32::try_from((capacity - used) / interval).unwrap_or(u32::MAX);
        (
            Outcome::Allowed {
                remaining: Some(remaining),
            },
            Some(next),
        )
    } else {
        (
            Outcome::Limited {
                retry_after_ns: used - capacity,
            },
            None,
        )
    }
}

/// The foreign function the gateway provides.
pub const RATE_LIMIT_FUNCTION: &str = "weir_rate_limit";

/// Arguments of a `weir_rate_limit` call that carries `quota`: `u32` cost 1, the marker byte
/// `0xFF`, `u32` requests, `u64` period in ns, `u32` burst (little-endian), then the key.
pub fn foreign_args(quota: &Quota, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + key.len());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.push(0xFF);
    out.extend_from_slice(&quota.requests.to_le_bytes());
    out.extend_from_slice(&quota.per_ns.to_le_bytes());
    out.extend_from_slice(&quota.burst.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Read a `weir_rate_limit` result: `[1]` or `[1]` + `u32` remaining, or `[0]` + `u64` ns.
/// `None` when it is neither.
pub fn foreign_result(result: &[u8]) -> Option<Outcome> {
    match result {
        [1] => Some(Outcome::Allowed { remaining: None }),
        [1, rest @ ..] => Some(Outcome::Allowed {
            remaining: Some(u32::from_le_bytes(rest.try_into().ok()?)),
        }),
        [0, rest @ ..] => Some(Outcome::Limited {
            retry_after_ns: u64::from_le_bytes(rest.try_into().ok()?),
        }),
        _ => None,
    }
}

/// A bucket state as stored in shared data (8 bytes, little-endian). `None` for anything else.
pub fn decode_state(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The `x-ratelimit-*` headers for an outcome (Envoy's draft-03 names): the bucket size, the
/// tokens left when known, and the seconds until the bucket is full again.
pub fn rate_limit_headers(quota: &Quota, outcome: &Outcome) -> Vec<(&'static str, String)> {
    let remaining = match outcome {
        Outcome::Allowed { remaining } => *remaining,
        Outcome::Limited { .. } => Some(0),
    };
    let mut headers = vec![("x-ratelimit-limit", quota.burst.to_string())];
    if let Some(r) = remaining {
        headers.push(("x-ratelimit-remaining", r.to_string()));
    }
    // Unknown remaining: the time a bucket needs from empty is the upper bound.
    let reset = quota.reset_secs(remaining.unwrap_or(0));
    headers.push(("x-ratelimit-reset", reset.to_string()));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn quota(requests: u32, per_ns: u64, burst: u32) -> Quota {
        Quota {
            requests,
            per_ns,
            burst,
        }
    }

    /// Run `n` requests at `now`, threading the state; returns the outcomes and the state.
    fn run(n: usize, now: u64, mut tat: Option<u64>, q: &Quota) -> (Vec<Outcome>, Option<u64>) {
        let mut out = Vec::new();
        for _ in 0..n {
            let (o, next) = take(tat, now, q);
            tat = next.or(tat);
            out.push(o);
        }
        (out, tat)
    }

    #[test]
    fn a_burst_passes_then_requests_are_limited() {
        let q = quota(3, 60 * SEC, 3);
        let now = 1_700_000_000 * SEC;
        let (out, tat) = run(4, now, None, &q);
        let remaining: Vec<_> = out
            .iter()
            .map(|o| match o {
                Outcome::Allowed { remaining } => remaining.map(i64::from).unwrap_or(-1),
                Outcome::Limited { .. } => -2,
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0, -2]);
        // The next token comes 20 s after the first request.
        assert_eq!(
            out[3],
            Outcome::Limited {
                retry_after_ns: 20 * SEC
            }
        );
        // 20 s later exactly one more passes.
        let (out, _) = run(2, now + 20 * SEC, tat, &q);
        assert_eq!(out[0], Outcome::Allowed { remaining: Some(0) });
        assert!(matches!(out[1], Outcome::Limited { .. }));
        // After a full interval the bucket is full again.
        let (out, _) = run(4, now + 60 * SEC, tat, &q);
        assert_eq!(out[2], Outcome::Allowed { remaining: Some(0) });
        assert!(matches!(out[3], Outcome::Limited { .. }));
    }

    #[test]
    fn burst_larger_and_smaller_than_requests() {
        // 10/s with a bucket of 2: two at once, then one every 100 ms.
        let q = quota(10, SEC, 2);
        let (out, tat) = run(3, 0, None, &q);
        assert!(
            matches!(out[2], Outcome::Limited { retry_after_ns } if retry_after_ns == SEC / 10)
        );
        let (out, _) = run(2, SEC / 10, tat, &q);
        assert!(matches!(out[0], Outcome::Allowed { .. }));
        assert!(matches!(out[1], Outcome::Limited { .. }));
        // 1 per second with a bucket of 5.
        let q = quota(1, SEC, 5);
        let (out, _) = run(6, 0, None, &q);
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Outcome::Allowed { .. }))
                .count(),
            5
        );
    }

    #[test]
    fn a_clock_that_went_back_does_not_lock_the_bucket() {
        let q = quota(1, SEC, 1);
        let far_future = 1_000 * SEC;
        let (o, _) = take(Some(far_future), 10 * SEC, &q);
        assert_eq!(o, Outcome::Allowed { remaining: Some(0) });
    }

    #[test]
    fn reset_and_headers() {
        let q = quota(100, SEC, 100);
        assert_eq!(q.reset_secs(100), 0);
        assert_eq!(q.reset_secs(99), 1, "10 ms rounds up to a second");
        assert_eq!(q.reset_secs(0), 1);
        let slow = quota(2, 60 * SEC, 4);
        assert_eq!(slow.reset_secs(1), 90);
        assert_eq!(
            rate_limit_headers(&slow, &Outcome::Allowed { remaining: Some(1) }),
            [
                ("x-ratelimit-limit", "4".to_string()),
                ("x-ratelimit-remaining", "1".to_string()),
                ("x-ratelimit-reset", "90".to_string()),
            ]
        );
        assert_eq!(
            rate_limit_headers(&slow, &Outcome::Allowed { remaining: None }),
            [
                ("x-ratelimit-limit", "4".to_string()),
                ("x-ratelimit-reset", "120".to_string()),
            ]
        );
        assert_eq!(
            rate_limit_headers(&slow, &Outcome::Limited { retry_after_ns: 5 })[1],
            ("x-ratelimit-remaining", "0".to_string())
        );
        assert_eq!(secs_ceil(1_500_000_000), 2);
    }

    #[test]
    fn foreign_function_wire_format() {
        let q = quota(100, 500_000_000, 7);
        let args = foreign_args(&q, "k");
        assert_eq!(args[..5], [1, 0, 0, 0, 0xFF]);
        assert_eq!(args[5..9], 100u32.to_le_bytes());
        assert_eq!(args[9..17], 500_000_000u64.to_le_bytes());
        assert_eq!(args[17..21], 7u32.to_le_bytes());
        assert_eq!(&args[21..], b"k");
        assert_eq!(
            foreign_result(&[1]),
            Some(Outcome::Allowed { remaining: None })
        );
        assert_eq!(
            foreign_result(&[1, 5, 0, 0, 0]),
            Some(Outcome::Allowed { remaining: Some(5) })
        );
        let mut limited = vec![0];
        limited.extend_from_slice(&1_500_000_000u64.to_le_bytes());
        assert_eq!(
            foreign_result(&limited),
            Some(Outcome::Limited {
                retry_after_ns: 1_500_000_000
            })
        );
        for bad in [&[][..], &[2], &[1, 0], &[0, 1, 2]] {
            assert_eq!(foreign_result(bad), None, "{bad:?}");
        }
        assert_eq!(decode_state(&7u64.to_le_bytes()), Some(7));
        assert_eq!(decode_state(&[1, 2]), None);
    }
}
