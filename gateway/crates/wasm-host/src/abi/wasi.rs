//! The minimal WASI preview-1 a proxy-wasm host provides, under both `wasi_snapshot_preview1`
//! and `wasi_unstable`: stdout/stderr to the log, clocks, randomness, empty args and
//! environment, `proc_exit`, `sched_yield`, `poll_oneoff` (clock subscriptions fire at once);
//! file and socket calls answer `EBADF`/`ENOTSUP`.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use wasmtime::{Caller, FuncType, Linker, Val, ValType};

use crate::memory::{self, Fail, HostResult};
use crate::state::HostState;
use crate::types::LogLevel;
use crate::vm::ProcExit;

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
const ENOTSUP: i32 = 58;
const ESPIPE: i32 = 70;

const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// Functions answered with a fixed errno, with their signatures (`i` i32, `I` i64).
const STUBS: &[(&str, &str, i32)] = &[
    ("fd_advise", "iIIi", EBADF),
    ("fd_allocate", "iII", EBADF),
    ("fd_datasync", "i", EBADF),
    ("fd_fdstat_set_flags", "ii", EBADF),
    ("fd_fdstat_set_rights", "iII", EBADF),
    ("fd_filestat_get", "ii", EBADF),
    ("fd_filestat_set_size", "iI", EBADF),
    ("fd_filestat_set_times", "iIIi", EBADF),
    ("fd_pread", "iiiIi", EBADF),
    ("fd_prestat_get", "ii", EBADF),
    ("fd_prestat_dir_name", "iii", EBADF),
    ("fd_pwrite", "iiiIi", EBADF),
    ("fd_readdir", "iiiIi", EBADF),
    ("fd_renumber", "ii", EBADF),
    ("fd_sync", "i", EBADF),
    ("fd_tell", "ii", EBADF),
    ("path_create_directory", "iii", ENOTSUP),
    ("path_filestat_get", "iiiii", ENOTSUP),
    ("path_filestat_set_times", "iiiiIIi", ENOTSUP),
    ("path_link", "iiiiiii", ENOTSUP),
    ("path_open", "iiiiiIIii", ENOTSUP),
    ("path_readlink", "iiiiii", ENOTSUP),
    ("path_remove_directory", "iii", ENOTSUP),
    ("path_rename", "iiiiii", ENOTSUP),
    ("path_symlink", "iiiii", ENOTSUP),
    ("path_unlink_file", "iii", ENOTSUP),
    ("proc_raise", "i", ENOTSUP),
    ("sock_accept", "iii", ENOTSUP),
    ("sock_recv", "iiiiii", ENOTSUP),
    ("sock_send", "iiiii", ENOTSUP),
    ("sock_shutdown", "ii", ENOTSUP),
];

/// Every WASI function the host links (in each of the two modules).
pub(crate) const WASI_FUNCTIONS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
    "fd_advise",
    "fd_allocate",
    "fd_datasync",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_readdir",
    "fd_renumber",
    "fd_sync",
    "fd_tell",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "proc_raise",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

fn errno(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(SUCCESS),
        // Bad guest pointers are EFAULT-like; WASI has no EFAULT in preview 1, use EINVAL.
        Err(Fail::Status(_)) => Ok(EINVAL),
        Err(Fail::Trap(e)) => Err(e),
    }
}

fn fd_write(
    c: &mut Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    n: i32,
    ret: i32,
) -> Result<i32, Fail> {
    if fd != 1 && fd != 2 {
        return Ok(EBADF);
    }
    let mut out = Vec::new();
    for i in 0..(n as u32).min(1024) {
        let entry = memory::read(c, iovs.wrapping_add((i * 8) as i32), 8)?;
        let ptr = i32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let len = i32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        out.extend_from_slice(&memory::read(c, ptr, len)?);
        if out.len() > 1 << 20 {
            break;
        }
    }
    memory::write_u32(c, ret, out.len() as u32)?;
    let text = String::from_utf8_lossy(&out);
    let text = text.trim_end_matches('\n');
    if !text.is_empty() {
        let state = c.data();
        let level = if fd == 1 {
            LogLevel::Info
        } else {
            LogLevel::Error
        };
        state.shared.env.log(state.plugin_name(), level, text);
    }
    Ok(SUCCESS)
}

fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn clock_time_get(c: &mut Caller<'_, HostState>, id: i32, ret: i32) -> Result<i32, Fail> {
    let t = match id {
        0 => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        1..=3 => monotonic_ns(),
        _ => return Ok(EINVAL),
    };
    memory::write_u64(c, ret, t)?;
    Ok(SUCCESS)
}

