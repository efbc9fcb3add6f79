//! The proxy-wasm host of Weir: runs proxy-wasm filters (ABI 0.2.1, 0.2.0 and 0.1.0) in
//! wasmtime, the way Envoy does.
//!
//! - [`Engine`]: one per process; compiles and caches modules, links every host function,
//!   bumps the epoch that enforces callback deadlines.
//! - [`Plugin`]: a module with its root context and configuration; VMs are shared by plugins
//!   with the same module, vm_id and VM configuration, kept as a few replicas (one per worker
//!   thread by default, a stream running in its thread's), each behind a mutex held only during
//!   a synchronous guest call.
//! - [`HttpStream`]: one request through one plugin; the gateway drives its async callbacks in
//!   order and acts on each [`Decision`].
//! - [`NetworkStream`]: one TCP connection through one plugin (a network filter); data
//!   callbacks answer a [`NetworkDecision`], and [`NetworkStream::resumed`] reports what
//!   happens while the filter is paused.
//! - [`HostEnv`]: what the gateway provides (HTTP callouts, gRPC streams, foreign functions,
//!   logs).
//!
//! See the crate's README for how the gateway drives a stream.

mod abi;
mod check;
mod config;
mod error;
mod grpc_stream;
mod headers;
mod host_env;
mod memory;
mod metrics;
mod network;
mod plugin;
pub mod pool;
mod properties;
mod shared;
mod state;
mod stream;
mod threads;
mod types;
mod vm;

pub use abi::CallTrailers;
pub use check::{CheckError, CheckReport, ImportInfo, check_module};
pub use config::{EngineConfig, FailPolicy, Limits, PluginConfig, ReplicaChoice};
pub use error::{CallError, PluginError};
pub use grpc_stream::{GrpcRequestBody, GrpcResponseBody, GrpcStreamCancelled, GrpcStreamFuture};
pub use host_env::{
    CallResponse, ForeignFunction, ForeignRegistry, GET_PROPERTIES_FUNCTION, HostEnv, NoopEnv,
    RATE_LIMIT_FUNCTION, RATE_LIMIT_QUOTA_MARKER, RateLimitQuota, RateLimitRequest,
    decode_rate_limit_args, decode_rate_limit_request, encode_rate_limit_allowed,
    encode_rate_limit_request, encode_rate_limit_result,
};
pub use metrics::{
    Histogram, HistogramSnapshot, MetricSample, MetricValue, PluginStats, PrometheusName,
    StatsSnapshot, filter_metrics, prometheus_metric_name, prometheus_name, render_filter_metrics,
    render_plugin_stats,
};
pub use network::{Direction, NetworkDecision, NetworkEvent, NetworkStream, PeerType};
pub use plugin::{Engine, Plugin};
pub use stream::{
    Decision, HttpStream, LocalReply, RequestHead, ResponseHead, StreamInfo, TlsInfo, empty_name,
};
pub use threads::{ShardedCounter, set_stream_thread_number};
pub use types::{AbiVersion, LogLevel, Status};
pub use vm::CPU_SAMPLE_EVERY;

#[cfg(test)]
mod tests {
    /// The gateway moves plugins and streams across tokio worker threads.
    #[test]
    fn public_types_are_send_and_sync() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<super::HttpStream>();
        send::<super::NetworkStream>();
        send::<super::Plugin>();
        sync::<super::Plugin>();
        send::<super::Engine>();
        sync::<super::Engine>();
    }
}
