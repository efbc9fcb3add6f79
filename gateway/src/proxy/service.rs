//! One downstream request, from headers in to response out: checks, routing, local replies,
//! rate limiting, forwarding with retries, and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::forward::{self, Forwarded};
use super::logged_body::Finish;
use crate::Shared;
use crate::body::{ProxyBody, empty, full};
use crate::error::ProxyError;
use crate::route::matcher::{RequestView, normalize_host};
use crate::route::table::{Action, RedirectAction, Route};
use crate::snapshot::Snapshot;

/// What the proxy knows about the downstream connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// Connection id, unique in the process (`connection_id` property).
    pub id: u64,
    /// Client address (from PROXY protocol when enabled).
    pub remote: SocketAddr,
    /// The client IP as a header value (for `x-forwarded-for`), made once per connection.
    pub client_ip_value: HeaderValue,
    /// Listener address the client connected to.
    pub local: SocketAddr,
    /// Listener name.
    pub listener: Arc<str>,
    /// Whether TLS was terminated.
    pub tls: bool,
    /// SNI sent by the client.
    pub sni: Option<String>,
    /// Accept header names containing `_`.
    pub allow_underscores: bool,
    /// Requests in flight on this connection (for the idle timeout).
    pub active_requests: std::sync::atomic::AtomicUsize,
    /// When the last request finished, in `now_ms()` time.
    pub last_activity_ms: std::sync::atomic::AtomicU64,
}

impl ConnInfo {
    /// Whether the connection has had no request in flight for `idle`; else how long to wait
    /// before asking again.
    pub fn idle_for(&self, idle: std::time::Duration) -> Result<(), std::time::Duration> {
        let idle_ms = idle.as_millis() as u64;
        if self.active_requests.load(Ordering::Acquire) > 0 {
            return Err(idle);
        }
        let since = crate::upstream::endpoint::now_ms()
            .saturating_sub(self.last_activity_ms.load(Ordering::Acquire));
        if since >= idle_ms {
            Ok(())
        } else {
            Err(std::time::Duration::from_millis(idle_ms - since))
        }
    }
}

/// Counts a request in flight on its connection until dropped.
pub struct InFlight(Arc<ConnInfo>);

impl InFlight {
    /// Count one request on `conn`.
    pub fn new(conn: &Arc<ConnInfo>) -> InFlight {
        conn.active_requests.fetch_add(1, Ordering::AcqRel);
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .last_activity_ms
            .store(crate::upstream::endpoint::now_ms(), Ordering::Release);
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1 plus legacy ones).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Remove hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE) {
        if te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            return;
        }
        headers.remove(header::TE);
    }
}

/// A random RFC 4122 version-4 UUID.
fn new_request_id() -> HeaderValue {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut i = 0;
    for (n, byte) in b.iter().enumerate() {
        if matches!(n, 4 | 6 | 8 | 10) {
            out[i] = b'-';
            i += 1;
        }
        out[i] = HEX[usize::from(byte >> 4)];
        out[i + 1] = HEX[usize::from(byte & 0x0f)];
        i += 2;
    }
    // One allocation that later clones (the filters' `request.id`, the access log) share,
    // instead of a copy that the first clone turns into a shared buffer with a second one.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .expect("hex and dashes are a valid header value")
}

/// Checks hyper does not make: Host presence and uniqueness, underscores in names.
fn check_request(req: &Request<Incoming>, allow_underscores: bool) -> Result<(), ProxyError> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest("duplicate Host header"));
    }
    if req.version() == Version::HTTP_11 && hosts == 0 && req.uri().authority().is_none() {
        return Err(ProxyError::BadRequest("missing Host header"));
    }
    if !allow_underscores && req.headers().keys().any(|k| k.as_str().contains('_')) {
        return Err(ProxyError::BadRequest("header name with underscore"));
    }
    if req.headers().get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(ProxyError::BadRequest("duplicate Content-Length"));
    }
    Ok(())
}

/// The request's authority: `:authority` (HTTP/2 or absolute-form) or `Host`.
pub(crate) fn authority<B>(req: &Request<B>) -> &str {
    match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    }
}

