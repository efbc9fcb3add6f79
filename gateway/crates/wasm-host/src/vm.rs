//! One VM: a wasmtime store and instance of a module, its callbacks, and guarded guest calls.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::{Instance, InstancePre, Store, Trap, TypedFunc, WasmParams, WasmResults};

use crate::metrics::PluginStats;
use crate::state::{HostState, Phase, RootSpec, VmShared};

/// The error `proc_exit` raises to stop the guest.
#[derive(Debug)]
pub(crate) struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// How a guest call failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// Interrupted at its deadline.
    Interrupted,
    /// The VM hit its memory cap.
    MemoryCap,
    /// Any other trap (message for logs).
    Trap(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Interrupted => f.write_str("callback ran past its deadline"),
            Failure::MemoryCap => f.write_str("VM hit its memory limit"),
            Failure::Trap(m) => write!(f, "trap: {m}"),
        }
    }
}

/// `proxy_on_request_headers` and `proxy_on_response_headers` lost `end_of_stream` in 0.1.0.
#[derive(Clone)]
pub(crate) enum HeadersFn {
    V1(TypedFunc<(i32, i32), i32>),
    V2(TypedFunc<(i32, i32, i32), i32>),
}

/// Five i32 parameters (`proxy_on_http_call_response`).
pub(crate) type I32x5 = (i32, i32, i32, i32, i32);

/// The module's callbacks (absent ones are `None` and behave as if they returned Continue).
#[derive(Clone, Default)]
pub(crate) struct Exports {
    pub context_create: Option<TypedFunc<(i32, i32), ()>>,
    pub vm_start: Option<TypedFunc<(i32, i32), i32>>,
    pub configure: Option<TypedFunc<(i32, i32), i32>>,
    pub tick: Option<TypedFunc<i32, ()>>,
    pub queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    pub done: Option<TypedFunc<i32, i32>>,
    pub log: Option<TypedFunc<i32, ()>>,
    pub delete: Option<TypedFunc<i32, ()>>,
    pub request_headers: Option<HeadersFn>,
    pub request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    pub response_headers: Option<HeadersFn>,
    pub response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    pub http_call_response: Option<TypedFunc<I32x5, ()>>,
    pub grpc_receive: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub grpc_close: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub grpc_initial_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub grpc_trailing_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub new_connection: Option<TypedFunc<i32, i32>>,
    pub downstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub upstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub downstream_close: Option<TypedFunc<(i32, i32), ()>>,
    pub upstream_close: Option<TypedFunc<(i32, i32), ()>>,
}

fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, String> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| format!("export {name} has the wrong signature: {e}")),
    }
}

fn headers_fn(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<HeadersFn>, String> {
    let Some(f) = instance.get_func(&mut *store, name) else {
        return Ok(None);
    };
    if let Ok(t) = f.typed::<(i32, i32, i32), i32>(&*store) {
        return Ok(Some(HeadersFn::V2(t)));
    }
    f.typed::<(i32, i32), i32>(&*store)
        .map(|t| Some(HeadersFn::V1(t)))
        .map_err(|e| format!("export {name} has the wrong signature: {e}"))
}

/// Number of epoch ticks for `d`, at least 1.
pub(crate) fn ticks(d: Duration, tick: Duration) -> u64 {
    let t = tick.as_nanos().max(1);
    (d.as_nanos().div_ceil(t)).clamp(1, u64::MAX as u128) as u64
}

/// A started VM.
pub(crate) struct Vm {
    pub store: Store<HostState>,
    pub exports: Exports,
    pub tick: Duration,
    /// Guest calls made, for sampling their CPU time.
    calls: u32,
    /// The last callback deadline and its length in epoch ticks (the division is not free, and
    /// a VM's callbacks nearly always have the same deadline).
    deadline_ticks: (Duration, u64),
    /// Linear memory size last added to the engine's [`LiveVms`](crate::metrics::LiveVms).
    reported_memory: u64,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let live = &self.store.data().shared.live;
        live.vms.fetch_sub(1, Ordering::Relaxed);
        live.memory_bytes
            .fetch_sub(self.reported_memory, Ordering::Relaxed);
    }
}

/// One guest call in this many has its CPU time measured (a VM's first call included):
/// reading the thread's CPU clock is a system call (no vDSO), too dear for every callback.
/// With three filters, one in 16 cost a request 1.5 such calls.
pub const CPU_SAMPLE_EVERY: u32 = 128;

