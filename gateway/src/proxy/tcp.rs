//! TCP proxying for `protocol: tcp` listeners (Envoy's `tcp_proxy`): each downstream
//! connection (TLS terminated if configured) is connected to one endpoint of the listener's
//! cluster and bytes are relayed both ways, through the listener's network filters, with
//! half-close, an idle timeout, byte counters and one access-log line per connection.
//!
//! One task per connection drives both directions as an event loop: reads, writes, the
//! upstream connect and the filters' events are branches of one `select!`, with a bounded
//! output buffer per direction (reading stops while the other side does not drain it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use weir_wasm_host::{Direction, NetworkEvent, PeerType, StreamInfo, TlsInfo};

use crate::Shared;
use crate::filter::network::{Flow, NetworkChain};
use crate::snapshot::{ListenerSpec, Snapshot, TcpProxySpec};
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics::TcpStats;
use crate::upstream::cluster::{Cluster, PickContext};
use crate::upstream::connector::{ConnectError, UpstreamStream};
use crate::upstream::endpoint::{ActiveConnection, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes read at once from either side.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes waiting to be written to one side before reading from the other side stops.
const HIGH_WATERMARK: usize = 256 * 1024;
/// How long a connection closed by a filter may take to flush what it owes the client.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// What the relay knows about the downstream connection.
pub struct Downstream {
    /// Connection id (the `connection_id` property).
    pub id: u64,
    /// Client address (from PROXY protocol when enabled).
    pub remote: SocketAddr,
    /// Listener address the client reached.
    pub local: SocketAddr,
}

/// Serve one connection of a `tcp` listener until it ends, then log it.
pub async fn serve(
    shared: Arc<Shared>,
    spec: ListenerSpec,
    tcp: TcpProxySpec,
    stream: TcpStream,
    downstream: Downstream,
    listener_stopped: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let stats = shared.registry.tcp(&spec.name);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = Gauge(stats.clone());
    let snapshot = shared.snapshot.load_full();
    let mut conn = Connection {
        shared,
        snapshot,
        spec,
        tcp,
        downstream,
        stats,
        start: SystemTime::now(),
        started: Instant::now(),
        tls: None,
        listener_stopped,
    };
    match conn.spec.tls.clone() {
        None => {
            conn.relay(stream).await;
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let tls_stream = tokio::time::timeout(
                conn.spec.limits.request_header_timeout,
                acceptor.accept(stream),
            )
            .await??;
            let (_, session) = tls_stream.get_ref();
            conn.tls = Some(TlsInfo {
                version: match session.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
                    _ => String::new(),
                },
                sni: session.server_name().map(str::to_string),
                ..TlsInfo::default()
            });
            conn.relay(tls_stream).await;
        }
    }
    Ok(())
}

/// Decrements the listener's open-connection gauge when dropped.
struct Gauge(Arc<TcpStats>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection being proxied.
struct Connection {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    spec: ListenerSpec,
    tcp: TcpProxySpec,
    downstream: Downstream,
    stats: Arc<TcpStats>,
    start: SystemTime,
    started: Instant,
    tls: Option<TlsInfo>,
    listener_stopped: watch::Receiver<bool>,
}

/// One side's state in the relay.
#[derive(Default)]
struct Side {
    /// Bytes waiting to be written to this side.
    out: BytesMut,
    /// Half-close this side once `out` is written.
    shutdown_wanted: bool,
    /// Its write side is shut down.
    shut: bool,
    /// It ended its sending side (EOF) or failed: it closed, not us.
    ended: bool,
}

/// How the relay ended, for the filters and the access log.
#[derive(Default)]
struct Outcome {
    /// Response flags (`UF`, `UO`, `UH`, `UC`, `DC`).
    flags: Vec<&'static str>,
    /// Why the gateway closed the connection, if it did (`%RESPONSE_CODE_DETAILS%`).
    details: &'static str,
    /// The upstream connect error.
    upstream_failure: Option<String>,
    bytes_received: u64,
    bytes_sent: u64,
}

/// Something the relay's `select!` saw.
enum Event {
    DownRead(std::io::Result<usize>),
    UpRead(std::io::Result<usize>),
    /// Bytes written to the client, or `None`: its write side was shut down.
    DownWrote(std::io::Result<Option<usize>>),
    /// Bytes written to the upstream, or `None`: its write side was shut down.
    UpWrote(std::io::Result<Option<usize>>),
    Connected(Result<UpstreamStream, ConnectError>),
    Filter(usize, NetworkEvent),
    Idle,
    Drain,
    DrainDeadline,
}

/// An upstream connection being opened.
type Connecting = BoxFuture<'static, Result<UpstreamStream, ConnectError>>;

/// The upstream endpoint chosen for a relay.
struct Upstream {
    cluster: Arc<Cluster>,
    endpoint: Arc<Endpoint>,
    _active: ActiveConnection,
}

/// Write `out` to `w`, or shut `w` down when nothing is left to write.
async fn write_or_shutdown<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &[u8],
) -> std::io::Result<Option<usize>> {
    if out.is_empty() {
        w.shutdown().await.map(|()| None)
    } else {
        w.write(out).await.map(Some)
    }
}

