//! Driving one request and its response through a chain of proxy-wasm filters, in Envoy's
//! order: request callbacks in chain order, response callbacks in reverse order.
//!
//! Two modes per direction. When every filter continues on the headers, bodies stream: each
//! chunk runs through the filters as it passes (`FilteredBody`), and a filter that pauses on a
//! chunk keeps it in the host until it continues. When a filter pauses on the headers, the body
//! is buffered (up to `BODY_BUFFER_LIMIT`) and handed to it, and to the filters after it, in one
//! piece, as Envoy does when a body arrives in one read.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Mutex;
use weir_wasm_host::{Decision, HttpStream, LocalReply, RequestHead, ResponseHead};

use crate::body::{BoxError, ProxyBody, full};

/// Largest body buffered for filters that pause on headers.
pub const BODY_BUFFER_LIMIT: usize = 1 << 20;

/// The streams of one request, one per filter, in chain order.
pub type Streams = Arc<Mutex<Vec<HttpStream>>>;

/// What the request callbacks decided.
pub enum RequestVerdict {
    /// Send upstream with this body.
    Forward(ProxyBody),
    /// Answer with this response (already through the response callbacks).
    Reply(Response<ProxyBody>, String),
    /// Reset the downstream stream.
    Reset,
}

/// Why the stream must end without a response.
#[derive(Debug, thiserror::Error)]
#[error("a filter reset the stream")]
pub struct FilterReset;

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
/// it only then. When the body to forward is not empty its length may have changed: drop
/// `content-length` and `transfer-encoding` from the head before sending it.
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
        drop(guard);
        if eos {
            return Ok(RequestVerdict::Forward(body));
        }
        // The filters may change the body's length as it streams.
        return Ok(RequestVerdict::Forward(FilteredBody::request(
            streams.clone(),
            body,
        )));
    };
    // A filter paused on the headers: buffer the body and give it whole to the filters.
    let mut data = match collect(body, BODY_BUFFER_LIMIT).await {
        Some(d) => d,
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
            data = held;
        }
    }
    Ok(RequestVerdict::Forward(full(data.freeze())))
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
    let mut body = BytesMut::from(&r.body[..]);
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
                body = held;
            }
        }
    }
    let head = Arc::unwrap_or_clone(head);
    let mut resp = Response::new(full(body.freeze()));
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

/// Run the response headers (and, if a filter pauses, the buffered body) through the chain in
/// reverse order.
pub async fn on_response(streams: &Streams, resp: Response<ProxyBody>) -> ResponseVerdict {
    let mut guard = streams.lock().await;
    let (parts, body) = resp.into_parts();
    let mut head = Arc::new(ResponseHead {
        status: parts.status,
        headers: parts.headers,
    });
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
    // The streams keep their views of the head: take it back, copied only if they must.
    let rebuild = |head: Arc<ResponseHead>, body: ProxyBody, length_may_change: bool| {
        let head = Arc::unwrap_or_clone(head);
        let mut r = Response::new(body);
        *r.status_mut() = head.status;
        *r.headers_mut() = head.headers;
        if length_may_change {
            // The filters may change the body's length.
            r.headers_mut().remove(http::header::CONTENT_LENGTH);
            r.headers_mut().remove(http::header::TRANSFER_ENCODING);
        }
        *r.version_mut() = parts.version;
        r
    };
    let Some(paused) = paused_at else {
        drop(guard);
        let body = if eos {
            body
        } else {
            FilteredBody::response(streams.clone(), body)
        };
        return ResponseVerdict::Send(rebuild(head, body, !eos));
    };
    let Some(mut data) = collect(body, BODY_BUFFER_LIMIT).await else {
        let r = LocalReply {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"Internal Server Error"),
            details: "response_payload_too_large".into(),
            grpc_status: None,
        };
        return ResponseVerdict::Reply(reply_response(&r), r.details.clone());
    };
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
            data = held;
        }
    }
    ResponseVerdict::Send(rebuild(head, full(data.freeze()), true))
}

/// Tell every stream where the request went.
pub async fn set_upstream(streams: &Streams, cluster: &str, addr: Option<std::net::SocketAddr>) {
    for s in streams.lock().await.iter_mut() {
        s.set_upstream(cluster, addr);
    }
}

/// Run `on_log`, `on_done`, `on_delete` on every stream (at the end of the response).
pub fn finish(streams: &Streams) {
    match streams.try_lock() {
        Ok(mut guard) => guard.iter_mut().for_each(HttpStream::finish),
        Err(_) => {
            let streams = streams.clone();
            tokio::spawn(
                async move { streams.lock().await.iter_mut().for_each(HttpStream::finish) },
            );
        }
    }
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
    /// The chain running on the current part. In a `Mutex` only to make the body `Sync`;
    /// it is reached through `&mut self` (`get_mut`), never locked.
    pending: Option<std::sync::Mutex<Pending>>,
    ready: std::collections::VecDeque<Frame<Bytes>>,
    done: bool,
}

impl FilteredBody {
    /// The downstream request body, through the chain in order.
    pub fn request(streams: Streams, inner: ProxyBody) -> ProxyBody {
        FilteredBody::boxed_with(streams, inner, Direction::Request)
    }

    /// The upstream response body, through the chain in reverse order.
    pub fn response(streams: Streams, inner: ProxyBody) -> ProxyBody {
        FilteredBody::boxed_with(streams, inner, Direction::Response)
    }

    fn boxed_with(streams: Streams, inner: ProxyBody, direction: Direction) -> ProxyBody {
        FilteredBody {
            inner,
            streams,
            direction,
            pending: None,
            ready: Default::default(),
            done: false,
        }
        .boxed()
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
    // Chain order for the request, reverse order for the response.
    let order = (0..n).map(|k| if request { k } else { n - 1 - k });
    match part {
        Part::Data(data, eos) => {
            // No copy when this is the only reference to the chunk.
            let mut buf = data
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            for i in order {
                let decision = if request {
                    guard[i].on_request_body(&mut buf, eos).await
                } else {
                    guard[i].on_response_body(&mut buf, eos).await
                };
                match decision {
                    Decision::Continue => {}
                    // The host keeps the bytes; they come back, accumulated, when the filter continues.
                    Decision::StopIteration if !eos => return Ok(Vec::new()),
                    Decision::StopIteration => {}
                    // Headers have gone out: a reply or a reset now can only reset the stream.
                    Decision::LocalReply(_) | Decision::Reset => return Err(Box::new(FilterReset)),
                }
            }
            Ok(if buf.is_empty() {
                Vec::new()
            } else {
                vec![Frame::data(buf.freeze())]
            })
        }
        Part::Trailers(mut trailers) => {
            let mut frames = Vec::new();
            for i in order {
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
                return Poll::Ready(Some(Ok(frame)));
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
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            if self.done {
                return Poll::Ready(None);
            }
            let part = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
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
