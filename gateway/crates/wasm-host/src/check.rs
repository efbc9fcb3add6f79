//! `weir filter check FILE.wasm`: what a module declares and whether Weir and Envoy can run it.

use std::fmt;

use wasmtime::{ExternType, Module};

use crate::abi::{ENV_FUNCTIONS, WASI_FUNCTIONS, WEIR_ONLY_ENV};
use crate::types::AbiVersion;

/// WASI functions Envoy (proxy-wasm-cpp-host) provides.
const ENVOY_WASI: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_seek",
    "fd_close",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
    "path_open",
    "fd_filestat_get",
];

fn is_wasi_module(m: &str) -> bool {
    m == "wasi_snapshot_preview1" || m == "wasi_unstable"
}

/// Whether Weir links `module.name` (a function import).
pub(crate) fn known(module: &str, name: &str) -> bool {
    (module == "env" && ENV_FUNCTIONS.contains(&name))
        || (is_wasi_module(module) && WASI_FUNCTIONS.contains(&name))
}

fn envoy_has(module: &str, name: &str) -> bool {
    (module == "env" && ENV_FUNCTIONS.contains(&name) && !WEIR_ONLY_ENV.contains(&name))
        || (is_wasi_module(module) && ENVOY_WASI.contains(&name))
}

/// `module.name` of every import Weir does not provide.
pub(crate) fn unknown_imports(module: &Module) -> Vec<String> {
    module
        .imports()
        .filter(|i| !(matches!(i.ty(), ExternType::Func(_)) && known(i.module(), i.name())))
        .map(|i| format!("{}.{}", i.module(), i.name()))
        .collect()
}

/// One import of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInfo {
    /// Import module (`env`, `wasi_snapshot_preview1`, ...).
    pub module: String,
    /// Import name.
    pub name: String,
    /// Whether Weir provides it.
    pub weir: bool,
    /// Whether Envoy provides it.
    pub envoy: bool,
}

/// The result of [`check_module`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The ABI version from the marker export, `None` if there is none.
    pub abi: Option<AbiVersion>,
    /// Every import.
    pub imports: Vec<ImportInfo>,
    /// Every export name.
    pub exports: Vec<String>,
    /// Whether Weir runs it: an ABI marker, every import known with the right signature.
    pub runs_on_weir: bool,
    /// Whether Envoy would run it too: Weir runs it and every import is one Envoy provides
    /// (Weir-specific services go through `proxy_call_foreign_function`, which is portable).
    pub portable_to_envoy: bool,
    /// Why it does not run or is not portable.
    pub problems: Vec<String>,
}

/// Why a module could not be checked at all.
#[derive(Debug, thiserror::Error)]
#[error("not a valid wasm module: {0}")]
pub struct CheckError(String);

/// Inspect a module without running it.
///
/// The report of a module is remembered (by its sha256) for the life of the process: a config
/// reload that keeps its modules does not check them again.
pub fn check_module(bytes: &[u8]) -> Result<CheckReport, CheckError> {
    use sha2::Digest;
    static CHECKED: std::sync::Mutex<Vec<([u8; 32], CheckReport)>> =
        std::sync::Mutex::new(Vec::new());
    let key: [u8; 32] = sha2::Sha256::digest(bytes).into();
    let cached = |c: &Vec<([u8; 32], CheckReport)>| {
        c.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone())
    };
    if let Some(r) = cached(&CHECKED.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(r);
    }
    let report = check_uncached(bytes)?;
    let mut c = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= 64 {
        c.remove(0);
    }
    c.push((key, report.clone()));
    Ok(report)
}

fn check_uncached(bytes: &[u8]) -> Result<CheckReport, CheckError> {
    let mut cfg = wasmtime::Config::new();
    cfg.epoch_interruption(true);
    // The code is only inspected, never run: the quickest compilation will do.
    cfg.cranelift_opt_level(wasmtime::OptLevel::None);
    let engine = wasmtime::Engine::new(&cfg).map_err(|e| CheckError(format!("{e:#}")))?;
    let module = Module::new(&engine, bytes).map_err(|e| CheckError(format!("{e:#}")))?;
    let exports: Vec<String> = module.exports().map(|e| e.name().to_owned()).collect();
    let abi = AbiVersion::from_exports(exports.iter().map(String::as_str));
    let mut problems = Vec::new();
    if abi.is_none() {
        problems.push("no proxy_abi_version_* marker export".to_owned());
    }
    let imports: Vec<ImportInfo> = module
        .imports()
        .map(|i| {
            let func = matches!(i.ty(), ExternType::Func(_));
            ImportInfo {
                module: i.module().to_owned(),
                name: i.name().to_owned(),
                weir: func && known(i.module(), i.name()),
                envoy: func && envoy_has(i.module(), i.name()),
            }
        })
        .collect();
    for i in &imports {
        if !i.weir {
            problems.push(format!(
                "import {}.{} is not provided by Weir",
                i.module, i.name
            ));
        } else if !i.envoy {
            problems.push(format!(
                "import {}.{} is not provided by Envoy",
                i.module, i.name
            ));
        }
    }
    let mut linker = wasmtime::Linker::new(&engine);
    let mut signatures_ok = true;
    if crate::abi::add_to_linker(&mut linker).is_ok()
        && imports.iter().all(|i| i.weir)
        && let Err(e) = linker.instantiate_pre(&module)
    {
        signatures_ok = false;
        problems.push(format!("imports do not match the host's signatures: {e:#}"));
    }
    let runs_on_weir = abi.is_some() && signatures_ok && imports.iter().all(|i| i.weir);
    let portable_to_envoy = runs_on_weir && imports.iter().all(|i| i.envoy);
    Ok(CheckReport {
        abi,
        imports,
        exports,
        runs_on_weir,
        portable_to_envoy,
        problems,
    })
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.abi {
            Some(v) => writeln!(f, "ABI version: {v}")?,
            None => writeln!(f, "ABI version: none (not a proxy-wasm module)")?,
        }
        writeln!(f, "imports: {}", self.imports.len())?;
        for i in &self.imports {
            let mark = match (i.weir, i.envoy) {
                (true, true) => "",
                (true, false) => "  [Weir only]",
                (false, _) => "  [UNKNOWN]",
            };
            writeln!(f, "  {}.{}{mark}", i.module, i.name)?;
        }
        writeln!(f, "exports: {}", self.exports.join(", "))?;
        writeln!(
            f,
            "runs on Weir: {}",
            if self.runs_on_weir { "yes" } else { "no" }
        )?;
        writeln!(
            f,
            "portable to Envoy: {}",
            if self.portable_to_envoy { "yes" } else { "no" }
        )?;
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        Ok(())
    }
}
