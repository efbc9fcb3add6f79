//! One HTTP stream through one plugin: the callbacks the gateway drives, in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, Method, StatusCode};

use crate::config::FailPolicy;
use crate::error::CallError;
use crate::grpc_stream::{Delivery, Inbox};
use crate::host_env::CallResponse;
use crate::plugin::{Plugin, Slot, deliver_callout};
use crate::state::{Actions, BodyKind, NewCallout, Parked, Phase, RootSpec, StreamCtx};
use crate::vm::{Failure, HeadersFn, Vm};

/// The request line and headers. The guest sees `method`, `scheme`, `authority` and `path` as
/// the pseudo-headers `:method`, `:scheme`, `:authority`, `:path` (also for HTTP/1.1) and may
/// change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `:method`.
    pub method: Method,
    /// `:scheme` (`http` or `https`; borrowed, so making a head does not allocate for it).
    pub scheme: std::borrow::Cow<'static, str>,
    /// `:authority` (the `Host` header for HTTP/1.1).
    pub authority: String,
    /// `:path`, with the query.
    pub path: String,
    /// The other headers.
    pub headers: HeaderMap,
}

impl Default for RequestHead {
    fn default() -> Self {
        Self {
            method: Method::GET,
            scheme: "http".into(),
            authority: String::new(),
            path: "/".into(),
            headers: HeaderMap::new(),
        }
    }
}

/// The response status and headers; the guest sees the status as `:status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseHead {
    /// `:status`.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
}

/// TLS facts of the downstream connection (the `connection.*` properties).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// `connection.tls_version`, e.g. `TLSv1.3`.
    pub version: String,
    /// `connection.requested_server_name` (SNI).
    pub sni: Option<String>,
    /// `connection.mtls`: whether the peer presented a certificate.
    pub mtls: bool,
    /// `connection.subject_peer_certificate`.
    pub peer_subject: Option<String>,
    /// `connection.subject_local_certificate`.
    pub local_subject: Option<String>,
    /// `connection.uri_san_peer_certificate` (first entry is exposed).
    pub peer_uri_sans: Vec<String>,
    /// `connection.dns_san_peer_certificate` (first entry is exposed).
    pub peer_dns_sans: Vec<String>,
}

/// What the gateway knows about a stream when it starts (the source of most properties).
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// `source.address` / `source.port`.
    pub source: Option<SocketAddr>,
    /// `destination.address` / `destination.port` (the local address the client reached).
    pub destination: Option<SocketAddr>,
    /// `connection_id`.
    pub connection_id: u64,
    /// TLS facts, `None` for plaintext.
    pub tls: Option<TlsInfo>,
    /// `xds.route_name`.
    pub route_name: Arc<str>,
    /// `xds.cluster_name` (may be updated with [`HttpStream::set_upstream`]).
    pub cluster_name: Arc<str>,
    /// `xds.listener_name` (Weir-specific: not in Envoy).
    pub listener_name: Arc<str>,
    /// `xds.virtual_host_name`.
    pub virtual_host_name: Arc<str>,
    /// `request.id`: the `x-request-id` the request arrived with (or was given by the gateway)
    /// before any filter ran. `None`: read the request's `x-request-id` header instead.
    pub request_id: Option<http::HeaderValue>,
    /// `request.time`.
    pub start_time: SystemTime,
    /// `request.protocol`.
    pub protocol: http::Version,
}

impl Default for StreamInfo {
    fn default() -> Self {
        Self {
            source: None,
            destination: None,
            connection_id: 0,
            tls: None,
            route_name: empty_name(),
            cluster_name: empty_name(),
            listener_name: empty_name(),
            virtual_host_name: empty_name(),
            request_id: None,
            start_time: SystemTime::now(),
            protocol: http::Version::HTTP_11,
        }
    }
}

/// An empty name, shared (cloning it does not allocate).
pub fn empty_name() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// A response the filter (or the host, on failure) asks the gateway to send instead of
/// proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// Status code.
    pub status: StatusCode,
    /// Headers to add to the reply.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Response code details (`response.code_details`), e.g. `wasm_fail_stream`.
    pub details: String,
    /// gRPC status to send (as `grpc-status`), `None` for plain HTTP.
    pub grpc_status: Option<u32>,
}

impl LocalReply {
    pub(crate) fn simple(status: u16, details: &str) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            details: details.to_owned(),
            grpc_status: None,
        }
    }
}

