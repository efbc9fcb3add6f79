//! Driving one request and its response through a chain of proxy-wasm filters, in Envoy's
//! order: request callbacks in chain order, response callbacks in reverse order.
//!
//! Two modes per direction. When every filter continues on the headers, bodies stream: each
//! chunk runs through the filters as it passes (`FilteredBody`), and a filter that pauses on a
//! chunk keeps it in the host until it continues. A streaming body keeps the `content-length`
//! the filters left, as in Envoy: a filter that changes a body's length must remove it in its
//! headers callback, and a body that no longer matches it is cut off (`LengthChanged`) rather
//! than sent malformed. A response whose body has already arrived whole when its headers are
//! through runs its body callbacks at once and goes out with a `content-length` of what the
//! filters left. When a filter pauses on the headers, the body is buffered (up to
//! `BODY_BUFFER_LIMIT`) and handed to it, and to the filters after it, in one piece, as Envoy
//! does when a body arrives in one read; it goes on with its new length.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::lock::Mutex;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use weir_wasm_host::{Decision, HttpStream, LocalReply, RequestHead, ResponseHead, pool};

use crate::body::{BoxError, ProxyBody, full};

/// Largest body buffered for filters that pause on headers.
pub const BODY_BUFFER_LIMIT: usize = 1 << 20;

/// The streams of one request, one per filter, in chain order.
pub type Streams = Arc<Mutex<StreamList>>;

/// The streams of one request, one per filter in chain order: inline (in the `Streams`
/// allocation) for chains of up to three filters.
pub type StreamList = smallvec::SmallVec<[HttpStream; 3]>;

/// What the request callbacks decided.
pub enum RequestVerdict {
    /// Send upstream with this body. `route_cache_cleared`: a filter changed the request
    /// headers (send the head's, not the map the gateway kept) or cleared the route cache, so
    /// the route must be found again (Envoy's `clearRouteCache`).
    Forward {
        body: ProxyBody,
        route_cache_cleared: bool,
    },
    /// Answer with this response (already through the response callbacks).
    Reply(Response<ProxyBody>, String),
    /// Reset the downstream stream.
    Reset,
}

/// Why the stream must end without a response.
#[derive(Debug, thiserror::Error)]
#[error("a filter reset the stream")]
pub struct FilterReset;

/// Why a streaming body was cut short: the filters changed its length while the
/// `content-length` they left announces another. As in Envoy, a filter that changes a body's
/// length as it streams must remove `content-length` in its headers callback; Weir resets the
/// stream rather than send a body its headers contradict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the filters changed the body's length while keeping its content-length ({announced} bytes): \
     a filter that changes a body's length must remove content-length in its headers callback"
)]
pub struct LengthChanged {
    /// The `content-length` that went out.
    pub announced: u64,
}

/// The one `content-length` of `headers`, if it has a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// A local reply as a response.
pub fn reply_response(r: &LocalReply) -> Response<ProxyBody> {
    let mut resp = Response::new(full(r.body.clone()));
    *resp.status_mut() = r.status;
    for (k, v) in &r.headers {
        resp.headers_mut().append(k.clone(), v.clone());
    }
    if let Some(g) = r.grpc_status {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from(g));
    }
    if !r.body.is_empty() && !resp.headers().contains_key(http::header::CONTENT_TYPE) {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    resp.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(r.body.len()),
    );
    resp
}

