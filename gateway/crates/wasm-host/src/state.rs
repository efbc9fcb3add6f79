//! The per-VM host state (the wasmtime `Store` data) and the per-stream state.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::config::{FailPolicy, Limits};
use crate::error::CallError;
use crate::host_env::{CallResponse, HostEnv};
use crate::metrics::PluginStats;
use crate::plugin::BgEvent;
use crate::stream::{LocalReply, RequestHead, ResponseHead, StreamInfo};

/// A map keyed by host-issued ids (context ids, callout tokens): they are not chosen by
/// clients, so a multiplicative hash is enough and much cheaper than SipHash.
pub(crate) type IdMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The hasher of [`IdMap`]: Fibonacci hashing of the id (good high bits, as hashbrown wants).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What the guest is doing, which decides the host calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// `_initialize`/`main`/`_start` and the allocator: only logging and WASI.
    Start,
    /// `proxy_on_vm_start`: VM configuration readable.
    VmStart,
    /// `proxy_on_configure`: plugin configuration readable.
    Configure,
    /// Any other callback.
    Running,
}

/// One plugin's root context as the VMs know it.
#[derive(Debug)]
pub(crate) struct RootSpec {
    pub context_id: u32,
    pub plugin_name: String,
    pub root_id: String,
    pub vm_id: String,
    pub configuration: Bytes,
    pub fail: FailPolicy,
    pub limits: Limits,
    pub stats: Arc<PluginStats>,
    /// [`PluginConfig::portable`](crate::PluginConfig::portable): no foreign functions.
    pub portable: bool,
}

/// Per-replica state that outlives VM recreations: the background task's channel and timers.
pub(crate) struct VmShared {
    pub vm_id: String,
    pub vm_configuration: Bytes,
    pub env: Arc<dyn HostEnv>,
    pub events: UnboundedSender<BgEvent>,
    pub notify: Arc<Notify>,
    /// Root context id → (period, next due).
    pub timers: Mutex<HashMap<u32, (Duration, Instant)>>,
    /// Linear memory bytes of this replica's VM (for stats).
    pub memory_bytes: AtomicU64,
    /// The engine's count of live VMs.
    pub live: Arc<crate::metrics::LiveVms>,
}

/// What kind of callout a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CalloutKind {
    /// `proxy_http_call`.
    Http,
    /// `proxy_grpc_call` (unary).
    Grpc,
}

/// A callout issued by the guest in the current callback, started by the driver afterwards.
pub(crate) struct NewCallout {
    pub token: u32,
    /// The effective context when the call was made (a stream or a root context).
    pub owner: u32,
    pub future: BoxFuture<'static, Result<CallResponse, CallError>>,
}

/// Deferred stream actions requested during a callback (applied when it returns). Small (the
/// reply is boxed): it is taken and checked after every callback.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    pub continue_request: bool,
    pub continue_response: bool,
    /// `proxy_continue_stream(2)`: a network filter resumes the downstream data.
    pub continue_downstream: bool,
    /// `proxy_continue_stream(3)`: a network filter resumes the upstream data.
    pub continue_upstream: bool,
    pub close: bool,
    pub local_reply: Option<Box<LocalReply>>,
}

/// A live stream context of the VM as other contexts see it: actions requested for it from
/// another context (a root context's `on_tick` or `on_queue_ready`, another stream) after
/// `proxy_set_effective_context(stream)`, while its own context is not loaded. Written and read
/// under the VM lock; the stream takes them at its next guest call, or when `waker` wakes it.
#[derive(Debug, Default)]
pub(crate) struct Parked {
    pub actions: Actions,
    pub waker: Option<Arc<Notify>>,
    /// Whether the stream is a network (TCP) stream.
    pub network: bool,
}

/// Which body a stream callback sees (buffers 0 and 1, or 2 and 3 for network streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Request,
    Response,
    Downstream,
    Upstream,
}

/// The state of one stream context (an HTTP stream, or a network connection). Owned by the
/// `HttpStream` between callbacks and moved into the store for the duration of each guest call.
#[derive(Debug)]
pub(crate) struct StreamCtx {
    pub id: u32,
    /// A network (TCP) stream: buffers 2/3 and streams 2/3 instead of 0/1.
    pub network: bool,
    pub root: u32,
    pub info: Arc<StreamInfo>,
    pub request: Option<Arc<RequestHead>>,
    pub response: Option<Arc<ResponseHead>>,
    pub request_trailers: Option<http::HeaderMap>,
    pub response_trailers: Option<http::HeaderMap>,
    /// The body (or network data) the current callback sees; replaced whole by the guest's
    /// `proxy_set_buffer_bytes`, read without a copy.
    pub body: Option<(BodyKind, Bytes)>,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub cluster: Option<Arc<str>>,
    pub upstream: Option<std::net::SocketAddr>,
    pub response_code_details: Option<String>,
    /// `response.flags`: Envoy's response flag bits.
    pub response_flags: u64,
    pub filter_state: HashMap<Vec<u8>, Bytes>,
    pub actions: Actions,
    /// Whether the filter edited the request headers or cleared the route cache.
    pub request_headers_changed: bool,
    /// Whether the filter edited the response headers (or `:status`).
    pub response_headers_changed: bool,
    pub local_reply_sent: bool,
    /// Events of the gRPC streams this context opened (made with the first one).
    pub grpc: Option<crate::grpc_stream::Inbox>,
}