/// CPU time the calling thread has used (sampled: cold).
#[cold]
#[inline(never)]
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Vm {
    /// Instantiate, find the memory, allocator and callbacks, and run the start functions.
    pub(crate) fn start(
        pre: &InstancePre<HostState>,
        shared: Arc<VmShared>,
        max_memory: usize,
        startup_deadline: Duration,
        tick: Duration,
    ) -> Result<Vm, String> {
        let engine = pre.module().engine().clone();
        let mut store = Store::new(&engine, HostState::new(shared, max_memory));
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(startup_deadline, tick));
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| describe(&e, store.data().limiter.hit))?;
        let memory = instance.get_memory(&mut store, "memory");
        if memory.is_none() {
            return Err("module exports no memory named \"memory\"".into());
        }
        store.data_mut().memory = memory;
        let alloc = match typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&instance, &mut store, "malloc")?,
        };
        store.data_mut().alloc = alloc;
        let exports = Exports {
            context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            configure: typed(&instance, &mut store, "proxy_on_configure")?,
            tick: typed(&instance, &mut store, "proxy_on_tick")?,
            queue_ready: typed(&instance, &mut store, "proxy_on_queue_ready")?,
            done: typed(&instance, &mut store, "proxy_on_done")?,
            log: typed(&instance, &mut store, "proxy_on_log")?,
            delete: typed(&instance, &mut store, "proxy_on_delete")?,
            request_headers: headers_fn(&instance, &mut store, "proxy_on_request_headers")?,
            request_body: typed(&instance, &mut store, "proxy_on_request_body")?,
            request_trailers: typed(&instance, &mut store, "proxy_on_request_trailers")?,
            response_headers: headers_fn(&instance, &mut store, "proxy_on_response_headers")?,
            response_body: typed(&instance, &mut store, "proxy_on_response_body")?,
            response_trailers: typed(&instance, &mut store, "proxy_on_response_trailers")?,
            http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response")?,
            grpc_receive: typed(&instance, &mut store, "proxy_on_grpc_receive")?,
            grpc_close: typed(&instance, &mut store, "proxy_on_grpc_close")?,
            grpc_initial_metadata: typed(
                &instance,
                &mut store,
                "proxy_on_grpc_receive_initial_metadata",
            )?,
            grpc_trailing_metadata: typed(
                &instance,
                &mut store,
                "proxy_on_grpc_receive_trailing_metadata",
            )?,
            new_connection: typed(&instance, &mut store, "proxy_on_new_connection")?,
            downstream_data: typed(&instance, &mut store, "proxy_on_downstream_data")?,
            upstream_data: typed(&instance, &mut store, "proxy_on_upstream_data")?,
            downstream_close: typed(
                &instance,
                &mut store,
                "proxy_on_downstream_connection_close",
            )?,
            upstream_close: typed(&instance, &mut store, "proxy_on_upstream_connection_close")?,
        };
        if exports.context_create.is_none() {
            return Err("module exports no proxy_on_context_create".into());
        }
        // Start functions: _initialize, then main(0, 0); or _start (TinyGo).
        store.data_mut().phase = Phase::Start;
        let ok_exit = |e: wasmtime::Error, hit: bool| -> Result<(), String> {
            match e.downcast_ref::<ProcExit>() {
                Some(ProcExit(0)) => Ok(()),
                _ => Err(describe(&e, hit)),
            }
        };
        if let Some(init) = typed::<(), ()>(&instance, &mut store, "_initialize")? {
            if let Err(e) = init.call(&mut store, ()) {
                ok_exit(e, store.data().limiter.hit)?;
            }
            if let Some(main) = typed::<(i32, i32), i32>(&instance, &mut store, "main")?
                && let Err(e) = main.call(&mut store, (0, 0))
            {
                ok_exit(e, store.data().limiter.hit)?;
            }
        } else if let Some(start) = typed::<(), ()>(&instance, &mut store, "_start")?
            && let Err(e) = start.call(&mut store, ())
        {
            ok_exit(e, store.data().limiter.hit)?;
        }
        store.data_mut().phase = Phase::Running;
        store.data().shared.live.vms.fetch_add(1, Ordering::Relaxed);
        let mut vm = Vm {
            store,
            exports,
            tick,
            calls: 0,
            deadline_ticks: (Duration::ZERO, ticks(Duration::ZERO, tick)),
            reported_memory: 0,
        };
        vm.store.data_mut().limiter.grew = true;
        vm.report_memory();
        Ok(vm)
    }

    /// Publish the linear memory size. It only changes when the guest grows it, which the
    /// limiter notes: without a growth since the last report there is nothing to do.
    fn report_memory(&mut self) {
        let state = self.store.data_mut();
        if !std::mem::take(&mut state.limiter.grew) {
            return;
        }
        let Some(mem) = state.memory else {
            return;
        };
        let size = mem.data_size(&self.store) as u64;
        if size != self.reported_memory {
            let shared = &self.store.data().shared;
            shared.memory_bytes.store(size, Ordering::Relaxed);
            let live = &shared.live.memory_bytes;
            live.fetch_add(size, Ordering::Relaxed);
            live.fetch_sub(self.reported_memory, Ordering::Relaxed);
            self.reported_memory = size;
        }
    }

    /// Call `f` under `deadline`, counting it in `stats`; classify a failure.
    pub(crate) fn guarded<R>(
        &mut self,
        deadline: Duration,
        stats: &PluginStats,
        f: impl FnOnce(&Exports, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        if self.deadline_ticks.0 != deadline {
            self.deadline_ticks = (deadline, ticks(deadline, self.tick));
        }
        self.store.set_epoch_deadline(self.deadline_ticks.1);
        self.store.data_mut().limiter.hit = false;
        self.calls = self.calls.wrapping_add(1);
        let sampled = self.calls % CPU_SAMPLE_EVERY == 1;
        let started = sampled.then(thread_cpu_time);
        let r = f(&self.exports, &mut self.store);
        stats.callbacks.add(1);
        if let Some(started) = started {
            let used = thread_cpu_time().saturating_sub(started);
            stats.callback_cpu_nanos.record(used.as_nanos() as u64);
        }
        self.report_memory();
        r.map_err(|e| self.failure(&e, stats))
    }

    /// Classify a failed guest call and count it.
    #[cold]
    #[inline(never)]
    fn failure(&self, e: &wasmtime::Error, stats: &PluginStats) -> Failure {
        let failure = classify(e, self.store.data().limiter.hit);
        match &failure {
            Failure::Interrupted => stats.interruptions.fetch_add(1, Ordering::Relaxed),
            Failure::MemoryCap => stats.memory_cap_hits.fetch_add(1, Ordering::Relaxed),
            Failure::Trap(_) => stats.traps.fetch_add(1, Ordering::Relaxed),
        };
        failure
    }

    /// Create root context `spec` in this VM: `on_context_create(id, 0)`, `on_vm_start`,
    /// `on_configure`. Returns which step failed and why.
    pub(crate) fn create_root(
        &mut self,
        spec: &Arc<RootSpec>,
    ) -> Result<(), (RootFailure, String)> {
        let id = spec.context_id as i32;
        let deadline = spec.limits.startup_deadline;
        let state = self.store.data_mut();
        state.roots.insert(spec.context_id, spec.clone());
        state.effective = spec.context_id;
        state.phase = Phase::Running;
        let r = self.guarded(deadline, &spec.stats, |ex, store| {
            if let Some(f) = &ex.context_create {
                f.call(&mut *store, (id, 0))?;
            }
            let vm_config_len = store.data().shared.vm_configuration.len() as i32;
            store.data_mut().phase = Phase::VmStart;
            let started = match &ex.vm_start {
                Some(f) => f.call(&mut *store, (id, vm_config_len))?,
                None => 1,
            };
            if started == 0 {
                store.data_mut().phase = Phase::Running;
                return Ok(Err(RootFailure::VmStart));
            }
            store.data_mut().effective = id as u32;
            store.data_mut().phase = Phase::Configure;
            let config_len = spec.configuration.len() as i32;
            let configured = match &ex.configure {
                Some(f) => f.call(&mut *store, (id, config_len))?,
                None => 1,
            };
            store.data_mut().phase = Phase::Running;
            if configured == 0 {
                return Ok(Err(RootFailure::Configure));
            }
            Ok(Ok(()))
        });
        self.store.data_mut().phase = Phase::Running;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(step)) => {
                self.store.data_mut().roots.remove(&spec.context_id);
                Err((step, String::new()))
            }
            Err(f) => Err((RootFailure::Trap, f.to_string())),
        }
    }
}

/// Which step of root-context creation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootFailure {
    VmStart,
    Configure,
    Trap,
}

pub(crate) fn classify(e: &wasmtime::Error, memory_cap_hit: bool) -> Failure {
    if memory_cap_hit {
        return Failure::MemoryCap;
    }
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return Failure::Interrupted;
    }
    Failure::Trap(format!("{e:#}"))
}

fn describe(e: &wasmtime::Error, hit: bool) -> String {
    match classify(e, hit) {
        Failure::Trap(m) => m,
        other => other.to_string(),
    }
}
