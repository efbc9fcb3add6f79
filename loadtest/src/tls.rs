//! Certificates for the TLS scenarios and the generator's client configuration.
//!
//! The runner makes one throw-away CA and one server certificate (for `localhost`, `127.0.0.1`
//! and `*.example.com`) and gives the same files to every contender, so that all of them do the
//! same cryptographic work. The generator trusts that CA and nothing else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Errors making certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A PEM file could not be read.
    #[error("reading PEM {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Writing the files failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A CA and a server certificate signed by it, in PEM.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The server certificate (leaf only).
    pub cert_pem: String,
    /// The server's private key (PKCS#8, ECDSA P-256).
    pub key_pem: String,
}

/// Where [`TestPki::write_to`] put the files.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
}

impl TestPki {
    /// Makes a fresh CA and a server certificate for `localhost`, `127.0.0.1` and `*.example.com`.
    pub fn generate() -> Result<Self, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "weir-loadtest CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let names = ["localhost", "127.0.0.1", "example.com", "*.example.com"].map(String::from);
        let mut leaf_params = CertificateParams::new(names.to_vec())?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        Ok(Self {
            ca_pem: ca.pem(),
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<PkiFiles, TlsError> {
        let files = PkiFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        for (path, text) in [
            (&files.ca, &self.ca_pem),
            (&files.cert, &self.cert_pem),
            (&files.key, &self.key_pem),
        ] {
            std::fs::write(path, text).map_err(|source| TlsError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(files)
    }
}

/// A client configuration trusting only the CA in `ca_pem_file`, offering `alpn`, with session
/// resumption off so that every new connection does a full handshake.
pub fn client_config_from_file(
    ca_pem_file: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: ca_pem_file.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_pem_file)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in file".into()));
    }
    client_config(certs, alpn)
}

/// A client configuration trusting only `roots`, offering `alpn`, without session resumption.
pub fn client_config(
    roots: Vec<CertificateDer<'static>>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_into_a_client_config() {
        let pki = TestPki::generate().unwrap();
        assert!(pki.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(pki.key_pem.contains("PRIVATE KEY"));
        let dir = std::env::temp_dir().join(format!("weir-loadtest-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = pki.write_to(&dir).unwrap();
        let config = client_config_from_file(&files.ca, &[b"h2"]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_without_certificates_is_an_error() {
        let path =
            std::env::temp_dir().join(format!("weir-loadtest-empty-{}.pem", std::process::id()));
        std::fs::write(&path, "nothing here\n").unwrap();
        assert!(client_config_from_file(&path, &[]).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