/// Run the request headers (and, if a filter pauses, the buffered body) through the chain.
/// The streams keep references to `head` (their view for later phases); a filter's edit copies
/// it only then. A body to forward either streams, kept to the `content-length` the filters
/// left, or (when a filter held the headers) comes whole: announce its exact length then.
pub async fn on_request(
    streams: &Streams,
    head: &mut Arc<RequestHead>,
    body: ProxyBody,
) -> Result<RequestVerdict, BoxError> {
    let mut guard = streams.lock().await;
    let eos = body.is_end_stream();
    let n = guard.len();
    let mut paused_at = None;
    for i in 0..n {
        match guard[i].on_request_headers(head, eos).await {
            Decision::Continue => {}
            Decision::StopIteration => {
                paused_at = Some(i);
                break;
            }
            Decision::LocalReply(r) => {
                drop(guard);
                return Ok(local_reply(streams, i, &r).await);
            }
            Decision::Reset => return Ok(RequestVerdict::Reset),
        }
    }
    let Some(paused) = paused_at else {
        let route_cache_cleared = cleared(&guard);
        drop(guard);
        // The body streams through the filters, kept to the content-length they left.
        let body = if eos {
            body
        } else {
            FilteredBody::request(streams.clone(), body, content_length(&head.headers))
        };
        return Ok(RequestVerdict::Forward {
            body,
            route_cache_cleared,
        });
    };
    // A filter paused on the headers: buffer the body and give it whole to the filters.
    let mut data = match collect(body, BODY_BUFFER_LIMIT).await {
        Some(d) => d.freeze(),
        None => {
            drop(guard);
            let r = LocalReply {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"Payload Too Large"),
                details: "request_payload_too_large".into(),
                grpc_status: None,
            };
            return Ok(local_reply(streams, paused, &r).await);
        }
    };
    for i in 0..n {
        if i > paused {
            match guard[i].on_request_headers(head, false).await {
                Decision::Continue | Decision::StopIteration => {}
                Decision::LocalReply(r) => {
                    drop(guard);
                    return Ok(local_reply(streams, i, &r).await);
                }
                Decision::Reset => return Ok(RequestVerdict::Reset),
            }
        }
        match guard[i].on_request_body(&mut data, true).await {
            Decision::Continue | Decision::StopIteration => {}
            Decision::LocalReply(r) => {
                drop(guard);
                return Ok(local_reply(streams, i, &r).await);
            }
            Decision::Reset => return Ok(RequestVerdict::Reset),
        }
        let held = guard[i].take_buffered_body(true);
        if !held.is_empty() {
            data = held.freeze();
        }
    }
    Ok(RequestVerdict::Forward {
        body: full(data),
        route_cache_cleared: cleared(&guard),
    })
}

/// Whether a filter changed the request headers or cleared the route cache.
fn cleared(streams: &[HttpStream]) -> bool {
    streams.iter().any(HttpStream::route_cache_cleared)
}

async fn collect(mut body: ProxyBody, limit: usize) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > limit {
                return None;
            }
            out.extend_from_slice(d);
        }
    }
    Some(out)
}

/// A local reply from filter `from` during the request: the response callbacks of the filters
/// that saw the request (`from` down to the first) run on it.
async fn local_reply(streams: &Streams, from: usize, r: &LocalReply) -> RequestVerdict {
    let mut guard = streams.lock().await;
    let mut head = ResponseHead {
        status: r.status,
        headers: HeaderMap::new(),
    };
    for (k, v) in &r.headers {
        head.headers.append(k.clone(), v.clone());
    }
    if let Some(g) = r.grpc_status {
        head.headers.insert("grpc-status", HeaderValue::from(g));
    }
    let mut head = Arc::new(head);
    let mut body = r.body.clone();
    for i in (0..=from.min(guard.len().saturating_sub(1))).rev() {
        guard[i].set_response_code_details(&r.details);
        // A second local reply while answering one is ignored, as in Envoy.
        if guard[i]
            .on_response_headers(&mut head, body.is_empty())
            .await
            == Decision::Reset
        {
            return RequestVerdict::Reset;
        }
        if !body.is_empty() {
            let _ = guard[i].on_response_body(&mut body, true).await;
            let held = guard[i].take_buffered_body(false);
            if !held.is_empty() {
                body = held.freeze();
            }
        }
    }
    let head = Arc::unwrap_or_clone(head);
    let mut resp = Response::new(full(body));
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    RequestVerdict::Reply(resp, r.details.clone())
}

