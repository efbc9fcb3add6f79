//! Long-lived streams: gRPC bidirectional streaming with trailers, WebSocket echo across
//! reloads.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::*;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A gRPC-style echo server over h2c: every request message comes back as a response message as
/// soon as it arrives; trailers carry `grpc-status: 0` and a count.
pub(crate) async fn grpc_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    assert_eq!(req.headers()["content-type"], "application/grpc");
                    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        let mut n = 0;
                        while let Some(Ok(frame)) = body.frame().await {
                            // An empty DATA frame may carry END_STREAM; it is no message.
                            if let Ok(data) = frame
                                .into_data()
                                .map_err(drop)
                                .and_then(|d| if d.is_empty() { Err(()) } else { Ok(d) })
                            {
                                n += 1;
                                if tx.send(Ok(Frame::data(data))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("x-messages", n.to_string().parse().unwrap());
                        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    });
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv().await.map(|f| (f, rx))
                    });
                    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<Response<BoxBody>, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn grpc_message(payload: &[u8]) -> Bytes {
    let mut m = vec![0u8];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    Bytes::from(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidi_streaming_keeps_trailers() {
    let echo = grpc_echo().await;
    let cfg = format!(
        "{}routes:\n  - {{ name: grpc, timeout: 0s, backends: [ {{ cluster: grpc }} ] }}\nclusters:\n  - {{ name: grpc, protocol: http2, endpoints: [ {{ address: \"{echo}\" }} ] }}\n",
        base()
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    // Both an h2c and an HTTP/1.1 client: gRPC-Web style proxies send HTTP/1.1 with trailers
    // too, but gRPC proper is HTTP/2.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
    )));
    let req = Request::post(format!("http://{addr}/echo.Echo/Chat"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp_fut = tokio::spawn(async move { send.send_request(req).await });
    tx.send(Ok(Frame::data(grpc_message(b"one"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp_fut)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: the proxy streams, it does not buffer.
    for (i, msg) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
        if i > 0 {
            // A reload between messages does not cut the stream.
            gw.reload(&cfg.replace(
                "timeout: 0s",
                &format!("timeout: 0s, response_headers: {{ set: {{ x-v: \"{i}\" }} }}"),
            ))
            .await
            .unwrap();
            tx.send(Ok(Frame::data(grpc_message(msg)))).await.unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), grpc_message(msg));
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
    {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers arrive end to end");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-messages"], "3");
}

async fn ws_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_survives_50_reloads() {
    use tokio_tungstenite::tungstenite::Message;
    let echo = ws_echo().await;
    let cfg = |n: usize| {
        format!(
            "{}routes:\n  - {{ name: ws, match: {{ path: {{ prefix: /ws }} }}, backends: [ {{ cluster: ws }} ] }}\n  - {{ name: version, direct_response: {{ status: 200, body: \"v{n}\" }} }}\nclusters:\n  - {{ name: ws, endpoints: [ {{ address: \"{echo}\" }} ] }}\n",
            base()
        )
    };
    let gw = gateway(&cfg(0)).await;
    let addr = gw.addr("main").await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws/chat"), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for n in 1..=50 {
        gw.reload(&cfg(n)).await.unwrap();
        let text = format!("message {n}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
        assert_eq!(
            get(addr, "x", "/", &[]).await.body,
            format!("v{n}"),
            "new requests see the new table"
        );
    }
    ws.close(None).await.unwrap();
}
