//! Weir: a WebAssembly-extensible API gateway.
//!
//! The library builds a running gateway from a config file: listeners, the route table (one
//! `ArcSwap<Snapshot>` that every request loads once), upstream clusters, the admin listener and
//! the built-in demo backends. `main.rs` only parses the command line. See `ARCHITECTURE.md` for
//! the request's path through the modules.

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod filter;
pub mod listener;
pub mod proxy;
pub mod ratelimit;
pub mod route;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, watch};

use config::ConfigErrors;
use snapshot::Snapshot;
use telemetry::metrics::Registry;

/// State shared by every connection and request.
pub struct Shared {
    /// The snapshot in force. Requests `load_full()` it once.
    pub snapshot: ArcSwap<Snapshot>,
    /// Metrics.
    pub registry: Arc<Registry>,
    /// Set to `true` to start graceful shutdown.
    pub shutdown: watch::Sender<bool>,
    config_path: PathBuf,
    /// The file contents last loaded or rejected, so the watcher reacts to changes only.
    last_source: std::sync::Mutex<String>,
    /// The wasm engine, created when a config first declares plugins.
    engine: std::sync::OnceLock<weir_wasm_host::Engine>,
    /// The worker threads that serve the listeners' connections.
    pub workers: workers::Workers,
    /// The admin listener's bound address.
    admin_bound: std::sync::Mutex<Option<SocketAddr>>,
    /// Serializes reloads and owns the running listeners and demo backends.
    control: Mutex<Control>,
}

struct Control {
    listeners: listener::Listeners,
    admin: admin::AdminListener,
    demos: demo::DemoBackends,
}

/// Why the gateway could not start: the same reasons a reload is rejected for.
pub type StartError = ReloadError;

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Load `config_path`, bind everything it declares and start serving on one worker thread
    /// per CPU ([`workers::default_count`]).
    pub async fn start(config_path: impl AsRef<Path>) -> Result<Gateway, StartError> {
        Gateway::start_with_workers(config_path, workers::default_count()).await
    }

    /// As [`Gateway::start`], with `workers` worker threads (at least one). Must run inside a
    /// tokio runtime, which keeps the control tasks: admin, reloads, health checks, DNS.
    pub async fn start_with_workers(
        config_path: impl AsRef<Path>,
        workers: usize,
    ) -> Result<Gateway, StartError> {
        let config_path = config_path.as_ref().to_path_buf();
        let source = config::read_file(&config_path)?;
        let checked = config::check_source(&config_path, &source)?;
        let registry = Arc::new(Registry::default());
        registry.set_workers(workers.max(1));
        let (shutdown, _) = watch::channel(false);
        let workers = workers::Workers::start(workers).map_err(ReloadError::Workers)?;
        let shared = Arc::new(Shared {
            workers,
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            registry: registry.clone(),
            shutdown,
            config_path,
            last_source: std::sync::Mutex::new(source),
            admin_bound: std::sync::Mutex::new(None),
            engine: std::sync::OnceLock::new(),
            control: Mutex::new(Control {
                listeners: listener::Listeners::default(),
                admin: admin::AdminListener::default(),
                demos: demo::DemoBackends::default(),
            }),
        });
        {
            let mut control = shared.control.lock().await;
            shared.load(&mut control, checked).await?;
        }
        if shared.snapshot.load().watch {
            tokio::spawn(watch_file(Arc::downgrade(&shared)));
        }
        Ok(Gateway { shared })
    }

    /// Shared state (for tests and embedding).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The bound address of a listener.
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.control.lock().await.listeners.local_addr(name)
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self.shared.admin_bound.lock().expect("admin lock")
    }

    /// Reload the config file now.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        self.shared.reload().await
    }

    /// Run until SIGTERM/SIGINT, reloading on SIGHUP, then drain gracefully.
    pub async fn run_until_signal(self) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        match self.reload().await {
                            Ok(v) => tracing::info!(version = v, "config reloaded on SIGHUP"),
                            Err(e) => tracing::error!("config reload rejected:\n{e}"),
                        }
                    }
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        self.shutdown().await;
    }

    /// Stop accepting, let in-flight requests finish (up to the drain timeout), then return.
    pub async fn shutdown(self) {
        let drain = self.shared.snapshot.load().drain_timeout;
        tracing::info!(?drain, "draining");
        self.shared.control.lock().await.listeners.stop_all();
        let _ = self.shared.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        while self
            .shared
            .registry
            .global
            .downstream_connections_active
            .load(Ordering::Relaxed)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.control.lock().await.demos.stop_all();
    }
}

