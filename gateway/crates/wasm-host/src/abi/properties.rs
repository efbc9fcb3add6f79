//! Properties: `proxy_get_property` and `proxy_set_property`.

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::properties;
use crate::state::HostState;

fn get(c: &mut Caller<'_, HostState>, pp: i32, pl: i32, rp: i32, rl: i32) -> HostResult {
    started(c)?;
    memory::check(c, rp, 4)?;
    memory::check(c, rl, 4)?;
    let value = memory::with_slice(c, pp, pl, |path, state| {
        properties::get(state, path).map(|v| {
            let mut out = Vec::new();
            v.write_to(&mut out);
            out
        })
    })??;
    memory::return_bytes(c, &value, rp, rl)
}

/// Store under the stream's filter state (or the root context's, outside a stream), so a later
/// `get_property` of the same path returns it.
fn set(c: &mut Caller<'_, HostState>, pp: i32, pl: i32, vp: i32, vl: i32) -> HostResult {
    started(c)?;
    let path = memory::read(c, pp, pl)?;
    let value = Bytes::from(memory::read(c, vp, vl)?);
    let key = properties::key(&path).to_vec();
    let state = c.data_mut();
    match state.stream_mut() {
        Some(s) => {
            s.filter_state.insert(key, value);
        }
        None => {
            state.root_properties.insert(key, value);
        }
    }
    Ok(())
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, HostState>, pp: i32, pl: i32, rp: i32, rl: i32| {
            finish(get(&mut c, pp, pl, rp, rl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, HostState>, pp: i32, pl: i32, vp: i32, vl: i32| {
            finish(set(&mut c, pp, pl, vp, vl))
        },
    )?;
    Ok(())
}
