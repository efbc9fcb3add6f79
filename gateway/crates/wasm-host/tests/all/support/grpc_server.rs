//! A real gRPC bidi server over h2c on 127.0.0.1 (hyper), and the client side of `TestEnv`'s
//! `grpc_stream` (one HTTP/2 connection per stream).
//!
//! Methods (`/weir.Echo/...`):
//! - `Chat`: headers with `x-echo: initial`; every request message comes back as soon as it
//!   arrives, written in 3-byte DATA frames (so the host must reassemble it); when the request
//!   ends, trailers `grpc-status` (the request's `x-status`, default 0; with it `grpc-message:
//!   as asked`, percent-encoded) and `x-echo-trailer: done`.
//! - `Fail`: a trailers-only answer: `grpc-status: 5`, `grpc-message: no such thing`.
//! - `Flood`: a message `tick-N` every 5 ms until the stream is reset.
//! - `Big`: the prefix of a 5 MiB message and 1 KiB of it, then nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use weir_wasm_host::{CallError, GrpcRequestBody, GrpcResponseBody, GrpcStreamFuture};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type FrameTx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// What the server saw of one stream.
#[derive(Debug, Clone, Default)]
pub struct SeenStream {
    /// `:path`.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request messages, in order.
    pub messages: Vec<Bytes>,
    /// How the request side ended: `half-closed` (END_STREAM) or `reset`; `None` while open.
    pub ending: Option<&'static str>,
}

/// The running server.
pub struct GrpcServer {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenStream>>>,
}

impl GrpcServer {
    /// Start a server on 127.0.0.1 port 0.
    pub async fn start() -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<SeenStream>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(serve(req, log)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        GrpcServer { addr, seen }
    }

    /// Every stream seen so far, in arrival order.
    pub fn streams(&self) -> Vec<SeenStream> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait (up to 5 s) until the latest stream to `method` ended; that stream.
    pub async fn ended(&self, method: &str) -> SeenStream {
        let path = format!("/weir.Echo/{method}");
        for _ in 0..500 {
            let last = self.streams().into_iter().rev().find(|s| s.path == path);
            if let Some(s) = last
                && s.ending.is_some()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no {path} stream ended; seen: {:?}", self.streams());
    }
}

/// A framed gRPC message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(5 + message.len());
    f.push(0);
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    Bytes::from(f)
}

/// Take the complete messages out of `buf`.
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

fn serve(req: Request<Incoming>, log: Arc<Mutex<Vec<SeenStream>>>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let index = {
        let mut log = log.lock().unwrap();
        log.push(SeenStream {
            path: path.clone(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            headers: req.headers().clone(),
            ..SeenStream::default()
        });
        log.len() - 1
    };
    let status = req
        .headers()
        .get("x-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let body = req.into_body();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    match path.as_str() {
        "/weir.Echo/Fail" => {
            // Trailers-only: HEADERS with END_STREAM.
            headers.insert("grpc-status", HeaderValue::from_static("5"));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("no%20such%20thing"),
            );
            tokio::spawn(read_request(body, log, index, None));
            let mut response = Response::new(BodyExt::boxed(http_body_util::Empty::new()));
            *response.headers_mut() = headers;
            return response;
        }
        "/weir.Echo/Flood" => {
            tokio::spawn(read_request(body, log.clone(), index, None));
            tokio::spawn(async move {
                for i in 0.. {
                    let tick = frame(format!("tick-{i}").as_bytes());
                    if tx.send(Ok(Frame::data(tick))).await.is_err() {
                        mark(&log, index, "reset");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        "/weir.Echo/Big" => {
            tokio::spawn(read_request(body, log, index, None));
            tokio::spawn(async move {
                let mut start = vec![0];
                start.extend_from_slice(&(5u32 << 20).to_be_bytes());
                start.extend_from_slice(&[b'x'; 1024]);
                let _ = tx.send(Ok(Frame::data(Bytes::from(start)))).await;
                tx.closed().await;
            });
        }
        _ => {
            headers.insert("x-echo", HeaderValue::from_static("initial"));
            tokio::spawn(read_request(body, log, index, Some((tx, status))));
        }
    }
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *response.headers_mut() = headers;
    response
}

fn mark(log: &Mutex<Vec<SeenStream>>, index: usize, ending: &'static str) {
    let mut log = log.lock().unwrap();
    if log[index].ending.is_none() {
        log[index].ending = Some(ending);
    }
}

/// Read the request messages into the log; with `echo`, send each back in 3-byte DATA frames
/// and end with trailers when the request ends.
async fn read_request(
    mut body: Incoming,
    log: Arc<Mutex<Vec<SeenStream>>>,
    index: usize,
    echo: Option<(FrameTx, Option<String>)>,
) {
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => {
                mark(&log, index, "reset");
                return;
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                buf.extend_from_slice(&data);
                for m in messages(&mut buf) {
                    log.lock().unwrap()[index].messages.push(m.clone());
                    if let Some((tx, _)) = &echo {
                        for piece in frame(&m).chunks(3) {
                            let piece = Bytes::copy_from_slice(piece);
                            if tx.send(Ok(Frame::data(piece))).await.is_err() {
                                mark(&log, index, "reset");
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
    mark(&log, index, "half-closed");
    if let Some((tx, status)) = echo {
        let mut trailers = HeaderMap::new();
        let code = status.as_deref().unwrap_or("0");
        trailers.insert("grpc-status", HeaderValue::from_str(code).unwrap());
        if status.is_some() {
            trailers.insert("grpc-message", HeaderValue::from_static("as%20asked"));
        }
        trailers.insert("x-echo-trailer", HeaderValue::from_static("done"));
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    }
}

/// The client side of `TestEnv::grpc_stream`: the request over a new HTTP/2 connection to
/// `addr`, with `:authority` = the cluster name.
pub fn connect(
    addr: SocketAddr,
    cluster: &str,
    request: Request<GrpcRequestBody>,
) -> GrpcStreamFuture {
    let cluster = cluster.to_owned();
    Box::pin(async move {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| CallError::Reset(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| CallError::Reset(e.to_string()))?;
        tokio::spawn(conn);
        let (mut parts, body) = request.into_parts();
        parts.uri = format!("http://{cluster}{}", parts.uri.path())
            .parse()
            .map_err(|_| CallError::Reset("bad path".into()))?;
        parts.headers.remove(http::header::HOST);
        let response = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| CallError::Reset(e.to_string()))?;
        Ok(response.map(|b| -> GrpcResponseBody { Box::pin(b.map_err(Into::into)) }))
    })
}

/// gRPC clusters of a `TestEnv`: name → address.
pub type GrpcClusters = Mutex<HashMap<String, SocketAddr>>;
