//! Listeners: accept TCP connections, read the PROXY header, terminate TLS, and serve HTTP/1.1,
//! HTTP/2 (ALPN) and h2c with the listener's limits, or hand the connection to the TCP proxy
//! (`protocol: tcp`, `proxy/tcp.rs`). Listeners are added, removed and changed on reload
//! without touching connections already open (each keeps the config it was accepted with).
//!
//! Every worker thread (`workers.rs`) accepts on every listener's socket; each connection is
//! served by the worker with the fewest open connections (the accepting one hands it over if
//! another has fewer), from start to end on that thread.

pub mod h1_guard;
pub mod proxy_protocol;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Shared;
use crate::proxy::service::{ConnInfo, serve};
use crate::snapshot::{Limits, ListenerSpec};
use h1_guard::{GuardStats, H1Guard};

/// A running listener.
struct Running {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
}

/// The set of running listeners.
#[derive(Default)]
pub struct Listeners {
    running: HashMap<Arc<str>, Running>,
}

/// Binding a listener failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for listener `{name}`: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address.
    pub address: SocketAddr,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Bind a TCP listener with `SO_REUSEADDR`, non-blocking, for tokio.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

impl Listeners {
    /// Bind the listeners of `specs` that are not running yet (or whose address changed).
    /// Nothing changes if any bind fails.
    pub fn prepare(
        &self,
        specs: &[ListenerSpec],
    ) -> Result<Vec<(ListenerSpec, std::net::TcpListener)>, BindError> {
        let mut bound = Vec::new();
        for spec in specs {
            let keep = self
                .running
                .get(&spec.name)
                .is_some_and(|r| r.configured == spec.address);
            if keep {
                continue;
            }
            // Changing a listener's port to one that another of ours holds: let the old one go first
            // is not possible atomically; report it.
            // The workers' runtimes register the socket themselves: hand it over unregistered.
            let listener =
                bind(spec.address)
                    .and_then(TcpListener::into_std)
                    .map_err(|source| BindError {
                        name: spec.name.to_string(),
                        address: spec.address,
                        source,
                    })?;
            bound.push((spec.clone(), listener));
        }
        Ok(bound)
    }

    /// Start newly bound listeners (an accept loop on every worker) and stop those no longer
    /// configured.
    pub fn apply(
        &mut self,
        shared: &Arc<Shared>,
        specs: &[ListenerSpec],
        bound: Vec<(ListenerSpec, std::net::TcpListener)>,
    ) {
        self.running.retain(|name, r| {
            let keep = specs
                .iter()
                .any(|s| &s.name == name && s.address == r.configured);
            if !keep {
                let _ = r.stop.send(true);
                tracing::info!(listener = %name, "listener stopped");
            }
            keep
        });
        for (spec, listener) in bound {
            let bound_addr = listener.local_addr().unwrap_or(spec.address);
            let (stop, stopped) = watch::channel(false);
            tracing::info!(listener = %spec.name, address = %bound_addr, tls = spec.tls.is_some(), "listening");
            let active = Arc::new(AtomicUsize::new(0));
            for (worker, handle) in shared.workers.handles().iter().enumerate() {
                let socket = match listener.try_clone() {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::error!(listener = %spec.name, worker, error = %e, "cannot share the listening socket with a worker");
                        continue;
                    }
                };
                handle.spawn(accept_loop(
                    Arc::downgrade(shared),
                    spec.name.clone(),
                    socket,
                    active.clone(),
                    stopped.clone(),
                ));
            }
            self.running.insert(
                spec.name.clone(),
                Running {
                    configured: spec.address,
                    bound: bound_addr,
                    stop,
                },
            );
        }
    }

    /// The bound address of a listener (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.running.get(name).map(|r| r.bound)
    }

    /// Stop accepting everywhere.
    pub fn stop_all(&mut self) {
        for r in self.running.values() {
            let _ = r.stop.send(true);
        }
        self.running.clear();
    }
}