/// What the gateway must do after a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on to the next filter (or upstream/downstream) with the (possibly modified) data.
    Continue,
    /// Stop iteration: do not pass this part on yet; feed the filter the next body chunk.
    /// After paused headers, the headers are held until a later body callback returns
    /// `Continue`. After a paused body chunk the host keeps the bytes (the gateway's buffer is
    /// emptied); the next body callback reports the accumulated size, and `Continue` hands the
    /// whole accumulated (possibly replaced) body back in the gateway's buffer.
    ///
    /// Never returned for a part with `end_of_stream` (or trailers): there nothing more can
    /// come from the client, so the callback itself waits, as Envoy does, until the filter is
    /// resumed (by a callout response or another context) — bound it with a request timeout.
    StopIteration,
    /// Send this reply instead. The gateway then runs the response callbacks of the filters
    /// that saw the request, this one included, on the reply.
    LocalReply(Box<LocalReply>),
    /// Reset the stream (the filter called `proxy_close_stream`).
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// No guest context yet.
    New,
    /// The guest has a context.
    Active,
    /// The filter failed or its context was lost: callbacks are skipped.
    Bypassed,
    /// `finish` ran.
    Finished,
}

thread_local! {
    /// Stand-ins left in the caller's place while a stream holds the head, so that a write by
    /// the filter does not copy it.
    static EMPTY_REQUEST: Arc<RequestHead> = Arc::new(RequestHead::default());
    static EMPTY_RESPONSE: Arc<ResponseHead> = Arc::new(ResponseHead::default());
}

#[derive(Clone, Copy)]
enum Dir {
    Request,
    Response,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Headers { eos: bool },
    Body { eos: bool },
    Trailers,
}

/// A stream-owned callout running as its own task (so it progresses between callbacks);
/// dropping it aborts the task.
struct Callout {
    token: u32,
    task: tokio::task::JoinHandle<Result<CallResponse, CallError>>,
}

impl Drop for Callout {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Future for Callout {
    type Output = (u32, Result<CallResponse, CallError>);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let token = self.token;
        std::pin::Pin::new(&mut self.task).poll(cx).map(|r| {
            let r = r.unwrap_or_else(|e| Err(CallError::Reset(format!("callout task: {e}"))));
            (token, r)
        })
    }
}

type Pending = FuturesUnordered<Callout>;

/// One guest callback of a stream: given the exports, the store and the context id.
pub(crate) type GuestCall<'a> = dyn FnMut(
        &crate::vm::Exports,
        &mut wasmtime::Store<crate::state::HostState>,
        i32,
    ) -> wasmtime::Result<i32>
    + 'a;

/// One HTTP stream through one plugin.
///
/// The gateway calls, for each plugin of a route's chain: [`on_request_headers`], then
/// [`on_request_body`] per chunk and [`on_request_trailers`] if any, then the response
/// counterparts, then [`finish`]. A callback that returns anything but `Continue` stops the
/// chain at this plugin. The stream keeps one VM replica for its whole life.
///
/// [`on_request_headers`]: HttpStream::on_request_headers
/// [`on_request_body`]: HttpStream::on_request_body
/// [`on_request_trailers`]: HttpStream::on_request_trailers
/// [`finish`]: HttpStream::finish
pub struct HttpStream {
    pub(crate) plugin: Arc<Plugin>,
    replica: usize,
    generation: u64,
    ctx: Option<Box<StreamCtx>>,
    lifecycle: Lifecycle,
    /// Callouts in flight (made on first use: an empty `FuturesUnordered` allocates).
    pending: Option<Pending>,
    /// Wakes a waiting callback when another context acts on this stream (made on first wait).
    waker: Option<Arc<tokio::sync::Notify>>,
    request_body: BytesMut,
    response_body: BytesMut,
}

impl std::fmt::Debug for HttpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("plugin", &self.plugin.name())
            .field("replica", &self.replica)
            .field("lifecycle", &self.lifecycle)
            .finish_non_exhaustive()
    }
}

impl HttpStream {
    pub(crate) fn new(plugin: Arc<Plugin>, info: Arc<StreamInfo>) -> Self {
        let replica = plugin.group.pick_replica();
        let id = plugin.group.next_context_id();
        let root = plugin.root.context_id;
        let ctx = match crate::pool::context() {
            Some(mut ctx) => {
                ctx.id = id;
                ctx.root = root;
                ctx.info = info;
                ctx
            }
            None => Box::new(StreamCtx::new(id, root, info)),
        };
        Self {
            plugin,
            replica,
            generation: 0,
            ctx: Some(ctx),
            lifecycle: Lifecycle::New,
            pending: None,
            request_body: BytesMut::new(),
            waker: None,
            response_body: BytesMut::new(),
        }
    }

