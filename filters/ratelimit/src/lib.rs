//! `builtin:ratelimit`: local rate limiting with a token bucket per key, like Envoy's
//! `local_ratelimit` filter.
//!
//! ```yaml
//! config:
//!   requests: 100               # tokens per fill interval (required)
//!   per: 1s                     # fill interval: 500ms, 1s, 1m... (default 1s)
//!   burst: 100                  # bucket size (default: requests)
//!   key: { header: x-api-key }  # or { remote_address: true } or { path: true }; absent: one bucket
//!   status: 429                 # status of the local reply (default 429)
//!   headers: true               # x-ratelimit-limit/-remaining/-reset (default false)
//! ```
//!
//! A limited request gets a local reply with `status`, body `local_rate_limited` and
//! `retry-after` (seconds, rounded up). Tokens refill continuously (one every
//! `per / requests`), so over any window of `per` at most `burst + requests` pass.
//!
//! Where the buckets live:
//! - In Weir, in the gateway: each request calls the `weir_rate_limit` foreign function with the
//!   filter's own quota and the bucket key (see the wasm-host README); the plugin's
//!   `rate_limit:` setting in the gateway config does not apply to this filter.
//! - Elsewhere (Envoy, Istio: the function is absent), in shared data: one 8-byte state per
//!   bucket, updated with compare-and-swap. Buckets are shared by the VMs of one `vm_id`.
//!
//! Buckets are named by plugin name, a hash of the configuration and the key, so two plugins,
//! or two per-route configurations, never share a bucket, while the VM replicas of one plugin do.

mod bucket;
mod config;

use std::cell::Cell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};

use crate::bucket::{Outcome, Quota};
use crate::config::{KeySource, Settings};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(RateLimitRoot { limiter: None })
    });
}}

/// Compare-and-swap attempts on a shared-data bucket before letting the request through.
const CAS_ATTEMPTS: usize = 8;

/// A configured limiter, shared by the root context and its requests.
struct Limiter {
    settings: Settings,
    /// `ratelimit/<plugin>/<config hash>/`: the start of every bucket name.
    prefix: String,
    /// Whether `weir_rate_limit` answered; once it fails the shared-data buckets are used.
    foreign: Cell<bool>,
}

impl Limiter {
    /// Take a token from the bucket `key`.
    fn check(&self, key: &str, now_ns: u64) -> Outcome {
        let quota = &self.settings.quota;
        if self.foreign.get() {
            let args = bucket::foreign_args(quota, key);
            // Envoy answers NOT_FOUND; a gateway that knows no quotas BAD_ARGUMENT.
            let result = hostcalls::call_foreign_function(bucket::RATE_LIMIT_FUNCTION, Some(&args));
            if let Ok(Some(result)) = result {
                match bucket::foreign_result(&result) {
                    Some(outcome) => return outcome,
                    None => log_warn("weir_rate_limit gave a malformed result"),
                }
            }
            self.foreign.set(false);
            let _ = hostcalls::log(
                LogLevel::Info,
                "ratelimit: no usable weir_rate_limit function, buckets are kept in shared data",
            );
        }
        shared_take(key, now_ns, quota)
    }
}

/// Take a token from a bucket kept in shared data, retrying on CAS conflicts. After
/// [`CAS_ATTEMPTS`] conflicts in a row the request is let through (the limiter fails open).
fn shared_take(key: &str, now_ns: u64, quota: &Quota) -> Outcome {
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = match hostcalls::get_shared_data(key) {
            Ok(v) => v,
            Err(_) => break,
        };
        let tat = value.as_deref().and_then(bucket::decode_state);
        let (outcome, next) = bucket::take(tat, now_ns, quota);
        let Some(next) = next else {
            return outcome;
        };
        // The first write of a bucket (no CAS yet) is unconditional, as the ABI defines it:
        // two VMs creating the same bucket at the same instant may each let a request through.
        match hostcalls::set_shared_data(key, Some(&next.to_le_bytes()), cas) {
            Ok(()) => return outcome,
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    log_warn("shared-data bucket kept changing: request let through");
    Outcome::Allowed { remaining: None }
}

fn log_warn(message: &str) {
    let _ = hostcalls::log(LogLevel::Warn, message);
}

/// FNV-1a, 64 bits: a stable name for a configuration.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct RateLimitRoot {
    limiter: Option<Rc<Limiter>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let settings = match config::parse(&config) {
            Ok(s) => s,
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &format!("ratelimit: {e}"));
                return false;
            }
        };
        let plugin = self
            .get_property(vec!["plugin_name"])
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        self.limiter = Some(Rc::new(Limiter {
            settings,
            prefix: format!("ratelimit/{plugin}/{:016x}/", fnv1a(&config)),
            foreign: Cell::new(true),
        }));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimit {
            limiter: self.limiter.clone(),
            allowed: None,
        }))
    }
}

/// One request.
struct RateLimit {
    /// `None` only if the plugin was never configured (it then lets everything through).
    limiter: Option<Rc<Limiter>>,
    /// The outcome when the request was let through, for the response headers.
    allowed: Option<Outcome>,
}

impl Context for RateLimit {}

impl RateLimit {
    /// The bucket name of this request.
    fn bucket(&self, limiter: &Limiter) -> String {
        let value = match &limiter.settings.key {
            KeySource::Global => String::new(),
            KeySource::Header(name) => self
                .get_http_request_header_bytes(name)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default(),
            KeySource::RemoteAddress => self
                .get_property(vec!["source", "address"])
                .map(|a| weir_sdk::address::without_port(&String::from_utf8_lossy(&a)).to_owned())
                .unwrap_or_default(),
            KeySource::Path => self
                .get_http_request_header_bytes(":path")
                .map(|p| {
                    let path = p.split(|b| *b == b'?').next().unwrap_or_default();
                    String::from_utf8_lossy(path).into_owned()
                })
                .unwrap_or_default(),
        };
        format!("{}{value}", limiter.prefix)
    }
}

impl HttpContext for RateLimit {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(limiter) = self.limiter.clone() else {
            return Action::Continue;
        };
        let now_ns = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let key = self.bucket(&limiter);
        let outcome = limiter.check(&key, now_ns);
        let settings = &limiter.settings;
        match outcome {
            Outcome::Allowed { .. } => {
                self.allowed = Some(outcome);
                Action::Continue
            }
            Outcome::Limited { retry_after_ns } => {
                let retry_after = bucket::secs_ceil(retry_after_ns).max(1).to_string();
                let mut headers = vec![("retry-after", retry_after)];
                if settings.headers {
                    headers.extend(bucket::rate_limit_headers(&settings.quota, &outcome));
                }
                self.send_http_response(
                    settings.status,
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect(),
                    Some(b"local_rate_limited"),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let (Some(limiter), Some(outcome)) = (&self.limiter, &self.allowed)
            && limiter.settings.headers
        {
            for (name, value) in bucket::rate_limit_headers(&limiter.settings.quota, outcome) {
                self.set_http_response_header(name, Some(&value));
            }
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(br#"{"requests":1}"#), fnv1a(br#"{"requests":2}"#));
    }
}