/// What the response callbacks decided.
pub enum ResponseVerdict {
    /// Send this response downstream.
    Send(Response<ProxyBody>),
    /// A filter replaced the response with a local reply.
    Reply(Response<ProxyBody>, String),
    /// Reset the downstream stream.
    Reset,
}

/// Where a request went upstream: the cluster and the endpoint's address.
pub type Upstream = (Arc<str>, Option<std::net::SocketAddr>);

/// Run the response headers (and, if a filter pauses, the buffered body) through the chain in
/// reverse order. `upstream` (if the request went upstream) and the response flags so far
/// (`response.flags`, Envoy's bits) are told to every stream first.
///
/// When no filter pauses and the body's first chunk has already arrived, that chunk runs through
/// the body callbacks here; if it is the whole body, the response goes out with a
/// `content-length` of what the filters left (Envoy keeps the header too), instead of streaming.
pub async fn on_response(
    streams: &Streams,
    resp: Response<ProxyBody>,
    upstream: Option<Upstream>,
    flags: u64,
) -> ResponseVerdict {
    let mut guard = streams.lock().await;
    for s in guard.iter_mut() {
        if let Some((cluster, addr)) = &upstream {
            s.set_upstream(cluster.clone(), *addr);
        }
        s.set_response_flags(flags);
    }
    let (parts, mut body) = resp.into_parts();
    let mut head = pool::response_head(|h| {
        h.status = parts.status;
        h.headers = parts.headers.clone();
    });
    // The upstream's map goes downstream unless a filter edits the headers: it has room for
    // the connection's next request (see `filtered::request_head`), where the filters' copy
    // has none.
    let kept = (parts.status, parts.headers);
    let version = parts.version;
    let eos = body.is_end_stream();
    let n = guard.len();
    let mut paused_at = None;
    for i in (0..n).rev() {
        match guard[i].on_response_headers(&mut head, eos).await {
            Decision::Continue => {}
            Decision::StopIteration => {
                paused_at = Some(i);
                break;
            }
            Decision::LocalReply(r) => {
                return ResponseVerdict::Reply(reply_response(&r), r.details.clone());
            }
            Decision::Reset => return ResponseVerdict::Reset,
        }
    }
    let Some(paused) = paused_at else {
        let head = response_head(head, kept, &guard);
        if eos {
            drop(guard);
            return ResponseVerdict::Send(respond(head, version, body, Length::Unchanged));
        }
        // The first chunk, if it is already here (it usually came in the same read as the
        // headers): a body that is complete need not stream. One that streams keeps the
        // content-length the filters left, as in Envoy.
        let (first, ended) = match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => (Ok(data), false),
                // Trailers (or another frame) first: they stream through the chain.
                Err(frame) => (Err(Some(Ok(frame))), false),
            },
            // Ended without a chunk: the filters see an empty end of stream.
            Some(None) => (Ok(Bytes::new()), true),
            Some(Some(Err(e))) => (Err(Some(Err(e))), false),
            None => (Err(None), false),
        };
        let first = match first {
            Ok(data) => data,
            Err(unfiltered) => {
                drop(guard);
                let announced = content_length(&head.1);
                let body = FilteredBody::response(streams.clone(), body, unfiltered, announced);
                return ResponseVerdict::Send(respond(head, version, body, Length::Unchanged));
            }
        };
        let end = ended || body.is_end_stream();
        let mut buf = first;
        if run_data(&mut guard, Direction::Response, &mut buf, end)
            .await
            .is_err()
        {
            return ResponseVerdict::Reset;
        }
        drop(guard);
        if end {
            let length = Length::Exactly(buf.len());
            return ResponseVerdict::Send(respond(head, version, full(buf), length));
        }
        let filtered = (!buf.is_empty()).then(|| Frame::data(buf));
        let announced = content_length(&head.1);
        let body = FilteredBody::response_after(streams.clone(), body, filtered, announced);
        return ResponseVerdict::Send(respond(head, version, body, Length::Unchanged));
    };
    let Some(data) = collect(body, BODY_BUFFER_LIMIT).await else {
        let r = LocalReply {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"Internal Server Error"),
            details: "response_payload_too_large".into(),
            grpc_status: None,
        };
        return ResponseVerdict::Reply(reply_response(&r), r.details.clone());
    };
    let mut data = data.freeze();
    for i in (0..n).rev() {
        if i < paused {
            match guard[i].on_response_headers(&mut head, false).await {
                Decision::Continue | Decision::StopIteration => {}
                Decision::LocalReply(r) => {
                    return ResponseVerdict::Reply(reply_response(&r), r.details.clone());
                }
                Decision::Reset => return ResponseVerdict::Reset,
            }
        }
        match guard[i].on_response_body(&mut data, true).await {
            Decision::Continue | Decision::StopIteration => {}
            Decision::LocalReply(r) => {
                return ResponseVerdict::Reply(reply_response(&r), r.details.clone());
            }
            Decision::Reset => return ResponseVerdict::Reset,
        }
        let held = guard[i].take_buffered_body(false);
        if !held.is_empty() {
            data = held.freeze();
        }
    }
    // No body at all (a HEAD, a 204/304) keeps the upstream's content-length.
    let length = if eos && data.is_empty() {
        Length::Unchanged
    } else {
        Length::Exactly(data.len())
    };
    let head = response_head(head, kept, &guard);
    ResponseVerdict::Send(respond(head, version, full(data), length))
}

