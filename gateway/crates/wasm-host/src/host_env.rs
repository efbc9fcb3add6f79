//! What the host library needs from the gateway: callouts, gRPC streams, foreign functions,
//! logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::error::CallError;
use crate::grpc_stream::{GrpcRequestBody, GrpcStreamFuture};
use crate::types::{LogLevel, Status};

/// The response of an HTTP callout.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    /// Status, headers and body. `:status` is exposed to the guest from `response.status()`.
    pub response: http::Response<Bytes>,
    /// Trailers, if any.
    pub trailers: http::HeaderMap,
}

/// A foreign function a filter calls with `proxy_call_foreign_function(name, args)`.
///
/// Takes the argument bytes and answers result bytes, or a status for the guest
/// (`NOT_FOUND`, `BAD_ARGUMENT`, `SERIALIZATION_FAILURE`, `INTERNAL_FAILURE` are the ones the Rust
/// SDK accepts). Runs synchronously inside the guest call: it must be quick and must not block.
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> Result<Bytes, Status> + Send + Sync>;

/// The name under which Weir registers its rate limiter as a foreign function.
///
/// Arguments, in one of two forms (both start with a little-endian `u32` cost, the number of
/// permits; 0 counts as 1):
///
/// - `cost`, then the limiter key (UTF-8, may be empty): the quota is the plugin's `rate_limit:`
///   setting in the gateway config.
/// - `cost`, the byte [`RATE_LIMIT_QUOTA_MARKER`] (`0xFF`, which never occurs in UTF-8), the
///   caller's own quota — `u32` requests, `u64` period in nanoseconds, `u32` burst, all
///   little-endian — then the key. Each distinct quota has its own buckets.
///
/// Result: one byte, `1` allowed or `0` limited. When limited, a little-endian `u64` follows with
/// the nanoseconds after which a retry may succeed. When allowed and the call carried a quota, a
/// little-endian `u32` may follow with the permits left in the bucket (callers must accept `[1]`
/// alone).
pub const RATE_LIMIT_FUNCTION: &str = "weir_rate_limit";

/// The foreign function that answers several `proxy_get_property` lookups in one call (served
/// by the host, whatever the [`HostEnv`]): a filter's fast path where Envoy would need one call
/// per property. Arguments: a little-endian `u32` count `n`, `n` little-endian `u32` lengths,
/// then the `n` property paths (segments separated by NUL, as for `proxy_get_property`).
/// Result: `n`, then `n` little-endian `u32` lengths (`u32::MAX` for a property that does not
/// exist), then the values, in the encodings of `proxy_get_property`. Hosts without it (Envoy)
/// answer `NOT_FOUND`: fall back to `proxy_get_property`.
pub const GET_PROPERTIES_FUNCTION: &str = "weir_get_properties";

/// The byte after the cost that says a [`RATE_LIMIT_FUNCTION`] call carries its own quota.
pub const RATE_LIMIT_QUOTA_MARKER: u8 = 0xFF;

/// A token-bucket quota, as carried by a [`RATE_LIMIT_FUNCTION`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimitQuota {
    /// Permits added per `per` (at least 1).
    pub requests: u32,
    /// The refill period (not zero).
    pub per: Duration,
    /// Bucket size: permits that may be taken at once (at least 1).
    pub burst: u32,
}

/// A decoded [`RATE_LIMIT_FUNCTION`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitRequest<'a> {
    /// Permits to take (at least 1).
    pub cost: u32,
    /// The caller's quota, `None` for the plugin's configured one.
    pub quota: Option<RateLimitQuota>,
    /// The bucket key.
    pub key: &'a str,
}

/// Decode the arguments of [`RATE_LIMIT_FUNCTION`] in the original form only: `(cost, key)`. A
/// cost of 0 counts as 1; a call carrying a quota answers `BAD_ARGUMENT` (use
/// [`decode_rate_limit_request`] to accept both forms).
pub fn decode_rate_limit_args(args: &[u8]) -> Result<(u32, &str), Status> {
    let (cost, key) = args.split_at_checked(4).ok_or(Status::BadArgument)?;
    let cost = u32::from_le_bytes([cost[0], cost[1], cost[2], cost[3]]).max(1);
    let key = std::str::from_utf8(key).map_err(|_| Status::BadArgument)?;
    Ok((cost, key))
}

/// Decode the arguments of [`RATE_LIMIT_FUNCTION`] in either form. `BAD_ARGUMENT` when they are
/// too short, the key is not UTF-8, or the quota has a zero field.
pub fn decode_rate_limit_request(args: &[u8]) -> Result<RateLimitRequest<'_>, Status> {
    if args.get(4) != Some(&RATE_LIMIT_QUOTA_MARKER) {
        let (cost, key) = decode_rate_limit_args(args)?;
        return Ok(RateLimitRequest {
            cost,
            quota: None,
            key,
        });
    }
    let (head, key) = args.split_at_checked(21).ok_or(Status::BadArgument)?;
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let mut per = [0u8; 8];
    per.copy_from_slice(&head[9..17]);
    let quota = RateLimitQuota {
        requests: u32_at(5),
        per: Duration::from_nanos(u64::from_le_bytes(per)),
        burst: u32_at(17),
    };
    if quota.requests == 0 || quota.burst == 0 || quota.per.is_zero() {
        return Err(Status::BadArgument);
    }
    Ok(RateLimitRequest {
        cost: u32_at(0).max(1),
        quota: Some(quota),
        key: std::str::from_utf8(key).map_err(|_| Status::BadArgument)?,
    })
}