/// Why a reload was rejected; the previous config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A new listener could not be bound.
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    /// The admin listener could not be bound.
    #[error("cannot listen on {0} for the admin listener: {1}")]
    Admin(SocketAddr, std::io::Error),
    /// The worker threads could not be started.
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

impl Shared {
    /// The wasm engine (one per process), with its compile cache under `cache_dir`.
    fn engine(&self, cache_dir: &Path) -> Result<&weir_wasm_host::Engine, ConfigErrors> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let config = weir_wasm_host::EngineConfig {
            cache_dir: Some(cache_dir.join("wasm")),
            replicas: self.workers.count(),
            ..Default::default()
        };
        let engine = weir_wasm_host::Engine::new(config).map_err(|e| {
            ConfigErrors(vec![config::ConfigError {
                file: String::new(),
                line: 0,
                column: 0,
                message: format!("wasm engine: {e}"),
            }])
        })?;
        Ok(self.engine.get_or_init(|| engine))
    }

    /// Read, check and compile the config file, then swap it in. On any error nothing changes.
    pub async fn reload(self: &Arc<Self>) -> Result<u64, ReloadError> {
        let mut control = self.control.lock().await;
        let result = self.reload_locked(&mut control).await;
        match &result {
            Ok(_) => self.registry.global.reloads.fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .registry
                .global
                .reload_failures
                .fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn reload_locked(self: &Arc<Self>, control: &mut Control) -> Result<u64, ReloadError> {
        let path = self.config_path.clone();
        let (source, checked) = tokio::task::spawn_blocking(move || {
            let source = config::read_file(&path)?;
            let checked = config::check_source(&path, &source);
            Ok::<_, ConfigErrors>((source, checked))
        })
        .await
        .map_err(|e| {
            ConfigErrors(vec![config::ConfigError {
                file: String::new(),
                line: 0,
                column: 0,
                message: e.to_string(),
            }])
        })??;
        *self.last_source.lock().expect("source lock") = source;
        let checked = checked?;
        self.load(control, checked).await
    }

    /// Bind what the checked config adds, start its clusters, swap the snapshot in, then start
    /// and stop listeners. Nothing changes if binding fails.
    async fn load(
        self: &Arc<Self>,
        control: &mut Control,
        checked: config::compile::Checked,
    ) -> Result<u64, ReloadError> {
        let bound = control.listeners.prepare(checked.listeners())?;
        let admin_addr = checked.admin();
        let admin = control
            .admin
            .prepare(admin_addr)
            .map_err(|e| ReloadError::Admin(admin_addr.unwrap_or(([0, 0, 0, 0], 0).into()), e))?;
        let previous = self.snapshot.load_full();
        let version = previous.version + 1;
        let engine = if checked.has_plugins() {
            Some(self.engine(checked.cache_dir())?)
        } else {
            None
        };
        let snapshot = checked.instantiate(
            &previous,
            &self.registry,
            version,
            engine,
            &Arc::downgrade(self),
            self.workers.count(),
        )?;
        control.demos.apply(&snapshot.demo_backends, self).await;
        let specs = snapshot.listeners.clone();
        self.snapshot.store(Arc::new(snapshot));
        self.registry
            .global
            .config_version
            .store(version, Ordering::Relaxed);
        control.listeners.apply(self, &specs, bound);
        control.admin.apply(self, admin_addr, admin);
        *self.admin_bound.lock().expect("admin lock") = control.admin.local_addr();
        tracing::info!(version, "config loaded");
        Ok(version)
    }
}

/// Reload when the config file's contents change (polled every second).
async fn watch_file(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(s) = shared.upgrade() else { return };
        if *s.shutdown.borrow() {
            return;
        }
        if !s.snapshot.load().watch {
            continue;
        }
        let Ok(now) = std::fs::read_to_string(&s.config_path) else {
            continue;
        };
        if now != *s.last_source.lock().expect("source lock") {
            match s.reload().await {
                Ok(v) => tracing::info!(version = v, "config file changed: reloaded"),
                Err(e) => tracing::error!(
                    "config file changed but the new config is rejected; the previous one keeps serving:\n{e}"
                ),
            }
        }
    }
}

/// Resolves once `flag` is set to `true` (or its sender is gone).
pub async fn flag_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