    /// The same machinery for a network (TCP) connection: see `NetworkStream`.
    pub(crate) fn new_network(plugin: Arc<Plugin>, info: Arc<StreamInfo>) -> Self {
        let mut stream = Self::new(plugin, info);
        stream.ctx().network = true;
        stream
    }

    pub(crate) fn ctx(&mut self) -> &mut StreamCtx {
        // The context is only out of `self` during a guest call, which `invoke` puts back.
        self.ctx.get_or_insert_with(unreachable_ctx)
    }

    /// Whether the filter changed the request headers (pseudo-headers included) or cleared the
    /// route cache: the gateway must match the route again before choosing the upstream.
    pub fn route_cache_cleared(&self) -> bool {
        self.ctx.as_ref().is_some_and(|c| c.request_headers_changed)
    }

    /// Whether the filter edited the response headers (`:status` included).
    pub fn response_headers_changed(&self) -> bool {
        self.ctx
            .as_ref()
            .is_some_and(|c| c.response_headers_changed)
    }

    /// Tell the stream which cluster and upstream address were chosen (`xds.cluster_name`,
    /// `upstream.address`, `upstream.port`).
    pub fn set_upstream(&mut self, cluster: impl Into<Arc<str>>, address: Option<SocketAddr>) {
        let ctx = self.ctx();
        ctx.cluster = Some(cluster.into());
        ctx.upstream = address;
    }

    /// Set `response.code_details` (e.g. `via_upstream`).
    pub fn set_response_code_details(&mut self, details: &str) {
        self.ctx().response_code_details = Some(details.to_owned());
    }

    /// Set `response.flags`: Envoy's response flag bits (`UH` is `0x2`, `UF` `0x20`, ...).
    pub fn set_response_flags(&mut self, bits: u64) {
        self.ctx().response_flags = bits;
    }

    /// Take the body bytes the filter still holds for `request` (true) or response (false): after
    /// a trailers callback returns `Continue`, send these before the trailers.
    pub fn take_buffered_body(&mut self, request: bool) -> BytesMut {
        if request {
            std::mem::take(&mut self.request_body)
        } else {
            std::mem::take(&mut self.response_body)
        }
    }

    /// Whether the filter failed (or lost its VM) and is now skipped for this stream.
    pub fn is_bypassed(&self) -> bool {
        self.lifecycle == Lifecycle::Bypassed
    }

    /// Whether the guest context exists and the filter is not bypassed.
    pub(crate) fn is_active(&self) -> bool {
        self.lifecycle == Lifecycle::Active
    }

    /// Whether callouts are in flight.
    fn nothing_pending(&self) -> bool {
        self.pending.as_ref().is_none_or(FuturesUnordered::is_empty)
    }

    /// Run one guest call with this stream's context loaded. `last` marks the stream's final
    /// call: when it succeeds, the replica's past failures are forgotten.
    fn invoke(
        &mut self,
        last: bool,
        call: impl FnOnce(&mut Vm, &Arc<RootSpec>, u32, bool) -> Result<i32, Failure>,
    ) -> Result<i32, ()> {
        let group = &self.plugin.group;
        let spec = &self.plugin.root;
        let mut slot = group.lock(self.replica);
        if self.lifecycle == Lifecycle::New {
            if let Err(why) = group.ensure_vm(self.replica, &mut slot, false) {
                tracing::debug!(plugin = %spec.plugin_name, "wasm stream without VM: {why}");
                return Err(());
            }
            self.generation = slot.generation;
        }
        if slot.generation != self.generation {
            // The VM this stream's context lived in was discarded.
            return Err(());
        }
        let generation = slot.generation;
        let Some(vm) = slot.vm.as_mut() else {
            return Err(());
        };
        if !vm.store.data().roots.contains_key(&spec.context_id) {
            return Err(());
        }
        let Some(ctx) = self.ctx.take() else {
            return Err(());
        };
        let id = ctx.id;
        let create = self.lifecycle == Lifecycle::New;
        let state = vm.store.data_mut();
        if create {
            let parked = Parked {
                network: ctx.network,
                ..Parked::default()
            };
            state.streams.insert(id, parked);
        }
        state.stream = Some(ctx);
        state.effective = id;
        state.phase = Phase::Running;
        let r = call(vm, spec, id, create);
        let state = vm.store.data_mut();
        self.ctx = state.stream.take();
        if state.parked_used
            && let (Some(ctx), Some(parked)) = (self.ctx.as_deref_mut(), state.streams.get_mut(&id))
        {
            merge(ctx, std::mem::take(&mut parked.actions));
        }
        state.effective = 0;
        // Most callbacks issue no callout: leave the (empty) vector alone.
        if !state.new_callouts.is_empty() {
            let callouts = std::mem::take(&mut state.new_callouts);
            start_callouts(
                &mut self.pending,
                &self.plugin,
                self.replica,
                callouts,
                id,
                generation,
            );
        }
        if create {
            self.lifecycle = Lifecycle::Active;
        }
        match r {
            Ok(v) => {
                if last {
                    group.healthy(&mut slot);
                }
                Ok(v)
            }
            Err(f) => {
                self.failed(&mut slot, &f);
                Err(())
            }
        }
    }

