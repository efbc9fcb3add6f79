//! The engine, VM groups (replicas of one VM shared by plugins), plugins and their background
//! tasks (timers, root-context callouts, queue wake-ups).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use wasmtime::{InstancePre, Linker, Module};

use crate::config::{EngineConfig, FailPolicy, PluginConfig, ReplicaChoice};
use crate::error::{CallError, PluginError};
use crate::host_env::{CallResponse, HostEnv};
use crate::metrics::{PluginStats, StatsSnapshot};
use crate::state::{CalloutKind, CalloutView, HostState, NewCallout, Phase, RootSpec, VmShared};
use crate::stream::{HttpStream, StreamInfo};
use crate::threads::stream_thread_number;
use crate::types::AbiVersion;
use crate::vm::{Failure, RootFailure, Vm};

/// Events for a replica's background task.
pub(crate) enum BgEvent {
    /// A callout made by a root context finished.
    Callout {
        generation: u64,
        owner: u32,
        token: u32,
        result: Box<Result<CallResponse, CallError>>,
    },
    /// Something was enqueued on a queue registered by `context_id`.
    QueueReady { context_id: u32, queue_id: u32 },
    /// An event of a gRPC stream opened by root context `owner`.
    Grpc {
        owner: u32,
        delivery: crate::grpc_stream::Delivery,
    },
}

/// The wasm engine: compiler, module cache, linker with every host function, epoch ticker, and
/// the registry of shared VMs. Cheap to clone; one per process is the intended use.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

type GroupKey = ([u8; 32], String, Bytes);

