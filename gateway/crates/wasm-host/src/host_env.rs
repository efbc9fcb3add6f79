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
/// Arguments: a little-endian `u32` cost (number of permits, at least 1) followed by the limiter
/// key (UTF-8, may be empty). Result: one byte, `1` allowed or `0` limited; when limited, a
/// little-endian `u64` follows with the nanoseconds after which a retry may succeed.
pub const RATE_LIMIT_FUNCTION: &str = "weir_rate_limit";

/// Decode the arguments of [`RATE_LIMIT_FUNCTION`]: `(cost, key)`. A cost of 0 counts as 1.
pub fn decode_rate_limit_args(args: &[u8]) -> Result<(u32, &str), Status> {
    let (cost, key) = args.split_at_checked(4).ok_or(Status::BadArgument)?;
    let cost = u32::from_le_bytes([cost[0], cost[1], cost[2], cost[3]]).max(1);
    let key = std::str::from_utf8(key).map_err(|_| Status::BadArgument)?;
    Ok((cost, key))
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
