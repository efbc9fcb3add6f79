//! One TCP connection through one plugin: the proxy-wasm network-filter callbacks
//! (`proxy_on_new_connection`, `proxy_on_downstream_data`, `proxy_on_upstream_data`, the two
//! close callbacks) and buffers 2 (downstream data) and 3 (upstream data).
//!
//! A `NetworkStream` runs on the machinery of [`HttpStream`]: the same context lifecycle, VM
//! replica, failure containment, callouts and actions from other contexts; only the callbacks
//! and what a pause means differ. The data callbacks never wait: a filter that pauses keeps its
//! bytes in the host, and the gateway learns that it resumed (a callout answered, a timer or
//! another context called `proxy_continue_stream`) or closed the connection from
//! [`NetworkStream::resumed`], which it polls next to its socket reads.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::plugin::Plugin;
use crate::state::BodyKind;
use crate::stream::{Decision, HttpStream, StreamInfo};

/// Which way data flows through a network filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the upstream (`proxy_on_downstream_data`, buffer 2, stream 2).
    Downstream,
    /// From the upstream to the client (`proxy_on_upstream_data`, buffer 3, stream 3).
    Upstream,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Downstream => 0,
            Direction::Upstream => 1,
        }
    }

    fn kind(self) -> BodyKind {
        match self {
            Direction::Downstream => BodyKind::Downstream,
            Direction::Upstream => BodyKind::Upstream,
        }
    }
}

/// Who closed a connection (the `peer_type` of the close callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerType {
    /// 0: not known.
    Unknown,
    /// 1: the gateway closed it.
    Local,
    /// 2: the peer (client or upstream) closed it.
    Remote,
}

impl PeerType {
    fn as_i32(self) -> i32 {
        match self {
            PeerType::Unknown => 0,
            PeerType::Local => 1,
            PeerType::Remote => 2,
        }
    }
}

/// What the gateway must do after a network callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkDecision {
    /// Pass the (possibly modified) data on to the next filter, then the upstream (downstream
    /// data) or the client (upstream data). After `on_new_connection`: go on initializing the
    /// filters after this one (the last one continuing lets the gateway connect upstream).
    Continue,
    /// Do not pass anything on: the host keeps the bytes (the gateway's buffer is emptied) and
    /// the next data callback of that direction reports the accumulated size. The filter
    /// resumes in a later data callback, or from elsewhere: see [`NetworkStream::resumed`].
    Pause,
    /// Close the connection: the filter called `proxy_close_stream`, failed with a closed
    /// policy, or held more than `limits.body_buffer_bytes`.
    Close,
}

/// Something that happened to a filter while it was not in a data callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkEvent {
    /// The filter paused in `direction` and resumed (`proxy_continue_stream` from a callout
    /// response or another context, or the filter failed open): take the held bytes with
    /// [`NetworkStream::take_held`] and pass them on, as after `Continue`.
    Resumed(Direction),
    /// Close the connection (`proxy_close_stream` from a callout response or another context,
    /// or the filter failed with a closed policy).
    Close,
}

/// Bytes a paused filter holds for one direction.
#[derive(Debug, Default)]
struct Held {
    data: BytesMut,
    end_of_stream: bool,
    paused: bool,
}

/// One TCP connection through one plugin (a proxy-wasm network filter, Envoy's
/// `envoy.filters.network.wasm`).
///
/// The gateway calls [`on_new_connection`] once, then [`on_downstream_data`] for bytes from the
/// client and [`on_upstream_data`] for bytes from the upstream, [`on_upstream_close`] and
/// [`on_downstream_close`] when each side ends, and [`finish`] last (`proxy_on_done`,
/// `proxy_on_log`, `proxy_on_delete`: Envoy's order for connections). While the filter is
/// paused, or has callouts in flight, it also polls [`resumed`].
///
/// [`on_new_connection`]: NetworkStream::on_new_connection
/// [`on_downstream_data`]: NetworkStream::on_downstream_data
/// [`on_upstream_data`]: NetworkStream::on_upstream_data
/// [`on_upstream_close`]: NetworkStream::on_upstream_close
/// [`on_downstream_close`]: NetworkStream::on_downstream_close
/// [`finish`]: NetworkStream::finish
/// [`resumed`]: NetworkStream::resumed
#[derive(Debug)]
pub struct NetworkStream {
    stream: HttpStream,
    held: [Held; 2],
    /// Close callbacks already run, per direction.
    closed: [bool; 2],
    /// The waker other contexts notify, once registered in the VM.
    waker: Option<Arc<Notify>>,
}