/// Encode the arguments of a [`RATE_LIMIT_FUNCTION`] call (the form with a quota when `quota`
/// is given); the inverse of [`decode_rate_limit_request`].
pub fn encode_rate_limit_request(cost: u32, quota: Option<RateLimitQuota>, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + key.len());
    out.extend_from_slice(&cost.to_le_bytes());
    if let Some(q) = quota {
        out.push(RATE_LIMIT_QUOTA_MARKER);
        out.extend_from_slice(&q.requests.to_le_bytes());
        let per = u64::try_from(q.per.as_nanos()).unwrap_or(u64::MAX);
        out.extend_from_slice(&per.to_le_bytes());
        out.extend_from_slice(&q.burst.to_le_bytes());
    }
    out.extend_from_slice(key.as_bytes());
    out
}

/// Encode the result of [`RATE_LIMIT_FUNCTION`]: `[1]` when allowed, else `[0]` followed by the
/// retry-after delay in nanoseconds (u64 little-endian).
pub fn encode_rate_limit_result(allowed: bool, retry_after: Duration) -> Bytes {
    if allowed {
        return Bytes::from_static(&[1]);
    }
    let mut out = Vec::with_capacity(9);
    out.push(0);
    out.extend_from_slice(&(retry_after.as_nanos().min(u128::from(u64::MAX)) as u64).to_le_bytes());
    Bytes::from(out)
}

/// Encode an "allowed" result of a [`RATE_LIMIT_FUNCTION`] call that carried a quota: `[1]`
/// followed by the permits left (u32 little-endian).
pub fn encode_rate_limit_allowed(remaining: u32) -> Bytes {
    let mut out = Vec::with_capacity(5);
    out.push(1);
    out.extend_from_slice(&remaining.to_le_bytes());
    Bytes::from(out)
}

/// A simple registry of foreign functions by name, for [`HostEnv::foreign_function`].
#[derive(Default, Clone)]
pub struct ForeignRegistry {
    functions: HashMap<String, ForeignFunction>,
}

impl ForeignRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register (or replace) `name`.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        f: impl Fn(&[u8]) -> Result<Bytes, Status> + Send + Sync + 'static,
    ) -> &mut Self {
        self.functions.insert(name.into(), Arc::new(f));
        self
    }

    /// Look up `name`.
    pub fn get(&self, name: &str) -> Option<ForeignFunction> {
        self.functions.get(name).cloned()
    }
}

impl std::fmt::Debug for ForeignRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.functions.keys()).finish()
    }
}

