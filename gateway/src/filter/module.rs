//! Where a plugin's module comes from: a file, a built-in filter embedded in the binary, or an
//! `https://` URL pinned by SHA-256 and cached on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

// `BUILTIN: &[(&str, &[u8])]`, written by build.rs: the crates under `filters/` compiled for
// wasm32-wasip1 (empty when that target was not installed at build time).
include!(concat!(env!("OUT_DIR"), "/builtin_filters.rs"));

/// Names of the built-in filters in this binary.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where modules are looked for and kept.
pub struct Sources<'a> {
    /// Relative module paths resolve against this folder (the config file's).
    pub base_dir: &'a Path,
    /// Downloaded modules are kept under `<cache_dir>/modules`.
    pub cache_dir: &'a Path,
    /// PEM file of the CAs trusted for `https://` modules; `None`: the system bundle.
    pub ca_file: Option<&'a Path>,
}

/// Load a module from `source` (a path, `builtin:NAME` or `https://...`), checking `sha256`.
pub fn load(source: &str, sha256: Option<&str>, from: &Sources<'_>) -> Result<Arc<[u8]>, String> {
    let (base_dir, cache_dir) = (from.base_dir, from.cache_dir);
    let want = sha256.map(|s| s.trim().to_ascii_lowercase());
    if let Some(w) = &want
        && (w.len() != 64 || !w.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!("sha256 `{w}` is not 64 hex digits"));
    }
    let bytes: Vec<u8> = if let Some(name) = source.strip_prefix("builtin:") {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((_, b)) => b.to_vec(),
            None if BUILTIN.is_empty() => {
                return Err(format!(
                    "unknown built-in filter `{name}`: this weir was built without built-in filters (install the wasm32-wasip1 target and rebuild)"
                ));
            }
            None => {
                return Err(format!(
                    "unknown built-in filter `{name}`: built-in filters are {}",
                    builtin_names().join(", ")
                ));
            }
        }
    } else if source.starts_with("https://") {
        let Some(w) = &want else {
            return Err("a module fetched over https needs `sha256`".into());
        };
        let cached = cache_dir.join("modules").join(format!("{w}.wasm"));
        match std::fs::read(&cached) {
            Ok(b) if sha256_hex(&b) == *w => b,
            _ => {
                let b = download(source, from.ca_file)?;
                let got = sha256_hex(&b);
                if got != *w {
                    return Err(format!(
                        "module from `{source}` has sha256 {got}, expected {w}"
                    ));
                }
                if let Some(parent) = cached.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let tmp = cached.with_extension("tmp");
                if std::fs::write(&tmp, &b).is_ok() {
                    let _ = std::fs::rename(&tmp, &cached);
                }
                b
            }
        }
    } else if source.contains("://") {
        return Err(format!(
            "unsupported module source `{source}`: use a file path, builtin:NAME or https://"
        ));
    } else {
        let path = if Path::new(source).is_absolute() {
            PathBuf::from(source)
        } else {
            base_dir.join(source)
        };
        std::fs::read(&path).map_err(|e| format!("cannot read module `{}`: {e}", path.display()))?
    };
    if let Some(w) = &want {
        let got = sha256_hex(&bytes);
        if got != *w {
            return Err(format!("module `{source}` has sha256 {got}, expected {w}"));
        }
    }
    Ok(bytes.into())
}

/// The default cache directory: `$XDG_CACHE_HOME/weir`, else `$HOME/.cache/weir`, else a
/// folder under the system's temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("weir");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("weir");
    }
    std::env::temp_dir().join("weir-cache")
}

/// Download a module over HTTPS (the system's CA bundle, or `ca_file`), 10 s timeout, 64 MiB
/// cap. Runs its own small runtime: config checks happen off the request path, on a blocking
/// thread.
fn download(url: &str, ca_file: Option<&Path>) -> Result<Vec<u8>, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid module URL `{url}`: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("module URL `{url}` has no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let ca_file = ca_file.map_or_else(
        || "/etc/ssl/certs/ca-certificates.crt".to_string(),
        |p| p.display().to_string(),
    );
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::load_certs(&ca_file)? {
        let _ = roots.add(cert);
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let run = async move {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {host}: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, host.as_str())
            .header(http::header::USER_AGENT, "weir")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), 64 << 20)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        Ok(body.to_bytes().to_vec())
    };
    // On a thread of its own, so that this works whether or not the caller is inside a runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(10), run)
                        .await
                        .map_err(|_| format!("GET {url}: timed out"))?
                })
            })
            .join()
            .map_err(|_| format!("GET {url}: the download thread panicked"))?
    })
}
