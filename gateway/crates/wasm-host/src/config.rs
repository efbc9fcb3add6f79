//! Configuration of the engine and of plugins.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the on-disk compile cache (precompiled modules keyed by a hash of the module
    /// bytes, the wasmtime version and the compiler settings). `None` (the default) compiles
    /// every module in memory only (still cached in memory by sha256 for the engine's lifetime).
    pub cache_dir: Option<PathBuf>,
    /// How often the epoch ticker thread bumps the epoch. Default 2 ms. Callback deadlines are
    /// rounded up to a whole number of ticks.
    pub epoch_tick: Duration,
    /// VM replicas per (module, vm_id, vm configuration). Default: the number of CPUs (the
    /// gateway sets its worker count). Each replica is driven by one request at a time.
    pub replicas: usize,
    /// Which replica a new stream runs in. Default [`ReplicaChoice::PerThread`].
    pub replica_choice: ReplicaChoice,
}

/// How a new stream picks the VM replica it runs in (and keeps for its whole life).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaChoice {
    /// Envoy's model: each thread that starts streams is given its own replica (the thread
    /// numbered `n` by [`crate::set_stream_thread_number`], else the `n`-th thread to start a
    /// stream, takes replica `n % replicas`), so with one replica per worker thread a
    /// worker never waits for another's VM and keeps its VM's memory in its own cache. While
    /// that replica's VM is gone (it failed and waits for its restart backoff), the thread's
    /// streams use the next replica that has a VM.
    #[default]
    PerThread,
    /// Streams take the replicas in turn, whatever thread they start on.
    RoundRobin,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            epoch_tick: Duration::from_millis(2),
            replicas: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            replica_choice: ReplicaChoice::default(),
        }
    }
}

/// What happens to a request when the filter fails (trap, deadline, memory cap) or its VM is
/// unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailPolicy {
    /// Fail the request with a 503 local reply whose details are `wasm_fail_stream` (Envoy's
    /// default). The VM is recreated on a later request, rate-limited with backoff.
    #[default]
    Closed,
    /// Go on as if the filter were not in the chain for the rest of this request.
    Open,
    /// Like `Closed` for the request in hand; the VM is recreated right away (for the first
    /// failure in a row; repeated failures wait for the restart backoff).
    Reload,
}

/// Resource limits of one plugin's VMs and streams.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum linear memory of one VM replica, in bytes. Default 64 MiB. A `memory.grow` past it
    /// fails (the Rust SDK then aborts, which traps).
    pub memory_bytes: usize,
    /// Deadline of one guest callback (wall time measured by epochs). Default 100 ms. A callback
    /// running past it is interrupted and counts as a failure.
    pub callback_deadline: Duration,
    /// Deadline of VM start-up (`_initialize`/`main`/`_start`, `on_vm_start`, `on_configure`).
    /// Default 1 s.
    pub startup_deadline: Duration,
    /// Maximum body bytes buffered for a filter that pauses on body chunks. Default 1 MiB. Past it
    /// the request fails with 413 (request body) or 500 (response body), as Envoy does.
    pub body_buffer_bytes: usize,
    /// Base delay before a failed VM replica is recreated; doubled for each consecutive failure
    /// up to `max_restart_backoff`. Default 100 ms (`FailPolicy::Reload` recreates the first time
    /// without waiting).
    pub restart_backoff: Duration,
    /// Cap of the recreation backoff. Default 10 s.
    pub max_restart_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            callback_deadline: Duration::from_millis(100),
            startup_deadline: Duration::from_secs(1),
            body_buffer_bytes: 1 << 20,
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_secs(10),
        }
    }
}

/// One plugin: a module, its VM identity and its root context's configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Plugin name (the `plugin_name` property, the `plugin` label of stats).
    pub name: String,
    /// Root id (`plugin_root_id`): selects the root context in modules with several.
    pub root_id: String,
    /// VM id: plugins with the same module, vm_id and VM configuration share VMs (and so shared
    /// data and queues, which are keyed by vm_id process-wide).
    pub vm_id: String,
    /// The module bytes (binary wasm).
    pub module: Arc<[u8]>,
    /// VM configuration (buffer 6, readable in `on_vm_start`).
    pub vm_configuration: Bytes,
    /// Plugin configuration (buffer 7, readable in `on_configure`).
    pub configuration: Bytes,
    /// Failure policy.
    pub fail: FailPolicy,
    /// Limits.
    pub limits: Limits,
    /// Run the plugin as Envoy would: `proxy_call_foreign_function` answers `NOT_FOUND` for
    /// every name (Weir's `weir_get_properties`, `weir_rate_limit` and the `HostEnv`'s), so a
    /// filter's portable fallback is what runs. For checking, in Weir, that a filter behaves
    /// the same in Envoy and Istio. Default `false`.
    pub portable: bool,
}

impl PluginConfig {
    /// A configuration with the defaults: empty root id, vm_id and configurations,
    /// `FailPolicy::Closed`, default limits, not portable.
    pub fn new(name: impl Into<String>, module: impl Into<Arc<[u8]>>) -> Self {
        Self {
            name: name.into(),
            root_id: String::new(),
            vm_id: String::new(),
            module: module.into(),
            vm_configuration: Bytes::new(),
            configuration: Bytes::new(),
            fail: FailPolicy::Closed,
            limits: Limits::default(),
            portable: false,
        }
    }
}