pub(crate) struct EngineInner {
    pub(crate) wasmtime: wasmtime::Engine,
    pub(crate) linker: Linker<HostState>,
    config: EngineConfig,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    groups: Mutex<HashMap<GroupKey, Weak<VmGroup>>>,
    stop: Arc<AtomicBool>,
    live: Arc<crate::metrics::LiveVms>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Build the engine and start its epoch ticker thread (stopped when the last clone of the
    /// engine and every plugin made with it are dropped).
    pub fn new(config: EngineConfig) -> Result<Engine, PluginError> {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_bulk_memory(true);
        cfg.wasm_multi_value(true);
        cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| PluginError::Engine(format!("cache dir {}: {e}", dir.display())))?;
            let mut cc = wasmtime::CacheConfig::new();
            cc.with_directory(dir);
            let cache =
                wasmtime::Cache::new(cc).map_err(|e| PluginError::Engine(format!("cache: {e}")))?;
            cfg.cache(Some(cache));
        }
        let wasmtime =
            wasmtime::Engine::new(&cfg).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&wasmtime);
        crate::abi::add_to_linker(&mut linker)
            .map_err(|e| PluginError::Engine(format!("linker: {e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = wasmtime.clone();
            let stop = stop.clone();
            let tick = config.epoch_tick.max(Duration::from_micros(100));
            std::thread::Builder::new()
                .name("weir-wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Engine(format!("epoch thread: {e}")))?;
        }
        Ok(Engine {
            inner: Arc::new(EngineInner {
                wasmtime,
                linker,
                config,
                modules: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
                stop,
                live: Default::default(),
            }),
        })
    }

    /// Number of VMs (module + vm_id + VM configuration, each with its replicas) alive now.
    pub fn loaded_vms(&self) -> usize {
        lock(&self.inner.groups)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// VM instances alive now (every replica of every VM, old configurations' VMs included
    /// until they are freed) and their linear memory in bytes.
    pub fn live_vms(&self) -> (u64, u64) {
        let l = &self.inner.live;
        (
            l.vms.load(Ordering::Relaxed),
            l.memory_bytes.load(Ordering::Relaxed),
        )
    }

    /// The settings the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Compile `bytes` (or take it from the in-memory cache by sha256; the on-disk cache, when
    /// configured, serves recompilations across restarts).
    pub(crate) fn compile(
        &self,
        bytes: &[u8],
        plugin: &str,
    ) -> Result<([u8; 32], Module), PluginError> {
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(m) = lock(&self.inner.modules).get(&hash) {
            return Ok((hash, m.clone()));
        }
        let module =
            Module::new(&self.inner.wasmtime, bytes).map_err(|e| PluginError::Compile {
                plugin: plugin.to_owned(),
                message: format!("{e:#}"),
            })?;
        lock(&self.inner.modules).insert(hash, module.clone());
        Ok((hash, module))
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// One replica: a VM slot behind a mutex held only during synchronous guest calls.
pub(crate) struct Replica {
    pub(crate) slot: Mutex<Slot>,
    pub(crate) shared: Arc<VmShared>,
}

pub(crate) struct Slot {
    pub(crate) vm: Option<Vm>,
    /// Bumped every time a VM is created; stream contexts of older generations are lost.
    pub(crate) generation: u64,
    failures: u32,
    failed_at: Option<Instant>,
}

/// The replicas of one VM (module + vm_id + VM configuration) and the root contexts in it.
pub(crate) struct VmGroup {
    engine: Arc<EngineInner>,
    key: GroupKey,
    pre: InstancePre<HostState>,
    pub(crate) abi: AbiVersion,
    max_memory: usize,
    startup_deadline: Duration,
    restart_backoff: Duration,
    max_restart_backoff: Duration,
    pub(crate) replicas: Vec<Replica>,
    roots: Mutex<Vec<Weak<RootSpec>>>,
    next_ctx: AtomicU32,
    rr: AtomicUsize,
    runtime: Option<tokio::runtime::Handle>,
    starts: AtomicU64,
    start_failures: AtomicU64,
}

impl Drop for VmGroup {
    fn drop(&mut self) {
        let mut groups = lock(&self.engine.groups);
        if groups.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
            groups.remove(&self.key);
        }
    }
}

impl VmGroup {
    pub(crate) fn next_context_id(&self) -> u32 {
        self.next_ctx.fetch_add(1, Ordering::Relaxed)
    }

    /// The replica a new stream runs in (see [`ReplicaChoice`]).
    pub(crate) fn pick_replica(&self) -> usize {
        let n = self.replicas.len();
        if n == 1 {
            return 0;
        }
        match self.engine.config.replica_choice {
            ReplicaChoice::PerThread => {
                // This thread's own replica, unless its VM is gone (failed and waiting for its
                // restart backoff): then the next replica that has one.
                let own = stream_thread_number() % n;
                (0..n)
                    .map(|k| (own + k) % n)
                    .find(|&i| self.lock(i).vm.is_some())
                    .unwrap_or(own)
            }
            ReplicaChoice::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n,
        }
    }

    pub(crate) fn lock(&self, idx: usize) -> MutexGuard<'_, Slot> {
        lock(&self.replicas[idx].slot)
    }

    fn live_roots(&self) -> Vec<Arc<RootSpec>> {
        let mut roots = lock(&self.roots);
        roots.retain(|w| w.strong_count() > 0);
        roots.iter().filter_map(Weak::upgrade).collect()
    }

    /// Make sure the slot has a VM: start one (with every live root context) if none, unless a
    /// recent failure's backoff has not elapsed (`force` ignores it). Errs with the reason when
    /// there is no VM.
    pub(crate) fn ensure_vm(&self, idx: usize, slot: &mut Slot, force: bool) -> Result<(), String> {
        if slot.vm.is_some() {
            return Ok(());
        }
        if !force && let Some(at) = slot.failed_at {
            let exp = slot.failures.saturating_sub(1).min(16);
            let backoff = self
                .restart_backoff
                .saturating_mul(1 << exp)
                .min(self.max_restart_backoff);
            if at.elapsed() < backoff {
                return Err("VM failed recently; restart backoff not elapsed".into());
            }
        }
        let shared = self.replicas[idx].shared.clone();
        lock(&shared.timers).clear();
        let roots = self.live_roots();
        match Vm::start(
            &self.pre,
            shared,
            self.max_memory,
            self.startup_deadline,
            self.engine.config.epoch_tick,
        ) {
            Ok(mut vm) => {
                self.starts.fetch_add(1, Ordering::Relaxed);
                for r in &roots {
                    if let Err((step, msg)) = vm.create_root(r) {
                        tracing::error!(plugin = %r.plugin_name, ?step, "wasm VM restart: root context failed: {msg}");
                        self.start_failures.fetch_add(1, Ordering::Relaxed);
                        self.mark_failed(idx, slot);
                        return Err(format!(
                            "plugin {}: root context failed to start ({step:?}) {msg}",
                            r.plugin_name
                        ));
                    }
                    self.spawn_root_callouts(idx, slot.generation + 1, &mut vm);
                }
                slot.generation += 1;
                slot.vm = Some(vm);
                Ok(())
            }
            Err(msg) => {
                tracing::error!("wasm VM start failed: {msg}");
                self.start_failures.fetch_add(1, Ordering::Relaxed);
                self.mark_failed(idx, slot);
                Err(msg)
            }
        }
    }

    fn mark_failed(&self, idx: usize, slot: &mut Slot) {
        if let Some(vm) = slot.vm.take() {
            // Streams waiting on this VM learn at once that their context is gone.
            for parked in vm.store.data().streams.values() {
                if let Some(waker) = &parked.waker {
                    waker.notify_one();
                }
            }
        }
        slot.failures = slot.failures.saturating_add(1);
        slot.failed_at = Some(Instant::now());
        slot.generation += 1;
        lock(&self.replicas[idx].shared.timers).clear();
    }

    /// Discard the slot's VM after a failure; `Reload` recreates it at once (the first time
    /// in a row; after that the backoff applies, so a VM that fails at start-up does not spin).
    pub(crate) fn fail(&self, idx: usize, slot: &mut Slot, policy: FailPolicy, why: &Failure) {
        tracing::warn!(replica = idx, "wasm VM discarded: {why}");
        self.mark_failed(idx, slot);
        if policy == FailPolicy::Reload && slot.failures <= 1 {
            let _ = self.ensure_vm(idx, slot, true);
        }
    }

    /// A stream finished cleanly on this slot: forget past failures.
    pub(crate) fn healthy(&self, slot: &mut Slot) {
        slot.failures = 0;
    }

    /// Start the callouts root contexts issued during the last guest call.
    pub(crate) fn spawn_root_callouts(&self, idx: usize, generation: u64, vm: &mut Vm) {
        let callouts = std::mem::take(&mut vm.store.data_mut().new_callouts);
        for c in callouts {
            self.spawn_root_callout(idx, generation, c);
        }
    }

    pub(crate) fn spawn_root_callout(&self, idx: usize, generation: u64, c: NewCallout) {
        let tx = self.replicas[idx].shared.events.clone();
        match &self.runtime {
            Some(rt) => {
                rt.spawn(async move {
                    let result = c.future.await;
                    let _ = tx.send(BgEvent::Callout {
                        generation,
                        owner: c.owner,
                        token: c.token,
                        result: Box::new(result),
                    });
                });
            }
            None => tracing::warn!("wasm callout from a root context dropped: no tokio runtime"),
        }
    }

    fn root_spec(&self, slot: &Slot, id: u32) -> Option<Arc<RootSpec>> {
        slot.vm.as_ref()?.store.data().roots.get(&id).cloned()
    }

    fn handle_event(&self, idx: usize, ev: BgEvent) {
        let mut slot = self.lock(idx);
        let generation = slot.generation;
        match ev {
            BgEvent::Callout {
                generation: g,
                owner,
                token,
                result,
            } => {
                if g != generation {
                    return;
                }
                let Some(spec) = self.root_spec(&slot, owner) else {
                    return;
                };
                let Some(vm) = slot.vm.as_mut() else { return };
                let r = deliver_callout(vm, &spec, owner, token, *result);
                self.after_root_call(idx, &mut slot, &spec, r);
            }
            BgEvent::Grpc { owner, delivery } => {
                let Some(spec) = self.root_spec(&slot, owner) else {
                    return;
                };
                let Some(vm) = slot.vm.as_mut() else { return };
                let r = crate::grpc_stream::deliver(vm, &spec, owner, owner, delivery);
                self.after_root_call(idx, &mut slot, &spec, r);
            }
            BgEvent::QueueReady {
                context_id,
                queue_id,
            } => {
                let Some(spec) = self.root_spec(&slot, context_id) else {
                    return;
                };
                let Some(vm) = slot.vm.as_mut() else { return };
                let state = vm.store.data_mut();
                state.effective = context_id;
                state.phase = Phase::Running;
                let r = vm.guarded(
                    spec.limits.callback_deadline,
                    &spec.stats,
                    |ex, store| match &ex.queue_ready {
                        Some(f) => f.call(store, (context_id as i32, queue_id as i32)),
                        None => Ok(()),
                    },
                );
                self.after_root_call(idx, &mut slot, &spec, r);
            }
        }
    }

    fn after_root_call(
        &self,
        idx: usize,
        slot: &mut Slot,
        spec: &RootSpec,
        r: Result<(), Failure>,
    ) {
        let generation = slot.generation;
        match r {
            Ok(()) => {
                if let Some(vm) = slot.vm.as_mut() {
                    self.spawn_root_callouts(idx, generation, vm);
                }
            }
            Err(f) => self.fail(idx, slot, spec.fail, &f),
        }
    }

    fn run_due_ticks(&self, idx: usize) {
        let mut slot = self.lock(idx);
        let now = Instant::now();
        let due: Vec<u32> = {
            let mut timers = lock(&self.replicas[idx].shared.timers);
            timers
                .iter_mut()
                .filter(|(_, (_, at))| *at <= now)
                .map(|(id, (period, at))| {
                    *at = now + *period;
                    *id
                })
                .collect()
        };
        for id in due {
            let Some(spec) = self.root_spec(&slot, id) else {
                continue;
            };
            let Some(vm) = slot.vm.as_mut() else { return };
            let state = vm.store.data_mut();
            state.effective = id;
            state.phase = Phase::Running;
            let r = vm.guarded(
                spec.limits.callback_deadline,
                &spec.stats,
                |ex, store| match &ex.tick {
                    Some(f) => f.call(store, id as i32),
                    None => Ok(()),
                },
            );
            let failed = r.is_err();
            self.after_root_call(idx, &mut slot, &spec, r);
            if failed {
                return;
            }
        }
    }

    fn remove_root(&self, spec: &RootSpec) {
        for (idx, replica) in self.replicas.iter().enumerate() {
            let mut slot = lock(&replica.slot);
            lock(&replica.shared.timers).remove(&spec.context_id);
            let Some(vm) = slot.vm.as_mut() else { continue };
            if vm.store.data().roots.contains_key(&spec.context_id) {
                let id = spec.context_id as i32;
                let state = vm.store.data_mut();
                state.effective = spec.context_id;
                state.phase = Phase::Running;
                let r = vm.guarded(spec.limits.callback_deadline, &spec.stats, |ex, store| {
                    if let Some(f) = &ex.done {
                        f.call(&mut *store, id)?;
                    }
                    if let Some(f) = &ex.delete {
                        f.call(&mut *store, id)?;
                    }
                    Ok(())
                });
                let state = vm.store.data_mut();
                state.roots.remove(&spec.context_id);
                state.grpc.cancel_owned_by(spec.context_id);
                if let Err(f) = r {
                    self.mark_failed(idx, &mut slot);
                    tracing::warn!(plugin = %spec.plugin_name, "wasm root context teardown failed: {f}");
                }
            }
        }
        lock(&self.roots).retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), spec));
    }

    /// Create `spec` in every replica; on failure remove it everywhere and report.
    fn add_root(&self, spec: &Arc<RootSpec>) -> Result<(), PluginError> {
        lock(&self.roots).push(Arc::downgrade(spec));
        let mut result = Ok(());
        for idx in 0..self.replicas.len() {
            let mut slot = self.lock(idx);
            if let Err(message) = self.ensure_vm(idx, &mut slot, true) {
                result = Err(PluginError::Instantiate {
                    plugin: spec.plugin_name.clone(),
                    message,
                });
                break;
            }
            let generation = slot.generation;
            let Some(vm) = slot.vm.as_mut() else { continue };
            if vm.store.data().roots.contains_key(&spec.context_id) {
                continue;
            }
            if let Err((step, msg)) = vm.create_root(spec) {
                let plugin = spec.plugin_name.clone();
                result = Err(match step {
                    RootFailure::VmStart => PluginError::VmStartRejected { plugin },
                    RootFailure::Configure => PluginError::ConfigureRejected { plugin },
                    RootFailure::Trap => PluginError::Callback {
                        plugin,
                        callback: "root context start (on_context_create/on_vm_start/on_configure)",
                        message: msg,
                    },
                });
                if step == RootFailure::Trap {
                    self.mark_failed(idx, &mut slot);
                }
                break;
            }
            self.spawn_root_callouts(idx, generation, vm);
        }
        if result.is_err() {
            self.remove_root(spec);
        }
        result
    }
}

