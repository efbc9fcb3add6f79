//! A request whose listener or route has proxy-wasm filters: the request headers (and body) go
//! through the chain before routing decisions are final, the response comes back through it in
//! reverse, and a filter may answer locally at any point. See `filter::chain` for the rules.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use weir_wasm_host::{RequestHead, StreamInfo, TlsInfo, empty_name, pool};

use super::logged_body::Finish;
use super::response_flags;
use super::service::{ConnInfo, authority, find_route, is_upgrade, run_action};
use crate::body::{BoxError, ProxyBody, incoming};
use crate::error::ProxyError;
use crate::filter::Link;
use crate::filter::chain::{self, FilterReset, RequestVerdict, ResponseVerdict};
use crate::route::matcher::normalize_host;
use crate::route::table::Route;
use crate::snapshot::Snapshot;

/// What the service has found out for a request that goes through filters.
pub struct Filters<'a> {
    /// The listener's filters, which run before the route's.
    pub listener: &'a [Link],
    /// The request's `x-request-id` (`request.id`), as it arrived or as the gateway set it.
    pub request_id: HeaderValue,
}

/// Serve a request through the filter chain: the listener's filters, then the route's.
pub async fn serve(
    snapshot: &Snapshot,
    conn: &Arc<ConnInfo>,
    route: Arc<Route>,
    mut req: Request<Incoming>,
    mut finish: Finish,
    filters: Filters<'_>,
) -> Result<Response<ProxyBody>, BoxError> {
    let links = || filters.listener.iter().chain(route.filters.iter());
    let info = stream_info(conn, &route, filters.request_id, finish.start_time(), &req);
    // The host picks per-host plugin configuration; most chains have none.
    let host = if links().any(|l| !l.by_host.is_empty()) {
        normalize_host(authority(&req))
    } else {
        std::borrow::Cow::Borrowed("")
    };
    let streams =
        chain::new_streams(links().map(|l| l.resolve(&route.name, &host).new_stream(info.clone())));
    drop(host);
    drop(info);
    finish.filters = Some(streams.clone());

    let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let mut head = request_head(&parts, conn.tls);
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
    let (body, cleared) = match verdict {
        RequestVerdict::Forward {
            body,
            route_cache_cleared,
        } => (body, route_cache_cleared),
        RequestVerdict::Reply(resp, details) => return Ok(finish.local(resp, "", details)),
        RequestVerdict::Reset => return Err(Box::new(FilterReset)),
    };

    // The filters may have changed the request: rebuild it from their view. The streams keep
    // theirs, so this copies the method, and the headers if a filter edited them (the rest is
    // only compared).
    parts.method = head.method.clone();
    if cleared {
        parts.headers = head.headers.clone();
    }
    // A body the filters had whole goes on with its length as they left it. One that streams
    // through them keeps the content-length they left (`FilteredBody` keeps to it), or is
    // chunked without one.
    if let Some(n) = body.size_hint().exact()
        && (n > 0 || parts.headers.contains_key(header::CONTENT_LENGTH))
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let absolute = parts.uri.authority().is_some();
    let unchanged = parts.uri.path_and_query().map_or("/", |p| p.as_str()) == head.path
        && (!absolute
            || (parts
                .uri
                .authority()
                .is_some_and(|a| a.as_str() == head.authority)
                && parts.uri.scheme_str() == Some(&*head.scheme)));
    if !unchanged {
        let uri = if absolute {
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
    }
    if !absolute
        && parts
            .headers
            .get(header::HOST)
            .is_none_or(|h| h.as_bytes() != head.authority.as_bytes())
        && let Ok(v) = HeaderValue::from_str(&head.authority)
    {
        parts.headers.insert(header::HOST, v);
    }
    let req = Request::from_parts(parts, body);

    // Modified request headers clear the route cache: route again (Envoy's clearRouteCache).
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
    let upstream = finish.cluster.clone().map(|c| (c, finish.upstream));
    let mut flags = response_flags::bits(&finish.flags);
    if let Some((flag, _)) = answer.local {
        flags |= response_flags::bits(flag);
    }
    match chain::on_response(&streams, answer.response, upstream, flags).await {
        ResponseVerdict::Send(resp) => Ok(match answer.local {
            Some((flag, details)) => finish.local(resp, flag, details),
            None => finish.upstream_response(resp),
        }),
        ResponseVerdict::Reply(resp, details) => Ok(finish.local(resp, "", details)),
        ResponseVerdict::Reset => Err(Box::new(FilterReset)),
    }
}

/// The streams' facts about the request, in an allocation a finished request of this thread
/// left.
fn stream_info(
    conn: &ConnInfo,
    route: &Route,
    request_id: HeaderValue,
    start_time: std::time::SystemTime,
    req: &Request<Incoming>,
) -> Arc<StreamInfo> {
    pool::stream_info(|info| {
        *info = StreamInfo {
            source: Some(conn.remote),
            destination: Some(conn.local),
            connection_id: conn.id,
            tls: conn.tls.then(|| TlsInfo {
                sni: conn.sni.clone(),
                ..Default::default()
            }),
            route_name: route.name.clone(),
            cluster_name: empty_name(),
            listener_name: conn.listener.clone(),
            virtual_host_name: empty_name(),
            request_id: Some(request_id),
            start_time,
            protocol: req.version(),
        }
    })
}

/// The request line and headers as the filters see them, in a head a finished request of
/// this thread left (its strings keep their room). The filters see a copy of the headers:
/// `parts` keeps the map hyper parsed, which goes upstream unless a filter edits the headers.
/// That map has room (hyper parses each request of a connection into the map of the last
/// response it sent), where a copy has none and would grow on the next request's
/// `x-forwarded-*` headers.
fn request_head(parts: &http::request::Parts, tls: bool) -> Arc<RequestHead> {
    pool::request_head(|h| fill_request_head(h, parts, tls))
}

fn fill_request_head(h: &mut RequestHead, parts: &http::request::Parts, tls: bool) {
    h.method = parts.method.clone();
    h.scheme = if tls { "https" } else { "http" }.into();
    h.authority.clear();
    match parts.uri.authority() {
        Some(a) => h.authority.push_str(a.as_str()),
        None => {
            let host = parts.headers.get(header::HOST);
            h.authority
                .push_str(host.and_then(|h| h.to_str().ok()).unwrap_or(""));
        }
    }
    h.path.clear();
    h.path
        .push_str(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    h.headers = parts.headers.clone();
}
