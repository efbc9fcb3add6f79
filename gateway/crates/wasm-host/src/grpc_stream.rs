//! gRPC streams opened by filters (`proxy_grpc_stream`): the request body the filter feeds, the
//! task that turns the upstream's response into events, the message decoder, the table of a
//! VM's open streams, and the delivery of events to the guest.
//!
//! Envoy's semantics: a stream belongs to the context that opened it; `proxy_grpc_send` frames
//! and sends one message (`end_stream` half-closes); `proxy_grpc_close` half-closes the local
//! side while the upstream may still answer; `proxy_grpc_cancel` resets the stream and no
//! callback follows. The upstream's headers arrive as initial metadata (map 4), each message as
//! `proxy_on_grpc_receive` (buffer 5), its trailers as trailing metadata (map 5), and the end as
//! `proxy_on_grpc_close` with the gRPC status (code and message in `proxy_get_status`). A
//! stream ends with its owning context and with its VM (dropping its entry aborts its task).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use crate::error::CallError;
use crate::plugin::BgEvent;
use crate::state::{Phase, RootSpec};
use crate::types::{Status, map};
use crate::vm::{Exports, Failure, Vm};

/// Largest message accepted from the upstream (4 MiB, gRPC's default receive limit); a larger
/// one closes the stream with RESOURCE_EXHAUSTED.
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Events an HTTP stream context's inbox holds before its driver delivers them; past it the
/// stream's task waits (and HTTP/2 flow control slows the upstream down).
const INBOX_CAPACITY: usize = 64;

/// The gRPC status codes the host produces itself.
mod code {
    pub(super) const UNKNOWN: u32 = 2;
    pub(super) const PERMISSION_DENIED: u32 = 7;
    pub(super) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(super) const UNIMPLEMENTED: u32 = 12;
    pub(super) const INTERNAL: u32 = 13;
    pub(super) const UNAVAILABLE: u32 = 14;
    pub(super) const UNAUTHENTICATED: u32 = 16;
}

/// The request body of a gRPC stream opened by a filter: the filter's messages, each already
/// framed (5-byte gRPC prefix), in the order it sent them. It ends when the filter half-closes
/// (`proxy_grpc_send` with `end_stream`, or `proxy_grpc_close`), and fails with
/// [`GrpcStreamCancelled`] when the filter cancels the stream or its context or VM goes away
/// first (an HTTP/2 client then resets the stream rather than half-closing it).
pub struct GrpcRequestBody {
    /// A message, or `None` for the half-close.
    rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    ended: bool,
}

impl Body for GrpcRequestBody {
    type Data = Bytes;
    type Error = GrpcStreamCancelled;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, GrpcStreamCancelled>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        self.rx.poll_recv(cx).map(|m| match m {
            Some(Some(message)) => Some(Ok(Frame::data(message))),
            Some(None) => {
                self.ended = true;
                None
            }
            None => Some(Err(GrpcStreamCancelled)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The error of a [`GrpcRequestBody`] whose stream was cancelled before the filter
/// half-closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("gRPC stream cancelled by the filter (or its context or VM ended)")]
pub struct GrpcStreamCancelled;

impl std::fmt::Debug for GrpcRequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcRequestBody").finish_non_exhaustive()
    }
}

/// The response body of a gRPC stream, as [`crate::HostEnv::grpc_stream`] answers it: DATA
/// frames with the messages, then trailers.
pub type GrpcResponseBody = Pin<
    Box<dyn Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Send + 'static>,
>;

/// What [`crate::HostEnv::grpc_stream`] answers: the upstream's response, once its headers came.
pub type GrpcStreamFuture = BoxFuture<'static, Result<http::Response<GrpcResponseBody>, CallError>>;

/// One thing that happened on a stream, for the guest.
#[derive(Debug)]
pub(crate) enum Event {
    /// The response headers (`which` = map 4, with `:status`) or the trailers (map 5, also for a
    /// trailers-only response).
    Metadata {
        which: i32,
        headers: HeaderMap,
        status: Option<StatusCode>,
    },
    /// One whole message.
    Message(Bytes),
    /// The stream ended with this gRPC status.
    Close { code: u32, message: String },
}

/// An event of stream `token`; `id` tells a stream from a later one with the same token (or in
/// a recreated VM).
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) token: u32,
    id: u64,
    event: Event,
}

/// Where a stream's task sends its events.
pub(crate) enum Sink {
    /// A root context's stream: to the replica's background task.
    Root {
        events: mpsc::UnboundedSender<BgEvent>,
        owner: u32,
    },
    /// An HTTP stream context's stream: to its inbox, drained by its driver.
    Stream(mpsc::Sender<Delivery>),
}