/// Hand a callout's result to the guest. HTTP: `proxy_on_http_call_response(root, token,
/// headers, body size, trailers)`; a failed callout reports 0/0/0 and `proxy_get_status`
/// answers (11, "reset") meanwhile. gRPC (unary): `proxy_on_grpc_receive(root, token, size)`
/// with the message in buffer 5, or `proxy_on_grpc_close(root, token, status)` with the status
/// and message in `proxy_get_status`. Cancelled callouts are dropped.
pub(crate) fn deliver_callout(
    vm: &mut Vm,
    spec: &RootSpec,
    root: u32,
    token: u32,
    result: Result<CallResponse, CallError>,
) -> Result<(), Failure> {
    match vm.store.data_mut().live_callouts.remove(&token) {
        None => Ok(()),
        Some(CalloutKind::Grpc) => deliver_grpc(vm, spec, root, token, result),
        Some(CalloutKind::Http) => deliver_http(vm, spec, root, token, result),
    }
}

/// The outcome of a unary gRPC call: the response message, or a status code and message.
fn grpc_outcome(result: Result<CallResponse, CallError>) -> Result<Bytes, (u32, String)> {
    const DEADLINE_EXCEEDED: u32 = 4;
    const INTERNAL: u32 = 13;
    const UNAVAILABLE: u32 = 14;
    const UNKNOWN: u32 = 2;
    let r = match result {
        Ok(r) => r,
        Err(CallError::Timeout) => return Err((DEADLINE_EXCEEDED, "timeout".into())),
        Err(e) => return Err((UNAVAILABLE, e.to_string())),
    };
    if r.response.status() != http::StatusCode::OK {
        return Err((UNAVAILABLE, format!("HTTP status {}", r.response.status())));
    }
    let header = |name: &str| {
        r.trailers
            .get(name)
            .or_else(|| r.response.headers().get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let code = match header("grpc-status") {
        Some(c) => c.trim().parse::<u32>().unwrap_or(UNKNOWN),
        None => return Err((UNKNOWN, "no grpc-status".into())),
    };
    if code != 0 {
        return Err((code, header("grpc-message").unwrap_or_default()));
    }
    let body = r.response.body();
    if body.is_empty() {
        return Ok(Bytes::new());
    }
    if body.len() < 5 || body[0] != 0 {
        return Err((INTERNAL, "malformed or compressed gRPC frame".into()));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.get(5..5 + len)
        .map(|m| body.slice_ref(m))
        .ok_or_else(|| (INTERNAL, "truncated gRPC frame".into()))
}

fn deliver_grpc(
    vm: &mut Vm,
    spec: &RootSpec,
    root: u32,
    token: u32,
    result: Result<CallResponse, CallError>,
) -> Result<(), Failure> {
    let outcome = grpc_outcome(result);
    let state = vm.store.data_mut();
    state.effective = root;
    state.phase = Phase::Running;
    let r = match outcome {
        Ok(message) => {
            let len = message.len() as i32;
            state.last_status = (0, Bytes::new());
            state.grpc_message = Some(message);
            vm.guarded(
                spec.limits.callback_deadline,
                &spec.stats,
                |ex, store| match &ex.grpc_receive {
                    Some(f) => f.call(store, (root as i32, token as i32, len)),
                    None => Ok(()),
                },
            )
        }
        Err((code, message)) => {
            state.last_status = (code, Bytes::from(message));
            vm.guarded(
                spec.limits.callback_deadline,
                &spec.stats,
                |ex, store| match &ex.grpc_close {
                    Some(f) => f.call(store, (root as i32, token as i32, code as i32)),
                    None => Ok(()),
                },
            )
        }
    };
    let state = vm.store.data_mut();
    state.grpc_message = None;
    state.last_status = (0, Bytes::new());
    r
}

fn deliver_http(
    vm: &mut Vm,
    spec: &RootSpec,
    root: u32,
    token: u32,
    result: Result<CallResponse, CallError>,
) -> Result<(), Failure> {
    let (view, n_headers, body_len, n_trailers) = match result {
        Ok(r) => {
            let (parts, body) = r.response.into_parts();
            let nh = parts.headers.len() + 1;
            let nt = r.trailers.len();
            let bl = body.len();
            (
                Some(CalloutView {
                    headers: parts.headers,
                    status: Some(parts.status),
                    body,
                    trailers: r.trailers,
                }),
                nh,
                bl,
                nt,
            )
        }
        Err(e) => {
            tracing::debug!(plugin = %spec.plugin_name, "wasm callout failed: {e}");
            (None, 0, 0, 0)
        }
    };
    let state = vm.store.data_mut();
    state.last_status = if view.is_some() {
        (0, Bytes::new())
    } else {
        (11, Bytes::from_static(b"reset"))
    };
    state.callout = view;
    state.effective = root;
    state.phase = Phase::Running;
    let r = vm.guarded(
        spec.limits.callback_deadline,
        &spec.stats,
        |ex, store| match &ex.http_call_response {
            Some(f) => f.call(
                store,
                (
                    root as i32,
                    token as i32,
                    n_headers as i32,
                    body_len as i32,
                    n_trailers as i32,
                ),
            ),
            None => Ok(()),
        },
    );
    let state = vm.store.data_mut();
    state.callout = None;
    state.last_status = (0, Bytes::new());
    r
}

async fn background(
    group: Weak<VmGroup>,
    idx: usize,
    mut rx: UnboundedReceiver<BgEvent>,
    notify: Arc<Notify>,
) {
    loop {
        let next_due = {
            let Some(g) = group.upgrade() else { return };
            let timers = lock(&g.replicas[idx].shared.timers);
            timers.values().map(|(_, at)| *at).min()
        };
        let sleep = async {
            match next_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let Some(g) = group.upgrade() else { return };
                g.handle_event(idx, ev);
            }
            _ = notify.notified() => {}
            _ = sleep => {
                let Some(g) = group.upgrade() else { return };
                g.run_due_ticks(idx);
            }
        }
    }
}

/// A loaded plugin: one root context (with its configuration) in every replica of its VM.
///
/// Dropping the last `Arc<Plugin>` (and every [`HttpStream`] of it) deletes its root context;
/// dropping the last plugin of a VM frees the VM and ends its background task.
pub struct Plugin {
    pub(crate) group: Arc<VmGroup>,
    pub(crate) root: Arc<RootSpec>,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.group.remove_root(&self.root);
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.root.plugin_name)
            .field("root_id", &self.root.root_id)
            .field("vm_id", &self.root.vm_id)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// Load a plugin: compile the module (cached), find or start the VM replicas shared with
    /// other plugins of the same module, vm_id and VM configuration, and create this plugin's
    /// root context in each (`on_context_create(root, 0)`, `on_vm_start`, `on_configure`).
    ///
    /// Must be called within a tokio runtime for timers and root-context callouts to run (they
    /// are driven by one task per replica); without one they are inert.
    ///
    /// The first plugin of a VM decides the VM-wide settings: its `HostEnv`, its
    /// `limits.memory_bytes`, `limits.startup_deadline` and restart backoff.
    pub fn new(
        engine: &Engine,
        config: PluginConfig,
        env: Arc<dyn HostEnv>,
    ) -> Result<Arc<Plugin>, PluginError> {
        let (hash, module) = engine.compile(&config.module, &config.name)?;
        let abi =
            AbiVersion::from_exports(module.exports().map(|e| e.name())).ok_or_else(|| {
                PluginError::NoAbiMarker {
                    plugin: config.name.clone(),
                }
            })?;
        let unknown = crate::check::unknown_imports(&module);
        if !unknown.is_empty() {
            return Err(PluginError::UnknownImports {
                plugin: config.name.clone(),
                imports: unknown,
            });
        }
        let key: GroupKey = (hash, config.vm_id.clone(), config.vm_configuration.clone());
        // Never drop a group while holding the registry lock: its Drop takes that lock.
        let existing = lock(&engine.inner.groups).get(&key).and_then(Weak::upgrade);
        let group = match existing {
            Some(g) => g,
            None => {
                let fresh = new_group(engine, &config, key.clone(), &module, abi, env)?;
                let (chosen, discarded) = {
                    let mut groups = lock(&engine.inner.groups);
                    match groups.get(&key).and_then(Weak::upgrade) {
                        // Another thread created the same VM meanwhile: use that one.
                        Some(other) => (other, Some(fresh)),
                        None => {
                            groups.insert(key, Arc::downgrade(&fresh));
                            (fresh, None)
                        }
                    }
                };
                drop(discarded);
                chosen
            }
        };
        let root = Arc::new(RootSpec {
            context_id: group.next_context_id(),
            plugin_name: config.name,
            root_id: config.root_id,
            vm_id: config.vm_id,
            configuration: config.configuration,
            fail: config.fail,
            limits: config.limits,
            stats: Arc::new(PluginStats::default()),
            portable: config.portable,
        });
        group.add_root(&root)?;
        Ok(Arc::new(Plugin { group, root }))
    }

    /// Another root context of this plugin with a different configuration (a per-route
    /// override, Higress `matchRules` style), in the same VMs and sharing this plugin's stats.
    /// `on_configure` must accept the configuration.
    pub fn with_configuration(&self, configuration: Bytes) -> Result<Arc<Plugin>, PluginError> {
        let r = &self.root;
        let root = Arc::new(RootSpec {
            context_id: self.group.next_context_id(),
            plugin_name: r.plugin_name.clone(),
            root_id: r.root_id.clone(),
            vm_id: r.vm_id.clone(),
            configuration,
            fail: r.fail,
            limits: r.limits.clone(),
            stats: r.stats.clone(),
            portable: r.portable,
        });
        self.group.add_root(&root)?;
        Ok(Arc::new(Plugin {
            group: self.group.clone(),
            root,
        }))
    }

    /// Start a stream: it picks a VM replica and keeps it for its whole life.
    pub fn new_stream(self: &Arc<Self>, info: Arc<StreamInfo>) -> HttpStream {
        HttpStream::new(self.clone(), info)
    }

    /// The plugin name.
    pub fn name(&self) -> &str {
        &self.root.plugin_name
    }

    /// The ABI version the module declares.
    pub fn abi_version(&self) -> AbiVersion {
        self.group.abi
    }

    /// The failure policy.
    pub fn fail_policy(&self) -> FailPolicy {
        self.root.fail
    }

    /// A copy of the plugin's counters (shared with its per-route instances). `vm_starts`,
    /// `vm_start_failures` and `memory_bytes` are those of the VM replicas the plugin runs in
    /// (shared with the other plugins of the same VM).
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.root.stats.snapshot();
        s.vm_starts = self.group.starts.load(Ordering::Relaxed);
        s.vm_start_failures = self.group.start_failures.load(Ordering::Relaxed);
        s.memory_bytes = self
            .group
            .replicas
            .iter()
            .map(|r| r.shared.memory_bytes.load(Ordering::Relaxed))
            .sum();
        s
    }

    /// Number of VM replicas.
    pub fn replicas(&self) -> usize {
        self.group.replicas.len()
    }
}

