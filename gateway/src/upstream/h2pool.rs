//! HTTP/2 connections to upstream endpoints: one multiplexed connection per endpoint, opened on
//! demand and replaced when it closes. (HTTP/1.1 goes through hyper-util's pooled client.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::connector::{ConnectError, UpstreamConnector};
use crate::body::ProxyBody;

/// Errors from the HTTP/2 pool.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP/2 handshake failed.
    #[error("upstream HTTP/2 handshake failed: {0}")]
    Handshake(hyper::Error),
}

/// Per-endpoint HTTP/2 connections of one cluster.
pub struct H2Pool {
    connector: Mutex<UpstreamConnector>,
    conns: Mutex<HashMap<SocketAddr, SendRequest<ProxyBody>>>,
    max_concurrent_streams: u32,
}

impl H2Pool {
    /// A pool connecting with `connector`.
    pub fn new(connector: UpstreamConnector) -> H2Pool {
        H2Pool {
            connector: Mutex::new(connector),
            conns: Mutex::new(HashMap::new()),
            max_concurrent_streams: 1024,
        }
    }

    /// A ready sender to `addr`, connecting if there is none.
    pub async fn sender(&self, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, H2Error> {
        if let Some(s) = self.conns.lock().expect("h2 pool lock").get(&addr)
            && s.is_ready()
        {
            return Ok(s.clone());
        }
        let fut = {
            let mut c = self.connector.lock().expect("h2 pool lock");
            c.call(
                format!("http://{addr}/")
                    .parse()
                    .expect("socket address is a valid URI"),
            )
        };
        let io = fut.await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .initial_max_send_streams(self.max_concurrent_streams as usize);
        let (sender, conn) = builder.handshake(io).await.map_err(H2Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection closed");
            }
        });
        self.conns
            .lock()
            .expect("h2 pool lock")
            .insert(addr, sender.clone());
        Ok(sender)
    }
}