/// Every subscription fires at once (clocks are not waited on: a filter must not block).
fn poll_oneoff(
    c: &mut Caller<'_, HostState>,
    input: i32,
    output: i32,
    n: i32,
    ret: i32,
) -> Result<i32, Fail> {
    let n = n as u32;
    if n == 0 || n > 1024 {
        return Ok(EINVAL);
    }
    for i in 0..n {
        let sub = memory::read(c, input.wrapping_add((i * 48) as i32), 48)?;
        let mut event = [0u8; 32];
        event[..8].copy_from_slice(&sub[..8]);
        event[10] = sub[8];
        memory::write(c, output.wrapping_add((i * 32) as i32), &event)?;
    }
    memory::write_u32(c, ret, n)?;
    Ok(SUCCESS)
}

fn fdstat(c: &mut Caller<'_, HostState>, fd: i32, ret: i32) -> Result<i32, Fail> {
    if !(0..=2).contains(&fd) {
        return Ok(EBADF);
    }
    let mut stat = [0u8; 24];
    stat[0] = 2; // character device
    stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    memory::write(c, ret, &stat)?;
    Ok(SUCCESS)
}

fn value(r: Result<i32, Fail>) -> wasmtime::Result<i32> {
    match r {
        Ok(v) => Ok(v),
        Err(Fail::Status(_)) => Ok(EINVAL),
        Err(Fail::Trap(e)) => Err(e),
    }
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    for m in MODULES {
        linker.func_wrap(
            m,
            "fd_write",
            |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, n: i32, ret: i32| {
                value(fd_write(&mut c, fd, iovs, n, ret))
            },
        )?;
        linker.func_wrap(
            m,
            "fd_read",
            |mut c: Caller<'_, HostState>, fd: i32, _iovs: i32, _n: i32, ret: i32| {
                if fd != 0 {
                    return Ok(EBADF);
                }
                errno(memory::write_u32(&mut c, ret, 0))
            },
        )?;
        linker.func_wrap(m, "fd_close", |_c: Caller<'_, HostState>, fd: i32| {
            Ok(if (0..=2).contains(&fd) {
                SUCCESS
            } else {
                EBADF
            })
        })?;
        linker.func_wrap(
            m,
            "fd_seek",
            |_c: Caller<'_, HostState>, fd: i32, _off: i64, _whence: i32, _ret: i32| {
                Ok(if (0..=2).contains(&fd) { ESPIPE } else { EBADF })
            },
        )?;
        linker.func_wrap(
            m,
            "fd_fdstat_get",
            |mut c: Caller<'_, HostState>, fd: i32, ret: i32| value(fdstat(&mut c, fd, ret)),
        )?;
        linker.func_wrap(
            m,
            "clock_time_get",
            |mut c: Caller<'_, HostState>, id: i32, _precision: i64, ret: i32| {
                value(clock_time_get(&mut c, id, ret))
            },
        )?;
        linker.func_wrap(
            m,
            "clock_res_get",
            |mut c: Caller<'_, HostState>, _id: i32, ret: i32| {
                errno(memory::write_u64(&mut c, ret, 1_000))
            },
        )?;
        linker.func_wrap(
            m,
            "random_get",
            |mut c: Caller<'_, HostState>, ptr: i32, len: i32| {
                let mut buf = vec![0u8; (len as u32 as usize).min(1 << 20)];
                rand::rng().fill_bytes(&mut buf);
                errno(memory::write(&mut c, ptr, &buf))
            },
        )?;
        for name in ["environ_sizes_get", "args_sizes_get"] {
            linker.func_wrap(
                m,
                name,
                |mut c: Caller<'_, HostState>, count: i32, size: i32| {
                    errno((|| {
                        memory::write_u32(&mut c, count, 0)?;
                        memory::write_u32(&mut c, size, 0)
                    })())
                },
            )?;
        }
        for name in ["environ_get", "args_get"] {
            linker.func_wrap(m, name, |_c: Caller<'_, HostState>, _a: i32, _b: i32| {
                Ok(SUCCESS)
            })?;
        }
        linker.func_wrap(
            m,
            "proc_exit",
            |_c: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
                Err(wasmtime::Error::new(ProcExit(code)))
            },
        )?;
        linker.func_wrap(m, "sched_yield", |_c: Caller<'_, HostState>| Ok(SUCCESS))?;
        linker.func_wrap(
            m,
            "poll_oneoff",
            |mut c: Caller<'_, HostState>, input: i32, output: i32, n: i32, ret: i32| {
                value(poll_oneoff(&mut c, input, output, n, ret))
            },
        )?;
        for &(name, sig, code) in STUBS {
            let params: Vec<ValType> = sig
                .chars()
                .map(|ch| {
                    if ch == 'I' {
                        ValType::I64
                    } else {
                        ValType::I32
                    }
                })
                .collect();
            let ty = FuncType::new(linker.engine(), params, [ValType::I32]);
            linker.func_new(m, name, ty, move |_c, _params, results| {
                results[0] = Val::I32(code);
                Ok(())
            })?;
        }
    }
    Ok(())
}