fn new_group(
    engine: &Engine,
    config: &PluginConfig,
    key: GroupKey,
    module: &Module,
    abi: AbiVersion,
    env: Arc<dyn HostEnv>,
) -> Result<Arc<VmGroup>, PluginError> {
    let pre =
        engine
            .inner
            .linker
            .instantiate_pre(module)
            .map_err(|e| PluginError::Instantiate {
                plugin: config.name.clone(),
                message: format!("{e:#}"),
            })?;
    let runtime = tokio::runtime::Handle::try_current().ok();
    let n = engine.inner.config.replicas.max(1);
    let mut receivers = Vec::with_capacity(n);
    let replicas = (0..n)
        .map(|_| {
            let (tx, rx) = unbounded_channel();
            let notify = Arc::new(Notify::new());
            receivers.push((rx, notify.clone()));
            Replica {
                slot: Mutex::new(Slot {
                    vm: None,
                    generation: 0,
                    failures: 0,
                    failed_at: None,
                }),
                shared: Arc::new(VmShared {
                    vm_id: config.vm_id.clone(),
                    vm_configuration: config.vm_configuration.clone(),
                    env: env.clone(),
                    events: tx,
                    notify,
                    timers: Mutex::new(HashMap::new()),
                    memory_bytes: Default::default(),
                    live: engine.inner.live.clone(),
                }),
            }
        })
        .collect();
    let group = Arc::new(VmGroup {
        engine: engine.inner.clone(),
        key,
        pre,
        abi,
        max_memory: config.limits.memory_bytes,
        startup_deadline: config.limits.startup_deadline,
        restart_backoff: config.limits.restart_backoff,
        max_restart_backoff: config.limits.max_restart_backoff,
        replicas,
        roots: Mutex::new(Vec::new()),
        // Context ids start at 1 (0 means "no parent").
        next_ctx: AtomicU32::new(1),
        rr: AtomicUsize::new(0),
        runtime: runtime.clone(),
        starts: AtomicU64::new(0),
        start_failures: AtomicU64::new(0),
    });
    for (idx, (rx, notify)) in receivers.into_iter().enumerate() {
        if let Some(rt) = &runtime {
            rt.spawn(background(Arc::downgrade(&group), idx, rx, notify));
        }
    }
    for idx in 0..n {
        let mut slot = group.lock(idx);
        if let Err(message) = group.ensure_vm(idx, &mut slot, true) {
            return Err(PluginError::Instantiate {
                plugin: config.name.clone(),
                message,
            });
        }
    }
    Ok(group)
}