/// Accept connections on one worker and serve them there. Holds the gateway weakly, so a
/// gateway that is dropped stops its workers.
async fn accept_loop(
    shared: std::sync::Weak<Shared>,
    name: Arc<str>,
    socket: std::net::TcpListener,
    active: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %name, error = %e, "cannot accept on this worker");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let snapshot = shared.snapshot.load();
        let Some(spec) = snapshot.listener(&name).cloned() else {
            continue;
        };
        drop(snapshot);
        let g = &shared.registry.global;
        if active.load(Ordering::Relaxed) >= spec.limits.max_connections {
            g.downstream_connections_overflow
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        // Envoy's exact balance: a connection goes to the worker with the fewest open ones, so
        // a few long-lived connections (a cloud load balancer's) do not pile up on one worker.
        let here = crate::workers::current();
        let target = here.and_then(|me| less_loaded_worker(&shared, me));
        let guard = ConnCount::new(active.clone(), shared.clone(), target.or(here));
        let handle = target.map(|t| shared.workers.handles()[t].clone());
        let listener_stopped = stop.clone();
        let serve = move |stream: TcpStream| async move {
            let _guard = guard;
            if let Err(e) = handle_connection(shared, spec, stream, remote, listener_stopped).await
            {
                tracing::debug!(error = %e, "connection ended with error");
            }
        };
        let Some(handle) = handle else {
            tokio::spawn(serve(stream));
            continue;
        };
        match stream.into_std() {
            Ok(moved) => {
                handle.spawn(async move {
                    match TcpStream::from_std(moved) {
                        Ok(stream) => serve(stream).await,
                        Err(e) => tracing::debug!(error = %e, "cannot move a connection"),
                    }
                });
            }
            Err(e) => tracing::debug!(error = %e, "cannot move a connection"),
        }
    }
}

/// The worker with the fewest open connections, if it has fewer than worker `me` (on a tie the
/// connection stays where it was accepted).
fn less_loaded_worker(shared: &Shared, me: usize) -> Option<usize> {
    let open = |i| {
        shared
            .registry
            .worker(i)
            .map_or(0, |w| w.connections_active.load(Ordering::Relaxed))
    };
    let mine = open(me);
    let (least, fewest) = (0..shared.workers.count())
        .map(|i| (i, open(i)))
        .min_by_key(|&(_, n)| n)?;
    (fewest < mine).then_some(least)
}

/// Counts an open connection in its listener, the gateway and its worker while it lives.
struct ConnCount {
    listener: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    worker: Option<usize>,
}