impl StreamCtx {
    /// A fresh context of root context `root`.
    pub(crate) fn new(id: u32, root: u32, info: Arc<StreamInfo>) -> Self {
        Self {
            id,
            network: false,
            root,
            info,
            request: None,
            response: None,
            request_trailers: None,
            response_trailers: None,
            body: None,
            request_body_bytes: 0,
            response_body_bytes: 0,
            cluster: None,
            upstream: None,
            response_code_details: None,
            response_flags: 0,
            filter_state: HashMap::new(),
            actions: Actions::default(),
            request_headers_changed: false,
            response_headers_changed: false,
            local_reply_sent: false,
            grpc: None,
        }
    }

    /// Clear what a finished stream left (its `info`, `request` and `response` are handled by
    /// the caller), so that the context can serve another stream.
    pub(crate) fn reset(&mut self) {
        let Self {
            id: _,
            network,
            root: _,
            info: _,
            request,
            response,
            request_trailers,
            response_trailers,
            body,
            request_body_bytes,
            response_body_bytes,
            cluster,
            upstream,
            response_code_details,
            response_flags,
            filter_state,
            actions,
            request_headers_changed,
            response_headers_changed,
            local_reply_sent,
            grpc,
        } = self;
        *network = false;
        *request = None;
        *response = None;
        *request_trailers = None;
        *response_trailers = None;
        *body = None;
        *request_body_bytes = 0;
        *response_body_bytes = 0;
        *cluster = None;
        *upstream = None;
        *response_code_details = None;
        *response_flags = 0;
        filter_state.clear();
        *actions = Actions::default();
        *request_headers_changed = false;
        *response_headers_changed = false;
        *local_reply_sent = false;
        *grpc = None;
    }
}

/// The result of a callout, visible to the guest during `proxy_on_http_call_response`.
pub(crate) struct CalloutView {
    pub headers: http::HeaderMap,
    pub status: Option<http::StatusCode>,
    pub body: Bytes,
    pub trailers: http::HeaderMap,
}

/// Memory limiter that remembers whether it refused a growth, and whether it allowed one since
/// the memory size was last published.
pub(crate) struct Limiter {
    pub max_memory: usize,
    pub hit: bool,
    /// A growth was allowed: the linear memory size may have changed.
    pub grew: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            return Ok(false);
        }
        self.grew = true;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The data of a VM's `Store`.
pub(crate) struct HostState {
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub limiter: Limiter,
    pub phase: Phase,
    /// The context host calls act on (`proxy_set_effective_context` changes it).
    pub effective: u32,
    pub roots: IdMap<Arc<RootSpec>>,
    /// Root-context filter state (`set_property` outside streams).
    pub root_properties: HashMap<Vec<u8>, Bytes>,
    /// The stream whose callback runs now, if any.
    pub stream: Option<Box<StreamCtx>>,
    /// Every live stream context of this VM (loaded or not), for actions from other contexts.
    pub streams: IdMap<Parked>,
    /// Whether any context ever acted on a parked stream (skips the lookup otherwise).
    pub parked_used: bool,
    pub shared: Arc<VmShared>,
    pub next_token: u32,
    pub new_callouts: Vec<NewCallout>,
    pub callout: Option<CalloutView>,
    /// Callouts issued and not yet answered or cancelled, by token.
    pub live_callouts: IdMap<CalloutKind>,
    /// The gRPC response message, visible during `proxy_on_grpc_receive` (buffer 5).
    pub grpc_message: Option<Bytes>,
    /// Open gRPC streams (dropping them resets them) and the metadata of the current callback.
    pub grpc: crate::grpc_stream::GrpcStreams,
    /// What `proxy_get_status` answers.
    pub last_status: (u32, Bytes),
}

impl HostState {
    pub(crate) fn new(shared: Arc<VmShared>, max_memory: usize) -> Self {
        Self {
            memory: None,
            alloc: None,
            limiter: Limiter {
                max_memory,
                hit: false,
                grew: false,
            },
            phase: Phase::Start,
            effective: 0,
            roots: IdMap::default(),
            root_properties: HashMap::new(),
            stream: None,
            streams: IdMap::default(),
            parked_used: false,
            shared,
            next_token: 0,
            new_callouts: Vec::new(),
            callout: None,
            live_callouts: IdMap::default(),
            grpc_message: None,
            grpc: Default::default(),
            last_status: (0, Bytes::new()),
        }
    }

    /// The stream the effective context designates, if it is the loaded stream.
    pub(crate) fn stream_mut(&mut self) -> Option<&mut StreamCtx> {
        let eff = self.effective;
        self.stream.as_deref_mut().filter(|s| s.id == eff)
    }

    /// The effective context when it is a stream that is not loaded.
    pub(crate) fn parked_mut(&mut self) -> Option<&mut Parked> {
        if self.stream_ref().is_some() {
            return None;
        }
        self.streams.get_mut(&self.effective)
    }

    /// The stream the effective context designates, if it is the loaded stream.
    pub(crate) fn stream_ref(&self) -> Option<&StreamCtx> {
        self.stream.as_deref().filter(|s| s.id == self.effective)
    }

    /// The root context of the effective context.
    pub(crate) fn root(&self) -> Option<&Arc<RootSpec>> {
        let id = match self.stream_ref() {
            Some(s) => s.root,
            None => self.effective,
        };
        self.roots.get(&id)
    }

    /// The plugin name for logs.
    pub(crate) fn plugin_name(&self) -> &str {
        self.root().map(|r| r.plugin_name.as_str()).unwrap_or("")
    }
}
