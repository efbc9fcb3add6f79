//! What the host library needs from the gateway: callouts, foreign functions, logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::error::CallError;
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

    /// Send an HTTP request to `cluster`. The request's URI is the `:path`, its `Host` header the
    /// `:authority`, and `x-weir-scheme`-free: the scheme is the cluster's. `timeout` `None`
    /// means no timeout (the host applies `timeout` itself too). Default: fails with `Reset`.
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