impl Sink {
    /// Hand over `delivery`; false when nobody listens any more.
    async fn send(&self, delivery: Delivery) -> bool {
        match self {
            Sink::Root { events, owner } => events
                .send(BgEvent::Grpc {
                    owner: *owner,
                    delivery,
                })
                .is_ok(),
            Sink::Stream(tx) => tx.send(delivery).await.is_ok(),
        }
    }
}

/// The events of the gRPC streams an HTTP stream context opened, waiting for its driver.
pub(crate) struct Inbox {
    tx: mpsc::Sender<Delivery>,
    rx: mpsc::Receiver<Delivery>,
}

impl Inbox {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        Inbox { tx, rx }
    }

    /// A sink for one more stream of this context.
    pub(crate) fn sink(&self) -> Sink {
        Sink::Stream(self.tx.clone())
    }

    /// An event that is already there.
    pub(crate) fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// The next event, whenever it comes.
    pub(crate) async fn next(&mut self) -> Delivery {
        match self.rx.recv().await {
            Some(d) => d,
            // Unreachable while `self.tx` lives; never resolve rather than spin.
            None => std::future::pending().await,
        }
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// The outbound side of a new stream: the sender the host writes framed messages into, and the
/// request body that reads them.
pub(crate) fn outbound() -> (mpsc::UnboundedSender<Option<Bytes>>, GrpcRequestBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, GrpcRequestBody { rx, ended: false })
}

/// One open stream of a VM.
struct Entry {
    id: u64,
    /// The context that opened it (a root or an HTTP stream context).
    owner: u32,
    /// `None` once the filter half-closed (dropping it unclosed cancels the request body).
    outbound: Option<mpsc::UnboundedSender<Option<Bytes>>>,
    task: tokio::task::AbortHandle,
    local_closed: bool,
    remote_closed: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Dropping the response and the request body resets the HTTP/2 stream.
        self.task.abort();
    }
}

/// The gRPC streams of one VM, by token, and the metadata the current callback may read.
#[derive(Default)]
pub(crate) struct GrpcStreams {
    entries: HashMap<u32, Entry>,
    metadata: Option<(i32, HeaderMap, Option<StatusCode>)>,
}

impl GrpcStreams {
    /// Whether `token` is an open (or not yet forgotten) stream.
    pub(crate) fn contains(&self, token: u32) -> bool {
        self.entries.contains_key(&token)
    }

    /// Run stream `token` of `owner`: a task on `rt` reads `response` into events for `sink`.
    pub(crate) fn start(
        &mut self,
        rt: &tokio::runtime::Handle,
        token: u32,
        owner: u32,
        outbound: mpsc::UnboundedSender<Option<Bytes>>,
        response: GrpcStreamFuture,
        sink: Sink,
    ) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let task = rt.spawn(run(response, sink, token, id)).abort_handle();
        self.entries.insert(
            token,
            Entry {
                id,
                owner,
                outbound: Some(outbound),
                task,
                local_closed: false,
                remote_closed: false,
            },
        );
    }

    /// `proxy_grpc_send`: frame `message` and send it; `end_stream` half-closes. After the
    /// upstream closed, the message is dropped (as in Envoy); after the filter half-closed, it
    /// is refused.
    pub(crate) fn send(
        &mut self,
        token: u32,
        message: &[u8],
        end_stream: bool,
    ) -> Result<(), Status> {
        let entry = self.entries.get_mut(&token).ok_or(Status::NotFound)?;
        let tx = entry.outbound.as_ref().ok_or(Status::BadArgument)?;
        let len = u32::try_from(message.len()).map_err(|_| Status::BadArgument)?;
        let mut frame = BytesMut::with_capacity(5 + message.len());
        frame.put_u8(0);
        frame.put_u32(len);
        frame.extend_from_slice(message);
        let _ = tx.send(Some(frame.freeze()));
        if end_stream {
            let _ = tx.send(None);
            entry.outbound = None;
        }
        Ok(())
    }

    /// `proxy_grpc_close`: half-close the local side; the upstream may still deliver. The
    /// stream is forgotten once both sides are closed.
    pub(crate) fn close(&mut self, token: u32) -> Result<(), Status> {
        let entry = self.entries.get_mut(&token).ok_or(Status::NotFound)?;
        if let Some(tx) = entry.outbound.take() {
            let _ = tx.send(None);
        }
        if entry.remote_closed {
            self.entries.remove(&token);
        } else {
            entry.local_closed = true;
        }
        Ok(())
    }

    /// `proxy_grpc_cancel`: reset the stream; no callback follows.
    pub(crate) fn cancel(&mut self, token: u32) -> Result<(), Status> {
        self.entries
            .remove(&token)
            .map(drop)
            .ok_or(Status::NotFound)
    }

    /// Reset every stream `owner` opened (its context is being deleted).
    pub(crate) fn cancel_owned_by(&mut self, owner: u32) {
        // Every stream context ends here; most opened no gRPC stream (and `retain` walks the
        // whole table, however empty).
        if self.entries.is_empty() {
            return;
        }
        self.entries.retain(|_, e| e.owner != owner);
    }

    /// The metadata map `which` (4 or 5) while its callback runs, with `:status` for the
    /// response headers.
    pub(crate) fn metadata(&self, which: i32) -> Option<(&HeaderMap, Option<StatusCode>)> {
        match &self.metadata {
            Some((w, m, status)) if *w == which => Some((m, *status)),
            _ => None,
        }
    }

    /// Whether `d` belongs to a stream still open here (not cancelled, not of an older VM); a
    /// close marks the remote side closed.
    fn accept(&mut self, d: &Delivery) -> bool {
        match self.entries.get_mut(&d.token) {
            Some(e) if e.id == d.id => {
                if matches!(d.event, Event::Close { .. }) {
                    e.remote_closed = true;
                }
                true
            }
            _ => false,
        }
    }

    /// After `proxy_on_grpc_close`: forget the stream if the filter closed its side too.
    fn closed_remotely(&mut self, token: u32, id: u64) {
        if self
            .entries
            .get(&token)
            .is_some_and(|e| e.id == id && e.local_closed)
        {
            self.entries.remove(&token);
        }
    }
}

