//! Peer certificates checked as kiam's Go side (crypto/tls) checks them: the chain must reach the
//! CA bundle, and the extended key usage (EKU), where a certificate has one, must name the side's
//! purpose (serverAuth for servers, clientAuth for agents) or anyExtendedKeyUsage (2.5.29.37.0,
//! what cert-manager's `usages: [any]` issues, as kiam's TLS recipe does). rustls's verifiers
//! accept the purpose or no EKU, but refuse anyExtendedKeyUsage: these wrap them and decide that
//! one case again, with a validator that also accepts it. A certificate whose EKU lists only
//! other purposes (codeSigning, say) stays refused, and every other check is rustls's own.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use webpki::{
    ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter, KeyUsage, RequiredEkuNotFoundContext,
};

/// anyExtendedKeyUsage, 2.5.29.37.0 (the OID's content octets).
const ANY: KeyPurposeId<'static> = KeyPurposeId::new(&[0x55, 0x1d, 0x25, 0x00]);
/// id-kp-serverAuth, 1.3.6.1.5.5.7.3.1.
const SERVER_AUTH: KeyPurposeId<'static> = KeyPurposeId::new(&[0x2b, 6, 1, 5, 5, 7, 3, 1]);
/// id-kp-clientAuth, 1.3.6.1.5.5.7.3.2.
const CLIENT_AUTH: KeyPurposeId<'static> = KeyPurposeId::new(&[0x2b, 6, 1, 5, 5, 7, 3, 2]);

/// Which side of the link a certificate is for: it decides which key usage is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// The EKU rule of one side: no EKU, the side's purpose, or anyExtendedKeyUsage.
pub struct Purpose(pub Side);

impl ExtendedKeyUsageValidator for Purpose {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let (wanted, usage) = match self.0 {
            Side::Server => (SERVER_AUTH, KeyUsage::server_auth()),
            Side::Client => (CLIENT_AUTH, KeyUsage::client_auth()),
        };
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == wanted || id == ANY {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(RequiredEkuNotFoundContext {
            required: usage,
            present,
        }))
    }
}

/// Whether `leaf` (with `intermediates`) chains to `roots` with the EKU `side` needs.
pub(crate) fn chain(
    side: Side,
    roots: &RootCertStore,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let algorithms = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let cert = webpki::EndEntityCert::try_from(leaf)?;
    cert.verify_for_usage(algorithms.all, &roots.roots, intermediates, now, Purpose(side), None, None)
        .map(drop)
}

/// Whether rustls refused a certificate for its extended key usage only.
fn refused_for_purpose(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    )
}

/// The server's check of agents: rustls's client verifier, with kiam's EKU rule.
#[derive(Debug)]
pub struct AgentVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
}

impl AgentVerifier {
    /// Requires a client certificate that chains to `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<AgentVerifier, rustls::server::VerifierBuilderError> {
        let inner = rustls::server::WebPkiClientVerifier::builder(Arc::clone(&roots)).build()?;
        Ok(AgentVerifier { inner, roots })
    }
}

impl ClientCertVerifier for AgentVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(error) if refused_for_purpose(&error) => {
                chain(Side::Client, &self.roots, end_entity, intermediates, now)
                    .map(|()| ClientCertVerified::assertion())
                    .map_err(|_| error)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The agent's (and `kiam health`'s) check of servers: rustls's server verifier, with kiam's EKU
/// rule; a refusal is logged with the name the server was asked for and the reason.
#[derive(Debug)]
pub struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
}

impl ServerVerifier {
    /// Trusts servers whose certificates chain to `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<ServerVerifier, rustls::client::VerifierBuilderError> {
        let inner = rustls::client::WebPkiServerVerifier::builder(Arc::clone(&roots)).build()?;
        Ok(ServerVerifier { inner, roots })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(error) if refused_for_purpose(&error) => {
                chain(Side::Server, &self.roots, end_entity, intermediates, now).map_err(|_| error)?;
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.check(end_entity, intermediates, server_name, ocsp, now);
        if let Err(error) = &verified {
            tracing::warn!(server = server_name.to_str().as_ref(), %error, "server certificate refused");
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
