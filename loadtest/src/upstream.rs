//! The benchmark upstream: a small, fast HTTP/1.1 + h2c server answering fixed bodies.
//!
//! `GET /size/N` answers `N` bytes; any other path answers the default size. `GET /__stats`
//! answers `{"requests":N}`, the requests this listener served so far (the runner reads it to
//! check a weighted split). Bodies are slices of one shared buffer, so a response costs no copy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Largest body `/size/N` serves by default: 16 MiB.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Body size for paths other than `/size/N`.
    pub body_size: usize,
    /// Largest size `/size/N` may ask for; larger gets 400.
    pub max_body_size: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            body_size: 13,
            max_body_size: DEFAULT_MAX_BODY,
        }
    }
}

/// State shared by the connections of one listener.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    body: Bytes,
    requests: AtomicU64,
}

impl Upstream {
    /// An upstream answering as `config` says.
    pub fn new(config: UpstreamConfig) -> Arc<Self> {
        let len = config.max_body_size.max(config.body_size);
        let body = Bytes::from(
            b"0123456789abcdef"
                .iter()
                .copied()
                .cycle()
                .take(len)
                .collect::<Vec<u8>>(),
        );
        Arc::new(Self {
            config,
            body,
            requests: AtomicU64::new(0),
        })
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The response to `path`.
    pub fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        if path == "/__stats" {
            let body = format!("{{\"requests\":{}}}", self.requests());
            return response(StatusCode::OK, "application/json", Bytes::from(body));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let size = match path.strip_prefix("/size/") {
            None => self.config.body_size,
            Some(n) => match n.split(['/', '?']).next().unwrap_or("").parse::<usize>() {
                Ok(n) if n <= self.config.max_body_size => n,
                _ => {
                    return response(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        Bytes::from_static(b"bad size\n"),
                    );
                }
            },
        };
        response(StatusCode::OK, "text/plain", self.body.slice(..size))
    }

    /// Serves `listener` until the task is dropped; one task per connection. With `tls`, every
    /// connection is TLS (ALPN picks HTTP/2 or HTTP/1.1).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<()> {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                // Out of descriptors or similar: wait a little instead of spinning.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = this.respond(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Binds `addr` and serves it in a background task (over TLS with `tls`); returns the bound
/// address and the state.
pub async fn spawn(
    addr: SocketAddr,
    config: UpstreamConfig,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<(SocketAddr, Arc<Upstream>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let upstream = Upstream::new(config);
    tokio::spawn(upstream.clone().serve(listener, tls));
    Ok((local, upstream))
}

/// A TLS acceptor serving the PEM certificate chain and key given, with ALPN `h2` and `http/1.1`.
pub fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(resp: Response<Full<Bytes>>) -> (StatusCode, Bytes) {
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn sizes_by_path() {
        let up = Upstream::new(UpstreamConfig {
            body_size: 5,
            max_body_size: 1024,
        });
        assert_eq!(
            body_of(up.respond("/")).await,
            (StatusCode::OK, Bytes::from_static(b"01234"))
        );
        assert_eq!(body_of(up.respond("/size/0")).await.1.len(), 0);
        assert_eq!(body_of(up.respond("/size/1024")).await.1.len(), 1024);
        assert_eq!(body_of(up.respond("/size/20/x")).await.1.len(), 20);
        assert_eq!(
            body_of(up.respond("/size/1025")).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            body_of(up.respond("/size/abc")).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn stats_count_served_requests() {
        let up = Upstream::new(UpstreamConfig::default());
        up.respond("/");
        up.respond("/size/3");
        assert_eq!(up.requests(), 2);
        let (status, body) = body_of(up.respond("/__stats")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], br#"{"requests":2}"#);
        assert_eq!(up.requests(), 2, "stats requests are not counted");
    }
}
