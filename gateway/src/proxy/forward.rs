//! Forwarding a routed request to its cluster: rewrite, pick an endpoint, send with per-try and
//! overall timeouts, retry what the policy allows, feed outlier detection, and splice upgraded
//! (WebSocket) connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::logged_body::{CountingBody, Finish};
use super::service::{ConnInfo, buffer_body, strip_hop_by_hop};
use crate::body::{ProxyBody, empty, full};
use crate::error::ProxyError;
use crate::filter::chain::LengthChanged;
use crate::route::table::{Backend, Route};
use crate::upstream::cluster::{Cluster, PickContext};
use crate::upstream::connector::ConnectError;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::retry::Failure;

/// Bodies up to this size are buffered so that a retry can send them again.
const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// An upstream response and where it came from.
pub struct Forwarded {
    /// The response, body streaming.
    pub response: Response<ProxyBody>,
    /// The endpoint that answered.
    pub upstream: SocketAddr,
}

struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(c: &'a AtomicUsize) -> Counted<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one attempt failed.
struct AttemptError {
    failure: Failure,
    error: ProxyError,
}

/// Forward `req` along `route` to `backend`. `downstream_upgrade` is set for a WebSocket
/// upgrade request (taken from the downstream request before its body was wrapped).
pub async fn forward(
    route: &Route,
    backend: &Backend,
    conn: &ConnInfo,
    req: Request<ProxyBody>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    finish: &mut Finish,
) -> Result<Forwarded, ProxyError> {
    let cluster = &backend.cluster;
    let spec = cluster.spec();
    // Count the request first, then check, so that concurrent requests cannot overshoot.
    let _active = Counted::new(&cluster.active_requests);
    if cluster.active_requests.load(Ordering::Acquire) > spec.max_requests {
        cluster.stats.overflow.fetch_add(1, Ordering::Relaxed);
        return Err(ProxyError::Overflow);
    }

    let upgrade = downstream_upgrade.is_some();
    let (mut parts, body) = req.into_parts();

    // Rewrites and header edits.
    // The authority upstream (`Host`, or `:authority` for HTTP/2) and the path, without copies
    // when nothing is rewritten.
    let host: HeaderValue = match (&route.rewrite.host, parts.uri.authority()) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => {
            HeaderValue::from_str(a.as_str()).unwrap_or(HeaderValue::from_static(""))
        }
        (None, None) => parts
            .headers
            .get(header::HOST)
            .cloned()
            .unwrap_or(HeaderValue::from_static("")),
    };
    let path_and_query: PathAndQuery = if route.rewrite.rewrites_path() {
        let original = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(orig) = HeaderValue::from_str(original) {
            parts.headers.insert(
                header::HeaderName::from_static("x-envoy-original-path"),
                orig,
            );
        }
        let new = route.rewrite.path(parts.uri.path());
        let rewritten = match parts.uri.query() {
            Some(q) => format!("{new}?{q}"),
            None => new.into_owned(),
        };
        PathAndQuery::try_from(rewritten)
            .map_err(|_| ProxyError::BadRequest("rewritten path is invalid"))?
    } else {
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
    let upgrade_headers = if upgrade {
        (
            parts.headers.get(header::UPGRADE).cloned(),
            parts.headers.get(header::CONNECTION).cloned(),
        )
    } else {
        (None, None)
    };
    strip_hop_by_hop(&mut parts.headers);
    if let (Some(u), Some(c)) = upgrade_headers {
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, c);
    }
    route.request_headers.apply(&mut parts.headers);

    // The body: streamed once, or buffered when a retry may need to send it again.
    let policy = &route.retry;
    let mut streaming: Option<ProxyBody> = None;
    let mut buffered: Option<Bytes> = None;
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|u| u <= RETRY_BUFFER_LIMIT as u64);
    let counter = finish.logging().then(|| Arc::new(AtomicU64::new(0)));
    finish.bytes_received = counter.clone();
    if body.is_end_stream() {
        buffered = Some(Bytes::new());
    } else if policy.attempts > 0 && small && !upgrade {
        let bytes = buffer_body(body, RETRY_BUFFER_LIMIT).await?;
        if let Some(c) = &counter {
            c.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        buffered = Some(bytes);
    } else {
        streaming = Some(match counter {
            Some(c) => CountingBody::wrap(body, c),
            None => body,
        });
    }
    let may_retry = streaming.is_none() && !upgrade;
    let deadline = route.timeout.map(|t| Instant::now() + t);

    let mut attempt = 0u32;
    let mut previous: Option<Arc<Endpoint>> = None;
    loop {
        let random = rand::random();
        let ctx = PickContext {
            headers: &parts.headers,
            client_ip: conn.remote.ip(),
            random,
        };
        let ep = cluster
            .pick(backend.subset, &ctx, previous.as_deref())
            .ok_or(ProxyError::NoHealthyUpstream)?;
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) if b.is_empty() => empty(),
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let mut builder = Request::builder().method(parts.method.clone());
        let h2 = cluster.h2().is_some();
        let mut uri = http::uri::Parts::default();
        if h2 {
            uri.scheme = Some(if spec.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            });
            uri.authority = Some(
                Authority::try_from(host.as_bytes())
                    .map_err(|_| ProxyError::BadRequest("invalid authority"))?,
            );
        } else {
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(ep.authority.clone());
        }
        uri.path_and_query = Some(path_and_query.clone());
        let uri =
            Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        builder = builder.uri(uri).version(if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        });
        let mut upstream_req = builder
            .body(body)
            .map_err(|_| ProxyError::BadRequest("invalid request"))?;
        // The headers are moved into the last attempt and copied only when a retry may follow.
        let last_attempt = !may_retry || attempt >= policy.attempts;
        *upstream_req.headers_mut() = if last_attempt {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        if h2 {
            upstream_req.headers_mut().remove(header::HOST);
        } else {
            upstream_req
                .headers_mut()
                .insert(header::HOST, host.clone());
        }

        let started = Instant::now();
        let outcome = send_once(cluster, &ep, upstream_req, policy.per_try_timeout, deadline).await;
        cluster.stats.duration.observe(started.elapsed());
        let failure = match outcome {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                cluster.stats.codes.inc(status);
                cluster.record_outcome(&ep, status >= 500, matches!(status, 502..=504));
                let retry = may_retry
                    && attempt < policy.attempts
                    && policy.retriable(Failure::Status(status))
                    && retry_allowed(cluster, policy, deadline);
                if !retry {
                    if let (Some(down), true) = (downstream_upgrade, status == 101) {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice(down, up));
                        let (parts, _) = resp.into_parts();
                        return Ok(Forwarded {
                            response: Response::from_parts(parts, empty()),
                            upstream: ep.addr,
                        });
                    }
                    if attempt > 0 && status >= 500 {
                        finish.add_flag("URX");
                    }
                    let response = resp.map(crate::body::incoming);
                    return Ok(Forwarded {
                        response,
                        upstream: ep.addr,
                    });
                }
                drop(resp);
                None
            }
            Err(e) => Some(e),
        };
        if let Some(AttemptError { failure, error }) = &failure {
            finish.upstream = Some(ep.addr);
            // Neither an overflow nor the filters' fault counts against the endpoint.
            let own_fault = matches!(
                error,
                ProxyError::Overflow | ProxyError::FilterBodyLength(_)
            );
            let gateway_error = !own_fault;
            if gateway_error {
                cluster.record_outcome(&ep, true, true);
            }
            match failure {
                Failure::ConnectFailure => {
                    cluster
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                Failure::PerTryTimeout => {
                    cluster.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if let ProxyError::ConnectFailure(reason) | ProxyError::Reset(reason) = error {
                finish.upstream_failure = Some(reason.clone());
            }
            let retry = may_retry
                && attempt < policy.attempts
                && !own_fault
                && policy.retriable(*failure)
                && !deadline_passed(deadline)
                && retry_allowed(cluster, policy, deadline);
            if !retry {
                if attempt > 0 {
                    finish.add_flag("URX");
                }
                if matches!(error, ProxyError::Overflow) {
                    cluster.stats.overflow.fetch_add(1, Ordering::Relaxed);
                }
                return Err(error.clone());
            }
        }
        attempt += 1;
        cluster.stats.retries.fetch_add(1, Ordering::Relaxed);
        let _retrying = Counted::new(&cluster.active_retries);
        let wait = policy.backoff(attempt, rand::random());
        let wait = match deadline {
            Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
            None => wait,
        };
        tokio::time::sleep(wait).await;
        if deadline_passed(deadline) {
            return Err(ProxyError::Timeout);
        }
        previous = Some(ep);
    }
}

fn deadline_passed(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

fn retry_allowed(
    cluster: &Cluster,
    policy: &crate::upstream::retry::RetryPolicy,
    deadline: Option<Instant>,
) -> bool {
    !deadline_passed(deadline)
        && policy.budget_allows(
            cluster.active_requests.load(Ordering::Relaxed),
            cluster.active_retries.load(Ordering::Relaxed),
        )
}

/// Send one attempt, bounded by the per-try timeout and the overall deadline.
async fn send_once(
    cluster: &Cluster,
    ep: &Endpoint,
    req: Request<ProxyBody>,
    per_try: Option<Duration>,
    deadline: Option<Instant>,
) -> Result<Response<Incoming>, AttemptError> {
    let _ep_active = ep.start_request();
    let now = Instant::now();
    let overall = deadline.map(|d| d.saturating_duration_since(now));
    let limit = match (per_try, overall) {
        (Some(a), Some(b)) => Some((a.min(b), a < b)),
        (Some(a), None) => Some((a, true)),
        (None, Some(b)) => Some((b, false)),
        (None, None) => None,
    };
    let fut = async {
        match cluster.h2() {
            Some(pool) => {
                let mut sender = pool.sender(ep.addr).await.map_err(|e| match e {
                    crate::upstream::h2pool::H2Error::Connect(c) => connect_error(c),
                    crate::upstream::h2pool::H2Error::Handshake(e) => AttemptError {
                        failure: Failure::ConnectFailure,
                        error: ProxyError::ConnectFailure(e.to_string()),
                    },
                })?;
                sender.send_request(req).await.map_err(|e| hyper_error(&e))
            }
            None => cluster
                .client()
                .request(req)
                .await
                .map_err(|e| legacy_error(&e)),
        }
    };
    match limit {
        None => fut.await,
        Some((limit, per_try)) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError {
                failure: if per_try {
                    Failure::PerTryTimeout
                } else {
                    Failure::Reset
                },
                error: ProxyError::Timeout,
            }),
        },
    }
}

