//! Built-in demo backends: tiny HTTP servers that Weir runs on loopback when a config declares
//! `demo_backends`, so that the quickstart needs no other process. They answer every request
//! with their configured status and body.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::Shared;
use crate::snapshot::DemoSpec;

/// Running demo backends.
#[derive(Default)]
pub struct DemoBackends {
    running: Vec<(DemoSpec, watch::Sender<bool>)>,
}

impl DemoBackends {
    /// Start new or changed demo backends and stop removed ones.
    pub async fn apply(&mut self, specs: &[DemoSpec], shared: &Arc<Shared>) {
        self.running.retain(|(spec, stop)| {
            let keep = specs.contains(spec);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for spec in specs {
            if self.running.iter().any(|(s, _)| s == spec) {
                continue;
            }
            // The old server on this address (if the body changed) was stopped above; its socket
            // may take a moment to close.
            let mut listener = None;
            for _ in 0..50 {
                match crate::listener::bind(spec.address) {
                    Ok(l) => {
                        listener = Some(l);
                        break;
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
            let Some(listener) = listener else {
                tracing::error!(demo = %spec.name, address = %spec.address, "cannot start demo backend: address in use");
                continue;
            };
            let (stop, stopped) = watch::channel(false);
            tracing::info!(demo = %spec.name, address = %spec.address, "demo backend serving");
            tokio::spawn(serve(
                spec.clone(),
                listener,
                stopped,
                shared.shutdown.subscribe(),
            ));
            self.running.push((spec.clone(), stop));
        }
    }

    /// Stop every demo backend.
    pub fn stop_all(&mut self) {
        for (_, stop) in &self.running {
            let _ = stop.send(true);
        }
        self.running.clear();
    }
}

async fn serve(
    spec: DemoSpec,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let body = Bytes::from(format!("{}\n", spec.body));
    let status = http::StatusCode::from_u16(spec.status).unwrap_or(http::StatusCode::OK);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::flag_set(&mut stop) => return,
            _ = crate::flag_set(&mut shutdown) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut r = Response::new(http_body_util::Full::new(body));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
