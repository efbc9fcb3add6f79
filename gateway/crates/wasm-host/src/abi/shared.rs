//! Shared data and shared queues (process-wide, keyed by vm_id).

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::shared::{shared_data, shared_queues};
use crate::state::HostState;
use crate::types::Status;

fn get(c: &mut Caller<'_, HostState>, kp: i32, kl: i32, rp: i32, rl: i32, rcas: i32) -> HostResult {
    started(c)?;
    let key = memory::read(c, kp, kl)?;
    memory::check(c, rcas, 4)?;
    let (value, cas) = shared_data().get(&c.data().shared.vm_id, &key)?;
    memory::return_bytes(c, &value, rp, rl)?;
    memory::write_u32(c, rcas, cas)
}

fn set(c: &mut Caller<'_, HostState>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32) -> HostResult {
    started(c)?;
    let key = memory::read(c, kp, kl)?;
    let value = memory::read(c, vp, vl)?;
    shared_data().set(&c.data().shared.vm_id, &key, Bytes::from(value), cas as u32)?;
    Ok(())
}

fn register(c: &mut Caller<'_, HostState>, np: i32, nl: i32, ret: i32) -> HostResult {
    started(c)?;
    let name = memory::read_string(c, np, nl)?;
    memory::check(c, ret, 4)?;
    let state = c.data();
    let root = state.root().ok_or(Status::BadArgument)?.context_id;
    let id = shared_queues().register(
        &state.shared.vm_id,
        &name,
        state.shared.events.downgrade(),
        root,
    );
    memory::write_u32(c, ret, id)
}

fn resolve(
    c: &mut Caller<'_, HostState>,
    vp: i32,
    vl: i32,
    np: i32,
    nl: i32,
    ret: i32,
) -> HostResult {
    started(c)?;
    let vm_id = memory::read_string(c, vp, vl)?;
    let name = memory::read_string(c, np, nl)?;
    memory::check(c, ret, 4)?;
    let vm_id = if vm_id.is_empty() {
        c.data().shared.vm_id.clone()
    } else {
        vm_id
    };
    let id = shared_queues().resolve(&vm_id, &name)?;
    memory::write_u32(c, ret, id)
}

fn enqueue(c: &mut Caller<'_, HostState>, id: i32, p: i32, l: i32) -> HostResult {
    started(c)?;
    let data = memory::read(c, p, l)?;
    shared_queues().enqueue(id as u32, Bytes::from(data))?;
    Ok(())
}

fn dequeue(c: &mut Caller<'_, HostState>, id: i32, rp: i32, rl: i32) -> HostResult {
    started(c)?;
    memory::check(c, rp, 4)?;
    memory::check(c, rl, 4)?;
    let data = shared_queues().dequeue(id as u32)?;
    memory::return_bytes(c, &data, rp, rl)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, rp: i32, rl: i32, rcas: i32| {
            finish(get(&mut c, kp, kl, rp, rl, rcas))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| {
            finish(set(&mut c, kp, kl, vp, vl, cas))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, ret: i32| {
            finish(register(&mut c, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, HostState>, vp: i32, vl: i32, np: i32, nl: i32, ret: i32| {
            finish(resolve(&mut c, vp, vl, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, p: i32, l: i32| finish(enqueue(&mut c, id, p, l)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, rp: i32, rl: i32| {
            finish(dequeue(&mut c, id, rp, rl))
        },
    )?;
    Ok(())
}
