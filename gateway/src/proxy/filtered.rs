//! A request whose listener or route has proxy-wasm filters: the request headers (and body) go
//! through the chain before routing decisions are final, the response comes back through it in
//! reverse, and a filter may answer locally at any point. See `filter::chain` for the rules.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::sync::Mutex;
use weir_wasm_host::{RequestHead, StreamInfo, TlsInfo};

use super::logged_body::Finish;
use super::service::{ConnInfo, authority, find_route, is_upgrade, run_action};
use crate::body::{BoxError, ProxyBody, incoming};
use crate::error::ProxyError;
use crate::filter::Link;
use crate::filter::chain::{self, FilterReset, RequestVerdict, ResponseVerdict};
use crate::route::matcher::normalize_host;
use crate::route::table::Route;
use crate::snapshot::Snapshot;

/// Serve a request through the filter chain `links` (listener filters, then route filters).
pub async fn serve(
    snapshot: &Snapshot,
    conn: &Arc<ConnInfo>,
    route: Arc<Route>,
    mut req: Request<Incoming>,
    mut finish: Finish,
    links: &[&Link],
) -> Result<Response<ProxyBody>, BoxError> {
    let host = normalize_host(authority(&req)).into_owned();
    let info = Arc::new(StreamInfo {
        source: Some(conn.remote),
        destination: Some(conn.local),
        connection_id: conn.id,
        tls: conn.tls.then(|| TlsInfo {
            sni: conn.sni.clone(),
            ..Default::default()
        }),
        route_name: route.name.to_string(),
        cluster_name: String::new(),
        listener_name: conn.listener.to_string(),
        virtual_host_name: String::new(),
        request_id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        start_time: std::time::SystemTime::now(),
        protocol: req.version(),
    });
    let streams: Vec<_> = links
        .iter()
        .map(|l| l.resolve(&route.name, &host).new_stream(info.clone()))
        .collect();
    let streams = Arc::new(Mutex::new(streams));
    finish.filters = Some(streams.clone());

    let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let mut head = Arc::new(RequestHead {
        method: parts.method.clone(),
        scheme: if conn.tls { "https" } else { "http" }.to_string(),
        authority: authority_of(&parts),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: std::mem::take(&mut parts.headers),
    });
    // A filter may pause and wait (callouts, or for another context to resume it): the route's
    // timeout bounds that wait.
    let verdict = match route.timeout {
        Some(t) => {
            match tokio::time::timeout(t, chain::on_request(&streams, &mut head, incoming(body)))
                .await
            {
                Ok(v) => v?,
                Err(_) => {
                    let e = ProxyError::Timeout;
                    return Ok(finish.local(e.into_response(), e.flag(), "filter_request_timeout"));
                }
            }
        }
        None => chain::on_request(&streams, &mut head, incoming(body)).await?,
    };
    let body = match verdict {
        RequestVerdict::Forward(body) => body,
        RequestVerdict::Reply(resp, details) => return Ok(finish.local(resp, "", details)),
        RequestVerdict::Reset => return Err(Box::new(FilterReset)),
    };

    // The filters may have changed the request: rebuild it from their view (the streams keep
    // theirs, so this copies the head when there are filters).
    let head = Arc::unwrap_or_clone(head);
    parts.method = head.method;
    parts.headers = head.headers;
    if !body.is_end_stream() {
        // The filters may change the body's length.
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::TRANSFER_ENCODING);
    }
    let uri = if parts.uri.authority().is_some() {
        format!("{}://{}{}", head.scheme, head.authority, head.path)
    } else {
        head.path.clone()
    };
    parts.uri = match uri.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => {
            let e = ProxyError::BadRequest("a filter set an invalid :path");
            return Ok(finish.local(e.into_response(), e.flag(), e.details()));
        }
    };
    if parts.uri.authority().is_none()
        && let Ok(v) = HeaderValue::from_str(&head.authority)
    {
        parts.headers.insert(header::HOST, v);
    }
    let req = Request::from_parts(parts, body);

    // Modified request headers clear the route cache: route again (Envoy's clearRouteCache).
    let cleared = streams.lock().await.iter().any(|s| s.route_cache_cleared());
    let route = if cleared {
        match find_route(snapshot, conn, &req) {
            Some(r) => r,
            None => {
                let e = ProxyError::NoRoute;
                return Ok(finish.local(e.into_response(), e.flag(), e.details()));
            }
        }
    } else {
        route
    };
    finish.route = Some(route.clone());

    let answer = run_action(&route, conn, req, upgrade, &mut finish).await;
    if let Some(cluster) = &finish.cluster {
        chain::set_upstream(&streams, cluster, finish.upstream).await;
    }
    match chain::on_response(&streams, answer.response).await {
        ResponseVerdict::Send(resp) => Ok(match answer.local {
            Some((flag, details)) => finish.local(resp, flag, details),
            None => finish.upstream_response(resp),
        }),
        ResponseVerdict::Reply(resp, details) => Ok(finish.local(resp, "", details)),
        ResponseVerdict::Reset => Err(Box::new(FilterReset)),
    }
}

fn authority_of(parts: &http::request::Parts) -> String {
    match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string(),
    }
}
