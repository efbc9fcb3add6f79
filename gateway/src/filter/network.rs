//! Driving one TCP connection through a chain of proxy-wasm network filters, in Envoy's order:
//! the filters are initialized (`on_new_connection`) in chain order, downstream bytes pass them
//! in chain order and upstream bytes in reverse order.
//!
//! A filter that pauses holds the bytes that reached it (the `weir-wasm-host` stream keeps them)
//! and stops the flow there: filters after it are not initialized yet (and so the upstream is
//! not connected) while it is paused on the connection. When it resumes, in a later data
//! callback or from elsewhere ([`NetworkChain::next_event`]), its bytes go on from the next
//! filter. Unlike Envoy, whose read filters see the whole read buffer again on every read, each
//! filter sees each byte once.

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::future::select_all;
use weir_wasm_host::{
    Direction, NetworkDecision, NetworkEvent, NetworkStream, PeerType, StreamInfo,
};

use super::Link;

/// Where bytes got to in the chain.
#[derive(Debug)]
pub enum Flow {
    /// They passed every filter: send them on (with the end of stream when `true`). From the
    /// downstream direction, this also means every filter is initialized and continued: the
    /// upstream may be connected.
    Forward(BytesMut, bool),
    /// A filter holds them.
    Held,
    /// Close the connection.
    Close,
}

/// The network filters of one connection.
pub struct NetworkChain {
    streams: Vec<NetworkStream>,
    /// Filters whose `on_new_connection` ran (always a prefix of the chain).
    initialized: usize,
}

impl NetworkChain {
    /// One stream per link (a link's default plugin: network filters have no routes or hosts).
    pub fn new(links: &[Link], info: &Arc<StreamInfo>) -> NetworkChain {
        NetworkChain {
            streams: links
                .iter()
                .map(|l| l.default.new_network_stream(info.clone()))
                .collect(),
            initialized: 0,
        }
    }

    /// Initialize the filters (`on_new_connection`, in order) until one pauses or closes.
    /// `Forward` (with no bytes) when every filter continued.
    pub fn start(&mut self) -> Flow {
        self.downstream_from(0, BytesMut::new(), false)
    }

    /// Bytes from the client, through the filters in order.
    pub fn downstream(&mut self, data: BytesMut, end_of_stream: bool) -> Flow {
        self.downstream_from(0, data, end_of_stream)
    }

    /// Bytes from the upstream, through the filters in reverse order.
    pub fn upstream(&mut self, data: BytesMut, end_of_stream: bool) -> Flow {
        self.upstream_before(self.streams.len(), data, end_of_stream)
    }

    /// Filter `index` resumed `direction`: its held bytes go on from the next filter.
    pub fn resume(&mut self, index: usize, direction: Direction) -> Flow {
        let (data, end_of_stream) = self.streams[index].take_held(direction);
        match direction {
            Direction::Downstream => self.downstream_from(index + 1, data, end_of_stream),
            Direction::Upstream => self.upstream_before(index, data, end_of_stream),
        }
    }

    fn downstream_from(&mut self, from: usize, mut data: BytesMut, end_of_stream: bool) -> Flow {
        for i in from..self.streams.len() {
            let stream = &mut self.streams[i];
            if i == self.initialized {
                self.initialized += 1;
                match stream.on_new_connection() {
                    NetworkDecision::Continue => {}
                    NetworkDecision::Pause => {
                        if !data.is_empty() || end_of_stream {
                            stream.hold(Direction::Downstream, data, end_of_stream);
                        }
                        return Flow::Held;
                    }
                    NetworkDecision::Close => return Flow::Close,
                }
            }
            // As in Envoy, a data callback only for bytes or the end of stream.
            if data.is_empty() && !end_of_stream {
                continue;
            }
            match stream.on_downstream_data(&mut data, end_of_stream) {
                NetworkDecision::Continue => {}
                NetworkDecision::Pause => return Flow::Held,
                NetworkDecision::Close => return Flow::Close,
            }
        }
        Flow::Forward(data, end_of_stream)
    }

    fn upstream_before(&mut self, end: usize, mut data: BytesMut, end_of_stream: bool) -> Flow {
        for stream in self.streams[..end].iter_mut().rev() {
            if data.is_empty() && !end_of_stream {
                continue;
            }
            match stream.on_upstream_data(&mut data, end_of_stream) {
                NetworkDecision::Continue => {}
                NetworkDecision::Pause => return Flow::Held,
                NetworkDecision::Close => return Flow::Close,
            }
        }
        Flow::Forward(data, end_of_stream)
    }

    /// The next filter event (a paused filter resumed, or one closes the connection), with the
    /// filter's index. Never resolves for an empty chain. Cancel-safe.
    pub async fn next_event(&mut self) -> (usize, NetworkEvent) {
        match self.streams.len() {
            0 => std::future::pending().await,
            1 => (0, self.streams[0].resumed().await),
            _ => {
                let waiting = self
                    .streams
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| Box::pin(async move { (i, s.resumed().await) }));
                select_all(waiting).await.0
            }
        }
    }

    /// The upstream endpoint was chosen (`upstream.address`, `xds.cluster_name`).
    pub fn set_upstream(&mut self, cluster: &str, address: std::net::SocketAddr) {
        for s in &mut self.streams {
            s.set_upstream(cluster, Some(address));
        }
    }

    /// The connection ended: the close callbacks (the upstream's only if it was connected),
    /// then `on_done`, `on_log`, `on_delete` of every filter.
    pub fn finish(&mut self, upstream: Option<PeerType>, downstream: PeerType) {
        if let Some(peer) = upstream {
            for s in &mut self.streams {
                s.on_upstream_close(peer);
            }
        }
        for s in &mut self.streams {
            s.on_downstream_close(downstream);
        }
        for s in &mut self.streams {
            s.finish();
        }
    }
}