fn connect_error(e: ConnectError) -> AttemptError {
    match e {
        ConnectError::Overflow => AttemptError {
            failure: Failure::ConnectFailure,
            error: ProxyError::Overflow,
        },
        other => AttemptError {
            failure: Failure::ConnectFailure,
            error: ProxyError::ConnectFailure(other.to_string()),
        },
    }
}

fn find_source<'a, T: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    loop {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        e = e.source()?;
    }
}

fn legacy_error(e: &hyper_util::client::legacy::Error) -> AttemptError {
    if let Some(c) = find_source::<ConnectError>(e) {
        return match c {
            ConnectError::Overflow => AttemptError {
                failure: Failure::ConnectFailure,
                error: ProxyError::Overflow,
            },
            other => AttemptError {
                failure: Failure::ConnectFailure,
                error: ProxyError::ConnectFailure(other.to_string()),
            },
        };
    }
    if e.is_connect() {
        return AttemptError {
            failure: Failure::ConnectFailure,
            error: ProxyError::ConnectFailure(e.to_string()),
        };
    }
    match find_source::<hyper::Error>(e) {
        Some(h) => hyper_error(h),
        None => AttemptError {
            failure: Failure::Reset,
            error: ProxyError::Reset("connection termination".into()),
        },
    }
}

fn hyper_error(e: &hyper::Error) -> AttemptError {
    if let Some(l) = find_source::<LengthChanged>(e) {
        return AttemptError {
            failure: Failure::Reset,
            error: ProxyError::FilterBodyLength(l.clone()),
        };
    }
    if let Some(h2) = find_source::<h2::Error>(e)
        && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
    {
        return AttemptError {
            failure: Failure::RefusedStream,
            error: ProxyError::Reset("refused stream".into()),
        };
    }
    AttemptError {
        failure: Failure::Reset,
        error: ProxyError::Reset("connection termination".into()),
    }
}

/// Copy bytes both ways between an upgraded downstream and upstream connection until either
/// side closes. The connection is independent of config reloads.
async fn splice(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}