impl ConnCount {
    fn new(listener: Arc<AtomicUsize>, shared: Arc<Shared>, worker: Option<usize>) -> ConnCount {
        listener.fetch_add(1, Ordering::Relaxed);
        let registry = &shared.registry;
        registry
            .global
            .downstream_connections
            .fetch_add(1, Ordering::Relaxed);
        registry
            .global
            .downstream_connections_active
            .fetch_add(1, Ordering::Relaxed);
        if let Some(w) = worker.and_then(|i| registry.worker(i)) {
            w.connections.fetch_add(1, Ordering::Relaxed);
            w.connections_active.fetch_add(1, Ordering::Relaxed);
        }
        ConnCount {
            listener,
            shared,
            worker,
        }
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.listener.fetch_sub(1, Ordering::Relaxed);
        let registry = &self.shared.registry;
        registry
            .global
            .downstream_connections_active
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(w) = self.worker.and_then(|i| registry.worker(i)) {
            w.connections_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serve one downstream connection until it ends, the gateway shuts down, or its listener is
/// removed (then in-flight requests finish and the connection closes, as Envoy drains).
async fn handle_connection(
    shared: Arc<Shared>,
    spec: ListenerSpec,
    mut stream: TcpStream,
    peer: SocketAddr,
    listener_stopped: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let limits = spec.limits.clone();
    let mut remote = peer;
    if spec.proxy_protocol {
        let header = tokio::time::timeout(
            limits.request_header_timeout,
            proxy_protocol::read_header(&mut stream),
        )
        .await??;
        if let Some(addr) = header {
            remote = addr;
        }
    }
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if let Some(tcp) = spec.tcp.clone() {
        let downstream = crate::proxy::tcp::Downstream { id, remote, local };
        return crate::proxy::tcp::serve(shared, spec, tcp, stream, downstream, listener_stopped)
            .await;
    }
    let mut conn = ConnInfo {
        id,
        client_ip_value: http::HeaderValue::from_str(&remote.ip().to_string())
            .expect("an IP is a valid header value"),
        remote,
        local,
        listener: spec.name.clone(),
        tls: spec.tls.is_some(),
        sni: None,
        allow_underscores: limits.allow_underscores_in_headers,
        active_requests: std::sync::atomic::AtomicUsize::new(0),
        last_activity_ms: std::sync::atomic::AtomicU64::new(crate::upstream::endpoint::now_ms()),
    };
    let guard_stats = Arc::new(GuardStats::default());
    let head_limit = limits.max_request_headers_bytes.max(8192);
    let result = match &spec.tls {
        None => {
            // HTTP/1.1 or h2c prior knowledge: the guard passes the HTTP/2 preface through.
            let io = H1Guard::new(stream, guard_stats.clone()).max_head_bytes(head_limit);
            serve_http(
                shared.clone(),
                Arc::new(conn),
                TokioIo::new(io),
                &limits,
                None,
                listener_stopped,
            )
            .await
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let tls_stream =
                tokio::time::timeout(limits.request_header_timeout, acceptor.accept(stream))
                    .await??;
            let (_, session) = tls_stream.get_ref();
            conn.sni = session.server_name().map(str::to_string);
            let h2 = session.alpn_protocol() == Some(b"h2");
            let conn = Arc::new(conn);
            if h2 {
                serve_http(
                    shared.clone(),
                    conn,
                    TokioIo::new(tls_stream),
                    &limits,
                    Some(true),
                    listener_stopped,
                )
                .await
            } else {
                let io = H1Guard::new(tls_stream, guard_stats.clone()).max_head_bytes(head_limit);
                serve_http(
                    shared.clone(),
                    conn,
                    TokioIo::new(io),
                    &limits,
                    Some(false),
                    listener_stopped,
                )
                .await
            }
        }
    };
    if let Some(reason) = guard_stats.reason() {
        shared
            .registry
            .global
            .downstream_protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%remote, reason, "malformed HTTP/1 request: 400 and close");
    }
    result
}

/// Serve HTTP on an established (possibly TLS) connection with the listener's limits.
/// `alpn_h2`: `Some(true)` when TLS negotiated h2, `Some(false)` for HTTP/1.1 over TLS, `None` on
/// plain TCP (HTTP/1.1 or h2c prior knowledge, detected from the preface).
async fn serve_http<I>(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    io: I,
    limits: &Limits,
    alpn_h2: Option<bool>,
    mut listener_stopped: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_header_timeout)
        .max_buf_size(limits.max_request_headers_bytes.max(8192))
        .max_headers(limits.max_request_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_request_headers_bytes as u32)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(Some(std::time::Duration::from_secs(60)))
        .enable_connect_protocol();
    match alpn_h2 {
        Some(true) => builder = builder.http2_only(),
        Some(false) => builder = builder.http1_only(),
        None => {}
    }
    let mut shutdown = shared.shutdown.subscribe();
    let conn_for_idle = conn.clone();
    let service = service_fn(move |req| serve(shared.clone(), conn.clone(), req));
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    tokio::select! {
        r = connection.as_mut() => r,
        _ = crate::flag_set(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        _ = idle(&conn_for_idle, limits.idle_timeout) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        _ = crate::flag_set(&mut listener_stopped) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// Resolves once the connection has had no request in flight for `timeout`.
async fn idle(conn: &ConnInfo, timeout: std::time::Duration) {
    loop {
        match conn.idle_for(timeout) {
            Ok(()) => return,
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
}
