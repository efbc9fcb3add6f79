//! Header maps: request/response headers and trailers, gRPC stream metadata, callout response
//! headers/trailers.

use wasmtime::{Caller, Linker};

use super::started;
use crate::headers::{self, MapRef};
use crate::memory::{self, HostResult, finish};
use crate::state::HostState;
use crate::types::{Status, map};

/// The map `which` for the effective context, or `None` when it does not exist now.
fn map_of(state: &mut HostState, which: i32) -> Result<Option<MapRef<'_>>, Status> {
    if !(0..=7).contains(&which) {
        return Err(Status::BadArgument);
    }
    if which == map::HTTP_CALL_RESPONSE_HEADERS || which == map::HTTP_CALL_RESPONSE_TRAILERS {
        return Ok(state.callout.as_ref().map(|c| {
            if which == map::HTTP_CALL_RESPONSE_HEADERS {
                MapRef::ReadOnly(&c.headers, c.status)
            } else {
                MapRef::ReadOnly(&c.trailers, None)
            }
        }));
    }
    if which == map::GRPC_INITIAL_METADATA || which == map::GRPC_TRAILING_METADATA {
        return Ok(state
            .grpc
            .metadata(which)
            .map(|(m, status)| MapRef::ReadOnly(m, status)));
    }
    let Some(s) = state.stream_mut() else {
        return Ok(None);
    };
    Ok(match which {
        map::REQUEST_HEADERS => s.request.as_mut().map(MapRef::Request),
        map::REQUEST_TRAILERS => s.request_trailers.as_mut().map(MapRef::Plain),
        map::RESPONSE_HEADERS => s.response.as_mut().map(MapRef::Response),
        map::RESPONSE_TRAILERS => s.response_trailers.as_mut().map(MapRef::Plain),
        _ => None,
    })
}

/// Note an edit of the request or response headers: the gateway then sends the filters' copy
/// instead of the map it kept (and matches the route again for the request).
fn mark_changed(state: &mut HostState, which: i32) {
    if let Some(s) = state.stream_mut() {
        match which {
            map::REQUEST_HEADERS => s.request_headers_changed = true,
            map::RESPONSE_HEADERS => s.response_headers_changed = true,
            _ => {}
        }
    }
}

fn get_pairs(c: &mut Caller<'_, HostState>, which: i32, rp: i32, rl: i32) -> HostResult {
    started(c)?;
    let bytes = map_of(c.data_mut(), which)?
        .map(|m| m.serialize())
        .unwrap_or_default();
    memory::return_bytes(c, &bytes, rp, rl)
}

fn set_pairs(c: &mut Caller<'_, HostState>, which: i32, ptr: i32, len: i32) -> HostResult {
    started(c)?;
    let raw = memory::read(c, ptr, len)?;
    let pairs = headers::deserialize(&raw)?;
    let state = c.data_mut();
    map_of(state, which)?
        .ok_or(Status::BadArgument)?
        .set_all(&pairs)?;
    mark_changed(state, which);
    Ok(())
}

fn get_value(
    c: &mut Caller<'_, HostState>,
    which: i32,
    kp: i32,
    kl: i32,
    rp: i32,
    rl: i32,
) -> HostResult {
    started(c)?;
    let key = memory::read(c, kp, kl)?;
    let v = map_of(c.data_mut(), which)?
        .and_then(|m| m.get(&key))
        .ok_or(Status::NotFound)?;
    memory::return_bytes(c, &v, rp, rl)
}

#[derive(Clone, Copy)]
enum Edit {
    Add,
    Replace,
}

fn edit(
    c: &mut Caller<'_, HostState>,
    op: Edit,
    which: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    started(c)?;
    let key = memory::read(c, kp, kl)?;
    let value = memory::read(c, vp, vl)?;
    let state = c.data_mut();
    let mut m = map_of(state, which)?.ok_or(Status::BadArgument)?;
    match op {
        Edit::Add => m.add(&key, &value)?,
        Edit::Replace => m.replace(&key, &value)?,
    }
    mark_changed(state, which);
    Ok(())
}

fn remove(c: &mut Caller<'_, HostState>, which: i32, kp: i32, kl: i32) -> HostResult {
    started(c)?;
    let key = memory::read(c, kp, kl)?;
    let state = c.data_mut();
    map_of(state, which)?
        .ok_or(Status::BadArgument)?
        .remove(&key)?;
    mark_changed(state, which);
    Ok(())
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Caller<'_, HostState>, which: i32, ret: i32| {
            finish((|| {
                started(&c)?;
                let n = map_of(c.data_mut(), which)?.ok_or(Status::NotFound)?.len();
                memory::write_u32(&mut c, ret, n as u32)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, which: i32, rp: i32, rl: i32| {
            finish(get_pairs(&mut c, which, rp, rl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, which: i32, p: i32, l: i32| {
            finish(set_pairs(&mut c, which, p, l))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>, which: i32, kp: i32, kl: i32, rp: i32, rl: i32| {
            finish(get_value(&mut c, which, kp, kl, rp, rl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, HostState>, which: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            finish(edit(&mut c, Edit::Add, which, kp, kl, vp, vl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, HostState>, which: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            finish(edit(&mut c, Edit::Replace, which, kp, kl, vp, vl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, which: i32, kp: i32, kl: i32| {
            finish(remove(&mut c, which, kp, kl))
        },
    )?;
    Ok(())
}
