//! Stream control: continue, close, local replies, `proxy_get_status`. All deferred until the
//! current callback returns.

use http::StatusCode;
use wasmtime::{Caller, Linker};

use super::started;
use crate::headers;
use crate::memory::{self, HostResult, finish};
use crate::state::{Actions, HostState};
use crate::stream::LocalReply;
use crate::types::Status;

/// Run `f` on the actions of the effective stream: the loaded one, or a parked one (then its
/// driver is woken). `f` also gets whether a local reply was sent and whether the stream is a
/// network (TCP) stream.
fn with_actions(
    c: &mut Caller<'_, HostState>,
    missing: Status,
    f: impl FnOnce(&mut Actions, bool, bool) -> HostResult,
) -> HostResult {
    let state = c.data_mut();
    if state.parked_mut().is_some() {
        state.parked_used = true;
    }
    if let Some(parked) = state.parked_mut() {
        let network = parked.network;
        let r = f(&mut parked.actions, false, network);
        if let Some(waker) = &parked.waker {
            waker.notify_one();
        }
        return r;
    }
    let s = state.stream_mut().ok_or(missing)?;
    let sent = s.local_reply_sent;
    let network = s.network;
    f(&mut s.actions, sent, network)
}

/// `proxy_continue_stream`: request/response (0, 1) of an HTTP stream, downstream/upstream
/// data (2, 3) of a network stream; the other kind's streams do not exist (`NOT_FOUND`).
fn continue_stream(c: &mut Caller<'_, HostState>, which: i32) -> HostResult {
    started(c)?;
    with_actions(c, Status::NotFound, |a, _, network| {
        match (which, network) {
            (0, false) => a.continue_request = true,
            (1, false) => a.continue_response = true,
            (2, true) => a.continue_downstream = true,
            (3, true) => a.continue_upstream = true,
            (0..=3, _) => return Err(Status::NotFound.into()),
            _ => return Err(Status::BadArgument.into()),
        }
        Ok(())
    })
}

/// `proxy_close_stream`: resets an HTTP stream (0, 1) or closes a network connection (2, 3).
fn close_stream(c: &mut Caller<'_, HostState>, which: i32) -> HostResult {
    started(c)?;
    with_actions(c, Status::NotFound, |a, _, network| {
        match (which, network) {
            (0 | 1, false) | (2 | 3, true) => a.close = true,
            (0..=3, _) => return Err(Status::NotFound.into()),
            _ => return Err(Status::BadArgument.into()),
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn send_local_response(
    c: &mut Caller<'_, HostState>,
    code: i32,
    dp: i32,
    dl: i32,
    bp: i32,
    bl: i32,
    hp: i32,
    hl: i32,
    grpc: i32,
) -> HostResult {
    started(c)?;
    let details = memory::read_string(c, dp, dl)?;
    let body = memory::read(c, bp, bl)?;
    let raw = memory::read(c, hp, hl)?;
    let pairs = headers::deserialize(&raw)?;
    let status = u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Status::BadArgument)?;
    let mut map = http::HeaderMap::with_capacity(pairs.len());
    for (k, v) in &pairs {
        if k.starts_with(b":") {
            continue;
        }
        map.append(headers::name(k)?, headers::value(v)?);
    }
    let reply = LocalReply {
        status,
        headers: map,
        body: body.into(),
        details,
        grpc_status: u32::try_from(grpc).ok(),
    };
    with_actions(c, Status::BadArgument, |a, sent, network| {
        if network {
            // As in Envoy: a connection has no HTTP response to send; the call does nothing.
            tracing::debug!("wasm network filter sent a local reply; ignored");
            return Ok(());
        }
        if sent {
            // Envoy sends one local reply per stream; a second one (e.g. from the response
            // callbacks that run on the first) is ignored.
            tracing::debug!("wasm filter sent a second local reply; ignored");
            return Ok(());
        }
        a.local_reply = Some(Box::new(reply));
        Ok(())
    })
}

fn get_status(c: &mut Caller<'_, HostState>, rc: i32, rp: i32, rl: i32) -> HostResult {
    started(c)?;
    let (code, msg) = c.data().last_status.clone();
    memory::check(c, rc, 4)?;
    memory::return_bytes(c, &msg, rp, rl)?;
    memory::write_u32(c, rc, code)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, HostState>, which: i32| finish(continue_stream(&mut c, which)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, HostState>, which: i32| finish(close_stream(&mut c, which)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         grpc: i32| {
            finish(send_local_response(
                &mut c, code, dp, dl, bp, bl, hp, hl, grpc,
            ))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Caller<'_, HostState>, rc: i32, rp: i32, rl: i32| {
            finish(get_status(&mut c, rc, rp, rl))
        },
    )?;
    Ok(())
}