    /// A guest call failed: log it and apply the plugin's failure policy to the replica.
    #[cold]
    #[inline(never)]
    fn failed(&self, slot: &mut Slot, f: &Failure) {
        let spec = &self.plugin.root;
        tracing::warn!(plugin = %spec.plugin_name, "wasm filter failed: {f}");
        self.plugin.group.fail(self.replica, slot, spec.fail, f);
    }

    /// Run a stream callback: create the context first if needed. The callback is passed as a
    /// trait object so that one copy of the calling machinery (lock, context, deadline, stats)
    /// serves every callback: a request runs several, and the copies' code would compete for
    /// the instruction cache.
    pub(crate) fn callback(&mut self, f: &mut GuestCall<'_>) -> Result<i32, ()> {
        self.guest_call(false, f)
    }

    /// [`callback`](Self::callback), with `last` as in [`invoke`](Self::invoke).
    fn guest_call(&mut self, last: bool, f: &mut GuestCall<'_>) -> Result<i32, ()> {
        self.invoke(last, |vm, spec, id, create| {
            vm.guarded(spec.limits.callback_deadline, &spec.stats, |ex, store| {
                if create && let Some(cc) = &ex.context_create {
                    cc.call(&mut *store, (id as i32, spec.context_id as i32))?;
                }
                f(ex, store, id as i32)
            })
        })
    }

    pub(crate) fn failure_decision(&mut self) -> Decision {
        self.lifecycle = Lifecycle::Bypassed;
        self.pending = None;
        self.plugin
            .root
            .stats
            .failed_streams
            .fetch_add(1, Ordering::Relaxed);
        match self.plugin.root.fail {
            FailPolicy::Open => Decision::Continue,
            FailPolicy::Closed | FailPolicy::Reload => {
                Decision::LocalReply(Box::new(LocalReply::simple(503, "wasm_fail_stream")))
            }
        }
    }

