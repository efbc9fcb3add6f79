//! TLS material: PEM files, the downstream SNI certificate resolver and upstream client configs.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Read a PEM certificate chain.
pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificate file `{path}`: {e}"))?
        .collect();
    let certs = certs.map_err(|e| format!("invalid certificate file `{path}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in `{path}`"));
    }
    Ok(certs)
}

/// Read a PEM private key.
pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("cannot read private key `{path}`: {e}"))
}

/// A certificate with the names it answers for.
pub struct NamedCert {
    /// The key and chain.
    pub key: Arc<CertifiedKey>,
    /// Exact names (lower-case) and wildcard suffixes (`.example.com`).
    pub names: Vec<String>,
}

/// Load a certificate and key; names default to the certificate's DNS SANs.
pub fn load_certified_key(cert: &str, key: &str, names: &[String]) -> Result<NamedCert, String> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signing = provider::sign::any_supported_type(&key_der)
        .map_err(|e| format!("unsupported private key `{key}`: {e}"))?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified
        .keys_match()
        .map_err(|e| format!("certificate `{cert}` does not match key `{key}`: {e}"))?;
    let names = if names.is_empty() {
        dns_names(&chain[0])
    } else {
        names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok(NamedCert {
        key: Arc::new(certified),
        names,
    })
}

/// DNS subject alternative names of a certificate.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee
            .valid_dns_names()
            .map(|n| n.to_ascii_lowercase())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Picks a certificate by SNI: exact name first, then the wildcard for the parent domain,
/// then the default (first) certificate.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Build from certificates, the first being the default.
    pub fn new(certs: Vec<NamedCert>) -> Option<SniResolver> {
        let default = certs.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for name in c.names {
                if let Some(suffix) = name.strip_prefix("*.") {
                    wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| c.key.clone());
                } else {
                    exact.entry(name).or_insert_with(|| c.key.clone());
                }
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for a server name.
    pub fn resolve_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = name {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return k.clone();
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.resolve_name(hello.server_name()))
    }
}

/// A server config: TLS 1.2 and 1.3, ALPN h2 and http/1.1, certificates by SNI.
pub fn server_config(resolver: SniResolver) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client config for an upstream: trust `ca` (PEM file), or nothing is verified when
/// `insecure` is set.
pub fn client_config(
    ca: Option<&str>,
    insecure: bool,
    http2: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider::default_provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let path = ca.ok_or("upstream TLS needs `ca` (or `insecure_skip_verify: true`)")?;
        for cert in load_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("invalid CA certificate in `{path}`: {e}"))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

/// Accepts any server certificate (`insecure_skip_verify`), still checking signatures.
#[derive(Debug)]
struct NoVerify(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