impl Plugin {
    /// Start a network stream (one TCP connection through this plugin). Like an HTTP stream,
    /// it picks a VM replica and keeps it for its whole life.
    pub fn new_network_stream(self: &Arc<Self>, info: Arc<StreamInfo>) -> NetworkStream {
        NetworkStream {
            stream: HttpStream::new_network(self.clone(), info),
            held: Default::default(),
            closed: [false; 2],
            waker: None,
        }
    }
}

impl NetworkStream {
    /// The connection is accepted (and TLS terminated): creates the filter's context and runs
    /// `proxy_on_new_connection`. `Pause` holds back the filters after this one (and so the
    /// upstream connection) until the filter continues: in a downstream data callback or from
    /// elsewhere ([`resumed`](Self::resumed) then reports `Resumed(Downstream)`).
    pub fn on_new_connection(&mut self) -> NetworkDecision {
        if self.stream.skipping() {
            return NetworkDecision::Continue;
        }
        let r = self
            .stream
            .callback(&mut |ex, store, id| match &ex.new_connection {
                Some(f) => f.call(store, id),
                None => Ok(0),
            });
        match r {
            Ok(action) => self.decide(Direction::Downstream, action),
            Err(()) => self.failed(),
        }
    }

    /// Bytes from the client. On `Continue`, `data` holds what to pass on (with the bytes held
    /// from earlier paused callbacks in front, as the filter may have changed them); on `Pause`
    /// the host keeps them.
    pub fn on_downstream_data(
        &mut self,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> NetworkDecision {
        self.on_data(Direction::Downstream, data, end_of_stream)
    }

    /// Bytes from the upstream; see [`on_downstream_data`](Self::on_downstream_data).
    pub fn on_upstream_data(
        &mut self,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> NetworkDecision {
        self.on_data(Direction::Upstream, data, end_of_stream)
    }

    /// Keep bytes that reached this filter before its first data callback: the filters before
    /// it passed them on while this one was paused in `on_new_connection`. The next data
    /// callback of `direction` sees them in front of its own bytes; if the filter resumes from
    /// elsewhere first, [`take_held`](Self::take_held) returns them unseen (as in Envoy).
    pub fn hold(&mut self, direction: Direction, data: BytesMut, end_of_stream: bool) {
        let held = &mut self.held[direction.index()];
        held.data.extend_from_slice(&data);
        held.end_of_stream |= end_of_stream;
        held.paused = true;
    }

    /// The bytes held for `direction`, and whether the end of stream came with them; the
    /// direction is no longer paused.
    pub fn take_held(&mut self, direction: Direction) -> (BytesMut, bool) {
        let held = &mut self.held[direction.index()];
        held.paused = false;
        (
            std::mem::take(&mut held.data),
            std::mem::take(&mut held.end_of_stream),
        )
    }

    /// Whether the filter holds `direction` (paused on it, or on the connection).
    pub fn is_paused(&self, direction: Direction) -> bool {
        self.held[direction.index()].paused
    }

    fn on_data(
        &mut self,
        direction: Direction,
        data: &mut BytesMut,
        end_of_stream: bool,
    ) -> NetworkDecision {
        let held = &mut self.held[direction.index()];
        let mut buf = std::mem::take(&mut held.data);
        if buf.is_empty() {
            buf = data.split();
        } else {
            buf.extend_from_slice(data);
            data.clear();
        }
        held.end_of_stream |= end_of_stream;
        let end_of_stream = held.end_of_stream;
        if !self.stream.skipping() && self.stream.deliver_callouts().is_err() {
            return self.fail_with(direction, data, buf);
        }
        if self.stream.skipping() {
            let _ = self.take_held(direction);
            *data = buf;
            return NetworkDecision::Continue;
        }
        if std::mem::take(&mut self.stream.ctx().actions.close) {
            return NetworkDecision::Close;
        }
        let len = buf.len() as i32;
        let eos = i32::from(end_of_stream);
        self.stream.ctx().body = Some((direction.kind(), buf.freeze()));
        let r = self.stream.callback(&mut |ex, store, id| {
            let f = match direction {
                Direction::Downstream => &ex.downstream_data,
                Direction::Upstream => &ex.upstream_data,
            };
            match f {
                Some(f) => f.call(store, (id, len, eos)),
                None => Ok(0),
            }
        });
        let buf = self
            .stream
            .ctx()
            .body
            .take()
            .map_or_else(BytesMut::new, |(_, b)| crate::stream::into_mut(b));
        let action = match r {
            Ok(action) => action,
            Err(()) => return self.fail_with(direction, data, buf),
        };
        match self.decide(direction, action) {
            NetworkDecision::Continue => {
                let _ = self.take_held(direction);
                *data = buf;
                NetworkDecision::Continue
            }
            NetworkDecision::Pause => {
                if buf.len() > self.stream.plugin.root.limits.body_buffer_bytes {
                    tracing::debug!(
                        plugin = %self.stream.plugin.name(),
                        "wasm network filter held more than its buffer limit: closing"
                    );
                    return NetworkDecision::Close;
                }
                let held = &mut self.held[direction.index()];
                held.data = buf;
                held.paused = true;
                NetworkDecision::Pause
            }
            NetworkDecision::Close => NetworkDecision::Close,
        }
    }

    /// The decision of a callback that returned `action`, with the actions it requested.
    fn decide(&mut self, direction: Direction, action: i32) -> NetworkDecision {
        let actions = &mut self.stream.ctx().actions;
        actions.local_reply = None;
        if std::mem::take(&mut actions.close) {
            return NetworkDecision::Close;
        }
        let resumed = match direction {
            Direction::Downstream => std::mem::take(&mut actions.continue_downstream),
            Direction::Upstream => std::mem::take(&mut actions.continue_upstream),
        };
        if action == 0 || resumed {
            NetworkDecision::Continue
        } else {
            self.held[direction.index()].paused = true;
            NetworkDecision::Pause
        }
    }

    /// The failure policy, for a callback that failed: `Continue` (failing open: the filter is
    /// bypassed from now on) or `Close`.
    fn failed(&mut self) -> NetworkDecision {
        match self.stream.failure_decision() {
            Decision::Continue => NetworkDecision::Continue,
            _ => NetworkDecision::Close,
        }
    }

    /// A data callback failed: on `Continue` (open) the bytes pass through unchanged.
    fn fail_with(
        &mut self,
        direction: Direction,
        data: &mut BytesMut,
        buf: BytesMut,
    ) -> NetworkDecision {
        let d = self.failed();
        if d == NetworkDecision::Continue {
            let _ = self.take_held(direction);
            *data = buf;
        }
        d
    }

    /// Resolves when a paused direction resumes or the connection must close, delivering
    /// callout responses (and gRPC stream events) into the filter as they arrive, also for a
    /// filter that did not pause. Never resolves while nothing can happen. Cancel-safe: poll it
    /// in a `select!` with the socket reads, and call it again after handling its event.
    pub async fn resumed(&mut self) -> NetworkEvent {
        loop {
            if let Some(event) = self.ready_event() {
                return event;
            }
            if !self.stream.is_active() {
                // No context (never created, bypassed or finished): nothing will happen.
                std::future::pending::<()>().await;
            }
            let waker = match &self.waker {
                Some(w) => w.clone(),
                None => {
                    // Register once: other contexts' actions on this stream wake it from now on.
                    match self.stream.sync_parked() {
                        Ok(w) => self.waker = Some(w),
                        Err(()) => {
                            if let Some(event) = self.failure_event() {
                                return event;
                            }
                        }
                    }
                    continue;
                }
            };
            // Then take the actions of other contexts (the waker may have fired).
            let woke = match self.stream.wait_event(&waker).await {
                Ok(()) => self.stream.sync_parked().map(|_| ()),
                Err(()) => Err(()),
            };
            if woke.is_err()
                && let Some(event) = self.failure_event()
            {
                return event;
            }
        }
    }

    /// The failure policy applied outside a data callback: `Close`, or (failing open) `None`
    /// and the paused directions are released by the next `ready_event`.
    fn failure_event(&mut self) -> Option<NetworkEvent> {
        match self.failed() {
            NetworkDecision::Close => Some(NetworkEvent::Close),
            _ => None,
        }
    }

    /// An event ready now: a close requested, a paused direction resumed, or (when the filter
    /// is bypassed) released.
    fn ready_event(&mut self) -> Option<NetworkEvent> {
        if self.stream.skipping() {
            let paused = [Direction::Downstream, Direction::Upstream]
                .into_iter()
                .find(|d| self.is_paused(*d));
            return paused.map(NetworkEvent::Resumed);
        }
        if !self.stream.is_active() {
            return None;
        }
        let actions = &mut self.stream.ctx().actions;
        actions.local_reply = None;
        if std::mem::take(&mut actions.close) {
            return Some(NetworkEvent::Close);
        }
        let down = std::mem::take(&mut actions.continue_downstream);
        let up = std::mem::take(&mut actions.continue_upstream);
        // A continue for the other direction stays requested until that event is taken.
        if down && self.is_paused(Direction::Downstream) {
            self.stream.ctx().actions.continue_upstream = up;
            return Some(NetworkEvent::Resumed(Direction::Downstream));
        }
        if up && self.is_paused(Direction::Upstream) {
            return Some(NetworkEvent::Resumed(Direction::Upstream));
        }
        None
    }

    /// The client side ended (`proxy_on_downstream_connection_close`), once.
    pub fn on_downstream_close(&mut self, peer: PeerType) {
        self.on_close(Direction::Downstream, peer);
    }

    /// The upstream side ended (`proxy_on_upstream_connection_close`), once. Not called when
    /// no upstream connection was made.
    pub fn on_upstream_close(&mut self, peer: PeerType) {
        self.on_close(Direction::Upstream, peer);
    }

    fn on_close(&mut self, direction: Direction, peer: PeerType) {
        let done = &mut self.closed[direction.index()];
        if *done || !self.stream.is_active() {
            return;
        }
        *done = true;
        let peer = peer.as_i32();
        let r = self.stream.callback(&mut |ex, store, id| {
            let f = match direction {
                Direction::Downstream => &ex.downstream_close,
                Direction::Upstream => &ex.upstream_close,
            };
            if let Some(f) = f {
                f.call(store, (id, peer))?;
            }
            Ok(0)
        });
        if r.is_err() {
            // The connection is ending anyway: only count the failure.
            let _ = self.stream.failure_decision();
        }
    }

    /// Tell the stream which cluster and upstream address were chosen (`xds.cluster_name`,
    /// `upstream.address`, `upstream.port`).
    pub fn set_upstream(&mut self, cluster: &str, address: Option<std::net::SocketAddr>) {
        self.stream.set_upstream(cluster, address);
    }

    /// Whether the filter failed (or lost its VM) and is now skipped for this connection.
    pub fn is_bypassed(&self) -> bool {
        self.stream.is_bypassed()
    }

    /// End of the connection: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` (Envoy's order
    /// for network filters). Dropping the stream without it runs `on_done` and `on_delete`.
    pub fn finish(&mut self) {
        self.stream.finish_in_order(true);
    }
}