    pub(crate) fn skipping(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Bypassed | Lifecycle::Finished)
    }

    /// Deliver callouts that answered since the last callback (a filter may call out and
    /// continue; Envoy delivers the response whenever it comes). A local reply or close
    /// requested from those callbacks is returned.
    fn deliver_ready(&mut self) -> Option<Decision> {
        if self.deliver_callouts().is_err() {
            return Some(self.failure_decision());
        }
        self.take_actions().err()
    }

    /// Take the actions requested for this stream. A local reply or a close ends the wait at
    /// once, as that decision (the callouts still in flight are dropped).
    fn take_actions(&mut self) -> Result<Actions, Decision> {
        let ctx = self.ctx();
        let mut actions = std::mem::take(&mut ctx.actions);
        if let Some(reply) = actions.local_reply.take() {
            ctx.local_reply_sent = true;
            ctx.response_code_details = Some(reply.details.clone());
            self.pending = None;
            return Err(Decision::LocalReply(reply));
        }
        if actions.close {
            self.pending = None;
            return Err(Decision::Reset);
        }
        Ok(actions)
    }

    /// Deliver the callouts that already answered and the gRPC stream events already there
    /// (without waiting). Errs when the filter failed.
    #[inline]
    pub(crate) fn deliver_callouts(&mut self) -> Result<(), ()> {
        let grpc = self.ctx.as_ref().is_some_and(|c| c.grpc.is_some());
        if self.nothing_pending() && !grpc {
            // The usual case: no callout in flight, no gRPC stream opened.
            return Ok(());
        }
        self.deliver_arrived()
    }

    /// [`deliver_callouts`](Self::deliver_callouts) when something may have arrived.
    fn deliver_arrived(&mut self) -> Result<(), ()> {
        while let Some(Some((token, result))) =
            self.pending.as_mut().and_then(|p| p.next().now_or_never())
        {
            self.deliver(token, result)?;
        }
        while let Some(d) = self.ctx().grpc.as_mut().and_then(Inbox::try_next) {
            self.deliver_grpc(d)?;
        }
        Ok(())
    }

    /// Deliver one event of a gRPC stream this context opened. Errs when the filter failed.
    fn deliver_grpc(&mut self, d: Delivery) -> Result<(), ()> {
        self.invoke(false, |vm, spec, id, _create| {
            crate::grpc_stream::deliver(vm, spec, spec.context_id, id, d).map(|()| 1)
        })
        .map(|_| ())
    }

    /// Deliver one callout's result into the stream's VM. Errs when the filter failed.
    pub(crate) fn deliver(
        &mut self,
        token: u32,
        result: Result<CallResponse, CallError>,
    ) -> Result<(), ()> {
        self.invoke(false, |vm, spec, _id, _create| {
            deliver_callout(vm, spec, spec.context_id, token, result).map(|()| 1)
        })
        .map(|_| ())
    }

    /// Wait for the next thing that may change a waiting stream: a callout answer or an event
    /// of a gRPC stream the filter opened (delivered into the filter), or `waker` (another
    /// context acted on the stream: take its actions with `sync_parked`). Cancel-safe. Errs
    /// when the filter failed.
    pub(crate) async fn wait_event(&mut self, waker: &tokio::sync::Notify) -> Result<(), ()> {
        let callouts = !self.nothing_pending();
        let inbox = self.ctx.as_deref_mut().and_then(|c| c.grpc.as_mut());
        tokio::select! {
            next = next_callout(&mut self.pending), if callouts => match next {
                Some((token, result)) => self.deliver(token, result),
                None => Ok(()),
            },
            d = next_grpc_event(inbox) => self.deliver_grpc(d),
            _ = waker.notified() => Ok(()),
        }
    }

    /// Before waiting: register the waker and take the actions other contexts requested for
    /// this stream. Errs when the stream's VM is gone.
    pub(crate) fn sync_parked(&mut self) -> Result<Arc<tokio::sync::Notify>, ()> {
        let waker = self.waker.get_or_insert_with(Default::default).clone();
        let plugin = self.plugin.clone();
        let mut slot = plugin.group.lock(self.replica);
        if slot.generation != self.generation {
            return Err(());
        }
        let Some(vm) = slot.vm.as_mut() else {
            return Err(());
        };
        let id = self.ctx().id;
        let Some(parked) = vm.store.data_mut().streams.get_mut(&id) else {
            return Err(());
        };
        parked.waker = Some(waker.clone());
        let actions = std::mem::take(&mut parked.actions);
        drop(slot);
        merge(self.ctx(), actions);
        Ok(waker)
    }

    /// The decision after a callback that returned `action`, if it needs no wait: apply the
    /// deferred actions. `None`: the filter is paused and must be waited for with
    /// [`resolve_waiting`](Self::resolve_waiting).
    fn resolve_now(&mut self, dir: Dir, action: i32, part: Part) -> Option<Decision> {
        let actions = match self.take_actions() {
            Ok(a) => a,
            Err(d) => return Some(d),
        };
        let resumed = match dir {
            Dir::Request => actions.continue_request,
            Dir::Response => actions.continue_response,
        };
        if action == 0 || resumed {
            return Some(Decision::Continue);
        }
        if self.nothing_pending()
            && let Part::Headers { eos: false } | Part::Body { eos: false } = part
        {
            return Some(Decision::StopIteration);
        }
        None
    }

    /// After [`resolve_now`](Self::resolve_now) found the filter paused: apply deferred
    /// actions and wait for callouts until something resumes it. Waiting is rare: its (large)
    /// future is boxed so that the callbacks' futures, moved on every call, stay small.
    fn resolve_waiting(&mut self, dir: Dir, part: Part) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            loop {
                // About to wait: take what other contexts asked meanwhile, and be wakeable.
                let Ok(waker) = self.sync_parked() else {
                    return self.failure_decision();
                };
                let a = &self.ctx().actions;
                let acted =
                    a.local_reply.is_some() || a.close || a.continue_request || a.continue_response;
                // Wait for a callout, an event of a gRPC stream the filter opened, or (nothing
                // more coming from the client) like Envoy for a resume from another context (a
                // timer, a queue, another stream). The gateway's request timeout bounds the wait.
                if !acted && self.wait_event(&waker).await.is_err() {
                    return self.failure_decision();
                }
                // The filter's own action was a pause: only what happened since can resume it.
                if let Some(d) = self.resolve_now(dir, 1, part) {
                    return d;
                }
            }
        })
    }

    /// Request headers (and pseudo-headers). Edits to `head` are made in place (copied first
    /// only if somebody else holds it); check [`route_cache_cleared`](Self::route_cache_cleared)
    /// afterwards. The stream keeps a reference to the head as it left this filter, for later
    /// phases and properties. A filter that pauses until a callout answers is awaited here
    /// (`proxy_on_http_call_response` runs inside).
    pub async fn on_request_headers(
        &mut self,
        head: &mut Arc<RequestHead>,
        end_of_stream: bool,
    ) -> Decision {
        if self.skipping() {
            return Decision::Continue;
        }
        let n = (4 + head.headers.len()) as i32;
        let placeholder = EMPTY_REQUEST.with(Arc::clone);
        self.ctx().request = Some(std::mem::replace(head, placeholder));
        let r = self.callback(&mut |ex, store, id| match &ex.request_headers {
            Some(HeadersFn::V2(f)) => f.call(store, (id, n, i32::from(end_of_stream))),
            Some(HeadersFn::V1(f)) => f.call(store, (id, n)),
            None => Ok(0),
        });
        let d = match r {
            Ok(a) => {
                let part = Part::Headers { eos: end_of_stream };
                match self.resolve_now(Dir::Request, a, part) {
                    Some(d) => d,
                    None => self.resolve_waiting(Dir::Request, part).await,
                }
            }
            Err(()) => self.failure_decision(),
        };
        if let Some(h) = &self.ctx().request {
            *head = h.clone();
        }
        d
    }

    async fn on_body(&mut self, dir: Dir, data: &mut Bytes, end_of_stream: bool) -> Decision {
        let held = match dir {
            Dir::Request => &mut self.request_body,
            Dir::Response => &mut self.response_body,
        };
        let chunk = data.len() as u64;
        // The chunk itself when nothing is held (no copy: the filter reads and replaces the
        // body whole), else the held bytes with the chunk appended.
        let buf = if held.is_empty() {
            std::mem::take(data)
        } else {
            held.extend_from_slice(data);
            *data = Bytes::new();
            std::mem::take(held).freeze()
        };
        if !self.skipping()
            && let Some(d) = self.deliver_ready()
        {
            if d == Decision::Continue {
                *data = buf;
            }
            return d;
        }
        if self.skipping() {
            *data = buf;
            return Decision::Continue;
        }
        let kind = match dir {
            Dir::Request => BodyKind::Request,
            Dir::Response => BodyKind::Response,
        };
        let ctx = self.ctx();
        match dir {
            Dir::Request => ctx.request_body_bytes += chunk,
            Dir::Response => ctx.response_body_bytes += chunk,
        }
        let len = buf.len() as i32;
        ctx.body = Some((kind, buf));
        let eos = i32::from(end_of_stream);
        let r = self.callback(&mut |ex, store, id| {
            let f = match dir {
                Dir::Request => &ex.request_body,
                Dir::Response => &ex.response_body,
            };
            match f {
                Some(f) => f.call(store, (id, len, eos)),
                None => Ok(0),
            }
        });
        let d = match r {
            Ok(a) => {
                let part = Part::Body { eos: end_of_stream };
                match self.resolve_now(dir, a, part) {
                    Some(d) => d,
                    None => self.resolve_waiting(dir, part).await,
                }
            }
            Err(()) => self.failure_decision(),
        };
        let buf = self.ctx().body.take().map(|(_, b)| b).unwrap_or_default();
        match d {
            Decision::Continue => {
                *data = buf;
                Decision::Continue
            }
            Decision::StopIteration => {
                if buf.len() > self.plugin.root.limits.body_buffer_bytes {
                    let reply = match dir {
                        Dir::Request => LocalReply::simple(413, "request_payload_too_large"),
                        Dir::Response => LocalReply::simple(500, "response_payload_too_large"),
                    };
                    self.ctx().local_reply_sent = true;
                    return Decision::LocalReply(Box::new(reply));
                }
                let buf = into_mut(buf);
                match dir {
                    Dir::Request => self.request_body = buf,
                    Dir::Response => self.response_body = buf,
                }
                Decision::StopIteration
            }
            other => other,
        }
    }

    /// A request body chunk. On `Continue`, `data` holds what to forward (the whole
    /// accumulated body if earlier chunks were held); on `StopIteration` the host keeps the
    /// bytes (capped at `limits.body_buffer_bytes`: past it a 413 local reply).
    pub async fn on_request_body(&mut self, data: &mut Bytes, end_of_stream: bool) -> Decision {
        self.on_body(Dir::Request, data, end_of_stream).await
    }

    async fn on_trailers(&mut self, dir: Dir, trailers: &mut HeaderMap) -> Decision {
        if self.skipping() {
            return Decision::Continue;
        }
        if let Some(d) = self.deliver_ready() {
            return d;
        }
        let n = trailers.len() as i32;
        let t = std::mem::take(trailers);
        // A body the filter held stays readable (and replaceable) during the trailers.
        let held = match dir {
            Dir::Request => (BodyKind::Request, std::mem::take(&mut self.request_body)),
            Dir::Response => (BodyKind::Response, std::mem::take(&mut self.response_body)),
        };
        let held = (held.0, held.1.freeze());
        let ctx = self.ctx();
        ctx.body = Some(held);
        match dir {
            Dir::Request => ctx.request_trailers = Some(t),
            Dir::Response => ctx.response_trailers = Some(t),
        }
        let r = self.callback(&mut |ex, store, id| {
            let f = match dir {
                Dir::Request => &ex.request_trailers,
                Dir::Response => &ex.response_trailers,
            };
            match f {
                Some(f) => f.call(store, (id, n)),
                None => Ok(0),
            }
        });
        let d = match r {
            Ok(a) => match self.resolve_now(dir, a, Part::Trailers) {
                Some(d) => d,
                None => self.resolve_waiting(dir, Part::Trailers).await,
            },
            Err(()) => self.failure_decision(),
        };
        let held = self
            .ctx()
            .body
            .take()
            .map_or_else(BytesMut::new, |(_, b)| into_mut(b));
        match dir {
            Dir::Request => self.request_body = held,
            Dir::Response => self.response_body = held,
        }
        let ctx = self.ctx();
        let t = match dir {
            Dir::Request => ctx.request_trailers.clone(),
            Dir::Response => ctx.response_trailers.clone(),
        };
        if let Some(t) = t {
            *trailers = t;
        }
        d
    }

    /// Request trailers (edits in place). After `Continue`, send
    /// [`take_buffered_body(true)`](Self::take_buffered_body) first if not empty.
    pub async fn on_request_trailers(&mut self, trailers: &mut HeaderMap) -> Decision {
        self.on_trailers(Dir::Request, trailers).await
    }

    /// Response headers (`:status` and headers, edits in place, copied first only if somebody
    /// else holds the head). Also called on a local reply (the filter's own or a later
    /// filter's): the filter sees and may edit the reply.
    pub async fn on_response_headers(
        &mut self,
        head: &mut Arc<ResponseHead>,
        end_of_stream: bool,
    ) -> Decision {
        if self.skipping() {
            return Decision::Continue;
        }
        if let Some(d) = self.deliver_ready() {
            return d;
        }
        let n = (1 + head.headers.len()) as i32;
        let placeholder = EMPTY_RESPONSE.with(Arc::clone);
        self.ctx().response = Some(std::mem::replace(head, placeholder));
        let r = self.callback(&mut |ex, store, id| match &ex.response_headers {
            Some(HeadersFn::V2(f)) => f.call(store, (id, n, i32::from(end_of_stream))),
            Some(HeadersFn::V1(f)) => f.call(store, (id, n)),
            None => Ok(0),
        });
        let d = match r {
            Ok(a) => {
                let part = Part::Headers { eos: end_of_stream };
                match self.resolve_now(Dir::Response, a, part) {
                    Some(d) => d,
                    None => self.resolve_waiting(Dir::Response, part).await,
                }
            }
            Err(()) => self.failure_decision(),
        };
        if let Some(h) = &self.ctx().response {
            *head = h.clone();
        }
        d
    }

    /// A response body chunk; see [`on_request_body`](Self::on_request_body) (the cap answers
    /// 500).
    pub async fn on_response_body(&mut self, data: &mut Bytes, end_of_stream: bool) -> Decision {
        self.on_body(Dir::Response, data, end_of_stream).await
    }

    /// Response trailers (edits in place).
    pub async fn on_response_trailers(&mut self, trailers: &mut HeaderMap) -> Decision {
        self.on_trailers(Dir::Response, trailers).await
    }

    /// End of the stream: `proxy_on_log`, then `proxy_on_done` and `proxy_on_delete` (Envoy's
    /// order). Call it once, after the response is complete or the stream was reset; dropping
    /// the stream without it runs only `on_done` and `on_delete`.
    pub fn finish(&mut self) {
        self.finish_in_order(false);
    }

    /// `finish` for HTTP (`network` false: `on_log`, then `on_done` + `on_delete`) or for a
    /// network connection (Envoy's order there: `on_done`, `on_log`, `on_delete`).
    pub(crate) fn finish_in_order(&mut self, network: bool) {
        if self.lifecycle == Lifecycle::Active {
            // Callouts that already answered are delivered first, as Envoy would have.
            let _ = self.deliver_ready();
        }
        self.end(Some(network));
        if self.lifecycle == Lifecycle::New {
            self.lifecycle = Lifecycle::Finished;
        }
    }

    /// The context's last guest call, in one guarded call: `on_log` (for `Some(false)`: HTTP,
    /// before `on_done`; for `Some(true)`: network, after it; `None`: no log), `on_done`,
    /// `on_delete`.
    fn end(&mut self, log: Option<bool>) {
        if self.lifecycle != Lifecycle::Active {
            return;
        }
        self.pending = None;
        let r = self.guest_call(log.is_some(), &mut |ex, store, id| {
            let on_log = |store: &mut wasmtime::Store<crate::state::HostState>| match &ex.log {
                Some(f) => f.call(store, id),
                None => Ok(()),
            };
            if log == Some(false) {
                on_log(&mut *store)?;
            }
            if let Some(f) = &ex.done {
                f.call(&mut *store, id)?;
            }
            if log == Some(true) {
                on_log(&mut *store)?;
            }
            if let Some(f) = &ex.delete {
                f.call(&mut *store, id)?;
            }
            let state = store.data_mut();
            state.streams.remove(&(id as u32));
            // The gRPC streams of a context end with it.
            state.grpc.cancel_owned_by(id as u32);
            Ok(0)
        });
        self.lifecycle = if r.is_ok() {
            Lifecycle::Finished
        } else {
            Lifecycle::Bypassed
        };
    }
}