pub(crate) fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// Serve one request. Never fails: every error becomes a response here or in `ProxyError`.
pub async fn serve(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, crate::body::BoxError> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    let snapshot = shared.snapshot.load_full();

    let mut finish = Finish::new(&snapshot, &conn, &req, started, start_time);

    if let Err(e) = check_request(&req, conn.allow_underscores) {
        shared
            .registry
            .global
            .downstream_protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        return Ok(finish.local(e.into_response(), e.flag(), e.details()));
    }

    // Request id and forwarding headers (Envoy edge behaviour: use the remote address).
    let headers = req.headers_mut();
    let request_id = match headers.entry(&X_REQUEST_ID) {
        http::header::Entry::Occupied(e) => e.get().clone(),
        http::header::Entry::Vacant(e) => e.insert(new_request_id()).clone(),
    };
    let client_ip = conn.remote.ip();
    let xff = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = bytes::BytesMut::with_capacity(prev.len() + 2 + conn.client_ip_value.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(conn.client_ip_value.as_bytes());
            HeaderValue::from_maybe_shared(v.freeze()).ok()
        }
        None => Some(conn.client_ip_value.clone()),
    };
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), xff);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    finish.capture_request_headers(req.headers());

    let Some(route) = find_route(&snapshot, &conn, &req) else {
        shared
            .registry
            .global
            .no_route
            .fetch_add(1, Ordering::Relaxed);
        let e = ProxyError::NoRoute;
        return Ok(finish.local(e.into_response(), e.flag(), e.details()));
    };
    finish.route = Some(route.clone());

    if let Some(limiter) = &route.rate_limit {
        let key: &[u8] = match &limiter.key {
            crate::ratelimit::Key::ClientIp => &ip_bytes(client_ip),
            crate::ratelimit::Key::Header(h) => {
                req.headers().get(h).map_or(&[][..], |v| v.as_bytes())
            }
            crate::ratelimit::Key::Route => &[],
        };
        if let Err(retry_after) = limiter.check(key) {
            route.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let e = ProxyError::RateLimited { retry_after };
            return Ok(finish.local(e.into_response(), e.flag(), e.details()));
        }
    }

    let listener_filters = snapshot.listener_filters.get(&conn.listener);
    if listener_filters.is_none() && route.filters.is_empty() {
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let answer = run_action(
            &route,
            &conn,
            req.map(crate::body::incoming),
            upgrade,
            &mut finish,
        )
        .await;
        return Ok(finish.answer(answer));
    }
    let listener_links = listener_filters.map_or(&[][..], Vec::as_slice);
    let filters = super::filtered::Filters {
        listener: listener_links,
        request_id,
    };
    super::filtered::serve(&snapshot, &conn, route.clone(), req, finish, filters).await
}

/// What a route's action produced: a response, and for the proxy's own answers the response
/// flag and details.
pub struct Answer {
    /// The response.
    pub response: Response<ProxyBody>,
    /// `(flag, details)` when the proxy answered itself.
    pub local: Option<(&'static str, &'static str)>,
}

/// Carry out a route's action: a direct response, a redirect, or forwarding upstream.
pub async fn run_action(
    route: &Arc<Route>,
    conn: &ConnInfo,
    req: Request<ProxyBody>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    finish: &mut Finish,
) -> Answer {
    match &route.action {
        Action::Direct {
            status,
            body,
            content_type,
        } => {
            let mut resp = Response::new(full(body.clone()));
            *resp.status_mut() = *status;
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            route.response_headers.apply(resp.headers_mut());
            Answer {
                response: resp,
                local: Some(("", "direct_response")),
            }
        }
        Action::Redirect(r) => {
            let mut resp = redirect(r, &req, conn.tls);
            route.response_headers.apply(resp.headers_mut());
            Answer {
                response: resp,
                local: Some(("", "redirect")),
            }
        }
        Action::Proxy(backends) => {
            let backend = backends.pick(rand::random());
            finish.cluster = Some(backend.cluster.name.clone());
            match forward::forward(route, backend, conn, req, upgrade, finish).await {
                Ok(Forwarded {
                    mut response,
                    upstream,
                }) => {
                    finish.upstream = Some(upstream);
                    strip_hop_by_hop_response(&mut response);
                    route.response_headers.apply(response.headers_mut());
                    Answer {
                        response,
                        local: None,
                    }
                }
                Err(e) => Answer {
                    response: e.into_response(),
                    local: Some((e.flag(), e.details())),
                },
            }
        }
    }
}

fn strip_hop_by_hop_response(resp: &mut Response<ProxyBody>) {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    strip_hop_by_hop(resp.headers_mut());
}

fn ip_bytes(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

pub(crate) fn find_route<B>(
    snapshot: &Snapshot,
    conn: &ConnInfo,
    req: &Request<B>,
) -> Option<Arc<Route>> {
    let table = snapshot.tables.get(&conn.listener)?;
    let host = normalize_host(authority(req));
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    table.find(&host, &view).cloned()
}

fn redirect<B>(r: &RedirectAction, req: &Request<B>, tls: bool) -> Response<ProxyBody> {
    let scheme = r
        .scheme
        .as_deref()
        .unwrap_or(if tls { "https" } else { "http" });
    let authority = authority(req);
    let (req_host, req_port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
        _ => (authority, None),
    };
    let host = r.host.as_deref().unwrap_or(req_host);
    let port = match (r.port, r.scheme.is_some()) {
        (Some(p), _) => Some(p.to_string()),
        // A scheme change drops the old port, as Envoy does.
        (None, true) => None,
        (None, false) => req_port.map(str::to_string),
    };
    let path = r.path.as_deref().unwrap_or(req.uri().path());
    let mut location = format!("{scheme}://{host}");
    if let Some(p) = port {
        location.push(':');
        location.push_str(&p);
    }
    location.push_str(path);
    if let Some(q) = req.uri().query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(empty());
    *resp.status_mut() = r.code;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

/// Collect a small request body so that it can be sent again on retry (at most `limit` bytes).
pub async fn buffer_body(mut body: ProxyBody, limit: usize) -> Result<Bytes, ProxyError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ProxyError::BadRequest("request body could not be read"))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(ProxyError::BadRequest("request body too large to buffer"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// Whether the request asks to switch protocols (WebSocket).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}
