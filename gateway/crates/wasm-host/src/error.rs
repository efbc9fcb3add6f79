//! Errors of the host library.

/// Why a plugin (or a per-route instance of it) could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The module does not compile (not wasm, or uses features the engine lacks).
    #[error("plugin {plugin}: module does not compile: {message}")]
    Compile {
        /// Plugin name.
        plugin: String,
        /// The compiler's message.
        message: String,
    },
    /// The module exports no `proxy_abi_version_*` marker.
    #[error(
        "plugin {plugin}: module exports no proxy-wasm ABI marker (proxy_abi_version_0_2_1, _0_2_0 or _0_1_0); is it a proxy-wasm filter?"
    )]
    NoAbiMarker {
        /// Plugin name.
        plugin: String,
    },
    /// The module imports functions the host does not provide.
    #[error("plugin {plugin}: module imports unknown functions: {imports:?}")]
    UnknownImports {
        /// Plugin name.
        plugin: String,
        /// `module.name` of each unknown import.
        imports: Vec<String>,
    },
    /// Instantiation or the start functions failed (trap, memory limit, bad export types).
    #[error("plugin {plugin}: VM start failed: {message}")]
    Instantiate {
        /// Plugin name.
        plugin: String,
        /// What failed.
        message: String,
    },
    /// `proxy_on_vm_start` returned false.
    #[error("plugin {plugin}: proxy_on_vm_start returned false (VM configuration rejected)")]
    VmStartRejected {
        /// Plugin name.
        plugin: String,
    },
    /// `proxy_on_configure` returned false.
    #[error("plugin {plugin}: proxy_on_configure returned false (plugin configuration rejected)")]
    ConfigureRejected {
        /// Plugin name.
        plugin: String,
    },
    /// A callback during start-up trapped or ran past its deadline.
    #[error("plugin {plugin}: {callback} failed: {message}")]
    Callback {
        /// Plugin name.
        plugin: String,
        /// Which callback.
        callback: &'static str,
        /// What failed.
        message: String,
    },
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// Why an HTTP callout or a gRPC stream failed (returned by [`crate::HostEnv::http_call`] and
/// [`crate::HostEnv::grpc_stream`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No such cluster.
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    /// The callout timed out.
    #[error("callout timed out")]
    Timeout,
    /// The upstream reset the stream or could not be reached.
    #[error("callout failed: {0}")]
    Reset(String),
    /// The environment cannot do this kind of call (e.g. gRPC streams to a cluster that does not
    /// speak HTTP/2, or an environment without a gRPC stream client).
    #[error("unsupported: {0}")]
    Unsupported(String),
}
