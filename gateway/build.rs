//! Builds the built-in filters (`filters/*`, proxy-wasm crates) for wasm32-wasip1 and embeds
//! them, so that `module: builtin:NAME` needs no file. When the wasm32-wasip1 target is not
//! installed the binary is built without them (with a warning), and `builtin:` modules are
//! rejected with a message saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let filters = root.join("filters");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", filters.display());
    // The `wasm` profile the filters are built with lives in the workspace manifest.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=WEIR_SKIP_BUILTIN_FILTERS");
    let mut crates: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&filters) {
        for e in entries.flatten() {
            let manifest = e.path().join("Cargo.toml");
            if let Ok(text) = std::fs::read_to_string(&manifest) {
                println!("cargo:rerun-if-changed={}", e.path().join("src").display());
                println!("cargo:rerun-if-changed={}", manifest.display());
                if let Some(name) = package_name(&text) {
                    crates.push((name, e.path()));
                }
            }
        }
    }
    crates.sort();
    let mut table = String::from(
        "/// Built-in filters: (name, module bytes).\npub static BUILTIN: &[(&str, &[u8])] = &[\n",
    );
    let skip = std::env::var_os("WEIR_SKIP_BUILTIN_FILTERS").is_some();
    if !crates.is_empty() && !skip && target_installed() {
        let target_dir = out.join("filters-target");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args([
                "build",
                "--profile",
                "wasm",
                "--target",
                "wasm32-wasip1",
                "--target-dir",
            ])
            .arg(&target_dir);
        for (name, _) in &crates {
            cmd.args(["-p", name]);
        }
        // Flags meant for the host build must not leak into the wasm build.
        cmd.env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        let status = cmd.status().expect("run cargo for the built-in filters");
        if !status.success() {
            panic!("building the built-in filters (filters/*) for wasm32-wasip1 failed");
        }
        for (name, _) in &crates {
            let file = target_dir
                .join("wasm32-wasip1/wasm")
                .join(format!("{}.wasm", name.replace('-', "_")));
            let short = name.strip_prefix("weir-filter-").unwrap_or(name);
            table.push_str(&format!(
                "    ({short:?}, include_bytes!({:?})),\n",
                file.display().to_string()
            ));
        }
    } else if !crates.is_empty() && !skip {
        println!(
            "cargo:warning=wasm32-wasip1 is not installed: weir is built without built-in filters (rustup target add wasm32-wasip1)"
        );
    }
    table.push_str("];\n");
    std::fs::write(out.join("builtin_filters.rs"), table).unwrap();
}

fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
            continue;
        }
        if in_package && let Some(v) = line.strip_prefix("name") {
            let v = v.trim_start().strip_prefix('=')?.trim().trim_matches('"');
            return Some(v.to_string());
        }
    }
    None
}

fn target_installed() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip1"])
        .output()
    else {
        return false;
    };
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success() && Path::new(&dir).exists()
}
