//! Opening connections to upstream endpoints: TCP with a connect timeout, optional TLS with SNI
//! and ALPN, and the cluster's connection limit (circuit breaker).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The cluster's `max_connections` is reached.
    #[error("upstream connection limit reached")]
    Overflow,
    /// The TCP connect did not finish in time.
    #[error("upstream connect timeout")]
    Timeout,
    /// TCP or TLS failed.
    #[error("upstream connect error: {0}")]
    Io(#[from] io::Error),
    /// The URI had no usable address.
    #[error("invalid upstream address")]
    BadAddress,
}

/// Counts of the cluster's connections, shared with its stats.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    /// Open connections.
    pub open: AtomicUsize,
    /// Connections being opened (requests waiting for a new connection).
    pub pending: AtomicUsize,
    /// Connections opened in total.
    pub total: std::sync::atomic::AtomicU64,
    /// Failed connection attempts.
    pub failures: std::sync::atomic::AtomicU64,
}

/// TLS settings for a cluster.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The rustls connector.
    pub connector: TlsConnector,
    /// SNI override; else the URI host.
    pub sni: Option<ServerName<'static>>,
}

/// The connector of one cluster.
#[derive(Clone)]
pub struct UpstreamConnector {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// TLS, if the cluster uses it.
    pub tls: Option<UpstreamTls>,
    /// Connection limit.
    pub max_connections: usize,
    /// Pending-connection limit.
    pub max_pending: usize,
    /// Shared counters.
    pub counts: Arc<ConnectionCounts>,
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await.map(TokioIo::new) })
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamConnector {
    async fn connect(&self, uri: Uri) -> Result<UpstreamStream, ConnectError> {
        let authority = uri.authority().ok_or(ConnectError::BadAddress)?;
        let addr: std::net::SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|_| ConnectError::BadAddress)?;
        self.connect_addr(addr).await
    }

    /// Open a connection to `addr` with the connect timeout, TLS and circuit breakers of this
    /// connector (also used directly for TCP proxying).
    pub async fn connect_addr(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<UpstreamStream, ConnectError> {
        let counts = &self.counts;
        // Reserve the connection slot before connecting, so concurrent connects cannot overshoot.
        if counts.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            counts.open.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnectError::Overflow);
        }
        let slot = ConnGuard(counts.clone());
        if counts.pending.fetch_add(1, Ordering::Relaxed) >= self.max_pending {
            counts.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(ConnectError::Overflow);
        }
        let _pending = PendingGuard(&counts.pending);
        let result = self.open(addr, slot).await;
        if result.is_err() {
            counts.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn open(
        &self,
        addr: std::net::SocketAddr,
        slot: ConnGuard,
    ) -> Result<UpstreamStream, ConnectError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        tcp.set_nodelay(true)?;
        self.counts.total.fetch_add(1, Ordering::Relaxed);
        let inner = match &self.tls {
            None => Inner::Plain(tcp),
            Some(tls) => {
                let name = match &tls.sni {
                    Some(n) => n.clone(),
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                let stream =
                    tokio::time::timeout(self.connect_timeout, tls.connector.connect(name, tcp))
                        .await
                        .map_err(|_| ConnectError::Timeout)??;
                Inner::Tls(Box::new(stream))
            }
        };
        Ok(UpstreamStream {
            inner,
            _guard: slot,
        })
    }
}

/// A reserved connection slot (counted in `open`) until dropped.
struct ConnGuard(Arc<ConnectionCounts>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection to an upstream endpoint.
pub struct UpstreamStream {
    inner: Inner,
    _guard: ConnGuard,
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match &self.inner {
            Inner::Plain(_) => Connected::new(),
            Inner::Tls(s) => {
                if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
