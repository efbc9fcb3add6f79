//! The end of a request: when the response body finishes (or the client goes away), record
//! route statistics and write the access log line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::service::ConnInfo;
use crate::body::{BoxError, ProxyBody};
use crate::route::table::Route;
use crate::snapshot::Snapshot;
use crate::telemetry::access_log::{AccessLog, Entry};

/// What is known about a request when it finishes.
pub struct Finish {
    access_log: Option<Arc<AccessLog>>,
    conn: Arc<ConnInfo>,
    started: Instant,
    start_time: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    /// Request headers kept for the access log (only those its format reads).
    request_headers: HeaderMap,
    response_headers: Option<HeaderMap>,
    /// The matched route.
    pub route: Option<Arc<Route>>,
    /// The upstream cluster.
    pub cluster: Option<Arc<str>>,
    /// The upstream endpoint.
    pub upstream: Option<SocketAddr>,
    /// Envoy response flags, comma-separated.
    pub flags: String,
    /// Envoy response code details.
    pub details: std::borrow::Cow<'static, str>,
    /// The filter streams of this request, finished (`on_log`...) at the end.
    pub filters: Option<crate::filter::chain::Streams>,
    /// Upstream transport failure reason.
    pub upstream_failure: Option<String>,
    code: u16,
    response_duration: Option<Duration>,
    /// Request body bytes, counted only when the access log is on.
    pub bytes_received: Option<Arc<AtomicU64>>,
    authority: http::HeaderValue,
    _in_flight: super::service::InFlight,
}

impl Finish {
    /// Start tracking a request.
    pub fn new(
        snapshot: &Snapshot,
        conn: &Arc<ConnInfo>,
        req: &Request<Incoming>,
        started: Instant,
        start_time: SystemTime,
    ) -> Finish {
        let authority = match req.uri().authority() {
            Some(a) => http::HeaderValue::from_str(a.as_str())
                .unwrap_or(http::HeaderValue::from_static("")),
            None => req
                .headers()
                .get(http::header::HOST)
                .cloned()
                .unwrap_or(http::HeaderValue::from_static("")),
        };
        Finish {
            access_log: snapshot.access_log.clone(),
            conn: conn.clone(),
            started,
            start_time,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            request_headers: HeaderMap::new(),
            response_headers: None,
            route: None,
            cluster: None,
            upstream: None,
            flags: String::new(),
            details: "via_upstream".into(),
            filters: None,
            upstream_failure: None,
            code: 0,
            response_duration: None,
            bytes_received: None,
            authority,
            _in_flight: super::service::InFlight::new(conn),
        }
    }

    /// Whether an access log line will be written.
    pub fn logging(&self) -> bool {
        self.access_log.is_some()
    }

    /// Keep the request headers the access log reads.
    pub fn capture_request_headers(&mut self, headers: &HeaderMap) {
        if let Some(log) = &self.access_log {
            for name in &log.request_headers {
                for v in headers.get_all(name) {
                    self.request_headers.append(name.clone(), v.clone());
                }
            }
        }
    }

    /// Add a response flag (`URX`, `UF`, ...).
    pub fn add_flag(&mut self, flag: &str) {
        if !self.flags.split(',').any(|f| f == flag) {
            if !self.flags.is_empty() {
                self.flags.push(',');
            }
            self.flags.push_str(flag);
        }
    }

    /// A local reply with its flag and details.
    pub fn local(
        mut self,
        resp: Response<ProxyBody>,
        flag: &str,
        details: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Response<ProxyBody> {
        if !flag.is_empty() {
            self.add_flag(flag);
        }
        self.details = details.into();
        self.respond(resp)
    }

    /// When the request started (`request.time`).
    pub fn start_time(&self) -> SystemTime {
        self.start_time
    }

    /// The answer of a route's action.
    pub fn answer(self, answer: super::service::Answer) -> Response<ProxyBody> {
        match answer.local {
            Some((flag, details)) => self.local(answer.response, flag, details),
            None => self.upstream_response(answer.response),
        }
    }

    /// A response from upstream.
    pub fn upstream_response(self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.respond(resp)
    }

    fn respond(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.code = resp.status().as_u16();
        self.response_duration = Some(self.started.elapsed());
        if self.access_log.is_some() {
            self.response_headers = Some(resp.headers().clone());
        }
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, LoggedBody::wrap(body, self))
    }

    fn complete(mut self, bytes_sent: u64, downstream_gone: bool) {
        let duration = self.started.elapsed();
        let mut flags = std::borrow::Cow::Borrowed(self.flags.as_str());
        if downstream_gone {
            let flags = flags.to_mut();
            if !flags.is_empty() {
                flags.push(',');
            }
            flags.push_str("DC");
        }
        if let Some(streams) = self.filters.take() {
            crate::filter::chain::finish(streams, super::response_flags::bits(&flags));
        }
        if let Some(route) = &self.route {
            route.stats.codes.inc(self.code);
            route.stats.duration.observe(duration);
        }
        let Some(log) = &self.access_log else { return };
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let entry = Entry {
            start: self.start_time,
            duration,
            response_duration: self.response_duration,
            method: self.method.as_str(),
            path,
            authority: self.authority.to_str().unwrap_or(""),
            scheme: if self.conn.tls { "https" } else { "http" },
            request_headers: &self.request_headers,
            response_headers: self.response_headers.as_ref(),
            code: self.code,
            code_details: &self.details,
            flags: &flags,
            bytes_received: self
                .bytes_received
                .as_ref()
                .map_or(0, |b| b.load(Ordering::Relaxed)),
            bytes_sent,
            protocol: super::service::protocol(self.version),
            upstream_host: self.upstream,
            upstream_cluster: self.cluster.as_deref(),
            route: self.route.as_ref().map(|r| &*r.name),
            downstream_remote: self.conn.remote,
            downstream_local: self.conn.local,
            sni: self.conn.sni.as_deref(),
            upstream_failure: self.upstream_failure.as_deref(),
        };
        log.log(&entry);
    }
}

/// A response body that calls `Finish::complete` when it ends or is dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    finish: Option<Box<Finish>>,
    sent: u64,
}

impl LoggedBody {
    /// Wrap `body`.
    pub fn wrap(body: ProxyBody, finish: Finish) -> ProxyBody {
        LoggedBody {
            inner: body,
            finish: Some(Box::new(finish)),
            sent: 0,
        }
        .boxed()
    }

    fn done(&mut self, gone: bool) {
        if let Some(f) = self.finish.take() {
            f.complete(self.sent, gone);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.done(false);
                }
            }
            Poll::Ready(None) => self.done(false),
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = self.finish.as_mut() {
                    f.add_flag("UPE");
                }
                self.done(false);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let gone = !self.inner.is_end_stream();
        self.done(gone);
    }
}

/// A request body that counts its bytes (for `%BYTES_RECEIVED%`).
pub struct CountingBody {
    inner: ProxyBody,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    /// Wrap `inner`, adding to `count`.
    pub fn wrap(inner: ProxyBody, count: Arc<AtomicU64>) -> ProxyBody {
        CountingBody { inner, count }.boxed()
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