/// What the gateway knows of a response body's length after the filters.
enum Length {
    /// As the filters left it: keep the `content-length` of the head (a streaming body is
    /// kept to it).
    Unchanged,
    /// Known in full.
    Exactly(usize),
}

/// The response status and headers to send downstream: the upstream's (`kept`) when no filter
/// edited them, else the filters' view, copied when the streams hold it too (they read it in
/// later phases and in `on_log`).
fn response_head(
    head: Arc<ResponseHead>,
    kept: (StatusCode, HeaderMap),
    streams: &[HttpStream],
) -> (StatusCode, HeaderMap) {
    if !streams.iter().any(HttpStream::response_headers_changed) {
        return kept;
    }
    match Arc::try_unwrap(head) {
        Ok(h) => (h.status, h.headers),
        Err(head) => (head.status, head.headers.clone()),
    }
}

/// The response to send: the status and headers the filters left, with `body`.
fn respond(
    (status, headers): (StatusCode, HeaderMap),
    version: http::Version,
    body: ProxyBody,
    length: Length,
) -> Response<ProxyBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    *r.version_mut() = version;
    match length {
        Length::Unchanged => {}
        Length::Exactly(n) => {
            r.headers_mut().remove(http::header::TRANSFER_ENCODING);
            if content_length(r.headers()) != Some(n as u64) {
                r.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
    }
    r
}

/// Run one chunk of body through the body callbacks (chain order for the request, reverse for
/// the response). A filter that holds the chunk (not at the end of the stream) leaves `buf`
/// empty: the host keeps the bytes and gives them back, accumulated, when it continues.
async fn run_data(
    guard: &mut [HttpStream],
    direction: Direction,
    buf: &mut Bytes,
    eos: bool,
) -> Result<(), FilterReset> {
    let n = guard.len();
    let request = direction == Direction::Request;
    for k in 0..n {
        let i = if request { k } else { n - 1 - k };
        let decision = if request {
            guard[i].on_request_body(buf, eos).await
        } else {
            guard[i].on_response_body(buf, eos).await
        };
        match decision {
            Decision::Continue => {}
            Decision::StopIteration if !eos => {
                *buf = Bytes::new();
                return Ok(());
            }
            Decision::StopIteration => {}
            // Headers have gone out: a reply or a reset now can only reset the stream.
            Decision::LocalReply(_) | Decision::Reset => return Err(FilterReset),
        }
    }
    Ok(())
}

/// Run `on_log`, `on_done`, `on_delete` on every stream (at the end of the response), with
/// the final response flags (Envoy's bits). The streams' allocation is kept for another
/// request of this thread when nothing else holds it.
pub fn finish(streams: Streams, flags: u64) {
    let finish = move |s: &mut HttpStream| {
        s.set_response_flags(flags);
        s.finish();
    };
    if let Some(mut guard) = streams.try_lock() {
        guard.iter_mut().for_each(finish);
    } else {
        tokio::spawn(async move { streams.lock().await.iter_mut().for_each(finish) });
        return;
    }
    give_streams(streams);
}

thread_local! {
    /// Stream lists of finished requests, empty, for the next requests of this thread.
    static FREE_STREAMS: pool::FreeList<Streams> = const { pool::FreeList::new() };
}

/// The streams of a new request, in an allocation a finished request of this thread left.
pub fn new_streams(list: impl IntoIterator<Item = HttpStream>) -> Streams {
    // Only unique allocations are kept, so a reused one is writable.
    if let Some(mut streams) = pool::take_from(&FREE_STREAMS)
        && let Some(slot) = Arc::get_mut(&mut streams)
    {
        slot.get_mut().extend(list);
        return streams;
    }
    Arc::new(Mutex::new(list.into_iter().collect()))
}

/// Keep a finished request's streams allocation, if this was its last reference.
fn give_streams(mut streams: Streams) {
    let Some(slot) = Arc::get_mut(&mut streams) else {
        return;
    };
    // Dropping the streams gives their contexts back to the host's pool.
    slot.get_mut().clear();
    pool::give_to(&FREE_STREAMS, streams);
}

type Pending = Pin<Box<dyn Future<Output = Result<Vec<Frame<Bytes>>, BoxError>> + Send>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// A body whose chunks run through the filters' body callbacks as they stream.
pub struct FilteredBody {
    inner: ProxyBody,
    streams: Streams,
    direction: Direction,
    /// A frame taken from `inner` before this body was made, still to run through the chain.
    unfiltered: Option<Result<Frame<Bytes>, BoxError>>,
    /// The chain running on the current part. In a `Mutex` only to make the body `Sync`;
    /// it is reached through `&mut self` (`get_mut`), never locked.
    pending: Option<std::sync::Mutex<Pending>>,
    ready: std::collections::VecDeque<Frame<Bytes>>,
    done: bool,
    /// The `content-length` that went out with the headers, if one did.
    announced: Option<u64>,
    /// Bytes of data passed on so far.
    sent: u64,
}

impl FilteredBody {
    /// The downstream request body, through the chain in order. `announced`: the
    /// `content-length` the upstream request goes out with, which the body is kept to.
    pub fn request(streams: Streams, inner: ProxyBody, announced: Option<u64>) -> ProxyBody {
        FilteredBody::new(streams, inner, Direction::Request, announced).boxed()
    }

    /// The upstream response body, through the chain in reverse order, starting with
    /// `unfiltered` (a frame already taken from `inner`) if there is one.
    pub fn response(
        streams: Streams,
        inner: ProxyBody,
        unfiltered: Option<Result<Frame<Bytes>, BoxError>>,
        announced: Option<u64>,
    ) -> ProxyBody {
        let mut body = FilteredBody::new(streams, inner, Direction::Response, announced);
        body.unfiltered = unfiltered;
        body.boxed()
    }

    /// The rest of the upstream response body after `filtered`, a chunk that went through the
    /// chain already.
    pub fn response_after(
        streams: Streams,
        inner: ProxyBody,
        filtered: Option<Frame<Bytes>>,
        announced: Option<u64>,
    ) -> ProxyBody {
        let mut body = FilteredBody::new(streams, inner, Direction::Response, announced);
        body.ready.extend(filtered);
        body.boxed()
    }

    fn new(
        streams: Streams,
        inner: ProxyBody,
        direction: Direction,
        announced: Option<u64>,
    ) -> FilteredBody {
        FilteredBody {
            inner,
            streams,
            direction,
            unfiltered: None,
            pending: None,
            ready: Default::default(),
            done: false,
            announced,
            sent: 0,
        }
    }

    /// Pass `frame` on, unless its data goes past the announced length.
    fn pass(&mut self, frame: Frame<Bytes>) -> Result<Frame<Bytes>, BoxError> {
        if let (Some(announced), Some(data)) = (self.announced, frame.data_ref()) {
            self.sent += data.len() as u64;
            if self.sent > announced {
                return Err(self.length_changed(announced));
            }
        }
        Ok(frame)
    }

    /// The body ends: it must have been as long as announced.
    fn end(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        match self.announced {
            Some(announced) if self.sent != announced => Some(Err(self.length_changed(announced))),
            _ => None,
        }
    }

    fn length_changed(&mut self, announced: u64) -> BoxError {
        self.done = true;
        self.announced = None;
        self.ready.clear();
        let e = LengthChanged { announced };
        let side = match self.direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        tracing::warn!("{side} stream reset: {e}");
        Box::new(e)
    }
}

/// One part of a body on its way through the chain.
enum Part {
    Data(Bytes, bool),
    Trailers(HeaderMap),
}

/// Run one part through the chain; returns the frames to pass on now (none when a filter holds
/// the data).
async fn run_part(
    streams: Streams,
    direction: Direction,
    part: Part,
) -> Result<Vec<Frame<Bytes>>, BoxError> {
    let mut guard = streams.lock().await;
    let n = guard.len();
    let request = direction == Direction::Request;
    match part {
        Part::Data(data, eos) => {
            let mut buf = data;
            run_data(&mut guard, direction, &mut buf, eos)
                .await
                .map_err(Box::new)?;
            Ok(if buf.is_empty() {
                Vec::new()
            } else {
                vec![Frame::data(buf)]
            })
        }
        Part::Trailers(mut trailers) => {
            let mut frames = Vec::new();
            // Chain order for the request, reverse order for the response.
            for i in (0..n).map(|k| if request { k } else { n - 1 - k }) {
                let decision = if request {
                    guard[i].on_request_trailers(&mut trailers).await
                } else {
                    guard[i].on_response_trailers(&mut trailers).await
                };
                if matches!(decision, Decision::LocalReply(_) | Decision::Reset) {
                    return Err(Box::new(FilterReset));
                }
                // Data a filter held until now goes out before the trailers.
                let held = guard[i].take_buffered_body(request);
                if !held.is_empty() {
                    frames.push(Frame::data(held.freeze()));
                }
            }
            frames.push(Frame::trailers(trailers));
            Ok(frames)
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Poll::Ready(Some(self.pass(frame)));
            }
            if let Some(p) = self.pending.as_mut() {
                let p = p
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let out = std::task::ready!(p.as_mut().poll(cx));
                self.pending = None;
                match out {
                    Ok(frames) => {
                        self.ready.extend(frames);
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        self.announced = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            if self.done {
                return Poll::Ready(self.end());
            }
            let next = match self.unfiltered.take() {
                Some(frame) => Some(frame),
                None => std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)),
            };
            let part = match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.inner.is_end_stream();
                        self.done = eos;
                        Part::Data(data, eos)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            self.done = true;
                            Part::Trailers(t)
                        }
                        Err(_) => continue,
                    },
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    // The body ended without an end-of-stream chunk: tell the filters.
                    self.done = true;
                    Part::Data(Bytes::new(), true)
                }
            };
            self.pending = Some(std::sync::Mutex::new(Box::pin(run_part(
                self.streams.clone(),
                self.direction,
                part,
            ))));
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Filters may change the body's length.
        SizeHint::default()
    }
}