/// The gateway's side of the host: implemented by the gateway, shared by all plugins.
///
/// Every method has a default so a minimal environment is `struct Env; impl HostEnv for Env {}`.
pub trait HostEnv: Send + Sync + 'static {
    /// Whether `cluster` names a configured upstream cluster. `proxy_http_call` to an unknown
    /// cluster answers `BAD_ARGUMENT` right away. Default: no cluster exists.
    fn has_cluster(&self, cluster: &str) -> bool {
        let _ = cluster;
        false
    }

    /// Send an HTTP request to `cluster` (only called when [`has_cluster`](Self::has_cluster)
    /// said yes). The request's URI is the guest's `:path` (origin form), its `Host` header the
    /// `:authority`; the scheme and the address are the cluster's. Trailers the guest sent are
    /// in the request's extensions as [`crate::CallTrailers`]. Unary gRPC calls come here too, as
    /// `POST /{service}/{method}` with `content-type: application/grpc` and
    /// `Version::HTTP_2`; the response's `grpc-status` is read from its trailers or headers.
    /// `timeout` `None` means none; the host also enforces `timeout` itself. Default: fails
    /// with `Reset`.
    fn http_call(
        &self,
        cluster: &str,
        request: http::Request<Bytes>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<CallResponse, CallError>> {
        let _ = (request, timeout);
        let cluster = cluster.to_owned();
        Box::pin(async move { Err(CallError::Reset(format!("no HTTP client for {cluster}"))) })
    }

    /// Open a bidirectional gRPC stream to `cluster` (only called when
    /// [`has_cluster`](Self::has_cluster) said yes), for `proxy_grpc_stream`. The request is
    /// `POST /{service}/{method}`, `Version::HTTP_2`, with `content-type: application/grpc`,
    /// `te: trailers`, the filter's initial metadata as headers and `Host` set to the cluster
    /// name; its body yields the filter's messages already framed (5-byte gRPC prefix) as the
    /// filter sends them, and ends when the filter half-closes. Dropping the request body or the
    /// response (the filter cancelled, its context or VM went away) must reset the stream.
    ///
    /// Answer right away with `Err` when the stream cannot be opened at all (the guest gets
    /// `INTERNAL_FAILURE`); otherwise with a future of the response: its status and headers
    /// (initial metadata), then a body of DATA frames (messages, possibly split or coalesced
    /// across frames) and trailers (`grpc-status`, `grpc-message`, trailing metadata). A future
    /// that fails closes the stream with gRPC status UNAVAILABLE. The host enforces no timeout.
    /// Default: `Err(CallError::Unsupported)`.
    fn grpc_stream(
        &self,
        cluster: &str,
        request: http::Request<GrpcRequestBody>,
    ) -> Result<GrpcStreamFuture, CallError> {
        let _ = request;
        Err(CallError::Unsupported(format!(
            "no gRPC stream client for {cluster}"
        )))
    }

    /// The foreign function named `name`, if any. Default: none (`NOT_FOUND` to the guest).
    /// See [`RATE_LIMIT_FUNCTION`] for the one Weir provides.
    fn foreign_function(&self, name: &str) -> Option<ForeignFunction> {
        let _ = name;
        None
    }

    /// A filter's log line. Default: a `tracing` event at the matching level, target
    /// `weir_wasm_host::filter`, with the plugin name as a field.
    fn log(&self, plugin: &str, level: LogLevel, message: &str) {
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "weir_wasm_host::filter", plugin, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "weir_wasm_host::filter", plugin, "{message}")
            }
            LogLevel::Info => tracing::info!(target: "weir_wasm_host::filter", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "weir_wasm_host::filter", plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(target: "weir_wasm_host::filter", plugin, "{message}")
            }
        }
    }

    /// The level answered by `proxy_get_log_level`. Default: derived from `tracing`'s current
    /// maximum level.
    fn log_level(&self) -> LogLevel {
        use tracing::level_filters::LevelFilter;
        match LevelFilter::current() {
            LevelFilter::TRACE => LogLevel::Trace,
            LevelFilter::DEBUG => LogLevel::Debug,
            LevelFilter::INFO => LogLevel::Info,
            LevelFilter::WARN => LogLevel::Warn,
            LevelFilter::ERROR => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }
}

/// A [`HostEnv`] with no clusters and no foreign functions, logging through `tracing`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopEnv;

impl HostEnv for NoopEnv {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_calls_of_both_forms_decode() {
        let old = encode_rate_limit_request(0, None, "client-1");
        assert_eq!(old, b"\0\0\0\0client-1");
        assert_eq!(decode_rate_limit_args(&old), Ok((1, "client-1")));
        assert_eq!(
            decode_rate_limit_request(&old),
            Ok(RateLimitRequest {
                cost: 1,
                quota: None,
                key: "client-1"
            })
        );
        let quota = RateLimitQuota {
            requests: 100,
            per: Duration::from_millis(500),
            burst: 7,
        };
        let new = encode_rate_limit_request(2, Some(quota), "k");
        assert_eq!(new.len(), 22);
        assert_eq!(
            decode_rate_limit_request(&new),
            Ok(RateLimitRequest {
                cost: 2,
                quota: Some(quota),
                key: "k"
            })
        );
        // The original decoder refuses the new form instead of misreading it.
        assert_eq!(decode_rate_limit_args(&new), Err(Status::BadArgument));
        // An empty key is valid in both forms.
        assert_eq!(decode_rate_limit_request(&new[..21]).unwrap().key, "");
        assert_eq!(decode_rate_limit_request(&old[..4]).unwrap().key, "");
    }

    #[test]
    fn malformed_rate_limit_calls_are_bad_arguments() {
        assert_eq!(
            decode_rate_limit_request(b"\x01\0\0"),
            Err(Status::BadArgument)
        );
        let quota = RateLimitQuota {
            requests: 1,
            per: Duration::from_secs(1),
            burst: 1,
        };
        let good = encode_rate_limit_request(1, Some(quota), "");
        assert_eq!(
            decode_rate_limit_request(&good[..20]),
            Err(Status::BadArgument),
            "truncated quota"
        );
        for zeroed in [5..9, 9..17, 17..21] {
            let mut bad = good.clone();
            bad[zeroed].fill(0);
            assert_eq!(decode_rate_limit_request(&bad), Err(Status::BadArgument));
        }
        let mut bad = good.clone();
        bad.push(0xC3);
        assert_eq!(
            decode_rate_limit_request(&bad),
            Err(Status::BadArgument),
            "not UTF-8"
        );
    }

    #[test]
    fn rate_limit_results() {
        assert_eq!(&encode_rate_limit_result(true, Duration::ZERO)[..], [1]);
        assert_eq!(&encode_rate_limit_allowed(3)[..], [1, 3, 0, 0, 0]);
        let limited = encode_rate_limit_result(false, Duration::from_nanos(258));
        assert_eq!(&limited[..], [0, 2, 1, 0, 0, 0, 0, 0, 0]);
        let forever = encode_rate_limit_result(false, Duration::MAX);
        assert_eq!(&forever[1..], u64::MAX.to_le_bytes());
    }
}
