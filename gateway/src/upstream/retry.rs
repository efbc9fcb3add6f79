//! Retry policy: which failures are retried, how often, with what backoff and budget.

use std::time::Duration;

/// What kind of failure an attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be opened.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The connection was reset or closed before a response.
    Reset,
    /// The per-try timeout expired.
    PerTryTimeout,
    /// A response with this status.
    Status(u16),
}

/// Conditions under which an attempt is retried (Envoy's `retry_on`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `refused-stream`.
    pub refused_stream: bool,
    /// `reset` (includes per-try timeouts, as in Envoy).
    pub reset: bool,
    /// `5xx` (any 5xx, connect failures and resets).
    pub status_5xx: bool,
    /// `gateway-error` (502, 503, 504).
    pub gateway_error: bool,
    /// `retriable-status-codes`.
    pub status_codes: Vec<u16>,
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 disables retries).
    pub attempts: u32,
    /// When to retry.
    pub on: RetryOn,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Backoff base.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Retry budget as a percentage of active requests.
    pub budget_percent: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 0,
            on: RetryOn::default(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_percent: 20.0,
        }
    }
}

/// Minimum concurrent retries always allowed by the budget (Envoy's `min_retry_concurrency`).
pub const MIN_RETRY_CONCURRENCY: usize = 3;

impl RetryOn {
    /// Parse one `on:` condition.
    pub fn add(&mut self, name: &str) -> Result<(), String> {
        match name {
            "connect-failure" => self.connect_failure = true,
            "refused-stream" => self.refused_stream = true,
            "reset" => self.reset = true,
            "5xx" => self.status_5xx = true,
            "gateway-error" => self.gateway_error = true,
            "retriable-status-codes" => {}
            other => {
                return Err(format!(
                    "unknown retry condition `{other}`: expected connect-failure, refused-stream, reset, 5xx, gateway-error or retriable-status-codes"
                ));
            }
        }
        Ok(())
    }
}

impl RetryPolicy {
    /// Whether an attempt that ended with `failure` may be retried.
    pub fn retriable(&self, failure: Failure) -> bool {
        let on = &self.on;
        match failure {
            Failure::ConnectFailure => on.connect_failure || on.status_5xx || on.gateway_error,
            Failure::RefusedStream => on.refused_stream || on.status_5xx,
            Failure::Reset | Failure::PerTryTimeout => {
                on.reset || on.status_5xx || on.gateway_error
            }
            Failure::Status(code) => {
                (on.status_5xx && (500..600).contains(&code))
                    || (on.gateway_error && matches!(code, 502..=504))
                    || on.status_codes.contains(&code)
            }
        }
    }

    /// Jittered exponential backoff before retry number `n` (1-based): uniform in
    /// `[0, min(base × 2^(n-1), max)]`, Envoy's full jitter.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        let nanos = ceiling.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random % (nanos + 1))
    }

    /// Whether the retry budget allows another retry with `active` requests and `retries`
    /// retries in flight.
    pub fn budget_allows(&self, active: usize, retries: usize) -> bool {
        let allowed = ((active as f64) * self.budget_percent / 100.0) as usize;
        retries < allowed.max(MIN_RETRY_CONCURRENCY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions() {
        let mut p = RetryPolicy {
            attempts: 2,
            ..Default::default()
        };
        p.on.add("gateway-error").unwrap();
        assert!(p.retriable(Failure::Status(503)));
        assert!(!p.retriable(Failure::Status(500)));
        assert!(p.retriable(Failure::ConnectFailure));
        p.on.status_codes.push(409);
        assert!(p.retriable(Failure::Status(409)));
        assert!(p.on.add("sometimes").is_err());
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy::default();
        for n in 1..10 {
            for r in [0u64, 7, u64::MAX / 3, u64::MAX] {
                assert!(p.backoff(n, r) <= p.backoff_max);
            }
        }
        assert_ne!(p.backoff(3, 12345), p.backoff(3, 67890));
    }

    #[test]
    fn budget() {
        let p = RetryPolicy::default();
        assert!(p.budget_allows(0, 2));
        assert!(!p.budget_allows(0, 3));
        assert!(p.budget_allows(100, 19));
        assert!(!p.budget_allows(100, 20));
    }
}