impl Connection {
    /// Relay bytes between the client and the upstream until both sides are done (or an
    /// error, a filter, the idle timeout or a drain ends it), then run the filters' close
    /// callbacks and log the connection.
    async fn relay<S>(&mut self, client: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let info = Arc::new(StreamInfo {
            source: Some(self.downstream.remote),
            destination: Some(self.downstream.local),
            connection_id: self.downstream.id,
            tls: self.tls.clone(),
            cluster_name: self.tcp.cluster.as_str().into(),
            listener_name: self.spec.name.clone(),
            start_time: self.start,
            ..StreamInfo::default()
        });
        let links = self
            .snapshot
            .listener_filters
            .get(&self.spec.name)
            .cloned()
            .unwrap_or_default();
        let mut chain = NetworkChain::new(&links, &info);
        let (mut reader, mut writer) = tokio::io::split(client);
        let mut down = Side::default();
        let mut up = Side::default();
        let mut upstream: Option<Upstream> = None;
        let mut connecting: Option<Connecting> = None;
        let mut up_reader: Option<ReadHalf<UpstreamStream>> = None;
        let mut up_writer: Option<WriteHalf<UpstreamStream>> = None;
        let mut outcome = Outcome::default();
        let mut down_buf = BytesMut::new();
        let mut up_buf = BytesMut::new();
        let mut down_eof = false;
        let mut up_eof = false;
        let mut last_activity = Instant::now();
        let mut drain_at: Option<Instant> = None;
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut listener_stopped = self.listener_stopped.clone();
        let idle_timeout = self.spec.limits.idle_timeout;
        // One timer, moved forward only when it fires early (not on every byte).
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);