type Callback = fn(&Exports) -> &Option<wasmtime::TypedFunc<(i32, i32, i32), ()>>;

/// Hand one event to the guest with `owner` as the effective context; the callback's context
/// argument is the root context `root` (as in Envoy, where streams belong to root contexts).
/// Events of a cancelled stream, or of a stream of a discarded VM, are dropped.
pub(crate) fn deliver(
    vm: &mut Vm,
    spec: &RootSpec,
    root: u32,
    owner: u32,
    d: Delivery,
) -> Result<(), Failure> {
    let state = vm.store.data_mut();
    if !state.grpc.accept(&d) {
        return Ok(());
    }
    state.effective = owner;
    state.phase = Phase::Running;
    let (token, id) = (d.token, d.id);
    let (callback, arg, closed): (Callback, usize, bool) = match d.event {
        Event::Metadata {
            which,
            headers,
            status,
        } => {
            let n = headers.len() + usize::from(status.is_some());
            state.grpc.metadata = Some((which, headers, status));
            let f: Callback = if which == map::GRPC_INITIAL_METADATA {
                |ex| &ex.grpc_initial_metadata
            } else {
                |ex| &ex.grpc_trailing_metadata
            };
            (f, n, false)
        }
        Event::Message(m) => {
            let n = m.len();
            state.grpc_message = Some(m);
            (|ex| &ex.grpc_receive, n, false)
        }
        Event::Close { code, message } => {
            state.last_status = (code, Bytes::from(message));
            (|ex| &ex.grpc_close, code as usize, true)
        }
    };
    let r = vm.guarded(
        spec.limits.callback_deadline,
        &spec.stats,
        |ex, store| match callback(ex) {
            Some(f) => f.call(store, (root as i32, token as i32, arg as i32)),
            None => Ok(()),
        },
    );
    let state = vm.store.data_mut();
    state.grpc.metadata = None;
    state.grpc_message = None;
    state.last_status = (0, Bytes::new());
    if closed {
        state.grpc.closed_remotely(token, id);
    }
    r
}

/// The task of one stream: wait for the response, decode it into events, end with a close.
async fn run(response: GrpcStreamFuture, sink: Sink, token: u32, id: u64) {
    let deliver = |event| sink.send(Delivery { token, id, event });
    let end = read(response, &deliver).await;
    if let Some((code, message)) = end {
        deliver(Event::Close { code, message }).await;
    }
}

