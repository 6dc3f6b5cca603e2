//! Test PKI minted in code with rcgen (aws-lc-rs), written as PEM files to a temporary directory.
//!
//! Two unrelated roots exist so tests can check both sides of mutual TLS: "kiam-test-ca" signs the
//! server and agent leaves, and a "stranger" CA signs a client leaf that looks like an agent but
//! must be refused by a server that trusts only the real CA. Every certificate is generated once
//! in [`TestPki::new`], so repeated calls to [`TestPki::server`] return the same files.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// Name of the real test CA (its subject CN).
pub const CA_NAME: &str = "kiam-test-ca";
/// Subject CN of the agent's client certificate (and of the stranger's look-alike).
pub const AGENT_NAME: &str = "kiam-agent";
/// DNS name the server certificate is valid for (besides `localhost` and 127.0.0.1).
pub const SERVER_NAME: &str = "kiam-server";

/// Paths of one PEM certificate, its PEM (PKCS#8) private key, and the CA bundle the holder
/// should trust for its peer.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The leaf certificate (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The CA certificate the holder uses to verify its peer (PEM).
    pub ca: PathBuf,
}

/// A CA, a stranger CA and their leaves, on disk for as long as this value lives.
pub struct TestPki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    server: CertFiles,
    agent: CertFiles,
    stranger: CertFiles,
}

impl TestPki {
    /// Mints the CA "kiam-test-ca", the unrelated "stranger" CA and the server, agent and stranger
    /// leaves, and writes them to a fresh temporary directory.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("kiam-it-pki-")
            .tempdir()
            .expect("create a temp dir for the test PKI");
        let ca = new_ca(CA_NAME);
        let stranger_ca = new_ca("stranger-ca");
        let ca_path = write(dir.path(), "ca.pem", &ca.pem());
        write(dir.path(), "stranger-ca.pem", &stranger_ca.pem());

        let server = leaf(
            dir.path(),
            "server",
            &ca,
            SERVER_NAME,
            &[SERVER_NAME, "localhost", "127.0.0.1"],
            &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            &ca_path,
        );
        let agent =
            leaf(dir.path(), "agent", &ca, AGENT_NAME, &[], &[ExtendedKeyUsagePurpose::ClientAuth], &ca_path);
        // Signed by the stranger, but trusts the real CA so that it can still verify the server
        // and the refusal a test sees is the server rejecting the client, not the reverse.
        let stranger = leaf(
            dir.path(),
            "stranger",
            &stranger_ca,
            AGENT_NAME,
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &ca_path,
        );
        TestPki { dir, ca, server, agent, stranger }
    }

    /// The server leaf: SANs DNS `kiam-server`, DNS `localhost`, IP 127.0.0.1; EKU serverAuth and
    /// clientAuth; `ca` is the real CA (to verify agents).
    pub fn server(&self) -> CertFiles {
        self.server.clone()
    }

    /// The agent's client leaf (CN `kiam-agent`, EKU clientAuth) signed by the real CA.
    pub fn agent(&self) -> CertFiles {
        self.agent.clone()
    }

    /// A client leaf signed by the stranger CA; its `ca` is the real CA so it verifies the server.
    pub fn stranger(&self) -> CertFiles {
        self.stranger.clone()
    }

    /// Another client leaf signed by the real CA, with the given CN and EKU clientAuth, written as
    /// `<file_stem>.pem` / `<file_stem>-key.pem` (for tests that need more than one identity).
    pub fn client(&self, file_stem: &str, common_name: &str) -> CertFiles {
        leaf(
            self.dir.path(),
            file_stem,
            &self.ca,
            common_name,
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &self.server.ca,
        )
    }

    /// An agent leaf bound to `node`: a `urn:kiam:node:<node>` URI SAN, for node binding.
    pub fn agent_for_node(&self, file_stem: &str, node: &str) -> CertFiles {
        let uri = format!("urn:kiam:node:{node}");
        leaf_with(
            self.dir.path(),
            file_stem,
            &self.ca,
            AGENT_NAME,
            &[],
            &[&uri],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &self.server.ca,
        )
    }

    /// An operator's leaf with the debug role (`urn:kiam:role:debug`), for the `Debug` service,
    /// bound to `node` as well when one is given.
    pub fn debug(&self, file_stem: &str, node: Option<&str>) -> CertFiles {
        let node = node.map(|n| format!("urn:kiam:node:{n}"));
        let mut uris = vec![kiam::tls::x509::DEBUG_ROLE_URI];
        uris.extend(node.as_deref());
        leaf_with(
            self.dir.path(),
            file_stem,
            &self.ca,
            "kiam-operator",
            &[],
            &uris,
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &self.server.ca,
        )
    }

    /// A client leaf from the real CA with these URI SANs (a role kiam-rs does not know, say).
    pub fn client_with_uris(&self, file_stem: &str, uris: &[&str]) -> CertFiles {
        leaf_with(
            self.dir.path(),
            file_stem,
            &self.ca,
            AGENT_NAME,
            &[],
            uris,
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &self.server.ca,
        )
    }

    /// Another server leaf from the real CA (same names as [`server`](Self::server)), for rotation.
    pub fn server_leaf(&self, file_stem: &str) -> CertFiles {
        leaf(
            self.dir.path(),
            file_stem,
            &self.ca,
            SERVER_NAME,
            &[SERVER_NAME, "localhost", "127.0.0.1"],
            &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            &self.server.ca,
        )
    }

    /// The directory holding every PEM file (`ca.pem`, `server.pem`, `server-key.pem`, ...).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn new_ca(common_name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("generate a CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign the test CA")
}

fn leaf(
    dir: &Path,
    file_stem: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    sans: &[&str],
    ekus: &[ExtendedKeyUsagePurpose],
    ca_path: &Path,
) -> CertFiles {
    leaf_with(dir, file_stem, issuer, common_name, sans, &[], ekus, ca_path)
}

#[allow(clippy::too_many_arguments)]
fn leaf_with(
    dir: &Path,
    file_stem: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    sans: &[&str],
    uris: &[&str],
    ekus: &[ExtendedKeyUsagePurpose],
    ca_path: &Path,
) -> CertFiles {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("test SANs are valid names or IPs");
    for uri in uris {
        params.subject_alt_names.push(rcgen::SanType::URI((*uri).try_into().expect("an ASCII URI")));
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus.to_vec();
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("generate a leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign the leaf with the test CA");
    CertFiles {
        cert: write(dir, &format!("{file_stem}.pem"), &cert.pem()),
        key: write(dir, &format!("{file_stem}-key.pem"), &key.serialize_pem()),
        ca: ca_path.to_path_buf(),
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, pem).expect("write a PEM file into the PKI temp dir");
    path
}

impl TestPki {
    /// A leaf from the real CA with the given extended key usages (none: no EKU extension): a
    /// server leaf (the server's names) when `server`, else an agent leaf (CN `kiam-agent`).
    pub fn leaf_with_usages(
        &self,
        file_stem: &str,
        server: bool,
        ekus: &[ExtendedKeyUsagePurpose],
    ) -> CertFiles {
        let (cn, sans): (&str, &[&str]) =
            if server { (SERVER_NAME, &[SERVER_NAME, "localhost", "127.0.0.1"]) } else { (AGENT_NAME, &[]) };
        leaf(self.dir.path(), file_stem, &self.ca, cn, sans, ekus, &self.server.ca)
    }
}
