//! The host functions, one module per ABI area, each adding its functions to the linker.
//!
//! Every function of ABI 0.2.1, 0.2.0 and 0.1.0 is linked (module `env`), and the WASI
//! preview-1 functions under both `wasi_snapshot_preview1` and `wasi_unstable`, so an import is
//! never missing: what the host does not support answers a defined status.

use wasmtime::{Caller, Linker};

use crate::memory::{Fail, HostResult};
use crate::state::{HostState, Phase};
use crate::types::Status;

mod buffers;
mod callouts;
mod context;
mod foreign;
mod grpc_streams;
mod headers;
mod metrics;
mod properties;
mod shared;
mod streams;
mod wasi;

pub use callouts::CallTrailers;
pub(crate) use wasi::WASI_FUNCTIONS;

/// Every `env` function the host links.
pub(crate) const ENV_FUNCTIONS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_configuration",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_size",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_get_status",
    "proxy_http_call",
    "proxy_dispatch_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_call_foreign_function",
];

/// `env` functions Weir links that Envoy does not provide (an old draft's name).
pub(crate) const WEIR_ONLY_ENV: &[&str] = &["proxy_dispatch_http_call"];

/// Add every host function to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    context::add(linker)?;
    buffers::add(linker)?;
    headers::add(linker)?;
    streams::add(linker)?;
    callouts::add(linker)?;
    grpc_streams::add(linker)?;
    shared::add(linker)?;
    metrics::add(linker)?;
    properties::add(linker)?;
    foreign::add(linker)?;
    wasi::add(linker)?;
    Ok(())
}

/// Refuse calls made during `_initialize`/`main`/`_start` (only logging and WASI are allowed
/// there).
pub(crate) fn started(caller: &Caller<'_, HostState>) -> HostResult {
    if caller.data().phase == Phase::Start {
        return Err(Fail::Status(Status::BadArgument));
    }
    Ok(())
}
