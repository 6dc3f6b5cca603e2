//! Mutual TLS material for both ends of the agent ↔ server link: PEM files to a rustls server
//! configuration that requires a client certificate signed by the CA, and to tonic's client TLS.
//! A CA file may hold several CAs; all are trusted, so a CA can be rotated with an overlap.
//! Extended key usage is checked as kiam (Go) checks it: see [`verify`].

pub mod reload;
pub mod verify;
pub mod x509;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// `--cert`, `--key` and `--ca`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or held no usable PEM block.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// rustls refused the material (for example a key that does not match the certificate).
    #[error("invalid TLS material: {0}")]
    Invalid(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), message: message.to_string() }
}

pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate found"));
    }
    Ok(certs)
}

pub(crate) fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

/// The server's TLS configuration: its certificate, and client certificates required and
/// verified against the CA file. ALPN offers `h2`, which gRPC clients (grpc-go, grpcio) require.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let verifier = verify::AgentVerifier::new(Arc::new(roots(&files.ca)?))
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client's TLS material for tonic: our certificate, and the servers' check (the CA file,
/// kiam's EKU rule, the name `domain`, the host part of `--server-address`).
#[derive(Clone)]
pub struct ClientTls {
    config: tonic::transport::ClientTlsConfig,
    verifier: Arc<verify::ServerVerifier>,
}

impl ClientTls {
    /// `endpoint` speaking TLS with this material.
    pub fn apply(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        endpoint.tls_config_with_verifier(self.config.clone(), Arc::clone(&self.verifier) as _)
    }
}

/// The client's TLS material: present our certificate, trust the CA file, and expect the server
/// to be named `domain` (the host part of `--server-address`).
pub fn client_config(files: &TlsFiles, domain: &str) -> Result<ClientTls, TlsError> {
    // Parse now so that a broken file fails at start-up with its path, not at the first call.
    certs(&files.cert)?;
    let verifier =
        verify::ServerVerifier::new(Arc::new(roots(&files.ca)?)).map_err(|e| file_error(&files.ca, e))?;
    PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let identity = tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let config = tonic::transport::ClientTlsConfig::new().identity(identity).domain_name(domain);
    Ok(ClientTls { config, verifier: Arc::new(verifier) })
}