/// Read the response into events; the status the stream ends with, or `None` when the owner
/// stopped listening. Returning drops the response body, which resets the stream if it is not
/// over.
async fn read<F, Fut>(response: GrpcStreamFuture, deliver: &F) -> Option<(u32, String)>
where
    F: Fn(Event) -> Fut,
    Fut: Future<Output = bool>,
{
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return Some((code::UNAVAILABLE, e.to_string())),
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != StatusCode::OK {
        return Some((
            grpc_code_of_http(parts.status),
            format!("upstream answered HTTP {}", parts.status.as_u16()),
        ));
    }
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only: the headers are the trailers.
        let end = status_of(&parts.headers);
        let event = Event::Metadata {
            which: map::GRPC_TRAILING_METADATA,
            headers: parts.headers,
            status: Some(parts.status),
        };
        return deliver(event).await.then_some(end);
    }
    let event = Event::Metadata {
        which: map::GRPC_INITIAL_METADATA,
        headers: parts.headers,
        status: Some(parts.status),
    };
    if !deliver(event).await {
        return None;
    }
    let mut decoder = Decoder::default();
    loop {
        let frame = match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Some((code::INTERNAL, format!("upstream stream failed: {e}"))),
            None => {
                return Some((
                    code::UNKNOWN,
                    "upstream ended the stream without trailers".into(),
                ));
            }
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let messages = match decoder.push(&data) {
                    Ok(messages) => messages,
                    Err(end) => return Some(end),
                };
                for message in messages {
                    if !deliver(Event::Message(message)).await {
                        return None;
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            continue;
        };
        if !decoder.is_empty() {
            return Some((code::INTERNAL, "upstream truncated a message".into()));
        }
        let end = status_of(&trailers);
        let event = Event::Metadata {
            which: map::GRPC_TRAILING_METADATA,
            headers: trailers,
            status: None,
        };
        return deliver(event).await.then_some(end);
    }
}

/// The gRPC status of trailers (or of a trailers-only response): `grpc-status` and the
/// percent-decoded `grpc-message`; UNKNOWN when `grpc-status` is missing or not a number.
fn status_of(trailers: &HeaderMap) -> (u32, String) {
    let code = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let message = trailers
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    match code {
        Some(code) => (code, message),
        None => (code::UNKNOWN, "upstream sent no valid grpc-status".into()),
    }
}

/// The gRPC status for a non-200 HTTP response (gRPC's HTTP-to-gRPC status mapping).
fn grpc_code_of_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// Reassembles length-prefixed gRPC messages from DATA frames (a message may span frames; a
/// frame may hold several messages).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Add `data` and take out every complete message. Errs (with the gRPC status that ends the
    /// stream) on a compressed or flagged message, or one larger than [`MAX_MESSAGE_BYTES`]
    /// (known from its prefix, before it is buffered).
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<Vec<Bytes>, (u32, String)> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while self.buf.len() >= 5 {
            let flags = self.buf[0];
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            let len = len as usize;
            if flags != 0 {
                return Err((
                    code::INTERNAL,
                    "compressed gRPC messages are not supported".into(),
                ));
            }
            if len > MAX_MESSAGE_BYTES {
                return Err((
                    code::RESOURCE_EXHAUSTED,
                    format!("gRPC message of {len} bytes is larger than {MAX_MESSAGE_BYTES}"),
                ));
            }
            if self.buf.len() < 5 + len {
                break;
            }
            self.buf.advance(5);
            out.push(self.buf.split_to(len).freeze());
        }
        Ok(out)
    }

    /// Whether no partial message is buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(m: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m);
        f
    }

    #[test]
    fn messages_split_across_frames_are_reassembled() {
        let mut d = Decoder::default();
        let mut wire = frame(b"hello");
        wire.extend(frame(b""));
        wire.extend(frame(b"world!"));
        let mut got = Vec::new();
        for piece in wire.chunks(3) {
            got.extend(d.push(piece).unwrap());
        }
        assert_eq!(got, [&b"hello"[..], b"", b"world!"]);
        assert!(d.is_empty());
    }

    #[test]
    fn several_messages_in_one_frame_and_a_partial_tail() {
        let mut d = Decoder::default();
        let mut wire = frame(b"a");
        wire.extend(frame(b"bc"));
        wire.extend(&frame(b"def")[..4]);
        assert_eq!(d.push(&wire).unwrap(), [&b"a"[..], b"bc"]);
        assert!(!d.is_empty(), "a partial prefix stays buffered");
        assert_eq!(d.push(&frame(b"def")[4..]).unwrap(), [&b"def"[..]]);
    }

    #[test]
    fn oversized_and_compressed_messages_end_the_stream() {
        let mut d = Decoder::default();
        let mut big = vec![0];
        big.extend_from_slice(&((MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        let (code, message) = d.push(&big).unwrap_err();
        assert_eq!(code, code::RESOURCE_EXHAUSTED);
        assert!(message.contains("larger than"), "{message}");
        let mut d = Decoder::default();
        assert_eq!(
            d.push(&[1, 0, 0, 0, 1, b'x']).unwrap_err().0,
            code::INTERNAL
        );
    }

    #[test]
    fn status_from_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "7".parse().unwrap());
        t.insert("grpc-message", "no%20way%21".parse().unwrap());
        assert_eq!(status_of(&t), (7, "no way!".into()));
        assert_eq!(status_of(&HeaderMap::new()).0, code::UNKNOWN);
        assert_eq!(grpc_code_of_http(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_code_of_http(StatusCode::NOT_FOUND), 12);
    }
}
