//! The admin listener: `/ready`, `/healthz`, `/metrics`, `/config_dump`, `/clusters` and
//! `POST /reload`. Bound to loopback by default; it is not meant for untrusted networks.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;
use crate::body::{ProxyBody, full};
use crate::upstream::endpoint::now_ms;

/// The running admin listener, rebound when its configured address changes on reload.
#[derive(Default)]
pub struct AdminListener {
    configured: Option<std::net::SocketAddr>,
    bound: Option<std::net::SocketAddr>,
    stop: Option<watch::Sender<bool>>,
}

impl AdminListener {
    /// Bind `want` if it differs from the running address (`Ok(None)`: nothing to change).
    pub fn prepare(
        &self,
        want: Option<std::net::SocketAddr>,
    ) -> std::io::Result<Option<TcpListener>> {
        match want {
            Some(addr) if self.configured != want => crate::listener::bind(addr).map(Some),
            _ => Ok(None),
        }
    }

    /// Switch to `want`, serving on `listener` when one was bound by `prepare`.
    pub fn apply(
        &mut self,
        shared: &Arc<Shared>,
        want: Option<std::net::SocketAddr>,
        listener: Option<TcpListener>,
    ) {
        if self.configured == want {
            return;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        self.configured = want;
        self.bound = None;
        if let Some(listener) = listener {
            let (stop, stopped) = watch::channel(false);
            self.bound = listener.local_addr().ok();
            tracing::info!(address = ?self.bound, "admin listening");
            tokio::spawn(serve(shared.clone(), listener, stopped));
            self.stop = Some(stop);
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.bound
    }
}

/// Serve the admin API on `listener` until shutdown or `stopped`.
async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::flag_set(&mut stop) => return,
            _ = crate::flag_set(&mut stopped) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let text = "text/plain; charset=utf-8";
    let json = "application/json";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            if *shared.shutdown.borrow() {
                reply(StatusCode::SERVICE_UNAVAILABLE, text, "DRAINING\n".into())
            } else {
                reply(StatusCode::OK, text, "LIVE\n".into())
            }
        }
        (&Method::GET, "/healthz") => reply(StatusCode::OK, text, "OK\n".into()),
        (&Method::GET, "/metrics") => {
            let mut out = String::with_capacity(16 * 1024);
            shared.registry.render(&mut out);
            render_cluster_gauges(&shared, &mut out);
            render_plugin_metrics(&shared, &mut out);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                out,
            )
        }
        (&Method::GET, "/config_dump") => {
            let s = shared.snapshot.load();
            let body = serde_json::json!({ "version": s.version, "config": s.config_json });
            reply(
                StatusCode::OK,
                json,
                serde_json::to_string_pretty(&body).unwrap_or_default(),
            )
        }
        (&Method::GET, "/clusters") => reply(StatusCode::OK, json, clusters_json(&shared)),
        (&Method::POST, "/reload") => match shared.reload().await {
            Ok(v) => reply(StatusCode::OK, text, format!("reloaded: version {v}\n")),
            Err(e) => reply(StatusCode::BAD_REQUEST, text, format!("{e}\n")),
        },
        (_, "/ready" | "/healthz" | "/metrics" | "/config_dump" | "/clusters" | "/reload") => {
            reply(
                StatusCode::METHOD_NOT_ALLOWED,
                text,
                "method not allowed\n".into(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "admin endpoints: GET /ready /healthz /metrics /config_dump /clusters, POST /reload\n"
                .into(),
        ),
    })
}

fn clusters_json(shared: &Shared) -> String {
    let s = shared.snapshot.load();
    let now = now_ms();
    let clusters: Vec<serde_json::Value> = s
        .clusters
        .values()
        .map(|c| {
            let set = c.endpoint_set();
            let endpoints: Vec<serde_json::Value> = set.groups[0]
                .endpoints
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "address": e.addr.to_string(),
                        "labels": e.labels,
                        "weight": e.weight,
                        "healthy": e.is_healthy(),
                        "ejected": e.is_ejected(now),
                        "times_ejected": e.times_ejected(),
                        "active_requests": e.active_requests(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": &*c.name,
                "endpoints": endpoints,
                "connections": c.connections.open.load(Ordering::Relaxed),
                "active_requests": c.active_requests.load(Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({ "clusters": clusters })).unwrap_or_default()
}

/// Per-plugin host stats (families kept together), the engine's live VMs, and the metrics the
/// filters define.
fn render_plugin_metrics(shared: &Shared, out: &mut String) {
    let snapshot = shared.snapshot.load();
    let stats: Vec<_> = snapshot
        .plugins
        .iter()
        .map(|(name, entry)| (name.as_str(), entry.plugin.stats()))
        .collect();
    weir_wasm_host::render_plugin_stats(&stats, out);
    if let Some(engine) = shared.engine.get() {
        let (vms, bytes) = engine.live_vms();
        let _ = writeln!(
            out,
            "# HELP weir_wasm_vms VM instances alive (old configurations' VMs count until freed).\n\
             # TYPE weir_wasm_vms gauge\nweir_wasm_vms {vms}\n\
             # HELP weir_wasm_vms_memory_bytes Linear memory of the VM instances alive.\n\
             # TYPE weir_wasm_vms_memory_bytes gauge\nweir_wasm_vms_memory_bytes {bytes}"
        );
    }
    weir_wasm_host::render_filter_metrics(out);
}

fn render_cluster_gauges(shared: &Shared, out: &mut String) {
    let s = shared.snapshot.load();
    let now = now_ms();
    let _ = writeln!(
        out,
        "# HELP weir_cluster_upstream_connections Open upstream connections.\n# TYPE weir_cluster_upstream_connections gauge"
    );
    for c in s.clusters.values() {
        let _ = writeln!(
            out,
            "weir_cluster_upstream_connections{{cluster=\"{}\"}} {}",
            crate::telemetry::metrics::escape(&c.name),
            c.connections.open.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP weir_cluster_endpoints Endpoints by state.\n# TYPE weir_cluster_endpoints gauge"
    );
    for c in s.clusters.values() {
        let set = c.endpoint_set();
        let eps = &set.groups[0].endpoints;
        let healthy = eps.iter().filter(|e| e.is_healthy()).count();
        let ejected = eps.iter().filter(|e| e.is_ejected(now)).count();
        let name = crate::telemetry::metrics::escape(&c.name);
        let _ = writeln!(
            out,
            "weir_cluster_endpoints{{cluster=\"{name}\",state=\"total\"}} {}",
            eps.len()
        );
        let _ = writeln!(
            out,
            "weir_cluster_endpoints{{cluster=\"{name}\",state=\"healthy\"}} {healthy}"
        );
        let _ = writeln!(
            out,
            "weir_cluster_endpoints{{cluster=\"{name}\",state=\"ejected\"}} {ejected}"
        );
    }
}
