//! Foreign functions: `proxy_call_foreign_function(name, args) -> result`, served by the host
//! itself for [`GET_PROPERTIES_FUNCTION`](crate::GET_PROPERTIES_FUNCTION), else by
//! [`crate::HostEnv::foreign_function`].

use wasmtime::{Caller, Linker};

use super::started;
use crate::ForeignFunction;
use crate::memory::{self, HostResult, finish};
use crate::properties;
use crate::state::HostState;
use crate::types::Status;

/// Which function a call names.
enum Target {
    /// [`GET_PROPERTIES_FUNCTION`](crate::GET_PROPERTIES_FUNCTION), served here.
    Properties,
    /// One of the `HostEnv`'s.
    Env(ForeignFunction),
}

fn call(
    c: &mut Caller<'_, HostState>,
    np: i32,
    nl: i32,
    ap: i32,
    al: i32,
    rp: i32,
    rl: i32,
) -> HostResult {
    started(c)?;
    if c.data().root().is_some_and(|r| r.portable) {
        // As in Envoy, which knows none of Weir's functions.
        return Err(Status::NotFound.into());
    }
    memory::check(c, rp, 4)?;
    memory::check(c, rl, 4)?;
    // The name and the arguments are read in place, not copied out of the guest.
    let target = memory::with_slice(c, np, nl, |name, state| {
        if name == crate::GET_PROPERTIES_FUNCTION.as_bytes() {
            return Ok(Target::Properties);
        }
        let name = String::from_utf8_lossy(name);
        state
            .shared
            .env
            .foreign_function(&name)
            .map(Target::Env)
            .ok_or(Status::NotFound)
    })??;
    match target {
        Target::Properties => {
            let result = memory::with_slice(c, ap, al, properties::get_many)??;
            memory::return_bytes(c, &result, rp, rl)
        }
        Target::Env(f) => {
            let result = memory::with_slice(c, ap, al, |args, _| f(args))??;
            memory::return_bytes(c, &result, rp, rl)
        }
    }
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, ap: i32, al: i32, rp: i32, rl: i32| {
            finish(call(&mut c, np, nl, ap, al, rp, rl))
        },
    )?;
    Ok(())
}