impl Drop for HttpStream {
    fn drop(&mut self) {
        self.end(None);
        if let Some(ctx) = self.ctx.take() {
            crate::pool::give_context(ctx);
        }
    }
}

/// The next answered callout, or never when none is in flight.
async fn next_callout(
    pending: &mut Option<Pending>,
) -> Option<(u32, Result<CallResponse, CallError>)> {
    match pending {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// Start the callouts a callback of context `id` issued: the stream's own (into `pending`), and
/// its root context's. Out of line and cold, as most callbacks issue none: the calling machinery
/// stays compact.
#[cold]
#[inline(never)]
fn start_callouts(
    pending: &mut Option<Pending>,
    plugin: &Plugin,
    replica: usize,
    callouts: Vec<NewCallout>,
    id: u32,
    generation: u64,
) {
    for c in callouts {
        if c.owner == id {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => pending.get_or_insert_with(Pending::new).push(Callout {
                    token: c.token,
                    task: rt.spawn(c.future),
                }),
                Err(_) => tracing::warn!(
                    plugin = %plugin.root.plugin_name,
                    "wasm callout dropped: no tokio runtime"
                ),
            }
        } else {
            plugin.group.spawn_root_callout(replica, generation, c);
        }
    }
}

#[cold]
fn unreachable_ctx() -> Box<StreamCtx> {
    // Never taken outside `invoke`; a fresh empty context keeps the host alive regardless.
    Box::new(StreamCtx::new(0, 0, empty_info()))
}

/// Empty stream facts, shared (cloning them does not allocate).
pub(crate) fn empty_info() -> Arc<StreamInfo> {
    thread_local! {
        static EMPTY: Arc<StreamInfo> = Arc::new(StreamInfo::default());
    }
    EMPTY.with(Arc::clone)
}

/// The next event of the context's gRPC streams; never, when it opened none.
async fn next_grpc_event(inbox: Option<&mut Inbox>) -> Delivery {
    match inbox {
        Some(inbox) => inbox.next().await,
        None => std::future::pending().await,
    }
}

/// Bytes to keep appending to: the same memory when nothing else shares it, else a copy.
pub(crate) fn into_mut(data: Bytes) -> BytesMut {
    data.try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// Add actions requested from other contexts to the stream's own.
fn merge(ctx: &mut StreamCtx, other: Actions) {
    let a = &mut ctx.actions;
    a.continue_request |= other.continue_request;
    a.continue_response |= other.continue_response;
    a.continue_downstream |= other.continue_downstream;
    a.continue_upstream |= other.continue_upstream;
    a.close |= other.close;
    if a.local_reply.is_none() && !ctx.local_reply_sent {
        a.local_reply = other.local_reply;
    }
}