        let mut flow = Some((Direction::Downstream, chain.start()));
        let closed_by_filter = loop {
            // Apply what the last event passed through the filters.
            if let Some((direction, f)) = flow.take() {
                match f {
                    Flow::Held => {}
                    Flow::Close => {
                        outcome.details = "wasm_close";
                        break true;
                    }
                    Flow::Forward(data, eos) => {
                        let to = match direction {
                            Direction::Downstream => &mut up,
                            Direction::Upstream => &mut down,
                        };
                        if to.out.is_empty() {
                            to.out = data;
                        } else {
                            to.out.extend_from_slice(&data);
                        }
                        to.shutdown_wanted |= eos;
                        if direction == Direction::Downstream && upstream.is_none() {
                            match self.pick(&mut chain) {
                                Ok((u, connect)) => {
                                    upstream = Some(u);
                                    connecting = Some(connect);
                                }
                                Err(flag) => {
                                    outcome.flags.push(flag);
                                    outcome.details = "no_healthy_upstream";
                                    self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                                    break false;
                                }
                            }
                        }
                    }
                }
            }
            if down_eof && up_eof && down.shut && up.shut {
                break false;
            }
            let connected = up_writer.is_some();
            let read_down = !down_eof && up.out.len() < HIGH_WATERMARK;
            let read_up = connected && !up_eof && down.out.len() < HIGH_WATERMARK;
            let write_up = connected && (!up.out.is_empty() || (up.shutdown_wanted && !up.shut));
            let write_down = !down.out.is_empty() || (down.shutdown_wanted && !down.shut);
            down_buf.reserve(READ_CHUNK);
            up_buf.reserve(READ_CHUNK);
            let event = tokio::select! {
                r = reader.read_buf(&mut down_buf), if read_down => Event::DownRead(r),
                r = async {
                    up_reader.as_mut().expect("connected").read_buf(&mut up_buf).await
                }, if read_up => Event::UpRead(r),
                r = async {
                    write_or_shutdown(up_writer.as_mut().expect("connected"), &up.out).await
                }, if write_up => Event::UpWrote(r),
                r = write_or_shutdown(&mut writer, &down.out), if write_down => Event::DownWrote(r),
                r = async {
                    connecting.as_mut().expect("connecting").await
                }, if connecting.is_some() => Event::Connected(r),
                (i, e) = chain.next_event() => Event::Filter(i, e),
                _ = idle.as_mut() => Event::Idle,
                _ = crate::flag_set(&mut shutdown), if drain_at.is_none() => Event::Drain,
                _ = crate::flag_set(&mut listener_stopped), if drain_at.is_none() => Event::Drain,
                _ = async {
                    tokio::time::sleep_until(drain_at.expect("draining").into()).await
                }, if drain_at.is_some() => Event::DrainDeadline,
            };
            match event {
                Event::DownRead(Ok(0)) => {
                    down_eof = true;
                    down.ended = true;
                    flow = Some((
                        Direction::Downstream,
                        chain.downstream(BytesMut::new(), true),
                    ));
                }
                Event::DownRead(Ok(n)) => {
                    last_activity = Instant::now();
                    outcome.bytes_received += n as u64;
                    self.stats
                        .received_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    flow = Some((
                        Direction::Downstream,
                        chain.downstream(down_buf.split(), false),
                    ));
                }
                Event::UpRead(Ok(0)) => {
                    up_eof = true;
                    up.ended = true;
                    flow = Some((Direction::Upstream, chain.upstream(BytesMut::new(), true)));
                }
                Event::UpRead(Ok(_)) => {
                    last_activity = Instant::now();
                    flow = Some((Direction::Upstream, chain.upstream(up_buf.split(), false)));
                }
                Event::UpWrote(Ok(Some(n))) => {
                    last_activity = Instant::now();
                    up.out.advance(n);
                }
                Event::UpWrote(Ok(None)) => up.shut = true,
                Event::DownWrote(Ok(Some(n))) => {
                    last_activity = Instant::now();
                    down.out.advance(n);
                    outcome.bytes_sent += n as u64;
                    self.stats.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Event::DownWrote(Ok(None)) => down.shut = true,
                Event::DownRead(Err(_)) | Event::DownWrote(Err(_)) => {
                    down.ended = true;
                    outcome.flags.push("DC");
                    break false;
                }
                Event::UpRead(Err(_)) | Event::UpWrote(Err(_)) => {
                    up.ended = true;
                    outcome.flags.push("UC");
                    break false;
                }
                Event::Connected(r) => {
                    connecting = None;
                    let Some(u) = upstream.as_ref() else {
                        continue;
                    };
                    match r {
                        Ok(stream) => {
                            u.cluster.record_outcome(&u.endpoint, false, false);
                            let (r, w) = tokio::io::split(stream);
                            up_reader = Some(r);
                            up_writer = Some(w);
                        }
                        Err(e) => {
                            self.connect_failed(u, &e, &mut outcome);
                            break false;
                        }
                    }
                }
                Event::Filter(i, NetworkEvent::Resumed(direction)) => {
                    flow = Some((direction, chain.resume(i, direction)));
                }
                Event::Filter(_, NetworkEvent::Close) => {
                    outcome.details = "wasm_close";
                    break true;
                }
                Event::Idle => {
                    let due = last_activity + idle_timeout;
                    if due > Instant::now() {
                        idle.as_mut().reset(due.into());
                        continue;
                    }
                    outcome.details = "idle_timeout";
                    break false;
                }
                Event::Drain => {
                    let drain = self.shared.snapshot.load().drain_timeout;
                    drain_at = Some(Instant::now() + drain);
                }
                Event::DrainDeadline => {
                    outcome.details = "drained";
                    break false;
                }
            }
        };
        if closed_by_filter {
            // Envoy's FlushWrite: what the client is owed is sent before the close.
            let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                writer.write_all(&down.out).await?;
                outcome.bytes_sent += down.out.len() as u64;
                writer.shutdown().await
            })
            .await;
        }
        let connected = up_reader.is_some();
        let peer = |side: &Side| {
            if side.ended {
                PeerType::Remote
            } else {
                PeerType::Local
            }
        };
        chain.finish(connected.then(|| peer(&up)), peer(&down));
        self.log(&outcome, upstream.as_ref().map(|u| u.endpoint.addr));
    }

    /// Choose the upstream endpoint and start connecting; the flag for the access log when
    /// there is none.
    fn pick(&self, chain: &mut NetworkChain) -> Result<(Upstream, Connecting), &'static str> {
        let cluster = self
            .snapshot
            .clusters
            .get(&self.tcp.cluster)
            .cloned()
            .ok_or("UH")?;
        let headers = http::HeaderMap::new();
        let ctx = PickContext {
            headers: &headers,
            client_ip: self.downstream.remote.ip(),
            random: rand::random(),
        };
        let endpoint = cluster.pick(None, &ctx, None).ok_or("UH")?;
        chain.set_upstream(&cluster.name, endpoint.addr);
        let connector = cluster.connector();
        let addr = endpoint.addr;
        let connect = Box::pin(async move { connector.connect_addr(addr).await });
        let upstream = Upstream {
            _active: endpoint.start_connection(),
            cluster,
            endpoint,
        };
        Ok((upstream, connect))
    }

    /// Account for a failed upstream connect (circuit breaker, refused, timeout).
    fn connect_failed(&self, u: &Upstream, e: &ConnectError, outcome: &mut Outcome) {
        match e {
            ConnectError::Overflow => {
                u.cluster.stats.overflow.fetch_add(1, Ordering::Relaxed);
                outcome.flags.push("UO");
            }
            _ => {
                u.cluster
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                u.cluster.record_outcome(&u.endpoint, false, true);
                outcome.flags.push("UF");
            }
        }
        tracing::debug!(cluster = %u.cluster.name, endpoint = %u.endpoint.addr, error = %e, "tcp upstream connect failed");
        outcome.details = "upstream_connect_failure";
        outcome.upstream_failure = Some(e.to_string());
        self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The access-log line of the connection (Envoy's TCP fields: no request, code 0).
    fn log(&self, outcome: &Outcome, upstream_host: Option<SocketAddr>) {
        let Some(log) = &self.snapshot.access_log else {
            return;
        };
        let flags = outcome.flags.join(",");
        let headers = http::HeaderMap::new();
        log.log(&Entry {
            start: self.start,
            duration: self.started.elapsed(),
            response_duration: None,
            method: "",
            path: "",
            authority: "",
            scheme: "",
            request_headers: &headers,
            response_headers: None,
            code: 0,
            code_details: outcome.details,
            flags: &flags,
            bytes_received: outcome.bytes_received,
            bytes_sent: outcome.bytes_sent,
            protocol: "-",
            upstream_host,
            upstream_cluster: Some(&self.tcp.cluster),
            route: None,
            downstream_remote: self.downstream.remote,
            downstream_local: self.downstream.local,
            sni: self.tls.as_ref().and_then(|t| t.sni.as_deref()),
            upstream_failure: outcome.upstream_failure.as_deref(),
        });
    }
}
